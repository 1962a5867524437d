import { blockRefKey } from '../core/ids.js';
import { Yielder } from '../core/yielder.js';
import { walkTree, type VolumeBlockStore } from './inode.js';
import { logRef } from './journal-format.js';
import type { VolumeMeta } from './meta.js';
import type { Head, Pointer } from './records.js';
import { decodeRunPageLogs } from './runs.js';

// How much storage a volume takes, found by walking its inode trees (pages only: the leaves name
// the data blocks, which are never read) and its overlay run chains (docs/journal.md: the runs
// name the journal's log blocks that hold data not yet folded into whole blocks). Blocks are
// shared by identity: a snapshot shares every block its volume has not rewritten since, and a
// clone shares its parent snapshot's blocks. Sizes are of one copy; the cluster stores R of each.
// A log block counts whole while any run names it, as it takes its slot until it is collected.

export interface SnapshotUsage {
  readonly name: string;
  readonly when: string;
  readonly size: number;
  /** Bytes of data blocks the snapshot references. */
  readonly referenced: number;
  /** Bytes only this snapshot holds: what deleting it would free (after GC). */
  readonly exclusive: number;
}

export interface VolumeUsage {
  /** Bytes of data blocks and journal log blocks the volume's current head references (written, not trimmed). */
  readonly allocated: number;
  /** Of those, bytes also held by a snapshot of it, its parent snapshot or a clone of it. */
  readonly shared: number;
  /** allocated - shared: what the volume alone holds. */
  readonly exclusive: number;
  /** Bytes of inode pages and overlay run pages of the head. */
  readonly metadata: number;
  readonly snapshots: readonly SnapshotUsage[];
}

/** Reads tree pages once however many trees share them. */
export class TreeReader {
  private readonly pages = new Map<string, Promise<Buffer>>();
  readonly fanout: number;

  constructor(private readonly store: VolumeBlockStore) {
    this.fanout = store.blockSize / 32;
  }

  /** Keys of the data (and log) blocks, and the count of inode and run pages, of a head. */
  async blocks(head: Head): Promise<{ data: Set<string>; pages: number }> {
    const data = new Set<string>();
    let pages = 0;
    await walkTree(
      head,
      this.fanout,
      (ptr) => this.page(ptr),
      (ptr, kind) => {
        if (kind === 'data') data.add(blockRefKey(ptr.ref));
        else pages++;
        return kind === 'page';
      },
    );
    const y = new Yielder();
    for (let p = head.runs ?? null; p; ) {
      // The log table names the log blocks the page's entries point into, each once (as GC reads it).
      const page = decodeRunPageLogs(await this.page(p));
      if (y.due(page.logs.length)) await y.pause();
      pages++;
      for (const l of page.logs) data.add(blockRefKey(logRef(l)));
      if (page.base) break;
      p = page.prev;
    }
    return { data, pages };
  }

  private page(ptr: Pointer): Promise<Buffer> {
    const key = blockRefKey(ptr.ref);
    let p = this.pages.get(key);
    if (!p) {
      p = this.store.getBlock(ptr.ref, ptr.crc);
      this.pages.set(key, p);
      p.catch(() => this.pages.delete(key));
    }
    return p;
  }
}

function countNotIn(set: Set<string>, others: readonly Set<string>[]): number {
  let n = 0;
  for (const k of set) if (!others.some((o) => o.has(k))) n++;
  return n;
}

export async function volumeUsage(vm: VolumeMeta, reader: TreeReader, name: string): Promise<VolumeUsage> {
  const bs = reader.fanout * 32;
  const record = await vm.get(name);
  const [{ head }, snaps, all] = await Promise.all([vm.head(record.id), vm.listSnapshots(name), vm.list()]);
  const mine = await reader.blocks(head);
  const snapBlocks = await Promise.all(snaps.map(async (s) => (await reader.blocks(s.head)).data));
  // Trees outside this volume that may hold the same blocks: the snapshot it was cloned from,
  // and the heads of its clones.
  const outside: Set<string>[] = [];
  if (record.parent) {
    // Cloned from a snapshot, or from a volume as of its last sync (then its head now is the
    // best guide left to what they still share).
    const { volume, snapshot } = record.parent;
    const from = snapshot !== undefined ? (await vm.getSnapshot(volume, snapshot).catch(() => undefined))?.snapshot.head : await vm.get(volume).then((v) => vm.head(v.id)).then((h) => h.head, () => undefined);
    if (from) outside.push((await reader.blocks(from)).data);
  }
  for (const v of all) if (v.record.parent?.volume === name) outside.push((await reader.blocks(v.head)).data);
  const exclusive = countNotIn(mine.data, [...snapBlocks, ...outside]);
  return {
    allocated: mine.data.size * bs,
    shared: (mine.data.size - exclusive) * bs,
    exclusive: exclusive * bs,
    metadata: mine.pages * bs,
    snapshots: snaps.map((s, i) => ({
      name: s.name,
      when: s.when,
      size: s.head.size,
      referenced: snapBlocks[i]!.size * bs,
      exclusive: countNotIn(snapBlocks[i]!, [mine.data, ...snapBlocks.filter((_, j) => j !== i), ...outside]) * bs,
    })),
  };
}

/** Bytes of data blocks a head references (for listings: no snapshot accounting). */
export async function allocatedBytes(reader: TreeReader, head: Head): Promise<number> {
  return (await reader.blocks(head)).data.size * reader.fanout * 32;
}
