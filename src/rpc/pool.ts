import { TorusError } from '../core/errors.js';
import { PeerClient, type PeerClientOptions, type PeerClientStats } from './client.js';

/** The part of a PeerInfo a pool needs. */
export interface PeerRef {
  readonly uuid: string;
  readonly address: string;
}

export type PeerPoolOptions = Omit<PeerClientOptions, 'expectUuid'>;

/**
 * One PeerClient per peer uuid, so every caller shares one connection, one in-flight cap and
 * one breaker per peer. A client is keyed by uuid, not address: a node that moved gets a new
 * client, and a different node answering at an old address is refused by the handshake.
 */
export class PeerPool {
  private readonly clients = new Map<string, PeerClient>();
  private closed = false;

  constructor(private readonly options: PeerPoolOptions) {}

  get size(): number {
    return this.clients.size;
  }

  /** The client for `peer`, created on first use; replaced if the peer's address changed. */
  client(peer: PeerRef): PeerClient {
    if (this.closed) throw new TorusError('CLOSED', 'peer pool is closed');
    if (peer.address === '') throw new TorusError('NO_PEER', `peer ${peer.uuid} serves no blocks (no address)`);
    const existing = this.clients.get(peer.uuid);
    if (existing && existing.address === peer.address) return existing;
    if (existing) void existing.close();
    const c = new PeerClient(peer.address, { ...this.options, expectUuid: peer.uuid });
    this.clients.set(peer.uuid, c);
    return c;
  }

  get(uuid: string): PeerClient | undefined {
    return this.clients.get(uuid);
  }

  /** Brings the pool in line with the current peer list: clients of peers gone are closed. */
  async update(peers: readonly PeerRef[]): Promise<void> {
    const live = new Map(peers.map((p) => [p.uuid, p]));
    const closing: Promise<void>[] = [];
    for (const [uuid, c] of this.clients) {
      const p = live.get(uuid);
      if (!p || p.address !== c.address) {
        this.clients.delete(uuid);
        closing.push(c.close());
      }
    }
    await Promise.all(closing);
  }

  async remove(uuid: string): Promise<void> {
    const c = this.clients.get(uuid);
    if (!c) return;
    this.clients.delete(uuid);
    await c.close();
  }

  stats(): Record<string, PeerClientStats> {
    return Object.fromEntries([...this.clients].map(([uuid, c]) => [uuid, c.stats()]));
  }

  async close(): Promise<void> {
    this.closed = true;
    const all = [...this.clients.values()];
    this.clients.clear();
    await Promise.all(all.map((c) => c.close()));
  }
}
