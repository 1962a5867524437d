// Failures, measured: what a client and an administrator see, how much slower I/O gets during the
// event compared with normal in the same run, and how long until every block has R copies again.
//
//   node dist/bench/failure.js [--scenario a,b,c,d,e,h] [--reps 3] [--heartbeat 5s]
//                              [--rebalance-interval 10s] [--size 64MiB] [--block-size 512KiB]
//                              [--cut 20s]    (how long a node or etcd member stays down in a, c, h)
//
//   a  a single storage node down (kill -9), then started again on its disk
//   b  a node lost for good: kill -9, then `torusctl peer remove --force`
//   c  a partition between peers: one node cut off by nftables in its network namespace, healed
//   d  the client cut off from etcd (not from the storage nodes): a short cut, then one longer
//      than the volume lock's lease
//   e  etcd itself down (kill -9, restarted on its data dir): a short outage, then a long one
//   h  one member of a three-member etcd cluster lost: the one the client talks to, made leader
//      first, killed (-9) and restarted after --cut; everyone is given all three endpoints
//
// a, b, e, h run on loopback (etcd and three torusd, R=2, as child processes); c and d need real
// addresses and run in network namespaces (root, iproute2, nftables; skipped otherwise). A
// workload process writes, syncs and reads back random pieces of a volume all along
// (test/helpers/workload.ts), and a probe process asks every node, every 300 ms, which live
// blocks it holds (test/helpers/cluster-probe.ts watch). Latencies are split by the phase of
// the event in which each operation completed. Each scenario runs --reps times on a fresh cluster;
// figures are medians over repetitions with min and max. Prints a table, writes JSON to
// bench/results/failure-<date>.json. Nothing is asserted: a data mismatch is reported as a
// BUG line and in the JSON's `problems`.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { startCluster, type TestCluster } from '../test/helpers/cluster.js';
import { startEtcdCluster, type EtcdCluster } from '../test/helpers/etcd-cluster.js';
import { PROBE, WORKLOAD, ipClusterUnavailable, startIpCluster, type IpCluster } from '../test/helpers/ip-cluster.js';
import { netnsUnavailable } from '../test/helpers/netns.js';
import { REPO, removeDir, runCli, startTorusd, type CliResult, type Torusd } from '../test/helpers/procs.js';
import { parseDuration } from '../src/core/units.js';
import { WorkloadProc, type ClosedEvent, type ReadEvent, type SyncEvent } from '../test/helpers/workload-proc.js';

const { values } = parseArgs({
  options: {
    scenario: { type: 'string', default: 'a,b,c,d,e,h' },
    reps: { type: 'string', default: '3' },
    heartbeat: { type: 'string', default: '5s' },
    'rebalance-interval': { type: 'string', default: '10s' },
    size: { type: 'string', default: '64MiB' },
    'block-size': { type: 'string', default: '512KiB' },
    cut: { type: 'string', default: '20s' },
  },
});
const SCENARIOS = values.scenario.split(',').map((s) => s.trim()).filter(Boolean);
const REPS = Math.max(1, Number(values.reps));
const TORUSD_ARGS = ['--heartbeat', values.heartbeat, '--rebalance-interval', values['rebalance-interval']];
const MiB = 1024 * 1024;
const VOLUME_BYTES = parseSizeArg(values.size);
const R = 2;
const NORMAL_MS = 8000;
const AFTER_MS = 5000;
const DOWN_MIN_MS = parseDuration(values.cut);
const SHORT_MS = 6000;
const LONG_ETCD_MS = 40_000;
const WORKLOAD_ARGS = ['--fill', '--writes', '4', '--max-write', '65536', '--interval', '100', '--max-ms', '900000'];

function parseSizeArg(s: string): number {
  const m = /^(\d+)(KiB|MiB|GiB)?$/.exec(s);
  if (!m) throw new Error(`bad size ${s}`);
  return Number(m[1]) * ({ KiB: 1024, MiB: MiB, GiB: 1024 * MiB }[m[2] ?? ''] ?? 1);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const secs = (ms: number | null | undefined): number | null => (ms === null || ms === undefined ? null : Math.round(ms) / 1000);

// ---- child processes that print JSON lines ----

interface WatchLine {
  t: number;
  ms: number;
  live?: number;
  min?: number;
  max?: number;
  misplaced?: number;
  error?: string;
}

class Lines<T> {
  readonly items: T[] = [];
  private buf = '';
  private readonly waiters = new Set<() => void>();
  constructor(readonly proc: ChildProcess) {
    proc.stdout!.on('data', (d: Buffer) => {
      this.buf += d.toString();
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl);
        this.buf = this.buf.slice(nl + 1);
        try {
          this.items.push(JSON.parse(line) as T);
        } catch {
          // not ours
        }
      }
      for (const w of this.waiters) w();
    });
    proc.stderr!.resume();
  }
  until(pred: (x: T) => boolean, what: string, timeoutMs: number): Promise<T> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        const hit = this.items.find(pred);
        if (hit) finish(undefined, hit);
      };
      const timer = setTimeout(() => finish(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs);
      const finish = (err: Error | undefined, x?: T): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
        if (err) reject(err);
        else resolve(x!);
      };
      this.waiters.add(check);
      check();
    });
  }
  kill(): void {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGKILL');
  }
}

// ---- one cluster, on loopback or in namespaces, behind one interface ----

interface Env {
  readonly endpoint: string;
  readonly uuids: string[];
  ctl(args: readonly string[], timeoutMs?: number): Promise<CliResult>;
  workload(volume: string): WorkloadProc;
  watch(): Lines<WatchLine>;
  probe(args: readonly string[], at?: 'admin' | 'client'): Promise<CliResult>;
  killNode(i: number): Promise<void>;
  restartNode(i: number): Promise<void>;
  stop(): Promise<void>;
}

function spawnNode(args: readonly string[]): ChildProcess {
  return spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
}

function runNode(args: readonly string[], timeoutMs: number): Promise<CliResult> {
  return new Promise((resolve) => {
    const p = spawnNode(args);
    let stdout = '';
    let stderr = '';
    p.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? -1, stdout, stderr });
    });
  });
}

