import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import { after, before, describe, it, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { createCa, issueCertificates, throwawayCertificate } from '../../src/cli/shared/certs.js';
import { IHAVEOPT, Opt } from '../../src/nbd/codec.js';
import { have, ok, run, startMemoryServer, type NbdServerProcess } from '../helpers/nbd-tools.js';

// NBD over TLS (STARTTLS) with the real clients: libnbd (nbdinfo, nbdcopy, nbdfuse) with
// nbds:// URIs, qemu-img and qemu-io with tls-creds objects, nbd-client's TLS options; X.509
// with client certificates checked, and PSK. Per-export access: alice may write "disk", bob
// only read it, nobody "secret". And what strangers get: nothing.

const MiB = 1024 * 1024;
let dir: string;
let ca: string;
let x509: NbdServerProcess;
let psk: NbdServerProcess;
const pskFile = (): string => join(dir, 'keys.psk');

function need(t: TestContext, ...bins: string[]): boolean {
  const missing = bins.filter((b) => !have(b));
  if (missing.length) t.skip(`not installed: ${missing.join(', ')}`);
  return missing.length === 0;
}

const certs = (who: string): string => join(ca, who);
const uri = (s: NbdServerProcess, exp: string, who: string): string => `nbds://127.0.0.1:${s.port}/${exp}?tls-certificates=${certs(who)}`;
const qemuOpts = (s: NbdServerProcess, exp: string, who: string): string[] => [
  '--object',
  `tls-creds-x509,id=tls0,dir=${certs(who)},endpoint=client`,
  '--image-opts',
  `driver=nbd,host=127.0.0.1,port=${s.port},export=${exp},tls-creds=tls0`,
];

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'nbd-tls-'));
  ca = join(dir, 'ca');
  await createCa(ca);
  await issueCertificates(ca, 'server');
  for (const who of ['alice', 'bob', 'mallory']) await issueCertificates(ca, who, { nbdOnly: true });
  await createCa(join(dir, 'other'));
  await issueCertificates(join(dir, 'other'), 'alice'); // another CA's "alice"
  writeFileSync(pskFile(), `carol:${randomBytes(32).toString('hex')}\n`, { mode: 0o600 });
  const allow = ['alice=disk:rw', 'bob=disk:ro', 'alice=copy:rw', 'alice=fuse:rw'].flatMap((a) => ['--allow', a]);
  x509 = await startMemoryServer([
    ...['disk=16MiB', 'copy=16MiB', 'fuse=8MiB', 'secret=1MiB'].flatMap((e) => ['--export', e]),
    '--tls', 'require', '--tls-certificates', certs('server'), ...allow, '--verbose',
  ]);
  psk = await startMemoryServer(['--export', 'disk=8MiB', '--tls', 'require', '--tls-psk-file', pskFile(), '--allow', 'carol=disk:rw', '--verbose']);
});

after(async () => {
  const codes = [await x509.stop(), await psk.stop()];
  rmSync(dir, { recursive: true, force: true });
  assert.deepEqual(codes, [0, 0], `server logs:\n${x509.log().slice(-3000)}`);
  const warnings = [...x509.log().split('\n'), ...psk.log().split('\n')].filter((l) => l.startsWith('warn '));
  assert.deepEqual(warnings, []);
});

