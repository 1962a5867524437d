// Issue 8's performance harness: the same fio jobs (nbd engine, JSON written with --output) against
//   - Torus: etcd, three torusd at R=2, `torusblk nbdserve`, one volume (2 GiB), and
//   - `nbdkit file` on a file of the same size (single disk, no replication: the ceiling),
// in one run on one machine, for each cluster block size asked for. Prints a table per block size
// (median [min-max] of the repetitions, ratio Torus/nbdkit last) with every process's peak RSS,
// their sum at one instant (P8) and each one's CPU per MiB and per I/O, beside this machine's own
// limits measured in the same run (the disk's write bandwidth, raw Node TCP), and saves everything
// with the machine's description under bench/results/.
//
//   npm run bench                                  (all three block sizes, 3 x 10 s per job)
//   npm run bench -- --quick                       (one block size, short jobs: under 2 minutes)
//   node dist/bench/perf.js --block-sizes 512KiB --profile /tmp/prof
//
// docs/performance.md has the figures, the command that produced them, and what limits each.

import { spawnSync } from 'node:child_process';
import { closeSync, ftruncateSync, mkdirSync, mkdtempSync, openSync, readdirSync, rmSync, statfsSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { usageExits } from '../scripts/lib/cli.js';
import { parseSize } from '../src/core/units.js';
import { freePort } from '../test/helpers/etcd.js';
import { have } from '../test/helpers/nbd-tools.js';
import { ok } from '../test/helpers/procs.js';
import { collapse, summarize, writeFlameSvg, writeFolded, type ProfileSummary } from './lib/cpuprofile.js';
import { directEngine, diskWrite, diskWriteArgs, figure, fillArgs, JOB_IDS, JOBS, jobArgs, runFio, type FioOutcome, type JobId, type Region } from './lib/fio.js';
import { anatomy, type Anatomy } from './lib/anatomy.js';
import { counterDelta, diskWrittenBytes, nodeCounters, type NodeCounters } from './lib/node-counters.js';
import { describeMachine, type Machine } from './lib/machine.js';
import { cpuTimes, ctxSwitches, etcdTxnMs, machineCpu, median, schedTimes, writeSyncMs } from './lib/probes.js';
import { newTorusdSpec, RssSumPeak, setPeerRpc, startEtcdAt, startNbdkit, startNbdserve, startTorusd, type Proc, type RssSum, type TorusdSpec } from './lib/procs.js';
import { rawTcp } from './lib/tcp.js';

const HERE = dirname(fileURLToPath(import.meta.url));
// dist/bench/perf.js -> the repository root
const REPO = resolve(HERE, '../..');

// A bad argument or a missing tool: one line and exit status 2, never a stack trace.
const { usage, orUsage } = usageExits('perf');

const { values: argv } = orUsage(() => parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    'block-sizes': { type: 'string' },
    reps: { type: 'string' },
    runtime: { type: 'string' },
    ramp: { type: 'string' },
    'volume-size': { type: 'string' },
    'read-cache-size': { type: 'string', default: '64MiB' },
    'write-cache-size': { type: 'string' },
    'node-size': { type: 'string', default: '12GiB' },
    'peer-rpc': { type: 'string', default: 'tls' },
    'nbd-on': { type: 'string', default: 'client' },
    jobs: { type: 'string' },
    profile: { type: 'string' },
    'profile-only': { type: 'boolean', default: false },
    'data-dir': { type: 'string' },
    out: { type: 'string' },
    keep: { type: 'boolean', default: false },
    help: { type: 'boolean', default: false },
  },
}));

if (argv.help) {
  process.stdout.write(`usage: node dist/bench/perf.js [options]
  --quick                 one block size (128KiB, the default), 512MiB volume, 3 x 2 s per job: under 2 minutes
  --block-sizes LIST      cluster block sizes, comma separated (default 64KiB,128KiB,512KiB)
  --reps N                repetitions per job (default 3; the median is reported)
  --runtime S             seconds per job, time based (default 10; quick 2)
  --ramp S                fio ramp time before measuring (default 2; quick 0)
  --volume-size SIZE      volume and nbdkit file size (default 2GiB; quick 512MiB)
  --read-cache-size SIZE  torusblk's block cache; P3's working set is 4x this (default 64MiB)
  --write-cache-size SIZE nbdserve --write-cache-size (default: nbdserve's own)
  --node-size SIZE        each torusd's --size (sparse files; default 12GiB)
  --peer-rpc tls|plain    peer RPC over TLS with a CA made for the run (default, as deployed), or
                          plaintext (--insecure-peer-network) to measure what TLS costs
  --nbd-on client|storage where the NBD server runs: torusblk nbdserve in a process of its own, as
                          on a client host (default), or torusd --nbd-listen on storage node 1,
                          which reads its own replicas without a network hop (issue 15's target
                          topology; the write-amplification pass needs client)
  --jobs LIST             a subset of P1,P2,P3,P4,P5 (default all)
  --profile DIR           afterwards, run each job once more under node --cpu-prof (nbdserve and
                          every torusd) and write summaries, collapsed stacks and SVG flame graphs
  --profile-only          skip the measured repetitions (with --profile)
  --data-dir DIR          where to make the run's directory (clusters, files, fio outputs; default $TMPDIR)
  --out FILE              results JSON (default bench/results/perf-<time>.json)
  --keep                  keep the data dir
`);
  process.exit(0);
}

const quick = argv.quick;
const blockSizes = (argv['block-sizes'] ?? (quick ? '128KiB' : '64KiB,128KiB,512KiB')).split(',').map((s) => s.trim()).filter(Boolean);
const reps = Number(argv.reps ?? 3);
const runtimeSec = Number(argv.runtime ?? (quick ? 2 : 10));
const rampSec = Number(argv.ramp ?? (quick ? 0 : 2));
const volumeSize = argv['volume-size'] ?? (quick ? '512MiB' : '2GiB');
const readCacheSize = argv['read-cache-size'];
const jobs = (argv.jobs ?? JOB_IDS.join(',')).split(',').map((s) => s.trim().toUpperCase()) as JobId[];
for (const j of jobs) if (!JOB_IDS.includes(j)) usage(`unknown job ${j}: expected some of ${JOB_IDS.join(',')}`);
for (const b of blockSizes) orUsage(() => parseSize(b));
if (!Number.isInteger(reps) || reps < 1) usage('--reps must be a positive integer');
if (!(runtimeSec > 0) || !(rampSec >= 0)) usage('--runtime must be a positive number of seconds, --ramp zero or more');
if (reps < 3) process.stderr.write(`note: --reps ${reps} is below the 3 repetitions issue 8 asks for\n`);
if (argv['peer-rpc'] !== 'tls' && argv['peer-rpc'] !== 'plain') usage(`--peer-rpc ${argv['peer-rpc']}: expected tls or plain`);
setPeerRpc(argv['peer-rpc'] as 'tls' | 'plain');
if (argv['nbd-on'] !== 'client' && argv['nbd-on'] !== 'storage') usage(`--nbd-on ${argv['nbd-on']}: expected client or storage`);
const onStorage = argv['nbd-on'] === 'storage';
for (const t of ['fio', 'nbdkit']) if (!have(t)) usage(`${t} is not installed (Debian: apt-get install -y ${t})`);
// fio's engine for the disk's own write bandwidth, checked before anything starts.
const diskEngine = orUsage(() => directEngine());

