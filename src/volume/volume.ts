import { crc32c } from '@node-rs/crc32';
import { TorusError, isTorusError } from '../core/errors.js';
import { BlockType, LOG_BLOCKS_PER_SEGMENT, type BlockRef } from '../core/ids.js';
import type { BlockDevice, Extent, KVSession } from '../core/interfaces.js';
import { Yielder } from '../core/yielder.js';
import { InodeTree, type VolumeBlockStore } from './inode.js';
import { logRef, RecordType, type JournalRecord } from './journal-format.js';
import { JournalReplicaError, JournalWriter, readTail, type JournalPeers, type TailEntry } from './journal.js';
import type { ExtraOps, VolumeLock, VolumeMeta } from './meta.js';
import { OverlayIndex, type Segment, type Source } from './overlay.js';
import { checkVolumeSize, type Head, type Pointer, type VolumeRecord } from './records.js';
import { decodeRunPage, encodeRunPage, logKeyOf, pageEntries, type RunEntry, type RunPage } from './runs.js';
import { StreamDetector } from './stream-detector.js';

// A block volume over a journal (docs/journal.md). A write lands in memory and in the overlay
// index; a FLUSH appends the writes since the last one to the volume's journal on R storage
// nodes and is acknowledged once every replica has them on disk: no etcd, no block rewrite.
// Checkpoints, in the background, seal the journal's log blocks and commit overlay runs and the
// journal's new start to etcd; folds turn blocks with many overlays back into whole blocks. A
// crash at any point leaves the volume as of its last acknowledged flush: the next writer fences
// the journal and replays its tail.

export type VolumeStore = VolumeBlockStore & JournalPeers;

export interface OpenVolumeOptions {
  readonly readOnly?: boolean;
  /** Open this snapshot's state, read-only. */
  readonly snapshot?: string;
  /**
   * The write cache's budget: written bytes held in memory until the journal has them, counting
   * those of the flush under way. A write that finds it full waits for a flush; none is dropped.
   */
  readonly writeCacheBytes?: number;
  /** Inode pages cached in memory. */
  readonly pageCacheBytes?: number;
  /** Journal bytes since the last checkpoint that start one. */
  readonly checkpointBytes?: number;
  /**
   * The journal tail's budget: bytes of small writes kept in memory from their append until a
   * checkpoint has them in sealed log blocks. A flush that finds it full first waits for the
   * checkpoint. Default: twice checkpointBytes.
   */
  readonly journalTailBytes?: number;
  /** A checkpoint at least this often while there is a tail. 0: only by size, close and request. */
  readonly checkpointIntervalMs?: number;
  /**
   * A block is folded once this many times its size has been written into it since its last fold:
   * folds then add at most R / foldAfter to the write amplification (docs/journal.md).
   */
  readonly foldAfter?: number;
  /** Idle this long, fold every block with overlays (0, the default: never for idleness). */
  readonly foldIdleMs?: number;
  /** Overlay segments past which the blocks with the most are folded. */
  readonly maxOverlaySegments?: number;
  /**
   * A block with more segments than this is folded after the flush that made them. Default: 64,
   * or one per 4 KiB of the block if that is more, so that aligned 4 KiB writes alone never
   * trigger it (at 512 KiB blocks a fold every 64 of them made bytes stored per byte written 8).
   */
  readonly maxSegmentsPerBlock?: number;
  /** Run pages in the chain past which a checkpoint writes one compacted run. */
  readonly maxRunChain?: number;
  /** How often the writer looks for snapshot requests (ms); 0 turns it off. */
  readonly snapshotPollMs?: number;
  /** Log blocks per journal segment (tests: the real limit, 2^24, is never reached in one). */
  readonly logBlocksPerSegment?: number;
}

export interface VolumeContext {
  readonly meta: VolumeMeta;
  readonly store: VolumeStore;
  /** The process's lease; needed to open for writing. */
  readonly session?: KVSession;
}

/** What a volume holds in memory now, in bytes, beside its budgets. */
export interface VolumeMemory {
  /** Written and not yet in the journal: pending, and the flush under way. */
  readonly writeCache: number;
  readonly writeCacheLimit: number;
  /** Bytes of small writes appended since the last checkpoint. */
  readonly journalTail: number;
  readonly journalTailLimit: number;
  /** Inode pages held, clean (bounded by the limit) and dirty (until the next checkpoint). */
  readonly pageCache: number;
  readonly pageCacheLimit: number;
  /** Overlay index segments (journal records' ranges over blocks not yet folded); past the limit, the most crowded blocks fold. */
  readonly overlaySegments: number;
  readonly overlaySegmentsLimit: number;
}

export interface VolumeStats {
  flushes: number;
  checkpoints: number;
  folds: number;
  journalMoves: number;
  journalBytes: number;
  compactions: number;
  snapshotsTaken: number;
}

/** How often a writer checks that the ring still puts its journal where it writes it. */
const RING_CHECK_MS = 1000;
/**
 * What a record without data (zeroes, trim) holds while pending, counted against the write
 * cache: the record, its source and its overlay segment, measured at 270-770 bytes.
 */
const RECORD_COST = 512;

/** Folds not yet in a checkpoint past which one is taken at once (bounds this.resets). */
const FOLD_CHECKPOINT_BACKLOG = 4096;

/**
 * Waits for every promise, then throws the first failure: a read into the caller's buffer must
 * not return while a piece of it may still write there (the caller reuses the buffer at once).
 */
async function allSettled(work: readonly Promise<void>[]): Promise<void> {
  for (const r of await Promise.allSettled(work)) if (r.status === 'rejected') throw r.reason;
}

const DEFAULTS = {
  writeCacheBytes: 128 * 1024 * 1024,
  pageCacheBytes: 64 * 1024 * 1024,
  checkpointBytes: 64 * 1024 * 1024,
  checkpointIntervalMs: 30_000,
  foldAfter: 3,
  foldIdleMs: 0,
  maxOverlaySegments: 256 * 1024,
  maxRunChain: 64,
  snapshotPollMs: 1000,
  logBlocksPerSegment: LOG_BLOCKS_PER_SEGMENT,
};

