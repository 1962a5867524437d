import { TorusError, toTorusError } from '../core/errors.js';
import { formatBlockRef, LOG_BLOCKS_PER_SEGMENT, type BlockRef } from '../core/ids.js';
import type { LogPiece } from '../core/interfaces.js';
import { directRef, DIRECT_INDEX_BASE, LogBlockBuilder, logIndex, logRef, parseLogBlock, RecordType, type JournalRecord, type LogAddress } from './journal-format.js';
import type { Source } from './overlay.js';
import type { JournalPos } from './records.js';
import { logKeyOf } from './runs.js';

// The writer's side of a volume journal (docs/journal.md): which segment and replicas it writes
// to, the log block filling now, appends that count only when every replica has them on disk,
// seals in the background, the cut a checkpoint makes, the move to another segment when a
// replica fails, and (for the next writer) reading a dead writer's tail back.

/** What the journal needs from the distributor. */
export interface JournalPeers {
  journalOwners(ref: BlockRef): { peers: readonly string[]; replication: number };
  journalCapable(peer: string): Promise<boolean>;
  journalAppend(peer: string, ref: BlockRef, pieces: readonly LogPiece[], sync: boolean): Promise<void>;
  journalSeal(peer: string, ref: BlockRef, gapStart: number, gapEnd: number, crc: number, sync: boolean): Promise<void>;
  journalFence(peer: string, volume: number, epoch: number): Promise<BlockRef[]>;
  journalReadRaw(peer: string, ref: BlockRef): Promise<Buffer>;
  /** The storage node the writer runs in, if it runs in one (torusd serving NBD). */
  localPeer?(): string | undefined;
}

/** A record of the tail: since the journal's start, kept so the journal can move with it. */
export interface TailEntry {
  readonly rec: JournalRecord;
  readonly src: Source;
  /** Every replica has it on disk: a checkpoint may take it. */
  acked?: boolean;
}

/** Segments tried before a switch gives up. */
const MAX_SEGMENT_TRIES = 64;
/** How long a peer that failed an append is kept out of new segments while others will do. */
const FAILED_PEER_AVOID_MS = 60_000;

/**
 * Filled log blocks are sealed together once this many (or this many bytes) wait: each seal
 * costs a replica two fsync rounds, which seals sent at once share. At 64 KiB blocks a 4 KiB
 * flush filled one every 15 flushes, and its seal's rounds queued with the appends' on the disk.
 */
const SEAL_BATCH_BLOCKS = 8;
const SEAL_BATCH_BYTES = 1024 * 1024;
/**
 * Once the block filling is this full, the next one is opened on the replicas ahead of its first
 * append. A replica makes a block's first append durable with its open record, which costs a
 * table write and a second fsync after the data's; ahead of time that is off any flush's path,
 * and the first append is synced in one job like the others. Measured in P5 at 128 KiB: 3.3% of
 * flushes opened a block and took 1.9 ms on average against 0.55. PREOPEN_BLOCKS are opened at
 * a time, so that their open records share a replica's fsync rounds: one at a time, they were
 * about one extra fsync round per block on a disk the appends wait for.
 */
const PREOPEN_AT = 0.5;
const PREOPEN_BLOCKS = 4;

export interface JournalWriterOptions {
  readonly peers: JournalPeers;
  readonly volume: number;
  /** The writing session's epoch: every log block it writes carries it. */
  readonly epoch: number;
  readonly blockSize: number;
  /** The next LSN. */
  readonly lsn: number;
  /** Log blocks a segment may hold (LOG_BLOCKS_PER_SEGMENT; smaller only in tests). */
  readonly blocksPerSegment?: number;
}

