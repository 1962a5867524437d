import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import fc from 'fast-check';
import { TorusError, isTorusError } from '../core/errors.js';
import { BlockType, type BlockRef } from '../core/ids.js';
import type { MetaKV } from '../core/interfaces.js';
import { buildLiveSet, collectLocal } from './gc.js';
import { VolumeMeta } from './meta.js';
import { memoryCluster } from './testing.js';
import { BlockVolume } from './volume.js';

const BS = 4096;

test('random unaligned writes read back byte-exact, before and after sync and reopen', async () => {
  const c = await memoryCluster(BS);
  const size = 64 * BS + 123;
  await c.vmeta.create('v', size);
  const vol = await BlockVolume.open(c.ctx, 'v');
  const ref = Buffer.alloc(size);
  await fc.assert(
    fc.asyncProperty(fc.array(fc.record({ off: fc.nat(size - 1), len: fc.integer({ min: 1, max: 3 * BS }), seed: fc.nat(255), sync: fc.boolean() }), { maxLength: 25 }), async (ops) => {
      for (const o of ops) {
        const len = Math.min(o.len, size - o.off);
        const data = Buffer.alloc(len, o.seed);
        data[0] = (o.seed + 1) & 0xff;
        await vol.write(o.off, data);
        data.copy(ref, o.off);
        if (o.sync) await vol.flush();
        const back = await vol.read(o.off, len);
        assert.ok(back.equals(ref.subarray(o.off, o.off + len)));
        // The pieces of readv, one per block touched, join to the same bytes.
        const pieces = await vol.readv(o.off, len);
        assert.equal(pieces.length, Math.floor((o.off + len - 1) / BS) - Math.floor(o.off / BS) + 1);
        assert.ok(Buffer.concat(pieces).equals(back));
      }
    }),
    { numRuns: 20 },
  );
  assert.ok((await vol.read(0, size)).equals(ref));
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v');
  assert.ok((await again.read(0, size)).equals(ref));
  await again.close();
});

test('a volume equals its last successful sync after its writer dies', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 32 * BS);
  const s1 = await c.newSession();
  const vol = await BlockVolume.open({ ...c.ctx, session: s1 }, 'v');
  const synced = randomBytes(10 * BS);
  await vol.write(BS / 2, synced);
  await vol.flush();
  await vol.write(0, randomBytes(20 * BS)); // never synced
  // The writer "dies": its lease runs out, nothing else happens.
  (s1 as unknown as { expire(): void }).expire();
  const after = await BlockVolume.open(c.ctx, 'v');
  const expect = Buffer.alloc(32 * BS);
  synced.copy(expect, BS / 2);
  assert.ok((await after.read(0, 32 * BS)).equals(expect));
  await after.close();
});

test('a second writer is refused with the holder named; read-only opens are allowed', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 8 * BS);
  const a = await BlockVolume.open(c.ctx, 'v');
  const other = await c.newSession();
  await assert.rejects(BlockVolume.open({ ...c.ctx, session: other }, 'v'), (e) => isTorusError(e, 'LOCKED') && /already mounted on another host \(held by .* pid \d+/.test(e.message));
  const ro = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  await assert.rejects(ro.write(0, Buffer.alloc(1)), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  await a.close();
  const b = await BlockVolume.open({ ...c.ctx, session: other }, 'v');
  await b.close();
});

test('fencing: after the lease expires, every flush fails and the head never moves', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 8 * BS);
  const s = await c.newSession();
  const vol = await BlockVolume.open({ ...c.ctx, session: s }, 'v');
  await vol.write(0, Buffer.alloc(BS, 1));
  await vol.flush();
  const id = (await c.vmeta.get('v')).id;
  const before = (await c.vmeta.head(id)).entry;
  (s as unknown as { expire(): void }).expire();
  await assert.rejects(vol.write(0, Buffer.alloc(BS, 2)), (e) => isTorusError(e, 'LOCKED'));
  await assert.rejects(vol.flush(), (e) => isTorusError(e, 'LOCKED'));
  // Someone else takes the volume; the old writer still cannot commit.
  const other = await BlockVolume.open(c.ctx, 'v');
  await assert.rejects(vol.flush(), (e) => isTorusError(e, 'LOCKED'));
  assert.equal((await c.vmeta.head(id)).entry.modRevision, before.modRevision);
  await other.close();
});

