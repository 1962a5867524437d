// The storage node's durable block store: a data file of fixed-size slots and a slot table
// (header, one record per slot, one checksum array per slot). docs/on-disk-format.md has the
// byte layout and the crash-safety argument; this file keeps to the mechanics. Opening a data
// dir and recovering it is in file-store-open.ts, the read path in file-store-read.ts; here is
// the store itself: the write path, the journal's log blocks, slot allocation and flushes.
//
// Invariants the code below relies on:
// - A slot is handed to a new block only when (a) the record that freed it is durable, so a
//   crash can never pair the old record with the new data, and (b) no read of it is in flight,
//   so a concurrent reader never sees another block's bytes.
// - Operations on one ref run one after another (keyed()), so concurrent puts of a ref store it
//   once and a delete issued after a put deletes what the put stored.
// - The in-memory index changes only after the disk writes it describes have been issued and
//   completed, except for removal, which happens first so readers stop finding the block.

import { type FileHandle } from 'node:fs/promises';
import { TorusError } from '../core/errors.js';
import { BlockType, formatBlockRef, type BlockRef } from '../core/ids.js';
import { blockCrcFromSectors } from '../core/crc.js';
import { SyncFailure, WriteBatcher, WriteFailure, type Write } from './batch-write.js';
import type { LogPiece, SectorRead } from '../core/interfaces.js';
import {
  checkPut,
  checkRange,
  closedError,
  outOfSpace,
  scrubStore,
  unavailable,
  type BlockInspection,
  type BlockStoreStats,
  type LocalBlockStore,
  type ScrubReport,
  type VerifyResult,
} from './common.js';
import type { DirLock } from './dir-lock.js';
import { ioError, noop, readFull, writeFull, writeTwo } from './file-store-io.js';
import { openDataDir, type FileBlockStoreOptions, type RecoveredStore } from './file-store-open.js';
import { SlotReader } from './file-store-read.js';
import { CLEARING, DRAINING, FREE, LOST, OPEN, PENDING, USED, WRITING, ZERO_RECORD } from './file-store-slots.js';
import {
  HEADER_COPY_OFFSETS,
  Layout,
  RECORD_SIZE,
  computeChecksums,
  encodeHeader,
  encodeFence,
  encodeOpenRecord,
  encodeRecord,
  FENCE_RECORD_SIZE,
  INCOMPAT_OPEN_LOG,
  COMPAT_DURABLE_GEN,
  keyToRef,
  refKey,
  type StoreHeader,
} from './format.js';

export type { FileBlockStoreOptions } from './file-store-open.js';

export interface SlotLocation {
  readonly slot: number;
  readonly generation: number;
  readonly dataOffset: number;
  readonly recordOffset: number;
  readonly checksumOffset: number;
}

/**
 * Free slots kept warm (every byte written once) for log blocks. A journal append is 4 KiB plus a
 * record header, made durable at once: into a file hole, its fdatasync must also commit the
 * file system's allocation, which on ext4 took a two-writer append+fdatasync from 144 to 257 µs
 * (fio, this project's test machine). Whole-block writes allocate too, but share one fsync among
 * many blocks.
 */
const WARM_RESERVE_BYTES = 4 * 1024 * 1024;
const WARM_RESERVE_MIN_SLOTS = 8;
/**
 * The reserve is topped up once this much of it is used, at least a slot: every preparation
 * ends in an fdatasync that the journal's appends queue behind on the disk, and one per log
 * block was about one more fsync round every 15 flushes at 64 KiB.
 */
const WARM_PREP_BATCH_BYTES = 512 * 1024;

function hex(n: number): string {
  return `0x${(n >>> 0).toString(16).padStart(8, '0')}`;
}

export class FileBlockStore implements LocalBlockStore {
  readonly blockSize: number;
  readonly sectorSize: number;
  readonly dir: string;

  private readonly data: FileHandle;
  private readonly table: FileHandle;
  private readonly lock: DirLock;
  private readonly layout: Layout;
  private readonly nSlots: number;
  private readonly sectors: number;

