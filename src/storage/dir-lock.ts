// Keeps two stores (two torusd processes, or two opens in one process) from using one data dir:
// both would allocate the same free slots and overwrite each other's blocks.
//
// Node has no flock(), so the lock is a file holding the owner's pid. A lock left by a process
// that died (kill -9, power cut) is taken over when that pid no longer runs. PIDs are only
// unique per PID namespace: containers sharing one data dir are not protected.

import { open, readFile, rm } from 'node:fs/promises';
import { resolve } from 'node:path';
import { TorusError } from '../core/errors.js';

const heldInProcess = new Set<string>();

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it exists but belongs to someone else.
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export interface DirLock {
  release(): Promise<void>;
}

export async function lockDir(dir: string, lockPath: string): Promise<DirLock> {
  const key = resolve(dir);
  if (heldInProcess.has(key)) throw new TorusError('LOCKED', `block store in ${dir} is already open in this process`);
  heldInProcess.add(key);
  try {
    for (let attempt = 0; ; attempt++) {
      try {
        const fh = await open(lockPath, 'wx');
        try {
          await fh.writeFile(`${process.pid}\n`);
        } finally {
          await fh.close();
        }
        break;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || attempt > 0) throw err;
      }
      const owner = Number.parseInt(await readFile(lockPath, 'utf8').catch(() => ''), 10);
      if (Number.isInteger(owner) && owner > 0 && owner !== process.pid && processAlive(owner))
        throw new TorusError('LOCKED', `block store in ${dir} is in use by process ${owner} (lock file ${lockPath})`);
      await rm(lockPath, { force: true });
    }
  } catch (err) {
    heldInProcess.delete(key);
    if (err instanceof TorusError) throw err;
    throw new TorusError('IO', `cannot lock block store in ${dir}: ${(err as Error).message}`, { cause: err });
  }
  let released = false;
  return {
    async release() {
      if (released) return;
      released = true;
      heldInProcess.delete(key);
      await rm(lockPath, { force: true });
    },
  };
}
