// Helpers for the storage tests (and for other modules' tests that need a store). Not used by
// production code.

import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockType, type BlockRef } from '../core/ids.js';
import { HEADER_COPY_OFFSETS, HEADER_COPY_SIZE, TABLE_FILE, decodeHeader, type StoreHeader } from './format.js';

/** Deterministic bytes for a seed, so a checker can rebuild what a writer stored. */
export function pattern(seed: number, length: number): Buffer {
  const buf = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761 + 0x9e3779b9) >>> 0 || 1;
  let i = 0;
  for (; i + 4 <= length; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf.writeUInt32LE(x, i);
  }
  for (; i < length; i++) buf[i] = (x >>> (8 * (i & 3))) & 0xff;
  return buf;
}

export function dataRef(volume: number, inode: number, index: number): BlockRef {
  return { type: BlockType.Data, volume, inode, index };
}

export async function withTmpDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'torus-storage-'));
  try {
    return await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export async function makeTmpDir(): Promise<string> {
  return mkdtemp(join(tmpdir(), 'torus-storage-'));
}

export async function removeDir(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
}

/** `length` bytes at `offset` of one of a store's files, read as a disk holds them. */
export async function peek(dir: string, file: string, offset: number, length: number): Promise<Buffer> {
  const fh = await open(join(dir, file), 'r');
  try {
    const buf = Buffer.alloc(length);
    await fh.read(buf, 0, length, offset);
    return buf;
  } finally {
    await fh.close();
  }
}

/** The header a reader of the store in `dir` goes by, as on disk: the valid copy with the highest sequence. */
export async function headerOnDisk(dir: string): Promise<StoreHeader | undefined> {
  const copies = await Promise.all(HEADER_COPY_OFFSETS.map(async (off) => decodeHeader(await peek(dir, TABLE_FILE, off, HEADER_COPY_SIZE))));
  return copies.reduce((a, b) => (b && (!a || b.sequence > a.sequence) ? b : a), undefined);
}

/** The stored form of `data`: zero-padded to the block size. */
export function padded(data: Uint8Array, blockSize: number): Buffer {
  const out = Buffer.alloc(blockSize);
  out.set(data);
  return out;
}

/** The block the crash test writes for index `i`: some full, some short. */
export function crashBlock(i: number, blockSize: number): Buffer {
  return pattern(i, i % 3 === 0 ? 1 + ((i * 7919) % blockSize) : blockSize);
}

export function crashRef(i: number): BlockRef {
  return dataRef(7, 1, i);
}

/** Bytes the crash child appends to a log block per round. */
export const CRASH_LOG_PIECE = 8192;

export function crashLogRef(i: number): BlockRef {
  return { type: BlockType.Log, volume: 7, inode: 1, index: i };
}

/** What the crash child appends to log block `i` at offset `at`. */
export function crashLogPiece(i: number, at: number): Buffer {
  return pattern(i * 1000 + at / CRASH_LOG_PIECE, CRASH_LOG_PIECE);
}