  private readonly index: Map<string, number>;
  private readonly gens: Float64Array;
  private readonly sums: Uint32Array;
  private readonly readers: Uint32Array;
  private readonly state: Uint8Array;
  /**
   * Two stacks of free slots in one array (there are never more free slots than slots): from the
   * bottom, `freeTop` cold ones, not known to be written (at format, every slot: the files are
   * sparse); from the top, `warmTop` warm ones, which log blocks take first.
   */
  private readonly freeStack: Uint32Array;
  private freeTop = 0;
  private warmTop = 0;
  /** Whether every byte of the slot's data is known written (the store never punches holes). */
  private readonly warm: Uint8Array;
  private readonly warmReserve: number;
  /** Slots a preparation zeroes at once (WARM_PREP_BATCH_BYTES). */
  private readonly warmBatch: number;
  /** Free slots being zeroed to become warm. */
  private prepping = 0;
  private prep: Promise<void> | null = null;
  /** Slots whose clearing record is written but not yet durable. */
  private pendingFree: number[] = [];
  /** Slots a running flush will free when its fsyncs complete. */
  private releasing = 0;
  private draining = 0;
  /** Slots whose clearing record is being written (they free up soon). */
  private clearing = 0;
  private slotWaiters: Array<() => void> = [];
  private nextGen: number;
  /** Generations whose records a completed sync made durable (all at or below it). */
  private syncedGen: number;

  private readonly keyTails = new Map<string, Promise<void>>();
  private runningFlush: Promise<void> | null = null;
  private queuedFlush: Promise<void> | null = null;

  private active = 0;
  private idleWaiters: Array<() => void> = [];
  private closed = false;
  private closePromise: Promise<void> | null = null;
  private broken: TorusError | null = null;
  private zeros: Buffer | null = null;
  /**
   * Set when a write to each file completes, cleared when a flush starts: an idle flush costs no
   * fsync, and a flush after appends only (the journal's steady state) syncs only the data file.
   */
  private dataDirty = false;
  private tableDirty = false;
  /** The header in force; rewritten (other copy) when a feature flag is first needed. */
  private hdr: StoreHeader;
  /** Per volume, the highest journal epoch fenced; kept in FENCE_FILE. */
  private readonly fences: Map<number, number>;
  private fenceFile: FileHandle | undefined;
  private fenceRecords: number;
  /** Fence updates run one at a time (each appends a record and syncs the table). */
  private fenceChain: Promise<unknown> = Promise.resolve();
  /** Keys of the open log blocks held. */
  private readonly openKeys: Set<string>;
  private incompatUpdate: Promise<void> | undefined;
  /** Generations handed out whose writes have not completed (their records may not be on disk yet). */
  private readonly inflightGens = new Set<number>();
  /** Header rewrites run one at a time. */
  private headerChain: Promise<unknown> = Promise.resolve();
  /**
   * The header copy known to be on stable storage. Every rewrite goes to the other copy, so a
   * torn or lost rewrite always leaves this one readable, whatever order the disk persisted in.
   */
  private durableCopy: number;
  /**
   * Counts each rewrite's start and its end (odd while one is writing): a table sync promotes the
   * other copy only if no rewrite was under way when it started and none began during it.
   */
  private headerWrites = 0;
  private unsyncedHeader = false;
  private readonly counters: BlockStoreStats;
  /** Block writes of one turn of the event loop in one thread-pool job; fs call by call without the addon. */
  private readonly batcher = WriteBatcher.available ? new WriteBatcher() : undefined;
  /** The read path (file-store-read.ts), over this store's files and in-memory state. */
  private readonly reads: SlotReader;

  private constructor(r: RecoveredStore) {
    this.durableCopy = r.headerCopy;
    this.dir = r.dir;
    this.data = r.data;
    this.table = r.table;
    this.lock = r.lock;
    this.hdr = r.header;
    this.blockSize = r.header.blockSize;
    this.sectorSize = r.header.sectorSize;
    this.layout = r.layout;
    this.nSlots = r.header.slotCount;
    this.sectors = Math.ceil(r.header.blockSize / r.header.sectorSize);
    this.index = r.index;
    this.gens = r.gens;
    this.sums = r.sums;
    this.readers = new Uint32Array(this.nSlots);
    this.state = r.state;
    this.freeStack = new Uint32Array(this.nSlots);
    this.warm = r.warm;
    this.warmReserve = Math.min(this.nSlots >> 2, Math.max(WARM_RESERVE_MIN_SLOTS, Math.ceil(WARM_RESERVE_BYTES / this.blockSize)));
    this.warmBatch = Math.max(1, Math.min(this.warmReserve >> 1, Math.floor(WARM_PREP_BATCH_BYTES / this.blockSize)));
    this.nextGen = r.nextGen;
    this.syncedGen = r.syncedGen;
    this.openKeys = r.openKeys;
    this.fences = r.fences;
    this.fenceFile = r.fenceFile;
    this.fenceRecords = r.fenceRecords;
    this.counters = r.counters;
    for (const slot of r.free) this.pushFree(slot);
    this.reads = new SlotReader({
      dir: this.dir,
      data: this.data,
      table: this.table,
      layout: this.layout,
      blockSize: this.blockSize,
      sectorSize: this.sectorSize,
      counters: this.counters,
      nSlots: this.nSlots,
      sectors: this.sectors,
      index: this.index,
      gens: this.gens,
      sums: this.sums,
      state: this.state,
      readers: this.readers,
      enter: () => this.enter(),
      leave: () => this.leave(),
      drained: (slot) => {
        this.draining--;
        this.pushFree(slot);
      },
      drop: (key, slot, gen) => this.keyed(key, () => this.removeKey(key, slot, gen)).then(noop),
    });
  }

