import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isTorusError } from '../core/errors.js';
import { IDLE_REBALANCE, type PeerInfo } from '../core/models.js';
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

test('the in-memory metadata twin stores peer records through the codec, as etcd does', async () => {
  const meta = new MemoryMetadataStore().client();
  await meta.registerPeer(info({ ...busy, passes: 9 } as PeerInfo['rebalance']), 60_000);
  const [got] = await meta.getPeers();
  assert.deepEqual(got, info(busy));
});