export class JournalWriter {
  private readonly peers: JournalPeers;
  readonly volume: number;
  readonly epoch: number;
  private readonly blockSize: number;
  private readonly blocksPerSegment: number;
  private segment = -1;
  private replicaSet: string[] = [];
  /**
   * The replicas in the order appends are sent: another node's first. Its append crosses the
   * network and another process before it reaches a disk, and a flush waits for the slowest
   * replica: sent first, that hop overlaps the local append's own work.
   */
  private sendOrder: string[] = [];
  /** n of the next log block to open in the segment. */
  private next = 0;
  /** n of the first block of the tail (the head's journal start). */
  private startN = 0;
  /** Blocks of segment `aheadSegment` before n `aheadTo` were opened ahead of their first append. */
  private aheadSegment = -1;
  private aheadTo = 0;
  private cur: LogBlockBuilder | undefined;
  /** Filled blocks to seal once the appends that filled them are on every replica. */
  private toSeal: LogBlockBuilder[] = [];
  /**
   * Filled blocks on every replica, waiting to be sealed together: a seal costs each replica
   * fsync rounds of its own, and seals sent at once share them. Sealed once SEAL_BATCH_BLOCKS
   * (or SEAL_BATCH_BYTES) wait, and by every cut.
   */
  private sealBatch: LogBlockBuilder[] = [];
  /** The append being sent (appends come one at a time: the volume serializes flushes). */
  private inflight: Promise<void> | undefined;
  /** Filled blocks whose seal has not completed, by index. */
  private readonly sealing = new Map<number, Promise<void>>();
  /** Filled blocks whose seal failed on every replica: sealed again by the next cut. */
  private readonly unsealed = new Map<number, LogBlockBuilder>();
  /** CRC of each sealed log block (logKeyOf): reads and runs need it. */
  readonly sealedCrc = new Map<string, number>();
  private lsnNext: number;
  /** Every record since the journal's start. */
  readonly tail: TailEntry[] = [];
  /**
   * Peers that failed an append, and when. A segment with one that failed recently is avoided
   * (it may answer probes and still fail appends), but not for good: a node that comes back is
   * needed again when the ring has no segment of R live owners without it.
   */
  private readonly failed = new Map<string, number>();
  /** Seals that failed on some replica (the rebalancer or a retry covers them). */
  sealFailures = 0;
  /**
   * An append failed on a replica: the blocks it filled were never sealed, and nothing goes on
   * in this segment until the journal moves (moveTo clears it).
   */
  private broken = false;

  constructor(o: JournalWriterOptions) {
    this.peers = o.peers;
    this.volume = o.volume;
    this.epoch = o.epoch;
    this.blockSize = o.blockSize;
    this.blocksPerSegment = o.blocksPerSegment ?? LOG_BLOCKS_PER_SEGMENT;
    this.lsnNext = o.lsn;
  }

  /**
   * Whether `records` more fit in this segment, each in a block of its own at worst. A session
   * that fills its segment (2^24 log blocks: 2 TiB of journal at 128 KiB blocks) moves on to
   * another, as after a failed replica, before appending.
   */
  roomFor(records: number): boolean {
    return this.next + records + 1 <= this.blocksPerSegment;
  }

  get lsn(): number {
    return this.lsnNext;
  }

  get position(): JournalPos {
    // directStart 0 is left out, as the head's codec does: one shape for the same position.
    return { epoch: this.epoch, segment: this.segment, start: this.startN, replicas: [...this.replicaSet], ...(this.directStart ? { directStart: this.directStart } : {}) };
  }

  /** k of the next data block a Block record will name (directRef). */
  private nextDirect = 0;
  /** The smallest k a Block record of the tail may name: GC keeps this session's from there on. */
  private directStart = 0;
  /** k's handed out whose records are not in the tail yet (their blocks are being stored). */
  private readonly directPending = new Set<number>();

  /** A ref for a whole block a Block record will name; `placed` or `releaseDirect` must follow. */
  allocDirect(): BlockRef {
    const k = this.nextDirect++;
    this.directPending.add(k);
    return directRef(this.volume, this.epoch, k);
  }

  /** A block from allocDirect that no record will name after all (storing it failed): garbage. */
  releaseDirect(ref: BlockRef): void {
    this.directPending.delete(ref.index - DIRECT_INDEX_BASE);
  }

  private address(n: number): LogAddress {
    return { volume: this.volume, epoch: this.epoch, index: logIndex(this.segment, n) };
  }

