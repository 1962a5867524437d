import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isTorusError } from '../core/errors.js';
import { IDLE_REBALANCE, type PeerInfo } from '../core/models.js';
import { MemoryMetadataStore } from '../metadata/memory/memory.js';
import { addPeersToRing, judgeBalance, manualChange, peerStatuses, removePeersFromRing, setReplication, updateRing } from './cluster.js';
import { parsePeerAddress } from './node.js';
import { endMaintenance, knownFrom, knownPeers, startMaintenance, writeKnown } from './peer-records.js';

function info(uuid: string, port: number, lastSeen = Date.now()): PeerInfo {
  return {
    uuid,
    address: `http://127.0.0.1:${port}`,
    httpAddress: '',
    lastSeen,
    heartbeatMs: 1000,
    totalBlocks: 100,
    usedBlocks: 0,
    blockSize: 4096,
    protocolVersion: 1,
    rebalance: IDLE_REBALANCE,
    version: 't',
  };
}

async function cluster() {
  const store = new MemoryMetadataStore();
  const meta = store.client();
  await meta.init({ blockSize: 4096, clusterId: 'c', createdAt: '' }, { type: 'ketama', version: 1, replication: 2, peers: [] });
  for (const [u, p] of [['a', 1], ['b', 2], ['c', 3]] as const) await meta.registerPeer(info(u, 40000 + p), 60_000);
  return { store, meta };
}

test('peer statuses: Avail, OK, DOWN; clients hidden', async () => {
  const { meta } = await cluster();
  await meta.registerPeer({ ...info('client', 0), address: '' }, 60_000);
  await addPeersToRing(meta, ['http://127.0.0.1:40001', 'b'], false);
  let st = await peerStatuses(meta);
  assert.deepEqual(st.peers.map((p) => [p.uuid, p.member]), [['a', 'OK'], ['b', 'OK'], ['c', 'Avail']]);
  await meta.unregisterPeer('b');
  await meta.registerPeer(info('c', 40003, Date.now() - 10_000), 60_000);
  st = await peerStatuses(meta);
  assert.deepEqual(st.peers.map((p) => [p.uuid, p.member]).sort(), [['a', 'OK'], ['b', 'DOWN'], ['c', 'DOWN']]);
});