test('a commit fenced by etcd fails even when the writer did not notice the loss', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 8 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  const id = (await c.vmeta.get('v')).id;
  // The lock vanishes behind the writer's back (an operator deleting it, a lease revoked elsewhere).
  await c.meta.kv().txn([], [{ op: 'delete', key: `/torus/volumemeta/${id}/lock` }]);
  const before = (await c.vmeta.head(id)).entry.modRevision;
  await vol.write(0, Buffer.alloc(BS, 7));
  await assert.rejects(vol.flush(), (e) => isTorusError(e, 'LOCKED'));
  await assert.rejects(vol.flush(), (e) => isTorusError(e, 'LOCKED'), 'fenced for good');
  assert.equal((await c.vmeta.head(id)).entry.modRevision, before);
});

test('thin provisioning: a 10 TiB volume costs nothing until written; unwritten ranges read as zeros', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('big', 10 * 2 ** 40);
  const vol = await BlockVolume.open(c.ctx, 'big');
  assert.ok((await vol.read(5 * 2 ** 40, 3 * BS)).equals(Buffer.alloc(3 * BS)));
  assert.equal(c.used(), 0);
  await vol.write(7 * 2 ** 40 + 5, Buffer.from('hello'));
  await vol.flush();
  assert.equal((await vol.read(7 * 2 ** 40, 10)).toString('latin1'), '\0\0\0\0\0hello');
  const st = await vol.blockStatus(7 * 2 ** 40 - BS, 3 * BS);
  assert.deepEqual(st, [
    { length: BS, hole: true, zero: true },
    { length: BS, hole: false, zero: false },
    { length: BS, hole: true, zero: true },
  ]);
  await vol.close();
});

test('a sync costs what was written, not the volume size', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('small', 64 * BS);
  await c.vmeta.create('huge', 2 ** 40);
  const pages: number[] = [];
  for (const name of ['small', 'huge']) {
    const vol = await BlockVolume.open(c.ctx, name);
    await vol.write(0, randomBytes(BS)); // a first sync builds the path
    await vol.flush();
    const before = vol.pagesWritten;
    await vol.write(3 * BS, randomBytes(100));
    await vol.flush();
    pages.push(vol.pagesWritten - before);
    await vol.close();
  }
  // One page per level on the path: 1 for the small volume, the tree depth for the huge one.
  assert.equal(pages[0], 1);
  assert.ok(pages[1]! <= 4, `huge volume wrote ${pages[1]} pages for one block`);
});

test('trim and write-zeroes: read as zeros, whole blocks become holes', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 16 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  await vol.write(0, Buffer.alloc(16 * BS, 0xee));
  await vol.flush();
  await vol.trim(BS + 100, 3 * BS); // blocks 2,3 whole; 1 and 4 partial
  await vol.writeZeroes(10 * BS, 2 * BS, { noHole: true });
  await vol.flush();
  const all = await vol.read(0, 16 * BS);
  const expect = Buffer.alloc(16 * BS, 0xee);
  expect.fill(0, BS + 100, 4 * BS + 100);
  expect.fill(0, 10 * BS, 12 * BS);
  assert.ok(all.equals(expect));
  const holes = (await vol.blockStatus(0, 16 * BS)).map((e) => [e.length / BS, e.hole]);
  assert.deepEqual(holes, [
    [2, false],
    [2, true],
    [12, false],
  ]);
  await vol.close();
});

