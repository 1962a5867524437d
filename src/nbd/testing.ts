import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Duplex } from 'node:stream';
import { after, afterEach, before } from 'node:test';
import { BufferPool } from '../core/buffer-pool.js';
import { TorusError } from '../core/errors.js';
import {
  ClientFlag,
  Cmd,
  Info,
  Opt,
  ReplyFlag,
  ReplyType,
  ServerStreamDecoder,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  isErrorChunk,
  isErrorReply,
  parseBlockStatus,
  parseErrorChunk,
  parseInfoReply,
  parseOffsetData,
  parseOffsetHole,
  type BlockDescriptor,
  type InfoItem,
  type ServerMessage,
} from './codec.js';

// Test support for the NBD server: an in-process byte pipe with socket-like flow control and
// arbitrary fragmentation, and a small NBD client built on the codec. Used by the unit tests
// here and, later, by anyone testing a volume behind the server without ports (STYLE habit 8).

/** Waits until `fn` gives the same value over `ms`: the server has stopped making progress. */
export async function settled<T>(fn: () => T, ms = 100): Promise<T> {
  let last = fn();
  for (;;) {
    await new Promise((r) => setTimeout(r, ms));
    const now = fn();
    if (now === last) return now;
    last = now;
  }
}

export interface PipeOptions {
  /** Bytes the reading side buffers before the writer is held back (like a socket's buffers). */
  readonly highWaterMark?: number;
  /**
   * Cuts every written buffer into pieces of these sizes (cycled), as TCP may: a decoder that
   * only works on whole messages fails here. Default: delivered as written.
   */
  readonly fragments?: readonly number[];
}

class PipeEnd extends Duplex {
  peer: PipeEnd | null = null;
  /** The writer's callback, held while this end's reader is full. */
  private held: (() => void) | null = null;
  private cut = 0;

  constructor(
    hwm: number,
    private readonly fragments: readonly number[],
  ) {
    super({ readableHighWaterMark: hwm, writableHighWaterMark: hwm, allowHalfOpen: true });
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    const peer = this.peer;
    if (!peer || peer.destroyed) {
      cb(new Error('pipe closed'));
      return;
    }
    // Copied: a socket never gives the reader the writer's memory, and the codec relies on it.
    const data = Buffer.from(chunk);
    let more = true;
    if (this.fragments.length === 0) more = peer.push(data);
    else {
      for (let at = 0; at < data.length; ) {
        const n = Math.max(1, this.fragments[this.cut++ % this.fragments.length] ?? 1);
        more = peer.push(data.subarray(at, at + n));
        at += n;
      }
    }
    if (more) cb();
    else peer.held = () => cb();
  }

  override _read(): void {
    const h = this.held;
    this.held = null;
    h?.();
  }

  override _final(cb: (err?: Error | null) => void): void {
    this.peer?.push(null);
    cb();
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    const peer = this.peer;
    this.peer = null;
    const h = this.held;
    this.held = null;
    h?.();
    if (peer) {
      peer.peer = null;
      if (!peer.destroyed) process.nextTick(() => peer.destroy());
    }
    cb(err);
  }
}

/** Two connected ends: bytes written to one are read from the other. Destroying one closes both. */
export function createPipe(options: PipeOptions = {}): [Duplex, Duplex] {
  const hwm = options.highWaterMark ?? 64 * 1024;
  const a = new PipeEnd(hwm, options.fragments ?? []);
  const b = new PipeEnd(hwm, options.fragments ?? []);
  a.peer = b;
  b.peer = a;
  return [a, b];
}

export interface Reply {
  /** 0 on success; for structured replies the first error chunk's error. */
  readonly error: number;
  readonly message?: string;
  /** READ: the assembled data (holes as zeros). */
  readonly data?: Buffer;
  /** BLOCK_STATUS: the descriptors of the (only) context. */
  readonly extents?: BlockDescriptor[];
  readonly contextId?: number;
  /** Chunk types in arrival order (structured replies). */
  readonly chunkTypes: number[];
  /** Offsets of ERROR_OFFSET chunks. */
  readonly errorOffsets: number[];
}

