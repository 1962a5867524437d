import type { KVSession, MetadataService } from '../core/interfaces.js';
import { openBlockClient, type BlockClient, type OpenOptions } from '../distributor/open.js';
import { isReplayNeeded, VolumeMeta } from './meta.js';
import type { SnapshotRecord, VolumeRecord } from './records.js';
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
    private readonly lockTtlMs: number,
    private readonly ownsBlock = true,
  ) {
    this.vmeta = new VolumeMeta(meta.kv(), block.uuid);
  }

  /** `lockTtlMs`: how long this client's volume locks outlive it (LOCK_TTL_MS by default). */
  static async open(meta: MetadataService, opts: Omit<OpenOptions, 'meta'> & { lockTtlMs?: number } = {}): Promise<VolumeClient> {
    const { lockTtlMs = LOCK_TTL_MS, ...rest } = opts;
    return new VolumeClient(meta, await openBlockClient({ ...rest, meta }), lockTtlMs);
  }

  /**
   * Volumes over a block client the caller has and keeps (a storage node's own, which reaches its
   * disk without the network): close() ends the volume locks' session and leaves `block` open.
   */
  static over(meta: MetadataService, block: BlockClient, opts: { lockTtlMs?: number } = {}): VolumeClient {
    return new VolumeClient(meta, block, opts.lockTtlMs ?? LOCK_TTL_MS, false);
  }

  session(): Promise<KVSession> {
    this.sessionP ??= this.meta.kv().session(this.lockTtlMs);
    return this.sessionP;
  }

  async openVolume(name: string, opts: OpenVolumeOptions = {}): Promise<BlockVolume> {
    // Writers lock with the session's lease; readers hold what they opened with it.
    return BlockVolume.open({ meta: this.vmeta, store: this.block.distributor, session: await this.session() }, name, opts);
  }

  /**
   * Replays a journal tail a writer left behind without closing: opening the volume for writing
   * does it (and fences that writer out), closing checkpoints it.
   */
  async replay(name: string): Promise<void> {
    const v = await this.openVolume(name, { snapshotPollMs: 0, checkpointIntervalMs: 0, foldIdleMs: 0 });
    await v.close();
  }

  /** A snapshot, replaying first if the last writer left a tail (see VolumeMeta.createSnapshot). */
  snapshot(name: string, snap: string): Promise<SnapshotRecord> {
    return this.withReplay(name, () => this.vmeta.createSnapshot(name, snap));
  }

  /** A clone of a snapshot or of a volume, replaying the source first if it needs it. */
  clone(name: string, source: { volume: string; snapshot?: string }, size?: number): Promise<VolumeRecord> {
    return this.withReplay(source.volume, () => this.vmeta.clone(name, source, size));
  }

  /** Rolls an unmounted volume back to a snapshot, fencing out any writer that left a tail. */
  async restore(name: string, snap: string): Promise<void> {
    await BlockVolume.restore({ meta: this.vmeta, store: this.block.distributor, session: await this.session() }, name, snap);
  }

  private async withReplay<T>(volume: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (!isReplayNeeded(err)) throw err;
      await this.replay(volume);
      return fn();
    }
  }

  async close(): Promise<void> {
    if (this.ownsBlock) await this.block.close();
    if (this.sessionP) await (await this.sessionP).revoke();
  }
}
