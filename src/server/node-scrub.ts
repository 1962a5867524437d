import { join } from 'node:path';
import { KNOWN_BLOCK_TYPES } from '../core/ids.js';
import type { MetadataService } from '../core/interfaces.js';
import type { ScrubInfo } from '../core/models.js';
import type { BlockClient } from '../distributor/open.js';
import type { MetricSample } from '../http/metrics.js';
import type { FileBlockStore } from '../storage/file-store.js';
import type { LiveSet } from '../volume/gc.js';
import { OrphanTracker } from './orphans.js';
import { Scrubber, jsonStateFile, replicaFetcher } from './scrub.js';

// A storage node's scrubbing and orphan handling, wired to its store, its peers and its data dir
// (scrub.json, orphans.json). StorageNode starts and stops it, calls afterGc() after each GC pass,
// and publishes info() with its heartbeat.

export interface NodeScrubOptions {
  readonly dataDir: string;
  readonly store: FileBlockStore;
  readonly uuid: string;
  readonly client: BlockClient;
  readonly meta: MetadataService;
  /** Every held block is checked once per interval; 0: never. */
  readonly intervalMs: number;
  /** Bytes per second; by default derived from the interval. */
  readonly rateBytesPerSec?: number;
  /** Orphans are deleted once orphaned this long; 0: never. */
  readonly orphanGraceMs: number;
  readonly onChange: () => void;
  readonly log: { info(o: object, m: string): void; warn(o: object, m: string): void };
}

export class NodeScrub {
  private readonly scrubber: Scrubber;
  private readonly orphans: OrphanTracker;

  constructor(private readonly o: NodeScrubOptions) {
    const { client } = o;
    this.scrubber = new Scrubber({
      store: o.store,
      fetchCopy: replicaFetcher({ self: o.uuid, ring: () => client.view.ring, target: (u) => client.view.target(u), transport: client.transport, log: o.log }),
      intervalMs: o.intervalMs,
      ...(o.rateBytesPerSec !== undefined ? { rateBytesPerSec: o.rateBytesPerSec } : {}),
      state: jsonStateFile(join(o.dataDir, 'scrub.json')),
      onChange: o.onChange,
      log: o.log,
    });
    this.orphans = new OrphanTracker({ graceMs: o.orphanGraceMs, state: jsonStateFile(join(o.dataDir, 'orphans.json')), log: o.log });
  }

  start(): void {
    this.scrubber.start();
  }

  stop(): Promise<void> {
    return this.scrubber.stop();
  }

  /**
   * Orphans, judged on the view GC just used: the blocks are listed after that view was read, and
   * any failure (etcd included) deletes nothing, as in GC.
   */
  async afterGc(live: LiveSet): Promise<void> {
    const refs = this.o.store.refs();
    let knownElsewhere = new Set<number>();
    if (refs.some((r) => !KNOWN_BLOCK_TYPES.includes(r.type))) {
      // Any registered node counts, a stale one too: keeping a block longer is the safe mistake.
      const peers = await this.o.meta.getPeers();
      knownElsewhere = new Set(peers.filter((p) => p.uuid !== this.o.uuid).flatMap((p) => p.blockTypes ?? []));
    }
    const doomed = this.orphans.review(refs, (r) => live.orphan(r), knownElsewhere, Date.now());
    for (const r of doomed) await this.o.store.deleteBlock(r);
    if (doomed.length > 0) {
      await this.o.store.flush();
      this.orphans.deleted(doomed.length);
      this.o.onChange();
    }
  }

  /** Orphans seen and not yet reported or deleted: the next GC pass has work even on an unchanged view. */
  orphansPending(): boolean {
    return this.orphans.pending();
  }

  info(): ScrubInfo {
    return { ...this.scrubber.status(), ...this.orphans.status() };
  }

  samples(): MetricSample[] {
    const s = this.info();
    return [
      { name: 'torus_scrub_checked_bytes_total', help: 'Bytes read and checked by the background scrub', type: 'counter', value: s.checkedBytes },
      { name: 'torus_scrub_passes_total', help: 'Scrub passes finished over all held blocks', type: 'counter', value: s.passes },
      { name: 'torus_scrub_errors_total', help: 'Bad block copies the scrub found', type: 'counter', value: s.errors },
      { name: 'torus_scrub_repaired_total', help: "Bad block copies replaced by another replica's copy checked against the block's CRC", type: 'counter', value: s.repaired },
      { name: 'torus_scrub_dropped_total', help: 'Bad block copies dropped because no checksum was left to check a replacement against', type: 'counter', value: s.dropped },
      { name: 'torus_scrub_pending_copies', help: 'Bad block copies waiting for a good copy from another replica', type: 'gauge', value: s.pending },
      { name: 'torus_scrub_pass_progress_ratio', help: 'Share of held bytes checked by the pass under way (0 when resting)', type: 'gauge', value: s.passStartedAt ? Math.min(1, s.passBytes / Math.max(1, s.heldBytes)) : 0 },
      { name: 'torus_scrub_last_pass_finished_seconds', help: 'When the last scrub pass finished, seconds since the epoch (0: none yet)', type: 'gauge', value: s.lastFinishedAt / 1000 },
      { name: 'torus_scrub_rate_bytes', help: 'Scrub read rate limit, bytes per second', type: 'gauge', value: s.rate },
      { name: 'torus_orphan_blocks', help: 'Blocks held whose type or volume id nothing knows (deleted after --orphan-grace)', type: 'gauge', value: s.orphanBlocks },
      { name: 'torus_orphan_deleted_blocks_total', help: 'Orphaned blocks deleted after the grace period', type: 'counter', value: s.orphansDeleted },
    ];
  }
}