async function loopbackEnv(): Promise<Env & { cluster: TestCluster }> {
  const c = await startCluster({ nodes: 3, replication: R, blockSize: values['block-size'], size: '1GiB', torusdArgs: TORUSD_ARGS });
  const children = new Set<ChildProcess>();
  const track = (p: ChildProcess): ChildProcess => {
    children.add(p);
    p.once('exit', () => children.delete(p));
    return p;
  };
  return {
    cluster: c,
    endpoint: c.etcd.endpoint,
    uuids: c.nodes.map((_, i) => c.uuidOf(i)),
    ctl: (args, timeoutMs = 30_000) => runCli('torusctl', ['-C', c.etcd.endpoint, ...args], { timeoutMs }),
    workload: (volume) => new WorkloadProc(track(spawnNode([WORKLOAD, c.etcd.endpoint, volume, ...WORKLOAD_ARGS]))),
    watch: () => new Lines<WatchLine>(track(spawnNode([PROBE, 'watch', c.etcd.endpoint, '300']))),
    probe: (args) => runNode([PROBE, ...args], 60_000),
    killNode: (i) => c.kill(i),
    restartNode: (i) => c.restart(i),
    async stop() {
      for (const p of children) p.kill('SIGKILL');
      await c.stop();
    },
  };
}