  /**
   * Opens the store in `opts.dir`, formatting it if empty and growing it if `sizeBytes` is larger
   * than before. INVALID_ARGUMENT for another block size or a smaller size, LOCKED if another
   * process has it open.
   */
  static async open(opts: FileBlockStoreOptions): Promise<FileBlockStore> {
    return new FileBlockStore(await openDataDir(opts));
  }

  // ---- reads (file-store-read.ts) ----

  getBlock(ref: BlockRef): Promise<Buffer> {
    return this.reads.getBlock(ref);
  }

  readRange(ref: BlockRef, offset: number, length: number): Promise<Buffer> {
    return this.reads.readRange(ref, offset, length);
  }

  readSectors(ref: BlockRef, offset: number, length: number): Promise<SectorRead> {
    return this.reads.readSectors(ref, offset, length);
  }

  readSectorsInto(ref: BlockRef, offset: number, into: Buffer): Promise<SectorRead | undefined> {
    return this.reads.readSectorsInto(ref, offset, into);
  }

  hasBlock(ref: BlockRef): boolean {
    return this.reads.hasBlock(ref);
  }

  verifyBlock(ref: BlockRef): Promise<VerifyResult> {
    return this.reads.verifyBlock(ref);
  }

  scrub(opts: { signal?: AbortSignal; onProgress?: (checked: number, total: number) => void } = {}): Promise<ScrubReport> {
    return scrubStore(this, opts);
  }

  inspectBlock(ref: BlockRef): Promise<BlockInspection> {
    return this.reads.inspectBlock(ref);
  }

  refsInSlots(from: number, to: number): Promise<BlockRef[]> {
    return this.reads.refsInSlots(from, to);
  }

  readRaw(ref: BlockRef): Promise<Buffer> {
    return this.reads.readRaw(ref);
  }

  // ---- writes ----

  /** Thread-pool jobs the batched block writes took, and the blocks they stored; undefined when writes go through fs one by one. */
  batchedWrites(): { readonly jobs: number; readonly blocks: number } | undefined {
    return this.batcher && { jobs: this.batcher.jobs, blocks: this.batcher.groups };
  }

  /**
   * `data` is read while the call is pending, so the caller must not modify it until the
   * returned promise settles (copying every 512 KiB block would halve write throughput).
   */
  async putBlock(ref: BlockRef, data: Uint8Array, opts?: { readonly crc?: number }): Promise<void> {
    this.enter();
    try {
      this.checkWritable();
      checkPut(ref, data, this.blockSize);
      const key = refKey(ref);
      if (this.hasBlock(ref) && !this.keyTails.has(key)) return;
      await this.keyed(key, () => this.store(key, ref, data, opts?.crc));
    } finally {
      this.leave();
    }
  }

