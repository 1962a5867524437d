import assert from 'node:assert/strict';
import { test } from 'node:test';
import { IDLE_REBALANCE, type PeerInfo, type ScrubInfo } from '../core/models.js';
import { MemoryMetadataStore } from '../metadata/memory/memory.js';
import { addPeersToRing } from './cluster.js';
import { clusterHealth } from './health.js';
import { endMaintenance, startMaintenance } from './peer-records.js';

function info(uuid: string, port: number, ringVersion: number): PeerInfo {
  return {
    uuid,
    address: `http://127.0.0.1:${port}`,
    httpAddress: '',
    lastSeen: Date.now(),
    heartbeatMs: 1000,
    totalBlocks: 100,
    usedBlocks: 0,
    blockSize: 4096,
    protocolVersion: 1,
    rebalance: { ...IDLE_REBALANCE, ringVersion },
    version: 't',
  };
}

test('health is not HEALTHY while a member has not finished a pass on the current ring', async () => {
  const meta = new MemoryMetadataStore().client();
  await meta.init({ blockSize: 4096, clusterId: 'c', createdAt: '' }, { type: 'ketama', version: 1, replication: 2, peers: [] });
  for (const [u, p] of [['a', 1], ['b', 2], ['c', 3]] as const) await meta.registerPeer(info(u, 40000 + p, 1), 60_000);
  const empty = await clusterHealth(meta);
  assert.deepEqual([empty.rebalancing, empty.waitingPeers], [false, []], 'no members: nothing to wait for');
  await addPeersToRing(meta, [], true); // v2; every node idle, but on v1
  let h = await clusterHealth(meta);
  assert.equal(h.healthy, false);
  assert.equal(h.rebalancing, true);
  assert.deepEqual(h.waitingPeers, ['http://127.0.0.1:40001', 'http://127.0.0.1:40002', 'http://127.0.0.1:40003']);
  assert.ok(h.problems.includes('rebalancing: waiting for 3 node(s) to finish a pass on ring v2'), h.problems.join('; '));
  await meta.registerPeer(info('a', 40001, 2), 60_000);
  await meta.registerPeer(info('b', 40002, 2), 60_000);
  h = await clusterHealth(meta);
  assert.equal(h.healthy, false);
  assert.deepEqual(h.waitingPeers, ['http://127.0.0.1:40003']);
  await meta.registerPeer(info('c', 40003, 2), 60_000);
  h = await clusterHealth(meta);
  assert.deepEqual([h.healthy, h.rebalancing, h.waitingPeers, h.problems], [true, false, [], []]);
});

test('health names bad copies that scrubbing found and could not repair yet', async () => {
  const meta = new MemoryMetadataStore().client();
  await meta.init({ blockSize: 4096, clusterId: 'c', createdAt: '' }, { type: 'ketama', version: 1, replication: 1, peers: [] });
  await meta.registerPeer(info('a', 40001, 2), 60_000);
  await addPeersToRing(meta, [], true);
  const scrub = { ...idleScrub, errors: 3, repaired: 1, pending: 2 };
  await meta.registerPeer({ ...info('a', 40001, 2), scrub }, 60_000);
  const h = await clusterHealth(meta);
  assert.equal(h.healthy, false);
  assert.deepEqual(h.problems, ['2 bad block copies found by scrubbing wait for a good copy (torusctl scrub status)']);
  await meta.registerPeer({ ...info('a', 40001, 2), scrub: { ...scrub, pending: 0 } }, 60_000);
  assert.equal((await clusterHealth(meta)).healthy, true);
});

const idleScrub: ScrubInfo = {
  intervalMs: 1000, rate: 1, passStartedAt: 0, passBytes: 0, heldBytes: 0, lastStartedAt: 0, lastFinishedAt: 0, lastBytes: 0, lastErrors: 0,
  lastRepaired: 0, nextPassAt: 0, passes: 0, checkedBytes: 0, errors: 0, repaired: 0, dropped: 0, pending: 0, orphanBlocks: 0,
  orphanGroups: [], orphansDeleted: 0, orphanGraceMs: 0,
};

test('health: a member down for maintenance is MAINTENANCE (healthy), its missing copies a note; past the window DEGRADED', async () => {
  const meta = new MemoryMetadataStore().client();
  await meta.init({ blockSize: 4096, clusterId: 'c', createdAt: '' }, { type: 'ketama', version: 1, replication: 2, peers: [] });
  for (const [u, p] of [['a', 1], ['b', 2], ['c', 3]] as const) await meta.registerPeer(info(u, 40000 + p, 2), 60_000);
  await addPeersToRing(meta, [], true);
  await meta.unregisterPeer('c');
  // A survivor reports copies it could not confirm on c.
  await meta.registerPeer({ ...info('a', 40001, 2), rebalance: { ...IDLE_REBALANCE, ringVersion: 2, underReplicated: 7 } }, 60_000);
  let h = await clusterHealth(meta);
  assert.equal(h.status, 'DEGRADED');
  assert.match(h.problems.join('\n'), /1 ring member\(s\) down: c/);
  await startMaintenance(meta.kv(), 'c', 60_000, 'disk swap');
  h = await clusterHealth(meta);
  assert.deepEqual([h.status, h.healthy, h.problems], ['MAINTENANCE', true, []]);
  assert.deepEqual(h.maintenancePeers.map((p) => [p.uuid, p.reason]), [['c', 'disk swap']]);
  assert.match(h.notes.join('\n'), /down for maintenance: c until .*\n7 block copies under-replicated \(expected during maintenance\)/);
  // Another member down is still a problem during maintenance.
  await meta.unregisterPeer('b');
  h = await clusterHealth(meta);
  assert.equal(h.status, 'DEGRADED');
  await endMaintenance(meta.kv(), 'c');
  h = await clusterHealth(meta);
  assert.match(h.problems.join('\n'), /2 ring member\(s\) down/);
});