  /** Largest record data a writer should stage: a record always fits an empty log block. */
  static maxRecord(blockSize: number): number {
    return Math.max(512, Math.floor(blockSize / 4 / 512) * 512);
  }

  /**
   * Picks the first segment (from `from`) whose R ring owners are all usable and none failed
   * this session. NO_PEER when none can be found.
   */
  private async pickSegment(from: number): Promise<{ segment: number; replicas: string[] }> {
    const recent = Date.now() - FAILED_PEER_AVOID_MS;
    const down = new Set<string>();
    // A writer inside a storage node prefers a segment that node owns: one replica's appends then
    // go to its own disk, without a network hop or another process on the path of every flush.
    // Any segment is still placed by the ring; a node that owns none of the first ones, or cannot
    // take a journal, gets the first segment that works.
    const local = this.peers.localPeer?.();
    // First without any peer that failed recently; then with them, if they answer now.
    for (const avoidRecent of [true, false]) {
      let other: { segment: number; replicas: string[] } | undefined;
      for (let s = from; s < from + MAX_SEGMENT_TRIES; s++) {
        const owners = this.peers.journalOwners(logRef({ volume: this.volume, epoch: this.epoch, index: logIndex(s, 0) }));
        const want = owners.replication;
        const replicas = owners.peers.slice(0, want);
        if (replicas.length === 0 || replicas.length < want) continue;
        if (replicas.some((p) => down.has(p) || (avoidRecent && (this.failed.get(p) ?? 0) > recent))) continue;
        const mine = local === undefined || replicas.includes(local);
        if (!mine && other) continue;
        const ok = await Promise.all(replicas.map((p) => this.peers.journalCapable(p)));
        if (ok.every(Boolean)) {
          if (mine) return { segment: s, replicas };
          other = { segment: s, replicas };
          continue;
        }
        replicas.forEach((p, i) => ok[i] || down.add(p));
      }
      if (other) return other;
    }
    throw new TorusError('NO_PEER', `no journal segment of volume ${this.volume} has all its replicas reachable (unreachable: ${[...down].join(', ') || 'none'})`);
  }

  private setReplicas(replicas: string[]): void {
    this.replicaSet = replicas;
    const local = this.peers.localPeer?.();
    this.sendOrder = [...replicas.filter((p) => p !== local), ...replicas.filter((p) => p === local)];
  }

  /** Whether the ring now gives the segment other owners than the replicas it is written to. */
  misplaced(): boolean {
    if (this.segment < 0) return false;
    const owners = this.peers.journalOwners(logRef({ volume: this.volume, epoch: this.epoch, index: logIndex(this.segment, 0) }));
    const want = owners.peers.slice(0, owners.replication);
    return want.length !== this.replicaSet.length || want.some((p) => !this.replicaSet.includes(p));
  }

  /** Starts the journal in a fresh segment (a new session, before anything is appended). */
  async startFresh(): Promise<void> {
    const { segment, replicas } = await this.pickSegment(0);
    this.segment = segment;
    this.setReplicas(replicas);
    this.next = 0;
    this.startN = 0;
    this.cur = undefined;
  }

  /**
   * Appends records (LSNs assigned here, in order) and resolves when every replica has every
   * one of them on stable storage. Each record's source learns where its bytes are. A replica
   * that fails makes this throw with `switchNeeded`; nothing is acknowledged then.
   */
  async append(entries: readonly TailEntry[]): Promise<void> {
    // Checked before anything changes: a record that failed half way through the loop below
    // would leave a gap in the LSNs, and a replay stops at a gap (every later record lost).
    for (const e of entries) if (e.rec.type === RecordType.Block && !e.rec.block) throw new TorusError('INTERNAL', `a Block record of volume ${this.volume} names no stored block`);
    if (!this.roomFor(entries.length)) throw new TorusError('INTERNAL', `journal segment ${this.segment} of volume ${this.volume} is full`);
    const touched = new Set<LogBlockBuilder>();
    for (const e of entries) {
      (e.rec as { lsn: number }).lsn = this.lsnNext++;
      e.src.lsn = e.rec.lsn;
      this.place(e, touched);
      this.tail.push(e);
      const b = e.rec.block;
      if (b && b.ref.inode === this.epoch && b.ref.volume === this.volume) this.directPending.delete(b.ref.index - DIRECT_INDEX_BASE);
    }
    const send = this.send(touched);
    this.inflight = send;
    try {
      await send;
    } finally {
      if (this.inflight === send) this.inflight = undefined;
    }
    for (const e of entries) e.acked = true;
  }

