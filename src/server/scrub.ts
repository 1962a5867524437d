import { crc32c } from '@node-rs/crc32';
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { setTimeout as delay } from 'node:timers/promises';
import { isTorusError, toTorusError } from '../core/errors.js';
import { blockRefKey, formatBlockRef, type BlockRef } from '../core/ids.js';
import type { Ring } from '../core/interfaces.js';
import type { ScrubInfo } from '../core/models.js';
import type { PeerTarget, PeerTransport } from '../distributor/transport.js';
import type { BlockInspection, LocalBlockStore } from '../storage/common.js';

// The background scrub of a storage node: every block it holds is read from disk once per
// interval, every sector checked against its checksum and the checksums against the writer's
// CRC, and a bad copy replaced by one fetched from another replica whose CRC matches.
//
// - One block at a time, in data-file order, at a limited rate: the reads share libuv's thread
//   pool (4 threads) with foreground I/O, and sequential reads are what disks do best.
// - A bad copy stays until a checked replacement is stored: its intact sectors still serve reads,
//   and when no replica has a good copy (R=1, or every copy damaged) it is all there is. Only a
//   copy whose checksums are gone too, so that no replacement can be checked here and no read
//   can use it, is dropped: then HAS stops counting it and the other holders' rebalancers send
//   one.
// - Progress is kept in the data dir, so a node restarted more often than a pass lasts still
//   covers all its data. The file is an optimisation, not a promise: losing it only means
//   checking again, so it is replaced by rename without an fsync.

/** The rate limit derived from the interval stays within these bounds (bytes per second). */
export const SCRUB_RATE_FLOOR = 1024 * 1024;
export const SCRUB_RATE_CEILING = 64 * 1024 * 1024;
/** Slots listed at once: listing reads their records, about 2 µs a slot on the event loop. */
const WINDOW_SLOTS = 1024;
/** Progress is saved at most this often (and when a pass ends or stops): a crash re-checks less than this much. */
const SAVE_EVERY_MS = 10_000;
/** Bad copies kept for a retry at most; more are logged and found again by the next pass. */
const MAX_PENDING = 1024;

/**
 * The rate that reads `heldBytes` in half the interval: a pass paused by a restart, or slowed by
 * load, still ends before the next is due. The floor keeps small nodes' passes short; the ceiling
 * protects foreground I/O, and past 18 TiB a node then takes longer than a week (logged).
 */
export function autoScrubRate(heldBytes: number, intervalMs: number): number {
  const rate = Math.ceil(heldBytes / (intervalMs / 2000));
  return Math.min(SCRUB_RATE_CEILING, Math.max(SCRUB_RATE_FLOOR, rate));
}

export interface Clock {
  now(): number;
  /** Resolves after `ms`, or at once when `signal` aborts. */
  sleep(ms: number, signal: AbortSignal): Promise<void>;
}

export const systemClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, signal) => delay(ms, undefined, { signal }).catch(() => undefined),
};

/** Paces reads at `rate()` bytes per second: a read starts once the reads before it have had their time. */
export class RateLimiter {
  private next = 0;

  constructor(
    private readonly rate: () => number,
    private readonly clock: Clock,
  ) {}

  async take(bytes: number, signal: AbortSignal): Promise<void> {
    const now = this.clock.now();
    // No credit for idle time: a scrub resuming after a rest does not burst.
    const start = Math.max(this.next, now);
    this.next = start + (bytes / this.rate()) * 1000;
    if (start > now) await this.clock.sleep(start - now, signal);
  }
}

/** A small JSON document kept across restarts. */
export interface StateFile {
  load(): unknown;
  save(value: unknown): void;
}

/** `path`, replaced by rename; a missing or unreadable file loads as undefined. */
export function jsonStateFile(path: string): StateFile {
  return {
    load() {
      try {
        return JSON.parse(readFileSync(path, 'utf8')) as unknown;
      } catch {
        return undefined;
      }
    },
    save(value) {
      writeFileSync(`${path}.tmp`, `${JSON.stringify(value)}\n`, { mode: 0o600 });
      renameSync(`${path}.tmp`, path);
    },
  };
}

export interface PassCounts {
  /** Blocks and bytes checked. */
  blocks: number;
  bytes: number;
  /** Bad copies found, replaced by a checked copy from another replica, dropped. */
  errors: number;
  repaired: number;
  dropped: number;
}

export interface PassState extends PassCounts {
  startedAt: number;
  finishedAt: number;
  /** Slots below this one have been checked. */
  cursor: number;
}

interface PendingCopy {
  ref: BlockRef;
  crc: number;
}