export interface OptionReply {
  readonly option: number;
  readonly replyType: number;
  readonly data: Buffer;
}

interface Pending {
  readonly command: number;
  readonly offset: number;
  readonly length: number;
  data: Buffer | undefined;
  error: number;
  message: string | undefined;
  extents: BlockDescriptor[] | undefined;
  contextId: number | undefined;
  readonly chunkTypes: number[];
  readonly errorOffsets: number[];
  readonly resolve: (r: Reply) => void;
  readonly reject: (e: Error) => void;
}

export interface GoResult {
  readonly size: number;
  readonly flags: number;
  readonly infos: InfoItem[];
  readonly metaContexts: { id: number; name: string }[];
}

/**
 * A minimal NBD client for tests. Handshake steps are explicit so tests can send anything in any
 * order; `raw` writes bytes as they are, for the bad-input tests.
 */
export class TestClient {
  readonly decoder: ServerStreamDecoder;
  structured = false;
  private readonly queue: ServerMessage[] = [];
  private waiter: { resolve: (m: ServerMessage) => void; reject: (e: Error) => void } | null = null;
  private readonly pending = new Map<bigint, Pending>();
  private nextHandle = 1n;
  private closedError: Error | null = null;
  /** Resolves when the connection has closed (either side). */
  readonly closed: Promise<void>;

  constructor(readonly stream: Duplex) {
    this.decoder = new ServerStreamDecoder({ simpleReplyDataLength: (h) => this.simpleDataLength(h) });
    let onClosed!: () => void;
    this.closed = new Promise((r) => (onClosed = r));
    stream.on('data', (chunk: Buffer) => this.onData(chunk));
    stream.on('error', () => {});
    stream.on('close', () => {
      this.fail(new Error('connection closed'));
      onClosed();
    });
  }

  /** A client wired to `accept` (e.g. `(s) => server.handle(s)`) through an in-process pipe. */
  static connect(accept: (serverSide: Duplex) => unknown, options: PipeOptions = {}): TestClient {
    const [client, server] = createPipe(options);
    accept(server);
    return new TestClient(client);
  }

  get isClosed(): boolean {
    return this.closedError !== null;
  }

  private simpleDataLength(handle: bigint): number {
    const p = this.pending.get(handle);
    return p && p.command === Cmd.READ ? p.length : 0;
  }

  private onData(chunk: Buffer): void {
    this.decoder.push(chunk);
    try {
      for (let m = this.decoder.next(); m; m = this.decoder.next()) this.onMessage(m);
    } catch (err) {
      this.fail(err instanceof Error ? err : new Error(String(err)));
      this.stream.destroy();
    }
  }

