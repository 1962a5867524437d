import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { Etcd3 } from 'etcd3';
import { EtcdMetadata } from '../../src/metadata/etcd/etcd.js';
import { COMPAT_DURABLE_GEN, DATA_FILE, Layout, TABLE_FILE, decodeRecord, type StoreHeader } from '../../src/storage/format.js';
import { headerOnDisk } from '../../src/storage/testing.js';
import { VKEYS } from '../../src/volume/meta.js';
import { freePort, startEtcd, type EtcdHandle } from '../helpers/etcd.js';
import { ok as must, sha256File } from '../helpers/nbd-tools.js';
import { BIN, eventually, ok, REPO, removeDir, startTorusd, stopProcess, type Torusd } from '../helpers/procs.js';
import { openVolumeClient } from '../helpers/certs.js';

// Issue 14's compatibility promise: a cluster written by the first release (wave 1, commit
// 77a2673; test/fixtures/wave1, made by scripts/make-wave1-fixture.ts with that release's
// binaries) keeps all its data when its binaries are replaced by these. Its etcd keys are loaded
// into a fresh etcd and its nodes' data dirs unpacked; current torusd processes start on them
// (on new ports) and real clients read, write, scrub and collect garbage.

const FIXTURE = join(REPO, 'test', 'fixtures', 'wave1');
const KiB = 1024;

interface Digest {
  size: number;
  sha256: string;
  /** First 16 hex digits of each block's sha256. */
  blocks: string[];
}
interface Expected {
  blockSize: number;
  nodes: number;
  nodeSize: string;
  volumes: Record<string, Digest>;
  /** sha256 of blocks no head or snapshot names, left on disk by wave 1. */
  garbage: string[];
}
const expected = JSON.parse(readFileSync(join(FIXTURE, 'expected.json'), 'utf8')) as Expected;
const VOLUMES = Object.keys(expected.volumes); // alpha, alpha@snap1, beta, empty
const ID = { alpha: 1, beta: 2, empty: 3 };

let etcd: EtcdHandle;
let work: string;
let dirs: string[] = [];
let nodes: Torusd[] = [];
let meta: EtcdMetadata;
let C: string[];
/** What each volume read as once checked against expected.json. */
const images = new Map<string, Buffer>();

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** Names the blocks that differ, so a failure says where. */
function checkImage(name: string, got: Buffer, want: Digest): void {
  assert.equal(got.length, want.size, `${name}: size`);
  if (sha256(got) === want.sha256) return;
  const bs = expected.blockSize;
  const bad = want.blocks.flatMap((h, i) => (sha256(got.subarray(i * bs, (i + 1) * bs)).slice(0, 16) === h ? [] : [i]));
  assert.fail(`${name} does not read as wave 1 wrote it: blocks ${bad.join(', ')} differ`);
}

/** Reads a volume (or VOLUME@SNAPSHOT) whole through a fresh VolumeClient, read-only. */
async function readVolume(spec: string): Promise<Buffer> {
  const [volume, snapshot] = spec.split('@') as [string, string | undefined];
  const vc = await openVolumeClient(meta);
  try {
    const v = await vc.openVolume(volume, snapshot !== undefined ? { snapshot } : { readOnly: true });
    try {
      return await v.read(0, v.size);
    } finally {
      await v.close();
    }
  } finally {
    await vc.close();
  }
}

async function storeHeader(dir: string): Promise<StoreHeader> {
  const h = await headerOnDisk(join(dir, 'block'));
  assert.ok(h, `${dir}: no valid header copy`);
  return h;
}

/** The used slots of a store and their records, read from its table (the node may be running). */
async function usedSlots(dir: string): Promise<{ slot: number; blockCrc: number | undefined }[]> {
  const table = readFileSync(join(dir, 'block', TABLE_FILE));
  const h = await storeHeader(dir);
  const layout = new Layout(h.blockSize, h.sectorSize, h.slotsPerGroup);
  const out = [];
  for (let slot = 0; slot < h.slotCount; slot++) {
    const r = decodeRecord(table, layout.recordOffset(slot));
    if (r.kind === 'used') out.push({ slot, blockCrc: r.blockCrc });
  }
  return out;
}

