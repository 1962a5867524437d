import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it, type TestContext } from 'node:test';
import { Cmd, Errno, IHAVEOPT, Opt, Rep, encodeRequest } from '../../src/nbd/codec.js';
import { have, ok, rawClient, run, sha256File, startMemoryServer, type NbdServerProcess } from '../helpers/nbd-tools.js';

// Our NBD server against clients we did not write: libnbd (nbdinfo, nbdcopy), qemu (qemu-img,
// qemu-io) and fio's nbd engine, each run under `timeout`. The server runs MemoryDevices in a
// child process (test/helpers/nbd-memory-server.ts), on a loopback port and a unix socket.

const MiB = 1024 * 1024;
const EXPORTS = ['copy=64MiB', 'copy4=64MiB', 'map=16MiB', 'qemu=64MiB', 'io=16MiB', 'fio=64MiB', 'busy=64MiB', 'ro=1MiB:ro'];

let srv: NbdServerProcess;
let dir: string;

/** Skips the test (with the reason) unless every binary is installed. */
function need(t: TestContext, ...bins: string[]): boolean {
  const missing = bins.filter((b) => !have(b));
  if (missing.length) t.skip(`not installed: ${missing.join(', ')}`);
  return missing.length === 0;
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'nbd-clients-'));
  srv = await startMemoryServer([...EXPORTS.flatMap((e) => ['--export', e]), '--unix', join(dir, 'nbd.sock'), '--verbose']);
});

after(async () => {
  const code = await srv.stop();
  // NBD_TEST_LOG=path keeps the server's log for a look at what the clients did
  if (process.env.NBD_TEST_LOG) writeFileSync(process.env.NBD_TEST_LOG, srv.log());
  rmSync(dir, { recursive: true, force: true });
  assert.equal(code, 0, `server exit code; its log:\n${srv.log().slice(-4000)}`);
  // warnings mean a bug on our side (a handler that threw, a failed release), whatever clients did
  const warnings = srv.log().split('\n').filter((l) => l.startsWith('warn '));
  assert.deepEqual(warnings, []);
});

describe('libnbd: nbdinfo', () => {
  it('--json shows structured replies, every capability, base:allocation and the block size constraints', async (t) => {
    if (!need(t, 'nbdinfo')) return;
    const info = JSON.parse(await ok('nbdinfo', ['--json', srv.uri('copy')], { timeoutSec: 20 })) as {
      protocol: string;
      structured: boolean;
      exports: Record<string, unknown>[];
    };
    assert.equal(info.protocol, 'newstyle-fixed');
    assert.equal(info.structured, true);
    const e = info.exports[0];
    assert.ok(e);
    assert.equal(e['export-name'], 'copy');
    assert.equal(e['export-size'], 64 * MiB);
    assert.deepEqual(e.contexts, ['base:allocation']);
    for (const cap of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_cache', 'can_multi_conn', 'can_df'])
      assert.equal(e[cap], true, cap);
    assert.equal(e.is_read_only, false);
    assert.equal(e.block_size_minimum, 1);
    assert.equal(e.block_size_preferred, 64 * 1024);
    assert.equal(e.block_size_maximum, 32 * MiB);
    assert.equal(e.description, 'memory device copy');

    const ro = JSON.parse(await ok('nbdinfo', ['--json', srv.unixUri('ro')], { timeoutSec: 20 })) as { exports: Record<string, unknown>[] };
    assert.equal(ro.exports[0]?.is_read_only, true);
    for (const cap of ['can_trim', 'can_zero', 'can_fua']) assert.equal(ro.exports[0]?.[cap], false, cap);
  });

  it('--can and --is answer per export (exit 0 = yes, 2 = no)', async (t) => {
    if (!need(t, 'nbdinfo')) return;
    for (const cap of ['flush', 'fua', 'trim', 'zero', 'fast-zero', 'cache', 'multi-conn', 'df', 'structured-reply'])
      assert.equal((await run('nbdinfo', ['--can', cap, srv.uri('copy')], { timeoutSec: 20 })).code, 0, `can ${cap}`);
    assert.equal((await run('nbdinfo', ['--can', 'trim', srv.uri('ro')], { timeoutSec: 20 })).code, 2);
    assert.equal((await run('nbdinfo', ['--is', 'read-only', srv.uri('ro')], { timeoutSec: 20 })).code, 0);
    assert.equal((await run('nbdinfo', ['--is', 'read-only', srv.uri('copy')], { timeoutSec: 20 })).code, 2);
    assert.equal((await run('nbdinfo', ['--is', 'rotational', srv.uri('copy')], { timeoutSec: 20 })).code, 2);
  });

  it('--list names every export over TCP and over the unix socket; an unknown export is refused', async (t) => {
    if (!need(t, 'nbdinfo')) return;
    for (const uri of [`nbd://127.0.0.1:${srv.port}/`, srv.unixUri('')]) {
      const list = JSON.parse(await ok('nbdinfo', ['--list', '--json', uri], { timeoutSec: 20 })) as { exports: { 'export-name': string }[] };
      assert.deepEqual(list.exports.map((e) => e['export-name']).sort(), EXPORTS.map((e) => e.split('=')[0]).sort());
    }
    const bad = await run('nbdinfo', [srv.uri('no-such-export')], { timeoutSec: 20 });
    assert.notEqual(bad.code, 0);
    assert.match(bad.stderr, /unknown|not available|export/i);
  });

  it('--map shows the holes of a sparse device, and trims and zeroes as they change it', async (t) => {
    if (!need(t, 'nbdinfo', 'qemu-io')) return;
    const uri = srv.uri('map');
    assert.equal((await ok('nbdinfo', ['--map', '--json', uri], { timeoutSec: 20 })).replace(/\s+/g, ''), JSON.stringify([{ offset: 0, length: 16 * MiB, type: 3, description: 'hole,zero' }]));
    await ok('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 1M 1M', '-c', 'write -P 0x22 5M 512k', '-c', 'write -P 0x33 8M 2M', '-c', 'discard 8M 1M', '-c', 'write -z 12M 1M', uri], { timeoutSec: 30 });
    const map = JSON.parse(await ok('nbdinfo', ['--map', '--json', uri], { timeoutSec: 20 })) as { offset: number; length: number; type: number }[];
    assert.deepEqual(
      map.map((m) => [m.offset / 1024, m.length / 1024, m.type]),
      [
        [0, 1024, 3],
        [1024, 1024, 0],
        [2048, 3072, 3],
        [5120, 512, 0],
        [5632, 3584, 3], // 5.5M..9M: hole, including the discarded first half of the 8M write
        [9216, 1024, 0],
        [10240, 2048, 3],
        [12288, 1024, 2], // qemu's write -z asks for NO_HOLE: allocated zeroes
        [13312, 3072, 3],
      ],
    );
    // the same through the totals view
    const totals = JSON.parse(await ok('nbdinfo', ['--map', '--totals', '--json', uri], { timeoutSec: 20 })) as { size: number; type: number }[];
    assert.equal(totals.find((x) => x.type === 0)?.size, 2.5 * MiB);
  });
});