const region: Region = orUsage(() => ({ whole: parseSize(volumeSize), randReadSet: 4 * parseSize(readCacheSize) }));
if (region.randReadSet > region.whole) usage(`P3's working set (4 x --read-cache-size = ${region.randReadSet} bytes) exceeds the volume`);

const MiB = 2 ** 20;
const REPLICATION = 2;
// The disk probe writes at most this much (and for at most --runtime): the volume, up to 1 GiB.
const diskProbeBytes = Math.min(region.whole, 2 ** 30);
// Issue 15's targets for what the bench measures beside the jobs.
const P1_DISK_TARGET = 0.8;
const P8_TARGET_BYTES = 2 ** 30;

interface Stat {
  median: number;
  min: number;
  max: number;
  values: number[];
}

function stat(values: number[]): Stat {
  return { median: median(values), min: Math.min(...values), max: Math.max(...values), values };
}

interface Run {
  rep: number;
  side: 'torus' | 'nbdkit';
  figure: number;
  fio: FioOutcome;
  /** CPU cores used by each server process over the fio run (Δ user+system / Δ wall). */
  cores: Record<string, number>;
  /** The kernel's part of `cores` (system time: syscalls, page faults, loopback TCP). */
  sysCores: Record<string, number>;
  /** The whole machine's busy cores meanwhile, and what neither fio nor our servers used. */
  machineCores: number;
  otherCores: number;
  /** Context switches of the server processes (all of them summed) per I/O fio completed. */
  switchesPerIo: { voluntary: number; involuntary: number };
  /** Minor page faults of the server processes (summed) per MiB fio moved. */
  faultsPerMiB: number;
  /** Each server's main thread: share of the wall time it ran, and waited in a run queue. (For
   * nbdkit this says nothing: its main thread only accepts; the per-connection worker threads
   * that do the I/O exit with the connection, before they can be read.) */
  mainThread: Record<string, { run: number; wait: number }>;
  /** 1-minute load average when the run ended: other tenants of a shared machine show here. */
  load1: number;
  /** Torus runs: what the three storage nodes wrote and synced over the run (summed). */
  storage?: NodeCounters;
  /** CPU (user + system) of each server process and of fio over the run, in ms per MiB fio moved
   * and in µs per I/O it completed: unlike a throughput, these hardly move when the machine is busy. */
  cpuMsPerMiB: Record<string, number>;
  cpuUsPerIo: Record<string, number>;
}

/** Each process's CPU per unit (medians of one side's runs), by process name. */
interface CpuPerUnit {
  msPerMiB: Record<string, number>;
  usPerIo: Record<string, number>;
}

/** This machine's own limits, measured in the same run, once at the start of each repetition. */
interface LimitRun {
  rep: number;
  /** The disk's sequential write bandwidth (fio, O_DIRECT, 1 MiB, qd 8) on the data dirs' file system. */
  diskWriteMiBps: number;
  /** Raw Node TCP throughput on loopback between two Node processes, one connection. */
  tcpMiBps: number;
  disk: FioOutcome;
  tcp: { bytes: number; seconds: number };
}

interface Limits {
  diskEngine: string;
  diskArgs: string[];
  diskWriteMiBps: Stat;
  /** Disk write bandwidth / R: what a replicated write can reach when every replica shares the disk. */
  replicatedDiskMiBps: Stat;
  tcpMiBps: Stat;
  runs: LimitRun[];
}

interface Row {
  job: JobId;
  title: string;
  unit: string;
  kind: 'throughput' | 'latency';
  target: number;
  ceph: number;
  torus: Stat;
  nbdkit: Stat;
  /** Torus/nbdkit of the medians: for P5 the latency multiple. */
  ratio: number;
  met: boolean;
  /** Median CPU cores used during the runs: nbdserve, the three torusd summed, etcd, fio and
   * everything else on the machine (other tenants) during Torus runs; nbdkit and fio during its. */
  cores: { nbdserve: number; torusd: number; etcd: number; fio: number; others: number; nbdkit: number; fioKit: number; othersKit: number };
  /** CPU per MiB and per I/O of every process, Torus runs and nbdkit runs. */
  cpu: { torus: CpuPerUnit; nbdkit: CpuPerUnit };
  /** P1 only: against the replicated disk limit (disk write bandwidth / R, medians), issue 15. */
  disk?: { limit: Stat; ratio: number; target: number; met: boolean };
  /** Share of the Torus processes' CPU spent in the kernel; nbdkit's. */
  sysShare: { torus: number; nbdkit: number };
  /** Context switches of the server processes per I/O (voluntary + involuntary), Torus and nbdkit. */
  switchesPerIo: { torus: number; nbdkit: number };
  /** Minor page faults of the server processes per MiB moved, Torus and nbdkit. */
  faultsPerMiB: { torus: number; nbdkit: number };
  /** Share of the run the main threads waited for a CPU: nbdserve, the torusd average. */
  runQueueWait: { nbdserve: number; torusd: number };
  /** Latency jobs (P5): fio's write and flush latencies (medians over the Torus runs) and the
   * replicas' mean fsync round, absolute and as a share of the write+flush cycle. */
  latency?: { writeP50Us: number; writeP99Us: number; flushP50Us: number; flushP99Us: number; replicaSyncUs: number; syncShare: number; kitFlushP50Us: number; kitFlushP99Us: number };
  runs: Run[];
}

/** Bytes stored per byte written by a sustained 4 KiB random write load (P4's pattern), at R=2. */
interface WriteAmp {
  name: string;
  /** The region written: the whole volume, or a hot region small enough for folds to happen. */
  regionBytes: number;
  writtenBytes: number;
  /** (journal + whole-block bytes on all nodes) / written: what Torus itself stored. */
  logical: number;
  /**
   * As logical, with the zeros written to prepare never-written slots for journal appends: once
   * per slot in the life of a store, so what a young store (as every bench cluster is) pays on
   * top of the steady state's figure.
   */
  withPrep: number;
  /** The kernel's count of bytes the torusd processes sent to storage / written: charged per
   * page-cache folio dirtied, so above what reached the disk when folios are large. */
  physical: number;
  /** Bytes the disk under the data dirs took (/proc/diskstats, whole machine: etcd, the file
   * system's journal and anything else running included) / written. */
  disk: number;
  storage: NodeCounters;
  iops: number;
}

interface TableResult {
  blockSize: string;
  rows: Row[];
  /** Peak RSS in bytes: etcd, torusd-1..3, nbdserve (largest of its instances), nbdkit. */
  peakRss: Record<string, number>;
  /** P8: the largest sum of the Torus processes' (storage nodes' and NBD server's) resident
   * memory sampled at one instant, over the whole table (the profile pass excepted). */
  peakRssSum: RssSum & { target: number; met: boolean };
  limits?: Limits;
  fill: { torusMiBps: number; nbdkitMiBps: number };
  probes: { etcdTxnMs: number; writeSync4kMs: number; writeSyncBlockMs: number; anatomy: Anatomy };
  writeAmp: WriteAmp[];
  profiles?: ProfileResult[];
}