  private place(e: TailEntry, touched: Set<LogBlockBuilder>): void {
    if (!this.cur || !this.cur.fits(e.rec)) {
      if (this.cur) this.toSeal.push(this.cur);
      this.cur = new LogBlockBuilder(this.address(this.next++), this.blockSize);
    }
    const at = this.cur.add(e.rec);
    touched.add(this.cur);
    if (e.rec.type === RecordType.Data) e.src.log = { volume: this.volume, epoch: this.epoch, index: this.cur.address.index, at, crc: undefined };
  }

  private async send(touched: Iterable<LogBlockBuilder>): Promise<void> {
    const sends: Promise<void>[] = [];
    const errors: string[] = [];
    let fenced: TorusError | undefined;
    for (const b of touched) {
      const pieces = b.take();
      if (pieces.length === 0) continue;
      for (const peer of this.sendOrder)
        sends.push(
          this.peers.journalAppend(peer, b.ref, pieces, true).catch((err: unknown) => {
            const e = toTorusError(err);
            // A newer writer fenced the journal: this one is done, whatever else happens.
            if (e.code === 'LOCKED') fenced ??= e;
            else this.failed.set(peer, Date.now());
            errors.push(`${peer}: ${e.message}`);
          }),
        );
    }
    await Promise.all(sends);
    if (fenced) throw new TorusError('LOCKED', `volume ${this.volume} was taken over by another writer: ${fenced.message}`);
    if (errors.length > 0) {
      this.broken = true;
      throw new JournalReplicaError(errors);
    }
    // Filled blocks are on every replica now: seal them, a batch at a time.
    this.sealBatch.push(...this.toSeal.splice(0));
    const n = this.sealBatch.length;
    if (n >= SEAL_BATCH_BLOCKS || n * this.blockSize >= SEAL_BATCH_BYTES) this.sealBatched();
    this.preopen();
  }

  /**
   * Opens the next PREOPEN_BLOCKS log blocks on every replica (appends of nothing, synced) once
   * the current one is PREOPEN_AT full and the next is not open yet. Nothing waits for them and a
   * failure is ignored: the first append opens a block if this did not, and reports any failure
   * itself. A block opened ahead and never appended to is empty: a replay stops at the first one,
   * and GC takes them with the session's other blocks.
   */
  private preopen(): void {
    const cur = this.cur;
    if (!cur || this.broken || cur.used < PREOPEN_AT * this.blockSize) return;
    if (this.aheadSegment === this.segment && this.aheadTo > this.next) return;
    // Never the segment's last block: roomFor keeps that one for a record that fits nowhere else.
    const to = Math.min(this.next + PREOPEN_BLOCKS, this.blocksPerSegment - 1);
    if (to <= this.next) return;
    this.aheadSegment = this.segment;
    this.aheadTo = to;
    for (let n = this.next; n < to; n++) {
      const ref = logRef(this.address(n));
      for (const peer of this.replicaSet) this.peers.journalAppend(peer, ref, [], true).catch(() => undefined);
    }
  }

  private sealBatched(): void {
    for (const b of this.sealBatch.splice(0)) this.close(b);
  }

