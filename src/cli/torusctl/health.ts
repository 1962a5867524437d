import { Command } from 'commander';
import type { MetadataService } from '../../core/interfaces.js';
import { formatSize, parseDuration } from '../../core/units.js';
import { effectiveReplication } from '../../ring/index.js';
import { NEARLY_FULL, downLine, judgeBalance, peerStatuses, waitingLine } from '../../server/cluster.js';
import { withMeta } from '../shared/context.js';
import { printJson } from '../shared/output.js';
import { byteProgress } from '../shared/progress.js';

// Cluster health and rebalance progress, from what every node publishes in its heartbeat.

export interface Health {
  healthy: boolean;
  ringVersion: number;
  replication: { wanted: number; effective: number };
  members: number;
  downPeers: string[];
  nearlyFullPeers: { address: string; usedPercent: number }[];
  underReplicatedBlocks: number;
  /** Some live node is moving data, or has not finished a pass on the current ring yet. */
  rebalancing: boolean;
  /** Addresses of live nodes whose last finished pass was on an older ring than `ringVersion`. */
  waitingPeers: string[];
  blocksLeft: number;
  bytesLeft: number;
  rate: number;
  problems: string[];
}

export async function clusterHealth(meta: MetadataService): Promise<Health> {
  const { ring, peers } = await peerStatuses(meta);
  const b = judgeBalance(ring, peers);
  const full = peers
    .filter((p) => p.info && p.member !== 'DOWN' && p.info.totalBlocks > 0 && p.info.usedBlocks >= NEARLY_FULL * p.info.totalBlocks)
    .map((p) => ({ address: p.address, usedPercent: Math.round((100 * p.info!.usedBlocks) / p.info!.totalBlocks) }));
  const effective = effectiveReplication(ring);
  const problems: string[] = [];
  if (b.down.length > 0) problems.push(downLine(b.down));
  if (effective < ring.replication) problems.push(`replication ${ring.replication} wanted, only ${effective} possible with ${ring.peers.length} member(s)`);
  if (b.underReplicated > 0) problems.push(`${b.underReplicated} block copies under-replicated`);
  for (const f of full) problems.push(`peer ${f.address} is ${f.usedPercent}% full`);
  const badCopies = peers.reduce((n, p) => n + (p.member !== 'DOWN' ? (p.info?.scrub?.pending ?? 0) : 0), 0);
  if (badCopies > 0) problems.push(`${badCopies} bad block copies found by scrubbing wait for a good copy (torusctl scrub status)`);
  // Nodes publish their estimate in heartbeats, so right after a ring change it is still the last
  // pass's (zero): say nothing rather than "about 0 B left".
  if (b.moving.length > 0) problems.push(b.bytesLeft > 0 ? `rebalancing: about ${formatSize(b.bytesLeft)} left` : 'rebalancing: in progress');
  if (b.waiting.length > 0) problems.push(`rebalancing: ${waitingLine(b.waiting.length, ring.version)}`);
  return {
    healthy: problems.length === 0,
    ringVersion: ring.version,
    replication: { wanted: ring.replication, effective },
    members: ring.peers.length,
    downPeers: b.down.map((p) => p.uuid),
    nearlyFullPeers: full,
    underReplicatedBlocks: b.underReplicated,
    rebalancing: b.rebalancing,
    waitingPeers: b.waiting.map((p) => p.address),
    blocksLeft: b.blocksLeft,
    bytesLeft: b.bytesLeft,
    rate: b.rate,
    problems,
  };
}

export function healthCommand(): Command {
  return new Command('health')
    .description('cluster health at a glance: down peers, under-replicated blocks, nearly full peers, rebalancing')
    .option('--json', 'print JSON')
    .action(async (opts: { json?: boolean }, c: Command) =>
      withMeta(c, async (meta) => {
        const h = await clusterHealth(meta);
        if (opts.json) printJson(h);
        else {
          process.stdout.write(`${h.healthy ? 'HEALTHY' : 'DEGRADED'}: ring v${h.ringVersion}, ${h.members} member(s), replication ${h.replication.effective}/${h.replication.wanted}\n`);
          for (const p of h.problems) process.stdout.write(`  - ${p}\n`);
        }
        if (!h.healthy) process.exitCode = 1;
      }),
    );
}

export function rebalanceCommand(): Command {
  const reb = new Command('rebalance').description('data movement between storage nodes');
  reb.addCommand(
    new Command('status')
      .description('show rebalance progress (blocks and bytes left, rate, ETA); --watch follows it until done')
      .option('--json', 'print JSON')
      .option('-w, --watch', 'follow with a progress bar until the cluster is balanced')
      .option('--interval <duration>', 'with --watch: how often to look', '1s')
      .option('--timeout <duration>', 'with --watch: give up after this long (exit 1)', '1h')
      .action(async (opts: { json?: boolean; watch?: boolean; interval: string; timeout: string }, c: Command) =>
        withMeta(c, async (meta) => {
          const show = (h: Health): void => {
            if (opts.json) {
              printJson({
                rebalancing: h.rebalancing,
                ringVersion: h.ringVersion,
                waitingPeers: h.waitingPeers,
                blocksLeft: h.blocksLeft,
                bytesLeft: h.bytesLeft,
                rate: h.rate,
                underReplicatedBlocks: h.underReplicatedBlocks,
                downPeers: h.downPeers,
              });
              return;
            }
            const eta = h.rate > 0 ? `${Math.ceil(h.bytesLeft / h.rate)}s` : 'unknown';
            const left = h.blocksLeft > 0 ? `${h.blocksLeft} blocks (${formatSize(h.bytesLeft)}) left at ${formatSize(Math.round(h.rate))}/s, ETA ${eta}` : 'amount left not estimated yet';
            const waiting = h.waitingPeers.length > 0 ? `; ${waitingLine(h.waitingPeers.length, h.ringVersion)}` : '';
            process.stdout.write(h.rebalancing || h.underReplicatedBlocks > 0 ? `rebalancing: ${left}; ${h.underReplicatedBlocks} under-replicated${waiting}\n` : 'balanced: nothing to move\n');
          };
          let h = await clusterHealth(meta);
          if (!opts.watch) {
            show(h);
            return;
          }
          const every = parseDuration(opts.interval);
          const deadline = Date.now() + parseDuration(opts.timeout);
          const total = Math.max(1, h.bytesLeft);
          const bar = byteProgress(!opts.json && process.stderr.isTTY === true, total, 'rebalance');
          while ((h.rebalancing || h.underReplicatedBlocks > 0) && Date.now() < deadline) {
            bar.update(Math.max(0, total - h.bytesLeft));
            await new Promise((r) => setTimeout(r, every));
            h = await clusterHealth(meta);
          }
          bar.stop();
          show(h);
          if (h.rebalancing || h.underReplicatedBlocks > 0) process.exitCode = 1;
        }),
      ),
  );
  return reb;
}
