import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import fc from 'fast-check';
import { TorusError, isTorusError } from '../core/errors.js';
import { BlockType, type BlockRef } from '../core/ids.js';
import type { KVSession, MetaKV } from '../core/interfaces.js';
import { buildLiveSet, collectLocal } from './gc.js';
import { DIRECT_INDEX_BASE } from './journal-format.js';
import { isReplayNeeded, VolumeMeta } from './meta.js';
import { memoryCluster } from './testing.js';
import { BlockVolume, type VolumeContext } from './volume.js';

const BS = 4096;

/** `n` writes of 1-600 bytes at random offsets, copied into `model` too. */
async function writeRandomly(vol: BlockVolume, model: Buffer, n: number): Promise<void> {
  for (let i = 0; i < n; i++) {
    const off = Math.floor(Math.random() * (model.length - 600));
    const d = randomBytes(1 + Math.floor(Math.random() * 600));
    await vol.write(off, d);
    d.copy(model, off);
  }
}

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

test("readInto fills the caller's buffer with what read returns: whole blocks, journal overlays, pending writes and holes", async () => {
  // A storage node's volume: its own replicas are read straight into the buffer.
  const c = await memoryCluster(BS, 100_000, 0, true);
  const own = c.stores[0]!;
  let direct = 0;
  const inner = own.readSectorsInto.bind(own);
  own.readSectorsInto = (ref, offset, into) => {
    direct++;
    return inner(ref, offset, into);
  };
  const size = 48 * BS;
  await c.vmeta.create('v', size);
  const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const model = Buffer.alloc(size);
  const write = async (off: number, data: Buffer): Promise<void> => {
    await vol.write(off, data);
    data.copy(model, off);
  };
  // Whole blocks folded into the tree, then journal records over some of them, then writes not
  // yet flushed; blocks 40.. are never written (holes).
  await write(0, randomBytes(32 * BS));
  await vol.flush();
  await vol.foldAll();
  await writeRandomly(vol, model, 20);
  await vol.flush();
  // Whole blocks written and flushed, not checkpointed: overlays that name stored blocks.
  await write(36 * BS, randomBytes(4 * BS));
  await vol.flush();
  await write(5 * BS + 7, randomBytes(900));
  await vol.trim(20 * BS, BS);
  model.fill(0, 20 * BS, 21 * BS);
  const check = async (off: number, len: number): Promise<void> => {
    const into = Buffer.alloc(len, 0xee);
    await vol.readInto!(off, into);
    assert.ok(into.equals(model.subarray(off, off + len)), `readInto ${off}+${len}`);
    assert.ok(into.equals(await vol.read(off, len)));
  };
  for (const [off, len] of [
    [0, size],
    [0, BS],
    [3 * BS, 4 * BS],
    [5 * BS, BS],
    [20 * BS - 512, 2 * BS],
    [38 * BS, 6 * BS],
    [100, 5000],
  ] as const)
    await check(off, len);
  for (let i = 0; i < 200; i++) {
    const off = Math.floor(Math.random() * (size - 1));
    await check(off, 1 + Math.floor(Math.random() * Math.min(3 * BS, size - off - 1)));
  }
  assert.ok(direct > 0, 'the node read its own replicas straight into the buffer');
  // A block written whole since the last checkpoint is read from the block its record names,
  // straight in as well (on whichever replicas hold it: here node a holds some of them).
  const before = direct;
  for (let i = 0; i < 8; i++) await check(36 * BS, 4 * BS);
  assert.ok(direct > before, 'blocks named by Block records were read straight into the buffer');

  // A piece that fails: the read fails only once every other piece is done writing into the
  // buffer, which its caller hands out again as soon as it has the answer.
  const dist = c.dist as unknown as { readRangeInto: (ref: BlockRef, offset: number, into: Buffer, crc?: number) => Promise<void> };
  const real = dist.readRangeInto.bind(dist);
  let calls = 0;
  let slowDone = 0;
  dist.readRangeInto = async (ref, offset, into, crc) => {
    if (calls++ === 0) throw new TorusError('IO', 'injected');
    await new Promise((r) => setTimeout(r, 20));
    await real(ref, offset, into, crc);
    slowDone++;
  };
  await c.vmeta.create('w', 3 * BS);
  const w = await BlockVolume.open(c.ctx, 'w', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  await w.write(0, randomBytes(3 * BS));
  await w.flush();
  await w.foldAll();
  calls = 0;
  await assert.rejects(w.readInto!(0, Buffer.alloc(3 * BS)), (e) => isTorusError(e, 'IO'));
  assert.equal(calls, 3);
  assert.equal(slowDone, 2, 'the other pieces had finished when the read failed');
  await w.close();
  await vol.close();
  // A client's volume (no disk of its own) reads into nothing: its blocks come as buffers anyway.
  const client = await memoryCluster(BS);
  await client.vmeta.create('v', BS);
  const theirs = await BlockVolume.open(client.ctx, 'v', { readOnly: true });
  assert.equal(theirs.readInto, undefined);
  await theirs.close();
  await assert.rejects(vol.readInto!(0, Buffer.alloc(BS)), (e) => isTorusError(e, 'CLOSED'));
});

test('reads of a sequential stream reach the store marked sequential; random reads and re-reads do not', async () => {
  for (const self of [false, true]) {
    const c = await memoryCluster(BS, 100_000, 0, self);
    await c.vmeta.create('v', 64 * BS);
    const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
    await vol.write(0, randomBytes(64 * BS));
    await vol.flush();
    await vol.foldAll();
    // What the store is told for each data block read (tree pages are not the volume's reads).
    const seen: boolean[] = [];
    type Read = (...args: unknown[]) => Promise<unknown>;
    const d = c.dist as unknown as Record<'getBlock' | 'readRange' | 'readRangeInto', Read | undefined>;
    for (const [name, at] of [['getBlock', 2], ['readRange', 4], ['readRangeInto', 4]] as const) {
      const real = d[name]?.bind(c.dist);
      if (!real) continue;
      d[name] = (...args: unknown[]) => {
        if ((args[0] as BlockRef).type === BlockType.Data) seen.push(args[at] === true);
        return real(...args);
      };
    }
    const read = (off: number, len: number): Promise<unknown> => (self ? vol.readInto!(off, Buffer.alloc(len)) : vol.read(off, len));
    const mode = self ? 'storage node' : 'client';
    for (let i = 0; i < 32; i += 2) await read(i * BS, 2 * BS);
    assert.equal(seen.length, 32, mode);
    assert.deepEqual(seen.slice(0, 2), [false, false], `${mode}: the first read of a stream is not known to be one`);
    assert.ok(seen.slice(2).every(Boolean), `${mode}: ${seen.join()}`);
    seen.length = 0;
    for (const i of [50, 7, 33, 50, 7, 21, 60]) await read(i * BS + 100, 200);
    assert.deepEqual(seen, new Array(7).fill(false), `${mode}: scattered reads and re-reads`);
    await vol.close();
  }
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


test('a closed volume is not kept alive by the session it was opened on (it would keep its whole overlay index)', async () => {
  // A collection on demand, without --expose-gc on the test runner.
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 32 * BS);
  // In a function of its own: a suspended async frame can keep its last value in a register.
  const useOnce = async (i: number): Promise<WeakRef<BlockVolume>> => {
    const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
    await vol.write(i * 100, randomBytes(300));
    await vol.flush();
    await vol.close();
    return new WeakRef(vol);
  };
  const closed = [await useOnce(0), await useOnce(1), await useOnce(2)];
  // WeakRefs hold their targets until the current job ends.
  await new Promise((r) => setTimeout(r, 10));
  gc();
  assert.deepEqual(
    closed.map((w) => w.deref() === undefined),
    [true, true, true],
    'every closed volume was collected',
  );
  // The session still tells the volume that is open when the lease is lost.
  const open = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  (c.session as unknown as { expire(): void }).expire();
  await assert.rejects(open.write(0, Buffer.alloc(10, 1)), (e) => isTorusError(e, 'LOCKED'));
  await assert.rejects(open.flush(), (e) => isTorusError(e, 'LOCKED'));
});

test('a writer that dies is replayed by the next: every acknowledged flush is there, nothing unflushed', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 32 * BS);
  const s1 = await c.newSession();
  const vol = await BlockVolume.open({ ...c.ctx, session: s1 }, 'v');
  const flushed = randomBytes(10 * BS);
  await vol.write(BS / 2, flushed);
  await vol.flush(); // in the journal only: no checkpoint yet
  await vol.write(0, randomBytes(20 * BS)); // never flushed
  // The writer "dies": its lease runs out, nothing else happens.
  (s1 as unknown as { expire(): void }).expire();
  // A reader sees the dead writer's tail too.
  const reader = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  const expect = Buffer.alloc(32 * BS);
  flushed.copy(expect, BS / 2);
  assert.ok((await reader.read(0, 32 * BS)).equals(expect));
  const after = await BlockVolume.open(c.ctx, 'v');
  assert.ok((await after.read(0, 32 * BS)).equals(expect));
  await after.close();
  // The old writer was fenced out of the journal: it can make nothing durable any more.
  await assert.rejects(vol.flush(), (e) => isTorusError(e, 'LOCKED'));
});

