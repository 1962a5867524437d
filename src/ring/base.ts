import type { BlockRef } from '../core/ids.js';
import type { PeerPermutation, Ring } from '../core/interfaces.js';
import type { RingModel, RingType } from '../core/models.js';
import { effectiveReplication, pct, ringWarnings } from './model.js';

/** What every ring in this folder offers beyond the Ring interface. */
export interface PlacementRing extends Ring {
  /**
   * The first `count` peers of `getPeers(ref).peers` (fewer if the ring is smaller), without
   * building the whole permutation: the common question is only "who holds the R copies".
   */
  lookup(ref: BlockRef, count: number): string[];
  /** Fraction of the hash space whose first choice is each member, in `members()` order. */
  primaryShares(): readonly number[];
}

export function isPlacementRing(ring: Ring): ring is PlacementRing {
  const r = ring as Partial<PlacementRing>;
  return typeof r.lookup === 'function' && typeof r.primaryShares === 'function';
}

export abstract class BaseRing implements PlacementRing {
  readonly type: RingType;
  readonly version: number;
  readonly replication: number;
  protected readonly model: RingModel;
  protected readonly uuids: readonly string[];
  /** min(replication, members): what getPeers reports. */
  protected readonly effective: number;

  /** `model` must already be validated (and frozen) by validateRingModel. */
  constructor(model: RingModel) {
    this.model = model;
    this.type = model.type;
    this.version = model.version;
    this.replication = model.replication;
    this.uuids = Object.freeze(model.peers.map((p) => p.uuid));
    this.effective = effectiveReplication(model);
  }

  members(): readonly string[] {
    return this.uuids;
  }

  toModel(): RingModel {
    return this.model;
  }

  abstract getPeers(ref: BlockRef): PeerPermutation;
  abstract lookup(ref: BlockRef, count: number): string[];
  abstract primaryShares(): readonly number[];

  /** Type-specific lines printed between the header and the peer list. */
  protected detailLines(): string[] {
    return [];
  }

  /** Type-specific text after a peer's weight. */
  protected peerDetail(_index: number): string {
    return '';
  }

  describe(): string {
    const m = this.model;
    const lines = [`Ring: ${m.type}`, `Version: ${m.version}`];
    if (m.peers.length === 0) lines.push(`Replication: ${m.replication} (applies once the ring has peers)`);
    else if (this.effective < m.replication)
      lines.push(`Replication: ${m.replication} (degraded: ${this.effective} cop${this.effective === 1 ? 'y' : 'ies'} kept)`);
    else lines.push(`Replication: ${m.replication}`);
    lines.push(...this.detailLines());
    lines.push(`Peers: ${m.peers.length}`);
    const total = m.peers.reduce((s, p) => s + p.totalBlocks, 0);
    const shares = m.peers.length > 0 ? this.primaryShares() : [];
    const width = Math.max(0, ...m.peers.map((p) => p.uuid.length));
    const weightWidth = Math.max(0, ...m.peers.map((p) => String(p.totalBlocks).length));
    m.peers.forEach((p, i) => {
      const weight = `weight ${String(p.totalBlocks).padStart(weightWidth)} (${pct(p.totalBlocks / total).padStart(6)})`;
      const share = `primary for ${pct(shares[i] ?? 0).padStart(6)} of blocks`;
      lines.push(`  ${p.uuid.padEnd(width)}  ${weight}  ${share}${this.peerDetail(i)}`);
    });
    for (const w of ringWarnings(m)) lines.push(`Warning: ${w}`);
    return lines.join('\n');
  }
}
