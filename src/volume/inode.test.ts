import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BlockType, blockRefKey, encodeBlockRef, type BlockRef } from '../core/ids.js';
import { withLoopTicks } from '../core/testing.js';
import { ENTRY_SIZE, InodeTree, readEntry, walkTree, type VolumeBlockStore } from './inode.js';
import type { Pointer } from './records.js';

const BS = 4096;

/** Blocks in a map; a read of a ref in `hold` waits until the test lets it go. */
function heldStore() {
  const blocks = new Map<string, Buffer>();
  const hold = new Set<string>();
  const waiting: { key: string; go: () => void }[] = [];
  const store: VolumeBlockStore = {
    blockSize: BS,
    async putBlock(ref: BlockRef, data: Uint8Array) {
      blocks.set(blockRefKey(ref), Buffer.from(data));
    },
    async getBlock(ref: BlockRef) {
      const key = blockRefKey(ref);
      if (hold.delete(key)) await new Promise<void>((go) => waiting.push({ key, go }));
      return blocks.get(key)!;
    },
    async readRange() {
      throw new Error('not used');
    },
    async flush() {},
  };
  return { store, hold, waiting };
}

test('a page read that outlasts a commit and an eviction is read again from where its parent now points', async () => {
  const { store, hold, waiting } = heldStore();
  let n = 0;
  const alloc = (type: BlockType): BlockRef => ({ type, volume: 1, inode: 1, index: ++n });
  const data = (i: number): Pointer => ({ ref: { type: BlockType.Data, volume: 1, inode: 1, index: 1000 + i }, crc: i });
  // Two levels: the root and leaves of 128 entries.
  const first = new InodeTree(store, { root: null, depth: 2, size: 0, epoch: 0 });
  await first.set(0, data(1));
  await first.set(200, data(2));
  await first.set(400, data(4));
  const c0 = await first.commit(alloc);
  await c0.stored;
  // A cache of three pages: a fourth evicts the oldest clean ones.
  const tree = new InodeTree(store, { root: c0.root, depth: 2, size: 0, epoch: 0 }, 3 * BS);
  // A reader's load of leaf 0 is slow...
  const leafRef = readEntry(await store.getBlock(c0.root!.ref), 0)!.ref;
  hold.add(blockRefKey(leafRef));
  const slow = tree.get(0);
  for (let i = 0; i < 100 && waiting.length === 0; i++) await new Promise((r) => setImmediate(r));
  assert.equal(waiting.length, 1, 'the reader waits for leaf 0');
  // ...and meanwhile block 0 is re-pointed, committed (leaf 0 gets a new ref), and the root and
  // leaf 0 are evicted by reads of other leaves.
  await tree.set(0, data(3));
  const c1 = await tree.commit(alloc);
  await c1.stored;
  await tree.get(200);
  await tree.get(400);
  waiting[0]!.go();
  await slow;
  assert.deepEqual(await tree.get(0), data(3), 'the tree reads the committed leaf, not the one read before the commit');
  assert.deepEqual(await tree.get(200), data(2));
  assert.deepEqual(await tree.get(400), data(4));
});

test('a commit whose page puts fail leaves its pages dirty: the next commit stores them again instead of naming refs that may be nowhere', async () => {
  const { store } = heldStore();
  const put = store.putBlock.bind(store);
  let fail = false;
  (store as { putBlock: VolumeBlockStore['putBlock'] }).putBlock = async (ref, data, opts) => {
    if (fail && ref.type === BlockType.INode && ref.index % 2 === 0) throw new Error('replica down');
    return put(ref, data, opts);
  };
  let n = 0;
  const alloc = (type: BlockType): BlockRef => ({ type, volume: 1, inode: 1, index: ++n });
  const data = (i: number): Pointer => ({ ref: { type: BlockType.Data, volume: 1, inode: 1, index: 1000 + i }, crc: i });
  const tree = new InodeTree(store, { root: null, depth: 2, size: 0, epoch: 0 });
  for (const i of [0, 200, 400]) await tree.set(i, data(i));
  fail = true;
  const c1 = await tree.commit(alloc);
  await assert.rejects(c1.stored);
  assert.ok(tree.dirty, 'the failed commit left its pages dirty');
  fail = false;
  const c2 = await tree.commit(alloc);
  await c2.stored;
  assert.equal(c2.pagesWritten, 4, 'every page of the failed commit is stored again');
  // A fresh tree from the new root finds every entry: no page it names is missing.
  const again = new InodeTree(store, { root: c2.root, depth: 2, size: 0, epoch: 0 });
  for (const i of [0, 200, 400]) assert.deepEqual(await again.get(i), data(i));
});

test('a walk over a large tree gives the event loop back between pages', async () => {
  // 64 leaf pages of 2048 entries, read from memory: their reads resolve together, and without
  // pauses the whole walk (131k entries) ran before anything else could.
  const fanout = 2048;
  const ref = (index: number): BlockRef => ({ type: BlockType.INode, volume: 9, inode: 1, index });
  const page = (refs: BlockRef[]): Buffer => {
    const b = Buffer.alloc(fanout * ENTRY_SIZE);
    refs.forEach((r, i) => encodeBlockRef(r, b, i * ENTRY_SIZE));
    return b;
  };
  const pages = new Map<number, Buffer>();
  pages.set(0, page(Array.from({ length: 64 }, (_, i) => ref(1 + i))));
  for (let i = 0; i < 64; i++) pages.set(1 + i, page(Array.from({ length: fanout }, (_, j) => ({ type: BlockType.Data, volume: 9, inode: 1, index: i * fanout + j + 1 }))));
  const atVisit: number[] = [];
  await withLoopTicks((ticks) =>
    walkTree(
      { root: { ref: ref(0), crc: 0 }, depth: 2, size: 0, epoch: 0 },
      fanout,
      async (ptr) => pages.get(ptr.ref.index)!,
      (_ptr, kind) => (kind === 'data' && atVisit.push(ticks()), true),
    ),
  );
  assert.equal(atVisit.length, 64 * fanout);
  assert.ok(atVisit[atVisit.length - 1]! > atVisit[0]!, `ticks during the walk: ${atVisit[0]}..${atVisit[atVisit.length - 1]}`);
});
