import { Command } from 'commander';
import type { MetadataService } from '../../core/interfaces.js';
import type { ScrubInfo } from '../../core/models.js';
import { formatAgo, formatSize, formatSpan } from '../../core/units.js';
import { peerStatuses, type MemberStatus } from '../../server/cluster.js';
import { withMeta } from '../shared/context.js';
import { printJson, renderTable } from '../shared/output.js';

// The storage nodes' background scrub, from what each publishes with its heartbeat.

export interface ScrubNodeStatus {
  uuid: string;
  address: string;
  member: MemberStatus;
  /** Null for a node that is down, or runs a version without a scrubber. */
  scrub: ScrubInfo | null;
}

export interface ScrubReport {
  nodes: ScrubNodeStatus[];
  /** Over the nodes that report: bad copies found, repaired, dropped, still waiting; orphaned blocks held and deleted. */
  totals: { errors: number; repaired: number; dropped: number; pending: number; orphanBlocks: number; orphansDeleted: number };
}

export async function scrubReport(meta: MetadataService): Promise<ScrubReport> {
  const { peers } = await peerStatuses(meta);
  const nodes = peers.map((p) => ({ uuid: p.uuid, address: p.address, member: p.member, scrub: p.member === 'DOWN' ? null : (p.info?.scrub ?? null) }));
  const totals = { errors: 0, repaired: 0, dropped: 0, pending: 0, orphanBlocks: 0, orphansDeleted: 0 };
  for (const n of nodes) for (const k of Object.keys(totals) as (keyof typeof totals)[]) totals[k] += n.scrub?.[k] ?? 0;
  return { nodes, totals };
}

function stateCell(s: ScrubInfo, now: number): string {
  if (s.intervalMs === 0) return 'off';
  if (s.passStartedAt) return `scrubbing at ${formatSize(s.rate)}/s`;
  return s.nextPassAt > now ? `idle, next pass in ${formatSpan(s.nextPassAt - now)}` : 'idle, next pass due';
}

function progressCell(s: ScrubInfo): string {
  if (!s.passStartedAt) return '-';
  const pct = Math.min(100, Math.floor((100 * s.passBytes) / Math.max(1, s.heldBytes)));
  return `${pct}% (${formatSize(s.passBytes)} of ${formatSize(s.heldBytes)})`;
}

function lastPassCell(s: ScrubInfo, now: number): string {
  if (!s.lastFinishedAt) return 'none yet';
  return `${formatAgo(now - s.lastFinishedAt)}: ${formatSize(s.lastBytes)} in ${formatSpan(s.lastFinishedAt - s.lastStartedAt)}`;
}

function orphanLines(n: ScrubNodeStatus, now: number): string[] {
  const s = n.scrub;
  if (!s) return [];
  const grace = s.orphanGraceMs > 0 ? `deleted ${formatSpan(s.orphanGraceMs)} after first seen` : 'never deleted (--orphan-grace 0)';
  return s.orphanGroups.map((g) => {
    const what = g.kind === 'unknown-type' ? `of block type ${g.id}, unknown to it` : `of volume id ${g.id}, which etcd never handed out`;
    return `${n.address} holds ${g.blocks} orphaned block(s) ${what}, first seen ${formatAgo(now - g.since)}; ${grace}`;
  });
}

export function scrubCommand(): Command {
  const scrub = new Command('scrub').description('background checks of every stored block, and repair of bad copies');
  scrub.addCommand(
    new Command('status')
      .description('per storage node: scrub progress, last pass, bad copies found and repaired, orphaned blocks')
      .option('--json', 'print JSON: sizes in bytes, times in ms since the epoch')
      .action(async (opts: { json?: boolean }, c: Command) =>
        withMeta(c, async (meta) => {
          const r = await scrubReport(meta);
          if (opts.json) {
            printJson(r);
            return;
          }
          const now = Date.now();
          const head = ['ADDRESS', 'STATE', 'PROGRESS', 'LAST PASS', 'ERRORS', 'REPAIRED', 'WAITING', 'ORPHANS'];
          const rows = r.nodes.map((n) => {
            const s = n.scrub;
            if (!s) return [n.address || n.uuid, n.member === 'DOWN' ? 'DOWN' : 'unknown (no scrub status published)', '', '', '', '', '', ''];
            return [n.address, stateCell(s, now), progressCell(s), lastPassCell(s, now), String(s.errors), String(s.repaired), String(s.pending), String(s.orphanBlocks)];
          });
          const t = r.totals;
          process.stdout.write(`${renderTable(head, rows)}\n`);
          process.stdout.write(`Bad copies: ${t.errors} found, ${t.repaired} repaired, ${t.dropped} dropped, ${t.pending} waiting for a good copy. Orphaned blocks: ${t.orphanBlocks} held, ${t.orphansDeleted} deleted.\n`);
          for (const n of r.nodes) for (const l of orphanLines(n, now)) process.stdout.write(`  - ${l}\n`);
        }),
      ),
  );
  return scrub;
}
