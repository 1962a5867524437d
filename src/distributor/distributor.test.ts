import assert from 'node:assert/strict';
import { test } from 'node:test';
import { crc32c } from '@node-rs/crc32';
import { isTorusError } from '../core/errors.js';
import { BlockType, type BlockRef } from '../core/ids.js';
import type { Ring } from '../core/interfaces.js';
import { createRing, newRingModel } from '../ring/index.js';
import { MemoryBlockStore } from '../storage/memory-store.js';
import { Distributor, type ReadLevel, type WriteLevel } from './distributor.js';
import { MemoryTransport } from './memory-transport.js';

const BS = 4096;

function ref(i: number): BlockRef {
  return { type: BlockType.Data, volume: 1, inode: 1, index: i };
}

function block(i: number): Buffer {
  const b = Buffer.alloc(BS);
  for (let j = 0; j < BS; j += 4) b.writeUInt32LE((i * 2654435761 + j) >>> 0, j);
  return b;
}

/** `self`: the distributor of a storage node, peer-0, with that store as its own disk. */
function setup(opts: { peers?: number; replication?: number; writeLevel?: WriteLevel; readLevel?: ReadLevel; capacity?: number; cache?: number; self?: boolean } = {}) {
  const n = opts.peers ?? 3;
  const transport = new MemoryTransport();
  const stores = new Map<string, MemoryBlockStore>();
  const uuids = Array.from({ length: n }, (_, i) => `peer-${i}`);
  for (const u of uuids) {
    const s = new MemoryBlockStore({ blockSize: BS, capacityBlocks: opts.capacity ?? 1000 });
    stores.set(u, s);
    transport.add(u, s);
  }
  let ring: Ring = createRing(newRingModel('ketama', opts.replication ?? 2, uuids.map((uuid) => ({ uuid, totalBlocks: 1000 })), 2));
  const dist = new Distributor({
    blockSize: BS,
    ring: () => ring,
    target: (uuid) => (stores.has(uuid) ? { uuid, address: `mem://${uuid}` } : undefined),
    transport,
    writeLevel: opts.writeLevel ?? 'all',
    readLevel: opts.readLevel ?? 'block',
    readCacheBytes: opts.cache ?? 0,
    readTimeoutMs: 50,
    ...(opts.self ? { self: { uuid: uuids[0]!, store: stores.get(uuids[0]!)! } } : {}),
  });
  const holders = (r: BlockRef): string[] => uuids.filter((u) => stores.get(u)!.hasBlock(r));
  return { dist, transport, stores, uuids, holders, setRing: (r: Ring) => (ring = r), ring: () => ring };
}

test('write level all: every block lands on exactly its R owners', async () => {
  const { dist, holders, ring } = setup();
  for (let i = 0; i < 50; i++) await dist.putBlock(ref(i), block(i));
  await dist.flush();
  for (let i = 0; i < 50; i++) {
    const owners = ring().getPeers(ref(i)).peers.slice(0, 2);
    assert.deepEqual(holders(ref(i)).sort(), [...owners].sort());
    assert.deepEqual(await dist.getBlock(ref(i)), block(i));
  }
});

test('a dead owner is replaced by the next peer in ring order (spill)', async () => {
  const { dist, transport, holders, ring } = setup({ peers: 4 });
  const r = ref(7);
  const perm = ring().getPeers(r).peers;
  transport.down.add(perm[0]!);
  await dist.putBlock(r, block(7));
  assert.deepEqual(holders(r).sort(), [perm[1]!, perm[2]!].sort());
  assert.equal(dist.stats.spills, 1);
});

test('fewer than R reachable peers is an error, never a silent partial write', async () => {
  const { dist, transport, uuids } = setup({ peers: 3, replication: 2 });
  transport.down.add(uuids[0]!);
  transport.down.add(uuids[1]!);
  await assert.rejects(dist.putBlock(ref(1), block(1)), (e) => isTorusError(e, 'NO_PEER') && /only 1 of 2/.test(e.message));
  assert.equal(dist.stats.failedWrites, 1);
});

test('full replicas report out of space to the writer', async () => {
  const { dist } = setup({ peers: 2, replication: 2, capacity: 3 });
  for (let i = 0; i < 3; i++) await dist.putBlock(ref(i), block(i));
  await assert.rejects(dist.putBlock(ref(99), block(99)), (e) => isTorusError(e, 'OUT_OF_SPACE'));
});

