// The floor: what the work no Node implementation of Torus can avoid costs on this machine, and
// what that leaves of issue 15's targets. Each primitive is measured alone, bounded in bytes and
// in time, with the CPU it took (user + system from /proc, per process and for the whole machine):
//
//   1. plain TCP on loopback between two Node processes, 1 MiB writes, the receiver reading with a
//      static `onread` buffer, and with 'data' events (bench/lib/tcp.ts's sink and sender: the
//      "raw Node TCP" that `npm run bench` and the re-replication bench measure against);
//   2. TLS on loopback between two Node processes, set up as peer RPC sets it up (src/rpc/security.ts:
//      x509, TLS 1.3, certificates made for the run by src/cli/shared/certs.ts), 1 MiB writes;
//   3. small exchanges (4 KiB replies to small requests, 32 in flight) over TCP and over TLS: the
//      per-operation part an NBD 4 KiB read and a peer's 4 KiB GET cannot avoid;
//   4. CRC32C: @node-rs/crc32 on 1 MiB and on 4 KiB pieces, and Torus's native sector CRCs
//      (native/block_write.c, loaded as src/core/crc.ts loads it); and, to read the
//      TLS figure by, the TLS 1.3 ciphers alone (`openssl speed`, 16 KiB records, CPU time);
//   5. page-cache reads and buffered writes from Node: fs.readSync/writeSync, the thread-pool
//      fs.read/fs.write, preadv2 RWF_NOWAIT (native/page_cache_read.c), 4 KiB to 1 MiB; and
//      buffered writes into a new file with fdatasync, so that the writeback is counted too;
//   6. the NBD hop alone: Torus's NbdServer serving one file through a trivial device, fio's nbd
//      engine doing P1's, P2's and P3's jobs against it and against `nbdkit file` on the same file;
//   7. the disk's sequential write bandwidth (fio, O_DIRECT, 1 MiB, qd 8), as `npm run bench` does.
//
// Then, for P1, P2, P3 and P7, the primitives each needs per MiB (per 4 KiB read for P3), the sum
// of their CPU, the ceiling that sum allows on this machine's cores, and the target from the same
// run. Writes JSON to bench/results/floor-<time>.json.
//
//   npm run bench:floor
//   node dist/bench/floor.js [--seconds 3] [--nbd-seconds 5] [--size 1GiB] [--data-dir DIR] [--only streams,rr,crc,fs,disk,nbd]
//
// docs/performance.md ("The floor") has the figures and what they say.

import { crc32c } from '@node-rs/crc32';
import { fork, spawnSync, type ChildProcess } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, fdatasyncSync, ftruncateSync, mkdirSync, mkdtempSync, openSync, read, readSync, rmSync, statfsSync, write, writeFileSync, writeSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { usageExits } from '../scripts/lib/cli.js';
import { createCa, issueCertificates } from '../src/cli/shared/certs.js';
import { tuneMalloc } from '../src/core/malloc.js';
import { parseSize } from '../src/core/units.js';
import { nativeSectorCrcs } from '../src/core/crc.js';
import { pageCacheReadsAvailable, readCached } from '../src/storage/page-cache.js';
import { freePort } from '../test/helpers/etcd.js';
import { have } from '../test/helpers/nbd-tools.js';
import type { Transport, WorkerCommand, WorkerReport, WorkerTask } from './lib/floor-worker.js';
import { directEngine, diskWrite, diskWriteArgs, jobArgs, runFio, type FioOutcome, type Region } from './lib/fio.js';
import { describeMachine } from './lib/machine.js';
import { cpuTimes, machineCpu, median } from './lib/probes.js';
import { startNbdkit, type Proc } from './lib/procs.js';
import { rawTcp } from './lib/tcp.js';

const HERE = dirname(fileURLToPath(import.meta.url));
// dist/bench/floor.js -> the repository root
const REPO = resolve(HERE, '../..');
const WORKER = join(HERE, 'lib', 'floor-worker.js');
const MiB = 2 ** 20;
const KiB = 1024;

const SECTIONS = ['streams', 'rr', 'crc', 'fs', 'disk', 'nbd'] as const;
type Section = (typeof SECTIONS)[number];

const { usage, orUsage } = usageExits('floor');
const { values: argv } = orUsage(() =>
  parseArgs({
    options: {
      seconds: { type: 'string', default: '2' },
      reps: { type: 'string', default: '3' },
      'wait-quiet': { type: 'string', default: '0' },
      'nbd-seconds': { type: 'string', default: '5' },
      size: { type: 'string', default: '1GiB' },
      'read-cache-size': { type: 'string', default: '64MiB' },
      'data-dir': { type: 'string' },
      only: { type: 'string' },
      out: { type: 'string' },
      help: { type: 'boolean', default: false },
    },
  }),
);

if (argv.help) {
  process.stdout.write(`usage: node dist/bench/floor.js [options]
  --seconds S            at most this long for each repetition of a primitive (default 2; also bounded in bytes)
  --reps N               repetitions of each primitive and NBD job (default 3): a primitive's floor
                         is its cheapest repetition, an NBD job's figure the median
  --nbd-seconds S        fio runtime of each NBD job (default 5)
  --wait-quiet S         before each timed part, wait up to S seconds for the machine to be quiet
                         (under 0.3 cores busy for half a second; default 0: no waiting)
  --size SIZE            the file the NBD jobs use, as the volume of npm run bench (default 1GiB)
  --read-cache-size SIZE P3's working set is 4x this, as in npm run bench (default 64MiB)
  --data-dir DIR         where to make the run's directory (files, fio outputs; default $TMPDIR)
  --only LIST            some of ${SECTIONS.join(',')} (default all; the derived table needs all)
  --out FILE             results JSON (default bench/results/floor-<time>.json)
`);
  process.exit(0);
}

const seconds = Number(argv.seconds);
const nbdSeconds = Number(argv['nbd-seconds']);
const reps = Number(argv.reps);
const waitQuiet = Number(argv['wait-quiet']);
if (!(waitQuiet >= 0 && waitQuiet <= 600)) usage('--wait-quiet must be from 0 to 600 seconds');
if (!Number.isInteger(reps) || reps < 1 || reps > 20) usage('--reps must be an integer from 1 to 20');
if (!(seconds > 0 && seconds <= 60) || !(nbdSeconds > 0 && nbdSeconds <= 120)) usage('--seconds must be in (0, 60], --nbd-seconds in (0, 120]');
const size = orUsage(() => parseSize(argv.size));
const region: Region = { whole: size, randReadSet: 4 * orUsage(() => parseSize(argv['read-cache-size'])) };
if (size < 64 * MiB || size % MiB !== 0) usage('--size must be a whole number of MiB, at least 64MiB');
if (region.randReadSet > region.whole) usage("P3's working set (4 x --read-cache-size) exceeds --size");
const only = new Set<Section>((argv.only ?? SECTIONS.join(',')).split(',').map((s) => s.trim()) as Section[]);
for (const s of only) if (!SECTIONS.includes(s)) usage(`unknown section ${s}: expected some of ${SECTIONS.join(',')}`);
if (only.has('nbd') || only.has('disk')) for (const t of ['fio', 'nbdkit']) if (!have(t)) usage(`${t} is not installed (Debian: apt-get install -y ${t})`);
const diskEngine = only.has('disk') ? orUsage(() => directEngine()) : 'none';
const CORES = cpus().length;
const REPLICATION = 2;
const NODES = 3;

function log(msg: string): void {
  process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
}

