import type { Command } from 'commander';
import type { MetadataService } from '../../core/interfaces.js';
import { VolumeClient } from '../../volume/client.js';
import { connectMetadata, type GlobalOpts } from './config.js';

/** Runs `fn` with a metadata connection made from the command's (global) flags, then closes it. */
export async function withMeta<T>(cmd: Command, fn: (meta: MetadataService, opts: GlobalOpts) => Promise<T>): Promise<T> {
  const opts = cmd.optsWithGlobals<GlobalOpts>();
  const meta = connectMetadata(opts);
  try {
    return await fn(meta, opts);
  } finally {
    await meta.close();
  }
}

/** Runs `fn` with a volume client (metadata + block I/O to the storage nodes), then closes it. */
export async function withVolumes<T>(cmd: Command, fn: (vc: VolumeClient, meta: MetadataService) => Promise<T>): Promise<T> {
  return withMeta(cmd, async (meta) => {
    const vc = await VolumeClient.open(meta);
    try {
      return await fn(vc, meta);
    } finally {
      await vc.close();
    }
  });
}
