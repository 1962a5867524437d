import { noop } from 'cockatiel';
import { Etcd3, type IOptions } from 'etcd3';
import { TorusError } from '../../core/errors.js';
import { classifyEtcdError, type EtcdFailure } from './errors.js';

// Failover across etcd members, done here rather than by the etcd3 library: its pool picks a
// random host for every call and moves on only behind a retry policy and a breaker, which cost a
// dead endpoint minutes of silent retries (and were switched off for that reason, after which
// one dead endpoint failed most calls). Here each member has its own client, so every failure
// is known by member, and one call works like this:
//
// - Members are tried in order of preference: the one that last answered (calls stick to it), then
//   the others, those that failed longest ago first. The first choice is random per process so
//   that many clients spread over the members.
// - A call that no member received (connection refused, no such host, not an etcd) goes to the
//   next member at once, whatever it is: nothing was applied.
// - A call that a member may have received without answering (connection lost, deadline, a
//   proposal that timed out) goes to the next member only if it is idempotent (reads, lease
//   renewals, plain puts of a key only this process writes). A transaction is never sent twice
//   here: its outcome is unknown, and only the caller can tell whether a second copy is safe
//   (see VolumeMeta.commit: its compares let at most one copy apply, and it checks for its own
//   effect before concluding).
// - The whole call, every member and pause included, ends at one deadline (--etcd-timeout). When
//   every member refused outright it ends at once: waiting will not bring etcd back within it.
//   When a member said the cluster is between leaders, another round follows after a short pause.

export type CallKind =
  /** Safe to repeat: sent again to another member whatever happened to the first copy. */
  | 'idempotent'
  /** Applied at most once: sent again only if no member can have received it. */
  | 'once';

export interface Member {
  readonly url: string;
  readonly client: Etcd3;
  /** When it last failed (ms since epoch), 0 when its last call succeeded or it was never used. */
  failedAt: number;
  /** It has answered at least once. */
  answered: boolean;
}

export interface EndpointOptions {
  readonly endpoints: readonly string[];
  readonly credentials?: IOptions['credentials'];
  /** etcd RBAC user and password, exchanged for a token by the client. */
  readonly auth?: { readonly username: string; readonly password: string };
  readonly timeoutMs: number;
  /** Tests: the member to prefer first (index into endpoints) instead of a random one. */
  readonly firstChoice?: number;
  /** Told when a member fails after working (`why`), and when one that failed answers again. */
  readonly onMemberChange?: MemberChangeListener;
}

export type MemberChangeListener = (change: { readonly member: string; readonly up: boolean; readonly why?: string }) => void;

const PAUSE_MIN_MS = 100;
const PAUSE_MAX_MS = 1000;

export class EtcdEndpoints {
  readonly members: readonly Member[];
  readonly timeoutMs: number;
  private pinned: Member | undefined;
  private closed = false;
  /** Background work (lease renewals, watches) to stop on close. */
  private readonly closers = new Set<() => void>();
  private readonly onMemberChange: MemberChangeListener | undefined;

  constructor(opts: EndpointOptions) {
    if (opts.endpoints.length === 0) throw new TorusError('INVALID_ARGUMENT', 'no etcd endpoint given');
    this.timeoutMs = opts.timeoutMs;
    this.onMemberChange = opts.onMemberChange;
    this.members = opts.endpoints.map((url) => ({
      url,
      failedAt: 0,
      answered: false,
      client: keepChannels(new Etcd3({
        hosts: [url],
        dialTimeout: opts.timeoutMs,
        ...(opts.credentials ? { credentials: opts.credentials } : {}),
        ...(opts.auth ? { auth: { username: opts.auth.username, password: opts.auth.password } } : {}),
        // One host per client: failover is ours (above), so the library's retry and breaker stay off.
        faultHandling: { host: () => noop, global: noop },
        // A partition must show up as failed calls within seconds, and a healed one must be used
        // again within seconds: gRPC's own defaults notice neither (reconnect backoff up to 120 s).
        grpcOptions: {
          'grpc.keepalive_time_ms': 10_000,
          'grpc.keepalive_timeout_ms': 5000,
          'grpc.initial_reconnect_backoff_ms': 500,
          'grpc.max_reconnect_backoff_ms': 2000,
        },
      })),
    }));
    const first = opts.firstChoice ?? Math.floor(Math.random() * this.members.length);
    this.pinned = this.members[first % this.members.length];
  }

  describe(): string {
    return this.members.map((m) => m.url).join(',');
  }

  /** The member calls go to now, for those (watches) that pick one themselves. */
  preferred(): Member {
    return this.order()[0]!;
  }

  /** Members in the order a call tries them. */
  order(): Member[] {
    const rest = this.members.filter((m) => m !== this.pinned || m.failedAt > 0);
    // Never-failed members first (failedAt 0), then those whose failure is oldest; ties keep the
    // configured order, rotated to start after the pinned member so load spreads on failover.
    const start = this.pinned ? this.members.indexOf(this.pinned) : 0;
    const rank = (m: Member): number => (this.members.indexOf(m) - start + this.members.length) % this.members.length;
    rest.sort((a, b) => a.failedAt - b.failedAt || rank(a) - rank(b));
    return this.pinned && this.pinned.failedAt === 0 ? [this.pinned, ...rest] : rest;
  }

