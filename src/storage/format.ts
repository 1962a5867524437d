// The on-disk format of FileBlockStore, as pure encode/decode functions over buffers so the
// format can be tested, documented (docs/on-disk-format.md) and pinned with fixtures apart from
// the I/O that uses it. Every integer is little-endian.

import { crc32c } from '@node-rs/crc32';
import { nativeSectorCrcs } from '../core/crc.js';
import { TorusError } from '../core/errors.js';
import { BLOCK_REF_SIZE, decodeBlockRef, encodeBlockRef, type BlockRef } from '../core/ids.js';

export const DATA_FILE = 'blocks.data';
export const TABLE_FILE = 'blocks.table';
export const LOCK_FILE = 'blocks.lock';

export const MAGIC = 'TORUSBLK';
export const FORMAT_VERSION = 1;

/** Checksum granularity: a 4 KiB read of a big block is verified without reading the rest. */
export const SECTOR_SIZE = 4096;
/**
 * 64 bytes, a power of two, so a record never straddles a 512-byte device sector: on a power cut
 * a record is old or new, never half of each, and its neighbours are untouched.
 */
export const RECORD_SIZE = 64;
/**
 * Records of a group are contiguous so opening reads them in large chunks without also reading
 * the (much bigger) sector checksum arrays that follow them.
 */
export const SLOTS_PER_GROUP = 4096;
/** Two header copies, each in its own 4 KiB page, so a torn header write leaves one intact. */
export const HEADER_COPY_SIZE = 512;
export const HEADER_COPY_OFFSETS = [0, 4096] as const;
export const HEADER_AREA_SIZE = 8192;

export const MAX_BLOCK_SIZE = 2 ** 30;

// Header copy fields.
const H_MAGIC = 0;
const H_VERSION = 8;
const H_SEQUENCE = 16;
const H_BLOCK_SIZE = 24;
const H_SECTOR_SIZE = 28;
const H_SLOT_COUNT = 32;
const H_RECORD_SIZE = 40;
const H_CHECKSUM_ARRAY_SIZE = 44;
const H_SLOTS_PER_GROUP = 48;
const H_INCOMPAT_FLAGS = 52;
const H_COMPAT_FLAGS = 56;
const H_STORE_ID = 64;
const H_CREATED_AT = 80;
/** With COMPAT_DURABLE_GEN: every block of a generation at or below this was on stable storage. */
const H_DURABLE_GEN = 88;
const H_CRC = HEADER_COPY_SIZE - 4;

// Record fields.
const R_REF = 0;
const R_GENERATION = R_REF + BLOCK_REF_SIZE;
const R_CHECKSUMS_CRC = 32;
const R_BLOCK_CRC = 36;
const R_FLAGS = 40;
/** Record flag: R_BLOCK_CRC holds the CRC32C of the whole block, checked against the writer's. */
const RF_BLOCK_CRC = 0x01;
/**
 * Record flag: an open log block (docs/journal.md): the slot's data is being appended to and has
 * no sector checksums yet (R_CHECKSUMS_CRC is 0); its journal records carry their own CRCs.
 */
const RF_OPEN = 0x02;

/**
 * Incompatible header flag: the store may hold open log blocks. A build that does not know them
 * would read one as a block with a bad checksum array and drop it, losing journal appends that
 * were acknowledged; it refuses the store instead.
 */
export const INCOMPAT_OPEN_LOG = 0x01;

/**
 * Compatible header flag: the header's durable generation is kept. At open, blocks written after
 * it are read and checked: a power cut may have left their records without their data, and a
 * store that said it held such a block (HAS, a put taken as a no-op) would pass bad copies for
 * good ones. Older readers ignore the field.
 */
export const COMPAT_DURABLE_GEN = 0x01;
const KNOWN_INCOMPAT = INCOMPAT_OPEN_LOG;

/** The fence table: per volume, the highest journal session epoch fenced (docs/journal.md). */
export const FENCE_FILE = 'fences';
/** volume u64, epoch u64, reserved u32, CRC32C of bytes 0..19. */
export const FENCE_RECORD_SIZE = 24;