// ---- CPU around a timed part: each named process's user + system, and the whole machine ----

interface Window {
  wall: number;
  /** CPU seconds of each of our processes over the window. */
  procs: Record<string, { user: number; sys: number }>;
  /** Busy CPU seconds of the whole machine (/proc/stat: all but idle and iowait). */
  machine: number;
  steal: number;
}

type Pids = Record<string, number>;

function snapshot(pids: Pids): { t: bigint; procs: Record<string, { user: number; sys: number }>; machine: { busy: number; steal: number } } {
  const procs: Record<string, { user: number; sys: number }> = {};
  for (const [name, pid] of Object.entries(pids)) {
    const c = cpuTimes(pid);
    procs[name] = { user: c.user, sys: c.sys };
  }
  return { t: process.hrtime.bigint(), procs, machine: machineCpu() };
}

/** Cores the whole machine kept busy over `ms` (nothing of ours running: the other tenants). */
async function busyCores(ms: number): Promise<number> {
  const a = machineCpu().busy;
  const t = process.hrtime.bigint();
  await new Promise((r) => setTimeout(r, ms));
  return (machineCpu().busy - a) / (Number(process.hrtime.bigint() - t) / 1e9);
}

/** With --wait-quiet S: waits, at most S seconds, for half a second with under 0.3 cores busy. */
async function quiet(): Promise<void> {
  if (!(waitQuiet > 0)) return;
  const until = Date.now() + waitQuiet * 1000;
  while (Date.now() < until && (await busyCores(500)) >= 0.3);
}

async function timed<T>(pids: Pids, f: () => Promise<T>): Promise<{ w: Window; value: T }> {
  await quiet();
  const a = snapshot(pids);
  const value = await f();
  const b = snapshot(pids);
  const procs: Window['procs'] = {};
  for (const name of Object.keys(pids)) {
    const user = b.procs[name]!.user - a.procs[name]!.user;
    const sys = b.procs[name]!.sys - a.procs[name]!.sys;
    if (!Number.isFinite(user + sys)) throw new Error(`${name} (pid ${pids[name]}) ended before its CPU could be read`);
    procs[name] = { user, sys };
  }
  return { w: { wall: Number(b.t - a.t) / 1e9, procs, machine: b.machine.busy - a.machine.busy, steal: b.machine.steal - a.machine.steal }, value };
}

/** One measured primitive or job. "ours" is the CPU of the processes doing the work; "machine" all of it. */
interface Measure {
  name: string;
  what: string;
  bytes: number;
  ops: number;
  seconds: number;
  mibPerSec: number;
  opsPerSec: number;
  /** CPU ms per MiB moved: each process, their sum, the whole machine. */
  msPerMiB: { procs: Record<string, number>; ours: number; machine: number };
  /** CPU µs per operation (read, write, request or call), the same three ways. */
  usPerOp: { procs: Record<string, number>; ours: number; machine: number };
  /** Cores in use: ours, the machine's, and the rest (other tenants of the machine). */
  cores: { ours: number; machine: number; others: number };
  /** Share of our CPU spent in the kernel. */
  sysShare: number;
  steal: number;
  extra?: Record<string, unknown>;
  /** Every repetition (this measure is the one with the least CPU per unit of ours). */
  reps?: RepSummary[];
}

interface RepSummary {
  msPerMiB: number;
  usPerOp: number;
  machineMsPerMiB: number;
  machineUsPerOp: number;
  mibPerSec: number;
  opsPerSec: number;
  othersCores: number;
}

/**
 * Of several repetitions, the one with the least CPU per unit (ours): the floor is what the work
 * can cost, and a shared machine only ever adds to it (cache misses, less batching, preemption).
 */
function pick(runs: Measure[]): Measure {
  const cost = (m: Measure): number => (m.bytes > 0 ? m.msPerMiB.ours : m.usPerOp.ours);
  const best = runs.reduce((a, b) => (cost(b) < cost(a) ? b : a));
  const reps = runs.map((m) => ({
    msPerMiB: m.msPerMiB.ours,
    usPerOp: m.usPerOp.ours,
    machineMsPerMiB: m.msPerMiB.machine,
    machineUsPerOp: m.usPerOp.machine,
    mibPerSec: m.mibPerSec,
    opsPerSec: m.opsPerSec,
    othersCores: m.cores.others,
  }));
  return { ...best, reps };
}

async function repeated(f: () => Promise<Measure>): Promise<Measure> {
  const runs: Measure[] = [];
  for (let i = 0; i < reps; i++) runs.push(await f());
  return pick(runs);
}

function r3(x: number): number {
  return Number(x.toPrecision(4));
}

function measureOf(name: string, what: string, w: Window, bytes: number, ops: number, extraCpu: Record<string, number> = {}, extra?: Record<string, unknown>): Measure {
  const cpu: Record<string, number> = {};
  let sys = 0;
  for (const [k, v] of Object.entries(w.procs)) {
    cpu[k] = v.user + v.sys;
    sys += v.sys;
  }
  Object.assign(cpu, extraCpu);
  const ours = Object.values(cpu).reduce((a, b) => a + b, 0);
  const mib = bytes / MiB;
  const perMiB = (s: number): number => (mib > 0 ? r3((s * 1e3) / mib) : NaN);
  const perOp = (s: number): number => (ops > 0 ? r3((s * 1e6) / ops) : NaN);
  return {
    name,
    what,
    bytes,
    ops,
    seconds: r3(w.wall),
    mibPerSec: r3(mib / w.wall),
    opsPerSec: r3(ops / w.wall),
    msPerMiB: { procs: Object.fromEntries(Object.entries(cpu).map(([k, v]) => [k, perMiB(v)])), ours: perMiB(ours), machine: perMiB(w.machine) },
    usPerOp: { procs: Object.fromEntries(Object.entries(cpu).map(([k, v]) => [k, perOp(v)])), ours: perOp(ours), machine: perOp(w.machine) },
    cores: { ours: r3(ours / w.wall), machine: r3(w.machine / w.wall), others: r3(Math.max(0, w.machine - ours) / w.wall) },
    sysShare: r3(sys / Math.max(1e-9, ours - Object.values(extraCpu).reduce((a, b) => a + b, 0))),
    steal: r3(w.steal / w.wall),
    ...(extra ? { extra } : {}),
  };
}

function show(m: Measure): void {
  const perOp = m.ops > 0 ? `, ${m.usPerOp.ours.toFixed(2)} µs/op ours, ${m.usPerOp.machine.toFixed(2)} machine, ${Math.round(m.opsPerSec)} op/s` : '';
  const perMiB = m.bytes > 0 ? `${m.mibPerSec.toFixed(0)} MiB/s, ${m.msPerMiB.ours.toFixed(3)} ms/MiB ours (${Object.entries(m.msPerMiB.procs).map(([k, v]) => `${k} ${v.toFixed(3)}`).join(', ')}), ${m.msPerMiB.machine.toFixed(3)} machine` : '';
  log(`${m.name}: ${perMiB}${perOp}; cores ours ${m.cores.ours}, others ${m.cores.others}`);
}

// ---- worker processes ----

const live = new Set<ChildProcess>();
process.on('exit', () => {
  for (const p of live) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
});

interface Worker {
  readonly name: string;
  readonly pid: number;
  /** The next report that `want` accepts; fails on the worker's error or exit, or after `ms`. */
  next(want: (r: WorkerReport) => boolean, ms: number): Promise<WorkerReport>;
  command(c: WorkerCommand): void;
  stop(): Promise<void>;
}

