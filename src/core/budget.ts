// Memory shared by the connections of one server (NBD, peer RPC). Each connection reports what it
// holds (requests received and not yet answered, payloads in flight, replies its client has not
// read) and asks before taking more. Two rules decide:
//
//   - anyone may take more while the total stays within the limit;
//   - past the limit, a connection may still hold its fair share, limit / (2 x connections that
//     hold something, itself included). Idle connections take no share: a flood of connections
//     that send nothing does not shrink everyone else's.
//
// The first lets one busy client use the whole budget when it is alone. The second keeps a few
// greedy or hostile connections that filled the budget (requests announced and never sent,
// replies never read) from stalling everyone else: a newcomer still gets its share. Shares taken
// one after another as connections arrive could add up to more than half the limit (the
// harmonic series), so the total is also held to 1.5 x limit: past that everyone waits, and what
// was taken without progress is freed by the servers' stall timeouts.
//
// A connection refused room waits: it is woken, at most once per turn of the event loop, when
// the total has gone back under the limit or someone left.

export class ByteBudget {
  private total = 0;
  private members = 0;
  /** Members holding more than nothing. */
  private active = 0;
  private readonly waiters = new Map<BudgetHolder, () => void>();
  private wakeScheduled = false;
  /** The most held at once. */
  peak = 0;

  constructor(readonly limit: number) {}

  /** The total never exceeds this. */
  get hardLimit(): number {
    return 1.5 * this.limit;
  }

  /** Bytes held now, by everyone. */
  get used(): number {
    return this.total;
  }

  get holders(): number {
    return this.members;
  }

  /** What a member may hold whatever the others do: with `holding` false, counting itself in. */
  share(holding = true): number {
    return this.limit / (2 * Math.max(1, this.active + (holding ? 0 : 1)));
  }

  join(): BudgetHolder {
    this.members++;
    return new BudgetHolder(this);
  }

  /** @internal */
  change(from: number, to: number): void {
    this.total += to - from;
    if (from === 0 && to > 0) this.active++;
    else if (from > 0 && to === 0) this.active--;
    if (this.total > this.peak) this.peak = this.total;
    if (to < from) this.maybeWake();
  }

  /** @internal */
  leave(h: BudgetHolder): void {
    this.members--;
    this.waiters.delete(h);
    this.maybeWake();
  }

  /** @internal */
  wait(h: BudgetHolder, wake: () => void): void {
    this.waiters.set(h, wake);
  }

  private maybeWake(): void {
    if (this.wakeScheduled || this.waiters.size === 0) return;
    this.wakeScheduled = true;
    setImmediate(() => {
      this.wakeScheduled = false;
      // Under sustained pressure nobody is woken: a waiter re-checks only once room may exist.
      if (this.total >= this.limit && this.waiters.size > 0 && !this.anyUnderShare()) return;
      const all = [...this.waiters.values()];
      this.waiters.clear();
      for (const wake of all) wake();
    });
  }

  private anyUnderShare(): boolean {
    for (const h of this.waiters.keys()) if (h.held < this.share(h.held > 0)) return true;
    return false;
  }
}

/** One connection's part of a ByteBudget. */
export class BudgetHolder {
  private bytes = 0;
  private left = false;

  constructor(private readonly budget: ByteBudget) {}

  get held(): number {
    return this.bytes;
  }

  /** Whether going from what this holder holds to `more` bytes beyond it is allowed now. */
  mayTake(more: number): boolean {
    const b = this.budget;
    if (b.used + more <= b.limit) return true;
    return this.bytes + more <= b.share(this.bytes > 0) && b.used + more <= b.hardLimit;
  }

  /** Reports what the holder holds now. */
  set(bytes: number): void {
    if (this.left || bytes === this.bytes) return;
    const from = this.bytes;
    this.bytes = bytes;
    this.budget.change(from, bytes);
  }

  /** `wake` is called once, when room may have been freed; a later call replaces it. */
  waitForRoom(wake: () => void): void {
    if (!this.left) this.budget.wait(this, wake);
  }

  /** Gives back everything and leaves the budget. */
  leave(): void {
    if (this.left) return;
    this.set(0);
    this.left = true;
    this.budget.leave(this);
  }
}
