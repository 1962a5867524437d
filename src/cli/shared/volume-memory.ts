import { Option, type Command } from 'commander';
import { TorusError } from '../../core/errors.js';
import { parseSize } from '../../core/units.js';
import type { MetricSample } from '../../http/metrics.js';
import type { VolumeBudgets, VolumeProvider } from '../../volume/provider.js';
import { parseCount } from './config.js';

// The memory budgets of volumes open for writing (write cache, journal tail, inode pages): their
// flags, checks and gauges, once for every process that serves volumes, so `torusd --nbd-listen`
// has the same budgets and metrics as `torusblk nbdserve` and `torusblk aoe`. torusd spells its
// flags with the nbd- prefix of its other NBD flags.

export type VolumeFlagPrefix = '' | 'nbd-';

export interface VolumeMemoryFlags {
  readonly writeCacheSize: string;
  readonly journalTailSize: string;
  readonly pageCacheSize: string;
  /** Absent: the volume's default. */
  readonly overlaySegments?: string;
}

/** The overlay index's default budget (BlockVolume's), in segments. */
const OVERLAY_SEGMENTS = 256 * 1024;

/** --journal-tail-size and --page-cache-size (the write cache's flag comes with each front end's). */
export function volumeMemoryOptions(cmd: Command, prefix: VolumeFlagPrefix = ''): Command {
  return cmd
    .addOption(
      new Option(`--${prefix}journal-tail-size <size>`, 'small writes kept in memory per volume from their journal append until a checkpoint; a checkpoint starts at half, a flush waits at full').default(
        '128MiB',
      ),
    )
    .addOption(new Option(`--${prefix}page-cache-size <size>`, 'inode pages cached per volume').default('64MiB'))
    .addOption(
      new Option(
        `--${prefix}overlay-segments <n>`,
        'journaled small writes indexed per volume until their blocks fold (about 230 bytes each); past it the most crowded blocks fold, so fewer cost memory less and rewrite blocks more',
      ).default(String(OVERLAY_SEGMENTS)),
    );
}

export function volumeBudgets(f: VolumeMemoryFlags, prefix: VolumeFlagPrefix = ''): VolumeBudgets {
  const size = (text: string, flag: string, min: number): number => {
    const n = parseSize(text);
    if (!(n >= min)) throw new TorusError('INVALID_ARGUMENT', `invalid --${prefix}${flag} "${text}": at least ${min / (1024 * 1024)}MiB`);
    return n;
  };
  const journalTailBytes = size(f.journalTailSize, 'journal-tail-size', 2 * 1024 * 1024);
  const overlay = f.overlaySegments === undefined ? undefined : parseCount(f.overlaySegments, `--${prefix}overlay-segments`, 1024);
  return {
    ...(overlay !== undefined ? { maxOverlaySegments: overlay } : {}),
    writeCacheBytes: size(f.writeCacheSize, 'write-cache-size', 1024 * 1024),
    journalTailBytes,
    checkpointBytes: journalTailBytes / 2,
    pageCacheBytes: size(f.pageCacheSize, 'page-cache-size', 1024 * 1024),
  };
}

function gauge(name: string, help: string, value: number, labels: Record<string, string>): MetricSample {
  return { name, help, type: 'gauge', value, labels };
}

/** What each volume open for writing holds in memory, by cache, beside each budget. */
export function volumeMemorySamples(volumes: VolumeProvider, prefix: VolumeFlagPrefix = ''): MetricSample[] {
  const out: MetricSample[] = [];
  const used = 'Bytes a volume open for writing holds in memory, by cache: write_cache (written, not yet in the journal), journal_tail (small writes appended since the last checkpoint), page_cache (inode pages)';
  const limit = `The budget of each volume cache (--${prefix}write-cache-size, --${prefix}journal-tail-size, --${prefix}page-cache-size)`;
  for (const [volume, m] of volumes.memory()) {
    for (const [cache, bytes, max] of [
      ['write_cache', m.writeCache, m.writeCacheLimit],
      ['journal_tail', m.journalTail, m.journalTailLimit],
      ['page_cache', m.pageCache, m.pageCacheLimit],
    ] as const) {
      out.push(gauge('torus_volume_memory_bytes', used, bytes, { volume, cache }));
      out.push(gauge('torus_volume_memory_limit_bytes', limit, max, { volume, cache }));
    }
    out.push(gauge('torus_volume_overlay_segments', 'Journaled small writes indexed by a volume open for writing until their blocks fold (about 200 bytes of heap each)', m.overlaySegments, { volume }));
    out.push(gauge('torus_volume_overlay_segments_limit', `Overlay segments past which the most crowded blocks fold (--${prefix}overlay-segments)`, m.overlaySegmentsLimit, { volume }));
  }
  return out;
}
