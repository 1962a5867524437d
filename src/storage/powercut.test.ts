import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, it } from 'node:test';
import { applyPowerCut, logFiles, POWERCUT_ENV } from './powercut.js';
import { makeTmpDir, removeDir } from './testing.js';

// The harness itself: what survives a cut is exactly what an fsync (of the file, or of the
// directory for names) covered. These also show it can fail a test: each scenario loses
// something real.

const PRELOAD = fileURLToPath(new URL('./powercut-preload.js', import.meta.url));
const CHILD = fileURLToPath(new URL('./powercut-child.js', import.meta.url));

async function runChild(scenario: string, dir: string, log: string): Promise<void> {
  const child = spawn(process.execPath, ['--import', PRELOAD, CHILD, scenario, dir], { env: { ...process.env, [POWERCUT_ENV]: log }, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const how = await new Promise((r) => child.on('close', (code, signal) => r(signal ?? code)));
  assert.equal(how, 'SIGKILL', `child ended by itself: ${err}`);
}

async function scenario(name: string, setup: (dir: string) => void, check: (dir: string) => void): Promise<void> {
  const root = await makeTmpDir();
  try {
    const dir = join(root, 'data');
    const log = join(root, 'log');
    mkdirSync(dir);
    setup(dir);
    await runChild(name, dir, log);
    applyPowerCut(log);
    check(dir);
    assert.deepEqual(logFiles(log).filter((f) => f !== 'backups'), [], 'the log is cleared for the next process');
  } finally {
    await removeDir(root);
  }
}

describe('power-cut harness', () => {
  it('keeps synced writes and drops the rest, sizes included', () =>
    scenario(
      'writes',
      (dir) => writeFileSync(join(dir, 'f'), Buffer.alloc(100, 9)),
      (dir) => assert.deepEqual(readFileSync(join(dir, 'f')), Buffer.alloc(8192, 1)),
    ));

  it("sees the store's native batched writes: a job's own sync and a later fdatasync cover them; one in flight then, or written after, is lost", () =>
    scenario(
      'native',
      (dir) => {
        writeFileSync(join(dir, 'f'), Buffer.alloc(12288, 9));
        writeFileSync(join(dir, 'g'), Buffer.alloc(4096, 9));
      },
      (dir) => {
        assert.deepEqual(readFileSync(join(dir, 'f')), Buffer.concat([Buffer.alloc(4096, 1), Buffer.alloc(4096, 2), Buffer.alloc(4096, 9)]));
        assert.deepEqual(readFileSync(join(dir, 'g')), Buffer.alloc(4096, 5));
      },
    ));

  it('drops a created file and directories whose directory was not synced, even with synced contents', () =>
    scenario(
      'create',
      () => undefined,
      (dir) => {
        assert.equal(existsSync(join(dir, 'new')), false);
        assert.equal(existsSync(join(dir, 'sub')), false);
      },
    ));

  it('keeps a created file once its directory is synced', () =>
    scenario(
      'create-synced',
      () => undefined,
      (dir) => assert.equal(readFileSync(join(dir, 'new'), 'utf8'), 'hello'),
    ));

  it('undoes a rename over a file unless the directory was synced', async () => {
    await scenario(
      'rename',
      (dir) => writeFileSync(join(dir, 'f'), 'old'),
      (dir) => {
        assert.equal(readFileSync(join(dir, 'f'), 'utf8'), 'old');
        // The temporary file's own name was never synced either.
        assert.equal(existsSync(join(dir, 'f.tmp')), false);
      },
    );
    await scenario(
      'rename-synced',
      (dir) => writeFileSync(join(dir, 'f'), 'old'),
      (dir) => {
        assert.equal(readFileSync(join(dir, 'f'), 'utf8'), 'new contents');
        assert.equal(existsSync(join(dir, 'f.tmp')), false);
      },
    );
  });

  it('brings back a removed file whose directory was not synced', () =>
    scenario(
      'unlink',
      (dir) => {
        writeFileSync(join(dir, 'f'), 'keep me');
        writeFileSync(join(dir, 'g'), 'me too');
        mkdirSync(join(dir, 'other'));
      },
      (dir) => {
        assert.equal(readFileSync(join(dir, 'f'), 'utf8'), 'keep me');
        assert.equal(readFileSync(join(dir, 'g'), 'utf8'), 'me too');
      },
    ));

  it('random mode keeps each unsynced sector or not: all kept, or all dropped', async () => {
    for (const [coin, expect] of [
      [() => 0, Buffer.concat([Buffer.alloc(4096, 1), Buffer.alloc(4096, 2), Buffer.alloc(4096, 3), Buffer.alloc(20_000 - 12_288)])],
      [() => 0.99, Buffer.alloc(8192, 1)],
    ] as const) {
      const root = await makeTmpDir();
      try {
        const dir = join(root, 'data');
        mkdirSync(dir);
        writeFileSync(join(dir, 'f'), Buffer.alloc(100, 9));
        await runChild('writes', dir, join(root, 'log'));
        const report = applyPowerCut(join(root, 'log'), { keep: 'random', random: coin });
        const got = readFileSync(join(dir, 'f'));
        // The truncate is not a write: it is undone either way, back to the last write's size.
        assert.deepEqual(got, expect.subarray(0, coin() < 0.5 ? 12_288 : 8192), `coin ${coin()}: ${JSON.stringify(report)}`);
        assert.equal(statSync(join(dir, 'f')).size, got.length);
      } finally {
        await removeDir(root);
      }
    }
  });
});
