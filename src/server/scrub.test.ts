import { crc32c } from '@node-rs/crc32';
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BlockType, type BlockRef } from '../core/ids.js';
import { MemoryTransport } from '../distributor/memory-transport.js';
import { createRing, newRingModel } from '../ring/index.js';
import type { BlockInspection } from '../storage/common.js';
import { MemoryBlockStore } from '../storage/memory-store.js';
import { pattern } from '../storage/testing.js';
import { RateLimiter, SCRUB_RATE_CEILING, SCRUB_RATE_FLOOR, Scrubber, autoScrubRate, replicaFetcher, type Clock, type StateFile } from './scrub.js';

const BS = 4096;
const MiB = 1024 * 1024;
const WEEK = 7 * 24 * 3600 * 1000;

/** Time that passes only when someone sleeps: every duration below is exact, none measured. */
function fakeClock(start = 1_000_000): Clock & { slept: number } {
  let now = start;
  const c = {
    slept: 0,
    now: () => now,
    async sleep(ms: number, signal: AbortSignal) {
      if (signal.aborted) return;
      now += ms;
      c.slept += ms;
      await new Promise((r) => setImmediate(r));
    },
  };
  return c;
}

function memoryState(): StateFile & { value: unknown } {
  const f = {
    value: undefined as unknown,
    load: () => (f.value === undefined ? undefined : structuredClone(f.value)),
    save: (v: unknown) => {
      f.value = structuredClone(v);
    },
  };
  return f;
}

function ref(i: number): BlockRef {
  return { type: BlockType.Data, volume: 1, inode: 1, index: i };
}

/** Three peers holding blocks 0..n-1 on every peer (R=3), the scrubbed one being peer-0. */
async function replicated(n: number) {
  const transport = new MemoryTransport();
  const uuids = ['peer-0', 'peer-1', 'peer-2'];
  const stores = uuids.map((u) => {
    const s = new MemoryBlockStore({ blockSize: BS, capacityBlocks: 64 });
    transport.add(u, s);
    return s;
  });
  for (let i = 0; i < n; i++) for (const s of stores) await s.putBlock(ref(i), pattern(i, BS));
  const ring = createRing(newRingModel('ketama', 3, uuids.map((uuid) => ({ uuid, totalBlocks: 64 })), 2));
  const fetchCopy = replicaFetcher({ self: 'peer-0', ring: () => ring, target: (uuid) => ({ uuid, address: `mem://${uuid}` }), transport });
  return { transport, stores, local: stores[0]!, fetchCopy };
}

test('the rate limit reads all data in half the interval, within a floor and a ceiling', () => {
  const TiB = 1024 * 1024 * MiB;
  assert.equal(autoScrubRate(TiB, WEEK), Math.ceil(TiB / (WEEK / 2000))); // 3.5 MiB/s
  assert.ok(autoScrubRate(TiB, WEEK) > 3 * MiB && autoScrubRate(TiB, WEEK) < 4 * MiB);
  assert.equal(autoScrubRate(0, WEEK), SCRUB_RATE_FLOOR);
  assert.equal(autoScrubRate(10 * 1024 * 1024 * MiB, 1000), SCRUB_RATE_CEILING);
});

test('the rate limiter spaces reads at the rate, and gives no credit for idle time', async () => {
  const clock = fakeClock();
  const limiter = new RateLimiter(() => 2 * MiB, clock);
  const signal = new AbortController().signal;
  for (let i = 0; i < 10; i++) await limiter.take(MiB, signal);
  // The first read starts at once, each later one half a second after the one before.
  assert.equal(clock.slept, 4500);
  await clock.sleep(60_000, signal);
  clock.slept = 0;
  for (let i = 0; i < 3; i++) await limiter.take(MiB, signal);
  assert.equal(clock.slept, 1000);
});

