// Deadlines for many short-lived items under one timer: a hashed timing wheel.
//
// A peer client's every call has a deadline, and almost every call completes long before it. A
// timer per call costs a Timeout object, a list insert and a clearTimeout per request; here
// arming and cancelling are a Set insert and delete, and one timer, set for the earliest slot
// that holds anything, serves every item. An item expires when the first tick after its
// deadline is handled: at most one tick late, never early.

/** What the wheel keeps on an item: its deadline and slot (-1 while not armed). */
export interface Deadlined {
  deadline: number;
  slot: number;
}

export class DeadlineWheel<T extends Deadlined> {
  private readonly slots: Set<T>[];
  private items = 0;
  private timer: NodeJS.Timeout | undefined;
  /** The tick the timer is set for. */
  private timerTick = Infinity;
  /** Every tick up to this one has been handled. */
  private doneTick: number;

  constructor(
    private readonly onExpire: (item: T) => void,
    private readonly tickMs = 10,
    slots = 256,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.slots = Array.from({ length: slots }, () => new Set<T>());
    this.doneTick = Math.floor(this.now() / tickMs);
  }

  /** Arms (or re-arms) `item` to expire `ms` from now. */
  arm(item: T, ms: number): void {
    if (item.slot >= 0) this.cancel(item);
    item.deadline = this.now() + ms;
    // The tick that ends after the deadline, and never one already handled.
    const tick = Math.max(Math.ceil(item.deadline / this.tickMs), this.doneTick + 1);
    item.slot = tick % this.slots.length;
    this.slots[item.slot]!.add(item);
    this.items++;
    if (tick < this.timerTick) this.schedule(tick);
  }

  /** Disarms `item`; nothing if it is not armed. */
  cancel(item: T): void {
    if (item.slot < 0) return;
    if (this.slots[item.slot]!.delete(item)) this.items--;
    item.slot = -1;
    if (this.items === 0) this.stop();
  }

  /** Items armed: for tests. */
  get size(): number {
    return this.items;
  }

  /** Disarms everything without expiring it. */
  clear(): void {
    for (const s of this.slots) {
      for (const item of s) item.slot = -1;
      s.clear();
    }
    this.items = 0;
    this.stop();
  }

  private schedule(tick: number): void {
    if (this.timer) clearTimeout(this.timer);
    this.timerTick = tick;
    this.timer = setTimeout(onTick, Math.max(0, tick * this.tickMs - this.now()), this);
  }

  private stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    this.timerTick = Infinity;
  }

  /** @internal the timer's callback. */
  tick(): void {
    this.timer = undefined;
    this.timerTick = Infinity;
    const now = this.now();
    const current = Math.floor(now / this.tickMs);
    const n = this.slots.length;
    // Every slot whose ticks have passed, once each, even after the event loop was held for
    // longer than a whole turn of the wheel.
    const from = this.doneTick + 1;
    const to = Math.min(current, this.doneTick + n);
    const expired: T[] = [];
    for (let t = from; t <= to; t++) {
      for (const item of this.slots[t % n]!) {
        if (item.deadline <= now) {
          this.slots[t % n]!.delete(item);
          item.slot = -1;
          this.items--;
          expired.push(item);
        }
      }
    }
    this.doneTick = Math.max(this.doneTick, current);
    // Callbacks last: one may arm or cancel others.
    for (const item of expired) this.onExpire(item);
    if (this.items > 0 && this.timer === undefined) this.schedule(this.nextTick());
  }

  /** The first tick after the handled ones whose slot holds anything (items far ahead are looked at again each turn). */
  private nextTick(): number {
    const n = this.slots.length;
    for (let t = this.doneTick + 1; t <= this.doneTick + n; t++) if (this.slots[t % n]!.size > 0) return t;
    return this.doneTick + 1;
  }
}

function onTick(wheel: { tick(): void }): void {
  wheel.tick();
}
