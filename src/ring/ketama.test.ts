import assert from 'node:assert/strict';
import { describe, it, type TestContext } from 'node:test';
import fc from 'fast-check';
import type { BlockRef } from '../core/ids.js';
import type { RingModel, RingPeer } from '../core/models.js';
import { hashBlockRef, xxh32 } from './hash.js';
import { addPeers, createRing, placementStats, removePeers, type PlacementStats } from './index.js';
import { KetamaRing, MEAN_POINTS, ketamaPointCounts } from './ketama.js';
import { randomPeers, randomRefs, randomUuid, seededRandom, sequentialRefs } from './test-util.js';

// The balance and movement tests use fixed seeds so the figures they print (and docs/rings.md
// quotes) are reproducible; the fast-check properties cover arbitrary rings.

const ketama = (peers: readonly RingPeer[], replication = 2, version = 1): RingModel => ({ type: 'ketama', version, replication, peers });
const build = (peers: readonly RingPeer[], replication = 2): KetamaRing => createRing(ketama(peers, replication)) as KetamaRing;

/** A weight giving a mean-weight peer exactly MEAN_POINTS points: the least balanced case. */
const WORST_WEIGHT = MEAN_POINTS * 8;

const pct = (x: number, digits = 2): string => `${(x * 100).toFixed(digits)}%`;

function report(t: TestContext, label: string, s: PlacementStats): void {
  t.diagnostic(`${label}: ${s.blocks} blocks x ${s.replicas}: stddev ${pct(s.stddev)}, worst peer ${pct(s.maxDeviation)} from fair`);
}

function arcStats(ring: KetamaRing, fair: (i: number) => number): { stddev: number; max: number } {
  const dev = ring.primaryShares().map((s, i) => s / fair(i) - 1);
  const stddev = Math.sqrt(dev.reduce((a, d) => a + d * d, 0) / dev.length);
  return { stddev, max: Math.max(...dev.map(Math.abs)) };
}

describe('ketama vnode counts', () => {
  it('gives a mean peer MEAN_POINTS..2*MEAN_POINTS-1 points, scaled by a power of two', () => {
    assert.deepEqual(ketamaPointCounts([{ uuid: 'a', totalBlocks: WORST_WEIGHT }]), { unitExponent: 3, counts: [MEAN_POINTS] });
    assert.deepEqual(ketamaPointCounts([{ uuid: 'a', totalBlocks: WORST_WEIGHT * 2 - 8 }]).counts, [MEAN_POINTS * 2 - 1]);
    assert.deepEqual(ketamaPointCounts([{ uuid: 'a', totalBlocks: WORST_WEIGHT * 2 }]), { unitExponent: 4, counts: [MEAN_POINTS] });
    assert.deepEqual(ketamaPointCounts([{ uuid: 'a', totalBlocks: 10240 }]), { unitExponent: 1, counts: [5120] });
    // Tiny weights: the unit goes below one block.
    assert.deepEqual(ketamaPointCounts([{ uuid: 'a', totalBlocks: 1 }, { uuid: 'b', totalBlocks: 3 }]), { unitExponent: -11, counts: [2048, 6144] });
    // A peer far below the mean keeps one point so it stays in every permutation.
    assert.deepEqual(ketamaPointCounts([{ uuid: 'a', totalBlocks: 1e12 }, { uuid: 'b', totalBlocks: 1 }]), { unitExponent: 26, counts: [14901, 1] });
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1, max: 2 ** 45 }), { minLength: 1, maxLength: 50 }), (weights) => {
        const { unitExponent, counts } = countsFor(weights);
        const mean = weights.reduce((a, b) => a + b, 0) / weights.length;
        const perMean = mean / 2 ** unitExponent;
        assert.ok(perMean >= MEAN_POINTS && perMean < 2 * MEAN_POINTS, `mean ${perMean}`);
        weights.forEach((w, i) => assert.equal(counts[i], Math.max(1, Math.round(w / 2 ** unitExponent))));
      }),
    );
  });
});

