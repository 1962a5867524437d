import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { NodeMetrics } from '../../http/metrics.js';
import type { VolumeClient } from '../../volume/client.js';
import { VolumeProvider } from '../../volume/provider.js';
import { memoryCluster } from '../../volume/testing.js';
import { BlockVolume } from '../../volume/volume.js';
import { volumeBudgets, volumeMemorySamples } from '../shared/volume-memory.js';

const BS = 4096;

test('volume memory metrics: each cache of an open volume beside the budget its flag set; the series go when it closes', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 64 * BS);
  const vc = { vmeta: c.vmeta, block: { distributor: c.dist }, openVolume: (name: string, opts = {}) => BlockVolume.open(c.ctx, name, opts) } as unknown as VolumeClient;
  const budgets = volumeBudgets({ writeCacheSize: '1MiB', journalTailSize: '4MiB', pageCacheSize: '2MiB', overlaySegments: '5000' });
  assert.throws(() => volumeBudgets({ writeCacheSize: '1MiB', journalTailSize: '1KiB', pageCacheSize: '2MiB' }), /invalid --journal-tail-size "1KiB"/);
  assert.throws(() => volumeBudgets({ writeCacheSize: '1MiB', journalTailSize: '4MiB', pageCacheSize: '2MiB', overlaySegments: '10' }, 'nbd-'), /invalid --nbd-overlay-segments "10"/);
  const provider = new VolumeProvider(vc, budgets);
  const metrics = new NodeMetrics(() => volumeMemorySamples(provider));
  const held = await provider.open('v', { readOnly: false });
  // Unflushed small writes: in the write cache; flushed, in the journal tail until a checkpoint.
  for (let i = 0; i < 8; i++) await held.device.write(i * BS + 100, randomBytes(1000));
  let text = (await metrics.render()).body;
  const value = (cache: string, suffix = ''): number => Number(new RegExp(`^torus_volume_memory${suffix}_bytes\\{volume="v",cache="${cache}"\\} (\\d+)`, 'm').exec(text)?.[1] ?? NaN);
  assert.equal(value('write_cache'), 8000, text);
  assert.equal(value('write_cache', '_limit'), 1024 * 1024);
  assert.equal(value('journal_tail', '_limit'), 4 * 1024 * 1024);
  assert.equal(value('page_cache', '_limit'), 2 * 1024 * 1024);
  const overlay = (suffix = ''): number => Number(new RegExp(`^torus_volume_overlay_segments${suffix}\\{volume="v"\\} (\\d+)`, 'm').exec(text)?.[1] ?? NaN);
  assert.equal(overlay('_limit'), 5000, text);
  await held.device.flush();
  text = (await metrics.render()).body;
  assert.equal(value('write_cache'), 0);
  assert.equal(value('journal_tail'), 8000);
  // Journaled, the eight writes are indexed over their blocks until those fold.
  assert.equal(overlay(), 8);
  await held.release();
  text = (await metrics.render()).body;
  assert.doesNotMatch(text, /^torus_volume_memory_bytes\{/m, 'a closed volume has no series left');
});
