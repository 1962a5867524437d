import { TorusError } from '../core/errors.js';
import { BlockType, KNOWN_BLOCK_TYPES, LOG_BLOCKS_PER_SEGMENT, blockRefKey, type BlockRef } from '../core/ids.js';
import { Yielder } from '../core/yielder.js';
import { walkTree, type VolumeBlockStore } from './inode.js';
import { DIRECT_INDEX_BASE, isDirectRef, logRef } from './journal-format.js';
import type { GcView, VolumeMeta } from './meta.js';
import type { Head, JournalPos } from './records.js';
import { decodeRunPageLogs } from './runs.js';

// Garbage collection decides, for blocks a storage node holds, which no one can ever read again:
// blocks of deleted volumes, of inodes superseded by later syncs and held by no snapshot or
// clone, and of trimmed ranges. The rules that keep it from deleting live data:
//
// - The decision uses one consistent view of all volume metadata, read at one etcd revision,
//   and the node lists its own blocks only after reading it.
// - A block whose epoch (its ref's inode number) is above its volume's head epoch may belong to a
//   sync in flight: kept. Epochs only grow, and a writer's blocks all carry its current epoch.
// - A block of a volume id at or above the volume minter is of a volume created after the view:
//   kept (the original deleted a volume created mid-cycle).
// - Liveness is global: a clone's tree may point at its parent's blocks, so a block is live if
//   any head or snapshot of any volume references it, whatever volume id it carries.
// - Any failure to read metadata or a tree page aborts the whole cycle: no partial view ever
//   decides a deletion (the original treated a failed volume listing as "no volumes").
// - Journals (docs/journal.md): overlay run pages and the log blocks they point into are live
//   when any head's or snapshot's run chain (back to its base) names them. A log block of the
//   head's journal tail (the head's session epoch: a later segment, or the same one from its
//   start on) is live, and so is one of a session newer than the head's; any other log block is
//   a crashed or finished session's leftover, already replayed or checkpointed. A data block a
//   Block record names is kept the same way: of the head's session from the head's directStart
//   on, and of any newer session.
// - A read-only opener holds the head it opened (meta.hold, bound to its lease): that head's
//   tree, runs and journal tail are live by the same rules, as long as the hold is there.

/**
 * Blocks GC never deletes, yet nothing in the view explains: `unknown-type`, a block type this
 * build does not know (a newer node's, during a rolling upgrade); `unknown-volume`, a volume id at
 * or above the minter, i.e. one etcd never handed out (metadata restored from an older backup).
 */
export type OrphanKind = 'unknown-type' | 'unknown-volume';

export interface LiveSet {
  readonly revision: number;
  isDead(ref: BlockRef): boolean;
  /** Why a block that isDead() keeps is an orphan, if it is one. */
  orphan(ref: BlockRef): OrphanKind | undefined;
  /** Tree pages read to build it (each page once per distinct tree). */
  readonly pagesRead: number;
  readonly liveBlocks: number;
  /** Every live ref (tools and tests: counting copies per block). */
  refs(): BlockRef[];
}

