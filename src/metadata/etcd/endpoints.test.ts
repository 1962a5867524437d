import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import type { Etcd3 } from 'etcd3';
import { isTorusError } from '../../core/errors.js';
import { EtcdEndpoints } from './endpoints.js';

// The failover rules of endpoints.ts, with members simulated by what each call on them does (no
// connection is made: a client connects only when called). The real thing, against a killed
// member of a real cluster, is test/integration/etcd-failover.test.ts.

const REFUSED = '14 UNAVAILABLE: No connection established. Last error: Error: connect ECONNREFUSED 127.0.0.1:1. Resolution note: ';
const DROPPED = '14 UNAVAILABLE: Connection dropped';
const ELECTION = '14 UNAVAILABLE: etcdserver: leader changed';

const open: EtcdEndpoints[] = [];
after(() => {
  for (const ep of open) ep.close();
});

function endpoints(n: number, timeoutMs = 2000): EtcdEndpoints {
  const ep = new EtcdEndpoints({ endpoints: Array.from({ length: n }, (_, i) => `http://m${i}.invalid:2379`), timeoutMs, firstChoice: 0 });
  open.push(ep);
  return ep;
}

/** A call whose outcome on member i is behave(i, attempt): an error message to throw, or a value. */
function member(ep: EtcdEndpoints, behave: (i: number) => string | undefined): { fn: (c: Etcd3) => Promise<string>; tried: number[] } {
  const tried: number[] = [];
  return {
    tried,
    fn: async (c) => {
      const i = ep.members.findIndex((m) => m.client === c);
      tried.push(i);
      const err = behave(i);
      if (err) throw new Error(err);
      return `m${i}`;
    },
  };
}

test('a call that no member received goes to the next member, which is used from then on', async () => {
  const ep = endpoints(3);
  const a = member(ep, (i) => (i === 0 ? REFUSED : undefined));
  assert.equal(await ep.call('read', 'once', a.fn), 'm1');
  assert.deepEqual(a.tried, [0, 1]);
  const b = member(ep, () => undefined);
  await ep.call('read', 'once', b.fn);
  assert.deepEqual(b.tried, [1], 'sticks to the member that answered');
  // The failed member comes last until it is used again.
  assert.deepEqual(ep.order().map((m) => ep.members.indexOf(m)), [1, 2, 0]);
});

test('a write that a member may have received is not sent again; a read is', async () => {
  const ep = endpoints(3);
  const w = member(ep, (i) => (i === 0 ? DROPPED : undefined));
  await assert.rejects(
    ep.call('transaction', 'once', w.fn),
    (e: unknown) => isTorusError(e, 'ETCD_UNAVAILABLE') && e.retryable && /m0\.invalid.*did not answer \(transaction\): connection lost; it may or may not have been applied/.test(e.message),
  );
  assert.deepEqual(w.tried, [0]);
  const ep2 = endpoints(3);
  const r = member(ep2, (i) => (i === 0 ? DROPPED : undefined));
  assert.equal(await ep2.call('get', 'idempotent', r.fn), 'm1');
});

test('every member refusing fails at once, naming each; the same reason everywhere is said once', async () => {
  const ep = endpoints(3, 5000);
  const all = member(ep, () => REFUSED);
  await assert.rejects(ep.call('list peers', 'idempotent', all.fn), (e: unknown) => {
    assert.ok(isTorusError(e, 'ETCD_UNAVAILABLE'));
    assert.equal(e.message, 'cannot reach etcd at http://m0.invalid:2379,http://m1.invalid:2379,http://m2.invalid:2379 (list peers): connection refused');
    return true;
  });
  assert.deepEqual(all.tried, [0, 1, 2], 'one round: no waiting when nothing answers at all');
  const mixed = member(ep, (i) => (i === 1 ? '12 UNIMPLEMENTED: Received HTTP status code 404' : REFUSED));
  await assert.rejects(ep.call('get', 'idempotent', mixed.fn), (e: unknown) => {
    assert.match((e as Error).message, /\): http:\/\/m0\.invalid:2379: connection refused; http:\/\/m1\.invalid:2379: answered HTTP 404: not an etcd v3 endpoint; http:\/\/m2\.invalid:2379: connection refused$/);
    return true;
  });
});

test('during an election the call waits and tries again, within its one deadline', async () => {
  const ep = endpoints(3, 3000);
  let electedAt = Date.now() + 700;
  const c = member(ep, () => (Date.now() < electedAt ? ELECTION : undefined));
  assert.equal(typeof (await ep.call('get', 'idempotent', c.fn)), 'string');
  assert.ok(c.tried.length > 3, 'several rounds');
  // An election that outlasts the deadline: the call ends at the deadline, not later.
  electedAt = Date.now() + 60_000;
  const began = Date.now();
  const long = member(ep, () => ELECTION);
  await assert.rejects(ep.call('get', 'idempotent', long.fn), (e: unknown) => isTorusError(e, 'ETCD_UNAVAILABLE') && /etcd: leader changed/.test(e.message));
  assert.ok(Date.now() - began >= 3000, 'kept trying until the deadline');
  const attempts = long.tried.length;
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal(long.tried.length, attempts, 'and not after it');
});

test("etcd's own refusals are not retried; a full etcd is ETCD_UNAVAILABLE that waiting does not cure", async () => {
  const ep = endpoints(3);
  const full = member(ep, () => '8 RESOURCE_EXHAUSTED: etcdserver: mvcc: database space exceeded');
  await assert.rejects(ep.call('transaction', 'once', full.fn), (e: unknown) => isTorusError(e, 'ETCD_UNAVAILABLE') && !e.retryable && /out of space/.test(e.message));
  assert.deepEqual(full.tried, [0]);
  const other = member(ep, () => '3 INVALID_ARGUMENT: etcdserver: too many operations in txn request');
  await assert.rejects(ep.call('transaction', 'once', other.fn), (e: unknown) => isTorusError(e, 'INTERNAL'));
});

test('a call may ask for a shorter deadline than the client\'s, never a longer one', async () => {
  const ep = endpoints(2, 5000);
  const deadlines: number[] = [];
  const seen = async (_c: Etcd3, o: { deadline: Date }): Promise<number> => {
    deadlines.push(o.deadline.getTime() - Date.now());
    return 0;
  };
  await ep.call('transaction', 'once', seen, 2000);
  await ep.call('transaction', 'once', seen, 60_000);
  await ep.call('transaction', 'once', seen);
  assert.ok(deadlines[0]! <= 2000 && deadlines[0]! > 1000, `asked 2 s, got ${deadlines[0]} ms`);
  assert.ok(deadlines[1]! <= 5000 && deadlines[1]! > 4000, `asked 60 s, got ${deadlines[1]} ms`);
  assert.ok(deadlines[2]! <= 5000 && deadlines[2]! > 4000);
});

test('a closed client says so', async () => {
  const ep = endpoints(2);
  ep.close();
  await assert.rejects(ep.call('get', 'idempotent', async () => 'x'), (e: unknown) => isTorusError(e, 'CLOSED'));
});
