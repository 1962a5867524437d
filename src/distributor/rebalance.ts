import { toTorusError } from '../core/errors.js';
import { BlockType, blockRefKey, type BlockRef } from '../core/ids.js';
import type { BlockStore, JournalStore, Ring } from '../core/interfaces.js';
import type { RebalanceInfo } from '../core/models.js';
import { Yielder } from '../core/yielder.js';
import { InFlightBytes, sendAndConfirm, type SendContext } from './rebalance-send.js';
import type { PeerTarget, PeerTransport } from './transport.js';

// The rebalancer: one loop per storage node that walks the node's own blocks and makes the
// cluster agree with the ring. For each block the ring names R owners:
//
// - an owner that lacks the block gets a copy (after a peer joins, after a hard loss and
//   `peer remove --force`, after `ring set-replication` raises R);
// - a block this node holds but does not own is deleted here, but only after every owner has
//   confirmed holding it durably (HAS then FLUSH, or PUT then FLUSH): the drain after `peer
//   remove`. HAS alone is not enough: an owner answers yes for a block it has written but not
//   yet synced (another node's move in flight, a client's put that timed out but landed).
//
// An owner that cannot be reached is skipped for this pass: nothing is deleted on its account,
// and the block counts as under-replicated. The same mechanism therefore does migration, drain,
// re-replication and replication changes (as the original's did), and it is rate-limited so
// foreground I/O keeps going. Reads keep working meanwhile because they walk the whole ring
// permutation, old holders included.
//
// A pass plans (which peer should hold which of our blocks), then sends and confirms, every peer
// at once and each pipelined with one FLUSH per peer at the end (rebalance-send.ts), then drains,
// then counts what is still short of R copies. The blocks in flight are held to a byte budget.
//
// Once a pass over every block ends settled (every owner of every block holds it durably, and
// nothing is left to drain), the passes after it are quiet: they check only the blocks
// stored or sealed here since, which is all that can need work while nothing else changes. A
// quiet pass gives way to a full one when the ring changes, when another member's process is not
// the one asked before the settled pass (a restarted peer may have lost blocks it had confirmed
// by HAS alone, unsynced), when a pass does not settle, and every `fullPassMs` regardless; and
// none is quiet until every member has finished a pass on the current ring (one still on the old
// ring drains copies that a pass on the new ring counts on). An
// idle node walking every block every 10 s, and asking its peers about each, was the steady CPU
// load of an idle cluster and, on shared cores, part of every foreground request's tail.

export interface RebalanceOptions {
  readonly self: { readonly uuid: string; readonly store: BlockStore };
  readonly ring: () => Ring;
  readonly target: (uuid: string) => PeerTarget | undefined;
  readonly transport: PeerTransport;
  readonly blockSize: number;
  /** Bytes per second sent to other peers at most (0: unlimited). */
  readonly rateBytesPerSec?: number;
  /** Idle time between passes when nothing moved (a ring change starts one at once). */
  readonly intervalMs?: number;
  /** The longest a settled node goes between passes over every block it holds (0: every pass is one). */
  readonly fullPassMs?: number;
  /**
   * Whether every other ring member has said (with its heartbeat) that it finished a pass on this
   * ring version. A member still on an older ring may drop a copy (its drain) that this node's
   * pass on the newer ring has just counted: until all have caught up, no pass settles into
   * quiet ones. Absent: no pass is ever quiet.
   */
  readonly peersCaughtUp?: (ringVersion: number) => boolean;
  /** Milliseconds a pass's walks run before giving the event loop back (Yielder; tests set 0). */
  readonly yieldSliceMs?: number;
  /** Refs per HAS call. */
  readonly batch?: number;
  /** Batches in flight per receiving peer (1: stop-and-wait). */
  readonly depth?: number;
  /** Bytes of blocks read here and not yet acknowledged by their receivers, at most. */
  readonly inFlightBytes?: number;
  /**
   * Called after every finished pass with the new status, so the node can publish it without
   * waiting for its next heartbeat (the CLI judges balance by the ring version in it).
   */
  readonly onPass?: (status: RebalanceStatus) => void;
  readonly log?: { info(o: object, m: string): void; warn(o: object, m: string): void };
}