test('snapshots, restore and clones round-trip byte-exact', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 8 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  const one = randomBytes(8 * BS);
  await vol.write(0, one);
  await vol.flush();
  await c.vmeta.createSnapshot('v', 's1'); // while mounted, as of the last sync
  await assert.rejects(c.vmeta.createSnapshot('v', 's1'), (e) => isTorusError(e, 'EXISTS'));
  const two = randomBytes(8 * BS);
  await vol.write(0, two);
  await vol.flush();
  const snap = await BlockVolume.open(c.ctx, 'v', { snapshot: 's1' });
  assert.ok((await snap.read(0, 8 * BS)).equals(one));
  await assert.rejects(c.vmeta.restoreSnapshot('v', 's1', c.session), (e) => isTorusError(e, 'LOCKED'));
  await vol.close();
  await c.vmeta.restoreSnapshot('v', 's1', c.session);
  const restored = await BlockVolume.open(c.ctx, 'v');
  assert.ok((await restored.read(0, 8 * BS)).equals(one));
  await restored.close();
  // A clone is an independent writable volume sharing the unchanged blocks.
  const { snapshot } = await c.vmeta.getSnapshot('v', 's1');
  await c.vmeta.create('copy', snapshot.head.size, { head: snapshot.head, parent: { volume: 'v', snapshot: 's1' } });
  const clone = await BlockVolume.open(c.ctx, 'copy');
  assert.ok((await clone.read(0, 8 * BS)).equals(one));
  await clone.write(0, Buffer.alloc(BS, 9));
  await clone.close();
  const orig = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await orig.read(0, 8 * BS)).equals(one), 'the clone did not change its parent');
});

test('adopted whole-block writes are stored without a copy and never change once synced', async () => {
  // With a read cache the distributor keeps the very buffer the writer handed over.
  const c = await memoryCluster(BS, 100_000, 64 * BS);
  await c.vmeta.create('v', 8 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  const one = randomBytes(4 * BS);
  await vol.write(0, Buffer.from(one), false, true);
  await vol.flush();
  await c.vmeta.createSnapshot('v', 's1');
  // A partial write to an adopted, synced block, one during a sync, and a whole-block rewrite.
  await vol.write(10, Buffer.alloc(100, 7));
  const syncing = vol.flush();
  await vol.write(BS + 10, Buffer.alloc(100, 8));
  await vol.write(2 * BS, Buffer.alloc(BS, 9), false, true);
  await syncing;
  await vol.flush();
  const now = Buffer.from(one);
  now.fill(7, 10, 110);
  now.fill(8, BS + 10, BS + 110);
  now.fill(9, 2 * BS, 3 * BS);
  assert.ok((await vol.read(0, 4 * BS)).equals(now));
  const snap = await BlockVolume.open(c.ctx, 'v', { snapshot: 's1' });
  assert.ok((await snap.read(0, 4 * BS)).equals(one), 'the snapshot still reads what was synced then');
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, 4 * BS)).equals(now));
});

test('a big sync lets the event loop run while it hands out its puts', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 512 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  await vol.write(0, randomBytes(300 * BS));
  const before = c.transport.calls.put;
  let putsWhenTheLoopRan = -1;
  setImmediate(() => (putsWhenTheLoopRan = c.transport.calls.put - before));
  await vol.flush();
  const total = c.transport.calls.put - before;
  assert.ok(total >= 600, `${total} puts`);
  assert.ok(putsWhenTheLoopRan >= 0 && putsWhenTheLoopRan < total / 2, `the loop ran after ${putsWhenTheLoopRan} of ${total} puts`);
  await vol.close();
});

