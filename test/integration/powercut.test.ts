import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { crc32c } from '@node-rs/crc32';
import type { BlockRef } from '../../src/core/ids.js';
import { dataRef, randomBlock, startCluster, type TestCluster } from '../helpers/cluster.js';

// The crash test again, with power cuts instead of kill -9: every storage node runs under the
// power-cut preload (src/storage/powercut.ts), and a cut undoes everything on its disk that no
// fsync covered (or a random part of it, sector by sector). A client streams writes and flushes
// while single nodes lose power at random moments; then the whole cluster loses power at once.
// Every block whose flush succeeded must afterwards exist, byte exact, on R nodes; and every node
// must come back as itself (its identity and its store survive the cut). Bounded: a fixed number
// of cuts and a time cap; it stops by itself.

const CUTS = 4;
const TIME_CAP_MS = 40_000;
const MAX_BLOCKS = 2000;

let c: TestCluster;
before(async () => {
  c = await startCluster({ nodes: 3, replication: 2, size: '256MiB', powercut: true });
});
after(async () => {
  await c?.stop();
});

test('every flushed block survives power cuts of single nodes and of the whole cluster, and every node comes back as itself', async () => {
  const uuids = c.nodes.map((_, i) => c.uuidOf(i));
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
      const batch = Array.from({ length: 8 }, () => ({ ref: dataRef(12, next++), data: randomBlock(c.blockSize) }));
      for (let attempt = 0; attempt < 20 && !stop; attempt++) {
        try {
          await Promise.all(batch.map((b) => c.client.distributor.putBlock(b.ref, b.data)));
          await c.client.distributor.flush();
          flushed.push(...batch);
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
  let undone = 0;
  let cutsMidStream = 0;
  const cuts: string[] = [];
  for (let k = 0; k < CUTS && Date.now() - started < TIME_CAP_MS; k++) {
    await new Promise((r) => setTimeout(r, 300 + Math.random() * 900));
    if (next <= MAX_BLOCKS) cutsMidStream++;
    const victim = Math.floor(Math.random() * c.nodes.length);
    cuts.push(`node${victim}@${flushed.length}:${k % 2 === 0 ? 'none' : 'random'}`);
    const report = await c.powerCut(victim, k % 2 === 0 ? 'none' : 'random');
    undone += Object.values(report.undone).reduce((a, b) => a + b, 0);
  }
  await new Promise((r) => setTimeout(r, 300));
  // The last flushes may still be retrying against the node cut last: let them finish.
  stop = true;
  await writer;
  // The whole rack: every node at once, nothing unsynced survives anywhere.
  for (const r of await c.powerCutAll('none')) undone += Object.values(r.undone).reduce((a, b) => a + b, 0);

  assert.ok(cutsMidStream >= 2, `only ${cutsMidStream} cuts landed while the stream was writing`);
  assert.ok(flushed.length >= 40, `the stream made progress (${flushed.length} flushed blocks, ${failedFlushes} failed attempts)`);
  assert.ok(undone > 0, 'the cuts undid nothing: the harness was not in the loop');
  console.log(`power-cut test: ${flushed.length} blocks flushed, ${CUTS} single-node cuts (${cutsMidStream} mid-stream) and one of all nodes, ${undone} unsynced changes undone, ${failedFlushes} failed attempts retried`);
  // Each node restarted on its own identity: a lost node.json or store would show as a new uuid.
  const peers = await c.meta.getPeers();
  assert.deepEqual(
    uuids.map((u) => peers.some((p) => p.uuid === u)),
    uuids.map(() => true),
    `nodes came back as ${peers.map((p) => p.uuid).join(', ')}; expected ${uuids.join(', ')}`,
  );
  assert.equal(peers.length, uuids.length, 'no node registered a new identity');
  const counts = await c.copiesAtRest(
    flushed.map((b) => b.ref),
    flushed.map((b) => b.data),
  );
  const under = counts.map((n, j) => [n, j] as const).filter(([n]) => n < 2);
  assert.equal(under.length, 0, `${under.length} flushed blocks have fewer than 2 copies: ${under.map(([, j]) => c.copiesReport(j)).join('; ')}; cuts: ${cuts.join(', ')}`);
  const reader = await c.newClient();
  for (const b of flushed) {
    const got = await reader.distributor.getBlock(b.ref, crc32c(b.data));
    assert.ok(got.equals(b.data));
  }
});
