import { crc32c } from '@node-rs/crc32';
import { TorusError } from '../core/errors.js';
import { BLOCK_REF_SIZE, BlockType, decodeBlockRef, encodeBlockRef, LOG_BLOCKS_PER_SEGMENT, type BlockRef } from '../core/ids.js';
import type { LogPiece } from '../core/interfaces.js';

// The journal's on-disk records, as pure functions over buffers (docs/journal.md). A log block
// holds record data growing up from offset 0 and 64-byte record headers growing down from the
// end; a header names its volume, session epoch and log block, carries the record's LSN, and the
// CRCs of its data and of itself.

export const RECORD_HEADER_SIZE = 64;
const MAGIC = 0x31524a54; // "TJR1" little-endian

export const RecordType = {
  /** Bytes written at a volume offset. */
  Data: 1,
  /** A range that reads as zeros and stays allocated (WRITE_ZEROES with NO_HOLE). */
  Zero: 2,
  /** A range that reads as zeros and may free its storage (TRIM, WRITE_ZEROES). */
  Trim: 3,
  /** The volume's new size, in `offset`. */
  Resize: 4,
  /**
   * A whole block written at once: its bytes were stored as a data block of their own (durable
   * on R replicas before this record was appended), and the record names it. Big writes thus
   * cost one copy per replica, not a journal copy and a fold's.
   */
  Block: 5,
} as const;
export type RecordType = (typeof RecordType)[keyof typeof RecordType];

/** A journal record as the writer and the replay see it. */
export interface JournalRecord {
  readonly type: RecordType;
  readonly lsn: number;
  /** Volume byte offset; for Resize, the new size. */
  readonly offset: number;
  /** Bytes covered (Data: the data's length). */
  readonly length: number;
  /** Data records, and Block records until their block is stored. */
  readonly data?: Buffer;
  /** Block records: the data block holding the bytes, and its CRC. */
  readonly block?: { readonly ref: BlockRef; readonly crc: number };
}

/** A Block record's payload in the log block: the data block's ref and its CRC. */
const BLOCK_PAYLOAD = BLOCK_REF_SIZE + 4;

/**
 * Data blocks that Block records name are `(Data, volume, session epoch, DIRECT_INDEX_BASE + k)`,
 * k counting up in the session: apart from every ref a fold or checkpoint allocates, and easy for
 * GC to tell (docs/journal.md).
 */
export const DIRECT_INDEX_BASE = 2 ** 40;

export function directRef(volume: number, epoch: number, k: number): BlockRef {
  return { type: BlockType.Data, volume, inode: epoch, index: DIRECT_INDEX_BASE + k };
}

export function isDirectRef(ref: BlockRef): boolean {
  return ref.type === BlockType.Data && ref.index >= DIRECT_INDEX_BASE;
}

/** Where a log block sits: its volume, the writing session's epoch, and its index (segment × 2^24 + n). */
export interface LogAddress {
  readonly volume: number;
  readonly epoch: number;
  readonly index: number;
}

export function logRef(a: LogAddress): BlockRef {
  return { type: BlockType.Log, volume: a.volume, inode: a.epoch, index: a.index };
}

export function logIndex(segment: number, n: number): number {
  if (n < 0 || n >= LOG_BLOCKS_PER_SEGMENT) throw new TorusError('INTERNAL', `log block ${n} is beyond a segment`);
  return segment * LOG_BLOCKS_PER_SEGMENT + n;
}

function u64(buf: Buffer, v: number, at: number): void {
  buf.writeUInt32LE(v % 2 ** 32, at);
  buf.writeUInt32LE(Math.floor(v / 2 ** 32), at + 4);
}

function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32LE(at + 4) * 2 ** 32 + buf.readUInt32LE(at);
}

/** Data offsets are aligned so that 4 KiB writes stay 4 KiB aligned (one sector per 4 KiB read). */
function alignFor(type: RecordType, length: number): number {
  if (type === RecordType.Block) return 32;
  return length % 4096 === 0 ? 4096 : 512;
}

/** Bytes a record stores in the log block's data region. */
function payloadLength(r: { readonly type: RecordType; readonly length: number }): number {
  return r.type === RecordType.Data ? r.length : r.type === RecordType.Block ? BLOCK_PAYLOAD : 0;
}

