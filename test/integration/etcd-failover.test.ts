import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { startEtcdCluster, type EtcdCluster } from '../helpers/etcd-cluster.js';
import { freePort } from '../helpers/etcd.js';
import { BIN, eventually, ok, removeDir, runCli, startTorusd, type Torusd } from '../helpers/procs.js';

// Issue 13, etcd failover: every tool and the volume client against a real three-member etcd
// cluster on loopback, named by all three endpoints, with one member dead (SIGKILL) and later
// restarted. The member killed under the NBD workload is the one torusblk talks to, made leader
// first, so its unary calls, lease renewals and ring watch all lose their member at once while
// the cluster elects a new leader.

let etcd: EtcdCluster;
let C: string[];
const nodes: Torusd[] = [];
let dir: string;

before(async () => {
  etcd = await startEtcdCluster(3);
  C = ['-C', etcd.all];
  dir = mkdtempSync(join(tmpdir(), 'torus-failover-'));
});

after(async () => {
  await Promise.all(nodes.map((n) => n.kill()));
  for (const n of nodes) removeDir(n.dataDir);
  await etcd?.stop();
  removeDir(dir);
});

describe('a client named with every member keeps working while a minority is dead', () => {
  test('torusctl with one endpoint that refuses connections and one live: every run succeeds', async () => {
    const dead = `127.0.0.1:${await freePort()}`;
    await ok('torusctl', ['-C', `${dead},${etcd.endpoints[0]}`, 'init', '--block-size', '64KiB', '--replication', '2']);
    // Each run picks its first member at random: before failover, most runs of this failed.
    for (let i = 0; i < 8; i++) {
      const r = await runCli('torusctl', ['-C', `${dead},${etcd.endpoints[0]}`, 'init', '--view']);
      assert.equal(r.code, 0, `run ${i}: ${r.stderr}`);
    }
  });

  test('storage nodes start with a dead member in their list, and join', async () => {
    await etcd.kill(2);
    try {
      for (let i = 0; i < 3; i++) nodes.push(await startTorusd(etcd.all, { size: '1GiB', extra: ['--gc-interval', '3s'] }));
      await ok('torusctl', [...C, 'peer', 'add', '--all-peers']);
      await ok('torusctl', [...C, 'volume', 'create-block', 'fv', '64MiB']);
    } finally {
      await etcd.restart(2);
    }
  });

  test('NBD writes and flushes go on, without one error, while the member torusblk talks to (the leader) dies and comes back', async () => {
    const port = await freePort();
    const serve = spawn(process.execPath, [BIN('torusblk'), ...C, '--debug', 'nbdserve', '--listen', `127.0.0.1:${port}`], { stdio: ['ignore', 'pipe', 'pipe']});
    let serveOut = '';
    serve.stdout!.on('data', (d: Buffer) => (serveOut += d.toString()));
    serve.stderr!.on('data', (d: Buffer) => (serveOut += d.toString()));
    let fio: ChildProcess | undefined;
    try {
      await eventually('nbdserve listening', async () => serveOut.includes('serving NBD on') || (serve.exitCode !== null ? Promise.reject(new Error(serveOut)) : false));
      const out = join(dir, 'fio.json');
      // Random 64 KiB writes with a flush (a volume sync: replicas fsynced, head committed in
      // etcd under the volume lock) after every fourth; then every write is read back and checked.
      fio = spawn(
        'timeout',
        ['180', 'fio', '--name=failover', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${port}/fv`, '--rw=randwrite', '--bs=64k', '--size=16M', '--iodepth=4', '--rate_iops=400',
          '--fsync=4', '--time_based', '--runtime=40', '--verify=crc32c', '--verify_state_save=0', '--output-format=json', `--output=${out}`],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      );
      let fioOut = '';
      fio.stdout!.on('data', (d: Buffer) => (fioOut += d.toString()));
      fio.stderr!.on('data', (d: Buffer) => (fioOut += d.toString()));
      const fioDone = new Promise<number | null>((r) => fio!.once('close', (code) => r(code)));

      const victim = await eventually('torusblk connected to one member', async () => {
        const used = etcd.usedBy(serve.pid!);
        return used.length === 1 ? used[0] : undefined;
      });
      await new Promise((r) => setTimeout(r, 3000));
      await etcd.moveLeader(victim!);
      await etcd.kill(victim!);
      const killedAt = Date.now();

      // Meanwhile every tool works with the member dead: reads, a ring change (a transaction),
      // and the storage nodes keep their heartbeats (leases) and follow the ring (watches).
      for (let i = 0; i < 4; i++) await ok('torusctl', [...C, 'list-peers']);
      await ok('torusctl', [...C, 'ring', 'set-replication', '3']);
      await ok('torusblk', [...C, 'volume', 'create', 'during', '16MiB']);
      // Longer dead than the volume lock's and the nodes' lease TTLs (15 s and 3 s).
      while (Date.now() - killedAt < 20_000) await new Promise((r) => setTimeout(r, 500));
      let lastHealth = '';
      const health = await eventually('health with the member dead', async () => {
        const r = await runCli('torusctl', [...C, 'health']);
        lastHealth = r.stdout + r.stderr;
        return r.code === 0 ? r.stdout : undefined;
      }, 60_000).catch((e: Error) => Promise.reject(new Error(`${e.message}; health said:\n${lastHealth}`)));
      assert.match(health, /^HEALTHY: ring v3, 3 member\(s\), replication 3\/3/);
      await etcd.restart(victim!);

      const code = await fioDone;
      assert.equal(code, 0, `fio exited ${code}\n${fioOut}\n${serveOut}`);
      const res = JSON.parse(readFileSync(out, 'utf8').slice(readFileSync(out, 'utf8').indexOf('{'))) as {
        jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number }; sync: { total_ios: number; lat_ns: { max: number; mean: number } } }[];
      };
      const job = res.jobs[0]!;
      // The figures docs/failure-guide.md quotes (case h).
      console.log(`# flushes ${job.sync.total_ios}, mean ${(job.sync.lat_ns.mean / 1e6).toFixed(1)} ms, worst ${(job.sync.lat_ns.max / 1e6).toFixed(0)} ms`);
      assert.equal(job.error, 0);
      assert.ok(job.write.io_bytes > 0 && job.read.io_bytes >= job.write.io_bytes / 2, 'wrote, and read back to verify');
      assert.ok(job.sync.total_ios > 20, `flushed ${job.sync.total_ios} times`);
      assert.ok(!/nbd request failed/.test(serveOut), `nbdserve said:\n${serveOut}`);
      // It did lose its member (the failover was exercised, not skipped).
      assert.match(serveOut, /etcd member failed/);
    } finally {
      if (fio && fio.exitCode === null) fio.kill('SIGKILL');
      if (serve.exitCode === null) {
        const gone = new Promise((r) => serve.once('exit', r));
        serve.kill('SIGTERM');
        await gone;
      }
    }
    // The restarted member is a member again, and the tools use it like the others.
    const r = await runCli('torusctl', ['-C', etcd.endpoints.join(','), 'volume', 'list', '--json']);
    assert.equal(r.code, 0, r.stderr);
  });
});