export function encodeFence(volume: number, epoch: number, out: Buffer = Buffer.alloc(FENCE_RECORD_SIZE), at = 0): Buffer {
  out.fill(0, at, at + FENCE_RECORD_SIZE);
  writeU64(out, volume, at);
  writeU64(out, epoch, at + 8);
  out.writeUInt32LE(crc32c(out.subarray(at, at + 20)), at + 20);
  return out;
}

/** A fence record, or undefined for a torn one (an append cut short by a crash). */
export function decodeFence(buf: Buffer, at: number): { volume: number; epoch: number } | undefined {
  if (buf.length < at + FENCE_RECORD_SIZE) return undefined;
  if (crc32c(buf.subarray(at, at + 20)) !== buf.readUInt32LE(at + 20)) return undefined;
  return { volume: readU64(buf, at), epoch: readU64(buf, at + 8) };
}
const R_CRC = RECORD_SIZE - 4;

export interface StoreHeader {
  readonly version: number;
  /** Bumped on every rewrite; the valid copy with the highest sequence is current. */
  readonly sequence: number;
  readonly blockSize: number;
  readonly sectorSize: number;
  readonly slotCount: number;
  readonly recordSize: number;
  readonly checksumArraySize: number;
  readonly slotsPerGroup: number;
  /** Features an older reader must refuse to open; none defined in version 1. */
  readonly incompatFlags: number;
  /** Features an older reader may ignore; none defined in version 1. */
  readonly compatFlags: number;
  /** 16 random bytes as hex, fixed at format time (tells stores apart in logs and bug reports). */
  readonly storeId: string;
  /** ms since epoch at format time. */
  readonly createdAt: number;
  /** Every block of a generation at or below this was durable when the header was written (COMPAT_DURABLE_GEN). */
  readonly durableGen?: number;
}

export function sectorsPerBlock(blockSize: number, sectorSize = SECTOR_SIZE): number {
  return Math.ceil(blockSize / sectorSize);
}

export function checksumArraySize(blockSize: number, sectorSize = SECTOR_SIZE): number {
  return 4 * sectorsPerBlock(blockSize, sectorSize);
}

/** Byte positions of one slot's pieces; pure so tests and tools compute them the same way. */
export class Layout {
  readonly blockSize: number;
  readonly sectorSize: number;
  readonly checksumArraySize: number;
  readonly slotsPerGroup: number;
  readonly groupSize: number;

  constructor(blockSize: number, sectorSize = SECTOR_SIZE, slotsPerGroup = SLOTS_PER_GROUP) {
    this.blockSize = blockSize;
    this.sectorSize = sectorSize;
    this.checksumArraySize = checksumArraySize(blockSize, sectorSize);
    this.slotsPerGroup = slotsPerGroup;
    this.groupSize = slotsPerGroup * (RECORD_SIZE + this.checksumArraySize);
  }

  dataOffset(slot: number): number {
    return slot * this.blockSize;
  }

  recordOffset(slot: number): number {
    const g = Math.floor(slot / this.slotsPerGroup);
    return HEADER_AREA_SIZE + g * this.groupSize + (slot - g * this.slotsPerGroup) * RECORD_SIZE;
  }

  checksumOffset(slot: number): number {
    const g = Math.floor(slot / this.slotsPerGroup);
    const inGroup = slot - g * this.slotsPerGroup;
    return HEADER_AREA_SIZE + g * this.groupSize + this.slotsPerGroup * RECORD_SIZE + inGroup * this.checksumArraySize;
  }

  dataFileSize(slots: number): number {
    return slots * this.blockSize;
  }

  /** Whole groups, so growing never moves a slot's record or checksums. */
  tableFileSize(slots: number): number {
    return HEADER_AREA_SIZE + Math.ceil(slots / this.slotsPerGroup) * this.groupSize;
  }
}

function writeU64(buf: Buffer, value: number, offset: number): void {
  buf.writeUInt32LE(value % 2 ** 32, offset);
  buf.writeUInt32LE(Math.floor(value / 2 ** 32), offset + 4);
}

