// FileBlockStore's read path: finding a block's slot, reading its sectors and proving them
// against the slot's checksum array and record, and the cache of recently read checksum arrays.
// The store (file-store.ts) hands it the in-memory state it reads and the few things a read must
// ask of the write side: to hand out a slot whose last reader left, to drop a corrupt block.

import { crc32c } from '@node-rs/crc32';
import type { FileHandle } from 'node:fs/promises';
import { firstBadSector } from '../core/crc.js';
import { TorusError, isTorusError } from '../core/errors.js';
import { formatBlockRef, type BlockRef } from '../core/ids.js';
import type { SectorRead } from '../core/interfaces.js';
import { LruCache } from '../core/lru.js';
import { SlabAllocator } from '../core/slab.js';
import { checkRange, unavailable, type BlockInspection, type BlockStoreStats, type VerifyResult } from './common.js';
import { readFull, ioError, noop } from './file-store-io.js';
import { DRAINING, OPEN, USED } from './file-store-slots.js';
import { inspectSlot } from './inspect.js';
import { RECORD_SIZE, RECORD_USED, keyToRef, refKey, scanRecord, type Layout, type ScannedRecord } from './format.js';

/** Bounds the checksum-array cache: 8 MiB of arrays cover 8 GiB of data (about 20 MiB of memory). */
const SUMS_CACHE_BYTES = 8 * 1024 * 1024;

/**
 * Where small reads land: a random 4 KiB read is on its way into a reply, and a buffer of its own
 * each time (Node's pool stops short of 4 KiB) cost 2.3–2.5 µs more than reading into a reused
 * one, a slab 0.5–0.7 (docs/performance.md, thirteenth round). Whole blocks keep buffers of their own.
 */
const smallReads = new SlabAllocator(128 * 1024, 16 * 1024);

/** Cached checksum arrays by slot, each valid for one generation. */
export type SumsCache = LruCache<number, { gen: number; sums: Buffer }>;

/** The files a slot is read from, their geometry, and the counters a read adds to. */
export interface SlotFiles {
  readonly dir: string;
  readonly data: FileHandle;
  readonly table: FileHandle;
  readonly layout: Layout;
  readonly blockSize: number;
  readonly sectorSize: number;
  readonly counters: BlockStoreStats;
}

/** What the read path reads and what it asks of the store it reads for. */
export interface ReadContext extends SlotFiles {
  readonly nSlots: number;
  readonly sectors: number;
  readonly index: Map<string, number>;
  readonly gens: Float64Array;
  readonly sums: Uint32Array;
  readonly state: Uint8Array;
  readonly readers: Uint32Array;
  /** Starts an operation (CLOSED once the store is closing); leave() ends it. */
  enter(): void;
  leave(): void;
  /** The last read of a DRAINING slot ended: the slot may be handed out now. */
  drained(slot: number): void;
  /** Drops the block `key` if it still lives in that write of `slot`. */
  drop(key: string, slot: number, gen: number): Promise<void>;
}

function cacheSums(cache: SumsCache, slot: number, gen: number, sums: Buffer): void {
  // A copy outside Buffer's shared pool: a kept slice of the pool would pin all 8 KiB of it.
  const own = Buffer.allocUnsafeSlow(sums.length);
  sums.copy(own);
  cache.set(slot, { gen, sums: own });
}

/**
 * Reads sectors [s0, s1) of `slot` and checks them against the slot's checksum array, itself
 * checked against the CRC its record committed. Returns the bytes, or why they are bad. With
 * `gen` and a cache, the checksum array is taken from and kept in the cache.
 */
