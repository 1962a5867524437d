import { TorusError } from '../core/errors.js';
import type { BlockRef } from '../core/ids.js';
import type { PeerPermutation } from '../core/interfaces.js';
import type { RingModel, RingPeer } from '../core/models.js';
import { BaseRing } from './base.js';
import { compareBytes, hashBlockRef, hashVnodeLabels, uuidBytes } from './hash.js';

// Consistent hashing with weighted virtual nodes. Each peer owns `points` positions on a 2^32
// circle; a block's position is XXH32 of its ref, and its preference list is the sequence of
// distinct peers met walking clockwise from there. Adding a peer only inserts points, so blocks
// move only onto the new peer, and the relative order of the old peers in every preference list
// is untouched; removing one is the mirror image. docs/rings.md has the full specification.

/**
 * A peer of mean weight gets between MEAN_POINTS and 2 * MEAN_POINTS - 1 points. A peer's
 * primary share deviates from its weight by about 1/sqrt(points) (relative): 4096 points keep
 * that near 1.6%, and the worst of 100 peers near 6% (2048 let it reach 9%, too close to the
 * 10% we promise). Part of the data format: changing it moves blocks.
 */
export const MEAN_POINTS = 4096;

/** Owner indexes are stored in a Uint16Array. */
export const MAX_KETAMA_PEERS = 65536;

const RANK_SCALE = 2 ** 16;

/**
 * Points per peer: round(totalBlocks / unit), at least 1. The unit is the power of two that
 * puts the mean weight in [MEAN_POINTS, 2 * MEAN_POINTS) points. A power of two, rather than
 * mean / MEAN_POINTS, so that adding or removing peers leaves every other peer's point count
 * (and so its blocks) alone unless the mean weight crosses a power of two. Everything here is
 * exact binary arithmetic, so any language gets the same counts.
 */
export function ketamaPointCounts(peers: readonly RingPeer[]): { unitExponent: number; counts: number[] } {
  const n = peers.length;
  if (n === 0) return { unitExponent: 0, counts: [] };
  const total = peers.reduce((s, p) => s + p.totalBlocks, 0);
  // Find e with MEAN_POINTS * n * 2^e <= total < MEAN_POINTS * n * 2^(e+1).
  let e = 0;
  let unit = 1;
  const base = MEAN_POINTS * n;
  while (base * unit * 2 <= total) {
    unit *= 2;
    e++;
  }
  while (base * unit > total) {
    unit /= 2;
    e--;
  }
  const counts = peers.map((p) => Math.max(1, Math.floor(p.totalBlocks / unit + 0.5)));
  return { unitExponent: e, counts };
}

export class KetamaRing extends BaseRing {
  /** Circle positions, ascending; ties between peers ordered by peer rank. */
  private readonly points: Uint32Array;
  /** owners[i]: rank of the peer owning points[i]. */
  private readonly owners: Uint16Array;
  /** Peers by rank: ascending UTF-8 byte order of uuid. */
  private readonly byRank: readonly string[];
  /** Each peer's own points, ascending, for the tail of long walks (see `walk`). */
  private readonly peerPoints: readonly Uint32Array[];
  readonly unitExponent: number;
  private readonly counts: readonly number[]; // by rank
  private readonly rankOfMember: readonly number[]; // members() index -> rank
  // Per-lookup "seen" marks: stamp[rank] === epoch means seen in the current walk. Lookups are
  // synchronous, so one array per ring is safe and saves an allocation per call.
  private readonly stamp: Uint32Array;
  private epoch = 0;
  private readonly walkLimit: number;
  private shares: number[] | undefined;

  constructor(model: RingModel) {
    super(model);
    const n = model.peers.length;
    if (n > MAX_KETAMA_PEERS) throw new TorusError('INVALID_ARGUMENT', `a ketama ring holds at most ${MAX_KETAMA_PEERS} peers, got ${n}`);

    const ranked = model.peers.map((p, i) => ({ p, i, bytes: uuidBytes(p.uuid) }));
    ranked.sort((a, b) => compareBytes(a.bytes, b.bytes));
    this.byRank = Object.freeze(ranked.map((r) => r.p.uuid));
    const rankOfMember = new Array<number>(n);
    ranked.forEach((r, rank) => (rankOfMember[r.i] = rank));
    this.rankOfMember = rankOfMember;

    const { unitExponent, counts } = ketamaPointCounts(ranked.map((r) => r.p));
    this.unitExponent = unitExponent;
    this.counts = counts;
    const total = counts.reduce((s, c) => s + c, 0);

    // Sort (position, rank) pairs as one exactly representable double: position * 2^16 + rank.
    const hashes = new Uint32Array(total);
    const keys = new Float64Array(total);
    let at = 0;
    ranked.forEach((r, rank) => {
      const c = counts[rank] as number;
      hashVnodeLabels(r.bytes, c, hashes, at);
      for (let k = at; k < at + c; k++) keys[k] = (hashes[k] as number) * RANK_SCALE + rank;
      at += c;
    });
    keys.sort();

    this.points = new Uint32Array(total);
    this.owners = new Uint16Array(total);
    const perPeer = counts.map((c) => new Uint32Array(c));
    const fill = new Array<number>(n).fill(0);
    for (let i = 0; i < total; i++) {
      const key = keys[i] as number;
      const pos = Math.floor(key / RANK_SCALE);
      const rank = key - pos * RANK_SCALE;
      this.points[i] = pos;
      this.owners[i] = rank;
      (perPeer[rank] as Uint32Array)[(fill[rank] as number)++] = pos;
    }
    this.peerPoints = perPeer;
    this.stamp = new Uint32Array(n);
    // Meeting all n peers takes about n * ln(n) steps with equal weights, more with uneven
    // ones; a step costs a few ns and a tail binary search ~100x that, so walk generously.
    this.walkLimit = Math.min(total, 64 + 8 * n);
  }