interface ProfileResult {
  job: JobId;
  figure: number;
  /** Main threads during the profiled run: the profile's "busy" is wall time, this says how much
   * of it the thread really ran and how much it waited for a CPU. */
  mainThread: Record<string, { run: number; wait: number }>;
  /** The fio run's window on the monotonic clock; samples outside it are left out. */
  window: { fromUs: number; toUs: number };
  /** Absent with --nbd-on storage: torusd-1 is the NBD server. */
  nbdserve?: ProfileSummary;
  torusd: ProfileSummary[];
  files: string[];
}

function fmtFigure(unit: string, v: number): string {
  if (!Number.isFinite(v)) return String(v);
  if (unit === 'IOPS') return v >= 10000 ? `${(v / 1000).toFixed(1)}k` : `${Math.round(v)}`;
  if (unit === 'MiB/s') return v >= 100 ? `${Math.round(v)}` : v.toFixed(1);
  return v >= 1000 ? `${Math.round(v)}` : v.toFixed(0);
}

function fmtStat(unit: string, s: Stat): string {
  return `${fmtFigure(unit, s.median)} ${unit} [${fmtFigure(unit, s.min)}–${fmtFigure(unit, s.max)}]`;
}

function fmtAnatomy(a: Anatomy): string {
  return (
    `in-process 4 KiB write ${a.writeMs} ms + flush ${a.flushMs} ms = ${a.cycleMs} ms (medians of ${a.samples}); ` +
    `the replicas made ${a.syncsPerFlush} fsync rounds per flush, ${a.replicaSyncMs} ms each on average`
  );
}

function pct(x: number): string {
  return `${Math.round(x * 100)}%`;
}

function fmtMiB(bytes: number): string {
  return `${Math.round(bytes / MiB)} MiB`;
}

function log(msg: string): void {
  process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
}

class Cluster {
  etcd!: Proc & { endpoint: string };
  specs: TorusdSpec[] = [];
  nodes: Proc[] = [];
  nbd: Proc | undefined;
  nbdPort = 0;
  kit: Proc | undefined;
  kitPort = 0;
  /** Peak RSS of nbdserve instances (with --nbd-on storage: torusd-1's) already stopped. */
  nbdPeak = 0;
  /** P8: the Torus processes' memory together, sampled from start to stop. */
  readonly rssSum = new RssSumPeak(() => this.torusProcs());

  constructor(
    readonly dir: string,
    readonly blockSize: string,
  ) {}

  get C(): string[] {
    return ['-C', this.etcd.endpoint];
  }

  async start(): Promise<void> {
    this.etcd = await startEtcdAt(join(this.dir, 'etcd'));
    await ok('torusctl', [...this.C, 'init', '--block-size', this.blockSize, '--replication', String(REPLICATION)]);
    for (let i = 0; i < 3; i++) this.specs.push(await newTorusdSpec(this.etcd.endpoint, join(this.dir, `node${i + 1}`), argv['node-size']));
    this.nbdPort = await freePort();
    for (const [i, s] of this.specs.entries()) this.nodes.push(await startTorusd(`torusd-${i + 1}`, s, [], this.nbdArgs(i)));
    await ok('torusctl', [...this.C, 'peer', 'add', '--all-peers']);
    await ok('torusctl', [...this.C, 'volume', 'create-block', 'v', volumeSize]);
    // For the in-process P5 anatomy probe, which must not contend for v's lock with nbdserve.
    await ok('torusctl', [...this.C, 'volume', 'create-block', 'anatomy', '256MiB']);
    if (!onStorage) await this.startNbd();
    const file = join(this.dir, 'nbdkit.img');
    const fd = openSync(file, 'w');
    ftruncateSync(fd, region.whole);
    closeSync(fd);
    this.kitPort = await freePort();
    this.kit = await startNbdkit(file, this.kitPort);
  }

  // Where the NBD server runs (the topology) is decided here, in nbdArgs, startNbd, stopNbd and
  // torusUri, and nowhere else: `torusblk nbdserve` in a process of its own, as on a client host,
  // or (--nbd-on storage) storage node 1 itself, whose restart is then the NBD server's.
  nbdArgs(i: number): string[] {
    if (!onStorage || i !== 0) return [];
    const wc = argv['write-cache-size'];
    return ['--nbd-listen', `127.0.0.1:${this.nbdPort}`, '--read-cache-size', readCacheSize, ...(wc ? ['--nbd-write-cache-size', wc] : [])];
  }

  async startNbd(nodeArgs: string[] = []): Promise<void> {
    if (onStorage) {
      this.nodes[0] = await startTorusd('torusd-1', this.specs[0]!, nodeArgs, this.nbdArgs(0));
      return;
    }
    const wc = argv['write-cache-size'];
    this.nbd = await startNbdserve({ etcd: this.etcd.endpoint, port: this.nbdPort, readCacheSize: readCacheSize, ...(wc ? { writeCacheSize: wc } : {}) }, nodeArgs);
  }

  async stopNbd(): Promise<void> {
    // The peak is read once the process is gone: the P8 samples taken while it stopped count too
    // (each process's peak is at least every sample of it).
    if (onStorage) {
      // SIGTERM closes the exports first (their volumes sync), then the node.
      this.rssSum.sample();
      await this.nodes[0]!.stop('SIGTERM', 120_000);
      this.nbdPeak = Math.max(this.nbdPeak, this.nodes[0]!.peakRss());
      return;
    }
    if (!this.nbd) return;
    this.rssSum.sample();
    // SIGTERM syncs the volume and releases its lock; a SIGKILL would leave the lock to expire.
    await this.nbd.stop('SIGTERM', 120_000);
    this.nbdPeak = Math.max(this.nbdPeak, this.nbd.peakRss());
    this.nbd = undefined;
  }

  async restartNodes(nodeArgs: (i: number) => string[]): Promise<void> {
    for (const n of this.nodes) await n.stop('SIGTERM', 60_000);
    this.nodes = [];
    for (const [i, s] of this.specs.entries()) this.nodes.push(await startTorusd(`torusd-${i + 1}`, s, nodeArgs(i), this.nbdArgs(i)));
  }

  /** Every storage node's counters, in node order. */
  counters(): Promise<NodeCounters[]> {
    return nodeCounters(this.nodes.map((p, i) => ({ pid: p.pid, httpPort: this.specs[i]!.httpPort })));
  }

  /** Waits (at most 60 s) until the NBD server opens the volume for a client. */
  async exportReady(): Promise<void> {
    const until = Date.now() + 60_000;
    for (;;) {
      const r = spawnSync('nbdinfo', ['--size', this.torusUri()], { encoding: 'utf8', timeout: 30_000 });
      if (r.status === 0) return;
      if (Date.now() > until) throw new Error(`the NBD server does not open the volume: ${r.stderr.trim()}`);
      await new Promise((res) => setTimeout(res, 500));
    }
  }

  torusUri(): string {
    return `nbd://127.0.0.1:${this.nbdPort}/v`;
  }

  kitUri(): string {
    return `nbd://127.0.0.1:${this.kitPort}/`;
  }

  /** The processes whose memory P8 adds up: every storage node and the NBD server. */
  torusProcs(): Proc[] {
    return [...this.nodes, ...(this.nbd ? [this.nbd] : [])];
  }

  serverProcs(): Proc[] {
    return [this.etcd, ...this.nodes, ...(this.nbd ? [this.nbd] : []), ...(this.kit ? [this.kit] : [])];
  }

