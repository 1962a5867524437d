import { crc32c } from '@node-rs/crc32';
import { TorusError } from '../core/errors.js';
import { BLOCK_REF_SIZE, BlockType, decodeBlockRef, encodeBlockRef, isZeroRef, type BlockRef } from '../core/ids.js';
import type { PutBlockOptions } from '../core/interfaces.js';
import { Yielder } from '../core/yielder.js';
import type { Head, Pointer } from './records.js';

// The inode: a volume's map from block index to the block holding it, kept as a copy-on-write
// radix tree of pages. Each page is one block (type INode) of 32-byte entries:
//
//   [0:24)  BlockRef of the child page (interior) or the data block (leaf); all zeros = hole
//   [24:28) CRC32C of the child's bytes, little-endian
//   [28:32) reserved, zero
//
// A tree of depth d addresses fanout^d blocks (fanout = blockSize / 32: 16384 at 512 KiB, so a
// 1 TiB volume is 128 leaves under one root). A sync writes the data blocks it changed, then only
// the pages on the paths to them, bottom-up, then the root pointer goes into the head in etcd.
// So a sync costs what was written, not what the volume holds (the original rewrote the whole
// inode on every sync). Pages are immutable once written, like every block; a changed page gets
// a new ref, and a page whose entries are all holes is not written at all.

export const ENTRY_SIZE = 32;

/** The part of the distributor the volume layer needs. */
export interface VolumeBlockStore {
  readonly blockSize: number;
  /** `opts.immutable`: the caller never modifies `data` again, so the store may keep it uncopied. */
  putBlock(ref: BlockRef, data: Uint8Array, opts?: PutBlockOptions): Promise<void>;
  /**
   * The whole block, checked against `crc` (CRC32C of the block) when given. `sequential`: the
   * read is part of a sequential stream (see StreamDetector), so a store with a read cache
   * should not keep what it fetches.
   */
  getBlock(ref: BlockRef, crc?: number, sequential?: boolean): Promise<Buffer>;
  /** Part of the block; with `crc` (the writer's CRC of the whole block) checked end to end. */
  readRange(ref: BlockRef, offset: number, length: number, crc?: number, sequential?: boolean): Promise<Buffer>;
  /**
   * readRange (or getBlock, for the whole block) into the caller's buffer: `into.length` bytes
   * from `offset`. Only a store that reads some blocks from a disk of its own has it: for the
   * others it would be one more copy.
   */
  readonly readRangeInto?: (ref: BlockRef, offset: number, into: Buffer, crc?: number, sequential?: boolean) => Promise<void>;
  flush(): Promise<void>;
}

interface Page {
  buf: Buffer;
  dirty: boolean;
  /** Committed, its put not yet settled: kept in memory, dirty again if the put fails. */
  storing?: boolean;
}

export function depthFor(blocks: number, fanout: number): number {
  let d = 1;
  let cap = fanout;
  while (cap < blocks) {
    d++;
    cap *= fanout;
  }
  return d;
}

export function readEntry(buf: Buffer, slot: number): Pointer | null {
  const off = slot * ENTRY_SIZE;
  const ref = decodeBlockRef(buf, off);
  if (isZeroRef(ref)) return null;
  return { ref, crc: buf.readUInt32LE(off + BLOCK_REF_SIZE) };
}

function writeEntry(buf: Buffer, slot: number, p: Pointer | null): void {
  const off = slot * ENTRY_SIZE;
  if (!p) {
    buf.fill(0, off, off + ENTRY_SIZE);
    return;
  }
  encodeBlockRef(p.ref, buf, off);
  buf.writeUInt32LE(p.crc >>> 0, off + BLOCK_REF_SIZE);
  buf.writeUInt32LE(0, off + 28);
}

function allZero(buf: Buffer): boolean {
  // Compare 8 bytes at a time; pages are block-sized and block sizes are multiples of 4 KiB.
  const words = new BigUint64Array(buf.buffer, buf.byteOffset, buf.byteLength >> 3);
  for (let i = 0; i < words.length; i++) if (words[i] !== 0n) return false;
  return true;
}

/**
 * Walks a tree from its root, a level at a time with bounded parallelism. `visit` sees every page
 * and every data pointer; for a page it returns whether to descend into it (false: skip a subtree
 * already seen). Pages are read with `readPage`, so callers choose caching and counting.
 */
export async function walkTree(
  head: Head,
  fanout: number,
  readPage: (ptr: Pointer) => Promise<Buffer>,
  visit: (ptr: Pointer, kind: 'page' | 'data') => boolean,
): Promise<void> {
  if (!head.root) return;
  // Pages read from a cache resolve together, and a page holds thousands of entries: without
  // pauses a walk of a large volume held the event loop for tens of milliseconds.
  const y = new Yielder();
  let level: { ptr: Pointer; depth: number }[] = [{ ptr: head.root, depth: head.depth - 1 }];
  while (level.length > 0) {
    const next: typeof level = [];
    for (let i = 0; i < level.length; i += 32) {
      await Promise.all(
        level.slice(i, i + 32).map(async ({ ptr, depth }) => {
          if (!visit(ptr, 'page')) return;
          const page = await readPage(ptr);
          if (y.due(fanout)) await y.pause();
          for (let s = 0; s < fanout; s++) {
            const child = readEntry(page, s);
            if (!child) continue;
            if (depth === 0) visit(child, 'data');
            else next.push({ ptr: child, depth: depth - 1 });
          }
        }),
      );
    }
    level = next;
  }
}

