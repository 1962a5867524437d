// The storage node's receive path (issue 15): PUT and APPEND bodies land in pooled memory, which
// goes back to the pool only once the store is done with it. Released memory is poisoned here,
// so a buffer handed out again too early corrupts what a store is still reading, and the
// comparisons below fail.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, afterEach, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { crc32c } from '@node-rs/crc32';
import { BufferPool } from '../core/buffer-pool.js';
import { verifySectorRead } from '../core/crc.js';
import { TorusError } from '../core/errors.js';
import { BlockType, type BlockRef } from '../core/ids.js';
import type { LogPiece } from '../core/interfaces.js';
import { throwawayCertificate } from '../cli/shared/certs.js';
import { FileBlockStore } from '../storage/file-store.js';
import { MemoryBlockStore } from '../storage/memory-store.js';
import { PeerClient } from './client.js';
import { encodeHello, encodePutBatch } from './codec.js';
import type { PeerSecurity } from './security.js';
import { RpcServer, type BlockService } from './server.js';

const BS = 256 * 1024;
const ID = { uuid: 'server-1', clusterId: 'cluster-a' };
const ref = (index: number): BlockRef => ({ type: BlockType.Data, volume: 1, inode: 1, index });
const logRef = (index: number): BlockRef => ({ type: BlockType.Log, volume: 1, inode: 0, index });
const pattern = (seed: number, size: number): Buffer => {
  const b = Buffer.allocUnsafe(size);
  for (let i = 0; i < size; i++) b[i] = (seed * 131 + i * 7 + (i >> 9)) & 0xff;
  return b;
};

/**
 * A store that reads what it is given late, after the put has been pending a while (as a disk
 * write does from its worker thread): memory released under it is seen.
 */
class SlowReader extends MemoryBlockStore {
  override async putBlock(r: BlockRef, data: Uint8Array, opts?: { readonly crc?: number }): Promise<void> {
    await sleep(2 + (r.index % 4));
    return super.putBlock(r, data, opts);
  }

  override async appendLog(r: BlockRef, pieces: readonly LogPiece[], sync?: boolean): Promise<void> {
    await sleep(3);
    return super.appendLog(r, pieces, sync);
  }
}

const cleanups: (() => Promise<unknown> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});
const poisoned = BufferPool.poison;
before(() => (BufferPool.poison = true));
after(() => (BufferPool.poison = poisoned));

async function serve(service: BlockService, security?: PeerSecurity): Promise<{ server: RpcServer; address: string }> {
  const server = new RpcServer({ service, identity: ID, ...(security ? { security } : {}) });
  const address = await server.listen(0);
  cleanups.push(() => server.close());
  return { server, address };
}

function dial(address: string, security?: PeerSecurity): PeerClient {
  const c = new PeerClient(address, { identity: { uuid: 'client-1', clusterId: ID.clusterId }, ...(security ? { security } : {}) });
  cleanups.push(() => c.close());
  return c;
}

/** Waits (bounded) until the server's requests have given their buffers back. */
async function settled(server: RpcServer): Promise<void> {
  for (let i = 0; i < 200 && server.stats().pool.outstanding > 0; i++) await sleep(10);
  assert.equal(server.stats().pool.outstanding, 0, 'every pooled buffer went back to the pool');
}

async function putsLandWhole(security?: PeerSecurity): Promise<RpcServer> {
  const store = new SlowReader({ blockSize: BS, capacityBlocks: 64 });
  const { server, address } = await serve(store, security);
  const c = dial(address, security);
  const blocks = Array.from({ length: 48 }, (_, i) => pattern(i, BS));
  // Many in flight and in batches, so that buffers are released and taken again while other
  // puts still read theirs.
  await Promise.all(blocks.slice(0, 24).map((b, i) => c.putBlock(ref(i), b)));
  const batch = await c.putBlocks(blocks.slice(24).map((b, i) => ({ ref: ref(24 + i), data: b, crc: crc32c(b) >>> 0 })));
  assert.ok(batch.every((e) => e === null), String(batch.find((e) => e !== null)));
  for (let i = 0; i < blocks.length; i++) assert.ok((await store.getBlock(ref(i))).equals(blocks[i]!), `block ${i} stored as sent`);
  await settled(server);
  const pool = server.stats().pool;
  assert.ok(pool.reused > 0, `buffers were reused (${JSON.stringify(pool)})`);
  return server;
}