/** How many stores hold a block whose bytes have this sha256. */
async function copiesOnDisk(hash: string): Promise<number> {
  let n = 0;
  for (const dir of dirs) {
    const data = readFileSync(join(dir, 'block', DATA_FILE));
    const bs = expected.blockSize;
    for (const { slot } of await usedSlots(dir)) if (sha256(data.subarray(slot * bs, (slot + 1) * bs)) === hash) n++;
  }
  return n;
}

async function metrics(n: Torusd): Promise<Map<string, number>> {
  const text = await (await fetch(`http://127.0.0.1:${n.httpPort}/metrics`)).text();
  return new Map([...text.matchAll(/^(torus_[a-z_]+) ([0-9.e+-]+)$/gm)].map((m) => [m[1]!, Number(m[2])]));
}

async function startNodes(extra: string[]): Promise<void> {
  nodes = [];
  for (const dataDir of dirs) nodes.push(await startTorusd(etcd.endpoint, { dataDir, size: expected.nodeSize, extra }));
  // The ring names the nodes by UUID; each re-registers its new address at its first heartbeat.
  await eventually(
    'every wave-1 node back in the ring',
    async () => {
      const peers = JSON.parse(await ok('torusctl', [...C, 'list-peers', '--json'])) as { address: string; member: string }[];
      return peers.length === nodes.length && peers.every((p) => p.member === 'OK' && nodes.some((n) => n.address === p.address));
    },
    30_000,
  );
}

async function stopNodes(): Promise<void> {
  for (const n of nodes) assert.equal(await stopProcess(n.proc), 0, `torusd stops cleanly:\n${n.log()}`);
}

before(async () => {
  etcd = await startEtcd();
  C = ['-C', etcd.endpoint];
  const raw = new Etcd3({ hosts: `http://${etcd.endpoint}` });
  try {
    const keys = JSON.parse(readFileSync(join(FIXTURE, 'keys.json'), 'utf8')) as { key: string; value: string }[];
    for (const { key, value } of keys) await raw.put(key).value(Buffer.from(value, 'base64'));
  } finally {
    raw.close();
  }
  work = mkdtempSync(join(tmpdir(), 'torus-upgrade-'));
  dirs = Array.from({ length: expected.nodes }, (_, i) => {
    const dir = join(work, `node${i}`);
    mkdirSync(dir);
    const r = spawnSync('tar', ['-xzf', join(FIXTURE, `node${i}.tar.gz`), '-C', dir]);
    assert.equal(r.status, 0, `tar: ${r.stderr?.toString()}`);
    return dir;
  });
  // The fixture is what wave 1 wrote: an old header and records without the block CRC.
  for (const d of dirs) {
    assert.equal((await storeHeader(d)).compatFlags & COMPAT_DURABLE_GEN, 0, `${d}: a wave-1 header`);
    const used = await usedSlots(d);
    assert.ok(used.length > 0 && used.every((r) => r.blockCrc === undefined), `${d}: wave-1 records, without the block CRC`);
  }
  meta = new EtcdMetadata({ endpoints: [etcd.endpoint] });
  // GC off at first: the reads below show what the upgrade alone does; GC gets its own test.
  await startNodes(['--gc-interval', '0', '--scrub-interval', '3s']);
});

after(async () => {
  await meta?.close();
  for (const n of nodes) await n.kill('SIGKILL');
  await etcd?.stop();
  if (work) removeDir(work);
});

