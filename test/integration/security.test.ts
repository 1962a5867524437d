import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { createCa, issueCertificates, throwawayCertificate } from '../../src/cli/shared/certs.js';
import { encodeHello, encodePutBatch, MIN_MAX_FRAME_SIZE, PROTOCOL_VERSION } from '../../src/rpc/codec.js';
import { startCluster, dataRef, type TestCluster } from '../helpers/cluster.js';
import { testCerts } from '../helpers/certs.js';
import { freePort } from '../helpers/etcd.js';
import { BIN, eventually, ok, runCli, startTorusd } from '../helpers/procs.js';
import { have, run } from '../helpers/nbd-tools.js';

// The whole cluster as a stranger meets it (docs/security.md): torusd's peer port and nbdserve's
// NBD port answer nothing without a credential, and the access rules in etcd decide which client
// certificate opens which volume. Everything over TLS, as every test cluster runs.

let c: TestCluster;
let C: string[];
let caDir: string;
let clusterId: string;
let nbd: ChildProcess;
let nbdPort: number;
let nbdLog = '';

before(async () => {
  c = await startCluster({ nodes: 2, size: '128MiB' });
  C = ['-C', c.etcd.endpoint];
  ({ caDir } = await testCerts());
  for (const who of ['alice', 'bob', 'mallory']) await issueCertificates(caDir, who, { nbdOnly: true });
  clusterId = c.client.global.clusterId;
  await ok('torusctl', [...C, 'volume', 'create-block', 'vol', '16MiB']);
  await ok('torusctl', [...C, 'volume', 'create-block', 'other', '16MiB']);
  nbdPort = await freePort();
  // The server certificate comes from TORUS_TLS_CERTIFICATES, the test CA's (as --tls-certificates).
  nbd = spawn(process.execPath, [BIN('torusblk'), ...C, 'nbdserve', '--listen', `127.0.0.1:${nbdPort}`, '--tls', 'require'], { stdio: ['ignore', 'pipe', 'pipe'] });
  nbd.stdout?.on('data', (d: Buffer) => (nbdLog += d.toString()));
  nbd.stderr?.on('data', (d: Buffer) => (nbdLog += d.toString()));
  await eventually('nbdserve listening', async () => nbdLog.includes('serving NBD on') || (nbd.exitCode !== null ? Promise.reject(new Error(nbdLog)) : false));
});

after(async () => {
  nbd?.kill('SIGTERM');
  await c?.stop();
});

const uri = (vol: string, who: string): string => `nbds://127.0.0.1:${nbdPort}/${vol}?tls-certificates=${join(caDir, who)}`;

describe('NBD access rules in etcd', () => {
  test('torusctl access grant|list|revoke decide who opens which volume, read-write or read-only', { skip: have('nbdinfo') ? false : 'nbdinfo is not installed' }, async () => {
    // No rule, no access: even a certificate from the cluster CA opens nothing.
    assert.notEqual((await run('nbdinfo', [uri('vol', 'alice')])).code, 0);
    await ok('torusctl', [...C, 'access', 'grant', 'vol', 'alice']);
    await ok('torusctl', [...C, 'access', 'grant', 'vol', 'bob', '--read-only']);
    const list = JSON.parse(await ok('torusctl', [...C, 'access', 'list', '--json'])) as { volume: string; identity: string; mode: string }[];
    assert.deepEqual(list, [
      { volume: 'vol', identity: 'alice', mode: 'rw' },
      { volume: 'vol', identity: 'bob', mode: 'ro' },
    ]);
    assert.match((await run('nbdinfo', [uri('vol', 'alice')])).stdout, /is_read_only: false/);
    assert.match((await run('nbdinfo', [uri('vol', 'bob')])).stdout, /is_read_only: true/);
    assert.notEqual((await run('nbdinfo', [uri('vol', 'mallory')])).code, 0);
    assert.notEqual((await run('nbdinfo', [uri('other', 'alice')])).code, 0);
    // Data through it, byte-exact.
    const img = join(caDir, 'img');
    writeFileSync(img, randomBytes(1024 * 1024));
    // --flush: a read-only opener reads what was synced (VolumeProvider), not alice's write cache.
    const up = await run('nbdcopy', ['--flush', img, uri('vol', 'alice')]);
    assert.equal(up.code, 0, up.stderr);
    const back = join(caDir, 'back');
    assert.equal((await run('nbdcopy', [uri('vol', 'bob'), back])).code, 0);
    assert.ok(readFileSync(back).subarray(0, 1024 * 1024).equals(readFileSync(img)));
    await ok('torusctl', [...C, 'access', 'revoke', 'vol', 'alice']);
    assert.notEqual((await run('nbdinfo', [uri('vol', 'alice')])).code, 0);
    assert.match(nbdLog, /"identity":"mallory"[^\n]*not allowed this export/);
  });
});

