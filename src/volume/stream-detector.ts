// Tells the reads of a sequential stream from the rest, so that a stream does not fill the read
// cache with blocks it will not read again and push out what random reads come back to (the
// weakness of a plain LRU; the kernel's page cache and ZFS's ARC treat streams the same way).
//
// A read continues a stream when it starts at, or a little after, where one of the last few
// reads ended: several streams at once are recognised, and so is a queue of requests served a
// little out of order (a read whose predecessor is still in flight lands a few lengths ahead of
// the last end seen). A read starting before an end is not a stream: re-reading a hot range must
// keep it cached. A random read lands in one of those small windows almost never.

const SLOTS = 16;
/** How far past a recent end a read may start, in lengths of the read: about a queue's depth. */
const AHEAD = 8;

export class StreamDetector {
  private readonly ends = new Float64Array(SLOTS).fill(-Infinity);
  private next = 0;

  /** Whether [offset, offset + length) continues a recent read; remembers where it ends either way. */
  note(offset: number, length: number): boolean {
    const ends = this.ends;
    const reach = AHEAD * length;
    let sequential = false;
    for (let i = 0; i < SLOTS; i++) {
      const gap = offset - ends[i]!;
      if (gap >= 0 && gap <= reach) {
        sequential = true;
        break;
      }
    }
    ends[this.next] = offset + length;
    this.next = (this.next + 1) % SLOTS;
    return sequential;
  }
}
