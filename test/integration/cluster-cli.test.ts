import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { freePort, startEtcd, type EtcdHandle } from '../helpers/etcd.js';
import { eventually, ok, removeDir, runCli, startTorusd, type Torusd } from '../helpers/procs.js';

// The seed README's steps 2-5 through the real CLIs, against a real etcd and three torusd
// processes: init, run storage nodes, list-peers, peer add, ring get; then the failures a user
// meets on the way.

interface PeerJson {
  uuid: string;
  address: string;
  member: 'OK' | 'Avail' | 'DOWN' | 'MAINT';
  size: number | null;
  used: number | null;
  updated: string | null;
  rebalance: unknown;
}

let etcd: EtcdHandle;
let C: string[];
const nodes: Torusd[] = [];
const dirs: string[] = [];

async function peers(): Promise<PeerJson[]> {
  return JSON.parse(await ok('torusctl', [...C, 'list-peers', '--json'])) as PeerJson[];
}

before(async () => {
  etcd = await startEtcd();
  C = ['-C', etcd.endpoint];
});

after(async () => {
  await Promise.all(nodes.map((n) => n.kill()));
  for (const n of nodes) removeDir(n.dataDir);
  for (const d of dirs) removeDir(d);
  await etcd?.stop();
});

describe('README steps 2-5', () => {
  test('commands before init say the cluster is not initialized', async () => {
    const r = await runCli('torusctl', [...C, 'list-peers']);
    assert.equal(r.code, 4);
    assert.match(r.stderr, /not initialized.*torusctl init/);
    assert.equal(r.stderr.trim().split('\n').length, 1, 'one line, no stack trace');
    const d = await runCli('torusd', [...C, '--data-dir', join(tmpdir(), 'never'), '--size', '1MiB', '--peer-address', 'http://127.0.0.1:1']);
    assert.equal(d.code, 4);
    assert.match(d.stderr, /not initialized/);
  });

  test('step 2: init, init --view, and init twice', async () => {
    const out = await ok('torusctl', [...C, 'init']);
    assert.match(out, /Initialized cluster: block size 128 KiB, ketama ring, replication 2/);
    const view = JSON.parse(await ok('torusctl', [...C, 'init', '--view', '--json'])) as { blockSize: number; clusterId: string; ring: { type: string; replication: number; version: number } };
    assert.equal(view.blockSize, 128 * 1024);
    assert.match(view.clusterId, /^[0-9a-f-]{36}$/);
    assert.deepEqual([view.ring.type, view.ring.replication, view.ring.version], ['ketama', 2, 1]);
    const text = await ok('torusctl', [...C, 'init', '--view']);
    assert.match(text, /Block size: 131072 bytes \(128 KiB\)/);
    const again = await runCli('torusctl', [...C, 'init']);
    assert.equal(again.code, 5);
    assert.match(again.stderr, /already initialized/);
  });

  test('step 3: three storage nodes report in within a heartbeat, as Avail', async () => {
    for (let i = 0; i < 3; i++) nodes.push(await startTorusd(etcd.endpoint, { size: '64MiB' }));
    const list = await peers();
    assert.equal(list.length, 3);
    for (const n of nodes) {
      const p = list.find((x) => x.address === n.address);
      assert.ok(p, `node ${n.address} listed`);
      assert.equal(p.member, 'Avail');
      assert.equal(p.size, 64 * 1024 * 1024);
      assert.equal(p.used, 0);
      assert.ok(p.updated && Date.now() - Date.parse(p.updated) < 10_000);
    }
  });

  test('step 4: the list-peers table looks like the README', async () => {
    const out = await ok('torusctl', [...C, 'list-peers']);
    const lines = out.trim().split('\n');
    assert.match(lines[0] ?? '', /^\+-+\+/);
    assert.match(lines[1] ?? '', /\|\s+ADDRESS\s+\|\s+UUID\s+\|\s+SIZE\s+\|\s+USED\s+\|\s+MEMBER\s+\|\s+UPDATED\s+\|\s+REB\/REP DATA\s+\|/);
    for (const n of nodes) assert.match(out, new RegExp(`\\| ${n.address.replace(/[.]/g, '\\.')} +\\| [0-9a-f-]{36} \\| 64 MiB +\\| 0 B +\\| Avail +\\| .*ago|just now`));
    assert.match(lines.at(-1) ?? '', /^Balanced: true Usage: +0\.00%$/);
    const csv = await ok('torusctl', [...C, 'list-peers', '--csv']);
    assert.equal(csv.trim().split('\n').length, 4);
    assert.match(csv, /^ADDRESS,UUID,SIZE,USED,MEMBER,UPDATED,REB\/REP DATA/);
    // CSV carries machine values: bytes and ISO times, not "64 MiB" and "2 seconds ago".
    assert.match(csv, /^http:\/\/127\.0\.0\.1:\d+,[0-9a-f-]{36},67108864,0,Avail,\d{4}-\d\d-\d\dT[\d:.]+Z,\d+$/m);
    const json = await ok('torusctl', [...C, 'list-peers', '--json']);
    assert.doesNotMatch(json, /"lastSeen"|"lastFinish": \d/, 'times in JSON are ISO 8601 only');
  });

  test('step 5: peer add --all-peers puts every node in the ring', async () => {
    const out = await ok('torusctl', [...C, 'peer', 'add', '--all-peers']);
    assert.match(out, /ring version 2: 3 member\(s\), replication 2/);
    const list = await peers();
    assert.deepEqual(list.map((p) => p.member), ['OK', 'OK', 'OK']);
    // Balanced once every member has passed over its blocks on ring v2 and heartbeated that; a
    // table printed before then says false, and why.
    const table = await eventually('list-peers to say Balanced: true after peer add', async () => {
      const out = await ok('torusctl', [...C, 'list-peers']);
      if (/^Balanced: false/m.test(out)) assert.match(out, /^ {2}- waiting for [1-3] node\(s\) to finish a pass on ring v2: /m);
      return /^Balanced: true Usage: +0\.00%$/m.test(out) ? out : undefined;
    });
    assert.doesNotMatch(table, /waiting for/);
    for (const p of await peers()) assert.equal((p.rebalance as { ringVersion: number }).ringVersion, 2, `${p.address} passed on ring v2`);
    const ring = JSON.parse(await ok('torusctl', [...C, 'ring', 'get', '--json'])) as { type: string; version: number; replication: number; peers: { uuid: string }[] };
    assert.equal(ring.version, 2);
    assert.equal(ring.type, 'ketama');
    assert.deepEqual(ring.peers.map((p) => p.uuid).sort(), list.map((p) => p.uuid).sort());
    const described = await ok('torusctl', [...C, 'ring', 'get']);
    assert.match(described, /ketama/i);
    for (const p of list) assert.ok(described.includes(p.uuid));
    // Adding a member again is an error that says so, not a new ring version.
    const again = await runCli('torusctl', [...C, 'peer', 'add', nodes[0]!.address]);
    assert.notEqual(again.code, 0);
    assert.equal((JSON.parse(await ok('torusctl', [...C, 'ring', 'get', '--json'])) as { version: number }).version, 2);
  });

  test('peer list is list-peers, and alias binaries exist', async () => {
    const a = JSON.parse(await ok('torusctl', [...C, 'peer', 'list', '--json'])) as PeerJson[];
    assert.equal(a.length, 3);
    for (const [bin, name] of [['torus', 'torusd'], ['torusblock', 'torusblk']] as const) {
      const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { bin: Record<string, string> };
      assert.equal(pkg.bin[bin], pkg.bin[name]);
    }
    const v = await runCli('torusblk', ['--version']);
    assert.equal(v.code, 0);
    assert.match(v.stdout, /torusblk\nVersion: /);
  });

  test('ring set-replication: version+1; above the member count refused unless degraded is accepted', async () => {
    await ok('torusctl', [...C, 'ring', 'set-replication', '3']);
    const r = JSON.parse(await ok('torusctl', [...C, 'ring', 'get', '--json'])) as { version: number; replication: number };
    assert.deepEqual([r.version, r.replication], [3, 3]);
    const bad = await runCli('torusctl', [...C, 'ring', 'set-replication', '4']);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /exceeds the 3 ring member/);
    const zero = await runCli('torusctl', [...C, 'ring', 'set-replication', 'two']);
    assert.equal(zero.code, 2);
    const deg = await runCli('torusctl', [...C, 'ring', 'set-replication', '4', '--allow-degraded']);
    assert.equal(deg.code, 0, deg.stderr);
    assert.match(deg.stderr, /warning: .*degraded/);
    await ok('torusctl', [...C, 'ring', 'set-replication', '2']);
  });

  test('concurrent ring changes all land, each as its own version', async () => {
    const before = (JSON.parse(await ok('torusctl', [...C, 'ring', 'get', '--json'])) as { version: number }).version;
    const results = await Promise.all([1, 2, 3, 2, 1].map((n) => runCli('torusctl', [...C, 'ring', 'set-replication', String(n)])));
    for (const r of results) assert.equal(r.code, 0, r.stderr);
    const after = JSON.parse(await ok('torusctl', [...C, 'ring', 'get', '--json'])) as { version: number; peers: unknown[] };
    assert.equal(after.version, before + 5);
    assert.equal(after.peers.length, 3);
    await ok('torusctl', [...C, 'ring', 'set-replication', '2']);
  });

  test('/metrics and /healthz on a node', async () => {
    const n = nodes[0]!;
    const m = await fetch(`http://127.0.0.1:${n.httpPort}/metrics`);
    assert.equal(m.status, 200);
    const text = await m.text();
    assert.match(text, /^torus_storage_blocks_total 512$/m);
    assert.match(text, /^torus_server_heartbeats_total \d+/m);
    assert.match(text, /^torus_ring_version \d+/m);
    const h = await fetch(`http://127.0.0.1:${n.httpPort}/healthz`);
    assert.equal(h.status, 200);
    assert.equal(await h.text(), 'ok\n');
  });

  test('a killed member shows DOWN; remove needs --force; the survivors stay OK', async () => {
    const victim = nodes[2]!;
    const uuid = (await peers()).find((p) => p.address === victim.address)!.uuid;
    await victim.kill('SIGKILL');
    const down = await eventually('victim DOWN', async () => {
      const list = await peers();
      const v = list.find((p) => p.uuid === uuid);
      return v?.member === 'DOWN' ? list : undefined;
    });
    assert.deepEqual(down.filter((p) => p.uuid !== uuid).map((p) => p.member), ['OK', 'OK']);
    const table = await ok('torusctl', [...C, 'list-peers']);
    assert.match(table, /Balanced: false/);
    // The down row keeps the address and size the node last reported.
    assert.match(table, new RegExp(`\\| ${victim.address.replace(/[.]/g, '\\.')} +\\| ${uuid} \\| 64 MiB +\\| 0 B +\\| DOWN +\\| last seen `));
    const noForce = await runCli('torusctl', [...C, 'peer', 'remove', uuid]);
    assert.equal(noForce.code, 2);
    assert.match(noForce.stderr, /is down.*--force/);
    // By the address it had, as list-peers shows it.
    const forced = await ok('torusctl', [...C, 'peer', 'remove', '--force', victim.address]);
    assert.match(forced, /removed/);
    const ring = JSON.parse(await ok('torusctl', [...C, 'ring', 'get', '--json'])) as { peers: { uuid: string }[] };
    assert.equal(ring.peers.length, 2);
    assert.ok(!ring.peers.some((p) => p.uuid === uuid));
    const unknown = await runCli('torusctl', [...C, 'peer', 'remove', 'http://127.0.0.1:1']);
    assert.equal(unknown.code, 6);
    assert.match(unknown.stderr, /no peer http:\/\/127\.0\.0\.1:1/);
  });

  test('a restarted node keeps its UUID; SIGTERM stops it cleanly', async () => {
    const n = nodes[1]!;
    const uuid = (await peers()).find((p) => p.address === n.address)!.uuid;
    assert.equal(await n.kill('SIGTERM'), 0);
    assert.match(n.log(), /stopped/);
    const again = await startTorusd(etcd.endpoint, { dataDir: n.dataDir, peerPort: n.peerPort });
    nodes[1] = again;
    const p = (await peers()).find((x) => x.address === again.address);
    assert.equal(p?.uuid, uuid);
    assert.equal(p?.member, 'OK');
  });

  test('maintenance: a planned stop is MAINT and health passes; past the deadline, or off, it is DOWN and DEGRADED', async () => {
    const n = nodes[1]!;
    const on = JSON.parse(await ok('torusctl', [...C, 'peer', 'maintenance', 'on', n.address, '--for', '1h', '--reason', 'kernel update', '--json'])) as { uuid: string; until: string };
    assert.ok(Date.parse(on.until) > Date.now() + 3_500_000);
    assert.equal(await n.kill('SIGTERM'), 0);
    const list = await eventually('MAINT', async () => {
      const l = (await peers()) as (PeerJson & { maintenance: { reason: string } | null })[];
      return l.find((p) => p.uuid === on.uuid)?.member === 'MAINT' ? l : undefined;
    });
    assert.equal(list.find((p) => p.uuid === on.uuid)?.maintenance?.reason, 'kernel update');
    let h = await runCli('torusctl', [...C, 'health']);
    assert.equal(h.code, 0, h.stdout);
    assert.match(h.stdout, /^MAINTENANCE: ring v\d+/);
    assert.match(h.stdout, new RegExp(`down for maintenance: ${on.uuid} \\(${n.address.replace(/[.]/g, '\\.')}\\) until `));
    // A short window runs out: normal rules again.
    await ok('torusctl', [...C, 'peer', 'maintenance', 'on', on.uuid, '--for', '1s']);
    await new Promise((r) => setTimeout(r, 1500));
    h = await runCli('torusctl', [...C, 'health']);
    assert.equal(h.code, 1, h.stdout);
    assert.match(h.stdout, /^DEGRADED: .*\n {2}- 1 ring member\(s\) down: /);
    await ok('torusctl', [...C, 'peer', 'maintenance', 'on', on.uuid]);
    const off = await ok('torusctl', [...C, 'peer', 'maintenance', 'off', n.address]);
    assert.match(off, /^maintenance off for /);
    assert.equal((await runCli('torusctl', [...C, 'health'])).code, 1);
    nodes[1] = await startTorusd(etcd.endpoint, { dataDir: n.dataDir, peerPort: n.peerPort });
    await eventually('back OK', async () => (await peers()).find((p) => p.uuid === on.uuid)?.member === 'OK');
  });

  test('peer remove leaving fewer members than copies is refused (exit 2) unless --allow-degraded', async () => {
    const before = (JSON.parse(await ok('torusctl', [...C, 'ring', 'get', '--json'])) as { version: number; peers: unknown[]; replication: number });
    assert.deepEqual([before.peers.length, before.replication], [2, 2]);
    const r = await runCli('torusctl', [...C, 'peer', 'remove', nodes[0]!.address]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /leaves 1 ring member\(s\) for replication 2: .*--allow-degraded/);
    assert.equal((JSON.parse(await ok('torusctl', [...C, 'ring', 'get', '--json'])) as { version: number }).version, before.version);
  });

  test('--auto-join adds the node to the ring by itself', async () => {
    const n = await startTorusd(etcd.endpoint, { extra: ['--auto-join'] });
    nodes.push(n);
    const p = (await peers()).find((x) => x.address === n.address);
    assert.equal(p?.member, 'OK');
  });
});

