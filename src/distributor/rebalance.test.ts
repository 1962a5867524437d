import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BlockType, type BlockRef } from '../core/ids.js';
import type { Ring } from '../core/interfaces.js';
import { withLoopTicks } from '../core/testing.js';
import { addPeers, changeReplication, createRing, newRingModel, removePeers } from '../ring/index.js';
import { MemoryBlockStore } from '../storage/memory-store.js';
import { Distributor } from './distributor.js';
import { MemoryTransport } from './memory-transport.js';
import { Rebalancer, type RebalanceOptions } from './rebalance.js';

const BS = 4096;
const ref = (i: number): BlockRef => ({ type: BlockType.Data, volume: 3, inode: 1, index: i });
const data = (i: number): Buffer => Buffer.alloc(BS, i % 251);

/** With `volatile`, what a store's flush did not cover is lost by its powerCut(). */
function cluster(n: number, volatile = false) {
  const transport = new MemoryTransport();
  const stores = new Map<string, MemoryBlockStore>();
  const uuids = Array.from({ length: 5 }, (_, i) => `p${i}`);
  for (const u of uuids) {
    const s = new MemoryBlockStore({ blockSize: BS, capacityBlocks: 10_000, volatile });
    stores.set(u, s);
    transport.add(u, s);
  }
  let model = newRingModel('ketama', 2, uuids.slice(0, n).map((uuid) => ({ uuid, totalBlocks: 10_000 })), 2);
  let ring: Ring = createRing(model);
  const target = (u: string) => ({ uuid: u, address: `mem://${u}` });
  const dist = new Distributor({ blockSize: BS, ring: () => ring, target, transport });
  /** A rebalancer for node `u` over this cluster; `extra` overrides its options. */
  const rebalancer = (u: string, extra: Partial<RebalanceOptions> = {}): Rebalancer =>
    new Rebalancer({ self: { uuid: u, store: stores.get(u)! }, ring: () => ring, target, transport, blockSize: BS, peersCaughtUp: () => true, ...extra });
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

/**
 * Wraps `c.transport` so each PUT takes `delayMs` and is recorded: the most PUTs in flight to one
 * peer at once, the most bytes in all PUTs in flight, and each PUT's start time and bytes.
 */
function recordPuts(c: ReturnType<typeof cluster>, delayMs: number) {
  const transport = Object.create(c.transport) as MemoryTransport;
  const rec = { maxPerPeer: 0, maxBytes: 0, puts: [] as { at: number; bytes: number }[], flushes: new Map<string, number>() };
  const perPeer = new Map<string, number>();
  let bytes = 0;
  transport.put = async (peer, items) => {
    const n = items.reduce((a, it) => a + it.data.length, 0);
    rec.puts.push({ at: Date.now(), bytes: n });
    perPeer.set(peer.uuid, (perPeer.get(peer.uuid) ?? 0) + 1);
    bytes += n;
    rec.maxPerPeer = Math.max(rec.maxPerPeer, perPeer.get(peer.uuid)!);
    rec.maxBytes = Math.max(rec.maxBytes, bytes);
    try {
      await new Promise((res) => setTimeout(res, delayMs));
      return await c.transport.put(peer, items);
    } finally {
      perPeer.set(peer.uuid, perPeer.get(peer.uuid)! - 1);
      bytes -= n;
    }
  };
  transport.flush = async (peer) => {
    rec.flushes.set(peer.uuid, (rec.flushes.get(peer.uuid) ?? 0) + 1);
    return c.transport.flush(peer);
  };
  return { transport, rec };
}

test('a pass keeps several batches in flight to a peer, and flushes each receiving peer once', async () => {
  const c = cluster(3);
  await writeAll(c, 300);
  const { owned } = addP3(c, 300);
  const { transport, rec } = recordPuts(c, 5);
  // Small batches: p0 sends p3 its share in many of them.
  const r = c.rebalancer('p0', { transport, batch: 4 });
  const moved = await r.pass();
  assert.ok(moved > 8, `moved ${moved}`);
  assert.ok(rec.puts.length > 2, `${rec.puts.length} puts`);
  assert.ok(rec.maxPerPeer > 1, `at most ${rec.maxPerPeer} put(s) in flight to one peer`);
  // p3 received blocks; the other owners of blocks p0 drops are flushed too (HAS then FLUSH).
  assert.equal(rec.flushes.get('p3'), 1);
  for (const [peer, n] of rec.flushes) assert.equal(n, 1, `${peer}: ${n} flushes in one pass`);
  for (const i of owned) assert.ok(c.stores.get('p3')!.hasBlock(ref(i)) || !c.stores.get('p0')!.hasBlock(ref(i)), `block ${i} sent to p3`);
  await c.settle();
  assertPlaced(c, 300);
});

test('the blocks in flight stay within the byte budget', async () => {
  const c = cluster(3);
  await writeAll(c, 300);
  addP3(c, 300);
  // Raising R sends third copies to every peer at once: p0 has three receivers.
  c.setModel(changeReplication(c.model(), 3));
  const { transport, rec } = recordPuts(c, 5);
  const budget = 3 * BS;
  const r = c.rebalancer('p0', { transport, batch: 4, inFlightBytes: budget });
  assert.ok((await r.pass()) > 8);
  assert.ok(rec.maxBytes > BS, `${rec.maxBytes} bytes in flight at most: the budget allows more than one block`);
  assert.ok(rec.maxBytes <= budget, `${rec.maxBytes} bytes in flight, budget ${budget}`);
  assert.ok(r.inFlight.peak <= budget && r.inFlight.used === 0, `peak ${r.inFlight.peak}, left ${r.inFlight.used}`);
  await c.settle();
  assertPlaced(c, 300);
});

test('the rate limit holds with several batches in flight', async () => {
  const c = cluster(3);
  await writeAll(c, 120);
  addP3(c, 120);
  const { transport, rec } = recordPuts(c, 1);
  const rate = 64 * 1024;
  const started = Date.now();
  const r = c.rebalancer('p0', { transport, batch: 4, rateBytesPerSec: rate });
  assert.ok((await r.pass()) > 0);
  const sent = rec.puts.reduce((a, p) => a + p.bytes, 0);
  assert.ok(sent > rate, `sent ${sent} bytes: more than the bucket holds`);
  // By any moment, at most the rate times the time since the start, plus one PUT of 4 blocks
  // (the bucket starts empty and may be overdrawn by one request). A slow machine only sends less.
  let cum = 0;
  for (const p of rec.puts) {
    cum += p.bytes;
    const allowed = (rate * (p.at - started)) / 1000 + 4 * BS;
    assert.ok(cum <= allowed, `${cum} bytes sent ${p.at - started} ms in; the rate allows ${Math.round(allowed)}`);
  }
});

test('a peer that restarts mid-pipeline, losing what it had not flushed: the lost blocks are sent again in the same pass', async () => {
  const c = cluster(3, true);
  await writeAll(c, 300);
  const { owned } = addP3(c, 300);
  const p3 = c.stores.get('p3') as MemoryBlockStore;
  const fromP0 = owned.filter((i) => c.stores.get('p0')!.hasBlock(ref(i)));
  // After p3 took its second PUT, its machine crashes: what it took is lost, a new process answers.
  const transport = Object.create(c.transport) as MemoryTransport;
  let puts = 0;
  let lost = 0;
  transport.put = async (peer, items) => {
    if (peer.uuid === 'p3' && ++puts === 3) {
      lost = p3.powerCut();
      c.transport.instances.set('p3', 'second');
    }
    return c.transport.put(peer, items);
  };
  await c.rebalancer('p0', { transport, batch: 4, depth: 1 }).pass();
  assert.ok(lost > 0, 'p3 lost blocks it had taken');
  // What p3 holds now survives another crash: it was flushed by the process that took it.
  p3.powerCut();
  for (const i of fromP0) assert.ok(p3.hasBlock(ref(i)), `block ${i} is on p3 after one pass of p0`);
  for (let i = 0; i < 300; i++) assert.ok(c.copies(ref(i)).length >= 2, `block ${i} has two copies (${c.copies(ref(i)).join(', ')})`);
});

test('a pass gives the event loop back while it walks the store, before and after it asks the peers', async () => {
  const c = cluster(3);
  await writeAll(c, 300);
  // The ring is asked about each block while planning and again while counting. Between two
  // such calls, a walk that never pauses lets nothing else run; with a zero slice it pauses
  // every 32 blocks, and a ticker scheduled with setImmediate advances.
  const seen: number[] = [];
  await withLoopTicks(async (ticks) => {
    const ring = c.ring();
    const watched = Object.assign(Object.create(ring) as Ring, { getPeers: (r: BlockRef) => (seen.push(ticks()), ring.getPeers(r)) });
    await c.rebalancer('p0', { ring: () => watched, yieldSliceMs: 0 }).pass();
  });
  const held = c.stores.get('p0')!.usedBlocks();
  assert.ok(held > 100 && seen.length === 2 * held, `${seen.length} ring lookups for ${held} blocks`);
  // The plan's lookups come first, the count's last; each walk saw the ticker move on.
  const plan = seen.slice(0, held);
  const count = seen.slice(held);
  assert.ok(plan[plan.length - 1]! - plan[0]! >= 2, `ticks during the plan: ${plan[0]}..${plan[plan.length - 1]}`);
  assert.ok(count[count.length - 1]! - count[0]! >= 2, `ticks during the count: ${count[0]}..${count[count.length - 1]}`);
});

/** Blocks `of` owns together with `with`, and the first of them held where `c` put it. */
function sharedWith(c: ReturnType<typeof cluster>, n: number, of: string, other: string): number[] {
  return Array.from({ length: n }, (_, i) => i).filter((i) => {
    const owners = c.ring().getPeers(ref(i)).peers.slice(0, 2);
    return owners.includes(of) && owners.includes(other);
  });
}

test('once settled, a pass checks only blocks stored or sealed since; a ring change, a restarted peer and the full-pass interval bring back a pass over every block', async () => {
  const c = cluster(3);
  await writeAll(c, 200);
  await c.settle();
  const p0 = c.stores.get('p0')!;
  const r = c.rebalancer('p0');
  await r.pass();
  assert.deepEqual([r.status().fullPasses, r.status().lastChecked], [1, p0.usedBlocks()], 'the first pass checks every block');
  await r.pass();
  assert.deepEqual([r.status().fullPasses, r.status().lastChecked], [1, 0], 'nothing changed: nothing checked');

  // New blocks are checked, and only they. One stored on p0 alone reaches its other owner.
  const shared = sharedWith(c, 300, 'p0', 'p1').filter((i) => i >= 200);
  await p0.putBlock(ref(shared[0]!), data(shared[0]!));
  await p0.flush();
  assert.deepEqual(c.copies(ref(shared[0]!)), ['p0']);
  await r.pass();
  assert.deepEqual([r.status().fullPasses, r.status().lastChecked], [1, 1]);
  assert.deepEqual(c.copies(ref(shared[0]!)).sort(), ['p0', 'p1']);

  // A copy lost on p1 without a restart is not seen by a quiet pass (the scrub's and the full
  // pass's job); a restart of p1 is, and the full pass that follows puts the copy back.
  const lost = sharedWith(c, 200, 'p0', 'p1')[0]!;
  await c.stores.get('p1')!.deleteBlock(ref(lost));
  await r.pass();
  assert.equal(r.status().fullPasses, 1);
  assert.deepEqual(c.copies(ref(lost)), ['p0']);
  c.transport.instances.set('p1', 'second');
  await r.pass();
  assert.equal(r.status().fullPasses, 2);
  assert.deepEqual(c.copies(ref(lost)).sort(), ['p0', 'p1']);
  await r.pass();
  assert.equal(r.status().fullPasses, 2, 'settled again');

  // A ring change: every block again.
  c.setModel(addPeers(c.model(), [{ uuid: 'p3', totalBlocks: 10_000 }]));
  await r.pass();
  assert.equal(r.status().fullPasses, 3);

  // With a short interval between full passes, one comes without any change.
  const timed = c.rebalancer('p2', { fullPassMs: 30 });
  await c.settle();
  await timed.pass();
  await timed.pass();
  assert.equal(timed.status().fullPasses, 1);
  await new Promise((res) => setTimeout(res, 40));
  await timed.pass();
  assert.equal(timed.status().fullPasses, 2);
});

test('a pass that does not settle is followed by a pass over every block', async () => {
  const c = cluster(3);
  await writeAll(c, 100);
  await c.settle();
  // p1 cannot be reached: p0's blocks shared with it stay unconfirmed, so no pass is quiet.
  const transport = Object.create(c.transport) as typeof c.transport;
  let cut = true;
  transport.has = async (peer, refs) => {
    if (cut && peer.uuid === 'p1') throw new Error('timed out');
    return c.transport.has(peer, refs);
  };
  const r = c.rebalancer('p0', { transport });
  await r.pass();
  await r.pass();
  assert.equal(r.status().fullPasses, 2);
  assert.ok(r.status().underReplicated > 0);
  cut = false;
  await r.pass();
  await r.pass();
  assert.deepEqual([r.status().fullPasses, r.status().underReplicated, r.status().lastChecked], [3, 0, 0]);
});

test('no pass is quiet while another member has not finished a pass on the current ring: a copy it drops after this node counted it comes back', async () => {
  const c = cluster(3);
  await writeAll(c, 100);
  await c.settle();
  c.setModel(changeReplication(c.model(), 3)); // every block on all three
  let caughtUp = false;
  const r = c.rebalancer('p0', { peersCaughtUp: () => caughtUp });
  await r.pass();
  const held = c.stores.get('p0')!.refs();
  for (const b of held) assert.equal(c.copies(b).length, 3);
  // p2, still on the old ring, drains a copy it did not own there, after p0 counted it.
  const dropped = held.find((b) => !c.ring().getPeers(b).peers.slice(0, 2).includes('p2'))!;
  await c.stores.get('p2')!.deleteBlock(dropped);
  await r.pass();
  assert.equal(r.status().fullPasses, 2, 'not quiet: p2 had not caught up');
  assert.equal(c.copies(dropped).length, 3, 'the copy came back');
  // Once all have caught up, a settled pass makes the next ones quiet.
  caughtUp = true;
  await r.pass();
  await r.pass();
  assert.deepEqual([r.status().fullPasses, r.status().lastChecked], [3, 0]);
});