function startWorker(name: string, task: WorkerTask): Worker {
  const proc = fork(WORKER, [], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  live.add(proc);
  const reports: WorkerReport[] = [];
  let wake: (() => void) | undefined;
  let ended: string | undefined;
  proc.on('message', (m: WorkerReport) => {
    reports.push(m);
    wake?.();
  });
  proc.once('exit', (code, signal) => {
    live.delete(proc);
    ended = `${name} exited (${code ?? signal})`;
    wake?.();
  });
  proc.send(task);
  if (proc.pid === undefined) throw new Error(`${name}: could not start`);
  const pid = proc.pid;
  return {
    name,
    pid,
    async next(want, ms) {
      const deadline = Date.now() + ms;
      for (;;) {
        const err = reports.find((r) => r.error !== undefined);
        if (err) throw new Error(`${name}: ${err.error}`);
        const i = reports.findIndex(want);
        if (i >= 0) return reports.splice(i, 1)[0]!;
        if (ended !== undefined) throw new Error(ended);
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`${name}: no report within ${ms} ms`);
        await new Promise<void>((r) => {
          const timer = setTimeout(r, left);
          wake = () => {
            clearTimeout(timer);
            r();
          };
        });
        wake = undefined;
      }
    },
    command(c) {
      if (proc.connected) proc.send(c);
    },
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      const gone = new Promise<void>((r) => proc.once('exit', () => r()));
      proc.kill('SIGKILL');
      await gone;
    },
  };
}

const hasPort = (r: WorkerReport): boolean => r.port !== undefined;
const isConnected = (r: WorkerReport): boolean => r.connected !== undefined;
const isDone = (r: WorkerReport): boolean => r.done !== undefined;

// ---- 1, 2: streams over loopback ----

const STREAM_BYTES = 16 * 2 ** 30;

async function stream(transport: Transport, read: 'onread' | 'data', certDir: string): Promise<Measure> {
  const name = `${transport} ${read}`;
  const limitMs = (seconds + 60) * 1000;
  const workers: Worker[] = [];
  try {
    let done: WorkerReport['done'];
    let connected: WorkerReport['connected'];
    let pids: Pids;
    let run: () => Promise<void>;
    if (transport === 'tcp' && read === 'data') {
      // bench/lib/tcp.ts itself: the raw Node TCP of npm run bench and of the re-replication bench.
      const sink = startWorker('sink', { kind: 'sink-server' });
      workers.push(sink);
      const port = (await sink.next(hasPort, 30_000)).port!;
      const source = startWorker('source', { kind: 'blast' });
      workers.push(source);
      pids = { source: source.pid, sink: sink.pid };
      run = async () => {
        source.command({ go: { port, bytes: STREAM_BYTES, seconds } });
        done = (await source.next(isDone, limitMs)).done;
      };
    } else {
      const source = startWorker('source', { kind: 'stream-source', transport, certDir });
      workers.push(source);
      const port = (await source.next(hasPort, 30_000)).port!;
      const sink = startWorker('sink', { kind: 'stream-sink', transport, certDir, port, read });
      workers.push(sink);
      connected = (await sink.next(isConnected, 30_000)).connected;
      pids = { source: source.pid, sink: sink.pid };
      run = async () => {
        source.command({ go: { bytes: STREAM_BYTES, seconds } });
        done = (await sink.next(isDone, limitMs)).done;
      };
    }
    const { w } = await timed(pids, run);
    const what = `${transport === 'tls' ? 'TLS (peer RPC: x509, TLS 1.3)' : 'plain TCP'} on loopback, two Node processes, 1 MiB writes, ${read === 'onread' ? 'receiver reads into one static onread buffer' : "receiver counts 'data' events"}${transport === 'tcp' && read === 'data' ? ' (bench/lib/tcp.ts: raw Node TCP)' : ''}`;
    return measureOf(`${transport}-${read}`, what, w, done!.bytes, 0, {}, { name, ...(connected?.cipher ? { protocol: connected.protocol, cipher: connected.cipher } : {}), workerSeconds: done!.seconds });
  } finally {
    for (const wk of workers) await wk.stop();
  }
}

// ---- 3: small exchanges ----

const RR_DEPTH = 32;
const RR_OPS = 20_000_000;
/** An NBD READ: a 28-byte request, a 16-byte simple reply header and 4 KiB. */
const NBD_REQ = 28;
const NBD_REPLY = 16 + 4096;
/** A peer GET of one 4 KiB piece: request and reply frames with a few dozen bytes of header. */
const PEER_REQ = 64;
const PEER_REPLY = 64 + 4096;

async function rr(transport: Transport, request: number, reply: number, certDir: string): Promise<Measure> {
  const workers: Worker[] = [];
  try {
    const server = startWorker('server', { kind: 'rr-server', transport, certDir, request, reply });
    workers.push(server);
    const port = (await server.next(hasPort, 30_000)).port!;
    const client = startWorker('client', { kind: 'rr-client', transport, certDir, port, request, reply, depth: RR_DEPTH });
    workers.push(client);
    const connected = (await client.next(isConnected, 30_000)).connected;
    let done: WorkerReport['done'];
    const { w } = await timed({ client: client.pid, server: server.pid }, async () => {
      client.command({ go: { bytes: 0, ops: RR_OPS, seconds } });
      done = (await client.next(isDone, (seconds + 60) * 1000)).done;
    });
    const what = `${transport === 'tls' ? 'TLS (peer RPC setup)' : 'plain TCP'}: ${request}-byte requests, ${reply}-byte replies, ${RR_DEPTH} in flight, two Node processes (replies to one read sent in one write)`;
    return measureOf(`rr-${transport}-${reply}`, what, w, done!.bytes, done!.ops, {}, { depth: RR_DEPTH, request, reply, ...(connected?.cipher ? { protocol: connected.protocol, cipher: connected.cipher } : {}) });
  } finally {
    for (const wk of workers) await wk.stop();
  }
}

// ---- in this process: CRC32C and the page cache ----

const self: Pids = { bench: process.pid };
const IN_PROCESS_BYTES = 16 * 2 ** 30;

/** Calls `step` (which handles `bytesPerStep` bytes, `opsPerStep` operations) until the byte or time bound. */
async function loop(name: string, what: string, bytesPerStep: number, opsPerStep: number, step: (i: number) => void, maxBytes = IN_PROCESS_BYTES): Promise<Measure> {
  // A short warm-up, so the JIT's first compilations are not in the figure.
  for (let i = 0; i < 64; i++) step(i);
  return repeated(async () => {
    let n = 0;
    const { w } = await timed(self, () => {
      const deadline = Date.now() + seconds * 1000;
      const maxSteps = Math.max(1, Math.floor(maxBytes / bytesPerStep));
      // Synchronous, no await per step; the clock is read every 64 steps (small steps cost less than reading it).
      while (n < maxSteps && (n % 64 !== 0 || Date.now() < deadline)) step(n++);
      return Promise.resolve();
    });
    return measureOf(name, what, w, n * bytesPerStep, n * opsPerStep);
  });
}

/** The same, with `depth` steps in flight at once (the thread-pool versions). */
async function loopAsync(name: string, what: string, bytesPerStep: number, depth: number, step: (i: number) => Promise<void>, maxBytes = IN_PROCESS_BYTES): Promise<Measure> {
  for (let i = 0; i < 64; i++) await step(i);
  return repeated(async () => {
    let n = 0;
    const { w } = await timed(self, async () => {
      const deadline = Date.now() + seconds * 1000;
      const maxSteps = Math.max(1, Math.floor(maxBytes / bytesPerStep));
      const lane = async (): Promise<void> => {
        while (n < maxSteps && Date.now() < deadline) await step(n++);
      };
      await Promise.all(Array.from({ length: depth }, lane));
    });
    return measureOf(name, what, w, n * bytesPerStep, n);
  });
}