test('a flush is one journal append per replica: no etcd transaction, the same bytes on a 1 TiB volume as on a small one', async () => {
  const c = await memoryCluster(BS);
  let txns = 0;
  const kv = c.meta.kv();
  const counting: MetaKV = Object.create(kv) as MetaKV;
  counting.txn = (...args: Parameters<MetaKV['txn']>) => {
    txns++;
    return kv.txn(...args);
  };
  const vmeta = new VolumeMeta(counting);
  const journalBytes = (): number => c.stores.reduce((n, s) => n + s.stats().journalBytesWritten, 0);
  const costs: { bytes: number; appends: number }[] = [];
  for (const [name, size] of [['small', 64 * BS], ['huge', 2 ** 40]] as const) {
    await vmeta.create(name, size);
    const vol = await BlockVolume.open({ ...c.ctx, meta: vmeta }, name, { checkpointIntervalMs: 0, snapshotPollMs: 0 });
    await vol.write(0, randomBytes(512));
    await vol.flush();
    const [t0, b0, a0] = [txns, journalBytes(), c.transport.calls.append];
    await vol.write(3 * BS, randomBytes(100));
    await vol.flush();
    assert.equal(txns - t0, 0, 'no etcd transaction on a flush');
    costs.push({ bytes: journalBytes() - b0, appends: c.transport.calls.append - a0 });
    await vol.close();
  }
  assert.deepEqual(costs[1], costs[0]);
  // 100 bytes of data and a 64-byte header on each of the two replicas.
  assert.equal(costs[0]!.appends, 2);
  assert.equal(costs[0]!.bytes, 2 * (100 + 64));
});

test('fencing: after the lease expires every write and flush fails, and a new writer never sees them', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 8 * BS);
  const s = await c.newSession();
  const vol = await BlockVolume.open({ ...c.ctx, session: s }, 'v');
  await vol.write(0, Buffer.alloc(BS, 1));
  await vol.flush();
  (s as unknown as { expire(): void }).expire();
  await assert.rejects(vol.write(0, Buffer.alloc(BS, 2)), (e) => isTorusError(e, 'LOCKED'));
  await assert.rejects(vol.flush(), (e) => isTorusError(e, 'LOCKED'));
  const other = await BlockVolume.open(c.ctx, 'v');
  await assert.rejects(vol.flush(), (e) => isTorusError(e, 'LOCKED'));
  assert.ok((await other.read(0, BS)).equals(Buffer.alloc(BS, 1)));
  await other.close();
});

test('a writer whose lock was taken without its knowing gets no acknowledgement once the new writer fenced it', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 8 * BS);
  const s1 = await c.newSession();
  const a = await BlockVolume.open({ ...c.ctx, session: s1 }, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  await a.write(0, Buffer.alloc(BS, 1));
  await a.flush();
  const id = (await c.vmeta.get('v')).id;
  // The lock vanishes behind A's back (an operator deleting it, a lease revoked elsewhere), and B
  // opens the volume: it fences A's journal and replays it.
  await c.meta.kv().txn([], [{ op: 'delete', key: `/torus/volumemeta/${id}/lock` }]);
  const b = await BlockVolume.open(c.ctx, 'v');
  await a.write(BS, Buffer.alloc(BS, 2));
  await assert.rejects(a.flush(), (e) => isTorusError(e, 'LOCKED'));
  await assert.rejects(a.flush(), (e) => isTorusError(e, 'LOCKED'), 'fenced for good');
  await assert.rejects(a.checkpoint(), (e) => isTorusError(e, 'LOCKED'));
  assert.ok((await b.read(0, 2 * BS)).equals(Buffer.concat([Buffer.alloc(BS, 1), Buffer.alloc(BS)])));
  await b.close();
});

test('trim and write-zeroes: read as zeros, whole trimmed blocks are holes, before and after folding', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 16 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  await vol.write(0, Buffer.alloc(16 * BS, 0xee));
  await vol.flush();
  await vol.trim(BS + 100, 3 * BS); // blocks 2,3 whole; 1 and 4 partial
  await vol.writeZeroes(10 * BS, 2 * BS, { noHole: true });
  await vol.flush();
  const expect = Buffer.alloc(16 * BS, 0xee);
  expect.fill(0, BS + 100, 4 * BS + 100);
  expect.fill(0, 10 * BS, 12 * BS);
  const holes = [
    [2, false],
    [2, true],
    [12, false],
  ];
  assert.ok((await vol.read(0, 16 * BS)).equals(expect));
  assert.deepEqual((await vol.blockStatus(0, 16 * BS)).map((e) => [e.length / BS, e.hole]), holes);
  await vol.foldAll();
  assert.equal(vol.overlaySegments, 0);
  assert.ok((await vol.read(0, 16 * BS)).equals(expect));
  assert.deepEqual((await vol.blockStatus(0, 16 * BS)).map((e) => [e.length / BS, e.hole]), holes);
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, 16 * BS)).equals(expect));
});

