import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { afterEach, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { BufferPool } from '../core/buffer-pool.js';
import { TorusError, type ErrorCode } from '../core/errors.js';
import { BlockType, blockRefKey, type BlockRef } from '../core/ids.js';
import { crc32c } from '@node-rs/crc32';
import { verifySectorRead } from '../core/crc.js';
import { MemoryBlockStore } from '../storage/memory-store.js';
import { PeerClient, type PeerClientOptions } from './client.js';
import {
  EXT_AUTH_HMAC,
  FrameDecoder,
  HEADER_SIZE,
  Op,
  encodeData,
  encodeDeleteBatch,
  encodeGet,
  encodeHello,
  encodePutBatch,
  type Message,
} from './codec.js';
import { connectPipe } from './pipe.js';
import { PeerPool } from './pool.js';
import { RpcServer, type BlockService, type RpcServerOptions } from './server.js';

// ---------------------------------------------------------------------------------------------
// An in-memory block service with knobs for delays, hangs and failures.

class MemService implements BlockService {
  readonly blocks = new Map<string, Buffer>();
  flushes = 0;
  /** Extra latency per call in ms; null parks the call until `release()`. */
  delay: (ref: BlockRef | null) => number | null = () => 0;
  failPut: (ref: BlockRef) => Error | undefined = () => undefined;
  failGet: (ref: BlockRef) => Error | undefined = () => undefined;
  readonly completed: number[] = [];
  private parked: (() => void)[] = [];

  constructor(readonly blockSize = 4096) {}

  release(): void {
    const p = this.parked;
    this.parked = [];
    this.delay = () => 0;
    for (const r of p) r();
  }

  private async wait(ref: BlockRef | null): Promise<void> {
    const d = this.delay(ref);
    if (d === null) await new Promise<void>((r) => this.parked.push(r));
    else if (d > 0) await sleep(d);
  }

  async getBlock(ref: BlockRef): Promise<Buffer> {
    await this.wait(ref);
    const err = this.failGet(ref);
    if (err) throw err;
    const b = this.blocks.get(blockRefKey(ref));
    if (!b) throw new TorusError('BLOCK_UNAVAILABLE', `no block ${blockRefKey(ref)}`);
    this.completed.push(ref.index);
    return b;
  }

  async readRange(ref: BlockRef, offset: number, length: number): Promise<Buffer> {
    const b = await this.getBlock(ref);
    return b.subarray(offset, offset + length);
  }

  async putBlock(ref: BlockRef, data: Uint8Array): Promise<void> {
    await this.wait(ref);
    const err = this.failPut(ref);
    if (err) throw err;
    const padded = Buffer.alloc(this.blockSize);
    padded.set(data);
    this.blocks.set(blockRefKey(ref), padded);
  }

  hasBlock(ref: BlockRef): boolean {
    return this.blocks.has(blockRefKey(ref));
  }

  async deleteBlock(ref: BlockRef): Promise<void> {
    await this.wait(ref);
    this.blocks.delete(blockRefKey(ref));
  }

  async flush(): Promise<void> {
    await this.wait(null);
    this.flushes++;
  }
}

const SERVER_ID = { uuid: 'server-1', clusterId: 'cluster-a' };
const CLIENT_ID = { uuid: 'client-1', clusterId: 'cluster-a' };
const ref = (index: number): BlockRef => ({ type: BlockType.Data, volume: 1, inode: 1, index });
const pattern = (seed: number, size: number): Buffer => {
  const b = Buffer.allocUnsafe(size);
  for (let i = 0; i < size; i++) b[i] = (seed * 131 + i * 7) & 0xff;
  return b;
};

const cleanups: (() => Promise<unknown> | void)[] = [];
afterEach(async () => {
  const list = cleanups.splice(0).reverse();
  for (const c of list) await c();
});

async function startServer(service: BlockService, options: Partial<RpcServerOptions> = {}, port = 0): Promise<{ server: RpcServer; address: string }> {
  const server = new RpcServer({ service, identity: SERVER_ID, ...options });
  const address = await server.listen(port);
  cleanups.push(() => server.close());
  return { server, address };
}

function newClient(address: string, options: Partial<PeerClientOptions> = {}): PeerClient {
  const c = new PeerClient(address, { identity: CLIENT_ID, ...options });
  cleanups.push(() => c.close());
  return c;
}

async function waitFor(cond: () => boolean, what: string, limitMs = 10_000): Promise<void> {
  for (let waited = 0; !cond(); waited += 10) {
    if (waited > limitMs) throw new Error(`gave up waiting for ${what}`);
    await sleep(10);
  }
}

async function rejection(p: Promise<unknown>): Promise<TorusError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof TorusError, `expected a TorusError, got ${String(err)}`);
    return err;
  }
  assert.fail('expected a rejection');
}

async function assertCode(p: Promise<unknown>, code: ErrorCode, match?: RegExp): Promise<TorusError> {
  const err = await rejection(p);
  assert.equal(err.code, code, err.message);
  if (match) assert.match(err.message, match);
  return err;
}

/** A raw TCP connection speaking frames by hand, for misbehaving clients. */
class RawPeer {
  readonly socket: net.Socket;
  readonly messages: Message[] = [];
  readonly decoder = new FrameDecoder();
  closed = false;
  decodeError: unknown = null;

  constructor(address: string, read = true) {
    const u = new URL(address);
    this.socket = net.connect({ host: u.hostname, port: Number(u.port) });
    this.socket.on('error', () => {});
    this.socket.on('close', () => (this.closed = true));
    if (read) this.read();
    cleanups.push(() => void this.socket.destroy());
  }

  read(): void {
    this.socket.on('data', (chunk: Buffer) => {
      try {
        this.decoder.push(chunk);
        for (let m = this.decoder.next(); m !== null; m = this.decoder.next()) this.messages.push(m);
      } catch (err) {
        this.decodeError = err;
      }
    });
  }

  hello(clusterId = 'cluster-a', extensions: { type: number; value: Buffer }[] = []): void {
    this.socket.write(encodeHello(1, { minVersion: 1, maxVersion: 1, maxFrameSize: 64 << 20, uuid: 'raw', clusterId, extensions }));
  }
}

/**
 * A TCP proxy that can stall: while paused it forwards nothing in either direction and closes
 * nothing, like a peer whose host vanished (STYLE habit 9, after etcd3's test Proxy).
 */
class StallProxy {
  private readonly server: net.Server;
  private readonly pipes = new Set<{ a: net.Socket; b: net.Socket }>();
  paused = false;
  address = '';

