import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { startEtcd, type EtcdHandle } from '../helpers/etcd.js';
import { eventually, ok, runCli, startTorusd, type Torusd } from '../helpers/procs.js';

// etcd with RBAC on (a root user, auth enabled): the password comes from a file or the
// environment, never the command line; a profile keeps the file's path, not the password; a
// storage node runs against it; without the password nothing gets in.

const PASSWORD = 'etcd-s3cret-for-the-test';
let etcd: EtcdHandle;
let dir: string;
let pwFile: string;
let node: Torusd | undefined;
let C: string[];

function etcdctl(args: string[]): string {
  const r = spawnSync('timeout', ['30', 'etcdctl', '--endpoints', etcd.endpoint, ...args], { encoding: 'utf8' });
  assert.equal(r.status, 0, `etcdctl ${args.join(' ')}: ${r.stdout}${r.stderr}`);
  return r.stdout;
}

before(async () => {
  etcd = await startEtcd();
  dir = mkdtempSync(join(tmpdir(), 'etcd-auth-'));
  pwFile = join(dir, 'etcd-password');
  writeFileSync(pwFile, `${PASSWORD}\n`, { mode: 0o600 });
  etcdctl(['user', 'add', `root:${PASSWORD}`]);
  etcdctl(['user', 'grant-role', 'root', 'root']);
  etcdctl(['auth', 'enable']);
  C = ['-C', etcd.endpoint];
});

after(async () => {
  await node?.kill('SIGKILL');
  await etcd?.stop();
  rmSync(dir, { recursive: true, force: true });
});

test('without the password nothing gets in, and the refusal says what is missing; a wrong one is refused', async () => {
  const none = await runCli('torusctl', [...C, 'init']);
  assert.equal(none.code, 3, none.stderr);
  assert.match(none.stderr, /^torusctl: etcd requires a user \(.*\): give --etcd-user and --etcd-password-file/m);
  const wrong = await runCli('torusctl', [...C, 'init', '--view'], { env: { TORUS_ETCD_USER: 'root', TORUS_ETCD_PASSWORD: 'not-it' } });
  assert.equal(wrong.code, 3);
  assert.match(wrong.stderr, /etcd refused access/);
  assert.ok(!wrong.stderr.includes('not-it'));
});

test('the password from a file or the environment; a profile keeps the path, not the password; a storage node runs against it', async () => {
  await ok('torusctl', [...C, '--etcd-user', 'root', '--etcd-password-file', pwFile, 'init', '--replication', '1']);
  const env = { TORUS_ETCD_USER: 'root', TORUS_ETCD_PASSWORD: PASSWORD };
  assert.match(await ok('torusctl', [...C, 'init', '--view'], env), /Cluster ID/);
  const cfg = join(dir, 'config.json');
  await ok('torusctl', [...C, '--config', cfg, '--etcd-user', 'root', '--etcd-password-file', pwFile, 'config']);
  const saved = readFileSync(cfg, 'utf8');
  assert.ok(saved.includes(pwFile) && !saved.includes(PASSWORD), saved);
  assert.match(await ok('torusctl', ['--config', cfg, 'init', '--view']), /Cluster ID/);
  // torusd too, with the profile's settings; its command line holds no password.
  node = await startTorusd(etcd.endpoint, { extra: ['--config', cfg, '--auto-join'] });
  assert.ok(!readFileSync(`/proc/${node.proc.pid}/cmdline`, 'utf8').includes(PASSWORD));
  await eventually('the node registered', async () => /"member":\s*"OK"|"OK"/.test(await ok('torusctl', ['--config', cfg, 'list-peers', '--json'])));
  await ok('torusctl', ['--config', cfg, 'volume', 'create-block', 'v', '8MiB']);
  assert.match(await ok('torusctl', ['--config', cfg, 'volume', 'list']), /\bv\b/);
});