test('snapshots (also while mounted), restore and clones round-trip byte-exact', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 8 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v', { snapshotPollMs: 20 });
  const one = randomBytes(8 * BS);
  await vol.write(0, one);
  await vol.flush();
  // While mounted: the writer takes it, with everything flushed before the request.
  await c.vmeta.createSnapshot('v', 's1');
  await assert.rejects(c.vmeta.createSnapshot('v', 's1'), (e) => isTorusError(e, 'EXISTS'));
  const two = randomBytes(8 * BS);
  await vol.write(0, two);
  await vol.flush();
  const snap = await BlockVolume.open(c.ctx, 'v', { snapshot: 's1' });
  assert.ok((await snap.read(0, 8 * BS)).equals(one));
  await assert.rejects(BlockVolume.restore(c.ctx, 'v', 's1'), (e) => isTorusError(e, 'LOCKED'));
  await vol.close();
  await BlockVolume.restore(c.ctx, 'v', 's1');
  const restored = await BlockVolume.open(c.ctx, 'v');
  assert.ok((await restored.read(0, 8 * BS)).equals(one));
  await restored.close();
  // A clone is an independent writable volume sharing the unchanged blocks.
  await c.vmeta.clone('copy', { volume: 'v', snapshot: 's1' });
  const clone = await BlockVolume.open(c.ctx, 'copy');
  assert.ok((await clone.read(0, 8 * BS)).equals(one));
  await clone.write(0, Buffer.alloc(BS, 9));
  await clone.close();
  const orig = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await orig.read(0, 8 * BS)).equals(one), 'the clone did not change its parent');
});

test('a snapshot, clone or restore of a volume whose writer died first replays its tail', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 8 * BS);
  const s1 = await c.newSession();
  const vol = await BlockVolume.open({ ...c.ctx, session: s1 }, 'v');
  const data = randomBytes(8 * BS);
  await vol.write(0, data);
  await vol.flush();
  (s1 as unknown as { expire(): void }).expire();
  await assert.rejects(c.vmeta.createSnapshot('v', 's'), (e) => isReplayNeeded(e));
  await assert.rejects(c.vmeta.clone('c1', { volume: 'v' }), (e) => isReplayNeeded(e));
  // Opening it for writing once replays the tail into a checkpoint.
  await (await BlockVolume.open(c.ctx, 'v')).close();
  await c.vmeta.createSnapshot('v', 's');
  const snap = await BlockVolume.open(c.ctx, 'v', { snapshot: 's' });
  assert.ok((await snap.read(0, 8 * BS)).equals(data));
});

test('adopted writes are kept without a copy; later writes never change what a snapshot holds', async () => {
  const c = await memoryCluster(BS, 100_000, 64 * BS);
  await c.vmeta.create('v', 8 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v', { snapshotPollMs: 20 });
  const one = randomBytes(4 * BS);
  await vol.write(0, Buffer.from(one), false, true);
  await vol.flush();
  await c.vmeta.createSnapshot('v', 's1');
  // A partial write over adopted data, one during a flush, and a whole-block rewrite.
  await vol.write(10, Buffer.alloc(100, 7));
  const flushing = vol.flush();
  await vol.write(BS + 10, Buffer.alloc(100, 8));
  await vol.write(2 * BS, Buffer.alloc(BS, 9), false, true);
  await flushing;
  await vol.flush();
  const now = Buffer.from(one);
  now.fill(7, 10, 110);
  now.fill(8, BS + 10, BS + 110);
  now.fill(9, 2 * BS, 3 * BS);
  assert.ok((await vol.read(0, 4 * BS)).equals(now));
  const snap = await BlockVolume.open(c.ctx, 'v', { snapshot: 's1' });
  assert.ok((await snap.read(0, 4 * BS)).equals(one), 'the snapshot still reads what was flushed then');
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, 4 * BS)).equals(now));
});

test('past half the write cache a flush starts in the background; writes never wait for it, and it loses nothing', async () => {
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
  for (let i = 0; i < 50 && vol.stats.flushes === 0; i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(vol.stats.flushes > 0, 'a background flush ran');
  for (let i = 12; i < 40; i++) {
    const d = randomBytes(BS);
    await vol.write(i * BS, d);
    d.copy(ref, i * BS);
  }
  await vol.flush();
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, size)).equals(ref));
});

test('a journal replica that fails: the journal moves (tail and all) and the flush succeeds without it', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 64 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const data = randomBytes(8 * BS);
  await vol.write(0, data);
  await vol.flush();
  const before = vol.head.journal!;
  // One of the journal's replicas dies.
  c.transport.down.add(before.replicas[0]!);
  const more = randomBytes(8 * BS);
  await vol.write(8 * BS, more);
  await vol.flush();
  const after = vol.head.journal!;
  assert.equal(vol.stats.journalMoves, 1);
  assert.ok(!after.replicas.includes(before.replicas[0]!), 'the new replicas leave the dead one out');
  // etcd names the new segment: a writer that dies now is replayed from there, without the dead node.
  const id = (await c.vmeta.get('v')).id;
  assert.deepEqual((await c.vmeta.head(id)).head.journal, after);
  await c.session.revoke();
  const next = await BlockVolume.open({ ...c.ctx, session: await c.newSession() }, 'v');
  assert.ok((await next.read(0, 16 * BS)).equals(Buffer.concat([data, more])));
  await next.close();
});

test('checkpoints and folds move overlays into runs and whole blocks; a reopen reads the same; a long run chain is compacted', async () => {
  const c = await memoryCluster(BS);
  const size = 32 * BS;
  await c.vmeta.create('v', size);
  const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0, foldIdleMs: 0, maxRunChain: 4 });
  const model = Buffer.alloc(size);
  for (let round = 0; round < 10; round++) {
    await writeRandomly(vol, model, 20);
    await vol.flush();
    await vol.checkpoint();
    assert.ok((await vol.read(0, size)).equals(model), `round ${round}`);
  }
  assert.ok(vol.stats.compactions >= 1, 'the chain was compacted');
  await vol.foldAll();
  assert.ok(vol.stats.folds > 0);
  assert.ok((await vol.read(0, size)).equals(model));
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, size)).equals(model));
});

test('a journal replica that failed and came back is used again when no segment can do without it', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 64 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const model = Buffer.alloc(64 * BS);
  const step = async (i: number): Promise<void> => {
    const d = randomBytes(BS);
    await vol.write(i * BS, d);
    d.copy(model, i * BS);
    await vol.flush();
  };
  await step(0);
  const first = vol.head.journal!.replicas;
  c.transport.down.add(first[0]!);
  await step(1);
  const second = vol.head.journal!.replicas;
  assert.ok(!second.includes(first[0]!));
  // It comes back; one of the new pair dies. Three nodes at R=2: the only live pair has the node
  // that failed a moment ago, and it answers again.
  c.transport.down.delete(first[0]!);
  c.transport.down.add(second.find((p) => p !== first[0])!);
  await step(2);
  assert.equal(vol.stats.journalMoves, 2);
  assert.ok(vol.head.journal!.replicas.includes(first[0]!));
  assert.ok((await vol.read(0, 64 * BS)).equals(model));
  await vol.close();
});

