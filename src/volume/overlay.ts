// The overlay index: per block index, the byte ranges that journal records replaced since the
// block's base (the inode tree's pointer, or a hole) was written, newest wins. A read of a block
// takes those ranges from where the records' bytes are, and the rest from the base; a fold turns
// a block's overlays into a new base. Pure data structure: no I/O.

import type { BlockRef } from '../core/ids.js';

/** Where a record's bytes are in the journal: its log block and the offset of its data there. */
export interface LogPlace {
  /** The log block's volume (a clone reads its parent's). */
  readonly volume: number;
  readonly epoch: number;
  /** The log block's index (segment × 2^24 + n). */
  readonly index: number;
  readonly at: number;
  /**
   * The log block's CRC once it is sealed: reads of it are checked against it. Always present,
   * undefined before the seal: every place then has one shape, where a copy made by spreading
   * got a hidden class of its own per object (hundreds of bytes each, per overlay segment).
   */
  readonly crc: number | undefined;
}

/**
 * One journal record's contribution (or a pending write's, before it is journaled): mutable, so
 * that journaling or moving the journal re-points every range that came from it at once.
 */
export interface Source {
  /** The record's LSN; Infinity while the write is pending (not yet journaled). */
  lsn: number;
  /** Reads as zeros (ZERO and TRIM records). */
  readonly zero: boolean;
  /** ... and needs no storage (TRIM): a block it covers whole is a hole. */
  readonly hole?: boolean;
  /** The bytes, while held in memory (pending, and until the record is checkpointed). */
  data: Buffer | undefined;
  /** Where the bytes are in the journal, once appended. */
  log: LogPlace | undefined;
  /** A whole block stored as a data block of its own (a Block record): where it is, and its CRC. */
  block?: { readonly ref: BlockRef; readonly crc: number };
}

/** A range [start, end) of one block, taken from `src` at `at` (offset into the source's bytes). */
export interface Segment {
  readonly start: number;
  readonly end: number;
  readonly src: Source;
  readonly at: number;
}

export class OverlayIndex {
  private readonly blocks = new Map<number, Segment[]>();
  private count = 0;

  /** Segments across all blocks. */
  get size(): number {
    return this.count;
  }

  /** Block indexes with overlays. */
  indexes(): number[] {
    return [...this.blocks.keys()];
  }

  segments(index: number): readonly Segment[] {
    return this.blocks.get(index) ?? [];
  }

  /** Puts `src` over [start, end) of block `index` (src bytes from `at` on), splitting what it covers. */
  insert(index: number, start: number, end: number, src: Source, at: number): void {
    if (end <= start) return;
    const list = this.blocks.get(index) ?? [];
    const out: Segment[] = [];
    let placed = false;
    for (const s of list) {
      if (s.end <= start || s.start >= end) {
        if (!placed && s.start >= end) {
          out.push({ start, end, src, at });
          placed = true;
        }
        out.push(s);
        continue;
      }
      if (s.start < start) out.push({ start: s.start, end: start, src: s.src, at: s.at });
      if (!placed) {
        out.push({ start, end, src, at });
        placed = true;
      }
      if (s.end > end) out.push({ start: end, end: s.end, src: s.src, at: s.at + (end - s.start) });
    }
    if (!placed) out.push({ start, end, src, at });
    this.count += out.length - list.length;
    // An array grown by push keeps room for 17 entries; most blocks hold one to three segments,
    // and a volume holds up to --overlay-segments of them: keep an exact-sized copy.
    this.blocks.set(index, out.slice());
  }

  /** Drops block `index`'s segments whose sources are at or below `lsn` (a fold took them into the base). */
  reset(index: number, lsn: number): void {
    const list = this.blocks.get(index);
    if (!list) return;
    const keep = list.filter((s) => s.src.lsn > lsn);
    this.count -= list.length - keep.length;
    if (keep.length === 0) this.blocks.delete(index);
    else this.blocks.set(index, keep);
  }

  /** Drops block indexes at or past `firstGone` (a shrink). */
  truncate(firstGone: number): void {
    for (const [i, list] of this.blocks) {
      if (i < firstGone) continue;
      this.count -= list.length;
      this.blocks.delete(i);
    }
  }

  /** The highest LSN among a block's segments (-1 for none): what a fold of it covers. */
  maxLsn(index: number): number {
    let m = -1;
    for (const s of this.blocks.get(index) ?? []) if (s.src.lsn > m) m = s.src.lsn;
    return m;
  }
}