export class InodeTree {
  readonly fanout: number;
  private depth: number;
  private root: Pointer | null;
  /** Pages by "level:pageNo", level 0 = leaves. Dirty pages stay until commit. */
  private readonly pages = new Map<string, Page>();
  private cleanBytes = 0;
  /** Counts commits and grows: a page read that began before one may have read a stale pointer. */
  private generation = 0;

  constructor(
    private readonly store: VolumeBlockStore,
    head: Head,
    private readonly cacheBytes = 64 * 1024 * 1024,
  ) {
    if (store.blockSize % ENTRY_SIZE !== 0) throw new TorusError('INVALID_ARGUMENT', 'block size must be a multiple of 32');
    this.fanout = store.blockSize / ENTRY_SIZE;
    this.depth = head.depth;
    this.root = head.root;
  }

  get rootPointer(): Pointer | null {
    return this.root;
  }

  get treeDepth(): number {
    return this.depth;
  }

  /** Bytes of the pages held: the clean ones the cache keeps, and dirty ones until commit. */
  get heldBytes(): number {
    let n = 0;
    for (const p of this.pages.values()) n += p.buf.length;
    return n;
  }

  /** Blocks addressable without growing the tree. */
  get capacity(): number {
    return this.fanout ** this.depth;
  }

  private pageNo(level: number, index: number): number {
    return Math.floor(index / this.fanout ** (level + 1));
  }

  private slot(level: number, index: number): number {
    return Math.floor(index / this.fanout ** level) % this.fanout;
  }

  private async loadPointer(p: Pointer | null): Promise<Buffer> {
    if (!p) return Buffer.alloc(this.store.blockSize);
    const data = await this.store.getBlock(p.ref, p.crc);
    // A private copy: pages are edited in place, and the store (or its cache) owns `data`.
    return Buffer.from(data);
  }

  /** The page at `level` on the path to `index`, loading (or creating, for holes) the path. */
  private async page(level: number, index: number): Promise<Page> {
    const key = `${level}:${this.pageNo(level, index)}`;
    for (;;) {
      const have = this.pages.get(key);
      if (have) return have;
      const generation = this.generation;
      let ptr: Pointer | null;
      if (level === this.depth - 1) ptr = this.root;
      else {
        const parent = await this.page(level + 1, index);
        ptr = readEntry(parent.buf, this.slot(level + 1, index));
      }
      // Another call may have loaded it while we awaited.
      const raced = this.pages.get(key);
      if (raced) return raced;
      const page: Page = { buf: await this.loadPointer(ptr), dirty: false };
      const again = this.pages.get(key);
      if (again) return again;
      // A commit (or grow) while we read may have re-pointed this page and the cache let the new
      // one go: what we read is then an old version, and kept it would be committed again over
      // the newer one. Read it again from where its parent points now.
      if (generation !== this.generation) continue;
      this.pages.set(key, page);
      this.cleanBytes += page.buf.length;
      this.evict();
      return page;
    }
  }

  private evict(): void {
    if (this.cleanBytes <= this.cacheBytes) return;
    for (const [key, p] of this.pages) {
      if (this.cleanBytes <= this.cacheBytes / 2) break;
      if (p.dirty || p.storing) continue;
      this.pages.delete(key);
      this.cleanBytes -= p.buf.length;
    }
  }

  private markDirty(p: Page): void {
    if (!p.dirty) {
      p.dirty = true;
      this.cleanBytes -= p.buf.length;
    }
  }

  /** The data block at `index`, or null for a hole. */
  async get(index: number): Promise<Pointer | null> {
    if (index >= this.capacity) return null;
    if (!this.root && !this.pages.size) return null;
    // Walk down, stopping at the first hole: a missing subtree is all holes.
    let ptr = this.root;
    for (let level = this.depth - 1; level >= 0; level--) {
      const key = `${level}:${this.pageNo(level, index)}`;
      const cached = this.pages.get(key);
      if (!cached && !ptr) return null;
      const page = cached ?? (await this.page(level, index));
      ptr = readEntry(page.buf, this.slot(level, index));
    }
    return ptr;
  }

  /** Points `index` at a data block (null: a hole). The change lives in memory until commit. */
  async set(index: number, p: Pointer | null): Promise<void> {
    if (index >= this.capacity) throw new TorusError('INVALID_ARGUMENT', `block index ${index} beyond the inode's capacity`);
    for (let level = this.depth - 1; level >= 0; level--) this.markDirty(await this.page(level, index));
    const leaf = await this.page(0, index);
    writeEntry(leaf.buf, this.slot(0, index), p);
  }

