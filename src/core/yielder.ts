/**
 * Background walks over every block a node holds (the rebalancer's plan, a volume's usage, a
 * checkpoint's runs) run in the event loop that also answers journal appends and NBD requests.
 * Run straight through they held it for 50–140 ms at a time on a node with 20k blocks, and every
 * flush waiting on that node waited as long (docs/performance.md, eighth round). A walk that
 * checks a Yielder gives the loop back once its slice is used up.
 */
export const YIELD_SLICE_MS = 2;

export class Yielder {
  private since = performance.now();
  private n = 0;

  /** `sliceMs` of work between pauses; `every` calls of due() between looks at the clock. */
  constructor(
    private readonly sliceMs = YIELD_SLICE_MS,
    private readonly every = 32,
  ) {}

  /**
   * Whether the caller should `await pause()` now. Cheap: the clock is read every few calls.
   * `weight` counts a call as that many (a page of many entries).
   */
  due(weight = 1): boolean {
    this.n += weight;
    if (this.n < this.every) return false;
    this.n = 0;
    return performance.now() - this.since >= this.sliceMs;
  }

  /** Lets everything queued in the event loop (I/O callbacks included) run, then starts a new slice. */
  async pause(): Promise<void> {
    await new Promise<void>((resolve) => setImmediate(resolve));
    this.since = performance.now();
  }
}
