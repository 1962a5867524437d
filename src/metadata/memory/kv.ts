import { randomUUID } from 'node:crypto';
import { TorusError } from '../../core/errors.js';
import type { KVCompare, KVEntry, KVOp, KVSession, KVTxnResult, MetaKV, MetaStatus } from '../../core/interfaces.js';

// The in-memory twin of etcd's keyspace: revisions, versions, transactions and leases with the
// same meaning, so code written against MetaKV behaves the same on both.

interface Stored {
  value: string;
  modRevision: number;
  version: number;
  lease: string;
}

class MemorySession implements KVSession {
  alive = true;
  private readonly lost = new Set<() => void>();
  constructor(
    readonly id: string,
    private readonly kv: MemoryKVStore,
  ) {}
  onLost(cb: () => void): () => void {
    this.lost.add(cb);
    return () => this.lost.delete(cb);
  }
  async revoke(): Promise<void> {
    this.kv.dropLease(this.id);
    this.alive = false;
  }
  /** Tests: what a lease expiry does (keys vanish, holders are told). */
  expire(): void {
    if (!this.alive) return;
    this.kv.dropLease(this.id);
    this.alive = false;
    const cbs = [...this.lost];
    this.lost.clear();
    for (const cb of cbs) cb();
  }
}

export class MemoryKVStore implements MetaKV {
  private readonly data = new Map<string, Stored>();
  private revision = 1;
  /** History before this revision is forgotten (this twin keeps none; it records the request). */
  compactedRevision = 0;
  readonly sessions = new Map<string, MemorySession>();

  private entry(key: string, s: Stored): KVEntry {
    return { key, value: s.value, modRevision: s.modRevision, version: s.version, lease: s.lease };
  }

  private range(key: string, prefix: boolean): KVEntry[] {
    if (!prefix) {
      const s = this.data.get(key);
      return s ? [this.entry(key, s)] : [];
    }
    return [...this.data]
      .filter(([k]) => k.startsWith(key))
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      .map(([k, s]) => this.entry(k, s));
  }

  async get(key: string): Promise<KVEntry | undefined> {
    return this.range(key, false)[0];
  }

  async list(prefix: string): Promise<{ entries: KVEntry[]; revision: number }> {
    return { entries: this.range(prefix, true), revision: this.revision };
  }

  private holds(c: KVCompare): boolean {
    const s = this.data.get(c.key);
    if (c.target === 'value') {
      // etcd compares against an absent key as a failure for value targets.
      if (!s) return false;
      return c.cmp === '==' ? s.value === c.value : s.value !== c.value;
    }
    const actual = c.target === 'version' ? (s?.version ?? 0) : (s?.modRevision ?? 0);
    switch (c.cmp) {
      case '==':
        return actual === c.value;
      case '!=':
        return actual !== c.value;
      case '<':
        return actual < c.value;
      case '>':
        return actual > c.value;
    }
  }

  async txn(compares: readonly KVCompare[], success: readonly KVOp[], failure: readonly KVOp[] = []): Promise<KVTxnResult> {
    const ok = compares.every((c) => this.holds(c));
    const ops = ok ? success : failure;
    const gets: KVEntry[][] = [];
    const writes = ops.some((o) => o.op !== 'get');
    const rev = writes ? this.revision + 1 : this.revision;
    for (const o of ops) {
      if (o.op === 'get') gets.push(this.range(o.key, o.prefix ?? false));
      else if (o.op === 'put') {
        if (o.session && !o.session.alive) throw new Error(`lease ${o.session.id} not found`);
        const prev = this.data.get(o.key);
        this.data.set(o.key, { value: o.value, modRevision: rev, version: (prev?.version ?? 0) + 1, lease: o.session?.id ?? '' });
      } else {
        for (const e of this.range(o.key, o.prefix ?? false)) this.data.delete(e.key);
      }
    }
    this.revision = rev;
    return { succeeded: ok, revision: this.revision, gets };
  }

  async session(_ttlMs: number): Promise<KVSession> {
    const s = new MemorySession(randomUUID(), this);
    this.sessions.set(s.id, s);
    return s;
  }

  async status(): Promise<MetaStatus> {
    let bytes = 0;
    for (const [k, s] of this.data) bytes += k.length + s.value.length;
    return { revision: this.revision, dbSizeBytes: bytes };
  }

  async compact(revision: number): Promise<void> {
    if (revision > this.revision) throw new TorusError('INTERNAL', `etcd compact: etcd: mvcc: required revision is a future revision`);
    this.compactedRevision = Math.max(this.compactedRevision, revision);
  }

  dropLease(id: string): void {
    const dead = [...this.data].filter(([, s]) => s.lease === id).map(([k]) => k);
    if (dead.length > 0) {
      this.revision++;
      for (const k of dead) this.data.delete(k);
    }
    this.sessions.delete(id);
  }

  /** Tests: expire every live session, as a partition from etcd longer than the TTL would. */
  expireAll(): void {
    for (const s of [...this.sessions.values()]) s.expire();
  }

  clear(prefix: string): void {
    for (const k of [...this.data.keys()]) if (k.startsWith(prefix)) this.data.delete(k);
    this.revision++;
  }
}
