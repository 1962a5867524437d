import type { BlockRef } from '../core/ids.js';
import type { PeerPermutation } from '../core/interfaces.js';
import type { RingModel } from '../core/models.js';
import { BaseRing } from './base.js';
import { compareBytes, hashBlockRef, uuidBytes } from './hash.js';

const NO_PEERS: PeerPermutation = Object.freeze({ peers: Object.freeze([]), replication: 0 });

/** No peers: a freshly initialized cluster before any storage node has joined. */
export class EmptyRing extends BaseRing {
  getPeers(_ref: BlockRef): PeerPermutation {
    return NO_PEERS;
  }

  lookup(_ref: BlockRef, _count: number): string[] {
    return [];
  }

  primaryShares(): readonly number[] {
    return [];
  }
}

/** Everything on one peer. */
export class SingleRing extends BaseRing {
  private readonly permutation: PeerPermutation;

  constructor(model: RingModel) {
    super(model);
    this.permutation = Object.freeze({ peers: this.uuids, replication: 1 });
  }

  getPeers(_ref: BlockRef): PeerPermutation {
    return this.permutation;
  }

  lookup(_ref: BlockRef, count: number): string[] {
    return count >= 1 ? [...this.uuids] : [];
  }

  primaryShares(): readonly number[] {
    return [1];
  }
}

/** Members sorted by the UTF-8 bytes of their uuid, so the order never depends on the model's list order. */
export function sortedUuids(uuids: readonly string[]): string[] {
  const withBytes = uuids.map((u) => ({ u, b: uuidBytes(u) }));
  withBytes.sort((x, y) => compareBytes(x.b, y.b));
  return withBytes.map((x) => x.u);
}

/**
 * Block goes to sorted[hash mod N], then the following peers in sorted order. Perfectly even
 * and trivial to reason about, but adding or removing a peer changes N and so moves nearly
 * every block: meant for small fixed clusters and tests.
 */
export class ModRing extends BaseRing {
  private readonly sorted: readonly string[];
  // One permutation per rotation, built on first use and shared by every lookup that lands on it.
  private readonly rotations: (PeerPermutation | undefined)[];

  constructor(model: RingModel) {
    super(model);
    this.sorted = Object.freeze(sortedUuids(this.uuids));
    this.rotations = new Array<PeerPermutation | undefined>(this.sorted.length);
  }

  private rotation(ref: BlockRef): number {
    return hashBlockRef(ref) % this.sorted.length;
  }

  getPeers(ref: BlockRef): PeerPermutation {
    const n = this.sorted.length;
    if (n === 0) return NO_PEERS;
    const s = this.rotation(ref);
    let p = this.rotations[s];
    if (p === undefined) {
      p = Object.freeze({ peers: Object.freeze([...this.sorted.slice(s), ...this.sorted.slice(0, s)]), replication: this.effective });
      this.rotations[s] = p;
    }
    return p;
  }

  lookup(ref: BlockRef, count: number): string[] {
    const n = this.sorted.length;
    if (n === 0 || count < 1) return [];
    const s = this.rotation(ref);
    const out: string[] = [];
    for (let i = 0; i < Math.min(count, n); i++) out.push(this.sorted[(s + i) % n] as string);
    return out;
  }

  primaryShares(): readonly number[] {
    // hash mod N over 2^32 values: the first (2^32 mod N) positions get one extra hash value.
    const n = this.sorted.length;
    const extra = 2 ** 32 % n;
    const base = Math.floor(2 ** 32 / n);
    const bySorted = new Map(this.sorted.map((u, i) => [u, (base + (i < extra ? 1 : 0)) / 2 ** 32]));
    return this.uuids.map((u) => bySorted.get(u) ?? 0);
  }

  protected override detailLines(): string[] {
    return this.sorted.length > 0 ? ['Placement: XXH32(block ref) mod peers, over the peers sorted by uuid; weights are ignored'] : [];
  }
}
