import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { portFree } from '../../scripts/lib/cli.js';
import { REPO } from '../helpers/procs.js';

// `npm run demo` as a newcomer runs it (the compiled script, on free ports and a temporary
// directory): it comes up, the commands it suggests work against it, Ctrl-C stops it cleanly, a
// second run finds the same cluster and data, and --clean starts over.

const dir = mkdtempSync(join(tmpdir(), 'torus-demo-'));
let ports: string[] = [];
let nbdUri = '';
let etcd = '';

after(() => rmSync(dir, { recursive: true, force: true }));

// The demo takes runs of ports (etcd and etcd + 1, three peer, three HTTP). Other tests running
// alongside bind kernel-chosen ports, which come from ip_local_port_range (32768 and up here), at
// any moment; so the demo's ports are taken below that range, where only a fixed port could clash.
async function demoPorts(): Promise<[number, number, number, number]> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20_000 + 10 * Math.floor(Math.random() * 1_000);
    const all = Array.from({ length: 9 }, (_, i) => base + i);
    if ((await Promise.all(all.map(portFree))).every(Boolean)) return [base, base + 2, base + 3, base + 6];
  }
  throw new Error('no run of 9 free ports found below 30000');
}

function sh(cmd: string, args: string[], timeoutSec = 60): { code: number; out: string } {
  const r = spawnSync('timeout', [String(timeoutSec), cmd, ...args], { encoding: 'utf8' });
  return { code: r.status ?? -1, out: `${r.stdout ?? ''}${r.stderr ?? ''}` };
}

function startDemo(extra: string[] = []): { proc: ChildProcess; output: () => string; ready: Promise<void> } {
  const proc = spawn(process.execPath, [join(REPO, 'dist', 'scripts', 'demo.js'), '--dir', dir, ...ports, ...extra], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  proc.stderr?.on('data', (d: Buffer) => (out += d.toString()));
  const ready = new Promise<void>((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`demo not ready in 90 s:\n${out}`)), 90_000);
    const check = (): void => {
      if (out.includes('Press Ctrl-C')) {
        clearTimeout(timer);
        res();
      }
    };
    proc.stdout?.on('data', check);
    proc.once('exit', (code) => {
      clearTimeout(timer);
      rej(new Error(`demo exited ${code}:\n${out}`));
    });
  });
  return { proc, output: () => out, ready };
}

async function interrupt(p: ChildProcess): Promise<number | null> {
  const gone = new Promise<number | null>((r) => p.once('exit', (code) => r(code)));
  p.kill('SIGINT');
  const t = setTimeout(() => p.kill('SIGKILL'), 60_000);
  const code = await gone;
  clearTimeout(t);
  return code;
}

