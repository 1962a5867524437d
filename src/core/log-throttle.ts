// Log lines about limits biting come in floods when a client is hostile (a connection refused
// thousands of times a second). Each kind is let through at most once per interval, with the
// count of the lines held back since, so the log says what happened without drowning.

export class LogThrottle {
  private readonly seen = new Map<string, { at: number; held: number }>();

  constructor(private readonly intervalMs = 10_000) {}

  /**
   * For a line of kind `key` (one of a small fixed set): undefined to stay quiet, otherwise how
   * many lines of that kind were held back since the last one let through.
   */
  take(key: string, now = Date.now()): number | undefined {
    const s = this.seen.get(key);
    if (s && now - s.at < this.intervalMs) {
      s.held++;
      return undefined;
    }
    const held = s?.held ?? 0;
    this.seen.set(key, { at: now, held: 0 });
    return held;
  }
}
