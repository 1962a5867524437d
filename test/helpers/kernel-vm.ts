import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { REPO } from './procs.js';

// Running shell jobs in the small VM of ../shared/tools/vm/run-in-vm (a kernel with nbd.ko, which
// this machine's kernel lacks). A Torus cluster a guest can reach is ns-cluster.ts's, with `address`.

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