export async function readSlotSectors(
  f: SlotFiles,
  slot: number,
  checksumsCrc: number,
  s0: number,
  s1: number,
  gen?: number,
  sumsCache?: SumsCache,
  into?: Buffer,
): Promise<{ buf: Buffer; sums: Buffer } | string> {
  const start = s0 * f.sectorSize;
  const end = Math.min(s1 * f.sectorSize, f.blockSize);
  // Only part of a block: a whole one may be kept (a log block's records during a replay are views
  // of it), and a view would keep its whole slab alive.
  const buf = into ?? (end - start < f.blockSize ? smallReads.alloc(end - start) : Buffer.allocUnsafe(end - start));
  if (buf.length !== end - start) throw new TorusError('INTERNAL', `a ${buf.length}-byte buffer for sectors ${s0}..${s1} (${end - start} bytes)`);
  const cached = gen === undefined ? undefined : sumsCache?.get(slot);
  const hit = cached !== undefined && cached.gen === gen;
  let sums: Buffer;
  if (hit) {
    sums = cached.sums;
    await readFull(f.data, buf, f.layout.dataOffset(slot) + start);
  } else {
    sums = Buffer.allocUnsafe(f.layout.checksumArraySize);
    await Promise.all([
      readFull(f.data, buf, f.layout.dataOffset(slot) + start),
      readFull(f.table, sums, f.layout.checksumOffset(slot)),
    ]);
  }
  f.counters.bytesRead += buf.length;
  if (crc32c(sums) !== checksumsCrc) return 'its sector checksum array does not match its record';
  if (gen !== undefined && !hit && sumsCache) cacheSums(sumsCache, slot, gen, sums);
  const bad = firstBadSector(buf, f.sectorSize, sums, s0);
  if (bad >= 0) return `sector ${bad} does not match its checksum`;
  return { buf, sums };
}

export class SlotReader {
  /**
   * Checksum arrays of recently read slots, keyed by slot and valid for one generation. A ranged
   * read then costs one pread instead of two. Still checked against the record's CRC on every
   * use; scrubs (verifyBlock, inspectBlock) and open-time checks bypass it and read the disk's copy.
   */
  private readonly sumsCache: SumsCache = new LruCache<number, { gen: number; sums: Buffer }>(SUMS_CACHE_BYTES, (e) => e.sums.length);

  constructor(private readonly s: ReadContext) {}

  private async readChecked(ref: BlockRef, key: string, slot: number, s0: number, s1: number, count = true, into?: Buffer): Promise<{ buf: Buffer; sums: Buffer }> {
    const s = this.s;
    const gen = s.gens[slot]!;
    s.readers[slot]!++;
    let res: { buf: Buffer; sums: Buffer } | string;
    try {
      res = await readSlotSectors(s, slot, s.sums[slot]!, s0, s1, count ? gen : undefined, this.sumsCache, into);
      if (typeof res === 'string') {
        // What failed may be the memory, not the disk: a caller's buffer written to while the read
        // was in it, or a bad bit in RAM. Dropping the block on that would destroy a good copy, so
        // the disk's is read again, into memory of the store's own and past the checksum cache,
        // before the block is condemned.
        const again = await readSlotSectors(s, slot, s.sums[slot]!, s0, s1);
        if (typeof again !== 'string') {
          s.counters.memoryChecksumFailures++;
          if (into) into.set(again.buf);
          res = { buf: into ?? again.buf, sums: again.sums };
        }
      }
    } catch (err) {
      throw ioError(`reading block ${formatBlockRef(ref)}`, err, s.dir);
    } finally {
      this.releaseReader(slot);
    }
    if (typeof res === 'string') {
      s.counters.checksumFailures++;
      // Dropped so that hasBlock() turns false and the repair put of a good copy is not a no-op.
      await s.drop(key, slot, gen).catch(noop);
      throw new TorusError('CORRUPT', `block ${formatBlockRef(ref)} (slot ${slot}) is corrupt: ${res}; dropped from ${s.dir}`);
    }
    if (count) s.counters.reads++;
    return res;
  }