  private async store(key: string, ref: BlockRef, data: Uint8Array, expectCrc: number | undefined): Promise<void> {
    const held = this.index.get(key);
    if (held !== undefined && this.state[held] !== OPEN) return;
    // A sealed copy of a log block this node holds open (it missed the seal): the sealed one is
    // the block; the open one goes.
    if (held !== undefined) await this.removeKey(key);
    this.checkWritable();
    const slot = await this.allocSlot();
    const gen = this.nextGen++;
    this.inflightGens.add(gen);
    const sums = Buffer.allocUnsafe(this.layout.checksumArraySize);
    const record = Buffer.allocUnsafe(RECORD_SIZE);
    let recordIssued = false;
    try {
      const zeros = data.length < this.blockSize ? this.zeroBuffer() : null;
      const sumsCrc = computeChecksums(data, this.blockSize, this.sectorSize, zeros, sums);
      // The block's CRC from its sector checksums: no second pass over the bytes.
      const blockCrc = blockCrcFromSectors(sums, this.blockSize, this.sectorSize);
      if (expectCrc !== undefined && blockCrc !== expectCrc >>> 0) {
        this.counters.checksumFailures++;
        throw new TorusError('CORRUPT', `block ${formatBlockRef(ref)} arrived damaged: its CRC ${hex(blockCrc)} is not the writer's ${hex(expectCrc)}; not stored`);
      }
      encodeRecord(ref, gen, sumsCrc, record, blockCrc);
      const pos = this.layout.dataOffset(slot);
      // The record goes last: once it is on disk it commits data and checksums, whose CRCs
      // expose any part of them that did not make it.
      if (this.batcher !== undefined) {
        const writes: Write[] = [[this.data.fd, data, pos]];
        if (zeros) writes.push([this.data.fd, zeros.subarray(0, this.blockSize - data.length), pos + data.length]);
        writes.push([this.table.fd, sums, this.layout.checksumOffset(slot)], [this.table.fd, record, this.layout.recordOffset(slot)]);
        try {
          await this.batcher.submit(writes);
        } catch (err) {
          // The record is the last write of the group: issued only if everything before it went.
          recordIssued = err instanceof WriteFailure && err.index === writes.length - 1;
          throw err;
        }
      } else {
        // Both settle before this returns, failed or not: the caller may reuse `data` then (the
        // peer-RPC server's pooled receive buffers), and a write still reading it must not see that.
        const written = await Promise.allSettled([
          zeros ? writeTwo(this.data, data, zeros.subarray(0, this.blockSize - data.length), pos) : writeFull(this.data, data, pos),
          writeFull(this.table, sums, this.layout.checksumOffset(slot)),
        ]);
        for (const w of written) if (w.status === 'rejected') throw w.reason;
        recordIssued = true;
        await writeFull(this.table, record, this.layout.recordOffset(slot));
      }
      this.gens[slot] = gen;
      this.sums[slot] = sumsCrc;
      this.state[slot] = USED;
      this.warm[slot] = 1;
      this.index.set(key, slot);
      this.dataDirty = true;
      this.tableDirty = true;
      this.counters.writes++;
      this.counters.bytesWritten += this.blockSize;
    } catch (err) {
      // Before the record write the slot's durable record is still the cleared one, so the slot
      // is plainly free again; after it, the disk may hold either record, so keep it out of use.
      if (recordIssued) this.state[slot] = LOST;
      else this.pushFree(slot);
      throw ioError(`writing block ${formatBlockRef(ref)}`, err, this.dir);
    } finally {
      this.inflightGens.delete(gen);
    }
  }

  private zeroBuffer(): Buffer {
    this.zeros ??= Buffer.alloc(this.blockSize);
    return this.zeros;
  }

  /**
   * A free slot: for a log block a warm one if there is any (and the reserve is topped up in the
   * background); for a whole block a warm one only beyond the reserve, else a cold one, else warm.
   */
  private async allocSlot(forLog = false): Promise<number> {
    for (;;) {
      const slot = this.popFree(forLog);
      if (slot !== undefined) {
        this.state[slot] = WRITING;
        if (forLog) this.prepareWarm();
        return slot;
      }
      if (this.pendingFree.length > 0 || this.releasing > 0) {
        // Deleted slots become reusable once their clearing is durable; pay that fsync now
        // rather than report a full store that is not.
        await this.flushInternal();
        continue;
      }
      if (this.draining > 0 || this.clearing > 0 || this.prepping > 0) {
        await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
        continue;
      }
      throw outOfSpace(this.nSlots - this.freeTop - this.warmTop, this.nSlots, this.blockSize);
    }
  }

  private popFree(forLog: boolean): number | undefined {
    const takeWarm = this.warmTop > 0 && (forLog || this.warmTop > this.warmReserve || this.freeTop === 0);
    if (takeWarm) return this.freeStack[this.nSlots - this.warmTop--]!;
    if (this.freeTop > 0) return this.freeStack[--this.freeTop]!;
    return undefined;
  }

  private pushFree(slot: number): void {
    this.state[slot] = FREE;
    this.gens[slot] = 0;
    if (this.warm[slot]) this.freeStack[this.nSlots - ++this.warmTop] = slot;
    else this.freeStack[this.freeTop++] = slot;
    this.wakeSlotWaiters();
  }