export class BlockVolume implements BlockDevice {
  readonly blockSize: number;
  readonly readOnly: boolean;
  readonly name: string;
  private sizeBytes: number;
  private tree: InodeTree;
  /**
   * What reads see: checkpointed overlays, the journal's tail, and pending writes. The only
   * overlay index a volume keeps: a compaction rebuilds the checkpointed overlays from the run
   * chain it replaces (a second index kept for it was half of a writer's overlay memory).
   */
  private readonly overlay = new OverlayIndex();
  private readonly streams = new StreamDetector();
  private committed: Head;
  /** Run pages in the committed chain. */
  private chainPages = 0;
  private journal: JournalWriter | undefined;
  /** Written, not yet appended to the journal. */
  private pending: TailEntry[] = [];
  private pendingBytes = 0;
  /** Of the entries the running flush took: what it still holds (whole blocks go once stored). */
  private flushingBytes = 0;
  /** Writes waiting for room in the write cache. */
  private cacheWaiters = 0;
  /** Bytes appended since the last checkpoint. */
  private tailBytes = 0;
  /** Folds since the last checkpoint: what the next run must drop. */
  private resets: { index: number; lsn: number }[] = [];
  private nextIndex = 1;
  private flushChain: Promise<void> = Promise.resolve();
  private queuedFlush: Promise<void> | undefined;
  private background: Promise<void> | undefined;
  /** Checkpoints, folds and journal moves run one at a time (they all move the head). */
  private control: Promise<unknown> = Promise.resolve();
  private checkpointRunning: Promise<void> | undefined;
  /** A journal that could not be moved after a replica failed: the next flush tries again. */
  private journalBroken = false;
  /** The ring places the journal's segment on other nodes now: move it at the next flush. */
  private journalMisplaced = false;
  private ringMove: Promise<void> | undefined;
  private fenced: TorusError | undefined;
  private readonly unwatchLease: (() => void) | undefined;
  private closed = false;
  private lastWrite = Date.now();
  private timers: NodeJS.Timeout[] = [];
  private readonly o: Required<Omit<OpenVolumeOptions, 'readOnly' | 'snapshot'>>;
  /** A read-only open's hold on what it opened (meta.hold), let go at close. */
  private held: string | undefined;
  readonly stats: VolumeStats = { flushes: 0, checkpoints: 0, folds: 0, journalMoves: 0, journalBytes: 0, compactions: 0, snapshotsTaken: 0 };
  /**
   * read() into the caller's buffer (`into.length` bytes from `offset`): the NBD server's reply
   * buffer, reused from request to request. Only where the store can fill it from a disk of its
   * own (a storage node): elsewhere every block comes as a buffer anyway, and handing those to the
   * socket as they are (readv) costs one copy less than copying them into another.
   */
  readonly readInto?: (offset: number, into: Buffer) => Promise<void>;

  private constructor(
    private readonly ctx: VolumeContext,
    readonly record: VolumeRecord,
    head: Head,
    private readonly lock: VolumeLock | undefined,
    opts: OpenVolumeOptions,
  ) {
    this.name = record.name;
    this.blockSize = ctx.store.blockSize;
    this.readOnly = !lock;
    this.sizeBytes = head.size;
    this.committed = head;
    const o = { ...DEFAULTS, maxSegmentsPerBlock: Math.max(64, this.blockSize / 4096), ...stripUndefined(opts) };
    this.o = { ...o, journalTailBytes: o.journalTailBytes ?? 2 * o.checkpointBytes };
    this.tree = this.newTree(head);
    if (ctx.store.readRangeInto) this.readInto = (offset, into) => this.fill(offset, into);
    // The session outlives the volume (one per process): the volume stops listening once
    // closed, or the session would keep every volume ever opened alive, overlay and all.
    this.unwatchLease = lock?.session.onLost(() => {
      this.fenced ??= new TorusError('LOCKED', `lost the lock on volume ${this.name}: the etcd lease expired; writes and flushes now fail`);
    });
  }

  private newTree(head: Head): InodeTree {
    const tree = new InodeTree(this.ctx.store, head, this.o.pageCacheBytes);
    // A head written before a resize, or by create (which knows no block size), may be shallower
    // than the size needs.
    tree.grow(Math.max(1, Math.ceil(this.sizeBytes / this.blockSize)));
    return tree;
  }

  static async open(ctx: VolumeContext, name: string, opts: OpenVolumeOptions = {}): Promise<BlockVolume> {
    if (!ctx.session) throw new TorusError('INTERNAL', 'opening a volume needs an etcd session');
    if (opts.snapshot !== undefined || opts.readOnly) return BlockVolume.openHeld(ctx, ctx.session, name, opts);
    const record = await ctx.meta.get(name);
    const lock = await ctx.meta.lock(name, ctx.session);
    try {
      const { head } = await ctx.meta.head(record.id);
      const v = new BlockVolume(ctx, record, head, lock, opts);
      await v.loadRuns(head.runs ?? null);
      await v.startJournal();
      v.startTimers();
      return v;
    } catch (err) {
      await ctx.meta.unlock(lock).catch(() => undefined);
      throw err;
    }
  }

  /**
   * A read-only open: the committed head and its journal tail (every flush acknowledged before
   * the open, even while a writer has the volume mounted; nothing is fenced, and records past the
   * last complete one are not read), or a snapshot. The reader holds what it opened until it
   * closes (meta.hold): the writer's checkpoints move the head on, and GC would otherwise collect
   * the pages and log blocks this reader has yet to read.
   */
  private static async openHeld(ctx: VolumeContext, session: KVSession, name: string, opts: OpenVolumeOptions): Promise<BlockVolume> {
    // The head or snapshot changes between the read and the hold only if a commit lands in
    // between: read it again.
    for (let attempt = 1; attempt <= 20; attempt++) {
      const { record, head, entry } =
        opts.snapshot !== undefined
          ? await ctx.meta.getSnapshot(name, opts.snapshot).then((s) => ({ record: s.volume, head: s.snapshot.head, entry: s.entry }))
          : await ctx.meta.get(name).then(async (record) => ({ record, ...(await ctx.meta.head(record.id)) }));
      const token = await ctx.meta.hold(record.id, session, entry, head);
      if (token === undefined) continue;
      const v = new BlockVolume(ctx, record, head, undefined, opts);
      v.held = token;
      try {
        await v.loadRuns(head.runs ?? null);
        if (opts.snapshot === undefined && head.journal) {
          const records = await readTail(ctx.store, record.id, undefined, head.journal, head.lsn ?? 1);
          let lsn = head.lsn ?? 1;
          for (const r of records) {
            if (r.type === RecordType.Resize) v.applySize(r.offset);
            else v.stageRecord(r);
            for (const e of v.pending) e.src.lsn = lsn++;
            v.pending = [];
          }
        }
        return v;
      } catch (err) {
        await v.close().catch(() => undefined);
        throw err;
      }
    }
    throw new TorusError('AGAIN', `volume ${name} kept changing while it was opened read-only; try again`);
  }

  /**
   * A new writing session: replay what a previous writer left in the journal (fencing it out),
   * start this session's journal in a segment of live replicas with the replayed records, and
   * commit the head that names it. Only then is the volume served.
   */
  private async startJournal(): Promise<void> {
    // What was written since the last fold is not kept across sessions; the overlays' live bytes
    // are a lower bound, so a block overwritten again and again still gets folded.
    for (const i of this.overlay.indexes()) this.writtenSinceFold.set(i, this.overlay.segments(i).reduce((a, g) => a + g.end - g.start, 0));
    const lock = this.lock!;
    const head = this.committed;
    const epoch = lock.epoch;
    const lsn = head.lsn ?? 1;
    const replayed: JournalRecord[] = head.journal ? await readTail(this.ctx.store, this.record.id, epoch, head.journal, lsn) : [];
    const j = new JournalWriter({ peers: this.ctx.store, volume: this.record.id, epoch, blockSize: this.blockSize, lsn, blocksPerSegment: this.o.logBlocksPerSegment });
    await j.startFresh();
    this.journal = j;
    for (const r of replayed) {
      if (r.type === RecordType.Resize) this.stageResize(r.offset);
      else this.stageRecord(r);
    }
    const entries = this.takePending();
    if (entries.length > 0) await j.append(entries);
    this.tailBytes = sumBytes(entries);
    // The dead session's directly stored blocks: GC keeps those of the head's session only, so
    // they go into the tree in this very commit (the records stay in the tail, harmless).
    let fields = this.headFields();
    let applied = 0;
    for (const e of entries) {
      const reset = await this.applyBlockRecord(e);
      if (!reset) continue;
      this.resets.push(reset);
      applied++;
    }
    if (applied > 0) fields = { ...fields, ...(await this.storeTree()) };
    await this.ctx.meta.commit(lock, { ...fields, journal: j.position });
    this.committed = { ...fields, journal: j.position, epoch: lock.epoch - 1 };
    this.nextIndex = 1;
  }