  peakRss(): Record<string, number> {
    const out: Record<string, number> = { etcd: this.etcd.peakRss() };
    for (const n of this.nodes) out[n.name] = n.peakRss();
    // On a storage node the NBD server is torusd-1, restarted with it: its peak is over all its runs.
    if (onStorage) out['torusd-1'] = Math.max(this.nbdPeak, out['torusd-1'] ?? 0);
    out['nbdserve'] = onStorage ? 0 : Math.max(this.nbdPeak, this.nbd?.peakRss() ?? 0);
    out['nbdkit'] = this.kit?.peakRss() ?? 0;
    return out;
  }

  async stop(): Promise<void> {
    this.rssSum.stop();
    await this.stopNbd().catch(() => undefined);
    await this.kit?.stop('SIGTERM', 10_000).catch(() => undefined);
    for (const n of this.nodes) await n.stop('SIGTERM', 30_000).catch(() => undefined);
    await this.etcd?.stop('SIGKILL').catch(() => undefined);
  }
}

type Measured = Pick<Run, 'fio' | 'cores' | 'sysCores' | 'machineCores' | 'otherCores' | 'switchesPerIo' | 'faultsPerMiB' | 'mainThread' | 'storage' | 'cpuMsPerMiB' | 'cpuUsPerIo'>;

/** Runs fio, and reads from /proc what every server process (and the machine) did meanwhile. */
async function measured(c: Cluster, uri: string, name: string, args: string[], outDir: string): Promise<Measured> {
  const procs = c.serverProcs();
  const before = procs.map((p) => cpuTimes(p.pid));
  const sw0 = procs.map((p) => ctxSwitches(p.pid));
  const st0 = procs.map((p) => schedTimes(p.pid));
  const torus = uri === c.torusUri();
  const n0 = torus ? await c.counters() : undefined;
  const m0 = machineCpu();
  const t0 = process.hrtime.bigint();
  const fio = await runFio(uri, name, args, join(outDir, `${name}.json`), runtimeSec + rampSec + 300);
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  const m1 = machineCpu();
  const storage = n0 ? counterDelta(n0, await c.counters()) : undefined;
  const cores: Record<string, number> = {};
  const sysCores: Record<string, number> = {};
  const cpuSeconds: Record<string, number> = {};
  let ours = 0;
  let faults = 0;
  procs.forEach((p, i) => {
    const now = cpuTimes(p.pid);
    const f = now.minorFaults - before[i]!.minorFaults;
    if (Number.isFinite(f)) faults += f;
    const user = now.user - before[i]!.user;
    const sys = now.sys - before[i]!.sys;
    if (!Number.isFinite(user + sys)) return;
    cpuSeconds[p.name] = user + sys;
    cores[p.name] = Number(((user + sys) / wall).toFixed(2));
    sysCores[p.name] = Number((sys / wall).toFixed(2));
    ours += (user + sys) / wall;
  });
  let vol = 0;
  let invol = 0;
  procs.forEach((p, i) => {
    const now = ctxSwitches(p.pid);
    const v = now.voluntary - sw0[i]!.voluntary;
    const n = now.involuntary - sw0[i]!.involuntary;
    if (Number.isFinite(v + n)) {
      vol += v;
      invol += n;
    }
  });
  // I/Os over the whole fio run (ramp included), as the switches are counted over it too.
  const ios = ((fio.readIops + fio.writeIops) * fio.wallMs) / 1000;
  const switchesPerIo = { voluntary: Number((vol / Math.max(1, ios)).toFixed(2)), involuntary: Number((invol / Math.max(1, ios)).toFixed(2)) };
  const mib = (((fio.readBytesPerSec + fio.writeBytesPerSec) / MiB) * fio.wallMs) / 1000;
  const faultsPerMiB = Number((faults / Math.max(1 / 1024, mib)).toFixed(1));
  const mainThread: Record<string, { run: number; wait: number }> = {};
  procs.forEach((p, i) => {
    const now = schedTimes(p.pid);
    const run = (now.run - st0[i]!.run) / wall;
    const wait = (now.wait - st0[i]!.wait) / wall;
    if (Number.isFinite(run + wait)) mainThread[p.name] = { run: Number(run.toFixed(3)), wait: Number(wait.toFixed(3)) };
  });
  const machineCores = (m1.busy - m0.busy) / wall;
  // fio's CPU share is over its job runtime, which is most of the wall time.
  const fioCores = (fio.fioCores * fio.runtimeMs) / 1000 / wall;
  cpuSeconds['fio'] = fioCores * wall;
  const per = (unit: number, scale: number, digits: number): Record<string, number> =>
    Object.fromEntries(Object.entries(cpuSeconds).map(([k, v]) => [k, Number(((v * scale) / Math.max(1e-9, unit)).toFixed(digits))]));
  return {
    fio,
    cores,
    sysCores,
    machineCores: Number(machineCores.toFixed(2)),
    otherCores: Number(Math.max(0, machineCores - ours - fioCores).toFixed(2)),
    switchesPerIo,
    faultsPerMiB,
    mainThread,
    ...(storage ? { storage } : {}),
    cpuMsPerMiB: per(mib, 1e3, 3),
    cpuUsPerIo: per(ios, 1e6, 1),
  };
}

/** The disk's sequential write bandwidth and raw Node TCP, each bounded in bytes and in time. */
async function measureLimits(dir: string, outDir: string, rep: number): Promise<LimitRun> {
  const disk = await diskWrite(join(dir, 'disk-write-probe'), diskProbeBytes, runtimeSec, diskEngine, join(outDir, `disk-write-${rep}.json`));
  const tcp = await rawTcp({ seconds: Math.min(runtimeSec, 3) });
  const r: LimitRun = { rep, diskWriteMiBps: disk.writeBytesPerSec / MiB, tcpMiBps: tcp.bytesPerSec / MiB, disk, tcp: { bytes: tcp.bytes, seconds: tcp.seconds } };
  log(`machine limits, rep ${rep + 1}: disk write ${r.diskWriteMiBps.toFixed(0)} MiB/s (fio ${diskEngine}, O_DIRECT, 1 MiB, qd 8), raw Node TCP ${r.tcpMiBps.toFixed(0)} MiB/s`);
  return r;
}

function limitsOf(runs: LimitRun[]): Limits {
  return {
    diskEngine,
    diskArgs: diskWriteArgs('FILE', diskProbeBytes, runtimeSec, diskEngine),
    diskWriteMiBps: stat(runs.map((r) => r.diskWriteMiBps)),
    replicatedDiskMiBps: stat(runs.map((r) => r.diskWriteMiBps / REPLICATION)),
    tcpMiBps: stat(runs.map((r) => r.tcpMiBps)),
    runs,
  };
}

async function fill(c: Cluster, side: 'torus' | 'nbdkit', outDir: string): Promise<number> {
  const t0 = process.hrtime.bigint();
  await runFio(side === 'torus' ? c.torusUri() : c.kitUri(), `fill-${side}`, fillArgs(region), join(outDir, `fill-${side}.json`), 1800);
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  return region.whole / MiB / s;
}

