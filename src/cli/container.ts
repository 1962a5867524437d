import { spawnSync } from 'node:child_process';
import { chownSync, lstatSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Command, Option } from 'commander';
import { TorusError } from '../core/errors.js';
import { reportError } from './shared/run.js';

// The container image's entrypoint: the original image's environment variables (STORAGE_SIZE,
// LISTEN_HOST, LISTEN_HTTP_PORT, LISTEN_PEER_PORT, ETCD_HOST, ...) and every torusd flag as a
// TORUS_* variable (--gc-interval is TORUS_GC_INTERVAL) become torusd's command line; `torusctl`
// and `torusblk` run with the same etcd settings. The programs run in this process: a container
// stops by signalling its first process, and the daemons handle SIGTERM themselves.

/** Variables of the original image that have no meaning here: refused rather than ignored. */
const RETIRED: Readonly<Record<string, string>> = {
  DROP_MOUNT_BIN: 'the FlexVolume plugin is replaced by the CSI driver (torusblk csi; docs/deploy.md)',
  LOG_FLAGS: 'per-package log levels are gone: use TORUS_LOG_LEVEL (debug, info, warn, error) or DEBUG=1',
};

/** TORUS_* variables read by the programs themselves rather than turned into flags. */
const PASSED_THROUGH = new Set(['TORUS_MALLOC_TUNING', 'TORUS_ETCD_PASSWORD']);

/** The flags every program takes for reaching etcd and its peers. */
const CONNECTION_FLAGS = ['--etcd', '--etcd-cert-file', '--etcd-key-file', '--etcd-ca-file', '--etcd-user', '--etcd-password-file', '--etcd-timeout', '--tls-certificates', '--peer-secret-file', '--insecure-peer-network'];

/** Connection flags that take no value. */
const BOOLEAN_FLAGS: ReadonlySet<string> = new Set(['--insecure-peer-network']);

export type Program = 'torusd' | 'torusctl' | 'torusblk';

export interface Invocation {
  readonly program: Program;
  readonly args: string[];
  /** DEBUG_INIT=1: `torusctl init` with these arguments first, unless the cluster exists. */
  readonly initArgs?: string[];
}

function envName(flag: string): string {
  return `TORUS_${flag.replace(/^--/, '').replace(/-/g, '_').toUpperCase()}`;
}

function truthy(name: string, v: string): boolean {
  if (/^(1|true|yes|on)$/i.test(v)) return true;
  if (/^(0|false|no|off|)$/i.test(v)) return false;
  throw new TorusError('INVALID_ARGUMENT', `${name}=${v}: expected 1 or 0 (true or false)`);
}

function port(name: string, v: string): string {
  if (!/^\d{1,5}$/.test(v) || Number(v) < 1 || Number(v) > 65535) throw new TorusError('INVALID_ARGUMENT', `${name}=${v}: expected a port number`);
  return v;
}

/** ETCD_HOST may list several hosts (comma-separated); ETCD_PORT is added to those without one. */
function etcdFromSeed(env: NodeJS.ProcessEnv): string | undefined {
  if (env['ETCD_HOST'] === undefined && env['ETCD_PORT'] === undefined) return undefined;
  const p = port('ETCD_PORT', env['ETCD_PORT'] ?? '2379');
  return (env['ETCD_HOST'] || '127.0.0.1')
    .split(',')
    .map((h) => h.trim())
    .filter(Boolean)
    .map((h) => {
      if (/^\[.*\]:\d+$/.test(h) || /^[^:]+:\d+$/.test(h)) return h; // has its port
      return h.includes(':') ? `[${h.replace(/^\[|\]$/g, '')}]:${p}` : `${h}:${p}`; // a bare IPv6 address is bracketed
    })
    .join(',');
}

/**
 * Flags from the environment for the long options `options` knows: the seed's variables first,
 * then TORUS_*; one setting given both ways is an error, and so is a TORUS_* no option has.
 */
export function flagsFromEnv(env: NodeJS.ProcessEnv, options: readonly Pick<Option, 'long' | 'required' | 'optional'>[], seed: readonly string[]): string[] {
  const byEnv = new Map(options.filter((o) => o.long && o.long !== '--version' && o.long !== '--help').map((o) => [envName(o.long!), o]));
  const out = [...seed];
  const fromSeed = new Set(seed.filter((a) => a.startsWith('--')));
  for (const [name, value] of Object.entries(env)) {
    if (!name.startsWith('TORUS_') || PASSED_THROUGH.has(name) || value === undefined) continue;
    const o = byEnv.get(name);
    if (!o) throw new TorusError('INVALID_ARGUMENT', `${name} is not a setting (known: ${[...byEnv.keys(), ...PASSED_THROUGH].sort().join(', ')})`);
    const flag = o.long!;
    if (fromSeed.has(flag)) throw new TorusError('INVALID_ARGUMENT', `${name} and the variable that also sets ${flag} are both set: keep one`);
    if (o.required || o.optional) out.push(flag, value);
    else if (truthy(name, value)) out.push(flag);
  }
  return out;
}

