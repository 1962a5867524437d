import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, test } from 'node:test';
import { buildLiveSet } from '../../src/volume/gc.js';
import { VolumeClient } from '../../src/volume/client.js';
import { VolumeMeta } from '../../src/volume/meta.js';
import type { BlockVolume } from '../../src/volume/volume.js';
import { startCluster, type TestCluster } from '../helpers/cluster.js';
import { eventually, ok, runCli } from '../helpers/procs.js';
import { openVolumeClient } from '../helpers/certs.js';

// Membership changes under a running write/verify workload: add a node, remove one (drain), lose
// one for good (kill -9, force-remove), raise replication. After each, every synced byte reads
// back exactly and every live block has R copies; the workload never sees an I/O error.

let c: TestCluster;
let C: string[];
const MiB = 1024 * 1024;
const SIZE = 24 * MiB;

let vc: VolumeClient;
let vol: BlockVolume;
const model = Buffer.alloc(SIZE);
let stop = false;
let workload: Promise<void> = Promise.resolve();
const errors: string[] = [];
let syncs = 0;
// A small rebalance budget (64 KiB blocks: 4 per PUT), so the joins and losses below run with it binding.
const ARGS = ['--rebalance-interval', '1s', '--gc-interval', '2s', '--rebalance-memory', '2MiB'];

// The workload and the checks take turns: a check runs between two of the workload's syncs, so
// the model is exactly what the head should hold.
let gate: Promise<unknown> = Promise.resolve();
function exclusive<T>(fn: () => Promise<T>): Promise<T> {
  const run = gate.then(fn);
  gate = run.catch(() => undefined);
  return run;
}

before(async () => {
  c = await startCluster({ nodes: 4, replication: 2, blockSize: '64KiB', size: '2GiB', torusdArgs: ARGS });
  C = ['-C', c.etcd.endpoint];
  // Node 3 starts outside the ring: it joins in the first test.
  await ok('torusctl', [...C, 'peer', 'remove', c.nodes[3]!.address]);
  await eventually('node 3 drained before the test', async () => (await c.meta.getPeers()).find((p) => p.address === c.nodes[3]!.address)?.usedBlocks === 0);
  await ok('torusctl', [...C, 'volume', 'create-block', 'w', String(SIZE)]);
  vc = await openVolumeClient(c.meta);
  vol = await vc.openVolume('w');
  const first = randomBytes(SIZE);
  await vol.write(0, first);
  first.copy(model);
  await vol.flush();
  workload = (async () => {
    // Bounded: it stops when told, and never runs more than 10 minutes.
    const deadline = Date.now() + 600_000;
    while (!stop && Date.now() < deadline) {
      try {
        await exclusive(async () => {
          for (let i = 0; i < 4; i++) {
            const off = Math.floor(Math.random() * (SIZE - 1));
            const d = randomBytes(Math.min(SIZE - off, 1 + Math.floor(Math.random() * 128 * 1024)));
            await vol.write(off, d);
            d.copy(model, off);
          }
          await vol.flush();
          syncs++;
          const off = Math.floor(Math.random() * (SIZE - 65536));
          if (!(await vol.read(off, 65536)).equals(model.subarray(off, off + 65536))) errors.push(`read mismatch at ${off}`);
        });
      } catch (err) {
        // Every replica's error (a journal failure names only the first), and where the journal is.
        const all = (err as { errors?: string[] }).errors;
        errors.push(`${(err as Error).message}${all ? ` [${all.join('; ')}]` : ''} (journal ${JSON.stringify(vol.head.journal)}, moves ${vol.stats.journalMoves})`);
      }
      // A steady, modest rate: the point is I/O during membership changes, not filling disks.
      await new Promise((r) => setTimeout(r, 20));
    }
  })();
});

after(async () => {
  stop = true;
  await workload;
  await vol?.close().catch(() => undefined);
  await vc?.close().catch(() => undefined);
  await c?.stop();
});

/** For each live ref of the volume, how many running nodes hold it. */
async function copyCounts(): Promise<number[]> {
  const live = await buildLiveSet(new VolumeMeta(c.meta.kv()), vc.block.distributor);
  return c.copies(live.refs());
}

async function converged(r: number, what: string): Promise<void> {
  await eventually(
    `${what}: every live block has ${r} copies`,
    async () => {
      const counts = await copyCounts();
      return counts.length > 0 && counts.every((n) => n >= r);
    },
    180_000,
  );
  const st = await runCli('torusctl', [...C, 'rebalance', 'status', '--watch', '--interval', '500ms', '--timeout', '60s']);
  assert.equal(st.code, 0, `rebalance status --watch: ${st.stdout}${st.stderr}`);
  assert.match(st.stdout, /balanced: nothing to move/);
}

