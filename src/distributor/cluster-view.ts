import { TorusError } from '../core/errors.js';
import type { MetadataService, Ring, Unsubscribe } from '../core/interfaces.js';
import type { PeerInfo, RingModel } from '../core/models.js';
import { createRing } from '../ring/index.js';
import type { PeerTarget } from './transport.js';

// A process's view of the cluster: the current ring (pushed by the etcd watch) and the peers'
// addresses (polled, since addresses change only when a node restarts elsewhere).

/**
 * Peer addresses are advertised as users typed them; `http://` is the original's spelling for
 * the peer port, and it speaks our peer protocol, so dial it as tdp://.
 */
export function rpcAddress(address: string): string {
  return address.replace(/^http:\/\//, 'tdp://');
}

export class ClusterView {
  private current: Ring | undefined;
  private readonly addresses = new Map<string, string>();
  private unwatch: Unsubscribe | undefined;
  private pollTimer: NodeJS.Timeout | undefined;
  private readonly ringListeners = new Set<(ring: Ring, prev: Ring | undefined) => void>();
  private firstRing: Promise<void>;
  private resolveFirst!: () => void;
  private lastPeers: PeerInfo[] = [];

  constructor(
    private readonly meta: MetadataService,
    private readonly opts: { pollMs?: number; onError?: (err: Error) => void } = {},
  ) {
    this.firstRing = new Promise((r) => (this.resolveFirst = r));
  }

  /** Starts following; resolves once the ring and peer list have been read. */
  async start(): Promise<void> {
    this.unwatch = this.meta.watchRing(
      (model) => this.setRing(model),
      (err) => this.opts.onError?.(err),
    );
    await Promise.all([this.refreshPeers(), this.withTimeout(this.firstRing, 10_000)]);
    const poll = (): void => {
      this.pollTimer = setTimeout(() => {
        void this.refreshPeers()
          .catch((err: unknown) => this.opts.onError?.(err as Error))
          .finally(poll);
      }, this.opts.pollMs ?? 2000);
      this.pollTimer.unref();
    };
    poll();
  }

  private async withTimeout(p: Promise<void>, ms: number): Promise<void> {
    let t: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((_, rej) => {
      t = setTimeout(() => rej(new TorusError('ETCD_UNAVAILABLE', 'timed out reading the ring from etcd')), ms);
    });
    try {
      await Promise.race([p, timeout]);
    } finally {
      clearTimeout(t);
    }
  }

  setRing(model: RingModel): void {
    const prev = this.current;
    if (prev && model.version <= prev.version) return;
    this.current = createRing(model);
    this.resolveFirst();
    for (const l of this.ringListeners) l(this.current, prev);
  }

  onRing(listener: (ring: Ring, prev: Ring | undefined) => void): () => void {
    this.ringListeners.add(listener);
    return () => this.ringListeners.delete(listener);
  }

  get ring(): Ring {
    if (!this.current) throw new TorusError('ETCD_UNAVAILABLE', 'the ring has not been read from etcd yet');
    return this.current;
  }

  async refreshPeers(): Promise<void> {
    const peers = await this.meta.getPeers();
    this.lastPeers = peers;
    for (const p of peers) if (p.address) this.addresses.set(p.uuid, rpcAddress(p.address));
  }

  get peers(): readonly PeerInfo[] {
    return this.lastPeers;
  }

  /** The address of a ring member; undefined when it has never been seen (it is down). */
  target(uuid: string): PeerTarget | undefined {
    const address = this.addresses.get(uuid);
    return address ? { uuid, address } : undefined;
  }

  setAddress(uuid: string, address: string): void {
    this.addresses.set(uuid, rpcAddress(address));
  }

  stop(): void {
    this.unwatch?.();
    clearTimeout(this.pollTimer);
  }
}
