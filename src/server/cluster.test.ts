import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isTorusError } from '../core/errors.js';
import { IDLE_REBALANCE, type PeerInfo } from '../core/models.js';
import { MemoryMetadataStore } from '../metadata/memory/memory.js';
import { addPeersToRing, manualChange, peerStatuses, removePeersFromRing, setReplication, updateRing } from './cluster.js';
import { parsePeerAddress } from './node.js';

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
