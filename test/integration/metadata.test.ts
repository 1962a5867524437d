import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { isTorusError } from '../../src/core/errors.js';
import type { MetadataService } from '../../src/core/interfaces.js';
import type { PeerInfo, RingModel } from '../../src/core/models.js';
import { IDLE_REBALANCE } from '../../src/core/models.js';
import { EtcdMetadata } from '../../src/metadata/etcd/etcd.js';
import { MemoryMetadataStore } from '../../src/metadata/memory/memory.js';
import { startEtcd, type EtcdHandle } from '../helpers/etcd.js';

// One contract, two implementations: the same suite runs against a real etcd and the in-memory
// twin, so the twin cannot drift from what production does.

const meta = { blockSize: 4096, clusterId: 'c1', createdAt: new Date(0).toISOString() };
const ring1: RingModel = { type: 'ketama', version: 1, replication: 2, peers: [] };

function peer(uuid: string): PeerInfo {
  return {
    uuid,
    address: `tdp://127.0.0.1:4000${uuid.length}`,
    httpAddress: '',
    lastSeen: Date.now(),
    heartbeatMs: 1000,
    totalBlocks: 100,
    usedBlocks: 1,
    blockSize: 4096,
    protocolVersion: 1,
    rebalance: IDLE_REBALANCE,
    version: 'test',
  };
}

async function nextRing(watch: RingModel[], n: number): Promise<void> {
  for (let i = 0; i < 100 && watch.length < n; i++) await new Promise((r) => setTimeout(r, 50));
}

function contract(name: string, make: () => Promise<{ a: MetadataService; b: MetadataService }>): void {
  describe(`MetadataService contract: ${name}`, () => {
    let a: MetadataService;
    let b: MetadataService;
    before(async () => {
      ({ a, b } = await make());
      await a.wipe();
    });
    after(async () => {
      await a.close();
      await b.close();
    });

    test('uninitialized cluster says so', async () => {
      await assert.rejects(a.globalMetadata(), (e) => isTorusError(e, 'NOT_INITIALIZED'));
      await assert.rejects(a.getRing(), (e) => isTorusError(e, 'NOT_INITIALIZED'));
    });

    test('init once, second init is EXISTS', async () => {
      await a.init(meta, ring1);
      assert.deepEqual(await b.globalMetadata(), meta);
      assert.deepEqual(await b.getRing(), ring1);
      await assert.rejects(b.init(meta, ring1), (e) => isTorusError(e, 'EXISTS'));
    });

    test('ring changes are version+1 only, and watched', async () => {
      const seen: RingModel[] = [];
      const unsub = b.watchRing((r) => seen.push(r));
      await nextRing(seen, 1);
      assert.equal(seen[0]?.version, 1);
      await assert.rejects(a.setRing({ ...ring1, version: 3 }), (e) => isTorusError(e, 'NON_SEQUENTIAL_RING'));
      await a.setRing({ ...ring1, version: 2, replication: 3 });
      await nextRing(seen, 2);
      assert.deepEqual(
        seen.map((r) => [r.version, r.replication]),
        [
          [1, 2],
          [2, 3],
        ],
      );
      unsub();
      assert.equal((await a.getRing()).version, 2);
    });

    test('concurrent ring writers: exactly one wins each version', async () => {
      const cur = await a.getRing();
      const results = await Promise.allSettled([
        a.setRing({ ...cur, version: cur.version + 1, replication: 1 }),
        b.setRing({ ...cur, version: cur.version + 1, replication: 5 }),
      ]);
      const ok = results.filter((r) => r.status === 'fulfilled');
      assert.equal(ok.length, 1, 'one writer wins');
      for (const r of results) if (r.status === 'rejected') assert.ok(isTorusError(r.reason, 'AGAIN') || isTorusError(r.reason, 'NON_SEQUENTIAL_RING'));
      assert.equal((await a.getRing()).version, cur.version + 1);
    });

    test('peers register under a lease and expire without heartbeats', async () => {
      await a.registerPeer(peer('p-a'), 2000);
      await b.registerPeer(peer('p-bb'), 60_000);
      const uuids = (await a.getPeers()).map((p) => p.uuid).sort();
      assert.deepEqual(uuids, ['p-a', 'p-bb']);
      // No renewal: p-a's lease runs out (etcd may take up to a second more than the TTL).
      let gone = false;
      for (let i = 0; i < 80 && !gone; i++) {
        await new Promise((r) => setTimeout(r, 100));
        gone = !(await b.getPeers()).some((p) => p.uuid === 'p-a');
      }
      assert.ok(gone, 'expired registration disappears');
      await b.unregisterPeer('p-bb');
      assert.deepEqual(await a.getPeers(), []);
    });

    test('kv: transactions compare and swap at one revision', async () => {
      const kv = a.kv();
      const k = '/torus/test/x';
      const r1 = await kv.txn([{ key: k, target: 'version', cmp: '==', value: 0 }], [{ op: 'put', key: k, value: 'one' }, { op: 'get', key: k }]);
      assert.equal(r1.succeeded, true);
      assert.equal(r1.gets[0]?.[0]?.value, 'one');
      const again = await b.kv().txn([{ key: k, target: 'version', cmp: '==', value: 0 }], [{ op: 'put', key: k, value: 'two' }], [{ op: 'get', key: k }]);
      assert.equal(again.succeeded, false);
      assert.equal(again.gets[0]?.[0]?.value, 'one');
      const e = await kv.get(k);
      assert.ok(e && e.version === 1 && e.modRevision > 0 && e.lease === '');
      const swap = await kv.txn([{ key: k, target: 'mod', cmp: '==', value: e.modRevision }, { key: k, target: 'value', cmp: '==', value: 'one' }], [{ op: 'put', key: k, value: 'three' }]);
      assert.equal(swap.succeeded, true);
      assert.equal((await kv.get(k))?.version, 2);
      await kv.txn([], [{ op: 'put', key: '/torus/test/y', value: '1' }, { op: 'put', key: '/torus/testz', value: '1' }]);
      const listed = await b.kv().list('/torus/test/');
      assert.deepEqual(listed.entries.map((x) => x.key), ['/torus/test/x', '/torus/test/y']);
      await kv.txn([], [{ op: 'delete', key: '/torus/test/', prefix: true }]);
      assert.equal((await kv.list('/torus/test/')).entries.length, 0);
      assert.ok(await kv.get('/torus/testz'));
    });

    test('kv: keys bound to a session vanish when it is revoked', async () => {
      const kv = a.kv();
      const s = await kv.session(10_000);
      assert.equal(s.alive, true);
      await kv.txn([], [{ op: 'put', key: '/torus/test/lock', value: 'me', session: s }]);
      assert.equal((await b.kv().get('/torus/test/lock'))?.lease !== '', true);
      await s.revoke();
      assert.equal(s.alive, false);
      assert.equal(await b.kv().get('/torus/test/lock'), undefined);
    });

    test('wipe removes everything', async () => {
      await a.wipe();
      await assert.rejects(b.globalMetadata(), (e) => isTorusError(e, 'NOT_INITIALIZED'));
    });
  });
}

