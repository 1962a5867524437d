// Makes test/fixtures/wave1/: a cluster written by the first release ("wave 1", commit 77a2673),
// which test/integration/upgrade.test.ts opens with the current code. It needs a BUILT checkout
// of that release, given as the only argument:
//
//   git worktree add --detach /tmp/wave1 77a2673 && (cd /tmp/wave1 && node scripts/setup.js --test)
//   npm run build && node dist/scripts/make-wave1-fixture.js /tmp/wave1
//
// With the wave-1 binaries and library only: a one-member etcd on loopback, three torusd (R=2,
// 64 KiB blocks, 32 MiB each, GC off so superseded blocks stay for the new GC to find), volume
// `alpha` loaded from a sparse file, snapshot `alpha@snap1`, then writes, a trim and overwrites of
// alpha over several syncs, a clone `beta` of the snapshot with writes of its own, and `empty`,
// never written. Then torusd stops cleanly (SIGTERM), etcd's keys under /torus/ are saved
// (keys.json, values base64) and etcd is killed; each data dir is saved as a sparse tarball. What
// each volume and the snapshot must read as is computed here from the pattern, not read back
// through torus (expected.json).

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, openSync, closeSync, ftruncateSync, writeSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Etcd3 } from 'etcd3';
import { freePort, startEtcd } from '../test/helpers/etcd.js';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const OUT = join(ROOT, 'test', 'fixtures', 'wave1');
const WAVE1_COMMIT = '77a2673';
const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCK = 64 * KiB;
const NODES = 3;
const NODE_SIZE = '32MiB';

// ---- the pattern: deterministic, says where it belongs, and gzips well ----

/**
 * The bytes a write of generation `gen` puts at volume offset `offset`: every 512-byte sector
 * starts with a line naming the volume, generation and sector offset, then a byte sequence seeded
 * by both, so a sector read from the wrong place, the wrong generation or the wrong volume
 * differs.
 */
function pattern(tag: string, gen: number, offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  const first = Math.floor(offset / 512) * 512;
  for (let s = first; s < offset + length; s += 512) {
    const sector = Buffer.alloc(512);
    const head = Buffer.from(`${tag} gen ${gen} sector @${s}\n`);
    head.copy(sector);
    const seed = (s / 512 + gen * 37 + tag.length * 11) & 0xff;
    for (let k = head.length; k < 512; k++) sector[k] = (seed + k * 31) & 0xff || 1;
    const from = Math.max(s, offset);
    const to = Math.min(s + 512, offset + length);
    sector.copy(out, from - offset, from - s, to - s);
  }
  return out;
}

type Write = [offset: number, length: number, gen: number];
type Op = { write: Write } | { trim: [offset: number, length: number] } | { flush: true };

/** What a write op puts down. */
const bytesOf = (tag: string, [offset, length, gen]: Write): Buffer => pattern(tag, gen, offset, length);

const ALPHA_SIZE = 4 * MiB;
/** What `block load` writes into alpha (the rest of the file is holes). */
const ALPHA_LOAD: [number, number][] = [
  [0, 1 * MiB], // 16 whole blocks
  [1536 * KiB, 100 * KiB], // across a block boundary, ending mid-block
  [3 * MiB + 4 * KiB, 8 * KiB], // a small piece of a block
];
/** Written by alpha's first sync after the snapshot and rewritten by the next: garbage for GC. */
const SUPERSEDED = { write: [12 * BLOCK, BLOCK, 2] } satisfies Op;
/** Alpha after the snapshot: over several syncs, each of which commits a head (wave 1). */
const ALPHA_AFTER: Op[] = [
  { write: [512 * KiB, 256 * KiB, 2] }, // whole blocks the snapshot holds, overwritten
  { write: [4 * KiB + 100, 5000, 2] }, // unaligned, inside block 0
  SUPERSEDED,
  { flush: true },
  { write: [12 * BLOCK, BLOCK, 3] },
  { write: [2 * MiB, BLOCK + 1000, 3] }, // into a hole, spilling into the next block
  { trim: [3 * MiB, BLOCK] }, // the block with the small piece becomes a hole again
  { flush: true },
  { write: [ALPHA_SIZE - 3000, 3000, 4] }, // the volume's last bytes
];
/** The clone of alpha@snap1, after its own writes. */
const BETA_AFTER: Op[] = [
  { write: [10_000, 10_000, 5] },
  { write: [40 * BLOCK, 2 * BLOCK, 5] }, // into a hole of the snapshot
];
const EMPTY_SIZE = 1 * MiB;

