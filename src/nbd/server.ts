import { existsSync } from 'node:fs';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { ByteBudget, type BudgetHolder } from '../core/budget.js';
import { BufferPool } from '../core/buffer-pool.js';
import { directSocket } from '../core/direct-socket.js';
import { toTorusError, TorusError } from '../core/errors.js';
import { LogThrottle, StallWatch, capConnections, sweepInterval } from '../core/limits.js';
import type { BlockDevice, DeviceInfo, DeviceProvider, Extent } from '../core/interfaces.js';
import {
  ClientStreamDecoder,
  Cmd,
  CmdFlag,
  DEFAULT_MAX_OPTION_LENGTH,
  DEFAULT_MAX_PAYLOAD,
  Errno,
  REQUEST_HEADER_SIZE,
  State,
  commandName,
  encodeBlockStatus,
  encodeErrorChunk,
  encodeNoneChunk,
  encodeOffsetData,
  encodeOffsetHole,
  encodeSimpleReply,
  type ReplyData,
  replyDataLength,
  errnoName,
  type BlockDescriptor,
  type ClientMessage,
  type Request,
  type RequestHeader,
} from './codec.js';
import { nbdErrno } from './errors.js';
import {
  ALLOCATION_CONTEXT_ID,
  Negotiation,
  caCertificates,
  messageOf,
  secureContext,
  type Agreed,
  type NbdAccess,
  type NbdLogger,
  type NbdTlsOptions,
  type NegotiationLink,
  type NegotiationSettings,
  type OpenExport,
} from './negotiation.js';

export {
  blockSizeConstraints,
  clientCertificateProblem,
  transmissionFlags,
  type NbdAccess,
  type NbdLogger,
  type NbdTlsOptions,
} from './negotiation.js';

// An NBD server (fixed newstyle, structured replies, base:allocation) for any DeviceProvider.
// docs/protocols/nbd.md is the user-facing description; the reasons live here.
//
// Per connection: requests are started as soon as they are decoded and answered as they finish,
// in any order (proto.md allows it and clients like nbdcopy and qemu keep many in flight). Flow
// control is explicit (STYLE habit 3): past `maxInFlight` requests, `maxInFlightBytes` of
// payload, or `maxQueuedWriteBytes` of replies the client has not read, the socket is paused,
// so TCP pushes back on the client instead of this process buffering without bound; it
// resumes when a request finishes or the socket drains.
//
// Bounded memory, whatever the clients do: every command has a cost in bytes (its payload, its
// reply, or what the device holds for it), decided from the 28-byte header before the request
// starts or its payload is read. All connections share one budget (`maxBufferedBytes`, see
// core/budget.ts: past it each connection still gets a fair share, so clients that filled it
// cannot stall the rest), listeners take at most `maxConnections` each, and a client that
// leaves a request half-sent or stops reading its replies for `stallTimeoutMs` is dropped.
//
// Multi-conn: the server keeps no data of its own between requests (no write cache, no read
// cache), so what one connection sees is exactly what the device holds. Together with the
// DeviceProvider contract (every connection of an export gets the same BlockDevice, whose
// flush() covers every write completed on it) a FLUSH or FUA on one connection covers writes
// completed on all of them, which is what NBD_FLAG_CAN_MULTI_CONN promises.

const silent: NbdLogger = { debug: () => {}, info: () => {}, warn: () => {} };

export interface NbdServerOptions {
  /** Serve every export read-only, whatever the provider allows. */
  readonly readOnly?: boolean;
  readonly listenTcp?: { readonly host: string; readonly port: number };
  readonly listenUnix?: string;
  /** Requests worked on at once per connection; past it the socket is not read. Default 64. */
  readonly maxInFlight?: number;
  /** WRITE payload plus READ length held per connection before reading stops. Default 128 MiB. */
  readonly maxInFlightBytes?: number;
  /** Reply bytes waiting for the client to read before reading stops. Default 8 MiB. */
  readonly maxQueuedWriteBytes?: number;
  /** A connection still negotiating after this long is dropped. Default 10 s. */
  readonly handshakeTimeoutMs?: number;
  /** Connections each listener accepts at once; more are closed at once. Default 512. */
  readonly maxConnections?: number;
  /**
   * Request, payload and reply bytes held for all connections together (see core/budget.ts).
   * Default 256 MiB.
   */
  readonly maxBufferedBytes?: number;
  /**
   * A connection in transmission with nothing in flight and nothing sent for this long is
   * closed; 0 (the default) never. Kernel NBD keeps an idle connection for as long as the device
   * is attached, and fails I/O once it is gone.
   */
  readonly idleTimeoutMs?: number;
  /**
   * A client that leaves a request's payload unfinished, or has replies waiting that it does not
   * read, for this long is dropped. Default 60 s.
   */
  readonly stallTimeoutMs?: number;
  /** Options accepted in one handshake before the client is deemed hostile. Default 1024. */
  readonly maxOptions?: number;
  /** Largest READ/WRITE/CACHE length (the advertised maximum block size). Default 32 MiB. */
  readonly maxPayload?: number;
  readonly maxOptionLength?: number;
  /** Advertise NBD_FLAG_CAN_MULTI_CONN; only true if the provider shares one device per export. */
  readonly multiConn?: boolean;
  readonly log?: NbdLogger;
  /** Text for NBD_INFO_DESCRIPTION; by default a device's own `description` string if it has one. */
  readonly describe?: (name: string, device: BlockDevice | DeviceInfo) => string | undefined;
  /** NBD_OPT_STARTTLS; without it the server runs in proto.md's NOTLS mode. */
  readonly tls?: NbdTlsOptions;
  /** Who may open which export; without it every client may open every export. */
  readonly access?: NbdAccess;
}