  /**
   * Makes the block of a Block record the tree's own for its index, and drops the overlays up to
   * the record; later writes stay over it, whether or not they cover it. Only a fold since the
   * last checkpoint can have put newer bytes in the tree (it took this record in): then nothing.
   * Returns the run entry that says so, or nothing.
   */
  private async applyBlockRecord(e: TailEntry): Promise<{ kind: 'reset'; index: number; lsn: number } | undefined> {
    const r = e.rec;
    const block = e.src.block;
    if (r.type !== RecordType.Block || !block) return undefined;
    const index = Math.floor(r.offset / this.blockSize);
    if (this.resets.some((f) => f.index === index && f.lsn >= r.lsn)) return undefined;
    await this.tree.set(index, { ref: block.ref, crc: block.crc });
    this.overlay.reset(index, r.lsn);
    return { kind: 'reset', index, lsn: r.lsn };
  }

  /** Stores the in-memory tree's changed pages, durable on R replicas; its root for a head. */
  private async storeTree(): Promise<Pick<Head, 'root' | 'depth'>> {
    const { root, depth, stored } = await this.tree.commit((t) => this.allocRef(t));
    await stored;
    await this.ctx.store.flush();
    return { root, depth };
  }

  /** The head as committed, with the fields a commit rewrites. */
  private headFields(): Omit<Head, 'epoch'> {
    const h = this.committed;
    return { root: h.root, depth: h.depth, size: h.size, runs: h.runs ?? null, lsn: h.lsn ?? 1, journal: h.journal ?? null };
  }

  /** Reads the run chain newest first, back to its base, and applies it oldest first. */
  private async loadRuns(head: Pointer | null): Promise<void> {
    const pages = await this.readChain(head);
    this.chainPages = pages.length;
    for (const page of pages) for (const e of page.entries) applyRunEntry(e, this.overlay);
  }

  /** The pages of the run chain from `head` back to its base, oldest first. */
  private async readChain(head: Pointer | null): Promise<RunPage[]> {
    const pages: RunPage[] = [];
    for (let p = head; p; ) {
      const page = decodeRunPage(await this.ctx.store.getBlock(p.ref, p.crc));
      pages.push(page);
      if (page.base) break;
      p = page.prev;
    }
    return pages.reverse();
  }

  /** The overlays a run chain and then `more` make: what a compacted run writes out. */
  private async chainOverlays(head: Pointer | null, more: readonly RunEntry[], y: Yielder): Promise<OverlayIndex> {
    const ov = new OverlayIndex();
    for (const page of await this.readChain(head)) {
      if (y.due(page.entries.length)) await y.pause();
      for (const e of page.entries) applyRunEntry(e, ov);
    }
    for (const e of more) {
      if (y.due()) await y.pause();
      applyRunEntry(e, ov);
    }
    return ov;
  }

  private startTimers(): void {
    const every = (ms: number, fn: () => void): void => {
      if (ms <= 0) return;
      const t = setInterval(fn, ms);
      t.unref();
      this.timers.push(t);
    };
    every(this.o.checkpointIntervalMs, () => {
      if (this.tailBytes > 0 || this.resets.length > 0) this.checkpointInBackground();
    });
    every(this.o.snapshotPollMs, () => void this.takeRequestedSnapshots().catch(() => undefined));
    every(RING_CHECK_MS, () => this.followRing());
    every(Math.max(1000, Math.floor(this.o.foldIdleMs / 3)), () => {
      if (this.o.foldIdleMs > 0 && Date.now() - this.lastWrite >= this.o.foldIdleMs && this.overlay.size > 0) this.foldInBackground(this.overlay.indexes());
    });
  }

  /** Bytes held in memory by this volume's caches, beside their budgets (for metrics). */
  memory(): VolumeMemory {
    return {
      writeCache: this.pendingBytes + this.flushingBytes,
      writeCacheLimit: this.o.writeCacheBytes,
      journalTail: this.tailBytes,
      journalTailLimit: this.o.journalTailBytes,
      pageCache: this.tree.heldBytes,
      pageCacheLimit: this.o.pageCacheBytes,
      overlaySegments: this.overlay.size,
      overlaySegmentsLimit: this.o.maxOverlaySegments,
    };
  }

  get size(): number {
    return this.sizeBytes;
  }

  /** The head of the last checkpoint. */
  get head(): Head {
    return this.committed;
  }