export interface RebalanceStatus extends RebalanceInfo {
  readonly underReplicated: number;
  readonly passes: number;
  /** The ring version of the last finished pass, including a pass that found nothing to do; 0 before the first. */
  readonly ringVersion: number;
  /** Passes over every block held, of `passes`. */
  readonly fullPasses: number;
  /** Blocks the last finished pass checked. */
  readonly lastChecked: number;
}

/**
 * The share of its time an idle node may spend walking its blocks. A pass costs about 10 µs per
 * block held (the ring lookup, and asking the other owners); on a big store it outlasts any fixed
 * interval, and an idle node would walk without a pause. A ring change still starts a pass at once.
 */
const IDLE_WALK_SHARE = 0.05;

export const REBALANCE_DEFAULTS = { depth: 4, inFlightBytes: 64 * 1024 * 1024, fullPassMs: 10 * 60_000 };
/** What a quiet pass asks each peer so that the peer's process instance is known; the answer is not used. */
const PROBE_REF: BlockRef = { type: BlockType.Data, volume: 0, inode: 0, index: 0 };
/** A PUT of a few MiB keeps the peer's disk and the link busy without holding much per call. */
const MAX_PUT_BYTES = 4 * 1024 * 1024;

/** Where a settled pass left things: while they hold, a pass need only check what changed. */
interface Baseline {
  readonly ringVersion: number;
  /** The store's change mark taken before the settled pass listed its blocks. */
  readonly mark: number;
  /** Each other ring member's process instance, asked before the settled pass began. */
  readonly instances: ReadonlyMap<string, string>;
  /** When the last pass over every block began. */
  readonly fullAt: number;
}

interface Plan {
  /** Every block held here that may move (open log blocks left out). */
  readonly refs: readonly BlockRef[];
  /** For each other owner of some of them, which ones. */
  readonly perPeer: ReadonlyMap<string, BlockRef[]>;
  /** Blocks held here that this node does not own, with their owners. */
  readonly notOwned: readonly { readonly ref: BlockRef; readonly owners: readonly string[] }[];
}

export class Rebalancer {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private stopped = false;
  private kicked = false;
  private wake: (() => void) | undefined;
  private lastRingVersion = -1;
  private baseline: Baseline | undefined;
  /** Time the current pass spent in peer calls that failed (timeouts to an unreachable owner). */
  private failedWaitMs = 0;
  private tokens = 0;
  private lastRefill = Date.now();
  private readonly depth: number;
  /** What the pipelines hold; its `used` is published as a metric. */
  readonly inFlight: InFlightBytes;
  private st = {
    rebalancing: false,
    blocksLeft: 0,
    bytesLeft: 0,
    blocksMoved: 0,
    bytesMoved: 0,
    rate: 0,
    lastFinish: 0,
    underReplicated: 0,
    passes: 0,
    ringVersion: 0,
    fullPasses: 0,
    lastChecked: 0,
    totalMoved: 0,
  };

  constructor(private readonly opts: RebalanceOptions) {
    this.depth = Math.max(1, opts.depth ?? REBALANCE_DEFAULTS.depth);
    this.inFlight = new InFlightBytes(opts.inFlightBytes ?? REBALANCE_DEFAULTS.inFlightBytes);
  }

  start(): void {
    const loop = async (): Promise<void> => {
      while (!this.stopped) {
        let moved = 0;
        const started = Date.now();
        this.failedWaitMs = 0;
        try {
          moved = await this.pass();
        } catch (err) {
          this.opts.log?.warn({ err: toTorusError(err).message }, 'rebalance pass failed');
        }
        if (this.stopped) break;
        // Keep going while there is work; otherwise rest until the interval or a ring change.
        if (moved > 0 || this.kicked) {
          this.kicked = false;
          continue;
        }
        // The rest is in proportion to the walk's own work, not to time spent waiting on calls that
        // failed: a walk slowed by 5 s timeouts to a cut-off node would otherwise rest for minutes,
        // and leave that node's blocks unrepaired that long after it is back.
        const walk = Math.max(0, Date.now() - started - this.failedWaitMs);
        const rest = Math.max(this.opts.intervalMs ?? 10_000, walk * (1 / IDLE_WALK_SHARE - 1));
        await new Promise<void>((r) => {
          this.wake = r;
          this.timer = setTimeout(r, rest);
        });
        this.wake = undefined;
      }
    };
    this.running = loop();
  }

