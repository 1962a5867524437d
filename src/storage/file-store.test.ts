import { crc32c } from '@node-rs/crc32';
import assert from 'node:assert/strict';
import { open, readFile, stat, writeFile } from 'node:fs/promises';
import fs from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, it } from 'node:test';
import { BlockType, blockRefKey, type BlockRef } from '../core/ids.js';
import { blockStoreConformance, rejectsWith } from './block-store-conformance.js';
import { WriteBatcher, WriteFailure } from './batch-write.js';
import { FileBlockStore } from './file-store.js';
import { COMPAT_DURABLE_GEN, DATA_FILE, HEADER_COPY_OFFSETS, INCOMPAT_OPEN_LOG, LOCK_FILE, Layout, TABLE_FILE, decodeHeader, decodeRecord, encodeHeader, encodeRecord } from './format.js';
import { dropCache, pageCacheReadsAvailable, readCached, usePageCacheReads } from './page-cache.js';
import { dataRef, headerOnDisk, makeTmpDir, padded, pattern, peek, removeDir, withTmpDir } from './testing.js';

blockStoreConformance('FileBlockStore', async ({ blockSize, capacityBlocks }) => {
  const dir = await makeTmpDir();
  const store = await FileBlockStore.open({ dir, blockSize, sizeBytes: blockSize * capacityBlocks });
  return {
    store,
    async cleanup() {
      await store.close().catch(() => undefined);
      await removeDir(dir);
    },
  };
});

const B = 16384; // four sectors

const LOCK_CHILD = fileURLToPath(new URL('./lock-child.js', import.meta.url));

/**
 * Starts processes that each open the store in `dir` when told to (a line on stdin; one child is
 * told at once); `answer` is what the child said: `locked PID` or `refused MESSAGE`.
 */
async function lockChildren(dir: string, n: number): Promise<{ proc: ChildProcessWithoutNullStreams; answer: Promise<string> }[]> {
  const kids = Array.from({ length: n }, () => {
    const proc = spawn(process.execPath, [LOCK_CHILD, dir]);
    let out = '';
    let onLine: () => void = () => undefined;
    proc.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      onLine();
    });
    const line = (i: number): Promise<string> =>
      new Promise<string>((resolve, reject) => {
        onLine = () => {
          const lines = out.split('\n');
          if (lines.length > i + 1) resolve(lines[i]!);
        };
        onLine();
        proc.once('close', () => reject(new Error(`lock child ended: ${out}`)));
      });
    const ready = line(0);
    const answer = ready.then(() => line(1));
    answer.catch(() => undefined);
    return { proc, ready, answer };
  });
  await Promise.all(kids.map((k) => k.ready));
  if (n === 1) kids[0]!.proc.stdin.write('go\n');
  return kids;
}

async function openStore(dir: string, slots: number, blockSize = B): Promise<FileBlockStore> {
  return FileBlockStore.open({ dir, blockSize, sizeBytes: slots * blockSize });
}

/** Overwrites bytes of one of the store's files (while it is closed, like a disk would). */
async function poke(dir: string, file: string, offset: number, bytes: Uint8Array): Promise<void> {
  const fh = await open(join(dir, file), 'r+');
  try {
    await fh.write(bytes, 0, bytes.length, offset);
  } finally {
    await fh.close();
  }
}

async function flipByte(dir: string, file: string, offset: number): Promise<void> {
  const b = await peek(dir, file, offset, 1);
  await poke(dir, file, offset, Buffer.from([b[0]! ^ 0x5a]));
}

/**
 * Counts the reads that reach callback-style fs.read (the store's thread-pool path) during `fn`,
 * delaying each by `delayMs` when given, so a test can prove the path it means was taken. With
 * `allThroughFs`, reads of cached bytes go there too instead of being served on the main thread
 * (for a test that needs a read to stay in flight).
 */
async function watchFsReads(opts: { delayMs?: number; allThroughFs?: boolean }, fn: () => Promise<void>): Promise<number> {
  if (opts.allThroughFs) usePageCacheReads(false);
  const orig = fs.read as (...a: unknown[]) => void;
  let calls = 0;
  (fs as { read: unknown }).read = (...args: unknown[]): void => {
    calls++;
    if (opts.delayMs === undefined) orig(...args);
    else setTimeout(() => orig(...args), opts.delayMs);
  };
  syncBuiltinESMExports();
  try {
    await fn();
    return calls;
  } finally {
    (fs as { read: unknown }).read = orig;
    syncBuiltinESMExports();
    usePageCacheReads(true);
  }
}

