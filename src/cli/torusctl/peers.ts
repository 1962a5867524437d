import { Command } from 'commander';
import type { MetadataService } from '../../core/interfaces.js';
import { formatAgo, parseDuration } from '../../core/units.js';
import { NEARLY_FULL, addPeersToRing, judgeBalance, peerStatuses, removePeersFromRing, resolveMember, type PeerStatus } from '../../server/cluster.js';
import { endMaintenance, startMaintenance } from '../../server/peer-records.js';
import { ringWarnings } from '../../ring/index.js';
import type { RingModel } from '../../core/models.js';
import { withMeta } from '../shared/context.js';
import { emit, isoTime, outputOptions, printJson, renderCsv, renderTable, sizeText, type OutputOpts } from '../shared/output.js';

/** Size, use and last heartbeat: the live record's, or for a down member the last known one's. */
function facts(p: PeerStatus, blockSize: number): { size: number; used: number; lastSeen: number } | undefined {
  const src = p.info ?? p.known;
  if (!src) return undefined;
  const bs = src.blockSize || blockSize;
  return { size: src.totalBlocks * bs, used: src.usedBlocks * bs, lastSeen: src.lastSeen };
}

function peerJson(p: PeerStatus, blockSize: number): Record<string, unknown> {
  const f = facts(p, blockSize);
  const r = p.info?.rebalance;
  return {
    uuid: p.uuid,
    address: p.address,
    member: p.member,
    inRing: p.inRing,
    size: f?.size ?? null,
    used: f?.used ?? null,
    updated: isoTime(f?.lastSeen),
    httpAddress: p.info?.httpAddress ?? p.known?.httpAddress ?? '',
    version: p.info?.version ?? '',
    nearlyFull: f ? f.size > 0 && f.used >= NEARLY_FULL * f.size : false,
    maintenance: p.maintenance ? { since: p.maintenance.since, until: p.maintenance.until, by: p.maintenance.by, reason: p.maintenance.reason } : null,
    rebalance: r ? { ...r, lastFinish: isoTime(r.lastFinish) } : null,
  };
}

function rebalanceCell(p: PeerStatus, blockSize: number, o: OutputOpts): string {
  const r = p.info?.rebalance;
  if (!r || p.member === 'DOWN' || p.member === 'MAINT') return '';
  const rate = `${sizeText(Math.round(r.rate), o)}/sec`;
  return r.rebalancing ? `${rate} (${sizeText(r.bytesLeft || r.blocksLeft * blockSize, o)} left)` : rate;
}

function memberCell(p: PeerStatus): string {
  return p.maintenance && p.member !== 'MAINT' ? `${p.member} (maint)` : p.member;
}

export async function listPeers(meta: MetadataService, opts: OutputOpts): Promise<void> {
  const [g, { ring, peers }] = await Promise.all([meta.globalMetadata(), peerStatuses(meta)]);
  const bs = g.blockSize;
  if (opts.json) {
    printJson(peers.map((p) => peerJson(p, bs)));
    return;
  }
  const head = ['ADDRESS', 'UUID', 'SIZE', 'USED', 'MEMBER', 'UPDATED', 'REB/REP DATA'];
  if (opts.csv) {
    // Machine values: bytes, ISO times, the rate in bytes per second.
    const rows = peers.map((p) => {
      const f = facts(p, bs);
      const r = p.info?.rebalance;
      return [p.address, p.uuid, f ? String(f.size) : '', f ? String(f.used) : '', p.member, isoTime(f?.lastSeen) ?? '', r ? String(Math.round(r.rate)) : ''];
    });
    process.stdout.write(`${renderCsv(head, rows)}\n`);
    return;
  }
  const now = Date.now();
  const rows = peers.map((p) => {
    const f = facts(p, bs);
    const down = p.member === 'DOWN' || p.member === 'MAINT';
    // A down member's figures are the last it reported: say how old they are.
    const updated = f ? (down ? `last seen ${formatAgo(now - f.lastSeen)}` : formatAgo(now - f.lastSeen)) : 'never seen';
    return [p.address, p.uuid, f ? sizeText(f.size, opts) : '', f ? sizeText(f.used, opts) : '', memberCell(p), updated, rebalanceCell(p, bs, opts)];
  });
  let total = 0;
  let used = 0;
  for (const p of peers) {
    total += p.info?.totalBlocks ?? 0;
    used += p.info?.usedBlocks ?? 0;
  }
  // Balanced: no node moving data or yet to pass on the current ring, no ring member missing.
  const balance = judgeBalance(ring, peers);
  const usage = total > 0 ? ((used / total) * 100).toFixed(2) : '0.00';
  process.stdout.write(`${renderTable(head, rows)}\nBalanced: ${balance.balanced} Usage: ${usage.padStart(5)}%\n`);
  for (const r of balance.reasons) process.stdout.write(`  - ${r}\n`);
  for (const w of ringWarnings(ring)) process.stderr.write(`warning: ${w}\n`);
  for (const p of peers)
    if (p.info && p.member !== 'DOWN' && p.info.usedBlocks >= NEARLY_FULL * p.info.totalBlocks)
      process.stderr.write(`warning: peer ${p.address} is ${((100 * p.info.usedBlocks) / p.info.totalBlocks).toFixed(0)}% full\n`);
}