test('add/remove validate their arguments', async () => {
  const { meta } = await cluster();
  await assert.rejects(addPeersToRing(meta, [], false), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  await assert.rejects(addPeersToRing(meta, ['a'], true), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  await assert.rejects(addPeersToRing(meta, ['zzz'], false), (e) => isTorusError(e, 'NOT_EXIST'));
  const { ring } = await addPeersToRing(meta, [], true);
  assert.equal(ring.version, 2);
  assert.equal(ring.peers.length, 3);
  await assert.rejects(addPeersToRing(meta, ['a'], false), (e) => isTorusError(e, 'EXISTS'));
  await meta.unregisterPeer('c');
  await assert.rejects(removePeersFromRing(meta, ['c'], false), (e) => isTorusError(e, 'INVALID_ARGUMENT') && /--force/.test(e.message));
  const r = await removePeersFromRing(meta, ['c'], true);
  assert.deepEqual(r.removed, ['c']);
  assert.equal(r.ring.version, 3);
  await assert.rejects(removePeersFromRing(meta, ['nope'], true), (e) => isTorusError(e, 'NOT_EXIST'));
});

test('replication above the member count is refused unless degraded is accepted', async () => {
  const { meta } = await cluster();
  await addPeersToRing(meta, [], true);
  await assert.rejects(setReplication(meta, 4, false), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  assert.equal((await setReplication(meta, 4, true)).replication, 4);
  await assert.rejects(setReplication(meta, 0, true), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  const single = await manualChange(meta, { type: 'single', replication: 1, uuids: ['a'], allPeers: false, force: false });
  assert.deepEqual([single.type, single.peers.length], ['single', 1]);
  await assert.rejects(manualChange(meta, { type: 'mod', replication: 2, uuids: ['a'], allPeers: true, force: false }), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
});

test('updateRing retries lost races and applies each change exactly once', async () => {
  const { meta, store } = await cluster();
  const others = [store.client(), store.client(), store.client()];
  await Promise.all(others.map((m, i) => updateRing(m, (cur) => ({ ...cur, version: cur.version + 1, replication: i + 1 }))));
  assert.equal((await meta.getRing()).version, 4);
});

test('parsePeerAddress', () => {
  assert.deepEqual(parsePeerAddress('http://10.0.0.5:40000'), { url: 'http://10.0.0.5:40000', listenHost: '10.0.0.5', port: 40000 });
  assert.equal(parsePeerAddress('tdp://127.0.0.1').port, 40000);
  assert.equal(parsePeerAddress('http://127.0.0.1:80').port, 80);
  assert.equal(parsePeerAddress('http://[::1]:4000').url, 'http://[::1]:4000');
  for (const bad of ['127.0.0.1:4000', 'ftp://a:1', 'http://a:1/path', 'http://:1'])
    assert.throws(() => parsePeerAddress(bad), (e) => isTorusError(e, 'INVALID_ARGUMENT'), bad);
});

/** A node's record after a finished pass on ring `ringVersion`, moving data or not. */
function passed(uuid: string, port: number, ringVersion: number, rebalancing = false, usedBlocks = 0): PeerInfo {
  return { ...info(uuid, port), usedBlocks, rebalance: { ...IDLE_REBALANCE, rebalancing, ringVersion } };
}

test('balance: right after a ring change, members whose last pass was on the old ring are still rebalancing', async () => {
  const { meta } = await cluster();
  const { ring } = await addPeersToRing(meta, [], true); // v2
  // Every node idle, but their last pass was on v1 (before they were members): not balanced.
  for (const [u, p] of [['a', 1], ['b', 2], ['c', 3]] as const) await meta.registerPeer(passed(u, 40000 + p, 1), 60_000);
  let b = judgeBalance(ring, (await peerStatuses(meta)).peers);
  assert.equal(b.balanced, false);
  assert.equal(b.rebalancing, true);
  assert.deepEqual(b.waiting.map((p) => p.uuid), ['a', 'b', 'c']);
  assert.deepEqual(b.moving, []);
  assert.ok(b.reasons.some((r) => r.startsWith('waiting for 3 node(s) to finish a pass on ring v2')), b.reasons.join('; '));
  // Two caught up, one not yet.
  await meta.registerPeer(passed('a', 40001, 2), 60_000);
  await meta.registerPeer(passed('b', 40002, 2), 60_000);
  b = judgeBalance(ring, (await peerStatuses(meta)).peers);
  assert.equal(b.balanced, false);
  assert.deepEqual(b.waiting.map((p) => p.uuid), ['c']);
  assert.ok(b.reasons.some((r) => r.startsWith('waiting for 1 node(s) to finish a pass on ring v2')));
  // All on v2 (a newer one, as after a change this ring object predates, counts too).
  await meta.registerPeer(passed('c', 40003, 3), 60_000);
  b = judgeBalance(ring, (await peerStatuses(meta)).peers);
  assert.equal(b.balanced, true);
  assert.equal(b.rebalancing, false);
  assert.deepEqual(b.reasons, []);
});

test('balance: a record without a ring version counts as not caught up', async () => {
  const { meta } = await cluster();
  const { ring } = await addPeersToRing(meta, [], true);
  const { ringVersion: _r, ...noVersion } = IDLE_REBALANCE;
  await meta.registerPeer({ ...info('a', 40001), rebalance: noVersion }, 60_000);
  await meta.registerPeer(passed('b', 40002, 2), 60_000);
  await meta.registerPeer(passed('c', 40003, 2), 60_000);
  const b = judgeBalance(ring, (await peerStatuses(meta)).peers);
  assert.equal(b.balanced, false);
  assert.deepEqual(b.waiting.map((p) => p.uuid), ['a']);
});

test('balance: moving data, down members, and who need not pass', async () => {
  const { meta } = await cluster();
  const { ring } = await addPeersToRing(meta, ['a', 'b'], false); // v2; c stays Avail
  // c is not a member and holds nothing: its old pass does not matter.
  await meta.registerPeer(passed('a', 40001, 2), 60_000);
  await meta.registerPeer(passed('b', 40002, 2), 60_000);
  await meta.registerPeer(passed('c', 40003, 1), 60_000);
  assert.equal(judgeBalance(ring, (await peerStatuses(meta)).peers).balanced, true);
  // A non-member that still holds blocks (removed, draining) has to pass on the new ring.
  await meta.registerPeer(passed('c', 40003, 1, false, 10), 60_000);
  let b = judgeBalance(ring, (await peerStatuses(meta)).peers);
  assert.equal(b.balanced, false);
  assert.deepEqual(b.waiting.map((p) => p.uuid), ['c']);
  // Caught up but still moving.
  await meta.registerPeer(passed('c', 40003, 2, true, 10), 60_000);
  b = judgeBalance(ring, (await peerStatuses(meta)).peers);
  assert.equal(b.balanced, false);
  assert.deepEqual(b.waiting, []);
  assert.deepEqual(b.moving.map((p) => p.uuid), ['c']);
  assert.ok(b.reasons.some((r) => r.startsWith('1 node(s) moving data')));
  await meta.registerPeer(passed('c', 40003, 2, false, 0), 60_000);
  assert.equal(judgeBalance(ring, (await peerStatuses(meta)).peers).balanced, true);
  // A down member is not balanced, but its stale record is neither moving nor waiting.
  await meta.registerPeer({ ...passed('b', 40002, 1, true), lastSeen: Date.now() - 60_000 }, 60_000);
  b = judgeBalance(ring, (await peerStatuses(meta)).peers);
  assert.equal(b.balanced, false);
  assert.equal(b.rebalancing, false);
  assert.deepEqual(b.down.map((p) => p.uuid), ['b']);
  assert.deepEqual([b.moving, b.waiting], [[], []]);
  // A member with no record at all is down too.
  await meta.unregisterPeer('b');
  b = judgeBalance(ring, (await peerStatuses(meta)).peers);
  assert.deepEqual(b.down.map((p) => p.uuid), ['b']);
  assert.equal(b.balanced, false);
});

test('a down member keeps its last known address: listed with it, removable by it', async () => {
  const { meta } = await cluster();
  await addPeersToRing(meta, [], true);
  await writeKnown(meta.kv(), knownFrom(info('c', 40003)));
  await meta.unregisterPeer('c');
  const st = await peerStatuses(meta);
  const c = st.peers.find((p) => p.uuid === 'c');
  assert.deepEqual([c?.member, c?.address, c?.known?.totalBlocks], ['DOWN', 'http://127.0.0.1:40003', 100]);
  await assert.rejects(removePeersFromRing(meta, ['http://127.0.0.1:40003'], false), (e) => isTorusError(e, 'INVALID_ARGUMENT') && /--force/.test(e.message));
  const r = await removePeersFromRing(meta, ['http://127.0.0.1:40003'], true);
  assert.deepEqual(r.removed, ['c']);
  assert.equal((await knownPeers(meta.kv())).has('c'), false, 'a node removed for good is forgotten');
});

test('peer remove that leaves fewer members than copies is refused unless degraded is accepted', async () => {
  const { meta } = await cluster();
  await addPeersToRing(meta, [], true);
  await setReplication(meta, 3, false);
  await assert.rejects(removePeersFromRing(meta, ['a'], false), (e) => isTorusError(e, 'INVALID_ARGUMENT') && /leaves 2 ring member\(s\) for replication 3.*--allow-degraded/.test(e.message));
  assert.equal((await meta.getRing()).peers.length, 3, 'nothing changed');
  const r = await removePeersFromRing(meta, ['a'], false, true);
  assert.equal(r.ring.peers.length, 2);
});

test('maintenance: a member down in its window is MAINT, not DOWN; after the deadline it is DOWN again', async () => {
  const { meta } = await cluster();
  await addPeersToRing(meta, [], true);
  await meta.unregisterPeer('b');
  await startMaintenance(meta.kv(), 'b', 60_000, 'kernel update');
  let st = await peerStatuses(meta);
  assert.equal(st.peers.find((p) => p.uuid === 'b')?.member, 'MAINT');
  let b = judgeBalance(st.ring, st.peers);
  assert.deepEqual([b.down.length, b.planned.length], [0, 1]);
  assert.match(b.reasons.join('\n'), /1 ring member\(s\) down for maintenance: b until /);
  // Past the deadline (judged 2 minutes later) normal rules resume.
  st = await peerStatuses(meta, Date.now() + 120_000);
  b = judgeBalance(st.ring, st.peers);
  assert.deepEqual([b.down.map((p) => p.uuid).sort(), b.planned.length], [['a', 'b', 'c'], 0], 'every record is stale by then, b included');
  assert.equal(await endMaintenance(meta.kv(), 'b'), true);
  assert.equal(await endMaintenance(meta.kv(), 'b'), false);
  await assert.rejects(startMaintenance(meta.kv(), 'b', 0, ''), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
});
