// The behaviour every BlockStore shares, as one node:test suite run against each
// implementation, so the in-memory twin cannot drift from the disk store.

import { crc32c } from '@node-rs/crc32';
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { verifySectorRead } from '../core/crc.js';
import { isTorusError, type ErrorCode } from '../core/errors.js';
import { BlockType, ZERO_REF, blockRefKey, type BlockRef } from '../core/ids.js';
import type { LocalBlockStore } from './common.js';
import { dataRef, padded, pattern } from './testing.js';

export interface StoreUnderTest {
  readonly store: LocalBlockStore;
  cleanup(): Promise<void>;
}

export type StoreFactory = (opts: { blockSize: number; capacityBlocks: number }) => Promise<StoreUnderTest>;

/** Four checksum sectors, the last one partial, so ranges cross every kind of boundary. */
export const CONFORMANCE_BLOCK_SIZE = 3 * 4096 + 1000;

export async function rejectsWith(p: Promise<unknown>, code: ErrorCode, message?: RegExp): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(isTorusError(err), `expected a TorusError ${code}, got ${String(err)}`);
    assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
    if (message) assert.match(err.message, message);
    return true;
  });
}

export function blockStoreConformance(name: string, factory: StoreFactory): void {
  const B = CONFORMANCE_BLOCK_SIZE;
  const withStore = async (capacityBlocks: number, fn: (s: LocalBlockStore) => Promise<void>): Promise<void> => {
    const { store, cleanup } = await factory({ blockSize: B, capacityBlocks });
    try {
      await fn(store);
    } finally {
      await cleanup();
    }
  };

  describe(`BlockStore conformance: ${name}`, () => {
    it('stores and returns a full block byte-exact', () =>
      withStore(4, async (s) => {
        const data = pattern(1, B);
        await s.putBlock(dataRef(1, 1, 0), data);
        assert.ok(s.hasBlock(dataRef(1, 1, 0)));
        assert.deepEqual(await s.getBlock(dataRef(1, 1, 0)), data);
        assert.equal(s.usedBlocks(), 1);
        assert.equal(s.numBlocks(), 4);
        assert.equal(s.blockSize, B);
      }));

    it('zero-pads short data and refuses data longer than a block', () =>
      withStore(4, async (s) => {
        const short = pattern(2, 5000);
        await s.putBlock(dataRef(1, 1, 1), short);
        assert.deepEqual(await s.getBlock(dataRef(1, 1, 1)), padded(short, B));
        await s.putBlock(dataRef(1, 1, 2), new Uint8Array(0));
        assert.deepEqual(await s.getBlock(dataRef(1, 1, 2)), Buffer.alloc(B));
        await rejectsWith(s.putBlock(dataRef(1, 1, 3), pattern(3, B + 1)), 'INVALID_ARGUMENT', /larger than the block size/);
        assert.equal(s.hasBlock(dataRef(1, 1, 3)), false);
      }));

    it('reports a missing block as BLOCK_UNAVAILABLE', () =>
      withStore(2, async (s) => {
        assert.equal(s.hasBlock(dataRef(9, 9, 9)), false);
        await rejectsWith(s.getBlock(dataRef(9, 9, 9)), 'BLOCK_UNAVAILABLE');
        await rejectsWith(s.readRange(dataRef(9, 9, 9), 0, 10), 'BLOCK_UNAVAILABLE');
        assert.equal(await s.verifyBlock(dataRef(9, 9, 9)), 'missing');
      }));

    it('treats a put of a held ref as a no-op (blocks are immutable)', () =>
      withStore(2, async (s) => {
        const ref = dataRef(1, 2, 3);
        await s.putBlock(ref, pattern(4, B));
        await s.putBlock(ref, pattern(5, B));
        assert.deepEqual(await s.getBlock(ref), pattern(4, B));
        assert.equal(s.usedBlocks(), 1);
        assert.equal(s.stats().writes, 1);
      }));

    it('keeps inode and data blocks with the same numbers apart', () =>
      withStore(2, async (s) => {
        const a: BlockRef = { type: BlockType.Data, volume: 7, inode: 1, index: 0 };
        const b: BlockRef = { type: BlockType.INode, volume: 7, inode: 1, index: 0 };
        await s.putBlock(a, pattern(6, B));
        await s.putBlock(b, pattern(7, B));
        assert.deepEqual(await s.getBlock(a), pattern(6, B));
        assert.deepEqual(await s.getBlock(b), pattern(7, B));
      }));

    it('refuses the zero ref', () =>
      withStore(2, async (s) => {
        await rejectsWith(s.putBlock(ZERO_REF, pattern(1, 10)), 'INVALID_ARGUMENT');
      }));

    it('deletes, and delete of a missing block is a no-op', () =>
      withStore(2, async (s) => {
        const ref = dataRef(1, 1, 0);
        await s.putBlock(ref, pattern(8, B));
        await s.deleteBlock(ref);
        assert.equal(s.hasBlock(ref), false);
        assert.equal(s.usedBlocks(), 0);
        await rejectsWith(s.getBlock(ref), 'BLOCK_UNAVAILABLE');
        await s.deleteBlock(ref);
        await s.deleteBlock(dataRef(5, 5, 5));
        await s.putBlock(ref, pattern(9, B));
        assert.deepEqual(await s.getBlock(ref), pattern(9, B));
      }));

    it('fails with OUT_OF_SPACE naming used/total, and reuses deleted space', () =>
      withStore(4, async (s) => {
        for (let i = 0; i < 4; i++) await s.putBlock(dataRef(1, 1, i), pattern(i, B));
        await rejectsWith(s.putBlock(dataRef(1, 1, 4), pattern(4, B)), 'OUT_OF_SPACE', /4 of 4/);
        await s.putBlock(dataRef(1, 1, 0), pattern(0, B)); // held: still fine when full
        await s.deleteBlock(dataRef(1, 1, 2));
        await s.putBlock(dataRef(1, 1, 4), pattern(4, B));
        assert.equal(s.usedBlocks(), 4);
        for (const i of [0, 1, 3, 4]) assert.deepEqual(await s.getBlock(dataRef(1, 1, i)), pattern(i, B));
        await rejectsWith(s.putBlock(dataRef(1, 1, 5), pattern(5, B)), 'OUT_OF_SPACE');
      }));

    it('reads ranges inside, across and at the edges of sectors', () =>
      withStore(2, async (s) => {
        const ref = dataRef(2, 1, 0);
        const data = pattern(10, B);
        await s.putBlock(ref, data);
        const cases: Array<[number, number]> = [
          [0, 0],
          [0, 1],
          [0, 4096],
          [4095, 2],
          [4096, 4096],
          [100, 9000],
          [B - 1000, 1000],
          [B - 1, 1],
          [B, 0],
          [0, B],
          [12000, 1288],
        ];
        for (const [off, len] of cases) assert.deepEqual(await s.readRange(ref, off, len), data.subarray(off, off + len), `range ${off}+${len}`);
        await rejectsWith(s.readRange(ref, B - 10, 11), 'INVALID_ARGUMENT');
        await rejectsWith(s.readRange(ref, -1, 1), 'INVALID_ARGUMENT');
        await rejectsWith(s.readRange(ref, 0.5, 1), 'INVALID_ARGUMENT');
      }));

    it('refuses a put whose bytes are not the writer CRC, and keeps nothing of it', () =>
      withStore(4, async (s) => {
        const data = pattern(11, 9000);
        const crc = crc32c(padded(data, B)) >>> 0;
        await rejectsWith(s.putBlock(dataRef(1, 2, 0), data, { crc: (crc ^ 1) >>> 0 }), 'CORRUPT', /arrived damaged/);
        assert.equal(s.hasBlock(dataRef(1, 2, 0)), false);
        assert.equal(s.usedBlocks(), 0);
        // The CRC covers the block as stored: zero padding included.
        await s.putBlock(dataRef(1, 2, 0), data, { crc });
        assert.deepEqual(await s.getBlock(dataRef(1, 2, 0)), padded(data, B));
      }));

    it('serves sectors whose checksums combine to the block CRC, for any range', () =>
      withStore(4, async (s) => {
        const data = pattern(12, B);
        const crc = crc32c(data) >>> 0;
        await s.putBlock(dataRef(1, 3, 0), data, { crc });
        for (const [off, len] of [
          [0, 1],
          [4095, 2],
          [4096, 4096],
          [5000, B - 5000],
          [B - 1, 1],
          [0, B],
        ] as const) {
          const read = await s.readSectors(dataRef(1, 3, 0), off, len);
          assert.equal(read.offset % read.sectorSize, 0);
          assert.deepEqual(verifySectorRead(read, B, crc, off, len, true, 'conformance'), data.subarray(off, off + len), `range ${off}+${len}`);
        }
        await rejectsWith(s.readSectors(dataRef(1, 3, 1), 0, 10), 'BLOCK_UNAVAILABLE');
        await rejectsWith(s.readSectors(dataRef(1, 3, 0), B - 1, 2), 'INVALID_ARGUMENT');
      }));

    it('reads whole sectors into the caller\'s buffer (readSectorsInto), and refuses a buffer that is not whole sectors', () =>
      withStore(4, async (s) => {
        if (!s.readSectorsInto) return;
        const data = pattern(13, B);
        const crc = crc32c(data) >>> 0;
        const ref = dataRef(1, 4, 0);
        await s.putBlock(ref, data, { crc });
        for (const [off, len] of [
          [0, B],
          [4096, 4096],
          [0, 4096],
          [2 * 4096, B - 2 * 4096],
        ] as const) {
          const into = Buffer.alloc(len, 0xee);
          const read = await s.readSectorsInto(ref, off, into);
          assert.ok(read);
          assert.equal(read.data, into, 'the answer is the caller\'s buffer');
          assert.deepEqual(into, data.subarray(off, off + len), `range ${off}+${len}`);
          assert.deepEqual(verifySectorRead(read, B, crc, off, len, true, 'conformance'), data.subarray(off, off + len));
        }
        await rejectsWith(s.readSectorsInto(ref, 100, Buffer.alloc(4096)), 'INVALID_ARGUMENT');
        await rejectsWith(s.readSectorsInto(ref, 0, Buffer.alloc(100)), 'INVALID_ARGUMENT');
        assert.equal(await s.readSectorsInto(dataRef(1, 4, 1), 0, Buffer.alloc(4096)), undefined, 'a block the store does not hold');
      }));

    it('appends to an open log block, which is unreadable but raw until sealed, then sealed is an ordinary block', () =>
      withStore(4, async (s) => {
        const log: BlockRef = { type: BlockType.Log, volume: 7, inode: 3, index: 2 ** 24 + 1 };
        await s.appendLog(log, [
          { offset: 0, data: pattern(21, 5000) },
          { offset: B - 64, data: pattern(22, 64) },
        ]);
        await s.appendLog(log, [{ offset: 5120, data: pattern(23, 100) }]);
        assert.equal(s.isOpenLog(log), true);
        assert.equal(s.hasBlock(log), false, 'an open log block is not a block anyone can copy or read');
        await rejectsWith(s.getBlock(log), 'BLOCK_UNAVAILABLE');
        await rejectsWith(s.readSectors(log, 0, 10), 'BLOCK_UNAVAILABLE');
        assert.ok(s.refs().some((r) => blockRefKey(r) === blockRefKey(log)));
        const raw = await s.readRaw(log);
        assert.deepEqual(raw.subarray(0, 5000), pattern(21, 5000));
        assert.deepEqual(raw.subarray(5120, 5220), pattern(23, 100));
        assert.deepEqual(raw.subarray(B - 64), pattern(22, 64));
        await s.flush();
        // Sealed with the gap zeroed: the writer's CRC of exactly that, or refused and left open.
        const want = Buffer.from(raw);
        want.fill(0, 5220, B - 64);
        await rejectsWith(s.sealLog(log, 5220, B - 64, (crc32c(want) ^ 1) >>> 0), 'CORRUPT');
        assert.equal(s.isOpenLog(log), true);
        await s.sealLog(log, 5220, B - 64, crc32c(want) >>> 0);
        await s.flush();
        assert.equal(s.isOpenLog(log), false);
        assert.equal(s.hasBlock(log), true);
        assert.deepEqual(await s.getBlock(log), want);
        const read = await s.readSectors(log, 5120, 100);
        assert.deepEqual(verifySectorRead(read, B, crc32c(want) >>> 0, 5120, 100, true, 'sealed log'), pattern(23, 100));
        // A retried seal is a no-op; nothing more can be appended.
        await s.sealLog(log, 5220, B - 64, crc32c(want) >>> 0);
        await rejectsWith(s.appendLog(log, [{ offset: 6000, data: pattern(24, 10) }]), 'INVALID_ARGUMENT', /sealed/);
        await rejectsWith(s.appendLog(dataRef(1, 1, 1), [{ offset: 0, data: pattern(24, 10) }]), 'INVALID_ARGUMENT', /not a log block/);
        await rejectsWith(s.appendLog({ ...log, index: 5 }, [{ offset: B - 1, data: pattern(24, 10) }]), 'INVALID_ARGUMENT');
      }));

    it('fences a volume: appends and seals of older epochs are refused, the open log blocks are listed', () =>
      withStore(8, async (s) => {
        const log = (epoch: number, n: number): BlockRef => ({ type: BlockType.Log, volume: 9, inode: epoch, index: n });
        await s.appendLog(log(4, 1), [{ offset: 0, data: pattern(31, 100) }]);
        await s.appendLog(log(4, 2), [{ offset: 0, data: pattern(32, 100) }]);
        await s.appendLog({ ...log(4, 1), volume: 10 }, [{ offset: 0, data: pattern(33, 100) }]);
        const open = await s.fenceVolume(9, 5);
        assert.deepEqual(open.map(blockRefKey).sort(), [log(4, 1), log(4, 2)].map(blockRefKey).sort());
        await rejectsWith(s.appendLog(log(4, 1), [{ offset: 100, data: pattern(34, 10) }]), 'LOCKED', /fenced at epoch 5/);
        await rejectsWith(s.appendLog(log(4, 3), [{ offset: 0, data: pattern(34, 10) }]), 'LOCKED');
        await rejectsWith(s.sealLog(log(4, 2), 100, B, 0), 'LOCKED');
        // The fencer's own epoch and later ones append; another volume is untouched.
        await s.appendLog(log(5, 1), [{ offset: 0, data: pattern(35, 10) }]);
        await s.appendLog({ ...log(4, 1), volume: 10 }, [{ offset: 100, data: pattern(36, 10) }]);
        // Fencing again at the same epoch is idempotent; below it, refused.
        await s.fenceVolume(9, 5);
        await rejectsWith(s.fenceVolume(9, 4), 'LOCKED', /newer writer/);
        assert.ok(s.stats().fencedRefusals >= 3);
      }));

    it('lets a sealed copy of a log block replace an open one (a replica that missed the seal), and deletes open ones', () =>
      withStore(4, async (s) => {
        const log: BlockRef = { type: BlockType.Log, volume: 7, inode: 3, index: 9 };
        await s.appendLog(log, [{ offset: 0, data: pattern(41, 3000) }]);
        const sealed = padded(pattern(41, 3000), B);
        await s.putBlock(log, sealed, { crc: crc32c(sealed) >>> 0 });
        assert.equal(s.isOpenLog(log), false);
        assert.deepEqual(await s.getBlock(log), sealed);
        const other: BlockRef = { ...log, index: 10 };
        await s.appendLog(other, [{ offset: 0, data: pattern(42, 10) }]);
        await s.deleteBlock(other);
        assert.equal(s.isOpenLog(other), false);
        await rejectsWith(s.readRaw(other), 'BLOCK_UNAVAILABLE');
      }));

    it('reads the zero padding of a short block through readRange', () =>
      withStore(2, async (s) => {
        const ref = dataRef(2, 1, 1);
        await s.putBlock(ref, pattern(11, 100));
        assert.deepEqual(await s.readRange(ref, 50, 100), padded(pattern(11, 100), B).subarray(50, 150));
        assert.deepEqual(await s.readRange(ref, 8192, 4096), Buffer.alloc(4096));
      }));

    it('returns buffers the caller may modify', () =>
      withStore(2, async (s) => {
        const ref = dataRef(3, 1, 0);
        await s.putBlock(ref, pattern(12, B));
        const a = await s.getBlock(ref);
        a.fill(0xee);
        const r = await s.readRange(ref, 0, 16);
        r.fill(0xee);
        assert.deepEqual(await s.getBlock(ref), pattern(12, B));
      }));

    it('lists refs as a snapshot', () =>
      withStore(8, async (s) => {
        const refs = [dataRef(1, 1, 0), dataRef(1, 2, 5), { type: BlockType.INode, volume: 3, inode: 4, index: 0 }];
        for (const [i, r] of refs.entries()) await s.putBlock(r, pattern(i, 10));
        const snap = s.refs();
        for (const r of snap) await s.deleteBlock(r);
        assert.deepEqual(new Set(snap.map(blockRefKey)), new Set(refs.map(blockRefKey)));
        assert.deepEqual(s.refs(), []);
      }));

    it('stores concurrent puts of one ref once and never hands out a slot twice', () =>
      withStore(4, async (s) => {
        const ref = dataRef(4, 1, 0);
        await Promise.all(Array.from({ length: 10 }, () => s.putBlock(ref, pattern(13, B))));
        assert.equal(s.usedBlocks(), 1);
        assert.equal(s.stats().writes, 1);
        const results = await Promise.allSettled(Array.from({ length: 6 }, (_, i) => s.putBlock(dataRef(4, 2, i), pattern(100 + i, B))));
        const ok = results.filter((r) => r.status === 'fulfilled').length;
        assert.equal(ok, 3);
        for (const r of results) if (r.status === 'rejected') assert.ok(isTorusError(r.reason, 'OUT_OF_SPACE'));
        for (let i = 0; i < 6; i++) {
          const ref2 = dataRef(4, 2, i);
          if (s.hasBlock(ref2)) assert.deepEqual(await s.getBlock(ref2), pattern(100 + i, B));
        }
        assert.deepEqual(await s.getBlock(ref), pattern(13, B));
      }));

    it('orders a delete after a concurrent put of the same ref', () =>
      withStore(4, async (s) => {
        const ref = dataRef(4, 3, 0);
        await Promise.all([s.putBlock(ref, pattern(14, B)), s.deleteBlock(ref)]);
        assert.equal(s.hasBlock(ref), false);
      }));

    it('flushes, verifies and scrubs', () =>
      withStore(4, async (s) => {
        await s.putBlock(dataRef(5, 1, 0), pattern(15, B));
        await s.putBlock(dataRef(5, 1, 1), pattern(16, B));
        await s.flush();
        assert.equal(await s.verifyBlock(dataRef(5, 1, 0)), 'ok');
        const report = await s.scrub();
        assert.equal(report.checked, 2);
        assert.deepEqual(report.corrupt, []);
        const st = s.stats();
        assert.ok(st.flushes >= 1);
        assert.equal(st.checksumFailures, 0);
      }));

    it('inspects a copy whole and names the CRC a replacement must have', () =>
      withStore(4, async (s) => {
        const short = pattern(19, 5000);
        await s.putBlock(dataRef(8, 1, 0), short);
        await s.putBlock(dataRef(8, 1, 1), pattern(20, B), { crc: crc32c(pattern(20, B)) });
        assert.deepEqual(await s.inspectBlock(dataRef(8, 1, 0)), { status: 'ok', crc: crc32c(padded(short, B)) >>> 0 });
        assert.deepEqual(await s.inspectBlock(dataRef(8, 1, 1)), { status: 'ok', crc: crc32c(pattern(20, B)) >>> 0 });
        assert.deepEqual(await s.inspectBlock(dataRef(8, 1, 2)), { status: 'missing' });
        assert.equal(s.stats().checksumFailures, 0);
      }));

    it('lists held blocks by slot, each in exactly one window', () =>
      withStore(6, async (s) => {
        const refs = Array.from({ length: 5 }, (_, i) => dataRef(9, 1, i));
        for (const [i, r] of refs.entries()) await s.putBlock(r, pattern(30 + i, 100));
        await s.deleteBlock(refs[1]!);
        await s.flush();
        const all = await s.refsInSlots(0, s.numBlocks());
        assert.deepEqual(all.map(blockRefKey).sort(), [0, 2, 3, 4].map((i) => blockRefKey(refs[i]!)).sort());
        const windows = (await Promise.all([0, 2, 4].map((from) => s.refsInSlots(from, from + 2)))).flat();
        assert.deepEqual(windows.map(blockRefKey), all.map(blockRefKey));
        assert.deepEqual(await s.refsInSlots(6, 12), []);
      }));

    it('lists what was stored, opened or sealed after a change mark, puts in flight when it was taken included', () =>
      withStore(80, async (s) => {
        const changed = (m: number): string[] => s.refsChangedSince!(m).map(blockRefKey).sort();
        await s.putBlock(dataRef(8, 1, 0), pattern(40, 100));
        const m0 = s.changeMark!();
        assert.deepEqual(changed(m0), []);
        // A mark and a listing taken at every turn while 64 puts are under way: whatever the
        // listing missed and the store holds at the end is above that mark.
        const marks: { mark: number; listed: Set<string> }[] = [];
        let done = false;
        const puts = Promise.all(Array.from({ length: 64 }, (_, i) => s.putBlock(dataRef(8, 2, i), pattern(41 + i, 3000)))).finally(() => (done = true));
        while (!done) {
          marks.push({ mark: s.changeMark!(), listed: new Set(s.refs().map(blockRefKey)) });
          await new Promise((r) => setImmediate(r));
        }
        await puts;
        const held = s.refs().map(blockRefKey);
        for (const { mark, listed } of marks) {
          const since = new Set(changed(mark));
          for (const k of held) if (!listed.has(k)) assert.ok(since.has(k), `${k}: not listed at mark ${mark}, not changed since it either`);
        }
        assert.equal(changed(m0).length, 64);
        // Opening a log block and sealing it are changes too; a delete leaves nothing to list.
        const log: BlockRef = { type: BlockType.Log, volume: 7, inode: 3, index: 2 ** 24 + 2 };
        const m1 = s.changeMark!();
        await s.appendLog(log, [{ offset: 0, data: pattern(50, 100) }]);
        assert.deepEqual(changed(m1), [blockRefKey(log)]);
        await s.flush();
        const m2 = s.changeMark!();
        await s.deleteBlock(dataRef(8, 1, 0));
        assert.deepEqual(changed(m2), []);
        const want = Buffer.from(await s.readRaw(log)).fill(0, 100);
        await s.sealLog(log, 100, B, crc32c(want) >>> 0);
        assert.deepEqual(changed(m2), [blockRefKey(log)]);
        assert.ok(s.changeMark!() > m2);
      }));

    it('counts reads and bytes', () =>
      withStore(2, async (s) => {
        await s.putBlock(dataRef(6, 1, 0), pattern(17, B));
        await s.getBlock(dataRef(6, 1, 0));
        await s.readRange(dataRef(6, 1, 0), 0, 10);
        const st = s.stats();
        assert.equal(st.writes, 1);
        assert.equal(st.reads, 2);
        assert.equal(st.bytesWritten, B);
        assert.ok(st.bytesRead >= B + 10);
      }));

    it('rejects calls after close with CLOSED', () =>
      withStore(2, async (s) => {
        await s.putBlock(dataRef(7, 1, 0), pattern(18, 10));
        await s.close();
        await rejectsWith(s.getBlock(dataRef(7, 1, 0)), 'CLOSED');
        await rejectsWith(s.putBlock(dataRef(7, 1, 1), pattern(18, 10)), 'CLOSED');
        await rejectsWith(s.flush(), 'CLOSED');
        await s.close();
      }));
  });
}
