import { crc32c } from '@node-rs/crc32';
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

  it('inspects a damaged or swapped copy as the disk store does, and keeps it', async () => {
    const s = new MemoryBlockStore({ blockSize: 64, capacityBlocks: 2 });
    const [a, b] = [dataRef(1, 1, 0), dataRef(1, 1, 1)];
    await s.putBlock(a, pattern(3, 64));
    await s.putBlock(b, pattern(4, 64));
    s.corruptBlock(a);
    s.replaceBlock(b, pattern(5, 64));
    assert.deepEqual(await s.inspectBlock(a), { status: 'corrupt', reason: 'a sector does not match its checksum', crc: crc32c(pattern(3, 64)) >>> 0 });
    assert.deepEqual(await s.inspectBlock(b), { status: 'corrupt', reason: "its sector checksums do not combine to the writer's CRC", crc: crc32c(pattern(4, 64)) >>> 0 });
    assert.ok(s.hasBlock(a) && s.hasBlock(b));
  });

  it('refuses nonsense geometry', () => {
    assert.throws(() => new MemoryBlockStore({ blockSize: 0, capacityBlocks: 2 }), /invalid block size/);
    assert.throws(() => new MemoryBlockStore({ blockSize: 64, capacityBlocks: 0 }), /invalid capacity/);
  });
});
