import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BlockType, type BlockRef } from '../core/ids.js';
import type { Ring } from '../core/interfaces.js';
import { addPeers, changeReplication, createRing, newRingModel, removePeers } from '../ring/index.js';
import { MemoryBlockStore } from '../storage/memory-store.js';
import { Distributor } from './distributor.js';
import { MemoryTransport } from './memory-transport.js';
import { Rebalancer, type RebalanceOptions } from './rebalance.js';

const BS = 4096;
const ref = (i: number): BlockRef => ({ type: BlockType.Data, volume: 3, inode: 1, index: i });
const data = (i: number): Buffer => Buffer.alloc(BS, i % 251);

function cluster(n: number) {
  const transport = new MemoryTransport();
  const stores = new Map<string, MemoryBlockStore>();
  const uuids = Array.from({ length: 5 }, (_, i) => `p${i}`);
  for (const u of uuids) {
    const s = new MemoryBlockStore({ blockSize: BS, capacityBlocks: 10_000 });
    stores.set(u, s);
    transport.add(u, s);
  }
  let model = newRingModel('ketama', 2, uuids.slice(0, n).map((uuid) => ({ uuid, totalBlocks: 10_000 })), 2);
  let ring: Ring = createRing(model);
  const target = (u: string) => ({ uuid: u, address: `mem://${u}` });
  const dist = new Distributor({ blockSize: BS, ring: () => ring, target, transport });
  /** A rebalancer for node `u` over this cluster; `extra` overrides its options. */
  const rebalancer = (u: string, extra: Partial<RebalanceOptions> = {}): Rebalancer =>
    new Rebalancer({ self: { uuid: u, store: stores.get(u)! }, ring: () => ring, target, transport, blockSize: BS, ...extra });
  const rebalancers = uuids.map((u) => rebalancer(u));
  return {
    transport,
    stores,
    uuids,
    dist,
    rebalancer,
    ring: () => ring,
    setModel(m: typeof model) {
      model = m;
      ring = createRing(m);
    },
    model: () => model,
    /** Runs passes on every live node until nothing moves. */
    async settle(down: string[] = []) {
      for (let round = 0; round < 10; round++) {
        let moved = 0;
        for (const [i, u] of uuids.entries()) if (!down.includes(u)) moved += await rebalancers[i]!.pass();
        if (moved === 0) return round;
      }
      throw new Error('did not settle');
    },
    copies(r: BlockRef, down: string[] = []) {
      return uuids.filter((u) => !down.includes(u) && stores.get(u)!.hasBlock(r));
    },
  };
}

async function writeAll(c: ReturnType<typeof cluster>, n: number): Promise<void> {
  for (let i = 0; i < n; i++) await c.dist.putBlock(ref(i), data(i));
  await c.dist.flush();
}

function assertPlaced(c: ReturnType<typeof cluster>, n: number, down: string[] = []): void {
  for (let i = 0; i < n; i++) {
    const perm = c.ring().getPeers(ref(i));
    const owners = perm.peers.slice(0, perm.replication);
    assert.deepEqual(c.copies(ref(i), down).sort(), [...owners].sort(), `block ${i}`);
  }
}

test('after a peer joins, blocks move to their new owners and leave the old ones', async () => {
  const c = cluster(3);
  await writeAll(c, 300);
  c.setModel(addPeers(c.model(), [{ uuid: 'p3', totalBlocks: 10_000 }]));
  await c.settle();
  assertPlaced(c, 300);
  assert.ok(c.stores.get('p3')!.usedBlocks() > 100);
});

test('after a peer is removed it drains to nothing, and everything keeps R copies', async () => {
  const c = cluster(4);
  await writeAll(c, 300);
  c.setModel(removePeers(c.model(), ['p1']));
  await c.settle();
  assert.equal(c.stores.get('p1')!.usedBlocks(), 0);
  assertPlaced(c, 300);
});

test('a node lost for good and force-removed: every block is back to R copies', async () => {
  const c = cluster(4);
  await writeAll(c, 300);
  c.transport.down.add('p2');
  c.setModel(removePeers(c.model(), ['p2']));
  await c.settle(['p2']);
  assertPlaced(c, 300, ['p2']);
});

test('raising replication to 3 makes third copies', async () => {
  const c = cluster(4);
  await writeAll(c, 200);
  c.setModel(changeReplication(c.model(), 3));
  await c.settle();
  assertPlaced(c, 200);
  for (let i = 0; i < 200; i++) assert.equal(c.copies(ref(i)).length, 3);
});