  constructor(private readonly target: string) {
    this.server = net.createServer((a) => {
      const u = new URL(this.target);
      const b = net.connect({ host: u.hostname, port: Number(u.port) });
      const pair = { a, b };
      this.pipes.add(pair);
      for (const [from, to] of [
        [a, b],
        [b, a],
      ] as const) {
        from.on('data', (c: Buffer) => {
          if (!this.paused) to.write(c);
        });
        from.on('error', () => {});
        from.on('close', () => {
          to.destroy();
          this.pipes.delete(pair);
        });
      }
    });
  }

  async start(): Promise<string> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.address = `tdp://127.0.0.1:${(this.server.address() as net.AddressInfo).port}`;
    cleanups.push(() => this.close());
    return this.address;
  }

  close(): Promise<void> {
    for (const p of this.pipes) p.a.destroy();
    return new Promise((r) => this.server.close(() => r()));
  }
}

// ---------------------------------------------------------------------------------------------

describe('rpc over TCP: operations', () => {
  it('handshakes and reports the peer', async () => {
    const { address } = await startServer(new MemService(8192));
    const c = newClient(address);
    const remote = await c.connect();
    assert.deepEqual(
      { uuid: remote.uuid, clusterId: remote.clusterId, version: remote.version, blockSize: remote.blockSize },
      { uuid: 'server-1', clusterId: 'cluster-a', version: 1, blockSize: 8192 },
    );
    assert.equal(c.state, 'ready');
  });

  it('puts, gets, ranged reads, has, delete, flush', async () => {
    const svc = new MemService(4096);
    const { address } = await startServer(svc);
    const c = newClient(address);
    const data = pattern(1, 4096);
    await c.putBlock(ref(1), data);
    await c.putBlock(ref(2), Buffer.from('short')); // padded by the store
    assert.ok((await c.getBlock(ref(1))).equals(data));
    const short = await c.getBlock(ref(2));
    assert.equal(short.length, 4096);
    assert.equal(short.subarray(0, 5).toString(), 'short');

    assert.ok((await c.readRange(ref(1), 0, 1)).equals(data.subarray(0, 1)));
    assert.ok((await c.readRange(ref(1), 100, 50)).equals(data.subarray(100, 150)));
    assert.ok((await c.readRange(ref(1), 4086, 10)).equals(data.subarray(4086)));
    assert.equal((await c.readRange(ref(1), 10, 0)).length, 0);
    await assertCode(c.readRange(ref(1), 4090, 10), 'INVALID_ARGUMENT', /outside/);

    assert.deepEqual(await c.hasBlocks([ref(1), ref(2), ref(3)]), [true, true, false]);
    assert.equal(await c.hasBlock(ref(3)), false);
    await c.deleteBlocks([ref(1), ref(3)]);
    assert.deepEqual(await c.hasBlocks([ref(1), ref(2), ref(3)]), [false, true, false]);

    const before = svc.flushes;
    await c.flush();
    assert.equal(svc.flushes, before + 1);
    await c.putBlock(ref(4), data, { sync: true });
    assert.equal(svc.flushes, before + 2);
  });

  it('maps errors to TorusError codes', async () => {
    const svc = new MemService();
    svc.failGet = (r) =>
      r.index === 7 ? new TorusError('CORRUPT', 'checksum mismatch') : r.index === 8 ? new Error('disk on fire') : undefined;
    svc.failPut = (r) => (r.index === 13 ? new TorusError('OUT_OF_SPACE', 'full') : undefined);
    const { address } = await startServer(svc);
    const c = newClient(address);
    const missing = await assertCode(c.getBlock(ref(99)), 'BLOCK_UNAVAILABLE');
    assert.equal(missing.retryable, true);
    await c.putBlock(ref(7), Buffer.from('x'));
    await c.putBlock(ref(8), Buffer.from('x'));
    await assertCode(c.getBlock(ref(7)), 'CORRUPT', /checksum mismatch/);
    await assertCode(c.getBlock(ref(8)), 'INTERNAL', /disk on fire/);
    const results = await c.putBlocks([
      { ref: ref(12), data: Buffer.from('a') },
      { ref: ref(13), data: Buffer.from('b') },
      { ref: ref(14), data: Buffer.alloc(5000) }, // larger than the 4 KiB block size
    ]);
    assert.equal(results[0], null);
    assert.equal(results[1]?.code, 'OUT_OF_SPACE');
    assert.equal(results[2]?.code, 'INVALID_ARGUMENT');
    // The connection is still fine after all of that.
    assert.deepEqual(await c.hasBlocks([ref(12), ref(13)]), [true, false]);
    // A service method that throws instead of rejecting is answered the same way.
    svc.hasBlock = () => {
      throw new TorusError('IO', 'index unreadable');
    };
    await assertCode(c.hasBlocks([ref(12)]), 'IO', /index unreadable/);
    await c.flush();
  });

  it('pipelines hundreds of requests that complete out of order', async () => {
    const svc = new MemService(1024);
    svc.delay = () => Math.random() * 15;
    const { server, address } = await startServer(svc, { maxInFlight: 256 });
    const c = newClient(address, { maxInFlight: 256 });
    const n = 600;
    const blocks = Array.from({ length: n }, (_, i) => pattern(i, 1024));
    await Promise.all(blocks.map((b, i) => c.putBlock(ref(i), b)));
    svc.completed.length = 0;
    const got = await Promise.all(blocks.map((_, i) => c.getBlock(ref(i))));
    got.forEach((g, i) => assert.ok(g.equals(blocks[i]!), `block ${i}`));
    const stats = server.stats();
    assert.ok(stats.peakInFlight > 100, `peak in flight ${stats.peakInFlight}`);
    assert.ok(stats.peakInFlight <= 256);
    // Replies came back in completion order, not request order, and each found its caller.
    assert.notDeepEqual(svc.completed, [...svc.completed].sort((a, b) => a - b));
  });

  it('splits big batches to fit frames', async () => {
    const bs = 1024 * 1024;
    const svc = new MemService(bs);
    const { address } = await startServer(svc);
    const c = newClient(address);
    const blocks = Array.from({ length: 24 }, (_, i) => ({ ref: ref(i), data: pattern(i, bs) }));
    // Before the handshake the client only knows the protocol minimum; after it, the peer's limit.
    assert.deepEqual(await c.putBlocks(blocks.slice(0, 4)), [null, null, null, null]);
    assert.ok((await c.putBlocks(blocks.slice(4))).every((r) => r === null));
    for (const b of blocks) assert.ok(svc.blocks.get(blockRefKey(b.ref))!.equals(b.data));
    const refs = Array.from({ length: 100_000 }, (_, i) => ref(i));
    const has = await c.hasBlocks(refs);
    assert.equal(has.length, refs.length);
    assert.equal(has.filter(Boolean).length, 24);
    assert.ok((await c.getBlock(ref(23))).equals(blocks[23]!.data));
  });

  it('runs over an in-process pipe as well', async () => {
    const svc = new MemService(2048);
    const server = new RpcServer({ service: svc, identity: SERVER_ID });
    cleanups.push(() => server.close());
    const c = newClient('tdp://in-process:1', { connect: () => connectPipe((s) => server.handle(s), { highWaterMark: 1024 }) });
    const blocks = Array.from({ length: 50 }, (_, i) => pattern(i, 2048));
    await Promise.all(blocks.map((b, i) => c.putBlock(ref(i), b)));
    const got = await Promise.all(blocks.map((_, i) => c.getBlock(ref(i))));
    got.forEach((g, i) => assert.ok(g.equals(blocks[i]!)));
    // The pipe copies, so the stored block is not the caller's buffer.
    blocks[0]!.fill(0);
    assert.ok(svc.blocks.get(blockRefKey(ref(0)))!.equals(pattern(0, 2048)));
  });
});

