import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { etcdBinary } from './etcd.js';
import { createLab, type Lab } from './netns.js';
import { BIN, type CliResult } from './procs.js';
import { AUTO_COMPACTION } from '../../scripts/lib/etcd.js';
import { nodeCertDir } from './certs.js';

// A Torus cluster spread over network namespaces with IPv4 addresses: etcd, every storage node,
// the client (a workload process) and an admin host (torusctl, probes) each live in a namespace
// of their own, with one veth into a bridge, on 10.0.9.0/24. No default route, IPv6 off, nothing
// reachable from the root namespace. nftables rules inside one host's namespace then cut exactly
// that host off (a partition between peers), or only its traffic to etcd, which a loopback
// cluster cannot show.
//
// Every process runs under `ip netns exec`; stop() kills them and deletes the namespaces, and the
// lab does the same if the process exits early.

const HERE = dirname(fileURLToPath(import.meta.url));
/** The compiled workload and probe scripts (dist/test/helpers). */
export const WORKLOAD = join(HERE, 'workload.js');
export const PROBE = join(HERE, 'cluster-probe.js');

export const SUBNET = '10.0.9';
const ETCD_IP = `${SUBNET}.10`;
const CLIENT_IP = `${SUBNET}.20`;
const ADMIN_IP = `${SUBNET}.21`;
const nodeIp = (i: number): string => `${SUBNET}.${11 + i}`;
/** The nftables table our rules live in; deleting it heals. */
const TABLE = 'torus_fault';

export interface IpHost {
  readonly name: string;
  readonly ns: string;
  readonly ip: string;
}

export interface IpNode {
  readonly index: number;
  readonly host: IpHost;
  /** As advertised: http://10.0.9.X:40000. */
  readonly address: string;
  readonly dataDir: string;
  readonly uuid: string;
  proc: ChildProcess;
  log(): string;
}