/** Patches a FileHandle method for the duration of `fn` (every handle in this process). */
async function patchFileHandle<K extends 'datasync'>(
  method: K,
  wrap: (orig: (...args: unknown[]) => Promise<unknown>) => (...args: unknown[]) => Promise<unknown>,
  fn: () => Promise<void>,
): Promise<void> {
  const probe = await open(process.cwd(), 'r');
  const proto = Object.getPrototypeOf(probe) as Record<string, (...args: unknown[]) => Promise<unknown>>;
  await probe.close();
  const orig = proto[method]!;
  proto[method] = wrap(orig);
  try {
    await fn();
  } finally {
    proto[method] = orig;
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('FileBlockStore', () => {
  it('keeps every block across close and reopen, and forgets deleted ones', () =>
    withTmpDir(async (dir) => {
      let s = await openStore(dir, 40);
      const lens = (i: number): number => (i % 3 === 0 ? B : (i * 997) % B);
      for (let i = 0; i < 30; i++) await s.putBlock(dataRef(1, 2, i), pattern(i, lens(i)));
      for (let i = 0; i < 30; i += 4) await s.deleteBlock(dataRef(1, 2, i));
      await s.flush();
      await s.close();
      s = await openStore(dir, 40);
      try {
        assert.equal(s.usedBlocks(), 30 - 8);
        for (let i = 0; i < 30; i++) {
          if (i % 4 === 0) assert.equal(s.hasBlock(dataRef(1, 2, i)), false);
          else assert.deepEqual(await s.getBlock(dataRef(1, 2, i)), padded(pattern(i, lens(i)), B));
        }
        assert.equal((await s.scrub()).checked, 22);
        assert.equal(s.stats().tornRecordsAtOpen, 0);
      } finally {
        await s.close();
      }
    }));

  it('puts started in one turn of the event loop go to the disk as one thread-pool job', { skip: !WriteBatcher.available && 'the block_write addon is not built' }, () =>
    withTmpDir(async (dir) => {
      const s = await openStore(dir, 16);
      try {
        const before = s.batchedWrites()!;
        // Full and short blocks (a short one is padded with zeros by a write of its own).
        await Promise.all(Array.from({ length: 8 }, (_, i) => s.putBlock(dataRef(1, 3, i), pattern(i, i % 2 ? B : B - 1000))));
        const after = s.batchedWrites()!;
        assert.deepEqual([after.jobs - before.jobs, after.blocks - before.blocks], [1, 8]);
        await s.flush();
        for (let i = 0; i < 8; i++) assert.deepEqual(await s.getBlock(dataRef(1, 3, i)), padded(pattern(i, i % 2 ? B : B - 1000), B));
        assert.equal((await s.scrub()).checked, 8);
      } finally {
        await s.close();
      }
    }));

  it('a batched put whose data write fails is refused, nothing stored, and its slot is free again', () =>
    withTmpDir(async (dir) => {
      const s = await openStore(dir, 1);
      const orig = WriteBatcher.prototype.submit;
      let fail = true;
      WriteBatcher.prototype.submit = function (writes) {
        // The data write fails with EIO (errno 5): nothing after it is written.
        return fail ? Promise.reject(new WriteFailure(0, 5)) : orig.call(this, writes);
      };
      try {
        await rejectsWith(s.putBlock(dataRef(1, 4, 0), pattern(1, B)), 'IO');
        assert.equal(s.hasBlock(dataRef(1, 4, 0)), false);
        // The one slot is free again: the same put goes in once the disk works.
        fail = false;
        await s.putBlock(dataRef(1, 4, 0), pattern(1, B));
        assert.deepEqual(await s.getBlock(dataRef(1, 4, 0)), pattern(1, B));
      } finally {
        WriteBatcher.prototype.submit = orig;
        await s.close();
      }
    }));

  it('a part of a block is read into a shared slab, a whole block into a buffer of its own (a kept view would hold its slab)', () =>
    withTmpDir(async (dir) => {
      const bs = 16 * 1024; // the slab takes reads up to 16 KiB: a whole block of this size must not
      const s = await FileBlockStore.open({ dir, blockSize: bs, sizeBytes: 8 * bs });
      try {
        await s.putBlock(dataRef(1, 1, 0), pattern(3, bs));
        const whole = await s.readSectors(dataRef(1, 1, 0), 0, bs);
        assert.deepEqual(whole.data, pattern(3, bs));
        assert.equal(whole.data.buffer.byteLength, bs, 'a whole block is all of its memory');
        assert.deepEqual(await s.getBlock(dataRef(1, 1, 0)), pattern(3, bs));
        assert.equal((await s.getBlock(dataRef(1, 1, 0))).buffer.byteLength, bs);
        const a = await s.readRange(dataRef(1, 1, 0), 4096, 4096);
        const b = await s.readRange(dataRef(1, 1, 0), 8192, 100);
        assert.deepEqual(a, pattern(3, bs).subarray(4096, 8192));
        assert.deepEqual(b, pattern(3, bs).subarray(8192, 8292));
        for (const x of [a, b]) assert.ok(x.buffer.byteLength >= 64 * 1024, `a small read is a view of a slab (${x.buffer.byteLength} bytes)`);
      } finally {
        await s.close();
      }
    }));

  it('close() makes unflushed writes durable', () =>
    withTmpDir(async (dir) => {
      let s = await openStore(dir, 4);
      await s.putBlock(dataRef(1, 1, 0), pattern(1, B));
      await s.close();
      s = await openStore(dir, 4);
      assert.deepEqual(await s.getBlock(dataRef(1, 1, 0)), pattern(1, B));
      await s.close();
    }));

  it('keeps the writer CRC of each block in its record', () =>
    withTmpDir(async (dir) => {
      const s = await openStore(dir, 4);
      const data = pattern(5, 10_000);
      await s.putBlock(dataRef(1, 1, 0), data, { crc: crc32c(padded(data, B)) });
      await s.putBlock(dataRef(1, 1, 1), pattern(6, B));
      const locs = [s.locate(dataRef(1, 1, 0))!, s.locate(dataRef(1, 1, 1))!];
      await s.close();
      const recs = await Promise.all(locs.map(async (l) => decodeRecord(await peek(dir, TABLE_FILE, l.recordOffset, 64))));
      assert.deepEqual(recs.map((r) => r.kind === 'used' && r.blockCrc), [crc32c(padded(data, B)) >>> 0, crc32c(pattern(6, B)) >>> 0]);
    }));

  it('keeps open log blocks, their appends and the fences across reopen, and marks the header for older builds', () =>
    withTmpDir(async (dir) => {
      const log = { type: BlockType.Log, volume: 3, inode: 2, index: 1 };
      let s = await openStore(dir, 4);
      assert.equal(s.info().incompatFlags, 0);
      await s.appendLog(log, [{ offset: 0, data: pattern(7, 6000) }]);
      await s.fenceVolume(3, 2);
      await s.flush();
      // An older build refuses the store rather than drop an open log block as corrupt.
      assert.equal(s.info().incompatFlags, INCOMPAT_OPEN_LOG);
      await s.close();
      s = await openStore(dir, 4);
      try {
        assert.equal(s.isOpenLog(log), true);
        assert.deepEqual((await s.readRaw(log)).subarray(0, 6000), pattern(7, 6000));
        await rejectsWith(s.appendLog({ ...log, inode: 1 }, [{ offset: 0, data: pattern(8, 10) }]), 'LOCKED');
        await s.appendLog(log, [{ offset: 6144, data: pattern(9, 100) }]);
        const want = await s.readRaw(log);
        await s.sealLog(log, 6244, B, crc32c(Buffer.concat([want.subarray(0, 6244), Buffer.alloc(B - 6244)])) >>> 0);
      } finally {
        await s.close();
      }
      s = await openStore(dir, 4);
      assert.equal(s.isOpenLog(log), false);
      assert.deepEqual((await s.getBlock(log)).subarray(6144, 6244), pattern(9, 100));
      await s.close();
    }));

  it('detects a corrupted block on read, reports CORRUPT, drops it and accepts a repair', () =>
    withTmpDir(async (dir) => {
      let s = await openStore(dir, 4);
      for (let i = 0; i < 3; i++) await s.putBlock(dataRef(1, 1, i), pattern(i, B));
      const loc = s.locate(dataRef(1, 1, 1))!;
      await s.close();
      await flipByte(dir, DATA_FILE, loc.dataOffset + 2 * 4096 + 17);
      s = await openStore(dir, 4);
      try {
        // Only the touched sectors are verified, so an intact sector still reads.
        assert.deepEqual(await s.readRange(dataRef(1, 1, 1), 0, 4096), pattern(1, B).subarray(0, 4096));
        await rejectsWith(s.readRange(dataRef(1, 1, 1), 8000, 500), 'CORRUPT', /sector 2/);
        assert.equal(s.hasBlock(dataRef(1, 1, 1)), false);
        await rejectsWith(s.getBlock(dataRef(1, 1, 1)), 'BLOCK_UNAVAILABLE');
        assert.deepEqual(await s.getBlock(dataRef(1, 1, 0)), pattern(0, B));
        assert.deepEqual(await s.getBlock(dataRef(1, 1, 2)), pattern(2, B));
        assert.equal(s.stats().checksumFailures, 1);
        await s.putBlock(dataRef(1, 1, 1), pattern(1, B));
        assert.deepEqual(await s.getBlock(dataRef(1, 1, 1)), pattern(1, B));
        // The drop was persisted like a delete: the bad copy does not come back.
        await s.close();
        s = await openStore(dir, 4);
        assert.deepEqual(await s.getBlock(dataRef(1, 1, 1)), pattern(1, B));
        assert.equal(s.usedBlocks(), 3);
      } finally {
        await s.close();
      }
    }));

  describe('inspectBlock (the scrubber\'s check)', () => {
    /** A store with blocks 0..2, block 1 of which is returned with its slot and writer's CRC. */
    const setup = async (dir: string): Promise<{ s: FileBlockStore; ref: ReturnType<typeof dataRef>; loc: NonNullable<ReturnType<FileBlockStore['locate']>>; crc: number }> => {
      const s = await openStore(dir, 4);
      for (let i = 0; i < 3; i++) await s.putBlock(dataRef(1, 1, i), pattern(i, B));
      await s.flush();
      const ref = dataRef(1, 1, 1);
      return { s, ref, loc: s.locate(ref)!, crc: crc32c(pattern(1, B)) >>> 0 };
    };
    /** Rewrites the block's record with another block CRC; none, as stores wrote before they kept it. */
    const rewriteRecord = async (dir: string, loc: { recordOffset: number }, blockCrc?: number): Promise<void> => {
      const rec = decodeRecord(await peek(dir, TABLE_FILE, loc.recordOffset, 64));
      assert.ok(rec.kind === 'used');
      await poke(dir, TABLE_FILE, loc.recordOffset, encodeRecord(rec.ref, rec.generation, rec.checksumsCrc, undefined, blockCrc));
    };

    it('finds a flipped byte on disk, keeps the copy, and names the writer\'s CRC', () =>
      withTmpDir(async (dir) => {
        const { s, ref, loc, crc } = await setup(dir);
        try {
          await flipByte(dir, DATA_FILE, loc.dataOffset + 2 * 4096 + 17);
          const got = await s.inspectBlock(ref);
          assert.equal(got.status, 'corrupt');
          assert.match(got.reason!, /sector 2 does not match its checksum/);
          assert.equal(got.crc, crc);
          // Kept: its intact sectors still serve reads, and a replacement goes in by delete + put.
          assert.ok(s.hasBlock(ref));
          assert.deepEqual(await s.readRange(ref, 0, 4096), pattern(1, B).subarray(0, 4096));
          assert.equal(s.stats().checksumFailures, 0);
          await s.deleteBlock(ref);
          await s.putBlock(ref, pattern(1, B), { crc });
          assert.deepEqual(await s.inspectBlock(ref), { status: 'ok', crc });
          assert.deepEqual(await s.inspectBlock(dataRef(1, 1, 0)), { status: 'ok', crc: crc32c(pattern(0, B)) >>> 0 });
        } finally {
          await s.close();
        }
      }));

    it('reads the disk, not the cached checksum array', () =>
      withTmpDir(async (dir) => {
        const { s, ref, loc, crc } = await setup(dir);
        try {
          await s.readRange(ref, 0, 10); // caches the slot's checksum array
          await flipByte(dir, TABLE_FILE, loc.checksumOffset + 5);
          // The record keeps the writer's CRC, so a replacement can still be checked.
          assert.deepEqual(await s.inspectBlock(ref), { status: 'corrupt', reason: 'its sector checksum array does not match its record', crc });
        } finally {
          await s.close();
        }
      }));

    it('finds a record damaged while the store runs, and falls back on the intact array for the CRC', () =>
      withTmpDir(async (dir) => {
        const { s, ref, loc, crc } = await setup(dir);
        try {
          await flipByte(dir, TABLE_FILE, loc.recordOffset + 37); // inside the block CRC: the record's own CRC fails
          assert.deepEqual(await s.inspectBlock(ref), { status: 'corrupt', reason: 'its slot record on disk is damaged', crc });
        } finally {
          await s.close();
        }
      }));

    it('for a record without a block CRC: the intact array\'s combination, or nothing when the array is damaged too', () =>
      withTmpDir(async (dir) => {
        const { s: first, ref, loc, crc } = await setup(dir);
        await first.close();
        await rewriteRecord(dir, loc);
        const s = await openStore(dir, 4);
        try {
          await flipByte(dir, DATA_FILE, loc.dataOffset + 100);
          assert.deepEqual(await s.inspectBlock(ref), { status: 'corrupt', reason: 'sector 0 does not match its checksum', crc });
          await flipByte(dir, TABLE_FILE, loc.checksumOffset + 5);
          assert.deepEqual(await s.inspectBlock(ref), { status: 'corrupt', reason: 'its sector checksum array does not match its record' });
        } finally {
          await s.close();
        }
      }));

    it('lists blocks by slot from the records, across a slot-group boundary, a damaged record included', () =>
      withTmpDir(async (dir) => {
        const n = 4200;
        const s = await openStore(dir, n, 512);
        try {
          const refs = Array.from({ length: n }, (_, i) => dataRef(3, 1, i));
          for (const r of refs) await s.putBlock(r, pattern(r.index, 100));
          for (const i of [4095, 4096, 17]) await s.deleteBlock(refs[i]!);
          const kept = refs.filter((_, i) => ![4095, 4096, 17].includes(i)).map(blockRefKey);
          const bySlot = (r: BlockRef): number => s.locate(r)!.slot;
          const all = await s.refsInSlots(0, n);
          assert.deepEqual(all.map(blockRefKey).sort(), [...kept].sort());
          assert.deepEqual(all.map(bySlot), all.map(bySlot).sort((a, b) => a - b));
          const edge = await s.refsInSlots(4090, 4100);
          assert.deepEqual(edge.map(bySlot), [4090, 4091, 4092, 4093, 4094, 4097, 4098, 4099]);
          await flipByte(dir, TABLE_FILE, s.locate(refs[4098]!)!.recordOffset + 3);
          assert.deepEqual((await s.refsInSlots(4090, 4100)).map(blockRefKey), edge.map(blockRefKey));
        } finally {
          await s.close();
        }
      }));

    it('finds sector checksums that do not combine to the writer\'s CRC', () =>
      withTmpDir(async (dir) => {
        const { s, ref, loc } = await setup(dir);
        try {
          // A record whose block CRC disagrees with an intact array and data: a put that stored
          // other bytes than the writer's would look like this.
          await rewriteRecord(dir, loc, 0x1234);
          assert.deepEqual(await s.inspectBlock(ref), { status: 'corrupt', reason: "its sector checksums do not combine to the writer's CRC", crc: 0x1234 });
        } finally {
          await s.close();
        }
      }));
  });

  it('a read whose buffer another read fills before it is checked keeps its block: the disk is read again before anything is dropped', () =>
    withTmpDir(async (dir) => {
      let s = await openStore(dir, 4);
      await s.putBlock(dataRef(1, 1, 0), pattern(0, B));
      await s.putBlock(dataRef(1, 1, 1), pattern(1, B));
      await s.close();
      // Reopened, so that each read fetches its checksum array too and awaits it after its data
      // has landed: the other read fills the buffer meanwhile.
      s = await openStore(dir, 4);
      try {
        // A caller's bug (the read-path bench once handed one buffer to two reads in flight).
        const into = Buffer.alloc(4096);
        const reads = await Promise.allSettled([s.readSectorsInto(dataRef(1, 1, 0), 4096, into), s.readSectorsInto(dataRef(1, 1, 1), 4096, into)]);
        for (const r of reads) assert.equal(r.status, 'fulfilled', r.status === 'rejected' ? String(r.reason) : '');
        assert.equal(s.stats().checksumFailures, 0);
        // With reads from the page cache the clash is certain; through the thread pool, likely.
        if (pageCacheReadsAvailable) assert.ok(s.stats().memoryChecksumFailures >= 1, 'the clash happened, and was survived');
        assert.ok(s.hasBlock(dataRef(1, 1, 0)) && s.hasBlock(dataRef(1, 1, 1)), 'both blocks kept');
        assert.deepEqual(await s.getBlock(dataRef(1, 1, 0)), pattern(0, B));
        assert.deepEqual(await s.getBlock(dataRef(1, 1, 1)), pattern(1, B));
      } finally {
        await s.close();
      }
    }));

  it('detects a damaged checksum array and a record whose data never landed', () =>
    withTmpDir(async (dir) => {
      let s = await openStore(dir, 4);
      await s.putBlock(dataRef(1, 1, 0), pattern(1, B));
      await s.putBlock(dataRef(1, 1, 1), pattern(2, B));
      const a = s.locate(dataRef(1, 1, 0))!;
      const b = s.locate(dataRef(1, 1, 1))!;
      await s.close();
      await flipByte(dir, TABLE_FILE, a.checksumOffset + 13);
      // Slot b's record now names another ref, committing checksums that are not on disk: what
      // a power cut leaves when the record reached the disk and the data did not.
      // Its generation is one the header says was synced, so this is damage, not a lost write.
      await poke(dir, TABLE_FILE, b.recordOffset, encodeRecord(dataRef(9, 9, 9), b.generation, 0x1234));
      s = await openStore(dir, 4);
      try {
        assert.equal(s.stats().unsyncedDroppedAtOpen, 0);
        await rejectsWith(s.readRange(dataRef(1, 1, 0), 0, 1), 'CORRUPT', /checksum array/);
        await rejectsWith(s.getBlock(dataRef(9, 9, 9)), 'CORRUPT');
        assert.equal(s.usedBlocks(), 0);
      } finally {
        await s.close();
      }
    }));

  it('at open, checks the blocks written after the durable watermark and drops those whose data never landed', () =>
    withTmpDir(async (dir) => {
      let s = await openStore(dir, 4);
      await s.putBlock(dataRef(1, 1, 0), pattern(1, B));
      await s.putBlock(dataRef(1, 1, 1), pattern(2, B));
      const a = s.locate(dataRef(1, 1, 0))!;
      const b = s.locate(dataRef(1, 1, 1))!;
      await s.close();
      const layout = new Layout(B);
      // Two writes a power cut interrupted, both after the watermark: slot 2 got its record and
      // data (a complete but unsynced put), slot 3 its record only (data and checksums never landed).
      const sums = await peek(dir, TABLE_FILE, a.checksumOffset, layout.checksumArraySize);
      await poke(dir, DATA_FILE, layout.dataOffset(2), pattern(1, B));
      await poke(dir, TABLE_FILE, layout.checksumOffset(2), sums);
      await poke(dir, TABLE_FILE, layout.recordOffset(2), encodeRecord(dataRef(2, 1, 0), b.generation + 5, crc32c(sums)));
      await poke(dir, TABLE_FILE, layout.recordOffset(3), encodeRecord(dataRef(2, 1, 1), b.generation + 6, crc32c(sums)));
      s = await openStore(dir, 4);
      try {
        assert.equal(s.stats().unsyncedDroppedAtOpen, 1);
        assert.deepEqual(await s.getBlock(dataRef(2, 1, 0)), pattern(1, B));
        assert.equal(s.hasBlock(dataRef(2, 1, 1)), false, 'a block whose data never landed is not claimed');
        assert.equal(s.usedBlocks(), 3);
        await s.close();
        // The store's own close made everything durable: the next open has nothing to check.
        s = await openStore(dir, 4);
        assert.equal(s.stats().unsyncedDroppedAtOpen, 0);
        assert.equal(s.usedBlocks(), 3);
      } finally {
        await s.close();
      }
    }));

  it('gives a store from before the durable watermark one at its first open, so a power cut before the first flush is still checked', () =>
    withTmpDir(async (dir) => {
      let s = await openStore(dir, 4);
      await s.putBlock(dataRef(1, 1, 0), pattern(1, B));
      const a = s.locate(dataRef(1, 1, 0))!;
      await s.close();
      // The header as the first release wrote it: no compatible flags, no watermark.
      const h = s.info();
      const old = encodeHeader({ ...h, sequence: h.sequence + 1, compatFlags: 0, durableGen: 0 });
      for (const off of HEADER_COPY_OFFSETS) await poke(dir, TABLE_FILE, off, old);
      s = await openStore(dir, 4);
      const newest = await headerOnDisk(dir);
      await s.close();
      assert.equal(newest?.compatFlags, COMPAT_DURABLE_GEN, 'written at open, before any write');
      assert.equal(newest?.durableGen, a.generation);
      // This build's first put after the upgrade, cut by a power cut before any flush: its
      // record landed, its data and checksums did not.
      const layout = new Layout(B);
      await poke(dir, TABLE_FILE, layout.recordOffset(2), encodeRecord(dataRef(2, 1, 0), a.generation + 1, 0x1234));
      s = await openStore(dir, 4);
      try {
        assert.equal(s.stats().unsyncedDroppedAtOpen, 1);
        assert.equal(s.hasBlock(dataRef(2, 1, 0)), false, 'a block whose data never landed is not claimed');
        assert.deepEqual(await s.getBlock(dataRef(1, 1, 0)), pattern(1, B));
      } finally {
        await s.close();
      }
    }));

  it('numbers new blocks above the durable watermark after a reopen, even when the newest blocks were deleted', () =>
    withTmpDir(async (dir) => {
      let s = await openStore(dir, 4);
      for (let i = 0; i < 3; i++) await s.putBlock(dataRef(1, 1, i), pattern(i, B));
      await s.flush();
      for (let i = 0; i < 3; i++) await s.deleteBlock(dataRef(1, 1, i));
      await s.close();
      const before = (await headerOnDisk(dir))!;
      s = await openStore(dir, 4);
      await s.putBlock(dataRef(2, 1, 0), pattern(9, B));
      const c = s.locate(dataRef(2, 1, 0))!;
      await s.close();
      assert.ok(c.generation > before.durableGen!, `generation ${c.generation} is above the watermark ${before.durableGen}`);
      // A power cut before any flush of that put: the header from before it, its record without its data.
      const now = (await headerOnDisk(dir))!;
      for (const off of HEADER_COPY_OFFSETS) await poke(dir, TABLE_FILE, off, encodeHeader({ ...before, sequence: now.sequence + 1 }));
      await poke(dir, DATA_FILE, c.dataOffset, Buffer.alloc(B));
      s = await openStore(dir, 4);
      try {
        assert.equal(s.stats().unsyncedDroppedAtOpen, 1);
        assert.equal(s.hasBlock(dataRef(2, 1, 0)), false, 'a block whose data never landed is not claimed');
      } finally {
        await s.close();
      }
    }));

  it('treats a torn slot record as free', () =>
    withTmpDir(async (dir) => {
      let s = await openStore(dir, 3);
      for (let i = 0; i < 3; i++) await s.putBlock(dataRef(1, 1, i), pattern(i, B));
      const loc = s.locate(dataRef(1, 1, 1))!;
      await s.close();
      await flipByte(dir, TABLE_FILE, loc.recordOffset + 30);
      s = await openStore(dir, 3);
      try {
        assert.equal(s.stats().tornRecordsAtOpen, 1);
        assert.equal(s.hasBlock(dataRef(1, 1, 1)), false);
        assert.equal(s.usedBlocks(), 2);
        await s.putBlock(dataRef(1, 1, 7), pattern(7, B));
        assert.equal(s.locate(dataRef(1, 1, 7))!.slot, loc.slot);
        for (const i of [0, 2, 7]) assert.deepEqual(await s.getBlock(dataRef(1, 1, i)), pattern(i, B));
        await s.deleteBlock(dataRef(1, 1, 7));
        await s.close();
        s = await openStore(dir, 3);
        assert.equal(s.stats().tornRecordsAtOpen, 0, 'the torn record was cleared at the first open');
        assert.equal(s.usedBlocks(), 2);
      } finally {
        await s.close();
      }
    }));

  describe('a ref found in two slots after a crash', () => {
    async function makeDuplicate(dir: string, corruptNewer: boolean): Promise<{ older: number; newer: number }> {
      const s = await openStore(dir, 4);
      const ref = dataRef(3, 1, 0);
      await s.putBlock(ref, pattern(5, B));
      await s.putBlock(dataRef(3, 1, 1), pattern(6, B));
      const loc = s.locate(ref)!;
      await s.close();
      const newer = 3;
      const layout = new Layout(B);
      const data = await peek(dir, DATA_FILE, loc.dataOffset, B);
      const sums = await peek(dir, TABLE_FILE, loc.checksumOffset, layout.checksumArraySize);
      if (corruptNewer) data[100] = data[100]! ^ 1;
      await poke(dir, DATA_FILE, layout.dataOffset(newer), data);
      await poke(dir, TABLE_FILE, layout.checksumOffset(newer), sums);
      await poke(dir, TABLE_FILE, layout.recordOffset(newer), encodeRecord(ref, loc.generation + 100, crc32c(sums)));
      return { older: loc.slot, newer };
    }

    it('keeps the newer copy and frees the other', () =>
      withTmpDir(async (dir) => {
        const { newer } = await makeDuplicate(dir, false);
        const s = await openStore(dir, 4);
        try {
          assert.equal(s.stats().duplicatesAtOpen, 1);
          assert.equal(s.usedBlocks(), 2);
          assert.equal(s.locate(dataRef(3, 1, 0))!.slot, newer);
          assert.deepEqual(await s.getBlock(dataRef(3, 1, 0)), pattern(5, B));
          await s.putBlock(dataRef(3, 1, 2), pattern(7, B));
          await s.putBlock(dataRef(3, 1, 3), pattern(8, B));
          assert.equal(s.usedBlocks(), 4);
        } finally {
          await s.close();
        }
      }));

    it('falls back to the older copy when the newer one does not verify', () =>
      withTmpDir(async (dir) => {
        const { older } = await makeDuplicate(dir, true);
        let s = await openStore(dir, 4);
        try {
          assert.equal(s.locate(dataRef(3, 1, 0))!.slot, older);
          assert.deepEqual(await s.getBlock(dataRef(3, 1, 0)), pattern(5, B));
          await s.close();
          s = await openStore(dir, 4);
          assert.equal(s.stats().duplicatesAtOpen, 0);
        } finally {
          await s.close();
        }
      }));
  });

  it('refuses a different block size with a clear message', () =>
    withTmpDir(async (dir) => {
      await (await openStore(dir, 4, 4096)).close();
      await rejectsWith(openStore(dir, 4, 8192), 'INVALID_ARGUMENT', /formatted with block size 4096, cluster uses 8192/);
      // The failed open released the directory.
      await (await openStore(dir, 4, 4096)).close();
    }));

  it('grows, across a slot-group boundary, and refuses to shrink', () =>
    withTmpDir(async (dir) => {
      const bs = 512;
      let s = await openStore(dir, 4, bs);
      for (let i = 0; i < 4; i++) await s.putBlock(dataRef(1, 1, i), pattern(i, bs));
      await rejectsWith(s.putBlock(dataRef(1, 1, 99), pattern(99, bs)), 'OUT_OF_SPACE');
      await s.close();
      s = await FileBlockStore.open({ dir, blockSize: bs, sizeBytes: 4200 * bs + 100 });
      assert.equal(s.numBlocks(), 4200);
      assert.equal(s.info().slotCount, 4200);
      for (let i = 4; i < 4200; i += 100) {
        await Promise.all(Array.from({ length: Math.min(100, 4200 - i) }, (_, j) => s.putBlock(dataRef(1, 1, i + j), pattern(i + j, bs))));
      }
      assert.equal(s.usedBlocks(), 4200);
      await s.close();
      assert.equal((await stat(join(dir, DATA_FILE))).size, 4200 * bs);
      await rejectsWith(openStore(dir, 4100, bs), 'INVALID_ARGUMENT', /refusing to shrink/);
      s = await openStore(dir, 4200, bs);
      try {
        assert.equal(s.usedBlocks(), 4200);
        assert.ok(s.locate(dataRef(1, 1, 4150))!.slot >= 4096);
        for (const i of [0, 3, 4, 4095, 4096, 4199]) assert.deepEqual(await s.getBlock(dataRef(1, 1, i)), pattern(i, bs));
      } finally {
        await s.close();
      }
    }));

  it('creates its files sparse', () =>
    withTmpDir(async (dir) => {
      const s = await FileBlockStore.open({ dir, blockSize: 512 * 1024, sizeBytes: 2 ** 30 });
      assert.equal(s.numBlocks(), 2048);
      await s.close();
      const st = await stat(join(dir, DATA_FILE));
      assert.equal(st.size, 2 ** 30);
      assert.ok(st.blocks * 512 < 2 ** 20, `data file uses ${st.blocks * 512} bytes`);
    }));

  it('validates its options', async () => {
    await rejectsWith(FileBlockStore.open({ dir: '/nonexistent', blockSize: 0, sizeBytes: 10 }), 'INVALID_ARGUMENT');
    await rejectsWith(FileBlockStore.open({ dir: '/nonexistent', blockSize: 4096, sizeBytes: 4095 }), 'INVALID_ARGUMENT', /smaller than one block/);
  });

  it('uses the second header copy when the newest is damaged, and refuses unknown formats', () =>
    withTmpDir(async (dir) => {
      await (await openStore(dir, 4)).close();
      let s = await openStore(dir, 8); // grows: the other copy says 8 slots
      await s.putBlock(dataRef(1, 1, 0), pattern(1, B));
      const header = s.info();
      await s.close();
      const copies = await Promise.all(HEADER_COPY_OFFSETS.map(async (off) => decodeHeader(await peek(dir, TABLE_FILE, off, 512))));
      const newest = copies[0]!.sequence > copies[1]!.sequence ? 0 : 1;
      await flipByte(dir, TABLE_FILE, HEADER_COPY_OFFSETS[newest]! + 30);
      s = await openStore(dir, 8);
      assert.equal(s.info().sequence, copies[1 - newest]!.sequence);
      assert.equal(s.numBlocks(), 8);
      assert.deepEqual(await s.getBlock(dataRef(1, 1, 0)), pattern(1, B));
      await s.close();
      await poke(dir, TABLE_FILE, HEADER_COPY_OFFSETS[0], encodeHeader({ ...header, version: 2, sequence: 99 }));
      await rejectsWith(openStore(dir, 8), 'INVALID_ARGUMENT', /format version 2/);
      await poke(dir, TABLE_FILE, HEADER_COPY_OFFSETS[1], Buffer.alloc(512));
      await poke(dir, TABLE_FILE, HEADER_COPY_OFFSETS[0], Buffer.alloc(512));
      await rejectsWith(openStore(dir, 8), 'CORRUPT', /no valid header/);
    }));

  it('locks its directory against a second opener, in this process or another', () =>
    withTmpDir(async (dir) => {
      const s = await openStore(dir, 4);
      await rejectsWith(openStore(dir, 4), 'LOCKED', /already open in this process/);
      const [other] = await lockChildren(dir, 1);
      assert.match(await other!.answer, /^refused .*in use by process \d+/);
      other!.proc.kill('SIGKILL');
      await s.close();
      // A holder that dies, however it dies, leaves no lock behind: the kernel drops it.
      const [holder] = await lockChildren(dir, 1);
      assert.equal(await holder!.answer, `locked ${holder!.proc.pid}`);
      await rejectsWith(openStore(dir, 4), 'LOCKED', new RegExp(`in use by process ${holder!.proc.pid}`));
      holder!.proc.kill('SIGKILL');
      await new Promise((r) => holder!.proc.once('close', r));
      const t = await openStore(dir, 4);
      assert.equal((await readFile(join(dir, LOCK_FILE), 'utf8')).trim(), String(process.pid));
      await t.close();
    }));

  it('lets exactly one of many processes racing for a lock a dead process left take it', () =>
    withTmpDir(async (dir) => {
      // A lock file naming a process that no longer runs, as a crash leaves it.
      const dead = spawnSync(process.execPath, ['-e', '']).pid!;
      await (await openStore(dir, 4)).close();
      for (let round = 0; round < 4; round++) {
        await writeFile(join(dir, LOCK_FILE), `${dead}\n`);
        const kids = await lockChildren(dir, 6);
        for (const k of kids) k.proc.stdin.write('go\n');
        const answers = await Promise.all(kids.map((k) => k.answer));
        for (const k of kids) k.proc.kill('SIGKILL');
        await Promise.all(kids.map((k) => new Promise((r) => (k.proc.exitCode !== null || k.proc.signalCode !== null ? r(null) : k.proc.once('close', r)))));
        assert.equal(answers.filter((a) => a.startsWith('locked')).length, 1, `round ${round}: ${answers.join(' | ')}`);
      }
    }));

  it('coalesces concurrent flushes into shared fsyncs', () =>
    withTmpDir(async (dir) => {
      const s = await openStore(dir, 8);
      let syncs = 0;
      try {
        await patchFileHandle(
          'datasync',
          (orig) =>
            async function (this: unknown, ...args: unknown[]) {
              syncs++;
              await sleep(15);
              return orig.apply(this, args);
            },
          async () => {
            await s.putBlock(dataRef(1, 1, 0), pattern(1, B));
            await Promise.all(Array.from({ length: 20 }, () => s.flush()));
            assert.equal(syncs, 2, 'one fsync per file for 20 callers');
            assert.equal(s.stats().flushes, 1);
            assert.equal(s.stats().flushRequests, 20);

            // Nothing written since: a flush costs nothing.
            await s.flush();
            assert.equal(syncs, 2);

            syncs = 0;
            const order: number[] = [];
            await s.putBlock(dataRef(1, 1, 1), pattern(2, B));
            const first = s.flush().then(() => order.push(0));
            await s.putBlock(dataRef(1, 1, 2), pattern(3, B)); // completes while the first fsync runs
            const later = Array.from({ length: 10 }, (_, i) => s.flush().then(() => order.push(i + 1)));
            await Promise.all([first, ...later]);
            assert.equal(syncs, 4, 'the callers that arrived during the first fsync share the second');
            assert.equal(order[0], 0);
            assert.equal(s.stats().flushes, 3);
          },
        );
      } finally {
        await s.close();
      }
    }));

  it('caches checksum arrays per slot generation: a reused slot and a corrupted sector are still caught', () =>
    withTmpDir(async (dir) => {
      const s = await openStore(dir, 1);
      try {
        const a = dataRef(1, 1, 0);
        const b = dataRef(1, 1, 1);
        await s.putBlock(a, pattern(1, B));
        const loc = s.locate(a)!;
        assert.deepEqual(await s.readRange(a, 4096, 4096), pattern(1, B).subarray(4096, 8192));
        // The second ranged read uses the cached array: one pread instead of two.
        const reads = await watchFsReads({ allThroughFs: true }, async () => {
          assert.deepEqual(await s.readRange(a, 8192, 100), pattern(1, B).subarray(8192, 8292));
        });
        assert.equal(reads, 1);
        // A sector changed on disk after its array was cached still fails its check.
        await flipByte(dir, DATA_FILE, loc.dataOffset + 3 * 4096 + 5);
        await rejectsWith(s.readRange(a, 3 * 4096, 10), 'CORRUPT', /sector 3/);
        // The slot goes to another block: its new array, not the cached one, applies.
        await s.flush();
        await s.putBlock(b, pattern(2, B));
        assert.equal(s.locate(b)!.slot, loc.slot);
        assert.deepEqual(await s.readRange(b, 4096, 4096), pattern(2, B).subarray(4096, 8192));
        // ... and replaces the stale entry: the next ranged read is one pread again.
        const again = await watchFsReads({ allThroughFs: true }, async () => {
          assert.deepEqual(await s.readRange(b, 0, 100), pattern(2, B).subarray(0, 100));
        });
        assert.equal(again, 1);
        assert.deepEqual(await s.getBlock(b), pattern(2, B));
      } finally {
        await s.close();
      }
    }));

  it('reads cached bytes without the thread pool, and what the page cache lacks through it', { skip: !pageCacheReadsAvailable && 'page_cache_read addon not built' }, () =>
    withTmpDir(async (dir) => {
      const s = await openStore(dir, 4);
      try {
        const a = dataRef(1, 1, 0);
        await s.putBlock(a, pattern(1, B));
        await s.flush(); // clean pages can be evicted
        const loc = s.locate(a)!;
        const fh = await open(join(dir, DATA_FILE), 'r');
        try {
          const probe = Buffer.alloc(4096);
          assert.equal(readCached(fh.fd, probe, loc.dataOffset), 4096, 'just written: in the page cache');
          assert.deepEqual(probe, pattern(1, B).subarray(0, 4096));
          const hot = await watchFsReads({}, async () => {
            assert.deepEqual(await s.readRange(a, 0, 4096), pattern(1, B).subarray(0, 4096));
          });
          assert.equal(hot, 0, 'a cached read never reached the thread pool');
          // Evicted, the read must wait for the disk: it goes to the thread pool. (A probe here
          // would start the kernel's readahead and refill the cache.) The kernel may keep a page
          // that fadvise was asked to drop (it failed once in CI under load), so a few tries.
          let cold = 0;
          for (let attempt = 0; attempt < 3 && cold === 0; attempt++) {
            dropCache(fh.fd);
            cold = await watchFsReads({}, async () => {
              assert.deepEqual(await s.getBlock(a), pattern(1, B));
            });
          }
          assert.ok(cold >= 1, 'the evicted read went through the thread pool');
        } finally {
          await fh.close();
        }
      } finally {
        await s.close();
      }
    }));

  it('never hands a slot with a read in flight to another block', () =>
    withTmpDir(async (dir) => {
      const s = await openStore(dir, 1);
      try {
        const a = dataRef(1, 1, 0);
        const b = dataRef(1, 1, 1);
        await s.putBlock(a, pattern(1, B));
        const delayed = await watchFsReads({ delayMs: 40, allThroughFs: true }, async () => {
          const reading = s.getBlock(a);
          await s.deleteBlock(a);
          const putting = s.putBlock(b, pattern(2, B)); // needs the only slot, still being read
          assert.deepEqual(await reading, pattern(1, B));
          await putting;
        });
        assert.ok(delayed > 0, 'the read was delayed');
        assert.deepEqual(await s.getBlock(b), pattern(2, B));
        assert.equal(s.hasBlock(a), false);
      } finally {
        await s.close();
      }
    }));

  it('opens log blocks in slots already written, so a journal append allocates nothing for its fdatasync to commit', () =>
    withTmpDir(async (dir) => {
      const bs = 128 * 1024;
      const open = () => FileBlockStore.open({ dir, blockSize: bs, sizeBytes: 128 * bs });
      const log = (index: number) => ({ type: BlockType.Log, volume: 5, inode: 1, index });
      const append = (s: FileBlockStore, index: number) =>
        s.appendLog(log(index), [
          { offset: 0, data: pattern(index, 32 * 1024) },
          { offset: bs - 64, data: pattern(index + 100, 64) },
        ]);
      /** Bytes the data file's allocation grew by during `fn`, less the reserve's top-up. */
      const allocatedBy = async (s: FileBlockStore, fn: () => Promise<unknown>): Promise<number> => {
        await s.prepared();
        await s.flush();
        const before = (await stat(join(dir, DATA_FILE))).blocks * 512;
        const prep = s.stats().slotPrepBytes;
        await fn();
        await s.prepared();
        await s.flush();
        return (await stat(join(dir, DATA_FILE))).blocks * 512 - before - (s.stats().slotPrepBytes - prep);
      };
      // Extent-tree blocks may be counted too; a log block in a hole allocates at least 36 KiB.
      const slack = 16 * 1024;
      let s = await open();
      try {
        // The first log block finds nothing warm (the files are sparse) and starts the reserve:
        // 4 MiB of 128 KiB slots.
        assert.ok((await allocatedBy(s, () => append(s, 0))) > slack);
        assert.equal(s.stats().slotPrepBytes, 32 * bs);
        const second = await allocatedBy(s, () => append(s, 1));
        assert.ok(second <= slack, `the second log block allocated ${second} bytes`);
        // Whole blocks leave the reserve to the journal while cold slots remain.
        for (let i = 0; i < 40; i++) await s.putBlock(dataRef(5, 1, i), pattern(i, bs));
        const third = await allocatedBy(s, () => append(s, 2));
        assert.ok(third <= slack, `a log block after 40 puts allocated ${third} bytes`);
        await s.sealLog(log(1), 32 * 1024, bs - 64, crc32c(Buffer.concat([pattern(1, 32 * 1024), Buffer.alloc(bs - 64 - 32 * 1024), pattern(101, 64)])) >>> 0);
      } finally {
        await s.close();
      }
      // After a reopen, what held a whole block or a sealed log block is known written: freed,
      // it takes the next log block. So is what was prepared and not used yet.
      s = await open();
      try {
        await s.deleteBlock(dataRef(5, 1, 0));
        await s.deleteBlock(log(1));
        const two = await allocatedBy(s, async () => {
          await append(s, 3);
          await append(s, 4);
        });
        assert.ok(two <= slack, `two log blocks in freed slots allocated ${two} bytes`);
        // The slots prepared before the reopen are found written (SEEK_DATA): nothing is zeroed twice.
        if (WriteBatcher.available) assert.equal(s.stats().slotPrepBytes, 0);
        assert.deepEqual((await s.readRaw(log(4))).subarray(0, 32 * 1024), pattern(4, 32 * 1024));
      } finally {
        await s.close();
      }
    }));

  it('tops the warm reserve up a batch of slots at a time, so its fdatasyncs stay rare', () =>
    withTmpDir(async (dir) => {
      const bs = 128 * 1024;
      const s = await FileBlockStore.open({ dir, blockSize: bs, sizeBytes: 128 * bs });
      const log = (index: number) => ({ type: BlockType.Log, volume: 5, inode: 1, index });
      const open = async (index: number) => {
        await s.appendLog(log(index), [{ offset: 0, data: pattern(index, 4096) }]);
        await s.prepared();
        return s.stats().slotPrepBytes / bs;
      };
      try {
        // The first fills the 4 MiB reserve; later ones wait until 512 KiB of it is used.
        assert.equal(await open(0), 32);
        for (let i = 1; i < 4; i++) assert.equal(await open(i), 32, `log block ${i} started a preparation`);
        assert.equal(await open(4), 36);
        assert.equal(await open(5), 36);
      } finally {
        await s.close();
      }
    }));

  it('makes a synced append durable in the job that writes it once its log block is known on disk', { skip: !WriteBatcher.available && 'the block_write addon is not built' }, () =>
    withTmpDir(async (dir) => {
      const log = { type: BlockType.Log, volume: 6, inode: 1, index: 0 };
      const s = await openStore(dir, 8);
      try {
        // A new block: its open record is in the table, which the write's own sync would not
        // cover, so the append is written and then flushed (both files).
        await s.appendLog(log, [{ offset: 0, data: pattern(1, 4096) }], true);
        const after1 = { ...s.batchedWrites()!, flushes: s.stats().flushes };
        assert.equal(after1.flushes, 1);
        let fsSyncs = 0;
        await patchFileHandle(
          'datasync',
          (orig) =>
            function (this: unknown, ...args: unknown[]) {
              fsSyncs++;
              return orig.apply(this, args);
            },
          async () => {
            await s.appendLog(log, [{ offset: 4096, data: pattern(2, 4096) }, { offset: B - 64, data: pattern(3, 64) }], true);
            await s.appendLog(log, [{ offset: 8192, data: pattern(4, 100) }], true);
          },
        );
        // Each written and synced by one job, no fsync through fs.
        assert.equal(fsSyncs, 0);
        assert.deepEqual({ ...s.batchedWrites()!, flushes: s.stats().flushes }, { jobs: after1.jobs + 2, blocks: after1.blocks + 2, flushes: 3 });
        // Nothing is left for a flush to do.
        await s.flush();
        assert.equal(s.stats().flushes, 3);
        const raw = await s.readRaw(log);
        assert.deepEqual(raw.subarray(4096, 8192), pattern(2, 4096));
        assert.deepEqual(raw.subarray(8192, 8292), pattern(4, 100));
      } finally {
        await s.close();
      }
    }));

  it('reuses the slot of a delete still being written instead of reporting full', () =>
    withTmpDir(async (dir) => {
      const s = await openStore(dir, 1);
      try {
        await s.putBlock(dataRef(1, 1, 0), pattern(1, B));
        const del = s.deleteBlock(dataRef(1, 1, 0));
        await s.putBlock(dataRef(1, 1, 1), pattern(2, B));
        await del;
        assert.deepEqual(s.refs().map(blockRefKey), [blockRefKey(dataRef(1, 1, 1))]);
      } finally {
        await s.close();
      }
    }));
});
