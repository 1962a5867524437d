import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { it } from 'node:test';
import { FileBlockStore } from './file-store.js';
import { crashBlock, crashRef, makeTmpDir, padded, removeDir } from './testing.js';

const CHILD = fileURLToPath(new URL('./crash-child.js', import.meta.url));
const BLOCK_SIZE = 64 * 1024;
const SLOTS = 32;
const ITERATIONS = 5;
const TIME_CAP_MS = 12_000;

interface ChildRun {
  /** Puts covered by a completed flush: must survive. */
  acked: Set<number>;
  /** Deletes covered by a completed flush: must stay deleted. */
  deleted: Set<number>;
  /** Deletes started: these blocks may be gone even if not acknowledged. */
  deleting: Set<number>;
  killedAfterMs: number;
}

/**
 * Runs the writer, kills it -9 `delayMs` after it has opened the store (or after spawning it, so
 * the kill may land inside open or format), and returns what it had acknowledged.
 */
async function runAndKill(dir: string, first: number, delayMs: number, from: 'spawn' | 'ready'): Promise<ChildRun> {
  const child = spawn(process.execPath, [CHILD, dir, String(BLOCK_SIZE), String(SLOTS), String(first)], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  let timer: NodeJS.Timeout | undefined;
  const arm = (): void => {
    timer ??= setTimeout(() => child.kill('SIGKILL'), delayMs);
  };
  child.stdout.setEncoding('utf8').on('data', (d: string) => {
    out += d;
    if (out.startsWith('ready\n')) arm();
  });
  child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  const exited = new Promise<NodeJS.Signals | number | null>((resolve) => child.on('close', (code, signal) => resolve(signal ?? code)));
  const start = Date.now();
  if (from === 'spawn') arm();
  const guard = setTimeout(() => child.kill('SIGKILL'), 10_000); // a child stuck before 'ready'
  const how = await exited;
  clearTimeout(timer);
  clearTimeout(guard);
  assert.equal(how, 'SIGKILL', `crash child ended by itself (${String(how)}): ${err}`);
  const sets = { P: new Set<number>(), D: new Set<number>(), d: new Set<number>() };
  for (const line of out.split('\n')) {
    const m = /^([PDd]) (\d+)$/.exec(line);
    if (m) sets[m[1] as 'P' | 'D' | 'd'].add(Number(m[2]));
  }
  return { acked: sets.P, deleted: sets.D, deleting: sets.d, killedAfterMs: Date.now() - start };
}

it('keeps every acknowledged block through kill -9 at random moments', async (t) => {
  const dir = await makeTmpDir();
  const deadline = Date.now() + TIME_CAP_MS;
  let totalAcked = 0;
  let kills = 0;
  try {
    for (let iter = 0; iter < ITERATIONS && Date.now() < deadline; iter++, kills++) {
      const from = iter === 0 ? 'spawn' : 'ready';
      const delay = from === 'spawn' ? Math.floor(Math.random() * 200) : 20 + Math.floor(Math.random() * 400);
      const run = await runAndKill(dir, iter * 1_000_000, delay, from);
      const what = `iteration ${iter}, killed after ${run.killedAfterMs} ms`;
      totalAcked += run.acked.size;
      const s = await FileBlockStore.open({ dir, blockSize: BLOCK_SIZE, sizeBytes: SLOTS * BLOCK_SIZE });
      try {
        for (const i of run.acked) {
          if (run.deleting.has(i)) continue;
          assert.ok(s.hasBlock(crashRef(i)), `${what}: acknowledged block ${i} is missing`);
        }
        for (const i of run.deleted) assert.equal(s.hasBlock(crashRef(i)), false, `${what}: deleted block ${i} came back`);
        // Whatever is present, acknowledged or not, must read back exactly.
        for (const ref of s.refs()) {
          assert.deepEqual(await s.getBlock(ref), padded(crashBlock(ref.index, BLOCK_SIZE), BLOCK_SIZE), `${what}: block ${ref.index}`);
          await s.deleteBlock(ref);
        }
        assert.equal(s.stats().checksumFailures, 0);
      } finally {
        await s.close();
      }
    }
    t.diagnostic(`${kills} kills, ${totalAcked} acknowledged blocks checked`);
    assert.ok(totalAcked > 0, 'the child never acknowledged a block: the test exercised nothing');
  } finally {
    await removeDir(dir);
  }
});
