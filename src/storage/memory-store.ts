// The in-memory twin of FileBlockStore for unit tests and single-process use (the original's
// `temp` store). Same semantics: fixed capacity, immutable blocks, zero padding, ranged reads,
// CORRUPT on a failed check (inject one with corruptBlock), CLOSED after close.

import { crc32c } from '@node-rs/crc32';
import { TorusError } from '../core/errors.js';
import { blockRefKey, formatBlockRef, type BlockRef } from '../core/ids.js';
import type { SectorRead } from '../core/interfaces.js';
import {
  checkBlockSize,
  checkPut,
  checkRange,
  closedError,
  emptyStats,
  outOfSpace,
  scrubStore,
  unavailable,
  type BlockStoreStats,
  type LocalBlockStore,
  type ScrubReport,
  type VerifyResult,
} from './common.js';

/** The checksum granularity readSectors reports, as the disk store's. */
const SECTOR = 4096;

export interface MemoryBlockStoreOptions {
  readonly blockSize: number;
  /** Capacity in blocks. */
  readonly capacityBlocks: number;
}

interface Entry {
  readonly ref: BlockRef;
  /** Owned by the store: copied in on put and out on read, so callers can reuse their buffers. */
  readonly data: Buffer;
  corrupt: boolean;
}

export class MemoryBlockStore implements LocalBlockStore {
  readonly blockSize: number;
  private readonly capacity: number;
  private readonly blocks = new Map<string, Entry>();
  private closed = false;
  private readonly counters: BlockStoreStats = emptyStats();

  constructor(opts: MemoryBlockStoreOptions) {
    checkBlockSize(opts.blockSize, 2 ** 30);
    if (!Number.isSafeInteger(opts.capacityBlocks) || opts.capacityBlocks < 1)
      throw new TorusError('INVALID_ARGUMENT', `invalid capacity ${opts.capacityBlocks} blocks`);
    this.blockSize = opts.blockSize;
    this.capacity = opts.capacityBlocks;
  }

  private check(): void {
    if (this.closed) throw closedError();
  }

  private read(ref: BlockRef, offset: number, length: number): Buffer {
    const entry = this.blocks.get(blockRefKey(ref));
    if (!entry) throw unavailable(ref);
    if (entry.corrupt) {
      this.counters.checksumFailures++;
      this.blocks.delete(blockRefKey(ref));
      throw new TorusError('CORRUPT', `block ${formatBlockRef(ref)} is corrupt; dropped from the memory store`);
    }
    this.counters.reads++;
    this.counters.bytesRead += length;
    return Buffer.from(entry.data.subarray(offset, offset + length));
  }

  async getBlock(ref: BlockRef): Promise<Buffer> {
    this.check();
    return this.read(ref, 0, this.blockSize);
  }

  async readRange(ref: BlockRef, offset: number, length: number): Promise<Buffer> {
    this.check();
    checkRange(ref, offset, length, this.blockSize);
    return this.read(ref, offset, length);
  }

  async readSectors(ref: BlockRef, offset: number, length: number): Promise<SectorRead> {
    this.check();
    checkRange(ref, offset, length, this.blockSize);
    const s0 = Math.floor(offset / SECTOR);
    const s1 = length === 0 ? s0 : Math.ceil((offset + length) / SECTOR);
    const start = s0 * SECTOR;
    const data = this.read(ref, start, Math.min(s1 * SECTOR, this.blockSize) - start);
    const whole = this.blocks.get(blockRefKey(ref))!.data;
    const sums = Buffer.alloc(4 * Math.ceil(this.blockSize / SECTOR));
    for (let s = 0; s * SECTOR < this.blockSize; s++) sums.writeUInt32LE(crc32c(whole.subarray(s * SECTOR, Math.min((s + 1) * SECTOR, this.blockSize))) >>> 0, s * 4);
    return { sectorSize: SECTOR, sums, offset: start, data };
  }

  async putBlock(ref: BlockRef, data: Uint8Array, opts?: { readonly crc?: number }): Promise<void> {
    this.check();
    checkPut(ref, data, this.blockSize);
    const key = blockRefKey(ref);
    if (this.blocks.has(key)) return;
    if (this.blocks.size >= this.capacity) throw outOfSpace(this.blocks.size, this.capacity, this.blockSize);
    const copy = Buffer.alloc(this.blockSize);
    copy.set(data);
    if (opts?.crc !== undefined && crc32c(copy) >>> 0 !== opts.crc >>> 0) {
      this.counters.checksumFailures++;
      throw new TorusError('CORRUPT', `block ${formatBlockRef(ref)} arrived damaged: not the writer's CRC; not stored`);
    }
    this.blocks.set(key, { ref: { type: ref.type, volume: ref.volume, inode: ref.inode, index: ref.index }, data: copy, corrupt: false });
    this.counters.writes++;
    this.counters.bytesWritten += this.blockSize;
  }

  hasBlock(ref: BlockRef): boolean {
    return this.blocks.has(blockRefKey(ref));
  }

  async deleteBlock(ref: BlockRef): Promise<void> {
    this.check();
    if (this.blocks.delete(blockRefKey(ref))) this.counters.deletes++;
  }

  async flush(): Promise<void> {
    this.check();
    this.counters.flushRequests++;
    this.counters.flushes++;
  }

  numBlocks(): number {
    return this.capacity;
  }

  usedBlocks(): number {
    return this.blocks.size;
  }

  refs(): BlockRef[] {
    return Array.from(this.blocks.values(), (e) => e.ref);
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  stats(): BlockStoreStats {
    return { ...this.counters };
  }

  async verifyBlock(ref: BlockRef): Promise<VerifyResult> {
    this.check();
    const entry = this.blocks.get(blockRefKey(ref));
    if (!entry) return 'missing';
    if (!entry.corrupt) return 'ok';
    this.counters.checksumFailures++;
    this.blocks.delete(blockRefKey(ref));
    return 'corrupt';
  }

  scrub(opts: { signal?: AbortSignal; onProgress?: (checked: number, total: number) => void } = {}): Promise<ScrubReport> {
    return scrubStore(this, opts);
  }

  /**
   * Test hook: `ref` now holds other bytes, consistent with their own checksums, as a replica
   * with a bug (or a disk that wrote a block to the wrong place) would serve them.
   */
  replaceBlock(ref: BlockRef, data: Uint8Array): void {
    const entry = this.blocks.get(blockRefKey(ref));
    if (!entry) throw unavailable(ref);
    entry.data.fill(0);
    entry.data.set(data);
  }

  /** Test hook: the next read of `ref` fails its checksum, as a damaged disk copy would. */
  corruptBlock(ref: BlockRef): void {
    const entry = this.blocks.get(blockRefKey(ref));
    if (!entry) throw unavailable(ref);
    entry.corrupt = true;
  }
}
