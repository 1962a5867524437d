// Peer RPC throughput between two local processes, next to what raw Node TCP does on the same
// machine in the same run (so the ratios mean something whatever the hardware).
//
//   npx tsc -p tsconfig.json --outDir dist-rpc && node dist-rpc/bench/rpc.js [--seconds=0.7] [--rounds=5] [--tls]
//
// --tls: peer RPC over TLS with certificates from a CA made for the run, both ends verified, as
// deployed (docs/security.md); the raw references stay plaintext, so the ratios show what TLS costs.
//
// The parent process is the client; it forks itself as the server ("--child"), which runs
//   - a sink that counts bytes (raw TCP throughput reference, bench/lib/tcp.ts),
//   - a fixed-size request/reply responder (raw pipelined 4 KiB request/reply reference),
//   - an RpcServer on an in-memory block store with 512 KiB blocks.
// Profile with: node --cpu-prof dist-rpc/bench/rpc.js (the child inherits the flag).

import { fork } from 'node:child_process';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { TorusError } from '../src/core/errors.js';
import { BlockType, blockRefKey, type BlockRef } from '../src/core/ids.js';
import { PeerClient } from '../src/rpc/client.js';
import { RpcServer, type BlockService } from '../src/rpc/server.js';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createCa, issueCertificates, resolvePeerSecurity } from '../src/cli/shared/certs.js';
import type { PeerSecurity } from '../src/rpc/security.js';
import { blast, sinkServer } from './lib/tcp.js';

const BLOCK = 512 * 1024;
const SMALL = 4096;
const REQ = 16;
const STORED = 256;

interface Ports {
  sink: number;
  echo: number;
  rpc: number;
}

const SERVER_UUID = '00000000-0000-4000-8000-00000000b5e1';

/** With --tls (BENCH_RPC_CERTS set by the parent): both ends' certificates. */
async function security(who: 'server' | 'client'): Promise<{ security?: PeerSecurity }> {
  const ca = process.env.BENCH_RPC_CERTS;
  if (!ca) return {};
  return { security: (await resolvePeerSecurity({ tlsCertificates: join(ca, who) }, who === 'server')).security };
}

function arg(name: string, fallback: number): number {
  const a = process.argv.find((x) => x.startsWith(`--${name}=`));
  return a ? Number(a.split('=')[1]) : fallback;
}
/** Seconds per trial, and trials per measurement: rounds are interleaved and the best kept,
 * because on a shared machine a neighbour's burst can halve any single measurement. */
const SECONDS = arg('seconds', 0.7);
const ROUNDS = arg('rounds', 5);

const ref = (index: number): BlockRef => ({ type: BlockType.Data, volume: 1, inode: 1, index });

// ---------------------------------------------------------------------------------------------
// Child: the servers

class MemoryStore implements BlockService {
  readonly blockSize = BLOCK;
  private readonly blocks = new Map<string, Buffer>();

  async getBlock(r: BlockRef): Promise<Buffer> {
    const b = this.blocks.get(blockRefKey(r));
    if (!b) throw new TorusError('BLOCK_UNAVAILABLE', `no block ${blockRefKey(r)}`);
    return b;
  }

  async readRange(r: BlockRef, offset: number, length: number): Promise<Buffer> {
    return (await this.getBlock(r)).subarray(offset, offset + length);
  }

  async putBlock(r: BlockRef, data: Uint8Array): Promise<void> {
    // As BlockStore specifies, storing a ref that exists is a no-op. Beyond the blocks the GETs
    // read, puts are taken and dropped, as a disk store drops the buffer once written: keeping
    // gigabytes in the JS heap would measure V8's garbage collector, not the protocol.
    if (this.blocks.has(blockRefKey(r)) || this.blocks.size >= STORED) return;
    // A copy: the server reuses the memory a put arrived in once the put returns.
    let b = Buffer.from(data);
    if (b.length < BLOCK) {
      const padded = Buffer.alloc(BLOCK);
      padded.set(b);
      b = padded;
    }
    this.blocks.set(blockRefKey(r), b);
  }

  hasBlock(r: BlockRef): boolean {
    return this.blocks.has(blockRefKey(r));
  }

  async deleteBlock(r: BlockRef): Promise<void> {
    this.blocks.delete(blockRefKey(r));
  }

  async flush(): Promise<void> {}
}

function listen(server: net.Server): Promise<number> {
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve((server.address() as net.AddressInfo).port)));
}

async function child(): Promise<void> {
  const sink = sinkServer();
  // One preallocated run of replies; each request is answered by a slice of it, corked per
  // chunk of requests: as close to free as a Node responder gets.
  const replies = Buffer.alloc(SMALL * 512, 7);
  const echo = net.createServer({ noDelay: true }, (s) => {
    let carry = 0;
    s.on('data', (c: Buffer) => {
      carry += c.length;
      let k = Math.floor(carry / REQ);
      carry -= k * REQ;
      while (k > 0) {
        const n = Math.min(k, 512);
        s.write(replies.subarray(0, n * SMALL));
        k -= n;
      }
    });
  });
  const rpc = new RpcServer({ service: new MemoryStore(), identity: { uuid: 'bench-server', clusterId: 'bench' }, ...(await security('server')) });
  const rpcPort = Number(new URL(await rpc.listen()).port);
  const ports: Ports = { sink: await listen(sink), echo: await listen(echo), rpc: rpcPort };
  process.send?.(ports);
  process.on('disconnect', () => process.exit(0));
}

// ---------------------------------------------------------------------------------------------
// Parent: the clients

function connect(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: '127.0.0.1', port, noDelay: true }, () => resolve(s));
    s.once('error', reject);
  });
}