  /** A filled block: sealed in the background once its appends are on every replica. */
  private close(b: LogBlockBuilder): void {
    const n = b.address.index;
    const { gapStart, gapEnd, crc } = b.sealInfo();
    const key = logKeyOf({ volume: this.volume, epoch: this.epoch, index: n });
    const replicas = [...this.replicaSet];
    const p = (async () => {
      // Every replica's attempt settles before the seal counts; one sealed copy makes the block
      // readable, and a replica that missed it gets a sealed copy from the rebalancer later.
      const rs = await Promise.allSettled(replicas.map((peer) => this.peers.journalSeal(peer, b.ref, gapStart, gapEnd, crc, true)));
      const ok = rs.filter((r) => r.status === 'fulfilled').length;
      if (ok < rs.length) this.sealFailures++;
      if (ok === 0) {
        // Its records are appended and acknowledged; only the seal is missing, and a checkpoint
        // needs it (its CRC goes into the run): the next cut tries again.
        this.unsealed.set(n, b);
        throw new TorusError('NO_PEER', `log block ${formatBlockRef(b.ref)} could not be sealed on any replica`);
      }
      this.sealedCrc.set(key, crc);
    })();
    p.catch(() => undefined);
    this.sealing.set(n, p);
    p.finally(() => {
      if (this.sealing.get(n) === p) this.sealing.delete(n);
    }).catch(() => undefined);
  }

  /**
   * The cut a checkpoint makes: the block filling now is closed (later appends open the next),
   * every closed block is sealed, and the tail up to here is returned with where the journal
   * will start once the checkpoint commits. Appends may run meanwhile; they are not in the cut.
   */
  async cut(): Promise<{ entries: TailEntry[]; start: number; lsn: number; directStart: number }> {
    // No record goes into the current block from here on; then let the append that may be
    // carrying its last bytes land before it is sealed.
    const last = this.cur && !this.cur.empty ? this.cur : undefined;
    if (last) this.cur = undefined;
    // Records appended from here on are in blocks after the cut, not in it.
    const upto = this.tail.length;
    const start = this.cur ? this.cur.address.index % LOG_BLOCKS_PER_SEGMENT : this.next;
    await this.inflight?.catch(() => undefined);
    if (this.broken) {
      // The blocks that append filled are not on every replica, so they cannot be sealed; the
      // move sends the whole tail elsewhere, and the checkpoint after it cuts there.
      if (last && !this.cur) this.cur = last;
      throw new TorusError('NO_PEER', `volume ${this.volume}: the journal lost a replica; checkpointing waits for it to move`);
    }
    this.sealBatched();
    if (last) this.close(last);
    // A seal that failed in the background (every replica timed out, say) left its block
    // unsealed: seal it now, or fail this checkpoint with the reason (it is tried again).
    for (const [n, b] of [...this.unsealed]) {
      this.unsealed.delete(n);
      if (!this.sealing.has(n)) this.close(b);
    }
    await Promise.all(this.sealing.values());
    // Only records every replica acknowledged: an append that failed is sent again when the
    // journal moves, and until then nothing after it counts.
    let n = 0;
    while (n < upto && this.tail[n]!.acked) n++;
    const entries = this.tail.slice(0, n);
    const lsn = n < this.tail.length ? this.tail[n]!.rec.lsn : this.lsnNext;
    // The data blocks that records after the cut name, or will: from the smallest such k on.
    let directStart = this.nextDirect;
    for (const k of this.directPending) directStart = Math.min(directStart, k);
    for (const e of this.tail.slice(n)) {
      const b = e.rec.block;
      if (b && b.ref.inode === this.epoch && b.ref.volume === this.volume) directStart = Math.min(directStart, b.ref.index - DIRECT_INDEX_BASE);
    }
    return { entries, start, lsn, directStart };
  }

  /** After the checkpoint of a cut commits: the tail now starts at `start` (and `directStart`). */
  trimmed(upto: number, start: number, directStart: number): void {
    this.tail.splice(0, upto);
    this.startN = start;
    this.directStart = directStart;
  }

  /**
   * Moves the journal to a segment without the failed replicas: the whole tail is appended there
   * (same LSNs), and the caller commits the new position. Until it does, nothing may be
   * acknowledged. Sources are re-pointed at their new place.
   */
  async moveTo(): Promise<void> {
    const { segment, replicas } = await this.pickSegment(this.segment + 1);
    this.segment = segment;
    this.setReplicas(replicas);
    this.next = 0;
    this.startN = 0;
    this.cur = undefined;
    this.sealing.clear();
    this.unsealed.clear();
    this.toSeal = [];
    this.sealBatch = [];
    this.broken = false;
    const touched = new Set<LogBlockBuilder>();
    for (const e of this.tail) this.place(e, touched);
    await this.send(touched);
    for (const e of this.tail) e.acked = true;
  }

