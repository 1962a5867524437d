import assert from 'node:assert/strict';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { crc32c } from '@node-rs/crc32';
import type { BlockRef } from '../../src/core/ids.js';
import { rpcAddress } from '../../src/distributor/cluster-view.js';
import { FileBlockStore } from '../../src/storage/file-store.js';
import { dataRef, randomBlock, startCluster, type TestCluster } from '../helpers/cluster.js';

// Replicated block I/O against real processes: etcd, three torusd at R=2, and a client in this
// process. Write blocks, lose a node, get it back, damage a replica on disk.

let c: TestCluster;
const N = 200;
const refs: BlockRef[] = [];
const blocks: Buffer[] = [];

before(async () => {
  c = await startCluster({ nodes: 3, replication: 2 });
  for (let i = 0; i < N; i++) {
    refs.push(dataRef(7, i + 1));
    blocks.push(randomBlock(c.blockSize));
  }
});

after(async () => {
  await c?.stop();
});

test('N blocks written and flushed land on exactly R=2 nodes each, the ring owners', async () => {
  await Promise.all(refs.map((r, i) => c.client.distributor.putBlock(r, blocks[i]!)));
  await c.client.distributor.flush();
  assert.deepEqual(await c.copies(refs), refs.map(() => 2));
  const ring = c.client.view.ring;
  for (const r of refs.slice(0, 20)) {
    const owners = ring.getPeers(r).peers.slice(0, 2);
    const counts = await Promise.all(
      c.nodes.map(async (n, i) => (await c.client.pool.client({ uuid: c.uuidOf(i), address: rpcAddress(n.address) }).hasBlock(r)) ? c.uuidOf(i) : undefined),
    );
    assert.deepEqual(counts.filter(Boolean).sort(), [...owners].sort());
  }
  // Reads come back byte-exact, and verified end to end.
  const fresh = await c.newClient();
  for (const [i, r] of refs.entries()) assert.ok((await fresh.distributor.getBlock(r, crc32c(blocks[i]!))).equals(blocks[i]!));
});

test('kill -9 one node: every block still reads back; restart: nothing lost', async () => {
  const before = await c.copies(refs);
  await c.kill(0);
  const reader = await c.newClient();
  for (const [i, r] of refs.entries()) assert.ok((await reader.distributor.getBlock(r, crc32c(blocks[i]!))).equals(blocks[i]!), `block ${i}`);
  // Ranged reads too (the NBD path reads 4 KiB pieces).
  for (const [i, r] of refs.slice(0, 50).entries()) assert.ok((await reader.distributor.readRange(r, 4096, 4096)).equals(blocks[i]!.subarray(4096, 8192)));
  await c.restart(0);
  assert.deepEqual(await c.copies(refs), before, 'the restarted node still holds all it held');
});

test('writes while a node is down still reach R copies (spill), and survive its return', async () => {
  await c.kill(1);
  const more = Array.from({ length: 50 }, (_, i) => dataRef(8, i + 1));
  const data = more.map(() => randomBlock(c.blockSize));
  const writer = await c.newClient();
  await Promise.all(more.map((r, i) => writer.distributor.putBlock(r, data[i]!)));
  await writer.distributor.flush();
  await c.restart(1);
  // At rest: the returning node's owners are moving the spilled copies to it meanwhile.
  const counts = await c.copiesAtRest(more, data);
  for (const n of counts) assert.ok(n >= 2, `a block has ${n} copies`);
  for (const [i, r] of more.entries()) assert.ok((await writer.distributor.getBlock(r)).equals(data[i]!));
});

test('a node restarted between put and flush, its unsynced blocks gone: the flush notices the new process and re-sends', async () => {
  const writer = await c.newClient();
  const more = Array.from({ length: 40 }, (_, i) => dataRef(9, i + 1));
  const data = more.map(() => randomBlock(c.blockSize));
  await Promise.all(more.map((r, i) => writer.distributor.putBlock(r, data[i]!)));
  // What a machine crash does to blocks put but not yet flushed: SIGKILL, then take them off
  // its disk (a process crash alone would leave them in the page cache), then start it again.
  const victim = 0;
  await c.kill(victim);
  const store = await FileBlockStore.open({ dir: join(c.nodes[victim]!.dataDir, 'block'), blockSize: c.blockSize, sizeBytes: 256 * 1024 ** 2 });
  let lost = 0;
  try {
    for (const r of more)
      if (store.hasBlock(r)) {
        await store.deleteBlock(r);
        lost++;
      }
    await store.flush();
  } finally {
    await store.close();
  }
  assert.ok(lost > 0, 'the victim held some of the blocks');
  await c.restart(victim);
  const spills = writer.distributor.stats.spills;
  await writer.distributor.flush();
  assert.ok(writer.distributor.stats.spills - spills >= lost, `the flush re-sent the ${lost} blocks the restarted node took (${writer.distributor.stats.spills - spills} re-sent)`);
  const counts = await c.copiesAtRest(more, data);
  for (const n of counts) assert.ok(n >= 2, `a block has ${n} copies after a flush that succeeded`);
});

test('a corrupted replica on disk: the read returns the right bytes, and the copy is repaired', async () => {
  const victim = 2;
  const victimUuid = c.uuidOf(victim);
  const ring = c.client.view.ring;
  const idx = refs.findIndex((r) => ring.getPeers(r).peers[0] === victimUuid);
  assert.ok(idx >= 0);
  const ref = refs[idx]!;
  const node = c.nodes[victim]!;
  await c.kill(victim);
  // Flip bytes in the middle of the block's slot, as a bad disk would.
  const blockDir = join(node.dataDir, 'block');
  const store = await FileBlockStore.open({ dir: blockDir, blockSize: c.blockSize, sizeBytes: 256 * 1024 * 1024 });
  const loc = store.locate(ref);
  await store.close();
  assert.ok(loc, 'the victim holds the block');
  const fh = await open(join(blockDir, 'blocks.data'), 'r+');
  await fh.write(Buffer.alloc(512, 0xa5), 0, 512, loc.dataOffset + 10_000);
  await fh.close();
  await c.restart(victim);

  const reader = await c.newClient();
  assert.ok((await reader.distributor.getBlock(ref)).equals(blocks[idx]!));
  assert.ok(reader.distributor.stats.checksumFailures >= 1, 'the bad copy was seen');
  await reader.distributor.idle();
  assert.equal(reader.distributor.stats.repairs, 1);
  const direct = await reader.pool.client({ uuid: victimUuid, address: rpcAddress(c.nodes[victim]!.address) }).getBlock(ref);
  assert.ok(direct.equals(blocks[idx]!), 'the victim serves the repaired copy');
  const metrics = await (await fetch(`http://127.0.0.1:${c.nodes[victim]!.httpPort}/metrics`)).text();
  assert.match(metrics, /^torus_storage_checksum_failures_total [1-9]/m);
  assert.match(metrics, /^torus_storage_blocks [1-9]/m);
});

test('too few live peers for R is an error, not a partial success', async () => {
  await c.kill(0);
  await c.kill(1);
  const writer = await c.newClient();
  await assert.rejects(writer.distributor.putBlock(dataRef(9, 1), randomBlock(c.blockSize)), /only 1 of 2 replicas/);
  await c.restart(0);
  await c.restart(1);
});

test('list-peers USED reflects the stored blocks', async () => {
  const peers = await c.meta.getPeers();
  const used = peers.reduce((s, p) => s + p.usedBlocks, 0);
  assert.ok(used >= 2 * (N + 50), `used ${used}`);
});
