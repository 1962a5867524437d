// The in-memory twin of FileBlockStore for unit tests and single-process use (the original's
// `temp` store). Same semantics: fixed capacity, immutable blocks, zero padding, ranged reads,
// CORRUPT on a failed check (inject one with corruptBlock), CLOSED after close, open log blocks
// and fences. With `volatile`, what no flush covered can be lost: powerCut() undoes it, as a
// machine losing power would (the model-based journal tests use it).

import { crc32c } from '@node-rs/crc32';
import { TorusError } from '../core/errors.js';
import { BlockType, blockRefKey, formatBlockRef, type BlockRef } from '../core/ids.js';
import type { LogPiece, SectorRead } from '../core/interfaces.js';
import {
  checkBlockSize,
  checkPut,
  checkRange,
  closedError,
  emptyStats,
  outOfSpace,
  scrubStore,
  unavailable,
  type BlockInspection,
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
  /** Changes not covered by a flush are lost by powerCut(). */
  readonly volatile?: boolean;
}

interface Entry {
  readonly ref: BlockRef;
  /** Owned by the store: copied in on put and out on read, so callers can reuse their buffers. */
  readonly data: Buffer;
  corrupt: boolean;
  /** An open log block: appended to, unreadable but raw until sealed. */
  open: boolean;
  /** CRC32C of `data` as stored (once sealed, for a log block), as the disk store's record keeps it. */
  crc: number;
  /** Creation order: refsInSlots lists blocks in it, as the disk store lists them by slot. */
  readonly seq: number;
  /** When it was stored, opened or sealed, on the scale of changeMark(). */
  changed: number;
}

export class MemoryBlockStore implements LocalBlockStore {
  readonly blockSize: number;
  readonly sectorSize = SECTOR;
  private readonly capacity: number;
  private readonly blocks = new Map<string, Entry>();
  private nextSeq = 0;
  private lastChange = 0;
  private closed = false;
  private readonly counters: BlockStoreStats = emptyStats();
  private readonly fences = new Map<number, number>();
  private readonly volatile: boolean;
  /** With `volatile`: how to undo each change since the last flush, oldest first. */
  private undo: (() => void)[] = [];

  constructor(opts: MemoryBlockStoreOptions) {
    checkBlockSize(opts.blockSize, 2 ** 30);
    if (!Number.isSafeInteger(opts.capacityBlocks) || opts.capacityBlocks < 1)
      throw new TorusError('INVALID_ARGUMENT', `invalid capacity ${opts.capacityBlocks} blocks`);
    this.blockSize = opts.blockSize;
    this.capacity = opts.capacityBlocks;
    this.volatile = opts.volatile ?? false;
  }

  private remember(undo: () => void): void {
    if (this.volatile) this.undo.push(undo);
  }

  /** Loses every change no flush covered (a `volatile` store); returns how many. */
  powerCut(): number {
    const n = this.undo.length;
    for (const u of this.undo.reverse()) u();
    this.undo = [];
    return n;
  }

  private check(): void {
    if (this.closed) throw closedError();
  }

