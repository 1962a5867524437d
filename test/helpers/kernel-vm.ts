import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { etcdBinary } from './etcd.js';
import type { Lab } from './netns.js';
import { BIN, REPO } from './procs.js';

// Running shell jobs in the small VM of ../shared/tools/vm/run-in-vm (a kernel with nbd.ko, which
// this machine's kernel lacks), and a Torus cluster in a network namespace that listens on, and
// advertises, an address a guest on that namespace's bridge can reach.

export const RUN_IN_VM = process.env['TORUS_RUN_IN_VM'] ?? resolve(REPO, '..', 'shared', 'tools', 'vm', 'run-in-vm');

function have(binary: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${binary}`], { stdio: 'ignore' }).status === 0;
}

/** Why the VM cannot run here (with the host tools the kernel tests read results with), or undefined. */
export function vmUnavailable(hostTools: readonly string[] = []): string | undefined {
  if (process.getuid?.() !== 0) return 'run-in-vm needs root';
  if (!existsSync(RUN_IN_VM)) return `the VM tool is not at ${RUN_IN_VM}`;
  if (!have('qemu-system-x86_64')) return 'qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)';
  for (const tool of hostTools) if (!have(tool)) return `${tool} is not installed on the host`;
  return undefined;
}

export interface VmResult {
  /** run-in-vm's status: the job's, or 125 when the guest never finished. */
  readonly code: number | null;
  /** The guest's console from "guest ready" on, then run-in-vm's own stderr. */
  readonly out: string;
}

/**
 * Runs `script` in the guest. run-in-vm's own `--timeout` bounds qemu; the host-side timer is a
 * backstop a few seconds later that ends the whole process group (run-in-vm, `timeout`, qemu).
 * Asynchronous on purpose: servers this test process reads from keep being drained meanwhile.
 */
export function runInVm(script: string, opts: { timeoutS: number; share?: string; node?: boolean; tap?: string; memMiB?: number }): Promise<VmResult> {
  const dir = mkdtempSync(join(tmpdir(), 'torus-vm-job-'));
  const job = join(dir, 'job.sh');
  writeFileSync(job, script);
  const args = ['--timeout', String(opts.timeoutS)];
  if (opts.share) args.push('--share', opts.share);
  if (opts.node) args.push('--node');
  if (opts.tap) args.push('--tap', opts.tap);
  if (opts.memMiB) args.push('--mem', String(opts.memMiB));
  args.push(job);
  return new Promise((res, rej) => {
    const p: ChildProcess = spawn(RUN_IN_VM, args, { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    let out = '';
    p.stdout?.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr?.on('data', (d: Buffer) => (out += d.toString()));
    const group = (sig: NodeJS.Signals): void => {
      try {
        process.kill(-p.pid!, sig);
      } catch {
        // already gone
      }
    };
    let hard: NodeJS.Timeout | undefined;
    const backstop = setTimeout(() => {
      out += `\n[host] run-in-vm still running ${opts.timeoutS + 30} s after start; ending its process group\n`;
      group('SIGTERM');
      hard = setTimeout(() => group('SIGKILL'), 5000);
    }, (opts.timeoutS + 30) * 1000);
    p.on('error', (err) => {
      clearTimeout(backstop);
      rmSync(dir, { recursive: true, force: true });
      rej(err);
    });
    p.on('close', (code) => {
      clearTimeout(backstop);
      if (hard) clearTimeout(hard);
      rmSync(dir, { recursive: true, force: true });
      // The serial console ends lines with \r\n.
      res({ code, out: out.replace(/\r/g, '') });
    });
  });
}

function lddPaths(file: string): string[] {
  const r = spawnSync('ldd', [file], { encoding: 'utf8', timeout: 10_000 });
  if (r.status !== 0) return [];
  return [...r.stdout.matchAll(/(?:=>\s*)?(\/\S+)\s+\(0x/g)].map((m) => m[1]!);
}

/**
 * Shell lines that put into the guest the shared libraries which native addons under `root`
 * load but the node binary does not: run-in-vm --node copies only node's own (for
 * @node-rs/crc32 that leaves out librt.so.1). They travel inside the job script, base64-encoded,
 * because the job is the only file besides the shared directory that reaches the guest.
 */
export function guestLibsForAddons(root: string): string {
  const nodeLibs = new Set(lddPaths(process.execPath));
  const found = spawnSync('find', [join(root, 'node_modules'), join(root, 'build'), '-name', '*.node', '-type', 'f'], { encoding: 'utf8', timeout: 30_000 });
  const missing = new Set<string>();
  for (const addon of (found.stdout ?? '').split('\n').filter(Boolean)) for (const lib of lddPaths(addon)) if (!nodeLibs.has(lib)) missing.add(lib);
  const lines: string[] = [];
  for (const lib of [...missing].sort()) {
    if (!existsSync(lib) || statSync(lib).size > 8 * 1024 * 1024) continue;
    lines.push(`mkdir -p ${dirname(lib)}`, `base64 -d > ${lib} <<'LIB_B64'`, readFileSync(lib).toString('base64').replace(/(.{76})/g, '$1\n').trimEnd(), 'LIB_B64');
  }
  return lines.join('\n');
}

export interface AddressedCluster {
  readonly ns: string;
  /** etcd's client endpoint, ADDRESS:2379. */
  readonly endpoint: string;
  cli(name: 'torusctl' | 'torusblk', args: readonly string[], timeoutS?: number): { code: number; stdout: string; stderr: string };
  ok(name: 'torusctl' | 'torusblk', args: readonly string[], timeoutS?: number): string;
  /** Starts a long-running torusblk in the namespace against this cluster. */
  start(name: 'torusblk', args: readonly string[]): ChildProcess;
  /** Output of storage node i so far (for failure messages). */
  nodeLog(i: number): string;
  stop(): Promise<void>;
}

async function sleep(ms: number): Promise<void> {
  await new Promise((r) => setTimeout(r, ms));
}

/**
 * etcd and storage nodes in namespace `ns`, on `address` (which the caller has put on an
 * interface there): every peer address is one that another machine on that segment can dial,
 * unlike ns-cluster.ts, whose cluster lives on the namespace's loopback.
 */
export async function startAddressedCluster(
  lab: Lab,
  ns: string,
  address: string,
  opts: { nodes?: number; replication?: number; blockSize?: string; size?: string } = {},
): Promise<AddressedCluster> {
  const dir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'torus-addr-'));
  const endpoint = `${address}:2379`;
  const procs: ChildProcess[] = [];
  const logs: string[] = [];
  const cli: AddressedCluster['cli'] = (name, args, timeoutS = 60) => lab.run(ns, process.execPath, [BIN(name), '-C', endpoint, ...args], timeoutS);
  const ok: AddressedCluster['ok'] = (name, args, timeoutS) => {
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
        '--name', 'addr', '--data-dir', join(dir, 'etcd'),
        '--listen-client-urls', `http://${endpoint}`, '--advertise-client-urls', `http://${endpoint}`,
        '--listen-peer-urls', 'http://127.0.0.1:2380', '--initial-advertise-peer-urls', 'http://127.0.0.1:2380',
        '--initial-cluster', 'addr=http://127.0.0.1:2380', '--log-level', 'error', '--logger', 'zap',
      ]),
    );
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
      const p = lab.start(ns, process.execPath, [BIN(name), '-C', endpoint, ...args]);
      procs.push(p);
      return p;
    },
    nodeLog: (i) => logs[i] ?? '',
    stop,
  };
}