test('nothing is deleted on account of an owner that cannot be reached', async () => {
  const c = cluster(3);
  await writeAll(c, 100);
  c.setModel(addPeers(c.model(), [{ uuid: 'p3', totalBlocks: 10_000 }]));
  c.transport.down.add('p3');
  await c.settle(['p3']);
  for (let i = 0; i < 100; i++) assert.ok(c.copies(ref(i)).length >= 2, `block ${i} kept its copies`);
  c.transport.down.delete('p3');
  await c.settle();
  assertPlaced(c, 100);
});

/** Adds p3 to the ring: the blocks it now owns, and those of them p0 held and no longer owns. */
function addP3(c: ReturnType<typeof cluster>, n: number) {
  c.setModel(addPeers(c.model(), [{ uuid: 'p3', totalBlocks: 10_000 }]));
  const owners = (i: number): string[] => c.ring().getPeers(ref(i)).peers.slice(0, 2);
  const owned = Array.from({ length: n }, (_, i) => i).filter((i) => owners(i).includes('p3'));
  const drainedByP0 = owned.filter((i) => c.copies(ref(i)).includes('p0') && !owners(i).includes('p0'));
  assert.ok(drainedByP0.length > 0, 'p0 holds blocks it no longer owns');
  return { p3: c.stores.get('p3')!, owned };
}

/**
 * The first flush sent to `uuid` finds its machine crashed and back: `lose` takes away what it had
 * not synced, and a new process answers. Returns whether that happened.
 */
function crashBeforeFirstFlush(c: ReturnType<typeof cluster>, uuid: string, lose: () => Promise<void>): () => boolean {
  const flush = c.transport.flush.bind(c.transport);
  let crashed = false;
  c.transport.flush = async (peer) => {
    if (peer.uuid === uuid && !crashed) {
      crashed = true;
      await lose();
      c.transport.instances.set(uuid, 'second');
    }
    return flush(peer);
  };
  return () => crashed;
}

test('an owner that says it has a block but cannot flush it: nothing is deleted on its account', async () => {
  const c = cluster(3);
  await writeAll(c, 100);
  // p3 already holds, unsynced, every block it now owns (another node's move in flight, or a
  // client's put that timed out but landed), so HAS says yes; but its flush fails.
  const { p3, owned } = addP3(c, 100);
  for (const i of owned) await p3.putBlock(ref(i), data(i));
  const flush = c.transport.flush.bind(c.transport);
  c.transport.flush = async (peer) => {
    if (peer.uuid === 'p3') throw new Error('p3: flush failed');
    return flush(peer);
  };
  await c.settle();
  for (const i of owned) assert.equal(c.copies(ref(i), ['p3']).length, 2, `block ${i} kept both copies outside p3`);
  c.transport.flush = flush;
  await c.settle();
  assertPlaced(c, 100);
});

test('an owner that restarts between HAS and its flush, losing what it had not synced: nothing is deleted on its account', async () => {
  const c = cluster(3);
  await writeAll(c, 100);
  const { p3, owned } = addP3(c, 100);
  for (const i of owned) await p3.putBlock(ref(i), data(i));
  // p3 answers HAS yes; its machine crashes before the flush that follows.
  const crashed = crashBeforeFirstFlush(c, 'p3', async () => {
    for (const i of owned) await p3.deleteBlock(ref(i));
  });
  // One node's pass, checked before any other node's pass could put the lost blocks back.
  await c.rebalancer('p0').pass();
  assert.ok(crashed());
  for (const i of owned) assert.ok(c.copies(ref(i)).length >= 2, `block ${i} kept two copies (${c.copies(ref(i)).join(', ')})`);
  await c.settle();
  assertPlaced(c, 100);
});

test('an owner that restarts between the PUT of a move and its flush: the move does not count, nothing is deleted', async () => {
  const c = cluster(3);
  await writeAll(c, 100);
  const { p3, owned } = addP3(c, 100);
  // p3 takes the moved blocks; its machine crashes before the flush.
  const crashed = crashBeforeFirstFlush(c, 'p3', async () => {
    for (const r of p3.refs()) await p3.deleteBlock(r);
  });
  await c.rebalancer('p0').pass();
  assert.ok(crashed());
  for (const i of owned) assert.ok(c.copies(ref(i)).length >= 2, `block ${i} kept two copies (${c.copies(ref(i)).join(', ')})`);
  await c.settle();
  assertPlaced(c, 100);
});

