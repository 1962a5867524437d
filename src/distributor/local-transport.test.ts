import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { crc32c } from '@node-rs/crc32';
import { isTorusError } from '../core/errors.js';
import { BlockType } from '../core/ids.js';
import { MemoryMetadataStore } from '../metadata/memory/memory.js';
import { createRing, newRingModel } from '../ring/index.js';
import { MemoryBlockStore } from '../storage/memory-store.js';
import { VolumeMeta } from '../volume/meta.js';
import { logIndex, logRef } from '../volume/journal-format.js';
import { BlockVolume } from '../volume/volume.js';
import { Distributor } from './distributor.js';
import { MemoryTransport } from './memory-transport.js';
import type { PeerTarget, PeerTransport } from './transport.js';

// A storage node that serves volumes (torusd --nbd-listen) reaches its own replicas through its
// disk, never through the network; the journal's fencing holds on that path as on the network's.

const BS = 4096;

/** Two storage nodes "a" and "b" at R=2, so every block and journal has a copy on each. */
async function twoNodes() {
  const md = new MemoryMetadataStore();
  const meta = md.client();
  const transport = new MemoryTransport();
  const a = new MemoryBlockStore({ blockSize: BS, capacityBlocks: 10_000 });
  const b = new MemoryBlockStore({ blockSize: BS, capacityBlocks: 10_000 });
  // "a" is reachable over the network too, as a real node is: a call to it there would be seen.
  transport.add('a', a);
  transport.add('b', b);
  // What node a's distributor sends over the network, by operation and peer.
  const calls: string[] = [];
  const recording = Object.create(transport) as Record<string, (peer: PeerTarget, ...rest: unknown[]) => Promise<unknown>>;
  for (const m of ['get', 'getSectors', 'put', 'has', 'delete', 'flush', 'hasJournal', 'appendLog', 'sealLog', 'fenceVolume', 'readRaw']) {
    const inner = (transport as unknown as typeof recording)[m]!.bind(transport);
    recording[m] = (peer, ...rest) => {
      calls.push(`${m} ${peer.uuid}`);
      return inner(peer, ...rest);
    };
  }
  const ring = createRing(newRingModel('ketama', 2, [{ uuid: 'a', totalBlocks: 10_000 }, { uuid: 'b', totalBlocks: 10_000 }], 2));
  const opts = { blockSize: BS, ring: () => ring, target: (uuid: string) => ({ uuid, address: `mem://${uuid}` }), transport };
  // Node a's own distributor, as torusd builds it; and a client's, with no disk of its own.
  const node = new Distributor({ ...opts, transport: recording as unknown as PeerTransport, self: { uuid: 'a', store: a } });
  const client = new Distributor(opts);
  const vmeta = new VolumeMeta(meta.kv());
  return { meta, vmeta, a, b, node, client, calls };
}

