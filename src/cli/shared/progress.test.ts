import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MovementProgress, formatEta, progressLine } from './progress.js';

// The issue's `0% 0 B/105 MiB 0 B/s ETA NFs` while 105 MiB moved, and `0 B/1 B` with nothing to
// move: progress is built from the nodes' successive estimates of what is left.

test('progress from estimates of what is left: done only grows, the total grows with the estimate, rate and ETA measured', () => {
  const p = new MovementProgress();
  const MiB = 1024 * 1024;
  let x = p.update(0, 0, 0);
  assert.equal(x.estimated, false);
  assert.equal(progressLine(x), 'rebalance: estimating what is left to move');
  x = p.update(100 * MiB, 0, 1000);
  assert.deepEqual([x.done, x.total], [0, 100 * MiB]);
  x = p.update(80 * MiB, 0, 2000);
  assert.deepEqual([x.done, x.total, x.rate], [20 * MiB, 100 * MiB, 10 * MiB]);
  assert.equal(x.etaSec, 8);
  // A node's estimate grows (it found more to move): the total grows, done stays.
  x = p.update(90 * MiB, 0, 3000);
  assert.deepEqual([x.done, x.total], [20 * MiB, 110 * MiB]);
  x = p.update(10 * MiB, 0, 4000);
  assert.equal(x.done, 100 * MiB);
  assert.equal(progressLine(x), 'rebalance: 90% 100 MiB of 110 MiB moved, 25 MiB/s, ETA 1s');
  x = p.update(0, 0, 5000);
  assert.deepEqual([x.done, x.total], [110 * MiB, 110 * MiB]);
});

test('before any movement is measured, the nodes\' own rate is used; ETA words', () => {
  const x = new MovementProgress().update(50, 10, 0);
  assert.deepEqual([x.rate, x.etaSec], [10, 5]);
  assert.deepEqual([formatEta(undefined), formatEta(59), formatEta(61), formatEta(3700)], ['unknown', '59s', '1m01s', '1h01m']);
});
