import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import type { BlockRef } from '../core/ids.js';
import type { RingModel, RingPeer, RingType } from '../core/models.js';
import { createRing, DEFAULT_RING_TYPE, hashBlockRef, placementStats } from './index.js';
import { seededRandom, randomPeers, randomRefs } from './test-util.js';

const P1 = 'b529f87e-2370-11e6-97ca-5ce0c5527cf4';
const P2 = 'c8d7ab12-2370-11e6-97ca-5ce0c5527cf4';
const P3 = '0a1b2c3d-2370-11e6-97ca-5ce0c5527cf4';
const P4 = '77e2e5c4-2370-11e6-97ca-5ce0c5527cf4';
const GOLDEN_PEERS: RingPeer[] = [
  { uuid: P1, totalBlocks: 10240 },
  { uuid: P2, totalBlocks: 10240 },
  { uuid: P3, totalBlocks: 20480 },
  { uuid: P4, totalBlocks: 5000 },
];
const GOLDEN_REFS: BlockRef[] = [
  { type: 0, volume: 1, inode: 1, index: 0 },
  { type: 0, volume: 1, inode: 1, index: 1 },
  { type: 0, volume: 1, inode: 1, index: 2 },
  { type: 1, volume: 1, inode: 2, index: 0 },
  { type: 0, volume: 3, inode: 17, index: 123456 },
  { type: 0, volume: 2 ** 40 - 1, inode: Number.MAX_SAFE_INTEGER, index: Number.MAX_SAFE_INTEGER },
];

const model = (type: RingType, peers: readonly RingPeer[], replication = 2, version = 1): RingModel => ({ type, version, replication, peers });

describe('golden placements (part of the data format: a failure here means every cluster would move its data)', () => {
  it('ketama', () => {
    const ring = createRing(model('ketama', GOLDEN_PEERS));
    const want = [
      [P1, P4, P2, P3],
      [P4, P2, P1, P3],
      [P4, P3, P2, P1],
      [P3, P2, P1, P4],
      [P3, P1, P2, P4],
      [P2, P4, P3, P1],
    ];
    GOLDEN_REFS.forEach((ref, i) => assert.deepEqual(ring.getPeers(ref), { peers: want[i], replication: 2 }, JSON.stringify(ref)));
  });

  it('mod', () => {
    const ring = createRing(model('mod', GOLDEN_PEERS));
    const want = [
      [P1, P2, P3, P4],
      [P2, P3, P4, P1],
      [P1, P2, P3, P4],
      [P2, P3, P4, P1],
      [P3, P4, P1, P2],
      [P4, P1, P2, P3],
    ];
    // Sorted by uuid: P3 (0a…), P4 (77…), P1 (b5…), P2 (c8…).
    GOLDEN_REFS.forEach((ref, i) => assert.deepEqual(ring.getPeers(ref), { peers: want[i], replication: 2 }, JSON.stringify(ref)));
  });
});

describe('empty ring', () => {
  const ring = createRing(model('empty', [], 2, 4));
  it('places nothing', () => {
    assert.deepEqual(ring.getPeers(GOLDEN_REFS[0] as BlockRef), { peers: [], replication: 0 });
    assert.deepEqual(ring.members(), []);
    assert.equal(ring.type, 'empty');
    assert.equal(ring.version, 4);
    assert.equal(ring.replication, 2);
  });
  it('describes itself', () => {
    assert.equal(
      ring.describe(),
      [
        'Ring: empty',
        'Version: 4',
        'Replication: 2 (applies once the ring has peers)',
        'Peers: 0',
        'Warning: the ring is empty: no block can be stored until it has peers (torusctl ring manual-change)',
      ].join('\n'),
    );
  });
});

describe('single ring', () => {
  it('puts everything on its peer with replication 1', () => {
    const ring = createRing(model('single', [{ uuid: P1, totalBlocks: 7 }], 1));
    for (const ref of GOLDEN_REFS) assert.deepEqual(ring.getPeers(ref), { peers: [P1], replication: 1 });
    assert.equal(
      ring.describe(),
      ['Ring: single', 'Version: 1', 'Replication: 1', 'Peers: 1', `  ${P1}  weight 7 (100.0%)  primary for 100.0% of blocks`].join('\n'),
    );
  });
  it('degrades a larger replication to 1 and says so', () => {
    const ring = createRing(model('single', [{ uuid: P1, totalBlocks: 7 }], 3));
    assert.equal(ring.replication, 3);
    assert.equal(ring.getPeers(GOLDEN_REFS[0] as BlockRef).replication, 1);
    assert.match(ring.describe(), /^Replication: 3 \(degraded: 1 copy kept\)$/m);
    assert.match(ring.describe(), /^Warning: replication 3 exceeds the 1 member\(s\)/m);
  });
});

