import { existsSync, mkdirSync, rmdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { statfs } from 'node:fs/promises';
import { dirname } from 'node:path';
import { isTorusError } from '../core/errors.js';
import type { Attached, Attacher } from './attach-process.js';
import { DEFAULT_FS_TYPE, isReadOnlyMode, required, unsupported } from './common.js';
import { alreadyExists, invalid, notFound, outOfRange, precondition } from './errors.js';
import { deviceBytes, growExt4Offline, growMountedExt4, makeFs, mountsAt, mustRun, probeDevice, unmountAll } from './mounts.js';
import type { CapacityRange, Params, VolumeCapability } from './proto.js';

// The CSI node service. Staging attaches the volume through its own `torusblk nbd` process (the
// kernel NBD client, or nbdfuse + loop; attach-process.ts), makes a file system when the device
// is blank, mounts it at the staging path and grows it to the device's size (a volume restored
// or expanded to more than its file system). Publishing bind-mounts the staged file system, or
// the device itself for a raw block volume, at the pod's path.
//
// What is staged lives in this process's memory, with the attachment processes it started; the
// processes do not outlive a restart of the node plugin's container (docs/deploy.md says to drain
// a node before restarting it). A staging path still mounted from an earlier run is recognised
// and cleaned up on the next stage or unstage of it.

interface Staged {
  readonly volume: string;
  readonly stagingPath: string;
  readonly capability: VolumeCapability;
  readonly fsType: string | undefined;
  readonly attached: Attached;
}

export interface NodeOptions {
  readonly nodeId: string;
  readonly attacher: Attacher;
  /** NOT_EXIST for a volume that does not exist. */
  checkVolume(name: string): Promise<void>;
  /** How long unstaging waits for a volume's final sync. */
  readonly detachTimeoutMs?: number;
}

function sameCapability(a: VolumeCapability, b: VolumeCapability): boolean {
  return (
    a.access_type === b.access_type &&
    a.access_mode?.mode === b.access_mode?.mode &&
    (a.mount?.fs_type || DEFAULT_FS_TYPE) === (b.mount?.fs_type || DEFAULT_FS_TYPE) &&
    (a.mount?.mount_flags ?? []).join(',') === (b.mount?.mount_flags ?? []).join(',')
  );
}

function checkNodeCap(cap: VolumeCapability | null | undefined): VolumeCapability {
  if (!cap) throw invalid('volume_capability is required');
  const why = unsupported(cap);
  // The node's answer for a capability the volume does not have is FAILED_PRECONDITION.
  if (why) throw precondition(why);
  return cap;
}

export class NodeService {
  private readonly staged = new Map<string, Staged>();
  /** Attaching one volume at a time: the kernel NBD client picks the first free /dev/nbdN. */
  private attaching: Promise<unknown> = Promise.resolve();

  constructor(private readonly opts: NodeOptions) {}

  get nodeId(): string {
    return this.opts.nodeId;
  }

  async stage(req: { volume_id?: string; staging_target_path?: string; volume_capability?: VolumeCapability | null; volume_context?: Params }): Promise<Record<string, never>> {
    const volume = required(req.volume_id, 'volume_id');
    const path = required(req.staging_target_path, 'staging_target_path');
    const cap = checkNodeCap(req.volume_capability);
    const cur = this.staged.get(volume);
    if (cur) {
      if (cur.stagingPath !== path || !sameCapability(cur.capability, cap)) throw alreadyExists(`volume ${volume} is already staged at ${cur.stagingPath} with other settings`);
      return {};
    }
    await this.opts.checkVolume(volume).catch((err: unknown) => {
      throw isTorusError(err, 'NOT_EXIST') ? notFound(`no volume ${volume}`) : err;
    });
    // Left mounted by an earlier run of this plugin, whose attachment died with it.
    await unmountAll(path);
    mkdirSync(path, { recursive: true });
    const run = this.attaching.then(() => this.opts.attacher.attach(volume, { ...(req.volume_context?.['writeCacheSize'] ? { writeCacheSize: req.volume_context['writeCacheSize'] } : {}) }));
    this.attaching = run.catch(() => undefined);
    const attached = await run;
    const fsType = cap.access_type === 'mount' ? cap.mount?.fs_type || DEFAULT_FS_TYPE : undefined;
    try {
      if (fsType) await this.mountFs(attached.device, path, fsType, cap);
    } catch (err) {
      await unmountAll(path).catch(() => undefined);
      await attached.detach(this.opts.detachTimeoutMs ?? 120_000).catch(() => undefined);
      throw err;
    }
    this.staged.set(volume, { volume, stagingPath: path, capability: cap, fsType, attached });
    return {};
  }

  private async mountFs(device: string, path: string, fsType: string, cap: VolumeCapability): Promise<void> {
    const found = await probeDevice(device);
    if (!found.type) {
      if (found.ptType) throw precondition(`the volume holds a ${found.ptType} partition table, not a file system; not formatting it`);
      await makeFs(fsType, device);
    } else if (found.type !== fsType) {
      throw precondition(`the volume holds a ${found.type} file system, not ${fsType}`);
    }
    // A volume made from a smaller snapshot, or expanded while unstaged, has room past its file
    // system: it grows here, so the pod sees the size it asked for.
    const ro = isReadOnlyMode(cap);
    if (!ro) await growExt4Offline(device);
    const flags = [...(cap.mount?.mount_flags ?? []), ...(ro ? ['ro'] : [])];
    await mustRun('mount', ['-t', fsType, ...(flags.length ? ['-o', flags.join(',')] : []), device, path]);
  }

  async unstage(req: { volume_id?: string; staging_target_path?: string }): Promise<Record<string, never>> {
    const volume = required(req.volume_id, 'volume_id');
    const path = required(req.staging_target_path, 'staging_target_path');
    // Unmounting first writes back what the file system holds; the attachment then syncs it all.
    await unmountAll(path);
    const s = this.staged.get(volume);
    if (s) {
      await s.attached.detach(this.opts.detachTimeoutMs ?? 120_000);
      this.staged.delete(volume);
    }
    return {};
  }

  async publish(req: { volume_id?: string; staging_target_path?: string; target_path?: string; volume_capability?: VolumeCapability | null; readonly?: boolean }): Promise<Record<string, never>> {
    const volume = required(req.volume_id, 'volume_id');
    const target = required(req.target_path, 'target_path');
    const cap = checkNodeCap(req.volume_capability);
    if (!req.staging_target_path) throw precondition('staging_target_path is required: this driver stages volumes first');
    const s = this.staged.get(volume);
    if (!s || s.stagingPath !== req.staging_target_path) throw precondition(`volume ${volume} is not staged at ${req.staging_target_path}`);
    if (s.capability.access_type !== cap.access_type) throw precondition(`volume ${volume} was staged as ${s.capability.access_type}, not ${cap.access_type}`);
    const ro = (req.readonly ?? false) || isReadOnlyMode(cap);
    const existing = mountsAt(target);
    if (existing.length > 0) {
      const top = existing.at(-1)!;
      if (top.options.includes('ro') !== ro) throw alreadyExists(`${target} is already published ${top.options.includes('ro') ? 'read-only' : 'read-write'}`);
      return {};
    }
    const source = cap.access_type === 'block' ? s.attached.device : s.stagingPath;
    if (cap.access_type === 'block') {
      mkdirSync(dirname(target), { recursive: true });
      if (!existsSync(target)) writeFileSync(target, '');
    } else {
      mkdirSync(target, { recursive: true });
    }
    await mustRun('mount', ['--bind', source, target]);
    if (ro) await mustRun('mount', ['-o', 'remount,bind,ro', target]);
    return {};
  }

  async unpublish(req: { volume_id?: string; target_path?: string }): Promise<Record<string, never>> {
    required(req.volume_id, 'volume_id');
    const target = required(req.target_path, 'target_path');
    await unmountAll(target);
    // Never recursive: an empty mount point (or the device's bind file) is all there should be.
    if (existsSync(target)) {
      if (statSync(target).isDirectory()) rmdirSync(target);
      else rmSync(target);
    }
    return {};
  }

  async stats(req: { volume_id?: string; volume_path?: string }): Promise<unknown> {
    const volume = required(req.volume_id, 'volume_id');
    const path = required(req.volume_path, 'volume_path');
    if (!existsSync(path) || mountsAt(path).length === 0) throw notFound(`volume ${volume} is not published at ${path}`);
    const s = this.staged.get(volume);
    const condition = !s
      ? { abnormal: true, message: 'this node plugin did not stage the volume (it restarted since?): its attachment is gone' }
      : s.attached.ended !== undefined
        ? { abnormal: true, message: `the volume's attachment process ${s.attached.ended}; I/O to it fails` }
        : { abnormal: false, message: 'attached' };
    if (statSync(path).isDirectory()) {
      const st = await statfs(path);
      return {
        usage: [
          { unit: 'BYTES', total: st.blocks * st.bsize, available: st.bavail * st.bsize, used: (st.blocks - st.bfree) * st.bsize },
          { unit: 'INODES', total: st.files, available: st.ffree, used: st.files - st.ffree },
        ],
        volume_condition: condition,
      };
    }
    return { usage: [{ unit: 'BYTES', total: deviceBytes(path) }], volume_condition: condition };
  }

  async expand(req: { volume_id?: string; volume_path?: string; capacity_range?: CapacityRange | null; volume_capability?: VolumeCapability | null }): Promise<{ capacity_bytes: number }> {
    const volume = required(req.volume_id, 'volume_id');
    const path = required(req.volume_path, 'volume_path');
    const s = this.staged.get(volume);
    if (!s) throw notFound(`volume ${volume} is not staged on this node`);
    if (!existsSync(path)) throw notFound(`${path} does not exist`);
    const size = deviceBytes(s.attached.device);
    const want = Number(req.capacity_range?.required_bytes ?? 0);
    // The device takes its size when attached; ControllerExpandVolume runs while it is not.
    if (want > size) throw outOfRange(`the device of ${volume} has ${size} bytes, less than ${want}: expand it with ControllerExpandVolume while unstaged`);
    if (s.fsType && !isReadOnlyMode(s.capability)) await growMountedExt4(s.attached.device);
    return { capacity_bytes: size };
  }
}