test('resize grows and, only when allowed, shrinks', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 4 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  await vol.write(0, Buffer.alloc(4 * BS, 3));
  await vol.resize(2 ** 30); // deepens the tree
  await vol.write(2 ** 30 - BS, Buffer.alloc(BS, 4));
  await vol.flush();
  await assert.rejects(vol.resize(BS), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  await vol.close();
  const v2 = await BlockVolume.open(c.ctx, 'v');
  assert.equal(v2.size, 2 ** 30);
  assert.ok((await v2.read(0, 4 * BS)).equals(Buffer.alloc(4 * BS, 3)));
  assert.ok((await v2.read(2 ** 30 - BS, BS)).equals(Buffer.alloc(BS, 4)));
  await v2.resize(2 * BS, true);
  await v2.close();
  const v3 = await BlockVolume.open(c.ctx, 'v');
  assert.equal(v3.size, 2 * BS);
  await assert.rejects(v3.read(2 * BS, 1), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  await v3.close();
});

test('concurrent partial writes to one block are all applied', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 4 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  await vol.write(0, Buffer.alloc(4 * BS, 1));
  await vol.flush();
  await Promise.all(Array.from({ length: 64 }, (_, i) => vol.write(BS + i * 64, Buffer.alloc(64, i + 10))));
  await Promise.all([vol.flush(), vol.write(0, Buffer.alloc(10, 5)), vol.flush()]);
  const blk = await vol.read(BS, BS);
  for (let i = 0; i < 64; i++) assert.ok(blk.subarray(i * 64, i * 64 + 64).equals(Buffer.alloc(64, i + 10)), `piece ${i}`);
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v');
  assert.ok((await again.read(BS, BS)).equals(blk));
  assert.ok((await again.read(0, 10)).equals(Buffer.alloc(10, 5)));
  await again.close();
});

test('bad input: out of range, bad names and sizes, duplicates', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 4 * BS);
  await assert.rejects(c.vmeta.create('v', BS), (e) => isTorusError(e, 'EXISTS'));
  for (const bad of ['', 'a/b', 'x@y', '-x'])
    await assert.rejects(c.vmeta.create(bad, BS), (e) => isTorusError(e, 'INVALID_ARGUMENT'), bad);
  for (const size of [0, -1, 2 ** 51]) await assert.rejects(c.vmeta.create('w', size), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  const vol = await BlockVolume.open(c.ctx, 'v');
  await assert.rejects(vol.write(4 * BS - 1, Buffer.alloc(2)), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  await assert.rejects(vol.read(-1, 1), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  await assert.rejects(c.vmeta.delete('v'), (e) => isTorusError(e, 'LOCKED'));
  await vol.close();
  await c.vmeta.delete('v');
  await assert.rejects(c.vmeta.get('v'), (e) => isTorusError(e, 'NOT_EXIST'));
});

test('past half the write cache a sync starts in the background; writes never wait for it, and it loses nothing', async () => {
  const c = await memoryCluster(BS);
  const size = 64 * BS;
  await c.vmeta.create('v', size);
  const vol = await BlockVolume.open(c.ctx, 'v', { writeCacheBytes: 16 * BS });
  const ref = Buffer.alloc(size);
  for (let i = 0; i < 12; i++) {
    const d = randomBytes(BS);
    await vol.write(i * BS, d);
    d.copy(ref, i * BS);
  }
  // 12 dirty blocks of a 16-block cache: no write was made to wait, yet syncs happened.
  for (let i = 0; i < 50 && vol.syncs === 0; i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(vol.syncs > 0, 'a background sync ran');
  // Writes during and after background syncs are kept, and the next flush commits them all.
  for (let i = 12; i < 40; i++) {
    const d = randomBytes(BS);
    await vol.write(i * BS, d);
    d.copy(ref, i * BS);
  }
  await vol.flush();
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, size)).equals(ref));
  await again.close();
});