async function runTable(root: string, blockSize: string): Promise<TableResult> {
  const dir = join(root, `bs-${blockSize}`);
  const outDir = join(dir, 'fio');
  mkdirSync(outDir, { recursive: true });
  const c = new Cluster(dir, blockSize);
  try {
    log(`block size ${blockSize}: starting etcd, 3 torusd (R=2), nbdserve, nbdkit`);
    await c.start();
    const probes = {
      etcdTxnMs: await etcdTxnMs(c.etcd.endpoint),
      writeSync4kMs: await writeSyncMs(dir, 4096),
      writeSyncBlockMs: await writeSyncMs(dir, parseSize(blockSize)),
      anatomy: await anatomy(c.etcd.endpoint, 'anatomy', () => c.counters()),
    };
    log(`probes: etcd txn ${probes.etcdTxnMs.toFixed(2)} ms, 4 KiB write+fdatasync ${probes.writeSync4kMs.toFixed(2)} ms, ${blockSize} write+fdatasync ${probes.writeSyncBlockMs.toFixed(2)} ms`);
    log(`P5 anatomy: ${fmtAnatomy(probes.anatomy)}`);
    log(`filling ${volumeSize} on both`);
    const fillResult = { torusMiBps: await fill(c, 'torus', outDir), nbdkitMiBps: await fill(c, 'nbdkit', outDir) };
    log(`fill: torus ${fillResult.torusMiBps.toFixed(0)} MiB/s, nbdkit ${fillResult.nbdkitMiBps.toFixed(0)} MiB/s (wall, including connect and final flush)`);
    const runs = new Map<JobId, Run[]>(jobs.map((j) => [j, []]));
    const limitRuns: LimitRun[] = [];
    if (!argv['profile-only']) {
      for (let rep = 0; rep < reps; rep++) {
        // In every repetition, so that the limits and the jobs see the same moments of a shared machine.
        limitRuns.push(await measureLimits(dir, outDir, rep));
        for (const job of jobs) {
          // Alternate who goes first, so neither side always gets the quieter or warmer moment.
          const order: ('torus' | 'nbdkit')[] = rep % 2 === 0 ? ['torus', 'nbdkit'] : ['nbdkit', 'torus'];
          for (const side of order) {
            if (side === 'torus' && job === 'P2') {
              // Client cache cold: a fresh nbdserve has an empty block cache.
              await c.stopNbd();
              await c.startNbd();
            }
            const m = await measured(c, side === 'torus' ? c.torusUri() : c.kitUri(), `${job}-${side}-${rep}`, jobArgs(job, region, runtimeSec, rampSec), outDir);
            const f = figure(job, m.fio);
            runs.get(job)!.push({ rep, side, figure: f, ...m, load1: Number(loadavg()[0]!.toFixed(2)) });
            const busy = Object.entries(m.cores).filter(([, v]) => v >= 0.05);
            log(
              `${blockSize} rep ${rep + 1}/${reps} ${job} ${side}: ${fmtFigure(JOBS[job].unit, f)} ${JOBS[job].unit}  cores: ${busy.map(([k, v]) => `${k} ${v}`).join(', ')}, fio ${m.fio.fioCores.toFixed(2)}, others ${m.otherCores}`,
            );
          }
        }
      }
    }
    const limits = limitRuns.length > 0 ? limitsOf(limitRuns) : undefined;
    const rows: Row[] = [];
    for (const job of jobs) {
      const rs = runs.get(job)!;
      if (rs.length === 0) continue;
      const spec = JOBS[job];
      const torus = stat(rs.filter((r) => r.side === 'torus').map((r) => r.figure));
      const kit = stat(rs.filter((r) => r.side === 'nbdkit').map((r) => r.figure));
      const ratio = torus.median / kit.median;
      const tr = rs.filter((r) => r.side === 'torus');
      const kr = rs.filter((r) => r.side === 'nbdkit');
      const med = (xs: Run[], f: (r: Run) => number): number => Number(median(xs.map(f)).toFixed(2));
      const cores = {
        nbdserve: med(tr, (r) => r.cores['nbdserve'] ?? NaN),
        torusd: med(tr, (r) => Object.entries(r.cores).reduce((a, [k, v]) => (k.startsWith('torusd') ? a + v : a), 0)),
        etcd: med(tr, (r) => r.cores['etcd'] ?? NaN),
        fio: med(tr, (r) => r.fio.fioCores),
        others: med(tr, (r) => r.otherCores),
        nbdkit: med(kr, (r) => r.cores['nbdkit'] ?? NaN),
        fioKit: med(kr, (r) => r.fio.fioCores),
        othersKit: med(kr, (r) => r.otherCores),
      };
      const sum = (o: Record<string, number>, keep: (k: string) => boolean): number => Object.entries(o).reduce((a, [k, v]) => (keep(k) ? a + v : a), 0);
      const torusProc = (k: string): boolean => k !== 'nbdkit';
      const sysShare = {
        torus: med(tr, (r) => sum(r.sysCores, torusProc) / Math.max(0.01, sum(r.cores, torusProc))),
        nbdkit: med(kr, (r) => (r.sysCores['nbdkit'] ?? NaN) / Math.max(0.01, r.cores['nbdkit'] ?? NaN)),
      };
      const switchesPerIo = {
        torus: med(tr, (r) => r.switchesPerIo.voluntary + r.switchesPerIo.involuntary),
        nbdkit: med(kr, (r) => r.switchesPerIo.voluntary + r.switchesPerIo.involuntary),
      };
      const faultsPerMiB = { torus: med(tr, (r) => r.faultsPerMiB), nbdkit: med(kr, (r) => r.faultsPerMiB) };
      const runQueueWait = {
        nbdserve: med(tr, (r) => r.mainThread['nbdserve']?.wait ?? NaN),
        torusd: med(tr, (r) => {
          const ws = Object.entries(r.mainThread).filter(([k]) => k.startsWith('torusd')).map(([, v]) => v.wait);
          return ws.reduce((a, b) => a + b, 0) / Math.max(1, ws.length);
        }),
      };
      const met = spec.kind === 'throughput' ? ratio >= spec.target : ratio <= spec.target;
      const cpuOf = (xs: Run[], keep: (k: string) => boolean): CpuPerUnit => {
        const names = Object.keys(xs[0]?.cpuMsPerMiB ?? {}).filter(keep);
        const each = (f: (r: Run) => Record<string, number>): Record<string, number> => Object.fromEntries(names.map((k) => [k, median(xs.map((r) => f(r)[k] ?? NaN))]));
        return { msPerMiB: each((r) => r.cpuMsPerMiB), usPerIo: each((r) => r.cpuUsPerIo) };
      };
      const cpu = { torus: cpuOf(tr, (k) => k !== 'nbdkit'), nbdkit: cpuOf(kr, (k) => k === 'nbdkit' || k === 'fio') };
      let disk: Row['disk'];
      if (job === 'P1' && limits) {
        const limit = limits.replicatedDiskMiBps;
        const dr = torus.median / limit.median;
        disk = { limit, ratio: dr, target: P1_DISK_TARGET, met: dr >= P1_DISK_TARGET };
      }
      let latency: Row['latency'];
      if (spec.kind === 'latency') {
        const replicaSyncUs = med(tr, (r) => ((r.storage?.syncSeconds ?? NaN) * 1e6) / Math.max(1, r.storage?.flushes ?? 0));
        latency = {
          writeP50Us: med(tr, (r) => r.fio.writeClatP50Us),
          writeP99Us: med(tr, (r) => r.fio.writeClatP99Us),
          flushP50Us: med(tr, (r) => r.fio.syncLatP50Us),
          flushP99Us: med(tr, (r) => r.fio.syncLatP99Us),
          replicaSyncUs,
          syncShare: Number((replicaSyncUs / torus.median).toFixed(2)),
          kitFlushP50Us: med(kr, (r) => r.fio.syncLatP50Us),
          kitFlushP99Us: med(kr, (r) => r.fio.syncLatP99Us),
        };
      }
      rows.push({ job, title: spec.title, unit: spec.unit, kind: spec.kind, target: spec.target, ceph: spec.ceph, torus, nbdkit: kit, ratio, met, cpu, ...(disk ? { disk } : {}), cores, sysShare, switchesPerIo, faultsPerMiB, runQueueWait, ...(latency ? { latency } : {}), runs: rs });
    }
    // The pass reads every node's counters after stopping the NBD server: with the server on node
    // 1 its counters would go with it. What is stored per byte written does not depend on where
    // the server runs.
    const writeAmp = jobs.includes('P4') && !argv['profile-only'] && !onStorage ? await writeAmplification(c, outDir) : [];
    // P8 covers the measured part; processes under --cpu-prof use more memory than in service.
    // Its last sample comes before each process's own peak is read: a peak (VmHWM) read after
    // covers every RSS sampled before, where one read first could be below a later sample.
    c.rssSum.sample();
    c.rssSum.stop();
    const peakRss = c.peakRss();
    const sum = c.rssSum.peak();
    const peakRssSum = { ...sum, target: P8_TARGET_BYTES, met: sum.bytes <= P8_TARGET_BYTES };
    const result: TableResult = { blockSize, rows, peakRss, peakRssSum, ...(limits ? { limits } : {}), fill: fillResult, probes, writeAmp };
    if (argv.profile) result.profiles = await profilePass(c, resolve(argv.profile, `bs-${blockSize}`), outDir);
    return result;
  } catch (err) {
    for (const p of c.serverProcs()) process.stderr.write(`---- ${p.name} log tail ----\n${p.log().slice(-3000)}\n`);
    throw err;
  } finally {
    await c.stop();
  }
}