test('folds: a block after three times its size written into it, one split into too many segments, one trimmed whole; never a block written once', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 64 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0, maxSegmentsPerBlock: 4 });
  const model = Buffer.alloc(64 * BS);
  const write = async (off: number, len: number): Promise<void> => {
    const d = randomBytes(len);
    await vol.write(off, d);
    d.copy(model, off);
  };
  // Background folds queue behind each other; a checkpoint queues behind them.
  const settled = async (): Promise<number> => {
    await vol.flush();
    await vol.checkpoint();
    return vol.stats.folds;
  };
  // One small write into each of 32 blocks: folding any would write a whole block for 512 bytes.
  for (let i = 0; i < 32; i++) await write(i * BS + 512, 512);
  assert.equal(await settled(), 0);
  // Block 40, overwritten in place: folded once 3 x 4096 bytes went into it, not before.
  for (let i = 0; i < 23; i++) {
    await write(40 * BS + (i % 2) * 512, 512);
    await vol.flush();
  }
  assert.equal(await settled(), 0, 'folded after 11,776 bytes');
  await write(40 * BS, 512);
  assert.equal(await settled(), 1, 'folded at 12,288 bytes');
  // Block 50 in five separate pieces: more segments than a read should gather.
  for (let i = 0; i < 5; i++) await write(50 * BS + i * 700, 100);
  assert.equal(await settled(), 2);
  // Block 60 written whole, then trimmed whole: folded into a hole.
  await write(60 * BS, BS);
  await vol.foldAll();
  const folds = vol.stats.folds;
  await vol.trim(60 * BS, BS);
  model.fill(0, 60 * BS, 61 * BS);
  assert.equal(await settled(), folds + 1);
  assert.ok((await vol.read(0, 64 * BS)).equals(model));
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, 64 * BS)).equals(model));
});

test('a read-only open holds what it opened until it closes: GC keeps it while the writer moves on; a reader that dies lets it go', async () => {
  // Found by the rebalance test: a reader opened while the writer was mounted loaded a tree page
  // after the writer's next checkpoint, and GC had collected it meanwhile.
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 16 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const gc = async (): Promise<number> => {
    const live = await buildLiveSet(c.vmeta, c.dist);
    let deleted = 0;
    for (const s of c.stores) deleted += (await collectLocal(live, s)).deleted;
    return deleted;
  };
  // Checkpointed (tree and runs), then a tail of small writes and whole blocks in the journal.
  const one = randomBytes(16 * BS);
  await vol.write(0, one);
  await vol.flush();
  await vol.checkpoint();
  for (let i = 0; i < 8; i++) {
    const d = i % 2 ? randomBytes(BS) : randomBytes(300);
    await vol.write(i * 2 * BS + 7, d);
    d.copy(one, i * 2 * BS + 7);
  }
  await vol.flush();
  const rs = await c.newSession();
  const reader = await BlockVolume.open({ ...c.ctx, session: rs }, 'v', { readOnly: true });
  // The writer rewrites everything, folds and checkpoints: nothing the reader opened is named
  // by the head any more.
  const two = randomBytes(16 * BS);
  await vol.write(0, two);
  await vol.foldAll();
  assert.ok((await gc()) > 0, 'GC collected what the head no longer names');
  assert.ok((await reader.read(0, 16 * BS)).equals(one), 'the reader reads what it opened');
  await reader.close();
  assert.ok((await gc()) > 0, 'once the reader closed, what it held is collected');
  // A reader that dies (its lease expires) holds nothing either.
  const ds = await c.newSession();
  const dead = await BlockVolume.open({ ...c.ctx, session: ds }, 'v', { readOnly: true });
  await vol.write(0, randomBytes(16 * BS));
  await vol.foldAll();
  await gc();
  (ds as unknown as { expire(): void }).expire();
  assert.ok((await gc()) > 0, 'what the dead reader held is collected');
  await assert.rejects(dead.read(0, 16 * BS), (e) => isTorusError(e, 'BLOCK_UNAVAILABLE') || isTorusError(e, 'CORRUPT'));
  assert.ok((await vol.read(0, 16 * BS)).length === 16 * BS);
  await vol.close();
});

test('a checkpoint whose etcd commit fails changes nothing: the tail stays, and GC in between keeps it', async () => {
  const c = await memoryCluster(BS);
  const kv = c.meta.kv();
  let failCommits = false;
  const flaky: MetaKV = Object.create(kv) as MetaKV;
  flaky.txn = async (...args: Parameters<MetaKV['txn']>) => {
    // Not applied, and etcd said so (a commit whose answer was lost is sent again instead).
    if (failCommits && args[1].some((o) => o.op === 'put' && o.key.endsWith('/head2'))) throw new TorusError('ETCD_UNAVAILABLE', 'etcd is out of space (transaction)', { retryable: false });
    return kv.txn(...args);
  };
  const vmeta = new VolumeMeta(flaky);
  await vmeta.create('v', 64 * BS);
  const vol = await BlockVolume.open({ ...c.ctx, meta: vmeta }, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const data = randomBytes(16 * BS);
  await vol.write(0, data);
  await vol.flush();
  failCommits = true;
  await assert.rejects(vol.checkpoint(), (e) => isTorusError(e, 'ETCD_UNAVAILABLE'));
  // Flushes still work: they need no etcd.
  await vol.write(16 * BS, Buffer.alloc(BS, 5));
  await vol.flush();
  const live = await buildLiveSet(new VolumeMeta(kv), c.dist);
  for (const s of c.stores) await collectLocal(live, s);
  failCommits = false;
  await vol.checkpoint();
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, 17 * BS)).equals(Buffer.concat([data, Buffer.alloc(BS, 5)])));
});