  /** Makes room for `blocks` blocks, adding levels above the root as needed. */
  grow(blocks: number): void {
    const want = depthFor(blocks, this.fanout);
    if (want > this.depth && !this.root && this.pages.size === 0) {
      // An empty tree has nothing to re-parent.
      this.depth = want;
      return;
    }
    this.generation++;
    while (this.depth < want) {
      // The old tree becomes child 0 of a new root; pages keep their numbers at their levels.
      const newRoot: Page = { buf: Buffer.alloc(this.store.blockSize), dirty: true };
      const oldRootKey = `${this.depth - 1}:0`;
      const oldRootPage = this.pages.get(oldRootKey);
      if (!oldRootPage?.dirty) writeEntry(newRoot.buf, 0, this.root);
      this.pages.set(`${this.depth}:0`, newRoot);
      this.depth++;
    }
  }

  get dirty(): boolean {
    for (const p of this.pages.values()) if (p.dirty) return true;
    return false;
  }

  /**
   * Stores every dirty page, leaves first, each under a fresh ref from `allocRef`, and returns
   * the new root. A parent's entry needs only its child's ref and CRC, both known before the
   * child's put completes, so every put of a commit is in flight at once: a sync's latency does
   * not grow with the tree's depth. The returned `stored` settles when all puts have; the pages
   * must not change before then (syncs are serialized, and only syncs change pages).
   * Pages whose entries are all holes are not stored: their parent gets a hole.
   */
  async commit(allocRef: (type: BlockType) => BlockRef): Promise<{ root: Pointer | null; depth: number; pagesWritten: number; stored: Promise<void> }> {
    this.generation++;
    let written = 0;
    const puts: Promise<void>[] = [];
    const committed: Page[] = [];
    for (let level = 0; level < this.depth; level++) {
      const dirty = [...this.pages].filter(([k, p]) => p.dirty && k.startsWith(`${level}:`));
      for (const [key, p] of dirty) {
        const pageNo = Number(key.slice(key.indexOf(':') + 1));
        let ptr: Pointer | null = null;
        if (!allZero(p.buf)) {
          ptr = { ref: allocRef(BlockType.INode), crc: crc32c(p.buf) >>> 0 };
          const put = this.store.putBlock(ptr.ref, p.buf, { crc: ptr.crc });
          // Observed now (the await on a parent page below may outlast it), judged when settled.
          put.catch(() => undefined);
          puts.push(put);
          written++;
        }
        if (level === this.depth - 1) this.root = ptr;
        else {
          // Any index inside this page finds the parent's slot for it.
          const anyIndex = pageNo * this.fanout ** (level + 1);
          const parent = await this.page(level + 1, anyIndex);
          this.markDirty(parent);
          writeEntry(parent.buf, this.slot(level + 1, anyIndex), ptr);
        }
        p.dirty = false;
        p.storing = true;
        committed.push(p);
        this.cleanBytes += p.buf.length;
      }
    }
    // Settle every put before reporting, so no failure goes unobserved. If any failed, every
    // page of this commit is dirty again: the head that would have named them was not committed,
    // and the next commit must store them (under new refs) rather than name refs that may be on
    // no replica.
    const stored = Promise.allSettled(puts).then((rs) => {
      const bad = rs.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      for (const p of committed) {
        p.storing = false;
        if (bad) this.markDirty(p);
      }
      if (bad) throw bad.reason;
      this.evict();
    });
    return { root: this.root, depth: this.depth, pagesWritten: written, stored };
  }

  /**
   * Allocated runs of [first, first+count): calls `visit(index, allocated)` once per maximal run,
   * skipping whole holes in the tree without loading them.
   */
  async runs(first: number, count: number, visit: (index: number, length: number, allocated: boolean) => void): Promise<void> {
    let i = first;
    const end = first + count;
    let runStart = first;
    let runAlloc: boolean | undefined;
    const emit = (upto: number, alloc: boolean): void => {
      if (runAlloc === undefined) {
        runAlloc = alloc;
        return;
      }
      if (alloc !== runAlloc) {
        visit(runStart, upto - runStart, runAlloc);
        runStart = upto;
        runAlloc = alloc;
      }
    };
    while (i < end) {
      // Walk down towards i; a missing page under a hole pointer is a hole as wide as the page.
      let level = this.depth - 1;
      let ptr = this.root;
      let alloc = false;
      let skipTo = i + 1;
      for (;;) {
        let page = this.pages.get(`${level}:${this.pageNo(level, i)}`);
        if (!page) {
          if (!ptr) {
            const span = this.fanout ** (level + 1);
            skipTo = (Math.floor(i / span) + 1) * span;
            break;
          }
          page = await this.page(level, i);
        }
        ptr = readEntry(page.buf, this.slot(level, i));
        if (level === 0) {
          alloc = ptr !== null;
          break;
        }
        level--;
      }
      emit(i, alloc);
      i = Math.min(end, skipTo);
    }
    if (runAlloc !== undefined) visit(runStart, end - runStart, runAlloc);
  }
}