describe('bad input: one line, non-zero exit, nothing changed', () => {
  test('etcd unreachable names the endpoint and fails within seconds', async () => {
    const r = await runCli('torusctl', ['-C', '127.0.0.1:1', '--etcd-timeout', '2s', 'list-peers'], { timeoutMs: 15_000 });
    assert.equal(r.code, 3);
    assert.match(r.stderr, /cannot reach etcd at http:\/\/127\.0\.0\.1:1/);
    assert.equal(r.stderr.trim().split('\n').length, 1);
  });

  test('malformed endpoint, size, address, block size', async () => {
    const scratch = mkdtempSync(join(tmpdir(), 'torusd-bad-'));
    dirs.push(scratch);
    const x = join(scratch, 'x');
    const cases: [('torusctl' | 'torusd'), string[], RegExp][] = [
      ['torusctl', ['-C', 'nohostport', 'list-peers'], /invalid etcd endpoint "nohostport"/],
      ['torusd', [...C, '--data-dir', x, '--size', '10QB', '--peer-address', 'http://127.0.0.1:1'], /invalid size "10QB": unknown unit/],
      ['torusd', [...C, '--data-dir', x, '--size', '1MiB'], /--peer-address is required/],
      ['torusd', [...C, '--data-dir', x, '--size', '1MiB', '--peer-address', 'localhost:40000'], /invalid --peer-address/],
      ['torusd', [...C, '--data-dir', x, '--size', '1MiB', '--peer-address', 'ftp://1.2.3.4:5'], /scheme must be http:\/\/ or tdp:\/\//],
      ['torusctl', [...C, 'init', '--block-size', '1000'], /invalid --block-size 1000/],
      ['torusctl', [...C, 'init', '--ring-type', 'round'], /invalid/],
    ];
    for (const [bin, args, re] of cases) {
      const r = await runCli(bin, args);
      assert.notEqual(r.code, 0, `${bin} ${args.join(' ')}`);
      assert.match(r.stderr, re);
      assert.ok(!/\n\s+at /.test(r.stderr), `no stack trace: ${r.stderr}`);
    }
    assert.ok(!existsSync(join(x, 'node.json')), 'a refused torusd leaves no identity behind');
  });

  test('--size larger than the free disk', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'torusd-big-'));
    dirs.push(dir);
    const r = await runCli('torusd', [...C, '--data-dir', dir, '--size', '5PiB', '--peer-address', 'http://127.0.0.1:1']);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /larger than the \d+ bytes free/);
  });

  test('a data dir from another cluster is refused', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'torusd-other-'));
    dirs.push(dir);
    writeFileSync(join(dir, 'node.json'), JSON.stringify({ uuid: '11111111-1111-1111-1111-111111111111', clusterId: 'some-other-cluster', createdAt: '' }));
    const r = await runCli('torusd', [...C, '--data-dir', dir, '--size', '8MiB', '--peer-address', 'http://127.0.0.1:1']);
    assert.equal(r.code, 8);
    assert.match(r.stderr, /belongs to cluster some-other-cluster/);
  });

  test('a port in use, for peer RPC or for HTTP, is named in one line', async () => {
    const taken = createServer();
    await new Promise<void>((r) => taken.listen(0, '127.0.0.1', r));
    const port = (taken.address() as AddressInfo).port;
    try {
      for (const [args, re] of [
        [['--peer-address', `http://127.0.0.1:${port}`], new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port} for --peer-address: .*EADDRINUSE`)],
        [['--host', '127.0.0.1', '--port', String(port), '--peer-address', `http://127.0.0.1:${await freePort()}`], new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port} for --host/--port: .*EADDRINUSE`)],
      ] as const) {
        const dir = mkdtempSync(join(tmpdir(), 'torusd-port-'));
        dirs.push(dir);
        const r = await runCli('torusd', [...C, '--data-dir', dir, '--size', '8MiB', ...args]);
        assert.equal(r.code, 2, r.stderr);
        assert.match(r.stderr, re);
        assert.equal(r.stderr.trim().split('\n').filter((l) => !l.startsWith('{')).length, 1, `one line besides the log: ${r.stderr}`);
      }
    } finally {
      await new Promise((r) => taken.close(r));
    }
  });

  test('unknown peer to add', async () => {
    const r = await runCli('torusctl', [...C, 'peer', 'add', 'http://10.9.9.9:40000']);
    assert.equal(r.code, 6);
    assert.match(r.stderr, /no running peer http:\/\/10\.9\.9\.9:40000/);
  });
});