interface ScrubState {
  current: PassState | null;
  last: PassState | null;
  totals: PassCounts & { passes: number };
  pending: PendingCopy[];
}

function zeroCounts(): PassCounts {
  return { blocks: 0, bytes: 0, errors: 0, repaired: 0, dropped: 0 };
}

function freshState(): ScrubState {
  return { current: null, last: null, totals: { ...zeroCounts(), passes: 0 }, pending: [] };
}

/** The saved state if it has the expected shape; anything else starts afresh (safe: it only costs a re-check). */
function parseState(v: unknown): ScrubState | undefined {
  if (typeof v !== 'object' || v === null) return undefined;
  const o = v as Partial<ScrubState>;
  const isNum = (x: unknown): x is number => typeof x === 'number' && Number.isFinite(x);
  const isPass = (p: unknown): p is PassState =>
    typeof p === 'object' && p !== null && ['startedAt', 'finishedAt', 'cursor', 'blocks', 'bytes', 'errors', 'repaired', 'dropped'].every((k) => isNum((p as Record<string, unknown>)[k]));
  if (!(o.current === null || isPass(o.current)) || !(o.last === null || isPass(o.last))) return undefined;
  const t = o.totals as Record<string, unknown> | undefined;
  if (!t || !['passes', 'blocks', 'bytes', 'errors', 'repaired', 'dropped'].every((k) => isNum(t[k]))) return undefined;
  if (!Array.isArray(o.pending)) return undefined;
  const pending = o.pending.filter((p: PendingCopy) => typeof p === 'object' && p !== null && isNum(p.crc) && typeof p.ref === 'object' && p.ref !== null);
  return { current: o.current, last: o.last, totals: o.totals!, pending };
}

export type ScrubStore = Pick<LocalBlockStore, 'blockSize' | 'numBlocks' | 'usedBlocks' | 'refsInSlots' | 'hasBlock' | 'inspectBlock' | 'deleteBlock' | 'putBlock' | 'flush'>;

export interface ScrubberOptions {
  readonly store: ScrubStore;
  /** A copy of `ref` from another replica whose CRC32C is `crc`; undefined when none has one. */
  readonly fetchCopy: (ref: BlockRef, crc: number) => Promise<Buffer | undefined>;
  /** Every held block is checked once per interval; 0 turns scrubbing off. */
  readonly intervalMs: number;
  /** Bytes per second; by default derived from the interval and the bytes held (autoScrubRate). */
  readonly rateBytesPerSec?: number;
  readonly state?: StateFile;
  readonly clock?: Clock;
  /** Slots listed at once (tests). */
  readonly windowSlots?: number;
  /** How often bad copies still waiting for a good one are tried again. */
  readonly retryMs?: number;
  /** A pass started or ended, or a bad copy was found or repaired: worth publishing at once. */
  readonly onChange?: () => void;
  readonly log?: { info(o: object, m: string): void; warn(o: object, m: string): void };
}

/** What the scrubber reports: ScrubInfo without the orphans. */
export type ScrubStatus = Omit<ScrubInfo, 'orphanBlocks' | 'orphanGroups' | 'orphansDeleted' | 'orphanGraceMs'>;

export class Scrubber {
  private readonly clock: Clock;
  private readonly limiter: RateLimiter;
  private readonly abort = new AbortController();
  private readonly st: ScrubState;
  private readonly pending = new Map<string, PendingCopy>();
  private running: Promise<void> | undefined;
  private lastRetry = 0;
  private lastSave = 0;
  private warnedSlow = false;

  constructor(private readonly opts: ScrubberOptions) {
    this.clock = opts.clock ?? systemClock;
    this.limiter = new RateLimiter(() => this.rate(), this.clock);
    const saved = opts.state?.load();
    const parsed = saved === undefined ? undefined : parseState(saved);
    if (saved !== undefined && !parsed) opts.log?.warn({}, 'scrub: saved progress unreadable; starting afresh');
    this.st = parsed ?? freshState();
    for (const p of this.st.pending) this.pending.set(blockRefKey(p.ref), p);
  }

  get enabled(): boolean {
    return this.opts.intervalMs > 0;
  }

  rate(): number {
    return this.opts.rateBytesPerSec ?? autoScrubRate(this.heldBytes(), this.opts.intervalMs);
  }

  private heldBytes(): number {
    return this.opts.store.usedBlocks() * this.opts.store.blockSize;
  }

  start(): void {
    if (!this.enabled || this.running) return;
    this.running = this.loop();
  }

  async stop(): Promise<void> {
    this.abort.abort();
    await this.running;
  }

