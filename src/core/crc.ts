import { crc32c } from '@node-rs/crc32';
import { TorusError } from './errors.js';
import type { SectorRead } from './interfaces.js';
import { loadNativeAddon } from './native.js';

// CRC32C of a concatenation from the CRCs of its parts (zlib's crc32_combine, for the Castagnoli
// polynomial). A block's per-sector checksums, which the stores keep anyway, combine into the
// CRC of the whole block: so a replica can prove that the sectors it serves belong to the block
// the writer checksummed, without reading the rest of the block, and a store can check a put
// against the writer's CRC without a second pass over the bytes.

/** The Castagnoli polynomial, reflected. */
const POLY = 0x82f63b78;

function times(mat: Uint32Array, vec: number): number {
  let sum = 0;
  for (let i = 0; vec !== 0; i++, vec >>>= 1) if (vec & 1) sum ^= mat[i]!;
  return sum >>> 0;
}

function square(out: Uint32Array, mat: Uint32Array): void {
  for (let n = 0; n < 32; n++) out[n] = times(mat, mat[n]!);
}

/** The 32x32 GF(2) operator that appends `len` zero bytes to a CRC register. */
function zerosOperator(len: number): Uint32Array {
  // Start with the operator for one zero bit, square up to one byte, then multiply by the
  // operator for each set bit of len (in bytes).
  let op = new Uint32Array(32);
  op[0] = POLY;
  for (let n = 1, row = 1; n < 32; n++, row <<= 1) op[n] = row >>> 0;
  let tmp = new Uint32Array(32);
  for (let i = 0; i < 3; i++) {
    square(tmp, op);
    [op, tmp] = [tmp, op];
  }
  // op: 8 zero bits = 1 byte. result = identity, then multiply in op^(2^k) for each set bit k.
  let result: Uint32Array | undefined;
  for (let n = len; n > 0; n = Math.floor(n / 2)) {
    if (n % 2 === 1) {
      if (!result) result = Uint32Array.from(op);
      else {
        const r = new Uint32Array(32);
        for (let i = 0; i < 32; i++) r[i] = times(op, result[i]!);
        result = r;
      }
    }
    square(tmp, op);
    [op, tmp] = [tmp, op];
  }
  if (!result) {
    result = new Uint32Array(32);
    for (let i = 0; i < 32; i++) result[i] = (1 << i) >>> 0;
  }
  return result;
}

/** An operator as four byte-indexed tables: applying it costs four lookups. */
function tables(op: Uint32Array): Uint32Array {
  const t = new Uint32Array(4 * 256);
  for (let k = 0; k < 4; k++) for (let b = 0; b < 256; b++) t[k * 256 + b] = times(op, (b << (8 * k)) >>> 0);
  return t;
}

const shifters = new Map<number, Uint32Array>();

function shifter(len: number): Uint32Array {
  let t = shifters.get(len);
  if (!t) {
    t = tables(zerosOperator(len));
    // Sector sizes and block sizes: a handful of lengths in any process.
    if (shifters.size < 64) shifters.set(len, t);
  }
  return t;
}

/** CRC32C of A‖B from crc(A), crc(B) and B's length. */
export function crc32cCombine(crcA: number, crcB: number, lenB: number): number {
  if (lenB === 0) return crcA >>> 0;
  const t = shifter(lenB);
  const a = crcA >>> 0;
  return (t[a & 0xff]! ^ t[256 + ((a >>> 8) & 0xff)]! ^ t[512 + ((a >>> 16) & 0xff)]! ^ t[768 + (a >>> 24)]! ^ crcB) >>> 0;
}

/**
 * The CRC32C of a whole block from its sector checksums (u32 little-endian each, in order):
 * every sector is `sectorSize` bytes but the last, which holds the rest of `blockSize`.
 */
export function blockCrcFromSectors(sums: Uint8Array, blockSize: number, sectorSize: number): number {
  const n = Math.ceil(blockSize / sectorSize);
  const view = new DataView(sums.buffer, sums.byteOffset, sums.byteLength);
  let crc = view.getUint32(0, true);
  for (let i = 1; i < n; i++) {
    const len = i === n - 1 ? blockSize - (n - 1) * sectorSize : sectorSize;
    crc = crc32cCombine(crc, view.getUint32(i * 4, true), len);
  }
  return crc >>> 0;
}