/**
 * torusd's flags from the seed's variables (the original image's entrypoint.sh): those set, and
 * defaults for what neither they nor a TORUS_* variable set.
 */
function torusdSeed(env: NodeJS.ProcessEnv): { given: string[]; defaults: string[] } {
  const etcd = etcdFromSeed(env);
  // Without LISTEN_HOST a container listens on every address and advertises its own (the first
  // non-loopback IPv4), which is what non-host networking needs; the original bound 127.0.0.1,
  // which no other node can reach.
  const host = env['LISTEN_HOST'] || '0.0.0.0';
  const peer = env['PEER_ADDRESS'] || `http://${host.includes(':') ? `[${host}]` : host}:${port('LISTEN_PEER_PORT', env['LISTEN_PEER_PORT'] ?? '40000')}`;
  const httpPort = port('LISTEN_HTTP_PORT', env['LISTEN_HTTP_PORT'] ?? '4321');
  const set = (name: string): boolean => env[name] !== undefined && env[name] !== '';
  const given: string[] = [
    ...(etcd ? ['--etcd', etcd] : []),
    ...(set('STORAGE_SIZE') ? ['--size', env['STORAGE_SIZE']!] : []),
    ...(set('PEER_ADDRESS') || set('LISTEN_HOST') || set('LISTEN_PEER_PORT') ? ['--peer-address', peer] : []),
    ...(set('LISTEN_HOST') ? ['--host', host] : []),
    ...(set('LISTEN_HTTP_PORT') ? ['--port', httpPort] : []),
    ...(set('AUTO_JOIN') && truthy('AUTO_JOIN', env['AUTO_JOIN']!) ? ['--auto-join'] : []),
    ...(set('DEBUG') && truthy('DEBUG', env['DEBUG']!) ? ['--debug'] : []),
  ];
  return { given, defaults: ['--peer-address', peer, '--host', host, '--port', httpPort, '--data-dir', '/data'] };
}

/** What to run for the container's arguments and environment. */
export function invocation(argv: readonly string[], env: NodeJS.ProcessEnv, programs: Record<Program, Command>): Invocation {
  for (const [name, why] of Object.entries(RETIRED)) if (env[name] !== undefined) throw new TorusError('INVALID_ARGUMENT', `${name} is no longer supported: ${why}`);
  const first = argv[0];
  const program: Program = first === undefined || first.startsWith('-') || first === 'torusd' || first === 'torus' ? 'torusd' : first === 'torusblock' ? 'torusblk' : (first as Program);
  if (!(program in programs)) throw new TorusError('INVALID_ARGUMENT', `unknown command "${first}": expected torusd, torusctl or torusblk (or any other program in the image)`);
  const rest = first === undefined || first.startsWith('-') ? [...argv] : argv.slice(1);
  const cmd = programs[program];
  if (program === 'torusd') {
    const seed = torusdSeed(env);
    const flags = flagsFromEnv(env, cmd.options, seed.given);
    for (let i = 0; i < seed.defaults.length; i += 2) if (!flags.includes(seed.defaults[i]!)) flags.push(seed.defaults[i]!, seed.defaults[i + 1]!);
    const debugInit = env['DEBUG_INIT'] !== undefined && truthy('DEBUG_INIT', env['DEBUG_INIT']);
    const conn = connectionArgs(flags, rest);
    return { program, args: [...flags, ...rest], ...(debugInit ? { initArgs: [...conn, 'init'] } : {}) };
  }
  // torusctl and torusblk: only how to reach etcd comes from the environment.
  const etcd = etcdFromSeed(env);
  const conn = flagsFromEnv(
    Object.fromEntries(Object.entries(env).filter(([k]) => CONNECTION_FLAGS.some((f) => envName(f) === k))),
    cmd.options.filter((o) => CONNECTION_FLAGS.includes(o.long ?? '')),
    etcd ? ['--etcd', etcd] : [],
  );
  // Flags on the command line win over the environment.
  const given = new Set(rest.filter((a) => a.startsWith('-')).map((a) => (a === '-C' ? '--etcd' : a.split('=')[0]!)));
  const keep: string[] = [];
  for (let i = 0; i < conn.length; i++) {
    // A switch (--insecure-peer-network) stands alone; every other flag takes the next word.
    const n = BOOLEAN_FLAGS.has(conn[i]!) ? 1 : 2;
    if (!given.has(conn[i]!)) keep.push(...conn.slice(i, i + n));
    i += n - 1;
  }
  return { program, args: [...keep, ...rest] };
}

