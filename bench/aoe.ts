// AoE throughput, one run, one machine: the same initiator (test/helpers/aoe-initiator.ts on the
// raw socket addon) against Debian's vblade serving a local file, our target serving memory, and
// `torusblk aoe` serving a cluster volume (etcd + two storage nodes, R=2), write-through (the
// default) and --write-back. 4 KiB-equivalent ops/s = bytes moved / 4096 / seconds, 16 in flight.
// Needs root (network namespaces, raw sockets) and vblade.
//
//   node dist/bench/aoe.js [--seconds 5] [--mtu 1500,9000] [--reps 3]

import { spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, release, tmpdir, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { createLab, netnsUnavailable, type Lab } from '../test/helpers/netns.js';
import { startNsCluster } from '../test/helpers/ns-cluster.js';
import { stopProcess, waitForOutput } from '../test/helpers/procs.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const INITIATOR = join(HERE, '..', 'test', 'helpers', 'aoe-initiator.js');
const MEMORY_TARGET = join(HERE, '..', 'test', 'helpers', 'aoe-memory-target.js');
const RESULTS = join(HERE, '..', '..', 'bench', 'results');

const { values } = parseArgs({
  options: {
    seconds: { type: 'string', default: '5' },
    mtu: { type: 'string', default: '1500,9000' },
    reps: { type: 'string', default: '3' },
  },
});
const SECONDS = Number(values.seconds);
const REPS = Number(values.reps);
const SIZE_MIB = 256;

type Kind = 'vblade (file)' | 'ours (memory)' | 'torusblk aoe (volume, write-through)' | 'torusblk aoe (volume, write-back)';
const KINDS: Kind[] = ['vblade (file)', 'ours (memory)', 'torusblk aoe (volume, write-through)', 'torusblk aoe (volume, write-back)'];

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

interface Row {
  mtu: number;
  target: Kind;
  op: 'read' | 'write';
  opsPerSec4k: { median: number; min: number; max: number; all: number[] };
  sectorsPerFrame: number;
}

async function main(): Promise<void> {
  const why = netnsUnavailable();
  if (why) throw new Error(`cannot run: ${why}`);
  if (spawnSync('sh', ['-c', 'command -v vblade']).status !== 0) throw new Error('vblade is not installed (apt-get install vblade)');
  const dir = mkdtempSync(join(tmpdir(), 'bench-aoe-'));
  const rows: Row[] = [];
  try {
    for (const mtu of values.mtu.split(',').map(Number)) {
      const lab: Lab = createLab({ hosts: ['target', 'init1'], mtu });
      const ns = lab.hosts.target!.ns;
      const cluster = await startNsCluster(lab, ns);
      try {
        cluster.ok('torusctl', ['volume', 'create-block', 'v', `${SIZE_MIB}MiB`]);
        for (const kind of KINDS) {
          let target: ChildProcess;
          if (kind === 'vblade (file)') {
            const img = join(dir, 'vblade.img');
            spawnSync('truncate', ['-s', `${SIZE_MIB}M`, img]);
            target = lab.start(ns, 'vblade', ['7', '3', 'eth0', img]);
            await waitForOutput(target, /e7\.3, \d+ sectors/, 'vblade');
          } else if (kind === 'ours (memory)') {
            target = lab.start(ns, process.execPath, [MEMORY_TARGET, '--iface', 'eth0', '--shelf', '7', '--slot', '3', '--size', `${SIZE_MIB}MiB`]);
            await waitForOutput(target, /"maxSectors"/, 'memory target');
          } else {
            target = cluster.start('torusblk', ['aoe', 'v', 'eth0', '7', '3', ...(kind.includes('write-back') ? ['--write-back'] : [])]);
            await waitForOutput(target, /serving v /, 'torusblk aoe');
          }
          try {
            for (const op of ['write', 'read'] as const) {
              const all: number[] = [];
              let per = 0;
              for (let r = 0; r < REPS; r++) {
                const res = lab.run(lab.hosts.init1!.ns, process.execPath, [INITIATOR, 'bench', '--op', op, '--seconds', String(SECONDS), '--depth', '16', '--timeout-ms', '2000', '--iface', 'eth0'], SECONDS * 4 + 120);
                if (res.code !== 0) throw new Error(`initiator bench ${op} against ${kind}: ${res.stdout}${res.stderr}`);
                const j = JSON.parse(res.stdout.trim().split('\n').pop()!) as { opsPerSec4k: number; sectorsPerFrame: number };
                all.push(j.opsPerSec4k);
                per = j.sectorsPerFrame;
              }
              const row: Row = { mtu, target: kind, op, opsPerSec4k: { median: median(all), min: Math.min(...all), max: Math.max(...all), all }, sectorsPerFrame: per };
              rows.push(row);
              process.stderr.write(`mtu ${mtu} ${kind} ${op}: ${row.opsPerSec4k.median} ops/s (min ${row.opsPerSec4k.min}, max ${row.opsPerSec4k.max})\n`);
            }
          } finally {
            await stopProcess(target, 'SIGTERM', 20_000);
          }
        }
      } finally {
        await cluster.stop();
        lab.destroy();
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const ref = (mtu: number, op: string): number => rows.find((r) => r.mtu === mtu && r.op === op && r.target === 'vblade (file)')!.opsPerSec4k.median;
  const lines = ['| MTU | target | op | 4 KiB-eq ops/s median (min-max) | sectors/frame | vs vblade |', '| --- | --- | --- | --- | --- | --- |'];
  for (const r of rows)
    lines.push(
      `| ${r.mtu} | ${r.target} | ${r.op} | ${r.opsPerSec4k.median} (${r.opsPerSec4k.min}-${r.opsPerSec4k.max}) | ${r.sectorsPerFrame} | ${(r.opsPerSec4k.median / ref(r.mtu, r.op)).toFixed(2)} |`,
    );
  process.stdout.write(`${lines.join('\n')}\n`);
  const machine = { cpu: cpus()[0]?.model ?? '?', cores: cpus().length, memoryGiB: Math.round(totalmem() / 2 ** 30), kernel: release(), node: process.version };
  mkdirSync(RESULTS, { recursive: true });
  const file = join(RESULTS, `aoe-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
  writeFileSync(file, `${JSON.stringify({ date: new Date().toISOString(), machine, seconds: SECONDS, reps: REPS, depth: 16, rows }, null, 2)}\n`);
  process.stdout.write(`saved ${file}\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`bench/aoe: ${(err as Error).message}\n`);
  process.exit(1);
});
