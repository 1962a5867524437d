import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { WORKLOAD, ipClusterUnavailable, startIpCluster, type IpCluster } from '../helpers/ip-cluster.js';
import type { CopyReport } from '../helpers/copies.js';
import { netnsUnavailable } from '../helpers/netns.js';
import { WorkloadProc, type SyncEvent } from '../helpers/workload-proc.js';

// Partitions, with real addresses: etcd, three storage nodes (R=2), the client workload and an
// admin host each in a network namespace of their own on one bridge (10.0.9.0/24). Faults are
// nftables rules inside one host's namespace.
//
// 1. One of the volume's journal replicas is cut off from everything. The workload keeps syncing
//    with no I/O error (the journal moves to replicas that work, blocks spill to the next peer,
//    reads fall through to the other replica); `torusctl health`
//    reports the node down once its lease expires. Healed, it heartbeats again, is no longer
//    down, and the cluster converges: every live block on all of its ring owners, R copies
//    exactly; the data reads back exactly.
// 2. The client is cut off from etcd only. A flush needs no etcd (it appends to the journal), so
//    syncs go on until the client gives its lease up for lost; then they fail, also after the cut
//    is healed, and the head never moves after the lease expired. A new writer then opens the
//    volume (fencing the old one's journal) and sees exactly the last successful sync's data.
//
// Nothing here asserts a duration: every wait is bounded, and a timeout is a failure only
// because the behaviour did not happen at all.

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
const skip = ipClusterUnavailable(netnsUnavailable());
if (skip) console.log(`# skipping partition tests: ${skip}`);

interface Health {
  healthy: boolean;
  downPeers: string[];
  underReplicatedBlocks: number;
  rebalancing: boolean;
}

interface PeerRow {
  uuid: string;
  member: string;
}

interface ProbeSha {
  sha: string;
  head: { root: unknown; epoch: number };
}

async function sleep(ms: number): Promise<void> {
  await new Promise((r) => setTimeout(r, ms));
}

/** Polls `fn` every 300 ms until it returns a value other than undefined/false; bounded. */
async function poll<T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last = '';
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined && v !== false) return v;
    } catch (err) {
      last = (err as Error).message;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${last}` : ''}`);
    await sleep(300);
  }
}