export interface NbdServerStats {
  readonly connections: number;
  readonly handshakes: number;
  readonly requests: number;
  readonly protocolErrors: number;
  readonly peakInFlight: number;
  readonly inFlight: number;
  /** Request, payload and reply bytes held now, for all connections; and the most held. */
  readonly bufferedBytes: number;
  readonly peakBufferedBytes: number;
  /** The budget they share (`maxBufferedBytes`). */
  readonly bufferedLimit: number;
  /** Connections closed on arrival because a listener had `maxConnections`. */
  readonly refusedConnections: number;
  /** Requests refused before reaching the device for a length over the maximum. */
  readonly oversizedRequests: number;
  /** Times a connection stopped being read, by the limit that stopped it. */
  readonly throttled: Readonly<Record<ThrottleReason, number>>;
  readonly idleTimeouts: number;
  readonly stallTimeouts: number;
  /** Connections read with `onread` (plaintext ones accepted by a listener), not as streams. */
  readonly directReads: number;
  /** Bytes read from clients. */
  readonly bytesReceived: number;
  /** Reply buffers kept idle for reuse (at most 8 MiB), and those held by replies now. */
  readonly replyBuffersIdleBytes: number;
  readonly replyBuffersOutstanding: number;
}

/** Why a connection is not read: requests in flight, their bytes, unread replies, the shared budget. */
export type ThrottleReason = 'requests' | 'bytes' | 'replies' | 'budget';

export interface NbdListenAddresses {
  readonly tcp?: { readonly host: string; readonly port: number };
  readonly unix?: string;
}

export const NBD_SERVER_DEFAULTS = {
  maxInFlight: 64,
  maxInFlightBytes: 128 * 1024 * 1024,
  maxQueuedWriteBytes: 8 * 1024 * 1024,
  handshakeTimeoutMs: 10_000,
  maxOptions: 1024,
  multiConn: true,
  maxConnections: 512,
  maxBufferedBytes: 256 * 1024 * 1024,
  idleTimeoutMs: 0,
  stallTimeoutMs: 60_000,
} as const;

/** Structured READs at least this long ask the device for holes and send them as OFFSET_HOLE. */
const SPARSE_READ_MIN = 64 * 1024;
/** A BLOCK_STATUS reply carries at most this many descriptors (512 KiB); proto.md allows fewer. */
const MAX_DESCRIPTORS = 64 * 1024;
/** CACHE warms the device in pieces this big, so a large hint never holds one huge buffer. */
const CACHE_PIECE = 4 * 1024 * 1024;

/**
 * Reply buffers kept idle for reuse, for all connections together: eight 1 MiB reads in flight.
 * A device that can read into the caller's memory (readInto) fills one of these, and it goes
 * back once the socket has taken the reply: no buffer per read, so no page faults and none of the
 * garbage collections a stream of fresh buffers sets off.
 */
const IDLE_REPLY_BYTES = 8 * 1024 * 1024;
/** Reply buffers come in powers of two from here, so that reads of nearby sizes share them. */
const MIN_REPLY_CLASS = 4096;
/** A plaintext connection's read buffer for everything but WRITE payloads (see NbdServer.accept). */
const READ_BUFFER = 64 * 1024;

interface Settings extends NegotiationSettings {
  readonly maxInFlight: number;
  readonly maxInFlightBytes: number;
  readonly maxQueuedWriteBytes: number;
  readonly handshakeTimeoutMs: number;
  readonly idleTimeoutMs: number;
  readonly stallTimeoutMs: number;
}

function defaultDescribe(_name: string, device: BlockDevice | DeviceInfo): string | undefined {
  const d = (device as { description?: unknown }).description;
  return typeof d === 'string' && d !== '' ? d : undefined;
}

export class NbdServer {
  private readonly provider: DeviceProvider;
  private readonly settings: Settings;
  private readonly options: NbdServerOptions;
  private readonly conns = new Set<Connection>();
  private readonly listeners: net.Server[] = [];
  private closing = false;
  private sweeper: NodeJS.Timeout | null = null;
  private readonly sweepMs: number;
  private readonly maxConnections: number;
  /** Shared with connections. */
  readonly budget: ByteBudget;
  /** Reply buffers for devices with readInto, shared with connections. */
  readonly replyBuffers = new BufferPool(IDLE_REPLY_BYTES);
  readonly logThrottle = new LogThrottle();
  /** Mutable counters shared with connections. */
  readonly counters = {
    handshakes: 0,
    requests: 0,
    protocolErrors: 0,
    peakInFlight: 0,
    refusedConnections: 0,
    oversizedRequests: 0,
    idleTimeouts: 0,
    stallTimeouts: 0,
    directReads: 0,
    bytesReceived: 0,
    throttled: { requests: 0, bytes: 0, replies: 0, budget: 0 } satisfies Record<ThrottleReason, number>,
  };

  constructor(provider: DeviceProvider, options: NbdServerOptions = {}) {
    this.provider = provider;
    this.options = options;
    const maxPayload = options.maxPayload ?? DEFAULT_MAX_PAYLOAD;
    if (!Number.isInteger(maxPayload) || maxPayload < 4096 || maxPayload > 0xffffffff - 64)
      throw new TorusError('INVALID_ARGUMENT', `maxPayload ${maxPayload} must be between 4096 and 2^32 - 64`);
    this.settings = {
      readOnly: options.readOnly ?? false,
      maxInFlight: Math.max(1, options.maxInFlight ?? NBD_SERVER_DEFAULTS.maxInFlight),
      maxInFlightBytes: options.maxInFlightBytes ?? NBD_SERVER_DEFAULTS.maxInFlightBytes,
      maxQueuedWriteBytes: options.maxQueuedWriteBytes ?? NBD_SERVER_DEFAULTS.maxQueuedWriteBytes,
      handshakeTimeoutMs: options.handshakeTimeoutMs ?? NBD_SERVER_DEFAULTS.handshakeTimeoutMs,
      idleTimeoutMs: options.idleTimeoutMs ?? NBD_SERVER_DEFAULTS.idleTimeoutMs,
      stallTimeoutMs: options.stallTimeoutMs ?? NBD_SERVER_DEFAULTS.stallTimeoutMs,
      maxOptions: options.maxOptions ?? NBD_SERVER_DEFAULTS.maxOptions,
      maxPayload,
      maxOptionLength: options.maxOptionLength ?? DEFAULT_MAX_OPTION_LENGTH,
      multiConn: options.multiConn ?? NBD_SERVER_DEFAULTS.multiConn,
      log: options.log ?? silent,
      describe: options.describe ?? defaultDescribe,
      tls: options.tls ? { ...options.tls, context: secureContext(options.tls), caCerts: caCertificates(options.tls.ca) } : undefined,
      access: options.access,
    };
    this.maxConnections = options.maxConnections ?? NBD_SERVER_DEFAULTS.maxConnections;
    const budget = options.maxBufferedBytes ?? NBD_SERVER_DEFAULTS.maxBufferedBytes;
    if (!(budget >= maxPayload)) throw new TorusError('INVALID_ARGUMENT', `maxBufferedBytes ${budget} must be at least the ${maxPayload}-byte maximum payload`);
    this.budget = new ByteBudget(budget);
    this.sweepMs = sweepInterval(this.settings.idleTimeoutMs, this.settings.stallTimeoutMs);
  }

