import { spawn } from 'node:child_process';
import { closeSync, constants, existsSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TorusError } from '../../core/errors.js';
import { haveCommand as which, runCommand as run } from '../../core/exec.js';

// Giving the user a block device for an NBD export served on a private unix socket: the kernel's
// NBD client through the standard `nbd-client` when the kernel has the module, otherwise
// `nbdfuse` (libnbd) exposing the export as a file and a loop device on that file.

export async function kernelHasNbd(): Promise<boolean> {
  if (existsSync('/sys/module/nbd') && existsSync('/dev/nbd0')) return true;
  // Loading it needs root and a kernel that ships it; try once, quietly.
  await run('modprobe', ['nbd'], 10_000);
  return existsSync('/sys/module/nbd') && existsSync('/dev/nbd0');
}

/** The first /dev/nbdN no client is attached to. */
export function freeNbdDevice(): string {
  const names = readdirSync('/sys/block')
    .filter((n) => /^nbd\d+$/.test(n))
    .sort((a, b) => Number(a.slice(3)) - Number(b.slice(3)));
  for (const n of names) {
    const pid = join('/sys/block', n, 'pid');
    const size = Number(readFileSync(join('/sys/block', n, 'size'), 'utf8').trim() || '0');
    if (!existsSync(pid) && size === 0) return `/dev/${n}`;
  }
  throw new TorusError('NOT_EXIST', 'no free /dev/nbdN device (load nbd with more devices: modprobe nbd nbds_max=32)');
}

export interface Attachment {
  readonly device: string;
  readonly how: 'kernel' | 'nbdfuse';
  detach(): Promise<void>;
}

export async function attachKernel(socket: string, exportName: string, device: string, blockSize: number): Promise<Attachment> {
  if (!which('nbd-client')) throw new TorusError('NOT_EXIST', 'nbd-client not found: install the Debian package nbd-client');
  const bs = Math.min(4096, blockSize);
  const r = await run('nbd-client', ['-unix', socket, device, '-N', exportName, '-b', String(bs)], 60_000);
  if (!r.ok) throw new TorusError('IO', `nbd-client could not attach ${device}: ${r.out.split('\n').at(-1) ?? r.out}`);
  return {
    device,
    how: 'kernel',
    async detach() {
      await run('nbd-client', ['-d', device], 60_000);
    },
  };
}

export async function detachKernel(device: string): Promise<void> {
  if (!which('nbd-client')) throw new TorusError('NOT_EXIST', 'nbd-client not found: install the Debian package nbd-client');
  const r = await run('nbd-client', ['-d', device], 60_000);
  if (!r.ok) throw new TorusError('IO', `could not detach ${device}: ${r.out}`);
}

/** Kernel-less: nbdfuse shows the export as a file, losetup turns the file into a block device. */
export async function attachFuse(socket: string, exportName: string): Promise<Attachment> {
  for (const tool of ['nbdfuse', 'losetup'])
    if (!which(tool)) throw new TorusError('NOT_EXIST', `${tool} not found: install the Debian packages libnbd-bin (nbdfuse) and mount (losetup)`);
  if (!existsSync('/dev/fuse')) throw new TorusError('NOT_EXIST', 'no /dev/fuse: FUSE is not available here either');
  const dir = mkdtempSync(join(tmpdir(), 'torusblk-fuse-'));
  const uri = `nbd+unix:///${encodeURIComponent(exportName)}?socket=${encodeURIComponent(socket)}`;
  const fuse = spawn('nbdfuse', [join(dir, 'nbd'), uri], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  fuse.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const file = join(dir, 'nbd');
  for (let i = 0; i < 200 && !existsSync(file); i++) {
    if (fuse.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  if (!existsSync(file)) {
    fuse.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
    throw new TorusError('IO', `nbdfuse did not start: ${err.trim() || 'no output'}`);
  }
  const lo = await run('losetup', ['--find', '--show', file]);
  if (!lo.ok) {
    await run('fusermount3', ['-u', dir]);
    fuse.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
    throw new TorusError('IO', `losetup failed: ${lo.out}`);
  }
  const device = lo.out.split('\n').at(-1)!.trim();
  return {
    device,
    how: 'nbdfuse',
    async detach() {
      await run('losetup', ['-d', device]);
      // The loop device lets go of the file asynchronously; unmount may need a moment.
      for (let i = 0; i < 50; i++) {
        if ((await run('fusermount3', ['-u', dir])).ok || (await run('umount', [dir])).ok) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      if (fuse.exitCode === null) {
        const gone = new Promise((r) => fuse.once('exit', r));
        const t = setTimeout(() => fuse.kill('SIGKILL'), 5000);
        fuse.kill('SIGTERM');
        await gone;
        clearTimeout(t);
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * Why a block device cannot be let go of now, or undefined when nothing holds it. A mounted file
 * system (or device-mapper, md, swap) holds its device exclusively, so an O_EXCL open fails with
 * EBUSY exactly then; the mount table says where, for the message.
 */
export function deviceBusy(device: string): string | undefined {
  let fd: number;
  try {
    fd = openSync(device, constants.O_RDONLY | constants.O_EXCL);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EBUSY') return undefined;
    return mountPointOf(device) ? `mounted on ${mountPointOf(device)}` : 'in use (a file system, device-mapper or swap holds it)';
  }
  closeSync(fd);
  return undefined;
}

function mountPointOf(device: string): string | undefined {
  let rdev: number;
  try {
    rdev = statSync(device).rdev;
  } catch {
    return undefined;
  }
  const majmin = `${Math.floor(rdev / 256) & 0xfff}:${(rdev & 0xff) | ((rdev >> 12) & 0xfff00)}`;
  try {
    // mountinfo: id parent major:minor root mountpoint ...
    for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
      const f = line.split(' ');
      if (f[2] === majmin && f[4]) return f[4].replace(/\\040/g, ' ');
    }
  } catch {
    // no /proc: the message just says "in use"
  }
  return undefined;
}
