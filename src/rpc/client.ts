import type { Duplex } from 'node:stream';
import { DeadlineWheel } from '../core/deadline-wheel.js';
import { TorusError, type ErrorCode } from '../core/errors.js';
import { formatBlockRef, type BlockRef } from '../core/ids.js';
import type { LogPiece, SectorRead } from '../core/interfaces.js';
import type { PeerAddress } from './address.js';
import {
  ConsecutiveFailureBreaker,
  exponentialBackoff,
  type BackoffOptions,
  type BackoffPolicy,
  type BreakerOptions,
  type BreakerState,
  type CircuitBreaker,
} from './breaker.js';
import {
  DEFAULT_MAX_FRAME_SIZE,
  FLAG_RAW,
  FLAG_SUMS,
  encodeAppend,
  encodeFence,
  encodeSeal,
  type FenceResultMessage,
  HEADER_SIZE,
  MIN_MAX_FRAME_SIZE,
  MIN_PROTOCOL_VERSION,
  Op,
  PROTOCOL_VERSION,
  GET_SIZE,
  checkGet,
  encodeDeleteBatch,
  encodeEmpty,
  encodeGetInto,
  encodeHasBatch,
  encodePutBatch,
  maxRefsPerFrame,
  opName,
  putItemFrameCost,
  setFrameId,
  type HasResultMessage,
  type Message,
  type PutItem,
  type PutResultMessage,
  type ReplyTarget,
} from './codec.js';
import { PeerConnection, type CallQueue, type ClientState, type Connection, type RemotePeer } from './connection.js';
import type { PeerSecurity } from './security.js';
import type { NodeIdentity, VersionRange } from './server.js';
import { Fifo } from './writer.js';

export type { ClientState, RemotePeer } from './connection.js';

/** A queued call may wait this many times its timeout to be sent (it then has its whole timeout). */
const QUEUE_TIMEOUT_FACTOR = 6;

export interface PeerClientOptions {
  /** Who we are: sent in HELLO, and the cluster the peer must belong to. */
  readonly identity: NodeIdentity;
  /** The uuid the peer must report; a different node at that address is refused (NO_PEER). */
  readonly expectUuid?: string;
  /** TCP connect plus handshake. */
  readonly connectTimeoutMs?: number;
  /** Default per-request timeout, counted from the call (queueing included). */
  readonly requestTimeoutMs?: number;
  /** Requests on the wire at once; more wait in a queue. Also capped by the server's limit. */
  readonly maxInFlight?: number;
  /** Requests waiting beyond maxInFlight; past it calls fail at once with AGAIN. */
  readonly maxQueued?: number;
  /** Request bytes waiting for the socket before we stop sending and wait for 'drain'. */
  readonly maxQueuedWriteBytes?: number;
  /** Largest reply frame accepted. */
  readonly maxFrameSize?: number;
  /** Send a PING after this long without hearing from the peer; 0 disables. */
  readonly keepaliveMs?: number;
  /** Close the connection after this long without calls (it reopens on demand); 0 = never. */
  readonly idleCloseMs?: number;
  readonly backoff?: BackoffPolicy | BackoffOptions;
  readonly breaker?: CircuitBreaker | BreakerOptions;
  readonly versions?: VersionRange;
  /** Transport override (tests, in-process nodes): must return a connected or connecting stream. */
  readonly connect?: (address: PeerAddress) => Duplex;
  /** TLS and how both ends prove who they are (security.ts); plaintext if absent. */
  readonly security?: PeerSecurity;
}

export interface RequestOptions {
  readonly timeoutMs?: number;
}

export interface PutOptions extends RequestOptions {
  /** Ask the peer to flush before acknowledging, making the blocks durable in one round trip. */
  readonly sync?: boolean;
}

export interface PeerClientStats {
  readonly state: ClientState;
  readonly breaker: BreakerState;
  readonly inFlight: number;
  readonly queued: number;
  /** Request bytes accepted by the connection and not yet taken by the kernel. */
  readonly queuedWriteBytes: number;
  readonly connects: number;
  readonly connectFailures: number;
  readonly timeouts: number;
  readonly requests: number;
  readonly lastError: string | null;
}

