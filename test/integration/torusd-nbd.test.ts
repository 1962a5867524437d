import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { Cmd } from '../../src/nbd/codec.js';
import { testCerts } from '../helpers/certs.js';
import { ok as tool, rawClient, run } from '../helpers/nbd-tools.js';
import { freePort, startEtcd, type EtcdHandle } from '../helpers/etcd.js';
import { eventually, ok, removeDir, startNbdserve, startTorusd, stopProcess, type Torusd } from '../helpers/procs.js';

// Serving where the data is: `torusd --nbd-listen` exports the cluster's volumes from a storage
// node, with real NBD clients (nbdinfo, nbdcopy, qemu-img), a real etcd and three torusd at R=2.
// What it wrote reads back through `torusblk nbdserve` byte for byte, and after the serving
// torusd is killed (SIGKILL, right after a flush) the surviving replicas still have every byte.

const MiB = 1024 * 1024;
/** A volume's memory budgets, as torusd spells them, and what its metrics must then say. */
const BUDGET_FLAGS = ['--nbd-write-cache-size', '24MiB', '--nbd-journal-tail-size', '20MiB', '--nbd-page-cache-size', '3MiB', '--nbd-overlay-segments', '5000'];
const BUDGETS = { write_cache: 24 * MiB, journal_tail: 20 * MiB, page_cache: 3 * MiB };
let etcd: EtcdHandle;
let C: string[];
const nodes: Torusd[] = [];
let nbdPort = 0;
let dir: string;

/** `torusblk nbdserve` on a port of its own: a client process beside the cluster. */
async function torusblkServe(): Promise<{ proc: ChildProcess; uri: (vol: string) => string; out: () => string }> {
  const s = await startNbdserve(C);
  return { proc: s.proc, uri: (vol) => `nbd://127.0.0.1:${s.port}/${vol}`, out: s.out };
}

/** Reads a whole export into a file with nbdcopy, retrying while the volume is still locked by its last writer. */
async function readAll(uri: string, file: string, what: string): Promise<Buffer> {
  await eventually(what, async () => (await run('nbdcopy', [uri, file])).code === 0, 60_000);
  return readFileSync(file);
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'torusd-nbd-'));
  etcd = await startEtcd();
  C = ['-C', etcd.endpoint];
  await ok('torusctl', [...C, 'init', '--block-size', '128KiB', '--replication', '2']);
  nbdPort = await freePort();
  // Node 0 serves NBD; a short lock TTL lets another client take its volume soon after it dies.
  // Pooled buffers are poisoned when released (reply buffers among them): a reply whose buffer
  // went back to the pool before the socket had taken it reaches the clients as garbage.
  nodes.push(await startTorusd(etcd.endpoint, { size: '512MiB', env: { TORUS_POISON_BUFFERS: '1' }, extra: ['--nbd-listen', `127.0.0.1:${nbdPort}`, '--nbd-unix', join(dir, 'nbd.sock'), '--lock-ttl', '5s', ...BUDGET_FLAGS] }));
  for (let i = 1; i < 3; i++) nodes.push(await startTorusd(etcd.endpoint, { size: '512MiB' }));
  await ok('torusctl', [...C, 'peer', 'add', '--all-peers']);
  assert.match(nodes[0]!.log(), new RegExp(`serving NBD on nbd://127\\.0\\.0\\.1:${nbdPort}`));
});

after(async () => {
  await Promise.all(nodes.map((n) => n.kill()));
  for (const n of nodes) removeDir(n.dataDir);
  await etcd?.stop();
  removeDir(dir);
});

