import type { Etcd3, IKeyValue, IRequestOp } from 'etcd3';
import { TorusError } from '../../core/errors.js';
import type { KVCompare, KVEntry, KVOp, KVSession, KVTxnResult, MetaKV } from '../../core/interfaces.js';

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

export class EtcdKV implements MetaKV {
  constructor(
    private readonly client: Etcd3,
    private readonly call: <T>(what: string, fn: () => Promise<T>) => Promise<T>,
  ) {}

  async get(key: string): Promise<KVEntry | undefined> {
    const res = await this.call('get', () => this.client.kv.range({ key: Buffer.from(key) }));
    const kv = res.kvs[0];
    return kv ? entry(kv) : undefined;
  }

  async list(prefix: string): Promise<{ entries: KVEntry[]; revision: number }> {
    const res = await this.call('list', () => this.client.kv.range({ key: Buffer.from(prefix), range_end: prefixEnd(prefix) }));
    return { entries: res.kvs.map(entry), revision: Number(res.header.revision) };
  }

  private op(o: KVOp): IRequestOp {
    switch (o.op) {
      case 'put':
        return { request_put: { key: Buffer.from(o.key), value: Buffer.from(o.value), ...(o.session ? { lease: o.session.id } : {}) } };
      case 'delete':
        return { request_delete_range: { key: Buffer.from(o.key), ...(o.prefix ? { range_end: prefixEnd(o.key) } : {}) } };
      case 'get':
        return { request_range: { key: Buffer.from(o.key), ...(o.prefix ? { range_end: prefixEnd(o.key) } : {}) } };
    }
  }

  async txn(compares: readonly KVCompare[], success: readonly KVOp[], failure: readonly KVOp[] = []): Promise<KVTxnResult> {
    const compare = compares.map((c) => {
      const base = { key: Buffer.from(c.key), result: CMP[c.cmp] };
      if (c.target === 'value') return { ...base, target: 'Value' as const, value: Buffer.from(c.value) };
      if (c.target === 'mod') return { ...base, target: 'Mod' as const, mod_revision: String(c.value) };
      return { ...base, target: 'Version' as const, version: String(c.value) };
    });
    const res = await this.call('transaction', () =>
      this.client.kv.txn({ compare, success: success.map((o) => this.op(o)), failure: failure.map((o) => this.op(o)) }),
    );
    const ran = res.succeeded ? success : failure;
    const gets: KVEntry[][] = [];
    ran.forEach((o, i) => {
      if (o.op === 'get') gets.push((res.responses[i]?.response_range?.kvs ?? []).map(entry));
    });
    return { succeeded: res.succeeded, revision: Number(res.header.revision), gets };
  }

  async session(ttlMs: number): Promise<KVSession> {
    const lease = this.client.lease(Math.max(1, Math.ceil(ttlMs / 1000)), { autoKeepAlive: true });
    let alive = true;
    const lost: (() => void)[] = [];
    lease.on('lost', () => {
      if (!alive) return;
      alive = false;
      for (const cb of lost) cb();
    });
    const id = await this.call('grant lease', () => lease.grant());
    if (!id) throw new TorusError('ETCD_UNAVAILABLE', 'etcd granted no lease');
    return {
      id,
      get alive() {
        return alive && !lease.revoked();
      },
      onLost(cb) {
        lost.push(cb);
      },
      async revoke() {
        alive = false;
        await lease.revoke().catch(() => undefined);
      },
    };
  }
}
