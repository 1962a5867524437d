import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer, type Server } from 'node:http';
import { createServer as createHttp2Server, type Http2Server } from 'node:http2';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { etcdMemberArgs } from '../../scripts/lib/etcd.js';
import { EtcdMetadata } from '../../src/metadata/etcd/etcd.js';
import { freePort, killProc, spawnEtcd, startEtcd, waitHealthy, type EtcdHandle, type EtcdProc } from '../helpers/etcd.js';
import { eventually, removeDir, runCli, type CliResult } from '../helpers/procs.js';

// Issue 13: every way of not reaching etcd is one line without gRPC's noise, and exit status 3,
// from each of the three programs: a dead port, an HTTP/2 server answering 404, an HTTP/1 server,
// and TLS that does not match (plain text to TLS, TLS to plain text, an unknown CA).

let dir: string;
let plain: EtcdHandle;
let tls: { proc: EtcdProc; endpoint: string } | undefined;
let h2: Http2Server;
let h1: Server;
let h2Port = 0;
let h1Port = 0;

function sh(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { encoding: 'utf8', cwd: dir });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
}

/** A CA and a server certificate for 127.0.0.1 signed by it, and a second CA nobody signed with. */
function makeCerts(): void {
  const key = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  sh('openssl', ['req', '-x509', ...key, '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '2', '-subj', '/CN=torus test CA']);
  sh('openssl', ['req', '-x509', ...key, '-keyout', 'other.key', '-out', 'other.crt', '-days', '2', '-subj', '/CN=another CA']);
  sh('openssl', ['req', ...key, '-keyout', 'server.key', '-out', 'server.csr', '-subj', '/CN=127.0.0.1']);
  writeFileSync(join(dir, 'san.ext'), 'subjectAltName=IP:127.0.0.1\n');
  sh('openssl', ['x509', '-req', '-in', 'server.csr', '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'server.crt', '-days', '2', '-extfile', 'san.ext']);
}

async function listen(s: Server | Http2Server): Promise<number> {
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  return (s.address() as AddressInfo).port;
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'torus-etcd-errors-'));
  plain = await startEtcd();
  h2 = createHttp2Server((_req, res) => {
    res.statusCode = 404;
    res.end('not here');
  });
  h2Port = await listen(h2);
  h1 = createHttpServer((_req, res) => {
    res.statusCode = 404;
    res.end('not here');
  });
  h1Port = await listen(h1);
  makeCerts();
  const clientPort = await freePort();
  const args = etcdMemberArgs({ name: 'tls', dataDir: join(dir, 'etcd'), clientPort, peerPort: await freePort() }).map((a) =>
    a === `http://127.0.0.1:${clientPort}` ? `https://127.0.0.1:${clientPort}` : a,
  );
  const endpoint = `127.0.0.1:${clientPort}`;
  const proc = spawnEtcd([...args, '--cert-file', join(dir, 'server.crt'), '--key-file', join(dir, 'server.key')]);
  tls = { proc, endpoint };
  await eventually('etcd with TLS answering', async () => {
    if (proc.proc.exitCode !== null) throw new Error(proc.output());
    return (await runCli('torusctl', ['-C', endpoint, '--etcd-ca-file', join(dir, 'ca.crt'), 'init'])).code === 0;
  });
});

after(async () => {
  h2?.close();
  h1?.close();
  if (tls) await killProc(tls.proc.proc);
  await plain?.stop();
  removeDir(dir);
});

function oneLineStatus3(r: CliResult, why: RegExp): void {
  assert.equal(r.code, 3, `exit status: ${r.stderr}`);
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, `one line: ${r.stderr}`);
  assert.match(lines[0]!, why);
  assert.doesNotMatch(lines[0]!, /UNAVAILABLE|UNIMPLEMENTED|DEADLINE|Resolution note|Last error/);
}

