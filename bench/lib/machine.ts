import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import os from 'node:os';

// What the figures were measured on, saved next to them: a ratio is only comparable with
// another taken on a similar machine under similar load.

export interface Machine {
  readonly cpuModel: string;
  readonly cores: number;
  readonly hypervisor: string;
  readonly memoryBytes: number;
  readonly kernel: string;
  readonly os: string;
  readonly node: string;
  readonly fio: string;
  readonly nbdkit: string;
  readonly etcd: string;
  /** Filesystem type and device under the bench's data directory. */
  readonly dataFilesystem: string;
  readonly loadAverage: readonly number[];
}

function cmd(c: string, args: string[]): string {
  const r = spawnSync(c, args, { encoding: 'utf8', timeout: 10_000 });
  return r.status === 0 ? r.stdout.trim() : `unknown (${c} ${args.join(' ')} failed)`;
}

function fileField(path: string, re: RegExp): string {
  try {
    return re.exec(readFileSync(path, 'utf8'))?.[1]?.trim() ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

export function describeMachine(dataDir: string): Machine {
  const df = cmd('df', ['--output=source,fstype', dataDir]).split('\n')[1]?.trim().replace(/\s+/, ' ') ?? 'unknown';
  return {
    cpuModel: os.cpus()[0]?.model ?? fileField('/proc/cpuinfo', /^model name\s*:(.*)$/m),
    cores: os.cpus().length,
    hypervisor: cmd('lscpu', []).match(/^Hypervisor vendor:\s*(.*)$/m)?.[1] ?? 'none reported',
    memoryBytes: os.totalmem(),
    kernel: `${os.type()} ${os.release()}`,
    os: fileField('/etc/os-release', /^PRETTY_NAME="?([^"\n]*)"?$/m),
    node: process.version,
    fio: cmd('fio', ['--version']),
    nbdkit: cmd('nbdkit', ['--version']),
    etcd: cmd('etcd', ['--version']).split('\n')[0] ?? 'unknown',
    dataFilesystem: df,
    loadAverage: os.loadavg().map((x) => Number(x.toFixed(2))),
  };
}
