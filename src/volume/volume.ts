import { crc32c } from '@node-rs/crc32';
import { TorusError, isTorusError } from '../core/errors.js';
import { BlockType, type BlockRef } from '../core/ids.js';
import type { BlockDevice, Extent, KVSession } from '../core/interfaces.js';
import { InodeTree, type VolumeBlockStore } from './inode.js';
import type { VolumeLock, VolumeMeta } from './meta.js';
import { checkVolumeSize, type Head, type Pointer, type VolumeRecord } from './records.js';

// A block volume: a byte-addressable disk over immutable blocks. Writes land in memory (whole
// blocks, read-modify-write); a sync (NBD FLUSH, FUA, close, or memory pressure) stores the
// changed blocks on their replicas, writes the changed inode pages, flushes, and only then moves
// the head in etcd with a transaction fenced by the volume lock. A crash at any point leaves the
// volume exactly as of the last successful sync.

/** Blocks a sync hands to the distributor between two turns of the event loop. */
const SYNC_YIELD_BLOCKS = 64;

export interface OpenVolumeOptions {
  readonly readOnly?: boolean;
  /** Open this snapshot's state, read-only. */
  readonly snapshot?: string;
  /** Dirty data held in memory before a write forces a sync. */
  readonly writeCacheBytes?: number;
  /** Inode pages cached in memory. */
  readonly pageCacheBytes?: number;
}

export interface VolumeContext {
  readonly meta: VolumeMeta;
  readonly store: VolumeBlockStore;
  /** The process's lease; needed to open for writing. */
  readonly session?: KVSession;
}

export class BlockVolume implements BlockDevice {
  readonly blockSize: number;
  readonly readOnly: boolean;
  readonly name: string;
  private sizeBytes: number;
  private tree: InodeTree;
  /** Changed blocks since the last sync: a whole-block buffer, or null for a hole. */
  private dirty = new Map<number, Buffer | null>();
  /** The blocks a sync in progress is writing; consulted so concurrent writes see them. */
  private syncing = new Map<number, Buffer | null>();
  private dirtyBytes = 0;
  private loading = new Map<number, { changes: ((buf: Buffer) => void)[]; done: Promise<void> }>();
  private committed: Head;
  private nextIndex = 1;
  private syncChain: Promise<void> = Promise.resolve();
  private queuedSync: Promise<void> | undefined;
  private background: Promise<void> | undefined;
  private fenced: TorusError | undefined;
  /**
   * Data blocks a sync stored and flushed before its etcd commit failed, by index: durable, kept
   * by GC (their epoch is above the head's), so the retry points at them again instead of storing
   * the same bytes once more. Without this, every retry during an etcd outage stored the whole
   * dirty set again, and the garbage could fill the cluster before the writer gave up.
   */
  private storedUncommitted: Map<number, Pointer & { readonly buf: Buffer }> | undefined;
  private closed = false;
  private readonly writeCacheBytes: number;
  syncs = 0;
  pagesWritten = 0;

  private constructor(
    private readonly ctx: VolumeContext,
    readonly record: VolumeRecord,
    head: Head,
    private readonly lock: VolumeLock | undefined,
    private readonly opts: OpenVolumeOptions,
  ) {
    this.name = record.name;
    this.blockSize = ctx.store.blockSize;
    this.readOnly = !lock;
    this.sizeBytes = head.size;
    this.committed = head;
    this.tree = this.newTree(head);
    this.writeCacheBytes = opts.writeCacheBytes ?? 128 * 1024 * 1024;
    lock?.session.onLost(() => {
      this.fenced ??= new TorusError('LOCKED', `lost the lock on volume ${this.name}: the etcd lease expired; writes and flushes now fail`);
    });
  }

  private newTree(head: Head): InodeTree {
    const tree = new InodeTree(this.ctx.store, head, this.opts.pageCacheBytes);
    // A head written before a resize, or by create (which knows no block size), may be shallower
    // than the size needs.
    tree.grow(Math.max(1, Math.ceil(this.sizeBytes / this.blockSize)));
    return tree;
  }

