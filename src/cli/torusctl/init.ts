import { randomUUID } from 'node:crypto';
import { Command, Option } from 'commander';
import { TorusError } from '../../core/errors.js';
import { RING_TYPES, type RingType } from '../../core/models.js';
import { formatSize, parseSize } from '../../core/units.js';
import { newRingModel, validateRingModel } from '../../ring/index.js';
import { withMeta } from '../shared/context.js';
import { emit, outputOptions, printJson } from '../shared/output.js';

const MIN_BLOCK = 4096;
const MAX_BLOCK = 64 * 1024 * 1024;

export function parseBlockSize(text: string): number {
  const n = parseSize(text);
  // Checksums are kept per 4 KiB sector and NBD clients align to 4 KiB, so a block is whole sectors.
  if (n < MIN_BLOCK || n > MAX_BLOCK || n % MIN_BLOCK !== 0)
    throw new TorusError('INVALID_ARGUMENT', `invalid --block-size ${text}: must be a multiple of 4KiB between 4KiB and 64MiB`);
  return n;
}

export function parseReplication(text: string): number {
  const n = Number(text);
  if (!/^\d+$/.test(text.trim()) || n < 1 || n > 16) throw new TorusError('INVALID_ARGUMENT', `invalid replication "${text}": a whole number from 1 to 16`);
  return n;
}

export function initCommand(): Command {
  return outputOptions(new Command('init'))
    .description('initialize the cluster metadata in etcd (like formatting a disk: block size and ring are fixed here)')
    .option('--block-size <size>', 'cluster block size (docs/performance.md compares 64, 128 and 512 KiB)', '128KiB')
    .option('--replication <n>', 'copies of every block', '2')
    .addOption(new Option('--ring-type <type>', 'placement ring').choices(RING_TYPES).default('ketama'))
    .option('--view', 'print the current settings and exit')
    .action(async (opts: { blockSize: string; replication: string; ringType: RingType; view?: boolean; json?: boolean }, cmd: Command) => {
      await withMeta(cmd, async (meta) => {
        if (opts.view) {
          const [g, ring] = await Promise.all([meta.globalMetadata(), meta.getRing()]);
          if (opts.json) printJson({ ...g, ring });
          else
            process.stdout.write(
              `Cluster ID: ${g.clusterId}\nBlock size: ${g.blockSize} bytes (${formatSize(g.blockSize)})\nCreated: ${g.createdAt}\n` +
                `Ring: ${ring.type} version ${ring.version}, replication ${ring.replication}, ${ring.peers.length} member(s)\n`,
            );
          return;
        }
        const blockSize = parseBlockSize(opts.blockSize);
        const replication = parseReplication(opts.replication);
        if (opts.ringType === 'single') throw new TorusError('INVALID_ARGUMENT', 'a single ring needs its peer: init with another type, then use `torusctl ring manual-change --type single`');
        const ring = newRingModel(opts.ringType, opts.ringType === 'empty' ? 1 : replication, [], 1);
        validateRingModel(ring);
        const g = { blockSize, clusterId: randomUUID(), createdAt: new Date().toISOString() };
        await meta.init(g, ring);
        emit(
          opts,
          { ...g, ring },
          `Initialized cluster: block size ${formatSize(blockSize)}, ${opts.ringType} ring, replication ${replication}.\nNext: start torusd on each node, then \`torusctl peer add --all-peers\`.`,
        );
      }, { initialized: false });
    });
}
