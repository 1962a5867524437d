import { Command, Option } from 'commander';
import { RING_TYPES, type RingType } from '../../core/models.js';
import { createRing, ringWarnings } from '../../ring/index.js';
import { manualChange, setReplication } from '../../server/cluster.js';
import { withMeta } from '../shared/context.js';
import { emit, outputOptions, printJson } from '../shared/output.js';
import { parseReplication } from './init.js';

function report(ring: import('../../core/models.js').RingModel, o: { json?: boolean }): void {
  const warnings = ringWarnings(ring);
  for (const w of warnings) process.stderr.write(`warning: ${w}\n`);
  emit(o, { ...ring, warnings }, `ring version ${ring.version}: ${ring.type}, ${ring.peers.length} member(s), replication ${ring.replication}`);
}

export function ringCommand(): Command {
  const ring = new Command('ring').description('inspect and change data placement');
  ring.addCommand(
    outputOptions(new Command('get').description('print the ring: type, version, replication and members')).action(async (opts: { json?: boolean }, c: Command) =>
        withMeta(c, async (meta) => {
          const model = await meta.getRing();
          if (opts.json) printJson({ ...model, warnings: ringWarnings(model) });
          else process.stdout.write(`${createRing(model).describe()}\n`);
        }),
    ),
  );
  ring.addCommand(
    outputOptions(
      new Command('set-replication')
        .description('change how many copies of each block the cluster keeps')
        .argument('<n>', 'copies per block')
        .option('--allow-degraded', 'accept a factor above the member count (fewer copies until peers join)'),
    ).action(async (n: string, opts: { allowDegraded?: boolean; json?: boolean }, c: Command) =>
      withMeta(c, async (meta) => report(await setReplication(meta, parseReplication(n), opts.allowDegraded ?? false), opts)),
    ),
  );
  ring.addCommand(
    outputOptions(new Command('manual-change'))
      .description('replace the ring with one built from the given peers (for single/mod rings and repairs)')
      .addOption(new Option('--type <type>', 'ring type').choices(RING_TYPES).default('ketama'))
      .option('-r, --replication <n>', 'copies per block', '2')
      .option('--uuids <list>', 'comma-separated peer UUIDs')
      .option('--all-peers', 'every running peer')
      .option('--force', 'keep down members and accept degraded replication')
      .action(async (opts: { type: RingType; replication: string; uuids?: string; allPeers?: boolean; force?: boolean; json?: boolean }, c: Command) =>
        withMeta(c, async (meta) => {
          const uuids = (opts.uuids ?? '').split(',').map((s) => s.trim()).filter(Boolean);
          report(await manualChange(meta, { type: opts.type, replication: parseReplication(opts.replication), uuids, allPeers: opts.allPeers ?? false, force: opts.force ?? false }), opts);
        }),
      ),
  );
  return ring;
}