describe('rpc over TCP: end-to-end checksums', () => {
  it('a put carrying the writer CRC is refused when the bytes do not match it; sectors come with checksums', async () => {
    const store = new MemoryBlockStore({ blockSize: 16384, capacityBlocks: 10 });
    const { address } = await startServer(store);
    const c = newClient(address);
    const data = pattern(1, 16384);
    const crc = crc32c(data) >>> 0;
    const [bad] = await c.putBlocks([{ ref: ref(1), data, crc: (crc + 1) >>> 0 }]);
    assert.equal(bad?.code, 'CORRUPT');
    assert.equal(store.hasBlock(ref(1)), false);
    assert.equal(c.remote?.checksums, true);
    const [ok] = await c.putBlocks([{ ref: ref(1), data, crc }]);
    assert.equal(ok, null);
    const read = await c.readSectors(ref(1), 5000, 3000);
    assert.ok(read);
    assert.deepEqual(verifySectorRead(read, 16384, crc, 5000, 3000, true, 'test'), data.subarray(5000, 8000));
    // The whole block, too (length 0).
    const whole = await c.readSectors(ref(1), 0, 0);
    assert.deepEqual(whole?.data, data);
  });

  it('sector reads are answered from pooled buffers, each poisoned once the socket is done with it: many in flight, every byte right', async () => {
    const poisoned = BufferPool.poison;
    BufferPool.poison = true;
    try {
      const bs = 16384;
      const store = new MemoryBlockStore({ blockSize: bs, capacityBlocks: 64 });
      const { server, address } = await startServer(store);
      const c = newClient(address);
      const blocks = Array.from({ length: 32 }, (_, i) => pattern(i + 7, bs));
      await c.putBlocks(blocks.map((data, i) => ({ ref: ref(i), data, crc: crc32c(data) >>> 0 })));
      const ranges = [[0, 0], [0, bs], [5000, 3000], [4096, 4096], [bs - 1, 1]] as const;
      for (let round = 0; round < 4; round++) {
        const reads = blocks.flatMap((data, i) => ranges.map(([off, len]) => ({ i, off, len, p: c.readSectors(ref(i), off, len) })));
        for (const r of reads) {
          const read = await r.p;
          assert.ok(read);
          const data = blocks[r.i]!;
          const len = r.len === 0 ? bs : r.len;
          assert.deepEqual(verifySectorRead(read, bs, crc32c(data) >>> 0, r.off, len, true, `block ${r.i} ${r.off}+${r.len}`), data.subarray(r.off, r.off + len));
        }
      }
      await assertCode(c.readSectors(ref(40), 0, 0), 'BLOCK_UNAVAILABLE');
      const pool = server.stats().replyPool;
      assert.ok(pool.reused > pool.allocated, `reply buffers reused: ${pool.reused} reuses, ${pool.allocated} allocations`);
      await waitFor(() => server.stats().replyPool.outstanding === 0, 'every reply buffer back in the pool');
    } finally {
      BufferPool.poison = poisoned;
    }
  });

  it('a node without sector checksums does not announce them: CRCs are not sent and readSectors says so', async () => {
    const service = new MemService(4096);
    const { address } = await startServer(service);
    const c = newClient(address);
    await c.putBlocks([{ ref: ref(2), data: pattern(2, 4096), crc: 12345 }]);
    assert.equal(c.remote?.checksums, false);
    assert.ok(service.hasBlock(ref(2)));
    assert.equal(await c.readSectors(ref(2), 0, 100), undefined);
  });
});

