import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort } from './etcd.js';
import { nodeCertDir, testCerts } from './certs.js';

// Real processes for integration tests: the CLIs as a user runs them (bin/*.js), and torusd
// daemons on free loopback ports with their own data dirs.

/** Flags that give torusd its peer credential; without one the helper issues it a certificate. */
export const PEER_CREDENTIAL_FLAGS = ['--tls-certificates', '--peer-secret-file', '--insecure-peer-network'];

// Every CLI a test runs finds the test CA's client certificates in TORUS_TLS_CERTIFICATES.
await testCerts();

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
export const BIN = (name: string): string => join(REPO, 'bin', `${name}.js`);

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export async function runCli(
  name: 'torusctl' | 'torusd' | 'torusblk',
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; input?: string; timeoutMs?: number } = {},
): Promise<CliResult> {
  return new Promise((res, rej) => {
    const p = spawn(process.execPath, [BIN(name), ...args], { env: { ...process.env, ...opts.env }, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      p.kill('SIGKILL');
      rej(new Error(`${name} ${args.join(' ')} timed out\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, opts.timeoutMs ?? 30_000);
    p.on('error', rej);
    p.on('close', (code) => {
      clearTimeout(timer);
      res({ code: code ?? -1, stdout, stderr });
    });
    p.stdin.end(opts.input ?? '');
  });
}

/** Runs a CLI and insists on success, returning stdout. */
export async function ok(name: 'torusctl' | 'torusblk', args: string[], env?: NodeJS.ProcessEnv): Promise<string> {
  const r = await runCli(name, args, env ? { env } : {});
  if (r.code !== 0) throw new Error(`${name} ${args.join(' ')} exited ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r.stdout;
}

export interface Torusd {
  readonly proc: ChildProcess;
  readonly dataDir: string;
  readonly peerPort: number;
  readonly httpPort: number;
  readonly address: string;
  readonly log: () => string;
  /** Resolves when the process has exited. */
  readonly exited: Promise<number | null>;
  kill(signal?: NodeJS.Signals): Promise<number | null>;
}

export interface TorusdOptions {
  readonly dataDir?: string;
  readonly size?: string;
  readonly extra?: string[];
  readonly peerPort?: number;
  readonly httpPort?: number;
  readonly waitReady?: boolean;
  /** Arguments for node itself, before the script (a preload, say). */
  readonly nodeArgs?: string[];
  /** Added to the test's environment. */
  readonly env?: NodeJS.ProcessEnv;
}

export async function startTorusd(
  etcd: string,
  opts: TorusdOptions = {},
): Promise<Torusd> {
  const dataDir = opts.dataDir ?? mkdtempSync(join(tmpdir(), 'torusd-'));
  // A port found free can be taken by a test running alongside before torusd binds it; when the
  // ports were ours to choose, choose again.
  for (let attempt = 1; ; attempt++) {
    try {
      return await launchTorusd(etcd, dataDir, opts);
    } catch (err) {
      const chosen = opts.peerPort === undefined && opts.httpPort === undefined;
      if (!chosen || attempt >= 3 || !/EADDRINUSE/.test((err as Error).message)) throw err;
    }
  }
}

async function launchTorusd(
  etcd: string,
  dataDir: string,
  opts: TorusdOptions,
): Promise<Torusd> {
  const peerPort = opts.peerPort ?? (await freePort());
  const httpPort = opts.httpPort ?? (await freePort());
  const address = `http://127.0.0.1:${peerPort}`;
  const credential = (opts.extra ?? []).some((a) => PEER_CREDENTIAL_FLAGS.includes(a)) ? [] : ['--tls-certificates', await nodeCertDir(dataDir)];
  const args = [
    ...credential,
    '-C', etcd,
    '--peer-address', address,
    '--data-dir', dataDir,
    '--size', opts.size ?? '64MiB',
    '--host', '127.0.0.1',
    '--port', String(httpPort),
    '--heartbeat', '1s',
    ...(opts.extra ?? []),
  ];
  const proc = spawn(process.execPath, [...(opts.nodeArgs ?? []), BIN('torusd'), ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: opts.env ? { ...process.env, ...opts.env } : process.env,
  });
  let out = '';
  proc.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  proc.stderr?.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((r) => proc.on('exit', (code) => r(code)));
  const closed = new Promise<void>((r) => proc.once('close', () => r()));
  const t: Torusd = {
    proc,
    dataDir,
    peerPort,
    httpPort,
    address,
    log: () => out,
    exited,
    async kill(signal: NodeJS.Signals = 'SIGKILL') {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return exited;
    },
  };
  if (opts.waitReady !== false) {
    const deadline = Date.now() + 20_000;
    while (!out.includes('torusd started')) {
      if (proc.exitCode !== null) {
        // Its last words (why it exited) may still be in the pipe.
        await closed;
        throw new Error(`torusd exited ${proc.exitCode}:\n${out}`);
      }
      if (Date.now() > deadline) {
        proc.kill('SIGKILL');
        throw new Error(`torusd did not start:\n${out}`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return t;
}

/**
 * Resolves with what `p` has printed (stdout and stderr, from the call on) once that matches
 * `pattern`. Rejects, with that output in the message, if `p` exits first or `ms` pass; `what`
 * names the process there. Stops listening either way.
 */
export function waitForOutput(p: ChildProcess, pattern: RegExp, what: string, ms = 30_000): Promise<string> {
  return new Promise((resolve, reject) => {
    let seen = '';
    const onData = (d: Buffer): void => {
      seen += d.toString();
      if (pattern.test(seen)) done(undefined);
    };
    const onExit = (): void => done(new Error(`${what} exited before it was ready:\n${seen}`));
    const timer = setTimeout(() => done(new Error(`${what} was not ready within ${ms} ms:\n${seen}`)), ms);
    const done = (err: Error | undefined): void => {
      clearTimeout(timer);
      p.stdout?.off('data', onData);
      p.stderr?.off('data', onData);
      p.off('exit', onExit);
      if (err) reject(err);
      else resolve(seen);
    };
    p.stdout?.on('data', onData);
    p.stderr?.on('data', onData);
    p.once('exit', onExit);
  });
}

/** A running `torusblk nbdserve`: its port, and everything it has printed so far. */
export interface Nbdserve {
  readonly proc: ChildProcess;
  readonly port: number;
  out(): string;
}

/**
 * Starts `torusblk nbdserve --listen 127.0.0.1:PORT` on a free port, with `connect` (the -C and
 * credential flags) and `args`, and resolves once it serves; rejects with its output if it exits
 * first.
 */
export async function startNbdserve(connect: readonly string[], args: readonly string[] = []): Promise<Nbdserve> {
  const port = await freePort();
  const proc = spawn(process.execPath, [BIN('torusblk'), ...connect, 'nbdserve', '--listen', `127.0.0.1:${port}`, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  await eventually('nbdserve listening', async () => out.includes('serving NBD on') || (proc.exitCode !== null ? Promise.reject(new Error(out)) : false));
  return { proc, port, out: () => out };
}

/**
 * Sends `signal` to `p` unless it has already exited, SIGKILLs it if it is still running
 * `killAfterMs` later, and resolves with its exit code (null when a signal ended it, as the
 * SIGKILL does).
 */
export async function stopProcess(p: ChildProcess, signal: NodeJS.Signals = 'SIGTERM', killAfterMs = 15_000): Promise<number | null> {
  if (p.exitCode !== null || p.signalCode !== null) return p.exitCode;
  const gone = new Promise<number | null>((r) => p.once('exit', (code) => r(code)));
  p.kill(signal);
  const timer = setTimeout(() => p.kill('SIGKILL'), killAfterMs);
  const code = await gone;
  clearTimeout(timer);
  return code;
}

export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

export async function eventually<T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined && v !== false) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