  /** Start a pass now (the ring changed). */
  kick(): void {
    this.kicked = true;
    clearTimeout(this.timer);
    this.wake?.();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.kick();
    await this.running;
  }

  status(): RebalanceStatus {
    const { totalMoved: _t, ...rest } = this.st;
    return { ...rest };
  }

  private async throttle(bytes: number): Promise<void> {
    const rate = this.opts.rateBytesPerSec ?? 0;
    if (rate <= 0) return;
    for (;;) {
      const now = Date.now();
      // A bucket of one second's worth: bursts stay short, the average stays at the rate.
      this.tokens = Math.min(rate, this.tokens + ((now - this.lastRefill) / 1000) * rate);
      this.lastRefill = now;
      if (this.tokens >= bytes || this.tokens >= rate) {
        this.tokens -= bytes;
        return;
      }
      await new Promise((r) => setTimeout(r, Math.min(1000, ((bytes - this.tokens) / rate) * 1000)));
      if (this.stopped) return;
    }
  }

  /**
   * One walk over the local blocks (or, when quiet, over those changed since the last settled
   * pass). Returns the number of blocks sent (and confirmed) or deleted.
   */
  async pass(): Promise<number> {
    const ring = this.opts.ring();
    const ringChanged = ring.version !== this.lastRingVersion;
    // One yielder for the pass: its walks give the event loop back to the node's foreground work.
    const y = new Yielder(this.opts.yieldSliceMs);
    const passStarted = Date.now();
    // Asked before anything is checked: a member that catches up after this may still have
    // dropped a copy this pass counts.
    const caughtUp = this.opts.peersCaughtUp?.(ring.version) ?? false;
    const store = this.opts.self.store;
    const instances = store.changeMark && store.refsChangedSince ? await this.peerInstances(ring) : undefined;
    const since = this.quietSince(ring, instances);
    // Taken before the listing: whatever changes after it is above the mark, for the next pass.
    const mark = store.changeMark?.();
    const plan = await this.plan(ring, y, since !== undefined ? store.refsChangedSince!(since) : store.refs());
    const progress = this.startProgress(plan);
    this.st.rebalancing = ringChanged || plan.notOwned.length > 0 || this.st.blocksMoved > 0;
    const { confirmed, moved, bytes } = await this.sendAll(plan, progress, y);
    const deleted = await this.drain(plan.notOwned, confirmed, y);
    // A pass cut short by stop() did not check every block against this ring: it does not count.
    if (this.stopped) return moved + deleted;
    const under = await this.countUnderReplicated(ring, plan.refs, confirmed, y);
    this.lastRingVersion = ring.version;
    this.st.passes++;
    if (since === undefined) this.st.fullPasses++;
    this.st.lastChecked = plan.refs.length;
    // Settled: every owner of every block checked holds it (confirmed, or moved and flushed), and
    // every copy held here that this node does not own is gone.
    const settled = under === 0 && deleted === plan.notOwned.length;
    this.baseline =
      settled && caughtUp && mark !== undefined && instances !== undefined
        ? { ringVersion: ring.version, mark, instances, fullAt: since !== undefined ? this.baseline!.fullAt : passStarted }
        : undefined;
    // Recorded after every finished pass, one with nothing to move included: readers take a
    // ring version below the current ring's as "this node has not caught up yet".
    this.st.ringVersion = ring.version;
    this.st.underReplicated = under;
    this.st.totalMoved += moved;
    progress.update();
    this.st.blocksLeft = 0;
    this.st.bytesLeft = 0;
    this.st.lastFinish = Date.now();
    const didWork = moved + deleted;
    // Still moving, or blocked on an owner that is unreachable: not balanced either way.
    this.st.rebalancing = didWork > 0 || plan.notOwned.length > deleted;
    if (didWork > 0) this.opts.log?.info({ sent: moved, bytes, deleted, under, ringVersion: ring.version }, 'rebalance pass');
    try {
      this.opts.onPass?.(this.status());
    } catch (err) {
      this.opts.log?.warn({ err: toTorusError(err).message }, 'rebalance: status listener failed');
    }
    // A pass blocked only by unreachable peers is not "work": wait for the interval to retry.
    return didWork;
  }

