import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { blockStoreConformance, rejectsWith } from './block-store-conformance.js';
import { MemoryBlockStore } from './memory-store.js';
import { dataRef, pattern } from './testing.js';

blockStoreConformance('MemoryBlockStore', async ({ blockSize, capacityBlocks }) => {
  const store = new MemoryBlockStore({ blockSize, capacityBlocks });
  return { store, cleanup: () => store.close() };
});

describe('MemoryBlockStore', () => {
  it('copies the caller buffer on put', async () => {
    const s = new MemoryBlockStore({ blockSize: 64, capacityBlocks: 2 });
    const data = pattern(1, 64);
    await s.putBlock(dataRef(1, 1, 0), data);
    data.fill(0);
    assert.deepEqual(await s.getBlock(dataRef(1, 1, 0)), pattern(1, 64));
  });

  it('simulates a corrupt copy: CORRUPT once, then dropped so a repair put stores it', async () => {
    const s = new MemoryBlockStore({ blockSize: 64, capacityBlocks: 2 });
    const ref = dataRef(1, 1, 0);
    await s.putBlock(ref, pattern(2, 64));
    s.corruptBlock(ref);
    await rejectsWith(s.readRange(ref, 0, 8), 'CORRUPT');
    assert.equal(s.hasBlock(ref), false);
    await s.putBlock(ref, pattern(2, 64));
    assert.deepEqual(await s.getBlock(ref), pattern(2, 64));
    s.corruptBlock(ref);
    assert.equal(await s.verifyBlock(ref), 'corrupt');
    assert.equal(s.stats().checksumFailures, 2);
  });

  it('refuses nonsense geometry', () => {
    assert.throws(() => new MemoryBlockStore({ blockSize: 0, capacityBlocks: 2 }), /invalid block size/);
    assert.throws(() => new MemoryBlockStore({ blockSize: 64, capacityBlocks: 0 }), /invalid capacity/);
  });
});
