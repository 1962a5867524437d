import net from 'node:net';
import tls from 'node:tls';
import type { Duplex } from 'node:stream';
import { TorusError } from '../core/errors.js';
import { parsePeerAddress, type PeerAddress } from './address.js';
import type { BackoffPolicy, CircuitBreaker } from './breaker.js';
import {
  EXT_AUTH_HMAC,
  EXT_CRITICAL,
  EXT_CHECKSUMS,
  EXT_INSTANCE,
  EXT_JOURNAL,
  FrameDecoder,
  HANDSHAKE_MAX_FRAME_SIZE,
  Op,
  encodeHello,
  opName,
  type HelloOkMessage,
  type Message,
  type ReplyTarget,
} from './codec.js';
import { clientProof, connectionEkm, dialTls, verifyServerProof, type PeerSecurity } from './security.js';
import type { NodeIdentity, VersionRange } from './server.js';
import { FrameWriter } from './writer.js';

/** What the peer told us about itself in HELLO_OK. */
export interface RemotePeer {
  readonly uuid: string;
  readonly clusterId: string;
  readonly version: number;
  readonly maxFrameSize: number;
  readonly maxInFlight: number;
  readonly blockSize: number;
  /** The peer process's EXT_INSTANCE, hex; undefined from a peer that does not send one. */
  readonly instance: string | undefined;
  /** EXT_CHECKSUMS: it checks PUT CRCs and serves sector checksums. */
  readonly checksums: boolean;
  /** EXT_JOURNAL: it keeps volume journals. */
  readonly journal: boolean;
}

export type ClientState = 'idle' | 'connecting' | 'ready' | 'closed';

export interface Connection {
  readonly stream: Duplex;
  readonly decoder: FrameDecoder;
  readonly writer: FrameWriter;
  ready: boolean;
  timer: NodeJS.Timeout | null;
}

/** PeerClientOptions as the connection uses them, defaults applied. */
export interface ConnectionSettings {
  readonly identity: NodeIdentity;
  readonly expectUuid: string | undefined;
  readonly connectTimeoutMs: number;
  readonly maxQueuedWriteBytes: number;
  readonly maxFrameSize: number;
  readonly keepaliveMs: number;
  readonly idleCloseMs: number;
  readonly versions: VersionRange;
  readonly backoff: BackoffPolicy;
  readonly breaker: CircuitBreaker;
  readonly connect: ((address: PeerAddress) => Duplex) | undefined;
  readonly security: PeerSecurity;
}

/** What a connection needs of the calls it carries (client.ts). */
export interface CallQueue {
  /** Calls on the wire. */
  inFlight(): number;
  /** Calls waiting to be sent. */
  queued(): number;
  /** When a caller last made a call; idle close counts from it. */
  lastCall(): number;
  /** A frame after the handshake: the reply to a call, or the peer closing. */
  complete(conn: Connection, m: Message): void;
  /** Where the bytes of the reply to call `id` go, when its caller gave a buffer (DecoderOptions.replyInto). */
  replyInto(id: number): ReplyTarget | null;
  /** Sends what waits, as far as the connection allows; connects if needed. */
  pump(): void;
  failPending(err: TorusError): void;
  failQueued(err: TorusError): void;
  /** A PING outside the breaker's count, for keepalive. */
  ping(): Promise<unknown>;
}

/**
 * PeerClient's connection to its peer, one socket at a time: connect (TLS or not), HELLO,
 * reconnects with backoff, the circuit breaker, keepalive and idle close. The calls stay in
 * client.ts; a connection event that decides their fate (lost, refused, breaker open) fails them
 * through CallQueue.
 */
export class PeerConnection {
  readonly address: string;
  private readonly target: PeerAddress;
  private readonly o: ConnectionSettings;
  private readonly identity: NodeIdentity;
  private readonly expectUuid: string | undefined;
  private readonly connectFn: ((address: PeerAddress) => Duplex) | undefined;
  private readonly security: PeerSecurity;
  private readonly backoff: BackoffPolicy;
  readonly breaker: CircuitBreaker;

  private _state: ClientState = 'idle';
  private conn: Connection | null = null;
  private _remote: RemotePeer | undefined;
  private attempts = 0;
  private nextAttemptAt = 0;
  private backoffTimer: NodeJS.Timeout | null = null;
  private keepaliveTimer: NodeJS.Timeout | null = null;
  private pingOutstanding = false;
  private lastReceived = 0;
  private _lastError: TorusError | null = null;
  readonly counters = { connects: 0, connectFailures: 0 };

  constructor(
    address: string,
    s: ConnectionSettings,
    private readonly calls: CallQueue,
  ) {
    this.address = address;
    this.target = parsePeerAddress(address);
    this.identity = s.identity;
    this.expectUuid = s.expectUuid;
    this.connectFn = s.connect;
    this.security = s.security;
    this.o = s;
    this.backoff = s.backoff;
    this.breaker = s.breaker;
  }

