import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { BlockType, blockRefKey, type BlockRef } from '../../src/core/ids.js';
import type { ScrubInfo } from '../../src/core/models.js';
import { DATA_FILE, HEADER_COPY_SIZE, Layout, TABLE_FILE, decodeHeader, decodeRecord } from '../../src/storage/format.js';
import { peek } from '../../src/storage/testing.js';
import type { ScrubReport } from '../../src/cli/torusctl/scrub.js';
import { startCluster, type TestCluster } from '../helpers/cluster.js';
import { eventually, ok } from '../helpers/procs.js';
import { openVolumeClient } from '../helpers/certs.js';

// Background scrubbing on real storage nodes: bytes flipped in one replica's data file on disk
// are found by the scrub, the copy is replaced by a replica's copy checked against the block's CRC,
// and `torusctl scrub status` reports it. Orphans (an unknown block type, a volume id etcd never
// handed out) are reported, then deleted after their grace period.

let c: TestCluster;
let C: string[];
const MiB = 1024 * 1024;
const ARGS = ['--scrub-interval', '4s', '--gc-interval', '1s', '--orphan-grace', '8s'];

before(async () => {
  c = await startCluster({ nodes: 3, replication: 2, blockSize: '64KiB', size: '256MiB', torusdArgs: ARGS });
  C = ['-C', c.etcd.endpoint];
});
after(async () => {
  await c?.stop();
});

/** Where a block lives in a (running) node's store, found by reading its slot table. */
async function findOnDisk(dataDir: string, want: (ref: BlockRef) => boolean): Promise<{ ref: BlockRef; dataOffset: number } | undefined> {
  const dir = join(dataDir, 'block');
  const table = await open(join(dir, TABLE_FILE), 'r');
  try {
    const head = Buffer.alloc(HEADER_COPY_SIZE);
    await table.read(head, 0, head.length, 0);
    const h = decodeHeader(head);
    assert.ok(h, 'a readable store header');
    const layout = new Layout(h.blockSize, h.sectorSize, h.slotsPerGroup);
    const rec = Buffer.alloc(64);
    for (let slot = 0; slot < h.slotCount; slot++) {
      await table.read(rec, 0, 64, layout.recordOffset(slot));
      const r = decodeRecord(rec);
      if (r.kind === 'used' && want(r.ref)) return { ref: r.ref, dataOffset: layout.dataOffset(slot) };
    }
    return undefined;
  } finally {
    await table.close();
  }
}

function readData(dataDir: string, offset: number, length: number): Promise<Buffer> {
  return peek(join(dataDir, 'block'), DATA_FILE, offset, length);
}

async function scrubStatus(): Promise<ScrubReport> {
  return JSON.parse(await ok('torusctl', [...C, 'scrub', 'status', '--json'])) as ScrubReport;
}

function nodeScrub(r: ScrubReport, i: number): ScrubInfo {
  const n = r.nodes.find((x) => x.address === c.nodes[i]!.address);
  assert.ok(n?.scrub, `node ${i} publishes its scrub status`);
  return n.scrub;
}

