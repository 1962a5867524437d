import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { open, rm } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Etcd3 } from 'etcd3';

// Small measurements of the pieces a Torus flush is made of, taken in the same run as the fio
// jobs so the explanation in docs/performance.md rests on this machine's numbers, not on
// folklore: an etcd write (each sync ends with one transaction), and an fdatasync after a write
// of one block (each sync ends with the replicas' fsyncs).

export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const m = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** Median, least and greatest of repetitions, as the benches report them. */
export function spread(xs: readonly number[]): { median: number; min: number; max: number } {
  return { median: median(xs), min: Math.min(...xs), max: Math.max(...xs) };
}

/** "median [min-max]" with `digits` decimals. */
export function formatSpread(s: { median: number; min: number; max: number }, digits = 1): string {
  return `${s.median.toFixed(digits)} [${s.min.toFixed(digits)}-${s.max.toFixed(digits)}]`;
}

/** Median latency (ms) of `n` sequential etcd transactions shaped like a volume commit. */
export async function etcdTxnMs(endpoint: string, n = 100): Promise<number> {
  const client = new Etcd3({ hosts: `http://${endpoint}` });
  try {
    const ms: number[] = [];
    await client.put('/bench/lock').value('holder');
    for (let i = 0; i < n; i++) {
      const t = process.hrtime.bigint();
      await client.if('/bench/lock', 'Value', '==', 'holder').then(client.put('/bench/head').value(String(i))).commit();
      ms.push(Number(process.hrtime.bigint() - t) / 1e6);
    }
    await client.delete().prefix('/bench/');
    return median(ms);
  } finally {
    client.close();
  }
}

/** Median latency (ms) of pwrite(`bytes`) + fdatasync at random aligned offsets of a file in `dir`. */
export async function writeSyncMs(dir: string, bytes: number, n = 50): Promise<number> {
  const path = join(dir, `fsync-probe-${bytes}`);
  const fh = await open(path, 'w+');
  try {
    const buf = randomBytes(bytes);
    const span = 64 * 1024 * 1024;
    await fh.truncate(span);
    const ms: number[] = [];
    for (let i = 0; i < n; i++) {
      const off = Math.floor(Math.random() * (span / bytes)) * bytes;
      const t = process.hrtime.bigint();
      await fh.write(buf, 0, bytes, off);
      await fh.datasync();
      ms.push(Number(process.hrtime.bigint() - t) / 1e6);
    }
    return median(ms);
  } finally {
    await fh.close();
    await rm(path, { force: true });
  }
}

const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100;

/**
 * User and system CPU seconds a live process has used, and its page faults (from /proc/PID/stat:
 * fresh memory costs a fault per 4 KiB page, and on a VM each can be expensive); NaN once it is gone.
 */
export function cpuTimes(pid: number): { user: number; sys: number; minorFaults: number } {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the parenthesized command name (which may contain spaces): state is field 3,
    // minflt 10, utime 14, stime 15.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return { user: Number(rest[11]) / CLK_TCK, sys: Number(rest[12]) / CLK_TCK, minorFaults: Number(rest[7]) };
  } catch {
    return { user: NaN, sys: NaN, minorFaults: NaN };
  }
}

/** Context switches of a live process: voluntary (it waited) and involuntary (it was preempted). */
export function ctxSwitches(pid: number): { voluntary: number; involuntary: number } {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const get = (k: string): number => Number(new RegExp(`^${k}:\\s+(\\d+)$`, 'm').exec(status)?.[1] ?? NaN);
    return { voluntary: get('voluntary_ctxt_switches'), involuntary: get('nonvoluntary_ctxt_switches') };
  } catch {
    return { voluntary: NaN, involuntary: NaN };
  }
}

/**
 * A thread's time on a CPU and waiting in a run queue for one, in seconds (/proc/PID/schedstat,
 * the main thread): waiting is what a shared 2-core machine costs a pipeline of processes.
 */
export function schedTimes(pid: number): { run: number; wait: number } {
  try {
    const [run, wait] = readFileSync(`/proc/${pid}/schedstat`, 'utf8').trim().split(/\s+/).map(Number);
    return { run: (run ?? NaN) / 1e9, wait: (wait ?? NaN) / 1e9 };
  } catch {
    return { run: NaN, wait: NaN };
  }
}

/** Whole-machine CPU seconds from /proc/stat: busy (everything but idle and iowait) and steal. */
export function machineCpu(): { busy: number; steal: number } {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.split(/\s+/).slice(1).map(Number);
  const [user = 0, nice = 0, system = 0, , , irq = 0, softirq = 0, steal = 0] = f;
  return { busy: (user + nice + system + irq + softirq) / CLK_TCK, steal: steal / CLK_TCK };
}
