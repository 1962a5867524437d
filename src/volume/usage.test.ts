import assert from 'node:assert/strict';
import { test } from 'node:test';
import { blockRefKey } from '../core/ids.js';
import { logRef } from './journal-format.js';
import type { Pointer } from './records.js';
import { decodeRunPage } from './runs.js';
import { memoryCluster } from './testing.js';
import { TreeReader } from './usage.js';
import { BlockVolume } from './volume.js';

test('a head counts every log block its run chain points into, read from the pages whole as an oracle', async () => {
  const BS = 4096;
  const c = await memoryCluster(BS);
  const rec = await c.vmeta.create('v', 64 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  // Sub-block writes stay in log blocks as overlays: the runs name them.
  for (let i = 0; i < 40; i++) {
    await vol.write(((i * 7) % 64) * BS + 100, Buffer.alloc(300, i + 1));
    await vol.flush();
  }
  await vol.close();
  const { head } = await c.vmeta.head(rec.id);
  assert.ok(head.runs, 'the head has a run chain');

  const named = new Set<string>();
  for (let p: Pointer | null = head.runs ?? null; p; ) {
    const page = decodeRunPage(await c.dist.getBlock(p.ref, p.crc));
    for (const e of page.entries) if (e.kind === 'log') named.add(blockRefKey(logRef(e.log)));
    if (page.base) break;
    p = page.prev;
  }
  assert.ok(named.size > 1, `log blocks named: ${named.size}`);
  const { data } = await new TreeReader(c.dist).blocks(head);
  for (const k of named) assert.ok(data.has(k), `log block ${k} counted`);
});
