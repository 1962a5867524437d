import { randomBytes } from 'node:crypto';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import tls from 'node:tls';
import { ByteBudget, type BudgetHolder } from '../core/budget.js';
import { BufferPool, type BufferLease } from '../core/buffer-pool.js';
import { directSocket } from '../core/direct-socket.js';
import { toTorusError, TorusError, type ErrorCode } from '../core/errors.js';
import { BLOCK_REF_SIZE, formatBlockRef, type BlockRef } from '../core/ids.js';
import { LogThrottle, StallWatch, capConnections, sweepInterval } from '../core/limits.js';
import type { BlockStore, LogPiece, SectorRead } from '../core/interfaces.js';
import {
  DEFAULT_MAX_FRAME_SIZE,
  EXT_AUTH_HMAC,
  EXT_CRITICAL,
  EXT_CHECKSUMS,
  EXT_INSTANCE,
  EXT_JOURNAL,
  encodeFenceResult,
  type AppendMessage,
  type FenceMessage,
  type SealMessage,
  EXT_SOFTWARE,
  FrameDecoder,
  HANDSHAKE_MAX_FRAME_SIZE,
  HEADER_SIZE,
  MIN_MAX_FRAME_SIZE,
  MIN_PROTOCOL_VERSION,
  Op,
  PROTOCOL_VERSION,
  encodeData,
  encodeDataSums,
  encodeEmpty,
  encodeError,
  encodeHasResult,
  encodeHelloOk,
  encodePutResult,
  opName,
  type GetMessage,
  type HelloMessage,
  type Message,
  type PutBatchMessage,
  type RefsMessage,
} from './codec.js';
import { FrameWriter } from './writer.js';
import { formatPeerAddress } from './address.js';
import { serverPeerAuth, serverTlsOptions, verifyClientProof, type PeerAuth, type PeerSecurity } from './security.js';

/**
 * What the server needs from the node behind it. A core BlockStore fits as is; `hasBlock` may
 * also be async so that a remote or tiered store can stand in.
 */
export interface BlockService {
  readonly blockSize: number;
  getBlock(ref: BlockRef): Promise<Buffer>;
  readRange(ref: BlockRef, offset: number, length: number): Promise<Buffer>;
  /** Sectors with the block's sector checksums; a service that has it lets clients check reads end to end (EXT_CHECKSUMS). */
  readSectors?(ref: BlockRef, offset: number, length: number): Promise<SectorRead>;
  /** readSectors into the server's memory (BlockStore.readSectorsInto): a reply without a buffer of its own. */
  readSectorsInto?(ref: BlockRef, offset: number, into: Buffer): Promise<SectorRead | undefined>;
  readonly sectorSize?: number;
  /**
   * `opts.crc`: the writer's CRC of the whole block; CORRUPT if the stored block does not match it.
   * `data` (like an append's pieces) is pooled memory, handed out again once the promise settles:
   * keep a copy, never the view, and do not read it after settling.
   */
  putBlock(ref: BlockRef, data: Uint8Array, opts?: { readonly crc?: number }): Promise<void>;
  hasBlock(ref: BlockRef): boolean | Promise<boolean>;
  /** Volume journals (docs/journal.md); a service that has them announces EXT_JOURNAL. */
  appendLog?(ref: BlockRef, pieces: readonly LogPiece[], sync?: boolean): Promise<void>;
  sealLog?(ref: BlockRef, gapStart: number, gapEnd: number, crc: number): Promise<void>;
  fenceVolume?(volume: number, epoch: number): Promise<BlockRef[]>;
  readRaw?(ref: BlockRef): Promise<Buffer>;
  deleteBlock(ref: BlockRef): Promise<void>;
  flush(): Promise<void>;
}

// Compile-time conformance check: a BlockStore must stay usable as a BlockService.
const _blockStoreIsABlockService = (s: BlockStore): BlockService => s;
void _blockStoreIsABlockService;

/** A service that keeps volume journals, with the sync that makes an append durable. */
export type JournalService = Required<Pick<BlockService, 'appendLog' | 'sealLog' | 'fenceVolume' | 'readRaw'>> & Pick<BlockService, 'flush'>;

/** The service's journal operations, when it has all of them (a node that keeps no journals has none). */
export function journalService(sv: BlockService): JournalService | undefined {
  if (!sv.appendLog || !sv.sealLog || !sv.fenceVolume || !sv.readRaw) return undefined;
  return { appendLog: sv.appendLog.bind(sv), sealLog: sv.sealLog.bind(sv), fenceVolume: sv.fenceVolume.bind(sv), readRaw: sv.readRaw.bind(sv), flush: sv.flush.bind(sv) };
}

// What a node does for a PUT, an APPEND and a SEAL, whoever asks: a peer over the network (the
// server below) or the node itself, serving a volume from its own disk (distributor/local-transport.ts).
// One code path, so the journal's fencing and the sync that makes an append durable cannot differ.

/** Stores each block, checked against its writer's CRC; one status per item: null for stored, else the error code. */
export function storeBlocks(service: BlockService, items: readonly { readonly ref: BlockRef; readonly data: Uint8Array; readonly crc?: number }[]): Promise<(ErrorCode | null)[]> {
  return Promise.all(
    items.map((it): Promise<ErrorCode | null> => {
      if (it.data.length > service.blockSize) return Promise.resolve('INVALID_ARGUMENT');
      const opts = it.crc === undefined ? undefined : { crc: it.crc };
      return invoke(() => service.putBlock(it.ref, it.data, opts)).then(
        () => null,
        (err: unknown) => codeOf(err),
      );
    }),
  );
}

/**
 * A journal append: refused (fenced) below the volume's epoch by the store; with `sync`, on
 * stable storage before it resolves (the store writes and syncs it in one go when it can).
 * `stored` is told once the store is done with the pieces (the server hands their pooled memory
 * out again then).
 */
