import { readFileSync } from 'node:fs';

// What the storage nodes wrote and synced, read from each torusd's /metrics and from the kernel's
// per-process I/O accounting: the write amplification and the fsync share of a flush come from
// the difference of two readings around a run.

export interface NodeCounters {
  /** Whole blocks written (data, inode pages, runs, folds). */
  readonly blockBytes: number;
  /** Journal appends and seal padding. */
  readonly journalBytes: number;
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

export async function nodeCounters(nodes: readonly { pid: number; httpPort: number }[]): Promise<NodeCounters[]> {
  return Promise.all(
    nodes.map(async (n) => {
      const text = await (await fetch(`http://127.0.0.1:${n.httpPort}/metrics`)).text();
      return {
        blockBytes: metric(text, 'torus_storage_written_bytes_total'),
        journalBytes: metric(text, 'torus_storage_journal_written_bytes_total'),
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
    physicalBytes: sum((c) => c.physicalBytes),
    flushes: sum((c) => c.flushes),
    syncSeconds: sum((c) => c.syncSeconds),
  };
}
