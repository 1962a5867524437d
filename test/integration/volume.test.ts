import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { Etcd3 } from 'etcd3';
import { isTorusError } from '../../src/core/errors.js';
import { VolumeClient } from '../../src/volume/client.js';
import { VolumeMeta } from '../../src/volume/meta.js';
import { startCluster, type TestCluster } from '../helpers/cluster.js';
import { eventually, ok, REPO, removeDir, runCli } from '../helpers/procs.js';
import { checkJournalState, parseWriterLog } from '../helpers/journal-check.js';
import { openVolumeClient } from '../helpers/certs.js';

// Block volumes against a real etcd and three storage nodes at R=2, through the real CLIs and
// clients in other processes.

let c: TestCluster;
let C: string[];
let vc: VolumeClient;
const dirs: string[] = [];
const MiB = 1024 * 1024;

async function usedBlocks(): Promise<number> {
  return (await c.meta.getPeers()).reduce((s, p) => s + p.usedBlocks, 0);
}

async function revokeLockLease(volume: string): Promise<void> {
  const vm = new VolumeMeta(c.meta.kv());
  const id = (await vm.get(volume)).id;
  const e = await c.meta.kv().get(`/torus/volumemeta/${id}/lock`);
  assert.ok(e?.lease, 'the lock is bound to a lease');
  const raw = new Etcd3({ hosts: `http://${c.etcd.endpoint}` });
  await raw.leaseClient.leaseRevoke({ ID: e.lease });
  raw.close();
}

before(async () => {
  c = await startCluster({ nodes: 3, replication: 2, blockSize: '64KiB', size: '512MiB' });
  C = ['-C', c.etcd.endpoint];
  vc = await openVolumeClient(c.meta);
});

after(async () => {
  await vc?.close();
  await c?.stop();
  for (const d of dirs) removeDir(d);
});

describe('volumes through the CLI', () => {
  test('create (three spellings), list, thin provisioning', async () => {
    const baseline = await usedBlocks();
    assert.match(await ok('torusctl', [...C, 'volume', 'create-block', 'v1', '64MiB']), /created volume v1: 64 MiB/);
    await ok('torusctl', [...C, 'block', 'create', 'v2', '1GiB']);
    // Thin provisioning beyond the cluster's capacity is allowed, and said.
    const huge = await runCli('torusblk', [...C, 'volume', 'create', 'huge', '10TiB']);
    assert.equal(huge.code, 0, huge.stderr);
    assert.match(huge.stderr, /^warning: volumes now total 10\.0 TiB against [\d.]+ [MG]iB usable \([\d.]+ [MG]iB raw at replication \d\): overcommitted \d+\.\dx/m);
    const list = JSON.parse(await ok('torusctl', [...C, 'volume', 'list', '--json'])) as { name: string; size: number; status: string }[];
    assert.deepEqual(
      list.map((v) => [v.name, v.size, v.status]),
      [
        ['huge', 10 * 2 ** 40, 'free'],
        ['v1', 64 * MiB, 'free'],
        ['v2', 2 ** 30, 'free'],
      ],
    );
    const table = await ok('torusctl', [...C, 'volume', 'list']);
    assert.match(table, /VOLUME NAME.*SIZE.*TYPE.*STATUS/);
    assert.match(table, /\| huge +\| 10 TiB +\| 0 B +\| block +\| free/);
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(await usedBlocks(), baseline, 'creating a 10 TiB volume stored nothing');
  });

  test('bad input is refused in one line', async () => {
    const cases: [string[], number, RegExp][] = [
      [['volume', 'create-block', 'v1', '1GiB'], 5, /already exists/],
      [['volume', 'create-block', 'a/b', '1GiB'], 2, /invalid volume name "a\/b"/],
      [['volume', 'create-block', 'x', '0'], 2, /must be larger than 0/],
      [['volume', 'create-block', 'x', '2PiB'], 2, /over the limit/],
      [['volume', 'create-block', 'x', '10QB'], 2, /invalid size/],
      [['volume', 'delete', 'nope'], 6, /no volume named nope/],
      [['block', 'snapshot', 'create', 'v1'], 2, /expected VOLUME@SNAPSHOT/],
      [['block', 'snapshot', 'restore', 'v1@nope'], 6, /no snapshot v1@nope/],
    ];
    for (const [args, code, re] of cases) {
      const r = await runCli('torusctl', [...C, ...args]);
      assert.equal(r.code, code, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, re);
      assert.equal(r.stderr.trim().split('\n').length, 1);
    }
  });
});