test("a node's distributor reads and writes its own replicas on its disk: no call to its uuid goes over the network", async () => {
  const c = await twoNodes();
  await c.vmeta.create('v', 64 * BS);
  const session = await c.meta.kv().session(10_000);
  const vol = await BlockVolume.open({ meta: c.vmeta, store: c.node, session }, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const data = randomBytes(40 * BS);
  await vol.write(3 * BS + 100, data);
  await vol.flush(); // journal appends, on both replicas
  await vol.foldAll(); // whole data blocks, put and flushed on both
  await vol.close(); // a checkpoint: sealed log blocks, inode pages
  const reader = await BlockVolume.open({ meta: c.vmeta, store: c.node, session }, 'v', { readOnly: true });
  assert.deepEqual(await reader.read(3 * BS + 100, data.length), data);
  // Partial reads, checked end to end, from the local replica first.
  assert.deepEqual(await reader.read(10 * BS + 7, 300), data.subarray(7 * BS - 93, 7 * BS + 207));
  await reader.close();

  assert.deepEqual(
    c.calls.filter((x) => x.endsWith(' a')),
    [],
    'nothing addressed to node a went through the network transport',
  );
  for (const op of ['put', 'flush', 'appendLog', 'sealLog']) assert.ok(c.calls.includes(`${op} b`), `the other replica got ${op} over the network`);
  const st = c.a.stats();
  assert.ok(st.writes > 0 && st.journalBytesWritten > 0 && st.reads > 0, `node a's disk took the blocks and the journal, and served reads: ${JSON.stringify(st)}`);
  assert.equal(c.a.usedBlocks(), c.b.usedBlocks(), 'both replicas hold every block');
});

test("the journal's fencing holds through the local path: a writer on the node whose lock was taken gets nothing more acknowledged", async () => {
  const c = await twoNodes();
  await c.vmeta.create('v', 8 * BS);
  const s1 = await c.meta.kv().session(10_000);
  const onNode = await BlockVolume.open({ meta: c.vmeta, store: c.node, session: s1 }, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  await onNode.write(0, Buffer.alloc(BS, 1));
  await onNode.flush();
  // The lock vanishes behind the node's back, and a client elsewhere opens the volume: it fences
  // the journal on both replicas (node a's over the network) and replays it.
  const id = (await c.vmeta.get('v')).id;
  await c.meta.kv().txn([], [{ op: 'delete', key: `/torus/volumemeta/${id}/lock` }]);
  const s2 = await c.meta.kv().session(10_000);
  const elsewhere = await BlockVolume.open({ meta: c.vmeta, store: c.client, session: s2 }, 'v');
  const refusedBefore = c.a.stats().fencedRefusals;
  await onNode.write(BS, Buffer.alloc(BS, 2));
  await assert.rejects(onNode.flush(), (e) => isTorusError(e, 'LOCKED'));
  assert.ok(c.a.stats().fencedRefusals > refusedBefore, "node a's own store refused the fenced writer's append");
  assert.ok(!c.calls.includes('appendLog a') && c.calls.includes('appendLog b'), `which came through the local path, not the network: ${c.calls.join(', ')}`);
  assert.deepEqual(await elsewhere.read(0, 2 * BS), Buffer.concat([Buffer.alloc(BS, 1), Buffer.alloc(BS)]));
  await elsewhere.close();
});

test("a writer inside a storage node puts its journal on a segment that node owns: one replica's appends stay on its disk", async () => {
  const md = new MemoryMetadataStore();
  const meta = md.client();
  const transport = new MemoryTransport();
  const stores = new Map(['a', 'b', 'c'].map((u) => [u, new MemoryBlockStore({ blockSize: BS, capacityBlocks: 10_000 })]));
  for (const [u, s] of stores) transport.add(u, s);
  const ring = createRing(newRingModel('ketama', 2, [...stores.keys()].map((uuid) => ({ uuid, totalBlocks: 10_000 })), 2));
  const opts = { blockSize: BS, ring: () => ring, target: (uuid: string) => ({ uuid, address: `mem://${uuid}` }), transport };
  const node = new Distributor({ ...opts, self: { uuid: 'a', store: stores.get('a')! } });
  const client = new Distributor(opts);
  const vmeta = new VolumeMeta(meta.kv());
  const session = await meta.kv().session(10_000);
  // Volumes whose first segment (of their first session, epoch 1) node a does not own.
  const firstOwners = (id: number): readonly string[] => ring.getPeers(logRef({ volume: id, epoch: 1, index: logIndex(0, 0) })).peers.slice(0, 2);
  let checked = 0;
  for (let i = 0; checked < 3 && i < 60; i++) {
    const rec = await vmeta.create(`v${i}`, 16 * BS);
    if (firstOwners(rec.id).includes('a')) continue;
    checked++;
    const mine = await BlockVolume.open({ meta: vmeta, store: node, session }, `v${i}`, { checkpointIntervalMs: 0, snapshotPollMs: 0 });
    assert.ok(mine.head.journal!.replicas.includes('a'), `node a's writer journals on a segment a owns: ${JSON.stringify(mine.head.journal)}`);
    assert.ok(mine.head.journal!.segment > 0);
    const data = randomBytes(3 * BS);
    await mine.write(0, data);
    await mine.flush();
    await mine.close();
    // A client with no disk of its own takes the first segment that works, as before.
    const theirs = await BlockVolume.open({ meta: vmeta, store: client, session }, `v${i}`, { checkpointIntervalMs: 0, snapshotPollMs: 0 });
    assert.deepEqual(await theirs.read(0, data.length), data);
    assert.deepEqual([...theirs.head.journal!.replicas].sort(), [...ring.getPeers(logRef({ volume: rec.id, epoch: theirs.head.journal!.epoch, index: logIndex(theirs.head.journal!.segment, 0) })).peers.slice(0, 2)].sort());
    await theirs.close();
  }
  assert.equal(checked, 3, 'volumes whose first segment node a does not own were found');
});

test("a node's read cache keeps what came over the network, not its own replicas (the kernel's page cache has those)", async () => {
  const bs = 4 * BS;
  const transport = new MemoryTransport();
  const stores = new Map(['a', 'b', 'c'].map((u) => [u, new MemoryBlockStore({ blockSize: bs, capacityBlocks: 1000 })]));
  for (const [u, s] of stores) transport.add(u, s);
  const calls: string[] = [];
  const recording = Object.create(transport) as Record<string, (peer: PeerTarget, ...rest: unknown[]) => Promise<unknown>>;
  for (const m of ['get', 'getSectors']) {
    const inner = (transport as unknown as typeof recording)[m]!.bind(transport);
    recording[m] = (peer, ...rest) => {
      calls.push(`${m} ${peer.uuid}`);
      return inner(peer, ...rest);
    };
  }
  const ring = createRing(newRingModel('ketama', 2, [...stores.keys()].map((uuid) => ({ uuid, totalBlocks: 1000 })), 2));
  const a = stores.get('a')!;
  const node = new Distributor({
    blockSize: bs,
    ring: () => ring,
    target: (uuid: string) => ({ uuid, address: `mem://${uuid}` }),
    transport: recording as unknown as PeerTransport,
    self: { uuid: 'a', store: a },
    readCacheBytes: 256 * bs,
  });
  const refs = Array.from({ length: 40 }, (_, i) => ({ type: BlockType.Data, volume: 1, inode: 1, index: i }));
  const blocks = refs.map(() => randomBytes(bs));
  // Written by a client elsewhere, so that nothing is cached yet.
  const writer = new Distributor({ blockSize: bs, ring: () => ring, target: (uuid: string) => ({ uuid, address: `mem://${uuid}` }), transport });
  for (let i = 0; i < refs.length; i++) await writer.putBlock(refs[i]!, blocks[i]!);
  await writer.flush();
  const local = refs.filter((r) => a.hasBlock(r));
  const remote = refs.filter((r) => !a.hasBlock(r));
  assert.ok(local.length > 5 && remote.length > 5, `both kinds of block: ${local.length} local, ${remote.length} remote`);

  const readsBefore = a.stats().reads;
  for (let round = 0; round < 2; round++) {
    for (const r of refs) {
      const want = blocks[r.index]!;
      const crc = crc32c(want) >>> 0;
      assert.deepEqual(await node.getBlock(r, crc), want);
      assert.deepEqual(await node.readRange(r, BS + 100, 300, crc), want.subarray(BS + 100, BS + 400));
      assert.deepEqual(await node.readRange(r, 2 * BS, BS, crc), want.subarray(2 * BS, 3 * BS));
    }
  }
  // Every read of a local block went to the disk, each time; a remote block crossed the network
  // once, and was served from the cache afterwards.
  assert.equal(a.stats().reads - readsBefore, local.length * 6);
  assert.equal(calls.length, remote.length, `one network read per remote block: ${calls.join(', ')}`);
  assert.ok(!calls.some((c) => c.endsWith(' a')));
  assert.equal(node.memory().readCache, remote.length * bs, 'the cache holds the remote blocks only');

  // What the node writes is not cached at all, wherever its replicas are: the host that wrote it
  // over NBD has it in its own page cache.
  const more = Array.from({ length: 20 }, (_, i) => ({ type: BlockType.Data, volume: 2, inode: 1, index: i }));
  for (const r of more) await node.putBlock(r, randomBytes(bs));
  await node.flush();
  const remoteMore = more.filter((r) => !a.hasBlock(r)).length;
  assert.ok(remoteMore > 0 && remoteMore < more.length);
  assert.equal(node.memory().readCache, remote.length * bs);
});

test("a node's own copy that is corrupt: the read goes to the other replica, counts a fallback, and the local copy is repaired", async () => {
  const c = await twoNodes();
  const data = randomBytes(BS);
  const crc = crc32c(data);
  for (const [i, whole] of [[1, true], [2, false]] as const) {
    const r = { volume: 1, inode: 1, index: i, type: BlockType.Data };
    await c.node.putBlock(r, data, { crc });
    await c.node.flush();
    c.a.corruptBlock(r);
    const before = c.node.stats.replicaFallbacks;
    const got = whole ? await c.node.getBlock(r, crc) : await c.node.readRange(r, 100, 200, crc);
    assert.deepEqual(got, whole ? data : data.subarray(100, 300));
    assert.equal(c.node.stats.replicaFallbacks, before + 1, 'served by the other replica');
    assert.ok(c.calls.includes('getSectors b'), 'asked b over the network');
    await c.node.idle();
    assert.deepEqual(await c.a.getBlock(r), data, 'node a holds a good copy again');
  }
  assert.equal(c.node.stats.checksumFailures, 2);
  assert.equal(c.node.stats.repairs, 2);
});

test("readRangeInto fills the caller's buffer: a node's own replica straight from its disk, every other block copied in", async () => {
  const c = await twoNodes();
  // What node a's store read into, to see that it was the caller's own memory.
  const intos: Buffer[] = [];
  const inner = c.a.readSectorsInto.bind(c.a);
  c.a.readSectorsInto = async (ref, offset, into) => {
    const read = await inner(ref, offset, into);
    if (read) intos.push(into);
    return read;
  };
  const refs = Array.from({ length: 30 }, (_, i) => ({ type: BlockType.Data, volume: 1, inode: 1, index: i }));
  const blocks = refs.map(() => randomBytes(BS));
  for (let i = 0; i < refs.length; i++) await c.node.putBlock(refs[i]!, blocks[i]!, { crc: crc32c(blocks[i]!) >>> 0 });
  await c.node.flush();
  // R=2 of two nodes: a holds everything. Drop some of a's copies so that those come from b.
  const remote = refs.filter((_, i) => i % 3 === 0);
  for (const r of remote) await c.a.deleteBlock(r);
  c.calls.length = 0;
  for (const r of refs) {
    const want = blocks[r.index]!;
    const crc = crc32c(want) >>> 0;
    const whole = Buffer.alloc(BS, 0xee);
    intos.length = 0;
    await c.node.readRangeInto!(r, 0, whole, crc);
    assert.deepEqual(whole, want, `block ${r.index}`);
    const local = !remote.includes(r);
    assert.equal(intos.length === 1 && intos[0] === whole, local, `block ${r.index}: read into the caller's buffer by the store only when local`);
    // Inside one sector: read as a range and copied in.
    const page = Buffer.alloc(2048, 0xee);
    await c.node.readRangeInto!(r, 1024, page, crc);
    assert.deepEqual(page, want.subarray(1024, 3072));
  }
  assert.equal(c.calls.filter((x) => x === 'getSectors b').length, remote.length * 2, `only b's blocks crossed the network: ${c.calls.join(', ')}`);
  assert.ok(!c.calls.some((x) => x.endsWith(' a')));
  await assert.rejects(c.node.readRangeInto!(refs[1]!, BS - 10, Buffer.alloc(11), crc32c(blocks[1]!)), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  // A client with no disk of its own gets every block as a buffer anyway: it has no readRangeInto,
  // and its volumes no readInto (the NBD server sends their pieces as they are).
  assert.equal(c.client.readRangeInto, undefined);
});

test('readRangeInto of a corrupt own copy: the caller gets the other replica\'s bytes, a fallback is counted, the copy is repaired', async () => {
  const c = await twoNodes();
  const data = randomBytes(BS);
  const crc = crc32c(data) >>> 0;
  const r = { volume: 1, inode: 1, index: 7, type: BlockType.Data };
  await c.node.putBlock(r, data, { crc });
  await c.node.flush();
  c.a.corruptBlock(r);
  const into = Buffer.alloc(BS, 0xee);
  await c.node.readRangeInto!(r, 0, into, crc);
  assert.deepEqual(into, data);
  assert.equal(c.node.stats.replicaFallbacks, 1);
  assert.equal(c.node.stats.checksumFailures, 1);
  await c.node.idle();
  assert.deepEqual(await c.a.getBlock(r), data, 'node a holds a good copy again');
  assert.equal(c.node.stats.repairs, 1);
});
