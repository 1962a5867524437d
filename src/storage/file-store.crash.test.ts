import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { it } from 'node:test';
import { FileBlockStore } from './file-store.js';
import { applyPowerCut, POWERCUT_ENV } from './powercut.js';
import { BlockType } from '../core/ids.js';
import { CRASH_LOG_PIECE, crashBlock, crashLogPiece, crashLogRef, crashRef, makeTmpDir, padded, removeDir } from './testing.js';

const CHILD = fileURLToPath(new URL('./crash-child.js', import.meta.url));
const PRELOAD = fileURLToPath(new URL('./powercut-preload.js', import.meta.url));
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
  /** Journal appends covered by a completed flush, as [log block, offset]. */
  appended: [number, number][];
  /** Log blocks whose seal a completed flush covered. */
  sealed: Set<number>;
  /** Log blocks whose delete started. */
  logsDeleting: Set<number>;
  killedAfterMs: number;
}

/**
 * Runs the writer, kills it -9 `delayMs` after it has opened the store (or after spawning it, so
 * the kill may land inside open or format), and returns what it had acknowledged.
 */
async function runAndKill(dir: string, first: number, delayMs: number, from: 'spawn' | 'ready', powercutLog: string | undefined, fsWrites: boolean): Promise<ChildRun> {
  const preload = powercutLog ? ['--import', PRELOAD] : [];
  const env: NodeJS.ProcessEnv = { ...process.env, TORUS_NATIVE_WRITES: fsWrites ? '0' : '1' };
  if (powercutLog) env[POWERCUT_ENV] = powercutLog;
  const child = spawn(process.execPath, [...preload, CHILD, dir, String(BLOCK_SIZE), String(SLOTS), String(first)], { stdio: ['ignore', 'pipe', 'pipe'], env });
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
  const sets = { P: new Set<number>(), D: new Set<number>(), d: new Set<number>(), S: new Set<number>(), l: new Set<number>() };
  const appended: [number, number][] = [];
  for (const line of out.split('\n')) {
    const m = /^([PDdSl]) (\d+)$/.exec(line);
    if (m) sets[m[1] as 'P' | 'D' | 'd' | 'S' | 'l'].add(Number(m[2]));
    const a = /^A (\d+) (\d+)$/.exec(line);
    if (a) appended.push([Number(a[1]), Number(a[2])]);
  }
  return { acked: sets.P, deleted: sets.D, deleting: sets.d, appended, sealed: sets.S, logsDeleting: sets.l, killedAfterMs: Date.now() - start };
}

/**
 * kill -9 keeps the page cache; the power cuts (powercut.ts) also drop every write, create and
 * rename no fsync covered ('strict'), or keep a random part of them, sector by sector ('random'),
 * as a disk's write-back may. The store writes blocks in native batches (what production runs);
 * the last mode writes through fs instead, as it does when the addon is not built.
 */
const MODES = [
  { name: 'kill -9', cut: undefined, fsWrites: false },
  { name: 'a power cut that drops every unsynced change', cut: 'none', fsWrites: false },
  { name: 'a power cut that keeps a random part of the unsynced sectors', cut: 'random', fsWrites: false },
  { name: 'a power cut that drops every unsynced change, the store writing through fs', cut: 'none', fsWrites: true },
] as const;

for (const mode of MODES) {
  it(`keeps every acknowledged block through ${mode.name} at random moments`, async (t) => {
    const dir = await makeTmpDir();
    const log = mode.cut ? await makeTmpDir() : undefined;
    const deadline = Date.now() + TIME_CAP_MS;
    let totalAcked = 0;
    let kills = 0;
    let undone = 0;
    let appendsChecked = 0;
    let sealsChecked = 0;
    let dropped = 0;
    try {
      for (let iter = 0; iter < ITERATIONS && Date.now() < deadline; iter++, kills++) {
        const from = iter === 0 ? 'spawn' : 'ready';
        const delay = from === 'spawn' ? Math.floor(Math.random() * 200) : 20 + Math.floor(Math.random() * 400);
        const run = await runAndKill(dir, iter * 1_000_000, delay, from, log, mode.fsWrites);
        if (log && mode.cut) {
          const r = applyPowerCut(log, { keep: mode.cut });
          undone += Object.values(r.undone).reduce((a, b) => a + b, 0);
        }
        const what = `iteration ${iter}, killed after ${run.killedAfterMs} ms`;
        totalAcked += run.acked.size;
        // Opens cleanly after every crash: whatever the cut left, the store is usable.
        const s = await FileBlockStore.open({ dir, blockSize: BLOCK_SIZE, sizeBytes: SLOTS * BLOCK_SIZE });
        try {
          for (const i of run.acked) {
            if (run.deleting.has(i)) continue;
            assert.ok(s.hasBlock(crashRef(i)), `${what}: acknowledged block ${i} is missing`);
            assert.deepEqual(await s.getBlock(crashRef(i)), padded(crashBlock(i, BLOCK_SIZE), BLOCK_SIZE), `${what}: acknowledged block ${i}`);
          }
          for (const i of run.deleted) assert.equal(s.hasBlock(crashRef(i)), false, `${what}: deleted block ${i} came back`);
          // Journal appends that a flush covered are there, in the open block or the sealed one;
          // a block whose seal a flush covered reads as an ordinary, verified block.
          for (const [log, at] of run.appended) {
            if (run.logsDeleting.has(log)) continue;
            const raw = await s.readRaw(crashLogRef(log));
            assert.deepEqual(raw.subarray(at, at + CRASH_LOG_PIECE), crashLogPiece(log, at), `${what}: acknowledged append to log block ${log} at ${at}`);
            appendsChecked++;
          }
          for (const log of run.sealed) {
            if (run.logsDeleting.has(log)) continue;
            assert.equal(s.isOpenLog(crashLogRef(log)), false, `${what}: log block ${log} was sealed`);
            await s.getBlock(crashLogRef(log));
            sealsChecked++;
          }
          // Whatever else is present reads back exactly: a block a power cut left with its record
          // but not all of its data was found and dropped at open, never kept to be read (or to
          // answer HAS for) later.
          for (const ref of s.refs()) {
            if (ref.type !== BlockType.Log) assert.deepEqual(await s.getBlock(ref), padded(crashBlock(ref.index, BLOCK_SIZE), BLOCK_SIZE), `${what}: block ${ref.index}`);
            await s.deleteBlock(ref);
          }
          assert.equal(s.stats().checksumFailures, 0);
          dropped += s.stats().unsyncedDroppedAtOpen;
          // Leave a clean slate for the next round (deletes are durable only once flushed).
          await s.flush();
        } finally {
          await s.close();
        }
      }
      t.diagnostic(`${kills} kills, ${totalAcked} acknowledged blocks and ${appendsChecked} journal appends and ${sealsChecked} seals checked, ${undone} unsynced changes undone, ${dropped} torn blocks dropped at open`);
      assert.ok(totalAcked > 0 && appendsChecked > 0, 'the child never acknowledged a block: the test exercised nothing');
      if (mode.cut) assert.ok(undone > 0, 'the power cuts undid nothing: the harness was not in the loop');
    } finally {
      await removeDir(dir);
      if (log) await removeDir(log);
    }
  });
}
