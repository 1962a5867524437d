import { TorusError } from './errors.js';

/**
 * Reused memory for payloads that arrive at a steady size (a peer's PUT frames: one block, or a
 * rebalancer's batch). Node allocates a buffer of that size outside its own pool, so a fresh
 * one per frame costs page faults, zeroing by the kernel and garbage collection; a buffer taken
 * from here was touched before and is handed back when the last holder of its lease is done.
 *
 * Buffers are kept by exact size (a process sees a handful of frame sizes), and at most
 * `maxIdleBytes` of them wait idle; a size not asked for in a while simply ages out.
 */
export class BufferPool {
  /** Tests set this (or TORUS_POISON_BUFFERS=1): released memory is overwritten at once, so a holder that reads it after release sees garbage and fails loudly. */
  static poison = process.env.TORUS_POISON_BUFFERS === '1';
  static readonly POISON_BYTE = 0xdb;

  private readonly idle = new Map<number, Buffer[]>();
  private idleBytes = 0;
  /** Buffers taken and not yet released, for tests and metrics. */
  outstanding = 0;
  reused = 0;
  allocated = 0;

  constructor(readonly maxIdleBytes: number) {}

  /** A buffer of exactly `size` bytes (contents undefined) and its lease, held once. */
  take(size: number): BufferLease {
    const list = this.idle.get(size);
    let buf = list?.pop();
    if (buf !== undefined) {
      this.idleBytes -= size;
      this.reused++;
    } else {
      buf = Buffer.allocUnsafeSlow(size);
      this.allocated++;
    }
    this.outstanding++;
    return new BufferLease(this, buf);
  }

  /** @internal */
  giveBack(buf: Buffer): void {
    this.outstanding--;
    if (BufferPool.poison) buf.fill(BufferPool.POISON_BYTE);
    if (this.idleBytes + buf.length > this.maxIdleBytes) {
      // Make room by dropping other sizes first: the size just released is the one in use.
      for (const [size, list] of this.idle) {
        if (size === buf.length) continue;
        while (list.length > 0 && this.idleBytes + buf.length > this.maxIdleBytes) {
          list.pop();
          this.idleBytes -= size;
        }
        if (list.length === 0) this.idle.delete(size);
      }
      if (this.idleBytes + buf.length > this.maxIdleBytes) return;
    }
    let list = this.idle.get(buf.length);
    if (list === undefined) this.idle.set(buf.length, (list = []));
    list.push(buf);
    this.idleBytes += buf.length;
  }

  get idleByteCount(): number {
    return this.idleBytes;
  }
}

/** A counted claim on a pooled buffer: the buffer goes back to its pool when the count reaches 0. */
export class BufferLease {
  private refs = 1;

  constructor(
    private readonly pool: BufferPool,
    readonly buffer: Buffer,
  ) {}

  retain(): this {
    if (this.refs <= 0) throw new TorusError('INTERNAL', 'retain of a pooled buffer already released');
    this.refs++;
    return this;
  }

  release(): void {
    if (this.refs <= 0) throw new TorusError('INTERNAL', 'pooled buffer released twice');
    if (--this.refs === 0) this.pool.giveBack(this.buffer);
  }
}