  get state(): ClientState {
    return this._state;
  }

  get remote(): RemotePeer | undefined {
    return this._remote;
  }

  /** The socket in use, whether its handshake is done or not. */
  get current(): Connection | null {
    return this.conn;
  }

  get lastError(): TorusError | null {
    return this._lastError;
  }

  /** A probe call is about to be sent. */
  skipBackoff(): void {
    if (this.backoffTimer) {
      // The cool-down was the wait; the probe should not also sit out a reconnect backoff.
      clearTimeout(this.backoffTimer);
      this.backoffTimer = null;
    }
    this.nextAttemptAt = 0;
  }

  /** Fails everything pending with CLOSED and closes the connection; later calls fail too. */
  async close(): Promise<void> {
    if (this._state === 'closed') return;
    this._state = 'closed';
    this.clearTimers();
    const err = new TorusError('CLOSED', `client for peer ${this.address} was closed`);
    const conn = this.conn;
    this.conn = null;
    this.calls.failPending(err);
    this.calls.failQueued(err);
    if (conn) {
      conn.writer.discard();
      if (conn.timer) clearTimeout(conn.timer);
      await new Promise<void>((resolve) => {
        if (conn.stream.destroyed) resolve();
        else {
          conn.stream.once('close', () => resolve());
          conn.stream.destroy();
        }
      });
    }
  }

  // -------------------------------------------------------------------------------------------
  // Connection lifecycle

  startConnect(): void {
    if (this.conn || this.backoffTimer || this._state === 'closed') return;
    this._state = 'connecting';
    const wait = this.nextAttemptAt - Date.now();
    if (wait > 0) {
      this.backoffTimer = setTimeout(() => {
        this.backoffTimer = null;
        if (this.calls.queued() > 0) this.openConnection();
        else if (this._state === 'connecting') this._state = 'idle';
      }, wait);
      return;
    }
    this.openConnection();
  }

  private openConnection(): void {
    if (this._state === 'closed') return;
    this._state = 'connecting';
    this.counters.connects++;
    // Replies to our own requests: lengths we asked for, so each payload is read in place.
    const decoder = new FrameDecoder({ maxFrameSize: HANDSHAKE_MAX_FRAME_SIZE, allocateOnHeader: true, replyInto: (id) => this.calls.replyInto(id) });
    let stream: Duplex;
    try {
      const sec = this.security;
      stream = this.connectFn
        ? this.connectFn(this.target)
        : sec.mode !== 'insecure'
          ? dialTls(sec, this.target, this.expectUuid)
          : net.connect({
            host: this.target.host,
            port: this.target.port,
            noDelay: true,
            // Reads land where the decoder says: a block payload goes straight from the kernel
            // into the buffer the caller will get, with no copy in between.
            onread: {
              buffer: () => decoder.readTarget(),
              callback: (n: number, buf: Uint8Array) => {
                this.onRead(conn, buf as Buffer, n);
                return true;
              },
            },
          });
    } catch (err) {
      this.connectFailed(new TorusError('BLOCK_UNAVAILABLE', `cannot connect to peer ${this.address}: ${(err as Error).message}`, { cause: err }));
      return;
    }
    const conn: Connection = {
      stream,
      decoder,
      writer: new FrameWriter(stream, { maxQueuedBytes: this.o.maxQueuedWriteBytes, onWritable: () => this.calls.pump() }),
      ready: false,
      timer: null,
    };
    this.conn = conn;
    // The timer can fire in the loop turn that ends a long synchronous stretch (a big sync's burst
    // of puts on a slow machine), before the poll phase has seen a connect that completed in the
    // meantime: decide only after that phase, and give a connection whose TCP connect got
    // through one more period for the hello.
    let progressed = false;
    stream.once('connect', () => (progressed = true));
    const expire = (): void => {
      setImmediate(() => {
        if (conn.ready || this.conn !== conn) return;
        if (progressed) {
          progressed = false;
          conn.timer = setTimeout(expire, this.o.connectTimeoutMs);
          return;
        }
        this.dropConnection(conn, new TorusError('TIMEOUT', `connecting to peer ${this.address} timed out after ${this.o.connectTimeoutMs} ms`));
      });
    };
    conn.timer = setTimeout(expire, this.o.connectTimeoutMs);
    stream.on('data', (chunk: Buffer) => this.onData(conn, chunk));
    stream.on('error', (err: Error) => {
      const verb = conn.ready ? 'connection to' : 'cannot connect to';
      this.dropConnection(conn, new TorusError('BLOCK_UNAVAILABLE', `${verb} peer ${this.address}: ${err.message}`, { cause: err }));
    });
    stream.on('end', () => this.dropConnection(conn, null));
    stream.on('close', () => this.dropConnection(conn, null));
    const hello = (): void => {
      const sec = this.security;
      const ekm = sec.mode === 'secret' ? connectionEkm(stream) : undefined;
      conn.writer.write(
        encodeHello(0, {
          minVersion: this.o.versions.min,
          maxVersion: this.o.versions.max,
          maxFrameSize: this.o.maxFrameSize,
          uuid: this.identity.uuid,
          clusterId: this.identity.clusterId,
          extensions: sec.mode === 'secret' && ekm ? [{ type: EXT_AUTH_HMAC, value: clientProof(sec, ekm) }] : [],
        }),
      );
    };
    // Over TLS, HELLO goes once the handshake has checked the server's certificate.
    if (stream instanceof tls.TLSSocket && !this.connectFn) stream.once('secureConnect', hello);
    else if (stream instanceof net.Socket && stream.connecting) stream.once('connect', hello);
    else hello();
  }