describe('libnbd: nbdcopy', () => {
  let src: string;
  let srcSum: string;
  before(() => {
    src = join(dir, 'random.img');
    writeFileSync(src, randomBytes(64 * MiB));
  });
  before(async () => {
    srcSum = await sha256File(src);
  });

  it('copies 64 MiB of random data in and back out unchanged', async (t) => {
    if (!need(t, 'nbdcopy')) return;
    await ok('nbdcopy', ['--connections=1', src, srv.uri('copy')], { timeoutSec: 60 });
    const back = join(dir, 'back.img');
    await ok('nbdcopy', ['--connections=1', srv.uri('copy'), back], { timeoutSec: 60 });
    assert.equal(await sha256File(back), srcSum);
    rmSync(back);
  });

  it('does the same over 4 connections at once (multi-conn), mixing TCP and the unix socket', async (t) => {
    if (!need(t, 'nbdcopy')) return;
    await ok('nbdcopy', ['--connections=4', '--requests=16', src, srv.unixUri('copy4')], { timeoutSec: 60 });
    const back = join(dir, 'back4.img');
    await ok('nbdcopy', ['--connections=4', srv.uri('copy4'), back], { timeoutSec: 60 });
    assert.equal(await sha256File(back), srcSum);
    // export to export, both ends ours
    await ok('nbdcopy', ['--connections=4', srv.uri('copy4'), srv.uri('busy')], { timeoutSec: 60 });
    const again = join(dir, 'again.img');
    await ok('nbdcopy', [srv.uri('busy'), again], { timeoutSec: 60 });
    assert.equal(await sha256File(again), srcSum);
    rmSync(back);
    rmSync(again);
  });
});