  succeeded(m: Member): void {
    if (m.failedAt > 0 && m.answered) this.onMemberChange?.({ member: m.url, up: true });
    m.failedAt = 0;
    m.answered = true;
    this.pinned = m;
  }

  /** A member that never answered is not news when it fails: the call's own error says so. */
  failed(m: Member, why: string): void {
    if (m.failedAt === 0 && m.answered) this.onMemberChange?.({ member: m.url, up: false, why });
    m.failedAt = Date.now();
  }

  /**
   * Runs `fn` against one member after another as described above. `fn` gets the member's client
   * and the call options carrying the deadline shared by every attempt. `timeoutMs` shortens that
   * deadline for this call.
   */
  async call<T>(what: string, kind: CallKind, fn: (client: Etcd3, opts: { deadline: Date }) => Promise<T>, timeoutMs?: number): Promise<T> {
    const limit = Math.min(timeoutMs ?? this.timeoutMs, this.timeoutMs);
    const deadline = Date.now() + limit;
    const failures = new Map<Member, EtcdFailure>();
    let pause = PAUSE_MIN_MS;
    for (;;) {
      if (this.closed) throw new TorusError('CLOSED', 'metadata client is closed');
      let transient = false;
      for (const m of this.order()) {
        if (Date.now() >= deadline) throw this.unreachable(what, failures, limit);
        try {
          const res = await fn(m.client, { deadline: new Date(deadline) });
          this.succeeded(m);
          return res;
        } catch (err) {
          if (this.closed) throw new TorusError('CLOSED', 'metadata client is closed');
          const f = classifyEtcdError(err, limit, m.url.startsWith('https:'));
          if (f.kind === 'answer') {
            this.succeeded(m);
            throw answerError(what, f, err);
          }
          this.failed(m, f.text);
          failures.set(m, f);
          if (f.kind === 'unknown' && kind === 'once') throw this.outcomeUnknown(what, m, f, err);
          transient ||= f.transient;
        }
      }
      const left = deadline - Date.now();
      if (!transient || left <= 0) throw this.unreachable(what, failures, limit);
      await new Promise((r) => setTimeout(r, Math.min(pause, left)));
      pause = Math.min(PAUSE_MAX_MS, pause * 2);
    }
  }

  /** Every member failed: one line naming each and what it did. */
  private unreachable(what: string, failures: ReadonlyMap<Member, EtcdFailure>, limitMs: number): TorusError {
    const texts = [...failures.values()].map((f) => f.text);
    let why: string;
    if (texts.length === 0) why = `no answer within ${limitMs} ms`;
    else if (new Set(texts).size === 1 && failures.size === this.members.length) why = texts[0]!;
    else why = [...failures].map(([m, f]) => `${m.url}: ${f.text}`).join('; ');
    return new TorusError('ETCD_UNAVAILABLE', `cannot reach etcd at ${this.describe()} (${what}): ${why}`);
  }

  private outcomeUnknown(what: string, m: Member, f: EtcdFailure, cause: unknown): TorusError {
    return new TorusError('ETCD_UNAVAILABLE', `etcd at ${m.url} did not answer (${what}): ${f.text}; it may or may not have been applied`, { cause });
  }

  /** Runs `stop` on close (at once if closed already); the result unregisters it. */
  onClose(stop: () => void): () => void {
    if (this.closed) stop();
    else this.closers.add(stop);
    return () => this.closers.delete(stop);
  }

  close(): void {
    this.closed = true;
    for (const stop of this.closers) stop();
    this.closers.clear();
    for (const m of this.members) m.client.close();
  }
}

/**
 * etcd3 closes every channel to a host after any failure it deems recoverable ("leader changed"
 * during an election, a deadline), which also cuts that member's healthy watch and lease
 * streams, and in-flight calls with them, seconds later. gRPC reconnects a broken channel by
 * itself (keepalive pings find dead ones), so the channels stay. A private field of the library:
 * if it moves, this does nothing and only the churn returns.
 */
function keepChannels(client: Etcd3): Etcd3 {
  const hosts = (client as unknown as { pool?: { hosts?: { resetAllServices?: () => void }[] } }).pool?.hosts;
  for (const h of hosts ?? []) if (typeof h.resetAllServices === 'function') h.resetAllServices = () => undefined;
  return client;
}

/** etcd said no. A full or locked-out etcd is an etcd failure (exit status 3) that retrying will not cure. */
export function answerError(what: string, f: EtcdFailure, cause: unknown): TorusError {
  const said = f.etcd ?? f.text;
  if (/database space exceeded|NOSPACE/i.test(said))
    return new TorusError(
      'ETCD_UNAVAILABLE',
      `etcd is out of space (${what}): ${said}; compact and defragment it, then disarm the alarm (docs/failure-guide.md, "etcd out of space")`,
      { cause, retryable: false },
    );
  if (/user name is empty/i.test(said))
    return new TorusError('ETCD_UNAVAILABLE', `etcd requires a user (${what}): give --etcd-user and --etcd-password-file (or $TORUS_ETCD_PASSWORD)`, { cause, retryable: false });
  if (/permission denied|authentication failed|invalid auth token|user name not found/i.test(said))
    return new TorusError('ETCD_UNAVAILABLE', `etcd refused access (${what}): ${said}`, { cause, retryable: false });
  return new TorusError('INTERNAL', `etcd ${what}: ${f.text}`, { cause });
}