describe('real clients over TLS', () => {
  it('nbdinfo: nbds:// with a client certificate; read-only for a client granted only that; only allowed exports listed', async (t) => {
    if (!need(t, 'nbdinfo')) return;
    const a = await ok('nbdinfo', ['--json', uri(x509, 'disk', 'alice')]);
    assert.match(a, /"TLS": true|"protocol": "newstyle-fixed"/);
    assert.match(a, /"is_read_only": false/);
    assert.match(await ok('nbdinfo', ['--json', uri(x509, 'disk', 'bob')]), /"is_read_only": true/);
    const list = await ok('nbdinfo', ['--list', '--json', uri(x509, '', 'alice')]);
    assert.match(list, /"export-name": "disk"/);
    assert.doesNotMatch(list, /secret/);
  });

  it('nbdcopy: 8 MiB up and back down over TLS, byte-exact', async (t) => {
    if (!need(t, 'nbdcopy')) return;
    const src = join(dir, 'src.img');
    const back = join(dir, 'back.img');
    writeFileSync(src, randomBytes(8 * MiB));
    await ok('nbdcopy', [src, uri(x509, 'copy', 'alice')]);
    await ok('nbdcopy', [uri(x509, 'copy', 'alice'), back]);
    // the export is 16 MiB: the first 8 are the file
    assert.ok(readFileSync(back).subarray(0, 8 * MiB).equals(readFileSync(src)));
  });

  it('qemu-img and qemu-io with a tls-creds-x509 object: info, write and read back; bob cannot write', async (t) => {
    if (!need(t, 'qemu-img', 'qemu-io')) return;
    assert.match(await ok('qemu-img', ['info', ...qemuOpts(x509, 'disk', 'alice')]), /virtual size: 16 MiB/);
    const io = await ok('qemu-io', [...qemuOpts(x509, 'disk', 'alice'), '-c', 'write -P 0x5a 1M 1M', '-c', 'read -P 0x5a 1M 1M']);
    assert.match(io, /read 1048576\/1048576 bytes/);
    const bob = await run('qemu-io', [...qemuOpts(x509, 'disk', 'bob'), '-c', 'write -P 0x11 1M 4k']);
    assert.notEqual(bob.code, 0, `bob wrote: ${bob.stdout}${bob.stderr}`);
    assert.match(await ok('qemu-io', [...qemuOpts(x509, 'disk', 'bob'), '-r', '-c', 'read -P 0x5a 1M 1M']), /read 1048576\/1048576/);
  });

  it('PSK: nbdinfo with tls-psk-file and qemu-img with tls-creds-psk; a wrong key gets nothing', async (t) => {
    if (!need(t, 'nbdinfo', 'qemu-img')) return;
    assert.match(await ok('nbdinfo', [`nbds://carol@127.0.0.1:${psk.port}/disk?tls-psk-file=${pskFile()}`]), /export-size: 8388608/);
    const qdir = join(dir, 'qemu-psk');
    mkdirSync(qdir, { mode: 0o700 });
    writeFileSync(join(qdir, 'keys.psk'), readFileSync(pskFile()), { mode: 0o600 });
    const q = await ok('qemu-img', ['info', '--object', `tls-creds-psk,id=tls0,dir=${qdir},username=carol,endpoint=client`, '--image-opts', `driver=nbd,host=127.0.0.1,port=${psk.port},export=disk,tls-creds=tls0`]);
    assert.match(q, /virtual size: 8 MiB/);
    const wrong = join(dir, 'wrong.psk');
    writeFileSync(wrong, `carol:${randomBytes(32).toString('hex')}\n`, { mode: 0o600 });
    const r = await run('nbdinfo', [`nbds://carol@127.0.0.1:${psk.port}/disk?tls-psk-file=${wrong}`]);
    assert.notEqual(r.code, 0);
    assert.doesNotMatch(r.stdout, /export-size/);
  });

  it('nbdfuse over nbds://: the export as a file, written and read back through FUSE', async (t) => {
    if (!need(t, 'nbdfuse', 'unshare', 'cmp') || !existsSync('/dev/fuse')) return;
    // nbdfuse takes no tls-certificates in its URI ("local file access is not allowed"); libnbd
    // then reads root's default directory, /etc/pki/libnbd. It is laid over /etc in a mount
    // namespace of its own, so nothing outside this test sees it.
    const work = join(dir, 'fuse-ns');
    for (const d of ['upper/pki', 'work', 'mnt']) mkdirSync(join(work, d), { recursive: true });
    await ok('cp', ['-r', certs('alice'), join(work, 'upper', 'pki', 'libnbd')]);
    await ok('dd', ['if=/dev/urandom', `of=${join(work, 'blk')}`, 'bs=64k', 'count=4', 'status=none']);
    const script = [
      'set -e',
      `mount -t overlay overlay -o lowerdir=/etc,upperdir=${work}/upper,workdir=${work}/work /etc`,
      `nbdfuse ${work}/mnt/disk nbds://127.0.0.1:${x509.port}/fuse & pid=$!`,
      `for i in $(seq 100); do [ -s ${work}/mnt/disk ] && break; sleep 0.1; done`,
      `stat -c %s ${work}/mnt/disk`,
      `dd if=${work}/blk of=${work}/mnt/disk bs=64k seek=3 conv=notrunc,fsync status=none`,
      `dd if=${work}/mnt/disk of=${work}/back bs=64k skip=3 count=4 status=none`,
      `cmp ${work}/blk ${work}/back && echo same`,
      `fusermount3 -u ${work}/mnt 2>/dev/null || umount ${work}/mnt; wait $pid || true`,
    ].join('\n');
    const out = await ok('unshare', ['-m', 'sh', '-c', script], { timeoutSec: 60 });
    assert.match(out, /^8388608$/m);
    assert.match(out, /^same$/m);
    // and what went through FUSE is on the server, read over TLS by another client
    await ok('nbdcopy', [uri(x509, 'fuse', 'alice'), join(dir, 'fuse-copy.img')]);
    assert.ok(readFileSync(join(dir, 'fuse-copy.img')).subarray(3 * 65536, 7 * 65536).equals(readFileSync(join(work, 'blk'))));
  });

  it("nbd-client: its TLS options negotiate TLS and the export (the kernel's half needs the nbd module, which this machine lacks)", async (t) => {
    if (!need(t, 'nbd-client')) return;
    const before = x509.log().length;
    const a = certs('alice');
    await run('nbd-client', ['-N', 'disk', '-certfile', join(a, 'client-cert.pem'), '-keyfile', join(a, 'client-key.pem'), '-cacertfile', join(a, 'ca-cert.pem'), '-tlshostname', 'localhost', '127.0.0.1', String(x509.port), '/dev/nbd0'], { timeoutSec: 20 });
    const log = x509.log().slice(before);
    assert.match(log, /nbd TLS on \{[^}]*"identity":"alice"/);
    assert.match(log, /nbd transmission \{[^}]*"export":"disk"/);
  });
});