test('npm run demo: up, usable with the tools it names, stops cleanly, comes back with its data, --clean starts over', async () => {
  const [e, n, p, h] = await demoPorts();
  ports = ['--etcd-port', String(e), '--nbd-port', String(n), '--peer-port', String(p), '--http-port', String(h)];
  etcd = `127.0.0.1:${e}`;
  nbdUri = `nbd://127.0.0.1:${n}/demo`;

  const first = startDemo();
  await first.ready;
  assert.match(first.output(), /Starting a new demo cluster/);
  assert.match(first.output(), /ring version \d+: 3 member\(s\), replication 2/);
  assert.match(first.output(), new RegExp(`served over NBD at ${nbdUri.replace(/[/.]/g, '\\$&')} by storage node 1`), 'by default a storage node serves NBD');
  assert.match(first.output(), new RegExp(`torusctl -C ${etcd} --insecure-peer-network list-peers`), "suggested commands carry -C when the port is not the default, and the demo's plaintext peer flag");
  // The banner says where the nodes' HTTP endpoints are, and they answer there.
  const dash = new RegExp(`Dashboard: (http://127\\.0\\.0\\.1:\\d+/) \\(each node serves one: `).exec(first.output());
  assert.ok(dash, first.output());
  assert.match(await (await fetch(dash[1]!)).text(), /<title>Torus<\/title>/);
  assert.doesNotMatch(first.output(), /^[^#]*fusermount3 -u \/tmp/m, 'no tool that may be missing as the one way to clean up');

  const info = sh('nbdinfo', ['--json', nbdUri]);
  assert.equal(info.code, 0, info.out);
  assert.equal((JSON.parse(info.out) as { exports: { 'export-size': number }[] }).exports[0]!['export-size'], 1024 ** 3);
  const img = sh('qemu-img', ['info', nbdUri]);
  assert.equal(img.code, 0, img.out);

  // The nbdfuse + loop device + ext4 recipe it prints, where this machine allows it.
  if (process.getuid?.() === 0 && spawnSync('sh', ['-c', 'command -v nbdfuse && test -e /dev/fuse']).status === 0) {
    const fuse = join(dir, 'fuse');
    const mnt = join(dir, 'mnt');
    mkdirSync(fuse);
    mkdirSync(mnt);
    const nf = spawn('nbdfuse', [join(fuse, 'demo'), nbdUri], { stdio: 'ignore' });
    try {
      let dev = '';
      for (let i = 0; i < 100 && !dev; i++) {
        const l = sh('losetup', ['-f', '--show', join(fuse, 'demo')], 10);
        if (l.code === 0) dev = l.out.trim();
        else await new Promise((r) => setTimeout(r, 100));
      }
      assert.ok(dev, 'a loop device on the nbdfuse file');
      try {
        assert.equal(sh('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=1,nodiscard', dev], 120).code, 0);
        assert.equal(sh('mount', [dev, mnt]).code, 0);
        assert.equal(sh('sh', ['-c', `echo hello > ${mnt}/f && sync`]).code, 0);
        assert.equal(sh('umount', [mnt]).code, 0);
      } finally {
        sh('umount', [mnt]);
        sh('losetup', ['-d', dev]);
      }
    } finally {
      sh('umount', [fuse]);
      nf.kill('SIGTERM');
    }
  }

  // After the file system (mkfs would overwrite it): a pattern that must survive a restart.
  const io = sh('qemu-io', ['-f', 'raw', '-t', 'writeback', '-c', 'write -P 7 0 1M', '-c', 'read -P 7 0 1M', nbdUri]);
  assert.equal(io.code, 0, io.out);
  assert.doesNotMatch(io.out, /Pattern verification failed/);

  const health = sh(process.execPath, [join(REPO, 'bin', 'torusctl.js'), '-C', etcd, '--insecure-peer-network', 'health']);
  assert.equal(health.code, 0, health.out);
  assert.match(health.out, /^HEALTHY/);
  assert.equal(sh(process.execPath, [join(REPO, 'bin', 'torusctl.js'), '-C', etcd, '--insecure-peer-network', 'block', 'snapshot', 'create', 'demo@first']).code, 0);

  assert.equal(await interrupt(first.proc), 0, first.output());
  assert.match(first.output(), /Stopped\. The cluster's data stays in/);

  // Again: the same cluster, and what qemu-io wrote is still there.
  const second = startDemo();
  await second.ready;
  assert.match(second.output(), /Restarting the demo cluster/);
  assert.doesNotMatch(second.output(), /Initialized cluster|created volume/);
  const again = sh('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 7 0 1M', nbdUri]);
  assert.equal(again.code, 0, again.out);
  assert.doesNotMatch(again.out, /Pattern verification failed/);
  assert.equal(await interrupt(second.proc), 0, second.output());

  // --clean starts over; --nbd-on-client serves NBD from a torusblk nbdserve process instead.
  const third = startDemo(['--clean', '--nbd-on-client']);
  await third.ready;
  assert.match(third.output(), /Removed .*\n.*Starting a new demo cluster/);
  assert.match(third.output(), /served over NBD at \S+ by torusblk nbdserve/);
  const blank = sh('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0 0 1M', nbdUri]);
  assert.doesNotMatch(blank.out, /Pattern verification failed/, 'a new volume reads as zeros');
  assert.equal(await interrupt(third.proc), 0, third.output());
});

test('npm run demo: a bad argument gets one line and exit status 2, and nothing is started or made', () => {
  const fresh = join(dir, 'never-made');
  for (const args of [['--bogus'], ['--etcd-port', 'abc'], ['--peer-port', '65534'], ['--volume-size', '3XB'], ['--volume', 'a/b'], ['--node-size', '-1']]) {
    const r = spawnSync(process.execPath, [join(REPO, 'dist', 'scripts', 'demo.js'), '--dir', fresh, ...args], { encoding: 'utf8', timeout: 30_000 });
    assert.equal(r.status, 2, `${args.join(' ')}: ${r.stdout}${r.stderr}`);
    assert.match(r.stderr, /^demo: [^\n]+\n$/, `${args.join(' ')}: one line, no stack trace`);
    assert.equal(r.stdout, '');
    assert.equal(existsSync(fresh), false, `${args.join(' ')}: no data dir made`);
  }
});

test('npm run demo: a taken etcd peer port is refused up front; a part that dies shows the end of its log', async () => {
  const [e, n, p, h] = await demoPorts();
  const args = ['--etcd-port', String(e), '--nbd-port', String(n), '--peer-port', String(p), '--http-port', String(h)];
  const demo = join(REPO, 'dist', 'scripts', 'demo.js');

  const taken = createServer();
  await new Promise<void>((r) => taken.listen(e + 1, '127.0.0.1', r));
  try {
    const r = spawnSync(process.execPath, [demo, '--dir', join(dir, 'taken'), ...args], { encoding: 'utf8', timeout: 30_000 });
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, new RegExp(`port ${e + 1} \\(etcd peer\\) is in use`));
  } finally {
    await new Promise((r) => taken.close(r));
  }

  // etcd cannot start on a data directory that is a file; the reason it gives must reach the user.
  const broken = join(dir, 'broken');
  mkdirSync(broken, { recursive: true });
  writeFileSync(join(broken, 'etcd'), 'not a directory');
  const r = spawnSync(process.execPath, [demo, '--dir', broken, ...args], { encoding: 'utf8', timeout: 60_000 });
  assert.equal(r.status, 1, `${r.stdout}${r.stderr}`);
  assert.match(r.stderr, /demo: etcd exited unexpectedly \(status 1\)/);
  assert.match(r.stderr, /not a directory/, `etcd's own reason is shown:\n${r.stderr}`);
});