  /**
   * Each other ring member's process instance, asked now (one small call each), or undefined when
   * one cannot be asked or does not say: then no pass is quiet.
   */
  private async peerInstances(ring: Ring): Promise<Map<string, string> | undefined> {
    const instanceOf = this.opts.transport.instance?.bind(this.opts.transport);
    if (!instanceOf) return undefined;
    const others = ring.members().filter((u) => u !== this.opts.self.uuid);
    let failedWait = 0;
    const asked = await Promise.all(
      others.map(async (u): Promise<[string, string] | undefined> => {
        const target = this.opts.target(u);
        if (!target) return undefined;
        const started = Date.now();
        try {
          await this.opts.transport.has(target, [PROBE_REF]);
        } catch {
          // As for the walk's calls: waiting on a peer that cannot answer does not lengthen the rest.
          failedWait = Math.max(failedWait, Date.now() - started);
          return undefined;
        }
        // Read right after the await: the instance that answered (transport.ts).
        const instance = instanceOf(target);
        return instance === undefined ? undefined : [u, instance];
      }),
    );
    this.failedWaitMs += failedWait;
    if (asked.some((a) => a === undefined)) return undefined;
    return new Map(asked as [string, string][]);
  }

  /** The store's change mark a quiet pass checks from, or undefined when this pass must check every block. */
  private quietSince(ring: Ring, instances: ReadonlyMap<string, string> | undefined): number | undefined {
    const b = this.baseline;
    if (!b || !instances || ring.version !== b.ringVersion) return undefined;
    if (Date.now() - b.fullAt >= (this.opts.fullPassMs ?? REBALANCE_DEFAULTS.fullPassMs)) return undefined;
    if (instances.size !== b.instances.size) return undefined;
    for (const [u, i] of instances) if (b.instances.get(u) !== i) return undefined;
    return b.mark;
  }

  /**
   * What this pass has to check among `held`: for each other owner of those blocks, which ones;
   * and which of them this node does not own (to drop once their owners hold them durably).
   */
  private async plan(ring: Ring, y: Yielder, held: readonly BlockRef[]): Promise<Plan> {
    const self = this.opts.self.uuid;
    const store = this.opts.self.store;
    // An open log block belongs to the writer appending to it (docs/journal.md): not moved until sealed.
    const isOpen = (store as Partial<JournalStore>).isOpenLog?.bind(store);
    const refs: BlockRef[] = [];
    for (const ref of held) {
      if (y.due()) await y.pause();
      if (!isOpen?.(ref)) refs.push(ref);
    }
    const perPeer = new Map<string, BlockRef[]>();
    const notOwned: { ref: BlockRef; owners: string[] }[] = [];
    for (const ref of refs) {
      if (y.due()) await y.pause();
      const perm = ring.getPeers(ref);
      if (perm.replication === 0) continue; // empty ring: nothing to place anywhere
      const owners = perm.peers.slice(0, perm.replication);
      for (const o of owners) {
        if (o === self) continue;
        let l = perPeer.get(o);
        if (!l) perPeer.set(o, (l = []));
        l.push(ref);
      }
      if (!owners.includes(self)) notOwned.push({ ref, owners });
    }
    return { refs, perPeer, notOwned };
  }

