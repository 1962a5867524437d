import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { Etcd3 } from 'etcd3';
import { VolumeMeta } from '../../src/volume/meta.js';
import { startCluster, type TestCluster } from '../helpers/cluster.js';
import { BIN, eventually, ok, removeDir, startNbdserve, type Nbdserve } from '../helpers/procs.js';

// Volumes over NBD with real clients we did not write (libnbd's nbdinfo and nbdcopy, qemu-img,
// qemu-io, fio, and the kernel's loop device with ext4 through nbdfuse), against torusblk in its
// own process, a real etcd and three storage nodes at R=2.

let c: TestCluster;
let C: string[];
let dir: string;
const MiB = 1024 * 1024;

function sh(cmd: string, args: string[], timeoutS = 120): { code: number; out: string } {
  const r = spawnSync('timeout', [String(timeoutS), cmd, ...args], { encoding: 'utf8', maxBuffer: 64 * MiB });
  return { code: r.status ?? -1, out: `${r.stdout ?? ''}${r.stderr ?? ''}` };
}

function must(cmd: string, args: string[], timeoutS = 120): string {
  const r = sh(cmd, args, timeoutS);
  assert.equal(r.code, 0, `${cmd} ${args.join(' ')} failed:\n${r.out}`);
  return r.out;
}