test('every finished pass records its ring version, a pass with nothing to do included; onPass sees it', async () => {
  const c = cluster(3);
  await writeAll(c, 50);
  const seen: [number, boolean][] = [];
  // p4 holds nothing and is no member: its passes have nothing to do.
  const idle = c.rebalancer('p4', { onPass: (st) => seen.push([st.ringVersion, st.rebalancing]) });
  assert.equal(idle.status().ringVersion, 0, 'no pass yet');
  assert.equal(await idle.pass(), 0);
  assert.equal(idle.status().ringVersion, 2);
  assert.equal(idle.status().rebalancing, false);
  c.setModel(addPeers(c.model(), [{ uuid: 'p3', totalBlocks: 10_000 }])); // v3
  assert.equal(await idle.pass(), 0);
  assert.deepEqual(seen, [
    [2, false],
    [3, false],
  ]);
  // The same through the loop: a kick after a ring change, nothing to move, still recorded.
  c.setModel(changeReplication(c.model(), 3)); // v4
  let onPass: (v: number) => void = () => undefined;
  const passed = new Promise<number>((res) => (onPass = res));
  const looping = c.rebalancer('p4', { intervalMs: 60_000, onPass: (st) => onPass(st.ringVersion) });
  looping.start();
  looping.kick();
  try {
    assert.equal(await passed, 4);
    assert.equal(looping.status().ringVersion, 4);
  } finally {
    await looping.stop();
  }
});

test('a node with blocks to move records the new ring version once its pass is done', async () => {
  const c = cluster(3);
  await writeAll(c, 100);
  c.setModel(addPeers(c.model(), [{ uuid: 'p3', totalBlocks: 10_000 }])); // v3
  const r = c.rebalancer('p0');
  assert.ok((await r.pass()) > 0, 'p0 had blocks to move');
  assert.deepEqual([r.status().ringVersion, r.status().rebalancing], [3, true]);
  while ((await r.pass()) > 0);
  assert.deepEqual([r.status().ringVersion, r.status().rebalancing], [3, false]);
});

test('an idle node rests in proportion to how long its walk takes; a ring change still starts a pass at once', async () => {
  const c = cluster(3);
  await writeAll(c, 30);
  let passes = 0;
  let slow = true;
  // Each pass starts by reading the ring: here that costs 20 ms of CPU, like a walk over a big store.
  const ring = (): Ring => {
    if (slow) for (const until = Date.now() + 20; Date.now() < until; );
    return c.ring();
  };
  const r = c.rebalancer('p0', { ring, intervalMs: 1, onPass: () => passes++ });
  r.start();
  try {
    await new Promise((res) => setTimeout(res, 400));
    // With a 1 ms interval alone it would walk back to back, about 19 times in 400 ms; resting 19x
    // the walk allows 2 at most (a loaded machine only makes that fewer).
    assert.ok(passes >= 1 && passes <= 3, `passes: ${passes}`);
    slow = false;
    const before = passes;
    r.kick();
    for (let i = 0; i < 200 && passes === before; i++) await new Promise((res) => setTimeout(res, 5));
    assert.ok(passes > before, 'a kick cuts the rest short');
  } finally {
    await r.stop();
  }
});

test('time spent waiting on an unreachable owner does not lengthen the rest', async () => {
  const c = cluster(3);
  await writeAll(c, 30);
  await c.settle();
  let passes = 0;
  // p1 cut off: every call to it fails after 100 ms, as a timeout would (5 s in torusd).
  const transport = Object.create(c.transport) as typeof c.transport;
  transport.has = async (peer, refs) => {
    if (peer.uuid === 'p1') {
      await new Promise((res) => setTimeout(res, 100));
      throw new Error('timed out');
    }
    return c.transport.has(peer, refs);
  };
  const r = c.rebalancer('p0', { transport, intervalMs: 1, onPass: () => passes++ });
  r.start();
  try {
    await new Promise((res) => setTimeout(res, 1000));
    assert.ok(r.status().underReplicated > 0, 'p0 saw blocks short of p1');
    // Resting 19x a walk of 100 ms would allow one pass in a second; retrying after the interval,
    // about one every 100 ms.
    assert.ok(passes >= 3, `passes: ${passes}`);
  } finally {
    await r.stop();
  }
});
