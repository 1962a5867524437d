import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { crc32c } from '@node-rs/crc32';
import type { BlockRef } from '../../src/core/ids.js';
import { dataRef, randomBlock, startCluster, type TestCluster } from '../helpers/cluster.js';

// Crash test: a client streams writes and flushes while storage nodes are killed with SIGKILL at
// random moments and restarted. Every block whose flush succeeded must afterwards exist, byte
// exact, on at least R nodes. Bounded: a fixed number of kills and a time cap; it stops by itself.

const KILLS = 5;
const TIME_CAP_MS = 40_000;
// Enough writes to span every kill, few enough to stay far from full disks.
const MAX_BLOCKS = 3000;

let c: TestCluster;
before(async () => {
  c = await startCluster({ nodes: 3, replication: 2, size: '512MiB' });
});
after(async () => {
  await c?.stop();
});

test('every flushed block survives nodes killed at random points of a write+flush stream', async () => {
  const flushed: { ref: BlockRef; data: Buffer }[] = [];
  let stop = false;
  let next = 1;
  let failedFlushes = 0;
  const writer = (async () => {
    while (!stop) {
      if (next > MAX_BLOCKS) {
        await new Promise((r) => setTimeout(r, 50));
        continue;
      }
      const batch = Array.from({ length: 8 }, () => ({ ref: dataRef(11, next++), data: randomBlock(c.blockSize) }));
      // A batch counts only once a flush covering it returned success; until then it is retried.
      for (let attempt = 0; attempt < 20 && !stop; attempt++) {
        try {
          await Promise.all(batch.map((b) => c.client.distributor.putBlock(b.ref, b.data)));
          await c.client.distributor.flush();
          flushed.push(...batch);
          // Paced so the stream spans every kill rather than finishing before the first.
          await new Promise((r) => setTimeout(r, 15));
          break;
        } catch {
          failedFlushes++;
          await new Promise((r) => setTimeout(r, 100));
        }
      }
    }
  })();

  const started = Date.now();
  let killsMidStream = 0;
  for (let k = 0; k < KILLS && Date.now() - started < TIME_CAP_MS; k++) {
    await new Promise((r) => setTimeout(r, 300 + Math.random() * 900));
    const victim = Math.floor(Math.random() * c.nodes.length);
    if (next <= MAX_BLOCKS) killsMidStream++;
    await c.kill(victim);
    await new Promise((r) => setTimeout(r, 200 + Math.random() * 600));
    await c.restart(victim);
  }
  await new Promise((r) => setTimeout(r, 500));
  stop = true;
  await writer;

  assert.ok(killsMidStream >= 3, `only ${killsMidStream} kills landed while the stream was writing`);
  assert.ok(flushed.length >= 40, `the stream made progress (${flushed.length} flushed blocks, ${failedFlushes} failed attempts)`);
  console.log(`crash test: ${flushed.length} blocks flushed, ${KILLS} kills (${killsMidStream} mid-stream), ${failedFlushes} failed put/flush attempts retried`);
  // Counted on disk with every node stopped. Asked of running nodes one after another, the count
  // raced the rebalancers: a spilled block could move from a node not yet asked to one already
  // asked, and be counted once (a CI run saw 115). Stopped with SIGKILL, the nodes leave exactly
  // what a crash leaves, and a move (put, flush on the new holder, then delete) cannot drop a
  // block below R at any instant, whatever order the nodes die in.
  const counts = await c.copiesAtRest(
    flushed.map((b) => b.ref),
    flushed.map((b) => b.data),
  );
  const under = counts.filter((n) => n < 2).length;
  assert.equal(under, 0, `${under} flushed blocks have fewer than 2 copies`);
  const reader = await c.newClient();
  for (const b of flushed) {
    const got = await reader.distributor.getBlock(b.ref, crc32c(b.data));
    assert.ok(got.equals(b.data));
  }
});