/** `view`: one already read from `meta` (a caller that looked at it first). */
export async function buildLiveSet(meta: VolumeMeta, store: VolumeBlockStore, view?: GcView): Promise<LiveSet> {
  view ??= await meta.gcView();
  const live = new Map<string, BlockRef>();
  let pagesRead = 0;
  const fanout = store.blockSize / 32;
  const seenPages = new Set<string>();

  const walk = (head: Head): Promise<void> =>
    walkTree(
      head,
      fanout,
      async (ptr) => {
        pagesRead++;
        return store.getBlock(ptr.ref, ptr.crc);
      },
      (ptr, kind) => {
        const key = blockRefKey(ptr.ref);
        live.set(key, ptr.ref);
        if (kind === 'data') return false;
        if (seenPages.has(key)) return false; // shared subtree (snapshots, clones) already walked
        seenPages.add(key);
        return true;
      },
    );

  const seenRuns = new Set<string>();
  const walkRuns = async (head: Head): Promise<void> => {
    for (let p = head.runs ?? null; p; ) {
      const key = blockRefKey(p.ref);
      live.set(key, p.ref);
      if (seenRuns.has(key)) return; // the rest of a chain shared with a snapshot or clone
      seenRuns.add(key);
      const page = decodeRunPageLogs(await store.getBlock(p.ref, p.crc));
      pagesRead++;
      for (const l of page.logs) {
        const ref = logRef(l);
        live.set(blockRefKey(ref), ref);
      }
      if (page.base) return;
      p = page.prev;
    }
  };

  const epochs = new Map<number, number>();
  const journals = new Map<number, JournalPos | null>();
  /** The journals of the heads read-only openers hold. */
  const heldJournals = new Map<number, JournalPos[]>();
  for (const v of view.volumes) {
    if (!v.head) throw new TorusError('INTERNAL', `volume ${v.record.name} has no head; not collecting garbage`);
    epochs.set(v.record.id, v.head.epoch);
    journals.set(v.record.id, v.head.journal ?? null);
    heldJournals.set(
      v.record.id,
      v.held.flatMap((h) => (h.journal ? [h.journal] : [])),
    );
    for (const h of [v.head, ...v.snapshots, ...v.held]) {
      await walk(h);
      await walkRuns(h);
    }
  }

  /** Kept by the head's journal (or, without one, newer than the head), or by a held head's journal. */
  const liveBy = (ref: BlockRef, inJournal: (ref: BlockRef, j: JournalPos) => boolean): boolean => {
    const j = journals.get(ref.volume);
    const byHead = j ? (ref.inode !== j.epoch ? ref.inode > j.epoch : inJournal(ref, j)) : ref.inode > (epochs.get(ref.volume) ?? Infinity);
    return byHead || (heldJournals.get(ref.volume) ?? []).some((h) => ref.inode === h.epoch && inJournal(ref, h));
  };

  /** A log block the view's runs do not name: kept while it may still be (or become) part of a journal. */
  const liveLog = (ref: BlockRef): boolean =>
    liveBy(ref, (r, j) => {
      const segment = Math.floor(r.index / LOG_BLOCKS_PER_SEGMENT);
      return segment > j.segment || (segment === j.segment && r.index % LOG_BLOCKS_PER_SEGMENT >= j.start);
    });

  /**
   * A block a Block record names (journal-format.ts, directRef): kept from the head's session on
   * from the head's directStart (the tail may name it, or will once its record is appended), and
   * any of a newer session; the rest were checkpointed into a tree (then live above) or dropped.
   */
  const liveDirect = (ref: BlockRef): boolean => liveBy(ref, (r, j) => r.index - DIRECT_INDEX_BASE >= (j.directStart ?? 0));

  return {
    revision: view.revision,
    pagesRead,
    liveBlocks: live.size,
    refs: () => [...live.values()],
    orphan(ref: BlockRef): OrphanKind | undefined {
      if (!KNOWN_BLOCK_TYPES.includes(ref.type)) return 'unknown-type';
      if (ref.volume >= view.minter && !live.has(blockRefKey(ref))) return 'unknown-volume';
      return undefined;
    },
    isDead(ref: BlockRef): boolean {
      if (!KNOWN_BLOCK_TYPES.includes(ref.type)) return false;
      if (ref.volume >= view.minter) return false;
      if (live.has(blockRefKey(ref))) return false;
      if (ref.type === BlockType.Log) return !liveLog(ref);
      if (isDirectRef(ref)) return !liveDirect(ref);
      const epoch = epochs.get(ref.volume);
      return !(epoch !== undefined && ref.inode > epoch);
    },
  };
}

/** What a node's GC pass did. */
export interface GcReport {
  readonly checked: number;
  readonly deleted: number;
  readonly revision: number;
}

/** The local side: deletes this node's dead blocks, given its store. */
export async function collectLocal(
  live: LiveSet,
  local: { refs(): BlockRef[]; deleteBlock(ref: BlockRef): Promise<void>; flush(): Promise<void> },
  signal?: AbortSignal,
): Promise<GcReport> {
  const refs = local.refs();
  let deleted = 0;
  const y = new Yielder();
  for (const ref of refs) {
    if (signal?.aborted) break;
    if (y.due()) await y.pause();
    if (!live.isDead(ref)) continue;
    await local.deleteBlock(ref);
    deleted++;
  }
  if (deleted > 0) await local.flush();
  return { checked: refs.length, deleted, revision: live.revision };
}
