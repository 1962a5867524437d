import { toTorusError } from '../core/errors.js';
import { formatBlockRef, type BlockRef } from '../core/ids.js';
import type { BlockStore } from '../core/interfaces.js';
import type { PeerTarget, PeerTransport } from './transport.js';

// The rebalancer's send-and-confirm stage for one receiving peer, pipelined: `depth` workers each
// take the next batch of refs, ask the peer which it has (HAS), read the missing ones here and
// PUT them, so several batches are in flight at once. One FLUSH at the end makes everything the
// peer took durable. A copy counts only when the FLUSH was answered by the same process instance
// that took it (or answered HAS for it): a peer that restarted in between may have lost it, so
// those refs go round again (HAS, PUT if missing, FLUSH), a bounded number of times.

/** Bytes of block data read here and not yet acknowledged by their receiver, across all peers. */
export class InFlightBytes {
  private held = 0;
  private readonly waiters: { bytes: number; wake: () => void }[] = [];
  /** The most held at once. */
  peak = 0;

  constructor(readonly limit: number) {}

  get used(): number {
    return this.held;
  }

  /** Waits for room, first come first served; a request above the limit goes alone. */
  async take(bytes: number): Promise<void> {
    if (this.waiters.length === 0 && this.fits(bytes)) return this.grant(bytes);
    await new Promise<void>((wake) => this.waiters.push({ bytes, wake }));
  }

  give(bytes: number): void {
    this.held -= bytes;
    for (let w = this.waiters[0]; w && this.fits(w.bytes); w = this.waiters[0]) {
      this.waiters.shift();
      this.grant(w.bytes);
      w.wake();
    }
  }

  private fits(bytes: number): boolean {
    return this.held === 0 || this.held + bytes <= this.limit;
  }

  private grant(bytes: number): void {
    this.held += bytes;
    if (this.held > this.peak) this.peak = this.held;
  }
}

export interface SendContext {
  readonly transport: PeerTransport;
  readonly store: BlockStore;
  readonly blockSize: number;
  /** Refs per HAS call. */
  readonly batch: number;
  /** Blocks per PUT call. */
  readonly putBlocks: number;
  /** Batches in flight per peer. */
  readonly depth: number;
  readonly inFlight: InFlightBytes;
  readonly throttle: (bytes: number) => Promise<void>;
  readonly stopped: () => boolean;
  /** Told after each HAS answer (`checked` refs, `missing` of them) and each PUT acknowledged. */
  readonly progress: (p: { checked?: number; missing?: number; sentBlocks?: number; sentBytes?: number }) => void;
  readonly log?: { warn(o: object, m: string): void } | undefined;
}

export interface PeerOutcome {
  /** Refs the peer holds durably (or, when nothing here depends on that, has said it holds). */
  readonly confirmed: BlockRef[];
  /** Blocks and bytes sent and then confirmed durable. */
  readonly moved: number;
  readonly bytes: number;
  /** Time spent waiting on calls that failed, in ms. */
  readonly failedWaitMs: number;
}

/** Rounds for refs a restarting peer may have lost before the pass leaves them to the next one. */
const MAX_ROUNDS = 3;

interface Taken {
  readonly ref: BlockRef;
  /** The peer's process instance that answered HAS for it or took its PUT. */
  readonly instance: string | undefined;
  /** Bytes sent for it; 0 when the peer already had it. */
  readonly sent: number;
}

interface Round {
  readonly taken: Taken[];
  readonly failed?: { readonly err: unknown; readonly waitedMs: number };
}

/**
 * Makes `peer` hold `refs`. `mustBeDurable` says which refs a deletion here will rely on: a HAS
 * yes for one of them needs the peer's FLUSH, as every PUT does.
 */
