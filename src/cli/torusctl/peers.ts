import { Command } from 'commander';
import type { MetadataService } from '../../core/interfaces.js';
import { formatAgo, formatSize } from '../../core/units.js';
import { NEARLY_FULL, addPeersToRing, judgeBalance, peerStatuses, removePeersFromRing, type PeerStatus } from '../../server/cluster.js';
import { ringWarnings } from '../../ring/index.js';
import { withMeta } from '../shared/context.js';
import { printJson, renderCsv, renderTable } from '../shared/output.js';

interface ListOpts {
  json?: boolean;
  csv?: boolean;
  si?: boolean;
}

function peerJson(p: PeerStatus, blockSize: number): Record<string, unknown> {
  const i = p.info;
  return {
    uuid: p.uuid,
    address: p.address,
    member: p.member,
    inRing: p.inRing,
    size: i ? i.totalBlocks * blockSize : null,
    used: i ? i.usedBlocks * blockSize : null,
    updated: i ? new Date(i.lastSeen).toISOString() : null,
    lastSeen: i?.lastSeen ?? null,
    httpAddress: i?.httpAddress ?? '',
    version: i?.version ?? '',
    nearlyFull: i ? i.usedBlocks >= NEARLY_FULL * i.totalBlocks : false,
    rebalance: i?.rebalance ?? null,
  };
}

function rebalanceCell(p: PeerStatus, blockSize: number, si: boolean): string {
  const r = p.info?.rebalance;
  if (!r) return '';
  const rate = `${formatSize(Math.round(r.rate), si)}/sec`;
  return r.rebalancing ? `${rate} (${formatSize(r.bytesLeft || r.blocksLeft * blockSize, si)} left)` : rate;
}

export async function listPeers(meta: MetadataService, opts: ListOpts): Promise<void> {
  const [g, { ring, peers }] = await Promise.all([meta.globalMetadata(), peerStatuses(meta)]);
  const bs = g.blockSize;
  if (opts.json) {
    printJson(peers.map((p) => peerJson(p, bs)));
    return;
  }
  const head = ['ADDRESS', 'UUID', 'SIZE', 'USED', 'MEMBER', 'UPDATED', 'REB/REP DATA'];
  const now = Date.now();
  const rows = peers.map((p) =>
    p.info
      ? [p.address, p.uuid, formatSize(p.info.totalBlocks * bs, opts.si), formatSize(p.info.usedBlocks * bs, opts.si), p.member, formatAgo(now - p.info.lastSeen), rebalanceCell(p, bs, opts.si ?? false)]
      : ['', p.uuid, '???', '???', p.member, 'Missing', ''],
  );
  if (opts.csv) {
    process.stdout.write(`${renderCsv(head, rows)}\n`);
    return;
  }
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
    if (p.info && p.info.usedBlocks >= NEARLY_FULL * p.info.totalBlocks)
      process.stderr.write(`warning: peer ${p.address} is ${((100 * p.info.usedBlocks) / p.info.totalBlocks).toFixed(0)}% full\n`);
}

function listOptions(cmd: Command): Command {
  return cmd
    .option('--json', 'print JSON: sizes in bytes, times as ISO 8601')
    .option('--csv', 'print CSV')
    .option('--si', 'sizes in powers of 1000')
    .action(async (opts: ListOpts, c: Command) => withMeta(c, (meta) => listPeers(meta, opts)));
}

export function listPeersCommand(): Command {
  return listOptions(new Command('list-peers').description('show the storage nodes, their capacity, and whether they are in the ring'));
}

export function peerCommand(): Command {
  const peer = new Command('peer').description('manage ring membership of storage nodes');
  peer.addCommand(listOptions(new Command('list').description('same as list-peers')));
  peer.addCommand(
    new Command('add')
      .description('put running peers into service (they start storing data)')
      .argument('[peers...]', 'peer addresses or UUIDs')
      .option('--all-peers', 'add every running peer')
      .action(async (sel: string[], opts: { allPeers?: boolean }, c: Command) =>
        withMeta(c, async (meta) => {
          const { added, ring } = await addPeersToRing(meta, sel, opts.allPeers ?? false);
          for (const p of added) process.stdout.write(`added ${p.address} ${p.uuid}\n`);
          process.stdout.write(`ring version ${ring.version}: ${ring.peers.length} member(s), replication ${ring.replication}\n`);
          for (const w of ringWarnings(ring)) process.stderr.write(`warning: ${w}\n`);
        }),
      ),
  );
  peer.addCommand(
    new Command('remove')
      .description('take peers out of service; their data drains to the remaining peers')
      .argument('<peers...>', 'peer addresses or UUIDs')
      .option('--force', 'remove a peer that is down (gone for good): its data re-replicates from the other copies')
      .action(async (sel: string[], opts: { force?: boolean }, c: Command) =>
        withMeta(c, async (meta) => {
          const { removed, ring } = await removePeersFromRing(meta, sel, opts.force ?? false);
          for (const u of removed) process.stdout.write(`removed ${u}\n`);
          process.stdout.write(`ring version ${ring.version}: ${ring.peers.length} member(s), replication ${ring.replication}\n`);
          for (const w of ringWarnings(ring)) process.stderr.write(`warning: ${w}\n`);
        }),
      ),
  );
  return peer;
}
