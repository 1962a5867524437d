#!/usr/bin/env node
/* global Buffer, console, process, setTimeout */
// Reproduces a client crash found by bench/failure.ts (scenario e, etcd down 40 s): when a block
// put fails fast during a volume sync (cluster full: OUT_OF_SPACE; or fewer than R peers up with
// their breakers open: NO_PEER) while the sync is still awaiting an inode page load, the put's
// rejection has no handler yet (BlockVolume.sync attaches one only at Promise.allSettled, after
// tree.set/tree.commit), so Node's default --unhandled-rejections=throw kills the process instead
// of the flush failing. In torusblk that ends the NBD/AoE server.
//
//   npx tsc -p tsconfig.json && node scripts/failure/repro-sync-unhandled-rejection.mjs
//
// Prints "reproduced" (exit 1) or "not reproduced: flush failed cleanly with CODE" (exit 0).
// Fixed in 7abba9e (src/volume/volume.ts); kept as a check (docs/failure-guide.md).
import { TorusError } from '../../dist/src/core/errors.js';
import { BlockVolume } from '../../dist/src/volume/volume.js';
import { memoryCluster } from '../../dist/src/volume/testing.js';

const BS = 4096;
const c = await memoryCluster(BS);
await c.vmeta.create('v', 64 * BS);
// A committed head with data: its inode pages live in the store.
const first = await BlockVolume.open(c.ctx, 'v');
await first.write(0, Buffer.alloc(BS * 4, 1));
await first.close();

// The same cluster seen through a store whose puts now fail at once (the cluster is full) and
// whose reads take a network round trip.
let failPuts = false;
const store = {
  blockSize: BS,
  putBlock: (ref, data) => (failPuts ? Promise.reject(new TorusError('OUT_OF_SPACE', 'cluster full')) : c.dist.putBlock(ref, data)),
  getBlock: async (ref, crc) => {
    await new Promise((r) => setTimeout(r, 20));
    return c.dist.getBlock(ref, crc);
  },
  readRange: (ref, o, l) => c.dist.readRange(ref, o, l),
  flush: () => c.dist.flush(),
};
process.on('unhandledRejection', (err) => {
  console.log(`reproduced: unhandled rejection during sync (${err.code}: ${err.message}); without this handler the process exits`);
  process.exit(1);
});
const vol = await BlockVolume.open({ ...c.ctx, store }, 'v');
await vol.write(8 * BS, Buffer.alloc(BS, 2)); // a whole block: no read needed to write it
failPuts = true;
try {
  await vol.flush();
  console.log('not reproduced: the flush succeeded');
} catch (err) {
  // Let a late unhandled rejection surface before concluding.
  await new Promise((r) => setTimeout(r, 200));
  console.log(`not reproduced: flush failed cleanly with ${err.code}`);
}
process.exit(0);