  /** Logs a line about a limit at most once per ten seconds per kind, with how many were held back. */
  limitLog(kind: string, obj: object, msg: string): void {
    const held = this.logThrottle.take(kind);
    if (held !== undefined) this.settings.log.warn(held > 0 ? { ...obj, alsoSince: held } : obj, msg);
  }

  /** Listens on what the options name (TCP and/or a unix socket); resolves to the bound addresses. */
  async listen(): Promise<NbdListenAddresses> {
    if (this.closing) throw new TorusError('CLOSED', 'server is closed');
    const { listenTcp, listenUnix } = this.options;
    if (!listenTcp && listenUnix === undefined) throw new TorusError('INVALID_ARGUMENT', 'nothing to listen on: give listenTcp and/or listenUnix');
    let tcp: { host: string; port: number } | undefined;
    if (listenTcp) {
      const s = await this.listenOn((srv, cb) => srv.listen(listenTcp.port, listenTcp.host, cb), `${listenTcp.host}:${listenTcp.port}`);
      const addr = s.address() as net.AddressInfo;
      tcp = { host: listenTcp.host, port: addr.port };
    }
    if (listenUnix !== undefined) {
      if (existsSync(listenUnix)) throw new TorusError('EXISTS', `${listenUnix} already exists; remove a stale socket first`);
      await this.listenOn((srv, cb) => srv.listen(listenUnix, cb), listenUnix);
    }
    return { ...(tcp ? { tcp } : {}), ...(listenUnix !== undefined ? { unix: listenUnix } : {}) };
  }

