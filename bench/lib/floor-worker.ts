import { closeSync, fdatasync, openSync, read, write } from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import { fileURLToPath } from 'node:url';
import { resolvePeerSecurity } from '../../src/cli/shared/certs.js';
import { tuneMalloc } from '../../src/core/malloc.js';
import type { BlockDevice, DeviceProvider, Extent } from '../../src/core/interfaces.js';
import { NbdServer } from '../../src/nbd/index.js';
import { dialTls, serverTlsOptions, type X509PeerSecurity } from '../../src/rpc/security.js';
import { readCached } from '../../src/storage/page-cache.js';
import { blast, sinkServer } from './tcp.js';

// The other ends of bench/floor.ts's measurements, each a Node process of its own (as a torusd and
// its peer are), forked with an IPC channel: the parent reads every process's CPU from /proc around
// the part it times. A worker does one thing, told by its first message, reports with `send`, and
// exits when the parent goes (the IPC channel closes) or says 'exit'.
//
//   sink-server             bench/lib/tcp.ts's sink ('data' events), answers its byte count
//   blast                   bench/lib/tcp.ts's sender, 1 MiB writes, on 'go'
//   stream-source           a server (TCP, or TLS as peer RPC sets it up) writing 1 MiB chunks on 'go'
//   stream-sink             dials it and counts bytes, reading with a static `onread` buffer or 'data'
//   rr-server, rr-client    fixed-size requests and replies, `depth` in flight: the per-operation
//                           cost of a small exchange (an NBD 4 KiB read, a peer's 4 KiB GET); the
//                           server reads 'data' events, the client a static `onread` buffer
//   nbd-file                Torus's NbdServer serving one file through a trivial device

export type Transport = 'tcp' | 'tls';

export type WorkerTask =
  | { kind: 'sink-server' }
  | { kind: 'blast' }
  | { kind: 'stream-source'; transport: Transport; certDir?: string }
  | { kind: 'stream-sink'; transport: Transport; certDir?: string; port: number; read: 'onread' | 'data' }
  | { kind: 'rr-server'; transport: Transport; certDir?: string; request: number; reply: number }
  | { kind: 'rr-client'; transport: Transport; certDir?: string; port: number; request: number; reply: number; depth: number }
  | { kind: 'nbd-file'; file: string; size: number };

/** Messages from the parent after the task: start a timed part, or leave. */
export type WorkerCommand = { go: { port?: number; bytes: number; seconds: number; ops?: number } } | { exit: true };

/** Messages to the parent. */
export interface WorkerReport {
  /** Listening on this port (servers). */
  port?: number;
  /** Connected and, for TLS, the handshake done (dialling ends). */
  connected?: { protocol: string | null; cipher: string | null };
  /** A timed part is over (the sending or requesting end, or the sink that saw the end). */
  done?: { bytes: number; ops: number; seconds: number };
  error?: string;
}

const MiB = 2 ** 20;

function send(r: WorkerReport): void {
  process.send?.(r);
}

/** Not zeros: nothing on the way may shortcut a run of equal bytes (as bench/lib/tcp.ts). */
export function patterned(bytes: number): Buffer {
  const b = Buffer.alloc(bytes);
  for (let i = 0; i + 4 <= b.length; i += 4) b.writeUInt32LE((i * 2654435761) >>> 0, i);
  return b;
}

async function x509(certDir: string | undefined): Promise<X509PeerSecurity> {
  if (certDir === undefined) throw new Error('TLS needs a certificate directory');
  const s = (await resolvePeerSecurity({ tlsCertificates: certDir }, true)).security;
  if (s.mode !== 'x509') throw new Error(`expected x509 peer security, got ${s.mode}`);
  return s;
}

/** A server the way peer RPC listens: plaintext net, or tls.createServer with security.ts's options. */
async function listen(transport: Transport, certDir: string | undefined, onSocket: (s: net.Socket) => void): Promise<net.Server> {
  let server: net.Server;
  if (transport === 'tls') {
    const opts = serverTlsOptions(await x509(certDir));
    if (!opts) throw new Error('no TLS options');
    server = tls.createServer({ ...opts, allowHalfOpen: true, noDelay: true }, onSocket);
  } else server = net.createServer({ allowHalfOpen: true, noDelay: true }, onSocket);
  await new Promise<void>((resolve, reject) => server.once('error', reject).listen(0, '127.0.0.1', () => resolve()));
  send({ port: (server.address() as net.AddressInfo).port });
  return server;
}

/**
 * Dials the way peer RPC does: net.connect, or security.ts's dialTls (x509, TLS 1.3). A reader
 * with `onread` cannot go through dialTls, which takes no such option: it gets the same options
 * (TLS 1.3 minimum, the CA, the client certificate, no host name check) plus `onread`, and the
 * negotiated protocol and cipher are reported for both so that they can be compared.
 */
