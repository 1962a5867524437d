import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';

// Tools for hostile-client tests (issue 13): a process's resident memory from /proc, and sockets
// that misbehave without costing the test process the memory they cost a careless server.

/** Resident memory now and at its peak (VmRSS, VmHWM), in bytes. */
export function rss(pid: number): { now: number; peak: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (field: string): number => Number(new RegExp(`^${field}:\\s+(\\d+) kB$`, 'm').exec(status)?.[1] ?? NaN) * 1024;
  return { now: kb('VmRSS'), peak: kb('VmHWM') };
}

/** Starts VmHWM again from the current resident size (clear_refs 5, Linux 4.0+), so a peak is one phase's. */
export function resetPeakRss(pid: number): void {
  writeFileSync(`/proc/${pid}/clear_refs`, '5');
}

export function connect(port: number, host = '127.0.0.1'): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, host, () => {
      s.off('error', reject);
      s.on('error', () => {});
      resolve(s);
    });
    s.once('error', reject);
  });
}

/**
 * Writes `total` bytes of `fill` in 64 KiB pieces as fast as the server takes them, and stops
 * (without buffering the rest here) when it stops reading. Resolves with the bytes sent once
 * the socket has been blocked for `settleMs`, or all is sent.
 */
export function pushUntilBlocked(s: net.Socket, total: number, settleMs = 200, fill = 0x33): Promise<number> {
  const piece = Buffer.alloc(64 * 1024, fill);
  let sent = 0;
  return new Promise((resolve) => {
    let timer: NodeJS.Timeout | undefined;
    const done = (): void => {
      s.off('drain', pump);
      resolve(sent);
    };
    const pump = (): void => {
      clearTimeout(timer);
      while (sent < total && !s.destroyed) {
        const n = Math.min(piece.length, total - sent);
        sent += n;
        if (!s.write(n === piece.length ? piece : piece.subarray(0, n))) {
          timer = setTimeout(done, settleMs);
          return;
        }
      }
      done();
    };
    s.on('drain', pump);
    pump();
  });
}

/** Samples a process's resident memory every `ms` until stopped; the largest value seen. */
export function sampleRss(pid: number, ms = 100): { stop(): number } {
  let max = 0;
  const t = setInterval(() => {
    try {
      max = Math.max(max, rss(pid).now);
    } catch {
      // the process is gone; its last samples stand
    }
  }, ms);
  return {
    stop(): number {
      clearInterval(t);
      return max;
    },
  };
}

export const MiB = 1024 * 1024;

export function mib(bytes: number): string {
  return `${(bytes / MiB).toFixed(0)} MiB`;
}
