// Child process for powercut.test.ts, run with the power-cut preload: one scenario of file
// changes, some synced and some not, then it kills itself as a power cut would end it.
//
//   TORUS_POWERCUT_DIR=LOG node --import powercut-preload.js powercut-child.js SCENARIO DIR

import { closeSync, fdatasyncSync, fsyncSync, mkdirSync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { open, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { loadNativeAddon } from '../core/native.js';
import { WriteBatcher } from './batch-write.js';

const [scenario, dir] = process.argv.slice(2);
if (!scenario || !dir) throw new Error('usage: powercut-child SCENARIO DIR');

function syncDir(path: string): void {
  const fd = openSync(path, 'r');
  fsyncSync(fd);
  closeSync(fd);
}

switch (scenario) {
  case 'writes': {
    // A file that exists durably: one synced write, then one that is not.
    const fh = await open(join(dir, 'f'), 'r+');
    await fh.write(Buffer.alloc(8192, 1), 0, 8192, 0);
    await fh.datasync();
    await fh.write(Buffer.alloc(4096, 2), 0, 4096, 4096);
    await fh.write(Buffer.alloc(4096, 3), 0, 4096, 8192); // grows the file
    await fh.truncate(20_000); // and more
    break;
  }
  case 'create': {
    // Synced contents, but the directory entry was never synced.
    const fd = openSync(join(dir, 'new'), 'w');
    writeSync(fd, 'hello');
    fsyncSync(fd);
    closeSync(fd);
    mkdirSync(join(dir, 'sub', 'deeper'), { recursive: true });
    break;
  }
  case 'create-synced': {
    const fd = openSync(join(dir, 'new'), 'w');
    writeSync(fd, 'hello');
    fsyncSync(fd);
    closeSync(fd);
    syncDir(dir);
    break;
  }
  case 'rename': {
    // The classic atomic replace, without the directory fsync that makes it durable.
    const fd = openSync(join(dir, 'f.tmp'), 'w');
    writeSync(fd, 'new contents');
    fsyncSync(fd);
    closeSync(fd);
    renameSync(join(dir, 'f.tmp'), join(dir, 'f'));
    break;
  }
  case 'rename-synced': {
    const fd = openSync(join(dir, 'f.tmp'), 'w');
    writeSync(fd, 'new contents');
    fsyncSync(fd);
    closeSync(fd);
    await rename(join(dir, 'f.tmp'), join(dir, 'f'));
    syncDir(dir);
    break;
  }
  case 'unlink': {
    await rm(join(dir, 'f'));
    rmSync(join(dir, 'g'), { force: true });
    syncDir(join(dir, 'other'));
    break;
  }
  case 'native': {
    // The store's batched writes (native/block_write.c, in the thread pool).
    if (!WriteBatcher.available) throw new Error('the block_write addon is not built');
    const fd = openSync(join(dir, 'f'), 'r+');
    const batcher = new WriteBatcher();
    await batcher.submit([[fd, Buffer.alloc(4096, 1), 0]], fd); // synced by its own job
    await batcher.submit([[fd, Buffer.alloc(4096, 2), 4096]]); // done, synced by the fdatasync below
    const addon = loadNativeAddon<{ writeBatch(...args: unknown[]): void }>('block_write')!;
    await new Promise<void>((resolve) => {
      addon.writeBatch(Int32Array.of(fd), Float64Array.of(8192), [Buffer.alloc(4096, 3)], Uint32Array.of(1), () => resolve());
      // Started while that job had not reported done: it may have run before the write.
      fdatasyncSync(fd);
    });
    // Another file: a job's own sync covers its write; one after it (growing the file) is lost.
    const g = openSync(join(dir, 'g'), 'r+');
    await batcher.submit([[g, Buffer.alloc(4096, 5), 0]], g);
    await batcher.submit([[g, Buffer.alloc(4096, 6), 4096]]);
    break;
  }
  default:
    throw new Error(`unknown scenario ${scenario}`);
}
process.kill(process.pid, 'SIGKILL');