  private onData(conn: Connection, chunk: Buffer): void {
    this.onRead(conn, chunk, -1);
  }

  /** `n` >= 0: `buf` is the decoder's readTarget() and got n bytes; -1: `buf` is a chunk. */
  private onRead(conn: Connection, buf: Buffer, n: number): void {
    if (conn !== this.conn) return;
    this.lastReceived = Date.now();
    try {
      if (n < 0) conn.decoder.push(buf);
      else conn.decoder.commitRead(buf, n);
      for (let m = conn.decoder.next(); m !== null; m = conn.decoder.next()) {
        if (!conn.ready) this.handshake(conn, m);
        else this.calls.complete(conn, m);
        if (conn !== this.conn) return;
      }
    } catch (err) {
      const e = err instanceof TorusError ? err : new TorusError('PROTOCOL', String(err), { cause: err });
      this.dropConnection(conn, new TorusError('PROTOCOL', `peer ${this.address} broke the protocol: ${e.message}`, { cause: e }));
      return;
    }
    this.calls.pump();
  }

  private handshake(conn: Connection, m: Message): void {
    if (m.op === Op.Error) {
      this.dropConnection(conn, new TorusError(m.code, `peer ${this.address} refused the handshake: ${m.message}`));
      return;
    }
    if (m.op !== Op.HelloOk) {
      this.dropConnection(conn, new TorusError('PROTOCOL', `peer ${this.address} answered HELLO with ${opName(m.op)}`));
      return;
    }
    const problem = this.checkHelloOk(m);
    if (problem) {
      this.dropConnection(conn, problem);
      return;
    }
    conn.ready = true;
    if (conn.timer) clearTimeout(conn.timer);
    conn.timer = null;
    conn.decoder.maxFrameSize = this.o.maxFrameSize;
    this._remote = {
      uuid: m.uuid,
      clusterId: m.clusterId,
      version: m.version,
      maxFrameSize: m.maxFrameSize,
      maxInFlight: m.maxInFlight,
      blockSize: m.blockSize,
      instance: m.extensions.find((e) => e.type === EXT_INSTANCE)?.value.toString('hex'),
      checksums: m.extensions.some((e) => e.type === EXT_CHECKSUMS),
      journal: m.extensions.some((e) => e.type === EXT_JOURNAL),
    };
    this._state = 'ready';
    this.attempts = 0;
    this.nextAttemptAt = 0;
    this.breaker.success();
    this.startKeepalive();
  }

  private checkHelloOk(m: HelloOkMessage): TorusError | null {
    const v = this.o.versions;
    if (m.version < v.min || m.version > v.max)
      return new TorusError('PROTOCOL', `peer ${this.address} chose protocol version ${m.version}, we speak ${v.min}..${v.max}`);
    const sec = this.security;
    if (sec.mode === 'secret') {
      const ekm = this.conn ? connectionEkm(this.conn.stream) : undefined;
      const proof = m.extensions.find((e) => e.type === EXT_AUTH_HMAC)?.value;
      if (!ekm || !verifyServerProof(sec, ekm, proof))
        return new TorusError('PERMISSION_DENIED', `peer ${this.address} did not prove it holds the cluster secret`);
    }
    if (m.clusterId !== this.identity.clusterId) return new TorusError('WRONG_CLUSTER', `peer ${this.address} belongs to another cluster`);
    if (this.expectUuid !== undefined && m.uuid !== this.expectUuid)
      return new TorusError('NO_PEER', `peer at ${this.address} is node ${m.uuid}, not the expected ${this.expectUuid}`);
    const critical = m.extensions.find((e) => (e.type & EXT_CRITICAL) !== 0 && !(e.type === EXT_AUTH_HMAC && sec.mode === 'secret'));
    if (critical) return new TorusError('PROTOCOL', `peer ${this.address} requires handshake extension 0x${critical.type.toString(16)}, which we do not support`);
    return null;
  }

