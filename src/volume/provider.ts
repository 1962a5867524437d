import type { BlockDevice, DeviceInfo, DeviceProvider } from '../core/interfaces.js';
import type { VolumeClient } from './client.js';
import { lockedError } from './meta.js';
import { parseVolSnap } from './records.js';
import type { BlockVolume, VolumeMemory } from './volume.js';

// Volumes for the front ends (NBD, AoE), by export name: "VOL" is the volume, writable (or
// read-only if asked); "VOL@SNAP" is a snapshot, always read-only. A writable volume is opened
// (and locked) once per process however many connections use it, and every connection gets the
// same BlockVolume: a flush on any connection then covers writes completed on all of them, which
// is what NBD's multi-conn promises. It is synced and closed when its last user releases it.

interface Shared {
  readonly volume: Promise<BlockVolume>;
  users: number;
  /** Once open. */
  opened?: BlockVolume;
}

/** The memory budgets of each volume opened for writing (BlockVolume's options of these names). */
export interface VolumeBudgets {
  readonly writeCacheBytes?: number;
  readonly journalTailBytes?: number;
  readonly checkpointBytes?: number;
  readonly pageCacheBytes?: number;
  readonly maxOverlaySegments?: number;
}

export class VolumeProvider implements DeviceProvider {
  private readonly open_ = new Map<string, Shared>();
  /** Volumes being synced and unlocked after their last user left; a new open waits for it. */
  private readonly closing = new Map<string, Promise<void>>();

  constructor(
    private readonly vc: VolumeClient,
    private readonly opts: { readOnly?: boolean } & VolumeBudgets = {},
  ) {}

  async list(): Promise<string[]> {
    return (await this.vc.vmeta.list()).map((v) => v.record.name);
  }

  async open(name: string, opts: { readOnly: boolean }): Promise<{ device: BlockDevice; release(): Promise<void> }> {
    const { volume, snapshot } = parseVolSnap(name);
    const { readOnly: _, ...budgets } = this.opts;
    if (snapshot !== undefined || opts.readOnly || this.opts.readOnly) {
      // Read-only views are cheap and independent: each connection gets its own.
      const dev = await this.vc.openVolume(volume, snapshot !== undefined ? { snapshot } : { readOnly: true });
      return { device: dev, release: () => dev.close() };
    }
    let shared = this.open_.get(volume);
    if (!shared) await this.closing.get(volume);
    shared = this.open_.get(volume);
    if (!shared) {
      const s: Shared = { volume: this.vc.openVolume(volume, budgets), users: 0 };
      shared = s;
      this.open_.set(volume, s);
      s.volume.then(
        (v) => (s.opened = v),
        () => this.open_.delete(volume),
      );
    }
    shared.users++;
    let dev: BlockVolume;
    try {
      dev = await shared.volume;
    } catch (err) {
      shared.users--;
      throw err;
    }
    let released = false;
    const s = shared;
    return {
      device: dev,
      release: async () => {
        if (released) return;
        released = true;
        if (--s.users > 0) return;
        this.open_.delete(volume);
        const done = dev.close();
        const settled: Promise<void> = done.then(
          () => undefined,
          () => undefined,
        );
        this.closing.set(volume, settled);
        void settled.then(() => {
          if (this.closing.get(volume) === settled) this.closing.delete(volume);
        });
        await done;
      },
    };
  }

  /**
   * Size and flags from etcd, with reads only. Opening for that took the lock, bumped the epoch
   * and unlocked: three transactions for every NBD_OPT_INFO on a volume nobody had open.
   */
  async info(name: string, opts: { readOnly: boolean }): Promise<DeviceInfo> {
    const { volume, snapshot } = parseVolSnap(name);
    const blockSize = this.vc.block.distributor.blockSize;
    if (snapshot !== undefined) return { size: (await this.vc.vmeta.getSnapshot(volume, snapshot)).snapshot.head.size, blockSize, readOnly: true };
    const readOnly = opts.readOnly || (this.opts.readOnly ?? false);
    const shared = this.open_.get(volume);
    // Open here already: its size may have changed since the last sync.
    if (shared) return { size: (await shared.volume).size, blockSize, readOnly };
    const record = await this.vc.vmeta.get(volume);
    const [{ head }, holder] = await Promise.all([this.vc.vmeta.head(record.id), readOnly ? undefined : this.vc.vmeta.lockHolder(record.id)]);
    // Opening for writing would fail while another process holds the volume; so does this. (Our
    // own lock may still be held by a close in progress, which an open waits out.)
    if (holder && !this.closing.has(volume)) throw lockedError(volume, holder);
    return { size: head.size, blockSize, readOnly };
  }

  /** What each volume open for writing holds in memory, by volume name. */
  memory(): Map<string, VolumeMemory> {
    const out = new Map<string, VolumeMemory>();
    for (const [name, s] of this.open_) if (s.opened) out.set(name, s.opened.memory());
    return out;
  }

  /** Syncs and closes every open volume (shutdown). */
  async closeAll(): Promise<void> {
    const all = [...this.open_.values()];
    this.open_.clear();
    await Promise.all(all.map(async (s) => (await s.volume.catch(() => undefined))?.close()));
  }
}
