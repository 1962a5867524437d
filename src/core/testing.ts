// For tests: watching the event loop.

/**
 * Runs `fn` with a chain of setImmediate callbacks counting turns of the event loop beside it.
 * `fn` reads the count as it goes: a stretch of work during which the count does not move held
 * the loop the whole time.
 */
export async function withLoopTicks<T>(fn: (ticks: () => number) => Promise<T>): Promise<T> {
  let ticks = 0;
  let ticking = true;
  const tick = (): void => {
    ticks++;
    if (ticking) setImmediate(tick);
  };
  setImmediate(tick);
  try {
    return await fn(() => ticks);
  } finally {
    ticking = false;
  }
}