  /**
   * Tops the warm reserve up from cold free slots, in the background: zeros over each, then one
   * fdatasync, so that the allocation is durable before a journal append needs it. Runs only once
   * log blocks are opened here, and on a store that has been in service mostly never: freed
   * blocks and sealed log blocks come back warm. The zeros are counted (slotPrepBytes).
   */
  private prepareWarm(): void {
    if (this.prep || this.closed || this.broken) return;
    const missing = this.warmReserve - this.warmTop;
    // Below the batch, wait for more to go unless nothing warm is left (the reserve is small).
    if (missing < this.warmBatch && this.warmTop > 0) return;
    const want = Math.min(missing, this.freeTop);
    if (want <= 0) return;
    const slots: number[] = [];
    while (slots.length < want) {
      const slot = this.freeStack[--this.freeTop]!;
      this.state[slot] = WRITING;
      slots.push(slot);
    }
    this.prepping += slots.length;
    this.active++;
    const zeros = this.zeroBuffer();
    this.prep = (async () => {
      try {
        const writes = slots.map((slot): Write => [this.data.fd, zeros, this.layout.dataOffset(slot)]);
        if (this.batcher !== undefined) await this.batcher.submit(writes);
        else for (const [, data, pos] of writes) await writeFull(this.data, data, pos);
        await this.data.datasync();
        for (const slot of slots) this.warm[slot] = 1;
        this.counters.slotPrepBytes += slots.length * this.blockSize;
      } catch {
        // The slots stay cold and free: a log block in one costs a slower sync, nothing else. A
        // disk that fails writes fails the next real write or flush too, which reports it.
      } finally {
        this.prepping -= slots.length;
        for (const slot of slots) this.pushFree(slot);
        this.prep = null;
        this.leave();
      }
    })();
  }

  private wakeSlotWaiters(): void {
    if (this.slotWaiters.length === 0) return;
    const waiters = this.slotWaiters;
    this.slotWaiters = [];
    for (const w of waiters) w();
  }

  async deleteBlock(ref: BlockRef): Promise<void> {
    this.enter();
    try {
      this.checkWritable();
      const key = refKey(ref);
      if (!this.index.has(key) && !this.keyTails.has(key)) return;
      await this.keyed(key, async () => {
        if (await this.removeKey(key)) this.counters.deletes++;
      });
    } finally {
      this.leave();
    }
  }

  /** Clears the ref's record; with `slot`/`gen`, only if the ref still lives in that write. */
  private async removeKey(key: string, slot?: number, gen?: number): Promise<boolean> {
    const current = this.index.get(key);
    if (current === undefined) return false;
    if (slot !== undefined && (current !== slot || this.gens[current] !== gen)) return false;
    this.index.delete(key);
    this.openKeys.delete(key);
    this.state[current] = CLEARING;
    this.clearing++;
    try {
      await writeFull(this.table, ZERO_RECORD, this.layout.recordOffset(current));
    } catch (err) {
      this.state[current] = LOST;
      throw ioError('clearing a slot record', err, this.dir);
    } finally {
      this.clearing--;
      // Waiters resume after this function's synchronous rest, which queues the slot.
      this.wakeSlotWaiters();
    }
    this.state[current] = PENDING;
    this.pendingFree.push(current);
    this.tableDirty = true;
    return true;
  }