function listOptions(cmd: Command): Command {
  return outputOptions(cmd, { csv: true, bytes: true })
    .option('--si', 'sizes in powers of 1000')
    .action(async (opts: OutputOpts, c: Command) => withMeta(c, (meta) => listPeers(meta, opts)));
}

export function listPeersCommand(): Command {
  return listOptions(new Command('list-peers').description('show the storage nodes, their capacity, and whether they are in the ring'));
}

function ringJson(ring: RingModel): Record<string, unknown> {
  return { version: ring.version, type: ring.type, replication: ring.replication, members: ring.peers.length };
}

function ringLine(ring: RingModel): string {
  for (const w of ringWarnings(ring)) process.stderr.write(`warning: ${w}\n`);
  return `ring version ${ring.version}: ${ring.peers.length} member(s), replication ${ring.replication}`;
}

function maintenanceCommand(): Command {
  const m = new Command('maintenance').description(
    'planned downtime of a ring member (like Ceph\'s noout): while it lasts, the member shows MAINT rather than DOWN, health passes, and rebalancers stop calling it; after --for, normal rules resume',
  );
  m.addCommand(
    outputOptions(
      new Command('on')
        .description('start (or extend) a maintenance window for a ring member')
        .argument('<peer>', 'peer address or UUID (a down member: its UUID or last address)')
        .option('--for <duration>', 'how long the window lasts; past it the member counts as DOWN again', '1h')
        .option('--reason <text>', 'shown in list-peers --json and health', ''),
    ).action(async (sel: string, opts: { for: string; reason: string; json?: boolean }, c: Command) =>
      withMeta(c, async (meta) => {
        const forMs = parseDuration(opts.for);
        const member = await resolveMember(meta, sel);
        const rec = await startMaintenance(meta.kv(), member.uuid, forMs, opts.reason);
        emit(opts, { ...rec, address: member.address }, `maintenance on for ${member.address || member.uuid} (${member.uuid}) until ${rec.until}`);
      }),
    ),
  );
  m.addCommand(
    outputOptions(
      new Command('off').description('end a maintenance window: normal rules apply again at once').argument('<peer>', 'peer address or UUID'),
    ).action(async (sel: string, opts: { json?: boolean }, c: Command) =>
      withMeta(c, async (meta) => {
        const member = await resolveMember(meta, sel);
        const was = await endMaintenance(meta.kv(), member.uuid);
        const who = `${member.address || member.uuid} (${member.uuid})`;
        emit(opts, { uuid: member.uuid, address: member.address, ended: was }, was ? `maintenance off for ${who}` : `${who} was not in maintenance`);
      }),
    ),
  );
  return m;
}

export function peerCommand(): Command {
  const peer = new Command('peer').description('manage ring membership of storage nodes');
  peer.addCommand(listOptions(new Command('list').description('same as list-peers')));
  peer.addCommand(
    outputOptions(
      new Command('add')
        .description('put running peers into service (they start storing data)')
        .argument('[peers...]', 'peer addresses or UUIDs')
        .option('--all-peers', 'add every running peer'),
    ).action(async (sel: string[], opts: { allPeers?: boolean; json?: boolean }, c: Command) =>
      withMeta(c, async (meta) => {
        const { added, ring } = await addPeersToRing(meta, sel, opts.allPeers ?? false);
        emit(
          opts,
          { added: added.map((p) => ({ uuid: p.uuid, address: p.address })), ring: ringJson(ring), warnings: ringWarnings(ring) },
          [...added.map((p) => `added ${p.address} ${p.uuid}`), ringLine(ring)].join('\n'),
        );
      }),
    ),
  );
  peer.addCommand(
    outputOptions(
      new Command('remove')
        .description('take peers out of service; their data drains to the remaining peers')
        .argument('<peers...>', 'peer addresses or UUIDs (a down member: its UUID or last address)')
        .option('--force', 'remove a peer that is down (gone for good): its data re-replicates from the other copies')
        .option('--allow-degraded', 'allow fewer members than the replication factor (fewer copies until peers join)'),
    ).action(async (sel: string[], opts: { force?: boolean; allowDegraded?: boolean; json?: boolean }, c: Command) =>
      withMeta(c, async (meta) => {
        const { removed, ring } = await removePeersFromRing(meta, sel, opts.force ?? false, opts.allowDegraded ?? false);
        emit(opts, { removed, ring: ringJson(ring), warnings: ringWarnings(ring) }, [...removed.map((u) => `removed ${u}`), ringLine(ring)].join('\n'));
      }),
    ),
  );
  peer.addCommand(maintenanceCommand());
  return peer;
}

