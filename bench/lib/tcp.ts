import { fork } from 'node:child_process';
import net from 'node:net';
import { fileURLToPath } from 'node:url';

// Raw Node TCP throughput on loopback, the reference the benches set Torus's network figures
// against (peer RPC, re-replication, the machine limits of `npm run bench`): one connection, plain
// `net.Socket` writes with backpressure, into a sink that discards what it reads. The sender
// half-closes when done; the sink answers with the byte count it read (a little-endian double),
// so the clock stops only once every byte has arrived.

/** A server that discards what each connection sends and, at its end, answers with the count. */
export function sinkServer(): net.Server {
  return net.createServer({ allowHalfOpen: true }, (s) => {
    let n = 0;
    s.on('data', (c: Buffer) => (n += c.length));
    s.on('end', () => {
      const b = Buffer.alloc(8);
      b.writeDoubleLE(n);
      s.end(b);
    });
  });
}

export interface Blast {
  /** Bytes the sink counted. */
  readonly bytes: number;
  readonly seconds: number;
  readonly bytesPerSec: number;
}

/**
 * Sends `chunk` (the last one cut short to reach `bytes`) to a sink on `port` until `bytes` are
 * sent or `seconds` have passed, whichever comes first; both are bounds, at least one is required.
 */
export async function blast(port: number, opts: { chunk: Buffer; bytes?: number; seconds?: number }): Promise<Blast> {
  if (opts.bytes === undefined && opts.seconds === undefined) throw new Error('blast: give bytes or seconds');
  const s = net.connect({ host: '127.0.0.1', port, noDelay: true });
  await new Promise<void>((resolve, reject) => s.once('connect', resolve).once('error', reject));
  try {
    const limit = opts.bytes ?? Infinity;
    const deadline = Date.now() + (opts.seconds ?? Infinity) * 1000;
    const start = process.hrtime.bigint();
    for (let sent = 0; sent < limit && Date.now() < deadline; ) {
      const n = Math.min(opts.chunk.length, limit - sent);
      sent += n;
      if (!s.write(n === opts.chunk.length ? opts.chunk : opts.chunk.subarray(0, n))) {
        await new Promise<void>((resolve, reject) => {
          const fail = (e: Error): void => reject(e);
          s.once('error', fail);
          s.once('drain', () => {
            s.off('error', fail);
            resolve();
          });
        });
      }
    }
    const bytes = await new Promise<number>((resolve, reject) => {
      s.once('data', (b: Buffer) => resolve(b.readDoubleLE(0)));
      s.once('error', reject);
      s.end();
    });
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    return { bytes, seconds, bytesPerSec: bytes / seconds };
  } finally {
    s.destroy();
  }
}

/**
 * Raw TCP from this process to a sink in a child Node process (two processes, as a torusd and
 * its peer are), 1 MiB writes; the child is gone when this resolves.
 */
export async function rawTcp(opts: { bytes?: number; seconds?: number }): Promise<Blast> {
  const child = fork(fileURLToPath(import.meta.url), ['--tcp-sink'], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  try {
    const port = await new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('the TCP sink did not start within 10 s')), 10_000);
      child.once('message', (m) => {
        clearTimeout(timer);
        resolve(m as number);
      });
      child.once('exit', (code) => reject(new Error(`the TCP sink exited (${code}) before listening`)));
    });
    // Not zeros: nothing on the way may shortcut a run of equal bytes.
    const chunk = Buffer.alloc(2 ** 20);
    for (let i = 0; i < chunk.length; i += 4) chunk.writeUInt32LE((i * 2654435761) >>> 0, i);
    return await blast(port, { chunk, ...opts });
  } finally {
    child.kill('SIGKILL');
  }
}

// Forked by rawTcp: serve the sink, tell the parent its port, go when the parent does.
if (process.argv[1] === fileURLToPath(import.meta.url) && process.argv[2] === '--tcp-sink') {
  const server = sinkServer();
  server.listen(0, '127.0.0.1', () => process.send?.((server.address() as net.AddressInfo).port));
  process.on('disconnect', () => process.exit(0));
}
