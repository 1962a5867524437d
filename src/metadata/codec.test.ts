import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isTorusError } from '../core/errors.js';
import { IDLE_REBALANCE, type PeerInfo, type ScrubInfo } from '../core/models.js';
import { decodePeer, encodePeer } from './codec.js';
import { MemoryMetadataStore } from './memory/memory.js';

function info(rebalance: PeerInfo['rebalance']): PeerInfo {
  return {
    uuid: 'u1',
    address: 'http://127.0.0.1:40000',
    httpAddress: 'http://127.0.0.1:4321',
    lastSeen: 1_700_000_000_000,
    heartbeatMs: 1000,
    totalBlocks: 512,
    usedBlocks: 17,
    blockSize: 131072,
    protocolVersion: 1,
    rebalance,
    version: '0.1.0',
  };
}

const busy = { rebalancing: true, blocksLeft: 3, bytesLeft: 3 * 131072, blocksMoved: 5, bytesMoved: 5 * 131072, rate: 1234.5, lastFinish: 1_700_000_000_500, underReplicated: 2, ringVersion: 7 };

test('peer record: encode then decode keeps every field, the ring version of the last pass included', () => {
  const p = info(busy);
  assert.deepEqual(decodePeer(encodePeer(p)), p);
  assert.equal(decodePeer(encodePeer(p)).rebalance.ringVersion, 7);
});

test('peer record: the rebalancer status as torusd publishes it (extra fields and all) decodes with its ring version', () => {
  const text = JSON.stringify(info({ ...busy, passes: 9 } as PeerInfo['rebalance']));
  assert.equal(decodePeer(text).rebalance.ringVersion, 7);
});

test('peer record: one written without a ring version decodes as 0 (no pass known)', () => {
  const { ringVersion: _r, ...old } = busy;
  assert.equal(decodePeer(JSON.stringify(info(old))).rebalance.ringVersion, 0);
  const { rebalance: _b, ...bare } = info(busy);
  const d = decodePeer(JSON.stringify(bare));
  assert.deepEqual(d.rebalance, { ...IDLE_REBALANCE, underReplicated: 0 });
  // Encoding one without it writes 0 explicitly.
  const { ringVersion: _i, ...idle } = IDLE_REBALANCE;
  assert.equal((JSON.parse(encodePeer(info(idle))) as { rebalance: { ringVersion: unknown } }).rebalance.ringVersion, 0);
});

test('peer record: a malformed ring version is an error, not a silent 0', () => {
  const text = JSON.stringify(info({ ...busy, ringVersion: 'seven' } as unknown as PeerInfo['rebalance']));
  assert.throws(() => decodePeer(text), (e) => isTorusError(e, 'INTERNAL') && /ringVersion/.test(e.message));
});

const scrub: ScrubInfo = {
  intervalMs: 604_800_000, rate: 2_097_152, passStartedAt: 1_700_000_000_000, passBytes: 65536, heldBytes: 131072,
  lastStartedAt: 1_699_000_000_000, lastFinishedAt: 1_699_000_100_000, lastBytes: 131072, lastErrors: 1, lastRepaired: 1,
  nextPassAt: 0, passes: 3, checkedBytes: 393216, errors: 2, repaired: 1, dropped: 1, pending: 0, orphanBlocks: 3,
  orphanGroups: [{ kind: 'unknown-type', id: 7, blocks: 3, since: 1_699_500_000_000 }], orphansDeleted: 4, orphanGraceMs: 604_800_000,
};

test('peer record: a storage node\'s scrub state and block types round-trip; records without them decode without', () => {
  const p: PeerInfo = { ...info(busy), scrub, blockTypes: [0, 1] };
  assert.deepEqual(decodePeer(encodePeer(p)), p);
  assert.equal(decodePeer(encodePeer(info(busy))).scrub, undefined);
  // A writer that publishes fewer fields (another version): the missing ones read as 0.
  const { errors: _e, orphanGroups: _g, ...fewer } = scrub;
  const d = decodePeer(JSON.stringify({ ...info(busy), scrub: fewer }));
  assert.equal(d.scrub?.errors, 0);
  assert.deepEqual(d.scrub?.orphanGroups, []);
  assert.equal(d.scrub?.repaired, 1);
});

test('the in-memory metadata twin stores peer records through the codec, as etcd does', async () => {
  const meta = new MemoryMetadataStore().client();
  await meta.registerPeer(info({ ...busy, passes: 9 } as PeerInfo['rebalance']), 60_000);
  const [got] = await meta.getPeers();
  assert.deepEqual(got, info(busy));
});