test('a commit applied by etcd whose reply was lost counts as done: the writer stays on the head', async () => {
  const c = await memoryCluster(BS);
  const kv = c.meta.kv();
  let loseNextCommitReply = false;
  const flaky: MetaKV = Object.create(kv) as MetaKV;
  flaky.txn = async (...args: Parameters<MetaKV['txn']>) => {
    const r = await kv.txn(...args);
    if (loseNextCommitReply && args[1].some((o) => o.op === 'put' && o.key.endsWith('/head2'))) {
      loseNextCommitReply = false;
      throw new TorusError('ETCD_UNAVAILABLE', 'cannot reach etcd (transaction): the reply was lost');
    }
    return r;
  };
  const vmeta = new VolumeMeta(flaky);
  await vmeta.create('v', 64 * BS);
  const vol = await BlockVolume.open({ ...c.ctx, meta: vmeta }, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  await vol.write(0, Buffer.alloc(4 * BS, 1));
  await vol.flush();
  await vol.checkpoint();
  await vol.write(0, Buffer.alloc(BS, 2));
  await vol.flush();
  loseNextCommitReply = true;
  await vol.checkpoint(); // resolved by asking etcd: it was applied
  const live = await buildLiveSet(new VolumeMeta(kv), c.dist);
  for (const s of c.stores) await collectLocal(live, s);
  assert.ok((await vol.read(0, 4 * BS)).equals(Buffer.concat([Buffer.alloc(BS, 2), Buffer.alloc(3 * BS, 1)])));
  await vol.write(8 * BS, Buffer.alloc(BS, 3));
  await vol.flush();
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  const expect = Buffer.alloc(64 * BS);
  expect.fill(1, 0, 4 * BS);
  expect.fill(2, 0, BS);
  expect.fill(3, 8 * BS, 9 * BS);
  assert.ok((await again.read(0, 64 * BS)).equals(expect));
});

test('a commit whose answer was lost and that etcd had not applied is sent again: the checkpoint succeeds', async () => {
  const c = await memoryCluster(BS);
  const kv = c.meta.kv();
  let lose = 0;
  let commits = 0;
  const timeouts: (number | undefined)[] = [];
  const flaky: MetaKV = Object.create(kv) as MetaKV;
  flaky.txn = async (...args: Parameters<MetaKV['txn']>) => {
    if (args[1].some((o) => o.op === 'put' && o.key.endsWith('/head2'))) {
      commits++;
      timeouts.push(args[3]?.timeoutMs);
      // The member died with the request: nothing applied, no answer.
      if (lose > 0 && lose--) throw new TorusError('ETCD_UNAVAILABLE', 'etcd at http://a did not answer (transaction): connection lost');
    }
    return kv.txn(...args);
  };
  const vmeta = new VolumeMeta(flaky);
  await vmeta.create('v', 16 * BS);
  const vol = await BlockVolume.open({ ...c.ctx, meta: vmeta }, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  await vol.write(0, Buffer.alloc(BS, 7));
  await vol.flush();
  commits = 0;
  timeouts.length = 0;
  lose = 2;
  await vol.checkpoint();
  assert.equal(commits, 3, 'sent three times, applied once');
  // Each copy waits 2 s at most for its answer (a commit etcd dropped with a dying leader is
  // never answered), not the client's whole deadline.
  assert.deepEqual(timeouts, [2000, 2000, 2000]);
  await vol.write(BS, Buffer.alloc(BS, 8));
  await vol.flush();
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  const expect = Buffer.alloc(16 * BS);
  expect.fill(7, 0, BS);
  expect.fill(8, BS, 2 * BS);
  assert.ok((await again.read(0, 16 * BS)).equals(expect));
  await again.close();
});

test('a lost commit that etcd applies only after it was sent again is applied once, and the writer goes on', async () => {
  const c = await memoryCluster(BS);
  const kv = c.meta.kv();
  let late: (() => Promise<unknown>) | undefined;
  let hold = false;
  const flaky: MetaKV = Object.create(kv) as MetaKV;
  flaky.txn = async (...args: Parameters<MetaKV['txn']>) => {
    if (args[1].some((o) => o.op === 'put' && o.key.endsWith('/head2'))) {
      if (hold) {
        // The first copy is stuck in a dying member's proposal queue; it lands just before the second.
        hold = false;
        late = () => kv.txn(...args);
        throw new TorusError('ETCD_UNAVAILABLE', 'etcd at http://a did not answer (transaction): no answer within 5 s');
      }
      if (late) {
        const first = late;
        late = undefined;
        assert.equal((await first() as { succeeded: boolean }).succeeded, true);
      }
    }
    return kv.txn(...args);
  };
  const vmeta = new VolumeMeta(flaky);
  const rec = await vmeta.create('v', 16 * BS);
  const vol = await BlockVolume.open({ ...c.ctx, meta: vmeta }, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const epochBefore = Number((await kv.get(`/torus/volumemeta/${rec.id}/epoch`))!.value);
  await vol.write(0, Buffer.alloc(BS, 5));
  await vol.flush();
  hold = true;
  await vol.checkpoint();
  assert.equal(Number((await kv.get(`/torus/volumemeta/${rec.id}/epoch`))!.value), epochBefore + 1, 'one commit moved the epoch once');
  await vol.write(BS, Buffer.alloc(BS, 6));
  await vol.flush();
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  const expect = Buffer.alloc(16 * BS);
  expect.fill(5, 0, BS);
  expect.fill(6, BS, 2 * BS);
  assert.ok((await again.read(0, 16 * BS)).equals(expect));
  await again.close();
});

test('a run page whose put fails fails the checkpoint, never the process; the next one succeeds', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 64 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  await vol.write(0, randomBytes(16 * BS));
  await vol.flush();
  const put = c.dist.putBlock.bind(c.dist);
  let fail = true;
  c.dist.putBlock = (ref: BlockRef, data: Uint8Array, opts?: Parameters<typeof put>[2]) =>
    fail && ref.type === BlockType.Run ? Promise.reject(new TorusError('NO_PEER', 'all replicas down')) : put(ref, data, opts);
  await assert.rejects(vol.checkpoint(), (e) => isTorusError(e, 'NO_PEER'));
  fail = false;
  await vol.checkpoint();
  await vol.close();
});

test('zeroing a range far beyond the write cache flushes as it goes and lets the event loop run (issue 13)', async () => {
  const c = await memoryCluster(BS);
  const blocks = 2048;
  await c.vmeta.create('v', blocks * BS);
  const vol = await BlockVolume.open(c.ctx, 'v', { writeCacheBytes: 16 * BS, foldIdleMs: 0, checkpointIntervalMs: 0 });
  const data = randomBytes(blocks * BS);
  await vol.write(0, data);
  await vol.flush();
  for (const noHole of [false, true]) {
    const flushes = vol.stats.flushes;
    // Turns of the event loop, counted in its check phase (a 1 ms interval counted wall time,
    // which a fast machine may not spend).
    let turns = 0;
    let ticking = true;
    const tick = (): void => {
      if (!ticking) return;
      turns++;
      setImmediate(tick);
    };
    setImmediate(tick);
    try {
      // 2048 records against a 64 KiB cache: 128 fit, at 512 bytes each.
      await vol.writeZeroes(100, blocks * BS - 200, { noHole });
    } finally {
      ticking = false;
    }
    assert.ok(vol.stats.flushes - flushes >= 8, `${noHole ? 'NO_HOLE' : 'holes'}: ${vol.stats.flushes - flushes} flushes for 2048 records`);
    assert.ok(turns >= 8, `the event loop turned ${turns} times during the zeroing`);
    const back = await vol.read(0, blocks * BS);
    assert.ok(back.subarray(0, 100).equals(data.subarray(0, 100)) && back.subarray(blocks * BS - 100).equals(data.subarray(blocks * BS - 100)));
    assert.ok(back.subarray(100, blocks * BS - 100).every((b) => b === 0));
  }
  await vol.close();
});

test('whole blocks are stored once: the journal names them (Block records), the checkpoint takes them into the tree without a copy', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 64 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const journalBytes = (): number => c.stores.reduce((n, s) => n + s.stats().journalBytesWritten, 0);
  const data = randomBytes(16 * BS);
  await vol.write(0, data);
  const [p0, j0] = [c.transport.calls.put, journalBytes()];
  await vol.flush();
  // Each block once on each of the two replicas; the journal holds a few dozen bytes per block.
  assert.equal(c.transport.calls.put - p0, 16 * 2);
  assert.ok(journalBytes() - j0 < 16 * 2 * 128, `journal bytes ${journalBytes() - j0}`);
  assert.ok((await vol.read(0, 16 * BS)).equals(data));
  const p1 = c.transport.calls.put;
  await vol.checkpoint();
  // Only tree and run pages are written: no data block is copied.
  assert.ok(c.transport.calls.put - p1 <= 2 * 3, `checkpoint puts ${c.transport.calls.put - p1}`);
  assert.ok((await vol.read(0, 16 * BS)).equals(data));
  await vol.close();
  const ro = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await ro.read(0, 16 * BS)).equals(data));
});

