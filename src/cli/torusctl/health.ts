import { Command } from 'commander';
import { formatSize, parseDuration } from '../../core/units.js';
import { waitingLine } from '../../server/cluster.js';
import { clusterHealth, type Health } from '../../server/health.js';
import { withMeta } from '../shared/context.js';
import { outputOptions, printJson, sizeText, type OutputOpts } from '../shared/output.js';
import { MovementProgress, formatEta, movementDisplay } from '../shared/progress.js';

// Cluster health and rebalance progress, from what every node publishes in its heartbeat.

export function healthCommand(): Command {
  return outputOptions(
    new Command('health').description('cluster health at a glance: down peers, maintenance, under-replicated blocks, nearly full peers, rebalancing; exit 1 when DEGRADED'),
  ).action(async (opts: OutputOpts, c: Command) =>
    withMeta(c, async (meta) => {
      const h = await clusterHealth(meta);
      if (opts.json) printJson(h);
      else {
        process.stdout.write(`${h.status}: ring v${h.ringVersion}, ${h.members} member(s), replication ${h.replication.effective}/${h.replication.wanted}\n`);
        for (const p of [...h.problems, ...h.notes]) process.stdout.write(`  - ${p}\n`);
      }
      if (!h.healthy) process.exitCode = 1;
    }),
  );
}

function statusJson(h: Health): Record<string, unknown> {
  return {
    rebalancing: h.rebalancing,
    ringVersion: h.ringVersion,
    waitingPeers: h.waitingPeers,
    blocksLeft: h.blocksLeft,
    bytesLeft: h.bytesLeft,
    rate: h.rate,
    underReplicatedBlocks: h.underReplicatedBlocks,
    downPeers: h.downPeers,
    maintenancePeers: h.maintenancePeers.map((p) => p.uuid),
  };
}

function statusLine(h: Health, o: OutputOpts): string {
  if (!h.rebalancing && h.underReplicatedBlocks === 0) return 'balanced: nothing to move';
  const left =
    h.blocksLeft > 0
      ? `${h.blocksLeft} blocks (${sizeText(h.bytesLeft, o)}) left at ${formatSize(Math.round(h.rate))}/s, ETA ${formatEta(h.rate > 0 ? Math.ceil(h.bytesLeft / h.rate) : undefined)}`
      : 'amount left not estimated yet';
  const waiting = h.waitingPeers.length > 0 ? `; ${waitingLine(h.waitingPeers.length, h.ringVersion)}` : '';
  return `rebalancing: ${left}; ${h.underReplicatedBlocks} under-replicated${waiting}`;
}

export function rebalanceCommand(): Command {
  const reb = new Command('rebalance').description('data movement between storage nodes');
  reb.addCommand(
    outputOptions(
      new Command('status')
        .description('show rebalance progress (blocks and bytes left, rate, ETA); --watch follows it until done')
        .option('-w, --watch', 'follow progress on stderr until the cluster is balanced (exit 1 if it is not by --timeout)')
        .option('--interval <duration>', 'with --watch: how often to look', '1s')
        .option('--timeout <duration>', 'with --watch: give up after this long (exit 1)', '1h'),
      { bytes: true },
    ).action(async (opts: OutputOpts & { watch?: boolean; interval: string; timeout: string }, c: Command) =>
      withMeta(c, async (meta) => {
        const show = (h: Health): void => {
          if (opts.json) printJson(statusJson(h));
          else process.stdout.write(`${statusLine(h, opts)}\n`);
        };
        let h = await clusterHealth(meta);
        if (!opts.watch) {
          show(h);
          return;
        }
        const every = parseDuration(opts.interval);
        const deadline = Date.now() + parseDuration(opts.timeout);
        const busy = (x: Health): boolean => x.rebalancing || x.underReplicatedBlocks > 0;
        // Progress goes to stderr: a bar on a terminal, a line whenever it changes elsewhere (logs).
        const progress = new MovementProgress();
        const display = movementDisplay(process.stderr.isTTY === true);
        while (busy(h) && Date.now() < deadline) {
          display.show(progress.update(h.bytesLeft, h.rate));
          await new Promise((r) => setTimeout(r, every));
          h = await clusterHealth(meta);
        }
        display.stop();
        show(h);
        if (busy(h)) process.exitCode = 1;
      }),
    ),
  );
  return reb;
}
