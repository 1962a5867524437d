import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { BlockType } from '../../src/core/ids.js';
import { EtcdMetadata } from '../../src/metadata/etcd/etcd.js';
import { VolumeMeta, type VolumeLock } from '../../src/volume/meta.js';
import type { Head } from '../../src/volume/records.js';
import { startEtcd, type EtcdHandle } from '../helpers/etcd.js';
import { ok, removeDir, startTorusd, type Torusd } from '../helpers/procs.js';

// Issue 13, etcd growth: every sync writes a new revision of its volume's head, and etcd keeps
// every revision until it is compacted. 100,000 syncs at the metadata level (the head commit a
// sync makes, through the real metadata service, fenced by the volume lock) against a real etcd,
// with a real torusd doing the compaction as the elected node; etcd's database must stay within
// a bound that it crosses without compaction (measured: see docs/failure-guide.md, "etcd's size").

const SYNCS = 100_000;
const VOLUMES = 16;
const MiB = 1024 * 1024;
/** Measured: without compaction (torusd --compaction-retention 0) the run ends at 25.6 MiB; with it, 1.1 MiB. */
const BOUND = 8 * MiB;

let etcd: EtcdHandle;
let node: Torusd;
let meta: EtcdMetadata;

before(async () => {
  etcd = await startEtcd();
  await ok('torusctl', ['-C', etcd.endpoint, 'init']);
  // The compacting node looks often and keeps few revisions, so that a test-sized run shows it.
  node = await startTorusd(etcd.endpoint, { extra: ['--compaction-interval', '500ms', '--compaction-max-revisions', '2000'] });
  meta = new EtcdMetadata({ endpoints: [etcd.endpoint] });
});

after(async () => {
  await meta?.close();
  await node?.kill();
  if (node) removeDir(node.dataDir);
  await etcd?.stop();
});

/** A head as a sync writes it: the root page of the volume's inode tree moves every sync. */
function head(volume: number, i: number): Omit<Head, 'epoch'> {
  return { root: { ref: { type: BlockType.INode, volume, inode: i + 2, index: 0 }, crc: (i * 2654435761) >>> 0 }, depth: 3, size: 1 << 30 };
}

test(`${SYNCS} syncs: etcd's database stays bounded while torusd compacts its history`, { timeout: 600_000 }, async () => {
  const vmeta = new VolumeMeta(meta.kv());
  const session = await meta.kv().session(15_000);
  const locks: VolumeLock[] = [];
  for (let v = 0; v < VOLUMES; v++) {
    await vmeta.create(`soak${v}`, 1 << 30);
    locks.push(await vmeta.lock(`soak${v}`, session));
  }
  let maxDb = 0;
  const sample = async (): Promise<void> => {
    maxDb = Math.max(maxDb, (await meta.kv().status()).dbSizeBytes);
  };
  const sampler = setInterval(() => void sample().catch(() => undefined), 500);
  const began = Date.now();
  const startRevision = (await meta.kv().status()).revision;
  try {
    await Promise.all(
      locks.map(async (lock, v) => {
        for (let i = v; i < SYNCS; i += VOLUMES) await vmeta.commit(lock, head(lock.volume.id, i));
      }),
    );
  } finally {
    clearInterval(sampler);
  }
  await sample();
  const end = await meta.kv().status();
  console.log(`# ${SYNCS} syncs in ${((Date.now() - began) / 1000).toFixed(1)} s; revisions ${startRevision} -> ${end.revision}; db ${(end.dbSizeBytes / MiB).toFixed(1)} MiB at the end, ${(maxDb / MiB).toFixed(1)} MiB at most`);
  assert.ok(end.revision - startRevision >= SYNCS, 'every sync wrote a revision');
  assert.ok(maxDb > 0 && maxDb < BOUND, `etcd's database reached ${(maxDb / MiB).toFixed(1)} MiB`);
  // The compaction was torusd's: its metrics say so.
  const metrics = await (await fetch(`http://127.0.0.1:${node.httpPort}/metrics`)).text();
  assert.match(metrics, /^torus_etcd_compactor_leader 1$/m);
  const compactions = Number(/^torus_etcd_compactions_total (\d+)$/m.exec(metrics)?.[1]);
  assert.ok(compactions > 10, `torusd compacted ${compactions} times`);
  await session.revoke();
});
