import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import net from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { TestClient } from '../../src/nbd/testing.js';

// Running real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-img/qemu-io, fio) against our server
// in a child process. Every external command runs under coreutils `timeout`, so a client that
// hangs on a server bug fails its test instead of the whole run.

const HERE = dirname(fileURLToPath(import.meta.url));
/** The compiled server script next to this file, in whichever output directory the build used. */
export const MEMORY_SERVER_SCRIPT = join(HERE, 'nbd-memory-server.js');

export interface RunResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

export function have(binary: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${binary}`], { stdio: 'ignore' }).status === 0;
}

/** Runs `cmd args` under `timeout -k 5 <seconds>`; never rejects for a nonzero exit (124 = timed out). */
export function run(cmd: string, args: string[], opts: { timeoutSec?: number; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const p = spawn('timeout', ['-k', '5', String(opts.timeoutSec ?? 60), cmd, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ...opts.env },
    });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    p.on('error', reject);
    p.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

/** Like run, but a nonzero exit is an error carrying the output. */
export async function ok(cmd: string, args: string[], opts: { timeoutSec?: number } = {}): Promise<string> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}${r.code === 124 ? ' (timed out)' : ''}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r.stdout;
}

export async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest('hex');
}

export interface NbdServerProcess {
  readonly proc: ChildProcess;
  readonly port: number;
  readonly unix: string | undefined;
  readonly log: () => string;
  /** nbd://127.0.0.1:PORT/NAME */
  uri(name: string): string;
  /** nbd+unix:///NAME?socket=PATH */
  unixUri(name: string): string;
  /** SIGTERM, then the exit code (SIGKILL after 10 s). */
  stop(): Promise<number | null>;
}

/** Starts test/helpers/nbd-memory-server.js with these arguments and waits for its address. */
export async function startMemoryServer(args: string[], script = MEMORY_SERVER_SCRIPT): Promise<NbdServerProcess> {
  const proc = spawn(process.execPath, [script, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  proc.stderr?.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((r) => proc.on('exit', (code) => r(code)));
  const addr = await new Promise<{ port: number; unix?: string }>((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`nbd memory server did not start:\n${err}`));
    }, 20_000);
    proc.stdout?.on('data', (d: Buffer) => {
      out += d.toString();
      const nl = out.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        resolve(JSON.parse(out.slice(0, nl)) as { port: number; unix?: string });
      }
    });
    proc.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`nbd memory server exited ${code}:\n${err}`));
    });
  });
  return {
    proc,
    port: addr.port,
    unix: addr.unix,
    log: () => err,
    uri: (name) => `nbd://127.0.0.1:${addr.port}/${name}`,
    unixUri: (name) => `nbd+unix:///${name}?socket=${addr.unix ?? ''}`,
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), 10_000);
      const code = await exited;
      clearTimeout(t);
      return code;
    },
  };
}

/** Our codec-based test client over a real TCP connection, for sending what no real client would. */
export function rawClient(port: number): Promise<TestClient> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: '127.0.0.1', port, noDelay: true }, () => {
      s.off('error', reject);
      resolve(new TestClient(s));
    });
    s.once('error', reject);
  });
}