function countsFor(weights: number[]): { unitExponent: number; counts: number[] } {
  return ketamaPointCounts(weights.map((totalBlocks, i) => ({ uuid: String(i), totalBlocks })));
}

describe('ketama balance (a)', () => {
  for (const [n, blocks] of [
    [3, 200_000],
    [10, 200_000],
    [100, 1_000_000],
  ] as const) {
    it(`${n} equal peers: every peer within 10% of fair, primary and primary+secondary`, (t) => {
      const ring = build(randomPeers(seededRandom(n), n, WORST_WEIGHT));
      const arc = arcStats(ring, () => 1 / n);
      t.diagnostic(`${n} peers, ${ring.totalPoints()} vnodes: exact primary arc stddev ${pct(arc.stddev)}, worst ${pct(arc.max)}`);
      const refs = randomRefs(seededRandom(1000 + n), blocks);
      for (const r of [1, 2]) {
        const s = placementStats(ring, refs, r);
        report(t, `${n} peers R=${r}`, s);
        assert.equal(s.blocks, blocks);
        assert.equal(s.peers.reduce((a, p) => a + p.copies, 0), blocks * r);
        assert.ok(s.maxDeviation < 0.1, `worst peer ${pct(s.maxDeviation)} from fair`);
      }
      assert.ok(arc.max < 0.1);
    });
  }

  it('balances the refs of real volumes (few inodes, consecutive indexes) as well', (t) => {
    const s = placementStats(build(randomPeers(seededRandom(7), 10, 10240)), sequentialRefs(200_000), 2);
    report(t, '10 peers, sequential refs, R=2', s);
    assert.ok(s.maxDeviation < 0.1, pct(s.maxDeviation));
  });
});

describe('ketama weights (c)', () => {
  it('a peer with twice the capacity gets twice the share', (t) => {
    const peers = randomPeers(seededRandom(21), 5, 10240);
    const big = { uuid: randomUuid(seededRandom(22)), totalBlocks: 20480 };
    const ring = build([...peers, big]);
    const s = placementStats(ring, randomRefs(seededRandom(23), 400_000), 1);
    report(t, '5 x 1 + 1 x 2 weights, R=1', s);
    const others = s.peers.slice(0, 5).reduce((a, p) => a + p.share, 0) / 5;
    const ratio = (s.peers[5]?.share ?? 0) / others;
    t.diagnostic(`double-weight peer gets ${ratio.toFixed(3)}x the share of a single-weight peer`);
    assert.ok(ratio > 1.8 && ratio < 2.2, `ratio ${ratio}`);
    for (const p of s.peers) assert.ok(Math.abs(p.deviation) < 0.1, `${p.uuid}: ${pct(p.deviation)} from its weight`);
  });

  it('mixed capacities each get their weight share within 10%', (t) => {
    const rnd = seededRandom(31);
    const peers = [1, 2, 3, 4, 8, 1, 5].map((k) => ({ uuid: randomUuid(rnd), totalBlocks: k * 100_000 }));
    const ring = build(peers);
    const total = peers.reduce((a, p) => a + p.totalBlocks, 0);
    const arc = arcStats(ring, (i) => (peers[i]?.totalBlocks ?? 0) / total);
    t.diagnostic(`weights 1,2,3,4,8,1,5: exact primary arc deviation stddev ${pct(arc.stddev)}, worst ${pct(arc.max)}`);
    const s = placementStats(ring, randomRefs(seededRandom(32), 400_000), 1);
    report(t, 'weights 1,2,3,4,8,1,5, R=1', s);
    assert.ok(s.maxDeviation < 0.1, pct(s.maxDeviation));
  });
});

/** New placement minus `extra` must equal old placement minus `missing` (both may be undefined). */
function sameOrderExcept(a: readonly string[], b: readonly string[], dropFromA: string | undefined, dropFromB: string | undefined): boolean {
  const x = a.filter((u) => u !== dropFromA);
  const y = b.filter((u) => u !== dropFromB);
  return x.length === y.length && x.every((u, i) => u === y[i]);
}