  private onMessage(m: ServerMessage): void {
    if (m.type === 'simpleReply' || m.type === 'chunk') return this.onReply(m);
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve(m);
    } else this.queue.push(m);
  }

  private fail(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(err);
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  /** The next handshake-phase message. */
  nextMessage(): Promise<ServerMessage> {
    const m = this.queue.shift();
    if (m) return Promise.resolve(m);
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => (this.waiter = { resolve, reject }));
  }

  raw(bytes: Uint8Array | Uint8Array[]): void {
    for (const b of Array.isArray(bytes) ? bytes : [bytes]) this.stream.write(b);
  }

  /** Reads the greeting and answers with client flags. */
  async handshake(flags: number = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES): Promise<number> {
    const g = await this.nextMessage();
    if (g.type !== 'greeting') throw new Error(`expected greeting, got ${g.type}`);
    this.raw(encodeClientFlags(flags));
    return g.handshakeFlags;
  }

  /** Sends an option and collects replies up to the final one (ACK or an error). */
  async option(option: number, data: Buffer = Buffer.alloc(0)): Promise<OptionReply[]> {
    this.raw(encodeOption(option, data));
    const out: OptionReply[] = [];
    for (;;) {
      const m = await this.nextMessage();
      if (m.type !== 'optionReply') throw new Error(`expected an option reply, got ${m.type}`);
      out.push({ option: m.option, replyType: m.replyType, data: m.data });
      if (m.replyType === 1 || isErrorReply(m.replyType)) return out;
    }
  }

  async structuredReplies(): Promise<number> {
    const r = await this.option(Opt.STRUCTURED_REPLY);
    const last = r[r.length - 1];
    if (last?.replyType === 1) this.structured = true;
    return last?.replyType ?? 0;
  }

  async setMetaContext(name: string, queries: string[]): Promise<OptionReply[]> {
    return this.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest({ name, queries }));
  }

  /** INFO or GO; throws with the reply type when the server refuses. */
  async info(name: string, requests: number[] = [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE], go = false): Promise<GoResult> {
    const r = await this.option(go ? Opt.GO : Opt.INFO, encodeInfoRequest({ name, requests }));
    const last = r[r.length - 1];
    if (!last || last.replyType !== 1) throw new TorusError('NOT_EXIST', `server refused with reply type 0x${(last?.replyType ?? 0).toString(16)}: ${last?.data.toString() ?? ''}`);
    const infos = r.filter((x) => x.replyType === 3).map((x) => parseInfoReply(x.data)).filter((x): x is InfoItem => x !== undefined);
    const exp = infos.find((i) => i.type === Info.EXPORT);
    if (!exp || exp.type !== Info.EXPORT) throw new Error('no NBD_INFO_EXPORT in a successful reply');
    if (go) this.decoder.startTransmission();
    return { size: exp.size, flags: exp.flags, infos, metaContexts: [] };
  }

  /** The usual modern sequence: structured replies, base:allocation, GO. */
  async go(name: string, opts: { structured?: boolean; meta?: boolean } = {}): Promise<GoResult> {
    await this.handshake();
    const metaContexts: { id: number; name: string }[] = [];
    if (opts.structured ?? true) {
      await this.structuredReplies();
      if (opts.meta ?? true) {
        for (const r of await this.setMetaContext(name, ['base:allocation']))
          if (r.replyType === 4) metaContexts.push({ id: r.data.readUInt32BE(0), name: r.data.subarray(4).toString() });
      }
    }
    const res = await this.info(name, [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE], true);
    return { ...res, metaContexts };
  }

  /** NBD_OPT_EXPORT_NAME: no error reply exists, so a refusal shows as the connection closing. */
  async exportName(name: string, noZeroes = true): Promise<{ size: number; flags: number }> {
    this.decoder.expectExportName(noZeroes);
    this.raw(encodeOption(Opt.EXPORT_NAME, Buffer.from(name)));
    const m = await this.nextMessage();
    if (m.type !== 'exportName') throw new Error(`expected the EXPORT_NAME reply, got ${m.type}`);
    return { size: m.size, flags: m.flags };
  }

  /** Sends a request; resolves with its whole reply. */
  request(command: number, opts: { offset?: number; length?: number; flags?: number; payload?: Buffer; handle?: bigint } = {}): Promise<Reply> {
    const handle = opts.handle ?? this.nextHandle++;
    const offset = opts.offset ?? 0;
    const length = opts.length ?? opts.payload?.length ?? 0;
    const p = this.expectReply(handle, command, offset, length);
    const req = { flags: opts.flags ?? 0, command, handle, offset, length, ...(opts.payload ? { payload: opts.payload } : {}) };
    if (!this.closedError) this.raw(encodeRequest(req));
    return p;
  }

  /** Registers interest in the reply to a request sent some other way (e.g. with `raw`). */
  expectReply(handle: bigint, command: number, offset: number, length: number): Promise<Reply> {
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise<Reply>((resolve, reject) => {
      this.pending.set(handle, {
        command,
        offset,
        length,
        data: undefined,
        error: 0,
        message: undefined,
        extents: undefined,
        contextId: undefined,
        chunkTypes: [],
        errorOffsets: [],
        resolve,
        reject,
      });
    });
  }

  read(offset: number, length: number, flags = 0): Promise<Reply> {
    return this.request(Cmd.READ, { offset, length, flags });
  }

  write(offset: number, payload: Buffer, flags = 0): Promise<Reply> {
    return this.request(Cmd.WRITE, { offset, payload, flags });
  }

  disconnect(): void {
    this.raw(encodeRequest({ flags: 0, command: Cmd.DISC, handle: this.nextHandle++, offset: 0, length: 0 }));
  }

  private onReply(m: Extract<ServerMessage, { type: 'simpleReply' | 'chunk' }>): void {
    const p = this.pending.get(m.handle);
    if (!p) throw new TorusError('PROTOCOL', `reply for unknown handle ${m.handle}`);
    if (m.type === 'simpleReply') {
      this.pending.delete(m.handle);
      p.resolve({ error: m.error, ...(m.data ? { data: m.data } : p.command === Cmd.READ && m.error === 0 ? { data: Buffer.alloc(0) } : {}), chunkTypes: [], errorOffsets: [] });
      return;
    }
    p.chunkTypes.push(m.replyType);
    if (isErrorChunk(m.replyType)) {
      const e = parseErrorChunk(m.replyType, m.payload);
      if (p.error === 0) {
        p.error = e.error;
        p.message = e.message;
      }
      if (e.offset !== undefined) p.errorOffsets.push(e.offset);
    } else if (m.replyType === ReplyType.OFFSET_DATA || m.replyType === ReplyType.OFFSET_HOLE) {
      p.data ??= Buffer.alloc(p.length);
      if (m.replyType === ReplyType.OFFSET_DATA) {
        const { offset, data } = parseOffsetData(m.payload);
        if (offset < p.offset || offset + data.length > p.offset + p.length) throw new TorusError('PROTOCOL', 'data chunk outside the request');
        p.data.set(data, offset - p.offset);
      } else {
        const { offset, size } = parseOffsetHole(m.payload);
        if (offset < p.offset || offset + size > p.offset + p.length) throw new TorusError('PROTOCOL', 'hole chunk outside the request');
        p.data.fill(0, offset - p.offset, offset - p.offset + size);
      }
    } else if (m.replyType === ReplyType.BLOCK_STATUS) {
      const bs = parseBlockStatus(m.payload);
      p.extents = bs.descriptors;
      p.contextId = bs.contextId;
    } else if (m.replyType !== ReplyType.NONE) throw new TorusError('PROTOCOL', `unknown chunk type ${m.replyType}`);
    if ((m.flags & ReplyFlag.DONE) === 0) return;
    this.pending.delete(m.handle);
    const data = p.command === Cmd.READ && p.error === 0 ? (p.data ?? Buffer.alloc(0)) : p.data;
    p.resolve({
      error: p.error,
      ...(p.message !== undefined ? { message: p.message } : {}),
      ...(data ? { data } : {}),
      ...(p.extents ? { extents: p.extents } : {}),
      ...(p.contextId !== undefined ? { contextId: p.contextId } : {}),
      chunkTypes: p.chunkTypes,
      errorOffsets: p.errorOffsets,
    });
  }
}

/**
 * For a test file whose servers listen on unix sockets with pooled buffers poisoned (a buffer
 * given back while still in use then reads as garbage): a fresh socket path per call, `cleanups`
 * run last first after each test, and the poison and the socket directory undone at the end.
 */
export function poisonedSockets(prefix: string): { path(): string; readonly cleanups: (() => Promise<unknown> | void)[] } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  let sockets = 0;
  const cleanups: (() => Promise<unknown> | void)[] = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });
  const poisoned = BufferPool.poison;
  before(() => (BufferPool.poison = true));
  after(() => {
    BufferPool.poison = poisoned;
    rmSync(dir, { recursive: true, force: true });
  });
  return { path: () => join(dir, `s${sockets++}.sock`), cleanups };
}