/** What a stranger gets from torusd's peer port for a HELLO with the stolen cluster id and a PUT. */
async function peerProbe(port: number, how: 'plain' | { cert?: Buffer; key?: Buffer }): Promise<Buffer> {
  const s: net.Socket = how === 'plain' ? net.connect({ port, host: '127.0.0.1' }) : tls.connect({ port, host: '127.0.0.1', rejectUnauthorized: false, ...how });
  const got: Buffer[] = [];
  s.on('data', (d: Buffer) => got.push(d));
  s.on('error', () => {});
  await new Promise<void>((r) => {
    s.once(how === 'plain' ? 'connect' : 'secureConnect', () => r());
    s.once('close', () => r());
  });
  if (!s.destroyed) {
    s.write(encodeHello(1, { minVersion: 1, maxVersion: PROTOCOL_VERSION, maxFrameSize: MIN_MAX_FRAME_SIZE, uuid: 'stranger', clusterId, extensions: [] }));
    for (const p of encodePutBatch(2, [{ ref: dataRef(77, 0), data: Buffer.alloc(c.blockSize, 0xee) }])) s.write(p);
  }
  for (let i = 0; i < 100 && !s.destroyed; i++) await sleep(20);
  s.destroy();
  return Buffer.concat(got);
}

describe("torusd's peer port", () => {
  test('a stranger with no certificate, a self-signed one, another CA\'s or only the stolen cluster id stores nothing and learns nothing; the cluster goes on', async () => {
    const other = join(caDir, '..', `other-ca-${process.pid}`);
    await createCa(other);
    const foreign = await issueCertificates(other, 'node');
    const self = await throwawayCertificate();
    const alice = join(caDir, 'alice');
    const ways: ('plain' | { cert?: Buffer; key?: Buffer })[] = [
      'plain',
      {},
      self,
      // an NBD client's certificate from the cluster's own CA
      { cert: readFileSync(join(alice, 'client-cert.pem')), key: readFileSync(join(alice, 'client-key.pem')) },
      { cert: readFileSync(join(foreign.dir, 'client-cert.pem')), key: readFileSync(join(foreign.dir, 'client-key.pem')) },
    ];
    for (const n of c.nodes)
      for (const how of ways) {
        const answer = await peerProbe(n.peerPort, how);
        assert.ok(!answer.includes(Buffer.from(clusterId)), 'the answer holds the cluster id');
      }
    assert.deepEqual(await c.copies([dataRef(77, 0)]), [0], 'a stranger stored a block');
    // The legitimate client, and the CLI, still work.
    const ref = dataRef(78, 0);
    const data = randomBytes(c.blockSize);
    await c.client.distributor.putBlock(ref, data);
    assert.ok((await c.client.distributor.getBlock(ref)).equals(data));
    assert.match(await ok('torusctl', [...C, 'list-peers']), /OK|Avail|Member/i);
    for (const n of c.nodes) assert.match(n.log(), /TLS handshake failed/);
    for (const n of c.nodes) assert.match(n.log(), /names no uuid: it is for NBD only/);
  });

  test('torusctl and torusd refuse to run peer RPC without a credential, in one line', async () => {
    const env = { TORUS_TLS_CERTIFICATES: '' };
    const r = await runCli('torusctl', [...C, 'block', 'dump', 'vol', '/dev/null'], { env });
    assert.equal(r.code, 10, r.stderr);
    assert.match(r.stderr, /^torusctl: peer RPC needs a credential: --tls-certificates DIR/m);
    assert.equal(r.stderr.trim().split('\n').length, 1);
  });
});

