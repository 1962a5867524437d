import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { isTorusError } from '../core/errors.js';
import type { MetaKV } from '../core/interfaces.js';
import { buildLiveSet, collectLocal } from './gc.js';
import { VKEYS, VolumeMeta } from './meta.js';
import { memoryCluster } from './testing.js';
import { BlockVolume } from './volume.js';

const BS = 4096;

/** The cluster's KV, with `hook` run once right after the first read of `key` returns. */
function onFirstRead(kv: MetaKV, key: string, hook: () => Promise<void>): MetaKV {
  let fired = false;
  return {
    ...kv,
    get: async (k) => {
      const e = await kv.get(k);
      if (k === key && !fired) {
        fired = true;
        await hook();
      }
      return e;
    },
    list: (p) => kv.list(p),
    txn: (c, s, f) => kv.txn(c, s, f),
    session: (t) => kv.session(t),
  };
}

test('a clone whose snapshot is deleted while it is made fails, and no volume points at blocks GC then took', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 8 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  await vol.write(0, randomBytes(8 * BS));
  await vol.flush();
  await c.vmeta.createSnapshot('v', 's');
  await vol.write(0, randomBytes(8 * BS)); // the snapshot alone holds the first data now
  await vol.close();
  const id = (await c.vmeta.get('v')).id;
  // Between the clone's read of the snapshot and its create: the snapshot goes and GC runs.
  const kv = onFirstRead(c.meta.kv(), VKEYS.snapshot(id, 's'), async () => {
    await c.vmeta.deleteSnapshot('v', 's');
    const live = await buildLiveSet(c.vmeta, c.dist);
    for (const s of c.stores) await collectLocal(live, s);
  });
  await assert.rejects(new VolumeMeta(kv).clone('copy', { volume: 'v', snapshot: 's' }), (e) => isTorusError(e, 'NOT_EXIST'));
  await assert.rejects(c.vmeta.get('copy'), (e) => isTorusError(e, 'NOT_EXIST'));
});

test('a clone of a mounted volume takes its head as of the last checkpoint, and of a head moved meanwhile, the newer one', async () => {
  const c = await memoryCluster(BS);
  await c.vmeta.create('v', 8 * BS);
  const vol = await BlockVolume.open(c.ctx, 'v');
  const first = randomBytes(8 * BS);
  const second = randomBytes(8 * BS);
  await vol.write(0, first);
  await vol.flush();
  await vol.checkpoint();
  await vol.write(0, second);
  await vol.flush();
  const id = (await c.vmeta.get('v')).id;
  const kv = onFirstRead(c.meta.kv(), VKEYS.head2(id), () => vol.checkpoint());
  const rec = await new VolumeMeta(kv).clone('copy', { volume: 'v' }, 16 * BS);
  await vol.write(0, randomBytes(BS)); // not checkpointed: not in any clone
  assert.deepEqual(rec.parent, { volume: 'v' });
  const copy = await BlockVolume.open(c.ctx, 'copy', { readOnly: true });
  assert.equal(copy.size, 16 * BS);
  assert.ok((await copy.read(0, 8 * BS)).equals(second), 'the clone has the head the checkpoint moved to');
  assert.ok((await copy.read(8 * BS, 8 * BS)).equals(Buffer.alloc(8 * BS)), 'the larger clone reads zeros past the source');
  await vol.close();
  await assert.rejects(c.vmeta.clone('copy', { volume: 'v' }), (e) => isTorusError(e, 'EXISTS'));
  await assert.rejects(c.vmeta.clone('small', { volume: 'v' }, BS), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
});
