import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { BufferPool } from './buffer-pool.js';

describe('BufferPool', () => {
  const poisoned = BufferPool.poison;
  before(() => (BufferPool.poison = true));
  after(() => (BufferPool.poison = poisoned));

  it('hands a released buffer of the same size out again, poisoned in tests, and counts what is out', () => {
    const pool = new BufferPool(1 << 20);
    const a = pool.take(1000);
    a.buffer.fill(1);
    assert.equal(pool.outstanding, 1);
    a.retain();
    a.release();
    assert.equal(pool.outstanding, 1, 'still held once');
    assert.ok(a.buffer.every((b) => b === 1), 'not poisoned while held');
    a.release();
    assert.equal(pool.outstanding, 0);
    assert.ok(a.buffer.every((b) => b === BufferPool.POISON_BYTE), 'poisoned once released');
    const b = pool.take(1000);
    assert.equal(b.buffer, a.buffer);
    assert.equal(pool.take(999).buffer.length, 999);
    assert.deepEqual([pool.allocated, pool.reused], [2, 1]);
  });

  it('a double release or a retain after release throws', () => {
    const pool = new BufferPool(1 << 20);
    const a = pool.take(10);
    a.release();
    assert.throws(() => a.release(), /released twice/);
    assert.throws(() => a.retain(), /already released/);
  });

  it('keeps at most maxIdleBytes idle, dropping other sizes before the one just released', () => {
    const pool = new BufferPool(3000);
    const small = [pool.take(1000), pool.take(1000)];
    const big = pool.take(2000);
    for (const l of small) l.release();
    assert.equal(pool.idleByteCount, 2000);
    big.release();
    assert.equal(pool.idleByteCount, 3000, 'a 1000-byte buffer made room');
    assert.equal(pool.take(2000).buffer, big.buffer);
    const huge = pool.take(5000);
    huge.release();
    assert.equal(pool.idleByteCount, 0, 'a buffer over the cap is dropped');
  });
});
