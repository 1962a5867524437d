import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { singleEtcdArgs } from '../../scripts/lib/etcd.js';

// A real etcd (Debian's etcd-server, v3 API) on free loopback ports in a temporary directory.
// Tests start one per file and stop it with SIGKILL: a SIGTERM'd single-node leader can take
// seconds to step down, and nothing in a test's etcd needs to survive.

export interface EtcdHandle {
  readonly endpoint: string; // host:port
  readonly dataDir: string;
  readonly proc: ChildProcess;
  stop(): Promise<void>;
  /** SIGKILL and restart on the same data dir and ports (etcd down, then back). */
  kill(): Promise<void>;
  restart(): Promise<void>;
}

export async function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, host, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

export function etcdBinary(): string {
  for (const p of [process.env['ETCD_BIN'], '/usr/bin/etcd', '/usr/local/bin/etcd']) if (p && existsSync(p)) return p;
  throw new Error('etcd not found: install Debian package etcd-server (bash .ci/run does)');
}

export async function waitHealthy(endpoint: string, proc: ChildProcess, log: () => string): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline) {
    if (proc.exitCode !== null) throw new Error(`etcd exited with ${proc.exitCode}:\n${log()}`);
    try {
      const res = await fetch(`http://${endpoint}/health`);
      if (res.ok) {
        const body = (await res.json()) as { health?: string };
        if (body.health === 'true') return;
      }
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`etcd did not become healthy:\n${log()}`);
}

/** An etcd process whose last output is kept; `closed` resolves once that output has all arrived. */
export interface EtcdProc {
  readonly proc: ChildProcess;
  readonly closed: Promise<void>;
  output(): string;
}

export function spawnEtcd(args: string[]): EtcdProc {
  const proc = spawn(etcdBinary(), args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  const keep = (d: Buffer): void => {
    output = (output + d.toString()).slice(-8000);
  };
  proc.stdout?.on('data', keep);
  proc.stderr?.on('data', keep);
  return { proc, closed: new Promise((r) => proc.once('close', () => r())), output: () => output };
}

/** SIGKILL, and wait for the exit. */
export async function killProc(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return;
  const gone = new Promise((r) => p.once('exit', r));
  p.kill('SIGKILL');
  await gone;
}

export async function startEtcd(): Promise<EtcdHandle> {
  // tmpfs where available: etcd fsyncs every write, and test metadata need not survive a reboot.
  const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const dataDir = mkdtempSync(join(base, 'torus-etcd-'));
  let endpoint = '';
  let args: string[] = [];
  let last: EtcdProc | undefined;
  const output = (): string => last?.output() ?? '';
  const launch = (): ChildProcess => {
    last = spawnEtcd(args);
    return last.proc;
  };
  // A port found free can be taken by a test running alongside before etcd binds it: try others.
  const startOnFreePorts = async (attempt: number): Promise<ChildProcess> => {
    const clientPort = await freePort();
    const peerPort = await freePort();
    endpoint = `127.0.0.1:${clientPort}`;
    args = singleEtcdArgs('test', join(dataDir, 'data'), clientPort, peerPort);
    const p = launch();
    const started = last!;
    try {
      await waitHealthy(endpoint, p, output);
      return p;
    } catch (err) {
      await killProc(p);
      await started.closed;
      // Its last words may have arrived after the error was worded: word it again with them.
      if (attempt >= 3 || !started.output().includes('address already in use')) throw new Error(`${(err as Error).message.split('\n')[0]}\n${started.output()}`);
      rmSync(join(dataDir, 'data'), { recursive: true, force: true });
      return startOnFreePorts(attempt + 1);
    }
  };
  let proc = await startOnFreePorts(1);
  const handle: EtcdHandle = {
    endpoint,
    dataDir,
    get proc() {
      return proc;
    },
    async stop() {
      await killProc(proc);
      rmSync(dataDir, { recursive: true, force: true });
    },
    async kill() {
      await killProc(proc);
    },
    async restart() {
      await killProc(proc);
      proc = launch();
      await waitHealthy(endpoint, proc, output);
    },
  };
  return handle;
}