function readU64(buf: Buffer, offset: number): number {
  const lo = buf.readUInt32LE(offset);
  const hi = buf.readUInt32LE(offset + 4);
  // Above 2^53 a number would silently round; no field we write gets there.
  if (hi >= 2 ** 21) return Number.NaN;
  return hi * 2 ** 32 + lo;
}

export function encodeHeader(h: StoreHeader): Buffer {
  const buf = Buffer.alloc(HEADER_COPY_SIZE);
  buf.write(MAGIC, H_MAGIC, 'latin1');
  buf.writeUInt32LE(h.version, H_VERSION);
  writeU64(buf, h.sequence, H_SEQUENCE);
  buf.writeUInt32LE(h.blockSize, H_BLOCK_SIZE);
  buf.writeUInt32LE(h.sectorSize, H_SECTOR_SIZE);
  writeU64(buf, h.slotCount, H_SLOT_COUNT);
  buf.writeUInt32LE(h.recordSize, H_RECORD_SIZE);
  buf.writeUInt32LE(h.checksumArraySize, H_CHECKSUM_ARRAY_SIZE);
  buf.writeUInt32LE(h.slotsPerGroup, H_SLOTS_PER_GROUP);
  buf.writeUInt32LE(h.incompatFlags, H_INCOMPAT_FLAGS);
  buf.writeUInt32LE(h.compatFlags, H_COMPAT_FLAGS);
  Buffer.from(h.storeId, 'hex').copy(buf, H_STORE_ID, 0, 16);
  writeU64(buf, h.createdAt, H_CREATED_AT);
  writeU64(buf, h.durableGen ?? 0, H_DURABLE_GEN);
  buf.writeUInt32LE(crc32c(buf.subarray(0, H_CRC)), H_CRC);
  return buf;
}

/**
 * Decodes one header copy. Returns undefined for a copy that is torn or was never written, so
 * the caller can fall back to the other copy; throws for a valid header this build cannot read.
 */
export function decodeHeader(buf: Buffer): StoreHeader | undefined {
  if (buf.length < HEADER_COPY_SIZE) return undefined;
  if (buf.toString('latin1', H_MAGIC, H_MAGIC + 8) !== MAGIC) return undefined;
  if (crc32c(buf.subarray(0, H_CRC)) !== buf.readUInt32LE(H_CRC)) return undefined;
  return {
    version: buf.readUInt32LE(H_VERSION),
    sequence: readU64(buf, H_SEQUENCE),
    blockSize: buf.readUInt32LE(H_BLOCK_SIZE),
    sectorSize: buf.readUInt32LE(H_SECTOR_SIZE),
    slotCount: readU64(buf, H_SLOT_COUNT),
    recordSize: buf.readUInt32LE(H_RECORD_SIZE),
    checksumArraySize: buf.readUInt32LE(H_CHECKSUM_ARRAY_SIZE),
    slotsPerGroup: buf.readUInt32LE(H_SLOTS_PER_GROUP),
    incompatFlags: buf.readUInt32LE(H_INCOMPAT_FLAGS),
    compatFlags: buf.readUInt32LE(H_COMPAT_FLAGS),
    storeId: buf.toString('hex', H_STORE_ID, H_STORE_ID + 16),
    createdAt: readU64(buf, H_CREATED_AT),
    durableGen: readU64(buf, H_DURABLE_GEN),
  };
}

/** Refuses headers this build cannot interpret, with the reason in words. */
export function checkHeaderSupported(h: StoreHeader, where: string): void {
  const bad = (why: string): never => {
    throw new TorusError('INVALID_ARGUMENT', `block store in ${where}: ${why}`);
  };
  if (h.version > FORMAT_VERSION)
    bad(`written in format version ${h.version}; this build reads format ${FORMAT_VERSION} (upgrade torus)`);
  if (h.version < 1) bad(`unknown format version ${h.version}`);
  if ((h.incompatFlags & ~KNOWN_INCOMPAT) !== 0) bad(`uses features this build does not know (flags 0x${h.incompatFlags.toString(16)})`);
  if (h.recordSize !== RECORD_SIZE) bad(`record size ${h.recordSize}, expected ${RECORD_SIZE}`);
  if (h.sectorSize < 512 || h.sectorSize % 512 !== 0) bad(`invalid sector size ${h.sectorSize}`);
  if (h.blockSize < 1 || h.blockSize > MAX_BLOCK_SIZE) bad(`invalid block size ${h.blockSize}`);
  if (h.checksumArraySize !== checksumArraySize(h.blockSize, h.sectorSize))
    bad(`checksum array size ${h.checksumArraySize} does not match block size ${h.blockSize}`);
  if (h.slotsPerGroup < 1) bad(`invalid slots per group ${h.slotsPerGroup}`);
  if (!Number.isSafeInteger(h.slotCount) || !Number.isSafeInteger(h.sequence)) bad('header counters out of range');
}