export const CLIENT_DEFAULTS = {
  connectTimeoutMs: 2000,
  requestTimeoutMs: 5000,
  maxInFlight: 64,
  maxQueued: 16_384,
  maxQueuedWriteBytes: 4 * 1024 * 1024,
  keepaliveMs: 5000,
  idleCloseMs: 60_000,
} as const;

const QUEUED = 0;
const SENT = 1;
const DONE = 2;

interface Call {
  /** The encoded frame; empty for a GET, which is encoded straight into the socket batch. */
  parts: readonly Buffer[];
  readonly op: number;
  readonly expect: number;
  readonly ref: BlockRef | undefined;
  readonly getOffset: number;
  readonly getLength: number;
  /** GET flags: FLAG_SUMS (resolved with a SectorRead), FLAG_RAW, or 0. */
  readonly getFlags: number;
  /** Resolved with the DATA payload for a GET (a SectorRead with FLAG_SUMS), with the reply message otherwise. */
  readonly resolve: (value: Message | Buffer | SectorRead) => void;
  readonly reject: (err: TorusError) => void;
  readonly timeoutMs: number;
  /** The deadline wheel's: when the call times out, and where it is armed (-1: not armed). */
  deadline: number;
  slot: number;
  status: number;
  id: number;
  probe: boolean;
  /** A durable append: a flush waits for it, so it leaves now rather than with the turn's batch. */
  readonly urgent: boolean;
  /** A GET whose bytes go into its caller's buffer (readSectors' `into`). */
  readonly target: IntoTarget | undefined;
}

/** Where a GET's reply bytes land while the call waits for them (codec ReplyTarget). */
class IntoTarget implements ReplyTarget {
  call: Call | undefined;
  constructor(readonly into: Buffer) {}
  live(): boolean {
    return this.call !== undefined && this.call.status === SENT;
  }
}

const NO_PARTS: readonly Buffer[] = [];

/**
 * A connection to one peer, made on first use. Calls are pipelined with request ids and may
 * complete in any order. At most `maxInFlight` are on the wire; the rest wait in a FIFO, which
 * also holds them while the socket is backed up (write() past `maxQueuedWriteBytes`) until
 * 'drain'.
 *
 * Failure handling, so that a dead peer costs one timeout and not one per request:
 * - a connect failure fails every waiting call at once and schedules the next attempt with
 *   exponential backoff and jitter;
 * - a dropped connection fails the calls that were on the wire at once (they may or may not
 *   have run; all operations are idempotent, so the caller may retry elsewhere);
 * - every transport failure (connect error, drop with work pending, request timeout) counts
 *   toward the circuit breaker; once it opens, the connection is dropped, everything pending
 *   fails and later calls fail immediately with BLOCK_UNAVAILABLE until a single probe call
 *   after the cool-down gets an answer.
 * Every error is a TorusError; BLOCK_UNAVAILABLE and TIMEOUT are retryable.
 */
export class PeerClient {
  readonly address: string;
  private readonly o: {
    readonly requestTimeoutMs: number;
    readonly maxInFlight: number;
    readonly maxQueued: number;
  };
  readonly breaker: CircuitBreaker;
  private readonly connection: PeerConnection;

  private readonly queue = new Fifo<Call>();
  private readonly pending = new Map<number, Call>();
  private inFlight = 0;
  private nextId = 0;
  private lastCall = 0;
  private readonly counters = { timeouts: 0, requests: 0 };
  /** Every call's deadline, under one timer (not one per call). */
  private readonly deadlines = new DeadlineWheel<Call>((call) => this.timedOut(call));

