import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { singleEtcdArgs } from '../../scripts/lib/etcd.js';
import { etcdBinary, freePort } from '../../test/helpers/etcd.js';
import type { PeerSecurity } from '../../src/rpc/security.js';
import { clientSecurity, nodeCertDir, testCerts } from '../../test/helpers/certs.js';
import { BIN } from '../../test/helpers/procs.js';

// The processes of one benchmark table: etcd, the storage nodes, the NBD server and nbdkit, each
// a real child process whose peak resident memory (VmHWM) we can read from /proc. The bench
// starts its own rather than using test/helpers: it needs etcd's data on disk (the tests keep it
// on tmpfs), node flags such as --cpu-prof in front of the script, and torusd restarts on the same
// data dir and ports.

export interface Proc {
  readonly name: string;
  readonly proc: ChildProcess;
  readonly pid: number;
  log(): string;
  /** Largest VmHWM seen, in bytes (sampled while running, and once more just before a stop), or VmRSS noted if larger. */
  peakRss(): number;
  /**
   * A VmRSS read elsewhere (RssSumPeak). VmHWM can miss it: memory given back with madvise (as
   * malloc_trim does) leaves the kernel's high-water mark where it last updated it, below a
   * resident size it never recorded.
   */
  noteRss(bytes: number): void;
  readonly exited: Promise<void>;
  /** Sends `signal`, waits up to `graceMs`, then SIGKILL; resolves once the process is gone. */
  stop(signal?: NodeJS.Signals, graceMs?: number): Promise<void>;
}

const live = new Set<ChildProcess>();
// A bench that dies (exception, Ctrl-C) must not leave daemons behind on a shared machine.
process.on('exit', () => {
  for (const p of live) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
});

