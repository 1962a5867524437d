import type { IKeyValue, IRequestOp, ITxnResponse } from 'etcd3';
import type { KVCompare, KVEntry, KVOp, KVSession, KVTxnResult, MetaKV, MetaStatus } from '../../core/interfaces.js';
import type { EtcdEndpoints } from './endpoints.js';
import { EtcdLease } from './lease.js';

// MetaKV on etcd's own transaction API, so the volume layer's compare-and-swap and fencing are
// exactly etcd's semantics: one revision, all or nothing.

/** The range end that makes `key` a prefix: the key with its last byte incremented. */
export function prefixEnd(prefix: string): Buffer {
  const b = Buffer.from(prefix);
  for (let i = b.length - 1; i >= 0; i--) {
    if (b[i]! < 0xff) {
      const end = Buffer.from(b.subarray(0, i + 1));
      end[i]!++;
      return end;
    }
  }
  return Buffer.from([0]);
}

function entry(kv: IKeyValue): KVEntry {
  return {
    key: kv.key.toString(),
    value: kv.value.toString(),
    modRevision: Number(kv.mod_revision),
    version: Number(kv.version),
    lease: kv.lease === '0' ? '' : String(kv.lease),
  };
}

const CMP = { '==': 'Equal', '!=': 'NotEqual', '<': 'Less', '>': 'Greater' } as const;

function requestOp(o: KVOp): IRequestOp {
  switch (o.op) {
    case 'put':
      return { request_put: { key: Buffer.from(o.key), value: Buffer.from(o.value), ...(o.session ? { lease: o.session.id } : {}) } };
    case 'delete':
      return { request_delete_range: { key: Buffer.from(o.key), ...(o.prefix ? { range_end: prefixEnd(o.key) } : {}) } };
    case 'get':
      return { request_range: { key: Buffer.from(o.key), ...(o.prefix ? { range_end: prefixEnd(o.key) } : {}) } };
  }
}

/** Every key under `key` (or the key alone), read at one revision from any member. */
export async function rangeOf(ep: EtcdEndpoints, what: string, key: string, prefix: boolean): Promise<{ entries: KVEntry[]; revision: number }> {
  const res = await ep.call(what, 'idempotent', (c, o) => c.kv.range({ key: Buffer.from(key), ...(prefix ? { range_end: prefixEnd(key) } : {}) }, o));
  return { entries: res.kvs.map(entry), revision: Number(res.header.revision) };
}

/**
 * A transaction. Sent to another member only if none can have received it (see endpoints.ts);
 * `idempotent` only for one whose second application changes nothing (a plain put or delete of
 * keys only this process writes).
 */
export async function txnOf(
  ep: EtcdEndpoints,
  what: string,
  compares: readonly KVCompare[],
  success: readonly KVOp[],
  failure: readonly KVOp[] = [],
  kind: 'once' | 'idempotent' = 'once',
  timeoutMs?: number,
): Promise<KVTxnResult> {
  const compare = compares.map((c) => {
    const base = { key: Buffer.from(c.key), result: CMP[c.cmp] };
    if (c.target === 'value') return { ...base, target: 'Value' as const, value: Buffer.from(c.value) };
    if (c.target === 'mod') return { ...base, target: 'Mod' as const, mod_revision: String(c.value) };
    return { ...base, target: 'Version' as const, version: String(c.value) };
  });
  const res: ITxnResponse = await ep.call(
    what,
    kind,
    (c, o) => c.kv.txn({ compare, success: success.map(requestOp), failure: failure.map(requestOp) }, o),
    timeoutMs,
  );
  const ran = res.succeeded ? success : failure;
  const gets: KVEntry[][] = [];
  ran.forEach((o, i) => {
    if (o.op === 'get') gets.push((res.responses[i]?.response_range?.kvs ?? []).map(entry));
  });
  return { succeeded: res.succeeded, revision: Number(res.header.revision), gets };
}

export class EtcdKV implements MetaKV {
  constructor(private readonly ep: EtcdEndpoints) {}

  async get(key: string): Promise<KVEntry | undefined> {
    return (await rangeOf(this.ep, 'get', key, false)).entries[0];
  }

  list(prefix: string): Promise<{ entries: KVEntry[]; revision: number }> {
    return rangeOf(this.ep, 'list', prefix, true);
  }

  txn(compares: readonly KVCompare[], success: readonly KVOp[], failure: readonly KVOp[] = [], opts: { timeoutMs?: number } = {}): Promise<KVTxnResult> {
    return txnOf(this.ep, 'transaction', compares, success, failure, 'once', opts.timeoutMs);
  }

  async session(ttlMs: number): Promise<KVSession> {
    const lease = await EtcdLease.grant(this.ep, ttlMs);
    lease.keepAlive();
    return {
      id: lease.id,
      get alive() {
        return lease.alive;
      },
      onLost: (cb) => lease.onLost(cb),
      revoke: () => lease.revoke().catch(() => undefined),
    };
  }

  async status(): Promise<MetaStatus> {
    const res = await this.ep.call('status', 'idempotent', (c, o) => c.maintenance.status(o));
    return { revision: Number(res.header.revision), dbSizeBytes: Number(res.dbSize) };
  }

  async compact(revision: number): Promise<void> {
    try {
      await this.ep.call('compact', 'idempotent', (c, o) => c.kv.compact({ revision: String(revision) }, o));
    } catch (err) {
      // Compacted already (by an earlier try of this call, another node, or etcd's own
      // auto-compaction): the history is as short as asked.
      if (!/required revision has been compacted/.test((err as Error).message)) throw err;
    }
  }
}