  constructor(address: string, options: PeerClientOptions) {
    this.address = address;
    this.o = {
      requestTimeoutMs: options.requestTimeoutMs ?? CLIENT_DEFAULTS.requestTimeoutMs,
      maxInFlight: Math.max(1, options.maxInFlight ?? CLIENT_DEFAULTS.maxInFlight),
      maxQueued: options.maxQueued ?? CLIENT_DEFAULTS.maxQueued,
    };
    const b = options.backoff;
    const br = options.breaker;
    this.connection = new PeerConnection(
      address,
      {
        identity: options.identity,
        expectUuid: options.expectUuid,
        connectTimeoutMs: options.connectTimeoutMs ?? CLIENT_DEFAULTS.connectTimeoutMs,
        maxQueuedWriteBytes: options.maxQueuedWriteBytes ?? CLIENT_DEFAULTS.maxQueuedWriteBytes,
        maxFrameSize: Math.max(MIN_MAX_FRAME_SIZE, options.maxFrameSize ?? DEFAULT_MAX_FRAME_SIZE),
        keepaliveMs: options.keepaliveMs ?? CLIENT_DEFAULTS.keepaliveMs,
        idleCloseMs: options.idleCloseMs ?? CLIENT_DEFAULTS.idleCloseMs,
        versions: options.versions ?? { min: MIN_PROTOCOL_VERSION, max: PROTOCOL_VERSION },
        backoff: typeof b === 'function' ? b : exponentialBackoff(b),
        breaker: br !== undefined && 'tryAcquire' in br ? br : new ConsecutiveFailureBreaker(br),
        connect: options.connect,
        security: options.security ?? { mode: 'insecure' },
      },
      this.callQueue(),
    );
    this.breaker = this.connection.breaker;
  }

  /** The calls as the connection sees them; kept off PeerClient's own surface. */
  private callQueue(): CallQueue {
    return {
      inFlight: () => this.inFlight,
      queued: () => this.queue.length,
      lastCall: () => this.lastCall,
      complete: (conn, m) => this.complete(conn, m),
      replyInto: (id) => this.pending.get(id)?.target ?? null,
      pump: () => this.pump(),
      failPending: (err) => this.failPending(err),
      failQueued: (err) => this.failQueued(err),
      ping: () => this.request([encodeEmpty(Op.Ping, 0)], Op.Ping, Op.Pong, undefined, this.o.requestTimeoutMs, 0, 0, true),
    };
  }

  get state(): ClientState {
    return this.connection.state;
  }

  /** The peer's HELLO_OK, once connected. */
  get remote(): RemotePeer | undefined {
    return this.connection.remote;
  }

  /**
   * The process instance of the peer that answered the call just awaited, when read right after
   * the await: a reply settles its call from the connection's data event, and a reconnect (the only
   * thing that changes this) needs I/O events of its own, which cannot run before the promise
   * continuations the reply set off.
   */
  get instance(): string | undefined {
    return this.remote?.instance;
  }

  /** The peer's block size once known, else 0 (lets a client stand in for a BlockService). */
  get blockSize(): number {
    return this.remote?.blockSize ?? 0;
  }

  stats(): PeerClientStats {
    return {
      state: this.state,
      breaker: this.breaker.state,
      inFlight: this.inFlight,
      queued: this.queue.length,
      queuedWriteBytes: this.connection.current?.writer.queuedBytes ?? 0,
      ...this.connection.counters,
      ...this.counters,
      lastError: this.connection.lastError?.message ?? null,
    };
  }

  // -------------------------------------------------------------------------------------------
  // Operations

  /** The whole block. */
  getBlock(ref: BlockRef, options?: RequestOptions): Promise<Buffer> {
    return this.get(ref, 0, 0, options);
  }

  /** `length` bytes at `offset` inside the block. */
  readRange(ref: BlockRef, offset: number, length: number, options?: RequestOptions): Promise<Buffer> {
    if (length === 0) return Promise.resolve(Buffer.alloc(0));
    return this.get(ref, offset, length, options);
  }

