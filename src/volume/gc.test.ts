import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { BlockType } from '../core/ids.js';
import { buildLiveSet, collectLocal } from './gc.js';
import { memoryCluster } from './testing.js';
import { BlockVolume } from './volume.js';

const BS = 4096;

async function gcAll(c: Awaited<ReturnType<typeof memoryCluster>>): Promise<number> {
  const live = await buildLiveSet(c.vmeta, c.dist);
  let deleted = 0;
  for (const s of c.stores) deleted += (await collectLocal(live, s)).deleted;
  return deleted;
}

test('superseded and trimmed blocks are collected once folded; live data stays readable', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 16 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  await vol.write(0, randomBytes(16 * BS));
  await vol.flush();
  await vol.foldAll();
  const afterFirst = c.used();
  const second = randomBytes(8 * BS);
  await vol.write(0, second);
  await vol.flush();
  await vol.trim(12 * BS, 4 * BS);
  await vol.flush();
  await vol.foldAll();
  await vol.close();
  const before = c.used();
  const deleted = await gcAll(c);
  assert.ok(deleted > 0);
  // 16 data blocks -> 12 live ones (8 rewritten, 4 trimmed) and the inode page at R=2; the log
  // blocks the journal held them in, and the run pages naming them, are gone.
  assert.ok(c.used() < before && c.used() < afterFirst, `used ${c.used()} before ${before}`);
  assert.equal(c.used(), 2 * (12 + 1));
  const ro = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await ro.read(0, 8 * BS)).equals(second));
  assert.ok((await ro.read(12 * BS, 4 * BS)).equals(Buffer.alloc(4 * BS)));
});

test('a deleted volume is collected whole, except what a clone still shares', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 8 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  const data = randomBytes(8 * BS);
  await vol.write(0, data);
  await vol.close();
  await c.vmeta.createSnapshot('v', 's');
  const { snapshot } = await c.vmeta.getSnapshot('v', 's');
  await c.vmeta.create('clone', snapshot.head.size, { head: snapshot.head, parent: { volume: 'v', snapshot: 's' } });
  const clone = await BlockVolume.open(c.ctx, 'clone');
  await clone.write(0, Buffer.alloc(BS, 1)); // one block of its own
  await clone.close();
  await c.vmeta.delete('v');
  await gcAll(c);
  const ro = await BlockVolume.open(c.ctx, 'clone', { readOnly: true });
  const expect = Buffer.from(data);
  expect.fill(1, 0, BS);
  assert.ok((await ro.read(0, 8 * BS)).equals(expect), "the clone's data survives its parent's deletion");
  await c.vmeta.delete('clone');
  await gcAll(c);
  assert.equal(c.used(), 0);
});

test('blocks of a sync in flight, and of volumes newer than the view, are never collected', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 8 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  await vol.write(0, randomBytes(8 * BS));
  await vol.flush();
  // The view is taken, then a sync writes blocks and a new volume appears, then GC deletes.
  const live = await buildLiveSet(c.vmeta, c.dist);
  const data = randomBytes(8 * BS);
  await vol.write(0, data);
  await vol.flush();
  await c.vmeta.create('late', 8 * BS);
  const late = await BlockVolume.open(c.ctx, 'late');
  await late.write(0, data);
  await late.flush();
  for (const s of c.stores) await collectLocal(live, s);
  assert.ok((await vol.read(0, 8 * BS)).equals(data));
  assert.ok((await late.read(0, 8 * BS)).equals(data));
  await vol.close();
  await late.close();
  const fresh = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await fresh.read(0, 8 * BS)).equals(data));
});

test('orphans: a block type this build does not know, and a volume id etcd never handed out; nothing else', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 8 * BS);
  await c.vmeta.create('gone', 8 * BS);
  await c.vmeta.delete('gone');
  const vol = await BlockVolume.open(c.ctx, 'v');
  await vol.write(0, randomBytes(2 * BS));
  await vol.foldAll();
  const live = await buildLiveSet(c.vmeta, c.dist);
  const [held] = live.refs();
  const newer = { type: 7, volume: held!.volume, inode: 1, index: 0 };
  const restored = { type: BlockType.Data, volume: 1000, inode: 1, index: 0 };
  const deleted = { type: BlockType.Data, volume: held!.volume + 1, inode: 1, index: 0 };
  assert.equal(live.orphan(newer), 'unknown-type');
  assert.equal(live.isDead(newer), false);
  assert.equal(live.orphan(restored), 'unknown-volume');
  assert.equal(live.isDead(restored), false);
  // A deleted volume's blocks are plain garbage (GC deletes them at once), live ones are neither.
  assert.equal(live.orphan(deleted), undefined);
  assert.equal(live.isDead(deleted), true);
  assert.equal(live.orphan(held!), undefined);
  await vol.close();
});

test('GC racing with a stream of syncs never loses a synced byte', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 32 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  const model = Buffer.alloc(32 * BS);
  let stop = false;
  const gc = (async () => {
    let rounds = 0;
    while (!stop && rounds < 200) {
      await gcAll(c);
      rounds++;
      await new Promise((r) => setImmediate(r));
    }
  })();
  for (let i = 0; i < 60; i++) {
    const off = Math.floor(Math.random() * 30 * BS);
    const d = randomBytes(1 + Math.floor(Math.random() * 2 * BS));
    await vol.write(off, d);
    d.copy(model, off);
    await vol.flush();
  }
  stop = true;
  await gc;
  await gcAll(c);
  assert.ok((await vol.read(0, 32 * BS)).equals(model));
  await vol.close();
  const ro = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await ro.read(0, 32 * BS)).equals(model));
});

test('blocks named by Block records: kept while a dead writer\'s tail names them, collected once superseded', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 16 * BS);
  const s1 = await c.newSession();
  const first = await BlockVolume.open({ ...c.ctx, session: s1 }, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  const one = randomBytes(8 * BS);
  await first.write(0, one);
  await first.flush();
  // The writer dies before any checkpoint: only its journal names the 8 blocks.
  (s1 as unknown as { expire(): void }).expire();
  await gcAll(c);
  const ro = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await ro.read(0, 8 * BS)).equals(one), 'GC kept what the tail names');
  // A reader holds what it opened until it closes.
  await ro.close();
  const second = await BlockVolume.open(c.ctx, 'v', { checkpointIntervalMs: 0, snapshotPollMs: 0 });
  assert.ok((await second.read(0, 8 * BS)).equals(one), 'replayed');
  const two = randomBytes(4 * BS);
  await second.write(0, two);
  await second.flush();
  await second.checkpoint();
  await second.close();
  const before = c.used();
  const deleted = await gcAll(c);
  // The 4 superseded blocks on both replicas, at least (and the first session's log blocks).
  assert.ok(deleted >= 4 * 2, `deleted ${deleted}`);
  assert.ok(c.used() < before);
  const after = await BlockVolume.open(c.ctx, 'v', { readOnly: true });
  assert.ok((await after.read(0, 8 * BS)).equals(Buffer.concat([two, one.subarray(4 * BS)])));
});