describe('qemu', () => {
  it('qemu-img converts a qcow2 image into the export and compares it identical', async (t) => {
    if (!need(t, 'qemu-img', 'qemu-io')) return;
    const qcow = join(dir, 'src.qcow2');
    await ok('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '64M'], { timeoutSec: 20 });
    await ok('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 3M', '-c', 'write -P 0xa5 10M 512k', '-c', 'write -P 0x77 40M 4M', '-c', 'write -z 50M 1M', qcow], {
      timeoutSec: 30,
    });
    await ok('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow, srv.uri('qemu')], { timeoutSec: 60 });
    const cmp = await ok('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow, `nbd:127.0.0.1:${srv.port}:exportname=qemu`], { timeoutSec: 60 });
    assert.match(cmp, /Images are identical/);
    // and the other way: the export converted back out matches too
    const out = join(dir, 'out.raw');
    await ok('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', srv.uri('qemu'), out], { timeoutSec: 60 });
    assert.match(await ok('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow, out], { timeoutSec: 60 }), /Images are identical/);
    rmSync(out);
    rmSync(qcow);
  });

  it('qemu-io: pattern writes and reads, discard, write -z, aio with flush, FUA', async (t) => {
    if (!need(t, 'qemu-io')) return;
    const cmds = [
      'write -P 0xab 0 1M',
      'read -P 0xab 0 1M',
      'write -P 0xcd 1M 1M',
      'discard 1M 1M',
      'read -P 0 1M 1M',
      'write -P 0xee 3M 64k',
      'write -z 3M 64k',
      'read -P 0 3M 64k',
      'write -z -u 4M 2M',
      'read -P 0 4M 2M',
      'aio_write -P 0x42 8M 256k',
      'aio_write -P 0x43 9M 256k',
      'aio_flush',
      'read -P 0x42 8M 256k',
      'read -P 0x43 9M 256k',
      'write -f -P 0x99 12M 4k',
      'read -P 0x99 12M 4k',
      'flush',
      'read -v 0 16',
    ];
    const out = await ok('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), srv.uri('io')], { timeoutSec: 60 });
    assert.doesNotMatch(out, /fail|error|mismatch/i, out);
    assert.match(out, /00000000: {2}ab ab ab ab/);
  });

  it('qemu-io: reading or writing beyond the end fails, and the export is still fine after', async (t) => {
    if (!need(t, 'qemu-io')) return;
    const past = await run('qemu-io', ['-f', 'raw', '-c', 'read 16M 4k', srv.uri('io')], { timeoutSec: 30 });
    assert.match(past.stdout + past.stderr, /read failed/i);
    const wpast = await run('qemu-io', ['-f', 'raw', '-c', 'write 16380k 8k', srv.uri('io')], { timeoutSec: 30 });
    assert.match(wpast.stdout + wpast.stderr, /write failed/i);
    const ro = await run('qemu-io', ['-f', 'raw', '-c', 'write 0 4k', srv.uri('ro')], { timeoutSec: 30 });
    // qemu sees READ_ONLY in the transmission flags and refuses to open the export for writing
    assert.notEqual(ro.code, 0);
    assert.match(ro.stdout + ro.stderr, /Permission denied|read-only|write failed/i);
    await ok('qemu-io', ['-f', 'raw', '-c', 'read -P 0xab 0 1M', srv.uri('io')], { timeoutSec: 30 });
  });
});

describe('fio --ioengine=nbd', () => {
  interface FioJob {
    jobname: string;
    error: number;
    read: { io_bytes: number };
    write: { io_bytes: number };
  }
  async function fio(name: string, args: string[]): Promise<FioJob[]> {
    // fio's nbd engine prints libnbd messages to stdout, so JSON goes to a file of its own
    const outFile = join(dir, `${name}.json`);
    const r = await run('fio', [`--name=${name}`, '--ioengine=nbd', `--uri=${srv.uri('fio')}`, `--output=${outFile}`, '--output-format=json', '--verify_state_save=0', ...args], { timeoutSec: 90 });
    const text = readFileSync(outFile, 'utf8');
    assert.equal(r.code, 0, `fio exited ${r.code}\n${r.stdout}\n${r.stderr}\n${text}`);
    // fio may put non-JSON notes before the object
    return (JSON.parse(text.slice(text.indexOf('{'))) as { jobs: FioJob[] }).jobs;
  }

  it('random 4k writes with crc32c verify, 2 jobs on disjoint halves, iodepth 16', async (t) => {
    if (!need(t, 'fio')) return;
    const jobs = await fio('randverify', ['--rw=randwrite', '--bs=4k', '--size=16M', '--offset_increment=32M', '--numjobs=2', '--iodepth=16', '--verify=crc32c', '--do_verify=1']);
    assert.equal(jobs.length, 2);
    for (const j of jobs) {
      assert.equal(j.error, 0);
      assert.equal(j.write.io_bytes, 16 * MiB);
      assert.equal(j.read.io_bytes, 16 * MiB, 'everything written was read back and verified');
    }
  });

  it('sequential 1M writes with verify, and a mixed random read/write job', async (t) => {
    if (!need(t, 'fio')) return;
    const seq = await fio('seqverify', ['--rw=write', '--bs=1M', '--size=48M', '--iodepth=8', '--verify=crc32c']);
    assert.equal(seq[0]?.error, 0);
    assert.equal(seq[0]?.read.io_bytes, 48 * MiB);
    const mixed = await fio('mixed', ['--rw=randrw', '--bs=64k', '--size=32M', '--numjobs=2', '--offset_increment=32M', '--iodepth=8', '--io_size=32M']);
    for (const j of mixed) {
      assert.equal(j.error, 0);
      assert.ok(j.read.io_bytes > 0 && j.write.io_bytes > 0);
    }
  });
});

describe('a hostile raw-socket client next to real ones', () => {
  it('garbage, bad options, huge lengths, bad requests and hang-ups do not disturb nbdcopy or qemu-io', async (t) => {
    if (!need(t, 'nbdcopy', 'qemu-io')) return;
    const src = join(dir, 'busy-src.img');
    writeFileSync(src, randomBytes(32 * MiB));
    const srcSum = await sha256File(src);
    // the good clients: a 2-connection copy in and out, and a qemu-io pattern run, in parallel
    const good = (async () => {
      await ok('nbdcopy', ['--connections=2', src, srv.uri('busy')], { timeoutSec: 90 });
      const back = join(dir, 'busy-back.img');
      await ok('nbdcopy', ['--connections=2', srv.uri('busy'), back], { timeoutSec: 90 });
      const head = readFileSync(back).subarray(0, 32 * MiB);
      writeFileSync(back, head);
      return sha256File(back);
    })();
    const goodIo = ok('qemu-io', ['-f', 'raw', ...Array.from({ length: 30 }, (_, i) => ['-c', `write -P ${i + 1} ${i}M 1M`, '-c', `read -P ${i + 1} ${i}M 1M`]).flat(), srv.uri('fio')], {
      timeoutSec: 90,
    });

    const closedBy = async (what: string, fn: (c: Awaited<ReturnType<typeof rawClient>>) => Promise<void>): Promise<void> => {
      const c = await rawClient(srv.port);
      await fn(c);
      await c.closed;
      assert.ok(c.isClosed, what);
    };
    const attacks: Promise<void>[] = [];
    for (let round = 0; round < 5; round++) {
      attacks.push(
        closedBy('garbage handshake', async (c) => {
          await c.handshake();
          c.raw(randomBytes(4096));
        }),
        closedBy('garbage magic in transmission', async (c) => {
          await c.go('busy');
          c.raw(Buffer.concat([Buffer.from([0x25, 0x60, 0x95, 0x14]), Buffer.from(' not a request')]));
        }),
        closedBy('4 GiB option', async (c) => {
          await c.handshake();
          const h = Buffer.alloc(16);
          h.writeBigUInt64BE(IHAVEOPT, 0);
          h.writeUInt32BE(Opt.INFO, 8);
          h.writeUInt32BE(0xffffffff, 12);
          c.raw(h);
        }),
        closedBy('WRITE over the maximum', async (c) => {
          await c.go('busy');
          c.raw(encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 1n, offset: 0, length: 64 * MiB }));
        }),
        closedBy('unknown client flags', async (c) => {
          await c.handshake(0xffff);
        }),
        (async () => {
          // half a WRITE, then hang up
          const c = await rawClient(srv.port);
          await c.go('busy');
          const [h] = encodeRequest({ flags: 0, command: Cmd.WRITE, handle: 1n, offset: 0, length: 1 * MiB });
          c.raw([h!, Buffer.alloc(1000)]);
          c.stream.destroy();
          await c.closed;
        })(),
        (async () => {
          // recoverable mistakes: the connection stays up and correct
          const c = await rawClient(srv.port);
          await c.handshake();
          for (let i = 0; i < 10; i++) assert.equal((await c.option(0x1000 + i, randomBytes(64))).at(-1)?.replyType, Rep.ERR_UNSUP);
          await c.structuredReplies();
          await c.info('ro', [], true);
          assert.equal((await c.read(1 * MiB, 1)).error, Errno.EINVAL, 'past the end');
          assert.equal((await c.read(0, 0xffffffff)).error, Errno.EINVAL, 'over the maximum');
          assert.equal((await c.request(77, { offset: 0, length: 1 })).error, Errno.EINVAL, 'unknown command');
          assert.equal((await c.write(0, Buffer.alloc(512))).error, Errno.EPERM, 'read-only');
          assert.equal((await c.request(Cmd.BLOCK_STATUS, { offset: 0, length: 1 * MiB })).error, Errno.EINVAL, 'no context selected');
          assert.equal((await c.read(0, 4096)).data?.length, 4096);
          c.disconnect();
          await c.closed;
        })(),
      );
    }
    await Promise.all(attacks);
    assert.equal(await good, srcSum);
    assert.doesNotMatch(await goodIo, /fail|mismatch/i);
    // the server is still up and serving
    assert.equal(srv.proc.exitCode, null);
    if (have('nbdinfo')) await ok('nbdinfo', ['--size', srv.uri('busy')], { timeoutSec: 20 });
    rmSync(src);
  });
});
