// A byte-bounded LRU of whole blocks. Blocks are immutable, so an entry never needs invalidating:
// a ref names the same bytes forever. A Map iterates in insertion order, which is all an LRU needs.

export class BlockCache {
  private readonly map = new Map<string, Buffer>();
  private bytes = 0;
  hits = 0;
  misses = 0;

  constructor(private readonly capacityBytes: number) {}

  get(key: string): Buffer | undefined {
    const v = this.map.get(key);
    if (v === undefined) {
      this.misses++;
      return undefined;
    }
    this.hits++;
    this.map.delete(key);
    this.map.set(key, v);
    return v;
  }

  set(key: string, value: Buffer): void {
    if (value.length > this.capacityBytes) return;
    const old = this.map.get(key);
    if (old) {
      this.map.delete(key);
      this.bytes -= old.length;
    }
    this.map.set(key, value);
    this.bytes += value.length;
    while (this.bytes > this.capacityBytes) {
      const first = this.map.keys().next();
      if (first.done) break;
      const v = this.map.get(first.value);
      this.map.delete(first.value);
      this.bytes -= v?.length ?? 0;
    }
  }

  delete(key: string): void {
    const v = this.map.get(key);
    if (v) {
      this.map.delete(key);
      this.bytes -= v.length;
    }
  }

  get size(): number {
    return this.map.size;
  }

  get usedBytes(): number {
    return this.bytes;
  }
}