function blockPayload(r: JournalRecord): Buffer {
  if (!r.block) throw new TorusError('INTERNAL', `Block record ${r.lsn} has no stored block`);
  const out = Buffer.alloc(BLOCK_PAYLOAD);
  encodeBlockRef(r.block.ref, out, 0);
  out.writeUInt32LE(r.block.crc >>> 0, BLOCK_REF_SIZE);
  return out;
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

export function encodeRecordHeader(r: JournalRecord, at: LogAddress, dataOffset: number, out: Buffer, pos = 0, payload?: Buffer): void {
  out.fill(0, pos, pos + RECORD_HEADER_SIZE);
  out.writeUInt32LE(MAGIC, pos);
  out[pos + 4] = r.type;
  u64(out, r.lsn, pos + 8);
  u64(out, r.offset, pos + 16);
  out.writeUInt32LE(r.length, pos + 24);
  const body = r.type === RecordType.Data ? r.data : r.type === RecordType.Block ? (payload ?? blockPayload(r)) : undefined;
  out.writeUInt32LE(body ? dataOffset : 0, pos + 28);
  out.writeUInt32LE(body ? crc32c(body) >>> 0 : 0, pos + 32);
  u64(out, at.volume, pos + 36);
  u64(out, at.epoch, pos + 44);
  u64(out, at.index, pos + 52);
  out.writeUInt32LE(crc32c(out.subarray(pos, pos + 60)) >>> 0, pos + 60);
}

/**
 * The records of a log block, in order, starting with LSN `firstLsn` and stopping at the first
 * header that is not the next record of this very block (torn, stale from the slot's previous
 * life, or simply past the end). `last` tells whether the block ended because it was full.
 */
export function parseLogBlock(buf: Buffer, at: LogAddress, firstLsn: number): { records: JournalRecord[]; dataEnd: number } {
  const records: JournalRecord[] = [];
  let lsn = firstLsn;
  let dataEnd = 0;
  for (let k = 1; k * RECORD_HEADER_SIZE <= buf.length; k++) {
    const pos = buf.length - k * RECORD_HEADER_SIZE;
    if (pos < dataEnd) break;
    if (buf.readUInt32LE(pos) !== MAGIC) break;
    if (crc32c(buf.subarray(pos, pos + 60)) >>> 0 !== buf.readUInt32LE(pos + 60)) break;
    if (readU64(buf, pos + 36) !== at.volume || readU64(buf, pos + 44) !== at.epoch || readU64(buf, pos + 52) !== at.index) break;
    if (readU64(buf, pos + 8) !== lsn) break;
    const type = buf[pos + 4] as RecordType;
    const offset = readU64(buf, pos + 16);
    const length = buf.readUInt32LE(pos + 24);
    if (type === RecordType.Data || type === RecordType.Block) {
      const dataOffset = buf.readUInt32LE(pos + 28);
      const n = type === RecordType.Data ? length : BLOCK_PAYLOAD;
      if (dataOffset + n > pos) break;
      const body = buf.subarray(dataOffset, dataOffset + n);
      if (crc32c(body) >>> 0 !== buf.readUInt32LE(pos + 32)) break;
      if (type === RecordType.Data) records.push({ type, lsn, offset, length, data: body });
      else records.push({ type, lsn, offset, length, block: { ref: decodeBlockRef(body, 0), crc: body.readUInt32LE(BLOCK_REF_SIZE) } });
      dataEnd = Math.max(dataEnd, dataOffset + n);
    } else if (type === RecordType.Zero || type === RecordType.Trim || type === RecordType.Resize) {
      records.push({ type, lsn, offset, length });
    } else break;
    lsn++;
  }
  return { records, dataEnd };
}

/**
 * The writer's copy of one log block while it fills: where the next record's data and header
 * go, and the bytes themselves (kept to seal it, to serve reads until it is sealed, and to copy
 * it elsewhere if the journal must move).
 */
export class LogBlockBuilder {
  readonly buf: Buffer;
  private dataEnd = 0;
  private headers = 0;
  /** Bytes added since the last take(): the pieces the next APPEND sends. */
  private sentData = 0;
  private sentHeaders = 0;

  constructor(
    readonly address: LogAddress,
    readonly blockSize: number,
  ) {
    this.buf = Buffer.alloc(blockSize);
  }

  get ref(): BlockRef {
    return logRef(this.address);
  }

  get recordCount(): number {
    return this.headers;
  }

  get empty(): boolean {
    return this.headers === 0;
  }

  /** Bytes taken: records' data from the front, their headers from the back. */
  get used(): number {
    return this.dataEnd + this.headers * RECORD_HEADER_SIZE;
  }

  /** Whether one more record fits. */
  fits(r: { readonly type: RecordType; readonly length: number }): boolean {
    const hdrStart = this.blockSize - (this.headers + 1) * RECORD_HEADER_SIZE;
    const length = payloadLength(r);
    const start = length > 0 ? alignUp(this.dataEnd, alignFor(r.type, length)) : this.dataEnd;
    return start + length <= hdrStart;
  }

  /**
   * Adds a record (it must fit: see fits) and returns where its data landed in the block, for
   * the overlay that points at it.
   */
  add(r: JournalRecord): number {
    const len = payloadLength(r);
    const start = len > 0 ? alignUp(this.dataEnd, alignFor(r.type, len)) : this.dataEnd;
    const hdr = this.blockSize - (this.headers + 1) * RECORD_HEADER_SIZE;
    if (start + len > hdr) throw new TorusError('INTERNAL', `a ${len}-byte record does not fit in log block ${this.address.index}`);
    const payload = r.type === RecordType.Block ? blockPayload(r) : undefined;
    if (r.type === RecordType.Data && r.data) r.data.copy(this.buf, start);
    else if (payload) payload.copy(this.buf, start);
    encodeRecordHeader(r, this.address, start, this.buf, hdr, payload);
    this.dataEnd = start + len;
    this.headers++;
    return start;
  }

  /** The pieces added since the last call: the data region's new bytes and the new headers. */
  take(): LogPiece[] {
    const pieces: LogPiece[] = [];
    if (this.dataEnd > this.sentData) pieces.push({ offset: this.sentData, data: this.buf.subarray(this.sentData, this.dataEnd) });
    if (this.headers > this.sentHeaders) {
      const lo = this.blockSize - this.headers * RECORD_HEADER_SIZE;
      const hi = this.blockSize - this.sentHeaders * RECORD_HEADER_SIZE;
      pieces.push({ offset: lo, data: this.buf.subarray(lo, hi) });
    }
    this.sentData = this.dataEnd;
    this.sentHeaders = this.headers;
    return pieces;
  }

  /** Undoes take(): the pieces will be sent again (the replicas were replaced before they took them). */
  untake(): void {
    this.sentData = 0;
    this.sentHeaders = 0;
  }

  /** The gap a seal zeroes, and the CRC of the block with it zeroed (the buffer's gap is zero already). */
  sealInfo(): { gapStart: number; gapEnd: number; crc: number } {
    return { gapStart: this.dataEnd, gapEnd: this.blockSize - this.headers * RECORD_HEADER_SIZE, crc: crc32c(this.buf) >>> 0 };
  }
}