test('whole and partial writes to one block keep their order, in memory, after a replay and after a checkpoint', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 8 * BS);
  const s1 = await c.newSession();
  const vol = await BlockVolume.open({ ...c.ctx, session: s1 }, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const expect = Buffer.alloc(8 * BS);
  const put = async (off: number, d: Buffer): Promise<void> => {
    await vol.write(off, d);
    d.copy(expect, off);
  };
  await put(10, randomBytes(100));
  await put(0, randomBytes(BS)); // over the partial write
  await put(2000, randomBytes(50)); // over the whole block
  await vol.flush();
  await put(BS, randomBytes(3 * BS));
  await put(BS + 7, randomBytes(9));
  await put(2 * BS, randomBytes(BS));
  await vol.flush();
  assert.ok((await vol.read(0, 8 * BS)).equals(expect));
  (s1 as unknown as { expire(): void }).expire();
  const next = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  assert.ok((await next.read(0, 8 * BS)).equals(expect), 'after the replay');
  await next.write(3 * BS, Buffer.alloc(BS, 9));
  Buffer.alloc(BS, 9).copy(expect, 3 * BS);
  await next.checkpoint();
  assert.ok((await next.read(0, 8 * BS)).equals(expect), 'after a checkpoint');
  await next.close();
  const ro = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await ro.read(0, 8 * BS)).equals(expect), 'after a reopen');
});

test('large blocks: aligned 4 KiB writes alone never fold for segments, and folds wait for the next checkpoint rather than taking one each', async () => {
  const big = 512 * 1024;
  const c = await memoryCluster(big);
  await c.vmeta.create('v', 4 * big);
  const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const model = Buffer.alloc(4 * big);
  // 100 distinct 4 KiB pieces of block 0, every other one: 100 segments, more than 64.
  for (let i = 0; i < 100; i++) {
    const d = randomBytes(4096);
    await vol.write(i * 8192 - (i >= 64 ? 64 * 8192 - 4096 : 0), d);
    d.copy(model, i * 8192 - (i >= 64 ? 64 * 8192 - 4096 : 0));
    await vol.flush();
  }
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(vol.stats.folds, 0, 'no fold for 100 segments of 4 KiB in a 512 KiB block');
  // Three times the block written into block 1: folded, in the background, with no checkpoint.
  const checkpoints = vol.stats.checkpoints;
  for (let i = 0; i < 3 * 128; i++) {
    const d = randomBytes(4096);
    const off = big + (i % 128) * 4096;
    await vol.write(off, d);
    d.copy(model, off);
    if (i % 32 === 31) await vol.flush();
  }
  await vol.flush();
  for (let i = 0; i < 100 && vol.stats.folds === 0; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal(vol.stats.folds, 1);
  // Give a checkpoint that would follow the fold batch time to happen (it must not).
  for (let i = 0; i < 20 && vol.stats.checkpoints === checkpoints; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal(vol.stats.checkpoints, checkpoints, 'the fold waits for the next checkpoint');
  assert.ok((await vol.read(0, 4 * big)).equals(model));
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, 4 * big)).equals(model));
});

test('a journal move between a fold and the next checkpoint commits the folded block with it: GC never takes it', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 16 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const model = Buffer.alloc(16 * BS);
  // Three times the block written into block 2 in 512-byte pieces: folded in the background.
  for (let i = 0; i < 24; i++) {
    const d = randomBytes(512);
    await vol.write(2 * BS + (i % 8) * 512, d);
    d.copy(model, 2 * BS + (i % 8) * 512);
    await vol.flush();
  }
  for (let i = 0; i < 100 && vol.stats.folds === 0; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal(vol.stats.folds, 1);
  const checkpoints = vol.stats.checkpoints;
  // A journal replica dies: the next flush moves the journal and commits its new place.
  c.transport.down.add(vol.head.journal!.replicas[0]!);
  const d = randomBytes(100);
  await vol.write(9 * BS, d);
  d.copy(model, 9 * BS);
  await vol.flush();
  assert.equal(vol.stats.journalMoves, 1);
  assert.equal(vol.stats.checkpoints, checkpoints, 'no checkpoint in between');
  c.transport.down.clear();
  const live = await buildLiveSet(c.vmeta, c.dist);
  for (const s of c.stores) await collectLocal(live, s);
  assert.ok((await vol.read(0, 16 * BS)).equals(model));
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, 16 * BS)).equals(model));
});

test('a fold never takes in a write not yet flushed: a crash after the next checkpoint leaves exactly the flushed writes', async () => {
  // Found by the snapshot-during-writes test: a fold read its block with a pending write in it,
  // the next checkpoint (a snapshot's) committed it, and the snapshot held a later write without
  // the flushed ones before it.
  const { c, s1, vol, expect } = await dyingWriter();
  // A checkpoint held up by its run page keeps the background fold asked for below waiting.
  const put = c.dist.putBlock.bind(c.dist);
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  c.dist.putBlock = async (ref: BlockRef, data: Uint8Array, opts?: Parameters<typeof put>[2]) => {
    if (ref.type === BlockType.Run) await gate;
    return put(ref, data, opts);
  };
  const first = randomBytes(100);
  await vol.write(0, first);
  first.copy(expect, 0);
  await vol.flush();
  const held = vol.checkpoint();
  // Three times the block written into block 2, flushed: a fold is asked for.
  for (let i = 0; i < 24; i++) {
    const d = randomBytes(512);
    await vol.write(2 * BS + (i % 8) * 512, d);
    d.copy(expect, 2 * BS + (i % 8) * 512);
    await vol.flush();
  }
  // A write into block 2 that is never flushed, there when the fold runs.
  await vol.write(2 * BS + 100, randomBytes(BS - 200));
  release();
  await held;
  c.dist.putBlock = put;
  for (let i = 0; i < 50; i++) await new Promise((r) => setTimeout(r, 10));
  await vol.checkpoint();
  await diesAndReplays(c, s1, expect, 'the replayed volume holds the flushed writes and not the unflushed one');
});

test('filled log blocks are sealed eight at a time, and a checkpoint seals the rest', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 16 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const seal = c.transport.sealLog.bind(c.transport);
  const seals: number[] = [];
  c.transport.sealLog = async (...a: Parameters<typeof seal>) => {
    seals.push(a[1].index);
    return seal(...a);
  };
  const model = Buffer.alloc(16 * BS);
  const sealedBlocks = (): number => new Set(seals).size;
  let most = 0;
  // 512-byte writes flushed one by one: a 4 KiB log block fills every seven or so.
  for (let i = 0; i < 100; i++) {
    const d = randomBytes(512);
    await vol.write((i % 100) * 512, d);
    d.copy(model, (i % 100) * 512);
    await vol.flush();
    await new Promise((r) => setImmediate(r));
    const n = sealedBlocks();
    assert.ok(n % 8 === 0, `blocks are sealed in batches of eight (${n} sealed after ${i + 1} flushes)`);
    most = n;
  }
  assert.ok(most >= 8, 'a batch was sealed while writing');
  await vol.checkpoint();
  assert.ok(sealedBlocks() > most, 'the checkpoint sealed what was waiting');
  assert.ok((await vol.read(0, 16 * BS)).equals(model));
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, 16 * BS)).equals(model));
  await again.close();
});