  /**
   * The single place where a connection ends. `err` null means the stream ended or closed;
   * that is only a failure if it happens before the handshake or with calls on the wire.
   */
  dropConnection(conn: Connection, err: TorusError | null, counted = false): void {
    if (conn !== this.conn) return;
    this.conn = null;
    if (conn.timer) clearTimeout(conn.timer);
    this.stopKeepalive();
    conn.writer.discard();
    conn.stream.destroy();
    if (this._state === 'closed') return;
    this._state = 'idle';
    if (!conn.ready) {
      this.connectFailed(err ?? new TorusError('BLOCK_UNAVAILABLE', `peer ${this.address} closed the connection during the handshake`));
      return;
    }
    const hadPending = this.calls.inFlight() > 0;
    if (hadPending) {
      const reason = err?.message ?? 'closed by the peer';
      this.calls.failPending(new TorusError('BLOCK_UNAVAILABLE', `connection to peer ${this.address} lost: ${reason}`, { cause: err ?? undefined }));
    }
    if (err !== null || hadPending) {
      this.scheduleRetry();
      if (!counted) this.transportFailure(err ?? new TorusError('BLOCK_UNAVAILABLE', `peer ${this.address} closed the connection with requests pending`));
    }
    this.calls.pump();
  }

  private connectFailed(err: TorusError): void {
    this.counters.connectFailures++;
    this._state = 'idle';
    this.scheduleRetry();
    // Everything waiting was waiting for this connection: one failure answers all of them.
    this.calls.failQueued(err);
    this.transportFailure(err);
  }

  private scheduleRetry(): void {
    this.attempts++;
    this.nextAttemptAt = Date.now() + this.backoff(this.attempts);
  }

  transportFailure(err: TorusError): void {
    this._lastError = err;
    const before = this.breaker.state;
    this.breaker.failure();
    if (this.breaker.state === 'open' && before !== 'open') {
      const open = this.openError();
      const conn = this.conn;
      if (conn) {
        this.conn = null;
        if (conn.timer) clearTimeout(conn.timer);
        this.stopKeepalive();
        conn.writer.discard();
        conn.stream.destroy();
        if (this._state !== 'closed') this._state = 'idle';
      }
      this.calls.failPending(open);
      this.calls.failQueued(open);
    }
  }

  openError(): TorusError {
    const last = this._lastError ? ` (last error: ${this._lastError.message})` : '';
    return new TorusError(
      'BLOCK_UNAVAILABLE',
      `peer ${this.address} is unavailable: circuit open after ${this.breaker.failures} consecutive failures, next try in ${Math.ceil(this.breaker.retryInMs())} ms${last}`,
      { cause: this._lastError ?? undefined },
    );
  }

  // -------------------------------------------------------------------------------------------
  // Keepalive and idle close

  private startKeepalive(): void {
    this.stopKeepalive();
    const period = Math.min(...[this.o.keepaliveMs, this.o.idleCloseMs].filter((x) => x > 0));
    if (!Number.isFinite(period)) return;
    this.lastReceived = Date.now();
    this.keepaliveTimer = setInterval(() => this.keepalive(), Math.max(10, period / 2));
    this.keepaliveTimer.unref();
  }

  private stopKeepalive(): void {
    if (this.keepaliveTimer) clearInterval(this.keepaliveTimer);
    this.keepaliveTimer = null;
  }

  private keepalive(): void {
    const conn = this.conn;
    if (!conn || !conn.ready) return;
    const now = Date.now();
    if (this.o.idleCloseMs > 0 && now - this.calls.lastCall() >= this.o.idleCloseMs && this.calls.inFlight() === 0 && this.calls.queued() === 0) {
      // Nobody has needed this peer for a while: hang up rather than ping forever.
      this.dropConnection(conn, null);
      return;
    }
    if (this.o.keepaliveMs > 0 && now - this.lastReceived >= this.o.keepaliveMs && !this.pingOutstanding) {
      this.pingOutstanding = true;
      this.calls.ping().then(
        () => {
          this.pingOutstanding = false;
        },
        (err: TorusError) => {
          this.pingOutstanding = false;
          // A keepalive that times out means the connection is dead even if TCP has not
          // noticed (peer host gone, cable pulled).
          // The timeout itself was already counted as a failure.
          if (err.code === 'TIMEOUT' && this.conn === conn) this.dropConnection(conn, err, true);
        },
      );
    }
  }

  private clearTimers(): void {
    this.stopKeepalive();
    if (this.backoffTimer) clearTimeout(this.backoffTimer);
    this.backoffTimer = null;
  }
}