describe('rpc over TCP: journals', () => {
  it('appends, seals, fences and reads raw through a node; a fenced writer is refused', async () => {
    const store = new MemoryBlockStore({ blockSize: 16384, capacityBlocks: 10 });
    const { address } = await startServer(store);
    const c = newClient(address);
    assert.equal(await c.hasJournal(), true);
    const log: BlockRef = { type: BlockType.Log, volume: 4, inode: 2, index: 1 };
    await c.appendLog(log, [{ offset: 0, data: pattern(1, 4096) }, { offset: 16384 - 64, data: pattern(2, 64) }], { sync: true });
    assert.equal(store.isOpenLog(log), true);
    const raw = await c.readRaw(log);
    assert.deepEqual(raw.subarray(0, 4096), pattern(1, 4096));
    assert.deepEqual(await c.fenceVolume(4, 3), [log]);
    await assert.rejects(c.appendLog(log, [{ offset: 4096, data: pattern(3, 10) }]), (e) => e instanceof TorusError && e.code === 'LOCKED');
    const whole = Buffer.from(raw);
    whole.fill(0, 4096, 16384 - 64);
    await assert.rejects(c.sealLog(log, 4096, 16384 - 64, crc32c(whole) >>> 0), (e) => e instanceof TorusError && e.code === 'LOCKED');
    const next: BlockRef = { ...log, inode: 3 };
    await c.appendLog(next, [{ offset: 0, data: pattern(4, 100) }]);
    const mine = Buffer.alloc(16384);
    pattern(4, 100).copy(mine);
    await c.sealLog(next, 100, 16384, crc32c(mine) >>> 0, { sync: true });
    assert.deepEqual(await c.getBlock(next), mine);
  });

  it('a synced append is on the socket before the turn ends; other calls wait for the turn\'s batch', async () => {
    const { address } = await startServer(new MemoryBlockStore({ blockSize: 16384, capacityBlocks: 10 }));
    const c = newClient(address);
    assert.equal(await c.hasJournal(), true);
    // Microtasks only: the client's own awaits settle, setImmediate (the batch) cannot run.
    const settleMicrotasks = async (): Promise<void> => {
      for (let i = 0; i < 50; i++) await Promise.resolve();
    };
    const log = (index: number): BlockRef => ({ type: BlockType.Log, volume: 5, inode: 1, index });
    const lazy = c.appendLog(log(1), [{ offset: 0, data: pattern(5, 4096) }]);
    await settleMicrotasks();
    assert.equal(c.stats().inFlight, 1);
    assert.ok(c.stats().queuedWriteBytes > 4096, 'an unsynced append waits for the end of the turn');
    await lazy;
    // A flush waits on a synced append: it leaves at once, with what was gathered before it.
    const lazyAgain = c.appendLog(log(2), [{ offset: 0, data: pattern(6, 4096) }]);
    const urgent = c.appendLog(log(3), [{ offset: 0, data: pattern(7, 4096) }], { sync: true });
    await settleMicrotasks();
    assert.equal(c.stats().inFlight, 2);
    assert.equal(c.stats().queuedWriteBytes, 0);
    await Promise.all([lazyAgain, urgent]);
  });

  it('a node that went away is not journal-capable any more: hasJournal asks it, not its old handshake', async () => {
    const { server, address } = await startServer(new MemoryBlockStore({ blockSize: 16384, capacityBlocks: 10 }));
    const c = newClient(address);
    assert.equal(await c.hasJournal(), true);
    await server.close();
    await waitFor(() => c.state !== 'ready', 'the client noticed the close');
    await assert.rejects(c.hasJournal());
  });

  it('a node without journals does not announce them, and the client says so', async () => {
    const { address } = await startServer(new MemService(4096));
    const c = newClient(address);
    assert.equal(await c.hasJournal(), false);
    await assert.rejects(c.appendLog({ type: BlockType.Log, volume: 1, inode: 1, index: 1 }, []), (e) => e instanceof TorusError && e.code === 'INVALID_ARGUMENT' && /no volume journals/.test(e.message));
  });
});

describe('rpc over TCP: handshake', () => {
  it('refuses a client from another cluster', async () => {
    const { server, address } = await startServer(new MemService());
    const c = newClient(address, { identity: { uuid: 'c', clusterId: 'cluster-b' } });
    const err = await assertCode(c.ping(), 'WRONG_CLUSTER', /another cluster/);
    // The cluster id is no credential, but a refusal does not hand it to whoever asks either.
    assert.doesNotMatch(err.message, /cluster-a/);
    assert.equal(server.stats().refusedHandshakes, 1);
  });

  it('refuses a version mismatch with a clear error, and negotiates overlap', async () => {
    const { address } = await startServer(new MemService(), { versions: { min: 1, max: 3 } });
    const future = newClient(address, { versions: { min: 4, max: 6 } });
    await assertCode(future.ping(), 'PROTOCOL', /version mismatch.*4\.\.6.*1\.\.3/);
    const mid = newClient(address, { versions: { min: 1, max: 2 } });
    assert.equal((await mid.connect()).version, 2);
  });

  it('refuses a peer with another uuid than expected', async () => {
    const { address } = await startServer(new MemService());
    const c = newClient(address, { expectUuid: 'server-2' });
    await assertCode(c.ping(), 'NO_PEER', /server-1.*server-2/);
  });

  it('refuses a critical extension it does not implement', async () => {
    const { address } = await startServer(new MemService());
    const raw = new RawPeer(address);
    raw.hello('cluster-a', [{ type: EXT_AUTH_HMAC, value: Buffer.alloc(32) }]);
    await waitFor(() => raw.closed, 'server to close');
    const m = raw.messages[0];
    assert.ok(m && m.op === Op.Error && m.code === 'PROTOCOL', JSON.stringify(m));
    assert.match(m.message, /extension 0x8003/);
  });

  it('tells the client which process answered: a server started again on the same port is a new instance', async () => {
    const first = await startServer(new MemService());
    const c = newClient(first.address);
    await c.ping();
    assert.equal(c.instance, first.server.instance.toString('hex'));
    assert.match(c.instance ?? '', /^[0-9a-f]{16}$/);
    await first.server.close();
    const port = Number(new URL(first.address).port);
    const second = await startServer(new MemService(), {}, port);
    // The first call may still meet the old connection's end; the client then reconnects.
    for (let i = 0; i < 50; i++) {
      try {
        await c.ping();
        break;
      } catch {
        await sleep(20);
      }
    }
    assert.equal(c.instance, second.server.instance.toString('hex'));
    assert.notEqual(c.instance, first.server.instance.toString('hex'));
  });

  it('closes a connection that never says HELLO', async () => {
    const { address } = await startServer(new MemService(), { handshakeTimeoutMs: 50 });
    const raw = new RawPeer(address);
    await waitFor(() => raw.closed, 'server to close the silent connection');
    assert.equal(raw.messages[0]?.op, Op.Error);
  });
});

