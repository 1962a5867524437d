import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SlabAllocator } from './slab.js';

test('slab: small buffers share slabs, never overlap, stay 8-byte aligned; big ones are their own', () => {
  const s = new SlabAllocator(64 * 1024, 16 * 1024);
  const bufs = Array.from({ length: 40 }, (_, i) => s.alloc(i % 2 === 0 ? 4096 : 13));
  for (const [i, b] of bufs.entries()) {
    assert.equal(b.length, i % 2 === 0 ? 4096 : 13);
    assert.equal(b.byteOffset % 8, 0);
    b.fill(i);
  }
  for (const [i, b] of bufs.entries()) assert.ok(b.every((x) => x === i), `buffer ${i} was overwritten by a later one`);
  const slabs = new Set(bufs.map((b) => b.buffer));
  assert.ok(slabs.size >= 2 && slabs.size <= 4, `40 small buffers in ${slabs.size} slabs`);
  const big = s.alloc(16 * 1024 + 1);
  assert.ok(!slabs.has(big.buffer as ArrayBuffer));
  assert.equal(big.length, 16 * 1024 + 1);
});
