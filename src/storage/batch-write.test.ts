import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { crc32c } from '@node-rs/crc32';
import { nativeSectorCrcs } from '../core/crc.js';
import { SyncFailure, WriteBatcher, WriteFailure } from './batch-write.js';
import { withTmpDir } from './testing.js';

describe('WriteBatcher (native/block_write.c)', { skip: !WriteBatcher.available && 'the block_write addon is not built' }, () => {
  it('writes the groups submitted in one turn in one job; a failed write stops its group only', () =>
    withTmpDir(async (dir) => {
      const file = join(dir, 'f');
      const fd = openSync(file, 'w+');
      try {
        const b = new WriteBatcher();
        const results = await Promise.allSettled([
          b.submit([
            [fd, Buffer.from('hello'), 0],
            [fd, Buffer.from('world'), 10],
          ]),
          // The second write goes to a descriptor that is not open: the third is never made.
          b.submit([
            [fd, Buffer.from('AB'), 5],
            [-1, Buffer.from('x'), 0],
            [fd, Buffer.from('never'), 20],
          ]),
          b.submit([[fd, Buffer.from('!'), 15]]),
        ]);
        assert.deepEqual(
          results.map((r) => r.status),
          ['fulfilled', 'rejected', 'fulfilled'],
        );
        const err = (results[1] as PromiseRejectedResult).reason as WriteFailure;
        assert.ok(err instanceof WriteFailure);
        assert.equal(err.index, 1);
        assert.equal((err as NodeJS.ErrnoException).code, 'EBADF');
        assert.equal(readFileSync(file).toString('latin1'), 'helloAB\0\0\0world!');
        assert.deepEqual([b.jobs, b.groups], [1, 3]);
        await b.submit([[fd, Buffer.from('?'), 16]]);
        assert.equal(b.jobs, 2, 'a later turn is another job');
      } finally {
        closeSync(fd);
      }
    }));
});

describe('WriteBatcher: writes made durable in the same job', { skip: !WriteBatcher.available && 'the block_write addon is not built' }, () => {
  it('ends the job with an fdatasync of the file asked for, reports its failure to the groups that asked, and syncs one file per job', () =>
    withTmpDir(async (dir) => {
      const file = join(dir, 'f');
      const fd = openSync(file, 'w+');
      // fdatasync of a FIFO fails with EINVAL: proof that the job called it, and on which fd.
      const fifo = join(dir, 'fifo');
      assert.equal(spawnSync('mkfifo', [fifo]).status, 0);
      const pipeWrite = openSync(fifo, 'r+');
      try {
        const b = new WriteBatcher();
        await b.submit([[fd, Buffer.from('one'), 0]], fd);
        assert.equal(b.jobs, 1);
        const results = await Promise.allSettled([
          b.submit([[fd, Buffer.from('two'), 3]], pipeWrite),
          b.submit([[fd, Buffer.from('three'), 6]]),
          b.submit([[fd, Buffer.from('four'), 11]], fd),
        ]);
        assert.deepEqual(
          results.map((r) => r.status),
          ['rejected', 'fulfilled', 'fulfilled'],
        );
        const err = (results[0] as PromiseRejectedResult).reason as SyncFailure;
        assert.ok(err instanceof SyncFailure, String(err));
        assert.equal((err as NodeJS.ErrnoException).code, 'EINVAL');
        // The write itself was made; only its sync failed.
        assert.equal(readFileSync(file).toString('latin1'), 'onetwothreefour');
        // The group that wanted another file synced went in a job of its own.
        assert.equal(b.jobs, 3);
      } finally {
        closeSync(fd);
        closeSync(pipeWrite);
      }
    }));
});

describe('nativeSectorCrcs', { skip: !WriteBatcher.available && 'the block_write addon is not built' }, () => {
  it('gives the CRC32C of every sector, a short last one included, as crc32c does', () => {
    for (const [size, sector] of [
      [512 * 1024, 4096],
      [65536, 512],
      [10_000, 4096],
      [7, 4096],
      [4096 * 3 + 13, 4096],
    ] as const) {
      const data = Buffer.alloc(size);
      for (let i = 0; i < size; i++) data[i] = (i * 2654435761) >>> 24;
      const n = Math.ceil(size / sector);
      const out = Buffer.alloc(n * 4 + 4, 0xee);
      assert.equal(nativeSectorCrcs(data, sector, out), true);
      for (let s = 0; s < n; s++) assert.equal(out.readUInt32LE(s * 4), crc32c(data.subarray(s * sector, Math.min(size, (s + 1) * sector))) >>> 0, `size ${size} sector ${s}`);
      assert.equal(out.readUInt32LE(n * 4), 0xeeeeeeee, 'nothing written past the last sector');
    }
  });
});
