import type { Logger } from 'pino';
import type { MetadataService } from '../../core/interfaces.js';
import { parseSize } from '../../core/units.js';
import { VolumeClient } from '../../volume/client.js';
import type { BlockIoOpts, GlobalOpts } from '../shared/config.js';
import { makeLogger } from '../shared/log.js';

// What every torusblk front end (NBD, AoE) shares: its log, its volume client, its way to stop.

export function logger(opts: GlobalOpts & { logLevel?: string; logFormat?: string }): Logger {
  return makeLogger('torusblk', opts);
}

export async function clientFor(meta: MetadataService, opts: BlockIoOpts, log: Logger): Promise<VolumeClient> {
  return VolumeClient.open(meta, {
    readCacheBytes: parseSize(opts.readCacheSize),
    readLevel: opts.readLevel as 'block',
    writeLevel: opts.writeLevel as 'all',
    onError: (err) => log.warn({ err: err.message }, 'cluster'),
  });
}

/** Resolves on SIGINT or SIGTERM. */
export function untilSignal(): Promise<string> {
  return new Promise((resolve) => {
    const on = (sig: string): void => {
      process.off('SIGINT', onInt);
      process.off('SIGTERM', onTerm);
      resolve(sig);
    };
    const onInt = (): void => on('SIGINT');
    const onTerm = (): void => on('SIGTERM');
    process.on('SIGINT', onInt);
    process.on('SIGTERM', onTerm);
  });
}