  /** Ends a read of `slot`; a slot freed while it was read is handed out only now. */
  private releaseReader(slot: number): void {
    if (--this.s.readers[slot]! === 0 && this.s.state[slot] === DRAINING) this.s.drained(slot);
  }

  async getBlock(ref: BlockRef): Promise<Buffer> {
    const s = this.s;
    s.enter();
    try {
      const key = refKey(ref);
      const slot = this.readableSlot(key);
      if (slot === undefined) throw unavailable(ref);
      return (await this.readChecked(ref, key, slot, 0, s.sectors)).buf;
    } finally {
      s.leave();
    }
  }

  async readRange(ref: BlockRef, offset: number, length: number): Promise<Buffer> {
    const s = this.s;
    if (length === 0) {
      s.enter();
      try {
        checkRange(ref, offset, length, s.blockSize);
        if (!this.hasBlock(ref)) throw unavailable(ref);
        return Buffer.alloc(0);
      } finally {
        s.leave();
      }
    }
    const read = await this.readSectors(ref, offset, length);
    const at = offset - read.offset;
    return read.data.subarray(at, at + length);
  }

  async readSectors(ref: BlockRef, offset: number, length: number): Promise<SectorRead> {
    const read = await this.sectors(ref, offset, length);
    if (read === undefined) throw unavailable(ref);
    return read;
  }

  /** readSectors into `into`, which must span whole sectors from `offset`; undefined when the block is not here. */
  readSectorsInto(ref: BlockRef, offset: number, into: Buffer): Promise<SectorRead | undefined> {
    const ss = this.s.sectorSize;
    if (offset % ss !== 0 || (into.length % ss !== 0 && offset + into.length !== this.s.blockSize))
      return Promise.reject(new TorusError('INVALID_ARGUMENT', `readSectorsInto: ${offset}+${into.length} is not whole sectors of ${ss} bytes`));
    return this.sectors(ref, offset, into.length, into);
  }

  private async sectors(ref: BlockRef, offset: number, length: number, into?: Buffer): Promise<SectorRead | undefined> {
    const s = this.s;
    s.enter();
    try {
      checkRange(ref, offset, length, s.blockSize);
      const key = refKey(ref);
      const slot = this.readableSlot(key);
      if (slot === undefined) return undefined;
      const s0 = Math.floor(offset / s.sectorSize);
      const s1 = length === 0 ? s0 : Math.floor((offset + length - 1) / s.sectorSize) + 1;
      const { buf, sums } = await this.readChecked(ref, key, slot, s0, s1, true, into);
      return { sectorSize: s.sectorSize, sums, offset: s0 * s.sectorSize, data: buf };
    } finally {
      s.leave();
    }
  }

  hasBlock(ref: BlockRef): boolean {
    return this.readableSlot(refKey(ref)) !== undefined;
  }

  /** The slot of a block that can be read: held, and not a log block still open. */
  private readableSlot(key: string): number | undefined {
    const slot = this.s.index.get(key);
    return slot !== undefined && this.s.state[slot] !== OPEN ? slot : undefined;
  }

  async verifyBlock(ref: BlockRef): Promise<VerifyResult> {
    const s = this.s;
    s.enter();
    try {
      const key = refKey(ref);
      const slot = s.index.get(key);
      if (slot === undefined) return 'missing';
      // An open log block has no checksums yet; its journal records carry their own.
      if (s.state[slot] === OPEN) return 'ok';
      await this.readChecked(ref, key, slot, 0, s.sectors, false);
      return 'ok';
    } catch (err) {
      if (isTorusError(err, 'CORRUPT')) return 'corrupt';
      throw err;
    } finally {
      s.leave();
    }
  }

