// Writes of the blocks stored in one turn of the event loop, as one thread-pool job
// (native/block_write.c; the same addon computes sector checksums, core/crc.ts). Without the
// addon, or with TORUS_NATIVE_WRITES=0, the caller writes through fs as before.

import { loadNativeAddon } from '../core/native.js';
import { constants } from 'node:os';

interface BlockWriteAddon {
  dataRanges(fd: number): Float64Array;
  writeBatch(
    fds: Int32Array,
    positions: Float64Array,
    buffers: Uint8Array[],
    groupEnds: Uint32Array,
    callback: (failedAt: Int32Array, errnos: Int32Array, syncErrno: number) => void,
    syncFd?: number,
  ): void;
}

function load(): BlockWriteAddon | undefined {
  if (process.env.TORUS_NATIVE_WRITES === '0') return undefined;
  try {
    return loadNativeAddon<BlockWriteAddon>('block_write');
  } catch {
    // A broken build must not stop the store: fs still writes everything.
    return undefined;
  }
}

const addon = load();

/**
 * The parts of the file holding written data, as [start, end) pairs (SEEK_DATA/SEEK_HOLE: holes
 * and, on ext4, unwritten extents are left out); undefined without the addon.
 */
export function nativeDataRanges(fd: number): Float64Array | undefined {
  return addon?.dataRanges(fd);
}

/** One write: `data` at `position` of `fd`, whole. */
export type Write = readonly [fd: number, data: Uint8Array, position: number];

/** A group of writes stopped at `index` (0-based within the group) with this error. */
export class WriteFailure extends Error {
  constructor(
    readonly index: number,
    readonly errno: number,
  ) {
    const code = errnoName(errno);
    super(`${code}: write failed`);
    (this as NodeJS.ErrnoException).code = code;
    (this as NodeJS.ErrnoException).errno = -errno;
  }
}

/** The writes were made, but the fdatasync that was to make them durable failed with this error. */
export class SyncFailure extends Error {
  constructor(readonly errno: number) {
    const code = errnoName(errno);
    super(`${code}: fdatasync failed`);
    (this as NodeJS.ErrnoException).code = code;
    (this as NodeJS.ErrnoException).errno = -errno;
  }
}

function errnoName(errno: number): string {
  for (const [name, value] of Object.entries(constants.errno)) if (value === errno) return name;
  return `errno ${errno}`;
}

interface Pending {
  readonly writes: readonly Write[];
  readonly syncFd: number | undefined;
  readonly resolve: () => void;
  readonly reject: (err: Error) => void;
}

/**
 * Collects groups of writes submitted in one turn of the event loop and hands them to the
 * thread pool together. A group's writes are made in order and stop at the first that fails;
 * groups are independent. Each submit settles once its group is done (or stopped).
 */
export class WriteBatcher {
  private queue: Pending[] = [];
  private scheduled = false;
  /** Jobs sent to the thread pool, and groups written: for tests and metrics. */
  jobs = 0;
  groups = 0;

  static get available(): boolean {
    return addon !== undefined;
  }

  /**
   * With `syncFd`, the group settles once its writes are made and an fdatasync of that file after
   * them is done (SyncFailure if that failed): the job syncs once for every group that asked.
   */
  submit(writes: readonly Write[], syncFd?: number): Promise<void> {
    return new Promise((resolve, reject) => {
      this.queue.push({ writes, syncFd, resolve, reject });
      this.schedule();
    });
  }

  private schedule(): void {
    if (!this.scheduled) {
      this.scheduled = true;
      // After the poll phase: every put that arrived in this turn has queued its writes.
      setImmediate(() => this.run());
    }
  }

  private run(): void {
    this.scheduled = false;
    // One file synced per job; groups that want another wait for the next.
    const syncFd = this.queue.find((p) => p.syncFd !== undefined)?.syncFd;
    const batch = this.queue.filter((p) => p.syncFd === undefined || p.syncFd === syncFd);
    this.queue = this.queue.filter((p) => p.syncFd !== undefined && p.syncFd !== syncFd);
    if (this.queue.length > 0) this.schedule();
    let n = 0;
    for (const p of batch) n += p.writes.length;
    const fds = new Int32Array(n);
    const positions = new Float64Array(n);
    const buffers: Uint8Array[] = new Array(n);
    const ends = new Uint32Array(batch.length);
    let i = 0;
    batch.forEach((p, g) => {
      for (const [fd, data, position] of p.writes) {
        fds[i] = fd;
        positions[i] = position;
        buffers[i++] = data;
      }
      ends[g] = i;
    });
    this.jobs++;
    this.groups += batch.length;
    try {
      addon!.writeBatch(
        fds,
        positions,
        buffers,
        ends,
        (failedAt, errnos, syncErrno) => {
          batch.forEach((p, g) => {
            if (failedAt[g]! >= 0) p.reject(new WriteFailure(failedAt[g]!, errnos[g]!));
            else if (p.syncFd !== undefined && syncErrno !== 0) p.reject(new SyncFailure(syncErrno));
            else p.resolve();
          });
        },
        syncFd,
      );
    } catch (err) {
      // Not queued (bad arguments): nothing was written.
      for (const p of batch) p.reject(err instanceof Error ? err : new Error(String(err)));
    }
  }
}