/**
 * Checks a SectorRead against the writer's CRC of the whole block and returns the bytes of
 * [offset, offset+length). `checkSectors`: also check each sector's bytes against its checksum
 * (needed when the bytes crossed a network; a local store has just done it).
 */
export function verifySectorRead(read: SectorRead, blockSize: number, crc: number, offset: number, length: number, checkSectors: boolean, what: string | (() => string)): Buffer {
  const { sectorSize, sums, data } = read;
  const n = Math.ceil(blockSize / sectorSize);
  if (sums.length !== n * 4 || read.offset % sectorSize !== 0 || offset < read.offset || offset + length > read.offset + data.length)
    throw new TorusError('CORRUPT', `${nameOf(what)}: the replica's answer does not cover ${offset}+${length} of the block`);
  if (blockCrcFromSectors(sums, blockSize, sectorSize) !== crc >>> 0)
    throw new TorusError('CORRUPT', `${nameOf(what)}: its sector checksums do not combine to the writer's CRC (another block's bytes, or damaged)`);
  if (checkSectors) {
    const bad = firstBadSector(data, sectorSize, sums, read.offset / sectorSize);
    if (bad >= 0) throw new TorusError('CORRUPT', `${nameOf(what)}: sector ${bad} does not match its checksum`);
  }
  const at = offset - read.offset;
  return data.subarray(at, at + length);
}

/** `what` may be a function: formatting a block's name on every read cost more than checking it. */
function nameOf(what: string | (() => string)): string {
  return typeof what === 'string' ? what : what();
}

interface SectorCrcAddon {
  sectorCrcs(data: Uint8Array, sectorSize: number, out: Uint8Array): void;
}

function loadSectorCrcs(): SectorCrcAddon | undefined {
  try {
    return loadNativeAddon<SectorCrcAddon>('block_write');
  } catch {
    return undefined;
  }
}

// The one place the addon's CRC function is loaded: reads check sectors with it, the store's
// writes compute them with it (storage/format.ts). storage/batch-write.ts loads the same addon for
// its writes, which TORUS_NATIVE_WRITES=0 turns off; checksums stay native either way.
const sectorAddon = loadSectorCrcs();
let scratch = Buffer.allocUnsafeSlow(1024);

/**
 * The CRC32C of each `sectorSize` bytes of `data` (the last may be short) into `out`, u32 LE, in
 * one native call; false (nothing done) without the addon.
 */
export function nativeSectorCrcs(data: Uint8Array, sectorSize: number, out: Uint8Array): boolean {
  if (sectorAddon === undefined) return false;
  sectorAddon.sectorCrcs(data, sectorSize, out);
  return true;
}

/**
 * The first sector of `data` whose CRC32C is not the one `sums` holds for it, or -1. `data`
 * starts at sector `s0` of a block whose sector checksums `sums` are (u32 LE); its last sector may
 * be short. One native call for all the sectors where the addon is built (a 64 KiB block was 16
 * calls and 16 views; a single 4 KiB sector, a random read's, was a view and a call to
 * @node-rs/crc32, about twice the native call's cost), then a comparison of the two arrays.
 */
export function firstBadSector(data: Uint8Array, sectorSize: number, sums: Buffer, s0: number): number {
  const n = Math.ceil(data.length / sectorSize);
  if (sectorAddon !== undefined) {
    if (scratch.length < n * 4) scratch = Buffer.allocUnsafeSlow(n * 4);
    sectorAddon.sectorCrcs(data, sectorSize, scratch);
    for (let i = 0; i < n; i++) if (scratch.readUInt32LE(i * 4) !== sums.readUInt32LE((s0 + i) * 4)) return s0 + i;
    return -1;
  }
  const view = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  for (let i = 0; i < n; i++) {
    const at = i * sectorSize;
    if (crc32c(view.subarray(at, Math.min(at + sectorSize, view.length))) >>> 0 !== sums.readUInt32LE((s0 + i) * 4)) return s0 + i;
  }
  return -1;
}
