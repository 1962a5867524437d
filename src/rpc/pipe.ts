import { Duplex } from 'node:stream';

// An in-process transport: two Duplex ends where bytes written to one are read from the other,
// with the flow control of a socket (a writer whose peer stops reading is held back) and the
// teardown of one (destroying an end closes both). Used to run servers and clients in one
// process without ports, the way hypercore's tests pipe two streams together.
//
// Every chunk is copied on write. A socket never hands the reader the writer's memory, and the
// codec relies on that (a payload view given to storage must not be the sender's buffer).

export interface PipeOptions {
  /** Bytes buffered on the reading side before the writer is held back. */
  readonly highWaterMark?: number;
}

class PipeEnd extends Duplex {
  peer: PipeEnd | null = null;
  private blocked: (() => void) | null = null;

  constructor(hwm: number) {
    super({ readableHighWaterMark: hwm, writableHighWaterMark: hwm, allowHalfOpen: true });
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    this.deliver(Buffer.from(chunk), cb);
  }

  override _writev(chunks: { chunk: Buffer }[], cb: (err?: Error | null) => void): void {
    this.deliver(
      Buffer.concat(chunks.map((c) => c.chunk)),
      cb,
    );
  }

  private deliver(copy: Buffer, cb: (err?: Error | null) => void): void {
    const peer = this.peer;
    if (!peer || peer.destroyed) {
      cb(new Error('pipe peer closed'));
      return;
    }
    // Hold the write callback until the reader asks for more: that is the backpressure.
    if (peer.push(copy)) cb();
    else peer.blocked = () => cb();
  }

  override _read(): void {
    const b = this.blocked;
    if (b) {
      this.blocked = null;
      b();
    }
  }

  override _final(cb: (err?: Error | null) => void): void {
    this.peer?.push(null);
    cb();
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    const peer = this.peer;
    this.peer = null;
    const b = this.blocked;
    this.blocked = null;
    b?.();
    if (peer && !peer.destroyed) process.nextTick(() => peer.destroy());
    cb(err);
  }
}

/** Two connected Duplex ends. */
export function createPipe(options: PipeOptions = {}): [Duplex, Duplex] {
  const hwm = options.highWaterMark ?? 64 * 1024;
  const a = new PipeEnd(hwm);
  const b = new PipeEnd(hwm);
  a.peer = b;
  b.peer = a;
  return [a, b];
}

/**
 * Makes a pipe, gives one end to `accept` (e.g. `(s) => server.handle(s)`), returns the other.
 * Fits PeerClientOptions.connect.
 */
export function connectPipe(accept: (serverSide: Duplex) => void, options: PipeOptions = {}): Duplex {
  const [client, server] = createPipe(options);
  accept(server);
  return client;
}