  /**
   * The sectors covering [offset, offset+length) with the block's sector checksums (length 0:
   * the whole block), for the caller to check against the writer's CRC (verifySectorRead).
   * Undefined when the peer does not serve checksums (it did not announce EXT_CHECKSUMS).
   *
   * `into`, for a range of whole sectors (as long as it): the bytes are copied into it from each
   * socket read as the reply arrives, with no buffer of their own, and the SectorRead's `data`
   * is `into`. Once the call has settled, nothing more is written into it, whatever arrives late.
   */
  async readSectors(ref: BlockRef, offset: number, length: number, options?: RequestOptions, into?: Buffer): Promise<SectorRead | undefined> {
    checkGet(ref, offset, length);
    const remote = this.remote ?? (await this.connect(options));
    if (!remote.checksums) return undefined;
    if (into !== undefined && into.length !== (length === 0 ? remote.blockSize : length))
      throw new TorusError('INVALID_ARGUMENT', `a ${into.length}-byte buffer for a read of ${length === 0 ? remote.blockSize : length} bytes`);
    return (await this.request(NO_PARTS, Op.Get, Op.Data, ref, options?.timeoutMs, offset, length, false, FLAG_SUMS, false, into)) as SectorRead;
  }

  // ---- journals (docs/journal.md) ----

  /**
   * The peer keeps volume journals (it announced EXT_JOURNAL). Connects when not connected, so a
   * peer that went away answers false (by failing), not what its last handshake said: a writer
   * picking journal replicas asks this of peers that failed it recently.
   */
  async hasJournal(options?: RequestOptions): Promise<boolean> {
    return (await this.connect(options)).journal;
  }

  private async needJournal(options: RequestOptions | undefined): Promise<void> {
    if (!(await this.hasJournal(options))) throw new TorusError('INVALID_ARGUMENT', `peer ${this.address} keeps no volume journals (an older node)`);
  }

  /** Writes pieces into an open log block; with `sync`, durable when it resolves. */
  async appendLog(ref: BlockRef, pieces: readonly LogPiece[], options?: PutOptions): Promise<void> {
    await this.needJournal(options);
    const sync = options?.sync ?? false;
    await this.request(encodeAppend(0, ref, pieces, sync), Op.Append, Op.Ok, ref, options?.timeoutMs, 0, 0, false, 0, sync);
  }

  async sealLog(ref: BlockRef, gapStart: number, gapEnd: number, crc: number, options?: PutOptions): Promise<void> {
    await this.needJournal(options);
    await this.request([encodeSeal(0, ref, gapStart, gapEnd, crc, options?.sync ?? false)], Op.Seal, Op.Ok, ref, options?.timeoutMs);
  }

  /** Fences the volume's journal at `epoch`; the volume's open log blocks on the peer. */
  async fenceVolume(volume: number, epoch: number, options?: RequestOptions): Promise<BlockRef[]> {
    await this.needJournal(options);
    const m = (await this.request([encodeFence(0, volume, epoch)], Op.Fence, Op.FenceResult, undefined, options?.timeoutMs)) as FenceResultMessage;
    return [...m.open];
  }

  /** A block as stored, open log blocks included. */
  async readRaw(ref: BlockRef, options?: RequestOptions): Promise<Buffer> {
    checkGet(ref, 0, 0);
    await this.needJournal(options);
    return (await this.request(NO_PARTS, Op.Get, Op.Data, ref, options?.timeoutMs, 0, 0, false, FLAG_RAW)) as Buffer;
  }