test('write level one stores a single copy; local needs a disk', async () => {
  const { dist, holders } = setup({ writeLevel: 'one' });
  await dist.putBlock(ref(3), block(3));
  assert.equal(holders(ref(3)).length, 1);
  assert.throws(() => setup({ writeLevel: 'local' }), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
});

test('an empty ring is an explicit error', async () => {
  const { dist, setRing } = setup();
  setRing(createRing(newRingModel('empty', 1, [], 3)));
  await assert.rejects(dist.putBlock(ref(1), block(1)), (e) => isTorusError(e, 'NO_PEER'));
  await assert.rejects(dist.getBlock(ref(1)), (e) => isTorusError(e, 'NO_PEER'));
});

for (const readLevel of ['block', 'seq', 'spread'] as const) {
  test(`read level ${readLevel}: a corrupt replica falls through to a good one and is repaired`, async () => {
    const { dist, stores, ring, holders } = setup({ readLevel });
    const r = ref(11);
    await dist.putBlock(r, block(11));
    const first = ring().getPeers(r).peers[0]!;
    stores.get(first)!.corruptBlock(r);
    assert.deepEqual(await dist.getBlock(r, crc32c(block(11))), block(11));
    await dist.idle();
    assert.ok(dist.stats.checksumFailures >= 1 || readLevel === 'spread');
    assert.ok(holders(r).includes(first), 'the bad copy was replaced');
    assert.deepEqual(await stores.get(first)!.getBlock(r), block(11));
  });

  test(`read level ${readLevel}: a dead replica does not fail the read`, async () => {
    const { dist, transport, ring } = setup({ readLevel });
    const r = ref(12);
    await dist.putBlock(r, block(12));
    transport.down.add(ring().getPeers(r).peers[0]!);
    assert.deepEqual(await dist.getBlock(r), block(12));
    assert.deepEqual(await dist.readRange(r, 100, 200), block(12).subarray(100, 300));
  });
}

test('end-to-end checksum: a replica returning other bytes is skipped and repaired', async () => {
  const { dist, stores, ring } = setup();
  const r = ref(20);
  await dist.putBlock(r, block(20));
  const first = ring().getPeers(r).peers[0]!;
  // A store that holds different bytes under the same ref (a bug or a bit flip after the check).
  await stores.get(first)!.deleteBlock(r);
  await stores.get(first)!.putBlock(r, block(21));
  assert.deepEqual(await dist.getBlock(r, crc32c(block(20))), block(20));
  await dist.idle();
  assert.deepEqual(await stores.get(first)!.getBlock(r), block(20));
});

test('every replica missing is BLOCK_UNAVAILABLE', async () => {
  const { dist } = setup();
  await assert.rejects(dist.getBlock(ref(404)), (e) => isTorusError(e, 'BLOCK_UNAVAILABLE'));
});

test('flush reaches every peer written since the last flush, and a failed flush stays pending', async () => {
  const { dist, transport, uuids } = setup({ peers: 3, replication: 3 });
  await dist.putBlock(ref(1), block(1));
  await dist.flush();
  assert.equal(transport.calls.flush, 3);
  await dist.flush();
  assert.equal(transport.calls.flush, 3, 'nothing dirty, nothing flushed');
  await dist.putBlock(ref(2), block(2));
  transport.down.add(uuids[0]!);
  await assert.rejects(dist.flush(), (e) => isTorusError(e, 'NO_PEER'));
  transport.down.delete(uuids[0]!);
  await dist.flush();
});

test('the read cache serves repeated reads without the network', async () => {
  const { dist, transport } = setup({ cache: 64 * BS });
  const r = ref(5);
  const src = block(5);
  await dist.putBlock(r, src);
  src.fill(0); // the caller reusing its buffer must not change what the cache holds
  const gets = transport.calls.get;
  assert.deepEqual(await dist.getBlock(r), block(5));
  assert.deepEqual(await dist.readRange(r, 8, 8), block(5).subarray(8, 16));
  assert.equal(transport.calls.get, gets);
  assert.ok(dist.stats.cacheHits >= 2);
});

test('a written block the cache keeps is a buffer of its own, not a view keeping the whole write in memory', async () => {
  const { dist, transport } = setup({ cache: 64 * BS });
  // One 4-block write, as an NBD WRITE of 1 MiB is 16 blocks of 64 KiB: each block a view of it.
  const write = Buffer.concat([block(1), block(2), block(3), block(4)]);
  for (let i = 0; i < 4; i++) await dist.putBlock(ref(10 + i), write.subarray(i * BS, (i + 1) * BS), { immutable: true });
  const gets = transport.calls.get;
  for (let i = 0; i < 4; i++) {
    const cached = await dist.getBlock(ref(10 + i));
    assert.deepEqual(cached, block(i + 1));
    assert.equal(cached.buffer.byteLength, BS, 'the cache holds a block-sized buffer');
  }
  assert.equal(transport.calls.get, gets, 'all four from the cache');
});

test('a whole block from a node that serves no sector checksums (an older one) is still checked against the writer CRC', async () => {
  const { dist, transport } = setup();
  (transport as unknown as { getSectors: () => Promise<undefined> }).getSectors = async () => undefined;
  await dist.putBlock(ref(7), block(7));
  assert.deepEqual(await dist.getBlock(ref(7), crc32c(block(7)) >>> 0), block(7));
  // Every replica holds other bytes than the writer's CRC says: refused, not served.
  await assert.rejects(dist.getBlock(ref(7), crc32c(block(8)) >>> 0), (e) => isTorusError(e, 'CORRUPT') || isTorusError(e, 'NO_PEER') || isTorusError(e, 'BLOCK_UNAVAILABLE'));
  assert.ok(dist.stats.checksumFailures > 0);
});

test('a replica lost between put and flush: the flush re-sends its blocks elsewhere and succeeds', async () => {
  const { dist, transport, holders, ring, stores } = setup({ peers: 4, replication: 2 });
  const refs = Array.from({ length: 40 }, (_, i) => ref(100 + i));
  for (const r of refs) await dist.putBlock(r, block(r.index));
  const victim = ring().getPeers(refs[0]!).peers[0]!;
  transport.down.add(victim);
  await dist.flush();
  assert.equal(dist.unflushedBytes, 0);
  for (const r of refs) {
    const live = holders(r).filter((u) => u !== victim);
    assert.ok(live.length >= 2, `block ${r.index} has ${live.length} live copies`);
    for (const u of live) assert.deepEqual(await stores.get(u)!.getBlock(r), block(r.index));
  }
});

test('a replica that restarts between put and flush (and lost what it had not synced): the flush re-sends its blocks elsewhere', async () => {
  const { dist, transport, holders, ring, stores } = setup({ peers: 4, replication: 2 });
  const refs = Array.from({ length: 40 }, (_, i) => ref(200 + i));
  for (const r of refs) await dist.putBlock(r, block(r.index));
  const victim = ring().getPeers(refs[0]!).peers[0]!;
  // A machine crash: its unsynced blocks are gone, and a new process answers before the flush.
  const lost = refs.filter((r) => stores.get(victim)!.hasBlock(r));
  assert.ok(lost.length > 0);
  for (const r of lost) await stores.get(victim)!.deleteBlock(r);
  transport.instances.set(victim, 'second');
  await dist.flush();
  assert.equal(dist.unflushedBytes, 0);
  for (const r of refs) {
    const copies = holders(r);
    assert.ok(copies.length >= 2, `block ${r.index} has ${copies.length} copies after a flush that succeeded`);
    for (const u of copies) assert.deepEqual(await stores.get(u)!.getBlock(r), block(r.index));
  }
  // The same process before and after: nothing is re-sent.
  const spills = dist.stats.spills;
  for (const r of refs) await dist.putBlock(ref(r.index + 100), block(r.index + 100));
  await dist.flush();
  assert.equal(dist.stats.spills, spills);
});

test('unflushed data is bounded: past the limit a put flushes first', async () => {
  const transport = new MemoryTransport();
  const store = new MemoryBlockStore({ blockSize: BS, capacityBlocks: 100 });
  transport.add('only', store);
  const ring = createRing(newRingModel('ketama', 1, [{ uuid: 'only', totalBlocks: 100 }], 2));
  const dist = new Distributor({ blockSize: BS, ring: () => ring, target: (u) => ({ uuid: u, address: 'mem://only' }), transport, maxPendingBytes: 4 * BS });
  for (let i = 0; i < 10; i++) await dist.putBlock(ref(i), block(i));
  assert.ok(transport.calls.flush >= 2, 'automatic flushes happened');
  assert.ok(dist.unflushedBytes <= 4 * BS);
});

/**
 * A client over one replica, with 16 KiB blocks and a cache of 8; block `r` (4 sectors) is on the
 * replica only, stored straight there, so nothing of it is cached yet.
 */
async function oneReplica() {
  const big = 4 * BS;
  const transport = new MemoryTransport();
  const store = new MemoryBlockStore({ blockSize: big, capacityBlocks: 10 });
  transport.add('only', store);
  const ring = createRing(newRingModel('ketama', 1, [{ uuid: 'only', totalBlocks: 10 }], 2));
  const dist = new Distributor({ blockSize: big, ring: () => ring, target: (u) => ({ uuid: u, address: 'mem://only' }), transport, readCacheBytes: 8 * big });
  const data = Buffer.concat([block(1), block(2), block(3), block(4)]);
  const r = ref(7);
  await store.putBlock(r, data);
  const gets = (): number => transport.calls.get;
  return { big, transport, ring, dist, data, r, gets, g0: gets() };
}

test('ranged reads fill the cache by 4 KiB chunk: a re-read hits, a read of other chunks goes out', async () => {
  const { big, transport, ring, dist, data, r, gets, g0 } = await oneReplica();
  assert.deepEqual(await dist.readRange(r, BS + 100, 50), data.subarray(BS + 100, BS + 150));
  assert.equal(gets(), g0 + 1);
  // Same chunk, other bytes: from the cache.
  assert.deepEqual(await dist.readRange(r, BS, BS), data.subarray(BS, 2 * BS));
  assert.equal(gets(), g0 + 1);
  // Spanning a cached and an uncached chunk: fetched, then both are cached.
  assert.deepEqual(await dist.readRange(r, 2 * BS - 10, 20), data.subarray(2 * BS - 10, 2 * BS + 10));
  assert.equal(gets(), g0 + 2);
  assert.deepEqual(await dist.readRange(r, BS + 5, BS + 10), data.subarray(BS + 5, 2 * BS + 15));
  assert.equal(gets(), g0 + 2);
  assert.ok(dist.stats.cacheHits >= 2);
  // Without a cache every ranged read goes to a replica.
  const plain = new Distributor({ blockSize: big, ring: () => ring, target: (u) => ({ uuid: u, address: 'mem://only' }), transport });
  await plain.readRange(r, 0, 10);
  await plain.readRange(r, 0, 10);
  assert.equal(gets(), g0 + 4);
});

test('a sequential stream is answered from the cache but not kept in it', async () => {
  const { dist, data, r, gets, g0 } = await oneReplica();
  // Whole blocks and ranges of a stream: fetched every time, nothing kept.
  assert.deepEqual(await dist.getBlock(r, undefined, true), data);
  assert.deepEqual(await dist.getBlock(r, undefined, true), data);
  assert.deepEqual(await dist.readRange(r, BS, BS, undefined, true), data.subarray(BS, 2 * BS));
  assert.deepEqual(await dist.readRange(r, BS, BS, undefined, true), data.subarray(BS, 2 * BS));
  assert.equal(gets(), g0 + 4);
  assert.equal(dist.stats.cacheBypasses, 4);
  assert.equal(dist.stats.cacheHits, 0);
  assert.equal(dist.memory().readCache, 0);
  // A read outside a stream keeps the block; a stream's read of it is then a hit.
  assert.deepEqual(await dist.getBlock(r), data);
  assert.equal(gets(), g0 + 5);
  assert.deepEqual(await dist.getBlock(r, undefined, true), data);
  assert.deepEqual(await dist.readRange(r, 2 * BS, 10, undefined, true), data.subarray(2 * BS, 2 * BS + 10));
  assert.equal(gets(), g0 + 5);
  assert.equal(dist.stats.cacheHits, 2);
});

test("a storage node reads another node's block straight into the caller's buffer when the cache will not keep it", async () => {
  for (const [cache, readLevel] of [
    [64 * BS, 'block'],
    [0, 'block'],
    [0, 'spread'],
  ] as const) {
    const { dist, transport, stores, ring } = setup({ cache, readLevel, self: true });
    // Blocks this node does not hold, stored straight on their owners.
    const remote: BlockRef[] = [];
    for (let i = 0; remote.length < 4; i++) {
      const owners = ring().getPeers(ref(i)).peers.slice(0, 2);
      if (owners.includes('peer-0')) continue;
      for (const o of owners) await stores.get(o)!.putBlock(ref(i), block(i));
      remote.push(ref(i));
    }
    const mode = `cache ${cache}, read level ${readLevel}`;
    const read = async (r: BlockRef, sequential: boolean): Promise<void> => {
      const into = Buffer.alloc(BS, 0xee);
      await dist.readRangeInto!(r, 0, into, crc32c(block(r.index)) >>> 0, sequential);
      assert.ok(into.equals(block(r.index)), mode);
      const part = Buffer.alloc(1024, 0xee);
      await dist.readRangeInto!(r, 2048, part.subarray(0, 1024), crc32c(block(r.index)) >>> 0, sequential);
      assert.ok(part.equals(block(r.index).subarray(2048, 3072)), mode);
    };
    await read(remote[0]!, true);
    await read(remote[1]!, false);
    if (readLevel === 'spread') assert.equal(transport.getsInto, 0, `${mode}: replicas asked at once never share the buffer`);
    else if (cache > 0) assert.equal(transport.getsInto, 1, `${mode}: only the sequential whole block (the unaligned part is copied)`);
    else assert.equal(transport.getsInto, 2, `${mode}: every aligned read`);
    // A bad first replica: the next one's bytes replace what it wrote.
    if (readLevel === 'block' && cache === 0) {
      const r = remote[2]!;
      const first = ring().getPeers(r).peers[0]!;
      const bad = stores.get(first)!;
      const orig = bad.readSectors.bind(bad);
      bad.readSectors = async (...args) => {
        const got = await orig(...args);
        const data = Buffer.from(got.data);
        data[10]! ^= 1;
        return { ...got, data };
      };
      await read(r, true);
      assert.ok(dist.stats.checksumFailures >= 1, mode);
      await dist.idle();
    }
  }
});

test('a storage node does not cache what it writes; a client does', async () => {
  for (const self of [true, false]) {
    const { dist, transport, ring } = setup({ cache: 64 * BS, self });
    let r = ref(0);
    for (let i = 0; ring().getPeers(r).peers.slice(0, 2).includes('peer-0'); i++) r = ref(i + 1);
    await dist.putBlock(r, block(r.index));
    await dist.flush();
    const gets = transport.calls.get;
    assert.deepEqual(await dist.getBlock(r), block(r.index));
    assert.equal(transport.calls.get - gets, self ? 1 : 0, self ? 'the storage node fetched it' : 'the client had it cached');
    // Read once, it is kept either way.
    assert.deepEqual(await dist.getBlock(r), block(r.index));
    assert.equal(transport.calls.get - gets, self ? 1 : 0);
  }
});

test('cached chunks are copies: a small payload that is a view of a big receive buffer is not kept pinned', async () => {
  const big = 4 * BS;
  const transport = new MemoryTransport();
  const store = new MemoryBlockStore({ blockSize: big, capacityBlocks: 10 });
  transport.add('only', store);
  // Like the peer RPC decoder: a 4 KiB range read comes back as a view of a 64 KiB socket read.
  const get = transport.get.bind(transport);
  transport.get = async (...args: Parameters<MemoryTransport['get']>) => {
    const data = await get(...args);
    const socketRead = Buffer.alloc(65536);
    data.copy(socketRead, 1000);
    return socketRead.subarray(1000, 1000 + data.length);
  };
  const ring = createRing(newRingModel('ketama', 1, [{ uuid: 'only', totalBlocks: 10 }], 2));
  const dist = new Distributor({ blockSize: big, ring: () => ring, target: (u) => ({ uuid: u, address: 'mem://only' }), transport, readCacheBytes: 8 * big });
  const data = Buffer.concat([block(1), block(2), block(3), block(4)]);
  const r = ref(8);
  await store.putBlock(r, data);
  assert.deepEqual(await dist.readRange(r, BS, 100), data.subarray(BS, BS + 100));
  const hit = await dist.readRange(r, BS, 100);
  assert.deepEqual(hit, data.subarray(BS, BS + 100));
  assert.equal(transport.calls.get, 1, 'the second read was a cache hit');
  assert.ok(hit.buffer.byteLength <= BS, `the cached chunk holds ${hit.buffer.byteLength} bytes of memory`);
});