  private get stopped(): boolean {
    return this.abort.signal.aborted;
  }

  private async loop(): Promise<void> {
    const retryMs = this.opts.retryMs ?? 60_000;
    while (!this.stopped) {
      try {
        const due = this.nextPassAt();
        const now = this.clock.now();
        if (due > now) {
          await this.retryPending();
          await this.clock.sleep(Math.min(due - now, retryMs), this.abort.signal);
        } else {
          await this.pass();
        }
      } catch (err) {
        if (this.stopped || isTorusError(err, 'CLOSED')) break;
        this.opts.log?.warn({ err: toTorusError(err).message }, 'scrub: pass interrupted; resuming shortly');
        await this.clock.sleep(retryMs, this.abort.signal);
      }
    }
  }

  /** A pass under way resumes at once; otherwise the next starts an interval after the last began. */
  private nextPassAt(): number {
    if (this.st.current || !this.st.last) return this.clock.now();
    return this.st.last.startedAt + this.opts.intervalMs;
  }

  /** Runs the pass under way (or a new one) to its end; returns early only when stopped. */
  async pass(): Promise<void> {
    const { store, log } = this.opts;
    let cur = this.st.current;
    if (!cur) {
      cur = { ...zeroCounts(), startedAt: this.clock.now(), finishedAt: 0, cursor: 0 };
      this.st.current = cur;
      this.save();
      log?.info({ heldBytes: this.heldBytes(), rate: this.rate() }, 'scrub pass started');
      this.changed();
    }
    for (;;) {
      const slots = store.numBlocks();
      if (cur.cursor >= slots) break;
      const to = Math.min(slots, cur.cursor + (this.opts.windowSlots ?? WINDOW_SLOTS));
      for (const ref of await store.refsInSlots(cur.cursor, to)) {
        await this.limiter.take(store.blockSize, this.abort.signal);
        if (this.stopped) return this.save();
        await this.check(ref, cur);
      }
      cur.cursor = to;
      if (this.clock.now() - this.lastSave >= SAVE_EVERY_MS) this.save();
      if (this.clock.now() - this.lastRetry >= (this.opts.retryMs ?? 60_000)) await this.retryPending();
      if (this.stopped) return this.save();
    }
    cur.finishedAt = this.clock.now();
    this.st.last = cur;
    this.st.current = null;
    this.st.totals.passes++;
    this.save();
    const took = cur.finishedAt - cur.startedAt;
    log?.info({ blocks: cur.blocks, bytes: cur.bytes, errors: cur.errors, repaired: cur.repaired, dropped: cur.dropped, seconds: Math.round(took / 1000) }, 'scrub pass finished');
    if (took > this.opts.intervalMs && !this.warnedSlow) {
      this.warnedSlow = true;
      log?.warn({ seconds: Math.round(took / 1000), intervalSeconds: Math.round(this.opts.intervalMs / 1000), rate: this.rate() }, 'scrub pass took longer than --scrub-interval: raise --scrub-rate');
    }
    this.changed();
  }

  private async check(ref: BlockRef, cur: PassState): Promise<void> {
    const key = blockRefKey(ref);
    let r: BlockInspection;
    try {
      r = await this.opts.store.inspectBlock(ref);
    } catch (err) {
      if (isTorusError(err, 'CLOSED')) throw err;
      // An unreadable copy (EIO): counted, left alone; a failing disk is not written to here.
      this.count(cur, 'errors');
      this.opts.log?.warn({ ref: formatBlockRef(ref), err: toTorusError(err).message }, 'scrub: cannot read block');
      return;
    }
    if (r.status === 'missing') return;
    cur.blocks++;
    cur.bytes += this.opts.store.blockSize;
    this.st.totals.blocks++;
    this.st.totals.bytes += this.opts.store.blockSize;
    if (r.status === 'ok') {
      // Replaced meanwhile (a read found it bad and the distributor repaired it).
      this.pending.delete(key);
      return;
    }
    // A copy still waiting for a replacement is the same error, found again.
    if (!this.pending.has(key)) {
      this.count(cur, 'errors');
      this.opts.log?.warn({ ref: formatBlockRef(ref), reason: r.reason }, 'scrub: bad copy found');
      this.changed();
    }
    await this.repair(ref, r, cur);
  }