describe('config profiles and wipe', () => {
  test('config saves a 0600 profile that later commands use', async () => {
    const home = mkdtempSync(join(tmpdir(), 'torus-home-'));
    dirs.push(home);
    const env = { HOME: home };
    await ok('torusctl', ['-C', etcd.endpoint, 'config'], env);
    const path = join(home, '.torus', 'config.json');
    assert.equal(statSync(path).mode & 0o777, 0o600);
    const cfg = JSON.parse(readFileSync(path, 'utf8')) as { etcd_config: { default: { etcd: string } } };
    assert.equal(cfg.etcd_config.default.etcd, etcd.endpoint);
    const list = JSON.parse(await ok('torusctl', ['list-peers', '--json'], env)) as unknown[];
    assert.ok(list.length >= 2);
    await ok('torusctl', ['-C', '127.0.0.1:1', '--profile', 'dead', 'config'], env);
    const r = await runCli('torusctl', ['--profile', 'dead', '--etcd-timeout', '1s', 'list-peers'], { env });
    assert.equal(r.code, 3);
    // A flag beats the profile.
    await ok('torusctl', ['--profile', 'dead', '-C', etcd.endpoint, 'list-peers'], env);
    const missing = await runCli('torusctl', ['--profile', 'nope', 'list-peers'], { env });
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /no profile "nope"/);
  });

  test('wipe asks for YES and deletes everything only then', async () => {
    // No terminal and nothing on standard input: refused, and said so (it used to exit 0 silently).
    const none = await runCli('torusctl', [...C, 'wipe'], { input: '' });
    assert.equal(none.code, 2);
    assert.match(none.stderr, /not confirmed \(no answer on standard input; pass --yes-i-am-sure/);
    const no = await runCli('torusctl', [...C, 'wipe'], { input: 'no\n' });
    assert.notEqual(no.code, 0);
    assert.match(no.stderr, /not confirmed/);
    assert.equal((JSON.parse(await ok('torusctl', [...C, 'init', '--view', '--json'])) as { blockSize: number }).blockSize, 131072);
    const yes = await runCli('torusctl', [...C, 'wipe'], { input: 'YES\n' });
    assert.equal(yes.code, 0, yes.stderr);
    const r = await runCli('torusctl', [...C, 'init', '--view']);
    assert.equal(r.code, 4);
    await ok('torusctl', [...C, 'init', '--block-size', '64KiB', '--replication', '1', '--ring-type', 'mod']);
    await ok('torusctl', [...C, 'wipe', '--yes-i-am-sure']);
  });
});