async function crcs(): Promise<Measure[]> {
  // 16 MiB of data, gone through in turn: what a checksum sees is fresh from a socket or a file,
  // not the same few KiB in L1.
  const pool = Buffer.allocUnsafe(16 * MiB);
  randomFillSync(pool);
  const pieces = pool.length / MiB;
  const out = Buffer.alloc((MiB / 4096) * 4);
  const one = Buffer.alloc(4);
  let sink = 0;
  const res: Measure[] = [];
  res.push(await loop('crc-noders-1MiB', '@node-rs/crc32 crc32c, one call per 1 MiB', MiB, 1, (i) => {
    sink ^= crc32c(pool.subarray((i % pieces) * MiB, (i % pieces) * MiB + MiB));
  }));
  const smallPieces = pool.length / 4096;
  res.push(await loop('crc-noders-4KiB', '@node-rs/crc32 crc32c, one call per 4 KiB', 4096, 1, (i) => {
    const at = (i % smallPieces) * 4096;
    sink ^= crc32c(pool.subarray(at, at + 4096));
  }));
  const native = nativeSectorCrcs(pool.subarray(0, MiB), 4096, out);
  if (native) {
    res.push(await loop('crc-native-1MiB', "Torus's native sector CRC32C (native/block_write.c), 4 KiB sectors, one call per 1 MiB", MiB, 1, (i) => {
      nativeSectorCrcs(pool.subarray((i % pieces) * MiB, (i % pieces) * MiB + MiB), 4096, out);
    }));
    res.push(await loop('crc-native-4KiB', "Torus's native sector CRC32C, one call per 4 KiB", 4096, 1, (i) => {
      const at = (i % smallPieces) * 4096;
      nativeSectorCrcs(pool.subarray(at, at + 4096), 4096, one);
    }));
  } else log('the native block_write addon is not built (npm run build:native): its CRC is not measured');
  if (sink === 0.5) log('unreachable');
  return res;
}

interface CipherSpeed {
  alg: string;
  /** MiB encrypted per CPU second (openssl speed divides by user CPU time), 16 KiB records. */
  mibPerCpuSecond: number;
  msPerMiB: number;
}

/**
 * The TLS 1.3 ciphers alone, as OpenSSL (which Node's TLS uses) runs them on this CPU: not charged
 * to any job (TLS is, whole), but what part of TLS's figure is the cipher and what part the rest.
 */
function cipherSpeeds(): CipherSpeed[] {
  const out: CipherSpeed[] = [];
  for (const alg of ['aes-256-gcm', 'aes-128-gcm', 'chacha20-poly1305']) {
    const r = spawnSync('openssl', ['speed', '-seconds', String(Math.max(1, Math.round(seconds))), '-bytes', '16384', '-evp', alg], { encoding: 'utf8', timeout: 60_000 });
    // The last line: "AES-256-GCM  4476608.31k" (1000s of bytes per second).
    const m = /([\d.]+)k\s*$/.exec((r.stdout ?? '').trim());
    if (r.status !== 0 || !m) {
      log(`openssl speed ${alg} gave nothing usable`);
      continue;
    }
    const mibPerCpuSecond = (Number(m[1]) * 1000) / MiB;
    out.push({ alg, mibPerCpuSecond: r3(mibPerCpuSecond), msPerMiB: r3(1000 / mibPerCpuSecond) });
    log(`openssl speed ${alg}, 16 KiB: ${mibPerCpuSecond.toFixed(0)} MiB per CPU second, ${(1000 / mibPerCpuSecond).toFixed(3)} ms/MiB`);
  }
  return out;
}

const FS_FILE_BYTES = 256 * MiB;
const WRITEBACK_BYTES = 2 ** 30;

function fsRead(fd: number, buf: Buffer, position: number): Promise<void> {
  return new Promise((resolve, reject) => read(fd, buf, 0, buf.length, position, (err) => (err ? reject(err) : resolve())));
}

function fsWrite(fd: number, buf: Buffer, position: number): Promise<void> {
  return new Promise((resolve, reject) => write(fd, buf, 0, buf.length, position, (err) => (err ? reject(err) : resolve())));
}

async function pageCache(dir: string): Promise<Measure[]> {
  const path = join(dir, 'page-cache.bin');
  const res: Measure[] = [];
  const fd = openSync(path, 'w+');
  try {
    const chunk = Buffer.allocUnsafe(MiB);
    for (let at = 0; at < FS_FILE_BYTES; at += MiB) {
      randomFillSync(chunk);
      writeSync(fd, chunk, 0, MiB, at);
    }
    // Clean and cached: no writeback under way while the reads run.
    fdatasyncSync(fd);
    let short = 0;
    for (const bs of [4 * KiB, 64 * KiB, MiB]) {
      const buf = Buffer.allocUnsafe(bs);
      const slots = FS_FILE_BYTES / bs;
      const label = bs >= MiB ? `${bs / MiB}MiB` : `${bs / KiB}KiB`;
      res.push(await loop(`pread-sync-${label}`, `fs.readSync ${label} from the page cache`, bs, 1, (i) => {
        readSync(fd, buf, 0, bs, (i % slots) * bs);
      }));
      if (pageCacheReadsAvailable)
        res.push(await loop(`pread-nowait-${label}`, `preadv2 RWF_NOWAIT ${label} from the page cache on the main thread (native/page_cache_read.c, as the storage node reads; readSync for what it leaves)`, bs, 1, (i) => {
          const at = (i % slots) * bs;
          const n = readCached(fd, buf, at);
          if (n < bs) {
            // A folio locked at that instant (or evicted): the storage node goes to the thread pool here.
            short++;
            readSync(fd, buf, n, bs - n, at + n);
          }
        }));
      const bufs = Array.from({ length: 4 }, () => Buffer.allocUnsafe(bs));
      res.push(await loopAsync(`pread-pool-${label}`, `fs.read ${label} through the thread pool, 4 in flight`, bs, 4, (i) => fsRead(fd, bufs[i % 4]!, (i % slots) * bs)));
    }
    if (short > 0) log(`${short} RWF_NOWAIT reads came back short and were finished with readSync`);
    for (const bs of [64 * KiB, MiB]) {
      const buf = Buffer.allocUnsafe(bs);
      randomFillSync(buf);
      const slots = FS_FILE_BYTES / bs;
      const label = bs >= MiB ? `${bs / MiB}MiB` : `${bs / KiB}KiB`;
      res.push(await loop(`pwrite-sync-${label}`, `fs.writeSync ${label} over cached pages (no writeback in the window)`, bs, 1, (i) => {
        writeSync(fd, buf, 0, bs, (i % slots) * bs);
      }));
      res.push(await loopAsync(`pwrite-pool-${label}`, `fs.write ${label} over cached pages through the thread pool, 4 in flight`, bs, 4, (i) => fsWrite(fd, buf, (i % slots) * bs)));
    }
  } finally {
    closeSync(fd);
    rmSync(path, { force: true });
  }
  // Into new blocks, as a store's blocks first land: page allocation, the file system's block
  // allocation and the writeback, which the fdatasync every 32 MiB makes this process start (and
  // be charged for) instead of a kernel flusher thread. Bounded by the disk, not the CPU; at most
  // WRITEBACK_BYTES a repetition.
  const wpath = join(dir, 'writeback.bin');
  const wfd = openSync(wpath, 'w');
  try {
    const buf = Buffer.allocUnsafe(MiB);
    randomFillSync(buf);
    // A sparse file, as a storage node's (torusd --size): each MiB fills the next hole, across the
    // repetitions never over pages already written.
    ftruncateSync(wfd, (reps + 1) * WRITEBACK_BYTES);
    let next = 0;
    res.push(await loop('pwrite-writeback-new-1MiB', 'fs.writeSync 1 MiB into the next hole of a sparse file, fdatasync every 32 MiB: page cache, block allocation, writeback to disk', MiB, 1, () => {
      writeSync(wfd, buf, 0, MiB, next++ * MiB);
      if (next % 32 === 0) fdatasyncSync(wfd);
    }, WRITEBACK_BYTES));
    fdatasyncSync(wfd);
    // Over what that wrote (allocated on disk, clean in the page cache), in turn: a block written
    // again costs no allocation, only the copy and the writeback.
    const span = Math.max(64, Math.min(next, 1024));
    let k = 0;
    res.push(await loop('pwrite-writeback-over-1MiB', `fs.writeSync 1 MiB over allocated, clean pages (a ${span} MiB region in turn), fdatasync every 32 MiB: page cache and writeback to disk`, MiB, 1, () => {
      writeSync(wfd, buf, 0, MiB, (k++ % span) * MiB);
      if (k % 32 === 0) fdatasyncSync(wfd);
    }, WRITEBACK_BYTES));
  } finally {
    closeSync(wfd);
    rmSync(wpath, { force: true });
  }
  return res;
}