export async function appendJournal(j: JournalService, ref: BlockRef, pieces: readonly LogPiece[], sync: boolean, stored?: () => void): Promise<void> {
  try {
    await j.appendLog(ref, pieces, sync);
  } finally {
    stored?.();
  }
}

export async function sealJournal(j: JournalService, ref: BlockRef, gapStart: number, gapEnd: number, crc: number, sync: boolean): Promise<void> {
  await j.sealLog(ref, gapStart, gapEnd, crc);
  if (sync) await j.flush();
}

export interface NodeIdentity {
  readonly uuid: string;
  readonly clusterId: string;
}

export interface VersionRange {
  readonly min: number;
  readonly max: number;
}

export interface RpcServerOptions {
  readonly service: BlockService;
  readonly identity: NodeIdentity;
  /** Requests worked on at once per connection; beyond it the socket is not read. */
  readonly maxInFlight?: number;
  /** Bytes of request and expected reply payload held per connection before reading stops. */
  readonly maxInFlightBytes?: number;
  /** Reply bytes queued for a connection's socket before reading from it stops. */
  readonly maxQueuedWriteBytes?: number;
  readonly maxFrameSize?: number;
  /** A connection that has not completed HELLO within this is closed. */
  readonly handshakeTimeoutMs?: number;
  /** A connection with nothing received and nothing in flight for this long is closed; 0 = never. */
  readonly idleTimeoutMs?: number;
  /** Connections accepted at once; more are closed on arrival. Default 1024. */
  readonly maxConnections?: number;
  /**
   * Request, payload and reply bytes held for all connections together (see core/budget.ts).
   * Default 256 MiB.
   */
  readonly maxBufferedBytes?: number;
  /**
   * A client that leaves a frame half-sent, or has replies waiting that it does not read, for
   * this long is dropped; 0 = never. Default 60 s.
   */
  readonly stallTimeoutMs?: number;
  /** Told, at most once per ten seconds per kind, when a limit bites (a connection refused, the budget full, a client dropped for stalling). */
  readonly onLimit?: (what: string, detail: object) => void;
  readonly versions?: VersionRange;
  /** Told about every connection dropped for a protocol error or refused handshake. */
  readonly onConnectionError?: (err: TorusError, remote: string) => void;
  /** Informational string sent in HELLO_OK. */
  readonly software?: string;
  /** TLS and how peers prove who they are (security.ts); plaintext if absent. */
  readonly security?: PeerSecurity;
}

export interface RpcServerStats {
  readonly connections: number;
  readonly inFlight: number;
  readonly queuedWriteBytes: number;
  readonly bufferedReadBytes: number;
  /** Highest in-flight count seen on any one connection. */
  readonly peakInFlight: number;
  /** Highest reply backlog seen on any one connection. */
  readonly peakQueuedWriteBytes: number;
  readonly requests: number;
  readonly protocolErrors: number;
  readonly refusedHandshakes: number;
  /** Bytes received and sent, over all connections past and present. */
  readonly bytesIn: number;
  readonly bytesOut: number;
  /** What all connections hold (frames received, payloads in flight, replies unsent), now and at most. */
  readonly heldBytes: number;
  readonly peakHeldBytes: number;
  /** Connections closed on arrival because `maxConnections` were open. */
  readonly refusedConnections: number;
  /** Times a connection stopped being read, by the limit that stopped it. */
  readonly throttled: Readonly<Record<RpcThrottle, number>>;
  readonly stallTimeouts: number;
  readonly idleTimeouts: number;
  readonly directReads: number;
  /** Pooled receive buffers: held by requests now, idle, and how many frames reused one. */
  readonly pool: { readonly outstanding: number; readonly idleBytes: number; readonly reused: number; readonly allocated: number };
  /** Pooled sector replies, the same way. */
  readonly replyPool: { readonly outstanding: number; readonly idleBytes: number; readonly reused: number; readonly allocated: number };
}

/** Why a connection is not read: requests in flight, their bytes, unsent replies, the shared budget. */
export type RpcThrottle = 'requests' | 'bytes' | 'replies' | 'budget';

export const SERVER_DEFAULTS = {
  maxInFlight: 64,
  maxInFlightBytes: 64 * 1024 * 1024,
  maxQueuedWriteBytes: 8 * 1024 * 1024,
  handshakeTimeoutMs: 5000,
  idleTimeoutMs: 120_000,
  maxConnections: 1024,
  maxBufferedBytes: 256 * 1024 * 1024,
  stallTimeoutMs: 60_000,
} as const;

function poolStats(p: BufferPool): RpcServerStats['pool'] {
  return { outstanding: p.outstanding, idleBytes: p.idleByteCount, reused: p.reused, allocated: p.allocated };
}

/** Where an accepted socket's first read lands (see handleAccepted). */
const HANDSHAKE_FIRST_READ = 4096;
/** Pooled receive buffers kept idle at most: a rebalancer's 4 MiB frames, 4 in flight from each of two peers. */
const POOL_IDLE_BYTES = 32 * 1024 * 1024;
/**
 * Sector replies kept idle at most, apart from the receive pool so that neither crowds out the
 * other: a client's reads in flight are a few blocks each (64 of 64 KiB is 4 MiB).
 */
const REPLY_POOL_IDLE_BYTES = 4 * 1024 * 1024;
/** Deletes of one DELETE_BATCH run at most this many at a time (a frame can hold 700,000 refs). */
const DELETE_CONCURRENCY = 32;
/** Decoded refs are objects: about this many times their 24 wire bytes (measured: 4.7). */
const REFS_MEMORY_FACTOR = 5;