  /** Index of the first point at or after h, wrapping to 0 past the last point. */
  private firstPointAtOrAfter(h: number): number {
    const pts = this.points;
    let lo = 0;
    let hi = pts.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((pts[mid] as number) < h) lo = mid + 1;
      else hi = mid;
    }
    return lo === pts.length ? 0 : lo;
  }

  /**
   * The first `want` distinct peers clockwise from h, as uuids. Walks the circle for up to
   * walkLimit points, then orders the peers not yet met by the clockwise distance from h to
   * their own first point (ties by rank), which is exactly the order a full walk would meet
   * them. The walk is the fast part (a few ns a step); the tail only matters for rings with a
   * peer so light that the walk would rarely meet it.
   */
  private walk(h: number, want: number): string[] {
    const byRank = this.byRank;
    const out = new Array<string>(want);
    if (want <= 0) return out;
    if (this.epoch >= 0xffffffff) {
      this.stamp.fill(0);
      this.epoch = 0;
    }
    const epoch = ++this.epoch;
    const stamp = this.stamp;
    const owners = this.owners;
    const len = owners.length;
    const limit = this.walkLimit;
    let found = 0;
    let idx = this.firstPointAtOrAfter(h);
    for (let steps = 0; steps < limit; steps++) {
      const r = owners[idx] as number;
      if (stamp[r] !== epoch) {
        stamp[r] = epoch;
        out[found++] = byRank[r] as string;
        if (found === want) return out;
      }
      if (++idx === len) idx = 0;
    }
    this.finishWalk(h, out, found, epoch);
    return out;
  }

  private finishWalk(h: number, out: string[], found: number, epoch: number): void {
    // Sort keys distance * 2^16 + rank: exact in a double and ordered like (distance, rank).
    const n = this.stamp.length;
    const keys = new Float64Array(n - found);
    let k = 0;
    for (let rank = 0; rank < n; rank++) {
      if (this.stamp[rank] === epoch) continue;
      const pts = this.peerPoints[rank] as Uint32Array;
      let lo = 0;
      let hi = pts.length;
      while (lo < hi) {
        const mid = (lo + hi) >>> 1;
        if ((pts[mid] as number) < h) lo = mid + 1;
        else hi = mid;
      }
      const p = pts[lo === pts.length ? 0 : lo] as number;
      keys[k++] = ((p - h) >>> 0) * RANK_SCALE + rank;
    }
    keys.sort();
    for (let i = 0; found < out.length; i++) out[found++] = this.byRank[(keys[i] as number) % RANK_SCALE] as string;
  }

  getPeers(ref: BlockRef): PeerPermutation {
    return { peers: this.walk(hashBlockRef(ref), this.byRank.length), replication: this.effective };
  }

  lookup(ref: BlockRef, count: number): string[] {
    return this.walk(hashBlockRef(ref), Math.max(0, Math.min(count, this.byRank.length)));
  }

  /** Preference order for a raw circle position; for tests and tools. */
  peersAt(position: number): string[] {
    return this.walk(position >>> 0, this.byRank.length);
  }

  /** A member's circle positions, ascending; for tests and diagnostics. */
  vnodePositions(uuid: string): Uint32Array {
    const rank = this.byRank.indexOf(uuid);
    return rank < 0 ? new Uint32Array(0) : (this.peerPoints[rank] as Uint32Array).slice();
  }

  /** Virtual points per member, in members() order. */
  pointCounts(): number[] {
    return this.rankOfMember.map((rank) => this.counts[rank] as number);
  }

  totalPoints(): number {
    return this.points.length;
  }

  primaryShares(): readonly number[] {
    if (this.shares === undefined) {
      // Point i owns the arc (points[i-1], points[i]]; point 0 also owns the wrap-around.
      const byRank = new Array<number>(this.byRank.length).fill(0);
      const pts = this.points;
      const len = pts.length;
      for (let i = 0; i < len; i++) {
        const prev = i === 0 ? (pts[len - 1] as number) - 2 ** 32 : (pts[i - 1] as number);
        const rank = this.owners[i] as number;
        byRank[rank] = (byRank[rank] as number) + ((pts[i] as number) - prev);
      }
      this.shares = this.rankOfMember.map((rank) => (byRank[rank] as number) / 2 ** 32);
    }
    return this.shares;
  }

  protected override detailLines(): string[] {
    if (this.points.length === 0) return [];
    const unit = 2 ** this.unitExponent;
    return [`Virtual nodes: ${this.points.length} (one per ${unit} block${unit === 1 ? '' : 's'} of weight)`];
  }

  protected override peerDetail(index: number): string {
    const counts = this.pointCounts();
    const width = Math.max(...counts.map((c) => String(c).length));
    return `  ${String(counts[index] ?? 0).padStart(width)} vnodes`;
  }
}