  /** Starts over in a fresh segment with an empty tail: what was there is discarded (a restore). */
  async restart(): Promise<void> {
    const { segment, replicas } = await this.pickSegment(this.segment + 1);
    this.segment = segment;
    this.setReplicas(replicas);
    this.next = 0;
    this.startN = 0;
    this.cur = undefined;
    this.sealing.clear();
    this.unsealed.clear();
    this.toSeal = [];
    this.sealBatch = [];
    this.broken = false;
    this.tail.length = 0;
    this.directStart = this.nextDirect;
  }

  /** Peers this session saw fail. */
  failedPeers(): string[] {
    return [...this.failed.keys()];
  }
}

/** Thrown by append when a replica failed: the journal must move before anything is acknowledged. */
export class JournalReplicaError extends TorusError {
  constructor(readonly errors: string[]) {
    super('NO_PEER', `journal replica failed: ${errors[0]}${errors.length > 1 ? ` (and ${errors.length - 1} more)` : ''}`);
  }
}

/**
 * Fences a dead (or fenced-out) writer's journal and reads its tail back: the records of `pos`,
 * from its start, in LSN order from `lsn`, from the first replica that can be fenced. Records
 * past the last acknowledged flush may come back too; every acknowledged one does, because an
 * acknowledged append reached every replica. NO_PEER when no replica can be fenced. Without a
 * `newEpoch` (a reader, not a writer) nothing is fenced: the replicas that answer are read.
 */
export async function readTail(peers: JournalPeers, volume: number, newEpoch: number | undefined, pos: JournalPos, lsn: number): Promise<JournalRecord[]> {
  const errors: string[] = [];
  const fenced: string[] = [];
  await Promise.all(
    pos.replicas.map(async (peer) => {
      try {
        if (newEpoch !== undefined) await peers.journalFence(peer, volume, newEpoch);
        fenced.push(peer);
      } catch (err) {
        errors.push(`${peer}: ${toTorusError(err).message}`);
      }
    }),
  );
  if (fenced.length === 0)
    throw new TorusError('NO_PEER', `cannot replay the journal of volume ${volume}: none of its replicas could be fenced (${errors.join('; ')})`);
  // Any fenced replica has every acknowledged record; the longest tail keeps the most of the rest.
  let best: JournalRecord[] | undefined;
  let lastErr: TorusError | undefined;
  for (const peer of pos.replicas.filter((p) => fenced.includes(p))) {
    try {
      const recs = await readTailFrom(peers, peer, volume, pos, lsn);
      if (!best || recs.length > best.length) best = recs;
    } catch (err) {
      lastErr = toTorusError(err);
    }
  }
  if (!best) throw lastErr ?? new TorusError('NO_PEER', `cannot read the journal of volume ${volume}`);
  return best;
}

async function readTailFrom(peers: JournalPeers, peer: string, volume: number, pos: JournalPos, lsn: number): Promise<JournalRecord[]> {
  const out: JournalRecord[] = [];
  let next = lsn;
  for (let n = pos.start; ; n++) {
    const at: LogAddress = { volume, epoch: pos.epoch, index: logIndex(pos.segment, n) };
    let buf: Buffer;
    try {
      buf = await peers.journalReadRaw(peer, logRef(at));
    } catch (err) {
      if (toTorusError(err).code === 'BLOCK_UNAVAILABLE') break;
      throw err;
    }
    const { records } = parseLogBlock(buf, at, next);
    // A block may end early (the writer moved on at a cut, or the crash came mid-block); the
    // next one carries on the LSNs, or the tail ends.
    if (records.length === 0 && n > pos.start) break;
    out.push(...records);
    next += records.length;
  }
  return out;
}