describe('partitions between network namespaces', { skip }, () => {
  let c: IpCluster;
  const workloads: WorkloadProc[] = [];

  before(async () => {
    c = await startIpCluster({ nodes: 3, replication: 2, blockSize: '64KiB', torusdArgs: ['--rebalance-interval', '1s', '--gc-interval', '2s'] });
  });

  after(async () => {
    for (const w of workloads) w.kill();
    await c?.stop();
  });

  const health = async (): Promise<Health> => {
    // Exit status 1 means "not healthy"; the JSON is printed either way.
    const r = await c.ctl(['health', '--json']);
    if (r.code !== 0 && r.code !== 1) throw new Error(`torusctl health exited ${r.code}: ${r.stderr}`);
    return JSON.parse(r.stdout) as Health;
  };

  const startWorkload = (volume: string): WorkloadProc => {
    const w = new WorkloadProc(c.startScript(c.client, WORKLOAD, [c.etcd.endpoint, volume, '--fill', '--writes', '4', '--max-write', String(96 * 1024), '--interval', '50', '--max-ms', '200000']));
    workloads.push(w);
    return w;
  };

  test('a storage node cut off: I/O goes on, health reports it down; healed, it rejoins and every block is back on its R owners', async () => {
    await c.ctlOk(['volume', 'create-block', 'p', String(SIZE)]);
    const w = startWorkload('p');
    await w.until((e) => e.ev === 'filled', 'the volume to be filled', 60_000);
    await w.syncedSince(0, 3, 'syncs before the cut', 30_000);

    // A node the journal is on, so that every flush needs it until the journal moves.
    const info = JSON.parse(await c.ctlOk(['volume', 'info', 'p', '--json'])) as { journal: { replicas: string[] } };
    const victim = c.nodes.find((n) => info.journal.replicas.includes(n.uuid));
    assert.ok(victim, `a journal replica among the nodes: ${JSON.stringify(info.journal)}`);
    const tCut = Date.now();
    c.cut(victim.host);
    const movesAtCut = Math.max(0, ...w.syncs.map((s) => s.journalMoves ?? 0));

    const downHealth = await poll('health to report the cut-off node down', async () => {
      const h = await health();
      return h.downPeers.includes(victim.uuid) ? h : undefined;
    }, 45_000);
    assert.equal(downHealth.healthy, false);
    const human = await c.ctl(['health']);
    assert.equal(human.code, 1, 'health exits 1 with a member down');
    assert.match(human.stdout, /^DEGRADED/);
    assert.match(human.stdout, new RegExp(`down: ${victim.uuid}`));
    const peers = JSON.parse(await c.ctlOk(['list-peers', '--json'])) as PeerRow[];
    assert.equal(peers.find((p) => p.uuid === victim.uuid)?.member, 'DOWN');

    // Syncs that started after the cut, with the node already seen down: they all succeed.
    const tDown = Date.now();
    await w.syncedSince(tDown, 5, 'syncs while the node is cut off', 90_000);
    assert.deepEqual(w.errors, [], `no I/O error while the node is cut off:\n${w.tail()}`);
    const duringCut = w.syncs.filter((s) => s.t >= tCut);
    assert.ok(duringCut.length >= 5);
    const movesNow = Math.max(...duringCut.map((s) => s.journalMoves ?? 0));
    assert.ok(movesNow > movesAtCut, `the journal moved off the cut-off node (${movesAtCut} -> ${movesNow} moves)`);
    const spillsNow = Math.max(...duringCut.map((s) => s.spills ?? 0));

    const tHeal = Date.now();
    c.heal(victim.host);
    // Generous: the node's etcd connection comes back only at grpc's next reconnect attempt,
    // whose backoff grows with the length of the cut (docs/failure-guide.md).
    await poll('the node to heartbeat again (OK in list-peers, not down in health)', async () => {
      const rows = JSON.parse(await c.ctlOk(['list-peers', '--json'])) as PeerRow[];
      if (rows.find((p) => p.uuid === victim.uuid)?.member !== 'OK') return undefined;
      return !(await health()).downPeers.includes(victim.uuid);
    }, 150_000);
    const tBack = Date.now();
    await w.syncedSince(Date.now(), 3, 'syncs after the heal', 60_000);
    const closed = await w.stop();
    assert.deepEqual(w.errors, [], `no I/O error at any point:\n${w.tail()}`);
    assert.equal(closed.finalSyncOk, true, JSON.stringify(closed));
    assert.equal(closed.verified, true, 'the writer read the whole volume back exactly');

    // Convergence, counted by asking every node for every live block.
    const report = await poll('every live block on all of its R owners, R copies exactly', async () => {
      const r = await c.probe<CopyReport>(['copies', c.etcd.endpoint]);
      return r.live > 0 && r.min >= 2 && r.max === 2 && r.misplaced === 0 ? r : undefined;
    }, 120_000);
    assert.equal(report.histogram['2'], report.live);
    const balanced = await c.ctl(['rebalance', 'status', '--watch', '--interval', '500ms', '--timeout', '60s'], 90_000);
    assert.equal(balanced.code, 0, `rebalance status --watch: ${balanced.stdout}${balanced.stderr}`);
    assert.match(balanced.stdout, /balanced: nothing to move/);
    const h = await poll('health to be HEALTHY', async () => {
      const x = await health();
      return x.healthy ? x : undefined;
    }, 60_000);
    assert.equal(h.underReplicatedBlocks, 0);

    // Another process, elsewhere on the network, reads exactly what the writer synced last.
    const read = await c.probe<ProbeSha>(['sha', c.etcd.endpoint, 'p']);
    assert.equal(read.sha, closed.synced);
    console.log(`# node cut at +0 s, seen down at +${((tDown - tCut) / 1000).toFixed(1)} s, healed at +${((tHeal - tCut) / 1000).toFixed(1)} s, back at +${((tBack - tCut) / 1000).toFixed(1)} s; ` +
      `${duringCut.length} syncs during the cut, slowest ${Math.max(...duringCut.map((s) => s.ms))} ms; journal moves ${movesNow}, spills ${spillsNow}, read fallbacks ${closed.fallbacks}`);
  });

  test('the client cut off from etcd: its syncs go on until it gives its lease up, then fail; the head never moves after expiry; a new writer sees the last successful sync', async () => {
    await c.ctlOk(['volume', 'create-block', 'f', String(SIZE)]);
    const w = startWorkload('f');
    await w.until((e) => e.ev === 'filled', 'the volume to be filled', 60_000);
    await w.syncedSince(0, 3, 'syncs before the cut', 30_000);

    c.cutFrom(c.client, c.etcd.ip);
    const tCut = Date.now();
    const volumes = async (): Promise<{ name: string; status: string }[]> => JSON.parse(await c.ctlOk(['volume', 'list', '--json'])) as { name: string; status: string }[];
    await poll('the lock to expire with the lease (volume f free)', async () => (await volumes()).find((v) => v.name === 'f')?.status === 'free', 60_000);
    const tFree = Date.now();
    const headAtExpiry = await c.probe<ProbeSha>(['sha', c.etcd.endpoint, 'f']);
    // Flushes reach the journal without etcd: until the client gives its lease up (no renewal for
    // twice its TTL), they succeed; nobody has fenced the journal, so the next writer replays them.
    await w.until((e) => e.ev === 'sync' && !e.ok && e.t >= tCut, 'a failed sync while cut off', 60_000);
    const cutFailure = w.syncs.find((s) => !s.ok && s.t >= tCut)!;
    assert.equal(cutFailure.code, 'LOCKED', JSON.stringify(cutFailure));
    const okDuringCut = w.syncs.filter((s) => s.ok && s.t >= tCut).length;

    const tHeal = Date.now();
    c.heal(c.client);
    // Back in touch with etcd, the writer is fenced: LOCKED, sync after sync.
    await w.until((_e, all) => all.filter((x) => x.ev === 'sync' && !x.ok && x.t >= tHeal && x.code === 'LOCKED').length >= 2, 'LOCKED syncs after the heal', 90_000);
    const afterHeal = w.syncs.filter((s) => s.t >= tHeal);
    assert.deepEqual(afterHeal.filter((s: SyncEvent) => s.ok), [], 'no sync succeeds once the client gave its lease up');
    const headNow = await c.probe<ProbeSha>(['sha', c.etcd.endpoint, 'f']);
    // The head in etcd: what a read sees changes while syncs reach the journal, the head not.
    assert.deepEqual(headNow.head, headAtExpiry.head, 'the head never moved after the lease expired');

    const closed = await w.stop();
    assert.equal(closed.finalSyncOk, false, 'its last sync on the way out fails too');
    assert.equal(closed.finalError?.code, 'LOCKED', JSON.stringify(closed));

    // A new writer, from the client's namespace now that it is healed, takes the lock, fences the
    // old journal and replays it: every acknowledged sync, the ones during the cut included. The
    // sync that failed first may have reached the journal before the client refused it.
    const taken = await c.probe<ProbeSha>(['take', c.etcd.endpoint, 'f'], c.client);
    const acceptable = [closed.synced, ...(closed.inflight ? [closed.inflight] : [])];
    assert.ok(acceptable.includes(taken.sha), 'the new writer sees the last successful sync (or the first failed one)');
    console.log(`# lock free ${((tFree - tCut) / 1000).toFixed(1)} s after the cut; ${okDuringCut} syncs succeeded during the cut; ${afterHeal.length} after the heal, all failed: ` +
      `${[...new Set(afterHeal.map((s) => s.code))].join(', ')}; first: ${afterHeal[0]?.msg ?? ''}`);
  });
});
