// Child process for powercut.test.ts, run with the power-cut preload: one scenario of file
// changes, some synced and some not, then it kills itself as a power cut would end it.
//
//   TORUS_POWERCUT_DIR=LOG node --import powercut-preload.js powercut-child.js SCENARIO DIR

import { closeSync, fsyncSync, mkdirSync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { open, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';

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
  default:
    throw new Error(`unknown scenario ${scenario}`);
}
process.kill(process.pid, 'SIGKILL');