async function rawRequestReply(port: number, window: number): Promise<number> {
  const s = await connect(port);
  const reqs = Buffer.alloc(REQ * window, 1);
  let received = 0;
  let done = 0;
  let sent = window;
  const deadline = Date.now() + SECONDS * 1000;
  const start = process.hrtime.bigint();
  await new Promise<void>((resolve) => {
    s.on('data', (c: Buffer) => {
      received += c.length;
      const now = Math.floor(received / SMALL);
      const k = now - done;
      done = now;
      if (Date.now() < deadline) {
        s.write(reqs.subarray(0, k * REQ));
        sent += k;
      } else if (done === sent) resolve();
    });
    s.write(reqs);
  });
  const secs = Number(process.hrtime.bigint() - start) / 1e9;
  s.destroy();
  return done / secs;
}

/** Runs `op` from `workers` concurrent loops for the configured time; returns ops/s. */
async function loop(workers: number, op: (i: number) => Promise<unknown>): Promise<number> {
  let count = 0;
  const deadline = Date.now() + SECONDS * 1000;
  const start = process.hrtime.bigint();
  await Promise.all(
    Array.from({ length: workers }, async (_, w) => {
      for (let i = w; Date.now() < deadline; i += workers) {
        await op(i);
        count++;
      }
    }),
  );
  return count / (Number(process.hrtime.bigint() - start) / 1e9);
}

const GiB = 1024 ** 3;

function row(name: string, value: string, ref: string): string {
  return `${name.padEnd(44)} ${value.padStart(14)} ${ref.padStart(12)}`;
}

async function parent(): Promise<void> {
  if (process.argv.includes('--tls')) {
    const dir = mkdtempSync(join(tmpdir(), 'bench-rpc-'));
    await createCa(join(dir, 'ca'));
    await issueCertificates(join(dir, 'ca'), 'server', { uuid: SERVER_UUID });
    await issueCertificates(join(dir, 'ca'), 'client');
    process.env.BENCH_RPC_CERTS = join(dir, 'ca');
  }
  const proc = fork(fileURLToPath(import.meta.url), ['--child'], { stdio: ['inherit', 'inherit', 'inherit', 'ipc'] });
  const ports = await new Promise<Ports>((resolve) => proc.once('message', (m) => resolve(m as Ports)));

  const client = new PeerClient(`tdp://127.0.0.1:${ports.rpc}`, {
    identity: { uuid: 'bench-client', clusterId: 'bench' },
    maxInFlight: 64,
    ...(await security('client')),
  });
  await client.connect();
  const blocks = Array.from({ length: 8 }, (_, i) => Buffer.alloc(BLOCK, i + 1));
  for (let i = 0; i < STORED; i++) await client.putBlock(ref(i), blocks[i % blocks.length]!);
  const refs = Array.from({ length: 1024 }, (_, i) => ref(i));

  let fresh = STORED;
  const runs: Record<string, () => Promise<number>> = {
    raw: async () => (await blast(ports.sink, { chunk: Buffer.alloc(BLOCK, 1), seconds: SECONDS })).bytesPerSec,
    rawOps: () => rawRequestReply(ports.echo, 64),
    // New refs each time, so every PUT is stored, not skipped as a duplicate.
    put: async () => (await loop(16, () => client.putBlock(ref(fresh++), blocks[fresh % blocks.length]!))) * BLOCK,
    putBatch: async () =>
      (await loop(4, () => client.putBlocks(blocks.map((data) => ({ ref: ref(fresh++), data }))))) * 8 * BLOCK,
    get: async () => (await loop(16, (i) => client.getBlock(ref(i % STORED)))) * BLOCK,
    ranged: () => loop(64, (i) => client.readRange(ref(i % STORED), ((i * 7) % 128) * SMALL, SMALL)),
    has: async () => (await loop(4, () => client.hasBlocks(refs))) * refs.length,
  };
  const best: Record<string, number> = {};
  for (let r = 0; r < ROUNDS; r++) {
    for (const [name, run] of Object.entries(runs)) best[name] = Math.max(best[name] ?? 0, await run());
  }

  await client.close();
  proc.disconnect();

  const b = (k: string): number => best[k] ?? 0;
  const gib = (x: number): string => `${(x / GiB).toFixed(2)} GiB/s`;
  const ops = (x: number): string => `${Math.round(x).toLocaleString('en-US')} ops/s`;
  const pct = (x: number, of: number): string => `${((x / of) * 100).toFixed(0)}%`;
  console.log(`peer RPC benchmark${process.env.BENCH_RPC_CERTS ? ' over TLS' : ''}: two processes over loopback, best of ${ROUNDS} x ${SECONDS}s, node ${process.version}`);
  console.log(row('measurement', 'result', 'vs raw'));
  console.log(row('raw TCP, 512 KiB writes', gib(b('raw')), '100%'));
  console.log(row('raw pipelined 4 KiB request/reply (64)', ops(b('rawOps')), '100%'));
  console.log(row('PUT 512 KiB blocks (16 in flight)', gib(b('put')), pct(b('put'), b('raw'))));
  console.log(row('PUT_BATCH 8 x 512 KiB (4 in flight)', gib(b('putBatch')), pct(b('putBatch'), b('raw'))));
  console.log(row('GET 512 KiB blocks (16 in flight)', gib(b('get')), pct(b('get'), b('raw'))));
  console.log(row('ranged GET 4 KiB (64 in flight)', ops(b('ranged')), pct(b('ranged'), b('rawOps'))));
  console.log(row('HAS_BATCH refs/s (1024 per frame)', ops(b('has')), ''));
}

if (process.argv.includes('--child')) await child();
else await parent();
