import { BLOCK_REF_SIZE, MAX_VOLUME_ID, encodeBlockRef, placementRef, type BlockRef } from '../core/ids.js';

// The placement hash. Every ring type maps a block to peers through these functions, so their
// output is part of the cluster's data format: a block lives where the hash of its ref points,
// and changing a single bit of this file relocates (almost) every block of every cluster.
// That is why the hash is XXH32 (Yann Collet's xxHash, 32-bit variant, seed 0) written out
// here rather than taken from a package: the specification is public, has reference vectors
// (pinned in hash.test.ts), is identical on every platform and is cheap in JavaScript
// (32-bit multiplies via Math.imul). docs/rings.md describes the exact inputs.

const P1 = 0x9e3779b1;
const P2 = 0x85ebca77;
const P3 = 0xc2b2ae3d;
const P4 = 0x27d4eb2f;
const P5 = 0x165667b1;

function rotl(x: number, r: number): number {
  return (x << r) | (x >>> (32 - r));
}

function readU32LE(b: Uint8Array, i: number): number {
  return ((b[i] as number) | ((b[i + 1] as number) << 8) | ((b[i + 2] as number) << 16) | ((b[i + 3] as number) << 24)) >>> 0;
}

function round(acc: number, lane: number): number {
  return Math.imul(rotl((acc + Math.imul(lane, P2)) | 0, 13), P1);
}

/** XXH32 of `bytes[0, length)` (length defaults to the whole array), as an unsigned 32-bit integer. */
export function xxh32(bytes: Uint8Array, seed = 0, length = bytes.length): number {
  let i = 0;
  let h: number;
  if (length >= 16) {
    let v1 = (seed + P1 + P2) | 0;
    let v2 = (seed + P2) | 0;
    let v3 = seed | 0;
    let v4 = (seed - P1) | 0;
    const limit = length - 16;
    while (i <= limit) {
      v1 = round(v1, readU32LE(bytes, i));
      v2 = round(v2, readU32LE(bytes, i + 4));
      v3 = round(v3, readU32LE(bytes, i + 8));
      v4 = round(v4, readU32LE(bytes, i + 12));
      i += 16;
    }
    h = (rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18)) | 0;
  } else {
    h = (seed + P5) | 0;
  }
  // The spec adds the length modulo 2^32.
  h = (h + length) | 0;
  while (i + 4 <= length) {
    h = Math.imul(rotl((h + Math.imul(readU32LE(bytes, i), P3)) | 0, 17), P4);
    i += 4;
  }
  while (i < length) {
    h = Math.imul(rotl((h + Math.imul(bytes[i] as number, P5)) | 0, 11), P1);
    i++;
  }
  h ^= h >>> 15;
  h = Math.imul(h, P2);
  h ^= h >>> 13;
  h = Math.imul(h, P3);
  h ^= h >>> 16;
  return h >>> 0;
}

const TWO32 = 2 ** 32;

function inRange(n: number, max: number): boolean {
  return Number.isSafeInteger(n) && n >= 0 && n <= max;
}

/**
 * The point of a block on the hash circle: XXH32 (seed 0) of the 24-byte wire encoding
 * (core/ids.ts `encodeBlockRef`) of its placement ref (`placementRef`: the ref itself, except
 * that the log blocks of one journal segment all hash as the segment). Throws INVALID_ARGUMENT
 * for a ref that cannot be encoded.
 */
export function hashBlockRef(ref: BlockRef): number {
  const { type, volume, inode, index } = placementRef(ref);
  // Lookups sit on every read and write, and encoding through DataViews costs more than the
  // hash, so the six little-endian words of the encoding are computed directly. Anything
  // unusual takes the byte path, which also raises the proper error.
  if (!(inRange(volume, MAX_VOLUME_ID) && inRange(inode, Number.MAX_SAFE_INTEGER) && inRange(index, Number.MAX_SAFE_INTEGER) && inRange(type, 0x7ff)))
    return hashBlockRefBytes(ref);
  return xxh32Words6(
    volume >>> 0,
    type * 256 + Math.floor(volume / TWO32),
    inode >>> 0,
    Math.floor(inode / TWO32),
    index >>> 0,
    Math.floor(index / TWO32),
  );
}

/** hashBlockRef through the literal encoding; the reference the fast path is tested against. */
export function hashBlockRefBytes(ref: BlockRef): number {
  const buf = new Uint8Array(BLOCK_REF_SIZE);
  encodeBlockRef(placementRef(ref), buf);
  return xxh32(buf);
}

/** xxh32(seed 0) of 24 bytes given as six little-endian 32-bit words. */
function xxh32Words6(w0: number, w1: number, w2: number, w3: number, w4: number, w5: number): number {
  const v1 = round((P1 + P2) | 0, w0);
  const v2 = round(P2, w1);
  const v3 = round(0, w2);
  const v4 = round(-P1 | 0, w3);
  let h = (rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18) + BLOCK_REF_SIZE) | 0;
  h = Math.imul(rotl((h + Math.imul(w4, P3)) | 0, 17), P4);
  h = Math.imul(rotl((h + Math.imul(w5, P3)) | 0, 17), P4);
  h ^= h >>> 15;
  h = Math.imul(h, P2);
  h ^= h >>> 13;
  h = Math.imul(h, P3);
  h ^= h >>> 16;
  return h >>> 0;
}

const utf8 = new TextEncoder();

/** UTF-8 bytes of a peer uuid; rings order peers by these bytes, and ketama hashes them. */
export function uuidBytes(uuid: string): Uint8Array {
  return utf8.encode(uuid);
}

/** Unsigned byte-wise comparison, so the order is the same in every language. */
export function compareBytes(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const d = (a[i] as number) - (b[i] as number);
    if (d !== 0) return d;
  }
  return a.length - b.length;
}

/**
 * Hashes the labels `<uuid>-0`, `<uuid>-1`, ... `<uuid>-(count-1)` (decimal, no padding) into
 * `out[offset ...]`. The label buffer is reused so building a large ring allocates once per peer.
 */
export function hashVnodeLabels(uuid: Uint8Array, count: number, out: Uint32Array, offset: number): void {
  const label = new Uint8Array(uuid.length + 1 + 16);
  label.set(uuid, 0);
  label[uuid.length] = 0x2d; // '-'
  const digitsAt = uuid.length + 1;
  const digits = new Uint8Array(16);
  for (let i = 0; i < count; i++) {
    let n = i;
    let d = 0;
    do {
      digits[d++] = 0x30 + (n % 10);
      n = Math.floor(n / 10);
    } while (n > 0);
    for (let k = 0; k < d; k++) label[digitsAt + k] = digits[d - 1 - k] as number;
    out[offset + i] = xxh32(label, 0, digitsAt + d);
  }
}
