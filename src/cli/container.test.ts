import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isTorusError } from '../core/errors.js';
import { invocation } from './container.js';
import { buildProgram as torusblk } from './torusblk.js';
import { buildProgram as torusctl } from './torusctl.js';
import { buildProgram as torusd } from './torusd.js';

const programs = () => ({ torusd: torusd(), torusctl: torusctl(), torusblk: torusblk() });
const run = (argv: string[], env: Record<string, string>) => invocation(argv, env, programs());

test("the original image's host-networking example becomes the same torusd flags", () => {
  const inv = run([], { STORAGE_SIZE: '20GiB', LISTEN_HOST: '10.0.0.5', LISTEN_HTTP_PORT: '4321', LISTEN_PEER_PORT: '40000', ETCD_HOST: '127.0.0.1' });
  assert.equal(inv.program, 'torusd');
  assert.deepEqual(inv.args, ['--etcd', '127.0.0.1:2379', '--size', '20GiB', '--peer-address', 'http://10.0.0.5:40000', '--host', '10.0.0.5', '--port', '4321', '--data-dir', '/data']);
  assert.equal(inv.initArgs, undefined);
});

test('without LISTEN_HOST (non-host networking) it listens everywhere and advertises its own address', () => {
  const inv = run([], { STORAGE_SIZE: '20GiB', ETCD_HOST: '127.0.0.1' });
  assert.deepEqual(inv.args, ['--etcd', '127.0.0.1:2379', '--size', '20GiB', '--peer-address', 'http://0.0.0.0:40000', '--host', '0.0.0.0', '--port', '4321', '--data-dir', '/data']);
});

test('every torusd flag is a TORUS_ variable; booleans take 1/0; the seed names and the rest of the command line combine', () => {
  const inv = run(['--read-level', 'spread'], {
    ETCD_HOST: '10.0.0.1,10.0.0.2:2380,fd00::3',
    ETCD_PORT: '2379',
    AUTO_JOIN: '1',
    DEBUG_INIT: 'true',
    TORUS_GC_INTERVAL: '1m',
    TORUS_DATA_DIR: '/var/lib/torus',
    TORUS_ETCD_CA_FILE: '/tls/ca.pem',
    TORUS_MALLOC_TUNING: '0',
  });
  assert.deepEqual(inv.args.slice(0, 2), ['--etcd', '10.0.0.1:2379,10.0.0.2:2380,[fd00::3]:2379']);
  assert.ok(inv.args.includes('--auto-join'));
  for (const [flag, value] of [['--gc-interval', '1m'], ['--data-dir', '/var/lib/torus'], ['--etcd-ca-file', '/tls/ca.pem']]) assert.equal(inv.args[inv.args.indexOf(flag!) + 1], value);
  assert.equal(inv.args.filter((a) => a === '--data-dir').length, 1);
  assert.deepEqual(inv.args.slice(-2), ['--read-level', 'spread']);
  assert.deepEqual(inv.initArgs, ['--etcd', '10.0.0.1:2379,10.0.0.2:2380,[fd00::3]:2379', '--etcd-ca-file', '/tls/ca.pem', 'init']);
  assert.deepEqual(run([], { TORUS_AUTO_JOIN: '0' }).args.includes('--auto-join'), false);
  // TORUS_* alone replaces the seed's defaults, it does not clash with them.
  assert.deepEqual(run([], { TORUS_PEER_ADDRESS: 'http://10.0.0.9:41000', TORUS_HOST: '10.0.0.9', TORUS_PORT: '5000' }).args, [
    '--peer-address', 'http://10.0.0.9:41000', '--host', '10.0.0.9', '--port', '5000', '--data-dir', '/data',
  ]);
  // What comes out parses as torusd's own command line.
  const p = torusd();
  p.exitOverride();
  assert.doesNotThrow(() => p.parseOptions(inv.args));
});

test('unknown, doubled and retired settings are one clear error, not ignored', () => {
  const bad = (env: Record<string, string>, re: RegExp, argv: string[] = []) =>
    assert.throws(() => run(argv, env), (e) => isTorusError(e, 'INVALID_ARGUMENT') && re.test(e.message));
  bad({ TORUS_GC_INTERVALL: '1m' }, /TORUS_GC_INTERVALL is not a setting \(known: .*TORUS_GC_INTERVAL/);
  bad({ STORAGE_SIZE: '1GiB', TORUS_SIZE: '2GiB' }, /TORUS_SIZE and the variable that also sets --size/);
  bad({ DROP_MOUNT_BIN: '1' }, /FlexVolume plugin is replaced by the CSI driver/);
  bad({ LOG_FLAGS: 'nbd=DEBUG' }, /TORUS_LOG_LEVEL/);
  bad({ AUTO_JOIN: 'maybe' }, /AUTO_JOIN=maybe: expected 1 or 0/);
  bad({ LISTEN_PEER_PORT: '99999' }, /LISTEN_PEER_PORT=99999/);
  bad({}, /unknown command "bash"/, ['bash']);
});

test('torusctl and torusblk get only the etcd settings, and flags on the command line win', () => {
  assert.deepEqual(run(['torusctl', 'list-peers'], { ETCD_HOST: '10.0.0.1', STORAGE_SIZE: '1GiB', TORUS_ETCD_TIMEOUT: '9s' }), {
    program: 'torusctl',
    args: ['--etcd', '10.0.0.1:2379', '--etcd-timeout', '9s', 'list-peers'],
  });
  assert.deepEqual(run(['torusblock', '-C', '10.9.9.9:2379', 'nbdserve'], { ETCD_HOST: '10.0.0.1' }), { program: 'torusblk', args: ['-C', '10.9.9.9:2379', 'nbdserve'] });
  assert.deepEqual(run(['torusctl', 'init'], {}), { program: 'torusctl', args: ['init'] });
});

test('torusctl and torusblk get the peer credential too: a switch stands alone, a path takes its value', () => {
  assert.deepEqual(run(['torusblk', 'nbdserve'], { ETCD_HOST: '10.0.0.1', TORUS_INSECURE_PEER_NETWORK: '1', TORUS_ETCD_TIMEOUT: '9s' }), {
    program: 'torusblk',
    args: ['--etcd', '10.0.0.1:2379', '--insecure-peer-network', '--etcd-timeout', '9s', 'nbdserve'],
  });
  assert.deepEqual(run(['torusctl', 'list-peers'], { TORUS_TLS_CERTIFICATES: '/etc/torus/tls' }).args, ['--tls-certificates', '/etc/torus/tls', 'list-peers']);
  assert.deepEqual(run(['torusctl', '--insecure-peer-network', 'list-peers'], { TORUS_INSECURE_PEER_NETWORK: '1', ETCD_HOST: '10.0.0.1' }).args, ['--etcd', '10.0.0.1:2379', '--insecure-peer-network', 'list-peers']);
});