  private get(ref: BlockRef, offset: number, length: number, options: RequestOptions | undefined): Promise<Buffer> {
    try {
      checkGet(ref, offset, length);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.request(NO_PARTS, Op.Get, Op.Data, ref, options?.timeoutMs, offset, length) as Promise<Buffer>;
  }

  /**
   * Stores blocks; one result per item, null when stored. Batches larger than the peer's frame
   * limit are split into several frames (sent concurrently).
   */
  async putBlocks(items: readonly PutItem[], options?: PutOptions): Promise<(TorusError | null)[]> {
    if (items.length === 0) return [];
    let limit = this.remote?.maxFrameSize ?? MIN_MAX_FRAME_SIZE;
    const crcs = items.every((it) => it.crc !== undefined);
    if (!this.remote && (crcs || items.some((it) => HEADER_SIZE + 4 + putItemFrameCost(it) > limit))) {
      // Blocks over the protocol minimum need the peer's actual limit, and CRCs its support.
      limit = (await this.connect(options)).maxFrameSize;
    }
    const sendCrcs = crcs && this.remote?.checksums === true;
    const results: (TorusError | null)[] = new Array(items.length).fill(null);
    const groups: number[][] = [];
    let group: number[] = [];
    let size = HEADER_SIZE + 4;
    items.forEach((it, i) => {
      const cost = putItemFrameCost(it);
      if (HEADER_SIZE + 4 + cost > limit) {
        results[i] = new TorusError('INVALID_ARGUMENT', `block of ${it.data.byteLength} bytes does not fit in peer ${this.address}'s ${limit}-byte frames`);
        return;
      }
      if (size + cost > limit && group.length > 0) {
        groups.push(group);
        group = [];
        size = HEADER_SIZE + 4;
      }
      group.push(i);
      size += cost;
    });
    if (group.length > 0) groups.push(group);
    await Promise.all(
      groups.map(async (g) => {
        const batch = g.map((i) => items[i]!);
        const parts = encodePutBatch(0, batch, options?.sync ?? false, sendCrcs);
        const m = (await this.request(parts, Op.PutBatch, Op.PutResult, batch[0]?.ref, options?.timeoutMs)) as PutResultMessage;
        if (m.statuses.length !== g.length)
          throw new TorusError('PROTOCOL', `peer ${this.address} answered ${m.statuses.length} statuses for ${g.length} blocks`);
        m.statuses.forEach((code, j) => {
          const i = g[j]!;
          if (code !== null) results[i] = this.itemError(code, items[i]!.ref);
        });
      }),
    );
    return results;
  }

  async putBlock(ref: BlockRef, data: Uint8Array, options?: PutOptions): Promise<void> {
    const [err] = await this.putBlocks([{ ref, data }], options);
    if (err) throw err;
  }

  async hasBlocks(refs: readonly BlockRef[], options?: RequestOptions): Promise<boolean[]> {
    const per = maxRefsPerFrame(this.remote?.maxFrameSize ?? MIN_MAX_FRAME_SIZE);
    const chunks: Promise<boolean[]>[] = [];
    for (let i = 0; i < refs.length; i += per) {
      const slice = refs.slice(i, i + per);
      chunks.push(
        this.request([encodeHasBatch(0, slice)], Op.HasBatch, Op.HasResult, slice[0], options?.timeoutMs).then((m) => {
          const has = (m as HasResultMessage).has;
          if (has.length !== slice.length)
            throw new TorusError('PROTOCOL', `peer ${this.address} answered ${has.length} bits for ${slice.length} refs`);
          return has as boolean[];
        }),
      );
    }
    return (await Promise.all(chunks)).flat();
  }

  async hasBlock(ref: BlockRef, options?: RequestOptions): Promise<boolean> {
    const [has] = await this.hasBlocks([ref], options);
    return has === true;
  }

  async deleteBlocks(refs: readonly BlockRef[], options?: RequestOptions): Promise<void> {
    const per = maxRefsPerFrame(this.remote?.maxFrameSize ?? MIN_MAX_FRAME_SIZE);
    const chunks: Promise<unknown>[] = [];
    for (let i = 0; i < refs.length; i += per) {
      const slice = refs.slice(i, i + per);
      chunks.push(this.request([encodeDeleteBatch(0, slice)], Op.DeleteBatch, Op.Ok, slice[0], options?.timeoutMs));
    }
    await Promise.all(chunks);
  }

  async deleteBlock(ref: BlockRef, options?: RequestOptions): Promise<void> {
    await this.deleteBlocks([ref], options);
  }

  /** Makes every put and delete the peer acknowledged before this call durable. */
  async flush(options?: RequestOptions): Promise<void> {
    await this.request([encodeEmpty(Op.Flush, 0)], Op.Flush, Op.Ok, undefined, options?.timeoutMs);
  }

  async ping(options?: RequestOptions): Promise<void> {
    await this.request([encodeEmpty(Op.Ping, 0)], Op.Ping, Op.Pong, undefined, options?.timeoutMs);
  }

  /** Connects and handshakes now instead of on first use; resolves to the peer's identity. */
  async connect(options?: RequestOptions): Promise<RemotePeer> {
    if (this.state !== 'ready' || !this.remote) await this.ping(options);
    const remote = this.remote;
    if (!remote) throw new TorusError('BLOCK_UNAVAILABLE', `peer ${this.address} disconnected during connect`);
    return remote;
  }

  /** Fails everything pending with CLOSED and closes the connection; later calls fail too. */
  close(): Promise<void> {
    return this.connection.close();
  }

  // -------------------------------------------------------------------------------------------
  // Requests

  private request(
    parts: readonly Buffer[],
    op: number,
    expect: number,
    ref: BlockRef | undefined,
    timeoutMs: number | undefined,
    getOffset = 0,
    getLength = 0,
    internal = false,
    getFlags = 0,
    urgent = false,
    into?: Buffer,
  ): Promise<Message | Buffer | SectorRead> {
    if (this.state === 'closed') return Promise.reject(new TorusError('CLOSED', `client for peer ${this.address} is closed`));
    let probe = false;
    if (!internal) {
      const verdict = this.breaker.tryAcquire();
      if (verdict === 'reject') return Promise.reject(this.connection.openError());
      probe = verdict === 'probe';
      if (probe) this.connection.skipBackoff();
      if (this.queue.length >= this.o.maxQueued) {
        if (probe) this.breaker.release();
        return Promise.reject(new TorusError('AGAIN', `${this.queue.length} requests already queued for peer ${this.address}`));
      }
      this.lastCall = Date.now();
    }
    this.counters.requests++;
    return new Promise<Message | Buffer | SectorRead>((resolve, reject) => {
      const ms = timeoutMs ?? this.o.requestTimeoutMs;
      const target = into === undefined ? undefined : new IntoTarget(into);
      const call: Call = { parts, op, expect, ref, getOffset, getLength, getFlags, resolve, reject, timeoutMs: ms, deadline: 0, slot: -1, status: QUEUED, id: 0, probe, urgent, target };
      if (target) target.call = call;
      // Waiting behind other calls is not a sign of a dead peer (a big sync queues hundreds of
      // puts): the timeout proper starts when the call is sent; the queue gets a bound of its own,
      // armed only if the call did not go out at once.
      this.queue.push(call);
      this.pump();
      if (call.status === QUEUED && call.slot < 0) this.deadlines.arm(call, ms * QUEUE_TIMEOUT_FACTOR);
    });
  }

  /** Sends queued calls while the in-flight cap and the socket allow; connects if needed. */
  private pump(): void {
    if (this.state === 'closed' || this.queue.length === 0) return;
    const conn = this.connection.current;
    if (!conn) {
      this.connection.startConnect();
      return;
    }
    if (!conn.ready) return;
    const cap = Math.min(this.o.maxInFlight, this.remote?.maxInFlight ?? this.o.maxInFlight);
    let urgent = false;
    while (this.inFlight < cap && !conn.writer.needDrain) {
      const call = this.queue.shift();
      if (call === undefined) break;
      if (call.status !== QUEUED) continue;
      let id = (this.nextId + 1) >>> 0;
      // Ids only move forward, so a late reply to a timed-out call cannot be mistaken for a
      // reply to a new one unless 2^32 requests happen in between.
      while (id === 0 || this.pending.has(id)) id = (id + 1) >>> 0;
      this.nextId = id;
      call.id = id;
      call.status = SENT;
      this.deadlines.arm(call, call.timeoutMs);
      this.pending.set(id, call);
      this.inFlight++;
      if (call.parts.length === 0) {
        const at = conn.writer.claim(GET_SIZE);
        encodeGetInto(conn.writer.slabBuffer, at, id, call.ref!, call.getOffset, call.getLength, call.getFlags);
      } else {
        setFrameId(call.parts[0]!, id);
        conn.writer.writeAll(call.parts);
        call.parts = NO_PARTS;
      }
      urgent ||= call.urgent;
    }
    // Waiting for the end of the turn gathers other calls into the same write, but a flush is
    // waiting on this one: measured on P5, the wait was 50 µs of its ~600 (docs/performance.md).
    if (urgent) conn.writer.flush();
  }

  /** Called by the deadline wheel. */
  private timedOut(call: Call): void {
    if (call.status === DONE) return;
    const wasSent = call.status === SENT;
    call.status = DONE;
    this.counters.timeouts++;
    const err = new TorusError(
      'TIMEOUT',
      wasSent
        ? `${this.describe(call)} to peer ${this.address} timed out after ${call.timeoutMs} ms`
        : `${this.describe(call)} to peer ${this.address} waited ${call.timeoutMs * QUEUE_TIMEOUT_FACTOR} ms to be sent`,
    );
    if (wasSent) {
      this.pending.delete(call.id);
      this.inFlight--;
      call.reject(err);
      this.connection.transportFailure(err);
      this.pump();
    } else {
      if (call.probe) this.breaker.release();
      call.reject(err);
    }
  }

  private complete(conn: Connection, m: Message): void {
    const call = this.pending.get(m.id);
    if (call === undefined) {
      if (m.op === Op.Error && m.id === 0) this.connection.dropConnection(conn, new TorusError(m.code, `peer ${this.address} closed the connection: ${m.message}`));
      // else: a late reply to a call that timed out
      return;
    }
    this.pending.delete(m.id);
    this.inFlight--;
    call.status = DONE;
    this.deadlines.cancel(call);
    this.breaker.success();
    if (m.op === Op.Error) call.reject(new TorusError(m.code, `peer ${this.address}: ${m.message}`));
    else if (m.op === Op.Data && call.expect === Op.Data && call.getFlags === FLAG_SUMS) {
      const into = call.target?.into;
      if (!m.sums) call.reject(new TorusError('PROTOCOL', `peer ${this.address} answered a read of ${this.describe(call)} without the sector checksums asked for`));
      else if (into !== undefined && m.data !== into && m.data.length !== into.length)
        call.reject(new TorusError('PROTOCOL', `peer ${this.address} returned ${m.data.length} bytes for a ${into.length}-byte read of ${this.describe(call)}`));
      else {
        // A reply that came in one read was decoded from a view of it: copied in here.
        if (into !== undefined && m.data !== into) into.set(m.data);
        call.resolve({ sectorSize: m.sums.sectorSize, sums: m.sums.sums, offset: m.sums.offset, data: into ?? m.data });
      }
    } else if (m.op === Op.Data && call.expect === Op.Data) {
      if (call.getLength !== 0 && m.data.length !== call.getLength)
        call.reject(new TorusError('PROTOCOL', `peer ${this.address} returned ${m.data.length} bytes for a ${call.getLength}-byte read of ${this.describe(call)}`));
      else call.resolve(m.data);
    } else if (m.op === call.expect) call.resolve(m);
    else {
      const err = new TorusError('PROTOCOL', `peer ${this.address} answered ${opName(call.op)} with ${opName(m.op)}`);
      call.reject(err);
      this.connection.dropConnection(conn, err);
    }
  }

  private failPending(err: TorusError): void {
    const calls = [...this.pending.values()];
    this.pending.clear();
    this.inFlight = 0;
    for (const c of calls) this.settleWithError(c, err);
  }

  private failQueued(err: TorusError): void {
    for (const c of this.queue.drain()) if (c.status === QUEUED) this.settleWithError(c, err);
  }

  private settleWithError(c: Call, err: TorusError): void {
    if (c.status === DONE) return;
    c.status = DONE;
    this.deadlines.cancel(c);
    if (c.probe && err.code === 'CLOSED') this.breaker.release();
    c.reject(err);
  }

  private itemError(code: ErrorCode, ref: BlockRef): TorusError {
    return new TorusError(code, `peer ${this.address}: storing ${formatBlockRef(ref)} failed (${code})`);
  }

  private describe(call: Call): string {
    const what = call.ref ? `${opName(call.op)} ${formatBlockRef(call.ref)}` : opName(call.op);
    return call.getLength ? `${what} [${call.getOffset}+${call.getLength}]` : what;
  }
}
