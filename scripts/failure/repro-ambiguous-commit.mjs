#!/usr/bin/env node
/* global Buffer, console, process */
// Reproduces what bench/failure.ts (scenario d) saw once in three runs: a sync whose head commit
// reached etcd although its caller got ETCD_UNAVAILABLE (the reply was lost when the client was
// cut off from etcd). The writer then rebuilds its tree from the head *before* that commit, which
// is no longer the head: GC deletes that tree's inode pages, so the writer's own reads of
// unchanged blocks fail (BLOCK_UNAVAILABLE), and its next sync fails LOCKED although its lease
// is fine, because the epoch moved under it. Nothing acknowledged is lost (the head is the
// state the writer tried to commit), but the writer is wedged until it reopens the volume.
//
//   npx tsc -p tsconfig.json && node scripts/failure/repro-ambiguous-commit.mjs
//
// Prints "reproduced" (exit 1) or "not reproduced" (exit 0). Fixed in 7abba9e (VolumeMeta.commit
// asks etcd whether a commit with a lost reply was applied); kept as a check.
import { TorusError } from '../../dist/src/core/errors.js';
import { buildLiveSet, collectLocal } from '../../dist/src/volume/gc.js';
import { VolumeMeta } from '../../dist/src/volume/meta.js';
import { BlockVolume } from '../../dist/src/volume/volume.js';
import { memoryCluster } from '../../dist/src/volume/testing.js';

const BS = 4096;
const c = await memoryCluster(BS);
const kv = c.meta.kv();
let loseNextCommitReply = false;
// etcd applies the transaction, the client never hears back.
const flaky = Object.create(kv);
flaky.txn = async (cmp, ok, fail) => {
  const r = await kv.txn(cmp, ok, fail);
  const isCommit = ok.some((o) => o.op === 'put' && o.key.endsWith('/head'));
  if (isCommit && loseNextCommitReply) {
    loseNextCommitReply = false;
    throw new TorusError('ETCD_UNAVAILABLE', 'cannot reach etcd (transaction): deadline exceeded (the reply was lost)');
  }
  return r;
};
const vmeta = new VolumeMeta(flaky);
await vmeta.create('v', 64 * BS);
const vol = await BlockVolume.open({ ...c.ctx, meta: vmeta }, 'v');
await vol.write(0, Buffer.alloc(4 * BS, 1));
await vol.flush();
await vol.write(0, Buffer.alloc(BS, 2));
loseNextCommitReply = true;
try {
  await vol.flush();
} catch (err) {
  console.log(`sync: ${err.code} (${err.message})`);
}
const head = (await new VolumeMeta(kv).head((await vmeta.get('v')).id)).head;
console.log(`head in etcd: epoch ${head.epoch} (the "failed" sync committed)`);
// A GC pass on every node, as torusd runs every --gc-interval.
const live = await buildLiveSet(new VolumeMeta(kv), c.dist);
let deleted = 0;
for (const s of c.stores) deleted += (await collectLocal(live, s)).deleted;
console.log(`GC deleted ${deleted} block(s)`);
let wedged = false;
try {
  await vol.read(BS, BS);
  console.log('read of an unchanged block: ok');
} catch (err) {
  wedged = true;
  console.log(`read of an unchanged block: ${err.code}: ${err.message}`);
}
await vol.write(8 * BS, Buffer.alloc(BS, 3));
try {
  await vol.flush();
  console.log('next sync: ok');
} catch (err) {
  wedged = true;
  console.log(`next sync: ${err.code}: ${err.message} (lease alive: ${c.session.alive})`);
}
console.log(wedged ? 'reproduced' : 'not reproduced');
process.exit(wedged ? 1 : 0);
