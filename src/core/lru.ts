// A byte-bounded LRU: the client's cache of blocks and block chunks, a storage node's cache of
// checksum arrays.
//
// Recency is a doubly linked list beside the Map. A Map alone (delete and re-insert to refresh,
// evict from keys().next()) looks like an LRU, but V8 leaves a hole per deletion at the front of
// its table, and every eviction's iterator walks over them until the next rehash: with 16k 4 KiB
// chunks under random reads that cost 7.3 µs per lookup, against 0.7 µs with the list.

interface Entry<K, V> {
  readonly key: K;
  value: V;
  prev: Entry<K, V> | undefined;
  next: Entry<K, V> | undefined;
}

export class LruCache<K, V> {
  private readonly map = new Map<K, Entry<K, V>>();
  /** Least recently used end. */
  private head: Entry<K, V> | undefined;
  /** Most recently used end. */
  private tail: Entry<K, V> | undefined;
  private bytes = 0;
  hits = 0;
  misses = 0;

  constructor(
    private readonly capacityBytes: number,
    /** What an entry counts against the capacity. */
    private readonly sizeOf: (value: V) => number,
  ) {}

  get(key: K): V | undefined {
    const e = this.map.get(key);
    if (e === undefined) {
      this.misses++;
      return undefined;
    }
    this.hits++;
    if (e !== this.tail) {
      this.unlink(e);
      this.append(e);
    }
    return e.value;
  }

  set(key: K, value: V): void {
    const size = this.sizeOf(value);
    if (size > this.capacityBytes) return;
    const old = this.map.get(key);
    if (old) {
      this.bytes += size - this.sizeOf(old.value);
      old.value = value;
      if (old !== this.tail) {
        this.unlink(old);
        this.append(old);
      }
    } else {
      const e: Entry<K, V> = { key, value, prev: undefined, next: undefined };
      this.map.set(key, e);
      this.append(e);
      this.bytes += size;
    }
    while (this.bytes > this.capacityBytes && this.head) this.remove(this.head);
  }

  delete(key: K): void {
    const e = this.map.get(key);
    if (e) this.remove(e);
  }

  get size(): number {
    return this.map.size;
  }

  get usedBytes(): number {
    return this.bytes;
  }

  private remove(e: Entry<K, V>): void {
    this.unlink(e);
    this.map.delete(e.key);
    this.bytes -= this.sizeOf(e.value);
  }

  private unlink(e: Entry<K, V>): void {
    if (e.prev) e.prev.next = e.next;
    else this.head = e.next;
    if (e.next) e.next.prev = e.prev;
    else this.tail = e.prev;
    e.prev = e.next = undefined;
  }

  private append(e: Entry<K, V>): void {
    e.prev = this.tail;
    if (this.tail) this.tail.next = e;
    else this.head = e;
    this.tail = e;
  }
}

/** Whole blocks and block chunks by key: blocks are immutable, so an entry never needs invalidating. */
export class BlockCache extends LruCache<string, Buffer> {
  constructor(capacityBytes: number) {
    super(capacityBytes, (b) => b.length);
  }
}
