import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ByteBudget } from './budget.js';

test('past the limit a holder may still reach its fair share; the total stays under 1.5 x the limit', () => {
  const b = new ByteBudget(100);
  const greedy = [b.join(), b.join(), b.join(), b.join()];
  const newcomer = b.join();
  // The first two fill the budget while it has room.
  assert.ok(greedy[0]!.mayTake(60));
  greedy[0]!.set(60);
  assert.ok(greedy[1]!.mayTake(40));
  greedy[1]!.set(40);
  // Full: the others get only their share, 100 / (2 x 5) = 10.
  assert.ok(!greedy[2]!.mayTake(11));
  assert.ok(greedy[2]!.mayTake(10));
  greedy[2]!.set(10);
  assert.ok(newcomer.mayTake(10));
  newcomer.set(10);
  assert.ok(!newcomer.mayTake(1));
  greedy[3]!.set(10);
  assert.ok(b.used <= 150);
  assert.equal(b.peak, 130);
  for (const h of [...greedy, newcomer]) h.leave();
  assert.equal(b.used, 0);
  assert.equal(b.holders, 0);
});

test('a waiting holder is woken once room is freed, not while the budget stays full', async () => {
  const b = new ByteBudget(100);
  const big = b.join();
  const waiter = b.join();
  big.set(100);
  waiter.set(30); // over its share (25): it waits for the total to fall
  let woken = 0;
  waiter.waitForRoom(() => woken++);
  big.set(120);
  big.set(110); // still over the limit: no wake
  await new Promise((r) => setImmediate(r));
  assert.equal(woken, 0);
  big.set(20);
  big.set(10); // two releases in one turn: one wake
  await new Promise((r) => setImmediate(r));
  assert.equal(woken, 1);
  big.leave();
  waiter.leave();
});