function sha(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

type Served = Nbdserve;

function serve(): Promise<Served> {
  return startNbdserve(C);
}

async function stop(s: Served, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (s.proc.exitCode !== null) return;
  const gone = new Promise((r) => s.proc.once('exit', r));
  s.proc.kill(signal);
  await gone;
}

async function revokeLock(volume: string): Promise<void> {
  const id = (await new VolumeMeta(c.meta.kv()).get(volume)).id;
  const e = await c.meta.kv().get(`/torus/volumemeta/${id}/lock`);
  if (!e) return;
  const raw = new Etcd3({ hosts: `http://${c.etcd.endpoint}` });
  await raw.leaseClient.leaseRevoke({ ID: e.lease });
  raw.close();
}

before(async () => {
  c = await startCluster({ nodes: 3, replication: 2, blockSize: '512KiB', size: '1GiB' });
  C = ['-C', c.etcd.endpoint];
  dir = mkdtempSync(join(tmpdir(), 'torus-nbd-'));
});
after(async () => {
  await c?.stop();
  removeDir(dir);
});

describe('torusblk nbdserve with real NBD clients', () => {
  let s: Served;
  before(async () => {
    await ok('torusctl', [...C, 'volume', 'create-block', 'nv', '256MiB']);
    s = await serve();
  });
  after(async () => {
    await stop(s);
  });

  test('nbdinfo: size, flags, base:allocation, and holes of a sparse volume', async () => {
    const info = JSON.parse(must('nbdinfo', ['--json', `nbd://127.0.0.1:${s.port}/nv`])) as {
      protocol: string;
      exports: { 'export-size': number; contexts: string[]; can_flush: boolean; can_fua: boolean; can_multi_conn: boolean; can_trim: boolean; can_zero: boolean; can_cache: boolean; is_read_only: boolean; block_size_preferred: number }[];
    };
    const e = info.exports[0]!;
    assert.equal(e['export-size'], 256 * MiB);
    assert.ok(e.contexts.includes('base:allocation'));
    for (const k of ['can_flush', 'can_fua', 'can_multi_conn', 'can_trim', 'can_zero', 'can_cache'] as const) assert.equal(e[k], true, k);
    assert.equal(e.is_read_only, false);
    assert.equal(e.block_size_preferred, 512 * 1024);
    const map = must('nbdinfo', ['--map', `nbd://127.0.0.1:${s.port}/nv`]);
    assert.match(map.trim(), /^\s*0\s+268435456\s+3\s+hole,zero$/);
  });

  test('nbdcopy 64 MiB in and out over four connections: identical', async () => {
    const src = join(dir, 'rand.bin');
    const data = randomBytes(64 * MiB);
    writeFileSync(src, data);
    must('nbdcopy', ['--connections=4', src, `nbd://127.0.0.1:${s.port}/nv`]);
    const out = join(dir, 'back.bin');
    must('nbdcopy', ['--connections=4', `nbd://127.0.0.1:${s.port}/nv`, out]);
    assert.equal(sha(readFileSync(out).subarray(0, 64 * MiB)), sha(data));
    const map = must('nbdinfo', ['--map', `nbd://127.0.0.1:${s.port}/nv`]);
    assert.match(map, /^\s*0\s+67108864\s+0\s+data$/m);
  });

  test('qemu-img convert of a qcow2 image; qemu-img compare says identical', async () => {
    const raw = join(dir, 'img.raw');
    const img = Buffer.alloc(32 * MiB);
    randomBytes(4 * MiB).copy(img, 3 * MiB);
    randomBytes(MiB).copy(img, 20 * MiB + 4096);
    writeFileSync(raw, img);
    const qcow = join(dir, 'img.qcow2');
    must('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow]);
    await ok('torusctl', [...C, 'volume', 'create-block', 'qv', '32MiB']);
    must('qemu-img', ['convert', '-n', '-f', 'qcow2', '-O', 'raw', qcow, `nbd://127.0.0.1:${s.port}/qv`]);
    const cmp = must('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow, `nbd://127.0.0.1:${s.port}/qv`]);
    assert.match(cmp, /Images are identical/);
  });

  test('qemu-io patterns: write, read, discard, write-zeroes, aio flush, past the end', async () => {
    const uri = `nbd://127.0.0.1:${s.port}/nv`;
    const out = must('qemu-io', [
      '-f', 'raw',
      '-c', 'write -P 0xab 1M 1M',
      '-c', 'read -P 0xab 1M 1M',
      '-c', 'write -P 0xcd 3000 5000',
      '-c', 'read -P 0xcd 3000 5000',
      '-c', 'discard 8M 2M',
      '-c', 'read -P 0 8M 2M',
      '-c', 'write -z 12M 1M',
      '-c', 'read -P 0 12M 1M',
      '-c', 'aio_write -P 0x5a 20M 64k',
      '-c', 'aio_flush',
      '-c', 'read -P 0x5a 20M 64k',
      uri,
    ]);
    assert.ok(!/Pattern verification failed|error/i.test(out), out);
    const past = sh('qemu-io', ['-f', 'raw', '-c', 'read 256M 4k', uri]);
    assert.match(past.out, /Input\/output error|Invalid argument|out of range|beyond/i);
  });

  test('fio --ioengine=nbd with crc32c verification, random and sequential, two connections', async () => {
    const out = join(dir, 'fio.json');
    must(
      'fio',
      [
        '--name=seq', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${s.port}/nv`, '--rw=write', '--bs=1M', '--size=32M', '--iodepth=8',
        '--verify=crc32c', '--do_verify=1', '--numjobs=1',
        '--name=rand', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${s.port}/nv`, '--rw=randwrite', '--bs=4k', '--offset=64M', '--size=16M', '--iodepth=32',
        '--verify=crc32c', '--do_verify=1', '--numjobs=2', '--offset_increment=16M',
        '--output-format=json', `--output=${out}`, '--verify_state_save=0',
      ],
      300,
    );
    const res = JSON.parse(readFileSync(out, 'utf8')) as { jobs: { jobname: string; error: number; write: { io_bytes: number }; read: { io_bytes: number } }[] };
    assert.equal(res.jobs.length, 3);
    for (const j of res.jobs) {
      assert.equal(j.error, 0, `${j.jobname} error ${j.error}`);
      assert.ok(j.write.io_bytes > 0 && j.read.io_bytes > 0, `${j.jobname} wrote and verified`);
    }
  });
});

describe('a block device without kernel NBD: torusblk nbd with nbdfuse and a loop device', () => {
  const haveFuse = existsSync('/dev/fuse') && sh('sh', ['-c', 'command -v nbdfuse && command -v losetup && command -v mkfs.ext4']).code === 0;

  test('mkfs.ext4, mount, write files, sync, unmount, e2fsck clean, remount and verify', { skip: haveFuse ? false : 'no /dev/fuse, nbdfuse, losetup or mkfs.ext4 here' }, async () => {
    await ok('torusctl', [...C, 'volume', 'create-block', 'fs', '128MiB']);
    const att = spawn(process.execPath, [BIN('torusblk'), ...C, 'nbd', 'fs'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    att.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    att.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    const dev = await eventually('attached', async () => /Attached fs to (\/dev\/loop\d+)/.exec(out)?.[1] ?? (att.exitCode !== null ? Promise.reject(new Error(out)) : undefined));
    assert.match(out, /no NBD module; using nbdfuse and a loop device/);
    const mnt = join(dir, 'mnt');
    mkdirSync(mnt, { recursive: true });
    const files = [randomBytes(3 * MiB), randomBytes(100_000), randomBytes(7 * MiB)];
    try {
      must('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', dev]);
      must('mount', [dev, mnt]);
      files.forEach((f, i) => writeFileSync(join(mnt, `f${i}`), f));
      must('sync', []);
      must('umount', [mnt]);
      must('e2fsck', ['-fn', dev]);
      must('mount', [dev, mnt]);
      files.forEach((f, i) => assert.equal(sha(readFileSync(join(mnt, `f${i}`))), sha(f)));
      // Ctrl-C while mounted: torusblk refuses to pull the device from under ext4, says why, and
      // waits; the umount lets it sync and detach by itself.
      const exited = new Promise((r) => att.once('exit', r));
      att.kill('SIGINT');
      await eventually('the refusal', async () => out.includes(`torusblk: not detaching ${dev}: it is mounted on ${mnt}; unmount it`));
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal(att.exitCode, null, 'still attached while mounted');
      files.forEach((f, i) => assert.equal(sha(readFileSync(join(mnt, `f${i}`))), sha(f), 'the file system still works'));
      must('umount', [mnt]);
      await Promise.race([exited, new Promise((_, rej) => setTimeout(() => rej(new Error(`no detach after umount:\n${out}`)), 30_000))]);
    } finally {
      sh('umount', [mnt]);
      if (att.exitCode === null) {
        att.kill('SIGINT');
        await new Promise((r) => att.once('exit', r));
      }
    }
    assert.match(out, /Detached fs; synced/);
    assert.doesNotMatch(sh('losetup', ['-a']).out, new RegExp(`${dev}:`), 'the loop device is gone');
    // The volume itself, read back through the cluster, is a clean ext4 with the files.
    const img = join(dir, 'fs.img');
    await ok('torusctl', [...C, 'block', 'dump', 'fs', img]);
    must('e2fsck', ['-fn', img]);
  });
});

describe('the NBD server killed mid-write', () => {
  test('after a restart the volume holds its last flushed state and, of the writes after it, a prefix', async () => {
    await ok('torusctl', [...C, 'volume', 'create-block', 'kv', '64MiB']);
    const s = await serve();
    const uri = `nbd://127.0.0.1:${s.port}/kv`;
    // State A, flushed.
    must('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 8M', '-c', 'flush', uri]);
    // Then a stream of unflushed writes, killed part way.
    // Far more writes than can finish before the kill: qemu flushes when it closes a device, so
    // the writer must still be running (and unflushed) when the server dies.
    // (qemu-io's default cache mode is writethrough, a flush after every write: ask for writeback.)
    const writer = spawn('qemu-io', ['-f', 'raw', '-t', 'writeback', ...Array.from({ length: 4000 }, (_, i) => ['-c', `write -P 0x22 ${(i % 8) * MiB} 1M`]).flat(), uri], { stdio: 'ignore' });
    await new Promise((r) => setTimeout(r, 400));
    assert.equal(writer.exitCode, null, 'the writer was still writing when the server was killed');
    await stop(s, 'SIGKILL');
    writer.kill('SIGKILL');
    await revokeLock('kv'); // the dead server's lease would otherwise hold the lock for 15 s
    const s2 = await serve();
    try {
      const out = join(dir, 'kv.bin');
      must('nbdcopy', [`nbd://127.0.0.1:${s2.port}/kv`, out]);
      const got = readFileSync(out);
      // Unflushed writes may have reached the journal anyway (the server appends in the background
      // when its write cache fills); the next open replays what did, in order. The writer went
      // through the 8 MiB from the start, one write at a time: so 0x22 up to some point, 0x11
      // after it, and nothing else.
      const head = got.subarray(0, 8 * MiB);
      let cut = 0;
      while (cut < head.length && head[cut] === 0x22) cut++;
      const counts = new Map<number, number>();
      for (const b of head) counts.set(b, (counts.get(b) ?? 0) + 1);
      assert.ok(head.subarray(cut).equals(Buffer.alloc(8 * MiB - cut, 0x11)), `the flushed state, then a prefix of the writes after it; found bytes ${JSON.stringify([...counts])}, 0x22 up to ${cut}`);
      assert.ok(got.subarray(8 * MiB).equals(Buffer.alloc(56 * MiB)));
      console.log(`# ${cut} bytes of the unflushed writes were replayed`);
    } finally {
      await stop(s2);
    }
  });
});
