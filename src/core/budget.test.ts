import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ByteBudget } from './budget.js';

test('past the limit a holder may still reach its fair share among those holding memory; the total stays under 1.5 x the limit', () => {
  const b = new ByteBudget(100);
  const greedy = [b.join(), b.join(), b.join()];
  const newcomer = b.join();
  // A hundred connections that hold nothing take no share.
  const idle = Array.from({ length: 100 }, () => b.join());
  // The first two fill the budget while it has room.
  assert.ok(greedy[0]!.mayTake(60));
  greedy[0]!.set(60);
  assert.ok(greedy[1]!.mayTake(40));
  greedy[1]!.set(40);
  // Full: a third gets its share among three, 100 / (2 x 3).
  assert.ok(!greedy[2]!.mayTake(17));
  assert.ok(greedy[2]!.mayTake(16));
  greedy[2]!.set(16);
  // The newcomer, among four: 12.5.
  assert.ok(newcomer.mayTake(12));
  newcomer.set(12);
  assert.ok(!newcomer.mayTake(1));
  assert.ok(b.used <= 150);
  assert.equal(b.peak, 128);
  for (const h of [...greedy, newcomer, ...idle]) h.leave();
  assert.equal(b.used, 0);
  assert.equal(b.holders, 0);
});

test('a waiting holder is woken once room is freed, not while the budget stays full', async () => {
  const b = new ByteBudget(100);
  const big = b.join();
  const waiter = b.join();
  big.set(100);
  waiter.set(30); // over its share (25, among two): it waits for the total to fall
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

test('shares taken one after another as connections arrive never take the total past 1.5 x the limit', () => {
  const b = new ByteBudget(100);
  const all = [b.join()];
  all[0]!.set(100);
  // Each newcomer takes its share at once; without the hard limit these would add up to
  // 100 / 2 x (1/2 + 1/3 + ... + 1/40), about 1.6 x the limit on top.
  for (let i = 0; i < 40; i++) {
    const h = b.join();
    all.push(h);
    const share = Math.floor(b.share(false));
    if (h.mayTake(share)) h.set(share);
  }
  assert.ok(b.used <= 150, `${b.used} held`);
  for (const h of all) h.leave();
});