/** A raw client: the greeting, client flags, then one option; resolves to everything the server sent before it hung up. */
function rawOption(port: number, option: number): Promise<Buffer> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    const got: Buffer[] = [];
    s.on('data', (d: Buffer) => got.push(d));
    s.on('error', () => {});
    s.once('connect', () => {
      const flags = Buffer.alloc(4);
      flags.writeUInt32BE(3);
      const opt = Buffer.alloc(16 + (option === Opt.EXPORT_NAME ? 4 : 0));
      opt.writeBigUInt64BE(IHAVEOPT, 0);
      opt.writeUInt32BE(option, 8);
      opt.writeUInt32BE(option === Opt.EXPORT_NAME ? 4 : 0, 12);
      if (option === Opt.EXPORT_NAME) opt.write('disk', 16);
      s.write(Buffer.concat([flags, opt]));
      setTimeout(() => s.end(), 1500);
    });
    s.once('close', () => resolve(Buffer.concat(got)));
  });
}

/** STARTTLS, then a TLS handshake with this certificate; true if the server then answers an option. */
async function starttlsWith(port: number, cert: { cert: Buffer; key: Buffer } | undefined): Promise<boolean> {
  const raw = net.connect({ host: '127.0.0.1', port });
  raw.on('error', () => {});
  await new Promise((r) => raw.once('connect', r));
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(3);
  const opt = Buffer.alloc(16);
  opt.writeBigUInt64BE(IHAVEOPT, 0);
  opt.writeUInt32BE(Opt.STARTTLS, 8);
  // greeting (18 bytes) then the ACK (20 bytes) come back before TLS starts
  let seen = 0;
  const gotAck = new Promise<void>((r) =>
    raw.on('data', (d: Buffer) => {
      seen += d.length;
      if (seen >= 38) r();
    }),
  );
  raw.write(Buffer.concat([flags, opt]));
  await Promise.race([gotAck, sleep(3000)]);
  raw.removeAllListeners('data');
  const s = tls.connect({ socket: raw, rejectUnauthorized: false, ...(cert ?? {}) });
  s.on('error', () => {});
  const answered = new Promise<boolean>((resolve) => {
    s.once('secureConnect', () => {
      const list = Buffer.alloc(16);
      list.writeBigUInt64BE(IHAVEOPT, 0);
      list.writeUInt32BE(Opt.LIST, 8);
      s.write(list);
    });
    s.on('data', () => resolve(true));
    s.once('close', () => resolve(false));
  });
  const r = await Promise.race([answered, sleep(5000).then(() => false)]);
  s.destroy();
  return r;
}

