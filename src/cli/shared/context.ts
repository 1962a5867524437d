import type { Command } from 'commander';
import type { MetadataService } from '../../core/interfaces.js';
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