function apply(img: Buffer, tag: string, ops: readonly Op[]): void {
  for (const op of ops) {
    if ('write' in op) bytesOf(tag, op.write).copy(img, op.write[0]);
    else if ('trim' in op) img.fill(0, op.trim[0], op.trim[0] + op.trim[1]);
  }
}

// ---- the wave-1 checkout ----

function usage(message: string): never {
  process.stderr.write(`make-wave1-fixture: ${message}\nusage: node dist/scripts/make-wave1-fixture.js WAVE1_CHECKOUT (a built checkout of ${WAVE1_COMMIT})\n`);
  process.exit(2);
}

const wave1 = resolve(process.argv[2] ?? usage('the path of a wave-1 checkout is missing'));
for (const f of ['bin/torusd.js', 'bin/torusctl.js', 'dist/src/volume/client.js']) if (!existsSync(join(wave1, f))) usage(`${wave1} has no ${f}: not a built checkout`);
const head = spawnSync('git', ['-C', wave1, 'rev-parse', 'HEAD'], { encoding: 'utf8' }).stdout.trim();
if (!head.startsWith(WAVE1_COMMIT)) usage(`${wave1} is at ${head || 'an unknown commit'}, not ${WAVE1_COMMIT}`);

function say(msg: string): void {
  process.stderr.write(`make-wave1-fixture: ${msg}\n`);
}

