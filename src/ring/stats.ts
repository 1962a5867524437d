import type { BlockRef } from '../core/ids.js';
import type { Ring } from '../core/interfaces.js';
import { isPlacementRing } from './base.js';

export interface PeerPlacement {
  readonly uuid: string;
  /** Copies placed on this peer. */
  readonly copies: number;
  /** copies / (blocks * replicas). */
  readonly share: number;
  /** The share the peer should get: its weight share for ketama, 1/N for the other types. */
  readonly expected: number;
  /** share / expected - 1: 0.05 means 5% more than its fair share. */
  readonly deviation: number;
}

export interface PlacementStats {
  readonly blocks: number;
  /** Copies counted per block: the first `replicas` peers of each permutation. */
  readonly replicas: number;
  readonly peers: readonly PeerPlacement[];
  /** Population standard deviation of the peers' `deviation`. */
  readonly stddev: number;
  /** Largest |deviation|. */
  readonly maxDeviation: number;
}

/**
 * How a set of blocks spreads over a ring's members. `replicas` defaults to the ring's
 * effective replication. Meant for tests and for a `torusctl` command that checks balance.
 */
export function placementStats(ring: Ring, refs: Iterable<BlockRef>, replicas?: number): PlacementStats {
  const model = ring.toModel();
  const members = ring.members();
  const r = Math.max(0, Math.min(replicas ?? ring.replication, members.length));
  const index = new Map(members.map((u, i) => [u, i]));
  const copies = new Array<number>(members.length).fill(0);
  const place = isPlacementRing(ring) ? (ref: BlockRef) => ring.lookup(ref, r) : (ref: BlockRef) => ring.getPeers(ref).peers.slice(0, r);
  let blocks = 0;
  for (const ref of refs) {
    blocks++;
    for (const u of place(ref)) {
      const i = index.get(u);
      if (i !== undefined) copies[i] = (copies[i] as number) + 1;
    }
  }
  const totalWeight = model.peers.reduce((s, p) => s + p.totalBlocks, 0);
  const placed = blocks * r;
  const peers = members.map((uuid, i) => {
    const expected = model.type === 'ketama' ? (model.peers[i]?.totalBlocks ?? 0) / totalWeight : 1 / members.length;
    const c = copies[i] as number;
    const share = placed === 0 ? 0 : c / placed;
    return { uuid, copies: c, share, expected, deviation: placed === 0 ? 0 : share / expected - 1 };
  });
  const n = peers.length;
  const mean = n === 0 ? 0 : peers.reduce((s, p) => s + p.deviation, 0) / n;
  const variance = n === 0 ? 0 : peers.reduce((s, p) => s + (p.deviation - mean) ** 2, 0) / n;
  const maxDeviation = peers.reduce((m, p) => Math.max(m, Math.abs(p.deviation)), 0);
  return { blocks, replicas: r, peers, stddev: Math.sqrt(variance), maxDeviation };
}
