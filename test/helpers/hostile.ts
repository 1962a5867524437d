import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';

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
 * A peer-RPC connection as an insider makes it: TLS with the test's client certificate (the
 * limits must hold against peers that authenticated, not only against strangers).
 */
export async function connectPeer(port: number, host = '127.0.0.1'): Promise<tls.TLSSocket> {
  const dir = process.env.TORUS_TLS_CERTIFICATES;
  if (!dir) throw new Error('connectPeer needs TORUS_TLS_CERTIFICATES (test/helpers/certs.ts)');
  const file = (f: string): Buffer => readFileSync(join(dir, f));
  return new Promise((resolve, reject) => {
    const s = tls.connect({ port, host, ca: file('ca-cert.pem'), cert: file('client-cert.pem'), key: file('client-key.pem'), checkServerIdentity: () => undefined }, () => {
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

/**
 * Watches a process's memory from now: its resident size now, and once stopped the peak since
 * (VmHWM, reset now) and the largest of samples taken every 100 ms.
 */
export function watchRss(pid: number): { readonly before: number; stop(): { peak: number; sampled: number } } {
  const before = rss(pid).now;
  resetPeakRss(pid);
  const sampler = sampleRss(pid);
  return { before, stop: () => ({ sampled: sampler.stop(), peak: rss(pid).peak }) };
}

/**
 * `n` connections from `open` that each send `header` and then as much of `bytes` as the server
 * takes, and stop there: what a server that buffers announced payloads pays for. Resolves with
 * the sockets and the bytes the servers took.
 */
export async function stallWriters(n: number, open: () => Promise<net.Socket>, header: Buffer, bytes: number): Promise<{ sockets: net.Socket[]; accepted: number }> {
  const sockets: net.Socket[] = [];
  const taken = await Promise.all(
    Array.from({ length: n }, async () => {
      const s = await open();
      sockets.push(s);
      s.write(header);
      return pushUntilBlocked(s, bytes);
    }),
  );
  return { sockets, accepted: taken.reduce((a, b) => a + b, 0) };
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