/** Runs wave 1's torusctl and insists on success. */
function oldctl(args: string[], endpoint: string): string {
  const r = spawnSync(process.execPath, [join(wave1, 'bin', 'torusctl.js'), '-C', endpoint, ...args], { encoding: 'utf8', timeout: 60_000 });
  if (r.status !== 0) throw new Error(`wave-1 torusctl ${args.join(' ')} exited ${r.status ?? r.signal}\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

interface OldNode {
  proc: ChildProcess;
  dir: string;
  log: () => string;
}

async function startOldTorusd(endpoint: string, dir: string): Promise<OldNode> {
  const peer = await freePort();
  const http = await freePort();
  const args = ['-C', endpoint, '--peer-address', `http://127.0.0.1:${peer}`, '--data-dir', dir, '--size', NODE_SIZE, '--host', '127.0.0.1', '--port', String(http), '--heartbeat', '1s', '--gc-interval', '0'];
  const proc = spawn(process.execPath, [join(wave1, 'bin', 'torusd.js'), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const deadline = Date.now() + 20_000;
  while (!out.includes('torusd started')) {
    if (proc.exitCode !== null || Date.now() > deadline) {
      proc.kill('SIGKILL');
      throw new Error(`wave-1 torusd did not start:\n${out}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return { proc, dir, log: () => out };
}

// Wave 1's own library, for writes at chosen offsets with a sync between (what torusblk does on
// FLUSH). Only the calls used here are typed.
interface OldVolume {
  write(offset: number, data: Uint8Array): Promise<void>;
  trim(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  close(): Promise<void>;
}
interface OldVolumeClient {
  openVolume(name: string): Promise<OldVolume>;
  close(): Promise<void>;
}
interface OldMeta {
  close(): Promise<void>;
}

async function oldImport<T>(path: string): Promise<T> {
  return (await import(pathToFileURL(join(wave1, 'dist', 'src', path)).href)) as T;
}

async function writeWithWave1(endpoint: string, volume: string, tag: string, ops: readonly Op[]): Promise<void> {
  const { EtcdMetadata } = await oldImport<{ EtcdMetadata: new (o: { endpoints: string[] }) => OldMeta }>('metadata/etcd/etcd.js');
  const { VolumeClient } = await oldImport<{ VolumeClient: { open(meta: OldMeta): Promise<OldVolumeClient> } }>('volume/client.js');
  const meta = new EtcdMetadata({ endpoints: [endpoint] });
  const vc = await VolumeClient.open(meta);
  const vol = await vc.openVolume(volume);
  for (const op of ops) {
    if ('write' in op) await vol.write(op.write[0], bytesOf(tag, op.write));
    else if ('trim' in op) await vol.trim(...op.trim);
    else await vol.flush();
  }
  await vol.close(); // the last sync
  await vc.close();
  await meta.close();
}

/** A sparse file holding `extents` of the pattern (generation 1) and holes elsewhere. */
function sparseFile(path: string, tag: string, size: number, extents: readonly [number, number][]): void {
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, size);
    for (const [off, len] of extents) writeSync(fd, pattern(tag, 1, off, len), 0, len, off);
  } finally {
    closeSync(fd);
  }
}

function digest(img: Buffer): { size: number; sha256: string; blocks: string[] } {
  const blocks: string[] = [];
  for (let o = 0; o < img.length; o += BLOCK) blocks.push(createHash('sha256').update(img.subarray(o, o + BLOCK)).digest('hex').slice(0, 16));
  return { size: img.length, sha256: createHash('sha256').update(img).digest('hex'), blocks };
}

async function main(): Promise<void> {
  const work = mkdtempSync(join(tmpdir(), 'torus-wave1-'));
  const etcd = await startEtcd();
  const nodes: OldNode[] = [];
  try {
    const ep = etcd.endpoint;
    oldctl(['init', '--block-size', '64KiB', '--replication', '2'], ep);
    for (let i = 0; i < NODES; i++) {
      const dir = join(work, `node${i}`);
      mkdirSync(dir);
      nodes.push(await startOldTorusd(ep, dir));
    }
    oldctl(['peer', 'add', '--all-peers'], ep);

    // The images every volume must read as, built beside the writes.
    const alpha = Buffer.alloc(ALPHA_SIZE);
    for (const [off, len] of ALPHA_LOAD) pattern('alpha', 1, off, len).copy(alpha, off);
    const input = join(work, 'alpha.img');
    sparseFile(input, 'alpha', ALPHA_SIZE, ALPHA_LOAD);
    oldctl(['block', 'load', input, 'alpha'], ep);
    oldctl(['block', 'snapshot', 'create', 'alpha@snap1'], ep);
    const snap1 = Buffer.from(alpha);
    await writeWithWave1(ep, 'alpha', 'alpha', ALPHA_AFTER);
    apply(alpha, 'alpha', ALPHA_AFTER);
    oldctl(['block', 'clone', 'alpha@snap1', 'beta'], ep);
    await writeWithWave1(ep, 'beta', 'beta', BETA_AFTER);
    const beta = Buffer.from(snap1);
    apply(beta, 'beta', BETA_AFTER);
    oldctl(['volume', 'create-block', 'empty', String(EMPTY_SIZE)], ep);
    say(oldctl(['volume', 'list'], ep));

    for (const n of nodes) {
      const gone = new Promise<number | null>((r) => n.proc.once('exit', (code) => r(code)));
      n.proc.kill('SIGTERM');
      const code = await gone;
      if (code !== 0) throw new Error(`wave-1 torusd exited ${code} on SIGTERM:\n${n.log()}`);
    }

    mkdirSync(OUT, { recursive: true });
    const raw = new Etcd3({ hosts: `http://${ep}` });
    try {
      const res = await raw.getAll().prefix('/torus/').exec();
      // A key still bound to a lease (a lock, a node record) would outlive its owner in the fixture.
      const leased = res.kvs.filter((kv) => kv.lease !== '0').map((kv) => kv.key.toString());
      if (leased.length > 0) throw new Error(`keys still bound to a lease after every process stopped: ${leased.join(', ')}`);
      const keys = res.kvs.map((kv) => ({ key: kv.key.toString(), value: kv.value.toString('base64') }));
      writeFileSync(join(OUT, 'keys.json'), `${JSON.stringify(keys, null, 1)}\n`);
    } finally {
      raw.close();
    }
    for (let i = 0; i < NODES; i++) {
      const r = spawnSync('tar', ['--sparse', '-czf', join(OUT, `node${i}.tar.gz`), '-C', nodes[i]!.dir, '.']);
      if (r.status !== 0) throw new Error(`tar failed: ${r.stderr.toString()}`);
    }
    const expected = {
      madeBy: `scripts/make-wave1-fixture.ts with the binaries of commit ${WAVE1_COMMIT}`,
      blockSize: BLOCK,
      replication: 2,
      nodes: NODES,
      nodeSize: NODE_SIZE,
      // blocks: the first 16 hex digits of each 64 KiB block's sha256, to say where a read differs.
      volumes: { alpha: digest(alpha), 'alpha@snap1': digest(snap1), beta: digest(beta), empty: digest(Buffer.alloc(EMPTY_SIZE)) },
      // The sha256 of blocks no head or snapshot names any more, on disk because GC was off.
      garbage: [createHash('sha256').update(bytesOf('alpha', SUPERSEDED.write)).digest('hex')],
    };
    writeFileSync(join(OUT, 'expected.json'), `${JSON.stringify(expected, null, 1)}\n`);
    let total = 0;
    for (const f of ['keys.json', 'expected.json', ...nodes.map((_, i) => `node${i}.tar.gz`)]) total += statSync(join(OUT, f)).size;
    say(`wrote ${OUT}: ${total} bytes`);
  } finally {
    for (const n of nodes) if (n.proc.exitCode === null && n.proc.signalCode === null) n.proc.kill('SIGKILL');
    await etcd.stop();
    rmSync(work, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`make-wave1-fixture: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
