import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { after, before, test } from 'node:test';
import { parser } from '@prometheus-io/lezer-promql';
import { Etcd3 } from 'etcd3';
import { parse as parseYaml } from 'yaml';
import { startCluster, type TestCluster } from '../helpers/cluster.js';
import { freePort } from '../helpers/etcd.js';
import { ok as nbdOk } from '../helpers/nbd-tools.js';
import { BIN, REPO, eventually, ok, stopProcess, waitForOutput } from '../helpers/procs.js';

// Operators' monitoring against a live cluster: every metric name in the Prometheus alert rules
// and the Grafana dashboard (monitoring/) exists in what torusd and torusblk serve on /metrics;
// torusblk's per-volume metrics count real I/O; `torusctl volume info` shows allocation, the lock
// holder and the holder's I/O rates.

let cluster: TestCluster;
let C: string[];
let blk: ChildProcess;
let metricsPort: number;
let nbdPort: number;

before(async () => {
  cluster = await startCluster({ nodes: 3, replication: 2 });
  C = ['-C', cluster.etcd.endpoint];
  await ok('torusctl', [...C, 'volume', 'create', 'mon', '64MiB']);
  metricsPort = await freePort();
  nbdPort = await freePort();
  blk = spawn(process.execPath, [BIN('torusblk'), ...C, '--lock-ttl', '40s', '--metrics', `127.0.0.1:${metricsPort}`, 'nbdserve', '--listen', `127.0.0.1:${nbdPort}`], { stdio: ['ignore', 'pipe', 'pipe'] });
  await waitForOutput(blk, /serving NBD on/, 'torusblk nbdserve');
  // Writes, flushes (qemu-io flushes before it exits) and reads on the volume.
  await nbdOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 2M', '-c', 'flush', '-c', 'read -P 0x5a 0 1M', `nbd://127.0.0.1:${nbdPort}/mon`], { timeoutSec: 60 });
});

after(async () => {
  if (blk) await stopProcess(blk);
  await cluster?.stop();
});

/** Metric names in a Prometheus text exposition: sample names, and the names TYPE lines declare. */
function exposedNames(text: string): Set<string> {
  const names = new Set<string>();
  for (const line of text.split('\n')) {
    const type = /^# TYPE (\S+) (\w+)/.exec(line);
    if (type) {
      names.add(type[1]!);
      if (type[2] === 'histogram' || type[2] === 'summary') for (const s of ['_bucket', '_sum', '_count']) names.add(type[1]! + s);
      continue;
    }
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]/.exec(line);
    if (m) names.add(m[1]!);
  }
  return names;
}

/** Metric names a PromQL expression selects; throws on an expression that does not parse. */
function selectedNames(expr: string): string[] {
  const tree = parser.parse(expr);
  const out: string[] = [];
  const c = tree.cursor();
  do {
    if (c.type.isError) throw new Error(`PromQL does not parse at ${c.from}: ${expr}`);
    if (c.name === 'VectorSelector') {
      const id = c.node.getChild('Identifier');
      if (id) out.push(expr.slice(id.from, id.to));
    }
  } while (c.next());
  return out;
}