export interface IpCluster {
  readonly lab: Lab;
  readonly etcd: IpHost & { readonly endpoint: string };
  readonly client: IpHost;
  readonly admin: IpHost;
  readonly nodes: IpNode[];
  /** A command in a namespace, asynchronously, killed after `timeoutMs`. */
  exec(host: IpHost, cmd: string, args: readonly string[], timeoutMs?: number): Promise<CliResult>;
  /** torusctl in the admin namespace against the cluster's etcd. */
  ctl(args: readonly string[], timeoutMs?: number): Promise<CliResult>;
  /** Same; throws with its output unless it exits 0. */
  ctlOk(args: readonly string[], timeoutMs?: number): Promise<string>;
  /** The probe script (cluster-probe.ts) in a namespace (admin by default); its JSON answer. */
  probe<T>(args: readonly string[], host?: IpHost, timeoutMs?: number): Promise<T>;
  /** A long-running node script in a namespace; stop() kills it if still running. */
  startScript(host: IpHost, script: string, args: readonly string[]): ChildProcess;
  /** Drops everything in and out of the host except loopback. */
  cut(host: IpHost): void;
  /** Drops the host's traffic to and from one address only. */
  cutFrom(host: IpHost, ip: string): void;
  /** Deletes the host's fault rules. */
  heal(host: IpHost): void;
  /** SIGKILLs node i's torusd. */
  kill(i: number): Promise<void>;
  /** Starts node i again on its data dir and address. */
  restart(i: number): Promise<void>;
  stop(): Promise<void>;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function ipMust(args: readonly string[]): void {
  const r = spawnSync('timeout', ['20', 'ip', ...args], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`ip ${args.join(' ')} failed: ${r.stdout}${r.stderr}`);
}

function nft(ns: string, script: string): void {
  const r = spawnSync('timeout', ['20', 'ip', 'netns', 'exec', ns, 'nft', '-f', '-'], { input: script, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`nft in ${ns} failed (${r.status}): ${r.stdout}${r.stderr}\n${script}`);
}

/** Why this cannot run here (not root, no namespaces, no nft), or undefined. */
export function ipClusterUnavailable(netnsWhy: string | undefined): string | undefined {
  if (netnsWhy) return netnsWhy;
  if (spawnSync('sh', ['-c', 'command -v nft']).status !== 0) return 'nft is not installed (Debian package nftables)';
  return undefined;
}

function waitOutput(p: ChildProcess, pattern: RegExp, what: string, ms: number, seen: () => string): Promise<void> {
  return new Promise((resolve, reject) => {
    const check = (): void => {
      if (pattern.test(seen())) done();
    };
    const onExit = (): void => done(new Error(`${what} exited (${p.exitCode ?? p.signalCode}) before it was ready:\n${seen().slice(-4000)}`));
    const timer = setTimeout(() => done(new Error(`${what} was not ready within ${ms} ms:\n${seen().slice(-4000)}`)), ms);
    const done = (err?: Error): void => {
      clearTimeout(timer);
      p.stdout?.off('data', check);
      p.stderr?.off('data', check);
      p.off('exit', onExit);
      if (err) reject(err);
      else resolve();
    };
    p.stdout?.on('data', check);
    p.stderr?.on('data', check);
    p.once('exit', onExit);
    check();
  });
}

export async function startIpCluster(
  opts: { nodes?: number; replication?: number; blockSize?: string; size?: string; torusdArgs?: readonly string[] } = {},
): Promise<IpCluster> {
  const n = opts.nodes ?? 3;
  const names = ['etcd', ...Array.from({ length: n }, (_, i) => `n${i}`), 'client', 'admin'];
  const lab = createLab({ hosts: names });
  const dir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'torus-ipc-'));
  const procs = new Set<ChildProcess>();
  const host = (name: string, ip: string): IpHost => ({ name, ns: lab.hosts[name]!.ns, ip });
  const etcdHost = { ...host('etcd', ETCD_IP), endpoint: `${ETCD_IP}:2379` };
  const client = host('client', CLIENT_IP);
  const admin = host('admin', ADMIN_IP);
  const nodeHosts = Array.from({ length: n }, (_, i) => host(`n${i}`, nodeIp(i)));
  const nodes: IpNode[] = [];
  let stopped = false;

  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    for (const p of procs) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
    await sleep(100);
    lab.destroy();
    rmSync(dir, { recursive: true, force: true });
  };

  const track = (p: ChildProcess): ChildProcess => {
    procs.add(p);
    p.once('exit', () => procs.delete(p));
    return p;
  };

  const exec: IpCluster['exec'] = (h, cmd, args, timeoutMs = 60_000) =>
    new Promise((resolve, reject) => {
      const p = track(spawn('ip', ['netns', 'exec', h.ns, cmd, ...args], { stdio: ['ignore', 'pipe', 'pipe'] }));
      let stdout = '';
      let stderr = '';
      p.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
      p.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
      const timer = setTimeout(() => {
        p.kill('SIGKILL');
        reject(new Error(`${cmd} ${args.join(' ')} in ${h.name} timed out after ${timeoutMs} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
      }, timeoutMs);
      p.on('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      p.on('close', (code) => {
        clearTimeout(timer);
        resolve({ code: code ?? -1, stdout, stderr });
      });
    });

  const ctl: IpCluster['ctl'] = (args, timeoutMs = 30_000) => exec(admin, process.execPath, [BIN('torusctl'), '-C', etcdHost.endpoint, ...args], timeoutMs);
  const ctlOk: IpCluster['ctlOk'] = async (args, timeoutMs) => {
    const r = await ctl(args, timeoutMs);
    if (r.code !== 0) throw new Error(`torusctl ${args.join(' ')} exited ${r.code}:\n${r.stdout}${r.stderr}`);
    return r.stdout;
  };
  const probe: IpCluster['probe'] = async <T>(args: readonly string[], h: IpHost = admin, timeoutMs = 60_000): Promise<T> => {
    const r = await exec(h, process.execPath, [PROBE, ...args], timeoutMs);
    if (r.code !== 0) throw new Error(`probe ${args.join(' ')} exited ${r.code}:\n${r.stdout}${r.stderr}`);
    return JSON.parse(r.stdout) as T;
  };

  const launchNode = async (i: number, dataDir: string): Promise<{ proc: ChildProcess; log: () => string }> => {
    const h = nodeHosts[i]!;
    const proc = track(
      lab.start(h.ns, process.execPath, [
        BIN('torusd'), '-C', etcdHost.endpoint, '--peer-address', `http://${h.ip}:40000`, '--data-dir', dataDir,
        '--tls-certificates', await nodeCertDir(dataDir),
        '--size', opts.size ?? '512MiB', '--host', '127.0.0.1', '--port', '41000', '--heartbeat', '1s',
        ...(opts.torusdArgs ?? []),
      ]),
    );
    let out = '';
    const keep = (d: Buffer): void => {
      out = (out + d.toString()).slice(-200_000);
    };
    proc.stdout?.on('data', keep);
    proc.stderr?.on('data', keep);
    await waitOutput(proc, /torusd started/, `torusd ${h.name}`, 30_000, () => out);
    return { proc, log: () => out };
  };

  try {
    for (const h of [etcdHost, client, admin, ...nodeHosts]) {
      ipMust(['-n', h.ns, 'addr', 'add', `${h.ip}/24`, 'dev', 'eth0']);
    }
    track(
      lab.start(etcdHost.ns, etcdBinary(), [
        '--name', 'ipc', '--data-dir', join(dir, 'etcd'),
        '--listen-client-urls', `http://${etcdHost.endpoint}`, '--advertise-client-urls', `http://${etcdHost.endpoint}`,
        '--listen-peer-urls', 'http://127.0.0.1:2380', '--initial-advertise-peer-urls', 'http://127.0.0.1:2380',
        '--initial-cluster', 'ipc=http://127.0.0.1:2380', ...AUTO_COMPACTION, '--log-level', 'error', '--logger', 'zap',
      ]),
    );
    // etcd is ready when init gets through to it (bounded).
    const init = ['init', '--block-size', opts.blockSize ?? '64KiB', '--replication', String(opts.replication ?? 2)];
    for (let i = 0; ; i++) {
      const r = await ctl(init, 20_000);
      if (r.code === 0) break;
      if (i >= 40) throw new Error(`torusctl init never succeeded:\n${r.stdout}${r.stderr}`);
      await sleep(250);
    }
    const started = await Promise.all(nodeHosts.map((_, i) => launchNode(i, join(dir, `node${i}`))));
    await ctlOk(['peer', 'add', '--all-peers']);
    const peers = JSON.parse(await ctlOk(['list-peers', '--json'])) as { uuid: string; address: string }[];
    started.forEach((s, i) => {
      const h = nodeHosts[i]!;
      const address = `http://${h.ip}:40000`;
      const uuid = peers.find((p) => p.address === address)?.uuid;
      if (!uuid) throw new Error(`node ${h.name} (${address}) did not register`);
      nodes.push({ index: i, host: h, address, dataDir: join(dir, `node${i}`), uuid, proc: s.proc, log: s.log });
    });
  } catch (err) {
    await stop();
    throw err;
  }

  return {
    lab,
    etcd: etcdHost,
    client,
    admin,
    nodes,
    exec,
    ctl,
    ctlOk,
    probe,
    startScript: (h, script, args) => track(lab.start(h.ns, process.execPath, [script, ...args])),
    cut(h) {
      nft(
        h.ns,
        `table inet ${TABLE} {
  chain in { type filter hook input priority 0; policy drop; iif "lo" accept; }
  chain out { type filter hook output priority 0; policy drop; oif "lo" accept; }
}\n`,
      );
    },
    cutFrom(h, ip) {
      nft(
        h.ns,
        `table inet ${TABLE} {
  chain in { type filter hook input priority 0; ip saddr ${ip} drop; }
  chain out { type filter hook output priority 0; ip daddr ${ip} drop; }
}\n`,
      );
    },
    heal(h) {
      nft(h.ns, `delete table inet ${TABLE}\n`);
    },
    async kill(i) {
      const node = nodes[i]!;
      if (node.proc.exitCode !== null || node.proc.signalCode !== null) return;
      const gone = new Promise((r) => node.proc.once('exit', r));
      node.proc.kill('SIGKILL');
      await gone;
    },
    async restart(i) {
      const node = nodes[i]!;
      const s = await launchNode(i, node.dataDir);
      node.proc = s.proc;
      node.log = s.log;
    },
    stop,
  };
}