test('a put that fails while the sync awaits a page load fails the flush, never the process', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 64 * BS);
  const first = await BlockVolume.open(c.ctx, 'v');
  await first.write(0, Buffer.alloc(BS * 4, 1));
  await first.close();
  let failPuts = false;
  // Puts fail at once (a full cluster); reads take a round trip, so tree.set awaits a page.
  const store = {
    blockSize: BS,
    putBlock: (ref: BlockRef, data: Uint8Array) => (failPuts ? Promise.reject(new TorusError('OUT_OF_SPACE', 'cluster full')) : c.dist.putBlock(ref, data)),
    getBlock: async (ref: BlockRef, crc?: number) => {
      await new Promise((r) => setTimeout(r, 20));
      return c.dist.getBlock(ref, crc);
    },
    readRange: (ref: BlockRef, o: number, l: number) => c.dist.readRange(ref, o, l),
    flush: () => c.dist.flush(),
  };
  const unhandled: unknown[] = [];
  const onUnhandled = (e: unknown): void => {
    unhandled.push(e);
  };
  process.on('unhandledRejection', onUnhandled);
  try {
    const vol = await BlockVolume.open({ ...c.ctx, store }, 'v');
    await vol.write(8 * BS, Buffer.alloc(BS, 2));
    failPuts = true;
    await assert.rejects(vol.flush(), (e: unknown) => isTorusError(e, 'OUT_OF_SPACE'));
    await new Promise((r) => setTimeout(r, 100));
    assert.deepEqual(unhandled, []);
  } finally {
    process.off('unhandledRejection', onUnhandled);
  }
});

test('a commit applied by etcd whose reply was lost counts as done: the writer stays on the head', async () => {
  const c = await memoryCluster(BS);
  const kv = c.meta.kv();
  let loseNextCommitReply = false;
  const flaky: MetaKV = Object.create(kv) as MetaKV;
  flaky.txn = async (...args: Parameters<MetaKV['txn']>) => {
    const r = await kv.txn(...args);
    if (loseNextCommitReply && args[1].some((o) => o.op === 'put' && o.key.endsWith('/head'))) {
      loseNextCommitReply = false;
      throw new TorusError('ETCD_UNAVAILABLE', 'cannot reach etcd (transaction): the reply was lost');
    }
    return r;
  };
  const vmeta = new VolumeMeta(flaky);
  await vmeta.create('v', 64 * BS);
  const vol = await BlockVolume.open({ ...c.ctx, meta: vmeta }, 'v');
  await vol.write(0, Buffer.alloc(4 * BS, 1));
  await vol.flush();
  await vol.write(0, Buffer.alloc(BS, 2));
  loseNextCommitReply = true;
  await vol.flush(); // resolved by asking etcd: it was applied
  // GC on every node, as torusd runs it: the previous tree's pages go.
  const live = await buildLiveSet(new VolumeMeta(kv), c.dist);
  for (const s of c.stores) await collectLocal(live, s);
  assert.ok((await vol.read(BS, BS)).equals(Buffer.alloc(BS, 1)), 'unchanged blocks still readable');
  await vol.write(8 * BS, Buffer.alloc(BS, 3));
  await vol.flush();
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  const expect = Buffer.alloc(64 * BS);
  expect.fill(1, 0, 4 * BS);
  expect.fill(2, 0, BS);
  expect.fill(3, 8 * BS, 9 * BS);
  assert.ok((await again.read(0, 64 * BS)).equals(expect));
  await again.close();
});

