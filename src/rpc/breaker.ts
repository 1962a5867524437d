// Failure policies for a peer client, kept as small replaceable objects (STYLE habit 6) so the
// distributor can tune them and tests can pass no-op or fast ones.

export type BreakerState = 'closed' | 'open' | 'half-open';

/** What a breaker says about one call: go ahead, go ahead as the single probe, or fail fast. */
export type BreakerVerdict = 'allow' | 'probe' | 'reject';

export interface CircuitBreaker {
  readonly state: BreakerState;
  tryAcquire(): BreakerVerdict;
  /** The peer answered (any reply, including an application error, proves it is alive). */
  success(): void;
  /** A transport failure: connect failed, connection lost with work pending, or a timeout. */
  failure(): void;
  /** A probe call ended without telling anything (cancelled before it was sent). */
  release(): void;
  /** Milliseconds until the next probe is allowed; 0 unless open. */
  retryInMs(): number;
  /** Consecutive failures counted so far. */
  readonly failures: number;
}

export interface BreakerOptions {
  /** Consecutive failures that open the circuit. */
  readonly failureThreshold?: number;
  /** How long the circuit stays open before one probe is let through. */
  readonly coolDownMs?: number;
  /** Each failed probe doubles the cool-down, up to this. */
  readonly maxCoolDownMs?: number;
  readonly now?: () => number;
}

export const DEFAULT_BREAKER: Required<Omit<BreakerOptions, 'now'>> = {
  failureThreshold: 5,
  coolDownMs: 2000,
  maxCoolDownMs: 30_000,
};

/**
 * Opens after `failureThreshold` consecutive failures; after the cool-down lets exactly one call
 * through (half-open); that call's success closes the circuit, its failure reopens it for twice
 * as long. Outcomes reported while open are ignored: they belong to calls made before it opened.
 */
export class ConsecutiveFailureBreaker implements CircuitBreaker {
  private _state: BreakerState = 'closed';
  private _failures = 0;
  private openUntil = 0;
  private coolDown: number;
  private probeSince = -1;
  private readonly threshold: number;
  private readonly baseCoolDown: number;
  private readonly maxCoolDown: number;
  private readonly now: () => number;

  constructor(options: BreakerOptions = {}) {
    this.threshold = Math.max(1, options.failureThreshold ?? DEFAULT_BREAKER.failureThreshold);
    this.baseCoolDown = options.coolDownMs ?? DEFAULT_BREAKER.coolDownMs;
    this.maxCoolDown = Math.max(this.baseCoolDown, options.maxCoolDownMs ?? DEFAULT_BREAKER.maxCoolDownMs);
    this.coolDown = this.baseCoolDown;
    this.now = options.now ?? Date.now;
  }

  get state(): BreakerState {
    return this._state;
  }

  get failures(): number {
    return this._failures;
  }

  tryAcquire(): BreakerVerdict {
    switch (this._state) {
      case 'closed':
        return 'allow';
      case 'open':
        if (this.now() < this.openUntil) return 'reject';
        this._state = 'half-open';
        this.probeSince = this.now();
        return 'probe';
      case 'half-open':
        // A probe whose outcome never came back must not wedge the circuit forever.
        if (this.probeSince >= 0 && this.now() - this.probeSince < this.coolDown) return 'reject';
        this.probeSince = this.now();
        return 'probe';
    }
  }

  success(): void {
    if (this._state === 'open') return;
    this._state = 'closed';
    this._failures = 0;
    this.coolDown = this.baseCoolDown;
    this.probeSince = -1;
  }

  failure(): void {
    if (this._state === 'open') return;
    this._failures++;
    if (this._state === 'half-open') {
      this.coolDown = Math.min(this.coolDown * 2, this.maxCoolDown);
      this.trip();
    } else if (this._failures >= this.threshold) this.trip();
  }

  release(): void {
    if (this._state === 'half-open') this.probeSince = -1;
  }

  retryInMs(): number {
    return this._state === 'open' ? Math.max(0, this.openUntil - this.now()) : 0;
  }

  private trip(): void {
    this._state = 'open';
    this.openUntil = this.now() + this.coolDown;
    this.probeSince = -1;
  }
}

/** Never opens: for callers that do their own failure handling, and for tests. */
export const NO_BREAKER: CircuitBreaker = Object.freeze({
  state: 'closed' as const,
  failures: 0,
  tryAcquire: () => 'allow' as const,
  success: () => {},
  failure: () => {},
  release: () => {},
  retryInMs: () => 0,
});

/** Delay before reconnect attempt `attempt` (1-based) after consecutive failures. */
export type BackoffPolicy = (attempt: number) => number;

export interface BackoffOptions {
  readonly initialMs?: number;
  readonly maxMs?: number;
  readonly random?: () => number;
}

/**
 * Exponential backoff with "equal jitter": half the delay is fixed, half random, so a fleet of
 * clients that lost the same peer does not reconnect in lockstep, yet none retries at once.
 */
export function exponentialBackoff(options: BackoffOptions = {}): BackoffPolicy {
  const initial = options.initialMs ?? 50;
  const max = options.maxMs ?? 5000;
  const random = options.random ?? Math.random;
  return (attempt: number) => {
    if (attempt <= 0) return 0;
    const d = Math.min(max, initial * 2 ** Math.min(attempt - 1, 30));
    return d / 2 + random() * (d / 2);
  };
}
