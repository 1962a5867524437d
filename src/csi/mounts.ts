import { readFileSync, realpathSync, statSync } from 'node:fs';
import { basename } from 'node:path';
import { TorusError } from '../core/errors.js';
import { runCommand } from '../core/exec.js';

// The node's view of mounts and block devices, through /proc and /sys and the standard tools
// (mount, umount, blkid, mkfs.ext4, e2fsck, resize2fs): what the CSI node service needs to stage
// a device as a file system and bind it into pods.

export interface MountEntry {
  readonly majorMinor: string;
  /** The path inside its file system that is mounted (a bind mount of a directory shows it). */
  readonly root: string;
  readonly mountPoint: string;
  readonly options: readonly string[];
  readonly fsType: string;
  readonly source: string;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescape(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

export function parseMountInfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    const [left, right] = line.split(' - ');
    if (!left || !right) continue;
    const f = left.split(' ');
    const r = right.split(' ');
    out.push({
      majorMinor: f[2] ?? '',
      root: unescape(f[3] ?? ''),
      mountPoint: unescape(f[4] ?? ''),
      options: (f[5] ?? '').split(','),
      fsType: r[0] ?? '',
      source: unescape(r[1] ?? ''),
    });
  }
  return out;
}

function canonical(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return path;
  }
}

/** The mounts on `path`, the top one last; empty when nothing is mounted there. */
export function mountsAt(path: string): MountEntry[] {
  const p = canonical(path);
  return parseMountInfo(readFileSync('/proc/self/mountinfo', 'utf8')).filter((m) => m.mountPoint === p);
}

export async function mustRun(cmd: string, args: string[], timeoutMs = 120_000): Promise<string> {
  const r = await runCommand(cmd, args, timeoutMs);
  if (!r.ok) throw new TorusError('IO', `${cmd} ${args.join(' ')} failed${r.code === null ? '' : ` (exit ${r.code})`}: ${r.out.split('\n').slice(-3).join(' ') || 'no output'}`);
  return r.out;
}

/** Unmounts every mount stacked on `path`. */
export async function unmountAll(path: string): Promise<void> {
  for (let i = 0; i < 8 && mountsAt(path).length > 0; i++) await mustRun('umount', [path]);
}

/** A block device's size in bytes, from /sys (the device node, or a file bind-mounted from one). */
export function deviceBytes(dev: string): number {
  const st = statSync(dev);
  const sys = st.isBlockDevice() ? `/sys/dev/block/${Math.floor(st.rdev / 256) & 0xfff}:${(st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00)}/size` : `/sys/class/block/${basename(dev)}/size`;
  return Number(readFileSync(sys, 'utf8').trim()) * 512;
}

/** What blkid finds on a device: a file system type, a partition table, or nothing. */
export async function probeDevice(dev: string): Promise<{ type?: string; ptType?: string }> {
  const r = await runCommand('blkid', ['-p', '-o', 'export', dev], 60_000);
  // blkid exits 2 when it finds no signature at all: a blank device.
  if (r.code === 2) return {};
  if (!r.ok) throw new TorusError('IO', `blkid ${dev} failed: ${r.out}`);
  const field = (k: string): string | undefined => new RegExp(`^${k}=(.*)$`, 'm').exec(r.out)?.[1];
  const type = field('TYPE');
  const ptType = field('PTTYPE');
  return { ...(type ? { type } : {}), ...(ptType ? { ptType } : {}) };
}

/**
 * Makes a file system on a blank device. No discard pass: a fresh volume already reads as zeros
 * and stores nothing, so discarding all of it would only cost time.
 */
export async function makeFs(fsType: string, dev: string): Promise<void> {
  if (fsType !== 'ext4') throw new TorusError('INVALID_ARGUMENT', `file system ${fsType} is not supported`);
  await mustRun('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', dev], 600_000);
}

/** The bytes an ext4 file system spans (its block count times block size). */
async function ext4Bytes(dev: string): Promise<number> {
  const out = await mustRun('dumpe2fs', ['-h', dev], 60_000);
  const n = (k: string): number => Number(new RegExp(`^${k}:\\s+(\\d+)$`, 'm').exec(out)?.[1] ?? NaN);
  const bytes = n('Block count') * n('Block size');
  if (!Number.isFinite(bytes)) throw new TorusError('IO', `dumpe2fs ${dev}: no block count or size`);
  return bytes;
}

/**
 * Grows an unmounted ext4 to its device's size when the device is larger (a volume restored or
 * expanded to more than its file system). Offline, because growing a mounted ext4 needs
 * CAP_SYS_RESOURCE, which containers often lack; resize2fs insists on a fresh check first.
 */
export async function growExt4Offline(dev: string): Promise<boolean> {
  if ((await ext4Bytes(dev)) >= deviceBytes(dev)) return false;
  const fsck = await runCommand('e2fsck', ['-f', '-p', dev], 600_000);
  // 0: clean; 1: errors corrected. Anything else needs a person.
  if (fsck.code !== 0 && fsck.code !== 1) throw new TorusError('IO', `e2fsck ${dev} found problems it did not fix (exit ${fsck.code}): ${fsck.out.split('\n').slice(-3).join(' ')}`);
  await mustRun('resize2fs', [dev], 600_000);
  return true;
}

/** Grows a mounted ext4 to its device's size (needs CAP_SYS_RESOURCE); a no-op when it already fills it. */
export async function growMountedExt4(dev: string): Promise<void> {
  if ((await ext4Bytes(dev)) < deviceBytes(dev)) await mustRun('resize2fs', [dev], 600_000);
}