test('torusd --nbd-listen: nbdinfo sizes the export; nbdcopy and qemu-img write and read back; torusblk nbdserve reads the same bytes', async () => {
  await ok('torusctl', [...C, 'volume', 'create-block', 'v1', '64MiB']);
  const uri = `nbd://127.0.0.1:${nbdPort}/v1`;
  const info = JSON.parse(await tool('nbdinfo', ['--json', uri])) as { exports: { 'export-name': string; 'export-size': number }[] };
  assert.equal(info.exports[0]!['export-size'], 64 * MiB);
  // --list: every volume is an export; and on the unix socket too.
  assert.match(await tool('nbdinfo', ['--list', `nbd://127.0.0.1:${nbdPort}`]), /export="v1"/);
  assert.match(await tool('nbdinfo', [`nbd+unix:///v1?socket=${join(dir, 'nbd.sock')}`]), /export-size: 67108864/);

  // 24 MiB of random bytes at an unaligned offset, and back.
  const data = randomBytes(24 * MiB);
  const image = Buffer.alloc(64 * MiB);
  data.copy(image, 3 * MiB + 4096);
  const src = join(dir, 'src.img');
  writeFileSync(src, image);
  await tool('nbdcopy', ['--flush', src, uri]);
  const back = await readAll(uri, join(dir, 'back.img'), 'nbdcopy reading back through torusd');
  assert.ok(back.equals(image), 'read back through torusd');
  // qemu's client too: a pattern written with qemu-io, checked by qemu-img against the file.
  await tool('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5c 40M 1M', '-c', 'flush', uri]);
  image.fill(0x5c, 40 * MiB, 41 * MiB);
  writeFileSync(src, image);
  await tool('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri]);

  // The same bytes through a client beside the cluster, once torusd's export has let go of the volume.
  const blk = await torusblkServe();
  try {
    const viaClient = await readAll(blk.uri('v1'), join(dir, 'client.img'), 'torusblk nbdserve reading v1');
    assert.ok(viaClient.equals(image), 'the same bytes through torusblk');
  } finally {
    await stopProcess(blk.proc);
  }
  const metrics = await (await fetch(`http://127.0.0.1:${nodes[0]!.httpPort}/metrics`)).text();
  assert.match(metrics, /torus_nbd_handshakes_total [1-9]/, 'the NBD counters are on the node\'s /metrics');
  assert.match(metrics, /torus_volume_/, 'and the volumes\' I/O');
  assert.match(metrics, /^torus_client_read_cache_limit_bytes \d+/m, 'and the block cache beside its budget');
  assert.match(metrics, /^torus_malloc_free_bytes \d+/m, 'and what malloc keeps free');
  assert.match(metrics, /^torus_memory_returned_bytes_total \d+/m, 'and what went back to the kernel');

  // While a client holds v1 open for writing, each of its caches shows beside the budget its
  // --nbd-* flag set; an unflushed write sits in the write cache.
  let c: Awaited<ReturnType<typeof rawClient>> | undefined;
  await eventually('v1 open for writing through torusd again', async () => {
    const attempt = await rawClient(nbdPort);
    try {
      await attempt.go('v1');
      c = attempt;
      return true;
    } catch {
      attempt.disconnect();
      return false;
    }
  }, 60_000);
  try {
    assert.equal((await c!.write(0, randomBytes(8192))).error, 0);
    const text = await (await fetch(`http://127.0.0.1:${nodes[0]!.httpPort}/metrics`)).text();
    const gauge = (suffix: string, cache: string): number => Number(new RegExp(`^torus_volume_memory${suffix}_bytes\\{volume="v1",cache="${cache}"\\} (\\d+)`, 'm').exec(text)?.[1] ?? NaN);
    for (const [cache, limit] of Object.entries(BUDGETS)) assert.equal(gauge('_limit', cache), limit, `${cache} budget\n${text}`);
    assert.equal(gauge('', 'write_cache'), 8192, 'the unflushed write');
    assert.match(text, /^torus_volume_overlay_segments_limit\{volume="v1"\} 5000$/m);
    assert.equal((await c!.request(Cmd.FLUSH)).error, 0);
  } finally {
    c!.disconnect();
  }
});

test('torusd --nbd-tls require --nbd-read-only: plaintext is refused; a client certificate granted the volume reads it, read-only', async () => {
  // Another node serving NBD, with TLS from its --tls-certificates (its node certificate) and the
  // access rules in etcd; it need not be a ring member to serve.
  const port = await freePort();
  const extra = ['--nbd-listen', `127.0.0.1:${port}`, '--nbd-tls', 'require', '--nbd-read-only'];
  nodes.push(await startTorusd(etcd.endpoint, { size: '64MiB', extra }));
  const { clientDir } = await testCerts();
  const uri = `nbds://127.0.0.1:${port}/v1?tls-certificates=${clientDir}`;
  assert.notEqual((await run('nbdinfo', [`nbd://127.0.0.1:${port}/v1`])).code, 0, 'plaintext refused');
  assert.notEqual((await run('nbdinfo', [uri])).code, 0, 'no access granted yet');
  await ok('torusctl', [...C, 'access', 'grant', 'v1', 'test-client']);
  const info = await tool('nbdinfo', ['--json', uri]);
  assert.match(info, /"is_read_only": true/);
  assert.match(info, /"export-size": 67108864/);
  const small = join(dir, 'small.img');
  writeFileSync(small, randomBytes(MiB));
  const write = await run('nbdcopy', [small, uri]);
  assert.notEqual(write.code, 0, `a write to a read-only export: ${write.stdout}`);
});