  /** Serializes operations on one ref; operations on different refs run concurrently. */
  private keyed<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.keyTails.get(key);
    const run = prev ? prev.then(fn) : fn();
    const tail = run.then(noop, noop);
    this.keyTails.set(key, tail);
    void tail.then(() => {
      if (this.keyTails.get(key) === tail) this.keyTails.delete(key);
    });
    return run;
  }

  // ---- journals (docs/journal.md) ----

  isOpenLog(ref: BlockRef): boolean {
    const slot = this.index.get(refKey(ref));
    return slot !== undefined && this.state[slot] === OPEN;
  }

  private checkFence(ref: BlockRef): void {
    const fence = this.fences.get(ref.volume) ?? 0;
    if (ref.inode < fence) {
      this.counters.fencedRefusals++;
      throw new TorusError('LOCKED', `the journal of volume ${ref.volume} was fenced at epoch ${fence} by a newer writer; refusing ${formatBlockRef(ref)}`);
    }
  }

  /** With `sync`, the pieces (and the log block's open record) are on stable storage when it resolves. */
  async appendLog(ref: BlockRef, pieces: readonly LogPiece[], sync = false): Promise<void> {
    let synced = false;
    this.enter();
    try {
      this.checkWritable();
      if (ref.type !== BlockType.Log) throw new TorusError('INVALID_ARGUMENT', `${formatBlockRef(ref)} is not a log block`);
      for (const p of pieces) checkRange(ref, p.offset, p.data.length, this.blockSize);
      const key = refKey(ref);
      await this.keyed(key, async () => {
        this.checkFence(ref);
        let slot = this.index.get(key);
        if (slot === undefined) slot = await this.openLog(key, ref);
        else if (this.state[slot] !== OPEN) throw new TorusError('INVALID_ARGUMENT', `log block ${formatBlockRef(ref)} is sealed: nothing more can be appended to it`);
        const base = this.layout.dataOffset(slot);
        // Written and synced in one thread-pool job when nothing else needs syncing for it: its
        // open record durable already (the table needs no sync).
        const fused = sync && pieces.length > 0 && this.batcher !== undefined && this.gens[slot]! <= this.syncedGen;
        try {
          if (this.batcher !== undefined) {
            const writes = pieces.map((p): Write => [this.data.fd, p.data, base + p.offset]);
            if (fused) {
              const t0 = performance.now();
              this.counters.flushRequests++;
              await this.batcher.submit(writes, this.data.fd);
              this.counters.flushes++;
              this.counters.syncMs += performance.now() - t0;
              synced = true;
            } else if (writes.length > 0) await this.batcher.submit(writes);
          } else {
            // Settled all, as in store(): the pieces may be reused once this returns.
            const written = await Promise.allSettled(pieces.map((p) => writeFull(this.data, p.data, base + p.offset)));
            for (const w of written) if (w.status === 'rejected') throw w.reason;
          }
        } catch (err) {
          if (err instanceof SyncFailure) {
            // As in syncFiles: after a failed fsync the dirty pages may be gone; refuse writes.
            this.broken ??= ioError('syncing a journal append (store now refuses writes until reopened)', err, this.dir);
            throw this.broken;
          }
          throw ioError(`appending to ${formatBlockRef(ref)}`, err, this.dir);
        }
        if (!synced && pieces.length > 0) this.dataDirty = true;
        for (const p of pieces) this.counters.journalBytesWritten += p.data.length;
      });
    } finally {
      this.leave();
    }
    if (sync && !synced) await this.flush();
  }

  /** Takes a slot for a new log block and writes its open record. */
  private async openLog(key: string, ref: BlockRef): Promise<number> {
    // Before the first open record can reach the disk, the header says the store may hold them.
    if ((this.hdr.incompatFlags & INCOMPAT_OPEN_LOG) === 0) await this.setIncompat(INCOMPAT_OPEN_LOG);
    const slot = await this.allocSlot(true);
    const gen = this.nextGen++;
    this.inflightGens.add(gen);
    try {
      await writeFull(this.table, encodeOpenRecord(ref, gen), this.layout.recordOffset(slot));
    } catch (err) {
      this.state[slot] = LOST;
      throw ioError(`opening log block ${formatBlockRef(ref)}`, err, this.dir);
    } finally {
      this.inflightGens.delete(gen);
    }
    this.gens[slot] = gen;
    this.sums[slot] = 0;
    this.state[slot] = OPEN;
    this.index.set(key, slot);
    this.openKeys.add(key);
    this.tableDirty = true;
    return slot;
  }

  private setIncompat(flag: number): Promise<void> {
    this.incompatUpdate ??= this.rewriteHeader((h) => ({ ...h, incompatFlags: h.incompatFlags | flag }), true);
    return this.incompatUpdate;
  }

  /**
   * Writes the header with `change` applied into the copy that is not known durable; with `sync`,
   * durable before it resolves. Without, it becomes durable with the table's next sync (or never:
   * only the watermark is written so, and a stale one only makes the next open check more).
   */
  private rewriteHeader(change: (h: StoreHeader) => StoreHeader, sync: boolean): Promise<void> {
    const run = this.headerChain.then(async () => {
      const next: StoreHeader = { ...change(this.hdr), sequence: this.hdr.sequence + 1 };
      const target = 1 - this.durableCopy;
      this.headerWrites++;
      try {
        await writeFull(this.table, encodeHeader(next), HEADER_COPY_OFFSETS[target] ?? 0);
      } finally {
        this.headerWrites++;
      }
      this.hdr = next;
      if (sync) {
        await this.table.datasync();
        this.durableCopy = target;
        this.unsyncedHeader = false;
      } else {
        this.unsyncedHeader = true;
      }
    });
    this.headerChain = run.catch(noop);
    return run;
  }

  /** Generations at or below this have completed their writes: a flush starting now covers them. */
  private completedGen(): number {
    let min = this.nextGen;
    for (const g of this.inflightGens) if (g < min) min = g;
    return min - 1;
  }

  async sealLog(ref: BlockRef, gapStart: number, gapEnd: number, crc: number): Promise<void> {
    this.enter();
    try {
      this.checkWritable();
      checkRange(ref, gapStart, Math.max(0, gapEnd - gapStart), this.blockSize);
      const key = refKey(ref);
      await this.keyed(key, async () => {
        this.checkFence(ref);
        const slot = this.index.get(key);
        if (slot === undefined) throw unavailable(ref);
        if (this.state[slot] !== OPEN) {
          // Sealed already (a retried seal): the same block, or a conflict.
          const sums = Buffer.allocUnsafe(this.layout.checksumArraySize);
          await readFull(this.table, sums, this.layout.checksumOffset(slot));
          if (blockCrcFromSectors(sums, this.blockSize, this.sectorSize) === crc >>> 0) return;
          throw new TorusError('CORRUPT', `log block ${formatBlockRef(ref)} is sealed with another CRC than ${hex(crc)}`);
        }
        const base = this.layout.dataOffset(slot);
        const buf = Buffer.allocUnsafe(this.blockSize);
        try {
          if (gapEnd > gapStart) await writeFull(this.data, this.zeroBuffer().subarray(0, gapEnd - gapStart), base + gapStart);
          await readFull(this.data, buf, base);
        } catch (err) {
          throw ioError(`sealing ${formatBlockRef(ref)}`, err, this.dir);
        }
        const sums = Buffer.allocUnsafe(this.layout.checksumArraySize);
        const sumsCrc = computeChecksums(buf, this.blockSize, this.sectorSize, null, sums);
        const blockCrc = blockCrcFromSectors(sums, this.blockSize, this.sectorSize);
        if (blockCrc !== crc >>> 0) {
          this.counters.checksumFailures++;
          throw new TorusError('CORRUPT', `log block ${formatBlockRef(ref)} holds other bytes than its writer sealed (CRC ${hex(blockCrc)}, expected ${hex(crc)}); left open`);
        }
        await writeFull(this.table, sums, this.layout.checksumOffset(slot));
        this.dataDirty = true;
        this.tableDirty = true;
        // The zeroed gap and the checksums must be durable before the record says the block is
        // sealed: a record over checksums that never reached the disk would make a read drop the
        // block, and with it appends that were acknowledged.
        await this.flushInternal();
        const gen = this.nextGen++;
        this.inflightGens.add(gen);
        try {
          await writeFull(this.table, encodeRecord(ref, gen, sumsCrc, undefined, blockCrc), this.layout.recordOffset(slot));
        } catch (err) {
          // The disk holds the open record or the sealed one; both are readable. Keep it out of use.
          this.state[slot] = LOST;
          this.index.delete(key);
          this.openKeys.delete(key);
          throw ioError(`sealing ${formatBlockRef(ref)}`, err, this.dir);
        } finally {
          this.inflightGens.delete(gen);
        }
        this.gens[slot] = gen;
        this.sums[slot] = sumsCrc;
        this.state[slot] = USED;
        // Appends from the front, record headers from the back, the gap between zeroed: all written.
        this.warm[slot] = 1;
        this.openKeys.delete(key);
        this.tableDirty = true;
        this.counters.journalBytesWritten += Math.max(0, gapEnd - gapStart);
      });
    } finally {
      this.leave();
    }
  }

  async fenceVolume(volume: number, epoch: number): Promise<BlockRef[]> {
    this.enter();
    try {
      this.checkWritable();
      const run = this.fenceChain.then(async () => {
        const cur = this.fences.get(volume) ?? 0;
        if (epoch < cur) throw new TorusError('LOCKED', `the journal of volume ${volume} is fenced at epoch ${cur}, above ${epoch}: a newer writer has it`);
        if (epoch > cur) {
          const fh = this.fenceFile;
          if (!fh) throw closedError();
          await writeFull(fh, encodeFence(volume, epoch), this.fenceRecords * FENCE_RECORD_SIZE);
          // Durable before anyone is told: a writer fenced out must stay out after a crash.
          await fh.datasync();
          this.fenceRecords++;
          this.fences.set(volume, epoch);
        }
        const open: BlockRef[] = [];
        for (const key of this.openKeys) {
          const ref = keyToRef(key);
          if (ref.volume === volume) open.push(ref);
        }
        return open;
      });
      this.fenceChain = run.catch(noop);
      try {
        return await run;
      } catch (err) {
        throw ioError(`fencing volume ${volume}`, err, this.dir);
      }
    } finally {
      this.leave();
    }
  }

  // ---- durability ----

  /**
   * Coalesced: callers arriving while no fsync runs start one; callers arriving during one share
   * the single next one (which also covers everything they completed before calling).
   */
  flush(): Promise<void> {
    if (this.closed) return Promise.reject(closedError());
    this.counters.flushRequests++;
    return this.flushInternal();
  }

  private flushInternal(): Promise<void> {
    if (this.queuedFlush) return this.queuedFlush;
    if (this.runningFlush) {
      const queued = this.runningFlush.then(noop, noop).then(() => {
        this.queuedFlush = null;
        return this.startFlush();
      });
      this.queuedFlush = queued;
      return queued;
    }
    return this.startFlush();
  }

  private startFlush(): Promise<void> {
    const p: Promise<void> = this.syncFiles().finally(() => {
      if (this.runningFlush === p) this.runningFlush = null;
    });
    this.runningFlush = p;
    return p;
  }

  private async syncFiles(): Promise<void> {
    if (this.broken) throw this.broken;
    if (!this.dataDirty && !this.tableDirty) return;
    const [data, table] = [this.dataDirty, this.tableDirty];
    this.dataDirty = false;
    this.tableDirty = false;
    const durableGen = this.completedGen();
    const headerWrites = this.headerWrites;
    const promote = table && this.unsyncedHeader && headerWrites % 2 === 0;
    const releasing = this.pendingFree;
    this.pendingFree = [];
    this.releasing += releasing.length;
    try {
      // Data before table: a record made durable by this round never points at data that was
      // written before the round yet is not durable.
      const t0 = performance.now();
      if (data) await this.data.datasync();
      if (table) await this.table.datasync();
      this.counters.syncMs += performance.now() - t0;
    } catch (err) {
      // After a failed fsync Linux may drop the dirty pages and report success next time, so a
      // retry proves nothing: refuse writes until a restart re-reads what the disk really has.
      this.broken = ioError('syncing the block store (store now refuses writes until reopened)', err, this.dir);
      this.releasing -= releasing.length;
      this.pendingFree.push(...releasing);
      this.dataDirty = true;
      this.tableDirty = true;
      throw this.broken;
    }
    this.releasing -= releasing.length;
    this.counters.flushes++;
    if (durableGen > this.syncedGen) this.syncedGen = durableGen;
    // The header copy written before this sync is durable now, unless another rewrite raced the
    // sync into the same copy (it may be torn): then the older copy stays the one to keep.
    if (promote && this.headerWrites === headerWrites) {
      this.durableCopy = 1 - this.durableCopy;
      this.unsyncedHeader = false;
    }
    // Every generation up to durableGen is on stable storage now. Said in the header (made durable
    // by the next flush), so an open after a crash checks only blocks written after it.
    if (durableGen > (this.hdr.durableGen ?? 0))
      await this.rewriteHeader((h) => ({ ...h, durableGen, compatFlags: h.compatFlags | COMPAT_DURABLE_GEN }), false).catch(noop);
    for (const slot of releasing) {
      if (this.readers[slot]! > 0) {
        this.state[slot] = DRAINING;
        this.draining++;
      } else {
        this.pushFree(slot);
      }
    }
  }

  // ---- lifecycle and introspection ----

  private enter(): void {
    if (this.closed) throw closedError();
    this.active++;
  }

  private leave(): void {
    if (--this.active === 0 && this.idleWaiters.length > 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  private checkWritable(): void {
    if (this.broken) throw this.broken;
  }

  /** Waits for pending operations, flushes, and releases the directory. New calls get CLOSED. */
  close(): Promise<void> {
    if (this.closePromise) return this.closePromise;
    this.closed = true;
    this.closePromise = (async () => {
      while (this.active > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
      let failure: unknown = null;
      try {
        if (!this.broken) {
          await this.flushInternal();
          await this.headerChain;
          // The header's watermark durable too: a clean open checks nothing.
          if (this.unsyncedHeader) await this.table.datasync();
        }
      } catch (err) {
        failure = err;
      }
      await Promise.allSettled([this.data.close(), this.table.close(), ...(this.fenceFile ? [this.fenceFile.close()] : [])]);
      await this.lock.release();
      if (failure) throw failure;
    })();
    return this.closePromise;
  }

  numBlocks(): number {
    return this.nSlots;
  }

  usedBlocks(): number {
    return this.index.size;
  }

  refs(): BlockRef[] {
    const out: BlockRef[] = [];
    for (const key of this.index.keys()) out.push(keyToRef(key));
    return out;
  }

  // A slot's generation is that of its last record: a put, an open or a seal takes a new one.
  changeMark(): number {
    return this.completedGen();
  }

  refsChangedSince(mark: number): BlockRef[] {
    const out: BlockRef[] = [];
    for (const [key, slot] of this.index) if (this.gens[slot]! > mark) out.push(keyToRef(key));
    return out;
  }

  /** Resolves when no warm-slot preparation is under way (for tests). */
  async prepared(): Promise<void> {
    while (this.prep) await this.prep;
  }

  stats(): BlockStoreStats {
    return { ...this.counters };
  }

  /** Where a block lives on disk, for tools and tests; undefined if not held. */
  locate(ref: BlockRef): SlotLocation | undefined {
    const slot = this.index.get(refKey(ref));
    if (slot === undefined) return undefined;
    return {
      slot,
      generation: this.gens[slot]!,
      dataOffset: this.layout.dataOffset(slot),
      recordOffset: this.layout.recordOffset(slot),
      checksumOffset: this.layout.checksumOffset(slot),
    };
  }

  /** The header currently in force (format version, store id, geometry). */
  info(): StoreHeader {
    return this.hdr;
  }
}