describe('peer RPC receive path: pooled memory', () => {
  it('plaintext: reads land in pooled buffers, reused only once each put is done with its bytes', async () => {
    const server = await putsLandWhole();
    assert.equal(server.stats().directReads, 1, 'the accepted socket was read with onread');
  });

  it('TLS: the same, through the stream path', async () => {
    const security: PeerSecurity = { mode: 'secret', secrets: [Buffer.alloc(32, 7)], ...(await throwawayCertificate()) };
    const server = await putsLandWhole(security);
    assert.equal(server.stats().directReads, 0, 'a TLS socket is read as a stream');
  });

  it('journal appends keep their pieces until the store has them', async () => {
    const store = new SlowReader({ blockSize: BS, capacityBlocks: 64 });
    const { server, address } = await serve(store);
    const c = dial(address);
    // Pieces larger than a read, so that each body spans reads and is assembled in the pool.
    const half = BS / 2;
    const pieces = Array.from({ length: 8 }, (_, i) => pattern(100 + i, half));
    await Promise.all(pieces.map((data, i) => c.appendLog(logRef(i % 4), [{ offset: (i >> 2) * half, data }])));
    for (let i = 0; i < pieces.length; i++) {
      const at = (i >> 2) * half;
      assert.ok((await store.readRaw(logRef(i % 4))).subarray(at, at + half).equals(pieces[i]!), `piece ${i} stored as sent`);
    }
    await settled(server);
    assert.ok(server.stats().pool.allocated + server.stats().pool.reused >= pieces.length);
  });

  it('a frame cut off mid-body gives its buffer back when the connection goes', async () => {
    const { server, address } = await serve(new MemoryBlockStore({ blockSize: BS, capacityBlocks: 4 }));
    const u = new URL(address);
    const s = net.connect({ host: u.hostname, port: Number(u.port) });
    s.on('error', () => {});
    await new Promise((r) => s.once('connect', r));
    const helloOk = new Promise((r) => s.once('data', r));
    s.write(encodeHello(1, { minVersion: 1, maxVersion: 1, maxFrameSize: 1 << 24, uuid: 'raw', clusterId: ID.clusterId, extensions: [] }));
    await helloOk;
    const frame = Buffer.concat(encodePutBatch(2, [{ ref: ref(1), data: pattern(1, BS) }]));
    s.write(frame.subarray(0, frame.length >> 1));
    for (let i = 0; i < 200 && server.stats().pool.outstanding === 0; i++) await sleep(10);
    assert.equal(server.stats().pool.outstanding, 1, 'the half-received body is in a pooled buffer');
    s.destroy();
    await settled(server);
  });
});

describe('peer RPC receive path: one CRC pass, no weaker', () => {
  const dir = mkdtempSync(join(tmpdir(), 'rpc-receive-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('a byte flipped in flight: the PUT fails with CORRUPT and nothing is stored', async () => {
    const store = await FileBlockStore.open({ dir, blockSize: BS, sizeBytes: 16 * BS });
    cleanups.push(() => store.close());
    const { server, address } = await serve(store);
    // A proxy that flips one byte deep inside the first large chunk the writer sends: the PUT's
    // payload (its header and the item's head are the frame's first 50 bytes).
    const proxy = net.createServer((a) => {
      const u = new URL(address);
      const b = net.connect({ host: u.hostname, port: Number(u.port) });
      let flipped = false;
      a.on('data', (chunk: Buffer) => {
        if (!flipped && chunk.length > 8192) {
          chunk[chunk.length - 1]! ^= 0x10;
          flipped = true;
        }
        b.write(chunk);
      });
      b.on('data', (chunk: Buffer) => a.write(chunk));
      for (const [x, y] of [
        [a, b],
        [b, a],
      ] as const) {
        x.on('error', () => {});
        x.on('close', () => y.destroy());
      }
    });
    await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', r));
    cleanups.push(() => new Promise<void>((r) => proxy.close(() => r())));
    const c = dial(`tdp://127.0.0.1:${(proxy.address() as net.AddressInfo).port}`);
    await c.connect();
    const data = pattern(7, BS);
    const [bad] = await c.putBlocks([{ ref: ref(1), data, crc: crc32c(data) >>> 0 }]);
    assert.ok(bad instanceof TorusError && bad.code === 'CORRUPT', String(bad));
    assert.equal(store.hasBlock(ref(1)), false, 'nothing stored');
    assert.equal(store.stats().checksumFailures, 1);
    // The same bytes unharmed go in.
    const [ok] = await c.putBlocks([{ ref: ref(1), data, crc: crc32c(data) >>> 0 }]);
    assert.equal(ok, null);
    assert.ok((await store.getBlock(ref(1))).equals(data));
    await settled(server);
  });
});