describe('data', () => {
  test('random unaligned writes read back byte-exact, across reopen', async () => {
    const size = 64 * MiB;
    const model = Buffer.alloc(size);
    const vol = await vc.openVolume('v1');
    for (let i = 0; i < 200; i++) {
      const off = Math.floor(Math.random() * (size - 1));
      const len = Math.min(size - off, 1 + Math.floor(Math.random() * 300_000));
      const d = randomBytes(len);
      await vol.write(off, d);
      d.copy(model, off);
      if (i % 40 === 39) await vol.flush();
      if (i % 25 === 0) assert.ok((await vol.read(off, len)).equals(d));
    }
    await vol.close();
    const other = await openVolumeClient(c.meta);
    const again = await other.openVolume('v1', { readOnly: true });
    assert.ok((await again.read(0, size)).equals(model));
    // The reader holds its view (GC keeps it) until it closes, and volume info says so.
    const readers = async (): Promise<number> => (JSON.parse(await ok('torusctl', [...C, 'volume', 'info', 'v1', '--json'])) as { readers: number }).readers;
    assert.equal(await readers(), 1);
    assert.match(await ok('torusctl', [...C, 'volume', 'info', 'v1']), /^Readers: +1 read-only open, each holding the view it opened/m);
    await again.close();
    assert.equal(await readers(), 0);
    await other.close();
  });

  test('a client killed mid-stream: the next opener sees every acknowledged flush, then a prefix of the rest', async () => {
    await ok('torusctl', [...C, 'volume', 'create-block', 'crash', '8MiB']);
    const script = join(REPO, 'dist', 'test', 'helpers', 'volume-writer.js');
    const child = spawn(process.execPath, [script, c.etcd.endpoint, 'crash'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let errOut = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (errOut += d.toString()));
    await eventually('five flushes', async () => (out.match(/^flushed /gm)?.length ?? 0) >= 5 || (child.exitCode !== null ? Promise.reject(new Error(errOut)) : false));
    await new Promise((r) => setTimeout(r, 50 + Math.random() * 100)); // mid-way through more writes
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    // Its lock holds until the lease runs out; the test does not wait 15 s for that.
    const opening = await vc.openVolume('crash').catch((e: unknown) => e);
    assert.ok(isTorusError(opening, 'LOCKED'), 'the dead client still holds the lock until its lease expires');
    await revokeLockLease('crash');
    const vol = await vc.openVolume('crash');
    checkJournalState(await vol.read(0, 8 * MiB), Buffer.alloc(8 * MiB), parseWriterLog(out));
    await vol.close();
  });

  test('two clients race to open: exactly one wins; the other is told who holds it', async () => {
    const a = await openVolumeClient(c.meta);
    const b = await openVolumeClient(c.meta);
    const res = await Promise.allSettled([a.openVolume('v2'), b.openVolume('v2')]);
    const won = res.filter((r) => r.status === 'fulfilled');
    assert.equal(won.length, 1);
    const lost = res.find((r) => r.status === 'rejected') as PromiseRejectedResult;
    assert.ok(isTorusError(lost.reason, 'LOCKED'));
    assert.match((lost.reason as Error).message, /volume v2 is already mounted on another host \(held by .* pid \d+/);
    const list = JSON.parse(await ok('torusctl', [...C, 'volume', 'list', '--json'])) as { name: string; status: string }[];
    assert.equal(list.find((v) => v.name === 'v2')?.status, 'in-use');
    const del = await runCli('torusctl', [...C, 'volume', 'delete', 'v2']);
    assert.equal(del.code, 7);
    assert.match(del.stderr, /mounted/);
    await (won[0] as PromiseFulfilledResult<Awaited<ReturnType<VolumeClient['openVolume']>>>).value.close();
    await a.close();
    await b.close();
  });

  test('an expired lease: once the client notices, its flushes fail; what it flushed before is kept', async () => {
    const client = await openVolumeClient(c.meta);
    const vol = await client.openVolume('v2');
    await vol.write(0, Buffer.alloc(1000, 1));
    await vol.flush();
    await revokeLockLease('v2');
    // Until its session notices the revoked lease, the client's flushes still land in its journal,
    // and whoever opens the volume next replays them: acknowledged either way. Once it notices,
    // writes and flushes fail with LOCKED, for good.
    let acked = 1;
    let value = 1;
    await eventually('the client notices it lost its lock', async () => {
      try {
        value++;
        await vol.write(0, Buffer.alloc(1000, value));
        await vol.flush();
        acked = value;
        return false;
      } catch (e) {
        assert.ok(isTorusError(e, 'LOCKED'), String(e));
        return true;
      }
    }, 30_000);
    const other = await vc.openVolume('v2');
    await other.close();
    await assert.rejects(vol.flush(), (e) => isTorusError(e, 'LOCKED'));
    await assert.rejects(vol.write(0, Buffer.alloc(10)), (e) => isTorusError(e, 'LOCKED'));
    const ro = await vc.openVolume('v2', { readOnly: true });
    const got = (await ro.read(0, 1000))[0]!;
    // The last acknowledged flush, or the write after it if its append landed before the fence.
    assert.ok(got === acked || got === acked + 1, `read ${got}, last acknowledged ${acked}`);
    await ro.close();
    await client.close().catch(() => undefined);
  });
});

describe('snapshots, clones, dump and load', () => {
  test('snapshot, restore, clone and dump round trips are byte-exact', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'torus-dump-'));
    dirs.push(dir);
    const original = randomBytes(3 * MiB);
    const src = join(dir, 'src.img');
    // Holes in the input stay holes: a zero MiB in the middle.
    original.fill(0, MiB, 2 * MiB);
    writeFileSync(src, original);
    assert.match(await ok('torusctl', [...C, 'block', 'load', src, 'snapvol', '4MiB']), /copied 3145728 bytes/);
    await ok('torusctl', [...C, 'block', 'snapshot', 'create', 'snapvol@one']);
    const dup = await runCli('torusctl', [...C, 'block', 'snapshot', 'create', 'snapvol@one']);
    assert.equal(dup.code, 5);
    // Change the volume, then compare every view of it.
    const vol = await vc.openVolume('snapvol');
    await vol.write(0, Buffer.alloc(MiB, 0x77));
    await vol.close();
    const snaps = JSON.parse(await ok('torusctl', [...C, 'block', 'snapshot', 'list', 'snapvol', '--json'])) as { name: string }[];
    assert.deepEqual(snaps.map((s) => s.name), ['one']);
    const expectOne = Buffer.concat([original, Buffer.alloc(MiB)]);
    const dumpSnap = join(dir, 'snap.img');
    await ok('torusctl', [...C, 'block', 'dump', 'snapvol@one', dumpSnap]);
    assert.ok(readFileSync(dumpSnap).equals(expectOne));
    assert.ok(statSync(dumpSnap).blocks * 512 < 3.5 * MiB, 'the dump is sparse');
    await ok('torusctl', [...C, 'block', 'clone', 'snapvol@one', 'cloned']);
    const dumpClone = join(dir, 'clone.img');
    await ok('torusctl', [...C, 'block', 'dump', '-p', 'cloned', dumpClone]);
    assert.ok(readFileSync(dumpClone).equals(expectOne));
    await ok('torusctl', [...C, 'block', 'snapshot', 'restore', 'snapvol@one']);
    const restored = join(dir, 'restored.img');
    await ok('torusctl', [...C, 'block', 'dump', 'snapvol', restored]);
    assert.ok(readFileSync(restored).equals(expectOne));
    // Dump to standard output: the data on stdout, one summary line on stderr, no listener leak warning.
    let dumpErr = '';
    const r = await new Promise<Buffer>((res, rej) => {
      const p = spawn(process.execPath, [join(REPO, 'bin', 'torusctl.js'), ...C, 'block', 'dump', 'snapvol', '-'], { stdio: ['ignore', 'pipe', 'pipe'] });
      const parts: Buffer[] = [];
      p.stdout.on('data', (d: Buffer) => parts.push(d));
      p.stderr.on('data', (d: Buffer) => (dumpErr += d.toString()));
      p.on('error', rej);
      p.on('close', () => res(Buffer.concat(parts)));
    });
    assert.ok(r.equals(expectOne));
    assert.equal(dumpErr, `copied ${expectOne.length} bytes (${expectOne.length / MiB} MiB)\n`);
    // An existing file is not overwritten without --force.
    const again = await runCli('torusctl', [...C, 'block', 'dump', 'snapvol', restored]);
    assert.equal(again.code, 5);
    assert.match(again.stderr, /already exists: pass --force to overwrite it/);
    await ok('torusctl', [...C, 'block', 'dump', '--force', 'snapvol', restored]);
    const missing = await runCli('torusctl', [...C, 'block', 'load', join(dir, 'nope.img'), 'x']);
    assert.equal(missing.code, 6);
    assert.equal(missing.stderr, `torusctl: ${join(dir, 'nope.img')}: no such file or directory\n`);
    const restoreMounted = await vc.openVolume('snapvol');
    const busy = await runCli('torusctl', [...C, 'block', 'snapshot', 'restore', 'snapvol@one']);
    assert.equal(busy.code, 7);
    await restoreMounted.close();
    await ok('torusctl', [...C, 'block', 'snapshot', 'delete', 'snapvol@one']);
    assert.deepEqual(JSON.parse(await ok('torusctl', [...C, 'block', 'snapshot', 'list', 'snapvol', '--json'])), []);
  });

  test('resize grows; shrinking needs --allow-shrink', async () => {
    await ok('torusctl', [...C, 'volume', 'create-block', 'rs', '1MiB']);
    assert.match(await ok('torusctl', [...C, 'volume', 'resize', 'rs', '3GiB']), /1 MiB -> 3 GiB/);
    const shrink = await runCli('torusctl', [...C, 'volume', 'resize', 'rs', '1MiB']);
    assert.equal(shrink.code, 2);
    assert.match(shrink.stderr, /shrinking volume rs from 3 GiB to 1 MiB loses the data past 1 MiB: pass --allow-shrink/);
    await ok('torusctl', [...C, 'volume', 'resize', 'rs', '2MiB', '--allow-shrink']);
    const list = JSON.parse(await ok('torusctl', [...C, 'volume', 'list', '--json'])) as { name: string; size: number }[];
    assert.equal(list.find((v) => v.name === 'rs')?.size, 2 * MiB);
  });
});