test('the next log block is opened on every replica before its first append, and a replay past one opened and left empty holds every flushed write', async () => {
  const { c, s1, vol, expect } = await dyingWriter();
  const append = c.transport.appendLog.bind(c.transport);
  const calls: { peer: string; index: number; pieces: number }[] = [];
  c.transport.appendLog = async (...a: Parameters<typeof append>) => {
    calls.push({ peer: a[0].uuid, index: a[1].index, pieces: a[2].length });
    return append(...a);
  };
  // 512-byte writes flushed one by one: a 4 KiB log block fills every seven or so.
  for (let i = 0; i < 60; i++) {
    const d = randomBytes(512);
    await vol.write((i % 16) * 512, d);
    d.copy(expect, (i % 16) * 512);
    await vol.flush();
    await new Promise((r) => setImmediate(r));
  }
  const firstData = new Map<string, number>();
  calls.forEach((call, i) => {
    if (call.pieces > 0 && !firstData.has(`${call.peer}/${call.index}`)) firstData.set(`${call.peer}/${call.index}`, i);
  });
  const indexes = [...new Set(calls.map((x) => x.index))].sort((x, y) => x - y);
  assert.ok(indexes.length >= 5, `log blocks used: ${indexes.join(', ')}`);
  for (const index of indexes.slice(1)) {
    for (const peer of new Set(calls.map((x) => x.peer))) {
      const opened = calls.findIndex((x) => x.peer === peer && x.index === index && x.pieces === 0);
      const data = firstData.get(`${peer}/${index}`);
      assert.ok(opened >= 0 && (data === undefined || opened < data), `block ${index} on ${peer}: opened ahead at call ${opened}, first data at ${data}`);
    }
  }
  // Blocks are opened a few at a time, so that their open records share a replica's fsyncs.
  for (const peer of new Set(calls.map((x) => x.peer))) {
    const mine = calls.filter((x) => x.peer === peer);
    const bursts = mine.filter((x, i) => x.pieces === 0 && (i === 0 || mine[i - 1]!.pieces > 0)).length;
    const opened = mine.filter((x) => x.pieces === 0).length;
    assert.ok(opened >= 2 * bursts, `${peer}: ${opened} blocks opened ahead in ${bursts} bursts`);
  }
  // The last block opened ahead has no records yet: the replay ends there, nothing lost.
  const last = indexes[indexes.length - 1]!;
  assert.ok(!calls.some((x) => x.index === last && x.pieces > 0), 'the newest block was opened ahead and is still empty');
  await diesAndReplays(c, s1, expect, 'the replay holds every flushed write');
});

test('a log block whose seal failed on every replica in the background is sealed by the next checkpoint', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 16 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const seal = c.transport.sealLog.bind(c.transport);
  let failing = true;
  let failed = 0;
  c.transport.sealLog = async (...a: Parameters<typeof seal>) => {
    if (!failing) return seal(...a);
    failed++;
    throw new TorusError('TIMEOUT', 'the seal timed out');
  };
  const model = Buffer.alloc(16 * BS);
  // 512-byte writes flushed one by one fill 4 KiB log blocks (data and headers) every few, and
  // a batch of filled blocks (eight) is sealed in the background.
  for (let i = 0; i < 80; i++) {
    const d = randomBytes(512);
    await vol.write(i * 512, d);
    d.copy(model, i * 512);
    await vol.flush();
  }
  for (let i = 0; i < 100 && failed === 0; i++) await new Promise((r) => setTimeout(r, 10));
  assert.ok(failed > 0, 'a background seal failed');
  failing = false;
  await vol.checkpoint();
  assert.ok((await vol.read(0, 16 * BS)).equals(model));
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, 16 * BS)).equals(model));
});

/** The writer of `session` dies (its lease runs out); the next writer of 'v' replays exactly `expect`. */
async function diesAndReplays(c: Awaited<ReturnType<typeof memoryCluster>>, session: KVSession, expect: Buffer, what: string): Promise<void> {
  (session as unknown as { expire(): void }).expire();
  const after = await BlockVolume.open(c.ctx, 'v');
  assert.ok((await after.read(0, expect.length)).equals(expect), what);
  await after.close();
}

/** Volume 'v' (16 blocks) open by a writer whose session diesAndReplays can end; nothing in the background but flushes and folds. */
async function dyingWriter() {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 16 * BS);
  const s1 = await c.newSession();
  const vol = await BlockVolume.open({ ...c.ctx, session: s1 }, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0, foldIdleMs: 0 });
  return { c, s1, vol, expect: Buffer.alloc(16 * BS) };
}

test('a flush whose whole-block puts fail one fast and one slow loses nothing: later acknowledged flushes all replay', async () => {
  // Found by the CA rotation test under load: the fast failure ended the flush while the slow put
  // was still running; it then marked its record stored without the record saying where, the
  // next flush failed half way through the journal append (INTERNAL), and the LSN it skipped hid
  // every later acknowledged flush from the replay.
  const { c, s1, vol, expect } = await dyingWriter();
  const put = c.dist.putBlock.bind(c.dist);
  let slow: Promise<void> | undefined;
  let direct = 0;
  c.dist.putBlock = (ref: BlockRef, data: Uint8Array, opts?: Parameters<typeof put>[2]) => {
    if (ref.index < DIRECT_INDEX_BASE) return put(ref, data, opts);
    if (direct++ === 0) return Promise.reject(new TorusError('NO_PEER', 'replica down'));
    slow = new Promise<void>((r) => setTimeout(r, 20)).then(() => put(ref, data, opts));
    return slow;
  };
  const whole = randomBytes(2 * BS);
  await vol.write(0, whole);
  await assert.rejects(vol.flush(), (e) => isTorusError(e, 'NO_PEER'));
  await slow;
  c.dist.putBlock = put;
  // The failed flush's writes are still pending: the next flush takes them.
  whole.copy(expect, 0);
  for (let i = 0; i < 4; i++) {
    const d = randomBytes(BS / 2);
    await vol.write(4 * BS + i * BS, d);
    d.copy(expect, 4 * BS + i * BS);
    await vol.flush();
  }
  assert.ok((await vol.read(0, 16 * BS)).equals(expect));
  await diesAndReplays(c, s1, expect, 'every acknowledged flush after the failed one replays');
});

test('a session that fills its journal segment moves to the next one; every acknowledged flush replays', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 16 * BS);
  const s1 = await c.newSession();
  const vol = await BlockVolume.open({ ...c.ctx, session: s1 }, 'v', { checkpointIntervalMs: 0, checkpointBytes: 8 * 1024, snapshotPollMs: 0, logBlocksPerSegment: 8 });
  const expect = Buffer.alloc(16 * BS);
  // Each flush of a 3 KiB record opens a log block of its own at worst: 8 fill a segment.
  for (let i = 0; i < 40; i++) {
    const d = randomBytes(3 * 1024);
    const at = (i * 5 * 1024) % (15 * BS);
    await vol.write(at, d);
    d.copy(expect, at);
    await vol.flush();
  }
  assert.ok(vol.stats.journalMoves >= 3, `${vol.stats.journalMoves} journal moves`);
  await diesAndReplays(c, s1, expect, 'every acknowledged flush replays after the segment switches');
});