async function verify(what: string): Promise<void> {
  const before = syncs;
  await eventually(`${what}: the workload keeps syncing`, async () => syncs > before + 2, 60_000).catch((err: Error) => {
    throw new Error(`${err.message} (${syncs - before} syncs; last workload errors: ${errors.slice(-3).join(' | ') || 'none'}; volume ${JSON.stringify(vol.stats)})`);
  });
  await exclusive(async () => {
    await vol.flush();
    assert.ok((await vol.read(0, SIZE)).equals(model), `${what}: the writer reads back exactly what it wrote`);
    const other = await openVolumeClient(c.meta);
    try {
      const ro = await other.openVolume('w', { readOnly: true });
      assert.ok((await ro.read(0, SIZE)).equals(model), `${what}: another client reads the synced head exactly`);
      await ro.close();
    } finally {
      await other.close();
    }
  });
  assert.deepEqual(errors, [], `${what}: the workload saw no I/O errors`);
}

test('a node joins: blocks move to it; R copies; no I/O errors', async () => {
  const add = await ok('torusctl', [...C, 'peer', 'add', c.nodes[3]!.address]);
  assert.match(add, /ring version/);
  // Every block already had R copies before the add, so convergence alone proves nothing here:
  // first the new node must report blocks of its own (published with its next heartbeat).
  await eventually(
    'the new node took blocks',
    async () => ((await c.meta.getPeers()).find((p) => p.address === c.nodes[3]!.address)?.usedBlocks ?? 0) > 0,
    120_000,
  );
  await converged(2, 'after add');
  await verify('after add');
  // The nodes that sent blocks held them within --rebalance-memory, and say so on /metrics.
  let peak = 0;
  for (const n of c.nodes.slice(0, 3)) {
    const text = await (await fetch(`http://127.0.0.1:${n.httpPort}/metrics`)).text();
    const value = (name: string): number => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1]);
    assert.equal(value('torus_rebalance_inflight_bytes_limit'), 2 * MiB);
    assert.ok(value('torus_rebalance_inflight_bytes_peak') <= 2 * MiB, `peak ${value('torus_rebalance_inflight_bytes_peak')}`);
    assert.ok(value('torus_rebalance_inflight_bytes') >= 0);
    peak = Math.max(peak, value('torus_rebalance_inflight_bytes_peak'));
  }
  assert.ok(peak > 0, 'some node had blocks in flight');
});

test('a node is removed: it drains to nothing; R copies remain', async () => {
  await ok('torusctl', [...C, 'peer', 'remove', c.nodes[1]!.address]);
  await eventually('node 1 drained', async () => (await c.meta.getPeers()).find((p) => p.address === c.nodes[1]!.address)?.usedBlocks === 0, 120_000);
  await converged(2, 'after remove');
  await verify('after remove');
});

test('a node is lost for good (kill -9, remove --force): every block is back to R copies', async () => {
  const lost = c.uuidOf(2);
  await c.kill(2);
  await eventually('node 2 seen DOWN', async () => {
    const h = JSON.parse((await runCli('torusctl', [...C, 'health', '--json'])).stdout) as { downPeers: string[] };
    return h.downPeers.includes(lost);
  });
  const h0 = await runCli('torusctl', [...C, 'health']);
  assert.notEqual(h0.code, 0, 'health is not OK with a member down');
  assert.match(h0.stdout, /^DEGRADED/);
  // Reads and writes keep working while it is down and still a member.
  await verify('while down');
  const r = await runCli('torusctl', [...C, 'peer', 'remove', lost]);
  assert.notEqual(r.code, 0, 'a down member is not removed without --force');
  assert.match(r.stderr, /--force/);
  await ok('torusctl', [...C, 'peer', 'remove', '--force', lost]);
  await converged(2, 'after force-remove');
  await verify('after force-remove');
  // The workload goes on writing, and a node's published status is as of its last pass and
  // heartbeat: health turns HEALTHY once a pass has seen the converged state.
  const h = await eventually('health HEALTHY after force-remove', async () => {
    const r = await runCli('torusctl', [...C, 'health']);
    return r.code === 0 && r;
  }, 60_000);
  assert.match(h.stdout, /^HEALTHY/);
});

test('a gone node returns and rejoins, replication raised to 3: third copies appear', async () => {
  // Two members left (0 and 3); node 1 rejoins, and node 2 comes back on its old disk (stale
  // blocks and all) and joins again, so that four members hold three copies.
  await c.restart(2);
  await ok('torusctl', [...C, 'peer', 'add', c.nodes[1]!.address, c.nodes[2]!.address]);
  await ok('torusctl', [...C, 'ring', 'set-replication', '3']);
  await converged(3, 'after set-replication 3');
  await verify('after set-replication 3');
});

test('a node that was down comes back and catches up', async () => {
  await c.kill(0);
  await verify('node 0 down');
  // Restarted on its data dir: the ring never changed, so it is still an owner.
  await c.restart(0);
  await converged(3, 'after node 0 returned');
  await verify('after node 0 returned');
});
