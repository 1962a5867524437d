import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { have } from '../helpers/nbd-tools.js';
import { REPO } from '../helpers/procs.js';

// The performance harness (`npm run bench`, docs/performance.md), run small: every job on both
// sides, three repetitions, one short block size table. It checks what the harness promises (the
// figures, their median/min/max, the ratio last on each printed row, every process's peak RSS, the
// machine's description in the JSON), never a figure's size: timings here are noise.

const skip = have('fio') && have('nbdkit') ? false : 'fio or nbdkit not installed';
const dir = mkdtempSync(join(tmpdir(), 'torus-bench-test-'));
after(() => rmSync(dir, { recursive: true, force: true }));

interface Stat {
  median: number;
  min: number;
  max: number;
  values: number[];
}
interface Row {
  job: string;
  torus: Stat;
  nbdkit: Stat;
  ratio: number;
  kind: 'throughput' | 'latency';
  latency?: { flushP50Us: number; flushP99Us: number; replicaSyncUs: number; syncShare: number };
  cpu: Record<'torus' | 'nbdkit', { msPerMiB: Record<string, number>; usPerIo: Record<string, number> }>;
  disk?: { limit: Stat; ratio: number; target: number; met: boolean };
}
interface RssSum {
  bytes: number;
  at: string;
  each: Record<string, number>;
}
interface Results {
  machine: { cores: number; cpuModel: string; kernel: string; memoryBytes: number };
  options: { reps: number };
  fioJobs: Record<string, string[]>;
  peakRssSum: RssSum;
  tables: {
    blockSize: string;
    rows: Row[];
    peakRss: Record<string, number>;
    peakRssSum: RssSum & { target: number; met: boolean };
    limits: { diskEngine: string; diskArgs: string[]; diskWriteMiBps: Stat; replicatedDiskMiBps: Stat; tcpMiBps: Stat; runs: unknown[] };
    writeAmp: { name: string; logical: number; withPrep: number; physical: number; disk: number; storage: { prepBytes: number }; writtenBytes: number }[];
  }[];
}

/** Three finite, positive repetitions, with their median, least and greatest. */
function assertStat(s: Stat, what: string): void {
  assert.equal(s.values.length, 3, `${what}: 3 repetitions`);
  assert.ok(s.values.every((v) => Number.isFinite(v) && v > 0), `${what}: figures ${s.values.join(', ')}`);
  assert.deepEqual([s.min, s.median, s.max], [Math.min(...s.values), [...s.values].sort((a, b) => a - b)[1], Math.max(...s.values)], what);
}

