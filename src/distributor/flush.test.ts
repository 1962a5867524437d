import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isTorusError } from '../core/errors.js';
import { BlockType, blockRefKey, type BlockRef } from '../core/ids.js';
import { MemoryMetadataStore } from '../metadata/memory/memory.js';
import { createRing, newRingModel } from '../ring/index.js';
import { MemoryBlockStore } from '../storage/memory-store.js';
import { VolumeMeta } from '../volume/meta.js';
import { BlockVolume } from '../volume/volume.js';
import { Distributor } from './distributor.js';
import { MemoryTransport } from './memory-transport.js';
import type { PeerTarget, PutItem } from './transport.js';

// A flush is a promise about every put issued before it, whoever else is flushing: these tests
// record, per peer, which puts each fsync covered, and check the promise when each flush returns.

const BS = 4096;

/** A transport whose flushes are slow, and which records which puts each completed flush covered. */
class RecordingTransport extends MemoryTransport {
  /** Per peer: refs whose put completed, and refs a completed flush made durable. */
  readonly taken = new Map<string, Set<string>>();
  readonly synced = new Map<string, Set<string>>();
  flushDelayMs = 20;
  failFlush = new Set<string>();

  override async put(peer: PeerTarget, items: readonly PutItem[]) {
    const out = await super.put(peer, items);
    let set = this.taken.get(peer.uuid);
    if (!set) this.taken.set(peer.uuid, (set = new Set()));
    items.forEach((it, i) => out[i] === null && set.add(blockRefKey(it.ref)));
    return out;
  }

  override async flush(peer: PeerTarget): Promise<void> {
    // What the fsync covers is what the peer had taken when it started.
    const covered = [...(this.taken.get(peer.uuid) ?? [])];
    await new Promise((r) => setTimeout(r, this.flushDelayMs));
    if (this.failFlush.has(peer.uuid)) throw new Error(`flush of ${peer.uuid} failed`);
    await super.flush(peer);
    let set = this.synced.get(peer.uuid);
    if (!set) this.synced.set(peer.uuid, (set = new Set()));
    for (const k of covered) set.add(k);
  }

  /** How many peers hold `key` on stable storage. */
  durableCopies(key: string): number {
    let n = 0;
    for (const s of this.synced.values()) if (s.has(key)) n++;
    return n;
  }

  /** Every ref of `volume` any peer took (blockRefKey is type:volume:inode:index). */
  takenOf(volume: number): string[] {
    const out = new Set<string>();
    for (const s of this.taken.values()) for (const k of s) if (Number(k.split(':')[1]) === volume) out.add(k);
    return [...out];
  }
}

function setup(peers = 3, replication = 2) {
  const transport = new RecordingTransport();
  const uuids = Array.from({ length: peers }, (_, i) => `p${i}`);
  for (const u of uuids) transport.add(u, new MemoryBlockStore({ blockSize: BS, capacityBlocks: 10_000 }));
  const ring = createRing(newRingModel('ketama', replication, uuids.map((uuid) => ({ uuid, totalBlocks: 10_000 })), 2));
  const dist = new Distributor({ blockSize: BS, ring: () => ring, target: (uuid) => ({ uuid, address: `mem://${uuid}` }), transport });
  return { transport, dist, uuids, ring };
}

function ref(volume: number, index: number): BlockRef {
  return { type: BlockType.Data, volume, inode: 1, index };
}

test('overlapping checkpoints of two volumes in one process: each commits only when its puts are on R replicas', async () => {
  // A volume's flush is a journal append; its checkpoint stores run pages (and folded blocks)
  // through the distributor and flushes it, and two volumes' checkpoints share one distributor.
  const { transport, dist } = setup();
  const md = new MemoryMetadataStore();
  const vmeta = new VolumeMeta(md.client().kv());
  const session = await md.client().kv().session(10_000);
  const ctx = { meta: vmeta, store: dist, session };
  await vmeta.create('a', 64 * BS);
  await vmeta.create('b', 64 * BS);
  const quiet = { checkpointIntervalMs: 0, snapshotPollMs: 0, foldIdleMs: 0 };
  const a = await BlockVolume.open(ctx, 'a', quiet);
  const b = await BlockVolume.open(ctx, 'b', quiet);
  for (let round = 0; round < 5; round++) {
    for (let i = 0; i < 8; i++) {
      await a.write(i * BS, Buffer.alloc(BS, 1 + round));
      await b.write(i * BS * 2, Buffer.alloc(BS, 100 + round));
    }
    await Promise.all([a.flush(), b.flush()]);
    const check = (vol: BlockVolume) => () => {
      const refs = transport.takenOf(vol.record.id);
      assert.ok(refs.length > 0);
      const short = refs.filter((k) => transport.durableCopies(k) < 2);
      assert.deepEqual(short, [], `volume ${vol.name}: ${short.length} of ${refs.length} puts short of 2 durable copies when its checkpoint returned`);
    };
    // Both checkpoints put their pages at once; whichever flush pass starts first takes both
    // volumes' pending puts, and the other must still wait for that pass's fsyncs.
    await Promise.all([a.checkpoint().then(check(a)), b.checkpoint().then(check(b))]);
  }
  await a.close();
  await b.close();
});

test('a flush that starts while another runs waits for a pass that covers its puts', async () => {
  const { transport, dist } = setup();
  for (let i = 0; i < 10; i++) await dist.putBlock(ref(1, i), Buffer.alloc(BS, i));
  // The first flush's pass takes every pending put; the second caller's puts are among them, and
  // it must not return before that pass's fsyncs do.
  const first = dist.flush();
  const second = dist.flush().then(() => {
    for (let i = 0; i < 10; i++) assert.equal(transport.durableCopies(blockRefKey(ref(1, i))), 2, `block ${i} when the second flush returned`);
  });
  for (let i = 0; i < 10; i++) await dist.putBlock(ref(2, i), Buffer.alloc(BS, i));
  const third = dist.flush().then(() => {
    for (let i = 0; i < 10; i++) assert.equal(transport.durableCopies(blockRefKey(ref(2, i))), 2, `block ${i} of the later batch when the third flush returned`);
  });
  await Promise.all([first, second, third]);
});

test('a flush waits for puts issued before it that are still running', async () => {
  const { transport, dist } = setup();
  transport.flushDelayMs = 1;
  // Puts that have not completed when flush() is called.
  const puts = Array.from({ length: 10 }, (_, i) => dist.putBlock(ref(3, i), Buffer.alloc(BS, i)));
  await dist.flush();
  for (let i = 0; i < 10; i++) assert.equal(transport.durableCopies(blockRefKey(ref(3, i))), 2);
  await Promise.all(puts);
});

test('a block a failed flush could not place stays pending: a later flush fails too, until it is placed', async () => {
  // Two peers at R=2: when one's flush fails there is nowhere else for the copy.
  const { transport, dist, uuids } = setup(2, 2);
  await dist.putBlock(ref(4, 0), Buffer.alloc(BS, 7));
  transport.failFlush.add(uuids[0]!);
  await assert.rejects(dist.flush(), (e) => isTorusError(e, 'NO_PEER'));
  // Another caller's flush (say, another volume's) must not report success for the earlier put.
  await assert.rejects(dist.flush(), (e) => isTorusError(e, 'NO_PEER'));
  assert.ok(dist.unflushedBytes > 0);
  transport.failFlush.clear();
  await dist.flush();
  assert.equal(transport.durableCopies(blockRefKey(ref(4, 0))), 2);
  assert.equal(dist.unflushedBytes, 0);
});