describe('etcd failures: one line, exit status 3', () => {
  test('an HTTP/2 server answering 404 where etcd should be', async () => {
    oneLineStatus3(await runCli('torusctl', ['-C', `127.0.0.1:${h2Port}`, 'list-peers']), /cannot reach etcd at http:\/\/127\.0\.0\.1:\d+ \(.*\): answered HTTP 404: not an etcd v3 endpoint$/);
  });

  test('an HTTP/1 server, and a port nobody listens on', async () => {
    oneLineStatus3(await runCli('torusctl', ['-C', `127.0.0.1:${h1Port}`, 'volume', 'list']), /: not an etcd v3 endpoint \(it does not speak gRPC\)$/);
    const dead = await freePort();
    oneLineStatus3(await runCli('torusctl', ['-C', `127.0.0.1:${dead}`, 'volume', 'list']), /: connection refused$/);
  });

  test('TLS: the right CA works; plain text to TLS, TLS to plain text and an unknown CA each fail in one line', async () => {
    const ca = join(dir, 'ca.crt');
    const r = await runCli('torusctl', ['-C', tls!.endpoint, '--etcd-ca-file', ca, 'init', '--view']);
    assert.equal(r.code, 0, r.stderr);
    oneLineStatus3(await runCli('torusctl', ['-C', tls!.endpoint, 'init', '--view']), /cannot reach etcd at http:\/\/127\.0\.0\.1:\d+ .*a TLS endpoint spoken to without TLS\?\)$/);
    oneLineStatus3(await runCli('torusctl', ['-C', plain.endpoint, '--etcd-ca-file', ca, 'init', '--view']), /cannot reach etcd at https:.*: TLS failed: /);
    oneLineStatus3(await runCli('torusctl', ['-C', tls!.endpoint, '--etcd-ca-file', join(dir, 'other.crt'), 'init', '--view']), /cannot reach etcd at https:.*: TLS failed: /);
  });

  test('torusd and torusblk say it the same way', async () => {
    const C = ['-C', `127.0.0.1:${h2Port}`];
    oneLineStatus3(await runCli('torusd', [...C, '--data-dir', join(dir, 'node'), '--size', '64MiB', '--peer-address', 'http://127.0.0.1:1']), /answered HTTP 404: not an etcd v3 endpoint$/);
    oneLineStatus3(await runCli('torusblk', [...C, 'nbdserve', '--listen', '127.0.0.1:0']), /answered HTTP 404: not an etcd v3 endpoint$/);
  });
});

test('a full etcd (NOSPACE) is one line with exit status 3, and the failure guide\'s recovery brings it back', async () => {
  const clientPort = await freePort();
  const endpoint = `127.0.0.1:${clientPort}`;
  const proc = spawnEtcd([...etcdMemberArgs({ name: 'full', dataDir: join(dir, 'full'), clientPort, peerPort: await freePort() }), '--quota-backend-bytes', String(2 * 1024 * 1024)]);
  const meta = new EtcdMetadata({ endpoints: [endpoint] });
  try {
    await waitHealthy(endpoint, proc.proc, proc.output);
    const big = 'x'.repeat(300_000);
    let full = '';
    for (let i = 0; i < 50 && !full; i++) {
      await meta.kv().txn([], [{ op: 'put', key: '/torus/test/big', value: `${i}${big}` }]).catch((e: Error) => (full = e.message));
    }
    assert.match(full, /^etcd is out of space \(transaction\): mvcc: database space exceeded; compact and defragment it/);
    oneLineStatus3(await runCli('torusctl', ['-C', endpoint, 'init']), /: etcd is out of space \(init\): mvcc: database space exceeded; compact and defragment it, then disarm the alarm/);
    // docs/failure-guide.md, "etcd out of space", word for word.
    const steps = [
      `rev=$(etcdctl --endpoints=${endpoint} endpoint status --write-out=json | grep -o '"revision":[0-9]*' | head -1 | cut -d: -f2)`,
      `etcdctl --endpoints=${endpoint} compact $rev`,
      `etcdctl --endpoints=${endpoint} defrag`,
      `etcdctl --endpoints=${endpoint} alarm disarm`,
    ].join(' && ');
    const r = spawnSync('sh', ['-c', steps], { encoding: 'utf8', env: { ...process.env, ETCDCTL_API: '3' } });
    assert.equal(r.status, 0, `${r.stdout}${r.stderr}`);
    assert.equal((await runCli('torusctl', ['-C', endpoint, 'init'])).code, 0);
  } finally {
    await meta.close();
    await killProc(proc.proc);
  }
});

