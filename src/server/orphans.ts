import type { BlockRef } from '../core/ids.js';
import type { OrphanGroupInfo } from '../core/models.js';
import type { OrphanKind } from '../volume/gc.js';
import type { StateFile } from './scrub.js';

// Orphans: blocks GC keeps because it cannot tell what they are (a block type this build does not
// know; a volume id etcd never handed out), reported, and deleted only after a grace period.
//
// - Judged on GC's consistent view, with the node's blocks listed after it (the rules in
//   src/volume/gc.ts), once per GC pass.
// - The grace period runs per kind (one block type, one volume id) from the first pass that found
//   it, kept in the data dir so restarts do not reset it.
// - A block type that any registered node says it knows (a newer version, mid rolling upgrade)
//   does not age at all: this node never deletes such blocks while that node is registered, and
//   only a grace period after the last one left.
// - A kind is reported once it has been orphaned in two passes in a row: a volume created just
//   after GC read its view looks orphaned for one pass.

interface OrphanGroup extends OrphanGroupInfo {
  readonly key: string;
  /** Logged since this process started (a restart logs what it still holds once more). */
  readonly reported: boolean;
}

/** Published groups at most (the heartbeat record stays small); the counts cover all. */
const MAX_LISTED = 16;

export class OrphanTracker {
  private groups = new Map<string, OrphanGroup>();
  /** Kinds first seen orphaned in the last pass (not reported yet), with when. */
  private fresh = new Map<string, number>();
  private deletedTotal = 0;
  /** Kinds whose blocks the last review handed out for deletion. */
  private doomed: string[] = [];

  constructor(
    private readonly opts: {
      /** How long a kind must stay orphaned before its blocks are deleted; 0: never deleted. */
      readonly graceMs: number;
      readonly state?: StateFile;
      readonly log?: { info(o: object, m: string): void; warn(o: object, m: string): void };
    },
  ) {
    const saved = opts.state?.load();
    if (Array.isArray(saved))
      for (const g of saved as OrphanGroup[])
        if (typeof g?.key === 'string' && Number.isFinite(g.since) && Number.isFinite(g.id) && (g.kind === 'unknown-type' || g.kind === 'unknown-volume'))
          this.groups.set(g.key, { key: g.key, kind: g.kind, id: g.id, blocks: 0, since: g.since, reported: false });
  }

  /**
   * One review on GC's view: `refs` listed after the view was read, `orphan` its verdict, and
   * `knownElsewhere` the block types some registered node knows. Returns the blocks to delete.
   */
  review(refs: readonly BlockRef[], orphan: (ref: BlockRef) => OrphanKind | undefined, knownElsewhere: ReadonlySet<number>, now: number): BlockRef[] {
    const found = new Map<string, { kind: OrphanKind; id: number; refs: BlockRef[] }>();
    for (const ref of refs) {
      const kind = orphan(ref);
      if (!kind) continue;
      const id = kind === 'unknown-type' ? ref.type : ref.volume;
      const key = `${kind}:${id}`;
      let f = found.get(key);
      if (!f) found.set(key, (f = { kind, id, refs: [] }));
      f.refs.push(ref);
    }
    for (const [key, g] of this.groups)
      if (!found.has(key)) {
        this.groups.delete(key);
        if (g.blocks > 0) this.opts.log?.info({ kind: g.kind, id: g.id }, 'orphaned blocks no longer held or no longer orphaned');
      }
    const fresh = new Map<string, number>();
    const doomed: BlockRef[] = [];
    this.doomed = [];
    for (const [key, f] of found) {
      const known = f.kind === 'unknown-type' && knownElsewhere.has(f.id);
      const prev = this.groups.get(key);
      const firstSeen = prev?.since ?? this.fresh.get(key);
      if (firstSeen === undefined) {
        fresh.set(key, now);
        continue;
      }
      // A type a registered node knows does not age: its clock restarts while that node is there.
      const since = known ? now : firstSeen;
      if (!prev?.reported) this.report(f.kind, f.id, f.refs.length, known);
      this.groups.set(key, { key, kind: f.kind, id: f.id, blocks: f.refs.length, since, reported: true });
      if (this.opts.graceMs > 0 && now - since >= this.opts.graceMs) {
        doomed.push(...f.refs);
        this.doomed.push(key);
      }
    }
    this.fresh = fresh;
    this.save();
    return doomed;
  }

  /**
   * Whether a review on an unchanged view could do anything: report a kind seen once, age a
   * group towards its deletion. GC skips a pass on an unchanged view only when it could not.
   */
  pending(): boolean {
    return this.groups.size > 0 || this.fresh.size > 0;
  }

  /** The node deleted the blocks of the last review's list, `count` of them. */
  deleted(count: number): void {
    if (count === 0) return;
    for (const key of this.doomed) this.groups.delete(key);
    this.doomed = [];
    this.save();
    this.deletedTotal += count;
    this.opts.log?.warn({ blocks: count, graceSeconds: Math.round(this.opts.graceMs / 1000) }, 'orphaned blocks deleted after the grace period');
  }

  private report(kind: OrphanKind, id: number, blocks: number, known: boolean): void {
    const grace = this.opts.graceMs > 0 ? `deleted once orphaned for --orphan-grace (${Math.round(this.opts.graceMs / 1000)} s)` : 'kept (--orphan-grace 0)';
    if (kind === 'unknown-type')
      this.opts.log?.warn(
        { blockType: id, blocks, knownByARegisteredNode: known },
        `orphaned blocks: block type ${id} is unknown to this version (written by a newer one?); ${known ? 'kept while a node that knows it is registered' : grace}`,
      );
    else this.opts.log?.warn({ volume: id, blocks }, `orphaned blocks: volume id ${id} was never handed out by etcd (metadata restored from an older backup?); ${grace}`);
  }

  private save(): void {
    try {
      this.opts.state?.save([...this.groups.values()].map(({ key, kind, id, since }) => ({ key, kind, id, since })));
    } catch (err) {
      this.opts.log?.warn({ err: (err as Error).message }, 'orphans: cannot save state');
    }
  }

  status(): { orphanBlocks: number; orphanGroups: OrphanGroupInfo[]; orphansDeleted: number; orphanGraceMs: number } {
    const groups = [...this.groups.values()];
    return {
      orphanBlocks: groups.reduce((n, g) => n + g.blocks, 0),
      orphanGroups: groups.slice(0, MAX_LISTED).map(({ kind, id, blocks, since }) => ({ kind, id, blocks, since })),
      orphansDeleted: this.deletedTotal,
      orphanGraceMs: this.opts.graceMs,
    };
  }
}