test('bytes flipped in one replica on disk: found and repaired by the scrub, read correctly, reported', async () => {
  const size = 4 * MiB;
  await ok('torusctl', [...C, 'volume', 'create-block', 's', String(size)]);
  const data = randomBytes(size);
  const vc = await openVolumeClient(c.meta);
  const vol = await vc.openVolume('s');
  await vol.write(0, data);
  // Folded into whole data blocks (left alone, the writes would stay in the journal's log blocks).
  await vol.foldAll();
  await vol.close();
  await vc.close();

  const victim = 0;
  const dir = c.nodes[victim]!.dataDir;
  const found = await findOnDisk(dir, (r) => r.type === BlockType.Data);
  assert.ok(found, 'node 0 holds a data block of the volume');
  const { ref, dataOffset } = found;
  const blockSize = c.blockSize;
  const good = await readData(dir, dataOffset, blockSize);
  assert.ok(data.includes(good), 'the copy on disk is a block of what was written');
  const before = nodeScrub(await scrubStatus(), victim);

  // A disk returning other bytes for one sector of this copy, under the running node.
  const fh = await open(join(dir, 'block', DATA_FILE), 'r+');
  await fh.write(Buffer.from(good.subarray(3 * 4096 + 100, 3 * 4096 + 108).map((b) => b ^ 0xff)), 0, 8, dataOffset + 3 * 4096 + 100);
  await fh.close();

  const after = await eventually(
    'the scrub repairs the copy',
    async () => {
      const s = nodeScrub(await scrubStatus(), victim);
      return s.repaired > before.repaired ? s : undefined;
    },
    30_000,
  );
  assert.equal(after.errors - before.errors, 1);
  assert.equal(after.repaired - before.repaired, 1);
  assert.equal(after.pending, 0);
  // Found by the first pass that began after the flip (or by the one under way then).
  assert.ok(after.passes <= before.passes + 2, `repaired after ${after.passes - before.passes} passes`);

  // The replica's copy reads byte-exact again from disk (in whichever slot it now has).
  const repaired = await findOnDisk(dir, (r) => blockRefKey(r) === blockRefKey(ref));
  assert.ok(repaired, 'node 0 holds the block again');
  assert.ok((await readData(dir, repaired.dataOffset, blockSize)).equals(good));

  // The scrub did it: no read found the bad copy first.
  const metrics = await (await fetch(`http://127.0.0.1:${c.nodes[victim]!.httpPort}/metrics`)).text();
  assert.match(metrics, /^torus_scrub_repaired_total 1$/m);
  assert.match(metrics, /^torus_storage_checksum_failures_total 0$/m);

  // Every byte of the volume reads back, through a fresh client.
  const vc2 = await openVolumeClient(c.meta);
  const ro = await vc2.openVolume('s', { readOnly: true });
  assert.ok((await ro.read(0, size)).equals(data));
  await vc2.close();

  const report = await scrubStatus();
  assert.equal(report.totals.errors, 1);
  assert.equal(report.totals.repaired, 1);
  const table = await ok('torusctl', [...C, 'scrub', 'status']);
  assert.match(table, /Bad copies: 1 found, 1 repaired, 0 dropped, 0 waiting for a good copy\./);
  assert.match(table, /scrubbing at|idle, next pass/);
});

test('orphans (an unknown block type, a volume id etcd never handed out) are reported, then deleted after the grace period', async () => {
  const newer: BlockRef = { type: 7 as BlockType, volume: 1, inode: 1, index: 0 };
  const restored: BlockRef = { type: BlockType.Data, volume: 999_999, inode: 1, index: 0 };
  const d = c.client.distributor;
  for (const r of [newer, restored]) await d.putBlock(r, randomBytes(c.blockSize));
  await d.flush();
  assert.deepEqual(await c.copies([newer, restored]), [2, 2]);

  const seen = await eventually(
    'orphans reported',
    async () => {
      const r = await scrubStatus();
      return r.totals.orphanBlocks === 4 ? r : undefined;
    },
    30_000,
  );
  const groups = seen.nodes.flatMap((n) => n.scrub?.orphanGroups ?? []);
  assert.deepEqual([...new Set(groups.map((g) => `${g.kind} ${g.id}`))].sort(), ['unknown-type 7', 'unknown-volume 999999']);
  const table = await ok('torusctl', [...C, 'scrub', 'status']);
  assert.match(table, /orphaned block\(s\) of block type 7, unknown to it/);

  await eventually('orphans deleted', async () => (await c.copies([newer, restored])).every((n) => n === 0), 30_000);
  let last: ScrubReport | undefined;
  await eventually('and reported deleted', async () => {
    last = await scrubStatus();
    return last.totals.orphansDeleted === 4 && last.totals.orphanBlocks === 0;
  }).catch((err: Error) => {
    throw new Error(`${err.message}: ${JSON.stringify(last?.totals)} ${JSON.stringify(last?.nodes.flatMap((n) => n.scrub?.orphanGroups ?? []))}`);
  });
  // The volume written above is untouched.
  const vc = await openVolumeClient(c.meta);
  const ro = await vc.openVolume('s', { readOnly: true });
  assert.equal((await ro.read(0, 4 * MiB)).length, 4 * MiB);
  await vc.close();
});