  static async open(ctx: VolumeContext, name: string, opts: OpenVolumeOptions = {}): Promise<BlockVolume> {
    if (opts.snapshot !== undefined) {
      const { volume, snapshot } = await ctx.meta.getSnapshot(name, opts.snapshot);
      return new BlockVolume(ctx, volume, snapshot.head, undefined, opts);
    }
    const record = await ctx.meta.get(name);
    if (opts.readOnly) {
      const { head } = await ctx.meta.head(record.id);
      return new BlockVolume(ctx, record, head, undefined, opts);
    }
    if (!ctx.session) throw new TorusError('INTERNAL', 'opening a volume for writing needs an etcd session');
    const lock = await ctx.meta.lock(name, ctx.session);
    try {
      const { head } = await ctx.meta.head(record.id);
      return new BlockVolume(ctx, record, head, lock, opts);
    } catch (err) {
      await ctx.meta.unlock(lock).catch(() => undefined);
      throw err;
    }
  }

  get size(): number {
    return this.sizeBytes;
  }

  /** The head of the last successful sync. */
  get head(): Head {
    return this.committed;
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

  // ---- reads ----

  private async readBlockPart(index: number, start: number, length: number): Promise<Buffer> {
    const d = this.dirty.has(index) ? this.dirty.get(index) : this.syncing.get(index);
    if (d !== undefined) return d ? Buffer.from(d.subarray(start, start + length)) : Buffer.alloc(length);
    const ptr = await this.tree.get(index);
    if (!ptr) return Buffer.alloc(length);
    if (start === 0 && length === this.blockSize) return this.ctx.store.getBlock(ptr.ref, ptr.crc);
    return this.ctx.store.readRange(ptr.ref, start, length, ptr.crc);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (this.closed) throw new TorusError('CLOSED', `volume ${this.name} is closed`);
    this.checkRange(offset, length);
    // Within one block the piece itself is the answer: no buffer to allocate and fill. It may be
    // a view of the block cache, which is why BlockDevice.read's result is read-only.
    const index = Math.floor(offset / this.blockSize);
    const start = offset - index * this.blockSize;
    if (start + length <= this.blockSize) return this.readBlockPart(index, start, length);
    return Buffer.concat(await this.readPieces(offset, length), length);
  }

  async readv(offset: number, length: number): Promise<readonly Buffer[]> {
    if (this.closed) throw new TorusError('CLOSED', `volume ${this.name} is closed`);
    this.checkRange(offset, length);
    return this.readPieces(offset, length);
  }

  private readPieces(offset: number, length: number): Promise<Buffer[]> {
    return Promise.all(Array.from(this.pieces(offset, length), ({ index, start, n }) => this.readBlockPart(index, start, n)));
  }

  // ---- writes ----

  /**
   * Applies `change` to the block's dirty buffer. Without one, the block's current bytes are
   * loaded first; writers arriving meanwhile queue behind the same load. Every change is applied
   * synchronously at the moment the buffer enters the dirty map, so a sync, which swaps the map
   * out only when no load is in flight, never takes a buffer someone is about to modify.
   */
  private modifyBlock(index: number, change: (buf: Buffer) => void): Promise<void> | undefined {
    const d = this.dirty.get(index);
    if (d) {
      change(d);
      return undefined;
    }
    const pending = this.loading.get(index);
    if (pending) {
      pending.changes.push(change);
      return pending.done;
    }
    const entry: { changes: ((buf: Buffer) => void)[]; done: Promise<void> } = { changes: [change], done: Promise.resolve() };
    this.loading.set(index, entry);
    entry.done = (async () => {
      try {
        const base = this.dirty.has(index) ? this.dirty.get(index) : this.syncing.get(index);
        let buf: Buffer;
        if (base === null) buf = Buffer.alloc(this.blockSize);
        else if (base) buf = Buffer.from(base);
        else {
          const ptr = await this.tree.get(index);
          buf = ptr ? Buffer.from(await this.ctx.store.getBlock(ptr.ref, ptr.crc)) : Buffer.alloc(this.blockSize);
        }
        // A whole-block write may have replaced the block while we loaded; it is newer than
        // what we loaded, and the queued changes came after it.
        const now = this.dirty.get(index);
        if (now) buf = now;
        else {
          this.dirty.set(index, buf);
          this.dirtyBytes += this.blockSize;
        }
        for (const c of entry.changes) c(buf);
      } finally {
        this.loading.delete(index);
      }
    })();
    return entry.done;
  }

  private setWhole(index: number, buf: Buffer | null): void {
    const prev = this.dirty.get(index);
    if (prev) this.dirtyBytes -= this.blockSize;
    this.dirty.set(index, buf);
    if (buf) this.dirtyBytes += this.blockSize;
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

  async write(offset: number, data: Uint8Array, fua = false, adopt = false): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, data.length);
    const waits: Promise<void>[] = [];
    for (const { index, start, n, at } of this.pieces(offset, data.length)) {
      const src = data.subarray(at, at + n);
      // An adopted whole block is kept as it is: it becomes the dirty block and, at the sync, the
      // block the replicas receive and the cache keeps, with no copy on the way.
      if (n === this.blockSize && !this.loading.has(index)) this.setWhole(index, adopt ? Buffer.from(src.buffer, src.byteOffset, n) : Buffer.from(src));
      else {
        const w = this.modifyBlock(index, (buf) => buf.set(src, start));
        if (w) waits.push(w);
      }
    }
    await Promise.all(waits);
    if (fua || this.dirtyBytes >= this.writeCacheBytes) await this.flush();
    else if (this.dirtyBytes >= this.writeCacheBytes / 2) this.syncInBackground();
  }

