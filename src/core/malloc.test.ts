import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { MemoryReturner } from './malloc.js';
import { nativeAddonPath } from './native.js';

// NBD payloads of 1 MiB, a few alive at a time as in a busy nbdserve, in a fresh process each,
// counting the page faults taken: with the settings freed memory is reused; without them most of it
// is faulted in again.
const CHILD = `
const { tuneMalloc } = await import(process.argv[1]);
const tuned = tuneMalloc();
const keep = [];
const before = process.resourceUsage().minorPageFault;
const n = 4000;
for (let i = 0; i < n; i++) {
  const b = Buffer.allocUnsafe(1 << 20);
  b.fill(i & 255);
  keep.push(b);
  if (keep.length > 16) keep.shift();
}
console.log(JSON.stringify({ tuned, faultsPerMiB: (process.resourceUsage().minorPageFault - before) / n }));
`;

const built = existsSync(nativeAddonPath('malloc_tuning') ?? '');

function run(env: NodeJS.ProcessEnv): { tuned: boolean; faultsPerMiB: number } {
  const module = fileURLToPath(new URL('./malloc.js', import.meta.url));
  // glibc's own variables would set the same thresholds from outside: the comparison needs them unset.
  const { MALLOC_MMAP_THRESHOLD_: _m, MALLOC_TRIM_THRESHOLD_: _t, ...inherited } = process.env;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', CHILD, module], { encoding: 'utf8', env: { ...inherited, ...env } });
  assert.equal(r.status, 0, r.stderr);
  return JSON.parse(r.stdout) as { tuned: boolean; faultsPerMiB: number };
}

test('malloc settings: big buffers reuse freed memory instead of faulting in fresh pages; TORUS_MALLOC_TUNING=0 keeps the defaults', { skip: built ? false : 'native addon not built' }, () => {
  // A busy machine only adds faults (a GC, the JIT, other processes' memory pressure): the least
  // of three alternating runs of each is the figure. A CI run under load once saw 6.8 against 18.4
  // in single runs.
  const plain: number[] = [];
  const tuned: number[] = [];
  for (let i = 0; i < 3; i++) {
    const p = run({ TORUS_MALLOC_TUNING: '0' });
    const t = run({ TORUS_MALLOC_TUNING: '1' });
    assert.equal(p.tuned, false);
    assert.equal(t.tuned, true);
    plain.push(p.faultsPerMiB);
    tuned.push(t.faultsPerMiB);
  }
  const [t, p] = [Math.min(...tuned), Math.min(...plain)];
  // Measured here, quiet: 2.4-2.7 against 11.8-12.8.
  assert.ok(t * 3 < p, `faults per MiB: ${t.toFixed(1)} tuned, ${p.toFixed(1)} with glibc's defaults (least of 3 each)`);
});

test('memory returner: gives free malloc memory back only after quiet looks in a row, past what it keeps, and again only once the process grew', () => {
  const MiB = 2 ** 20;
  let free = 200 * MiB;
  let rss = 500 * MiB;
  let trims = 0;
  const r = new MemoryReturner(
    { intervalMs: 1000, keepBytes: 64 * MiB, quietLooks: 2, quietShare: 0.15 },
    {
      stats: () => ({ heapBytes: 400 * MiB, freeBytes: free }),
      trim: () => {
        trims++;
        rss -= 150 * MiB;
      },
      rss: () => rss,
      heapUsed: () => 0,
      gc: undefined,
    },
  );
  // A busy event loop keeps its buffers, however much is free.
  for (let i = 0; i < 5; i++) assert.equal(r.look(0.5), false);
  // One quiet look is not a quiet spell; a busy one starts the count again.
  assert.equal(r.look(0.1), false);
  assert.equal(r.look(0.3), false);
  assert.equal(r.look(0.1), false);
  assert.equal(r.look(0.1), true);
  assert.deepEqual(r.stats, { returns: 1, returnedBytes: 150 * MiB });
  // malloc still counts those chunks free: no second walk until the process has grown again.
  for (let i = 0; i < 4; i++) assert.equal(r.look(0), false);
  rss += 20 * MiB;
  assert.equal(r.look(0), true);
  assert.equal(trims, 2);
  // Within what it keeps: nothing to give back.
  free = 64 * MiB;
  rss += 200 * MiB;
  for (let i = 0; i < 4; i++) assert.equal(r.look(0), false);
  assert.equal(trims, 2);
});