describe('strangers get nothing', () => {
  it('no TLS on a server that requires it, a self-signed or foreign certificate, an export not granted: refused, nothing changed, no secret told; legitimate clients unaffected', async (t) => {
    if (!need(t, 'qemu-io', 'nbdinfo')) return;
    await ok('qemu-io', [...qemuOpts(x509, 'disk', 'alice'), '-c', 'write -P 0x77 0 64k']);
    // Plaintext: every option but STARTTLS refused with TLS_REQD; EXPORT_NAME ends the session.
    const list = await rawOption(x509.port, Opt.LIST);
    assert.ok(list.length > 18 && list.length < 200, `answer of ${list.length} bytes`);
    assert.ok(list.subarray(18).includes(Buffer.from('requires TLS')), list.toString('latin1'));
    assert.ok(!list.includes(Buffer.from('disk')));
    const exportName = await rawOption(x509.port, Opt.EXPORT_NAME);
    assert.equal(exportName.length, 18, 'only the greeting: EXPORT_NAME without TLS gets the session ended');
    const plain = await run('nbdinfo', [`nbd://127.0.0.1:${x509.port}/disk`]);
    assert.notEqual(plain.code, 0);
    // Certificates the CA did not issue, or none.
    assert.equal(await starttlsWith(x509.port, undefined), false, 'no client certificate');
    assert.equal(await starttlsWith(x509.port, await throwawayCertificate()), false, 'self-signed');
    const foreign = { cert: readFileSync(join(dir, 'other', 'alice', 'client-cert.pem')), key: readFileSync(join(dir, 'other', 'alice', 'client-key.pem')) };
    assert.equal(await starttlsWith(x509.port, foreign), false, "another CA's alice");
    const legit = { cert: readFileSync(join(certs('alice'), 'client-cert.pem')), key: readFileSync(join(certs('alice'), 'client-key.pem')) };
    assert.equal(await starttlsWith(x509.port, legit), true, 'the probe itself works with a good certificate');
    // A valid certificate, an export not granted: the same refusal whether it exists or not.
    const mallory = await run('qemu-io', [...qemuOpts(x509, 'disk', 'mallory'), '-c', 'write -P 0x66 0 64k']);
    assert.notEqual(mallory.code, 0);
    const secret = await run('nbdinfo', [uri(x509, 'secret', 'alice')]);
    const nothing = await run('nbdinfo', [uri(x509, 'no-such-export', 'alice')]);
    assert.notEqual(secret.code, 0);
    assert.equal(secret.stderr.replace(/secret/g, 'X'), nothing.stderr.replace(/no-such-export/g, 'X'));
    // Nothing changed, and alice still works.
    assert.match(await ok('qemu-io', [...qemuOpts(x509, 'disk', 'alice'), '-r', '-c', 'read -P 0x77 0 64k']), /read 65536\/65536/);
    assert.match(x509.log(), /nbd client certificate refused/);
    assert.match(x509.log(), /not allowed this export \{[^}]*"identity":"mallory"/);
  });
});
