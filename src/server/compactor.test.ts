import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Logger } from 'pino';
import type { KVSession } from '../core/interfaces.js';
import { MemoryKVStore } from '../metadata/memory/kv.js';
import { COMPACTOR_KEY, HistoryCompactor } from './compactor.js';

// The compactor's election and policy on the in-memory twin of etcd's keyspace (which records
// the revision compacted to). The same class against a real etcd, over 100,000 syncs, is
// test/integration/etcd-growth.test.ts.

async function writes(kv: MemoryKVStore, n: number): Promise<void> {
  for (let i = 0; i < n; i++) await kv.txn([], [{ op: 'put', key: `/torus/volumemeta/1/head`, value: String(i) }]);
}

function compactor(kv: MemoryKVStore, id: string, opts: { retentionMs?: number; maxRevisions?: number } = {}): HistoryCompactor {
  return new HistoryCompactor({ kv, id, retentionMs: opts.retentionMs ?? 3_600_000, maxRevisions: opts.maxRevisions ?? 100, intervalMs: 60_000 });
}

test('one node at a time compacts: the holder of the election key; another takes over when it stops', async () => {
  const kv = new MemoryKVStore();
  const a = compactor(kv, 'a');
  const b = compactor(kv, 'b');
  await writes(kv, 500);
  await a.tick();
  await b.tick();
  assert.equal(a.status().leader, true);
  assert.equal(b.status().leader, false);
  assert.equal(a.status().compactions, 1);
  assert.equal(b.status().compactions, 0);
  assert.equal(kv.compactedRevision, (await kv.status()).revision - 100, 'kept the last 100 revisions');
  assert.match((await kv.get(COMPACTOR_KEY))!.value, /"id":"a"/);
  await a.stop();
  await writes(kv, 300);
  await b.tick();
  assert.equal(b.status().leader, true);
  assert.equal(kv.compactedRevision, (await kv.status()).revision - 100);
  await b.stop();
});

test('a leader whose lease was lost campaigns again with a new one', async () => {
  const kv = new MemoryKVStore();
  const a = compactor(kv, 'a');
  const b = compactor(kv, 'b');
  await a.tick();
  assert.equal(a.status().leader, true);
  // a's lease expires (a partition from etcd longer than its TTL): its key goes with it.
  (kv.sessions.get((await kv.get(COMPACTOR_KEY))!.lease) as unknown as KVSession & { expire(): void }).expire();
  await b.tick();
  assert.equal(b.status().leader, true);
  await a.tick();
  assert.equal(a.status().leader, false, 'the key is b\'s now');
  await a.stop();
  await b.stop();
});

test('history younger than the retention is kept unless there are more revisions than the cap', async () => {
  const kv = new MemoryKVStore();
  const c = compactor(kv, 'a', { retentionMs: 200, maxRevisions: 1000 });
  await writes(kv, 50);
  await c.tick();
  assert.equal(kv.compactedRevision, 0, 'nothing is older than the retention yet');
  const seen = (await kv.status()).revision;
  await new Promise((r) => setTimeout(r, 250));
  await writes(kv, 50);
  await c.tick();
  assert.equal(kv.compactedRevision, seen, 'compacted to the revision seen a retention ago');
  await writes(kv, 2000);
  await c.tick();
  assert.equal(kv.compactedRevision, (await kv.status()).revision - 1000, 'a burst is cut at the cap');
  await c.stop();
});

test('a failing round is counted and said once, and never throws', async () => {
  const kv = new MemoryKVStore();
  const warned: string[] = [];
  const log = { warn: (_o: object, m: string) => warned.push(m), info: () => undefined, debug: () => undefined } as unknown as Logger;
  const c = new HistoryCompactor({ kv, id: 'a', retentionMs: 1000, maxRevisions: 10, intervalMs: 60_000, log });
  kv.status = () => Promise.reject(new Error('etcd is down'));
  await c.tick();
  await c.tick();
  assert.equal(c.status().failures, 2);
  assert.deepEqual(warned, ['etcd compaction skipped']);
  await c.stop();
});
