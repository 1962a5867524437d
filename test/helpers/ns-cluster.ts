import type { ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { etcdBinary } from './etcd.js';
import type { Lab } from './netns.js';
import { BIN } from './procs.js';
import { AUTO_COMPACTION } from '../../scripts/lib/etcd.js';
import { nodeCertDir } from './certs.js';

// A whole Torus cluster inside one network namespace of a Lab: etcd and the storage nodes on that
// namespace's own loopback (fixed ports are free there), every process under `ip netns exec`, so
// front ends on the namespace's Ethernet (AoE) can serve volumes from it. With `address` (one the
// caller has put on an interface in that namespace) etcd's client endpoint and every peer address
// are on it instead, so that another machine on the segment (a VM's guest) can dial them.

export interface NsCluster {
  readonly ns: string;
  /** etcd's client endpoint, ADDRESS:2379. */
  readonly endpoint: string;
  /** Runs torusctl or torusblk in the namespace against this cluster; bounded. */
  cli(name: 'torusctl' | 'torusblk', args: readonly string[], timeoutS?: number): { code: number; stdout: string; stderr: string };
  /** Same, but fails with its output unless it exits 0. */
  ok(name: 'torusctl' | 'torusblk', args: readonly string[], timeoutS?: number): string;
  /** Starts a long-running torusblk in the namespace. */
  start(name: 'torusblk', args: readonly string[]): ChildProcess;
  /** Output of storage node i so far, its last 8000 characters (for failure messages). */
  nodeLog(i: number): string;
  stop(): Promise<void>;
}

async function sleep(ms: number): Promise<void> {
  await new Promise((r) => setTimeout(r, ms));
}

export async function startNsCluster(
  lab: Lab,
  ns: string,
  opts: { nodes?: number; replication?: number; blockSize?: string; size?: string; address?: string; insecurePeerNetwork?: boolean } = {},
): Promise<NsCluster> {
  // Every process of the cluster with the same peer credential: the test CA's certificates, or
  // plaintext where a test says the network is trusted.
  const plain = opts.insecurePeerNetwork ? ['--insecure-peer-network'] : [];
  const dir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'torus-ns-'));
  const address = opts.address ?? '127.0.0.1';
  const endpoint = `${address}:2379`;
  const procs: ChildProcess[] = [];
  const logs: string[] = [];
  const cli: NsCluster['cli'] = (name, args, timeoutS = 60) => lab.run(ns, process.execPath, [BIN(name), '-C', endpoint, ...plain, ...args], timeoutS);
  const ok: NsCluster['ok'] = (name, args, timeoutS) => {
    const r = cli(name, args, timeoutS);
    if (r.code !== 0) throw new Error(`${name} ${args.join(' ')} exited ${r.code}:\n${r.stdout}${r.stderr}`);
    return r.stdout;
  };
  const stop = async (): Promise<void> => {
    for (const p of procs.reverse()) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
    await sleep(100);
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    procs.push(
      lab.start(ns, etcdBinary(), [
        '--name', 'ns', '--data-dir', join(dir, 'etcd'),
        '--listen-client-urls', `http://${endpoint}`, '--advertise-client-urls', `http://${endpoint}`,
        '--listen-peer-urls', 'http://127.0.0.1:2380', '--initial-advertise-peer-urls', 'http://127.0.0.1:2380',
        '--initial-cluster', 'ns=http://127.0.0.1:2380', ...AUTO_COMPACTION, '--log-level', 'error', '--logger', 'zap',
      ]),
    );
    // etcd is ready when init gets through to it (bounded).
    const init = ['init', '--block-size', opts.blockSize ?? '64KiB', '--replication', String(opts.replication ?? 2)];
    for (let i = 0; ; i++) {
      const r = cli('torusctl', init, 20);
      if (r.code === 0) break;
      if (i >= 40) throw new Error(`torusctl init never succeeded:\n${r.stdout}${r.stderr}`);
      await sleep(250);
    }
    const nodes = opts.nodes ?? 2;
    for (let i = 0; i < nodes; i++) {
      const p = lab.start(ns, process.execPath, [
        BIN('torusd'), '-C', endpoint, '--peer-address', `http://${address}:${40000 + i}`, '--data-dir', join(dir, `node${i}`),
        ...(opts.insecurePeerNetwork ? plain : ['--tls-certificates', await nodeCertDir(join(dir, `node${i}`))]),
        '--size', opts.size ?? '512MiB', '--host', '127.0.0.1', '--port', String(41000 + i), '--heartbeat', '1s',
      ]);
      logs.push('');
      p.stdout?.on('data', (d: Buffer) => (logs[i] = (logs[i]! + d.toString()).slice(-8000)));
      p.stderr?.on('data', (d: Buffer) => (logs[i] = (logs[i]! + d.toString()).slice(-8000)));
      procs.push(p);
    }
    for (let i = 0; ; i++) {
      const peers = cli('torusctl', ['list-peers', '--json'], 20);
      if (peers.code === 0 && (JSON.parse(peers.stdout) as unknown[]).length >= nodes) break;
      if (i >= 80) throw new Error(`storage nodes did not register:\n${peers.stdout}${peers.stderr}\n${logs.join('\n')}`);
      await sleep(250);
    }
    ok('torusctl', ['peer', 'add', '--all-peers']);
  } catch (err) {
    await stop();
    throw err;
  }
  return {
    ns,
    endpoint,
    cli,
    ok,
    start: (name, args) => {
      const p = lab.start(ns, process.execPath, [BIN(name), '-C', endpoint, ...plain, ...args]);
      procs.push(p);
      return p;
    },
    nodeLog: (i) => logs[i] ?? '',
    stop,
  };
}
