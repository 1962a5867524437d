import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';

// What the storage nodes wrote and synced, read from each torusd's /metrics and from the kernel's
// per-process I/O accounting: the write amplification and the fsync share of a flush come from
// the difference of two readings around a run.

export interface NodeCounters {
  /** Whole blocks written (data, inode pages, runs, folds). */
  readonly blockBytes: number;
  /** Journal appends and seal padding. */
  readonly journalBytes: number;
  /** Zeros written to make never-written free slots ready for journal appends. */
  readonly prepBytes: number;
  /** Bytes the process caused to be written to storage (/proc/PID/io write_bytes: page-granular,
   * table and header writes included, the file system's own journal not). */
  readonly physicalBytes: number;
  readonly flushes: number;
  readonly syncSeconds: number;
}

function metric(text: string, name: string): number {
  const m = new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, 'm').exec(text);
  if (!m) throw new Error(`torusd /metrics has no ${name}`);
  return Number(m[1]);
}

function procWriteBytes(pid: number): number {
  const m = /^write_bytes: (\d+)$/m.exec(readFileSync(`/proc/${pid}/io`, 'utf8'));
  return m ? Number(m[1]) : NaN;
}

/**
 * Bytes written to the disk under `dir` since boot, by the kernel's own count (/proc/diskstats:
 * sectors written), whole machine; NaN when the device is not found there. The per-process count
 * above is charged when a page is dirtied, and with large page-cache folios (Linux 6.1x on ext4)
 * a 4 KiB write into cached data can be charged a whole folio: this one is what reached the disk.
 */
export function diskWrittenBytes(dir: string): number {
  try {
    const source = execFileSync('df', ['--output=source', dir], { encoding: 'utf8' }).split('\n')[1]?.trim() ?? '';
    const dev = basename(source);
    for (const line of readFileSync('/proc/diskstats', 'utf8').split('\n')) {
      const f = line.trim().split(/\s+/);
      if (f[2] === dev) return Number(f[9]) * 512;
    }
  } catch {
    // No df or no diskstats: reported as unknown.
  }
  return NaN;
}

export async function nodeCounters(nodes: readonly { pid: number; httpPort: number }[]): Promise<NodeCounters[]> {
  return Promise.all(
    nodes.map(async (n) => {
      const text = await (await fetch(`http://127.0.0.1:${n.httpPort}/metrics`)).text();
      return {
        blockBytes: metric(text, 'torus_storage_written_bytes_total'),
        journalBytes: metric(text, 'torus_storage_journal_written_bytes_total'),
        prepBytes: metric(text, 'torus_storage_slot_prep_written_bytes_total'),
        physicalBytes: procWriteBytes(n.pid),
        flushes: metric(text, 'torus_storage_flushes_total'),
        syncSeconds: metric(text, 'torus_storage_sync_seconds_total'),
      };
    }),
  );
}

/** after - before, summed over the nodes. */
export function counterDelta(before: readonly NodeCounters[], after: readonly NodeCounters[]): NodeCounters {
  const sum = (f: (c: NodeCounters) => number): number => after.reduce((a, c, i) => a + f(c) - f(before[i]!), 0);
  return {
    blockBytes: sum((c) => c.blockBytes),
    journalBytes: sum((c) => c.journalBytes),
    prepBytes: sum((c) => c.prepBytes),
    physicalBytes: sum((c) => c.physicalBytes),
    flushes: sum((c) => c.flushes),
    syncSeconds: sum((c) => c.syncSeconds),
  };
}