describe('ketama movement (b)', () => {
  for (const n of [3, 10, 30]) {
    it(`adding a peer to ${n} moves ~1/${n + 1} of the blocks, all onto the new peer`, (t) => {
      const rnd = seededRandom(100 + n);
      const peers = randomPeers(rnd, n, 10240);
      const newcomer = { uuid: randomUuid(rnd), totalBlocks: 10240 };
      const before = build(peers);
      const after = createRing(addPeers(before.toModel(), [newcomer])) as KetamaRing;
      const refs = randomRefs(seededRandom(200 + n), 200_000);
      let movedPrimary = 0;
      let changedSets = 0;
      for (const ref of refs) {
        const [o0, o1] = before.lookup(ref, 2);
        const [n0, n1] = after.lookup(ref, 2);
        if (o0 !== n0) {
          movedPrimary++;
          assert.equal(n0, newcomer.uuid, 'a primary moved between two old peers');
        }
        if (!(o0 === n0 && o1 === n1)) {
          changedSets++;
          // The only change allowed is the newcomer entering the replica set.
          assert.ok(n0 === newcomer.uuid || n1 === newcomer.uuid, 'a replica set changed without the new peer');
          const kept = [n0, n1].filter((u) => u !== newcomer.uuid);
          for (const u of kept) assert.ok(u === o0 || u === o1, 'an old peer entered a replica set');
        }
      }
      const fair = 1 / (n + 1);
      const moved = movedPrimary / refs.length;
      const sets = changedSets / refs.length;
      t.diagnostic(
        `${n} -> ${n + 1} peers: primary moved for ${pct(moved)} of blocks (ideal ${pct(fair)}, ratio ${(moved / fair).toFixed(3)}); ` +
          `R=2 replica set changed for ${pct(sets)} (ideal ${pct(2 * fair)})`,
      );
      assert.ok(Math.abs(moved / fair - 1) < 0.25, `moved ${pct(moved)}, ideal ${pct(fair)}`);
      assert.ok(Math.abs(sets / (2 * fair) - 1) < 0.25, `replica sets changed ${pct(sets)}, ideal ${pct(2 * fair)}`);
      // The full preference list keeps the old peers' relative order.
      for (const ref of refs.slice(0, 10_000))
        assert.ok(sameOrderExcept(after.getPeers(ref).peers, before.getPeers(ref).peers, newcomer.uuid, undefined));
    });
  }

  it('removing a peer only moves the blocks it held', (t) => {
    const peers = randomPeers(seededRandom(300), 10, 10240);
    const gone = peers[4]?.uuid ?? '';
    const before = build(peers);
    const after = createRing(removePeers(before.toModel(), [gone])) as KetamaRing;
    const refs = randomRefs(seededRandom(301), 200_000);
    let moved = 0;
    let changedSets = 0;
    for (const ref of refs) {
      const [o0, o1] = before.lookup(ref, 2);
      const [n0, n1] = after.lookup(ref, 2);
      if (o0 !== n0) {
        moved++;
        assert.equal(o0, gone, 'a block moved off a peer that stayed');
      }
      if (!(o0 === n0 && o1 === n1)) {
        changedSets++;
        assert.ok(o0 === gone || o1 === gone, 'a replica set changed without holding the removed peer');
      }
    }
    const share = before.primaryShares()[4] ?? 0;
    t.diagnostic(`10 -> 9 peers: primary moved for ${pct(moved / refs.length)} of blocks (the removed peer's share ${pct(share)}); R=2 sets changed ${pct(changedSets / refs.length)}`);
    assert.ok(Math.abs(moved / refs.length / share - 1) < 0.1);
    for (const ref of refs.slice(0, 10_000)) assert.ok(sameOrderExcept(after.getPeers(ref).peers, before.getPeers(ref).peers, undefined, gone));
  });

  it('any ring: adding or removing a peer keeps every other peer in the same relative order', () => {
    const weight = fc.integer({ min: 1, max: 1e7 });
    fc.assert(
      fc.property(
        fc.uniqueArray(fc.record({ uuid: fc.uuid(), totalBlocks: weight }), { minLength: 1, maxLength: 6, selector: (p) => p.uuid }),
        fc.record({ uuid: fc.uuid(), totalBlocks: weight }),
        fc.integer({ min: 0, max: 1e9 }),
        (peers, extra, seed) => {
          fc.pre(!peers.some((p) => p.uuid === extra.uuid));
          const before = build(peers);
          const after = createRing(addPeers(before.toModel(), [extra])) as KetamaRing;
          // Only holds while the vnode unit stays put; a unit change rescales everyone (see docs).
          fc.pre(before.unitExponent === after.unitExponent);
          const gone = peers[0]?.uuid ?? '';
          const shrunk = createRing(removePeers(after.toModel(), [gone])) as KetamaRing;
          for (const ref of randomRefs(seededRandom(seed), 30)) {
            const o = before.getPeers(ref).peers;
            const nw = after.getPeers(ref).peers;
            assert.ok(sameOrderExcept(nw, o, extra.uuid, undefined), `${o.join()} -> ${nw.join()}`);
            if (shrunk.unitExponent === after.unitExponent) assert.ok(sameOrderExcept(shrunk.getPeers(ref).peers, nw, undefined, gone));
          }
        },
      ),
      { numRuns: 30 },
    );
  });
});