  /** Overlay segments held (what folds bring down). */
  get overlaySegments(): number {
    return this.overlay.size;
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.sizeBytes)
      throw new TorusError('INVALID_ARGUMENT', `range ${offset}+${length} is outside volume ${this.name} of ${this.sizeBytes} bytes`);
  }

  private checkWritable(): void {
    if (this.closed) throw new TorusError('CLOSED', `volume ${this.name} is closed`);
    if (this.readOnly) throw new TorusError('INVALID_ARGUMENT', `volume ${this.name} is open read-only`);
    if (this.fenced) throw this.fenced;
  }

  /** Splits [offset, offset+length) into per-block pieces. */
  private *pieces(offset: number, length: number): Generator<{ index: number; start: number; n: number; at: number }> {
    for (let pos = offset; pos < offset + length; ) {
      const index = Math.floor(pos / this.blockSize);
      const start = pos - index * this.blockSize;
      const n = Math.min(this.blockSize - start, offset + length - pos);
      yield { index, start, n, at: pos - offset };
      pos += n;
    }
  }

  // ---- reads ----

  // `seq` below: the read continues a sequential stream (StreamDetector), passed to the store so
  // that its read cache lets the blocks go by.

  private async readBlockPart(index: number, start: number, length: number, seq: boolean): Promise<Buffer> {
    const end = start + length;
    const segs = this.overlay.segments(index).filter((s) => s.end > start && s.start < end);
    if (segs.length === 0) return this.readBase(index, start, length, seq);
    const first = segs[0]!;
    if (segs.length === 1 && first.start <= start && first.end >= end) return this.sourceBytes(first, start, length, seq);
    // Pieces from several places: merged into a buffer of its own, as readInto does.
    const out = Buffer.allocUnsafe(length);
    await this.readBlockPartInto(index, start, out, seq);
    return out;
  }

  private async readBase(index: number, start: number, length: number, seq: boolean): Promise<Buffer> {
    const ptr = await this.tree.get(index);
    if (!ptr) return Buffer.alloc(length);
    if (start === 0 && length === this.blockSize) return this.ctx.store.getBlock(ptr.ref, ptr.crc, seq);
    return this.ctx.store.readRange(ptr.ref, start, length, ptr.crc, seq);
  }

  /** Bytes [from, from+n) of a block, from the segment that covers them. */
  private async sourceBytes(s: Segment, from: number, n: number, seq: boolean): Promise<Buffer> {
    const src = s.src;
    if (src.zero) return Buffer.alloc(n);
    const at = s.at + (from - s.start);
    if (src.data) return src.data.subarray(at, at + n);
    if (src.block) return this.ctx.store.readRange(src.block.ref, at, n, src.block.crc, seq);
    const log = src.log;
    if (!log || log.crc === undefined) throw new TorusError('INTERNAL', `volume ${this.name}: overlay bytes with no place to read them from`);
    return this.ctx.store.readRange(logRef({ volume: log.volume, epoch: log.epoch, index: log.index }), log.at + at, n, log.crc, seq);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (this.closed) throw new TorusError('CLOSED', `volume ${this.name} is closed`);
    this.checkRange(offset, length);
    const seq = this.streams.note(offset, length);
    const index = Math.floor(offset / this.blockSize);
    const start = offset - index * this.blockSize;
    if (start + length <= this.blockSize) return this.readBlockPart(index, start, length, seq);
    return Buffer.concat(await this.readPieces(offset, length, seq), length);
  }

  async readv(offset: number, length: number): Promise<readonly Buffer[]> {
    if (this.closed) throw new TorusError('CLOSED', `volume ${this.name} is closed`);
    this.checkRange(offset, length);
    return this.readPieces(offset, length, this.streams.note(offset, length));
  }

  private async fill(offset: number, into: Buffer): Promise<void> {
    if (this.closed) throw new TorusError('CLOSED', `volume ${this.name} is closed`);
    this.checkRange(offset, into.length);
    const seq = this.streams.note(offset, into.length);
    const index = Math.floor(offset / this.blockSize);
    const start = offset - index * this.blockSize;
    if (start + into.length <= this.blockSize) return this.readBlockPartInto(index, start, into, seq);
    await allSettled(Array.from(this.pieces(offset, into.length), ({ index, start, n, at }) => this.readBlockPartInto(index, start, into.subarray(at, at + n), seq)));
  }

  /** readBlockPart into `into`: the block's base, then what the overlay has over it. */
  private async readBlockPartInto(index: number, start: number, into: Buffer, seq: boolean): Promise<void> {
    const end = start + into.length;
    const all = this.overlay.segments(index);
    const segs = all.length === 0 ? all : all.filter((s) => s.end > start && s.start < end);
    if (segs.length === 0) return this.readBaseInto(index, start, into, seq);
    const first = segs[0]!;
    // One record over all of it, as a block written whole is until the next checkpoint.
    if (segs.length === 1 && first.start <= start && first.end >= end) return this.sourceInto(first, start, into, seq);
    const covered = segs.reduce((n, s) => n + Math.min(s.end, end) - Math.max(s.start, start), 0);
    if (covered < into.length) await this.readBaseInto(index, start, into, seq);
    await allSettled(
      segs.map((s) => {
        const a = Math.max(s.start, start);
        return this.sourceInto(s, a, into.subarray(a - start, Math.min(s.end, end) - start), seq);
      }),
    );
  }

  // The two below read straight into `into` where the store can (a storage node's); elsewhere
  // they copy what readBase and sourceBytes return.

  private async readBaseInto(index: number, start: number, into: Buffer, seq: boolean): Promise<void> {
    const store = this.ctx.store;
    if (!store.readRangeInto) {
      (await this.readBase(index, start, into.length, seq)).copy(into);
      return;
    }
    const ptr = await this.tree.get(index);
    if (!ptr) into.fill(0);
    else await store.readRangeInto(ptr.ref, start, into, ptr.crc, seq);
  }

  /** sourceBytes into `into` (`into.length` bytes from `from`). */
  private async sourceInto(s: Segment, from: number, into: Buffer, seq: boolean): Promise<void> {
    const src = s.src;
    const at = s.at + (from - s.start);
    const store = this.ctx.store;
    if (src.zero) into.fill(0);
    else if (src.data) into.set(src.data.subarray(at, at + into.length));
    else if (src.block && store.readRangeInto) await store.readRangeInto(src.block.ref, at, into, src.block.crc, seq);
    else if (src.log && src.log.crc !== undefined && store.readRangeInto) {
      const log = src.log;
      await store.readRangeInto(logRef({ volume: log.volume, epoch: log.epoch, index: log.index }), log.at + at, into, log.crc, seq);
    } else (await this.sourceBytes(s, from, into.length, seq)).copy(into);
  }

  private readPieces(offset: number, length: number, seq: boolean): Promise<Buffer[]> {
    return Promise.all(Array.from(this.pieces(offset, length), ({ index, start, n }) => this.readBlockPart(index, start, n, seq)));
  }

  // ---- writes ----

  /**
   * Takes a write into memory: one pending record per piece (never across a block, never more
   * than a fresh log block holds), each visible to reads at once through the overlay.
   */
  private stage(type: RecordType, offset: number, length: number, data: Uint8Array | undefined, adopt: boolean): void {
    const max = JournalWriter.maxRecord(this.blockSize);
    for (const { index, start, n, at } of this.pieces(offset, length)) {
      if (type === RecordType.Data && n === this.blockSize && data) {
        // A whole block: stored as a block of its own at the flush, and named by a Block record.
        const view = data.subarray(at, at + n);
        const bytes = adopt ? Buffer.from(view.buffer, view.byteOffset, view.byteLength) : Buffer.from(view);
        this.stageRecord({ type: RecordType.Block, lsn: 0, offset: offset + at, length: n, data: bytes });
        continue;
      }
      for (let done = 0; done < n; ) {
        const len = type === RecordType.Data ? Math.min(max, n - done) : n - done;
        const view = data?.subarray(at + done, at + done + len);
        const bytes = view === undefined ? undefined : adopt ? Buffer.from(view.buffer, view.byteOffset, view.byteLength) : Buffer.from(view);
        const src: Source = { lsn: Infinity, zero: type !== RecordType.Data, hole: type === RecordType.Trim, data: bytes, log: undefined };
        const rec: JournalRecord = { type, lsn: 0, offset: offset + at + done, length: len, ...(bytes ? { data: bytes } : {}) };
        this.pending.push({ rec, src });
        this.pendingBytes += bytes?.length ?? RECORD_COST;
        this.overlay.insert(index, start + done, start + done + len, src, 0);
        done += len;
      }
    }
    this.lastWrite = Date.now();
  }

  /**
   * Stages one record as it is (a replayed one, or a whole block from stage): no splitting. A
   * Block record without its bytes reads from the block it names.
   */
  private stageRecord(r: JournalRecord): void {
    const index = Math.floor(r.offset / this.blockSize);
    const start = r.offset - index * this.blockSize;
    const src: Source = { lsn: Infinity, zero: r.type === RecordType.Zero || r.type === RecordType.Trim, hole: r.type === RecordType.Trim, data: r.data, log: undefined };
    if (r.block) src.block = r.block;
    this.pending.push({ rec: { ...r, lsn: 0 }, src });
    this.pendingBytes += r.data?.length ?? RECORD_COST;
    this.overlay.insert(index, start, start + r.length, src, 0);
    this.lastWrite = Date.now();
  }

  private stageResize(size: number): void {
    const src: Source = { lsn: Infinity, zero: true, data: undefined, log: undefined };
    this.pending.push({ rec: { type: RecordType.Resize, lsn: 0, offset: size, length: 0 }, src });
    this.applySize(size);
  }

  private applySize(size: number): void {
    if (size < this.sizeBytes) this.overlay.truncate(Math.ceil(size / this.blockSize));
    else this.tree.grow(Math.max(1, Math.ceil(size / this.blockSize)));
    this.sizeBytes = size;
  }

  private takePending(): TailEntry[] {
    const entries = this.pending;
    this.pending = [];
    this.pendingBytes = 0;
    return entries;
  }

  async write(offset: number, data: Uint8Array, fua = false, adopt = false): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, data.length);
    const wait = this.roomInCache(data.length);
    if (wait) {
      await wait;
      // A shrink may have come while this write waited.
      this.checkRange(offset, data.length);
    }
    this.stage(RecordType.Data, offset, data.length, data, adopt);
    await this.afterWrite(fua);
  }

  /**
   * Room for `cost` more bytes in the write cache (pending, and what the running flush holds):
   * undefined if there is room now, else a wait that flushes for it. The cache is a budget, never
   * passed but by a write larger than all of it, which goes in alone. Concurrent writers each
   * wait, so together they stay within it too; while some wait, a new write queues behind them
   * (staged at once, it could pass an earlier, larger one).
   */
  private roomInCache(cost: number): Promise<void> | undefined {
    if (this.cacheWaiters === 0 && !this.cacheFull(cost)) return undefined;
    return this.waitForRoom(cost);
  }

  private cacheFull(cost: number): boolean {
    const used = this.pendingBytes + this.flushingBytes;
    return used > 0 && used + cost > this.o.writeCacheBytes;
  }

  private async waitForRoom(cost: number): Promise<void> {
    this.cacheWaiters++;
    try {
      do await this.flush();
      while (this.cacheFull(cost));
    } finally {
      this.cacheWaiters--;
    }
    this.checkWritable();
  }

  private async afterWrite(fua: boolean): Promise<void> {
    if (fua) await this.flush();
    else if (this.pendingBytes >= this.o.writeCacheBytes / 2) this.flushInBackground();
  }

  /**
   * A flush nobody waits for, so a steady writer rarely meets a full write cache. Its failure is
   * not lost: the next flush someone waits for reports it (the journal is broken, or fenced).
   */
  private flushInBackground(): void {
    if (this.background || this.fenced || this.closed) return;
    this.background = this.flush()
      .catch(() => undefined)
      .finally(() => (this.background = undefined));
  }

  /**
   * Zeroes a range; whole blocks become holes once folded, unless `noHole`. A record per block: a
   * range of any length (4 GiB in one NBD request, a whole-device discard from the kernel) is
   * staged a batch at a time, each waiting for room in the write cache, with the event loop
   * running between batches. Staged at once, one 4 GiB zeroing of 4 KiB blocks held 770 MiB
   * against a 1 MiB write cache and stopped the process for 14 s.
   */
  async writeZeroes(offset: number, length: number, opts: { noHole?: boolean; fua?: boolean } = {}): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, length);
    const type = opts.noHole ? RecordType.Zero : RecordType.Trim;
    const batch = Math.max(1, Math.floor(this.o.writeCacheBytes / 4 / RECORD_COST)) * this.blockSize;
    for (let at = offset, end = offset + length; at < end; ) {
      const n = Math.min(batch, end - at);
      await this.roomInCache((Math.ceil(n / this.blockSize) + 1) * RECORD_COST);
      this.stage(type, at, n, undefined, false);
      at += n;
      if (at < end) await new Promise<void>((resolve) => setImmediate(resolve));
    }
    await this.afterWrite(opts.fua ?? false);
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.writeZeroes(offset, length);
  }

  // ---- flush: the journal ----

  /** Makes every write completed before the call durable: one journal append per replica. */
  async flush(): Promise<void> {
    if (this.readOnly) return;
    this.checkWritable();
    // Flushes run one at a time. A caller arriving while one runs needs the next (its writes
    // may have missed the running one); callers arriving before that next one starts share it.
    if (this.queuedFlush) return this.queuedFlush;
    const next = this.flushChain.then(() => {
      this.queuedFlush = undefined;
      return this.doFlush();
    });
    this.queuedFlush = next;
    this.flushChain = next.catch(() => undefined);
    return next;
  }

  private async doFlush(): Promise<void> {
    if (this.fenced) throw this.fenced;
    const j = this.journal!;
    if (!j.roomFor(this.pending.length)) this.journalBroken = true;
    if (this.journalBroken) await this.moveJournal();
    else if (this.journalMisplaced) await this.followRingNow(j);
    else await this.roomInTail(sumBytes(this.pending));
    const entries = this.takePending();
    if (entries.length === 0) return;
    this.flushingBytes = pendingCost(entries);
    try {
      await this.appendEntries(j, entries);
    } finally {
      this.flushingBytes = 0;
    }
    this.stats.flushes++;
    const bytes = sumBytes(entries);
    this.tailBytes += bytes;
    this.stats.journalBytes += bytes;
    if (this.tailBytes >= this.o.checkpointBytes) this.checkpointInBackground();
    this.foldIfCrowded(entries);
  }

  /**
   * A flush that failed with nothing of it in the journal: its writes stay pending, and the next
   * flush, which covers every write completed before it, takes them.
   */
  private putBack(entries: readonly TailEntry[]): void {
    this.pending = entries.concat(this.pending);
    this.pendingBytes += pendingCost(entries);
  }

  /** Stores a flush's whole blocks, then appends its records. */
  private async appendEntries(j: JournalWriter, entries: readonly TailEntry[]): Promise<void> {
    try {
      await this.storeWholeBlocks(j, entries);
    } catch (err) {
      this.putBack(entries);
      throw err;
    }
    // The whole blocks' bytes are on their replicas now; what is left waits for the append.
    this.flushingBytes = pendingCost(entries);
    try {
      await j.append(entries);
    } catch (err) {
      if (isTorusError(err, 'LOCKED')) throw (this.fenced ??= err);
      if (!(err instanceof JournalReplicaError)) {
        // Refused before it handed out LSNs (append checks first): not in the tail either.
        if (entries[0]!.rec.lsn === 0) this.putBack(entries);
        throw err;
      }
      // A replica failed: nothing of this flush is acknowledged until the journal has moved to
      // replicas that work (the whole tail goes with it) and etcd names them.
      this.journalBroken = true;
      await this.moveJournal();
    }
  }

  /**
   * Stores the whole blocks of Block records as data blocks of their own, durable on R replicas,
   * before any record naming them is appended: a replayed record never names a block that is
   * not there. Then their bytes need not stay in memory.
   */
  private async storeWholeBlocks(j: JournalWriter, entries: readonly TailEntry[]): Promise<void> {
    const todo = entries.filter((e) => e.rec.type === RecordType.Block && !e.src.block);
    if (todo.length === 0) return;
    const blocks = todo.map((e) => ({ ref: j.allocDirect(), crc: crc32c(e.rec.data!) >>> 0 }));
    // Every put settles before the outcome counts: a put still running after another failed
    // must not change the entries the next flush takes up again.
    const settled = await Promise.allSettled(todo.map((e, i) => this.ctx.store.putBlock(blocks[i]!.ref, e.rec.data!, { immutable: true, crc: blocks[i]!.crc })));
    const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    try {
      if (failed) throw failed.reason;
      await this.ctx.store.flush();
    } catch (err) {
      for (const b of blocks) j.releaseDirect(b.ref);
      throw err;
    }
    todo.forEach((e, i) => {
      e.src.block = blocks[i]!;
      (e as { rec: JournalRecord }).rec = { type: RecordType.Block, lsn: e.rec.lsn, offset: e.rec.offset, length: e.rec.length, block: blocks[i]! };
      e.src.data = undefined;
    });
  }

  private moveJournal(): Promise<void> {
    return this.exclusive(async () => {
      if (!this.journalBroken && !this.journalMisplaced) return;
      const j = this.journal!;
      await j.moveTo();
      // The commit claims this session's current epoch, which blocks written since the last
      // checkpoint carry (folds, the tree pages of BLOCK records applied by a checkpoint that
      // failed): GC keeps such blocks only while their epoch is above the head's, so the tree
      // that names them goes into this commit too. The runs stay as they were: overlays older
      // than a fold, read over the folded block, give the same bytes.
      await this.commitHead({ ...this.headFields(), ...(await this.storeTree()), journal: j.position });
      this.journalBroken = false;
      this.journalMisplaced = false;
      this.stats.journalMoves++;
    });
  }

  /**
   * Moves a journal whose replicas all work but that the ring now places elsewhere. If no
   * segment can be had, the journal stays where it is and the flush goes on there; if the move
   * failed half way (the writer already appends to the new segment), it is broken like any.
   */
  private async followRingNow(j: JournalWriter): Promise<void> {
    const before = j.position.segment;
    try {
      await this.moveJournal();
    } catch (err) {
      if (isTorusError(err, 'LOCKED')) throw err;
      if (j.position.segment !== before) {
        this.journalBroken = true;
        await this.moveJournal();
      } else {
        this.journalMisplaced = false;
      }
    }
  }

  /**
   * A node added, drained or removed can change the owners of the journal's segment. The open
   * log blocks are the writer's (the rebalancer never moves them), so the writer moves the journal
   * to where the ring now puts it: otherwise a node being drained would keep them for good.
   * Through the flush chain, which keeps appends one at a time.
   */
  private followRing(): void {
    if (this.fenced || this.closed || this.readOnly || this.ringMove || this.journalBroken || !this.journal?.misplaced()) return;
    this.journalMisplaced = true;
    this.ringMove = this.flush()
      .catch(() => undefined)
      .finally(() => (this.ringMove = undefined));
  }

  /** Runs `fn` alone among checkpoints, folds and journal moves. */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.control.then(fn);
    this.control = run.catch(() => undefined);
    return run;
  }

  private allocRef(type: BlockType): BlockRef {
    return { type, volume: this.record.id, inode: this.lock!.epoch, index: this.nextIndex++ };
  }

  /** Commits a head, fenced by the lock; a lost lock fences the volume. */
  private async commitHead(head: Omit<Head, 'epoch'>, extra?: ExtraOps): Promise<void> {
    const lock = this.lock!;
    try {
      await this.ctx.meta.commit(lock, head, extra);
    } catch (err) {
      if (isTorusError(err, 'LOCKED')) this.fenced ??= err;
      throw err;
    }
    this.committed = { ...head, epoch: lock.epoch - 1 };
    this.nextIndex = 1;
  }

  // ---- checkpoints ----

  /**
   * Makes room for `cost` more bytes in the journal tail before a flush appends them: a
   * checkpoint (the one running, then one that cuts the whole tail) moves the tail's bytes into
   * sealed log blocks. A checkpoint that fails does not stop flushes, which durability needs
   * more than the budget; the next flush tries again.
   */
  private async roomInTail(cost: number): Promise<void> {
    for (let i = 0; i < 2 && this.tailBytes > 0 && this.tailBytes + cost > this.o.journalTailBytes; i++) {
      this.checkpointInBackground();
      await this.checkpointRunning;
    }
  }

  private checkpointInBackground(): void {
    if (this.checkpointRunning || this.fenced || this.closed || this.readOnly) return;
    this.checkpointRunning = this.checkpoint()
      .catch(() => undefined)
      .finally(() => (this.checkpointRunning = undefined));
  }

  /**
   * Makes the journal's tail up to now permanent without it: seals its log blocks, stores an
   * overlay run naming them (and the pages of folds), and commits the head whose journal starts
   * after the cut. Flushes go on meanwhile, into the blocks after the cut.
   */
  checkpoint(): Promise<void> {
    return this.exclusive(() => this.doCheckpoint());
  }

  private async doCheckpoint(opts: { final?: boolean; extra?: ExtraOps; compact?: boolean } = {}): Promise<void> {
    if (this.fenced) throw this.fenced;
    if (this.journalBroken) throw new TorusError('NO_PEER', `volume ${this.name}: the journal lost a replica and could not move yet`);
    const j = this.journal!;
    const cut = await j.cut();
    const bs = this.blockSize;
    const runEntries: RunEntry[] = [];
    let size = this.committed.size;
    // A cut holds up to checkpointBytes of small writes (tens of thousands of records): the walks
    // over it pause, so that the flushes running meanwhile are not held up behind them.
    const y = new Yielder();
    for (const e of cut.entries) {
      if (y.due()) await y.pause();
      const r = e.rec;
      if (r.type === RecordType.Resize) {
        size = r.offset;
        continue;
      }
      if (r.type === RecordType.Block) {
        const reset = await this.applyBlockRecord(e);
        if (reset) runEntries.push(reset);
        continue;
      }
      const index = Math.floor(r.offset / bs);
      const start = r.offset - index * bs;
      if (r.type === RecordType.Data) {
        const log = e.src.log!;
        const crc = j.sealedCrc.get(logKeyOf(log));
        if (crc === undefined) throw new TorusError('INTERNAL', `volume ${this.name}: log block ${log.index} is not sealed at a checkpoint`);
        e.src.log = { volume: log.volume, epoch: log.epoch, index: log.index, at: log.at, crc };
        runEntries.push({ kind: 'log', index, lsn: r.lsn, start, length: r.length, log: { volume: log.volume, epoch: log.epoch, index: log.index, crc }, logOffset: log.at });
      } else runEntries.push({ kind: r.type === RecordType.Trim ? ('trim' as const) : ('zero' as const), index, lsn: r.lsn, start, length: r.length });
    }
    for (const r of this.resets) runEntries.push({ kind: 'reset', index: r.index, lsn: r.lsn });
    const resets = this.resets.length;
    // A long chain becomes one run of the overlays as they now are: loading stays short, and the
    // log blocks only older pages named become garbage.
    const compact = opts.compact === true || this.chainPages + Math.ceil(runEntries.length / 1000) > this.o.maxRunChain;
    const entries = compact ? await overlayEntries(await this.chainOverlays(this.committed.runs ?? null, runEntries, y), y) : runEntries;
    let prev = compact ? null : (this.committed.runs ?? null);
    const puts: Promise<void>[] = [];
    let chain = compact ? 0 : this.chainPages;
    // No entries: no page (a compaction of no overlays leaves no chain at all).
    if (entries.length > 0) {
      const pages = pageEntries(entries, bs);
      for (const [i, p] of pages.entries()) {
        if (y.due(p.length)) await y.pause();
        const buf = encodeRunPage({ prev, base: compact && i === 0, entries: p }, bs);
        const ptr: Pointer = { ref: this.allocRef(BlockType.Run), crc: crc32c(buf) >>> 0 };
        const put = this.ctx.store.putBlock(ptr.ref, buf, { immutable: true, crc: ptr.crc });
        put.catch(() => undefined);
        puts.push(put);
        prev = ptr;
        chain++;
      }
    }
    const { root, depth, stored } = await this.tree.commit((t) => this.allocRef(t));
    stored.catch(() => undefined);
    puts.push(stored);
    const settled = await Promise.allSettled(puts);
    const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    await this.ctx.store.flush();
    const { directStart: _, ...pos } = j.position;
    const journal = opts.final ? null : { ...pos, start: cut.start, ...(cut.directStart ? { directStart: cut.directStart } : {}) };
    await this.commitHead({ root, depth, size, runs: prev, lsn: cut.lsn, journal }, opts.extra);
    j.trimmed(cut.entries.length, cut.start, cut.directStart);
    // The tail's bytes are in sealed log blocks now: reads go there.
    for (const e of cut.entries) e.src.data = undefined;
    this.resets.splice(0, resets);
    this.tailBytes = Math.max(0, this.tailBytes - sumBytes(cut.entries));
    this.chainPages = chain;
    this.stats.checkpoints++;
    if (compact) this.stats.compactions++;
  }

  // ---- folds ----

  private folding = false;
  /** Bytes written into each block index since this session last folded it. */
  private readonly writtenSinceFold = new Map<number, number>();

  /**
   * Picks the blocks a flush made worth folding: written into foldAfter times their size since
   * the last fold (so a fold's whole-block write is paid for by that much written), split into
   * more overlay segments than a read should gather, or wholly trimmed (a fold then only drops the
   * block from the tree, and the space comes back). Folding any earlier is what made write
   * amplification 32-64 before the journal.
   */
  private foldIfCrowded(entries: readonly TailEntry[]): void {
    const bs = this.blockSize;
    const crowded = new Set<number>();
    for (const e of entries) {
      const r = e.rec;
      // A whole block stored as a block of its own needs no fold: the checkpoint takes it as is.
      if (r.type === RecordType.Resize || r.type === RecordType.Block) continue;
      for (let off = r.offset, end = r.offset + r.length; off < end; ) {
        const index = Math.floor(off / bs);
        const n = Math.min(end, (index + 1) * bs) - off;
        const written = (this.writtenSinceFold.get(index) ?? 0) + n;
        this.writtenSinceFold.set(index, written);
        if (written >= this.o.foldAfter * bs || (n === bs && r.type === RecordType.Trim) || this.overlay.segments(index).length > this.o.maxSegmentsPerBlock)
          crowded.add(index);
        off += n;
      }
    }
    if (this.overlay.size > this.o.maxOverlaySegments) {
      const most = this.overlay
        .indexes()
        .map((i) => [i, this.overlay.segments(i).length] as const)
        .sort((a, b) => b[1] - a[1]);
      let drop = this.overlay.size - Math.floor((this.o.maxOverlaySegments * 3) / 4);
      for (const [i, n] of most) {
        if (drop <= 0) break;
        crowded.add(i);
        drop -= n;
      }
    }
    if (crowded.size > 0) this.foldInBackground([...crowded]);
  }

  /** Blocks waiting for a background fold, in the order they were asked for. */
  private readonly foldQueue = new Set<number>();

  private foldInBackground(indexes: Iterable<number>): void {
    if (this.fenced || this.closed || this.readOnly) return;
    for (const i of indexes) this.foldQueue.add(i);
    if (this.folding) return;
    this.folding = true;
    void (async () => {
      try {
        for (const i of this.foldQueue) {
          if (this.fenced || this.closed) break;
          this.foldQueue.delete(i);
          await this.exclusive(() => this.foldBlock(i));
        }
        // The folds reach etcd with the next checkpoint (by size or time), not one per batch:
        // each checkpoint cuts the open log block (its rest is sealed as padding) and writes
        // tree and run pages of a whole block each, which at 512 KiB blocks cost more than the
        // folds. Only a backlog large enough to matter for memory is checkpointed at once.
        if (this.resets.length >= FOLD_CHECKPOINT_BACKLOG) await this.checkpoint();
      } catch {
        // A fold that failed leaves the overlays in place; the block's next write asks again.
      } finally {
        this.folding = false;
      }
    })();
  }

  /**
   * Rewrites block `index` whole from its base and overlays, as a new data block (or a hole when
   * it is all zeros); the overlays it took in are dropped, and the next checkpoint records that.
   */
  private async foldBlock(index: number): Promise<void> {
    const segs = this.overlay.segments(index);
    // A whole block stored as a block of its own, nothing over it: the checkpoint makes it the
    // tree's without a copy.
    if (segs.length === 1 && segs[0]!.src.block && segs[0]!.start === 0 && segs[0]!.end === this.blockSize) return;
    // A write not yet journaled stays out of a fold. Folded, it would reach the next checkpoint
    // (or snapshot) without the flushed writes before it: a crash or a snapshot would then show a
    // later write without earlier ones. The flush that journals it asks for the fold again.
    if (segs.some((s) => !Number.isFinite(s.src.lsn))) return;
    let lsn = -1;
    for (const s of segs) if (s.src.lsn > lsn) lsn = s.src.lsn;
    if (lsn < 0 || index * this.blockSize >= this.sizeBytes) return;
    // All zeros becomes a hole, unless a WRITE_ZEROES asked to keep it allocated (NO_HOLE).
    const keep = this.overlay.segments(index).some((s) => s.src.zero && !s.src.hole);
    // Read once, as a stream's blocks are: not worth a place in the read cache.
    const data = Buffer.from(await this.readBlockPart(index, 0, this.blockSize, true));
    let ptr: Pointer | null = null;
    if (keep || !data.every((b) => b === 0)) {
      ptr = { ref: this.allocRef(BlockType.Data), crc: crc32c(data) >>> 0 };
      await this.ctx.store.putBlock(ptr.ref, data, { immutable: true, crc: ptr.crc });
    }
    await this.tree.set(index, ptr);
    this.overlay.reset(index, lsn);
    this.resets.push({ index, lsn });
    this.writtenSinceFold.delete(index);
    this.stats.folds++;
  }

  /** Folds every block with overlays into whole blocks now, then checkpoints (tests, tools). */
  async foldAll(): Promise<void> {
    this.checkWritable();
    await this.flush();
    for (const i of this.overlay.indexes()) await this.exclusive(() => this.foldBlock(i));
    // A compacted chain: the log blocks the folds emptied become garbage at once.
    await this.exclusive(() => this.doCheckpoint({ compact: true }));
  }

  // ---- snapshots requested while mounted ----

  /**
   * Snapshots asked for through etcd while this writer holds the volume: one checkpoint, and the
   * head and every requested snapshot in its transaction.
   */
  private async takeRequestedSnapshots(): Promise<void> {
    if (this.fenced || this.closed) return;
    const names = await this.ctx.meta.pendingSnapshotRequests(this.record.id);
    if (names.length === 0) return;
    await this.flush();
    await this.exclusive(() => this.doCheckpoint({ extra: (head) => this.ctx.meta.snapshotOps(this.record.id, names, head) }));
    this.stats.snapshotsTaken += names.length;
  }

  // ---- shape ----

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.checkRange(offset, length);
    if (length === 0) return [{ length: 0, hole: true, zero: true }];
    const bs = this.blockSize;
    const first = Math.floor(offset / bs);
    // Enough for any client; NBD lets a reply cover less than was asked.
    const last = Math.min(Math.ceil((offset + length) / bs), first + 65536);
    const alloc: { index: number; length: number; allocated: boolean }[] = [];
    await this.tree.runs(first, last - first, (index, n, allocated) => alloc.push({ index, length: n, allocated }));
    const perBlock = (i: number, base: boolean): boolean => {
      const segs = this.overlay.segments(i);
      if (segs.some((s) => !s.src.hole)) return true;
      // Trimmed whole: a hole to the client, whatever the base (a fold drops it).
      let covered = 0;
      for (const s of segs) covered += s.end - s.start;
      return base && covered < bs;
    };
    const out: Extent[] = [];
    const push = (start: number, end: number, allocated: boolean): void => {
      const s = Math.max(start, offset);
      const e = Math.min(end, offset + length, this.sizeBytes);
      if (e <= s) return;
      const prev = out[out.length - 1];
      if (prev && prev.hole === !allocated) out[out.length - 1] = { ...prev, length: prev.length + (e - s) };
      else out.push({ length: e - s, hole: !allocated, zero: !allocated });
    };
    const overlaid = new Set(this.overlay.indexes().filter((i) => i >= first && i < last));
    for (const run of alloc) {
      if (overlaid.size === 0) {
        push(run.index * bs, (run.index + run.length) * bs, run.allocated);
        continue;
      }
      for (let i = run.index; i < run.index + run.length; i++) push(i * bs, (i + 1) * bs, perBlock(i, run.allocated));
    }
    return out.length > 0 ? out : [{ length, hole: true, zero: true }];
  }

  /** Grows (or, with allowShrink, shrinks) the volume; durable after the next flush. */
  async resize(newSize: number, allowShrink = false): Promise<void> {
    this.checkWritable();
    checkVolumeSize(newSize);
    if (newSize < this.sizeBytes) {
      if (!allowShrink) throw new TorusError('INVALID_ARGUMENT', `shrinking volume ${this.name} from ${this.sizeBytes} to ${newSize} bytes loses data: pass --allow-shrink`);
      // What lies beyond the new end reads as zeros if the volume grows again.
      this.stage(RecordType.Trim, newSize, this.sizeBytes - newSize, undefined, false);
    }
    this.stageResize(newSize);
  }

  /**
   * Rolls an unmounted volume back to a snapshot: opened for writing first, so a writer that left
   * a journal tail is fenced out (and its tail discarded with the rest of the current state), then
   * the snapshot's tree and runs are committed with a journal in a fresh segment.
   */
  static async restore(ctx: VolumeContext, name: string, snap: string): Promise<void> {
    const { snapshot } = await ctx.meta.getSnapshot(name, snap);
    const v = await BlockVolume.open(ctx, name, { snapshotPollMs: 0, checkpointIntervalMs: 0, foldIdleMs: 0 });
    try {
      await v.exclusive(async () => {
        const h = snapshot.head;
        await v.journal!.restart();
        v.pending = [];
        v.pendingBytes = 0;
        v.tailBytes = 0;
        v.resets = [];
        v.overlay.truncate(0);
        v.sizeBytes = h.size;
        await v.commitHead({ root: h.root, depth: h.depth, size: h.size, runs: h.runs ?? null, lsn: v.journal!.lsn, journal: v.journal!.position });
        v.tree = v.newTree(v.committed);
        await v.loadRuns(h.runs ?? null);
      });
    } finally {
      await v.close();
    }
  }

  /** Flushes, checkpoints (so readers and the next writer need no replay) and releases the lock. */
  async close(): Promise<void> {
    if (this.closed) return;
    for (const t of this.timers) clearInterval(t);
    try {
      if (!this.readOnly && !this.fenced) {
        await this.flush();
        await this.exclusive(() => this.doCheckpoint({ final: true }));
      }
    } finally {
      this.closed = true;
      this.unwatchLease?.();
      if (this.lock) await this.ctx.meta.unlock(this.lock).catch(() => undefined);
      // A hold left behind (etcd unreachable) goes with the reader's lease.
      if (this.held !== undefined) await this.ctx.meta.letGo(this.record.id, this.held).catch(() => undefined);
    }
  }
}

