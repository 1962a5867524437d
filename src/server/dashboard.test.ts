import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { VolumeBlockStore } from '../volume/inode.js';
import { memoryCluster } from '../volume/testing.js';
import { BlockVolume } from '../volume/volume.js';
import { Dashboard } from './dashboard.js';

test('the background tick records events without walking any volume tree; a request counts allocation', async () => {
  const c = await memoryCluster(4096);
  await c.meta.init({ blockSize: 4096, clusterId: 'c', createdAt: '' }, { type: 'ketama', version: 1, replication: 2, peers: [] });
  await c.vmeta.create('v', 64 * 4096);
  const vol = await BlockVolume.open(c.ctx, 'v');
  await vol.write(0, Buffer.alloc(3 * 4096, 7));
  await vol.close();
  // The tree pages read through this store are what an allocation walk costs.
  let pageReads = 0;
  const store: VolumeBlockStore = Object.assign(Object.create(c.dist) as VolumeBlockStore, {
    getBlock: (...a: Parameters<VolumeBlockStore['getBlock']>) => (pageReads++, c.dist.getBlock(...a)),
  });
  const errors: Error[] = [];
  const d = new Dashboard(c.meta, { uuid: 'a', address: '' }, () => store, (e) => errors.push(e));
  d.start(1);
  try {
    // The first tick takes in the cluster as it is; a volume created after it is an event.
    await new Promise((r) => setTimeout(r, 100));
    await c.vmeta.create('w', 4096);
    const deadline = Date.now() + 10_000;
    const seen = (): boolean => d.recentEvents().some((e) => e.text === 'volume w created');
    while (!seen() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    assert.ok(seen(), `the tick saw the new volume (errors: ${errors.map((e) => e.message).join('; ')})`);
  } finally {
    d.stop();
  }
  const before = pageReads;
  assert.equal(before, 0, 'no tree was walked by the tick');
  let row = (await d.view()).volumes.find((v) => v.name === 'v');
  for (let i = 0; i < 200 && row?.allocated === null; i++) {
    await new Promise((r) => setTimeout(r, 5));
    row = (await d.view()).volumes.find((v) => v.name === 'v');
  }
  assert.equal(row?.allocated, 3 * 4096);
  assert.ok(pageReads > 0, 'the request walked the tree');
});