test("a peer frozen during a sequential read: the serving node's reply buffers get the other replicas' bytes, and nothing the peer sends late", async () => {
  await ok('torusctl', [...C, 'volume', 'create-block', 'v3', '48MiB']);
  const uri = `nbd://127.0.0.1:${nbdPort}/v3`;
  const image = randomBytes(48 * MiB);
  const src = join(dir, 'v3.img');
  writeFileSync(src, image);
  await tool('nbdcopy', ['--flush', src, uri]);
  const metric = async (name: string): Promise<number> => {
    const text = await (await fetch(`http://127.0.0.1:${nodes[0]!.httpPort}/metrics`)).text();
    return Number(new RegExp(`^${name} (\\d+)`, 'm').exec(text)?.[1] ?? NaN);
  };
  // Read once through torusd first: it waits until the writer's connection has let the volume go.
  assert.ok((await readAll(uri, join(dir, 'v3-first.img'), 'nbdcopy reading v3')).equals(image));
  const fallbacks = await metric('torus_client_replica_fallbacks_total');
  const bypasses = await metric('torus_client_cache_bypasses_total');
  // A sequential read of blocks held elsewhere goes straight into the serving node's (poisoned)
  // reply buffers. Node 1 is frozen when it starts and resumes 4 s later: its GETs time out, the
  // other replica's bytes fill the same buffers, and its late replies must land nowhere.
  const peer = nodes[1]!.proc.pid!;
  process.kill(peer, 'SIGSTOP');
  const reading = run('nbdcopy', [uri, join(dir, 'v3-back.img')]);
  try {
    await new Promise((r) => setTimeout(r, 4000));
  } finally {
    process.kill(peer, 'SIGCONT');
  }
  const copy = await reading;
  assert.equal(copy.code, 0, `nbdcopy while a peer was frozen: ${JSON.stringify(copy)}`);
  assert.ok(readFileSync(join(dir, 'v3-back.img')).equals(image), 'every byte as written');
  // Once more with the peer awake (its late replies have arrived by now): still every byte.
  assert.ok((await readAll(uri, join(dir, 'v3-again.img'), 'nbdcopy reading v3 again')).equals(image));
  assert.ok((await metric('torus_client_cache_bypasses_total')) > bypasses, 'the reads were a stream the cache let by');
  assert.ok((await metric('torus_client_replica_fallbacks_total')) > fallbacks, 'the frozen peer\'s reads went to the other replica');
});

test('SIGKILL of the serving torusd after a flushed write: a torusblk client reads every byte from the surviving replicas', async (t) => {
  await ok('torusctl', [...C, 'volume', 'create-block', 'v2', '32MiB']);
  const data = randomBytes(8 * MiB);
  let killedAt = 0;
  const c = await rawClient(nbdPort);
  try {
    await c.go('v2');
    for (let off = 0; off < data.length; off += MiB) assert.equal((await c.write(5 * MiB + off, data.subarray(off, off + MiB))).error, 0);
    // Acknowledged only once R replicas have it on stable storage: it must survive what follows.
    assert.equal((await c.request(Cmd.FLUSH)).error, 0);
    // And a write after the flush that nobody flushed: it may or may not survive, but not corrupt anything.
    await c.write(20 * MiB, randomBytes(MiB));
    await nodes[0]!.kill('SIGKILL');
    killedAt = Date.now();
  } finally {
    c.disconnect();
  }
  const blk = await torusblkServe();
  try {
    // The lock the dead node held expires after its --lock-ttl (5 s); then torusblk opens the
    // volume, fences and replays its journal from the replicas that are left.
    const got = await readAll(blk.uri('v2'), join(dir, 'after-kill.img'), 'torusblk reading v2 after the serving node died');
    t.diagnostic(`read back through torusblk ${((Date.now() - killedAt) / 1000).toFixed(1)} s after the SIGKILL (lock TTL 5 s)`);
    assert.ok(got.subarray(5 * MiB, 13 * MiB).equals(data), 'every flushed byte');
    assert.ok(got.subarray(0, 5 * MiB).equals(Buffer.alloc(5 * MiB)), 'and zeros around it');
  } finally {
    await stopProcess(blk.proc);
  }
});
