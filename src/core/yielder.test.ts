import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Yielder } from './yielder.js';

test('a Yielder asks for a pause once its slice is used, and the pause lets queued callbacks run', async () => {
  const y = new Yielder(0, 4);
  // With a zero slice it is due every fourth call (the clock is read that often).
  assert.deepEqual([1, 2, 3, 4, 5, 6, 7, 8].map(() => y.due()), [false, false, false, true, false, false, false, true]);
  let ran = false;
  setImmediate(() => (ran = true));
  await y.pause();
  assert.equal(ran, true);
  // A long slice is never due in a short loop.
  const slow = new Yielder(60_000, 1);
  for (let i = 0; i < 1000; i++) assert.equal(slow.due(), false);
});