test('a checkpoint cut while an append fails on a replica waits for the move (NO_PEER), and the next one succeeds', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 16 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const expect = Buffer.alloc(16 * BS);
  const put = (at: number, len: number): void => {
    const d = randomBytes(len);
    d.copy(expect, at);
    void vol.write(at, d);
  };
  // Acknowledged records in the first log block, then a flush whose records fill it and spill
  // into the next: the block it filled is to be sealed once that append is on every replica.
  put(0, 1024);
  await vol.flush();
  const victim = vol.head.journal!.replicas[1]!;
  const append = c.dist.journalAppend.bind(c.dist);
  let release!: () => void;
  const held = new Promise<void>((r) => (release = r));
  let reached!: () => void;
  const sent = new Promise<void>((r) => (reached = r));
  c.dist.journalAppend = async (peer, ref, pieces, sync) => {
    if (peer !== victim) return append(peer, ref, pieces, sync);
    reached();
    await held;
    throw new TorusError('NO_PEER', 'replica died mid-append');
  };
  put(BS, 2048);
  put(2 * BS, 2048);
  const flushing = vol.flush();
  await sent;
  const cp = vol.checkpoint();
  await new Promise((r) => setTimeout(r, 10));
  c.dist.journalAppend = append;
  release();
  await assert.rejects(cp, (e) => isTorusError(e, 'NO_PEER'));
  await flushing;
  assert.equal(vol.stats.journalMoves, 1);
  await vol.checkpoint();
  assert.ok((await vol.read(0, 16 * BS)).equals(expect));
  await vol.close();
  const ro = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await ro.read(0, 16 * BS)).equals(expect));
});

/**
 * The cluster's distributor, every call of which answers 1 ms late, and a seal (which only
 * checkpoints wait for) 10 ms late: flushes fall behind the writers, checkpoints behind flushes.
 */
function slowStore(store: VolumeContext['store']): VolumeContext['store'] {
  return new Proxy(store, {
    get(target, prop, receiver) {
      const v: unknown = Reflect.get(target, prop, receiver);
      if (typeof v !== 'function') return v;
      return (...args: unknown[]) => {
        const r: unknown = (v as (...a: unknown[]) => unknown).apply(target, args);
        const ms = prop === 'journalSeal' ? 10 : 1;
        return r instanceof Promise ? r.then(async (x: unknown) => (await new Promise((res) => setTimeout(res, ms)), x)) : r;
      };
    },
  });
}

test('memory budgets: the write cache and the journal tail stay within theirs under concurrent writers and slow replicas, and lose nothing', async () => {
  const c = await memoryCluster(BS);
  const size = 256 * BS;
  await c.vmeta.create('v', size);
  const budget = { writeCacheBytes: 16 * BS, checkpointBytes: 8 * BS, journalTailBytes: 16 * BS };
  const vol = await BlockVolume.open({ ...c.ctx, store: slowStore(c.ctx.store) }, 'v', { ...budget, checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const m0 = vol.memory();
  assert.deepEqual([m0.writeCacheLimit, m0.journalTailLimit, m0.pageCacheLimit], [16 * BS, 16 * BS, 64 * 1024 * 1024]);
  const ref = Buffer.alloc(size);
  let maxCache = 0;
  let maxTail = 0;
  const sample = (): void => {
    const m = vol.memory();
    maxCache = Math.max(maxCache, m.writeCache);
    maxTail = Math.max(maxTail, m.journalTail);
  };
  const sampler = setInterval(sample, 1);
  // Four writers, each on its own quarter: small writes (kept in the tail until a checkpoint)
  // and whole blocks (stored at the flush), 60 each.
  await Promise.all(
    [0, 1, 2, 3].map(async (w) => {
      for (let i = 0; i < 60; i++) {
        const block = w * 64 + ((i * 7) % 64);
        const whole = i % 3 === 0;
        const off = block * BS + (whole ? 0 : (i * 512) % (BS / 2));
        const d = randomBytes(whole ? BS : BS / 2);
        await vol.write(off, d);
        d.copy(ref, off);
        sample();
      }
    }),
  );
  clearInterval(sampler);
  assert.ok(maxCache > BS && maxCache <= budget.writeCacheBytes, `write cache peaked at ${maxCache} bytes, budget ${budget.writeCacheBytes}`);
  assert.ok(maxTail > 0 && maxTail <= budget.journalTailBytes, `journal tail peaked at ${maxTail} bytes, budget ${budget.journalTailBytes}`);
  assert.ok(vol.stats.checkpoints >= 2, 'checkpoints made room in the tail');
  await vol.flush();
  assert.equal(vol.memory().writeCache, 0, 'nothing held once flushed');
  assert.ok((await vol.read(0, size)).equals(ref));
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, size)).equals(ref), 'every acknowledged write is there after reopening');
});

test('a writer inside a storage node sends each append to the other replica before its own', async () => {
  const c = await memoryCluster(BS);
  // As torusd's distributor says: the writer runs in storage node "a".
  c.dist.localPeer = () => 'a';
  const append = c.dist.journalAppend.bind(c.dist);
  const calls: { peer: string; pieces: number }[] = [];
  c.dist.journalAppend = async (...a: Parameters<typeof append>) => {
    calls.push({ peer: a[0], pieces: a[2].length });
    return append(...a);
  };
  await c.vmeta.create('v', 16 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  calls.length = 0;
  for (let i = 0; i < 20; i++) {
    await vol.write((i % 16) * 512, randomBytes(512));
    await vol.flush();
  }
  await vol.close();
  const data = calls.filter((x) => x.pieces > 0);
  assert.ok(data.length >= 40 && data.some((x) => x.peer === 'a'), `appends: ${data.map((x) => x.peer).join(' ')}`);
  // Appends come in pairs, one per replica, the local one last.
  for (let i = 0; i + 1 < data.length; i += 2) {
    assert.notEqual(data[i]!.peer, 'a', `append pair ${i / 2}: ${data[i]!.peer} then ${data[i + 1]!.peer}`);
    assert.equal(data[i + 1]!.peer, 'a');
  }
});

test('a compacted run chain holds every overlay the chain before it held: a reopen without folds reads the same', async () => {
  const c = await memoryCluster(BS);
  const size = 32 * BS;
  await c.vmeta.create('v', size);
  // No folds: every byte written lives in overlays, read back through the runs after the reopen.
  const opts = { checkpointIntervalMs: 0, snapshotPollMs: 0, foldIdleMs: 0, maxRunChain: 3, foldAfter: 1e9, maxSegmentsPerBlock: 1e9 };
  const vol = await BlockVolume.open(c.ctx, 'v', opts);
  const model = Buffer.alloc(size);
  for (let round = 0; round < 12; round++) {
    await writeRandomly(vol, model, 10);
    await vol.flush();
    await vol.checkpoint();
  }
  assert.ok(vol.stats.compactions >= 2, `compactions: ${vol.stats.compactions}`);
  assert.equal(vol.stats.folds, 0);
  await vol.close();
  const again = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await again.read(0, size)).equals(model));
  await again.close();
});
