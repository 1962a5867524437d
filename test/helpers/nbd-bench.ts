// A quick side-by-side measurement of our NBD server (MemoryDevice) against `nbdkit memory` of
// the same size, with fio's nbd engine, in one run on one machine:
//
//   node dist/test/helpers/nbd-bench.js [--size 256M] [--runtime 5] [--rounds 3]
//
// Jobs: 1 MiB sequential writes (iodepth 8) for --runtime seconds, looping over the device, which
// also fills it so the reads hit data; then 4 KiB random reads at iodepth 32 as long. The two
// servers take turns for --rounds rounds and the median of each is kept, because a shared
// machine's noise is larger than the difference being measured. Prints a table and the ratios
// (ours / nbdkit); docs/protocols/nbd.md quotes one run of it.

import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { ok, startMemoryServer } from './nbd-tools.js';

const { values } = parseArgs({
  options: { size: { type: 'string', default: '256M' }, runtime: { type: 'string', default: '5' }, rounds: { type: 'string', default: '3' } },
});
const size = values.size;
const runtime = Number(values.runtime);
const rounds = Math.max(1, Number(values.rounds));

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

interface Result {
  iops: number;
  mibps: number;
  clatP99us: number;
}

async function fio(dir: string, uri: string, name: string, args: string[]): Promise<Result> {
  const out = join(dir, `${name}.json`);
  await ok('fio', [`--name=${name}`, '--ioengine=nbd', `--uri=${uri}`, `--output=${out}`, '--output-format=json', ...args], { timeoutSec: runtime * 4 + 120 });
  const text = readFileSync(out, 'utf8');
  const job = (JSON.parse(text.slice(text.indexOf('{'))) as { jobs: Record<'read' | 'write', { iops: number; bw_bytes: number; clat_ns: { percentile?: Record<string, number> } }>[] }).jobs[0];
  if (!job) throw new Error(`no job in ${out}`);
  const side = job.read.iops > job.write.iops ? job.read : job.write;
  return { iops: side.iops, mibps: side.bw_bytes / 2 ** 20, clatP99us: (side.clat_ns.percentile?.['99.000000'] ?? 0) / 1000 };
}

async function measure(dir: string, label: string, uri: string): Promise<Record<string, Result>> {
  const seq = await fio(dir, uri, `${label}-seqwrite`, ['--rw=write', '--bs=1M', '--iodepth=8', `--size=${size}`, `--runtime=${runtime}`, '--time_based']);
  const rand = await fio(dir, uri, `${label}-randread`, ['--rw=randread', '--bs=4k', '--iodepth=32', `--size=${size}`, `--runtime=${runtime}`, '--time_based']);
  return { 'seq write 1M qd8': seq, 'rand read 4k qd32': rand };
}

const dir = mkdtempSync(join(tmpdir(), 'nbd-bench-'));
const ours = await startMemoryServer(['--export', `bench=${size}`]);
const port = await freePort();
const kit = spawn('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), 'memory', size], { stdio: 'ignore' });
try {
  await new Promise((r) => setTimeout(r, 500));
  const runsA: Record<string, Result>[] = [];
  const runsB: Record<string, Result>[] = [];
  for (let i = 0; i < rounds; i++) {
    // alternate who goes first, so that neither always runs on a warmer or quieter machine
    if (i % 2 === 0) {
      runsA.push(await measure(dir, 'torus', ours.uri('bench')));
      runsB.push(await measure(dir, 'nbdkit', `nbd://127.0.0.1:${port}/`));
    } else {
      runsB.push(await measure(dir, 'nbdkit', `nbd://127.0.0.1:${port}/`));
      runsA.push(await measure(dir, 'torus', ours.uri('bench')));
    }
  }
  const median = (runs: Record<string, Result>[], job: string): Result => {
    const sorted = runs.map((r) => r[job]!).sort((p, q) => p.iops - q.iops);
    return sorted[Math.floor(sorted.length / 2)]!;
  };
  const rows = Object.keys(runsA[0] ?? {}).map((job) => {
    const x = median(runsA, job);
    const y = median(runsB, job);
    return {
      job,
      'torus IOPS': Math.round(x.iops),
      'torus MiB/s': Math.round(x.mibps),
      'torus p99 us': Math.round(x.clatP99us),
      'nbdkit IOPS': Math.round(y.iops),
      'nbdkit MiB/s': Math.round(y.mibps),
      'nbdkit p99 us': Math.round(y.clatP99us),
      ratio: Number((x.iops / y.iops).toFixed(2)),
    };
  });
  console.table(rows);
  console.log(JSON.stringify({ size, runtime, rounds, rows }));
} finally {
  kit.kill('SIGTERM');
  await ours.stop();
  rmSync(dir, { recursive: true, force: true });
}
