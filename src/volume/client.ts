import type { KVSession, MetadataService } from '../core/interfaces.js';
import { openBlockClient, type BlockClient, type OpenOptions } from '../distributor/open.js';
import { VolumeMeta } from './meta.js';
import { BlockVolume, type OpenVolumeOptions } from './volume.js';

// What a client process (torusblk, torusctl's data commands) needs to use volumes: the block
// client, the volume metadata, and one etcd lease for all the volumes it locks.

/** Volume locks outlive a client by this long after it dies or is cut off from etcd. */
export const LOCK_TTL_MS = 15_000;

export class VolumeClient {
  private sessionP: Promise<KVSession> | undefined;
  readonly vmeta: VolumeMeta;

  private constructor(
    readonly meta: MetadataService,
    readonly block: BlockClient,
  ) {
    this.vmeta = new VolumeMeta(meta.kv(), block.uuid);
  }

  static async open(meta: MetadataService, opts: Omit<OpenOptions, 'meta'> = {}): Promise<VolumeClient> {
    return new VolumeClient(meta, await openBlockClient({ ...opts, meta }));
  }

  session(): Promise<KVSession> {
    this.sessionP ??= this.meta.kv().session(LOCK_TTL_MS);
    return this.sessionP;
  }

  async openVolume(name: string, opts: OpenVolumeOptions = {}): Promise<BlockVolume> {
    const writable = !opts.readOnly && opts.snapshot === undefined;
    return BlockVolume.open(
      { meta: this.vmeta, store: this.block.distributor, ...(writable ? { session: await this.session() } : {}) },
      name,
      opts,
    );
  }

  async close(): Promise<void> {
    await this.block.close();
    if (this.sessionP) await (await this.sessionP).revoke();
  }
}
