// Opens a store written by format version 1 and kept in test/fixtures/on-disk/v1, so a change
// that breaks reading existing data dirs fails here rather than on a user's disk.
//
// The fixture was made by this file with TORUS_WRITE_FIXTURE=1 (see the fixture's README). Do
// not regenerate it to make this test pass: that would hide exactly the break it exists to catch.

import assert from 'node:assert/strict';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { gunzipSync, gzipSync } from 'node:zlib';
import { BlockType, blockRefKey, type BlockRef } from '../core/ids.js';
import { FileBlockStore } from './file-store.js';
import { COMPAT_DURABLE_GEN, DATA_FILE, TABLE_FILE } from './format.js';
import { makeTmpDir, padded, removeDir } from './testing.js';

// Compiled tests live at <out>/src/storage, so the repo root is three levels up either way.
const FIXTURE_DIR = fileURLToPath(new URL('../../../test/fixtures/on-disk/v1/', import.meta.url));

interface Expected {
  blockSize: number;
  slotCount: number;
  version: number;
  storeId: string;
  blocks: Array<{ ref: BlockRef; seed: number; length: number }>;
  deleted: BlockRef[];
}

/** Fixture contents: a formula simple enough to restate in the fixture's README. */
function fixtureBytes(seed: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  for (let j = 0; j < length; j++) buf[j] = (seed * 131 + j * 7 + (j >> 8)) & 0xff;
  return buf;
}

async function writeFixture(): Promise<void> {
  const blockSize = 16384;
  const dir = await makeTmpDir();
  try {
    const blocks: Expected['blocks'] = [];
    const data = (index: number): BlockRef => ({ type: BlockType.Data, volume: 1, inode: 1, index });
    let s = await FileBlockStore.open({ dir, blockSize, sizeBytes: 8 * blockSize });
    for (let i = 0; i < 5; i++) blocks.push({ ref: data(i), seed: i, length: blockSize });
    blocks.push({ ref: data(5), seed: 5, length: 100 });
    blocks.push({ ref: { type: BlockType.INode, volume: 1, inode: 1, index: 0 }, seed: 6, length: 3000 });
    for (const b of blocks) await s.putBlock(b.ref, fixtureBytes(b.seed, b.length));
    await s.deleteBlock(data(2));
    await s.close();
    // Grown once, so the header's two copies differ.
    s = await FileBlockStore.open({ dir, blockSize, sizeBytes: 10 * blockSize });
    const info = s.info();
    await s.close();
    const expected: Expected = {
      blockSize,
      slotCount: info.slotCount,
      version: info.version,
      storeId: info.storeId,
      blocks: blocks.filter((b) => b.ref.index !== 2 || b.ref.type !== BlockType.Data),
      deleted: [data(2)],
    };
    await mkdir(FIXTURE_DIR, { recursive: true });
    for (const f of [DATA_FILE, TABLE_FILE]) await writeFile(join(FIXTURE_DIR, `${f}.gz`), gzipSync(await readFile(join(dir, f)), { level: 9 }));
    await writeFile(join(FIXTURE_DIR, 'expected.json'), `${JSON.stringify(expected, null, 2)}\n`);
  } finally {
    await removeDir(dir);
  }
}

it('reads a store written by format version 1', async () => {
  if (process.env.TORUS_WRITE_FIXTURE === '1') await writeFixture();
  const expected = JSON.parse(await readFile(join(FIXTURE_DIR, 'expected.json'), 'utf8')) as Expected;
  const dir = await makeTmpDir();
  try {
    for (const f of [DATA_FILE, TABLE_FILE]) await writeFile(join(dir, f), gunzipSync(await readFile(join(FIXTURE_DIR, `${f}.gz`))));
    const s = await FileBlockStore.open({ dir, blockSize: expected.blockSize, sizeBytes: expected.slotCount * expected.blockSize });
    try {
      const info = s.info();
      assert.equal(info.version, expected.version);
      assert.equal(info.storeId, expected.storeId);
      assert.equal(info.slotCount, expected.slotCount);
      // The newer copy (sequence 2) was read, then rewritten at open with the durable watermark,
      // which version 1 stores written before it lack (docs/on-disk-format.md).
      assert.equal(info.sequence, 3);
      assert.equal(info.compatFlags & COMPAT_DURABLE_GEN, COMPAT_DURABLE_GEN);
      assert.equal(s.usedBlocks(), expected.blocks.length);
      assert.deepEqual(new Set(s.refs().map(blockRefKey)), new Set(expected.blocks.map((b) => blockRefKey(b.ref))));
      for (const b of expected.blocks)
        assert.deepEqual(await s.getBlock(b.ref), padded(fixtureBytes(b.seed, b.length), expected.blockSize), blockRefKey(b.ref));
      for (const r of expected.deleted) assert.equal(s.hasBlock(r), false);
      assert.equal(s.stats().tornRecordsAtOpen, 0);
    } finally {
      await s.close();
    }
  } finally {
    await removeDir(dir);
  }
});