/** What a record says; generation 0 never appears in a used record. */
export interface SlotRecord {
  readonly ref: BlockRef;
  readonly generation: number;
  /** CRC32C of the slot's sector checksum array, which commits that array with the record. */
  readonly checksumsCrc: number;
  /** CRC32C of the whole block, as the writer computed it; absent in records written before it was kept. */
  readonly blockCrc?: number;
  /** An open log block: no checksums yet. */
  readonly open?: true;
}

/** The record of an open log block (RF_OPEN): no checksum array, no block CRC. */
export function encodeOpenRecord(ref: BlockRef, generation: number, out?: Buffer): Buffer {
  const buf = encodeRecord(ref, generation, 0, out);
  buf[R_FLAGS] = RF_OPEN;
  buf.writeUInt32LE(crc32c(buf.subarray(0, R_CRC)), R_CRC);
  return buf;
}

export function encodeRecord(ref: BlockRef, generation: number, checksumsCrc: number, out?: Buffer, blockCrc?: number): Buffer {
  const buf = out ?? Buffer.alloc(RECORD_SIZE);
  if (out) buf.fill(0, 0, RECORD_SIZE);
  encodeBlockRef(ref, buf, R_REF);
  writeU64(buf, generation, R_GENERATION);
  buf.writeUInt32LE(checksumsCrc >>> 0, R_CHECKSUMS_CRC);
  if (blockCrc !== undefined) {
    buf.writeUInt32LE(blockCrc >>> 0, R_BLOCK_CRC);
    buf[R_FLAGS] = RF_BLOCK_CRC;
  }
  buf.writeUInt32LE(crc32c(buf.subarray(0, R_CRC)), R_CRC);
  return buf;
}

export type RecordState =
  | { readonly kind: 'free' }
  | { readonly kind: 'torn' }
  | ({ readonly kind: 'used' } & SlotRecord);

const FREE: RecordState = Object.freeze({ kind: 'free' });
const TORN: RecordState = Object.freeze({ kind: 'torn' });

/** Decodes the record at `offset`. Anything that fails its CRC is torn, and torn means free. */
export function decodeRecord(buf: Buffer, offset = 0): RecordState {
  const out: ScannedRecord = { generation: 0, checksumsCrc: 0, key: '', open: false };
  const kind = scanRecord(buf, offset, out);
  if (kind === RECORD_FREE) return FREE;
  if (kind === RECORD_TORN) return TORN;
  const rec = { ref: decodeBlockRef(buf, offset + R_REF), generation: out.generation, checksumsCrc: out.checksumsCrc };
  if (out.open) return { kind: 'used', ...rec, open: true };
  if ((buf[offset + R_FLAGS]! & RF_BLOCK_CRC) === 0) return { kind: 'used', ...rec };
  return { kind: 'used', ...rec, blockCrc: buf.readUInt32LE(offset + R_BLOCK_CRC) };
}

// Index keys. The store keys its in-memory index by a string built straight from the record
// bytes at open (millions of records: no BlockRef object, no DataView per field): refKeyAt below
// builds core/ids.ts's blockRefKey, which the rest of the store uses as refKey, and the two are
// tested to agree.

export { blockRefKey as refKey } from '../core/ids.js';

export function keyToRef(key: string): BlockRef {
  const parts = key.split(':');
  return { type: Number(parts[0]), volume: Number(parts[1]), inode: Number(parts[2]), index: Number(parts[3]) };
}