  private read(ref: BlockRef, offset: number, length: number): Buffer {
    const entry = this.blocks.get(blockRefKey(ref));
    if (!entry || entry.open) throw unavailable(ref);
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

  async readSectorsInto(ref: BlockRef, offset: number, into: Buffer): Promise<SectorRead | undefined> {
    if (offset % SECTOR !== 0 || (into.length % SECTOR !== 0 && offset + into.length !== this.blockSize))
      throw new TorusError('INVALID_ARGUMENT', `readSectorsInto: ${offset}+${into.length} is not whole sectors of ${SECTOR} bytes`);
    this.check();
    if (!this.hasBlock(ref)) return undefined;
    const read = await this.readSectors(ref, offset, into.length);
    read.data.copy(into);
    return { ...read, data: into };
  }

  async putBlock(ref: BlockRef, data: Uint8Array, opts?: { readonly crc?: number }): Promise<void> {
    this.check();
    checkPut(ref, data, this.blockSize);
    const key = blockRefKey(ref);
    const held = this.blocks.get(key);
    if (held && !held.open) return;
    if (!held && this.blocks.size >= this.capacity) throw outOfSpace(this.blocks.size, this.capacity, this.blockSize);
    const copy = Buffer.alloc(this.blockSize);
    copy.set(data);
    const crc = crc32c(copy) >>> 0;
    if (opts?.crc !== undefined && crc !== opts.crc >>> 0) {
      this.counters.checksumFailures++;
      throw new TorusError('CORRUPT', `block ${formatBlockRef(ref)} arrived damaged: not the writer's CRC; not stored`);
    }
    // A sealed copy replaces an open one (a replica that missed the seal).
    this.remember(() => (held ? this.blocks.set(key, held) : this.blocks.delete(key)));
    this.blocks.set(key, { ref: { type: ref.type, volume: ref.volume, inode: ref.inode, index: ref.index }, data: copy, corrupt: false, open: false, crc, seq: this.nextSeq++, changed: ++this.lastChange });
    this.counters.writes++;
    this.counters.bytesWritten += this.blockSize;
  }

  hasBlock(ref: BlockRef): boolean {
    const e = this.blocks.get(blockRefKey(ref));
    return e !== undefined && !e.open;
  }

  async deleteBlock(ref: BlockRef): Promise<void> {
    this.check();
    const key = blockRefKey(ref);
    const held = this.blocks.get(key);
    if (held && this.blocks.delete(key)) {
      this.counters.deletes++;
      this.remember(() => this.blocks.set(key, held));
    }
  }

  async flush(): Promise<void> {
    this.check();
    this.counters.flushRequests++;
    this.counters.flushes++;
    this.undo = [];
  }

  // ---- journals ----

  isOpenLog(ref: BlockRef): boolean {
    return this.blocks.get(blockRefKey(ref))?.open === true;
  }

  private checkFence(ref: BlockRef): void {
    const fence = this.fences.get(ref.volume) ?? 0;
    if (ref.inode < fence) {
      this.counters.fencedRefusals++;
      throw new TorusError('LOCKED', `the journal of volume ${ref.volume} was fenced at epoch ${fence} by a newer writer; refusing ${formatBlockRef(ref)}`);
    }
  }

  async appendLog(ref: BlockRef, pieces: readonly LogPiece[], sync = false): Promise<void> {
    this.check();
    if (ref.type !== BlockType.Log) throw new TorusError('INVALID_ARGUMENT', `${formatBlockRef(ref)} is not a log block`);
    for (const p of pieces) checkRange(ref, p.offset, p.data.length, this.blockSize);
    this.checkFence(ref);
    const key = blockRefKey(ref);
    let entry = this.blocks.get(key);
    if (entry && !entry.open) throw new TorusError('INVALID_ARGUMENT', `log block ${formatBlockRef(ref)} is sealed: nothing more can be appended to it`);
    if (!entry) {
      if (this.blocks.size >= this.capacity) throw outOfSpace(this.blocks.size, this.capacity, this.blockSize);
      entry = { ref: { ...ref }, data: Buffer.alloc(this.blockSize), corrupt: false, open: true, crc: 0, seq: this.nextSeq++, changed: ++this.lastChange };
      this.blocks.set(key, entry);
      this.remember(() => this.blocks.delete(key));
    }
    const e = entry;
    for (const p of pieces) {
      const before = Buffer.from(e.data.subarray(p.offset, p.offset + p.data.length));
      this.remember(() => before.copy(e.data, p.offset));
      e.data.set(p.data, p.offset);
      this.counters.journalBytesWritten += p.data.length;
    }
    if (sync) await this.flush();
  }

  async sealLog(ref: BlockRef, gapStart: number, gapEnd: number, crc: number): Promise<void> {
    this.check();
    this.checkFence(ref);
    const e = this.blocks.get(blockRefKey(ref));
    if (!e) throw unavailable(ref);
    const after = Buffer.from(e.data);
    if (gapEnd > gapStart) after.fill(0, gapStart, gapEnd);
    if (crc32c(after) >>> 0 !== crc >>> 0) {
      this.counters.checksumFailures++;
      throw new TorusError('CORRUPT', `log block ${formatBlockRef(ref)} holds other bytes than its writer sealed`);
    }
    if (!e.open) return;
    const before = Buffer.from(e.data);
    this.remember(() => {
      before.copy(e.data);
      e.open = true;
    });
    after.copy(e.data);
    e.open = false;
    e.crc = crc >>> 0;
    e.changed = ++this.lastChange;
    this.counters.journalBytesWritten += Math.max(0, gapEnd - gapStart);
  }

  async fenceVolume(volume: number, epoch: number): Promise<BlockRef[]> {
    this.check();
    const cur = this.fences.get(volume) ?? 0;
    if (epoch < cur) throw new TorusError('LOCKED', `the journal of volume ${volume} is fenced at epoch ${cur}, above ${epoch}: a newer writer has it`);
    // Durable at once, as the disk store syncs it before answering.
    this.fences.set(volume, epoch);
    return [...this.blocks.values()].filter((e) => e.open && e.ref.volume === volume).map((e) => ({ ...e.ref }));
  }

  async readRaw(ref: BlockRef): Promise<Buffer> {
    this.check();
    const e = this.blocks.get(blockRefKey(ref));
    if (!e) throw unavailable(ref);
    if (!e.open) return this.read(ref, 0, this.blockSize);
    return Buffer.from(e.data);
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

  changeMark(): number {
    return this.lastChange;
  }

  refsChangedSince(mark: number): BlockRef[] {
    const out: BlockRef[] = [];
    for (const e of this.blocks.values()) if (e.changed > mark) out.push(e.ref);
    return out;
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

  async inspectBlock(ref: BlockRef): Promise<BlockInspection> {
    this.check();
    const entry = this.blocks.get(blockRefKey(ref));
    if (!entry) return { status: 'missing' };
    // An open log block has no checksums yet; its journal records carry their own.
    if (entry.open) return { status: 'ok' };
    this.counters.bytesRead += this.blockSize;
    if (entry.corrupt) return { status: 'corrupt', reason: 'a sector does not match its checksum', crc: entry.crc };
    // Bytes swapped by replaceBlock are self-consistent, but not the writer's.
    if (crc32c(entry.data) >>> 0 !== entry.crc) return { status: 'corrupt', reason: "its sector checksums do not combine to the writer's CRC", crc: entry.crc };
    return { status: 'ok', crc: entry.crc };
  }

  /** Slots here are ranks in creation order: a block deleted during a pass shifts the later ones down. */
  async refsInSlots(from: number, to: number): Promise<BlockRef[]> {
    this.check();
    const sealed = [...this.blocks.values()].filter((e) => !e.open).sort((a, b) => a.seq - b.seq);
    return sealed.slice(Math.max(0, from), Math.max(0, to)).map((e) => e.ref);
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