test('torusctl cert: keys 0600 in directories 0700, whatever the umask', async () => {
  const dir = join(caDir, '..', `umask-${process.pid}`);
  const old = process.umask(0o000);
  try {
    await ok('torusctl', ['cert', 'init', dir]);
    await ok('torusctl', ['cert', 'issue', dir, 'n1']);
  } finally {
    process.umask(old);
  }
  const mode = (p: string): number => statSync(p).mode & 0o777;
  assert.equal(mode(dir), 0o700);
  assert.equal(mode(join(dir, 'ca-key.pem')), 0o600);
  assert.equal(mode(join(dir, 'n1')), 0o700);
  for (const f of ['server-key.pem', 'client-key.pem']) assert.equal(mode(join(dir, 'n1', f)), 0o600);
  for (const f of ['ca-cert.pem', 'server-cert.pem', 'client-cert.pem']) assert.equal(mode(join(dir, 'n1', f)), 0o644);
});

describe('data at rest', () => {
  test('block and table files 0600 in directories 0700 under the usual umask; a data dir opened up is reported at start', async () => {
    const old = process.umask(0o022);
    try {
      const n = c.nodes[1]!;
      const mode = (p: string): number => statSync(p).mode & 0o777;
      const seen: string[] = [];
      const walk = (dir: string): void => {
        for (const e of readdirSync(dir, { withFileTypes: true })) {
          const p = join(dir, e.name);
          seen.push(p);
          if (e.isDirectory()) {
            assert.equal(mode(p), 0o700, p);
            walk(p);
          } else if (!e.name.endsWith('.lock')) assert.equal(mode(p) & 0o077, 0, `${p} is mode ${mode(p).toString(8)}`);
        }
      };
      walk(n.dataDir);
      assert.ok(seen.some((p) => p.includes('block')), seen.join(' '));
      assert.doesNotMatch(n.log(), /open to other users/);
      chmodSync(n.dataDir, 0o755);
      await c.kill(1);
      await c.restart(1);
      assert.match(c.nodes[1]!.log(), /data dir [^\n]* is open to other users: chmod -R go-rwx/);
      chmodSync(n.dataDir, 0o700);
    } finally {
      process.umask(old);
    }
  });
});

test("torusd's HTTP endpoints (/metrics, /healthz, /v1/status, /v1/cluster) hold no credential: no key, no secret, not even the cluster id", async () => {
  const keys = ['client-key.pem', 'server-key.pem'].map((f) => readFileSync(join(caDir, 'alice', f), 'utf8'));
  for (const path of ['/metrics', '/healthz', '/v1/status', '/v1/cluster', '/']) {
    const body = await (await fetch(`http://127.0.0.1:${c.nodes[0]!.httpPort}${path}`)).text();
    assert.ok(body.length > 0, path);
    assert.ok(!body.includes(clusterId), `${path} shows the cluster id`);
    assert.doesNotMatch(body, /PRIVATE KEY/);
    for (const k of keys) assert.ok(!body.includes(k.split('\n')[1]!), path);
  }
});

test("a node's certificate names its uuid: a fresh data dir takes it, and a data dir holding another node refuses to start", async () => {
  const first = await issueCertificates(caDir, 'solo');
  const n = await startTorusd(c.etcd.endpoint, { extra: ['--tls-certificates', first.dir] });
  try {
    assert.equal(JSON.parse(readFileSync(join(n.dataDir, 'node.json'), 'utf8')).uuid, first.uuid);
  } finally {
    await n.kill('SIGKILL');
  }
  const other = await issueCertificates(caDir, 'solo2');
  const r = await runCli('torusd', [...C, '--tls-certificates', other.dir, '--peer-address', 'http://127.0.0.1:1', '--data-dir', n.dataDir]);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, new RegExp(`torusd: the node certificate names node ${other.uuid}, but data dir .* is node ${first.uuid}: issue this node's with torusctl cert issue CA-DIR NAME --uuid ${first.uuid}`));
});
