// Keeps two stores (two torusd processes, or two opens in one process) from using one data dir:
// both would allocate the same free slots and overwrite each other's blocks.
//
// The lock is an flock() on the lock file (native/file_lock.c), held by the open file for as long
// as the store is open. The kernel drops it when its holder dies, however it dies, so there is no
// stale lock to take over: a pid file alone let two processes that found the same dead pid both
// replace it and both go ahead, and pids mean nothing across containers sharing a data dir. The
// file also holds the holder's pid, for the message a refused open prints; it is never deleted
// (deleting it would let a waiter lock a file no longer at that name while a newcomer locks a new
// one).

import { closeSync, constants, ftruncateSync, openSync, readFileSync, writeSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { resolve } from 'node:path';
import { TorusError } from '../core/errors.js';
import { loadNativeAddon } from '../core/native.js';

interface FileLockAddon {
  tryLock(fd: number): number;
}

let addon: FileLockAddon | undefined;

function fileLock(): FileLockAddon {
  addon ??= loadNativeAddon<FileLockAddon>('file_lock');
  if (!addon) throw new TorusError('IO', 'the data-dir lock needs the native addon file_lock, which is not built: run `npm run build:native`');
  return addon;
}

const errno = osConstants.errno;
const heldInProcess = new Set<string>();

export interface DirLock {
  release(): Promise<void>;
}

export async function lockDir(dir: string, lockPath: string): Promise<DirLock> {
  const key = resolve(dir);
  if (heldInProcess.has(key)) throw new TorusError('LOCKED', `block store in ${dir} is already open in this process`);
  const lock = fileLock();
  let fd: number;
  try {
    fd = openSync(lockPath, constants.O_RDWR | constants.O_CREAT, 0o600);
  } catch (err) {
    throw new TorusError('IO', `cannot lock block store in ${dir}: ${(err as Error).message}`, { cause: err });
  }
  const rc = lock.tryLock(fd);
  if (rc !== 0) {
    closeSync(fd);
    if (rc === errno.EWOULDBLOCK || rc === errno.EAGAIN) {
      const owner = Number.parseInt(safeRead(lockPath), 10);
      const who = Number.isInteger(owner) && owner > 0 ? `process ${owner}` : 'another process';
      throw new TorusError('LOCKED', `block store in ${dir} is in use by ${who} (lock file ${lockPath})`);
    }
    throw new TorusError('IO', `cannot lock block store in ${dir}: flock failed with errno ${rc}`);
  }
  heldInProcess.add(key);
  try {
    ftruncateSync(fd, 0);
    writeSync(fd, `${process.pid}\n`, 0);
  } catch {
    // The pid is only for messages; the lock is what counts.
  }
  let released = false;
  return {
    async release() {
      if (released) return;
      released = true;
      heldInProcess.delete(key);
      closeSync(fd);
    },
  };
}

function safeRead(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}
