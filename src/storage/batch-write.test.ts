import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { WriteBatcher, WriteFailure } from './batch-write.js';
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