test('torusctl volume list and volume info show the wave-1 volumes, clone and snapshot', async () => {
  const bs = expected.blockSize;
  const zeros = sha256(Buffer.alloc(bs)).slice(0, 16);
  /** Blocks wave 1 allocated: every written block holds pattern bytes; trimmed ones are holes. */
  const allocated = (name: string): number => expected.volumes[name]!.blocks.filter((h) => h !== zeros).length * bs;
  const list = JSON.parse(await ok('torusctl', [...C, 'volume', 'list', '--json'])) as { name: string; size: number; allocated: number; status: string; snapshots: number; parent: unknown }[];
  assert.deepEqual(
    list.map((v) => [v.name, v.size, v.allocated, v.status, v.snapshots, v.parent]),
    [
      ['alpha', expected.volumes['alpha']!.size, allocated('alpha'), 'free', 1, null],
      ['beta', expected.volumes['beta']!.size, allocated('beta'), 'free', 0, { volume: 'alpha', snapshot: 'snap1' }],
      ['empty', expected.volumes['empty']!.size, 0, 'free', 0, null],
    ],
  );
  const info = JSON.parse(await ok('torusctl', [...C, 'volume', 'info', 'alpha', '--json'])) as {
    size: number;
    allocated: number;
    blockSize: number;
    lock: unknown;
    snapshots: { name: string; size: number; referenced: number }[];
    journal: { tail: string };
  };
  assert.equal(info.size, expected.volumes['alpha']!.size);
  assert.equal(info.blockSize, bs);
  assert.equal(info.allocated, allocated('alpha'));
  assert.equal(info.lock, null);
  assert.deepEqual(
    info.snapshots.map((s) => [s.name, s.size, s.referenced]),
    [['snap1', expected.volumes['alpha@snap1']!.size, allocated('alpha@snap1')]],
  );
  assert.match(info.journal.tail, /^none/);
  const snaps = JSON.parse(await ok('torusctl', [...C, 'block', 'snapshot', 'list', 'alpha', '--json'])) as { name: string }[];
  assert.deepEqual(snaps.map((s) => s.name), ['snap1']);
});

test('every volume, the clone and the snapshot read byte-exact through the VolumeClient', async () => {
  for (const name of VOLUMES) {
    const got = await readVolume(name);
    checkImage(name, got, expected.volumes[name]!);
    images.set(name, got);
  }
  // Reading changed nothing in etcd: the volumes still have wave 1's head and no head2.
  const kv = meta.kv();
  for (const id of Object.values(ID)) {
    assert.ok(await kv.get(VKEYS.head(id)), `volume ${id} keeps its wave-1 head`);
    assert.equal(await kv.get(VKEYS.head2(id)), undefined);
  }
});