/** The refKey of the encoded BlockRef at `offset`; undefined if a field exceeds 2^53. */
export function refKeyAt(buf: Buffer, offset: number): string | undefined {
  const volLo = buf.readUInt32LE(offset);
  const volHi = buf.readUInt32LE(offset + 4);
  const inoLo = buf.readUInt32LE(offset + 8);
  const inoHi = buf.readUInt32LE(offset + 12);
  const idxLo = buf.readUInt32LE(offset + 16);
  const idxHi = buf.readUInt32LE(offset + 20);
  if (volHi >= 2 ** 21 || inoHi >= 2 ** 21 || idxHi >= 2 ** 21) return undefined;
  // Volume word: volume id in bits 0..39, block type above (see core/ids.ts).
  const type = volHi >>> 8;
  const volume = (volHi & 0xff) * 2 ** 32 + volLo;
  return `${type}:${volume}:${inoHi * 2 ** 32 + inoLo}:${idxHi * 2 ** 32 + idxLo}`;
}

export const RECORD_FREE = 0;
export const RECORD_TORN = 1;
export const RECORD_USED = 2;

/** Reused output of scanRecord, so scanning allocates only the key strings. */
export interface ScannedRecord {
  generation: number;
  checksumsCrc: number;
  key: string;
  /** An open log block (RF_OPEN). */
  open: boolean;
}

/** The open-time fast path of decodeRecord: same verdicts, fields written into `out`. */
export function scanRecord(buf: Buffer, offset: number, out: ScannedRecord): number {
  const genLo = buf.readUInt32LE(offset + R_GENERATION);
  const genHi = buf.readUInt32LE(offset + R_GENERATION + 4);
  const crc = buf.readUInt32LE(offset + R_CRC);
  // A cleared record is all zeros; checking two fields first keeps the scan of free slots cheap.
  if (genLo === 0 && genHi === 0 && crc === 0) {
    for (let i = offset; i < offset + RECORD_SIZE; i++) if (buf[i] !== 0) return RECORD_TORN;
    return RECORD_FREE;
  }
  if (crc32c(buf.subarray(offset, offset + R_CRC)) !== crc) return RECORD_TORN;
  if ((genLo === 0 && genHi === 0) || genHi >= 2 ** 21) return RECORD_TORN;
  const key = refKeyAt(buf, offset + R_REF);
  if (key === undefined) return RECORD_TORN;
  out.generation = genHi * 2 ** 32 + genLo;
  out.checksumsCrc = buf.readUInt32LE(offset + R_CHECKSUMS_CRC);
  out.key = key;
  out.open = (buf[offset + R_FLAGS]! & RF_OPEN) !== 0;
  return RECORD_USED;
}

/**
 * Fills `out` with one CRC32C per sector of the block as stored: `data` followed by zeros up to
 * `blockSize`. Returns the CRC32C of the array (the value the record commits).
 */
export function computeChecksums(
  data: Uint8Array,
  blockSize: number,
  sectorSize: number,
  zeros: Buffer | null,
  out: Buffer,
): number {
  const n = sectorsPerBlock(blockSize, sectorSize);
  if (data.length < blockSize && (!zeros || zeros.length < Math.min(sectorSize, blockSize)))
    throw new TorusError('INTERNAL', 'computeChecksums needs a zero buffer of one sector for short data');
  // A whole block (the common case) in one native call: one call and one view per sector cost
  // more than the CRC itself.
  if (data.length === blockSize && nativeSectorCrcs(data, sectorSize, out)) return crc32c(out.subarray(0, n * 4));
  for (let s = 0; s < n; s++) {
    const start = s * sectorSize;
    const end = Math.min(start + sectorSize, blockSize);
    let crc: number;
    if (end <= data.length) {
      crc = crc32c(data.subarray(start, end));
    } else if (start >= data.length) {
      crc = crc32c(zeros!.subarray(0, end - start));
    } else {
      crc = crc32c(zeros!.subarray(0, end - data.length), crc32c(data.subarray(start)));
    }
    out.writeUInt32LE(crc, s * 4);
  }
  return crc32c(out.subarray(0, n * 4));
}