test('a pass reads every block once at the rate, and the next starts an interval after the last began', async () => {
  const { local, fetchCopy } = await replicated(10);
  const clock = fakeClock();
  const inspected: number[] = [];
  const store = Object.assign(Object.create(local) as MemoryBlockStore, {
    inspectBlock: async (r: BlockRef): Promise<BlockInspection> => {
      inspected.push(r.index);
      return local.inspectBlock(r);
    },
  });
  const s = new Scrubber({ store, fetchCopy, intervalMs: 1000_000, rateBytesPerSec: BS, windowSlots: 3, clock });
  const t0 = clock.now();
  await s.pass();
  assert.deepEqual(inspected, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
  assert.equal(clock.now() - t0, 9000, 'ten blocks at one a second');
  const st = s.status();
  assert.equal(st.lastStartedAt, t0);
  assert.equal(st.lastBytes, 10 * BS);
  assert.equal(st.nextPassAt, t0 + 1000_000);
  assert.equal(st.passStartedAt, 0);
});

test('the loop runs a pass at once, then one per interval', async () => {
  const { local, fetchCopy } = await replicated(4);
  const clock = fakeClock();
  const starts: number[] = [];
  const ends: number[] = [];
  const s: Scrubber = new Scrubber({
    store: local,
    fetchCopy,
    intervalMs: 500_000,
    rateBytesPerSec: BS,
    clock,
    onChange: () => {
      const st = s.status();
      if (st.passStartedAt && starts.at(-1) !== st.passStartedAt) starts.push(st.passStartedAt);
      else if (!st.passStartedAt && ends.at(-1) !== st.lastFinishedAt) ends.push(st.lastFinishedAt);
    },
  });
  const t0 = clock.now();
  s.start();
  for (let i = 0; i < 100_000 && ends.length < 3; i++) await new Promise((r) => setImmediate(r));
  await s.stop();
  assert.deepEqual(starts.slice(0, 3), [t0, t0 + 500_000, t0 + 1000_000]);
  assert.deepEqual(ends.slice(0, 3), [t0 + 3000, t0 + 503_000, t0 + 1003_000]);
});

test('a bad copy is replaced by a replica\'s copy that matches the writer\'s CRC, and reported', async () => {
  const { local, stores, fetchCopy } = await replicated(8);
  local.corruptBlock(ref(3));
  // Another block here holds bytes that are self-consistent but not the writer's.
  local.replaceBlock(ref(5), pattern(99, BS));
  // And the first replica asked for block 5 has bad bytes too: skipped, not copied.
  stores[1]!.replaceBlock(ref(5), pattern(98, BS));
  stores[2]!.replaceBlock(ref(5), pattern(98, BS));
  stores[1]!.corruptBlock(ref(3));
  const s = new Scrubber({ store: local, fetchCopy, intervalMs: WEEK, clock: fakeClock() });
  await s.pass();
  const st = s.status();
  assert.equal(st.lastErrors, 2);
  assert.equal(st.errors, 2);
  // Block 3 came from peer-2; block 5 had no good copy anywhere: kept, waiting.
  assert.equal(st.lastRepaired, 1);
  assert.equal(st.pending, 1);
  assert.deepEqual(await local.getBlock(ref(3)), pattern(3, BS));
  assert.deepEqual(await local.inspectBlock(ref(3)), { status: 'ok', crc: crc32c(pattern(3, BS)) >>> 0 });
  assert.ok(local.hasBlock(ref(5)), 'a bad copy with no replacement is kept');
  assert.equal((await local.inspectBlock(ref(5))).status, 'corrupt');
});

test('a bad copy with no good replica now is kept, retried, and repaired once one is back; counted once', async () => {
  const { local, transport, fetchCopy } = await replicated(4);
  local.corruptBlock(ref(2));
  transport.down.add('peer-1');
  transport.down.add('peer-2');
  const clock = fakeClock();
  const state = memoryState();
  const s = new Scrubber({ store: local, fetchCopy, intervalMs: WEEK, rateBytesPerSec: 100 * MiB, retryMs: 60_000, clock, state });
  await s.pass();
  assert.deepEqual([s.status().errors, s.status().repaired, s.status().pending], [1, 0, 1]);
  // Found again by the next pass while still waiting: the same error, not a new one.
  await s.pass();
  assert.deepEqual([s.status().errors, s.status().repaired, s.status().pending], [1, 0, 1]);
  // A restart keeps what is waiting.
  const s2 = new Scrubber({ store: local, fetchCopy, intervalMs: WEEK, rateBytesPerSec: 100 * MiB, retryMs: 60_000, clock, state });
  assert.equal(s2.status().pending, 1);
  transport.down.clear();
  // The resting loop retries it within retryMs.
  s2.start();
  for (let i = 0; i < 10_000 && s2.status().pending > 0; i++) await new Promise((r) => setImmediate(r));
  await s2.stop();
  assert.deepEqual([s2.status().errors, s2.status().repaired, s2.status().pending], [1, 1, 0]);
  assert.deepEqual(await local.getBlock(ref(2)), pattern(2, BS));
});

test('a copy whose checksums are gone too is dropped, never replaced by an unchecked copy', async () => {
  const { local, fetchCopy } = await replicated(2);
  let fetched = 0;
  const store = Object.assign(Object.create(local) as MemoryBlockStore, {
    inspectBlock: async (r: BlockRef): Promise<BlockInspection> =>
      r.index === 1 ? { status: 'corrupt', reason: 'its sector checksum array does not match its record' } : local.inspectBlock(r),
  });
  const s = new Scrubber({
    store,
    fetchCopy: async (r, crc) => {
      fetched++;
      return fetchCopy(r, crc);
    },
    intervalMs: WEEK,
    clock: fakeClock(),
  });
  await s.pass();
  assert.equal(fetched, 0);
  assert.equal(local.hasBlock(ref(1)), false);
  assert.deepEqual([s.status().errors, s.status().dropped, s.status().repaired], [1, 1, 0]);
});

test('a pass stopped part-way resumes where it was after a restart', async () => {
  const { local, fetchCopy } = await replicated(10);
  const inspected: number[] = [];
  const stops: (() => void)[] = [];
  const store = Object.assign(Object.create(local) as MemoryBlockStore, {
    inspectBlock: async (r: BlockRef): Promise<BlockInspection> => {
      inspected.push(r.index);
      if (inspected.length === 4) stops.forEach((f) => f());
      return local.inspectBlock(r);
    },
  });
  const state = memoryState();
  const clock = fakeClock();
  const s = new Scrubber({ store, fetchCopy, intervalMs: WEEK, windowSlots: 4, clock, state });
  stops.push(() => void s.stop());
  await s.pass();
  assert.deepEqual(inspected, [0, 1, 2, 3]);
  assert.ok(s.status().passStartedAt > 0, 'still under way');
  const s2 = new Scrubber({ store, fetchCopy, intervalMs: WEEK, windowSlots: 4, clock, state });
  await s2.pass();
  assert.deepEqual(inspected, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
  assert.equal(s2.status().lastBytes, 10 * BS);
});

test('unreadable saved progress starts afresh', () => {
  const { local } = { local: new MemoryBlockStore({ blockSize: BS, capacityBlocks: 4 }) };
  const warnings: string[] = [];
  const state = memoryState();
  state.value = { current: { cursor: 'x' } };
  const s = new Scrubber({ store: local, fetchCopy: async () => undefined, intervalMs: WEEK, state, clock: fakeClock(), log: { info: () => undefined, warn: (_o, m) => warnings.push(m) } });
  assert.equal(s.status().lastStartedAt, 0);
  assert.match(warnings.join(), /unreadable/);
});