  async inspectBlock(ref: BlockRef): Promise<BlockInspection> {
    const s = this.s;
    s.enter();
    try {
      const key = refKey(ref);
      const slot = s.index.get(key);
      if (slot === undefined) return { status: 'missing' };
      // An open log block has no checksums yet; its journal records carry their own.
      if (s.state[slot] === OPEN) return { status: 'ok' };
      const generation = s.gens[slot]!;
      const data = Buffer.allocUnsafe(s.blockSize);
      const sums = Buffer.allocUnsafe(s.layout.checksumArraySize);
      const record = Buffer.allocUnsafe(RECORD_SIZE);
      s.readers[slot]!++;
      try {
        await Promise.all([
          readFull(s.data, data, s.layout.dataOffset(slot)),
          readFull(s.table, sums, s.layout.checksumOffset(slot)),
          readFull(s.table, record, s.layout.recordOffset(slot)),
        ]);
      } catch (err) {
        throw ioError(`reading block ${formatBlockRef(ref)}`, err, s.dir);
      } finally {
        this.releaseReader(slot);
      }
      s.counters.bytesRead += data.length;
      // Deleted (or dropped and stored again) while it was read: what was read is no one's copy.
      if (s.index.get(key) !== slot || s.gens[slot] !== generation) return { status: 'missing' };
      return inspectSlot({ key, generation, checksumsCrc: s.sums[slot]!, record, sums, data, blockSize: s.blockSize, sectorSize: s.sectorSize });
    } finally {
      s.leave();
    }
  }

  /**
   * The refs come from the window's records, read from the table (they are contiguous within a
   * group, so this is one read per group): finding them in the index would cost a walk of all of
   * it, 200 ms for 2 million blocks, for every window.
   */
  async refsInSlots(from: number, to: number): Promise<BlockRef[]> {
    const st = this.s;
    st.enter();
    try {
      const end = Math.min(to, st.nSlots);
      const out: BlockRef[] = [];
      const rec: ScannedRecord = { generation: 0, checksumsCrc: 0, key: '', open: false };
      for (let g0 = Math.max(0, from); g0 < end; ) {
        const g1 = Math.min(end, (Math.floor(g0 / st.layout.slotsPerGroup) + 1) * st.layout.slotsPerGroup);
        const gens = st.gens.slice(g0, g1);
        const buf = Buffer.allocUnsafe((g1 - g0) * RECORD_SIZE);
        try {
          await readFull(st.table, buf, st.layout.recordOffset(g0));
        } catch (err) {
          throw ioError('reading slot records', err, st.dir);
        }
        for (let s = g0; s < g1; s++) {
          // Written, or freed, while the records were read: left for the next pass.
          if (st.state[s] !== USED || st.gens[s] !== gens[s - g0]) continue;
          const ok = scanRecord(buf, (s - g0) * RECORD_SIZE, rec) === RECORD_USED && st.index.get(rec.key) === s;
          // A record damaged on disk since open: only the index still knows its ref (rare, so the walk is fine).
          const key = ok ? rec.key : this.keyOfSlot(s);
          if (key !== undefined) out.push(keyToRef(key));
        }
        g0 = g1;
      }
      return out;
    } finally {
      st.leave();
    }
  }

  private keyOfSlot(slot: number): string | undefined {
    for (const [key, s] of this.s.index) if (s === slot) return key;
    return undefined;
  }

  async readRaw(ref: BlockRef): Promise<Buffer> {
    const s = this.s;
    s.enter();
    try {
      const slot = s.index.get(refKey(ref));
      if (slot === undefined) throw unavailable(ref);
      if (s.state[slot] !== OPEN) return (await this.readChecked(ref, refKey(ref), slot, 0, s.sectors)).buf;
      const buf = Buffer.allocUnsafe(s.blockSize);
      s.readers[slot]!++;
      try {
        await readFull(s.data, buf, s.layout.dataOffset(slot));
      } catch (err) {
        throw ioError(`reading ${formatBlockRef(ref)}`, err, s.dir);
      } finally {
        this.releaseReader(slot);
      }
      s.counters.bytesRead += buf.length;
      return buf;
    } finally {
      s.leave();
    }
  }
}
