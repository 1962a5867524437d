import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DeadlineWheel, type Deadlined } from './deadline-wheel.js';

interface Item extends Deadlined {
  readonly name: string;
}

const item = (name: string): Item => ({ name, deadline: 0, slot: -1 });
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A wheel on a clock the test moves by hand; its timer is real, so each step yields to it. */
function manual(tickMs = 10, slots = 8): { wheel: DeadlineWheel<Item>; expired: string[]; advance: (ms: number) => Promise<void> } {
  let now = 1_000;
  const expired: string[] = [];
  const wheel = new DeadlineWheel<Item>((i) => expired.push(i.name), tickMs, slots, () => now);
  return {
    wheel,
    expired,
    advance: async (ms) => {
      now += ms;
      // The timer was set for a delay computed from the fake clock: let it fire.
      await sleep(tickMs * 2 + 5);
    },
  };
}

test('items expire after their deadline, never before, in one tick at most', async () => {
  const { wheel, expired, advance } = manual();
  const a = item('a');
  const b = item('b');
  wheel.arm(a, 25);
  wheel.arm(b, 45);
  await advance(20);
  assert.deepEqual(expired, []);
  await advance(10); // 30: past a's deadline (25)
  assert.deepEqual(expired, ['a']);
  assert.equal(a.slot, -1);
  await advance(10); // 40
  assert.deepEqual(expired, ['a']);
  await advance(10); // 50
  assert.deepEqual(expired, ['a', 'b']);
  assert.equal(wheel.size, 0);
});

test('a cancelled or re-armed item does not expire at its old deadline', async () => {
  const { wheel, expired, advance } = manual();
  const a = item('a');
  const b = item('b');
  wheel.arm(a, 15);
  wheel.arm(b, 15);
  wheel.cancel(a);
  wheel.cancel(a); // twice is harmless
  wheel.arm(b, 200); // re-armed further out, past a whole turn of the 8-slot wheel (80 ms)
  await advance(30);
  assert.deepEqual(expired, []);
  assert.equal(wheel.size, 1);
  for (let t = 0; t < 15; t++) await advance(10); // 180
  assert.deepEqual(expired, []);
  await advance(30); // 210
  assert.deepEqual(expired, ['b']);
});

test('after the event loop was held longer than a whole turn, every overdue item expires once', async () => {
  const { wheel, expired, advance } = manual(10, 4);
  const items = Array.from({ length: 20 }, (_, i) => item(`i${i}`));
  items.forEach((it, i) => wheel.arm(it, 5 + i * 7)); // deadlines spread over 3.5 turns
  await advance(1_000);
  assert.deepEqual([...expired].sort(), items.map((i) => i.name).sort());
  assert.equal(wheel.size, 0);
});

test('an expiry callback may arm and cancel others', async () => {
  let now = 0;
  const expired: string[] = [];
  const later = item('later');
  const doomed = item('doomed');
  const wheel: DeadlineWheel<Item> = new DeadlineWheel<Item>(
    (i) => {
      expired.push(i.name);
      if (i.name === 'first') {
        wheel.cancel(doomed);
        wheel.arm(later, 10);
      }
    },
    10,
    8,
    () => now,
  );
  wheel.arm(item('first'), 5);
  wheel.arm(doomed, 50);
  now = 20;
  await sleep(30);
  now = 40;
  await sleep(30);
  now = 70;
  await sleep(30);
  assert.deepEqual(expired, ['first', 'later']);
  assert.equal(wheel.size, 0);
});

test('on a real clock: one timer for many items, none left once they are gone', async () => {
  const expired: string[] = [];
  const wheel = new DeadlineWheel<Item>((i) => expired.push(i.name), 5);
  const timersBefore = process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;
  const items = Array.from({ length: 500 }, (_, i) => item(`i${i}`));
  for (const it of items) wheel.arm(it, 20 + (it.name.length % 3));
  const timersArmed = process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;
  assert.ok(timersArmed - timersBefore <= 1, `${timersArmed - timersBefore} timers for 500 items`);
  for (const it of items.slice(0, 250)) wheel.cancel(it);
  await sleep(80);
  assert.equal(expired.length, 250);
  assert.equal(wheel.size, 0);
  assert.equal(process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length, timersBefore, 'no timer left running');
});
