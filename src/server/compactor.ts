import { hostname } from 'node:os';
import type { Logger } from 'pino';
import { toTorusError } from '../core/errors.js';
import type { KVSession, MetaKV } from '../core/interfaces.js';
import { PREFIX } from '../metadata/keys.js';

// etcd keeps every revision of every key until it is compacted, and every sync writes a revision:
// a busy cluster walks etcd towards its space quota, where it refuses writes and everything stops.
// One storage node at a time (the holder of an election key under its lease) compacts etcd's
// history: to the revision it saw `retention` ago, or further when that leaves more than
// `maxRevisions` revisions. Nothing in Torus reads old revisions; a watch that resumes from a
// compacted one reads its key again (metadata/etcd/watch.ts). Compaction frees space inside the
// database for reuse; only defragmentation gives it back to the file system (docs/failure-guide.md).

export const COMPACTOR_KEY = `${PREFIX}meta/compactor`;

export interface CompactorOptions {
  readonly kv: MetaKV;
  /** Who campaigns (the node's UUID), written into the election key. */
  readonly id: string;
  /** History kept, in time. */
  readonly retentionMs: number;
  /** History kept at most, in revisions, whatever its age. */
  readonly maxRevisions: number;
  /** How often the leader looks (and others check whether the leader is still there). */
  readonly intervalMs: number;
  /** The election lease's TTL: how long a dead leader holds the key. */
  readonly leaseTtlMs?: number;
  readonly log?: Logger;
}

export interface CompactorStatus {
  readonly leader: boolean;
  readonly compactions: number;
  readonly failures: number;
  /** The revision history was last compacted to by this node, 0 if never. */
  readonly compactedRevision: number;
  /** etcd's database size as last seen by this node as leader (bytes), 0 if never. */
  readonly dbSizeBytes: number;
  readonly lastError: string;
}

export class HistoryCompactor {
  private session: KVSession | undefined;
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private stopped = false;
  /** Revisions seen, oldest first, to find the one `retention` ago. */
  private samples: { at: number; revision: number }[] = [];
  private st = { leader: false, compactions: 0, failures: 0, compactedRevision: 0, dbSizeBytes: 0, lastError: '' };

  constructor(private readonly opts: CompactorOptions) {}

  start(): void {
    this.schedule();
  }

  status(): CompactorStatus {
    return { ...this.st };
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => {
      this.running = this.tick().finally(() => {
        this.running = undefined;
        this.schedule();
      });
    }, this.opts.intervalMs);
  }

  /** One round: campaign, and compact if leading. Never throws. */
  async tick(): Promise<void> {
    try {
      this.st.leader = await this.campaign();
      if (this.st.leader) await this.compact();
      this.st.lastError = '';
    } catch (err) {
      this.st.failures++;
      const msg = toTorusError(err).message;
      if (msg !== this.st.lastError) this.opts.log?.warn({ err: msg }, 'etcd compaction skipped');
      this.st.lastError = msg;
    }
  }

  /** Holds the election key under our own lease, unless another live node does. */
  private async campaign(): Promise<boolean> {
    if (!this.session?.alive) {
      this.session = await this.opts.kv.session(this.opts.leaseTtlMs ?? 15_000);
      this.samples = [];
    }
    const s = this.session;
    const res = await this.opts.kv.txn(
      [{ key: COMPACTOR_KEY, target: 'version', cmp: '==', value: 0 }],
      [{ op: 'put', key: COMPACTOR_KEY, value: JSON.stringify({ id: this.opts.id, host: hostname(), since: new Date().toISOString() }), session: s }],
      [{ op: 'get', key: COMPACTOR_KEY }],
    );
    const leading = res.succeeded || res.gets[0]?.[0]?.lease === s.id;
    if (leading && !this.st.leader) this.opts.log?.info('compacting etcd history for the cluster');
    return leading;
  }

  private async compact(): Promise<void> {
    const now = Date.now();
    const { revision, dbSizeBytes } = await this.opts.kv.status();
    this.st.dbSizeBytes = dbSizeBytes;
    this.samples.push({ at: now, revision });
    // Keep the newest sample at least `retention` old, and all newer ones.
    while (this.samples.length > 1 && now - this.samples[1]!.at >= this.opts.retentionMs) this.samples.shift();
    const old = this.samples[0]!;
    const byTime = now - old.at >= this.opts.retentionMs ? old.revision : 0;
    const target = Math.max(byTime, revision - this.opts.maxRevisions);
    if (target <= this.st.compactedRevision || target <= 0) return;
    await this.opts.kv.compact(target);
    this.opts.log?.debug({ revision: target, current: revision, dbSizeBytes }, 'compacted etcd history');
    this.st.compactedRevision = target;
    this.st.compactions++;
  }

  /** Stops, and gives up the leadership at once so another node takes over on its next round. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.timer);
    await this.running;
    await this.session?.revoke();
  }
}