describe("peer RPC client: a read into its caller's buffer", () => {
  /** A TCP proxy that passes the first `first` bytes from the server at once and the rest after `holdMs`. */
  async function slowProxy(address: string, first: number, holdMs: number): Promise<string> {
    const u = new URL(address);
    const proxy = net.createServer((a) => {
      const b = net.connect({ host: u.hostname, port: Number(u.port) });
      let passed = 0;
      let released = false;
      const held: Buffer[] = [];
      let timer: NodeJS.Timeout | undefined;
      a.on('data', (chunk: Buffer) => b.write(chunk));
      b.on('data', (chunk: Buffer) => {
        const now = released ? chunk.length : Math.max(0, Math.min(chunk.length, first - passed));
        if (now > 0) a.write(chunk.subarray(0, now));
        passed += now;
        if (now < chunk.length) {
          held.push(chunk.subarray(now));
          timer ??= setTimeout(() => {
            released = true;
            a.write(Buffer.concat(held.splice(0)));
          }, holdMs);
        }
      });
      for (const [x, y] of [
        [a, b],
        [b, a],
      ] as const) {
        x.on('error', () => {});
        x.on('close', () => {
          clearTimeout(timer);
          y.destroy();
        });
      }
    });
    await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', r));
    cleanups.push(() => new Promise<void>((r) => proxy.close(() => r())));
    return `tdp://127.0.0.1:${(proxy.address() as net.AddressInfo).port}`;
  }

  for (const transport of ['plaintext', 'TLS'] as const) {
    it(`${transport}: the bytes land in the buffer, checked like any read`, async () => {
      const security: PeerSecurity | undefined = transport === 'TLS' ? { mode: 'secret', secrets: [Buffer.alloc(32, 7)], ...(await throwawayCertificate()) } : undefined;
      const store = new MemoryBlockStore({ blockSize: BS, capacityBlocks: 8 });
      const data = pattern(3, BS);
      await store.putBlock(ref(1), data);
      const { address } = await serve(store, security);
      const c = dial(address, security);
      for (const [offset, length] of [
        [0, 0],
        [8192, 65536],
        [4096, 4096],
      ] as const) {
        const into = Buffer.alloc(length || BS, 0xee);
        const read = await c.readSectors(ref(1), offset, length, {}, into);
        assert.ok(read !== undefined);
        assert.equal(read.data, into, 'the data is the buffer given');
        const bytes = verifySectorRead(read, BS, crc32c(data) >>> 0, offset, length || BS, true, 'test');
        assert.ok(bytes.equals(data.subarray(offset, offset + (length || BS))));
      }
      await assert.rejects(c.readSectors(ref(1), 0, 4096, {}, Buffer.alloc(100)), (e: unknown) => e instanceof TorusError && e.code === 'INVALID_ARGUMENT');
    });

    it(`${transport}: a reply that comes after its call timed out writes nothing into the buffer`, async () => {
      const security: PeerSecurity | undefined = transport === 'TLS' ? { mode: 'secret', secrets: [Buffer.alloc(32, 7)], ...(await throwawayCertificate()) } : undefined;
      const store = new MemoryBlockStore({ blockSize: BS, capacityBlocks: 8 });
      const data = pattern(4, BS);
      await store.putBlock(ref(1), data);
      const { address } = await serve(store, security);
      const c = dial(await slowProxy(address, 96 * 1024, 400), security);
      await c.connect();
      // The reply's first part arrives (past the handshake's few hundred bytes), the rest 400 ms later.
      const into = Buffer.alloc(BS, 0);
      await assert.rejects(c.readSectors(ref(1), 0, 0, { timeoutMs: 150 }, into), (e: unknown) => e instanceof TorusError && e.code === 'TIMEOUT');
      assert.ok(into.subarray(0, 16384).some((b) => b !== 0), 'part of the reply had landed in the buffer before the timeout');
      // The caller hands the buffer to another read, which poisons it here.
      into.fill(0xee);
      await sleep(700);
      assert.ok(into.every((b) => b === 0xee), 'bytes of the late reply were written into a buffer given up');
      // The connection is still in step: the next read into a fresh buffer is whole.
      const again = Buffer.alloc(BS);
      const read = await c.readSectors(ref(1), 0, 0, {}, again);
      assert.ok(read !== undefined && read.data === again && again.equals(data));
    });
  }
});