interface Settings {
  readonly maxInFlight: number;
  readonly maxInFlightBytes: number;
  readonly maxQueuedWriteBytes: number;
  readonly maxFrameSize: number;
  readonly handshakeTimeoutMs: number;
  readonly idleTimeoutMs: number;
  readonly stallTimeoutMs: number;
  readonly versions: VersionRange;
  readonly software: string;
}

function invoke<T>(fn: () => T | Promise<T>): Promise<T> {
  try {
    return Promise.resolve(fn());
  } catch (err) {
    return Promise.reject(err);
  }
}

/** Like Promise.allSettled over `items.map(fn)`, with at most `limit` calls running at once. */
async function settleEach<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<PromiseSettledResult<void>[]> {
  const out: PromiseSettledResult<void>[] = new Array(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const i = next++;
      try {
        await fn(items[i]!);
        out[i] = { status: 'fulfilled', value: undefined };
      } catch (reason) {
        out[i] = { status: 'rejected', reason };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

function codeOf(err: unknown): ErrorCode {
  return toTorusError(err).code;
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * Serves a BlockService to peers. Each connection pipelines: requests are started as they are
 * read and answered as they complete, in any order. Flow control per connection: at most
 * `maxInFlight` requests (and `maxInFlightBytes`) are being worked on and at most
 * `maxQueuedWriteBytes` of replies wait for the socket; past either limit the server stops
 * reading that socket (pause) so TCP pushes back on the sender, and resumes when the work or
 * the backlog goes down. A connection that breaks the protocol gets an ERROR and is closed;
 * nothing a client sends can affect another connection or the process.
 */
export class RpcServer {
  /** Sent in every HELLO_OK (EXT_INSTANCE): new with each process, so clients can tell a restart. */
  readonly instance: Buffer = randomBytes(8);
  readonly identity: NodeIdentity;
  readonly security: PeerSecurity;
  private readonly service: BlockService;
  private readonly settings: Settings;
  private readonly onConnectionError: ((err: TorusError, remote: string) => void) | undefined;
  private readonly conns = new Set<ServerConnection>();
  private readonly handshaking = new Set<net.Socket>();
  private server: net.Server | null = null;
  private closed = false;
  private url: string | null = null;
  private sweeper: NodeJS.Timeout | null = null;
  private readonly maxConnections: number;
  private readonly onLimit: ((what: string, detail: object) => void) | undefined;
  private readonly logThrottle = new LogThrottle();
  /** Shared with connections. */
  readonly budget: ByteBudget;
  /** Memory PUT_BATCH and APPEND bodies are received into, reused from frame to frame. */
  readonly pool: BufferPool;
  /** Buffers that sector replies are read into (readSectorsInto), back once the socket has them. */
  readonly replyPool = new BufferPool(REPLY_POOL_IDLE_BYTES);
  /** Mutable counters shared with connections. */
  readonly counters = {
    requests: 0,
    protocolErrors: 0,
    refusedHandshakes: 0,
    peakInFlight: 0,
    peakQueuedWriteBytes: 0,
    /** Of connections already closed; live ones are added in stats(). */
    bytesIn: 0,
    bytesOut: 0,
    refusedConnections: 0,
    stallTimeouts: 0,
    idleTimeouts: 0,
    /** Connections whose socket reads land in the decoder's memory (onread). */
    directReads: 0,
    throttled: { requests: 0, bytes: 0, replies: 0, budget: 0 } satisfies Record<RpcThrottle, number>,
  };

  constructor(options: RpcServerOptions) {
    this.service = options.service;
    this.identity = options.identity;
    this.security = options.security ?? { mode: 'insecure' };
    this.onConnectionError = options.onConnectionError;
    const maxFrameSize = options.maxFrameSize ?? DEFAULT_MAX_FRAME_SIZE;
    if (maxFrameSize < MIN_MAX_FRAME_SIZE)
      throw new TorusError('INVALID_ARGUMENT', `max frame size ${maxFrameSize} is below the protocol minimum ${MIN_MAX_FRAME_SIZE}`);
    if (this.service.blockSize + HEADER_SIZE > maxFrameSize)
      throw new TorusError('INVALID_ARGUMENT', `block size ${this.service.blockSize} does not fit in a ${maxFrameSize}-byte frame`);
    this.settings = {
      maxInFlight: Math.max(1, options.maxInFlight ?? SERVER_DEFAULTS.maxInFlight),
      maxInFlightBytes: options.maxInFlightBytes ?? SERVER_DEFAULTS.maxInFlightBytes,
      maxQueuedWriteBytes: options.maxQueuedWriteBytes ?? SERVER_DEFAULTS.maxQueuedWriteBytes,
      maxFrameSize,
      handshakeTimeoutMs: options.handshakeTimeoutMs ?? SERVER_DEFAULTS.handshakeTimeoutMs,
      idleTimeoutMs: options.idleTimeoutMs ?? SERVER_DEFAULTS.idleTimeoutMs,
      stallTimeoutMs: options.stallTimeoutMs ?? SERVER_DEFAULTS.stallTimeoutMs,
      versions: options.versions ?? { min: MIN_PROTOCOL_VERSION, max: PROTOCOL_VERSION },
      software: options.software ?? 'torus-ts',
    };
    this.maxConnections = options.maxConnections ?? SERVER_DEFAULTS.maxConnections;
    this.onLimit = options.onLimit;
    const budget = options.maxBufferedBytes ?? SERVER_DEFAULTS.maxBufferedBytes;
    // The largest frame must fit, or a client sending one would wait forever.
    if (!(budget >= maxFrameSize)) throw new TorusError('INVALID_ARGUMENT', `a buffer budget of ${budget} bytes is below the ${maxFrameSize}-byte frame limit`);
    this.budget = new ByteBudget(budget);
    this.pool = new BufferPool(Math.min(POOL_IDLE_BYTES, budget));
  }

  /** @internal Reports a limit that bit, at most once per ten seconds per kind. */
  limitHit(what: string, detail: object): void {
    const held = this.logThrottle.take(what);
    if (held === undefined) return;
    try {
      this.onLimit?.(what, held > 0 ? { ...detail, alsoSince: held } : detail);
    } catch {
      // a logging hook must not take the server down
    }
  }

  /** Starts listening on TCP; resolves to the address peers should use (tdp://host:port). */
  listen(port = 0, host = '127.0.0.1'): Promise<string> {
    if (this.closed) return Promise.reject(new TorusError('CLOSED', 'server is closed'));
    if (this.server) return Promise.reject(new TorusError('EXISTS', 'server is already listening'));
    const remoteOf = (socket: net.Socket): string => `${socket.remoteAddress ?? '?'}:${socket.remotePort ?? '?'}`;
    const tlsOptions = serverTlsOptions(this.security);
    let server: net.Server;
    if (tlsOptions) {
      const secure = tls.createServer({ ...tlsOptions, allowHalfOpen: true, noDelay: true, handshakeTimeout: this.settings.handshakeTimeoutMs }, (socket) => {
        const auth = serverPeerAuth(this.security, socket);
        if (auth.refusal !== undefined) {
          this.counters.refusedHandshakes++;
          this.reportError(new TorusError('PERMISSION_DENIED', auth.refusal), remoteOf(socket));
          socket.destroy();
          return;
        }
        this.handle(socket, remoteOf(socket), auth);
      });
      // No certificate, one from another CA, plaintext, a stalled handshake: the connection never
      // reaches HELLO. Counted and reported like a refused handshake; the peer learns nothing.
      secure.on('tlsClientError', (err: Error & { code?: string }, socket: tls.TLSSocket) => {
        this.counters.refusedHandshakes++;
        this.reportError(new TorusError('PERMISSION_DENIED', `TLS handshake failed: ${err.code ?? err.message}`), remoteOf(socket));
        socket.destroy();
      });
      // Until its handshake completes a connection is the TLS layer's, not a ServerConnection:
      // close() must still end it (half-open, it would hold server.close() forever).
      secure.on('connection', (raw: net.Socket) => {
        this.handshaking.add(raw);
        raw.once('close', () => this.handshaking.delete(raw));
      });
      server = secure;
    } else
      server = net.createServer({ allowHalfOpen: true, noDelay: true, pauseOnConnect: true }, (socket) => {
        this.handleAccepted(socket, remoteOf(socket));
      });
    capConnections(server, this.maxConnections, (remote) => {
      this.counters.refusedConnections++;
      this.limitHit('maxConnections', { remote, max: this.maxConnections });
    });
    this.server = server;
    return new Promise((resolve, reject) => {
      const onError = (err: Error): void => {
        this.server = null;
        reject(new TorusError('IO', `cannot listen on ${host}:${port}: ${err.message}`, { cause: err }));
      };
      server.once('error', onError);
      server.listen(port, host, () => {
        server.off('error', onError);
        // Errors after listen (EMFILE on accept...) must not crash the node; connections are
        // independent and the listener keeps going.
        server.on('error', () => {});
        const addr = server.address() as net.AddressInfo;
        this.url = formatPeerAddress(addr.address, addr.port);
        resolve(this.url);
      });
    });
  }

  /** tdp://host:port once listening. */
  get address(): string | null {
    return this.url;
  }

  /** Serves one already-connected stream (a socket, or a pipe end in tests). */
  handle(stream: Duplex, remote = 'stream', auth: PeerAuth = {}): ServerConnection | null {
    if (this.closed) {
      stream.destroy();
      return null;
    }
    if (stream instanceof net.Socket) stream.setNoDelay(true);
    const conn = new ServerConnection(this, this.service, this.settings, stream, auth.name ? `${remote} ${auth.name}` : remote, auth);
    this.conns.add(conn);
    this.sweeper ??= setInterval(() => {
      const now = Date.now();
      for (const c of this.conns) c.check(now);
    }, sweepInterval(this.settings.stallTimeoutMs)).unref();
    return conn;
  }

  /**
   * A plaintext socket just accepted, not yet read from: read with `onread` (core/direct-socket.ts),
   * its reads landing where the connection's frame decoder says (a PUT's payload straight in its
   * pooled buffer), with no buffer allocated per read.
   */
  private handleAccepted(socket: net.Socket, remote: string): void {
    let conn: ServerConnection | null = null;
    // net asks for the first target while the socket is being made, before the connection
    // exists: that first read (the HELLO, small) lands here and is passed on as a chunk.
    const first = Buffer.allocUnsafe(HANDSHAKE_FIRST_READ);
    const own = this.closed
      ? undefined
      : directSocket(socket, {
          buffer: () => (conn === null ? first : conn.readTarget()),
          callback: (n, buf) => {
            if (buf === first) conn?.onRead(first.subarray(0, n), -1);
            else conn?.onRead(buf, n);
            return true;
          },
        });
    if (!own) {
      this.handle(socket, remote);
      socket.resume();
      return;
    }
    conn = this.handle(own, remote);
    this.counters.directReads++;
  }

  /** @internal */
  connectionClosed(conn: ServerConnection, bytesIn: number, bytesOut: number): void {
    if (this.conns.delete(conn)) {
      this.counters.bytesIn += bytesIn;
      this.counters.bytesOut += bytesOut;
    }
    if (this.conns.size === 0 && this.sweeper) {
      clearInterval(this.sweeper);
      this.sweeper = null;
    }
  }

  /** @internal */
  reportError(err: TorusError, remote: string): void {
    try {
      this.onConnectionError?.(err, remote);
    } catch {
      // a logging hook must not take the server down
    }
  }

  stats(): RpcServerStats {
    let inFlight = 0;
    let queued = 0;
    let buffered = 0;
    let bytesIn = this.counters.bytesIn;
    let bytesOut = this.counters.bytesOut;
    for (const c of this.conns) {
      inFlight += c.inFlight;
      queued += c.queuedWriteBytes;
      buffered += c.bufferedReadBytes;
      bytesIn += c.bytesIn;
      bytesOut += c.bytesOut;
    }
    const { throttled, ...counters } = this.counters;
    return {
      connections: this.conns.size,
      inFlight,
      queuedWriteBytes: queued,
      bufferedReadBytes: buffered,
      ...counters,
      throttled: { ...throttled },
      bytesIn,
      bytesOut,
      heldBytes: this.budget.used,
      peakHeldBytes: this.budget.peak,
      pool: poolStats(this.pool),
      replyPool: poolStats(this.replyPool),
    };
  }

  /** Stops listening and drops every connection; replies still being computed are discarded. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const server = this.server;
    this.server = null;
    const closing = [...this.conns].map((c) => c.destroy());
    for (const raw of this.handshaking) raw.destroy();
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
    await Promise.all(closing);
  }
}

type ConnState = 'hello' | 'ready' | 'closing';

export class ServerConnection {
  private state: ConnState = 'hello';
  private readonly decoder = new FrameDecoder({ maxFrameSize: HANDSHAKE_MAX_FRAME_SIZE, pooledBody: (op, length) => this.pooledBody(op, length) });
  private readonly writer: FrameWriter;
  inFlight = 0;
  bytesIn = 0;
  private inFlightBytes = 0;
  private paused = false;
  private pumping = false;
  /** Largest frame the client accepts; replies that would not fit become errors. */
  private peerMaxFrame = MIN_MAX_FRAME_SIZE;
  private lastActivity = Date.now();
  private timer: NodeJS.Timeout | null = null;
  private readonly closedPromise: Promise<void>;
  private readonly budget: BudgetHolder;
  /** The frame being received was admitted: its whole size counts, before all of it is here. */
  private admitted = false;
  private readonly stall = new StallWatch();
  /** The limit that stopped reading, counted once per stop. */
  private throttledBy: RpcThrottle | null = null;

  constructor(
    private readonly server: RpcServer,
    private readonly service: BlockService,
    private readonly s: Settings,
    private readonly stream: Duplex,
    private readonly remote: string,
    private readonly auth: PeerAuth,
  ) {
    this.writer = new FrameWriter(stream, { maxQueuedBytes: s.maxQueuedWriteBytes, onWritable: () => this.pump() });
    this.closedPromise = new Promise((resolve) => stream.once('close', resolve));
    this.budget = server.budget.join();
    stream.on('data', (chunk: Buffer) => this.onData(chunk));
    stream.on('end', () => this.onEnd());
    stream.on('error', () => {
      // ECONNRESET and friends: the 'close' that follows does the cleanup.
    });
    stream.once('close', () => this.onClose());
    this.armTimer(s.handshakeTimeoutMs);
  }

  get queuedWriteBytes(): number {
    return this.writer.queuedBytes;
  }

  get bufferedReadBytes(): number {
    return this.decoder.bufferedBytes;
  }

  get bytesOut(): number {
    return this.writer.bytesOut;
  }

  destroy(): Promise<void> {
    this.stream.destroy();
    return this.closedPromise;
  }

  private onData(chunk: Buffer): void {
    this.onRead(chunk, -1);
  }

  /** @internal Where the next read of an `onread` socket should land. */
  readTarget(): Buffer {
    return this.decoder.readTarget();
  }

  /** @internal `n` >= 0: `buf` is the last readTarget() and got n bytes; -1: `buf` is a chunk. */
  onRead(buf: Buffer, n: number): void {
    if (this.state === 'closing') return;
    this.lastActivity = Date.now();
    this.bytesIn += n < 0 ? buf.length : n;
    try {
      if (n < 0) this.decoder.push(buf);
      else this.decoder.commitRead(buf, n);
    } catch (err) {
      this.protocolError(toTorusError(err, 'PROTOCOL'));
      return;
    }
    this.pump();
  }

  /**
   * Pooled memory for a PUT_BATCH or APPEND body, whose bytes go to the store as they are: only
   * past the handshake, and only for a frame the shared budget admits (checked here, before a
   * byte of it is held, as blockedBy() would).
   */
  private pooledBody(op: number, length: number): BufferLease | null {
    if (this.state !== 'ready' || (op !== Op.PutBatch && op !== Op.Append)) return null;
    if (!this.budget.mayTake(this.admissionCost())) return null;
    this.admitted = true;
    return this.server.pool.take(length);
  }

  private onEnd(): void {
    // The client will send nothing more; finish what is in flight, then close our side.
    if (this.inFlight === 0) this.finish();
  }

  private finish(): void {
    if (this.stream.writableEnded) return;
    // Replies gathered for this tick go out before the FIN, not never.
    this.writer.flush();
    this.stream.end();
  }

  private onClose(): void {
    this.state = 'closing';
    this.clearTimer();
    this.writer.discard();
    this.decoder.dispose();
    this.budget.leave();
    this.server.connectionClosed(this, this.bytesIn, this.writer.bytesOut);
  }

  /** What this connection holds: frames received (an admitted one whole), payloads in flight, replies unsent. */
  private held(): number {
    const d = this.decoder;
    const frames = this.admitted ? Math.max(d.heldBytes, d.pendingFrameSize) : d.heldBytes;
    return frames + this.inFlightBytes + this.writer.queuedBytes;
  }

  private account(): void {
    this.budget.set(this.state === 'closing' ? 0 : this.held());
  }

  /** Bytes the frame whose header is in will add: the rest of its body, and what serving it holds. */
  private admissionCost(): number {
    const d = this.decoder;
    const body = d.pendingFrameSize - HEADER_SIZE;
    let serving = 0;
    if (d.pendingOp === Op.Get) serving = this.service.blockSize;
    else if (d.pendingOp === Op.HasBatch || d.pendingOp === Op.DeleteBatch) serving = REFS_MEMORY_FACTOR * body;
    return Math.max(0, d.pendingFrameSize - d.bufferedBytes) + serving;
  }

  private blockedBy(): RpcThrottle | null {
    if (this.inFlight >= this.s.maxInFlight) return 'requests';
    if (this.inFlight > 0 && this.inFlightBytes >= this.s.maxInFlightBytes) return 'bytes';
    if (this.writer.needDrain) return 'replies';
    // A frame is admitted from its header (past the handshake, whose frames are small), before
    // its body costs anything; one the shared budget has no room for waits, its sender paused.
    if (!this.admitted && this.state === 'ready' && this.decoder.pendingOp !== null) {
      if (!this.budget.mayTake(this.admissionCost())) return 'budget';
      this.admitted = true;
    }
    return null;
  }

  private throttle(why: RpcThrottle): void {
    if (this.throttledBy !== why) {
      this.throttledBy = why;
      this.server.counters.throttled[why]++;
      if (why === 'budget') {
        const b = this.server.budget;
        this.server.limitHit('budget', { remote: this.remote, usedBytes: b.used, limitBytes: b.limit, connections: b.holders });
      }
    }
    if (why === 'budget') this.budget.waitForRoom(() => this.pump());
  }

  /** Called every few hundred milliseconds: drops a client that stalls its connection. */
  check(now: number): void {
    if (this.state !== 'ready') return;
    const w = this.writer;
    const why = this.stall.check(now, this.s.stallTimeoutMs, w.queuedBytes, w.bytesOut - this.stream.writableLength);
    if (why === undefined) return this.account();
    this.server.counters.stallTimeouts++;
    this.server.limitHit('stall', { remote: this.remote, why, ms: this.s.stallTimeoutMs });
    this.stream.destroy();
  }

  /** Starts every complete request the limits allow; pauses or resumes reading accordingly. */
  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.state !== 'closing') {
        this.account();
        const why = this.blockedBy();
        if (why !== null) {
          this.throttle(why);
          if (!this.paused) {
            this.paused = true;
            this.stream.pause();
          }
          return;
        }
        let m: Message | null;
        try {
          m = this.decoder.next();
        } catch (err) {
          this.protocolError(toTorusError(err, 'PROTOCOL'));
          return;
        }
        if (m === null) {
          if (this.admitted) this.stall.messageStarted();
          break;
        }
        this.admitted = false;
        this.throttledBy = null;
        this.stall.messageDone();
        this.dispatch(m);
      }
      if (this.paused && this.state !== 'closing') {
        this.paused = false;
        this.stream.resume();
      }
      if (this.inFlight === 0 && this.stream.readableEnded) this.finish();
    } finally {
      this.pumping = false;
      this.account();
    }
  }

  private dispatch(m: Message): void {
    this.server.counters.requests++;
    if (this.state === 'hello') {
      if ('lease' in m) m.lease?.release();
      if (m.op !== Op.Hello) this.protocolError(new TorusError('PROTOCOL', `expected HELLO, got ${opName(m.op)}`));
      else this.hello(m);
      return;
    }
    switch (m.op) {
      case Op.Get:
        return this.get(m);
      case Op.PutBatch:
        return this.putBatch(m);
      case Op.HasBatch:
        return this.hasBatch(m);
      case Op.DeleteBatch:
        return this.deleteBatch(m);
      case Op.Append:
        return this.append(m);
      case Op.Seal:
        return this.seal(m);
      case Op.Fence:
        return this.fence(m);
      case Op.Flush:
        this.begin(0);
        invoke(() => this.service.flush()).then(
          () => this.reply(encodeEmpty(Op.Ok, m.id), 0),
          (err: unknown) => this.fail(m.id, err, 0),
        );
        return;
      case Op.Ping:
        this.writer.write(encodeEmpty(Op.Pong, m.id));
        return;
      default:
        this.protocolError(new TorusError('PROTOCOL', `${opName(m.op)} is not a request`));
    }
  }

  private hello(m: HelloMessage): void {
    const v = this.s.versions;
    const sec = this.server.security;
    const critical = m.extensions.find((e) => (e.type & EXT_CRITICAL) !== 0 && !(e.type === EXT_AUTH_HMAC && sec.mode === 'secret'));
    const lo = Math.max(v.min, m.minVersion);
    const hi = Math.min(v.max, m.maxVersion);
    // Checked first, and the refusal says nothing else: a stranger learns neither our versions
    // nor who we are.
    const proofReply =
      sec.mode === 'secret' && this.auth.ekm ? verifyClientProof(sec, this.auth.ekm, m.extensions.find((e) => e.type === EXT_AUTH_HMAC)?.value) : null;
    let refusal: TorusError | null = null;
    if (sec.mode === 'secret' && !proofReply) refusal = new TorusError('PERMISSION_DENIED', 'peer did not prove it holds the cluster secret');
    else if (lo > hi)
      refusal = new TorusError(
        'PROTOCOL',
        `protocol version mismatch: peer ${m.uuid} speaks versions ${m.minVersion}..${m.maxVersion}, node ${this.server.identity.uuid} speaks ${v.min}..${v.max}`,
      );
    else if (m.clusterId !== this.server.identity.clusterId)
      // The cluster id is no credential, but it is not told to whoever asks either.
      refusal = new TorusError('WRONG_CLUSTER', `peer ${m.uuid} belongs to another cluster than node ${this.server.identity.uuid}`);
    else if (critical)
      refusal = new TorusError('PROTOCOL', `peer requires handshake extension 0x${critical.type.toString(16)}, which this node does not support`);
    if (refusal) {
      this.server.counters.refusedHandshakes++;
      this.server.reportError(refusal, this.remote);
      this.writer.write(encodeError(m.id, refusal.code, refusal.message));
      this.shutdown();
      return;
    }
    this.state = 'ready';
    this.peerMaxFrame = m.maxFrameSize;
    this.decoder.maxFrameSize = this.s.maxFrameSize;
    this.writer.write(
      encodeHelloOk(m.id, {
        version: hi,
        maxFrameSize: this.s.maxFrameSize,
        maxInFlight: this.s.maxInFlight,
        blockSize: this.service.blockSize,
        uuid: this.server.identity.uuid,
        clusterId: this.server.identity.clusterId,
        extensions: [
          { type: EXT_SOFTWARE, value: Buffer.from(this.s.software) },
          { type: EXT_INSTANCE, value: this.server.instance },
          ...(this.service.readSectors ? [{ type: EXT_CHECKSUMS, value: Buffer.alloc(0) }] : []),
          ...(this.journal() ? [{ type: EXT_JOURNAL, value: Buffer.alloc(0) }] : []),
          ...(proofReply ? [{ type: EXT_AUTH_HMAC, value: proofReply }] : []),
        ],
      }),
    );
    this.armTimer(this.s.idleTimeoutMs);
  }

  private begin(bytes: number): void {
    this.inFlight++;
    this.inFlightBytes += bytes;
    const c = this.server.counters;
    if (this.inFlight > c.peakInFlight) c.peakInFlight = this.inFlight;
  }

  private done(bytes: number): void {
    this.inFlight--;
    this.inFlightBytes -= bytes;
    const q = this.writer.queuedBytes;
    const c = this.server.counters;
    if (q > c.peakQueuedWriteBytes) c.peakQueuedWriteBytes = q;
    this.pump();
  }

  private reply(frame: Buffer, bytes: number): void {
    if (this.state !== 'closing') this.writer.write(frame);
    this.done(bytes);
  }

  private fail(id: number, err: unknown, bytes: number): void {
    if (this.state !== 'closing') this.writer.write(encodeError(id, codeOf(err), messageOf(err)));
    this.done(bytes);
  }

  private get(m: GetMessage): void {
    const bs = this.service.blockSize;
    const whole = m.offset === 0 && m.length === 0;
    const size = whole ? bs : m.length;
    if (!whole && (m.length === 0 || m.offset + m.length > bs)) {
      this.writer.write(encodeError(m.id, 'INVALID_ARGUMENT', `range ${m.offset}+${m.length} is outside a ${bs}-byte block`));
      return;
    }
    if (size + HEADER_SIZE > this.peerMaxFrame) {
      this.writer.write(encodeError(m.id, 'INVALID_ARGUMENT', `a ${size}-byte reply exceeds the peer's frame limit ${this.peerMaxFrame}`));
      return;
    }
    this.begin(size);
    if (m.raw) {
      const j = this.journal();
      if (!j || !whole) return this.fail(m.id, new TorusError('INVALID_ARGUMENT', j ? 'a raw GET reads the whole block (offset and length 0)' : 'this node keeps no journals'), size);
      invoke(() => j.readRaw(m.ref)).then(
        (data) => {
          if (this.state === 'closing') return this.done(size);
          this.writer.writeAll(encodeData(m.id, data));
          this.done(size);
        },
        (err: unknown) => this.fail(m.id, err, size),
      );
      return;
    }
    if (m.sums) {
      // Whole sectors and the block's checksums: the client checks them against the writer's CRC.
      // A store that reads into memory it is given fills a pooled buffer, which goes back once
      // the socket is done with it.
      const service = this.service;
      const sector = service.sectorSize ?? 0;
      let read: () => Promise<SectorRead | undefined>;
      let lease: BufferLease | undefined;
      if (service.readSectorsInto && sector > 0) {
        const from = Math.floor((whole ? 0 : m.offset) / sector) * sector;
        const to = whole ? bs : Math.min(Math.ceil((m.offset + m.length) / sector) * sector, bs);
        const into = (lease = this.server.replyPool.take(to - from)).buffer;
        read = () => service.readSectorsInto!(m.ref, from, into);
      } else if (service.readSectors) {
        read = () => service.readSectors!(m.ref, m.offset, size);
      } else {
        return this.fail(m.id, new TorusError('INVALID_ARGUMENT', 'this node does not serve sector checksums (it did not announce EXT_CHECKSUMS)'), size);
      }
      const release = lease && (() => lease.release());
      invoke(read).then(
        (r) => {
          const frame = r ? HEADER_SIZE + 12 + r.sums.length + r.data.length : 0;
          if (this.state === 'closing' || !r || frame > this.peerMaxFrame) {
            release?.();
            if (this.state === 'closing') return this.done(size);
            if (!r) return this.fail(m.id, new TorusError('BLOCK_UNAVAILABLE', `block ${formatBlockRef(m.ref)} is not on this node`), size);
            return this.fail(m.id, new TorusError('INVALID_ARGUMENT', `a ${frame}-byte reply exceeds the peer's frame limit ${this.peerMaxFrame}`), size);
          }
          const [head, data] = encodeDataSums(m.id, r, r.data);
          this.writer.write(head!);
          this.writer.write(data!, release);
          this.done(size);
        },
        (err: unknown) => {
          release?.();
          this.fail(m.id, err, size);
        },
      );
      return;
    }
    const p = whole ? invoke(() => this.service.getBlock(m.ref)) : invoke(() => this.service.readRange(m.ref, m.offset, m.length));
    p.then(
      (data) => {
        if (this.state === 'closing') return this.done(size);
        if (data.length + HEADER_SIZE > this.peerMaxFrame || (!whole && data.length !== m.length)) {
          return this.fail(m.id, new TorusError('INTERNAL', `block service returned ${data.length} bytes for a ${size}-byte read`), size);
        }
        this.writer.writeAll(encodeData(m.id, data));
        this.done(size);
      },
      (err: unknown) => this.fail(m.id, err, size),
    );
  }

  private journal(): JournalService | undefined {
    return journalService(this.service);
  }

  private append(m: AppendMessage): void {
    let bytes = 0;
    for (const p of m.pieces) bytes += p.data.length;
    this.begin(bytes);
    const j = this.journal();
    if (!j) {
      m.lease?.release();
      return this.fail(m.id, new TorusError('INVALID_ARGUMENT', 'this node keeps no journals'), bytes);
    }
    invoke(() => appendJournal(j, m.ref, m.pieces, m.sync, () => m.lease?.release())).then(
      () => this.reply(encodeEmpty(Op.Ok, m.id), bytes),
      (err: unknown) => this.fail(m.id, err, bytes),
    );
  }

  private seal(m: SealMessage): void {
    this.begin(0);
    const j = this.journal();
    if (!j) return this.fail(m.id, new TorusError('INVALID_ARGUMENT', 'this node keeps no journals'), 0);
    invoke(() => sealJournal(j, m.ref, m.gapStart, m.gapEnd, m.crc, m.sync)).then(
      () => this.reply(encodeEmpty(Op.Ok, m.id), 0),
      (err: unknown) => this.fail(m.id, err, 0),
    );
  }

  private fence(m: FenceMessage): void {
    this.begin(0);
    const j = this.journal();
    if (!j) return this.fail(m.id, new TorusError('INVALID_ARGUMENT', 'this node keeps no journals'), 0);
    invoke(() => j.fenceVolume(m.volume, m.epoch)).then(
      (open) => this.reply(encodeFenceResult(m.id, open), 0),
      (err: unknown) => this.fail(m.id, err, 0),
    );
  }

  private putBatch(m: PutBatchMessage): void {
    let bytes = 0;
    for (const it of m.items) bytes += it.data.length;
    this.begin(bytes);
    storeBlocks(this.service, m.items)
      .finally(() => m.lease?.release())
      .then(async (statuses) => {
        // A SYNC batch is acknowledged only once durable: flush errors fail the whole frame.
        if (m.sync && statuses.some((s) => s === null)) await this.service.flush();
        return statuses;
      })
      .then(
        (statuses) => this.reply(encodePutResult(m.id, statuses), bytes),
        (err: unknown) => this.fail(m.id, err, bytes),
      );
  }

  private hasBatch(m: RefsMessage): void {
    let answers: (boolean | Promise<boolean>)[];
    try {
      answers = m.refs.map((r) => this.service.hasBlock(r));
    } catch (err) {
      this.writer.write(encodeError(m.id, codeOf(err), messageOf(err)));
      return;
    }
    if (!answers.some((a) => typeof a !== 'boolean')) {
      // The common case (an in-memory index) answers without a turn of the event loop.
      this.writer.write(encodeHasResult(m.id, answers as boolean[]));
      return;
    }
    const bytes = REFS_MEMORY_FACTOR * BLOCK_REF_SIZE * m.refs.length;
    this.begin(bytes);
    Promise.all(answers).then(
      (has) => this.reply(encodeHasResult(m.id, has), bytes),
      (err: unknown) => this.fail(m.id, err, bytes),
    );
  }

  private deleteBatch(m: RefsMessage): void {
    const bytes = REFS_MEMORY_FACTOR * BLOCK_REF_SIZE * m.refs.length;
    this.begin(bytes);
    // Not all at once: a frame may hold 700,000 refs, and each delete holds a promise and its I/O.
    void settleEach(m.refs, DELETE_CONCURRENCY, (r) => invoke(() => this.service.deleteBlock(r))).then((results) => {
      const bad = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (bad) this.fail(m.id, bad.reason, bytes);
      else this.reply(encodeEmpty(Op.Ok, m.id), bytes);
    });
  }

  private protocolError(err: TorusError): void {
    if (this.state === 'closing') return;
    this.server.counters.protocolErrors++;
    this.server.reportError(err, this.remote);
    this.writer.write(encodeError(0, 'PROTOCOL', err.message));
    this.shutdown();
  }

  /**
   * Sends what is queued (the ERROR telling the client why), then closes. The socket is
   * still read and discarded meanwhile: closing with unread input makes the kernel send a
   * reset, which can destroy the ERROR before the client reads it.
   */
  private shutdown(): void {
    this.state = 'closing';
    this.clearTimer();
    this.stream.removeAllListeners('data');
    this.stream.on('data', () => {});
    this.stream.resume();
    this.writer.flush();
    this.stream.end();
    const t = setTimeout(() => this.stream.destroy(), 2000);
    t.unref();
    this.stream.once('close', () => clearTimeout(t));
  }

  private armTimer(ms: number): void {
    this.clearTimer();
    if (ms <= 0) return;
    this.timer = setTimeout(() => this.onTimer(ms), ms);
    this.timer.unref();
  }

  private clearTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  private onTimer(ms: number): void {
    this.timer = null;
    if (this.state === 'closing') return;
    if (this.state === 'hello') {
      this.server.reportError(new TorusError('TIMEOUT', `no HELLO within ${ms} ms`), this.remote);
      this.writer.write(encodeError(0, 'TIMEOUT', `no HELLO within ${ms} ms`));
      this.shutdown();
      return;
    }
    const limit = this.s.idleTimeoutMs;
    const idle = Date.now() - this.lastActivity;
    if (idle >= limit && this.inFlight === 0) {
      // Quietly: the client sees a clean end with nothing pending and reconnects on demand.
      this.server.counters.idleTimeouts++;
      this.shutdown();
      return;
    }
    this.armTimer(Math.max(1, limit - idle));
  }
}
