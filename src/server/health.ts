import type { MetadataService } from '../core/interfaces.js';
import { formatSize } from '../core/units.js';
import { effectiveReplication } from '../ring/index.js';
import { NEARLY_FULL, downLine, judgeBalance, peerStatuses, plannedLine, waitingLine, type PeerStatus } from './cluster.js';

// Cluster health from what every node publishes in its heartbeat: one judgement for `torusctl
// health`, `rebalance status` and torusd's dashboard.

export type HealthStatus = 'HEALTHY' | 'MAINTENANCE' | 'DEGRADED';

export interface Health {
  /** HEALTHY; MAINTENANCE: only planned outages (and what they cause); DEGRADED: anything else. */
  status: HealthStatus;
  /** Not DEGRADED. */
  healthy: boolean;
  ringVersion: number;
  replication: { wanted: number; effective: number };
  members: number;
  downPeers: string[];
  /** Ring members down for maintenance, with its window. */
  maintenancePeers: { uuid: string; address: string; until: string; reason: string }[];
  nearlyFullPeers: { address: string; usedPercent: number }[];
  underReplicatedBlocks: number;
  /** Some live node is moving data, or has not finished a pass on the current ring yet. */
  rebalancing: boolean;
  /** Addresses of live nodes whose last finished pass was on an older ring than `ringVersion`. */
  waitingPeers: string[];
  blocksLeft: number;
  bytesLeft: number;
  rate: number;
  /** What makes the cluster DEGRADED. */
  problems: string[];
  /** What an operator should know that is planned: maintenance windows and what they cause. */
  notes: string[];
}

export function judgeHealth(ring: Parameters<typeof judgeBalance>[0], peers: readonly PeerStatus[]): Health {
  const b = judgeBalance(ring, peers);
  const full = peers
    .filter((p) => p.info && p.member !== 'DOWN' && p.member !== 'MAINT' && p.info.totalBlocks > 0 && p.info.usedBlocks >= NEARLY_FULL * p.info.totalBlocks)
    .map((p) => ({ address: p.address, usedPercent: Math.round((100 * p.info!.usedBlocks) / p.info!.totalBlocks) }));
  const effective = effectiveReplication(ring);
  const problems: string[] = [];
  const notes: string[] = [];
  // While a member is down for maintenance, the copies it holds are missing and the blocks written
  // meanwhile wait on other nodes to move back: expected, so noted rather than counted against health.
  const planned = b.planned.length > 0;
  const expected = (line: string): void => {
    (planned ? notes : problems).push(planned ? `${line} (expected during maintenance)` : line);
  };
  if (b.down.length > 0) problems.push(downLine(b.down));
  if (planned) notes.push(plannedLine(b.planned));
  if (effective < ring.replication) problems.push(`replication ${ring.replication} wanted, only ${effective} possible with ${ring.peers.length} member(s)`);
  if (b.underReplicated > 0) expected(`${b.underReplicated} block copies under-replicated`);
  for (const f of full) problems.push(`peer ${f.address} is ${f.usedPercent}% full`);
  const badCopies = peers.reduce((n, p) => n + (p.member !== 'DOWN' && p.member !== 'MAINT' ? (p.info?.scrub?.pending ?? 0) : 0), 0);
  if (badCopies > 0) problems.push(`${badCopies} bad block copies found by scrubbing wait for a good copy (torusctl scrub status)`);
  // Nodes publish their estimate in heartbeats, so right after a ring change it is still the last
  // pass's (zero): say nothing rather than "about 0 B left".
  if (b.moving.length > 0) expected(b.bytesLeft > 0 ? `rebalancing: about ${formatSize(b.bytesLeft)} left` : 'rebalancing: in progress');
  if (b.waiting.length > 0) problems.push(`rebalancing: ${waitingLine(b.waiting.length, ring.version)}`);
  const status: HealthStatus = problems.length > 0 ? 'DEGRADED' : planned ? 'MAINTENANCE' : 'HEALTHY';
  return {
    status,
    healthy: status !== 'DEGRADED',
    ringVersion: ring.version,
    replication: { wanted: ring.replication, effective },
    members: ring.peers.length,
    downPeers: b.down.map((p) => p.uuid),
    maintenancePeers: b.planned.map((p) => ({ uuid: p.uuid, address: p.address, until: p.maintenance?.until ?? '', reason: p.maintenance?.reason ?? '' })),
    nearlyFullPeers: full,
    underReplicatedBlocks: b.underReplicated,
    rebalancing: b.rebalancing,
    waitingPeers: b.waiting.map((p) => p.address),
    blocksLeft: b.blocksLeft,
    bytesLeft: b.bytesLeft,
    rate: b.rate,
    problems,
    notes,
  };
}

export async function clusterHealth(meta: MetadataService): Promise<Health> {
  const { ring, peers } = await peerStatuses(meta);
  return judgeHealth(ring, peers);
}