/** Like loopbackEnv, on a three-member etcd cluster that every process is given all of. */
async function etcdClusterEnv(): Promise<Env & { etcd: EtcdCluster }> {
  const etcd = await startEtcdCluster(3);
  const nodes: Torusd[] = [];
  const children = new Set<ChildProcess>();
  const track = (p: ChildProcess): ChildProcess => {
    children.add(p);
    p.once('exit', () => children.delete(p));
    return p;
  };
  const ctl = (args: readonly string[], timeoutMs = 30_000): Promise<CliResult> => runCli('torusctl', ['-C', etcd.all, ...args], { timeoutMs });
  const stop = async (): Promise<void> => {
    for (const p of children) p.kill('SIGKILL');
    await Promise.all(nodes.map((n) => n.kill()));
    for (const n of nodes) removeDir(n.dataDir);
    await etcd.stop();
  };
  try {
    const init = await ctl(['init', '--block-size', values['block-size'], '--replication', String(R)]);
    if (init.code !== 0) throw new Error(`init: ${init.stderr}`);
    for (let i = 0; i < 3; i++) nodes.push(await startTorusd(etcd.all, { size: '1GiB', extra: TORUSD_ARGS }));
    const add = await ctl(['peer', 'add', '--all-peers']);
    if (add.code !== 0) throw new Error(`peer add: ${add.stderr}`);
    const peers = JSON.parse((await ctl(['list-peers', '--json'])).stdout) as { uuid: string; address: string }[];
    return {
      etcd,
      endpoint: etcd.all,
      uuids: nodes.map((n) => peers.find((p) => p.address === n.address)!.uuid),
      ctl,
      workload: (volume) => new WorkloadProc(track(spawnNode([WORKLOAD, etcd.all, volume, ...WORKLOAD_ARGS]))),
      watch: () => new Lines<WatchLine>(track(spawnNode([PROBE, 'watch', etcd.all, '300']))),
      probe: (args) => runNode([PROBE, ...args], 60_000),
      killNode: (i) => nodes[i]!.kill().then(() => undefined),
      restartNode: () => Promise.reject(new Error('not used')),
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

async function netnsEnv(): Promise<Env & { cluster: IpCluster }> {
  const c = await startIpCluster({ nodes: 3, replication: R, blockSize: values['block-size'], size: '1GiB', torusdArgs: TORUSD_ARGS });
  return {
    cluster: c,
    endpoint: c.etcd.endpoint,
    uuids: c.nodes.map((n) => n.uuid),
    ctl: (args, timeoutMs) => c.ctl(args, timeoutMs),
    workload: (volume) => new WorkloadProc(c.startScript(c.client, WORKLOAD, [c.etcd.endpoint, volume, ...WORKLOAD_ARGS])),
    watch: () => new Lines<WatchLine>(c.startScript(c.admin, PROBE, ['watch', c.etcd.endpoint, '300'])),
    probe: (args, at = 'admin') => c.exec(at === 'admin' ? c.admin : c.client, process.execPath, [PROBE, ...args], 60_000),
    killNode: (i) => c.kill(i),
    restartNode: (i) => c.restart(i),
    stop: () => c.stop(),
  };
}

// ---- measurements ----

interface Dist {
  n: number;
  ok: number;
  failed: Record<string, number>;
  median: number | null;
  p90: number | null;
  max: number | null;
}

function dist(events: readonly (SyncEvent | ReadEvent)[]): Dist {
  const ok = events.filter((e) => e.ok).map((e) => e.ms).sort((a, b) => a - b);
  const failed: Record<string, number> = {};
  for (const e of events) {
    if (e.ok) continue;
    const key = e.code ?? ('mismatch' in e && e.mismatch ? 'MISMATCH' : 'ERROR');
    failed[key] = (failed[key] ?? 0) + 1;
  }
  const q = (p: number): number | null => (ok.length ? ok[Math.min(ok.length - 1, Math.floor(p * ok.length))]! : null);
  return { n: events.length, ok: ok.length, failed, median: q(0.5), p90: q(0.9), max: ok.length ? ok[ok.length - 1]! : null };
}

interface PhaseStats {
  from: number;
  to: number;
  sync: Dist;
  read: Dist;
}

interface RepResult {
  phases: Record<string, PhaseStats>;
  /** Seconds from the event's start (or the heal, removal, restart) to what the key says. */
  times: Record<string, number | null>;
  facts: Record<string, string | number | boolean | null>;
  excerpts: Record<string, string>;
  problems: string[];
}

/**
 * Each operation counts in the phase in which it completed: a sync that started just before a
 * node was cut off and hung on it counts as "during the event", and one that was stuck until the
 * heal counts in the phase after it.
 */
function phaseStats(w: WorkloadProc, bounds: readonly [string, number, number][]): Record<string, PhaseStats> {
  const out: Record<string, PhaseStats> = {};
  for (const [name, from, to] of bounds) {
    const inside = <E extends { t: number; ms: number }>(e: E): boolean => e.t + e.ms >= from && e.t + e.ms < to;
    out[name] = { from, to, sync: dist(w.syncs.filter(inside)), read: dist(w.reads.filter(inside)) };
  }
  return out;
}

interface HealthJson {
  healthy: boolean;
  downPeers: string[];
  underReplicatedBlocks: number;
  rebalancing: boolean;
}

async function health(env: Env): Promise<HealthJson | undefined> {
  const r = await env.ctl(['health', '--json']);
  if (r.code !== 0 && r.code !== 1) return undefined;
  try {
    return JSON.parse(r.stdout) as HealthJson;
  } catch {
    return undefined;
  }
}

/** Bytes stored on all nodes, as their heartbeats report (undefined while etcd is unreachable). */
async function usedBytes(env: Env): Promise<number | undefined> {
  const r = await env.ctl(['list-peers', '--json']);
  if (r.code !== 0) return undefined;
  try {
    return (JSON.parse(r.stdout) as { used: number | null }[]).reduce((n, p) => n + (p.used ?? 0), 0);
  } catch {
    return undefined;
  }
}

async function pollUntil<T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs: number, everyMs = 500): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn().catch(() => undefined);
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** A short, readable excerpt of a command's output for the guide. */
function excerpt(cmd: string, r: CliResult): string {
  const out = `${r.stdout}${r.stderr}`.trim().split('\n').slice(0, 14).join('\n');
  return `$ ${cmd}\n${out}${r.code !== 0 ? `\n(exit status ${r.code})` : ''}`;
}

function firstMessages(w: WorkloadProc, from: number, to: number): string {
  const seen = new Map<string, string>();
  for (const e of [...w.syncs, ...w.reads]) if (!e.ok && e.t >= from && e.t < to && e.code && !seen.has(e.code)) seen.set(e.code, `${e.ev} ${e.code}: ${e.msg ?? ''}`);
  return [...seen.values()].join('\n');
}

/** Why the workload is gone, if it died rather than closing. */
function deathNote(w: WorkloadProc): string {
  const code = w.proc.exitCode ?? w.proc.signalCode;
  const err = w.stderr.split('\n').find((l) => /Error|error:/.test(l)) ?? w.stderr.trim().split('\n').at(-1) ?? '';
  return code !== null && code !== 0 ? `BUG: the client process died (exit ${code}) instead of failing the sync: ${err.trim().slice(0, 300)}` : 'the workload did not close';
}

/** The workload's normal phase: from a second after the fill, for NORMAL_MS. */
async function begin(env: Env, volume: string): Promise<{ w: WorkloadProc; watch: Lines<WatchLine>; t0: number }> {
  const c = await env.ctl(['volume', 'create-block', volume, String(VOLUME_BYTES)]);
  if (c.code !== 0) throw new Error(`volume create: ${c.stdout}${c.stderr}`);
  const w = env.workload(volume);
  await w.until((e) => e.ev === 'filled', 'the volume to be filled', 120_000);
  const watch = env.watch();
  await sleep(1000);
  const t0 = Date.now();
  await sleep(NORMAL_MS);
  return { w, watch, t0 };
}

/** Stops the workload and checks that what it synced last reads back, from another process. */
async function finish(env: Env, w: WorkloadProc, volume: string, problems: string[], facts: RepResult['facts']): Promise<ClosedEvent | undefined> {
  let closed: ClosedEvent | undefined;
  try {
    closed = await w.stop();
  } catch {
    problems.push(deathNote(w));
    return undefined;
  }
  facts['workloadVerified'] = closed.verified;
  facts['finalSyncOk'] = closed.finalSyncOk;
  facts['spills'] = closed.spills;
  facts['readFallbacks'] = closed.fallbacks;
  const mism = w.reads.filter((r) => r.mismatch).length;
  if (mism > 0) problems.push(`BUG: ${mism} read(s) returned other bytes than were written`);
  if (closed.verifyError) problems.push(`the writer could not read its volume back: ${closed.verifyError.code}: ${closed.verifyError.msg}`);
  else if (!closed.verified) problems.push(`BUG: the writer's whole-volume read-back differs from what it wrote`);
  const r = await env.probe(['sha', env.endpoint, volume]);
  if (r.code !== 0) problems.push(`read-back probe failed: ${r.stderr.trim()}`);
  else {
    const sha = (JSON.parse(r.stdout) as { sha: string }).sha;
    const ok = sha === closed.synced || (!closed.finalSyncOk && sha === closed.inflight);
    facts['readBackMatchesLastSync'] = ok;
    if (!ok) problems.push(`BUG: the volume's head does not hold the writer's last successful sync (acknowledged data lost)`);
  }
  return closed;
}

// ---- scenarios ----

async function nodeDown(rep: number): Promise<RepResult> {
  const env = await loopbackEnv();
  const problems: string[] = [];
  const times: RepResult['times'] = {};
  const facts: RepResult['facts'] = {};
  const excerpts: Record<string, string> = {};
  try {
    const { w, watch, t0 } = await begin(env, 'va');
    const victim = env.uuids[1]!;
    const tKill = Date.now();
    await env.killNode(1);
    const tDown = await pollUntil('the node seen down', async () => ((await health(env))?.downPeers.includes(victim) ? Date.now() : undefined), 120_000);
    times['detectDown'] = secs(tDown - tKill);
    if (rep === 0) {
      excerpts['health'] = excerpt('torusctl health', await env.ctl(['health']));
      excerpts['list-peers'] = excerpt('torusctl list-peers', await env.ctl(['list-peers']));
    }
    await sleep(Math.max(0, tKill + Math.max(DOWN_MIN_MS, tDown - tKill + 5000) - Date.now()));
    const downLines = watch.items.filter((l) => l.t >= tDown && l.t < Date.now() && l.min !== undefined);
    facts['minCopiesWhileDown'] = downLines.length ? Math.min(...downLines.map((l) => l.min!)) : null;
    const tRestart = Date.now();
    await env.restartNode(1);
    times['restart'] = secs(Date.now() - tRestart);
    const rCopies = await watch.until((l) => l.t >= tRestart && (l.min ?? 0) >= R, 'R copies of every block', 180_000);
    times['toRCopies'] = secs(rCopies.t + rCopies.ms - tRestart);
    const placed = await watch.until((l) => l.t >= tRestart && (l.min ?? 0) >= R && l.max === R && l.misplaced === 0, 'every block on its owners', 180_000);
    times['toAllOnOwners'] = secs(placed.t + placed.ms - tRestart);
    const tHealthy = await pollUntil('health HEALTHY', async () => ((await health(env))?.healthy ? Date.now() : undefined), 180_000);
    times['toHealthy'] = secs(tHealthy - tRestart);
    const tPlaced = placed.t + placed.ms;
    await sleep(AFTER_MS);
    const tEnd = Date.now();
    const phases = phaseStats(w, [
      ['normal', t0, tKill],
      ['node down', tKill, tRestart],
      ['recovering', tRestart, Math.max(tPlaced, tRestart + 1)],
      ['after', Math.max(tPlaced, tRestart + 1), tEnd],
    ]);
    facts['errorsDuringEvent'] = firstMessages(w, tKill, tEnd) || null;
    watch.kill();
    await finish(env, w, 'va', problems, facts);
    return { phases, times, facts, excerpts, problems };
  } finally {
    await env.stop();
  }
}

async function nodeLost(rep: number): Promise<RepResult> {
  const env = await loopbackEnv();
  const problems: string[] = [];
  const times: RepResult['times'] = {};
  const facts: RepResult['facts'] = {};
  const excerpts: Record<string, string> = {};
  try {
    const { w, watch, t0 } = await begin(env, 'vb');
    const victim = env.uuids[1]!;
    const tKill = Date.now();
    await env.killNode(1);
    const tDown = await pollUntil('the node seen down', async () => ((await health(env))?.downPeers.includes(victim) ? Date.now() : undefined), 120_000);
    times['detectDown'] = secs(tDown - tKill);
    if (rep === 0) excerpts['remove-without-force'] = excerpt(`torusctl peer remove ${victim}`, await env.ctl(['peer', 'remove', victim]));
    const tRemove = Date.now();
    const rm = await env.ctl(['peer', 'remove', '--force', victim]);
    if (rm.code !== 0) throw new Error(`peer remove --force: ${rm.stdout}${rm.stderr}`);
    if (rep === 0) {
      excerpts['remove-force'] = excerpt(`torusctl peer remove --force ${victim}`, rm);
      await sleep(1500);
      excerpts['rebalance-status'] = excerpt('torusctl rebalance status', await env.ctl(['rebalance', 'status']));
      excerpts['health-during'] = excerpt('torusctl health', await env.ctl(['health']));
    }
    const rCopies = await watch.until((l) => l.t >= tRemove && (l.min ?? 0) >= R, 'R copies of every block', 180_000);
    times['toRCopies'] = secs(rCopies.t + rCopies.ms - tRemove);
    const placed = await watch.until((l) => l.t >= tRemove && (l.min ?? 0) >= R && l.max === R && l.misplaced === 0, 'every block on its owners', 180_000);
    times['toAllOnOwners'] = secs(placed.t + placed.ms - tRemove);
    const tHealthy = await pollUntil('health HEALTHY', async () => ((await health(env))?.healthy ? Date.now() : undefined), 180_000);
    times['toHealthy'] = secs(tHealthy - tRemove);
    const tPlaced = placed.t + placed.ms;
    await sleep(AFTER_MS);
    const tEnd = Date.now();
    const phases = phaseStats(w, [
      ['normal', t0, tKill],
      ['node down', tKill, tRemove],
      ['re-replicating', tRemove, Math.max(tPlaced, tRemove + 1)],
      ['after', Math.max(tPlaced, tRemove + 1), tEnd],
    ]);
    facts['errorsDuringEvent'] = firstMessages(w, tKill, tEnd) || null;
    watch.kill();
    await finish(env, w, 'vb', problems, facts);
    return { phases, times, facts, excerpts, problems };
  } finally {
    await env.stop();
  }
}

async function partition(rep: number): Promise<RepResult> {
  const env = await netnsEnv();
  const c = env.cluster;
  const problems: string[] = [];
  const times: RepResult['times'] = {};
  const facts: RepResult['facts'] = {};
  const excerpts: Record<string, string> = {};
  try {
    const { w, watch, t0 } = await begin(env, 'vc');
    const victim = c.nodes[1]!;
    const tCut = Date.now();
    c.cut(victim.host);
    const tDown = await pollUntil('the node seen down', async () => ((await health(env))?.downPeers.includes(victim.uuid) ? Date.now() : undefined), 120_000);
    times['detectDown'] = secs(tDown - tCut);
    if (rep === 0) {
      excerpts['health'] = excerpt('torusctl health', await env.ctl(['health']));
      excerpts['list-peers'] = excerpt('torusctl list-peers', await env.ctl(['list-peers']));
    }
    await sleep(Math.max(0, tCut + Math.max(DOWN_MIN_MS, tDown - tCut + 5000) - Date.now()));
    const tHeal = Date.now();
    c.heal(victim.host);
    const tBack = await pollUntil(
      'the node back (OK)',
      async () => {
        const rows = JSON.parse((await env.ctl(['list-peers', '--json'])).stdout) as { uuid: string; member: string }[];
        return rows.find((p) => p.uuid === victim.uuid)?.member === 'OK' ? Date.now() : undefined;
      },
      300_000,
    );
    times['nodeBackOk'] = secs(tBack - tHeal);
    const rCopies = await watch.until((l) => l.t >= tHeal && (l.min ?? 0) >= R, 'R copies of every block', 300_000);
    times['toRCopies'] = secs(rCopies.t + rCopies.ms - tHeal);
    const placed = await watch.until((l) => l.t >= tHeal && (l.min ?? 0) >= R && l.max === R && l.misplaced === 0, 'every block on its owners', 300_000);
    times['toAllOnOwners'] = secs(placed.t + placed.ms - tHeal);
    const tHealthy = await pollUntil('health HEALTHY', async () => ((await health(env))?.healthy ? Date.now() : undefined), 300_000);
    times['toHealthy'] = secs(tHealthy - tHeal);
    const tPlaced = placed.t + placed.ms;
    await sleep(AFTER_MS);
    const tEnd = Date.now();
    const phases = phaseStats(w, [
      ['normal', t0, tCut],
      ['node cut off', tCut, tHeal],
      ['recovering', tHeal, Math.max(tPlaced, tHeal + 1)],
      ['after', Math.max(tPlaced, tHeal + 1), tEnd],
    ]);
    facts['errorsDuringEvent'] = firstMessages(w, tCut, tEnd) || null;
    watch.kill();
    await finish(env, w, 'vc', problems, facts);
    if (rep === 0) excerpts['node-log'] = victim.log().split('\n').filter((l) => /"level":(40|50)|restored/.test(l)).slice(0, 8).join('\n');
    return { phases, times, facts, excerpts, problems };
  } finally {
    await env.stop();
  }
}

async function clientCut(rep: number): Promise<RepResult> {
  const env = await netnsEnv();
  const c = env.cluster;
  const problems: string[] = [];
  const times: RepResult['times'] = {};
  const facts: RepResult['facts'] = {};
  const excerpts: Record<string, string> = {};
  const lockFree = async (): Promise<boolean> => {
    const vols = JSON.parse((await env.ctl(['volume', 'list', '--json'])).stdout) as { name: string; status: string }[];
    return vols.find((v) => v.name === 'vd')?.status === 'free';
  };
  try {
    const b = await begin(env, 'vd');
    b.watch.kill();
    let w = b.w;
    const t0 = b.t0;
    // Short cut: shorter than the lock's 15 s lease.
    const tCut1 = Date.now();
    c.cutFrom(c.client, c.etcd.ip);
    await sleep(SHORT_MS);
    const tHeal1 = Date.now();
    c.heal(c.client);
    const firstOk = await w.until((e) => e.ev === 'sync' && e.ok && e.t + e.ms >= tHeal1, 'a successful sync after the short cut', 60_000).catch(() => undefined);
    facts['shortCutRecovered'] = firstOk !== undefined;
    times['shortCutFirstOkSyncAfterHeal'] = firstOk ? secs((firstOk as SyncEvent).t + (firstOk as SyncEvent).ms - tHeal1) : null;
    const firstFail1 = w.syncs.find((s) => !s.ok && s.t + s.ms >= tCut1);
    times['shortCutFirstSyncError'] = firstFail1 ? secs(firstFail1.t + firstFail1.ms - tCut1) : null;
    facts['shortCutWritesFailed'] = w.syncs.filter((s) => !s.ok && s.phase === 'write' && s.t >= tCut1 && s.t < tHeal1).length;
    facts['shortCutSyncErrors'] = firstMessages(w, tCut1, tHeal1 + 1) || null;
    const tEnd1 = firstOk ? (firstOk as SyncEvent).t + (firstOk as SyncEvent).ms : Date.now();
    const phases1 = phaseStats(w, [
      ['normal', t0, tCut1],
      ['short cut (6 s)', tCut1, tHeal1],
      ['healed, until a sync succeeds', tHeal1, tEnd1 + 1],
    ]);
    if (!firstOk) {
      // Fenced by the short cut: a fresh writer for the long one, once the lock is free.
      await w.stop().catch(() => undefined);
      await pollUntil('lock free', lockFree, 60_000);
      w = env.workload('vd');
      await w.until((e) => e.ev === 'filled', 'fill', 120_000);
    }
    await sleep(4000);
    // Long cut: the lock's lease runs out.
    const usedBefore = await usedBytes(env);
    facts['usedMiBBeforeLongCut'] = usedBefore === undefined ? null : Math.round(usedBefore / MiB);
    const tCut2 = Date.now();
    c.cutFrom(c.client, c.etcd.ip);
    const tFree = await pollUntil('the lock to expire', async () => ((await lockFree()) ? Date.now() : undefined), 90_000, 300);
    times['longCutLockFree'] = secs(tFree - tCut2);
    if (rep === 0) excerpts['volume-list'] = excerpt('torusctl volume list', await env.ctl(['volume', 'list']));
    await sleep(3000);
    const tHeal2 = Date.now();
    c.heal(c.client);
    const locked = await w.until((e) => e.ev === 'sync' && !e.ok && e.t >= tHeal2 && e.code === 'LOCKED', 'a LOCKED sync after the heal', 90_000).catch(() => undefined);
    times['longCutLockedAfterHeal'] = locked ? secs((locked as SyncEvent).t + (locked as SyncEvent).ms - tHeal2) : null;
    facts['longCutSyncErrors'] = firstMessages(w, tCut2, tHeal2) || null;
    facts['afterHealErrors'] = firstMessages(w, tHeal2, Date.now()) || null;
    const okAfter = w.syncs.filter((s) => s.ok && s.t >= tCut2).length;
    facts['syncsOkAfterLongCut'] = okAfter;
    // Not a fault since the journal (docs/journal.md): a flush needs the journal replicas, not
    // etcd, so the writer acknowledges flushes until it notices its lease is gone; a writer that
    // takes the volume over fences the journal first, so whatever was acknowledged is replayed.
    // What must hold is newWriterSeesLastSync, below.
    await sleep(6000); // a heartbeat, so the nodes' usage is current
    const usedAfter = await usedBytes(env);
    facts['usedMiBAfterLongCut'] = usedAfter === undefined ? null : Math.round(usedAfter / MiB);
    const tStop = Date.now();
    const phases2 = phaseStats(w, [
      ['long cut (past the lease)', tCut2, tHeal2],
      ['healed (fenced)', tHeal2, tStop],
    ]);
    const closed = await w.stop().catch(() => undefined);
    if (closed) {
      facts['fencedFinalError'] = closed.finalError ? `${closed.finalError.code}: ${closed.finalError.msg}` : null;
      const tTake = Date.now();
      const r = await env.probe(['take', env.endpoint, 'vd'], 'client');
      times['newWriterOpens'] = secs(Date.now() - tTake);
      if (r.code !== 0) problems.push(`a new writer could not open the volume after the heal: ${r.stderr.trim()}`);
      else {
        const sha = (JSON.parse(r.stdout) as { sha: string }).sha;
        const ok = sha === closed.synced || sha === closed.inflight;
        facts['newWriterSeesLastSync'] = ok;
        facts['inflightSyncHadCommitted'] = sha !== closed.synced;
        if (!ok) problems.push('BUG: the new writer does not see the last successful sync');
      }
      if (closed.verifyError) {
        // Seen when the sync in flight at the cut had committed: the writer's view is the head
        // before it, whose inode pages GC may already have deleted.
        facts['fencedWriterReadBack'] = `failed: ${closed.verifyError.code}: ${closed.verifyError.msg.slice(0, 200)}`;
      } else if (!closed.verified) problems.push('BUG: the fenced writer read back other bytes than it wrote');
      else facts['fencedWriterReadBack'] = 'ok';
    } else problems.push(deathNote(w));
    return { phases: { ...phases1, ...phases2 }, times, facts, excerpts, problems };
  } finally {
    await env.stop();
  }
}

async function etcdDown(rep: number): Promise<RepResult> {
  const env = await loopbackEnv();
  const c = env.cluster;
  const problems: string[] = [];
  const times: RepResult['times'] = {};
  const facts: RepResult['facts'] = {};
  const excerpts: Record<string, string> = {};
  try {
    const { w, watch, t0 } = await begin(env, 've');
    watch.kill();
    const usedBefore = await usedBytes(env);
    facts['usedMiBBefore'] = usedBefore === undefined ? null : Math.round(usedBefore / MiB);
    // Short outage.
    const tKill1 = Date.now();
    await c.etcd.kill();
    if (rep === 0) excerpts['health'] = excerpt('torusctl health', await env.ctl(['health']));
    await sleep(Math.max(0, tKill1 + SHORT_MS - Date.now()));
    await c.etcd.restart();
    const tUp1 = Date.now();
    const firstOk = (await w.until((e) => e.ev === 'sync' && e.ok && e.t + e.ms >= tUp1, 'a sync after the short outage', 60_000).catch(() => undefined)) as SyncEvent | undefined;
    facts['shortOutageRecovered'] = firstOk !== undefined;
    times['shortOutageFirstOkSyncAfterRestart'] = firstOk ? secs(firstOk.t + firstOk.ms - tUp1) : null;
    const firstFail = w.syncs.find((s) => !s.ok && s.t + s.ms >= tKill1);
    times['shortOutageFirstSyncError'] = firstFail ? secs(firstFail.t + firstFail.ms - tKill1) : null;
    facts['shortOutageWritesFailed'] = w.syncs.filter((s) => !s.ok && s.phase === 'write' && s.t >= tKill1 && s.t < tUp1).length;
    facts['shortOutageErrors'] = firstMessages(w, tKill1, tUp1) || null;
    const tEnd1 = firstOk ? firstOk.t + firstOk.ms : Date.now();
    const phases1 = phaseStats(w, [
      ['normal', t0, tKill1],
      ['etcd down (6 s)', tKill1, tUp1],
      ['etcd back, until a sync succeeds', tUp1, tEnd1 + 1],
    ]);
    await sleep(4000);
    // Long outage: longer than twice the lock's lease, when the etcd client gives the lease up.
    const tKill2 = Date.now();
    await c.etcd.kill();
    await sleep(LONG_ETCD_MS);
    await c.etcd.restart();
    const tUp2 = Date.now();
    // At once and side by side: another writer trying to take the volume over, the nodes'
    // health, and what the old writer's next syncs do.
    const takeover = pollUntil(
      'a new writer to open the volume',
      async () => {
        // `touch`: the new writer commits one sync, as any real one would.
        const r = await env.probe(['take', env.endpoint, 've', 'touch']);
        return r.code === 0 ? { at: Date.now(), sha: (JSON.parse(r.stdout) as { sha: string }).sha } : undefined;
      },
      120_000,
      250,
    ).catch(() => undefined);
    // Not `health`: it stays DEGRADED while the nodes are nearly full of the old writer's
    // uncommitted blocks; this is about the nodes' heartbeats.
    const nodesOk = pollUntil(
      'every node OK in list-peers',
      async () => {
        const r = await env.ctl(['list-peers', '--json']);
        const rows = JSON.parse(r.stdout) as { member: string }[];
        return rows.length === env.uuids.length && rows.every((p) => p.member === 'OK') ? Date.now() : undefined;
      },
      120_000,
    ).catch(() => undefined);
    const next = (await w.until((e) => e.ev === 'sync' && e.t + e.ms >= tUp2, 'a sync after the long outage', 60_000).catch(() => undefined)) as SyncEvent | undefined;
    facts['longOutageFirstSyncAfterRestart'] = next ? (next.ok ? 'ok' : `${next.code}: ${next.msg}`) : null;
    const tNodes = await nodesOk;
    times['nodesOkAfterRestart'] = tNodes ? secs(tNodes - tUp2) : null;
    // The nodes' usage as of their first heartbeats after the restart: the old writer's
    // uncommitted blocks are all there (GC cannot have run: no commit moved the head yet).
    await sleep(Math.max(0, (tNodes ?? Date.now()) + 1000 - Date.now()));
    const usedAfter = await usedBytes(env);
    facts['usedMiBAfterOutage'] = usedAfter === undefined ? null : Math.round(usedAfter / MiB);
    const taken = await takeover;
    times['newWriterAfterRestart'] = taken ? secs(taken.at - tUp2) : null;
    // How long until GC reclaims them once the new writer's commit moved the head's epoch past
    // theirs (a GC pass every 30 s by default).
    const reclaimed =
      taken && usedBefore !== undefined && usedAfter !== undefined && usedAfter > usedBefore + 16 * MiB
        ? pollUntil('GC to reclaim the uncommitted blocks', async () => {
            const u = await usedBytes(env);
            return u !== undefined && u <= usedBefore + 16 * MiB ? Date.now() : undefined;
          }, 120_000, 1000).catch(() => undefined)
        : Promise.resolve(undefined);
    const okLong = w.syncs.find((e) => e.ok && e.t + e.ms >= tUp2);
    facts['longOutageRecovered'] = okLong !== undefined;
    const fenceAt = w.syncs.find((e) => !e.ok && e.code === 'LOCKED' && e.t + e.ms >= tKill2);
    times['longOutageFencedAfter'] = fenceAt ? secs(fenceAt.t + fenceAt.ms - tKill2) : null;
    facts['longOutageErrors'] = firstMessages(w, tKill2, tUp2) || null;
    facts['longOutageAfterErrors'] = firstMessages(w, tUp2, Date.now()) || null;
    const tStop = Date.now();
    const phases2 = phaseStats(w, [
      ['etcd down (40 s)', tKill2, tUp2],
      ['etcd back', tUp2, tStop],
    ]);
    const closed = await w.stop().catch(() => undefined);
    if (!closed) problems.push(deathNote(w));
    if (closed && taken) {
      const ok = taken.sha === closed.synced || (!closed.finalSyncOk && taken.sha === closed.inflight);
      facts['newWriterSeesLastSync'] = ok;
      if (!ok) problems.push('BUG: after the etcd outage the volume does not hold the last successful sync');
    }
    const back = await reclaimed;
    if (back && taken) times['orphansReclaimedAfterNewCommit'] = secs(back - taken.at);
    return { phases: { ...phases1, ...phases2 }, times, facts, excerpts, problems };
  } finally {
    await env.stop();
  }
}

async function etcdMemberLost(rep: number): Promise<RepResult> {
  const env = await etcdClusterEnv();
  const problems: string[] = [];
  const times: RepResult['times'] = {};
  const facts: RepResult['facts'] = {};
  const excerpts: Record<string, string> = {};
  try {
    const { w, watch, t0 } = await begin(env, 'vf');
    watch.kill();
    // The member the client uses (every etcd call of a process goes to one member while it answers).
    const used = env.etcd.usedBy(w.proc.pid!);
    if (used.length !== 1) throw new Error(`the client talks to members ${used.join(',')}, expected one`);
    const victim = used[0]!;
    await env.etcd.moveLeader(victim);
    facts['victimWasLeaderAndClients'] = (await env.etcd.leader()) === victim;
    const tKill = Date.now();
    await env.etcd.kill(victim);
    // While it is dead: do the nodes stay OK (their leases and heartbeats fail over)?
    let downSeen = 0;
    let polls = 0;
    while (Date.now() - tKill < DOWN_MIN_MS) {
      const r = await env.ctl(['list-peers', '--json']);
      polls++;
      if (r.code !== 0) downSeen++;
      else if ((JSON.parse(r.stdout) as { member: string }[]).some((p) => p.member !== 'OK')) downSeen++;
      await sleep(1000);
    }
    facts['listPeersNotAllOkDuringOutage'] = `${downSeen} of ${polls}`;
    if (rep === 0) excerpts['health'] = excerpt('torusctl health', await env.ctl(['health']));
    const firstOk = w.syncs.find((e) => e.ok && e.t >= tKill);
    times['firstSyncAfterKill'] = firstOk ? secs(firstOk.t + firstOk.ms - tKill) : null;
    const tUp = Date.now();
    await env.etcd.restart(victim);
    times['memberRestart'] = secs(Date.now() - tUp);
    await sleep(AFTER_MS);
    const tEnd = Date.now();
    const phases = phaseStats(w, [
      ['normal', t0, tKill],
      ['member down (leader, client\'s)', tKill, tUp],
      ['member back', tUp, tEnd],
    ]);
    facts['errorsDuringEvent'] = firstMessages(w, tKill, tEnd) || null;
    await finish(env, w, 'vf', problems, facts);
    return { phases, times, facts, excerpts, problems };
  } finally {
    await env.stop();
  }
}

// ---- driver ----

const ALL: Record<string, { title: string; netns: boolean; run: (rep: number) => Promise<RepResult> }> = {
  a: { title: `a single node down (kill -9), restarted after ${values.cut}`, netns: false, run: nodeDown },
  b: { title: 'a node lost for good (kill -9, peer remove --force)', netns: false, run: nodeLost },
  c: { title: `a partition: one node cut off (nftables), healed after ${values.cut}`, netns: true, run: partition },
  d: { title: 'the client cut off from etcd: 6 s, then past the lock lease', netns: true, run: clientCut },
  e: { title: 'etcd down (kill -9): 6 s, then 40 s', netns: false, run: etcdDown },
  h: { title: `one of three etcd members lost (the client's, and leader), restarted after ${values.cut}`, netns: false, run: etcdMemberLost },
};

interface Agg {
  median: number | null;
  min: number | null;
  max: number | null;
  n: number;
}

function agg(xs: readonly (number | null | undefined)[]): Agg {
  const v = xs.filter((x): x is number => typeof x === 'number').sort((a, b) => a - b);
  if (v.length === 0) return { median: null, min: null, max: null, n: 0 };
  const mid = v.length % 2 ? v[(v.length - 1) / 2]! : (v[v.length / 2 - 1]! + v[v.length / 2]!) / 2;
  return { median: mid, min: v[0]!, max: v[v.length - 1]!, n: v.length };
}

const fmt = (a: Agg, unit = ''): string =>
  a.median === null ? '-' : a.n === 1 || a.min === a.max ? `${round(a.median)}${unit}` : `${round(a.median)}${unit} [${round(a.min!)}-${round(a.max!)}]`;
const round = (x: number): string => (Math.abs(x) >= 100 ? x.toFixed(0) : Math.abs(x) >= 10 ? x.toFixed(1) : x.toFixed(2));

const netnsWhy = ipClusterUnavailable(netnsUnavailable());
const startedAt = new Date();
const report: Record<string, unknown> = {
  date: startedAt.toISOString(),
  settings: { reps: REPS, cut: values.cut, heartbeat: values.heartbeat, rebalanceInterval: values['rebalance-interval'], volume: values.size, blockSize: values['block-size'], replication: R, nodes: 3, workload: WORKLOAD_ARGS.join(' ') },
  machine: { cpus: (await import('node:os')).cpus().length, node: process.version },
  scenarios: {} as Record<string, unknown>,
};
const allProblems: string[] = [];

for (const key of SCENARIOS) {
  const s = ALL[key];
  if (!s) throw new Error(`unknown scenario ${key} (a, b, c, d, e, h)`);
  if (s.netns && netnsWhy) {
    console.log(`\n== ${key}: ${s.title}: skipped (${netnsWhy})`);
    (report['scenarios'] as Record<string, unknown>)[key] = { title: s.title, skipped: netnsWhy };
    continue;
  }
  console.log(`\n== ${key}: ${s.title} (${REPS} repetition${REPS > 1 ? 's' : ''})`);
  const reps: RepResult[] = [];
  const failures: string[] = [];
  for (let i = 0; i < REPS; i++) {
    const t = Date.now();
    try {
      const r = await s.run(i);
      reps.push(r);
      for (const p of r.problems) {
        console.log(`   ${p.startsWith('BUG') ? p : `problem: ${p}`}`);
        allProblems.push(`${key}#${i + 1}: ${p}`);
      }
      console.log(`   rep ${i + 1}: ${((Date.now() - t) / 1000).toFixed(0)} s; ${Object.entries(r.times).map(([k, v]) => `${k} ${v ?? '-'} s`).join(', ')}`);
    } catch (err) {
      failures.push((err as Error).message);
      allProblems.push(`${key}#${i + 1}: run failed: ${(err as Error).message}`);
      console.log(`   rep ${i + 1} failed: ${(err as Error).message.split('\n')[0]}`);
    }
  }
  if (reps.length === 0) {
    (report['scenarios'] as Record<string, unknown>)[key] = { title: s.title, failures };
    continue;
  }
  const phaseNames = Object.keys(reps[0]!.phases);
  const normalName = phaseNames[0]!;
  const phases: Record<string, unknown> = {};
  console.log(
    `   ${'phase'.padEnd(32)} ${'syncs ok/all'.padEnd(13)} ${'write+sync median ms'.padEnd(22)} ${'p90 ms'.padEnd(18)} ${'max ms'.padEnd(20)} ${'reads ok/all'.padEnd(13)} ${'read median ms'.padEnd(18)} ${'p90 ms'.padEnd(16)} ${'max ms'.padEnd(18)}`,
  );
  for (const ph of phaseNames) {
    const got = reps.map((r) => r.phases[ph]).filter((x): x is PhaseStats => x !== undefined);
    const a = {
      syncs: got.reduce((n, p) => n + p.sync.n, 0),
      syncsOk: got.reduce((n, p) => n + p.sync.ok, 0),
      syncFailures: got.reduce<Record<string, number>>((m, p) => {
        for (const [k, v] of Object.entries(p.sync.failed)) m[k] = (m[k] ?? 0) + v;
        return m;
      }, {}),
      reads: got.reduce((n, p) => n + p.read.n, 0),
      readsOk: got.reduce((n, p) => n + p.read.ok, 0),
      syncMedianMs: agg(got.map((p) => p.sync.median)),
      syncP90Ms: agg(got.map((p) => p.sync.p90)),
      syncMaxMs: agg(got.map((p) => p.sync.max)),
      readMedianMs: agg(got.map((p) => p.read.median)),
      readP90Ms: agg(got.map((p) => p.read.p90)),
      readMaxMs: agg(got.map((p) => p.read.max)),
      extraSyncMedianMs: agg(reps.map((r) => (r.phases[ph]?.sync.median ?? null) === null || r.phases[normalName]!.sync.median === null ? null : r.phases[ph]!.sync.median! - r.phases[normalName]!.sync.median!)),
      extraReadMedianMs: agg(reps.map((r) => (r.phases[ph]?.read.median ?? null) === null || r.phases[normalName]!.read.median === null ? null : r.phases[ph]!.read.median! - r.phases[normalName]!.read.median!)),
      seconds: agg(got.map((p) => (p.to - p.from) / 1000)),
    };
    phases[ph] = a;
    const fails = Object.entries(a.syncFailures).map(([k, v]) => `${v} ${k}`).join(', ');
    console.log(
      `   ${ph.padEnd(32)} ${`${a.syncsOk}/${a.syncs}`.padEnd(13)} ${fmt(a.syncMedianMs).padEnd(22)} ${fmt(a.syncP90Ms).padEnd(18)} ${fmt(a.syncMaxMs).padEnd(20)} ${`${a.readsOk}/${a.reads}`.padEnd(13)} ${fmt(a.readMedianMs).padEnd(18)} ${fmt(a.readP90Ms).padEnd(16)} ${fmt(a.readMaxMs).padEnd(18)}${fails ? ` failed syncs: ${fails}` : ''}`,
    );
  }
  const timeKeys = [...new Set(reps.flatMap((r) => Object.keys(r.times)))];
  const times = Object.fromEntries(timeKeys.map((k) => [k, agg(reps.map((r) => r.times[k]))]));
  for (const [k, v] of Object.entries(times)) console.log(`   ${k.padEnd(40)} ${fmt(v, ' s')}`);
  const factKeys = [...new Set(reps.flatMap((r) => Object.keys(r.facts)))];
  for (const k of factKeys) {
    const vals = [...new Set(reps.map((r) => JSON.stringify(r.facts[k] ?? null)))];
    console.log(`   ${k.padEnd(40)} ${vals.join(' | ').slice(0, 400)}`);
  }
  (report['scenarios'] as Record<string, unknown>)[key] = {
    title: s.title,
    phases,
    times,
    reps: reps.map((r) => ({ phases: r.phases, times: r.times, facts: r.facts, problems: r.problems })),
    excerpts: reps[0]!.excerpts,
    failures,
  };
}

report['problems'] = allProblems;
const dir = join(REPO, 'bench', 'results');
mkdirSync(dir, { recursive: true });
const day = startedAt.toISOString().slice(0, 10);
const all = SCENARIOS.join(',') === 'a,b,c,d,e,h';
const file = join(dir, `failure-${day}${all ? '' : `-${SCENARIOS.join('')}`}.json`);
writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);
console.log(`\n${allProblems.length ? `${allProblems.length} problem(s):\n  ${allProblems.join('\n  ')}` : 'no problems'}\nwrote ${file}`);
process.exit(0);