export async function sendAndConfirm(ctx: SendContext, peer: PeerTarget, refs: readonly BlockRef[], mustBeDurable: (ref: BlockRef) => boolean): Promise<PeerOutcome> {
  const confirmed: BlockRef[] = [];
  let moved = 0;
  let bytes = 0;
  let todo = refs;
  for (let round = 0; round < MAX_ROUNDS && todo.length > 0 && !ctx.stopped(); round++) {
    const r = await sendRound(ctx, peer, todo, round === 0);
    if (r.failed) {
      // Nothing this round took counts: the next pass asks again (and finds most of it there).
      ctx.log?.warn({ peer: peer.uuid, err: toTorusError(r.failed.err).message }, 'rebalance: peer unreachable; will retry');
      return { confirmed, moved, bytes, failedWaitMs: r.failed.waitedMs };
    }
    if (!r.taken.some((t) => t.sent > 0 || mustBeDurable(t.ref))) {
      confirmed.push(...r.taken.map((t) => t.ref));
      break;
    }
    const flushStarted = Date.now();
    let flushedBy: string | undefined;
    try {
      await ctx.transport.flush(peer);
      flushedBy = ctx.transport.instance?.(peer);
    } catch (err) {
      ctx.log?.warn({ peer: peer.uuid, err: toTorusError(err).message }, 'rebalance: peer cannot flush; nothing counted on its account');
      return { confirmed, moved, bytes, failedWaitMs: Date.now() - flushStarted };
    }
    const lost: BlockRef[] = [];
    for (const t of r.taken) {
      if (t.instance !== flushedBy) {
        lost.push(t.ref);
        continue;
      }
      confirmed.push(t.ref);
      if (t.sent > 0) {
        moved++;
        bytes += t.sent;
      }
    }
    if (lost.length > 0) ctx.log?.warn({ peer: peer.uuid, blocks: lost.length }, 'rebalance: peer restarted before its flush; checking those blocks again');
    todo = lost;
  }
  return { confirmed, moved, bytes, failedWaitMs: 0 };
}

/** HAS and PUT for every ref, `ctx.depth` batches at a time; stops at the first failed call. */
async function sendRound(ctx: SendContext, peer: PeerTarget, refs: readonly BlockRef[], reportChecked: boolean): Promise<Round> {
  const taken: Taken[] = [];
  let next = 0;
  let checked = 0;
  let failed: Round['failed'];
  const worker = async (): Promise<void> => {
    while (!failed && !ctx.stopped() && next < refs.length) {
      const batch = refs.slice(next, (next += ctx.batch));
      const callStarted = Date.now();
      try {
        const has = await ctx.transport.has(peer, batch);
        const answeredBy = ctx.transport.instance?.(peer);
        const missing: BlockRef[] = [];
        batch.forEach((ref, j) => (has[j] ? taken.push({ ref, instance: answeredBy, sent: 0 }) : missing.push(ref)));
        checked += batch.length;
        if (reportChecked) ctx.progress({ checked: batch.length, missing: missing.length });
        for (let i = 0; i < missing.length && !failed && !ctx.stopped(); i += ctx.putBlocks) await sendBlocks(ctx, peer, missing.slice(i, i + ctx.putBlocks), taken);
      } catch (err) {
        failed ??= { err, waitedMs: Date.now() - callStarted };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, ctx.depth) }, worker));
  // Refs never asked about still count as checked: the estimate of what is left covers the rest.
  if (reportChecked && checked < refs.length) ctx.progress({ checked: refs.length - checked });
  return failed ? { taken, failed } : { taken };
}

/** Reads `refs` here and PUTs them, holding their bytes in the in-flight budget meanwhile. */
async function sendBlocks(ctx: SendContext, peer: PeerTarget, refs: readonly BlockRef[], taken: Taken[]): Promise<void> {
  const reserved = refs.length * ctx.blockSize;
  await ctx.throttle(reserved);
  await ctx.inFlight.take(reserved);
  try {
    const read = await Promise.all(
      refs.map(async (ref) => {
        try {
          return { ref, data: await ctx.store.getBlock(ref) };
        } catch (err) {
          // Gone (GC) or corrupt here: another holder will do it, or the repair path.
          ctx.log?.warn({ ref: formatBlockRef(ref), err: toTorusError(err).message }, 'rebalance: cannot read local block');
          return undefined;
        }
      }),
    );
    const items = read.filter((it) => it !== undefined);
    if (items.length === 0) return;
    const status = await ctx.transport.put(peer, items);
    const tookIt = ctx.transport.instance?.(peer);
    let sentBlocks = 0;
    let sentBytes = 0;
    items.forEach((it, j) => {
      if (status[j] !== null) return;
      taken.push({ ref: it.ref, instance: tookIt, sent: it.data.length });
      sentBlocks++;
      sentBytes += it.data.length;
    });
    ctx.progress({ sentBlocks, sentBytes });
  } finally {
    ctx.inFlight.give(reserved);
  }
}