test('memory returner: on a quiet spell, collects V8 garbage first when the heap grew past what it keeps, then trims', () => {
  const MiB = 2 ** 20;
  let heap = 300 * MiB;
  let free = 10 * MiB;
  const calls: string[] = [];
  const r = new MemoryReturner(
    { intervalMs: 1000, keepBytes: 64 * MiB, quietLooks: 1, quietShare: 0.15 },
    {
      stats: () => ({ heapBytes: 400 * MiB, freeBytes: free }),
      trim: () => calls.push('trim'),
      rss: () => 600 * MiB,
      heapUsed: () => heap,
      gc: () => {
        calls.push('gc');
        // The collected Buffers' memory is now free in malloc.
        heap = 80 * MiB;
        free = 150 * MiB;
      },
    },
  );
  assert.equal(r.look(0.5), false, 'busy: nothing');
  assert.equal(r.look(0), true);
  assert.deepEqual(calls, ['gc', 'trim']);
  // Grown by less than it keeps since that collection (and malloc not grown): nothing to do.
  heap = 130 * MiB;
  assert.equal(r.look(0), false);
  heap = 150 * MiB;
  assert.equal(r.look(0), true);
  assert.deepEqual(calls, ['gc', 'trim', 'gc', 'trim']);
});

test('memory returner: memory a collection frees late (V8 frees Buffers on a thread of its own) is trimmed at the next quiet look', () => {
  const MiB = 2 ** 20;
  const calls: string[] = [];
  let free = 10 * MiB;
  const r = new MemoryReturner(
    { intervalMs: 1000, keepBytes: 64 * MiB, quietLooks: 1, quietShare: 0.15 },
    {
      stats: () => ({ heapBytes: 400 * MiB, freeBytes: free }),
      trim: () => calls.push('trim'),
      rss: () => 600 * MiB,
      heapUsed: () => 200 * MiB,
      gc: () => calls.push('gc'),
    },
  );
  assert.equal(r.look(0), true);
  assert.deepEqual(calls, ['gc'], 'nothing free in malloc yet: no trim');
  free = 200 * MiB; // the sweeper has run since
  assert.equal(r.look(0), true);
  assert.deepEqual(calls, ['gc', 'trim']);
  assert.equal(r.look(0), false, 'owed once only');
});

// 256 MiB of 1 MiB Buffers, written and dropped, in a fresh process with the thresholds in force:
// malloc keeps them resident for reuse until a quiet look gives them back.
const RETURN_CHILD = `
const { tuneMalloc, MemoryReturner, mallocStats } = await import(process.argv[1]);
if (!tuneMalloc()) throw new Error('malloc settings not in force');
let keep = [];
for (let i = 0; i < 256; i++) keep.push(Buffer.alloc(1 << 20, i));
keep = [];
// 'garbage': the Buffers are left for the returner's own collection to find.
if (process.argv[2] !== 'garbage') globalThis.gc();
await new Promise((r) => setTimeout(r, 50));
const rss = () => process.memoryUsage.rss();
const before = rss();
const free = mallocStats().freeBytes;
const r = new MemoryReturner({ intervalMs: 1000, keepBytes: 64 << 20, quietLooks: 2, quietShare: 0.15 });
const trimmed = process.argv[2] === 'keep' ? [] : [r.look(0), r.look(0)];
// V8 may free the collected Buffers' memory on a thread of its own after gc() returned: the
// returner trims it at a later look.
for (let i = 0; i < 40 && process.argv[2] !== 'keep' && before - rss() < (128 << 20); i++) {
  await new Promise((r) => setTimeout(r, 50));
  r.look(0);
}
console.log(JSON.stringify({ free, before, after: rss(), trimmed }));
`;

test('memory returner: a quiet process gives back what malloc kept of its freed buffers', { skip: built ? false : 'native addon not built' }, () => {
  const module = fileURLToPath(new URL('./malloc.js', import.meta.url));
  const child = (mode: string): { free: number; before: number; after: number; trimmed: boolean[] } => {
    // --expose-gc for the test's own collection; the returner gets its own without it.
    const r = spawnSync(process.execPath, [...(mode === 'garbage' ? [] : ['--expose-gc']), '--input-type=module', '-e', RETURN_CHILD, module, mode], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    return JSON.parse(r.stdout) as { free: number; before: number; after: number; trimmed: boolean[] };
  };
  const MiB = 2 ** 20;
  const kept = child('keep');
  assert.ok(kept.free > 128 * MiB, `malloc holds the freed buffers: ${kept.free / MiB} MiB free`);
  assert.ok(kept.after > kept.before - 32 * MiB, 'and without a return they stay resident');
  for (const mode of ['trim', 'garbage']) {
    const given = child(mode);
    assert.deepEqual(given.trimmed, [false, true], mode);
    assert.ok(given.before - given.after > 128 * MiB, `${mode}: resident ${given.before / MiB} -> ${given.after / MiB} MiB`);
  }
});