  private listenOn(start: (srv: net.Server, cb: () => void) => void, where: string): Promise<net.Server> {
    // STARTTLS hands the socket to a TLSSocket, which reads it as a stream: with TLS configured
    // every connection is read that way from the start.
    const direct = this.settings.tls === undefined;
    const srv = net.createServer({ allowHalfOpen: true, noDelay: true, pauseOnConnect: direct }, (socket) => {
      const remote = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort ?? '?'}` : where;
      if (direct) this.accept(socket, remote);
      else void this.handle(socket, remote);
    });
    capConnections(srv, this.maxConnections, (remote) => {
      this.counters.refusedConnections++;
      this.limitLog('maxConnections', { listener: where, remote, max: this.maxConnections }, 'nbd connection refused: the listener has its maximum of connections (--max-connections)');
    });
    return new Promise((resolve, reject) => {
      const onError = (err: Error): void => reject(new TorusError('IO', `cannot listen on ${where}: ${err.message}`, { cause: err }));
      srv.once('error', onError);
      start(srv, () => {
        srv.off('error', onError);
        srv.on('error', (err) => this.settings.log.warn({ err, where }, 'nbd listener error'));
        this.listeners.push(srv);
        resolve(srv);
      });
    });
  }

  /**
   * Serves one client over any Duplex (a socket, or testing.ts's in-process pipe). Resolves once
   * the connection is over and its device released; never rejects: whatever the client sends,
   * the worst outcome is that its own connection is dropped.
   */
  handle(stream: Duplex, remote = 'stream'): Promise<void> {
    return this.serve(stream, remote, null);
  }

  /**
   * A plaintext socket just accepted, not read yet: read with `onread` (core/direct-socket.ts), its
   * reads landing where the connection's decoder says: a WRITE's payload straight into the buffer
   * the device is given, everything else into one read buffer per connection. Read as a stream, it
   * cost a fresh 64 KiB allocation per read and a copy of every payload that spans reads.
   */
  private accept(socket: net.Socket, remote: string): void {
    const decoder = new ClientStreamDecoder({ maxOptionLength: this.settings.maxOptionLength, maxPayload: this.settings.maxPayload, readBuffer: READ_BUFFER });
    let conn: Connection | null = null;
    const own = this.closing
      ? undefined
      : directSocket(socket, {
          // asked for the first time while the socket is being made, before the connection exists
          buffer: () => decoder.readTarget(),
          callback: (n, buf) => conn?.onRead(buf, n) ?? true,
        });
    if (!own) {
      void this.handle(socket, remote);
      socket.resume();
      return;
    }
    this.counters.directReads++;
    void this.serve(own, remote, decoder, (c) => (conn = c));
  }

  private serve(stream: Duplex, remote: string, decoder: ClientStreamDecoder | null, made?: (c: Connection) => void): Promise<void> {
    if (this.closing) {
      stream.destroy();
      return Promise.resolve();
    }
    if (stream instanceof net.Socket) stream.setNoDelay(true);
    const conn = new Connection(this, this.provider, this.settings, stream, remote, decoder);
    made?.(conn);
    this.conns.add(conn);
    this.sweeper ??= setInterval(() => this.sweep(), this.sweepMs).unref();
    conn.start();
    return conn.done.then(() => {
      this.conns.delete(conn);
      if (this.conns.size === 0 && this.sweeper) {
        clearInterval(this.sweeper);
        this.sweeper = null;
      }
    });
  }

  private sweep(): void {
    const now = Date.now();
    for (const c of this.conns) c.check(now);
  }

  stats(): NbdServerStats {
    let inFlight = 0;
    for (const c of this.conns) inFlight += c.inFlight;
    const { throttled, ...counters } = this.counters;
    return {
      connections: this.conns.size,
      ...counters,
      throttled: { ...throttled },
      inFlight,
      bufferedBytes: this.budget.used,
      peakBufferedBytes: this.budget.peak,
      bufferedLimit: this.budget.limit,
      replyBuffersIdleBytes: this.replyBuffers.idleByteCount,
      replyBuffersOutstanding: this.replyBuffers.outstanding,
    };
  }

  /**
   * Stops listening, lets every connection finish the requests it is working on (proto.md: a
   * server shutting down should let in-flight requests finish), then closes them.
   */
  async close(): Promise<void> {
    this.closing = true;
    const closed = this.listeners.map((s) => new Promise<void>((r) => s.close(() => r())));
    this.listeners.length = 0;
    for (const c of this.conns) c.shutdown();
    await Promise.all([...closed, ...[...this.conns].map((c) => c.done)]);
  }
}

type Phase = 'handshake' | 'transmission' | 'closing' | 'closed';

/** A request that fails before reaching the device, with the errno proto.md asks for. */
class Refusal {
  constructor(
    readonly errno: Errno,
    readonly message: string,
  ) {}
}

const WRITE_COMMANDS: ReadonlySet<number> = new Set([Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES]);

const ALLOWED_FLAGS: Readonly<Record<number, number>> = {
  // FUA is valid on every command once advertised (proto.md), and harmless where nothing is written.
  [Cmd.READ]: CmdFlag.FUA | CmdFlag.DF,
  [Cmd.WRITE]: CmdFlag.FUA,
  [Cmd.FLUSH]: CmdFlag.FUA,
  [Cmd.TRIM]: CmdFlag.FUA,
  [Cmd.CACHE]: CmdFlag.FUA,
  [Cmd.WRITE_ZEROES]: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
  [Cmd.BLOCK_STATUS]: CmdFlag.FUA | CmdFlag.REQ_ONE,
};

class Connection implements NegotiationLink {
  readonly done: Promise<void>;
  inFlight = 0;
  private resolveDone!: () => void;
  private phase: Phase = 'handshake';
  private readonly decoder: ClientStreamDecoder;
  private readonly log: NbdLogger;
  private readonly negotiation: Negotiation;
  private structured = false;
  /** base:allocation was selected for the export: BLOCK_STATUS may be asked. */
  private allocation = false;
  private exp: OpenExport | null = null;
  private inFlightBytes = 0;
  /** DISC (or the end of input) seen: start no more requests, close once in-flight ones are answered. */
  private disconnecting = false;
  /** Error codes already logged at warn level for this connection. */
  private readonly failedCodes = new Set<string>();
  /** The client half-closed: no more bytes will come, but buffered requests still count. */
  private inputEnded = false;
  /** The server is closing: new requests get ESHUTDOWN; close once in-flight ones are answered. */
  private shuttingDown = false;
  private paused = false;
  private corked = false;
  private released = false;
  private handshakeTimer: NodeJS.Timeout | null = null;
  private readonly queueLimit: number;
  private readonly budget: BudgetHolder;
  /** A WRITE whose payload is being read: admitted (its bytes counted) before the payload arrived. */
  private admitted = false;
  private readonly stall = new StallWatch();
  /** The limit that keeps the next request (whose header is in) from starting; counted once per stop. */
  private throttledBy: ThrottleReason | null = null;
  /** Last time a request arrived or finished (the idle timeout counts from it). */
  private lastActive = Date.now();
  /** Bytes handed to the stream. */
  private sentTotal = 0;

  constructor(
    private readonly server: NbdServer,
    provider: DeviceProvider,
    private readonly s: Settings,
    private stream: Duplex,
    readonly remote: string,
    /** A decoder that chooses where the stream's reads land (NbdServer.accept), or null to read it as a stream. */
    decoder: ClientStreamDecoder | null,
  ) {
    this.done = new Promise((r) => (this.resolveDone = r));
    this.decoder = decoder ?? new ClientStreamDecoder({ maxOptionLength: s.maxOptionLength, maxPayload: s.maxPayload });
    this.log = s.log;
    this.negotiation = new Negotiation(this, provider, s);
    // Below the stream's own high-water mark we could wait for a 'drain' that never comes: the
    // stream emits it only after a write() returned false.
    this.queueLimit = Math.max(s.maxQueuedWriteBytes, stream.writableHighWaterMark);
    this.budget = server.budget.join();
  }

  /** Everything this connection holds: bytes received and not started, payloads admitted or in flight, replies unsent. */
  private held(): number {
    const pending = this.admitted ? this.pendingPayload() : 0;
    return this.decoder.buffered + pending + this.inFlightBytes + this.stream.writableLength;
  }

  /** Bytes of the admitted WRITE's payload not received yet. */
  private pendingPayload(): number {
    const h = this.decoder.peekRequest();
    return h ? Math.max(0, REQUEST_HEADER_SIZE + h.length - this.decoder.buffered) : 0;
  }

  private account(): void {
    this.budget.set(this.phase === 'closed' ? 0 : this.held());
  }

  /**
   * What a request holds while it runs, decided from its header: its payload (WRITE), its reply
   * (READ, BLOCK_STATUS), or what the device holds for it (CACHE reads in pieces; zeroing and
   * trimming, two blocks: what a volume holds for them beyond that stays within its own write
   * cache).
   */
  private costOf(h: RequestHeader): number {
    const bs = this.exp?.device.blockSize ?? 4096;
    switch (h.command) {
      case Cmd.READ:
        return Math.min(h.length, this.s.maxPayload);
      case Cmd.WRITE:
        return h.length <= this.s.maxPayload ? h.length : 0;
      case Cmd.CACHE:
        return Math.min(h.length, CACHE_PIECE);
      case Cmd.TRIM:
      case Cmd.WRITE_ZEROES:
        return Math.min(h.length, 2 * bs);
      case Cmd.BLOCK_STATUS: {
        const n = (h.flags & CmdFlag.REQ_ONE) !== 0 ? 1 : Math.min(MAX_DESCRIPTORS, Math.ceil(h.length / bs) + 1);
        return 32 + 8 * n;
      }
      default:
        return 0;
    }
  }

  /**
   * Called every few hundred milliseconds: the idle and stall timeouts, and a fresh count of what this
   * connection holds (replies leave the stream without an event below its high-water mark).
   */
  check(now: number): void {
    if (this.phase !== 'transmission') return;
    const st = this.stream;
    const why = this.stall.check(now, this.s.stallTimeoutMs, st.writableLength, this.sentTotal - st.writableLength);
    if (why !== undefined) {
      this.server.counters.stallTimeouts++;
      this.server.limitLog('stall', { remote: this.remote, why, ms: this.s.stallTimeoutMs }, 'nbd client stalled; dropping it (--stall-timeout)');
      this.abort();
      return;
    }
    const idle = this.s.idleTimeoutMs;
    if (idle > 0 && this.inFlight === 0 && this.decoder.buffered === 0 && st.writableLength === 0 && now - this.lastActive >= idle) {
      this.server.counters.idleTimeouts++;
      this.log.info({ remote: this.remote, ms: idle }, 'nbd connection idle; closing it (--idle-timeout)');
      this.closeGracefully();
      return;
    }
    this.account();
  }

  private readonly onData = (chunk: Buffer): void => {
    // After DISC a client must send nothing more; what it sends anyway is dropped, not
    // buffered, while the requests in flight finish.
    if (this.phase === 'closed' || this.phase === 'closing' || this.disconnecting) return;
    this.lastActive = Date.now();
    this.server.counters.bytesReceived += chunk.length;
    this.decoder.push(chunk);
    this.pump();
  };
  /** A read of an `onread` socket: `n` bytes landed in `buf`, the decoder's last read target. Returns whether to read on. */
  onRead(buf: Buffer, n: number): boolean {
    // As onData: dropped after DISC. Uncommitted, the bytes are simply read over next time.
    if (this.phase === 'closed' || this.phase === 'closing' || this.disconnecting) return true;
    this.lastActive = Date.now();
    this.server.counters.bytesReceived += n;
    try {
      this.decoder.commitRead(buf, n);
    } catch (err) {
      // a bug, not the client's doing; thrown from here it would take the process down
      this.log.warn({ remote: this.remote, err: messageOf(err) }, 'nbd read bookkeeping failed; dropping the connection');
      this.abort();
      return false;
    }
    this.pump();
    return !this.paused;
  }

  private readonly onEnd = (): void => this.onInputEnd();
  private readonly onDrain = (): void => this.pump();
  private readonly onError = (err: Error): void => this.log.debug({ remote: this.remote, err: err.message }, 'nbd connection error');
  private readonly onClose = (): void => this.teardown();

  private attach(st: Duplex): void {
    st.on('data', this.onData);
    st.on('end', this.onEnd);
    st.on('drain', this.onDrain);
    st.on('error', this.onError);
    st.on('close', this.onClose);
  }

  private detach(st: Duplex): void {
    st.off('data', this.onData);
    st.off('end', this.onEnd);
    st.off('drain', this.onDrain);
    st.off('error', this.onError);
    st.off('close', this.onClose);
  }

  start(): void {
    this.attach(this.stream);
    this.handshakeTimer = setTimeout(() => {
      this.log.info({ remote: this.remote }, 'nbd handshake timed out');
      this.abort();
    }, this.s.handshakeTimeoutMs);
    this.negotiation.greet();
  }

  /**
   * Server shutdown (proto.md): finish what is in flight, answer anything new with ESHUTDOWN
   * (which tells the client to disconnect), then close.
   */
  shutdown(): void {
    if (this.phase === 'handshake') this.abort();
    else if (this.phase === 'transmission') {
      this.shuttingDown = true;
      this.maybeFinish();
      this.pump();
    }
  }

  // ---- input

  private pump(): void {
    try {
      if (this.phase === 'handshake') {
        while (this.phase === 'handshake' && !this.negotiation.optionBusy) {
          const msg = this.decoder.next();
          if (!msg) {
            // the client went away mid-negotiation (or after ABORT): nothing more to say
            if (this.inputEnded) this.closeGracefully();
            break;
          }
          this.negotiation.onMessage(msg);
        }
      }
      if (this.phase === 'transmission') {
        this.account();
        while (!this.disconnecting) {
          const h = this.decoder.peekRequest();
          if (h && !this.admitted) {
            const reason = this.shuttingDown || h.command === Cmd.DISC ? null : this.admission(h);
            if (reason) {
              this.throttle(reason);
              break;
            }
            this.admitted = true;
            this.throttledBy = null;
          }
          const msg = h ? this.decoder.next() : undefined;
          if (!msg) {
            // Waiting for the rest of a header, or for an admitted WRITE's payload.
            if (this.admitted) this.stall.messageStarted();
            // Input is over and every whole request it held has been started: like a DISC.
            // (A partial request left at the end can never complete and is dropped.)
            if (this.inputEnded) this.disconnecting = true;
            break;
          }
          this.admitted = false;
          this.stall.messageDone();
          if (this.shuttingDown && msg.type === 'request' && msg.command !== Cmd.DISC) this.sendError(msg.handle, Errno.ESHUTDOWN, 'server is shutting down');
          else this.dispatch(msg);
          this.account();
        }
        // An admitted payload counts from now on, before a byte of it has arrived.
        this.account();
        this.maybeFinish();
      }
    } catch (err) {
      this.server.counters.protocolErrors++;
      const e = toTorusError(err);
      this.log.info({ remote: this.remote, code: e.code, err: e.message }, 'nbd client broke the protocol; dropping it');
      this.abort();
      return;
    }
    this.updateFlow();
  }

  /**
   * Whether a request may start (or its payload be read), by its header; the limit in the way if
   * not. One request of any allowed size can always start on a connection with nothing in
   * flight, so a single large request never waits for itself; the shared budget is the
   * exception, since every connection could be in that position at once.
   */
  private admission(h: RequestHeader): ThrottleReason | null {
    const cost = this.costOf(h);
    if (this.inFlight >= this.s.maxInFlight) return 'requests';
    if (this.inFlight > 0 && this.inFlightBytes + cost > this.s.maxInFlightBytes) return 'bytes';
    if (this.stream.writableLength >= this.queueLimit) return 'replies';
    // A WRITE's payload received so far is already counted (decoder.buffered).
    const have = h.command === Cmd.WRITE ? Math.min(cost, this.decoder.buffered - REQUEST_HEADER_SIZE) : 0;
    if (!this.budget.mayTake(cost - have)) return 'budget';
    return null;
  }

  private throttle(reason: ThrottleReason): void {
    if (this.throttledBy !== reason) {
      this.throttledBy = reason;
      this.server.counters.throttled[reason]++;
      if (reason === 'budget') {
        const b = this.server.budget;
        this.server.limitLog('budget', { remote: this.remote, usedBytes: b.used, limitBytes: b.limit, connections: b.holders }, 'nbd memory budget reached: connections beyond their share wait (--max-buffered)');
      }
    }
    if (reason === 'budget') this.budget.waitForRoom(() => this.pump());
  }

  /** Whether to read on: for an admitted payload, or, with no request waiting to start, if there is room for one. */
  private mayRead(): boolean {
    if (this.admitted) return true;
    if (this.throttledBy) return false;
    return this.noRoom() === null;
  }

  /** The limit that leaves no room for another request, whatever it turns out to be. */
  private noRoom(): ThrottleReason | null {
    if (this.inFlight >= this.s.maxInFlight) return 'requests';
    if (this.stream.writableLength >= this.queueLimit) return 'replies';
    if (!this.budget.mayTake(0)) return 'budget';
    return null;
  }

  private updateFlow(): void {
    if (this.phase === 'closed') return;
    let blocked: boolean;
    if (this.phase === 'handshake') blocked = this.negotiation.optionBusy;
    else if (this.phase === 'transmission') blocked = !this.disconnecting && !this.mayRead();
    // After DISC the client must send nothing; reading on just lets us notice it hang up.
    else blocked = false;
    if (blocked && !this.paused) {
      this.paused = true;
      // A stop with a request waiting was counted by throttle(). One without is counted here:
      // direct reads end where a payload does, so the next header is often not read yet.
      const reason = this.phase === 'transmission' && this.throttledBy === null ? this.noRoom() : null;
      if (reason !== null) this.server.counters.throttled[reason]++;
      this.stream.pause();
    } else if (!blocked && this.paused) {
      this.paused = false;
      this.stream.resume();
    }
  }

  /**
   * The client half-closed. What it sent before is still served: options and requests left in
   * the decoder (behind a busy option or the in-flight cap) are handled as usual, then our side
   * closes too (pump notices once the decoder runs dry).
   */
  private onInputEnd(): void {
    this.inputEnded = true;
    this.pump();
  }

  // ---- handshake

  // ---- handshake (negotiation.ts)

  get buffered(): number {
    return this.decoder.buffered;
  }

  takeStream(): Duplex {
    const raw = this.stream;
    this.detach(raw);
    return raw;
  }

  useStream(stream: Duplex): void {
    this.stream = stream;
    this.attach(stream);
  }

  adopt(exp: OpenExport): boolean {
    if (this.phase !== 'handshake') {
      void exp.release().catch(() => {});
      return false;
    }
    this.exp = exp;
    return true;
  }

  optionDone(): void {
    // the client may have gone while the option waited on the provider
    if (this.phase === 'closed') this.maybeRelease();
    else this.pump();
  }

  transmit(agreed: Agreed): void {
    this.structured = agreed.structured;
    this.allocation = agreed.allocation;
    this.decoder.startTransmission();
    this.phase = 'transmission';
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    this.server.counters.handshakes++;
    const e = this.exp;
    this.log.debug({ remote: this.remote, export: e?.name, size: e?.size, flags: e?.flags, structured: this.structured }, 'nbd transmission');
  }

  // ---- transmission

  private dispatch(msg: ClientMessage): void {
    if (msg.type === 'payloadTooLong') {
      // The payload would have to be read and thrown away to find the next request; a client
      // sending that much in one WRITE is broken or hostile (proto.md allows a hard disconnect).
      this.server.counters.protocolErrors++;
      this.server.counters.oversizedRequests++;
      this.log.info({ remote: this.remote, length: msg.length }, 'nbd WRITE over the payload limit; dropping client');
      this.sendError(msg.handle, Errno.EINVAL, `WRITE of ${msg.length} bytes exceeds the ${this.s.maxPayload}-byte maximum`);
      this.closeGracefully();
      return;
    }
    if (msg.type !== 'request') throw new TorusError('INTERNAL', `unexpected ${msg.type} in transmission`);
    if (msg.command === Cmd.DISC) {
      this.disconnecting = true;
      this.maybeFinish();
      return;
    }
    const cost = this.costOf(msg);
    this.inFlight++;
    this.inFlightBytes += cost;
    this.server.counters.requests++;
    if (this.inFlight > this.server.counters.peakInFlight) this.server.counters.peakInFlight = this.inFlight;
    this.execute(msg)
      .catch((err: unknown) => {
        // execute answers every failure itself; this is a bug, but the client still gets a reply
        this.log.warn({ remote: this.remote, err: messageOf(err) }, 'nbd request handling failed');
        this.sendError(msg.handle, Errno.EIO, messageOf(err));
      })
      .finally(() => {
        this.inFlight--;
        this.inFlightBytes -= cost;
        this.lastActive = Date.now();
        if (this.phase === 'closed') this.maybeRelease();
        else {
          this.pump();
          this.maybeFinish();
        }
      });
  }

  private sendError(handle: bigint, errno: Errno, message: string): void {
    if (this.structured) this.send(encodeErrorChunk(handle, errno, message, true));
    else this.send(encodeSimpleReply(handle, errno));
  }

  private ok(handle: bigint): void {
    // proto.md lets a simple reply answer anything but READ even with structured replies on
    this.send(encodeSimpleReply(handle, 0));
  }

  /** Checks that proto.md wants answered before the device is asked anything. */
  private validate(req: Request, exp: OpenExport): Refusal | undefined {
    const allowed = ALLOWED_FLAGS[req.command];
    if (allowed === undefined) return new Refusal(Errno.EINVAL, `unknown command ${req.command}`);
    let extra = req.flags & ~allowed;
    if (req.command === Cmd.READ && !this.structured) extra |= req.flags & CmdFlag.DF;
    if (extra !== 0) return new Refusal(Errno.EINVAL, `flags 0x${extra.toString(16)} are not valid for ${commandName(req.command)}`);
    const writes = WRITE_COMMANDS.has(req.command);
    if (writes && exp.readOnly) return new Refusal(Errno.EPERM, 'export is read-only');
    if (req.command === Cmd.FLUSH) return undefined;
    if (req.command === Cmd.BLOCK_STATUS && !this.allocation)
      return new Refusal(Errno.EINVAL, 'BLOCK_STATUS needs base:allocation selected with SET_META_CONTEXT for this export');
    if ((req.command === Cmd.READ || req.command === Cmd.CACHE) && req.length > this.s.maxPayload) {
      this.server.counters.oversizedRequests++;
      return new Refusal(Errno.EINVAL, `${commandName(req.command)} of ${req.length} bytes exceeds the ${this.s.maxPayload}-byte maximum`);
    }
    if (req.offset + req.length > exp.size) {
      // proto.md: ENOSPC for writes past the end (the disk is full there), EINVAL for the rest
      const errno = req.command === Cmd.WRITE || req.command === Cmd.WRITE_ZEROES ? Errno.ENOSPC : Errno.EINVAL;
      return new Refusal(errno, `${req.offset}+${req.length} is beyond the ${exp.size}-byte export`);
    }
    if (req.command === Cmd.BLOCK_STATUS && req.length === 0) return new Refusal(Errno.EINVAL, 'BLOCK_STATUS of length 0');
    return undefined;
  }

  private async execute(req: Request): Promise<void> {
    const exp = this.exp;
    if (!exp) throw new TorusError('INTERNAL', 'request without an export');
    const refusal = this.validate(req, exp);
    if (refusal) {
      this.log.debug({ remote: this.remote, command: commandName(req.command), errno: errnoName(refusal.errno), why: refusal.message }, 'nbd request refused');
      return this.sendError(req.handle, refusal.errno, refusal.message);
    }
    const d = exp.device;
    const fua = (req.flags & CmdFlag.FUA) !== 0;
    try {
      switch (req.command) {
        case Cmd.READ:
          return await this.read(req, d);
        case Cmd.WRITE:
          // zero-length writes are legal and mean nothing; a device need not handle them
          // The payload is ours (the decoder's take()): the device may keep it without a copy.
          if (req.payload && req.payload.length > 0) await d.write(req.offset, req.payload, fua, true);
          return this.ok(req.handle);
        case Cmd.FLUSH:
          await d.flush();
          return this.ok(req.handle);
        case Cmd.TRIM:
          if (req.length > 0) await d.trim(req.offset, req.length);
          // BlockDevice.trim has no FUA of its own; a flush right after gives the same guarantee
          if (fua) await d.flush();
          return this.ok(req.handle);
        case Cmd.WRITE_ZEROES: {
          const noHole = (req.flags & CmdFlag.NO_HOLE) !== 0;
          // Zeroing by punching holes is metadata only, so it beats writing zeroes; allocating
          // zeroes (NO_HOLE) may well be a write on a real volume, and FAST_ZERO must then fail
          // at once with ENOTSUP, without touching the data (proto.md).
          if ((req.flags & CmdFlag.FAST_ZERO) !== 0 && noHole)
            return this.sendError(req.handle, Errno.ENOTSUP, 'allocated zeroes are not faster than a write');
          if (req.length > 0) await d.writeZeroes(req.offset, req.length, { noHole, fua });
          return this.ok(req.handle);
        }
        case Cmd.CACHE:
          for (let at = 0; at < req.length; at += CACHE_PIECE) await d.read(req.offset + at, Math.min(CACHE_PIECE, req.length - at));
          return this.ok(req.handle);
        case Cmd.BLOCK_STATUS:
          return await this.blockStatus(req, d);
        default:
          throw new TorusError('INTERNAL', `validated unknown command ${req.command}`);
      }
    } catch (err) {
      const errno = nbdErrno(err, WRITE_COMMANDS.has(req.command));
      const e = toTorusError(err);
      // A client sees only an errno: the first failure of each kind on a connection is worth the
      // operator's attention, the rest would flood the log.
      const first = !this.failedCodes.has(e.code);
      this.failedCodes.add(e.code);
      this.log[first ? 'warn' : 'debug'](
        { remote: this.remote, command: commandName(req.command), offset: req.offset, length: req.length, code: e.code, err: e.message },
        first ? 'nbd request failed (more like it on this connection are logged at debug level)' : 'nbd request failed',
      );
      this.sendError(req.handle, errno, messageOf(err));
    }
  }

  private async read(req: Request, d: BlockDevice): Promise<void> {
    const { handle, offset, length } = req;
    if (!this.structured) {
      if (length > 0 && d.readInto) return this.readPooled(d, offset, length, (data) => encodeSimpleReply(handle, 0, data));
      const data = length > 0 ? await readExact(d, offset, length) : undefined;
      return this.send(encodeSimpleReply(handle, 0, data));
    }
    if (length === 0) return this.send(encodeNoneChunk(handle));
    let segments: Segment[] | undefined;
    if ((req.flags & CmdFlag.DF) === 0 && length >= SPARSE_READ_MIN) {
      try {
        segments = toSegments(await d.blockStatus(offset, length), offset, length);
      } catch {
        // block status is only an optimisation here; the read itself will report real errors
        segments = undefined;
      }
      if (segments && !segments.some((s) => s.zero)) segments = undefined;
    }
    if (!segments) {
      if (d.readInto) return this.readPooled(d, offset, length, (data) => encodeOffsetData(handle, offset, data, true));
      return this.send(encodeOffsetData(handle, offset, await readExact(d, offset, length), true));
    }
    // Holes go out as 12-byte OFFSET_HOLE chunks instead of zeroes; the data segments are read
    // in parallel. Every outcome is known before the first chunk is sent, so DONE can go on the
    // last chunk; a segment that failed becomes an ERROR_OFFSET at its start, and the segments
    // that were read still count (proto.md allows partial success to be reported this way).
    const results = await Promise.allSettled(segments.map((s) => (s.zero ? Promise.resolve(undefined) : readExact(d, s.offset, s.length))));
    const chunks: ((done: boolean) => Buffer[])[] = [];
    segments.forEach((s, i) => {
      const r = results[i];
      if (s.zero) chunks.push((done) => encodeOffsetHole(handle, s.offset, s.length, done));
      else if (r?.status === 'fulfilled' && r.value) {
        const data = r.value;
        chunks.push((done) => encodeOffsetData(handle, s.offset, data, done));
      } else {
        const reason: unknown = r?.status === 'rejected' ? r.reason : new TorusError('INTERNAL', 'missing read result');
        chunks.push((done) => encodeErrorChunk(handle, nbdErrno(reason, false), messageOf(reason), done, s.offset));
      }
    });
    chunks.forEach((c, i) => this.send(c(i === chunks.length - 1)));
  }

  /**
   * Reads into a reply buffer from the server's pool and sends `reply(data)`; the buffer goes back
   * once the socket has taken the reply (or the connection is gone), never before.
   */
  private async readPooled(d: BlockDevice, offset: number, length: number, reply: (data: Buffer) => Buffer[]): Promise<void> {
    let size = MIN_REPLY_CLASS;
    while (size < length) size *= 2;
    const lease = this.server.replyBuffers.take(size);
    const data = lease.buffer.subarray(0, length);
    try {
      await d.readInto!(offset, data);
    } catch (err) {
      lease.release();
      throw err;
    }
    this.send(reply(data), () => lease.release());
  }

  private async blockStatus(req: Request, d: BlockDevice): Promise<void> {
    const extents = await d.blockStatus(req.offset, req.length);
    const one = (req.flags & CmdFlag.REQ_ONE) !== 0;
    const descriptors = toDescriptors(extents, req.length, one ? 1 : MAX_DESCRIPTORS);
    this.send(encodeBlockStatus(req.handle, ALLOCATION_CONTEXT_ID, descriptors, true));
  }

  // ---- output and teardown

  /** `sent`: called once the socket is done with `parts` (written, or the connection gone). */
  send(parts: Buffer[], sent?: () => void): void {
    const st = this.stream;
    if (this.phase === 'closed' || st.destroyed || st.writableEnded) {
      sent?.();
      return;
    }
    // Replies finished in the same turn of the event loop (every storage-node answer it read)
    // leave in one writev instead of one syscall each. The last request in flight has nothing to
    // share a write with, and its client is waiting for it (qd 1): it goes at once.
    const alone = !this.corked && this.inFlight <= 1 && this.decoder.buffered === 0;
    if (alone) st.cork();
    else if (!this.corked) {
      this.corked = true;
      st.cork();
      setImmediate(() => {
        this.corked = false;
        st.uncork();
      });
    }
    for (const p of parts) this.sentTotal += p.length;
    const last = parts.length - 1;
    for (let i = 0; i < last; i++) st.write(parts[i]);
    // A stream calls a write's callback once that write and those before it are done, or with an
    // error when it is destroyed first.
    if (last >= 0) st.write(parts[last], sent);
    else sent?.();
    if (alone) st.uncork();
    if (this.phase === 'transmission') this.account();
  }

  private maybeFinish(): void {
    if (this.phase === 'transmission' && (this.disconnecting || this.shuttingDown) && this.inFlight === 0) this.closeGracefully();
  }

  /** Sends what is queued, then closes (a soft end for DISC, ABORT and refusals we explain). */
  closeGracefully(): void {
    if (this.phase === 'closed' || this.phase === 'closing') return;
    this.phase = 'closing';
    this.clearTimer();
    const st = this.stream;
    // Drop anything else the client sends; it has nowhere to go.
    if (this.paused) {
      this.paused = false;
      st.resume();
    }
    // Destroy once our FIN is out: waiting for the client's own close could wait forever. A
    // client that does not even read what is left to send is cut off after the handshake timeout.
    st.once('finish', () => st.destroy());
    const stuck = setTimeout(() => st.destroy(), this.s.handshakeTimeoutMs);
    st.once('close', () => clearTimeout(stuck));
    st.end();
  }

  /** Hard disconnect: the client broke the protocol or is hostile. */
  abort(): void {
    if (this.phase === 'closed') return;
    this.clearTimer();
    this.stream.destroy();
    this.teardown();
  }

  private clearTimer(): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
  }

  private teardown(): void {
    if (this.phase !== 'closed') {
      this.phase = 'closed';
      this.clearTimer();
      if (!this.stream.destroyed) this.stream.destroy();
    }
    this.budget.leave();
    this.maybeRelease();
  }

  /** Releases the device once no request or option can still be using it, then reports the connection done. */
  private maybeRelease(): void {
    if (this.released || this.phase !== 'closed' || this.inFlight > 0 || this.negotiation.optionBusy) return;
    this.released = true;
    const exp = this.exp;
    this.exp = null;
    const finish = (): void => this.resolveDone();
    if (!exp) return finish();
    exp.release().then(finish, (err: unknown) => {
      this.log.warn({ remote: this.remote, export: exp.name, err: messageOf(err) }, 'nbd device release failed');
      finish();
    });
  }
}

async function readExact(d: BlockDevice, offset: number, length: number): Promise<ReplyData> {
  // A device that can answer a read across its blocks in pieces saves joining them: the socket
  // takes them as they are. Within one block a plain read has no pieces to join.
  const bs = d.blockSize;
  const oneBlock = Math.floor(offset / bs) === Math.floor((offset + length - 1) / bs);
  const data = d.readv && !oneBlock ? await d.readv(offset, length) : await d.read(offset, length);
  const got = replyDataLength(data);
  if (got !== length) throw new TorusError('IO', `device returned ${got} bytes for a ${length}-byte read`);
  return data;
}

interface Segment {
  readonly offset: number;
  readonly length: number;
  /** Reads as zeros: sent as a hole. */
  readonly zero: boolean;
}

/** Device extents clipped to [offset, offset+length) and merged by zero-ness; a gap the device left reads as data. */
export function toSegments(extents: readonly Extent[], offset: number, length: number): Segment[] {
  const out: Segment[] = [];
  let pos = offset;
  const end = offset + length;
  const add = (len: number, zero: boolean): void => {
    const last = out[out.length - 1];
    if (last && last.zero === zero) out[out.length - 1] = { offset: last.offset, length: last.length + len, zero };
    else out.push({ offset: pos, length: len, zero });
    pos += len;
  };
  for (const e of extents) {
    if (pos >= end) break;
    if (!(e.length > 0)) continue;
    add(Math.min(e.length, end - pos), e.zero);
  }
  if (pos < end) add(end - pos, false);
  return out;
}

/**
 * base:allocation descriptors for a request of `length` bytes: clipped to it (so every length
 * fits a u32 and nothing is claimed past what was asked), merged by flags, at most `max`.
 */
export function toDescriptors(extents: readonly Extent[], length: number, max: number): BlockDescriptor[] {
  const out: BlockDescriptor[] = [];
  let covered = 0;
  for (const e of extents) {
    if (covered >= length) break;
    if (!(e.length > 0)) continue;
    const len = Math.min(e.length, length - covered);
    const flags = (e.hole ? State.HOLE : 0) | (e.zero ? State.ZERO : 0);
    const last = out[out.length - 1];
    if (last && last.flags === flags) out[out.length - 1] = { length: last.length + len, flags };
    else if (out.length < max) out.push({ length: len, flags });
    else break;
    covered += len;
  }
  // A device that reported nothing usable: status 0 ("allocated, contents unknown") is always true.
  if (out.length === 0) out.push({ length, flags: 0 });
  return out;
}
