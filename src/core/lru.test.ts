import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BlockCache } from './lru.js';

const buf = (n: number, fill = 0): Buffer => Buffer.alloc(n, fill);

test('evicts the least recently used entries past the byte bound; get refreshes', () => {
  const c = new BlockCache(300);
  c.set('a', buf(100, 1));
  c.set('b', buf(100, 2));
  c.set('c', buf(100, 3));
  assert.equal(c.get('a')?.[0], 1); // a is now the most recent
  c.set('d', buf(100, 4)); // evicts b
  assert.equal(c.get('b'), undefined);
  assert.deepEqual([c.get('a')?.[0], c.get('c')?.[0], c.get('d')?.[0]], [1, 3, 4]);
  assert.equal(c.usedBytes, 300);
  assert.equal(c.size, 3);
  c.set('e', buf(250, 5)); // evicts a, c and d: the three oldest
  assert.deepEqual([c.get('a'), c.get('c'), c.get('d')], [undefined, undefined, undefined]);
  assert.equal(c.get('e')?.length, 250);
  assert.equal(c.usedBytes, 250);
});

test('replacing a key updates its bytes; delete and oversize values', () => {
  const c = new BlockCache(100);
  c.set('a', buf(40));
  c.set('a', buf(60));
  assert.equal(c.usedBytes, 60);
  assert.equal(c.size, 1);
  c.set('huge', buf(101));
  assert.equal(c.get('huge'), undefined, 'a value larger than the cache is not kept');
  assert.equal(c.get('a')?.length, 60);
  c.delete('a');
  c.delete('missing');
  assert.equal(c.usedBytes, 0);
  assert.equal(c.size, 0);
  c.set('b', buf(50));
  c.set('c', buf(50));
  c.set('d', buf(50));
  assert.equal(c.get('b'), undefined);
  assert.equal(c.size, 2);
});

test('many entries under random churn stay within the bound and consistent', () => {
  const c = new BlockCache(64 * 4096);
  const page = buf(4096);
  let hits = 0;
  for (let i = 0; i < 20000; i++) {
    // A hot set that fits, and a cold stream that keeps evicting around it.
    const k = i % 3 === 0 ? `k${(i * 7919) % 1000}` : `k${i % 40}`;
    if (c.get(k)) hits++;
    else c.set(k, page);
    if (i % 97 === 0) c.delete(`k${i % 1000}`);
    assert.ok(c.usedBytes <= 64 * 4096);
  }
  assert.equal(c.usedBytes, c.size * 4096);
  assert.equal(c.hits, hits);
  assert.ok(hits > 0);
});