/** The connection flags out of a torusd command line, for the `torusctl init` before it. */
function connectionArgs(flags: readonly string[], rest: readonly string[]): string[] {
  const all = [...flags, ...rest];
  const out: string[] = [];
  for (let i = 0; i < all.length; i++) {
    const a = all[i]!;
    const name = a === '-C' ? '--etcd' : a.split('=')[0]!;
    if (!CONNECTION_FLAGS.includes(name)) continue;
    if (a.includes('=') || BOOLEAN_FLAGS.has(name)) out.push(a);
    else if (i + 1 < all.length) out.push(name, all[++i]!);
  }
  return out;
}

// ---- running it ----

const TORUS_USER = 'torus';

function userIds(name: string): { uid: number; gid: number } | undefined {
  try {
    for (const line of readFileSync('/etc/passwd', 'utf8').split('\n')) {
      const f = line.split(':');
      if (f[0] === name) return { uid: Number(f[2]), gid: Number(f[3]) };
    }
  } catch {
    // no passwd file: stay who we are
  }
  return undefined;
}

/** Hands the data dir (and what an earlier root run left in it) to the unprivileged user. */
function chownTree(path: string, uid: number, gid: number): void {
  const st = lstatSync(path);
  if (st.uid !== uid || st.gid !== gid) chownSync(path, uid, gid);
  if (st.isDirectory()) for (const e of readdirSync(path)) chownTree(join(path, e), uid, gid);
}

function dataDirOf(args: readonly string[]): string {
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '--data-dir') return args[i + 1] ?? '/data';
    if (args[i]!.startsWith('--data-dir=')) return args[i]!.slice('--data-dir='.length);
  }
  return 'torus-data';
}

/**
 * torusd needs no privilege: started as root (as `docker run` does), it makes the data dir its
 * user's and drops to that user. torusblk (NBD, loop devices, FUSE, AoE's raw sockets, the CSI
 * node plugin's mounts) and torusctl stay as they were started.
 */
function dropPrivileges(args: readonly string[]): void {
  if (process.getuid?.() !== 0) return;
  const ids = userIds(TORUS_USER);
  if (!ids) return;
  const dir = dataDirOf(args);
  mkdirSync(dir, { recursive: true });
  chownTree(dir, ids.uid, ids.gid);
  process.setgroups!([ids.gid]);
  process.setgid!(ids.gid);
  process.setuid!(ids.uid);
}

function runInit(initArgs: readonly string[]): void {
  const bin = fileURLToPath(new URL('../../../bin/torusctl.js', import.meta.url));
  // etcd may still be starting (compose, a fresh pod): retry for a minute.
  for (let i = 0; ; i++) {
    const r = spawnSync(process.execPath, [bin, ...initArgs], { stdio: ['ignore', 'inherit', 'pipe'], encoding: 'utf8' });
    if (r.status === 0) return;
    if (r.status === 5) return; // already initialized
    if (r.status !== 3 || i >= 30) {
      process.stderr.write(r.stderr ?? '');
      throw new TorusError('INVALID_ARGUMENT', `DEBUG_INIT: torusctl init failed (exit ${r.status})`);
    }
    spawnSync('sleep', ['2']);
  }
}

export async function main(argv: string[]): Promise<void> {
  const [{ buildProgram: torusd, main: torusdMain }, { buildProgram: torusctl, main: torusctlMain }, { buildProgram: torusblk, main: torusblkMain }] = await Promise.all([
    import('./torusd.js'),
    import('./torusctl.js'),
    import('./torusblk.js'),
  ]);
  let inv: Invocation;
  try {
    inv = invocation(argv, process.env, { torusd: torusd(), torusctl: torusctl(), torusblk: torusblk() });
    if (inv.initArgs) runInit(inv.initArgs);
    if (inv.program === 'torusd') dropPrivileges(inv.args);
  } catch (err) {
    process.exit(reportError('torus-container', err, process.env['DEBUG'] === '1'));
  }
  process.title = inv.program;
  ({ torusd: torusdMain, torusctl: torusctlMain, torusblk: torusblkMain })[inv.program](inv.args);
}
