import { toTorusError, TorusError } from '../core/errors.js';
import { blockRefKey, formatBlockRef, type BlockRef } from '../core/ids.js';
import type { BlockStore, JournalStore, Ring } from '../core/interfaces.js';
import type { RebalanceInfo } from '../core/models.js';
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
  readonly batch?: number;
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
}

/**
 * The share of its time an idle node may spend walking its blocks. A pass costs about 10 µs per
 * block held (the ring lookup, and asking the other owners); on a big store it outlasts any fixed
 * interval, and an idle node would walk without a pause. A ring change still starts a pass at once.
 */
const IDLE_WALK_SHARE = 0.05;

export class Rebalancer {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private stopped = false;
  private kicked = false;
  private wake: (() => void) | undefined;
  private lastRingVersion = -1;
  /** Time the current pass spent in peer calls that failed (timeouts to an unreachable owner). */
  private failedWaitMs = 0;
  private tokens = 0;
  private lastRefill = Date.now();
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
    totalMoved: 0,
  };

  constructor(private readonly opts: RebalanceOptions) {}

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

  /** One walk over the local blocks. Returns the number of blocks sent or deleted. */
  async pass(): Promise<number> {
    const ring = this.opts.ring();
    const self = this.opts.self.uuid;
    const store = this.opts.self.store;
    const batchSize = this.opts.batch ?? 64;
    const ringChanged = ring.version !== this.lastRingVersion;
    const started = Date.now();
    let moved = 0;
    let bytes = 0;
    let under = 0;

    // Work list: for each peer that should hold blocks we have, which ones to check.
    // An open log block belongs to the writer appending to it (docs/journal.md): not moved until sealed.
    const isOpen = (store as Partial<JournalStore>).isOpenLog?.bind(store);
    const refs = isOpen ? store.refs().filter((r) => !isOpen(r)) : store.refs();
    const perPeer = new Map<string, BlockRef[]>();
    const notOwned: { ref: BlockRef; owners: string[] }[] = [];
    for (const ref of refs) {
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
    const pairs = [...perPeer.values()].reduce((n, l) => n + l.length, 0);
    let checked = 0;
    let missingSeen = 0;
    this.st.rebalancing = ringChanged || notOwned.length > 0 || this.st.blocksMoved > 0;
    const estimate = (): void => {
      const missRate = checked > 0 ? missingSeen / checked : notOwned.length > 0 ? 1 : 0;
      const left = Math.round((pairs - checked) * missRate);
      this.st.blocksLeft = left;
      this.st.bytesLeft = left * this.opts.blockSize;
      const secs = Math.max(0.001, (Date.now() - started) / 1000);
      this.st.rate = bytes / secs;
      this.st.blocksMoved = moved;
      this.st.bytesMoved = bytes;
    };

    // Which (peer, ref) pairs are confirmed held durably; `unsynced`: peers with pairs confirmed
    // by HAS only, which are durable once that peer has flushed.
    const confirmed = new Set<string>();
    const unsynced = new Set<string>();
    // The peer process that answered HAS; a FLUSH answered by another does not cover it.
    const hasInstance = new Map<string, string | undefined>();
    const instanceOf = (t: PeerTarget): string | undefined => this.opts.transport.instance?.(t);
    for (const [peer, list] of perPeer) {
      const target = this.opts.target(peer);
      if (!target) {
        checked += list.length;
        continue;
      }
      for (let i = 0; i < list.length && !this.stopped; i += batchSize) {
        const batch = list.slice(i, i + batchSize);
        const callStarted = Date.now();
        try {
          const has = await this.opts.transport.has(target, batch);
          const answeredBy = instanceOf(target);
          if (hasInstance.has(peer) && hasInstance.get(peer) !== answeredBy) throw new TorusError('AGAIN', `peer restarted during the pass`);
          hasInstance.set(peer, answeredBy);
          const missing = batch.filter((_, j) => !has[j]);
          for (const [j, r] of batch.entries())
            if (has[j]) {
              confirmed.add(`${peer} ${blockRefKey(r)}`);
              unsynced.add(peer);
            }
          missingSeen += missing.length;
          if (missing.length > 0) {
            const items: { ref: BlockRef; data: Buffer }[] = [];
            for (const ref of missing) {
              try {
                items.push({ ref, data: await store.getBlock(ref) });
              } catch (err) {
                // Gone (GC) or corrupt here: another holder will do it, or the repair path.
                this.opts.log?.warn({ ref: formatBlockRef(ref), err: toTorusError(err).message }, 'rebalance: cannot read local block');
              }
            }
            for (const it of items) await this.throttle(it.data.length);
            const status = await this.opts.transport.put(target, items);
            const tookIt = instanceOf(target);
            // Durable on the new owner before anything relies on it (deleting our copy), and
            // flushed by the same process that took it.
            await this.opts.transport.flush(target);
            if (instanceOf(target) !== tookIt) throw new TorusError('AGAIN', `peer restarted between put and flush`);
            items.forEach((it, j) => {
              if (status[j] === null) {
                confirmed.add(`${peer} ${blockRefKey(it.ref)}`);
                moved++;
                bytes += it.data.length;
              }
            });
          }
        } catch (err) {
          this.failedWaitMs += Date.now() - callStarted;
          this.opts.log?.warn({ peer, err: toTorusError(err).message }, 'rebalance: peer unreachable; will retry');
          checked += list.length - i;
          break;
        }
        checked += batch.length;
        estimate();
      }
    }

    // Drain: our copies of blocks we do not own, once every owner holds them durably.
    const drainable = notOwned.filter(({ ref, owners }) => owners.every((o) => confirmed.has(`${o} ${blockRefKey(ref)}`)));
    const toSync = new Set(drainable.flatMap(({ owners }) => owners.filter((o) => unsynced.has(o))));
    const unsyncable = new Set<string>();
    for (const peer of toSync) {
      if (this.stopped) break;
      const target = this.opts.target(peer);
      if (!target) {
        unsyncable.add(peer);
        continue;
      }
      const callStarted = Date.now();
      try {
        await this.opts.transport.flush(target);
        if (instanceOf(target) !== hasInstance.get(peer)) throw new TorusError('AGAIN', `peer restarted between has and flush`);
      } catch (err) {
        this.failedWaitMs += Date.now() - callStarted;
        unsyncable.add(peer);
        this.opts.log?.warn({ peer, err: toTorusError(err).message }, 'rebalance: owner cannot flush; nothing deleted on its account');
      }
    }
    let deleted = 0;
    for (const { ref, owners } of drainable) {
      if (this.stopped) break;
      if (owners.every((o) => !unsyncable.has(o))) {
        await store.deleteBlock(ref);
        deleted++;
      }
    }
    if (deleted > 0) await store.flush();

    for (const ref of refs) {
      const perm = ring.getPeers(ref);
      const owners = perm.peers.slice(0, perm.replication);
      const key = blockRefKey(ref);
      const held = owners.filter((o) => o === self || (confirmed.has(`${o} ${key}`) && !unsyncable.has(o))).length;
      if (held < perm.replication) under++;
    }
    // A pass cut short by stop() did not check every block against this ring: it does not count.
    if (this.stopped) return moved + deleted;
    this.lastRingVersion = ring.version;
    this.st.passes++;
    // Recorded after every finished pass, one with nothing to move included: readers take a
    // ring version below the current ring's as "this node has not caught up yet".
    this.st.ringVersion = ring.version;
    this.st.underReplicated = under;
    this.st.totalMoved += moved;
    estimate();
    this.st.blocksLeft = 0;
    this.st.bytesLeft = 0;
    this.st.lastFinish = Date.now();
    const didWork = moved + deleted;
    // Still moving, or blocked on an owner that is unreachable: not balanced either way.
    this.st.rebalancing = didWork > 0 || notOwned.length > deleted;
    if (didWork > 0) this.opts.log?.info({ sent: moved, bytes, deleted, under, ringVersion: ring.version }, 'rebalance pass');
    try {
      this.opts.onPass?.(this.status());
    } catch (err) {
      this.opts.log?.warn({ err: toTorusError(err).message }, 'rebalance: status listener failed');
    }
    // A pass blocked only by unreachable peers is not "work": wait for the interval to retry.
    return didWork;
  }
}
