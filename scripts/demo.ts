// `npm run demo`: a whole Torus cluster on this machine's loopback, for trying it out. A real etcd,
// three storage nodes at replication 2, one volume, served over NBD by the first storage node
// (torusd --nbd-listen; `--nbd-on-client` serves it from a separate torusblk nbdserve instead, as a
// client host would). Everything lives under one directory, reused on the next run; `--clean`
// starts over. Ctrl-C stops it all cleanly.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { parseSize } from '../src/core/units.js';
import { portFree, usageExits } from './lib/cli.js';
import { singleEtcdArgs } from './lib/etcd.js';
import { checkVolumeName } from '../src/volume/records.js';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const bin = (name: string): string => join(ROOT, 'bin', `${name}.js`);

// A bad argument: one line and exit status 2, before anything is started.
const { usage, orUsage } = usageExits('demo', ' (npm run demo -- --help)');

const { values: opts } = orUsage(() => parseArgs({
  options: {
    dir: { type: 'string', default: join(homedir(), '.torus-demo') },
    clean: { type: 'boolean', default: false },
    'etcd-port': { type: 'string', default: '2379' },
    'nbd-port': { type: 'string', default: '10809' },
    'peer-port': { type: 'string', default: '40000' },
    'http-port': { type: 'string', default: '41000' },
    volume: { type: 'string', default: 'demo' },
    'volume-size': { type: 'string', default: '1GiB' },
    'node-size': { type: 'string', default: '4GiB' },
    'nbd-on-client': { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false },
  },
}));

if (opts.help) {
  process.stdout.write(
    'npm run demo [-- --clean] [--dir DIR] [--etcd-port N] [--nbd-port N] [--peer-port N] [--http-port N] [--volume NAME] [--volume-size S] [--node-size S] [--nbd-on-client]\n' +
      '  NBD is served by storage node 1 (torusd --nbd-listen); --nbd-on-client serves it from a torusblk nbdserve process instead.\n',
  );
  process.exit(0);
}

const dir = resolve(opts.dir);
const etcdPort = Number(opts['etcd-port']);
const nbdPort = Number(opts['nbd-port']);
const peerBase = Number(opts['peer-port']);
const httpBase = Number(opts['http-port']);
// etcd also takes the port after its client port (for peers); the nodes take three in a row.
for (const [flag, span] of [['etcd-port', 2], ['nbd-port', 1], ['peer-port', 3], ['http-port', 3]] as const) {
  const port = Number(opts[flag]);
  if (!Number.isInteger(port) || port < 1 || port + span - 1 > 65535) usage(`--${flag} ${opts[flag]}: not a port number (1-${65536 - span})`);
}
orUsage(() => checkVolumeName(opts.volume));
for (const flag of ['volume-size', 'node-size'] as const) orUsage(() => parseSize(opts[flag]));
const endpoint = `127.0.0.1:${etcdPort}`;
// Everything runs on loopback, one machine: peer RPC in plaintext, said so below. A real cluster
// uses certificates (docs/security.md).
const C = `${etcdPort === 2379 ? '' : ` -C ${endpoint}`} --insecure-peer-network`;
const DEMO_ENV = { ...process.env, TORUS_TLS_CERTIFICATES: '', TORUS_PEER_SECRET_FILE: '', TORUS_INSECURE_PEER_NETWORK: '1' };
const NODES = 3;

const onClient = opts['nbd-on-client'];
/** The process that serves NBD, and whose log says when it does. */
const nbdServer = onClient ? 'nbdserve' : 'torusd-1';

const children: { name: string; proc: ChildProcess; log: string }[] = [];
let stopping = false;

function say(line: string): void {
  process.stdout.write(`${line}\n`);
}

function fail(msg: string): never {
  process.stderr.write(`demo: ${msg}\n`);
  void stopAll(1);
  throw new Error(msg);
}

function tail(file: string): string {
  try {
    return readFileSync(file, 'utf8').trim().split('\n').slice(-15).join('\n');
  } catch {
    return '';
  }
}

function start(name: string, cmd: string, args: string[]): ChildProcess {
  const log = join(dir, 'logs', `${name}.log`);
  // Each run's logs start empty, before anything reads them: readiness is read from them.
  writeFileSync(log, '');
  const out = createWriteStream(log, { flags: 'a' });
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: DEMO_ENV });
  // Two sources into one file: neither may end it, or the other's last words (often the reason
  // it died) are lost; the file is ended once both pipes are closed.
  proc.stdout?.pipe(out, { end: false });
  proc.stderr?.pipe(out, { end: false });
  children.push({ name, proc, log });
  proc.once('close', (code, signal) => {
    out.end();
    if (stopping) return;
    // Read the log only once everything the process wrote has reached it.
    out.once('finish', () => {
      if (stopping) return;
      process.stderr.write(`demo: ${name} exited unexpectedly (${signal ?? `status ${code}`}); its log ${log} ends with:\n${tail(log)}\n`);
      void stopAll(1);
    });
  });
  return proc;
}