// ---- 6: the NBD hop alone, next to nbdkit ----

type HopJob = 'P1' | 'P2' | 'P3';
const HOP_JOBS: readonly HopJob[] = ['P1', 'P2', 'P3'];

interface HopRun {
  job: HopJob;
  side: 'node' | 'nbdkit';
  /** The median of the repetitions' figures (MiB/s or IOPS), and each. */
  figure: number;
  figures: number[];
  unit: 'MiB/s' | 'IOPS';
  /** The repetition with the least CPU per unit (all of them in its `reps`), and its fio outcome. */
  measure: Measure;
  fio: FioOutcome;
}

async function nbdHop(dir: string): Promise<HopRun[]> {
  const file = join(dir, 'nbd.img');
  const fd = openSync(file, 'w');
  try {
    // Data in every byte (the read jobs need data), and in the page cache, as nbdkit's would be.
    const chunk = Buffer.allocUnsafe(4 * MiB);
    for (let at = 0; at < size; at += chunk.length) {
      randomFillSync(chunk);
      writeSync(fd, chunk, 0, Math.min(chunk.length, size - at), at);
    }
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
  const outDir = join(dir, 'fio');
  mkdirSync(outDir, { recursive: true });
  const node = startWorker('nbd-node', { kind: 'nbd-file', file, size });
  let kit: Proc | undefined;
  const runs: HopRun[] = [];
  try {
    const nodePort = (await node.next(hasPort, 30_000)).port!;
    const kitPort = await freePort();
    kit = await startNbdkit(file, kitPort);
    const all: (HopRun & { rep: number })[] = [];
    for (let rep = 0; rep < reps; rep++)
      for (const [i, job] of HOP_JOBS.entries()) {
        // Alternate who goes first, so neither side always gets the quieter or the warmer moment.
        const order: ('node' | 'nbdkit')[] = (i + rep) % 2 === 0 ? ['node', 'nbdkit'] : ['nbdkit', 'node'];
        for (const side of order) {
          const uri = side === 'node' ? `nbd://127.0.0.1:${nodePort}/` : `nbd://127.0.0.1:${kitPort}/`;
          const pid = side === 'node' ? node.pid : kit.pid;
          const args = jobArgs(job, region, nbdSeconds, 0);
          let fio: FioOutcome | undefined;
          const { w } = await timed({ [side === 'node' ? 'NbdServer' : 'nbdkit']: pid }, async () => {
            fio = await runFio(uri, `${job}-${side}-${rep}`, args, join(outDir, `${job}-${side}-${rep}.json`), nbdSeconds + 300);
          });
          const f = fio!;
          const runtime = f.runtimeMs / 1000;
          // No ramp: what fio moved in its runtime is all it moved (P1's final flush comes after).
          const bytes = f.readBytesPerSec * runtime + f.writeIoBytes;
          const ops = (f.readIops + f.writeIops) * runtime;
          const m = measureOf(`nbd-${job}-${side}`, `fio nbd engine, ${job}'s job (${args.join(' ')}), against ${side === 'node' ? "Torus's NbdServer over one file (pread RWF_NOWAIT, thread-pool pwrite, fdatasync)" : 'nbdkit file'}`, w, bytes, ops, { fio: f.fioCores * runtime });
          const figure = job === 'P3' ? f.readIops : (f.readBytesPerSec + f.writeBytesPerSec) / MiB;
          all.push({ rep, job, side, figure, figures: [figure], unit: job === 'P3' ? 'IOPS' : 'MiB/s', measure: m, fio: f });
          const per = job === 'P3' ? m.usPerOp : m.msPerMiB;
          const u = job === 'P3' ? 'µs/op' : 'ms/MiB';
          log(`NBD hop ${job} ${side} (rep ${rep + 1}/${reps}): ${job === 'P3' ? `${Math.round(figure)} IOPS` : `${figure.toFixed(0)} MiB/s`}; ${per.ours.toFixed(2)} ${u} ours (${Object.entries(per.procs).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(', ')}), ${per.machine.toFixed(2)} machine; others ${m.cores.others} cores`);
        }
      }
    for (const job of HOP_JOBS)
      for (const side of ['node', 'nbdkit'] as const) {
        const rs = all.filter((r) => r.job === job && r.side === side);
        const figures = rs.map((r) => r.figure);
        const m = pick(rs.map((r) => r.measure));
        const best = rs.find((r) => r.measure.msPerMiB.ours === m.msPerMiB.ours) ?? rs[0]!;
        runs.push({ job, side, figure: median(figures), figures, unit: best.unit, measure: m, fio: best.fio });
      }
  } finally {
    await node.stop();
    await kit?.stop('SIGTERM', 10_000);
    rmSync(file, { force: true });
  }
  return runs;
}

// ---- the derived table ----

interface Item {
  what: string;
  /** How many of the primitive's unit per unit of the job (MiB, or 4 KiB read for P3). */
  times: number;
  /** The measurement it is charged at (the cheapest of the candidates measured). */
  from: string;
  /** CPU per unit of the primitive: ms per MiB (µs per op for P3), ours and the machine's. */
  ours: number;
  machine: number;
}

interface Ceiling {
  job: string;
  title: string;
  unit: 'MiB/s' | 'IOPS';
  items: Item[];
  /** Sum of the items, ms per MiB or µs per op. */
  sum: { ours: number; machine: number };
  /** What that CPU allows on all of this machine's cores, nothing else running. */
  ceiling: { ours: number; machine: number };
  target: { figure: number; how: string };
  /** ceiling / target (from our processes' CPU). */
  headroom: number;
  verdict: string;
  /** The same with Torus's own NbdServer (measured in the NBD hop) in place of the minimal NBD leg. */
  withNbdServer?: { sum: number; ceiling: number; headroom: number; replaced: string };
}

/**
 * The cheapest of the named measurements, per MiB (or per op): all its processes, or only the one
 * named `part` (one end of a pair, fio). The machine figure is the measurement's whole-machine CPU
 * apportioned to the part as its share of our CPU.
 */
function cheapest(ms: Measure[], names: string[], perOp: boolean, part?: string): { from: string; ours: number; machine: number } {
  const cands = ms.filter((m) => names.includes(m.name));
  if (cands.length === 0) throw new Error(`none of ${names.join(', ')} was measured`);
  const of = (m: Measure): { ours: number; machine: number } => {
    const u = perOp ? m.usPerOp : m.msPerMiB;
    const ours = part === undefined ? u.ours : (u.procs[part] ?? NaN);
    return { ours, machine: (u.machine * ours) / u.ours };
  };
  const best = cands.reduce((a, b) => (of(b).ours < of(a).ours ? b : a));
  return { from: part === undefined ? best.name : `${best.name} (${part})`, ...of(best) };
}

function verdictOf(headroom: number): string {
  // The figures move by 10-20% from run to run on a shared machine: within 25% either way, undecided.
  if (headroom < 0.8) return 'beyond this machine';
  if (headroom < 1.25) return 'undecided';
  return 'within the floor';
}

function derive(all: Measure[], hop: HopRun[], diskMiBps: number, rawTcpMiBps: number): Ceiling[] {
  const item = (what: string, times: number, names: string[], perOp = false, part?: string): Item => ({ what, times, ...cheapest(all, names, perOp, part) });
  const TCP = ['tcp-onread', 'tcp-data'];
  const TLS = ['tls-onread', 'tls-data'];
  const CRC_MiB = ['crc-noders-1MiB', 'crc-native-1MiB'];
  const CRC_4K = ['crc-noders-4KiB', 'crc-native-4KiB'];
  const PREAD_MiB = ['pread-sync-1MiB', 'pread-nowait-1MiB', 'pread-pool-1MiB'];
  const PREAD_4K = ['pread-sync-4KiB', 'pread-nowait-4KiB', 'pread-pool-4KiB'];
  const PWRITE = ['pwrite-writeback-new-1MiB', 'pwrite-writeback-over-1MiB'];
  const kit = (job: HopJob): number => hop.find((h) => h.job === job && h.side === 'nbdkit')?.figure ?? NaN;
  // fio is the NBD client of npm run bench, on the same cores: its CPU per MiB (per read) in the
  // nbdkit run of the same job is charged too.
  const fio = (job: HopJob, perOp = false): Item => item(`NBD client: fio's own CPU (${job}, nbdkit run)`, 1, [`nbd-${job}-nbdkit`], perOp, 'fio');
  const hopItem = (job: HopJob, perOp = false): Item => item(`Torus's NbdServer over one file + fio (${job}, NBD hop alone)`, 1, [`nbd-${job}-node`], perOp);
  const sumOf = (items: Item[]): { ours: number; machine: number } => ({
    ours: items.reduce((a, i) => a + i.times * i.ours, 0),
    machine: items.reduce((a, i) => a + i.times * i.machine, 0),
  });
  // The node serving NBD holds 2/3 of the blocks (R=2 of 3 nodes): 1/3 of what it reads comes
  // from a peer; of what it writes, 2/3 goes to one peer and 1/3 to two: 4/3 MiB per MiB.
  const peerReadShare = 1 - REPLICATION / NODES;
  const peerWriteShare = (REPLICATION / NODES) * (REPLICATION - 1) + (1 - REPLICATION / NODES) * REPLICATION;
  const out: Ceiling[] = [];
  const make = (job: string, title: string, unit: 'MiB/s' | 'IOPS', items: Item[], target: { figure: number; how: string }, nbd?: { hop: Item; replaces: number[] }): void => {
    const sum = sumOf(items);
    const scale = unit === 'IOPS' ? 1e6 : 1e3;
    const ceiling = { ours: (CORES * scale) / sum.ours, machine: (CORES * scale) / sum.machine };
    const headroom = ceiling.ours / target.figure;
    let withNbdServer: Ceiling['withNbdServer'];
    if (nbd) {
      const rest = items.filter((_, i) => !nbd.replaces.includes(i));
      const replaced = nbd.replaces.map((i) => items[i]!.what).join(' + ');
      const s = sumOf([...rest, nbd.hop]).ours;
      const c = (CORES * scale) / s;
      withNbdServer = { sum: r3(s), ceiling: r3(c), headroom: r3(c / target.figure), replaced };
    }
    out.push({ job, title, unit, items, sum: { ours: r3(sum.ours), machine: r3(sum.machine) }, ceiling: { ours: r3(ceiling.ours), machine: r3(ceiling.machine) }, target, headroom: r3(headroom), verdict: verdictOf(headroom), ...(withNbdServer ? { withNbdServer } : {}) });
  };
  make(
    'P1',
    'seq write 1 MiB qd 8, NBD on storage node 1, R=2 of 3 nodes (per MiB written)',
    'MiB/s',
    [
      fio('P1'),
      item('NBD server: receive 1 MiB over loopback TCP', 1, TCP, false, 'sink'),
      item('page cache on node 1 or a peer: the first copy, buffered write + writeback', 1, PWRITE),
      item(`to peers: ${peerWriteShare.toFixed(2)} MiB over TLS (both ends)`, peerWriteShare, TLS),
      item(`CRC32C: 1 MiB on the writer + ${peerWriteShare.toFixed(2)} MiB verified on replicas`, 1 + peerWriteShare, CRC_MiB),
      item(`page cache: the other ${REPLICATION - 1} copy, buffered write + writeback`, REPLICATION - 1, PWRITE),
    ],
    { figure: r3((0.8 * diskMiBps) / REPLICATION), how: `0.8 x disk ${diskMiBps.toFixed(0)} MiB/s / R=${REPLICATION}` },
    // The NBD hop writes each MiB into the page cache itself (its writeback only in part: the flush at the end).
    { hop: hopItem('P1'), replaces: [0, 1, 2] },
  );
  make(
    'P2',
    'seq read 1 MiB qd 8, NBD on storage node 1 (per MiB read)',
    'MiB/s',
    [
      fio('P2'),
      item('NBD server: send 1 MiB over loopback TCP', 1, TCP, false, 'source'),
      item('page cache: pread 1 MiB (on node 1 or a peer)', 1, PREAD_MiB),
      item(`from peers: ${peerReadShare.toFixed(2)} MiB over TLS (both ends)`, peerReadShare, TLS),
      item('CRC32C: verify 1 MiB once', 1, CRC_MiB),
    ],
    { figure: r3(0.5 * kit('P2')), how: `0.5 x nbdkit ${kit('P2').toFixed(0)} MiB/s` },
    { hop: hopItem('P2'), replaces: [0, 1, 2] },
  );
  make(
    'P3',
    'rand read 4 KiB qd 32, NBD on storage node 1 (per read)',
    'IOPS',
    [
      fio('P3', true),
      item('NBD server: a 28-byte request in, 4 KiB reply out over loopback TCP, 32 in flight', 1, ['rr-tcp-4112'], true, 'server'),
      item('page cache: pread 4 KiB (on node 1 or a peer)', 1, PREAD_4K, true),
      item(`from peers: ${peerReadShare.toFixed(2)} of the reads as a 4 KiB exchange over TLS (both ends)`, peerReadShare, ['rr-tls-4160'], true),
      item('CRC32C: verify 4 KiB once', 1, CRC_4K, true),
    ],
    { figure: r3(0.5 * kit('P3')), how: `0.5 x nbdkit ${Math.round(kit('P3'))} IOPS` },
    { hop: hopItem('P3', true), replaces: [0, 1, 2] },
  );
  for (const t of ['tls', 'tcp'] as const)
    make(
      t === 'tls' ? 'P7' : 'P7 plain',
      `re-replication, peer RPC over ${t === 'tls' ? 'TLS (the default)' : 'plaintext (--insecure-peer-network)'} (per MiB copied)`,
      'MiB/s',
      [
        item('source: pread 1 MiB', 1, PREAD_MiB),
        item(`1 MiB over ${t === 'tls' ? 'TLS' : 'TCP'} (both ends)`, 1, t === 'tls' ? TLS : TCP),
        item('CRC32C: verify 1 MiB on the new replica', 1, CRC_MiB),
        item('new replica: 1 MiB buffered write + writeback', 1, PWRITE),
      ],
      { figure: r3(0.5 * rawTcpMiBps), how: `0.5 x raw Node TCP ${rawTcpMiBps.toFixed(0)} MiB/s (bench/lib/tcp.ts rawTcp)` },
    );
  return out;
}

function fmtFig(unit: string, v: number): string {
  if (!Number.isFinite(v)) return String(v);
  return unit === 'IOPS' ? `${(v / 1000).toFixed(1)}k` : `${Math.round(v)}`;
}

function printResults(measures: Measure[], hop: HopRun[], ceilings: Ceiling[], diskMiBps: number, rawTcpRuns: number[], ciphers: CipherSpeed[]): void {
  const lines: string[] = ['', '## Primitives (CPU per MiB and per operation: our processes, and the whole machine)', ''];
  lines.push(`Each row is the cheapest of ${reps} repetitions (ours); [the most expensive]. "others": cores busy with other work meanwhile.`, '');
  lines.push('| primitive | MiB/s | op/s | ms/MiB ours | ms/MiB machine | µs/op ours | µs/op machine | others (cores) |', '| --- | --- | --- | --- | --- | --- | --- | --- |');
  const worst = (m: Measure, k: 'msPerMiB' | 'usPerOp'): string => (m.reps && m.reps.length > 1 ? ` [${Math.max(...m.reps.map((r) => r[k])).toFixed(k === 'msPerMiB' ? 3 : 2)}]` : '');
  for (const m of measures)
    lines.push(
      `| ${m.name} | ${m.bytes > 0 ? m.mibPerSec.toFixed(0) : '-'} | ${m.ops > 0 ? Math.round(m.opsPerSec) : '-'} | ${m.bytes > 0 ? `${m.msPerMiB.ours.toFixed(3)}${worst(m, 'msPerMiB')}` : '-'} | ${m.bytes > 0 ? m.msPerMiB.machine.toFixed(3) : '-'} | ${m.ops > 0 ? `${m.usPerOp.ours.toFixed(2)}${worst(m, 'usPerOp')}` : '-'} | ${m.ops > 0 ? m.usPerOp.machine.toFixed(2) : '-'} | ${m.cores.others.toFixed(2)} |`,
    );
  const tls = measures.find((m) => m.extra?.['cipher'] !== undefined);
  if (tls) lines.push('', `TLS negotiated: ${String(tls.extra!['protocol'])} ${String(tls.extra!['cipher'])}`);
  if (ciphers.length > 0) lines.push(`the ciphers alone (openssl speed, 16 KiB records, per CPU second): ${ciphers.map((c) => `${c.alg} ${c.msPerMiB.toFixed(3)} ms/MiB`).join(', ')}`);
  if (rawTcpRuns.length > 0) lines.push(`raw Node TCP (bench/lib/tcp.ts rawTcp, as npm run bench takes it): ${rawTcpRuns.map((x) => x.toFixed(0)).join(', ')} MiB/s`);
  if (Number.isFinite(diskMiBps)) lines.push(`disk sequential write (fio ${diskEngine}, O_DIRECT, 1 MiB, qd 8): ${diskMiBps.toFixed(0)} MiB/s`);
  if (hop.length > 0) {
    lines.push('', "## The NBD hop alone: Torus's NbdServer over one file vs nbdkit file (fio nbd engine, same file, same run)", '', `Figures: median [min–max] of ${reps}; CPU: the cheapest repetition.`, '');
    lines.push('| job | NbdServer | nbdkit | ratio | CPU ours NbdServer+fio | nbdkit+fio | machine (NbdServer run) |', '| --- | --- | --- | --- | --- | --- | --- |');
    for (const job of HOP_JOBS) {
      const n = hop.find((h) => h.job === job && h.side === 'node');
      const k = hop.find((h) => h.job === job && h.side === 'nbdkit');
      if (!n || !k) continue;
      const per = (m: Measure): string => (job === 'P3' ? `${m.usPerOp.ours.toFixed(1)} µs/op (server ${Object.values(m.usPerOp.procs)[0]!.toFixed(1)}, fio ${m.usPerOp.procs['fio']!.toFixed(1)})` : `${m.msPerMiB.ours.toFixed(2)} ms/MiB (server ${Object.values(m.msPerMiB.procs)[0]!.toFixed(2)}, fio ${m.msPerMiB.procs['fio']!.toFixed(2)})`);
      const mach = job === 'P3' ? `${n.measure.usPerOp.machine.toFixed(1)} µs/op` : `${n.measure.msPerMiB.machine.toFixed(2)} ms/MiB`;
      const range = (h: HopRun): string => (h.figures.length > 1 ? ` [${fmtFig(h.unit, Math.min(...h.figures))}–${fmtFig(h.unit, Math.max(...h.figures))}]` : '');
      lines.push(`| ${job} | ${fmtFig(n.unit, n.figure)}${range(n)} ${n.unit} | ${fmtFig(k.unit, k.figure)}${range(k)} ${k.unit} | ${(n.figure / k.figure).toFixed(2)} | ${per(n.measure)} | ${per(k.measure)} | ${mach} |`);
    }
  }
  if (ceilings.length > 0) {
    lines.push('', `## Ceilings: the floor's CPU per unit, and what it allows on ${CORES} cores`, '');
    lines.push('| job | primitive | x | charged at | ours | machine |', '| --- | --- | --- | --- | --- | --- |');
    for (const c of ceilings) {
      const u = c.unit === 'IOPS' ? 'µs/op' : 'ms/MiB';
      for (const i of c.items) lines.push(`| ${c.job} | ${i.what} | ${i.times.toFixed(2)} | ${i.from} | ${(i.times * i.ours).toFixed(3)} | ${(i.times * i.machine).toFixed(3)} |`);
      lines.push(`| ${c.job} | **sum (${u})** | | | **${c.sum.ours.toFixed(3)}** | ${c.sum.machine.toFixed(3)} |`);
    }
    lines.push('', '| job | floor CPU | ceiling on 2 cores | target (this run) | ceiling / target | with NbdServer as the NBD leg | verdict |', '| --- | --- | --- | --- | --- | --- | --- |');
    for (const c of ceilings) {
      const u = c.unit === 'IOPS' ? 'µs/op' : 'ms/MiB';
      const nb = c.withNbdServer ? `${fmtFig(c.unit, c.withNbdServer.ceiling)} ${c.unit} (x${c.withNbdServer.headroom.toFixed(2)})` : '-';
      lines.push(`| ${c.job} | ${c.sum.ours.toFixed(2)} ${u} (machine ${c.sum.machine.toFixed(2)}) | ${fmtFig(c.unit, c.ceiling.ours)} ${c.unit} (machine ${fmtFig(c.unit, c.ceiling.machine)}) | ${fmtFig(c.unit, c.target.figure)} ${c.unit} = ${c.target.how} | ${c.headroom.toFixed(2)} | ${nb} | ${c.verdict} |`);
    }
  }
  process.stdout.write(lines.join('\n') + '\n');
}

// ---- the run ----

const parent = argv['data-dir'] ? resolve(argv['data-dir']) : tmpdir();
mkdirSync(parent, { recursive: true });
const needBytes = (only.has('nbd') ? size : 0) + (only.has('fs') ? FS_FILE_BYTES + (reps + 1) * WRITEBACK_BYTES : 0) + (only.has('disk') ? 2 ** 30 : 0);
const fsStat = statfsSync(parent);
if (fsStat.bavail * fsStat.bsize < needBytes + 2 ** 30) usage(`${Math.round((fsStat.bavail * fsStat.bsize) / MiB)} MiB free in ${parent}; the run needs about ${Math.round(needBytes / MiB) + 1024} MiB`);
const root = mkdtempSync(join(parent, 'torus-floor-'));
// This process does the in-process primitives: set up as torusd is (src/core/malloc.ts).
const mallocTuned = tuneMalloc();
const machine = describeMachine(root);
const startedAt = new Date();
const command = `node ${process.argv.slice(1).map((a) => a.replace(`${REPO}/`, '')).join(' ')}`;
log(`${command}\n  machine: ${machine.cpuModel}, ${machine.cores} cores, ${machine.kernel}, node ${machine.node}, ${machine.fio}, ${machine.nbdkit}; data on ${machine.dataFilesystem}; load ${machine.loadAverage.join(' ')}`);
const onSignal = (sig: NodeJS.Signals): void => {
  log(`${sig}: killing every process started and removing ${root}`);
  // The 'exit' handlers (ours, bench/lib/procs.ts's) SIGKILL the children; then the directory goes.
  process.once('exit', () => rmSync(root, { recursive: true, force: true }));
  process.exit(130);
};
process.on('SIGINT', onSignal);
process.on('SIGTERM', onSignal);

try {
  const backgroundAtStart = await busyCores(1000);
  log(`the machine was ${backgroundAtStart.toFixed(2)} cores busy over the second before the run (other tenants)`);
  const measures: Measure[] = [];
  let hop: HopRun[] = [];
  let diskMiBps = NaN;
  const disks: FioOutcome[] = [];
  const certs = join(root, 'ca');
  if (only.has('streams') || only.has('rr')) {
    await createCa(certs, { name: 'Torus floor bench CA' });
    await issueCertificates(certs, 'floor-node', { out: join(certs, 'node') });
  }
  const certDir = join(certs, 'node');
  const add = (m: Measure): void => {
    measures.push(m);
    show(m);
  };
  const rawTcpRuns: number[] = [];
  if (only.has('streams')) {
    for (const t of ['tcp', 'tls'] as const) for (const r of ['onread', 'data'] as const) add(await repeated(() => stream(t, r, certDir)));
    // P7's reference exactly as npm run bench and the re-replication bench take it (this process
    // sends, a child discards; neither tunes malloc), wall-clock only: the median of three.
    for (let i = 0; i < 3; i++) rawTcpRuns.push((await rawTcp({ seconds: Math.min(seconds, 2) })).bytesPerSec / MiB);
    log(`raw Node TCP (bench/lib/tcp.ts rawTcp): ${rawTcpRuns.map((x) => x.toFixed(0)).join(', ')} MiB/s`);
  }
  const rawTcpMiBps = rawTcpRuns.length > 0 ? median(rawTcpRuns) : NaN;
  if (only.has('rr')) {
    add(await repeated(() => rr('tcp', NBD_REQ, NBD_REPLY, certDir)));
    add(await repeated(() => rr('tls', PEER_REQ, PEER_REPLY, certDir)));
  }
  let ciphers: CipherSpeed[] = [];
  if (only.has('crc')) {
    for (const m of await crcs()) add(m);
    ciphers = cipherSpeeds();
  }
  if (only.has('fs')) for (const m of await pageCache(root)) add(m);
  if (only.has('disk')) {
    for (let i = 0; i < reps; i++) {
      const d = await diskWrite(join(root, 'disk-write-probe'), 2 ** 30, 5, diskEngine, join(root, `disk-write-${i}.json`));
      disks.push(d);
      log(`disk sequential write (fio ${diskEngine}, O_DIRECT, 1 MiB, qd 8, ${i + 1}/${reps}): ${(d.writeBytesPerSec / MiB).toFixed(0)} MiB/s`);
    }
    diskMiBps = median(disks.map((d) => d.writeBytesPerSec / MiB));
  }
  if (only.has('nbd')) {
    hop = await nbdHop(root);
    for (const h of hop) measures.push(h.measure);
  }
  let ceilings: Ceiling[] = [];
  if (SECTIONS.every((s) => only.has(s))) ceilings = derive(measures, hop, diskMiBps, rawTcpMiBps);
  printResults(measures.filter((m) => !m.name.startsWith('nbd-')), hop, ceilings, diskMiBps, rawTcpRuns, ciphers);
  const out = argv.out ? resolve(argv.out) : join(REPO, 'bench', 'results', `floor-${startedAt.toISOString().replace(/[:.]/g, '-')}.json`);
  mkdirSync(dirname(out), { recursive: true });
  const finishedAt = new Date();
  writeFileSync(
    out,
    JSON.stringify(
      {
        version: 1,
        command,
        commit: spawnSync('git', ['rev-parse', 'HEAD'], { cwd: REPO, encoding: 'utf8' }).stdout?.trim() || 'unknown',
        startedAt: startedAt.toISOString(),
        finishedAt: finishedAt.toISOString(),
        seconds: Math.round((finishedAt.getTime() - startedAt.getTime()) / 1000),
        machine: { ...machine, loadAverageAtEnd: describeMachine(root).loadAverage },
        backgroundCores: { atStart: r3(backgroundAtStart), atEnd: r3(await busyCores(1000)) },
        options: { seconds, nbdSeconds, reps, waitQuiet, size, region, sections: [...only], cores: CORES, replication: REPLICATION, nodes: NODES, mallocTuned },
        rawTcpMiBps: { median: rawTcpMiBps, runs: rawTcpRuns },
        ciphers,
        notes: [
          'ours: user + system CPU of the processes doing the work (/proc/PID/stat, all threads; the NBD runs add fio\'s own figure); machine: busy time of the whole machine from /proc/stat, other tenants included (cores.others says how much of it was not ours)',
          'ceilings: cores x 1000 ms / (ms per MiB) or cores x 1e6 µs / (µs per op), as if nothing else ran and the work spread perfectly over the cores',
        ],
        measures,
        nbdHop: hop.map((h) => ({ job: h.job, side: h.side, figure: h.figure, figures: h.figures, unit: h.unit, fio: h.fio })),
        ...(disks.length > 0 ? { disk: { engine: diskEngine, args: diskWriteArgs('FILE', 2 ** 30, 5, diskEngine), writeMiBps: diskMiBps, runs: disks.map((d) => d.writeBytesPerSec / MiB), fio: disks } } : {}),
        ceilings,
      },
      null,
      2,
    ) + '\n',
  );
  log(`results: ${out} (${Math.round((finishedAt.getTime() - startedAt.getTime()) / 1000)} s)`);
} finally {
  for (const p of live) p.kill('SIGKILL');
  rmSync(root, { recursive: true, force: true });
}
