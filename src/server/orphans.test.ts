import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BlockType, KNOWN_BLOCK_TYPES, type BlockRef } from '../core/ids.js';
import type { OrphanKind } from '../volume/gc.js';
import { OrphanTracker } from './orphans.js';
import type { StateFile } from './scrub.js';

const HOUR = 3_600_000;
const GRACE = 168 * HOUR;
const NEWER = 7 as BlockType; // a block type a later version adds

function refs(type: number, volume: number, n: number): BlockRef[] {
  return Array.from({ length: n }, (_, index) => ({ type, volume, inode: 1, index }));
}

/** GC's verdict with a minter of 100. */
function orphan(ref: BlockRef): OrphanKind | undefined {
  if (!KNOWN_BLOCK_TYPES.includes(ref.type)) return 'unknown-type';
  return ref.volume >= 100 ? 'unknown-volume' : undefined;
}

function memoryState(): StateFile {
  let v: unknown;
  return { load: () => structuredClone(v), save: (x) => (v = structuredClone(x)) };
}

const none = new Set<number>();
const held = [...refs(BlockType.Data, 5, 3), ...refs(NEWER, 5, 2), ...refs(BlockType.INode, 200, 4)];

test('orphans are reported from their second pass and deleted only once orphaned for the grace period', () => {
  const warnings: string[] = [];
  const t = new OrphanTracker({ graceMs: GRACE, log: { info: () => undefined, warn: (_o, m) => warnings.push(m) } });
  assert.deepEqual(t.review(held, orphan, none, 0), []);
  // A volume created just after GC's view looks orphaned for one pass: not reported yet.
  assert.equal(t.status().orphanBlocks, 0);
  assert.deepEqual(warnings, []);
  assert.deepEqual(t.review(held, orphan, none, 30_000), []);
  assert.equal(t.status().orphanBlocks, 6);
  assert.deepEqual(
    t.status().orphanGroups.map((g) => [g.kind, g.id, g.blocks, g.since]),
    [
      ['unknown-type', NEWER, 2, 0],
      ['unknown-volume', 200, 4, 0],
    ],
  );
  assert.equal(warnings.length, 2);
  assert.match(warnings[0]!, /block type 7 is unknown to this version/);
  assert.match(warnings[1]!, /volume id 200 was never handed out/);
  assert.deepEqual(t.review(held, orphan, none, GRACE - 1), []);
  const doomed = t.review(held, orphan, none, GRACE);
  assert.equal(doomed.length, 6);
  assert.ok(doomed.every((r) => orphan(r) !== undefined), 'nothing live is ever on the list');
  t.deleted(doomed.length);
  assert.deepEqual([t.status().orphansDeleted, t.status().orphanBlocks], [6, 0]);
  assert.equal(warnings.length, 3);
});

test('a block type some registered node knows never ages: a newer node\'s blocks survive a rolling upgrade of any length', () => {
  const t = new OrphanTracker({ graceMs: GRACE });
  const newerKnown = new Set([NEWER]);
  t.review(held, orphan, newerKnown, 0);
  for (let h = 24; h <= 10 * 168; h += 24) {
    const doomed = t.review(held, orphan, newerKnown, h * HOUR);
    assert.ok(!doomed.some((r) => r.type === NEWER), `deleted at hour ${h}`);
  }
  // The last such node was seen at hour 1680: a grace period from then on.
  assert.ok(!t.review(held, orphan, none, 1700 * HOUR).some((r) => r.type === NEWER));
  assert.ok(!t.review(held, orphan, none, 1680 * HOUR + GRACE - 1).some((r) => r.type === NEWER));
  assert.equal(t.review(held, orphan, none, 1680 * HOUR + GRACE).filter((r) => r.type === NEWER).length, 2);
});

test('the grace period survives a restart; a kind that goes away starts over', () => {
  const state = memoryState();
  const a = new OrphanTracker({ graceMs: GRACE, state });
  a.review(held, orphan, none, 0);
  a.review(held, orphan, none, 1000);
  const b = new OrphanTracker({ graceMs: GRACE, state });
  assert.equal(b.review(held, orphan, none, GRACE).length, 6);
  // Volume 200's blocks gone (deleted, or the minter passed it): forgotten, and a new one starts its own clock.
  const c = new OrphanTracker({ graceMs: GRACE, state });
  c.review(refs(NEWER, 5, 2), orphan, none, GRACE);
  const d = new OrphanTracker({ graceMs: GRACE, state });
  d.review(held, orphan, none, GRACE + 1);
  assert.deepEqual(
    d.review(held, orphan, none, GRACE + 2).map((r) => r.type),
    [NEWER, NEWER],
  );
});

test('--orphan-grace 0 reports and never deletes', () => {
  const t = new OrphanTracker({ graceMs: 0 });
  for (let i = 0; i < 5; i++) assert.deepEqual(t.review(held, orphan, none, i * 100 * GRACE), []);
  assert.equal(t.status().orphanBlocks, 6);
});