  private async repair(ref: BlockRef, r: BlockInspection, cur: PassState | null): Promise<void> {
    const { store, log } = this.opts;
    const key = blockRefKey(ref);
    const where = { ref: formatBlockRef(ref), reason: r.reason };
    if (r.crc === undefined) {
      await store.deleteBlock(ref);
      await store.flush();
      this.pending.delete(key);
      this.count(cur, 'dropped');
      log?.warn(where, 'scrub: dropped a copy whose checksums are damaged too: no replacement can be checked here and no read can use it; the other holders send a copy');
      this.changed();
      return;
    }
    const good = await this.opts.fetchCopy(ref, r.crc).catch(() => undefined);
    if (!good) {
      if (!this.pending.has(key)) {
        if (this.pending.size < MAX_PENDING) this.pending.set(key, { ref, crc: r.crc });
        log?.warn(where, 'scrub: no replica has a good copy now; keeping this one (its intact sectors still serve reads) and retrying');
      }
      return;
    }
    // Gone meanwhile (GC, or the rebalancer moved it): nothing left to repair.
    if (!store.hasBlock(ref)) {
      this.pending.delete(key);
      return;
    }
    // The bad copy must go first: a put of a ref the store holds is a no-op.
    await store.deleteBlock(ref);
    await store.putBlock(ref, good, { crc: r.crc });
    await store.flush();
    this.pending.delete(key);
    this.count(cur, 'repaired');
    log?.info(where, 'scrub: bad copy replaced by a checked copy from another replica');
    this.changed();
  }

  /** Bad copies kept for want of a good one: tried again, rate-limited like the pass. */
  private async retryPending(): Promise<void> {
    this.lastRetry = this.clock.now();
    if (this.pending.size === 0) return;
    for (const p of [...this.pending.values()]) {
      await this.limiter.take(this.opts.store.blockSize, this.abort.signal);
      if (this.stopped) return;
      const r = await this.opts.store.inspectBlock(p.ref).catch(() => undefined);
      if (r?.status === 'corrupt') await this.repair(p.ref, r, this.st.current);
      else if (r) this.pending.delete(blockRefKey(p.ref));
    }
    this.save();
  }

  private count(cur: PassState | null, what: 'errors' | 'repaired' | 'dropped'): void {
    if (cur) cur[what]++;
    this.st.totals[what]++;
  }

  private changed(): void {
    try {
      this.opts.onChange?.();
    } catch (err) {
      this.opts.log?.warn({ err: toTorusError(err).message }, 'scrub: status listener failed');
    }
  }

  private save(): void {
    this.lastSave = this.clock.now();
    if (!this.opts.state) return;
    this.st.pending = [...this.pending.values()];
    try {
      this.opts.state.save(this.st);
    } catch (err) {
      this.opts.log?.warn({ err: toTorusError(err).message }, 'scrub: cannot save progress');
    }
  }

  status(): ScrubStatus {
    const { current: cur, last, totals } = this.st;
    return {
      intervalMs: this.opts.intervalMs,
      rate: this.enabled ? this.rate() : 0,
      passStartedAt: cur?.startedAt ?? 0,
      passBytes: cur?.bytes ?? 0,
      heldBytes: this.heldBytes(),
      lastStartedAt: last?.startedAt ?? 0,
      lastFinishedAt: last?.finishedAt ?? 0,
      lastBytes: last?.bytes ?? 0,
      lastErrors: last?.errors ?? 0,
      lastRepaired: last?.repaired ?? 0,
      nextPassAt: this.enabled && !cur ? this.nextPassAt() : 0,
      passes: totals.passes,
      checkedBytes: totals.bytes,
      errors: totals.errors,
      repaired: totals.repaired,
      dropped: totals.dropped,
      pending: this.pending.size,
    };
  }
}

/**
 * fetchCopy for a storage node: the other replicas in ring order, each copy checked against the
 * CRC the bad copy's record kept (the writer's: every replica checked it at the put).
 */
export function replicaFetcher(o: {
  readonly self: string;
  readonly ring: () => Ring;
  readonly target: (uuid: string) => PeerTarget | undefined;
  readonly transport: PeerTransport;
  readonly timeoutMs?: number;
  readonly log?: { warn(o: object, m: string): void };
}): (ref: BlockRef, crc: number) => Promise<Buffer | undefined> {
  return async (ref, crc) => {
    for (const uuid of o.ring().getPeers(ref).peers) {
      if (uuid === o.self) continue;
      const target = o.target(uuid);
      if (!target) continue;
      let data: Buffer;
      try {
        data = await o.transport.get(target, ref, 0, 0, o.timeoutMs ?? 10_000);
      } catch {
        continue; // not there, or unreachable: the next one
      }
      if (crc32c(data) >>> 0 === crc >>> 0) return data;
      o.log?.warn({ ref: formatBlockRef(ref), peer: target.address }, "scrub: another replica's copy does not match the block's CRC either; not used");
    }
    return undefined;
  };
}
