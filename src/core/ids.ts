import { TorusError } from './errors.js';

// A block's identity. Blocks are immutable: a changed block always gets a new BlockRef, so a
// ref names the same bytes forever (caches never go stale, replicas never diverge).
//
// Wire and disk form: 24 bytes, little-endian.
//   [0:8)   volume word: volume id in the low 40 bits, block type in the next 24
//   [8:16)  inode number
//   [16:24) index inside the inode
// All-zero means "no block": reads as zeros and costs nothing.
//
// JavaScript numbers hold integers exactly up to 2^53, so volume < 2^40, inode and index
// < 2^53 are enforced at encode time rather than carried around as bigints on the hot path.

export const BLOCK_REF_SIZE = 24;
export const MAX_VOLUME_ID = 2 ** 40 - 1;

export enum BlockType {
  Data = 0,
  INode = 1,
  /** A volume journal's log block: appended while open, sealed into an ordinary block (docs/journal.md). */
  Log = 2,
  /** A volume's overlay run: the journal extents a checkpoint made permanent. */
  Run = 3,
}

/** The block types this build knows; a newer node's types are kept, never judged. */
export const KNOWN_BLOCK_TYPES: readonly BlockType[] = [BlockType.Data, BlockType.INode, BlockType.Log, BlockType.Run];

/**
 * Log blocks of one journal segment share their placement: a Log ref's index is
 * `segment × 2^24 + n`, and the ring places it by the ref with `n` cleared, so every log block of
 * a segment lives on the same R nodes (the journal's replicas) and stays where the ring says.
 */
export const LOG_BLOCKS_PER_SEGMENT = 2 ** 24;

/** The ref the ring places `ref` by (itself, but for Log refs: see LOG_BLOCKS_PER_SEGMENT). */
export function placementRef(ref: BlockRef): BlockRef {
  if (ref.type !== BlockType.Log) return ref;
  const n = ref.index % LOG_BLOCKS_PER_SEGMENT;
  return n === 0 ? ref : { type: ref.type, volume: ref.volume, inode: ref.inode, index: ref.index - n };
}

export interface BlockRef {
  readonly type: BlockType;
  readonly volume: number;
  readonly inode: number;
  readonly index: number;
}

export const ZERO_REF: BlockRef = Object.freeze({ type: BlockType.Data, volume: 0, inode: 0, index: 0 });

export function isZeroRef(ref: BlockRef): boolean {
  return ref.volume === 0 && ref.inode === 0 && ref.index === 0 && ref.type === BlockType.Data;
}

const TWO32 = 2 ** 32;

// Byte by byte rather than through a DataView: every block pointer a read looks up is decoded
// here, and a DataView per field was most of the decoding's cost.
function writeU32(buf: Uint8Array, value: number, offset: number): void {
  buf[offset] = value;
  buf[offset + 1] = value >>> 8;
  buf[offset + 2] = value >>> 16;
  buf[offset + 3] = value >>> 24;
}

function readU32(buf: Uint8Array, offset: number): number {
  return (buf[offset]! | (buf[offset + 1]! << 8) | (buf[offset + 2]! << 16)) + buf[offset + 3]! * 2 ** 24;
}

function writeU64(buf: Uint8Array, value: number, offset: number): void {
  if (offset < 0 || offset + 8 > buf.length) throw new RangeError(`offset ${offset} + 8 is outside a ${buf.length}-byte buffer`);
  writeU32(buf, value % TWO32, offset);
  writeU32(buf, Math.floor(value / TWO32), offset + 4);
}

function readU64(buf: Uint8Array, offset: number): number {
  if (offset < 0 || offset + 8 > buf.length) throw new RangeError(`offset ${offset} + 8 is outside a ${buf.length}-byte buffer`);
  const lo = readU32(buf, offset);
  const hi = readU32(buf, offset + 4);
  if (hi >= 2 ** 21) throw new TorusError('PROTOCOL', 'block ref field exceeds 2^53');
  return hi * TWO32 + lo;
}

function checkRef(ref: BlockRef): void {
  if (!Number.isSafeInteger(ref.volume) || ref.volume < 0 || ref.volume > MAX_VOLUME_ID)
    throw new TorusError('INVALID_ARGUMENT', `volume id ${ref.volume} out of range`);
  if (!Number.isSafeInteger(ref.inode) || ref.inode < 0)
    throw new TorusError('INVALID_ARGUMENT', `inode ${ref.inode} out of range`);
  if (!Number.isSafeInteger(ref.index) || ref.index < 0)
    throw new TorusError('INVALID_ARGUMENT', `index ${ref.index} out of range`);
  if (!Number.isInteger(ref.type) || ref.type < 0 || ref.type >= 2 ** 11)
    throw new TorusError('INVALID_ARGUMENT', `block type ${ref.type} out of range`);
}

export function encodeBlockRef(ref: BlockRef, buf: Uint8Array, offset = 0): void {
  checkRef(ref);
  // type occupies bits 40..63 of the volume word; kept below 2^11 so the word stays < 2^53.
  writeU64(buf, ref.type * 2 ** 40 + ref.volume, offset);
  writeU64(buf, ref.inode, offset + 8);
  writeU64(buf, ref.index, offset + 16);
}

export function blockRefBytes(ref: BlockRef): Buffer {
  const buf = Buffer.allocUnsafe(BLOCK_REF_SIZE);
  encodeBlockRef(ref, buf);
  return buf;
}

export function decodeBlockRef(buf: Uint8Array, offset = 0): BlockRef {
  if (buf.byteLength - offset < BLOCK_REF_SIZE) throw new TorusError('PROTOCOL', 'short block ref');
  const word = readU64(buf, offset);
  const volume = word % 2 ** 40;
  const type = Math.floor(word / 2 ** 40);
  return { type, volume, inode: readU64(buf, offset + 8), index: readU64(buf, offset + 16) };
}

/** A compact map key for a ref; stable across processes. */
export function blockRefKey(ref: BlockRef): string {
  return `${ref.type}:${ref.volume}:${ref.inode}:${ref.index}`;
}

const BLOCK_TYPE_NAMES: Readonly<Record<number, string>> = { [BlockType.Data]: 'data', [BlockType.INode]: 'inode', [BlockType.Log]: 'log', [BlockType.Run]: 'run' };

export function formatBlockRef(ref: BlockRef): string {
  const kind = BLOCK_TYPE_NAMES[ref.type] ?? `type${ref.type}`;
  return `${kind} v${ref.volume.toString(16)} i${ref.inode} #${ref.index}`;
}

export function blockRefEquals(a: BlockRef, b: BlockRef): boolean {
  return a.type === b.type && a.volume === b.volume && a.inode === b.inode && a.index === b.index;
}
