import type { Command } from 'commander';
import type { MetadataService } from '../../core/interfaces.js';
import { VolumeClient } from '../../volume/client.js';
import { connectMetadata, peerSecurity, type GlobalOpts } from './config.js';

/**
 * Runs `fn` with a metadata connection made from the command's (global) flags, then closes it.
 * Every command but init and wipe needs an initialized cluster: that is checked first, so each
 * says "not initialized" (exit 4) rather than whatever its first lookup would find missing.
 */
export async function withMeta<T>(cmd: Command, fn: (meta: MetadataService, opts: GlobalOpts) => Promise<T>, o: { initialized?: boolean } = {}): Promise<T> {
  const opts = cmd.optsWithGlobals<GlobalOpts>();
  const meta = connectMetadata(opts);
  try {
    if (o.initialized !== false) await meta.globalMetadata();
    return await fn(meta, opts);
  } finally {
    await meta.close();
  }
}

/** Runs `fn` with a volume client (metadata + block I/O to the storage nodes), then closes it. */
export async function withVolumes<T>(cmd: Command, fn: (vc: VolumeClient, meta: MetadataService) => Promise<T>): Promise<T> {
  return withMeta(cmd, async (meta, opts) => {
    const { security } = await peerSecurity(opts, false);
    const vc = await VolumeClient.open(meta, { rpc: { security } });
    try {
      return await fn(vc, meta);
    } finally {
      await vc.close();
    }
  });
}