describe('mod ring', () => {
  it('is the uuid-sorted list rotated by hash mod N', () => {
    fc.assert(
      fc.property(
        fc.uniqueArray(fc.uuid(), { minLength: 1, maxLength: 20 }),
        fc.integer({ min: 0, max: 1e9 }),
        fc.integer({ min: 1, max: 5 }),
        (uuids, seed, rep) => {
          const ring = createRing(model('mod', uuids.map((uuid) => ({ uuid, totalBlocks: 1 })), rep));
          const sorted = [...uuids].sort();
          for (const ref of randomRefs(seededRandom(seed), 20)) {
            const s = hashBlockRef(ref) % sorted.length;
            assert.deepEqual(ring.getPeers(ref), { peers: [...sorted.slice(s), ...sorted.slice(0, s)], replication: Math.min(rep, uuids.length) });
          }
        },
      ),
      { numRuns: 50 },
    );
  });

  it('spreads blocks evenly and ignores weights', () => {
    const peers = randomPeers(seededRandom(3), 10, 1).map((p, i) => ({ ...p, totalBlocks: 1 + i * 100 }));
    const stats = placementStats(createRing(model('mod', peers, 2)), randomRefs(seededRandom(4), 100_000));
    assert.equal(stats.replicas, 2);
    for (const p of stats.peers) assert.ok(Math.abs(p.deviation) < 0.05, `${p.uuid} ${p.deviation}`);
    assert.match(createRing(model('mod', peers)).describe(), /weights are ignored/);
  });
});

describe('every ring type', () => {
  it('places every log block of a journal segment with the segment, and other types by their own ref', () => {
    for (const type of ['mod', 'ketama'] as const) {
      const ring = createRing(model(type, GOLDEN_PEERS, 2, 2));
      const seg = (s: number, n: number): BlockRef => ({ type: 2, volume: 9, inode: 4, index: s * 2 ** 24 + n });
      for (const s of [0, 1, 7]) for (const n of [1, 2, 1000, 2 ** 24 - 1]) assert.deepEqual(ring.getPeers(seg(s, n)), ring.getPeers(seg(s, 0)));
      // Data blocks with the same numbers are not grouped.
      const spread = new Set(Array.from({ length: 64 }, (_, n) => ring.getPeers({ type: 0, volume: 9, inode: 4, index: n }).peers.slice(0, 2).join()));
      assert.ok(spread.size > 1);
    }
  });

  it('returns a permutation of its members with replication min(R, N), independent of peer order', () => {
    fc.assert(
      fc.property(
        fc.constantFrom<RingType>('mod', 'ketama'),
        fc.uniqueArray(fc.record({ uuid: fc.uuid(), totalBlocks: fc.integer({ min: 1, max: 1e6 }) }), { minLength: 1, maxLength: 8, selector: (p) => p.uuid }),
        fc.integer({ min: 1, max: 10 }),
        fc.integer({ min: 0, max: 1e9 }),
        (type, peers, rep, seed) => {
          const ring = createRing(model(type, peers, rep, 2));
          const shuffled = createRing(model(type, [...peers].reverse(), rep, 2));
          assert.deepEqual(ring.members(), peers.map((p) => p.uuid));
          for (const ref of randomRefs(seededRandom(seed), 10)) {
            const p = ring.getPeers(ref);
            assert.equal(p.replication, Math.min(rep, peers.length));
            assert.deepEqual([...p.peers].sort(), peers.map((x) => x.uuid).sort());
            assert.deepEqual(shuffled.getPeers(ref), p);
          }
        },
      ),
      { numRuns: 40 },
    );
  });

  it('is deterministic and immutable', () => {
    const m = model('ketama', GOLDEN_PEERS, 3, 9);
    const a = createRing(m);
    const b = createRing(JSON.parse(JSON.stringify(m)) as RingModel);
    for (const ref of randomRefs(seededRandom(5), 200)) assert.deepEqual(a.getPeers(ref), b.getPeers(ref));
    assert.deepEqual(a.toModel(), m);
    assert.ok(Object.isFrozen(a.toModel()) && Object.isFrozen(a.members()));
  });

  it('places nothing while a ketama or mod ring has no members', () => {
    for (const type of ['ketama', 'mod'] as const) {
      const ring = createRing(model(type, [], 2));
      assert.deepEqual(ring.getPeers(GOLDEN_REFS[0] as BlockRef), { peers: [], replication: 0 }, type);
      assert.match(ring.describe(), /^Replication: 2 \(applies once the ring has peers\)$/m);
    }
  });

  it('defaults to ketama', () => {
    assert.equal(DEFAULT_RING_TYPE, 'ketama');
  });
});

describe('describe()', () => {
  it('lists type, version, replication, vnodes, peers with weights and shares', () => {
    const text = createRing(model('ketama', GOLDEN_PEERS.slice(0, 3), 2, 3)).describe();
    const lines = text.split('\n');
    assert.deepEqual(lines.slice(0, 5), ['Ring: ketama', 'Version: 3', 'Replication: 2', 'Virtual nodes: 20480 (one per 2 blocks of weight)', 'Peers: 3']);
    assert.equal(lines.length, 8);
    assert.match(lines[5] ?? '', new RegExp(`^  ${P1}  weight 10240 \\( 25\\.0%\\)  primary for  2[45]\\.\\d% of blocks   5120 vnodes$`));
    assert.match(lines[7] ?? '', new RegExp(`^  ${P3}  weight 20480 \\( 50\\.0%\\)  primary for  [45]\\d\\.\\d% of blocks  10240 vnodes$`));
  });

  it('shows degraded replication and the warnings', () => {
    const text = createRing(model('ketama', GOLDEN_PEERS.slice(0, 2), 3)).describe();
    assert.match(text, /^Replication: 3 \(degraded: 2 copies kept\)$/m);
    assert.match(text, /^Warning: replication 3 exceeds the 2 member\(s\): only 2 copies of each block will be kept \(degraded\)$/m);
  });
});