  /**
   * Starts a sync nobody waits for, so a steady writer rarely meets a full write cache and the
   * stall of a sync of all of it. Its failure is not lost: the data stays dirty (see sync) and the
   * next flush, which someone does wait for, retries it and reports.
   */
  private syncInBackground(): void {
    if (this.background || this.fenced || this.closed) return;
    this.background = this.flush()
      .catch(() => undefined)
      .finally(() => (this.background = undefined));
  }

  /** Zeroes a range; whole blocks become holes (free after GC) unless `noHole`. */
  async writeZeroes(offset: number, length: number, opts: { noHole?: boolean; fua?: boolean } = {}): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, length);
    const waits: Promise<void>[] = [];
    for (const { index, start, n } of this.pieces(offset, length)) {
      if (n === this.blockSize && !this.loading.has(index)) this.setWhole(index, opts.noHole ? Buffer.alloc(this.blockSize) : null);
      else {
        const w = this.modifyBlock(index, (buf) => buf.fill(0, start, start + n));
        if (w) waits.push(w);
      }
    }
    await Promise.all(waits);
    if (opts.fua) await this.flush();
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.writeZeroes(offset, length);
  }

  // ---- sync ----

  /** Makes every write completed before the call durable, then advances the head. */
  async flush(): Promise<void> {
    if (this.readOnly) return;
    this.checkWritable();
    // Syncs run one at a time. A caller arriving while one runs needs the next (its writes
    // may have missed the running one); callers arriving before that next one starts share it.
    if (this.queuedSync) return this.queuedSync;
    const next = this.syncChain.then(() => {
      this.queuedSync = undefined;
      return this.sync();
    });
    this.queuedSync = next;
    this.syncChain = next.catch(() => undefined);
    return next;
  }

  private allocRef(type: BlockType): BlockRef {
    return { type, volume: this.record.id, inode: this.lock!.epoch, index: this.nextIndex++ };
  }

  private async sync(): Promise<void> {
    if (this.fenced) throw this.fenced;
    const resized = this.sizeBytes !== this.committed.size;
    if (this.dirty.size === 0 && !resized && !this.tree.dirty) return;
    const lock = this.lock!;
    // No load may be in flight when the map is taken (see modifyBlock).
    while (this.loading.size > 0) await Promise.all([...this.loading.values()].map((l) => l.done.catch(() => undefined)));
    this.syncing = this.dirty;
    this.dirty = new Map();
    this.dirtyBytes = 0;
    const taken = this.syncing;
    const puts: Promise<void>[] = [];
    const reusable = this.storedUncommitted;
    this.storedUncommitted = undefined;
    /** This attempt's data blocks, for the next one should only the commit fail. */
    const attempt = new Map<number, Pointer & { readonly buf: Buffer }>();
    let flushed = false;
    try {
      // Data blocks and inode pages all go out at once: a page needs only its children's refs
      // and CRCs, known before their puts complete. Every SYNC_YIELD_BLOCKS the loop lets the event
      // loop run: awaiting resolved promises never does, so without it a big sync would queue all
      // of its puts before the first byte left, and stall every other request meanwhile.
      let sinceYield = 0;
      for (const [index, buf] of taken) {
        if (++sinceYield === SYNC_YIELD_BLOCKS) {
          sinceYield = 0;
          await new Promise<void>((resolve) => setImmediate(resolve));
        }
        let ptr: Pointer | null = null;
        const prev = reusable?.get(index);
        // The same bytes (compared, not their CRC) as a block the failed attempt made durable.
        if (buf && prev && buf.equals(prev.buf)) {
          ptr = { ref: prev.ref, crc: prev.crc };
          attempt.set(index, prev);
        } else if (buf) {
          ptr = { ref: this.allocRef(BlockType.Data), crc: crc32c(buf) >>> 0 };
          // Immutable from here on: later writes to the block copy it (modifyBlock loads from
          // `syncing`), and a failed sync hands back copies (below).
          const put = this.ctx.store.putBlock(ptr.ref, buf, { immutable: true, crc: ptr.crc });
          // Handled now, judged at allSettled below: a put that fails while tree.set awaits a
          // page load must not be an unhandled rejection (Node would end the process).
          put.catch(() => undefined);
          puts.push(put);
          attempt.set(index, { ...ptr, buf });
        }
        await this.tree.set(index, ptr);
      }
      const { root, depth, pagesWritten, stored } = await this.tree.commit((t) => this.allocRef(t));
      stored.catch(() => undefined);
      puts.push(stored);
      const settled = await Promise.allSettled(puts);
      const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw failed.reason;
      await this.ctx.store.flush();
      flushed = true;
      const head = { root, depth, size: this.sizeBytes };
      await this.ctx.meta.commit(lock, head);
      this.committed = { ...head, epoch: lock.epoch - 1 };
      this.nextIndex = 1;
      this.syncs++;
      this.pagesWritten += pagesWritten;
    } catch (err) {
      // Puts still in flight when something else failed must not surface as unhandled.
      for (const p of puts) p.catch(() => undefined);
      // Start again from the last committed head, with every change since still dirty: the next
      // sync stores them all under fresh refs, so nothing half-written is ever referenced. (If
      // only the commit failed, it points unchanged blocks at this attempt's durable refs.)
      this.tree = this.newTree(this.committed);
      for (const [index, buf] of taken) {
        if (this.dirty.has(index)) continue;
        // A copy: dirty blocks change in place, and `buf` must stay as it was stored, for the
        // distributor's re-sending and for the next attempt's comparison (storedUncommitted).
        this.dirty.set(index, buf && Buffer.from(buf));
        if (buf) this.dirtyBytes += this.blockSize;
      }
      if (isTorusError(err, 'LOCKED')) this.fenced ??= err;
      // Only the commit failed: every block of this attempt is durable. The refs stay valid for
      // the next attempt because the epoch moves only with a commit.
      else if (flushed) this.storedUncommitted = attempt;
      throw err;
    } finally {
      this.syncing = new Map();
    }
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
    const overrides = new Map<number, boolean>();
    for (const m of [this.syncing, this.dirty]) for (const [i, b] of m) if (i >= first && i < last) overrides.set(i, b !== null);
    const perBlock = (i: number, base: boolean): boolean => overrides.get(i) ?? base;
    const out: Extent[] = [];
    const push = (start: number, end: number, allocated: boolean): void => {
      const s = Math.max(start, offset);
      const e = Math.min(end, offset + length, this.sizeBytes);
      if (e <= s) return;
      const prev = out[out.length - 1];
      if (prev && prev.hole === !allocated) out[out.length - 1] = { ...prev, length: prev.length + (e - s) };
      else out.push({ length: e - s, hole: !allocated, zero: !allocated });
    };
    for (const run of alloc) {
      if (overrides.size === 0) {
        push(run.index * bs, (run.index + run.length) * bs, run.allocated);
        continue;
      }
      for (let i = run.index; i < run.index + run.length; i++) push(i * bs, (i + 1) * bs, perBlock(i, run.allocated));
    }
    return out.length > 0 ? out : [{ length, hole: true, zero: true }];
  }

  /** Grows (or, with allowShrink, shrinks) the volume; durable after the next sync. */
  async resize(newSize: number, allowShrink = false): Promise<void> {
    this.checkWritable();
    checkVolumeSize(newSize);
    if (newSize < this.sizeBytes) {
      if (!allowShrink) throw new TorusError('INVALID_ARGUMENT', `shrinking volume ${this.name} from ${this.sizeBytes} to ${newSize} bytes loses data: pass --allow-shrink`);
      // Drop what lies beyond the new end so its blocks become garbage.
      await this.writeZeroes(newSize, this.sizeBytes - newSize);
      const lastBlock = Math.ceil(newSize / this.blockSize);
      for (const i of [...this.dirty.keys()]) if (i >= lastBlock) this.setWhole(i, null);
    } else {
      this.tree.grow(Math.ceil(newSize / this.blockSize));
    }
    this.sizeBytes = newSize;
  }

  /** Syncs and releases the lock. The volume is unusable afterwards. */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (!this.readOnly && !this.fenced) await this.flush();
    } finally {
      this.closed = true;
      if (this.lock) await this.ctx.meta.unlock(this.lock).catch(() => undefined);
    }
  }
}