test('a sync whose etcd commit failed is retried without storing its blocks again; GC in between keeps them', async () => {
  const c = await memoryCluster(BS);
  const kv = c.meta.kv();
  let failCommits = 0;
  const flaky: MetaKV = Object.create(kv) as MetaKV;
  flaky.txn = async (...args: Parameters<MetaKV['txn']>) => {
    // Not applied at all: etcd unreachable for the head's transaction.
    if (failCommits > 0 && args[1].some((o) => o.op === 'put' && o.key.endsWith('/head'))) {
      failCommits--;
      throw new TorusError('ETCD_UNAVAILABLE', 'cannot reach etcd (transaction)');
    }
    return kv.txn(...args);
  };
  const dataPuts: BlockRef[] = [];
  const store = {
    blockSize: BS,
    putBlock: (ref: BlockRef, data: Uint8Array, opts?: { immutable?: boolean }) => {
      if (ref.type === BlockType.Data) dataPuts.push(ref);
      return c.dist.putBlock(ref, data, opts);
    },
    getBlock: (ref: BlockRef, crc?: number) => c.dist.getBlock(ref, crc),
    readRange: (ref: BlockRef, o: number, l: number) => c.dist.readRange(ref, o, l),
    flush: () => c.dist.flush(),
  };
  const vmeta = new VolumeMeta(flaky);
  await vmeta.create('v', 64 * BS);
  const vol = await BlockVolume.open({ ...c.ctx, meta: vmeta, store }, 'v');
  const expect = Buffer.alloc(64 * BS);
  for (let i = 0; i < 8; i++) {
    const b = randomBytes(BS);
    await vol.write(i * BS, b);
    b.copy(expect, i * BS);
  }
  failCommits = 2;
  await assert.rejects(vol.flush(), (e: unknown) => isTorusError(e, 'ETCD_UNAVAILABLE'));
  assert.equal(dataPuts.length, 8);
  // The same bytes again, then a real change: only the changed block is new.
  await vol.write(0, expect.subarray(0, BS));
  const changed = randomBytes(100);
  await vol.write(3 * BS + 7, changed);
  changed.copy(expect, 3 * BS + 7);
  await assert.rejects(vol.flush(), (e: unknown) => isTorusError(e, 'ETCD_UNAVAILABLE'));
  assert.equal(dataPuts.length, 9, 'the second attempt stored only the changed block');
  // GC on every node while nothing is committed: the stored blocks are above the head's epoch.
  const live = await buildLiveSet(new VolumeMeta(kv), c.dist);
  for (const s of c.stores) await collectLocal(live, s);
  await vol.flush();
  assert.equal(dataPuts.length, 9, 'the successful attempt stored nothing again');
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, 64 * BS)).equals(expect));
  await again.close();
  // And after a GC with the head committed, everything is still there on the nodes themselves.
  const live2 = await buildLiveSet(new VolumeMeta(kv), c.dist);
  for (const s of c.stores) await collectLocal(live2, s);
  const third = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await third.read(0, 64 * BS)).equals(expect));
  await third.close();
});

test('a sync that failed before its flush has nothing reused: the retry stores every block again', async () => {
  const c = await memoryCluster(BS);
  let failPuts = false;
  let dataPuts = 0;
  const store = {
    blockSize: BS,
    putBlock: (ref: BlockRef, data: Uint8Array, opts?: { immutable?: boolean }) => {
      if (ref.type === BlockType.Data) dataPuts++;
      // Half the replicas take the block, then the put fails: not durable as a whole.
      return failPuts ? c.dist.putBlock(ref, data, opts).then(() => Promise.reject(new TorusError('NO_PEER', 'wrote to only 1 of 2 replicas'))) : c.dist.putBlock(ref, data, opts);
    },
    getBlock: (ref: BlockRef, crc?: number) => c.dist.getBlock(ref, crc),
    readRange: (ref: BlockRef, o: number, l: number) => c.dist.readRange(ref, o, l),
    flush: () => c.dist.flush(),
  };
  await c.vmeta.create('v', 16 * BS);
  const vol = await BlockVolume.open({ ...c.ctx, store }, 'v');
  const data = randomBytes(4 * BS);
  await vol.write(0, data);
  failPuts = true;
  await assert.rejects(vol.flush(), (e: unknown) => isTorusError(e, 'NO_PEER'));
  failPuts = false;
  const before = dataPuts;
  await vol.flush();
  assert.equal(dataPuts - before, 4);
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, 4 * BS)).equals(data));
  await again.close();
});