/** The specification in docs/rings.md, implemented as plainly as possible. */
function referenceRing(peers: readonly RingPeer[]): (ref: BlockRef) => string[] {
  const sorted = [...peers].sort((a, b) => (a.uuid < b.uuid ? -1 : a.uuid > b.uuid ? 1 : 0)); // ASCII uuids
  const total = sorted.reduce((s, p) => s + p.totalBlocks, 0);
  let unit = 1;
  while (total / sorted.length >= MEAN_POINTS * unit * 2) unit *= 2;
  while (total / sorted.length < MEAN_POINTS * unit) unit /= 2;
  const points: { pos: number; rank: number }[] = [];
  const utf8 = new TextEncoder();
  sorted.forEach((p, rank) => {
    const count = Math.max(1, Math.round(p.totalBlocks / unit));
    for (let i = 0; i < count; i++) points.push({ pos: xxh32(utf8.encode(`${p.uuid}-${i}`)), rank });
  });
  points.sort((a, b) => a.pos - b.pos || a.rank - b.rank);
  return (ref) => {
    const h = hashBlockRef(ref);
    let start = points.findIndex((p) => p.pos >= h);
    if (start < 0) start = 0;
    const seen = new Set<string>();
    for (let k = 0; k < points.length && seen.size < sorted.length; k++)
      seen.add((sorted[(points[(start + k) % points.length] as { rank: number }).rank] as RingPeer).uuid);
    return [...seen];
  };
}