/** A memory field of /proc/PID/status (VmHWM, VmRSS) in bytes; undefined once the process is gone. */
function readStatusBytes(pid: number, field: 'VmHWM' | 'VmRSS'): number | undefined {
  try {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB$`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

/** The largest sum of several processes' resident memory, and each one's part at that instant. */
export interface RssSum {
  readonly bytes: number;
  /** When it was sampled (ISO time); empty before the first sample. */
  readonly at: string;
  readonly each: Readonly<Record<string, number>>;
}

/**
 * Samples the resident memory (VmRSS) of the processes `procs()` returns, all in one pass, every
 * `everyMs` and whenever asked, and keeps the largest sum: what they need together, which the sum
 * of each one's own peak (VmHWM, reached at different times) overstates. The set is read afresh
 * each time, so processes restarted along the way are followed.
 */
export class RssSumPeak {
  private best: RssSum = { bytes: 0, at: '', each: {} };
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly procs: () => readonly Proc[],
    everyMs = 250,
  ) {
    this.timer = setInterval(() => this.sample(), everyMs);
    this.timer.unref();
  }

  sample(): void {
    const each: Record<string, number> = {};
    let bytes = 0;
    for (const p of this.procs()) {
      const v = readStatusBytes(p.pid, 'VmRSS');
      if (v === undefined) continue;
      p.noteRss(v);
      each[p.name] = v;
      bytes += v;
    }
    if (bytes > this.best.bytes) this.best = { bytes, at: new Date().toISOString(), each };
  }

  peak(): RssSum {
    return this.best;
  }

  stop(): void {
    clearInterval(this.timer);
  }
}

export interface SpawnOpts {
  /** Resolves the start once this appears in stdout or stderr. */
  readonly ready?: RegExp;
  /** Or once this resolves true (polled). */
  readonly probe?: () => Promise<boolean>;
  readonly readyTimeoutMs?: number;
  readonly env?: NodeJS.ProcessEnv;
}

export async function spawnProc(name: string, cmd: string, args: string[], opts: SpawnOpts = {}): Promise<Proc> {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...opts.env } });
  live.add(proc);
  let out = '';
  const keep = (d: Buffer): void => {
    out = (out + d.toString()).slice(-20000);
  };
  proc.stdout?.on('data', keep);
  proc.stderr?.on('data', keep);
  const exited = new Promise<void>((r) =>
    proc.once('exit', () => {
      live.delete(proc);
      r();
    }),
  );
  if (proc.pid === undefined) {
    await new Promise((r) => proc.once('error', r));
    throw new Error(`${name}: could not start ${cmd}`);
  }
  const pid = proc.pid;
  let peak = 0;
  const sample = (): void => {
    for (const field of ['VmHWM', 'VmRSS'] as const) {
      const v = readStatusBytes(pid, field);
      if (v !== undefined && v > peak) peak = v;
    }
  };
  const sampler = setInterval(sample, 500);
  sampler.unref();
  void exited.then(() => clearInterval(sampler));
  const gone = (): boolean => proc.exitCode !== null || proc.signalCode !== null;
  const p: Proc = {
    name,
    proc,
    pid,
    log: () => out,
    noteRss: (bytes) => {
      if (bytes > peak) peak = bytes;
    },
    peakRss: () => {
      if (!gone()) sample();
      return peak;
    },
    exited,
    async stop(signal = 'SIGTERM', graceMs = 30_000) {
      if (gone()) return;
      sample();
      proc.kill(signal);
      const timer = setTimeout(() => proc.kill('SIGKILL'), graceMs);
      await exited;
      clearTimeout(timer);
    },
  };
  const deadline = Date.now() + (opts.readyTimeoutMs ?? 30_000);
  for (;;) {
    if (gone()) throw new Error(`${name} exited (${proc.exitCode ?? proc.signalCode}) before it was ready:\n${out}`);
    if (opts.ready?.test(out)) break;
    if (opts.probe && (await opts.probe())) break;
    if (!opts.ready && !opts.probe) break;
    if (Date.now() > deadline) {
      await p.stop('SIGKILL');
      throw new Error(`${name} was not ready within ${opts.readyTimeoutMs ?? 30_000} ms:\n${out}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return p;
}

export function tcpOpen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/** etcd with its data in `dir`: on the same disk as the storage nodes, as in a real deployment. */
export async function startEtcdAt(dir: string): Promise<Proc & { endpoint: string }> {
  mkdirSync(dir, { recursive: true });
  const clientPort = await freePort();
  const peerPort = await freePort();
  const endpoint = `127.0.0.1:${clientPort}`;
  const healthy = async (): Promise<boolean> => {
    try {
      const res = await fetch(`http://${endpoint}/health`);
      return res.ok && ((await res.json()) as { health?: string }).health === 'true';
    } catch {
      return false;
    }
  };
  const p = await spawnProc(
    'etcd',
    etcdBinary(),
    singleEtcdArgs('bench', join(dir, 'data'), clientPort, peerPort),
    { probe: healthy, readyTimeoutMs: 20_000 },
  );
  return Object.assign(p, { endpoint });
}

export interface TorusdSpec {
  readonly etcd: string;
  readonly dataDir: string;
  readonly size: string;
  readonly peerPort: number;
  readonly httpPort: number;
}

export async function newTorusdSpec(etcd: string, dataDir: string, size: string): Promise<TorusdSpec> {
  return { etcd, dataDir, size, peerPort: await freePort(), httpPort: await freePort() };
}

/** How the bench's processes protect peer RPC: TLS with a CA made for the run (as deployed), or plaintext (--insecure-peer-network), to measure what TLS costs. */
export type PeerRpcMode = 'tls' | 'plain';
let peerRpc: PeerRpcMode = 'tls';
export function setPeerRpc(mode: PeerRpcMode): void {
  peerRpc = mode;
}

/** The in-process client's peer security, as the bench's processes have it. */
export async function peerSecurity(): Promise<PeerSecurity> {
  return peerRpc === 'plain' ? { mode: 'insecure' } : clientSecurity();
}

/** A process's peer credential: a node's own certificates (naming its uuid), or the client's. */
async function credential(dataDir?: string): Promise<string[]> {
  if (peerRpc === 'plain') return ['--insecure-peer-network'];
  return ['--tls-certificates', dataDir !== undefined ? await nodeCertDir(dataDir) : (await testCerts()).clientDir];
}

/** A storage node; `nodeArgs` go to node itself (e.g. --cpu-prof). Same spec = same node. */
export async function startTorusd(name: string, spec: TorusdSpec, nodeArgs: string[] = [], extra: string[] = []): Promise<Proc> {
  return spawnProc(
    name,
    process.execPath,
    [
      ...nodeArgs,
      BIN('torusd'),
      ...(await credential(spec.dataDir)),
      '-C', spec.etcd,
      '--peer-address', `http://127.0.0.1:${spec.peerPort}`,
      '--data-dir', spec.dataDir,
      '--size', spec.size,
      '--host', '127.0.0.1',
      '--port', String(spec.httpPort),
      ...extra,
    ],
    { ready: /torusd started/, readyTimeoutMs: 30_000 },
  );
}

export interface NbdserveSpec {
  readonly etcd: string;
  readonly port: number;
  readonly readCacheSize: string;
  readonly writeCacheSize?: string;
}

export async function startNbdserve(spec: NbdserveSpec, nodeArgs: string[] = []): Promise<Proc> {
  return spawnProc(
    'nbdserve',
    process.execPath,
    [
      ...nodeArgs,
      BIN('torusblk'),
      ...(await credential()),
      '-C', spec.etcd,
      '--read-cache-size', spec.readCacheSize,
      'nbdserve',
      '--listen', `127.0.0.1:${spec.port}`,
      ...(spec.writeCacheSize ? ['--write-cache-size', spec.writeCacheSize] : []),
    ],
    { ready: /serving NBD on/, readyTimeoutMs: 30_000 },
  );
}

/** nbdkit's file plugin on loopback: the single-disk, no-replication ceiling. */
export function startNbdkit(file: string, port: number): Promise<Proc> {
  return spawnProc('nbdkit', 'nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), 'file', file], {
    probe: () => tcpOpen(port),
    readyTimeoutMs: 20_000,
  });
}
