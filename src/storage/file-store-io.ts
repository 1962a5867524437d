// Positional I/O on a FileBlockStore's files and the errors it reports, shared by opening
// (file-store-open.ts), reading (file-store-read.ts) and writing (file-store.ts).

import { read as fsRead, write as fsWrite, writev as fsWritev } from 'node:fs';
import { stat, type FileHandle } from 'node:fs/promises';
import { TorusError, isTorusError } from '../core/errors.js';
import { readCached } from './page-cache.js';

export function noop(): void {}

// Through the fd with callbacks rather than FileHandle's promise methods: on the 4 KiB read path
// the FileHandle wrapper cost about a third more CPU per call (measured in Node 20). Callers keep
// the handle open while a call is pending (enter/leave), so the fd cannot be closed under it.
function pread(fd: number, buf: Uint8Array, off: number, len: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => fsRead(fd, buf, off, len, position, (err, n) => (err ? reject(err) : resolve(n))));
}

function pwrite(fd: number, buf: Uint8Array, off: number, len: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => fsWrite(fd, buf, off, len, position, (err, n) => (err ? reject(err) : resolve(n))));
}

function pwritev(fd: number, bufs: Uint8Array[], position: number): Promise<number> {
  return new Promise((resolve, reject) => fsWritev(fd, bufs, position, (err, n) => (err ? reject(err) : resolve(n))));
}

export async function readFull(fh: FileHandle, buf: Buffer, position: number): Promise<void> {
  // What the page cache holds is read right here; only the rest waits for the thread pool.
  let off = readCached(fh.fd, buf, position);
  while (off < buf.length) {
    const bytesRead = await pread(fh.fd, buf, off, buf.length - off, position + off);
    if (bytesRead === 0) throw new TorusError('IO', `short read at offset ${position + off}: file ends early`);
    off += bytesRead;
  }
}

export async function writeFull(fh: FileHandle, buf: Uint8Array, position: number): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const bytesWritten = await pwrite(fh.fd, buf, off, buf.length - off, position + off);
    if (bytesWritten <= 0) throw new TorusError('IO', `write at offset ${position + off} made no progress`);
    off += bytesWritten;
  }
}

/** Writes `head` then `tail` contiguously; one syscall in the common case. */
export async function writeTwo(fh: FileHandle, head: Uint8Array, tail: Uint8Array, position: number): Promise<void> {
  const bytesWritten = await pwritev(fh.fd, [head, tail], position);
  if (bytesWritten === head.length + tail.length) return;
  if (bytesWritten < head.length) {
    await writeFull(fh, head.subarray(bytesWritten), position + bytesWritten);
    await writeFull(fh, tail, position + head.length);
  } else {
    const done = bytesWritten - head.length;
    await writeFull(fh, tail.subarray(done), position + bytesWritten);
  }
}

export async function fileSize(path: string): Promise<number | undefined> {
  try {
    return (await stat(path)).size;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

export function ioError(what: string, err: unknown, dir: string): TorusError {
  if (isTorusError(err)) return err;
  const e = err as NodeJS.ErrnoException;
  if (e.code === 'ENOSPC')
    return new TorusError('OUT_OF_SPACE', `filesystem holding ${dir} is full while ${what} (the store's files are sparse)`, { cause: err });
  return new TorusError('IO', `${what} in ${dir}: ${e.message}`, { cause: err });
}