test('and through torusblk nbdserve to nbdcopy, a client we did not write', async () => {
  const port = await freePort();
  // Read-only: a writable export would open the volumes for writing.
  const serve: ChildProcess = spawn(process.execPath, [BIN('torusblk'), ...C, 'nbdserve', '--read-only', '--listen', `127.0.0.1:${port}`], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  serve.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  serve.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  try {
    await eventually('nbdserve listening', async () => out.includes('serving NBD on') || (serve.exitCode !== null ? Promise.reject(new Error(out)) : false));
    for (const name of VOLUMES) {
      const file = join(work, `${name}.img`);
      await must('nbdcopy', [`nbd://127.0.0.1:${port}/${name}`, file]);
      assert.equal(await sha256File(file), expected.volumes[name]!.sha256, `${name} through nbdcopy`);
    }
  } finally {
    await stopProcess(serve);
  }
});

test('the wave-1 stores: opened with nothing dropped or torn, header upgraded, a scrub pass finds no bad copy and no orphan', async () => {
  const since = Date.now();
  for (const [i, n] of nodes.entries()) {
    const status = (await (await fetch(`http://127.0.0.1:${n.httpPort}/v1/status`)).json()) as { storage: { tornRecordsAtOpen: number; duplicatesAtOpen: number; unsyncedDroppedAtOpen: number; checksumFailures: number } };
    assert.deepEqual(
      [status.storage.tornRecordsAtOpen, status.storage.duplicatesAtOpen, status.storage.unsyncedDroppedAtOpen, status.storage.checksumFailures],
      [0, 0, 0, 0],
      `node ${i}`,
    );
    const h = await storeHeader(dirs[i]!);
    assert.notEqual(h.compatFlags & COMPAT_DURABLE_GEN, 0, `node ${i}: the durable watermark is kept from the first open on`);
  }
  const report = await eventually(
    'a scrub pass finished on every node',
    async () => {
      const r = JSON.parse(await ok('torusctl', [...C, 'scrub', 'status', '--json'])) as { nodes: { scrub: { lastFinishedAt: number; lastBytes: number } | null }[]; totals: Record<string, number> };
      return r.nodes.every((n) => n.scrub && n.scrub.lastFinishedAt > since) ? r : undefined;
    },
    30_000,
  );
  assert.deepEqual(report.totals, { errors: 0, repaired: 0, dropped: 0, pending: 0, orphanBlocks: 0, orphansDeleted: 0 });
  assert.ok(report.nodes.every((n) => n.scrub!.lastBytes > 0), 'each pass read the blocks the node holds');
  for (const n of nodes) assert.equal((await metrics(n)).get('torus_storage_checksum_failures_total'), 0);
});

test('opening a volume for writing moves it from head to head2; old data and the new writes read back, the snapshot as before', async () => {
  const writes: Record<'alpha' | 'beta', [number, Buffer][]> = {
    alpha: [
      [3 * KiB, Buffer.alloc(10 * KiB, 0xa1)], // into old data, unaligned
      [40 * 64 * KiB + 100, Buffer.alloc(70 * KiB, 0xa2)], // a hole, across a block boundary
    ],
    beta: [[5 * 64 * KiB, Buffer.alloc(64 * KiB, 0xb1)]], // a whole block shared with the snapshot
  };
  for (const name of ['alpha', 'beta'] as const) {
    const vc = await openVolumeClient(meta);
    const v = await vc.openVolume(name);
    // The open committed the session's journal position: under head2, the wave-1 head deleted.
    const kv = meta.kv();
    assert.equal(await kv.get(VKEYS.head(ID[name])), undefined, `${name}: the wave-1 head is gone`);
    assert.ok(await kv.get(VKEYS.head2(ID[name])), `${name}: head2 holds the head`);
    for (const [off, data] of writes[name]) await v.write(off, data);
    await v.flush();
    await v.close();
    await vc.close();
    assert.equal(await kv.get(VKEYS.head(ID[name])), undefined);
    const want = Buffer.from(images.get(name)!);
    for (const [off, data] of writes[name]) data.copy(want, off);
    assert.ok((await readVolume(name)).equals(want), `${name}: old data plus the new writes`);
    images.set(name, want);
  }
  checkImage('alpha@snap1', await readVolume('alpha@snap1'), expected.volumes['alpha@snap1']!);
  // Untouched volumes keep their wave-1 head, and still read.
  assert.ok(await meta.kv().get(VKEYS.head(ID.empty)));
  checkImage('empty', await readVolume('empty'), expected.volumes['empty']!);
});

test('GC on the upgraded cluster deletes wave-1 garbage and nothing still needed', async () => {
  await stopNodes();
  // Wave 1 ran with GC off: a block superseded between two of its syncs is still on both replicas.
  for (const hash of expected.garbage) assert.equal(await copiesOnDisk(hash), 2);
  // Restarted on the upgraded stores, now with GC every second.
  await startNodes(['--gc-interval', '1s', '--scrub-interval', '0']);
  // A node that starts before its peers fails passes (their addresses unknown, it cannot read
  // the trees): counted from here, with every node up, two passes per node, the second begun
  // after this point, and none failed. A pass that finds nothing changed since a complete one is
  // skipped and counts: it stands for that complete pass, whose outcome it would repeat.
  const passes = (m: Map<string, number>): number => (m.get('torus_gc_runs_total') ?? 0) + (m.get('torus_gc_skipped_total') ?? 0);
  const base = await Promise.all(nodes.map(metrics));
  const counts = await eventually(
    'two GC passes on every node',
    async () => {
      const m = await Promise.all(nodes.map(metrics));
      return m.every((x, i) => passes(x) >= passes(base[i]!) + 2) ? m : undefined;
    },
    30_000,
  );
  counts.forEach((m, i) => assert.equal(m.get('torus_gc_failures_total'), base[i]!.get('torus_gc_failures_total'), `node ${i} skipped a GC pass:\n${nodes[i]!.log()}`));
  for (const hash of expected.garbage) assert.equal(await copiesOnDisk(hash), 0, 'GC deleted the garbage wave 1 left');
  for (const name of VOLUMES) assert.ok((await readVolume(name)).equals(images.get(name)!), `${name} after GC`);
});