/** Applies a run entry to an overlay index (loading a chain, or rebuilding it for a compaction). */
function applyRunEntry(e: RunEntry, ov: OverlayIndex): void {
  if (e.kind === 'reset') {
    ov.reset(e.index, e.lsn);
    return;
  }
  const src: Source =
    e.kind === 'zero' || e.kind === 'trim'
      ? { lsn: e.lsn, zero: true, hole: e.kind === 'trim', data: undefined, log: undefined }
      : { lsn: e.lsn, zero: false, data: undefined, log: { volume: e.log.volume, epoch: e.log.epoch, index: e.log.index, at: e.logOffset, crc: e.log.crc } };
  ov.insert(e.index, e.start, e.start + e.length, src, 0);
}

/** The overlays as they are, as the entries of a compacted run. */
async function overlayEntries(ov: OverlayIndex, y: Yielder): Promise<RunEntry[]> {
  const out: RunEntry[] = [];
  for (const index of ov.indexes().sort((a, b) => a - b)) {
    if (y.due()) await y.pause();
    for (const s of ov.segments(index)) {
      const length = s.end - s.start;
      if (s.src.zero) out.push({ kind: s.src.hole ? ('trim' as const) : ('zero' as const), index, lsn: s.src.lsn, start: s.start, length });
      else {
        const l = s.src.log!;
        out.push({ kind: 'log', index, lsn: s.src.lsn, start: s.start, length, log: { volume: l.volume, epoch: l.epoch, index: l.index, crc: l.crc! }, logOffset: l.at + s.at });
      }
    }
  }
  return out;
}

/** What pending entries hold, as the write cache counts it. */
function pendingCost(entries: readonly TailEntry[]): number {
  let n = 0;
  for (const e of entries) n += e.rec.data?.length ?? RECORD_COST;
  return n;
}

/**
 * What entries weigh in the journal tail: the bytes of small writes, which stay in memory until a
 * checkpoint; a whole block's bytes are stored before its record is appended.
 */
function sumBytes(entries: readonly TailEntry[]): number {
  let n = 0;
  for (const e of entries) n += e.rec.type === RecordType.Data ? e.rec.length : 64;
  return n;
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}
