// A byte-bounded cache that a scan cannot empty: S3-FIFO (Yang et al., "FIFO queues are all you
// need for cache eviction", SOSP 2023).
//
// The read cache of the distributor keeps blocks fetched from other nodes. An LRU lets every
// block a sequential read passes over push out what random reads keep coming back to, and pays
// for keeping each of those blocks (a 64 KiB buffer the collector tracks) though it is never
// read again: P2 measured a tenth of the serving node's CPU in that (docs/performance.md,
// fifteenth round). Here a new entry goes into a small FIFO (a tenth of the bytes); only one read
// again while there moves to the main FIFO. One evicted from the small queue unread leaves its
// key in a ghost queue, and comes back straight into the main one if it is read again soon, so a
// working set somewhat larger than the small queue still settles in. The main queue gives an
// entry read since it last reached the head another turn (up to three). A hit only bumps a
// counter: no list is touched.

interface Entry<K, V> {
  readonly key: K;
  value: V | undefined;
  size: number;
  /** Reads since it entered its queue or last passed the main queue's head (0..3). */
  freq: number;
  main: boolean;
  /** Deleted while still in its queue: skipped when it reaches the head. */
  dead: boolean;
  next: Entry<K, V> | undefined;
}

class Queue<K, V> {
  head: Entry<K, V> | undefined;
  tail: Entry<K, V> | undefined;
  bytes = 0;

  push(e: Entry<K, V>): void {
    e.next = undefined;
    if (this.tail) this.tail.next = e;
    else this.head = e;
    this.tail = e;
    this.bytes += e.size;
  }

  /** The oldest live entry, taken out of the queue (its bytes too). */
  pop(): Entry<K, V> | undefined {
    for (;;) {
      const e = this.head;
      if (!e) return undefined;
      this.head = e.next;
      if (!this.head) this.tail = undefined;
      e.next = undefined;
      if (e.dead) continue;
      this.bytes -= e.size;
      return e;
    }
  }
}

/** Keys recently evicted unread from the small queue: a fixed ring, so the oldest goes in O(1). */
class Ghosts<K> {
  private readonly ring: (K | undefined)[];
  private readonly at = new Map<K, number>();
  private n = 0;

  constructor(capacity: number) {
    this.ring = new Array<K | undefined>(Math.max(1, capacity));
  }

  add(key: K): void {
    const i = this.n++ % this.ring.length;
    const old = this.ring[i];
    if (old !== undefined && this.at.get(old) === i) this.at.delete(old);
    this.ring[i] = key;
    this.at.set(key, i);
  }

  /** Whether `key` is remembered; forgets it either way. */
  take(key: K): boolean {
    return this.at.delete(key);
  }
}

export class S3FifoCache<K, V> {
  private readonly map = new Map<K, Entry<K, V>>();
  private readonly small = new Queue<K, V>();
  private readonly main = new Queue<K, V>();
  private readonly ghosts: Ghosts<K>;
  private readonly smallBytes: number;
  hits = 0;
  misses = 0;

  constructor(
    private readonly capacityBytes: number,
    /** What an entry counts against the capacity. */
    private readonly sizeOf: (value: V) => number,
    /** About how big a typical entry is: the ghost queue remembers as many keys as the cache holds such entries. */
    typicalSize = 4096,
  ) {
    this.smallBytes = Math.floor(capacityBytes / 10);
    this.ghosts = new Ghosts<K>(Math.ceil(capacityBytes / Math.max(1, typicalSize)));
  }

  get(key: K): V | undefined {
    const e = this.map.get(key);
    if (e === undefined) {
      this.misses++;
      return undefined;
    }
    this.hits++;
    if (e.freq < 3) e.freq++;
    return e.value;
  }

  set(key: K, value: V): void {
    const size = this.sizeOf(value);
    if (size > this.capacityBytes) return;
    const old = this.map.get(key);
    if (old) {
      (old.main ? this.main : this.small).bytes += size - old.size;
      old.value = value;
      old.size = size;
    } else {
      const main = this.ghosts.take(key);
      const e: Entry<K, V> = { key, value, size, freq: 0, main, dead: false, next: undefined };
      this.map.set(key, e);
      (main ? this.main : this.small).push(e);
    }
    while (this.small.bytes + this.main.bytes > this.capacityBytes) this.evict();
  }

  delete(key: K): void {
    const e = this.map.get(key);
    if (!e) return;
    this.map.delete(key);
    e.dead = true;
    e.value = undefined;
    (e.main ? this.main : this.small).bytes -= e.size;
  }

  get size(): number {
    return this.map.size;
  }

  get usedBytes(): number {
    return this.small.bytes + this.main.bytes;
  }

  private evict(): void {
    if (this.small.bytes > this.smallBytes || this.main.head === undefined) {
      const e = this.small.pop();
      if (!e) return;
      if (e.freq > 0) {
        // Read again while on probation: into the main queue.
        e.freq = 0;
        e.main = true;
        this.main.push(e);
      } else {
        this.map.delete(e.key);
        this.ghosts.add(e.key);
      }
      return;
    }
    const e = this.main.pop();
    if (!e) return;
    if (e.freq > 0) {
      e.freq--;
      this.main.push(e);
    } else {
      this.map.delete(e.key);
    }
  }
}

/** Whole blocks and block chunks by key: blocks are immutable, so an entry never needs invalidating. */
export class BlockCache extends S3FifoCache<string, Buffer> {
  constructor(capacityBytes: number) {
    super(capacityBytes, (b) => b.length);
  }
}
