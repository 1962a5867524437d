import { createHash } from 'node:crypto';
import { TorusError } from '../core/errors.js';
import { parseSize } from '../core/units.js';
import { MAX_VOLUME_SIZE, parseVolSnap } from '../volume/records.js';
import { invalid, outOfRange } from './errors.js';
import type { AccessModeName, CapacityRange, Params, VolumeCapability } from './proto.js';

// What the controller and node services share: how CSI names become Torus names, which
// capabilities a Torus volume has, and the StorageClass parameters.

/** The driver's name unless --driver-name says otherwise (CSIDriver, StorageClass provisioner). */
export const DEFAULT_DRIVER_NAME = 'csi.torus.io';

/**
 * A volume is read-write on one node at a time: the node that stages it holds the volume's lock
 * in etcd. On that node any number of workloads may share it (SINGLE_NODE_MULTI_WRITER); a
 * MULTI_NODE mode would need several nodes to hold it at once.
 */
export const ACCESS_MODES: ReadonlySet<AccessModeName> = new Set([
  'SINGLE_NODE_WRITER',
  'SINGLE_NODE_READER_ONLY',
  'SINGLE_NODE_SINGLE_WRITER',
  'SINGLE_NODE_MULTI_WRITER',
]);

/** ext4 only: the image carries its tools (xfsprogs would bring Python along). */
export const FS_TYPES: ReadonlySet<string> = new Set(['ext4']);
export const DEFAULT_FS_TYPE = 'ext4';

/** Without a requested size; StorageClasses and PVCs normally give one. */
export const DEFAULT_VOLUME_BYTES = 1024 ** 3;
/** Sizes are rounded up to whole 4 KiB so any file system and the loop driver can use them. */
const ALIGN = 4096;

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

/**
 * The Torus name for a CSI name: the name itself when Torus accepts it (Kubernetes' pvc-<uuid>
 * and snapshot-<uuid> are), otherwise a stable digest, so a retried call finds what the first made.
 */
export function torusName(csiName: string): string {
  if (NAME.test(csiName)) return csiName;
  return `csi-${createHash('sha256').update(csiName).digest('hex').slice(0, 40)}`;
}

export function snapshotId(volume: string, snapshot: string): string {
  return `${volume}@${snapshot}`;
}

/** VOLUME@SNAPSHOT, or undefined when the id cannot name a Torus snapshot. */
export function parseSnapshotId(id: string): { volume: string; snapshot: string } | undefined {
  const { volume, snapshot } = parseVolSnap(id);
  if (snapshot === undefined || !NAME.test(volume) || !NAME.test(snapshot)) return undefined;
  return { volume, snapshot };
}

export function required(value: string | undefined, field: string): string {
  if (!value) throw invalid(`${field} is required`);
  return value;
}

export function modeOf(cap: VolumeCapability): AccessModeName | undefined {
  const m = cap.access_mode?.mode;
  return typeof m === 'string' ? m : undefined;
}

/** Why a capability is not one a Torus volume has, or undefined when it is. */
export function unsupported(cap: VolumeCapability): string | undefined {
  const mode = modeOf(cap);
  if (!mode || mode === 'UNKNOWN') return 'an access mode is required';
  if (!ACCESS_MODES.has(mode)) return `access mode ${mode} is not supported: a Torus volume is read-write on one node at a time (SINGLE_NODE_* modes)`;
  if (cap.access_type === 'mount') {
    const fs = cap.mount?.fs_type || DEFAULT_FS_TYPE;
    if (!FS_TYPES.has(fs)) return `file system ${fs} is not supported (${[...FS_TYPES].join(', ')})`;
    return undefined;
  }
  if (cap.access_type === 'block') return undefined;
  return 'an access type (block or mount) is required';
}

export function isReadOnlyMode(cap: VolumeCapability): boolean {
  return modeOf(cap) === 'SINGLE_NODE_READER_ONLY';
}

/** StorageClass parameters Torus knows; the CO's own (csi.storage.k8s.io/...) pass through. */
const PARAMS: Readonly<Record<string, (v: string) => void>> = {
  // Dirty data the node's attachment holds before a write forces a sync (torusblk nbd --write-cache-size).
  writeCacheSize: (v) => parseSize(v),
};

/** The parameters a node needs later (volume_context); INVALID_ARGUMENT for unknown or bad ones. */
export function checkParams(params: Params | undefined): Params {
  const out: Params = {};
  for (const [k, v] of Object.entries(params ?? {})) {
    if (k.startsWith('csi.storage.k8s.io/')) continue;
    const check = PARAMS[k];
    if (!check) throw invalid(`unknown parameter ${k} (known: ${Object.keys(PARAMS).join(', ')})`);
    try {
      check(v);
    } catch (err) {
      throw invalid(`parameter ${k}: ${err instanceof TorusError ? err.message : String(err)}`);
    }
    out[k] = v;
  }
  return out;
}

/**
 * The size to create for a capacity range, at least `floor` (a source's size): the smallest
 * allowed, rounded up to 4 KiB. OUT_OF_RANGE when the range cannot be met.
 */
export function sizeFor(range: CapacityRange | null | undefined, floor = 0): number {
  const req = Number(range?.required_bytes ?? 0);
  const limit = Number(range?.limit_bytes ?? 0);
  if (req < 0 || limit < 0) throw invalid('capacity_range: negative bytes');
  if (limit > 0 && limit < req) throw invalid(`capacity_range: limit_bytes ${limit} is below required_bytes ${req}`);
  const want = Math.max(req || (floor > 0 ? 0 : DEFAULT_VOLUME_BYTES), floor);
  const size = Math.ceil(want / ALIGN) * ALIGN;
  if (limit > 0 && size > limit) {
    if (floor > limit) throw outOfRange(`the source is ${floor} bytes, above limit_bytes ${limit}`);
    throw outOfRange(`no size of whole 4 KiB fits between ${req} and ${limit} bytes`);
  }
  if (size > MAX_VOLUME_SIZE) throw outOfRange(`${size} bytes is above the largest volume (1 PiB)`);
  return size;
}

/** Whether an existing volume of `size` bytes satisfies the range. */
export function fits(size: number, range: CapacityRange | null | undefined): boolean {
  const req = Number(range?.required_bytes ?? 0);
  const limit = Number(range?.limit_bytes ?? 0);
  return size >= req && (limit === 0 || size <= limit);
}