test('npm run bench, small: both sides of every job, medians of 3 with min and max, ratio last, the machine limits, CPU per unit, peak RSS alone and together, JSON with the machine', { skip, timeout: 600_000 }, () => {
  const out = join(dir, 'results.json');
  const args = ['--quick', '--block-sizes', '64KiB', '--volume-size', '64MiB', '--read-cache-size', '4MiB', '--runtime', '1', '--data-dir', join(dir, 'data'), '--out', out];
  const r = spawnSync(process.execPath, [join(REPO, 'dist', 'bench', 'perf.js'), ...args], { encoding: 'utf8', timeout: 540_000 });
  assert.equal(r.status, 0, `bench exited ${r.status}:\n${r.stderr.slice(-4000)}`);

  const res = JSON.parse(readFileSync(out, 'utf8')) as Results;
  assert.ok(res.machine.cores > 0 && res.machine.cpuModel && res.machine.kernel && res.machine.memoryBytes > 0, 'the machine is described');
  assert.equal(res.options.reps, 3);
  assert.equal(res.tables.length, 1);
  const [t] = res.tables;
  assert.equal(t!.blockSize, '64KiB');
  assert.deepEqual(t!.rows.map((x) => x.job), ['P1', 'P2', 'P3', 'P4', 'P5']);
  for (const row of t!.rows) {
    assertStat(row.torus, `${row.job} Torus`);
    assertStat(row.nbdkit, `${row.job} nbdkit`);
    assert.ok(Math.abs(row.ratio - row.torus.median / row.nbdkit.median) < 1e-9, `${row.job}: the ratio is Torus/nbdkit`);
    assert.ok(res.fioJobs[row.job]!.length > 0);
    // CPU per MiB and per I/O of every process, on each side: finite, not negative.
    assert.deepEqual(Object.keys(row.cpu.torus.msPerMiB).sort(), ['etcd', 'fio', 'nbdserve', 'torusd-1', 'torusd-2', 'torusd-3'], row.job);
    assert.deepEqual(Object.keys(row.cpu.nbdkit.msPerMiB).sort(), ['fio', 'nbdkit'], row.job);
    for (const side of [row.cpu.torus, row.cpu.nbdkit]) {
      for (const per of [side.msPerMiB, side.usPerIo]) assert.ok(Object.values(per).every((v) => Number.isFinite(v) && v >= 0), `${row.job} CPU ${JSON.stringify(per)}`);
      assert.deepEqual(Object.keys(side.usPerIo), Object.keys(side.msPerMiB));
    }
    // The servers did work in every job: some of their CPU shows.
    assert.ok(Object.entries(row.cpu.torus.msPerMiB).some(([k, v]) => k.startsWith('torusd') && v > 0), `${row.job}: torusd CPU`);
    assert.ok(row.cpu.torus.msPerMiB['nbdserve']! > 0 && row.cpu.nbdkit.msPerMiB['nbdkit']! > 0, `${row.job}: NBD servers' CPU`);
  }
  // The machine's limits, one measurement per repetition; P1 against the replicated disk limit.
  const lim = t!.limits;
  assert.ok(['libaio', 'io_uring'].includes(lim.diskEngine) && lim.diskArgs.includes('--direct=1') && lim.runs.length === 3, JSON.stringify(lim.diskArgs));
  for (const [what, s] of [['disk write', lim.diskWriteMiBps], ['disk write / R', lim.replicatedDiskMiBps], ['raw TCP', lim.tcpMiBps]] as const) assertStat(s, what);
  assert.deepEqual(lim.replicatedDiskMiBps.values, lim.diskWriteMiBps.values.map((v) => v / 2));
  const p1 = t!.rows.find((x) => x.job === 'P1')!;
  assert.ok(p1.disk && p1.disk.target === 0.8 && p1.disk.met === p1.disk.ratio >= 0.8, JSON.stringify(p1.disk));
  assert.deepEqual(p1.disk.limit, lim.replicatedDiskMiBps);
  assert.ok(Math.abs(p1.disk.ratio - p1.torus.median / lim.replicatedDiskMiBps.median) < 1e-9, 'P1 against disk / R');
  assert.ok(t!.rows.every((x) => x.job === 'P1' || x.disk === undefined), 'only P1 has a disk ratio');
  const p5 = t!.rows.find((x) => x.job === 'P5')!;
  assert.equal(p5.kind, 'latency');
  // Its anatomy: fio's flush latencies and the replicas' own fsync time, as a share of the cycle.
  assert.ok(p5.latency && p5.latency.flushP50Us > 0 && p5.latency.flushP99Us >= p5.latency.flushP50Us, JSON.stringify(p5.latency));
  assert.ok(p5.latency.replicaSyncUs > 0 && p5.latency.syncShare > 0, JSON.stringify(p5.latency));
  // Write amplification, from the storage nodes' counters: at R=2 the journal alone stores every
  // byte twice, so anything below 2 would mean a replica was not written.
  assert.deepEqual(t!.writeAmp.map((w) => w.name), ['whole volume', 'hot region']);
  for (const w of t!.writeAmp) {
    assert.ok(w.logical >= 2 && w.physical > 0 && w.disk > 0 && w.writtenBytes > 0, JSON.stringify(w));
    // The zeros that prepare slots are counted beside what is stored, never hidden.
    assert.ok(w.storage.prepBytes >= 0 && Math.abs(w.withPrep - w.logical - w.storage.prepBytes / w.writtenBytes) < 0.02, JSON.stringify(w));
  }
  // Every process of both setups, with a peak RSS.
  assert.deepEqual(Object.keys(t!.peakRss).sort(), ['etcd', 'nbdkit', 'nbdserve', 'torusd-1', 'torusd-2', 'torusd-3']);
  for (const [name, bytes] of Object.entries(t!.peakRss)) assert.ok(bytes > 1024 * 1024, `${name} peak RSS ${bytes}`);
  // P8: the Torus processes' RSS at one instant, summed; no more than the sum of each one's own peak.
  const p8 = t!.peakRssSum;
  assert.deepEqual(Object.keys(p8.each).sort(), ['nbdserve', 'torusd-1', 'torusd-2', 'torusd-3']);
  assert.equal(p8.bytes, Object.values(p8.each).reduce((a, b) => a + b, 0));
  for (const [name, bytes] of Object.entries(p8.each)) assert.ok(bytes > 1024 * 1024 && bytes <= t!.peakRss[name]!, `P8 ${name} ${bytes} (peak ${t!.peakRss[name]})`);
  assert.ok(Number.isFinite(Date.parse(p8.at)) && p8.target === 2 ** 30 && p8.met === p8.bytes <= p8.target, JSON.stringify(p8));
  assert.deepEqual(res.peakRssSum, { bytes: p8.bytes, at: p8.at, each: p8.each, target: p8.target, met: p8.met });

  // The printed table: one row per job, both figures, the ratio last.
  for (const job of ['P1', 'P2', 'P3', 'P4']) assert.match(r.stdout, new RegExp(`^\\| ${job} .*\\| \\d+\\.\\d{3} \\((met|missed)\\) \\|$`, 'm'));
  assert.match(r.stdout, /^\| P5 .*\| \d+\.\dx \((met|missed)\) \|$/m);
  assert.match(r.stdout, /^\| P1 against the replicated disk limit \| .* \| disk write \/ 2 .* \| >= 0\.8 \| \d+\.\d{3} \((met|missed)\) \|$/m);
  assert.match(r.stdout, /^machine limits .*: disk sequential write \d+(\.\d)? MiB\/s .*raw Node TCP on loopback \d+(\.\d)? MiB\/s/m);
  assert.match(r.stdout, /^\| job \| etcd \| torusd-1 \| torusd-2 \| torusd-3 \| nbdserve \| fio \| nbdkit \| fio \(nbdkit runs\) \|$/m);
  for (const job of ['P1', 'P2', 'P3', 'P4', 'P5']) assert.match(r.stdout, new RegExp(`^\\| ${job} (\\| \\d+\\.\\d+ / \\d+(\\.\\d)? ){8}\\|$`, 'm'));
  assert.match(r.stdout, /^peak RSS: etcd .*nbdserve .*nbdkit /m);
  assert.match(r.stdout, /^P8 peak RSS of the Torus processes together .*: \d+ MiB \(torusd-1 .*nbdserve \d+ MiB\) at .*; target <= 1024 MiB \((met|missed)\)$/m);
  assert.match(r.stdout, /^P5 latency .*flush p50 \d+ µs p99 \d+ µs.* of the cycle$/m);
  assert.match(r.stdout, /^write amplification \(R=2, target <= 3\), hot region .*: \d+\.\d+ \(\d+\.\d+ with the zeros that prepare a young store's slots; disk \d+\.\d+\)/m);
});

test('npm run bench --nbd-on storage: storage node 1 serves NBD itself (torusd --nbd-listen); no nbdserve process, P8 counts the three nodes', { skip, timeout: 600_000 }, () => {
  const out = join(dir, 'storage.json');
  const prof = join(dir, 'profile-storage');
  const args = ['--quick', '--nbd-on', 'storage', '--jobs', 'P1,P5', '--block-sizes', '64KiB', '--volume-size', '64MiB', '--read-cache-size', '4MiB', '--runtime', '1', '--profile', prof, '--data-dir', join(dir, 'data-storage'), '--out', out];
  const r = spawnSync(process.execPath, [join(REPO, 'dist', 'bench', 'perf.js'), ...args], { encoding: 'utf8', timeout: 540_000 });
  assert.equal(r.status, 0, `bench exited ${r.status}:\n${r.stdout.slice(-3000)}\n${r.stderr.slice(-3000)}`);
  assert.match(r.stdout, /^\| P1 .*\| \d+\.\d{3} \((met|missed)\) \|$/m);
  assert.match(r.stdout, /^\| P5 .*\| \d+\.\dx \((met|missed)\) \|$/m);
  assert.doesNotMatch(r.stdout, /NaN/);
  assert.match(r.stdout, /^P8 peak RSS of the Torus processes together .*: \d+ MiB \(torusd-1 \d+ MiB, torusd-2 \d+ MiB, torusd-3 \d+ MiB\) at /m);
  const json = JSON.parse(readFileSync(out, 'utf8')) as { options: Record<string, unknown>; tables: { peakRss: Record<string, number> }[] };
  assert.equal(json.options['nbdOn'], 'storage');
  assert.equal(json.tables[0]!.peakRss['nbdserve'], 0);
  // Profiled too: torusd-1 is the NBD server, so there is no nbdserve profile.
  assert.match(r.stdout, /^busiest torusd \(torusd-1 serves NBD\), top self time:$/m);
  const profiles = (JSON.parse(readFileSync(out, 'utf8')) as { tables: { profiles?: { job: string; nbdserve?: unknown; torusd: unknown[] }[] }[] }).tables[0]!.profiles!;
  assert.deepEqual(profiles.map((p) => [p.job, p.nbdserve === undefined, p.torusd.length]), [['P1', true, 3], ['P5', true, 3]]);
  assert.ok(existsSync(join(prof, 'bs-64KiB', 'P5', 'torusd-1.svg')), 'a flame graph of torusd-1');
});

test('bench: bad arguments get one line and exit status 2, before anything is started', () => {
  for (const args of [['--jobs', 'P9'], ['--reps', '0'], ['--bogus'], ['--block-sizes', '3XB'], ['--volume-size', '8MiB'], ['--runtime', '-1'], ['--nbd-on', 'elsewhere']]) {
    const data = join(dir, 'bad-args');
    const r = spawnSync(process.execPath, [join(REPO, 'dist', 'bench', 'perf.js'), ...args, '--data-dir', data], { encoding: 'utf8', timeout: 30_000 });
    assert.equal(r.status, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, /^perf: [^\n]+\n$/, `${args.join(' ')}: one line, no stack trace`);
    assert.equal(existsSync(data), false, `${args.join(' ')}: no data dir made`);
  }
});

test('npm run bench:floor, small: the primitives measured with their CPU per MiB, the negotiated TLS, JSON with the machine', { timeout: 120_000 }, () => {
  const out = join(dir, 'floor.json');
  const r = spawnSync(process.execPath, [join(REPO, 'dist', 'bench', 'floor.js'), '--only', 'crc,streams', '--seconds', '0.3', '--reps', '1', '--out', out], { encoding: 'utf8', timeout: 110_000 });
  assert.equal(r.status, 0, r.stderr + r.stdout);
  assert.match(r.stdout, /^TLS negotiated: TLSv1\.3 /m);
  const json = JSON.parse(readFileSync(out, 'utf8')) as { machine: { cores: number }; measures: { name: string; msPerMiB: { ours: number } }[] };
  assert.ok(json.machine.cores >= 1);
  const names = json.measures.map((m) => m.name);
  for (const n of ['tcp-onread', 'tcp-data', 'tls-onread', 'crc-native-1MiB']) assert.ok(names.includes(n), `${n} in ${names.join(' ')}`);
  for (const m of json.measures) assert.ok(m.msPerMiB.ours > 0 && Number.isFinite(m.msPerMiB.ours), `${m.name}: ${m.msPerMiB.ours} ms/MiB`);
});

test('npm run bench:read-path, small: the CPU of a 4 KiB read at each layer on a storage node, in one process', { timeout: 120_000 }, () => {
  const r = spawnSync(process.execPath, [join(REPO, 'dist', 'bench', 'read-path.js'), '--reads', '2000', '--data-dir', dir], { encoding: 'utf8', timeout: 110_000 });
  assert.equal(r.status, 0, r.stderr + r.stdout);
  for (const layer of ['store.readSectors', 'distributor.readRange', 'volume.read']) {
    const m = new RegExp(`^${layer.replace('.', '\\.')} +(\\d+\\.\\d+) µs \\(system \\d+\\.\\d+\\), \\d+\\.\\d+ ms/MiB +(\\d+\\.\\d+) µs`, 'm').exec(r.stdout);
    assert.ok(m, `${layer} in ${r.stdout}`);
    assert.ok(Number(m[1]) > 0 && Number(m[2]) > 0, `${layer}: CPU per read measured`);
  }
  for (const [args, why] of [
    [['--reads', 'many'], /^read-path: --reads many: expected a positive integer$/],
    [['--read-size', '6KiB'], /^read-path: --read-size 6KiB: expected a multiple of 4 KiB that divides the block size$/],
    [['--block-size', 'big'], /^read-path: /],
    [['--nope'], /^read-path: /],
  ] as const) {
    const bad = spawnSync(process.execPath, [join(REPO, 'dist', 'bench', 'read-path.js'), ...args], { encoding: 'utf8', timeout: 30_000 });
    assert.equal(bad.status, 2, `${args.join(' ')}: ${bad.stderr}`);
    assert.equal(bad.stderr.trim().split('\n').length, 1, `one line: ${bad.stderr}`);
    assert.match(bad.stderr.trim(), why);
  }
});
