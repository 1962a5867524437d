import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BlockCache, S3FifoCache } from './s3fifo.js';

const buf = (n: number, fill = 0): Buffer => Buffer.alloc(n, fill);
const PAGE = 4096;

test('stays within its bytes; replacing a key updates them; delete; a value larger than the cache is not kept', () => {
  const c = new BlockCache(10 * PAGE);
  for (let i = 0; i < 50; i++) {
    c.set(`k${i}`, buf(PAGE, i));
    assert.ok(c.usedBytes <= 10 * PAGE);
  }
  assert.equal(c.usedBytes, c.size * PAGE);
  c.set('k49', buf(2 * PAGE, 7));
  assert.equal(c.get('k49')?.length, 2 * PAGE);
  assert.ok(c.usedBytes <= 10 * PAGE);
  c.delete('k49');
  c.delete('missing');
  assert.equal(c.get('k49'), undefined);
  assert.equal(c.usedBytes, c.size * PAGE);
  c.set('huge', buf(11 * PAGE));
  assert.equal(c.get('huge'), undefined);
  // What is there reads back as it was stored.
  for (let i = 0; i < 50; i++) {
    const v = c.get(`k${i}`);
    if (v) assert.equal(v[0], i);
  }
});

test('a scan larger than the cache does not push out what is read again and again', () => {
  const c = new BlockCache(100 * PAGE);
  const hot = Array.from({ length: 40 }, (_, i) => `hot${i}`);
  // The hot set is read a few times (it reaches the main queue)...
  for (let round = 0; round < 3; round++) for (const k of hot) if (!c.get(k)) c.set(k, buf(PAGE, 1));
  // ...then a sequential read passes over ten times the cache, each block once.
  for (let i = 0; i < 1000; i++) if (!c.get(`scan${i}`)) c.set(`scan${i}`, buf(PAGE, 2));
  const kept = hot.filter((k) => c.get(k) !== undefined).length;
  assert.equal(kept, hot.length, `${kept} of ${hot.length} hot entries survived the scan`);
  // And the scan itself holds no more than the small queue (a tenth) and what is left over.
  assert.ok(c.usedBytes <= 100 * PAGE);
});

test('an LRU loses the same hot set to the same scan (what the test above guards against)', async () => {
  const { LruCache } = await import('./lru.js');
  const c = new LruCache<string, Buffer>(100 * PAGE, (b) => b.length);
  const hot = Array.from({ length: 40 }, (_, i) => `hot${i}`);
  for (let round = 0; round < 3; round++) for (const k of hot) if (!c.get(k)) c.set(k, buf(PAGE, 1));
  for (let i = 0; i < 1000; i++) if (!c.get(`scan${i}`)) c.set(`scan${i}`, buf(PAGE, 2));
  assert.equal(hot.filter((k) => c.get(k) !== undefined).length, 0);
});

test('a key evicted unread comes back into the main queue when it is set again soon (the ghost queue)', () => {
  const c = new S3FifoCache<string, Buffer>(20 * PAGE, (b) => b.length);
  let once = 0;
  const stream = (n: number): void => {
    for (let i = 0; i < n; i++) c.set(`once${once++}`, buf(PAGE));
  };
  c.set('w', buf(PAGE, 9));
  stream(25); // w leaves the small queue unread
  assert.equal(c.get('w'), undefined);
  c.set('w', buf(PAGE, 9)); // remembered: straight into the main queue
  stream(25); // a stream of pages read once passes through the small queue only
  assert.equal(c.get('w')?.[0], 9);
  // A key never seen before goes on probation, and a stream as long pushes it out.
  c.set('x', buf(PAGE));
  stream(25);
  assert.equal(c.get('x'), undefined);
});

test('many entries under churn stay within the bound and consistent', () => {
  const c = new BlockCache(64 * PAGE);
  const page = buf(PAGE);
  let hits = 0;
  for (let i = 0; i < 20000; i++) {
    const k = i % 3 === 0 ? `k${(i * 7919) % 1000}` : `k${i % 40}`;
    if (c.get(k)) hits++;
    else c.set(k, page);
    if (i % 97 === 0) c.delete(`k${i % 1000}`);
    assert.ok(c.usedBytes <= 64 * PAGE);
  }
  assert.equal(c.usedBytes, c.size * PAGE);
  assert.equal(c.hits, hits);
  // The hot 40 keys (two reads in three) are nearly always there.
  assert.ok(hits > 12000, `${hits} hits`);
});