function cli(name: 'torusctl' | 'torusblk', args: string[]): { code: number; out: string } {
  const r = spawnSync(process.execPath, [bin(name), '-C', endpoint, ...args], { encoding: 'utf8', timeout: 60_000, env: DEMO_ENV });
  return { code: r.status ?? 1, out: `${r.stdout ?? ''}${r.stderr ?? ''}`.trim() };
}

function mustCli(name: 'torusctl' | 'torusblk', args: string[]): string {
  const r = cli(name, args);
  if (r.code !== 0) fail(`${name} ${args.join(' ')}: ${r.out}`);
  return r.out;
}

async function until(what: string, check: () => boolean | Promise<boolean>, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (stopping) throw new Error('stopping');
    if (Date.now() > deadline) fail(`${what} did not happen within ${ms / 1000} s (logs in ${join(dir, 'logs')})`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function stopAll(code: number): Promise<void> {
  if (stopping) return;
  stopping = true;
  // The NBD server first (it syncs the volume through the nodes), then the nodes, then etcd.
  const order = [...children].reverse().sort((a, b) => Number(b.name === nbdServer) - Number(a.name === nbdServer));
  for (const c of order) {
    if (c.proc.exitCode !== null || c.proc.signalCode !== null) continue;
    const gone = new Promise((r) => c.proc.once('exit', r));
    // etcd fsyncs its log on every commit, so SIGKILL loses nothing; a SIGTERM'd leader can hang.
    c.proc.kill(c.name === 'etcd' ? 'SIGKILL' : 'SIGTERM');
    const t = setTimeout(() => c.proc.kill('SIGKILL'), 20_000);
    await gone;
    clearTimeout(t);
  }
  if (code === 0) say(`\nStopped. The cluster's data stays in ${dir}: \`npm run demo\` starts it again, \`npm run demo -- --clean\` starts over.`);
  process.exit(code);
}

async function main(): Promise<void> {
  if (spawnSync('sh', ['-c', 'command -v etcd']).status !== 0 && !existsSync('/usr/bin/etcd'))
    fail('etcd is not installed (apt-get install etcd-server; `npm run demo` does it for you)');
  if (opts.clean && existsSync(dir)) {
    rmSync(dir, { recursive: true, force: true });
    say(`Removed ${dir}.`);
  }
  const fresh = !existsSync(join(dir, 'etcd'));
  mkdirSync(join(dir, 'logs'), { recursive: true });
  for (const [what, port] of [
    ['etcd', etcdPort],
    ['etcd peer', etcdPort + 1],
    ['NBD', nbdPort],
    ...Array.from({ length: NODES }, (_, i) => [`node ${i + 1} peer`, peerBase + i] as const),
    ...Array.from({ length: NODES }, (_, i) => [`node ${i + 1} HTTP`, httpBase + i] as const),
  ] as const) {
    if (!(await portFree(port))) fail(`port ${port} (${what}) is in use on 127.0.0.1: is a demo already running? (other ports: --etcd-port, --nbd-port, --peer-port, --http-port)`);
  }
  process.on('SIGINT', () => void stopAll(0));
  process.on('SIGTERM', () => void stopAll(0));

  say(`${fresh ? 'Starting a new' : 'Restarting the'} demo cluster in ${dir} (logs in ${join(dir, 'logs')}).`);
  start('etcd', 'etcd', singleEtcdArgs('demo', join(dir, 'etcd'), etcdPort, etcdPort + 1));
  await until('etcd answering', () => {
    const r = cli('torusctl', ['init', '--view']);
    return r.code === 0 || /not initialized/i.test(r.out);
  });
  if (cli('torusctl', ['init', '--view']).code !== 0) say(mustCli('torusctl', ['init', '--replication', '2']));
  for (let i = 0; i < NODES; i++) {
    start(`torusd-${i + 1}`, process.execPath, [
      bin('torusd'), '-C', endpoint, '--peer-address', `http://127.0.0.1:${peerBase + i}`, '--data-dir', join(dir, `node${i + 1}`),
      '--size', opts['node-size'], '--host', '127.0.0.1', '--port', String(httpBase + i),
      ...(`torusd-${i + 1}` === nbdServer ? ['--nbd-listen', `127.0.0.1:${nbdPort}`] : []),
    ]);
  }
  interface PeerJson { member: string }
  await until('three storage nodes reporting in', () => {
    const r = cli('torusctl', ['list-peers', '--json']);
    return r.code === 0 && (JSON.parse(r.out) as PeerJson[]).filter((p) => p.member !== 'DOWN').length >= NODES;
  });
  const peers = JSON.parse(mustCli('torusctl', ['list-peers', '--json'])) as PeerJson[];
  if (peers.some((p) => p.member === 'Avail')) say(mustCli('torusctl', ['peer', 'add', '--all-peers']));
  const vols = JSON.parse(mustCli('torusctl', ['volume', 'list', '--json'])) as { name: string }[];
  if (!vols.some((v) => v.name === opts.volume)) say(mustCli('torusctl', ['volume', 'create-block', opts.volume, opts['volume-size']]));
  if (onClient) start('nbdserve', process.execPath, [bin('torusblk'), '-C', endpoint, 'nbdserve', '--listen', `127.0.0.1:${nbdPort}`]);
  await until('the NBD server listening', () => readFileSync(join(dir, 'logs', `${nbdServer}.log`), 'utf8').includes('serving NBD'));
  // Each node publishes the ring version of its last pass over its blocks; until all have passed
  // on the current ring, list-peers says "Balanced: false". Give them a moment, but go on anyway.
  for (const deadline = Date.now() + 30_000; Date.now() < deadline && !stopping; ) {
    const r = cli('torusctl', ['rebalance', 'status', '--json']);
    let rebalancing = true;
    try {
      rebalancing = r.code !== 0 || (JSON.parse(r.out) as { rebalancing: boolean }).rebalancing;
    } catch {
      // not JSON (an error message): look again
    }
    if (!rebalancing) break;
    await new Promise((res) => setTimeout(res, 200));
  }
  say('');
  say(mustCli('torusctl', ['list-peers']));
  const uri = `nbd://127.0.0.1:${nbdPort}/${opts.volume}`;
  say(`
Torus is running: etcd on ${endpoint}, three storage nodes (replication 2), and volume "${opts.volume}"
served over NBD at ${uri}${
    onClient
      ? ' by torusblk nbdserve, a client of the nodes.'
      : ` by storage node 1
(torusd --nbd-listen), which reads its own replicas from its disk. If that node stops, the export
stops with it; the data stays on the other replicas (--nbd-on-client serves it from a client instead).`
  }
Peer RPC between them is plaintext (--insecure-peer-network): fine on loopback, never on a shared
network; docs/security.md sets up certificates.
Dashboard: http://127.0.0.1:${httpBase}/ (each node serves one: ${Array.from({ length: NODES }, (_, i) => `http://127.0.0.1:${httpBase + i}/`).join(', ')});
Prometheus metrics at /metrics, health at /healthz on the same addresses.
In another terminal, from this directory:

  nbdinfo ${uri}                              # what the server offers
  qemu-img info ${uri}
  qemu-io -f raw -t writeback -c 'write -P 7 0 1M' -c 'read -P 7 0 1M' ${uri}

  # a file system without kernel NBD: nbdfuse exposes the volume as a file, a loop device mounts it
  mkdir -p /tmp/torus-fuse /mnt/torus && nbdfuse /tmp/torus-fuse/${opts.volume} ${uri} &
  dev=$(losetup -f --show /tmp/torus-fuse/${opts.volume}) && mkfs.ext4 -q $dev && mount $dev /mnt/torus
  # ... and later: umount /mnt/torus; losetup -d $dev; umount /tmp/torus-fuse (as root; else fusermount3 -u, package fuse3)

  # with the kernel's NBD module (stop this demo's NBD server first, or use another volume):
  npx torusctl${C} volume create-block vol2 1GiB
  npx torusblk${C} nbd vol2 /dev/nbd0

  npx torusctl${C} list-peers                         # nodes, usage, membership
  npx torusctl${C} health                             # down peers, under-replicated blocks
  npx torusctl${C} block snapshot create ${opts.volume}@first

Press Ctrl-C to stop everything (the volume is synced first); the data stays in ${dir}.`);
}

main().catch((err: unknown) => {
  if (!stopping) {
    process.stderr.write(`demo: ${(err as Error).message}\n`);
    void stopAll(1);
  }
});