describe('ketama lookups', () => {
  it('match a plain re-implementation of the spec, including peers too light for the walk', () => {
    fc.assert(
      fc.property(
        fc.uniqueArray(
          fc.record({ uuid: fc.uuid(), totalBlocks: fc.oneof(fc.integer({ min: 1, max: 100 }), fc.integer({ min: 1, max: 1e9 })) }),
          { minLength: 1, maxLength: 12, selector: (p) => p.uuid },
        ),
        fc.integer({ min: 0, max: 1e9 }),
        (peers, seed) => {
          const ring = build(peers, 3);
          const reference = referenceRing(peers);
          for (const ref of randomRefs(seededRandom(seed), 15)) {
            const want = reference(ref);
            assert.deepEqual(ring.getPeers(ref).peers, want);
            for (const r of [0, 1, 2, peers.length + 1]) assert.deepEqual(ring.lookup(ref, r), want.slice(0, r));
          }
        },
      ),
      { numRuns: 25 },
    );
  });

  it('finish long walks exactly (one heavy peer per light one forces the tail path)', () => {
    const rnd = seededRandom(41);
    const heavy = randomPeers(rnd, 20, 1e9);
    const light = randomPeers(rnd, 20, 1);
    const peers = [...heavy, ...light];
    const ring = build(peers);
    const reference = referenceRing(peers);
    for (const ref of randomRefs(seededRandom(42), 20)) assert.deepEqual(ring.getPeers(ref).peers, reference(ref));
  });

  it('start at the first point at or after the block and wrap past the top of the circle', () => {
    const peers = randomPeers(seededRandom(51), 3, WORST_WEIGHT);
    const ring = build(peers);
    const all = peers.flatMap((p) => [...ring.vnodePositions(p.uuid)].map((pos) => ({ pos, uuid: p.uuid })));
    all.sort((a, b) => a.pos - b.pos);
    const first = all[0] as { pos: number; uuid: string };
    const last = all[all.length - 1] as { pos: number; uuid: string };
    assert.equal(all.length, 3 * MEAN_POINTS);
    assert.equal(ring.peersAt(first.pos)[0], first.uuid);
    assert.equal(ring.peersAt(last.pos)[0], last.uuid);
    assert.ok(last.pos < 0xffffffff);
    assert.equal(ring.peersAt(last.pos + 1)[0], first.uuid);
    assert.deepEqual(ring.peersAt(0xffffffff), ring.peersAt(0));
    for (const { pos, uuid } of all.slice(1000, 1100)) assert.equal(ring.peersAt(pos)[0], uuid);
  });

  it('break ties between peers on the same position by uuid bytes', () => {
    // Seed 271 happens to give two peers a vnode on the same position (found by search).
    const peers = randomPeers(seededRandom(271), 3, WORST_WEIGHT);
    const ring = build(peers);
    const owner = new Map<number, string>();
    let tie: { pos: number; a: string; b: string } | undefined;
    for (const p of peers)
      for (const pos of ring.vnodePositions(p.uuid)) {
        const other = owner.get(pos);
        if (other !== undefined && other !== p.uuid) tie = { pos, a: other, b: p.uuid };
        owner.set(pos, p.uuid);
      }
    assert.ok(tie, 'the fixture ring has a collision');
    const [lo, hi] = tie.a < tie.b ? [tie.a, tie.b] : [tie.b, tie.a];
    assert.deepEqual(ring.peersAt(tie.pos).slice(0, 2), [lo, hi]);
    assert.deepEqual(build([...peers].reverse()).peersAt(tie.pos).slice(0, 2), [lo, hi]);
  });

  it('are fast: O(log points), a few microseconds for 100 peers', (t) => {
    const t0 = performance.now();
    const ring = build(randomPeers(seededRandom(61), 100, 10240));
    const buildMs = performance.now() - t0;
    const refs = randomRefs(seededRandom(62), 100_000);
    let sink = 0;
    const time = (fn: (ref: BlockRef) => number): number => {
      for (let i = 0; i < 10_000; i++) sink += fn(refs[i] as BlockRef); // warm-up
      const s = performance.now();
      for (const ref of refs) sink += fn(ref);
      return ((performance.now() - s) * 1000) / refs.length;
    };
    const full = time((ref) => ring.getPeers(ref).peers.length);
    const two = time((ref) => ring.lookup(ref, 2).length);
    t.diagnostic(`100 peers, ${ring.totalPoints()} vnodes: build ${buildMs.toFixed(0)} ms, getPeers ${full.toFixed(2)} us, lookup(ref, 2) ${two.toFixed(2)} us`);
    assert.ok(sink > 0);
    // Generous bounds: only an accidental O(points) lookup or a rebuild per call should trip them.
    assert.ok(full < 50, `getPeers ${full} us`);
    assert.ok(two < 20, `lookup ${two} us`);
    assert.ok(buildMs < 3000, `build ${buildMs} ms`);
  });
});
