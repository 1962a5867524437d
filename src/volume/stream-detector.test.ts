import assert from 'node:assert/strict';
import { test } from 'node:test';
import { StreamDetector } from './stream-detector.js';

const MiB = 1024 * 1024;

test('a read that starts where a recent one ended continues a stream; the first does not', () => {
  const d = new StreamDetector();
  assert.equal(d.note(0, MiB), false);
  for (let i = 1; i < 100; i++) assert.equal(d.note(i * MiB, MiB), true, `read ${i}`);
});

test('several streams at once, and requests served a little out of order, are still streams', () => {
  const d = new StreamDetector();
  const bases = [0, 100 * MiB, 200 * MiB, 300 * MiB];
  for (const b of bases) d.note(b, 4096);
  for (let i = 1; i < 50; i++) for (const b of bases) assert.equal(d.note(b + i * 4096, 4096), true);
  // A queue served a little out of order: neighbours swapped, and one request overtaking seven.
  const e = new StreamDetector();
  e.note(0, MiB);
  const order: number[] = [];
  for (let i = 1; i < 60; i += 2) order.push(i + 1, i);
  order.push(68, 61, 62, 63, 64, 65, 66, 67);
  for (const i of order) assert.equal(e.note(i * MiB, MiB), true, `read ${i}`);
});

test('random reads are not a stream', () => {
  // 4 KiB reads over 256 MiB (P3's working set): 16 windows of 9 reads each cover 0.2% of it.
  const d = new StreamDetector();
  let seq = 0;
  let x = 2463534242;
  for (let i = 0; i < 10_000; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    if (d.note((x % 65536) * 4096, 4096)) seq++;
  }
  assert.ok(seq < 100, `${seq} of 10000 random reads seen as sequential`);
});

test('re-reading a range, or reading what lies just before it, is not a stream', () => {
  const d = new StreamDetector();
  d.note(64 * 4096, 4096);
  assert.equal(d.note(64 * 4096, 4096), false);
  assert.equal(d.note(64 * 4096 + 100, 10), false);
  assert.equal(d.note(63 * 4096, 4096), false);
  // Far ahead of every recent end: not a stream either.
  assert.equal(d.note(64 * 4096 + 4096 + 9 * 4096, 4096), false);
});
