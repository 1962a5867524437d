/**
 * Small buffers carved one after another from shared slabs, as Buffer.allocUnsafe does for its
 * own pool (which stops short of 4 KiB, the size of a random read): one ArrayBuffer, and one
 * backing store for the collector to track, per `slabSize / n` buffers instead of one each.
 *
 * A view keeps its whole slab alive, so only buffers that live briefly may come from here (a read
 * on its way into a reply). Whatever keeps bytes for longer copies them (the distributor's cache
 * does, with ownBuffer).
 */
export class SlabAllocator {
  private slab: Buffer = Buffer.alloc(0);
  private pos = 0;

  /** Sizes above `max` get a buffer of their own; `max` must be well under `slabSize`. */
  constructor(
    private readonly slabSize: number,
    readonly max: number,
  ) {}

  alloc(n: number): Buffer {
    if (n > this.max) return Buffer.allocUnsafe(n);
    if (this.slab.length - this.pos < n) {
      this.slab = Buffer.allocUnsafeSlow(this.slabSize);
      this.pos = 0;
    }
    const b = this.slab.subarray(this.pos, this.pos + n);
    // 8-byte aligned, as Node's pool keeps its slices, so typed-array views of them stay legal.
    this.pos = (this.pos + n + 7) & ~7;
    return b;
  }
}