async function scrape(port: number): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${port}/metrics`);
  assert.equal(res.status, 200);
  return res.text();
}

test('every metric in the alert rules and the Grafana dashboard is in a live scrape', async () => {
  const texts = [...(await Promise.all(cluster.nodes.map((n) => scrape(n.httpPort)))), await scrape(metricsPort)];
  const exposed = new Set(texts.flatMap((t) => [...exposedNames(t)]));
  const rules = parseYaml(readFileSync(`${REPO}/monitoring/prometheus-alerts.yml`, 'utf8')) as { groups: { rules: { alert: string; expr: string }[] }[] };
  const dashboard = JSON.parse(readFileSync(`${REPO}/monitoring/grafana-dashboard.json`, 'utf8')) as { panels: { title: string; targets?: { expr: string }[] }[] };
  const exprs = [
    ...rules.groups.flatMap((g) => g.rules.map((r) => ({ where: `alert ${r.alert}`, expr: r.expr }))),
    ...dashboard.panels.flatMap((p) => (p.targets ?? []).map((t) => ({ where: `panel "${p.title}"`, expr: t.expr }))),
  ];
  const alerts = rules.groups.flatMap((g) => g.rules.map((r) => r.alert));
  for (const want of ['TorusNodeDown', 'TorusVolumeDataUnderReplicated', 'TorusDiskNearlyFull', 'TorusChecksumErrors', 'TorusEtcdUnreachable', 'TorusFlushLatencyHigh'])
    assert.ok(alerts.includes(want), `alert ${want} is defined`);
  let checked = 0;
  for (const { where, expr } of exprs) {
    const names = selectedNames(expr);
    assert.ok(names.length > 0, `${where} selects some metric: ${expr}`);
    for (const n of names) {
      assert.ok(exposed.has(n), `${where}: ${n} is not in any /metrics scrape`);
      checked++;
    }
  }
  assert.ok(checked >= 30, `checked ${checked} metric references`);
});

test('torusblk --metrics counts per-volume I/O, latency and the NBD server', async () => {
  const text = await scrape(metricsPort);
  const value = (re: RegExp): number => Number(re.exec(text)?.[1] ?? NaN);
  assert.ok(value(/^torus_volume_requests_total\{volume="mon",op="write"\} (\d+)/m) >= 1, text);
  assert.ok(value(/^torus_volume_requests_total\{volume="mon",op="flush"\} (\d+)/m) >= 1);
  assert.ok(value(/^torus_volume_bytes_total\{volume="mon",direction="write"\} (\d+)/m) >= 2 * 1024 * 1024);
  assert.ok(value(/^torus_volume_bytes_total\{volume="mon",direction="read"\} (\d+)/m) >= 1024 * 1024);
  assert.ok(value(/^torus_volume_request_seconds_count\{volume="mon",op="flush"\} (\d+)/m) >= 1);
  assert.ok(value(/^torus_nbd_handshakes_total (\d+)/m) >= 1);
  assert.match(text, /^torus_volume_request_seconds_bucket\{le="[^"]+",volume="mon",op="read"\} \d+/m);
  assert.match(text, /^torus_client_cache_hits_total \d+/m);
  assert.match(text, /^torus_client_cache_bypasses_total \d+/m);
});

test('volume info: allocation, lock holder, I/O rates; volume list: ALLOCATED', async () => {
  // A client that stays connected keeps the volume open (and locked) in torusblk; it writes and
  // flushes while the holder publishes its rates (every 5 s).
  const client = spawn('qemu-io', ['-f', 'raw', `nbd://127.0.0.1:${nbdPort}/mon`], { stdio: ['pipe', 'pipe', 'pipe'] });
  const io = (cmd: string): void => {
    client.stdin.write(`${cmd}\n`);
  };
  let info;
  try {
    info = await eventually(
      'volume info with I/O rates',
      async () => {
        io('write -P 0x11 4M 1M');
        io('flush');
        const i = JSON.parse(await ok('torusctl', [...C, 'volume', 'info', 'mon', '--json'])) as {
          size: number;
          allocated: number;
          exclusive: number;
          shared: number;
          lock: { host: string; pid: number } | null;
          journal: { kind: string };
          io: { rates: { writeOps: number }; totals: { writes: number } } | null;
        };
        return i.io && i.io.totals.writes > 0 && i.io.rates.writeOps > 0 && i.lock ? i : undefined;
      },
      30_000,
    );
    // The lock is bound to a lease of --lock-ttl.
    const etcd = new Etcd3({ hosts: cluster.etcd.endpoint });
    try {
      const locks = (await etcd.getAll().prefix('/torus/volumemeta/').exec()).kvs.filter((kv) => kv.key.toString().endsWith('/lock'));
      assert.equal(locks.length, 1);
      assert.equal(Number((await etcd.leaseClient.leaseTimeToLive({ ID: locks[0]!.lease })).grantedTTL), 40);
    } finally {
      etcd.close();
    }
    const text = await ok('torusctl', [...C, 'volume', 'info', 'mon']);
    assert.match(text, new RegExp(`^Lock: +held by \\S+ pid ${blk.pid}`, 'm'));
    assert.match(text, /^I\/O: +[\d.]+ reads\/s \([^)]*\), [\d.]+ writes\/s/m);
    const list = await ok('torusctl', [...C, 'volume', 'list']);
    assert.match(list, /\| VOLUME NAME \| SIZE +\| ALLOCATED \|/);
    assert.match(list, /\| mon +\| 64 MiB \| [\d.]+ (B|KiB|MiB) +\| block \| in-use/);
    const csv = await ok('torusctl', [...C, 'volume', 'list', '--csv']);
    assert.match(csv, /^mon,67108864,\d+,block,in-use,0,$/m);
  } finally {
    client.stdin.end('quit\n');
    await stopProcess(client, 'SIGTERM', 10_000);
  }
  assert.equal(info.size, 64 * 1024 * 1024);
  assert.equal(info.lock?.pid, blk.pid);
  // docs/journal.md: the writer's journal; its tail is not counted until a checkpoint names it.
  assert.equal(info.journal.kind, 'replicated');
  // A snapshot of the mounted volume is taken by its writer at a checkpoint. Every write here
  // covered whole 64 KiB blocks, so each is a data block of its own (docs/journal.md, BLOCK
  // records): 0-2 MiB and 4-5 MiB, all shared with the snapshot.
  await ok('torusctl', [...C, 'block', 'snapshot', 'create', 'mon@s1']);
  type Info = { allocated: number; exclusive: number; shared: number; snapshots: { name: string; referenced: number; exclusive: number }[] };
  const snapped = JSON.parse(await ok('torusctl', [...C, 'volume', 'info', 'mon', '--json'])) as Info;
  assert.equal(snapped.allocated, 3 * 1024 * 1024);
  assert.deepEqual([snapped.exclusive, snapped.shared], [0, snapped.allocated]);
  await nbdOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 0 1M', '-c', 'flush', `nbd://127.0.0.1:${nbdPort}/mon`], { timeoutSec: 30 });
  await ok('torusctl', [...C, 'block', 'snapshot', 'create', 'mon@s2']);
  const after = JSON.parse(await ok('torusctl', [...C, 'volume', 'info', 'mon', '--json'])) as Info;
  // The rewritten 1 MiB replaced its blocks in the tree: the volume still holds 3 MiB, and the
  // 1 MiB it replaced is s1's alone.
  assert.equal(after.allocated, snapped.allocated, `allocated ${after.allocated} after ${snapped.allocated}`);
  assert.deepEqual(
    after.snapshots.map((s) => [s.name, s.referenced, s.exclusive]),
    [
      ['s1', snapped.allocated, 1024 * 1024],
      ['s2', after.allocated, 0],
    ],
  );
  const text = await ok('torusctl', [...C, 'volume', 'info', 'mon', '--bytes']);
  assert.match(text, new RegExp(`^Allocated: +${after.allocated} \\(${after.exclusive} its own, ${after.shared} shared`, 'm'));
  assert.match(text, /^Journal: +(segment \d+ of epoch \d+ on \S+.*|no tail \(everything checkpointed\)); next LSN \d+$/m);
});
