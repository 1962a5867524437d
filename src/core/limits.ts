import type net from 'node:net';
import { TorusError } from './errors.js';

// What every listener (NBD, peer RPC, HTTP) uses to keep bad or greedy clients from bringing the
// process down, besides the shared memory budget (budget.ts): a cap on connections, a watch for
// clients that stall a connection, and log lines about limits that do not drown the log.

/**
 * Caps a listener's connections. Past `max`, net closes new ones on arrival, before any of our
 * code or memory is spent on them; `onRefused` hears of each.
 */
export function capConnections(srv: net.Server, max: number, onRefused: (remote: string) => void): void {
  if (!Number.isSafeInteger(max) || max < 1) throw new TorusError('INVALID_ARGUMENT', `a connection cap of ${max} is not a positive integer`);
  srv.maxConnections = max;
  srv.on('drop', (d?: { remoteAddress?: string; remotePort?: number }) => onRefused(d?.remoteAddress ? `${d.remoteAddress}:${d.remotePort ?? '?'}` : 'unknown'));
}

/**
 * Watches one connection for a client that stalls it: a message it began sending and does not
 * finish (one byte a second keeps a connection "active"), or replies in our buffers it does not
 * read. Either holds memory on the client's behalf, so a server drops a client that does either
 * for its stall timeout.
 */
export class StallWatch {
  private messageSince = 0;
  private left = 0;
  private leftAt: number;

  constructor(now = Date.now()) {
    this.leftAt = now;
  }

  /** A message has begun to arrive (its header is in) and is not complete. */
  messageStarted(now = Date.now()): void {
    if (this.messageSince === 0) this.messageSince = now;
  }

  messageDone(): void {
    this.messageSince = 0;
  }

  /**
   * What the client stalls, if it has for `timeoutMs` (0: never judged), given the reply bytes
   * queued in this process and the total that has left it so far.
   */
  check(now: number, timeoutMs: number, queued: number, leftTotal: number): string | undefined {
    if (queued === 0 || leftTotal !== this.left) {
      this.left = leftTotal;
      this.leftAt = now;
    }
    if (timeoutMs <= 0) return undefined;
    if (this.messageSince > 0 && now - this.messageSince >= timeoutMs) return 'a message left half-sent';
    if (now - this.leftAt >= timeoutMs) return `${queued} bytes of replies left unread`;
    return undefined;
  }
}

/** How often to check connections for timeouts: a quarter of the shortest, within [50 ms, 1 s]. */
export function sweepInterval(...timeoutsMs: number[]): number {
  const set = timeoutsMs.filter((t) => t > 0);
  return Math.min(1000, Math.max(50, Math.min(4000, ...set) / 4));
}

/**
 * Log lines about limits come in floods when a client is hostile (a connection refused
 * thousands of times a second). Each kind is let through at most once per interval, with the
 * count of the lines held back since, so the log says what happened without drowning.
 */
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