/**
 * P4's pattern (4 KiB random writes, qd 32, a flush every 32) for a fixed number of bytes, over
 * the whole volume and over a hot region a few times its size (where blocks are written often
 * enough to be folded), each followed by closing the volume (its last checkpoint) so that the
 * work the writes caused is counted too. Bytes the storage nodes wrote / bytes fio wrote.
 */
async function writeAmplification(c: Cluster, outDir: string): Promise<WriteAmp[]> {
  const hot = Math.min(region.whole, quick ? 32 * MiB : 64 * MiB);
  const cases = [
    { name: 'whole volume', regionBytes: region.whole, writtenBytes: Math.min(region.whole, quick ? 64 * MiB : 256 * MiB) },
    { name: 'hot region', regionBytes: hot, writtenBytes: (quick ? 4 : 8) * hot },
  ];
  const out: WriteAmp[] = [];
  for (const k of cases) {
    const before = await c.counters();
    const diskBefore = diskWrittenBytes(c.dir);
    const fio = await runFio(
      c.torusUri(),
      `wa-${k.name.replace(' ', '-')}`,
      ['--rw=randwrite', '--bs=4k', '--iodepth=32', `--size=${k.regionBytes}`, `--io_size=${k.writtenBytes}`, '--fsync=32'],
      join(outDir, `wa-${k.name.replace(' ', '-')}.json`),
      1800,
    );
    // SIGTERM: the last flush and checkpoint, and the folds already under way.
    await c.stopNbd();
    const d = counterDelta(before, await c.counters());
    const diskAfter = diskWrittenBytes(c.dir);
    await c.startNbd();
    const w: WriteAmp = {
      ...k,
      logical: Number(((d.blockBytes + d.journalBytes) / k.writtenBytes).toFixed(2)),
      withPrep: Number(((d.blockBytes + d.journalBytes + d.prepBytes) / k.writtenBytes).toFixed(2)),
      physical: Number((d.physicalBytes / k.writtenBytes).toFixed(2)),
      disk: Number(((diskAfter - diskBefore) / k.writtenBytes).toFixed(2)),
      storage: d,
      iops: Math.round(fio.writeIops),
    };
    log(`${c.blockSize} write amplification, ${k.name} (${fmtMiB(k.regionBytes)}, ${fmtMiB(k.writtenBytes)} written at ${w.iops} IOPS): ${w.logical.toFixed(2)} (journal ${fmtMiB(d.journalBytes)}, blocks ${fmtMiB(d.blockBytes)}); ${w.withPrep.toFixed(2)} with slot preparation (${fmtMiB(d.prepBytes)}); disk ${w.disk.toFixed(2)}, process count ${w.physical.toFixed(2)}`);
    out.push(w);
  }
  return out;
}

/** Each job once more with nbdserve and every torusd under --cpu-prof, each in fresh processes. */
async function profilePass(c: Cluster, dir: string, outDir: string): Promise<ProfileResult[]> {
  const results: ProfileResult[] = [];
  // On a storage node the NBD server is torusd-1: restarting the nodes restarts it, profiled.
  if (!onStorage) await c.stopNbd();
  for (const job of jobs) {
    const jd = join(dir, job);
    rmSync(jd, { recursive: true, force: true });
    const prof = (name: string): string[] => ['--cpu-prof', '--cpu-prof-dir', join(jd, name)];
    log(`profiling ${job} (${c.blockSize})`);
    await c.restartNodes((i) => prof(`torusd-${i + 1}`));
    if (!onStorage) await c.startNbd(prof('nbdserve'));
    // torusd-1 came up before its peers: its first opens of the volume may fail until it has
    // reached them again.
    else await c.exportReady();
    const nowUs = (): number => Number(process.hrtime.bigint() / 1000n);
    const fromUs = nowUs();
    const { fio, mainThread } = await measured(c, c.torusUri(), `${job}-torus-profile`, jobArgs(job, region, runtimeSec, rampSec), outDir);
    const span = { fromUs, toUs: nowUs() };
    if (!onStorage) await c.stopNbd();
    await c.restartNodes(() => []);
    const files: string[] = [];
    const one = (name: string): ProfileSummary => {
      const file = cpuprofileIn(join(jd, name));
      const stacks = collapse(file, span);
      writeFolded(stacks, join(jd, `${name}.folded`));
      writeFlameSvg(stacks, join(jd, `${name}.svg`), `${job} ${c.blockSize} ${name}`);
      files.push(file, join(jd, `${name}.folded`), join(jd, `${name}.svg`));
      return summarize(file, 25, span);
    };
    const r: ProfileResult = { job, figure: figure(job, fio), mainThread, window: span, ...(onStorage ? {} : { nbdserve: one('nbdserve') }), torusd: [1, 2, 3].map((i) => one(`torusd-${i}`)), files };
    results.push(r);
    printProfile(r, c.blockSize);
  }
  return results;
}

function cpuprofileIn(dir: string): string {
  const found = readdirSafe(dir).filter((f) => f.endsWith('.cpuprofile'));
  if (found.length === 0) throw new Error(`no .cpuprofile in ${dir}`);
  return join(dir, found.sort().at(-1)!);
}

