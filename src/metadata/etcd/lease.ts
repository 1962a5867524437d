import type { Etcd3 } from 'etcd3';
import { TorusError } from '../../core/errors.js';
import type { EtcdEndpoints } from './endpoints.js';

// An etcd lease kept alive by renewals that go to whichever member answers, so losing the member
// a process talked to costs one failed renewal, not the lease. A lease is a cluster-wide id: any
// member renews it. It is declared lost only when etcd says it is gone, or when no renewal has
// succeeded for twice its TTL (by then etcd has expired it, unless a new leader extended it;
// the keys it holds were fenced either way).

const RETRY_MS = 500;

/** etcd counts lease TTLs in whole seconds: the TTL a lease asked with `ttlMs` gets. */
export function leaseTtlMs(ttlMs: number): number {
  return Math.max(1, Math.ceil(ttlMs / 1000)) * 1000;
}

export class EtcdLease {
  private state: 'alive' | 'lost' | 'released' = 'alive';
  private lastRenewed: number;
  private timer: NodeJS.Timeout | undefined;
  private readonly lostCallbacks = new Set<() => void>();
  private unregister: (() => void) | undefined;

  private constructor(
    private readonly ep: EtcdEndpoints,
    readonly id: string,
    readonly ttlMs: number,
    sentAt: number,
  ) {
    this.lastRenewed = sentAt;
  }

  /** Grants a lease. Granting is repeated on another member if need be: a lease granted twice costs nothing, the spare one expires. */
  static async grant(ep: EtcdEndpoints, ttlMs: number): Promise<EtcdLease> {
    const sentAt = Date.now();
    const ttl = leaseTtlMs(ttlMs);
    const res = await ep.call('grant lease', 'idempotent', (c, o) => c.leaseClient.leaseGrant({ TTL: ttl / 1000 }, o));
    if (!res.ID || res.ID === '0') throw new TorusError('ETCD_UNAVAILABLE', `etcd granted no lease${res.error ? `: ${res.error}` : ''}`);
    return new EtcdLease(ep, res.ID, ttl, sentAt);
  }

  /** True until the lease is known to be gone (or released). */
  get alive(): boolean {
    return this.state === 'alive';
  }

  onLost(cb: () => void): () => void {
    this.lostCallbacks.add(cb);
    return () => this.lostCallbacks.delete(cb);
  }

  /**
   * One renewal through any member. Resolves false when etcd says the lease no longer exists
   * (it expired or was revoked): the lease is then lost. Rejects when no member answered.
   */
  async renew(): Promise<boolean> {
    const sentAt = Date.now();
    const ttl = await this.ep.call('renew lease', 'idempotent', (c, o) => keepAliveOnce(c, this.id, o));
    if (ttl <= 0) {
      this.lose();
      return false;
    }
    this.lastRenewed = Math.max(this.lastRenewed, sentAt);
    return true;
  }

  /** Renews in the background, three times per TTL (sooner after a failure), until lost, released or the client closes. */
  keepAlive(): void {
    this.unregister = this.ep.onClose(() => this.release());
    const tick = async (): Promise<void> => {
      if (this.state !== 'alive') return;
      let next = this.ttlMs / 3;
      try {
        if (!(await this.renew())) return;
      } catch {
        if (Date.now() - this.lastRenewed > 2 * this.ttlMs) return this.lose();
        next = RETRY_MS;
      }
      if (this.state !== 'alive') return;
      this.timer = setTimeout(() => void tick(), next);
    };
    this.timer = setTimeout(() => void tick(), this.ttlMs / 3);
  }

  private lose(): void {
    if (this.state !== 'alive') return;
    this.state = 'lost';
    this.stopRenewing();
    const cbs = [...this.lostCallbacks];
    this.lostCallbacks.clear();
    for (const cb of cbs) cb();
  }

  private stopRenewing(): void {
    clearTimeout(this.timer);
    this.unregister?.();
  }

  /** Stops renewing; etcd lets the lease expire. */
  release(): void {
    if (this.state === 'alive') this.state = 'released';
    this.stopRenewing();
  }

  /** Stops renewing and deletes the lease (and its keys) now. A lease etcd no longer has is revoked already. */
  async revoke(): Promise<void> {
    this.release();
    try {
      await this.ep.call('revoke lease', 'idempotent', (c, o) => c.leaseClient.leaseRevoke({ ID: this.id }, o));
    } catch (err) {
      if (!/lease not found/.test(String((err as Error).message))) throw err;
    }
  }
}

/** One LeaseKeepAlive round trip on one member: the TTL etcd reports (0 or less: no such lease). */
async function keepAliveOnce(client: Etcd3, id: string, opts: { deadline: Date }): Promise<number> {
  const stream = await client.leaseClient.leaseKeepAlive(opts);
  return new Promise<number>((resolve, reject) => {
    let done = false;
    const settle = (f: () => void): void => {
      if (done) return;
      done = true;
      f();
    };
    stream.on('data', (res) => {
      settle(() => resolve(Number(res.TTL)));
      stream.end();
    });
    stream.on('error', (err) => settle(() => reject(err)));
    // The stream ending without an answer is a dropped connection, not an answer.
    stream.on('end', () => settle(() => reject(new Error('14 UNAVAILABLE: Connection dropped'))));
    stream.write({ ID: id });
  });
}