describe('rpc over TCP: misbehaving clients', () => {
  it('a client sending garbage is dropped without disturbing a good client', async () => {
    const svc = new MemService(4096);
    svc.delay = () => Math.random() * 3;
    const { server, address } = await startServer(svc);
    const good = newClient(address);
    const blocks = Array.from({ length: 100 }, (_, i) => pattern(i, 4096));
    await Promise.all(blocks.map((b, i) => good.putBlock(ref(i), b)));

    const work = (async () => {
      for (let round = 0; round < 5; round++) {
        const got = await Promise.all(blocks.map((_, i) => good.getBlock(ref(i))));
        got.forEach((g, i) => assert.ok(g.equals(blocks[i]!)));
      }
    })();

    const bad: RawPeer[] = [];
    // 1. random bytes from the first byte on
    const r1 = new RawPeer(address);
    r1.socket.write(randomBytes(20_000));
    bad.push(r1);
    // 2. an HTTP request
    const r2 = new RawPeer(address);
    r2.socket.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
    bad.push(r2);
    // 3. a good handshake, then a frame with an unknown op
    const r3 = new RawPeer(address);
    r3.hello();
    const unknown = encodeGet(5, ref(1), 0, 0);
    unknown[4] = 0x66;
    r3.socket.write(unknown);
    bad.push(r3);
    // 4. a good handshake, then a reply where a request belongs
    const r4 = new RawPeer(address);
    r4.hello();
    for (const p of encodeData(9, Buffer.from('not a request'))) r4.socket.write(p);
    bad.push(r4);
    // 5. a good handshake, then a length prefix of 4 GiB
    const r5 = new RawPeer(address);
    r5.hello();
    const huge = Buffer.alloc(HEADER_SIZE);
    huge.writeUInt32LE(0xffffffff, 0);
    huge[4] = Op.PutBatch;
    r5.socket.write(huge);
    bad.push(r5);
    // 6. half a frame, then a hang-up
    const r6 = new RawPeer(address);
    r6.hello();
    r6.socket.write(encodeGet(1, ref(1), 0, 0).subarray(0, 20));
    setTimeout(() => r6.socket.destroy(), 20);

    await work;
    for (const [i, r] of bad.entries()) {
      await waitFor(() => r.closed, `bad client ${i + 1} to be closed`);
      const err = r.messages.find((m) => m.op === Op.Error);
      assert.ok(err && err.op === Op.Error && err.code === 'PROTOCOL', `bad client ${i + 1} got ${JSON.stringify(r.messages)}`);
    }
    assert.ok(server.stats().protocolErrors >= 5);
    // The server still takes new connections.
    const later = newClient(address);
    assert.ok((await later.getBlock(ref(3))).equals(blocks[3]!));
  });

  it('stops reading from a client that does not read its replies (bounded memory)', async () => {
    const bs = 64 * 1024;
    const svc = new MemService(bs);
    svc.blocks.set(blockRefKey(ref(1)), pattern(1, bs));
    const maxInFlight = 8;
    const maxQueuedWriteBytes = 256 * 1024;
    const { server, address } = await startServer(svc, { maxInFlight, maxQueuedWriteBytes });
    const raw = new RawPeer(address, false);
    raw.socket.pause();
    raw.hello();
    const total = 3000; // 3000 x 64 KiB = 187 MiB of replies if the server did not hold back
    const reqs = Buffer.concat(Array.from({ length: total }, (_, i) => encodeGet(i + 1, ref(1), 0, 0)));
    raw.socket.write(reqs);

    // Wait until the server has stopped making progress.
    let last = -1;
    let still = 0;
    while (still < 15) {
      await sleep(20);
      const r = server.stats().requests;
      still = r === last ? still + 1 : 0;
      last = r;
    }
    const s = server.stats();
    assert.ok(s.requests < total / 2, `server read ${s.requests} of ${total} requests`);
    assert.ok(s.peakInFlight <= maxInFlight, `peak in flight ${s.peakInFlight}`);
    // The backlog is the limit plus at most the replies of the requests already started.
    const bound = maxQueuedWriteBytes + maxInFlight * (bs + HEADER_SIZE);
    assert.ok(s.peakQueuedWriteBytes <= bound, `peak queued ${s.peakQueuedWriteBytes} > ${bound}`);
    assert.ok(s.queuedWriteBytes <= bound);
    assert.ok(s.bufferedReadBytes <= 256 * 1024, `buffered ${s.bufferedReadBytes}`);

    // Once the client reads, everything is answered.
    raw.read();
    raw.socket.resume();
    await waitFor(() => raw.messages.length >= total + 1, 'all replies');
    assert.equal(raw.messages.filter((m) => m.op === Op.Data && m.data.length === bs).length, total);
  });
});