async function dial(transport: Transport, certDir: string | undefined, port: number, onread?: { buffer: Buffer; callback: (n: number) => void }): Promise<net.Socket> {
  let s: net.Socket;
  const onreadOpt = onread ? { onread: { buffer: onread.buffer, callback: (n: number) => (onread.callback(n), true) } } : {};
  if (transport === 'tls') {
    const sec = await x509(certDir);
    s = onread
      ? tls.connect({ minVersion: 'TLSv1.3', host: '127.0.0.1', port, ca: sec.ca, cert: sec.clientCert, key: sec.clientKey, rejectUnauthorized: true, checkServerIdentity: () => undefined, ...onreadOpt })
      : dialTls(sec, { host: '127.0.0.1', port }, undefined);
    s.setNoDelay(true);
    await new Promise<void>((resolve, reject) => s.once('secureConnect', resolve).once('error', reject));
    const t = s as tls.TLSSocket;
    send({ connected: { protocol: t.getProtocol(), cipher: t.getCipher()?.standardName ?? t.getCipher()?.name ?? null } });
  } else {
    s = net.connect({ host: '127.0.0.1', port, noDelay: true, ...onreadOpt });
    await new Promise<void>((resolve, reject) => s.once('connect', resolve).once('error', reject));
    send({ connected: { protocol: null, cipher: null } });
  }
  return s;
}

/** Writes `chunk` until `bytes` are written or `seconds` have passed, with backpressure; then ends. */
async function pour(s: net.Socket, chunk: Buffer, bytes: number, seconds: number): Promise<number> {
  const deadline = Date.now() + seconds * 1000;
  let sent = 0;
  while (sent < bytes && Date.now() < deadline) {
    const n = Math.min(chunk.length, bytes - sent);
    sent += n;
    if (!s.write(n === chunk.length ? chunk : chunk.subarray(0, n))) {
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
  s.end();
  return sent;
}

function nextGo(): Promise<{ port?: number; bytes: number; seconds: number; ops?: number }> {
  return new Promise((resolve) => {
    const on = (m: WorkerCommand): void => {
      if ('go' in m) {
        process.off('message', on);
        resolve(m.go);
      }
    };
    process.on('message', on);
  });
}

async function streamSource(transport: Transport, certDir: string | undefined): Promise<void> {
  const chunk = patterned(MiB);
  let socket: net.Socket | undefined;
  const accepted = new Promise<net.Socket>((resolve) => {
    void listen(transport, certDir, (s) => {
      s.on('error', () => undefined);
      socket ??= s;
      resolve(s);
    });
  });
  const go = await nextGo();
  const s = socket ?? (await accepted);
  await pour(s, chunk, go.bytes, go.seconds);
}

async function streamSink(transport: Transport, certDir: string | undefined, port: number, mode: 'onread' | 'data'): Promise<void> {
  let bytes = 0;
  let t0 = 0n;
  const start = (): void => {
    if (t0 === 0n) t0 = process.hrtime.bigint();
  };
  // The cheapest receive Node has: every read lands in this one buffer, nothing is allocated per read.
  const s = mode === 'onread' ? await dial(transport, certDir, port, { buffer: Buffer.allocUnsafe(MiB), callback: (n) => (start(), (bytes += n)) }) : await dial(transport, certDir, port);
  if (mode === 'data') s.on('data', (c: Buffer) => (start(), (bytes += c.length)));
  s.on('end', () => {
    send({ done: { bytes, ops: 0, seconds: t0 === 0n ? 0 : Number(process.hrtime.bigint() - t0) / 1e9 } });
    s.destroy();
  });
}

/** Answers each whole `request` bytes with `reply` bytes; the replies a read completes go in one write. */
async function rrServer(transport: Transport, certDir: string | undefined, request: number, reply: number): Promise<void> {
  const batch = patterned(reply * 256);
  await listen(transport, certDir, (s) => {
    s.on('error', () => undefined);
    let partial = 0;
    s.on('data', (c: Buffer) => {
      const total = partial + c.length;
      let k = Math.floor(total / request);
      partial = total % request;
      while (k > 0) {
        const n = Math.min(k, 256);
        s.write(batch.subarray(0, n * reply));
        k -= n;
      }
    });
    s.on('end', () => s.end());
  });
}

/** Keeps `depth` requests in flight until `ops` are answered or `seconds` have passed. */
async function rrClient(transport: Transport, certDir: string | undefined, port: number, request: number, reply: number, depth: number): Promise<void> {
  // Replies land in one static buffer (onread), as the cheapest reader would have them.
  let onBytes: (n: number) => void = () => undefined;
  const s = await dial(transport, certDir, port, { buffer: Buffer.allocUnsafe(256 * 1024), callback: (n) => onBytes(n) });
  const reqs = patterned(request * depth);
  const go = await nextGo();
  const limit = go.ops ?? Infinity;
  const t0 = process.hrtime.bigint();
  const deadline = Date.now() + go.seconds * 1000;
  let issued = 0;
  let answeredBytes = 0;
  let answered = 0;
  const issue = (n: number): void => {
    const k = Math.min(n, limit - issued);
    if (k <= 0 || Date.now() >= deadline) return;
    issued += k;
    s.write(reqs.subarray(0, k * request));
  };
  await new Promise<void>((resolve, reject) => {
    s.once('error', reject);
    onBytes = (n) => {
      answeredBytes += n;
      const now = Math.floor(answeredBytes / reply);
      const fresh = now - answered;
      answered = now;
      if (fresh > 0) issue(fresh);
      if (answered === issued) resolve();
    };
    issue(depth);
  });
  send({ done: { bytes: answered * reply, ops: answered, seconds: Number(process.hrtime.bigint() - t0) / 1e9 } });
  s.destroy();
}

// ---- the NBD hop alone: Torus's NbdServer over a trivial device on one file ----

function fsRead(fd: number, buf: Buffer, at: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => read(fd, buf, at, buf.length - at, position, (err, n) => (err ? reject(err) : resolve(n))));
}

function fsWrite(fd: number, data: Uint8Array, position: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      if (done >= data.length) return resolve();
      write(fd, data, done, data.length - done, position + done, (err, n) => (err ? reject(err) : step(done + n)));
    };
    step(0);
  });
}