let etcd: EtcdHandle;
before(async () => {
  etcd = await startEtcd();
});
after(async () => {
  await etcd?.stop();
});

contract('etcd', async () => ({
  a: new EtcdMetadata({ endpoints: [etcd.endpoint] }),
  b: new EtcdMetadata({ endpoints: [etcd.endpoint] }),
}));

contract('memory', async () => {
  const store = new MemoryMetadataStore();
  return { a: store.client(), b: store.client() };
});

test('unreachable etcd is a clear error within seconds, naming the endpoint', async () => {
  const m = new EtcdMetadata({ endpoints: ['127.0.0.1:1'], callTimeoutMs: 1500 });
  await assert.rejects(m.globalMetadata(), (e) => isTorusError(e, 'ETCD_UNAVAILABLE') && /127\.0\.0\.1:1/.test(e.message));
  await m.close();
});

test('a ring watch that resumes from a compacted revision reads the ring again and follows it', async () => {
  const w = new EtcdMetadata({ endpoints: [etcd.endpoint] });
  const m = new EtcdMetadata({ endpoints: [etcd.endpoint] });
  try {
    await m.wipe();
    await m.init(meta, ring1);
    const seen: number[] = [];
    const unsub = w.watchRing((r) => seen.push(r.version));
    const until = async (n: number): Promise<void> => {
      for (let i = 0; i < 200 && seen.length < n; i++) await new Promise((r) => setTimeout(r, 50));
    };
    await until(1);
    assert.deepEqual(seen, [1]);
    // History moves on and is compacted past the revision the watch would resume from.
    for (let i = 0; i < 50; i++) await m.kv().txn([], [{ op: 'put', key: '/torus/test/churn', value: String(i) }]);
    await m.kv().compact((await m.kv().status()).revision);
    // The watch's stream breaks; it comes back asking for the revision after the ring's last change.
    await etcd.kill();
    await etcd.restart();
    await m.setRing({ ...ring1, version: 2 });
    await until(2);
    assert.deepEqual(seen, [1, 2]);
    unsub();
  } finally {
    await w.close();
    await m.close();
  }
});