describe('rpc over TCP: limits (issue 13)', () => {
  it('hostile peers cannot hold more than the shared budget, and a good client keeps working among them', async () => {
    const bs = 64 * 1024;
    const budget = 8 * 1024 * 1024;
    const svc = new MemService(bs);
    for (let i = 0; i < 16; i++) svc.blocks.set(blockRefKey(ref(1000 + i)), pattern(i, bs));
    const { server, address } = await startServer(svc, { maxFrameSize: 2 * 1024 * 1024, maxBufferedBytes: budget, stallTimeoutMs: 0 });
    const good = newClient(address);
    let goodOps = 0;
    let stop = false;
    let peak = 0;
    const work = (async () => {
      for (let i = 0; !stop; i++) {
        const data = pattern(i, bs);
        await good.putBlock(ref(i % 50), data);
        assert.ok((await good.getBlock(ref(i % 50))).equals(data));
        goodOps++;
        peak = Math.max(peak, server.stats().heldBytes);
      }
    })();
    const raws: RawPeer[] = [];
    // Twelve announce 2 MiB PUT_BATCH frames and send nothing more.
    for (let i = 0; i < 12; i++) {
      const r = new RawPeer(address, false);
      r.hello();
      r.socket.write(encodePutBatch(1, [{ ref: ref(1), data: Buffer.alloc(2 * 1024 * 1024 - 64) }])[0]!);
      raws.push(r);
    }
    // Four ask for thousands of blocks each and never read a reply.
    for (let i = 0; i < 4; i++) {
      const r = new RawPeer(address, false);
      r.socket.pause();
      r.hello();
      r.socket.write(Buffer.concat(Array.from({ length: 2000 }, (_, j) => encodeGet(j + 2, ref(1000 + (j % 16)), 0, 0))));
      raws.push(r);
    }
    // One deletes 80,000 refs in one frame, over and over.
    const del = new RawPeer(address, false);
    del.hello();
    const refs = Array.from({ length: 80_000 }, (_, j) => ref(100_000 + j));
    for (let j = 0; j < 5; j++) del.socket.write(encodeDeleteBatch(j + 2, refs));
    raws.push(del);
    const before = goodOps;
    for (let i = 0; i < 100; i++) {
      await sleep(10);
      peak = Math.max(peak, server.stats().heldBytes);
    }
    stop = true;
    await work;
    const st = server.stats();
    for (const r of raws) r.socket.destroy();
    assert.ok(goodOps - before >= 20, `the good client made ${goodOps - before} round trips while attacked`);
    // The budget holds the total to 1.5 x its limit; a socket read each is the slack.
    const bound = 1.5 * budget + st.connections * 64 * 1024;
    assert.ok(peak <= bound && st.peakHeldBytes <= bound, `held at most ${st.peakHeldBytes} bytes (sampled ${peak}) against a budget of ${budget}`);
    assert.ok(st.throttled.budget > 0, 'the budget held the hostile peers back');
    await waitFor(() => server.stats().connections === 1, 'hostile connections gone');
  });

  it('runs the deletes of a DELETE_BATCH a few at a time', async () => {
    const svc = new MemService(4096);
    let running = 0;
    let peak = 0;
    const del = svc.deleteBlock.bind(svc);
    svc.deleteBlock = async (r: BlockRef): Promise<void> => {
      peak = Math.max(peak, ++running);
      await sleep(1);
      await del(r);
      running--;
    };
    const { address } = await startServer(svc);
    const c = newClient(address);
    await c.deleteBlocks(Array.from({ length: 2000 }, (_, i) => ref(i)));
    assert.ok(peak <= 32, `${peak} deletes ran at once`);
  });

  it('drops a peer that leaves a frame half-sent, trickles it, or does not read its replies, after the stall timeout', async () => {
    const bs = 64 * 1024;
    const svc = new MemService(bs);
    svc.blocks.set(blockRefKey(ref(1)), pattern(1, bs));
    const { server, address } = await startServer(svc, { stallTimeoutMs: 300, maxQueuedWriteBytes: 256 * 1024 });
    const good = newClient(address);
    await good.putBlock(ref(2), pattern(2, bs));
    const half = new RawPeer(address);
    half.hello();
    half.socket.write(encodeGet(2, ref(1), 0, 0).subarray(0, 20));
    const trickle = new RawPeer(address);
    trickle.hello();
    const frame = Buffer.concat(encodePutBatch(2, [{ ref: ref(3), data: pattern(3, 4096) }]));
    let at = 0;
    const dribble = setInterval(() => at < frame.length && trickle.socket.write(frame.subarray(at, ++at)), 20);
    const deaf = new RawPeer(address, false);
    deaf.socket.pause();
    deaf.hello();
    deaf.socket.write(Buffer.concat(Array.from({ length: 3000 }, (_, j) => encodeGet(j + 2, ref(1), 0, 0))));
    const started = Date.now();
    try {
      // (A paused socket does not notice its reset, so the deaf peer is judged by the server's count.)
      await waitFor(() => half.closed && trickle.closed && server.stats().connections === 1, 'the stalling peers to be dropped', 5000);
    } finally {
      clearInterval(dribble);
    }
    assert.ok(Date.now() - started >= 250);
    assert.equal(server.stats().stallTimeouts, 3);
    assert.ok((await good.getBlock(ref(2))).equals(pattern(2, bs)), 'a quiet good client is not a stalled one');
  });

  it('takes at most maxConnections; the rest are closed on arrival and counted', async () => {
    const svc = new MemService(4096);
    const limits: string[] = [];
    const { server, address } = await startServer(svc, { maxConnections: 2, onLimit: (what) => limits.push(what) });
    const a = new RawPeer(address);
    const b = new RawPeer(address);
    a.hello();
    b.hello();
    await waitFor(() => a.messages.length > 0 && b.messages.length > 0, 'two handshakes');
    const c = new RawPeer(address);
    await waitFor(() => c.closed, 'the third connection to be closed');
    assert.equal(server.stats().refusedConnections, 1);
    assert.deepEqual(limits, ['maxConnections']);
    a.socket.destroy();
    await waitFor(() => server.stats().connections === 1, 'a slot freed');
    const d = new RawPeer(address);
    d.hello();
    await waitFor(() => d.messages.length > 0, 'a new handshake');
  });
});

describe('rpc over TCP: half-close', () => {
  it('answers what a client sent before ending its side, then closes', async () => {
    const svc = new MemService(1024);
    svc.delay = () => Math.random() * 10;
    await svc.putBlock(ref(1), Buffer.from('one'));
    const { address } = await startServer(svc);
    const raw = new RawPeer(address);
    raw.hello();
    for (let i = 0; i < 20; i++) raw.socket.write(encodeGet(100 + i, ref(1), 0, 0));
    raw.socket.end();
    await waitFor(() => raw.closed, 'server to finish and close');
    assert.equal(raw.messages.filter((m) => m.op === Op.Data).length, 20);
  });
});

describe('rpc over TCP: flow control on the client', () => {
  it('caps requests in flight and queues the rest', async () => {
    const svc = new MemService(1024);
    svc.delay = () => 2;
    const { server, address } = await startServer(svc);
    const c = newClient(address, { maxInFlight: 4 });
    await Promise.all(Array.from({ length: 100 }, (_, i) => c.putBlock(ref(i), pattern(i, 1024))));
    assert.ok(server.stats().peakInFlight <= 4, `peak ${server.stats().peakInFlight}`);
  });

  it('respects the server cap announced in HELLO_OK', async () => {
    const svc = new MemService(1024);
    svc.delay = () => 2;
    const { server, address } = await startServer(svc, { maxInFlight: 3 });
    const c = newClient(address, { maxInFlight: 100 });
    await Promise.all(Array.from({ length: 60 }, (_, i) => c.putBlock(ref(i), pattern(i, 1024))));
    assert.equal(server.stats().peakInFlight, 3);
  });

  it('waits for drain when the socket backs up, keeping its own buffer bounded', async () => {
    const bs = 64 * 1024;
    const svc = new MemService(bs);
    svc.delay = () => null; // every put parks: the server stops reading once its budget is used
    const { server, address } = await startServer(svc, { maxInFlight: 1000, maxInFlightBytes: 1 << 20 });
    const maxQueuedWriteBytes = 256 * 1024;
    const c = newClient(address, { maxInFlight: 1000, maxQueuedWriteBytes, requestTimeoutMs: 60_000 });
    const n = 600; // 37.5 MiB: more than loopback's kernel buffers hold
    const puts = Array.from({ length: n }, (_, i) => c.putBlock(ref(i), pattern(i, bs)));
    let last = -1;
    let still = 0;
    while (still < 15) {
      await sleep(20);
      const q = c.stats().queued;
      still = q === last ? still + 1 : 0;
      last = q;
    }
    const cs = c.stats();
    assert.ok(cs.queued > 0, 'some calls wait in the client queue');
    assert.ok(cs.queuedWriteBytes <= maxQueuedWriteBytes + bs + 1024, `client socket backlog ${cs.queuedWriteBytes}`);
    assert.ok(server.stats().bufferedReadBytes <= (1 << 20) + 2 * bs);
    svc.release();
    await Promise.all(puts);
    assert.equal(svc.blocks.size, n);
  });

  it('fails fast with AGAIN when the queue is full', async () => {
    const svc = new MemService(1024);
    svc.delay = () => null;
    const { address } = await startServer(svc);
    const c = newClient(address, { maxInFlight: 1, maxQueued: 5 });
    await c.connect();
    const pending = Array.from({ length: 6 }, (_, i) => c.getBlock(ref(i)).catch((e: unknown) => e));
    await assertCode(c.getBlock(ref(100)), 'AGAIN');
    svc.release();
    await Promise.all(pending);
  });
});