/**
 * One file, nothing else: reads from the page cache on the calling thread when they can be
 * (preadv2 RWF_NOWAIT, as the storage node reads; the thread pool for the rest), writes and
 * flushes through the thread pool (pwrite, fdatasync), no checksums, no metadata, every extent data.
 */
export class FileDevice implements BlockDevice {
  readonly blockSize = 4096;
  readonly readOnly = false;
  readonly description = 'floor: one file';

  constructor(
    private readonly fd: number,
    readonly size: number,
  ) {}

  async read(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    let got = readCached(this.fd, buf, offset);
    while (got < length) {
      const n = await fsRead(this.fd, buf, got, offset + got);
      if (n === 0) {
        buf.fill(0, got);
        break;
      }
      got += n;
    }
    return buf;
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return fsWrite(this.fd, data, offset);
  }

  flush(): Promise<void> {
    return new Promise((resolve, reject) => fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  trim(offset: number, length: number): Promise<void> {
    return this.write(offset, Buffer.alloc(length));
  }

  async writeZeroes(offset: number, length: number, opts: { fua?: boolean } = {}): Promise<void> {
    await this.write(offset, Buffer.alloc(length));
    if (opts.fua) await this.flush();
  }

  blockStatus(_offset: number, length: number): Promise<Extent[]> {
    return Promise.resolve([{ length, hole: false, zero: false }]);
  }
}

async function nbdFile(file: string, size: number): Promise<void> {
  const fd = openSync(file, 'r+');
  const device = new FileDevice(fd, size);
  const provider: DeviceProvider = {
    list: () => Promise.resolve(['']),
    open: () => Promise.resolve({ device, release: () => Promise.resolve() }),
  };
  const server = new NbdServer(provider, { listenTcp: { host: '127.0.0.1', port: 0 } });
  const addr = await server.listen();
  process.once('exit', () => closeSync(fd));
  send({ port: addr.tcp?.port ?? 0 });
}

async function runTask(t: WorkerTask): Promise<void> {
  switch (t.kind) {
    case 'sink-server': {
      const server = sinkServer();
      server.listen(0, '127.0.0.1', () => send({ port: (server.address() as net.AddressInfo).port }));
      return;
    }
    case 'blast': {
      const go = await nextGo();
      const r = await blast(go.port ?? 0, { chunk: patterned(MiB), bytes: go.bytes, seconds: go.seconds });
      send({ done: { bytes: r.bytes, ops: 0, seconds: r.seconds } });
      return;
    }
    case 'stream-source':
      return streamSource(t.transport, t.certDir);
    case 'stream-sink':
      return streamSink(t.transport, t.certDir, t.port, t.read);
    case 'rr-server':
      return rrServer(t.transport, t.certDir, t.request, t.reply);
    case 'rr-client':
      return rrClient(t.transport, t.certDir, t.port, t.request, t.reply, t.depth);
    case 'nbd-file':
      return nbdFile(t.file, t.size);
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  // glibc's malloc set up as torusd and torusblk set it at start (src/core/malloc.ts): without it
  // every big Buffer Node allocates (a 'data' chunk, a block) comes with fresh pages to fault in.
  tuneMalloc();
  // Whatever happens to the parent, a worker does not outlive it.
  process.on('disconnect', () => process.exit(0));
  process.once('message', (m: WorkerTask) => {
    process.on('message', (c: WorkerCommand) => {
      if ('exit' in c) process.exit(0);
    });
    runTask(m).catch((err: unknown) => {
      send({ error: err instanceof Error ? (err.stack ?? err.message) : String(err) });
      setTimeout(() => process.exit(1), 100);
    });
  });
}