function readdirSafe(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

function printProfile(r: ProfileResult, bs: string): void {
  const busy = (s: ProfileSummary): string => `${(((s.totalUs - s.idleUs) / Math.max(1, s.totalUs)) * 100).toFixed(0)}% busy, GC ${((s.gcUs / Math.max(1, s.totalUs - s.idleUs)) * 100).toFixed(0)}% of busy`;
  const lines = [`\n### profile ${r.job} at ${bs}: ${fmtFigure(JOBS[r.job].unit, r.figure)} ${JOBS[r.job].unit}`];
  const procs = [...(r.nbdserve ? [['nbdserve', r.nbdserve] as const] : []), ...r.torusd.map((t, i) => [`torusd-${i + 1}`, t] as const)];
  for (const [name, s] of procs) {
    const mt = r.mainThread[name];
    lines.push(`${name}: ${(s.totalUs / 1e6).toFixed(1)} s profiled, ${busy(s)}${mt ? `; main thread on a CPU ${pct(mt.run)}, waiting for one ${pct(mt.wait)}` : ''}`);
  }
  if (r.nbdserve) {
    lines.push('', `nbdserve, top self time (share of busy time):`);
    for (const f of r.nbdserve.top.slice(0, 12)) lines.push(`  ${(f.busyShare * 100).toFixed(1).padStart(5)}%  ${f.name}`);
  }
  const t = [...r.torusd].sort((a, b) => b.totalUs - b.idleUs - (a.totalUs - a.idleUs))[0]!;
  lines.push(`busiest torusd${onStorage ? ' (torusd-1 serves NBD)' : ''}, top self time:`);
  for (const f of t.top.slice(0, onStorage ? 25 : 12)) lines.push(`  ${(f.busyShare * 100).toFixed(1).padStart(5)}%  ${f.name}`);
  process.stdout.write(lines.join('\n') + '\n');
}

function printTable(t: TableResult): void {
  const head = `\n## Block size ${t.blockSize}: median of ${reps} [min–max], ${runtimeSec} s per run${rampSec > 0 ? ` after ${rampSec} s ramp` : ''}, volume ${volumeSize}\n`;
  const lines = [
    head,
    '| job | Torus (R=2) | reference | target | Torus/reference |',
    '| --- | --- | --- | --- | --- |',
    ...t.rows.flatMap((r) => [
      `| ${r.job} ${r.title} | ${fmtStat(r.unit, r.torus)} | nbdkit file ${fmtStat(r.unit, r.nbdkit)} | ${r.kind === 'throughput' ? '>=' : '<='} ${r.target}${r.kind === 'latency' ? 'x' : ''} | ${r.ratio.toFixed(r.kind === 'latency' ? 1 : 3)}${r.kind === 'latency' ? 'x' : ''} ${r.met ? '(met)' : '(missed)'} |`,
      ...(r.disk
        ? [`| ${r.job} against the replicated disk limit | ${fmtStat(r.unit, r.torus)} | disk write / ${REPLICATION} ${fmtStat(r.unit, r.disk.limit)} | >= ${r.disk.target} | ${r.disk.ratio.toFixed(3)} ${r.disk.met ? '(met)' : '(missed)'} |`]
        : []),
    ]),
    '',
    ...(t.limits
      ? [
          `machine limits (median [min–max] of ${t.limits.runs.length}, one at the start of each repetition): disk sequential write ${fmtStat('MiB/s', t.limits.diskWriteMiBps)} (fio ${t.limits.diskEngine}, O_DIRECT, 1 MiB, qd 8, on ${machine.dataFilesystem}), / R=${REPLICATION} ${fmtStat('MiB/s', t.limits.replicatedDiskMiBps)}; raw Node TCP on loopback ${fmtStat('MiB/s', t.limits.tcpMiBps)} (two processes, one connection)`,
          '',
        ]
      : []),
    ...cpuTable(t.rows),
    '',
    `CPU cores in use (medians; ${machine.cores} in all; "others" is the rest of the machine, other tenants included):`,
    ...t.rows.map(
      (r) =>
        // With --nbd-on storage there is no nbdserve: torusd-1 serves NBD, counted with the nodes.
        `  ${r.job} Torus runs: ${Number.isNaN(r.cores.nbdserve) ? '' : `nbdserve ${r.cores.nbdserve.toFixed(2)}, `}torusd x3 ${r.cores.torusd.toFixed(2)}, etcd ${r.cores.etcd.toFixed(2)}, fio ${r.cores.fio.toFixed(2)}, others ${r.cores.others.toFixed(2)}; kernel ${(r.sysShare.torus * 100).toFixed(0)}%, ${r.switchesPerIo.torus} switches/IO, ${r.faultsPerMiB.torus} faults/MiB, main threads waiting for a CPU ${Number.isNaN(r.runQueueWait.nbdserve) ? '' : `${pct(r.runQueueWait.nbdserve)} (nbdserve) `}${pct(r.runQueueWait.torusd)} (torusd)` +
          ` | nbdkit runs: nbdkit ${r.cores.nbdkit.toFixed(2)}, fio ${r.cores.fioKit.toFixed(2)}, others ${r.cores.othersKit.toFixed(2)}; kernel ${(r.sysShare.nbdkit * 100).toFixed(0)}%, ${r.switchesPerIo.nbdkit} switches/IO, ${r.faultsPerMiB.nbdkit} faults/MiB`,
    ),
    `peak RSS: ${Object.entries(t.peakRss).map(([k, v]) => `${k} ${fmtMiB(v)}`).join(', ')}`,
    fmtP8(t.peakRssSum),
    `fill ${volumeSize}: torus ${t.fill.torusMiBps.toFixed(0)} MiB/s, nbdkit ${t.fill.nbdkitMiBps.toFixed(0)} MiB/s; etcd txn ${t.probes.etcdTxnMs.toFixed(2)} ms, 4 KiB write+fdatasync ${t.probes.writeSync4kMs.toFixed(2)} ms, ${t.blockSize} write+fdatasync ${t.probes.writeSyncBlockMs.toFixed(2)} ms`,
    `P5 anatomy: ${fmtAnatomy(t.probes.anatomy)}`,
    ...t.rows
      .filter((r) => r.latency)
      .map((r) => {
        const l = r.latency!;
        return `${r.job} latency (Torus medians of runs): write p50 ${l.writeP50Us.toFixed(0)} µs p99 ${l.writeP99Us.toFixed(0)} µs, flush p50 ${l.flushP50Us.toFixed(0)} µs p99 ${l.flushP99Us.toFixed(0)} µs (nbdkit flush p50 ${l.kitFlushP50Us.toFixed(0)} p99 ${l.kitFlushP99Us.toFixed(0)}); a replica's fsync round ${l.replicaSyncUs.toFixed(0)} µs = ${pct(l.syncShare)} of the cycle`;
      }),
    ...t.writeAmp.map((w) => `write amplification (R=2, target <= 3), ${w.name} ${fmtMiB(w.regionBytes)}: ${w.logical.toFixed(2)} (${w.withPrep.toFixed(2)} with the zeros that prepare a young store's slots; disk ${w.disk.toFixed(2)}), ${fmtMiB(w.writtenBytes)} written at ${w.iops} IOPS`),
  ];
  process.stdout.write(lines.join('\n') + '\n');
}

function fmtP8(p: TableResult['peakRssSum']): string {
  const each = Object.entries(p.each).map(([k, v]) => `${k} ${fmtMiB(v)}`).join(', ');
  return `P8 peak RSS of the Torus processes together (sampled at one instant every 250 ms): ${fmtMiB(p.bytes)} (${each}) at ${p.at.slice(11, 19)}; target <= ${fmtMiB(p.target)} ${p.met ? '(met)' : '(missed)'}`;
}

/** Each process's CPU per MiB and per I/O, a column per process, a row per job. */
function cpuTable(rows: Row[]): string[] {
  if (rows.length === 0) return [];
  const cols = [...Object.keys(rows[0]!.cpu.torus.msPerMiB).map((k) => ({ side: 'torus' as const, k, head: k })), ...Object.keys(rows[0]!.cpu.nbdkit.msPerMiB).map((k) => ({ side: 'nbdkit' as const, k, head: k === 'fio' ? 'fio (nbdkit runs)' : k }))];
  const cell = (r: Row, side: 'torus' | 'nbdkit', k: string): string => {
    const c = r.cpu[side];
    const ms = c.msPerMiB[k] ?? NaN;
    const us = c.usPerIo[k] ?? NaN;
    return `${ms.toFixed(ms >= 10 ? 1 : 2)} / ${us.toFixed(us >= 100 ? 0 : 1)}`;
  };
  return [
    'CPU (user + system) per MiB moved, ms / per I/O, µs (medians of the runs; fio is the client):',
    `| job | ${cols.map((c) => c.head).join(' | ')} |`,
    `| --- | ${cols.map(() => '---').join(' | ')} |`,
    ...rows.map((r) => `| ${r.job} | ${cols.map((c) => cell(r, c.side, c.k)).join(' | ')} |`),
  ];
}

function printSummary(tables: TableResult[]): void {
  if (tables.length < 2) return;
  const lines = [
    '\n## Torus/nbdkit by block size\n',
    `| job | target | ${tables.map((t) => t.blockSize).join(' | ')} |`,
    `| --- | --- | ${tables.map(() => '---').join(' | ')} |`,
  ];
  for (const job of jobs) {
    const spec = JOBS[job];
    const cells = tables.map((t) => {
      const r = t.rows.find((x) => x.job === job);
      return r ? `${r.ratio.toFixed(spec.kind === 'latency' ? 1 : 3)}${spec.kind === 'latency' ? 'x' : ''}` : '-';
    });
    lines.push(`| ${job} | ${spec.kind === 'throughput' ? '>=' : '<='} ${spec.target}${spec.kind === 'latency' ? 'x' : ''} | ${cells.join(' | ')} |`);
    if (job === 'P1') {
      const d = tables.map((t) => t.rows.find((x) => x.job === job)?.disk?.ratio.toFixed(3) ?? '-');
      lines.push(`| P1 against disk write / ${REPLICATION} | >= ${P1_DISK_TARGET} | ${d.join(' | ')} |`);
    }
  }
  lines.push('', `| peak RSS | ${tables.map((t) => t.blockSize).join(' | ')} |`, `| --- | ${tables.map(() => '---').join(' | ')} |`);
  for (const name of Object.keys(tables[0]!.peakRss)) lines.push(`| ${name} | ${tables.map((t) => fmtMiB(t.peakRss[name] ?? 0)).join(' | ')} |`);
  lines.push(`| P8: Torus processes together (target <= ${fmtMiB(P8_TARGET_BYTES)}) | ${tables.map((t) => fmtMiB(t.peakRssSum.bytes)).join(' | ')} |`);
  process.stdout.write(lines.join('\n') + '\n');
}

// Always a directory of our own (removed at the end), also inside a --data-dir.
const parent = argv['data-dir'] ? resolve(argv['data-dir']) : tmpdir();
// A --data-dir that does not exist yet is made, as the help's "where to make" promises.
mkdirSync(parent, { recursive: true });
// Every torusd refuses a --size above the free space, and the jobs write the region on R replicas
// and on nbdkit's file besides: found short at the third block size, a full run lost 15 minutes.
const needBytes = orUsage(() => parseSize(argv['node-size']!)) + (REPLICATION + 1) * region.whole;
const fsStat = statfsSync(parent);
if (fsStat.bavail * fsStat.bsize < needBytes) {
  console.error(`bench: ${fmtMiB(fsStat.bavail * fsStat.bsize)} free on the file system of ${parent}; a run needs about ${fmtMiB(needBytes)} (--node-size and the jobs' data). Free some, or pass --data-dir elsewhere or a smaller --node-size.`);
  process.exit(2);
}
const root = mkdtempSync(join(parent, 'torus-perf-'));
const machine: Machine = describeMachine(root);
const startedAt = new Date();
const command = `node ${process.argv.slice(1).map((a) => a.replace(`${REPO}/`, '')).join(' ')}`;
log(`${command}\n  machine: ${machine.cpuModel}, ${machine.cores} cores, ${fmtMiB(machine.memoryBytes)}, ${machine.kernel}, node ${machine.node}, ${machine.fio}, ${machine.nbdkit}; data on ${machine.dataFilesystem}; load ${machine.loadAverage.join(' ')}`);
const onSignal = (sig: NodeJS.Signals): void => {
  log(`${sig}: killing every process started and ${argv.keep ? 'keeping' : 'removing'} ${root}`);
  // lib/procs.ts's 'exit' handler, registered first, SIGKILLs the children before this one runs.
  if (!argv.keep) process.once('exit', () => rmSync(root, { recursive: true, force: true }));
  process.exit(130);
};
process.on('SIGINT', onSignal);
process.on('SIGTERM', onSignal);
const tables: TableResult[] = [];
try {
  for (const bs of blockSizes) {
    const t = await runTable(root, bs);
    tables.push(t);
    if (t.rows.length > 0) printTable(t);
  }
  printSummary(tables);
  const out = argv.out ? resolve(argv.out) : join(REPO, 'bench', 'results', `perf-${startedAt.toISOString().replace(/[:.]/g, '-')}${quick ? '-quick' : ''}.json`);
  mkdirSync(dirname(out), { recursive: true });
  const finishedAt = new Date();
  writeFileSync(
    out,
    JSON.stringify(
      {
        version: 1,
        command,
        startedAt: startedAt.toISOString(),
        finishedAt: finishedAt.toISOString(),
        seconds: Math.round((finishedAt.getTime() - startedAt.getTime()) / 1000),
        machine: { ...machine, loadAverageAtEnd: describeMachine(root).loadAverage },
        options: { quick, blockSizes, reps, runtimeSec, rampSec, volumeSize, readCacheSize, writeCacheSize: argv['write-cache-size'] ?? 'nbdserve default', nodeSize: argv['node-size'], replication: REPLICATION, nodes: 3, jobs, nbdOn: argv['nbd-on'], peerRpc: argv['peer-rpc'] },
        fioJobs: Object.fromEntries(jobs.map((j) => [j, jobArgs(j, region, runtimeSec, rampSec)])),
        // P8 over the whole bench: the largest of the tables' (each table is a cluster of its own).
        peakRssSum: tables.reduce<TableResult['peakRssSum'] | undefined>((a, t) => (a && a.bytes >= t.peakRssSum.bytes ? a : t.peakRssSum), undefined),
        tables,
      },
      null,
      2,
    ) + '\n',
  );
  log(`results: ${out} (${Math.round((finishedAt.getTime() - startedAt.getTime()) / 1000)} s)`);
} finally {
  if (!argv.keep) rmSync(root, { recursive: true, force: true });
}