describe('rpc over TCP: failures', () => {
  it('times out a request without breaking the connection', async () => {
    const svc = new MemService(1024);
    svc.delay = (r) => (r?.index === 666 ? null : 0);
    await svc.putBlock(ref(1), Buffer.from('one'));
    const { address } = await startServer(svc);
    const c = newClient(address);
    const err = await assertCode(c.getBlock(ref(666), { timeoutMs: 50 }), 'TIMEOUT', /timed out after 50 ms/);
    assert.equal(err.retryable, true);
    assert.equal((await c.getBlock(ref(1))).subarray(0, 3).toString(), 'one');
    assert.equal(c.breaker.state, 'closed');
    svc.release();
  });

  it('calls in flight and queued share one deadline timer, not one each', async () => {
    const svc = new MemService(1024);
    svc.delay = () => null;
    const { server, address } = await startServer(svc);
    const c = newClient(address, { requestTimeoutMs: 120_000, maxInFlight: 64 });
    await c.connect();
    const timers = (): number => process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;
    const before = timers();
    // 64 on the wire, 136 waiting in the queue (each with its queue deadline).
    const calls = Array.from({ length: 200 }, (_, i) => rejection(c.getBlock(ref(i))));
    await waitFor(() => server.stats().inFlight === 64, 'requests to reach the server');
    assert.equal(c.stats().queued, 136);
    assert.ok(timers() - before <= 1, `${timers() - before} timers armed for 200 calls`);
    svc.release();
    for (const err of await Promise.all(calls)) assert.equal(err.code, 'BLOCK_UNAVAILABLE', err.message);
    assert.equal(timers(), before, 'no deadline timer left once every call is done');
  });

  it('fails pending requests at once when the server goes away', async () => {
    const svc = new MemService(1024);
    svc.delay = () => null;
    const { server, address } = await startServer(svc);
    const c = newClient(address, { requestTimeoutMs: 120_000 });
    await c.connect();
    const calls = Array.from({ length: 20 }, (_, i) => rejection(c.getBlock(ref(i))));
    await waitFor(() => server.stats().inFlight === 20, 'requests to reach the server');
    await server.close();
    for (const err of await Promise.all(calls)) {
      // Not TIMEOUT: nobody waited for the two-minute timeout.
      assert.equal(err.code, 'BLOCK_UNAVAILABLE', err.message);
      assert.match(err.message, /lost/);
      assert.equal(err.retryable, true);
    }
  });

  it('a call queued behind slow but live calls gets its whole timeout once sent', async () => {
    const svc = new MemService(1024);
    const { address } = await startServer(svc);
    const c = newClient(address, { requestTimeoutMs: 150, maxInFlight: 1 });
    await c.connect();
    await c.putBlock(ref(1), randomBytes(1024));
    svc.delay = () => 60;
    // Eight calls one at a time at 60 ms each: the last waits ~420 ms in the queue, far past its
    // 150 ms timeout, yet the peer answered every one in time.
    const got = await Promise.all(Array.from({ length: 8 }, () => c.getBlock(ref(1))));
    assert.equal(got.length, 8);
    assert.equal(c.stats().timeouts, 0);
  });

  it('a connect that completed while the event loop was blocked is not timed out', async () => {
    const { address } = await startServer(new MemService(1024));
    const c = newClient(address, { connectTimeoutMs: 50 });
    const p = c.ping();
    for (let i = 0; i < 5; i++) await null;
    // A synchronous stretch longer than the connect timeout (a big sync's burst of puts on a slow
    // machine): the timer is due before the loop has looked at the finished connect.
    const until = Date.now() + 300;
    while (Date.now() < until) {
      // busy
    }
    await p;
    assert.equal(c.stats().connects, 1);
  });

  it('a dead peer costs one connect timeout, then the breaker fails fast', async () => {
    // Accepts TCP connections and never answers: the worst kind of dead.
    const sockets: net.Socket[] = [];
    const hole = net.createServer((s) => sockets.push(s.on('error', () => {})));
    await new Promise<void>((r) => hole.listen(0, '127.0.0.1', r));
    cleanups.push(() => new Promise<void>((r) => hole.close(() => r())));
    cleanups.push(() => sockets.forEach((s) => s.destroy()));
    const port = (hole.address() as net.AddressInfo).port;
    const c = newClient(`tdp://127.0.0.1:${port}`, {
      connectTimeoutMs: 100,
      breaker: { failureThreshold: 2, coolDownMs: 60_000 },
      backoff: { initialMs: 1, maxMs: 1 },
    });
    const first = await Promise.all(Array.from({ length: 50 }, (_, i) => rejection(c.getBlock(ref(i)))));
    assert.ok(first.every((e) => e.code === 'TIMEOUT' && /connecting/.test(e.message)), first[0]?.message);
    assert.equal(c.stats().connects, 1, 'fifty calls, one connection attempt');
    await assertCode(c.ping(), 'TIMEOUT');
    assert.equal(c.breaker.state, 'open');
    const fast = await Promise.all(Array.from({ length: 50 }, (_, i) => rejection(c.getBlock(ref(i)))));
    assert.ok(fast.every((e) => e.code === 'BLOCK_UNAVAILABLE' && /circuit open/.test(e.message) && e.retryable));
    assert.equal(c.stats().connects, 2, 'no attempts while open');
  });

  it('opens the breaker when requests time out on a hung server and drops what is queued', async () => {
    const svc = new MemService(1024);
    svc.delay = () => null;
    const { address } = await startServer(svc);
    const c = newClient(address, { requestTimeoutMs: 100, maxInFlight: 16, breaker: { failureThreshold: 3, coolDownMs: 60_000 } });
    await c.connect();
    const errs = await Promise.all(Array.from({ length: 100 }, (_, i) => rejection(c.getBlock(ref(i)))));
    const timeouts = errs.filter((e) => e.code === 'TIMEOUT').length;
    const open = errs.filter((e) => e.code === 'BLOCK_UNAVAILABLE').length;
    assert.equal(timeouts + open, 100);
    assert.ok(timeouts <= 16, `${timeouts} requests waited for a timeout`);
    assert.ok(open >= 84);
    assert.equal(c.breaker.state, 'open');
    await assertCode(c.ping(), 'BLOCK_UNAVAILABLE', /circuit open/);
    svc.release();
  });

  it('reconnects once the server is back, via a half-open probe', async () => {
    const probe = net.createServer();
    await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r));
    const port = (probe.address() as net.AddressInfo).port;
    await new Promise<void>((r) => probe.close(() => r()));

    const c = newClient(`tdp://127.0.0.1:${port}`, {
      breaker: { failureThreshold: 3, coolDownMs: 100 },
      backoff: { initialMs: 1, maxMs: 2 },
    });
    for (let i = 0; i < 3; i++) await assertCode(c.ping(), 'BLOCK_UNAVAILABLE', /cannot connect.*ECONNREFUSED/);
    assert.equal(c.breaker.state, 'open');
    const connects = c.stats().connects;
    await assertCode(c.ping(), 'BLOCK_UNAVAILABLE', /circuit open/);
    assert.equal(c.stats().connects, connects);

    const svc = new MemService(1024);
    await svc.putBlock(ref(5), Buffer.from('five'));
    await startServer(svc, {}, port);
    let data: Buffer | null = null;
    while (data === null) {
      try {
        data = await c.getBlock(ref(5));
      } catch (err) {
        assert.ok(err instanceof TorusError && err.code === 'BLOCK_UNAVAILABLE', String(err));
        await sleep(20);
      }
    }
    assert.equal(data.subarray(0, 4).toString(), 'five');
    assert.equal(c.breaker.state, 'closed');
    assert.equal(c.state, 'ready');
  });

  it('survives the server restarting between calls', async () => {
    const svc = new MemService(1024);
    await svc.putBlock(ref(1), Buffer.from('one'));
    const first = await startServer(svc);
    const port = Number(new URL(first.address).port);
    const c = newClient(first.address, { backoff: { initialMs: 1, maxMs: 5 } });
    await c.getBlock(ref(1));
    await first.server.close();
    await waitFor(() => c.state === 'idle', 'client to notice');
    await startServer(svc, {}, port);
    assert.equal((await c.getBlock(ref(1))).subarray(0, 3).toString(), 'one');
    assert.equal(c.stats().connects, 2);
  });

  it('a server idle close is not a failure; the next call reconnects', async () => {
    const svc = new MemService(1024);
    const { address } = await startServer(svc, { idleTimeoutMs: 50 });
    const c = newClient(address, { keepaliveMs: 0, idleCloseMs: 0 });
    await c.ping();
    await waitFor(() => c.state === 'idle', 'server idle close');
    await c.ping();
    assert.equal(c.stats().connects, 2);
    assert.equal(c.stats().lastError, null);
    assert.equal(c.breaker.failures, 0);
  });

  it('keepalive pings hold an idle connection open', async () => {
    const { address } = await startServer(new MemService(1024), { idleTimeoutMs: 300 });
    const c = newClient(address, { keepaliveMs: 30 });
    await c.ping();
    await sleep(800);
    assert.equal(c.state, 'ready');
    assert.equal(c.stats().connects, 1);
  });

  it('a stalled connection (host gone, TCP still open) is detected by keepalive', async () => {
    const { address } = await startServer(new MemService(1024));
    const proxy = new StallProxy(address);
    const c = newClient(await proxy.start(), { keepaliveMs: 30, requestTimeoutMs: 100, backoff: { initialMs: 1, maxMs: 1 } });
    await c.ping();
    proxy.paused = true;
    await waitFor(() => c.state === 'idle', 'keepalive to give up on the connection');
    assert.match(c.stats().lastError ?? '', /PING.*timed out/);
    proxy.paused = false;
    await c.ping();
    assert.equal(c.stats().connects, 2);
  });

  it('requests on a stalled connection time out, then the breaker cuts the peer off', async () => {
    const svc = new MemService(1024);
    await svc.putBlock(ref(1), Buffer.from('one'));
    const { address } = await startServer(svc);
    const proxy = new StallProxy(address);
    const c = newClient(await proxy.start(), {
      keepaliveMs: 0,
      requestTimeoutMs: 100,
      breaker: { failureThreshold: 4, coolDownMs: 150 },
      backoff: { initialMs: 1, maxMs: 1 },
    });
    await c.getBlock(ref(1));
    proxy.paused = true;
    const errs = await Promise.all(Array.from({ length: 10 }, () => rejection(c.getBlock(ref(1)))));
    assert.ok(errs.every((e) => e.retryable));
    assert.equal(c.breaker.state, 'open');
    proxy.paused = false;
    // After the cool-down one probe reconnects and the peer is usable again.
    let ok = false;
    while (!ok) {
      ok = await c.getBlock(ref(1)).then(
        () => true,
        async () => {
          await sleep(20);
          return false;
        },
      );
    }
    assert.equal(c.breaker.state, 'closed');
  });

  it('close() fails pending calls with CLOSED and later calls too', async () => {
    const svc = new MemService(1024);
    svc.delay = () => null;
    const { address } = await startServer(svc);
    const c = newClient(address);
    const p = rejection(c.getBlock(ref(1)));
    await waitFor(() => c.stats().inFlight === 1, 'request on the wire');
    await c.close();
    assert.equal((await p).code, 'CLOSED');
    await assertCode(c.ping(), 'CLOSED');
    svc.release();
  });
});

describe('PeerPool', () => {
  it('keeps one client per peer and follows address changes', async () => {
    const { address } = await startServer(new MemService(1024));
    const pool = new PeerPool({ identity: CLIENT_ID });
    cleanups.push(() => pool.close());
    const a = pool.client({ uuid: 'server-1', address });
    assert.equal(pool.client({ uuid: 'server-1', address }), a);
    await a.ping();
    const moved = pool.client({ uuid: 'server-1', address: 'tdp://127.0.0.1:1' });
    assert.notEqual(moved, a);
    assert.equal(a.state, 'closed');
    const wrong = pool.client({ uuid: 'server-9', address });
    await assertCode(wrong.ping(), 'NO_PEER');
    assert.throws(() => pool.client({ uuid: 'client-x', address: '' }), (e: unknown) => e instanceof TorusError && e.code === 'NO_PEER');
    await pool.update([{ uuid: 'server-9', address }]);
    assert.equal(pool.size, 1);
    assert.equal(moved.state, 'closed');
    assert.equal(pool.get('server-9'), wrong);
  });
});