  /** The pass's counters and the status estimate they feed, updated as answers come in. */
  private startProgress(plan: Plan): { readonly add: SendContext['progress']; update(): void } {
    const pairs = [...plan.perPeer.values()].reduce((n, l) => n + l.length, 0);
    const started = Date.now();
    let checked = 0;
    let missingSeen = 0;
    let sentBlocks = 0;
    let sentBytes = 0;
    const update = (): void => {
      const missRate = checked > 0 ? missingSeen / checked : plan.notOwned.length > 0 ? 1 : 0;
      const left = Math.round((pairs - checked) * missRate);
      this.st.blocksLeft = left;
      this.st.bytesLeft = left * this.opts.blockSize;
      const secs = Math.max(0.001, (Date.now() - started) / 1000);
      this.st.rate = sentBytes / secs;
      this.st.blocksMoved = sentBlocks;
      this.st.bytesMoved = sentBytes;
    };
    return {
      add: (p) => {
        checked += p.checked ?? 0;
        missingSeen += p.missing ?? 0;
        sentBlocks += p.sentBlocks ?? 0;
        sentBytes += p.sentBytes ?? 0;
        update();
      },
      update,
    };
  }

  /**
   * Send-and-confirm for every peer at once, each pipelined (rebalance-send.ts). Returns which
   * (peer, block) pairs are confirmed, as `${peer} ${blockRefKey}`.
   */
  private async sendAll(plan: Plan, progress: { readonly add: SendContext['progress'] }, y: Yielder): Promise<{ confirmed: Set<string>; moved: number; bytes: number }> {
    const notOwned = new Set(plan.notOwned.map(({ ref }) => blockRefKey(ref)));
    const ctx: SendContext = {
      transport: this.opts.transport,
      store: this.opts.self.store,
      blockSize: this.opts.blockSize,
      batch: this.opts.batch ?? 64,
      putBlocks: Math.max(1, Math.floor(Math.min(MAX_PUT_BYTES, this.inFlight.limit / (2 * this.depth)) / this.opts.blockSize)),
      depth: this.depth,
      inFlight: this.inFlight,
      throttle: (bytes) => this.throttle(bytes),
      stopped: () => this.stopped,
      progress: progress.add,
      log: this.opts.log,
    };
    const confirmed = new Set<string>();
    let moved = 0;
    let bytes = 0;
    const outcomes = await Promise.all(
      [...plan.perPeer].map(async ([peer, list]) => {
        const target = this.opts.target(peer);
        if (!target) {
          progress.add({ checked: list.length });
          return undefined;
        }
        const out = await sendAndConfirm(ctx, target, list, (ref) => notOwned.has(blockRefKey(ref)));
        for (const ref of out.confirmed) {
          if (y.due()) await y.pause();
          confirmed.add(`${peer} ${blockRefKey(ref)}`);
        }
        moved += out.moved;
        bytes += out.bytes;
        return out;
      }),
    );
    // The peers wait side by side: the longest wait on a failing one is what the walk lost.
    this.failedWaitMs += Math.max(0, ...outcomes.map((o) => o?.failedWaitMs ?? 0));
    return { confirmed, moved, bytes };
  }

  /** Drops the copies held here of blocks this node does not own, once every owner holds them durably. */
  private async drain(notOwned: Plan['notOwned'], confirmed: ReadonlySet<string>, y: Yielder): Promise<number> {
    let deleted = 0;
    for (const { ref, owners } of notOwned) {
      if (this.stopped) break;
      if (y.due()) await y.pause();
      const key = blockRefKey(ref);
      if (!owners.every((o) => confirmed.has(`${o} ${key}`))) continue;
      await this.opts.self.store.deleteBlock(ref);
      deleted++;
    }
    if (deleted > 0) await this.opts.self.store.flush();
    return deleted;
  }

  /** Blocks held here that fewer than R owners (this node included) were confirmed to hold. */
  private async countUnderReplicated(ring: Ring, refs: readonly BlockRef[], confirmed: ReadonlySet<string>, y: Yielder): Promise<number> {
    const self = this.opts.self.uuid;
    let under = 0;
    for (const ref of refs) {
      if (y.due()) await y.pause();
      const perm = ring.getPeers(ref);
      const key = blockRefKey(ref);
      const held = perm.peers.slice(0, perm.replication).filter((o) => o === self || confirmed.has(`${o} ${key}`)).length;
      if (held < perm.replication) under++;
    }
    return under;
  }
}

