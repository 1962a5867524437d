import assert from 'node:assert/strict';
import { test } from 'node:test';
import { GRPCDeadlineExceededError, GRPCUnavailableError } from 'etcd3';
import { classifyEtcdError } from './errors.js';

// The messages below are what grpc-js and etcd 3.4 said in the situations named (seen on this
// machine: a dead port, an HTTP/1 and an HTTP/2 server that are not etcd, a TLS mismatch, a
// member killed under a call, an election).

const cases: [string, Error, { kind: string; text: string; transient?: boolean }, boolean?][] = [
  [
    'a port nobody listens on',
    new GRPCUnavailableError('14 UNAVAILABLE: No connection established. Last error: Error: connect ECONNREFUSED 127.0.0.1:23799. Resolution note: '),
    { kind: 'unsent', text: 'connection refused' },
  ],
  [
    'an HTTP/2 server answering 404',
    new Error('12 UNIMPLEMENTED: Received HTTP status code 404'),
    { kind: 'unsent', text: 'answered HTTP 404: not an etcd v3 endpoint' },
  ],
  [
    'an HTTP/1 server',
    new GRPCUnavailableError('14 UNAVAILABLE: No connection established. Last error: Protocol error (2026-12-06T08:12:27.883Z). Resolution note: '),
    { kind: 'unsent', text: 'not an etcd v3 endpoint (it does not speak gRPC)' },
  ],
  [
    'TLS to a plain-text etcd',
    new GRPCUnavailableError('14 UNAVAILABLE: No connection established. Last error: Error: C0E7A1F7:error:0A00010B:SSL routines:ssl3_get_record:wrong version number. Resolution note: '),
    { kind: 'unsent', text: 'TLS failed: wrong version number' },
  ],
  [
    'plain text to a TLS etcd',
    new GRPCUnavailableError('14 UNAVAILABLE: No connection established. Last error: Failed to connect (2026-12-06T08:57:28.825Z). Resolution note: '),
    { kind: 'unsent', text: 'the connection failed in its handshake (a TLS endpoint spoken to without TLS?)' },
  ],
  [
    'TLS to a plain-text etcd, as Node says it',
    new GRPCUnavailableError('14 UNAVAILABLE: No connection established. Last error: Error: Client network socket disconnected before secure TLS connection was established. Resolution note: '),
    { kind: 'unsent', text: 'TLS failed: the server closed the connection in the handshake (not a TLS endpoint?)' },
  ],
  [
    'TLS to a plain-text etcd that reset the connection',
    new GRPCUnavailableError('14 UNAVAILABLE: No connection established. Last error: Error: read ECONNRESET. Resolution note: '),
    { kind: 'unsent', text: 'TLS failed: the server reset the connection in the handshake (not a TLS endpoint?)' },
    true,
  ],
  [
    'a plain-text connection reset while it was made',
    new GRPCUnavailableError('14 UNAVAILABLE: No connection established. Last error: Error: read ECONNRESET. Resolution note: '),
    { kind: 'unsent', text: 'connection reset while connecting' },
  ],
  [
    'a host name that does not resolve',
    new GRPCUnavailableError('14 UNAVAILABLE: No connection established. Last error: Error: getaddrinfo ENOTFOUND etcd-3.example. Resolution note: '),
    { kind: 'unsent', text: 'unknown host etcd-3.example' },
  ],
  [
    'a member killed while the call was on it',
    new GRPCUnavailableError('14 UNAVAILABLE: Connection dropped'),
    { kind: 'unknown', text: 'connection lost' },
  ],
  ['the same, seen as a reset', new GRPCUnavailableError('14 UNAVAILABLE: read ECONNRESET'), { kind: 'unknown', text: 'read ECONNRESET' }],
  [
    'no answer in time',
    new GRPCDeadlineExceededError('4 DEADLINE_EXCEEDED: Deadline exceeded after 5.003s,LB pick: 0.001s,remote_addr=127.0.0.1:2379'),
    { kind: 'unknown', text: 'no answer within 5 s' },
  ],
  ['an election', new GRPCUnavailableError('14 UNAVAILABLE: etcdserver: leader changed'), { kind: 'unknown', text: 'etcd: leader changed', transient: true }],
  ['an overloaded member, before proposing', new GRPCUnavailableError('14 UNAVAILABLE: etcdserver: too many requests'), { kind: 'unsent', text: 'etcd: too many requests', transient: true }],
  ['a proposal lost with its leader', new GRPCUnavailableError('14 UNAVAILABLE: etcdserver: request timed out'), { kind: 'unknown', text: 'etcd: request timed out', transient: true }],
  [
    'a full etcd',
    new Error('8 RESOURCE_EXHAUSTED: etcdserver: mvcc: database space exceeded'),
    { kind: 'answer', text: 'etcd: mvcc: database space exceeded' },
  ],
  [
    'a compacted revision',
    new Error('11 OUT_OF_RANGE: etcdserver: mvcc: required revision has been compacted'),
    { kind: 'answer', text: 'etcd: mvcc: required revision has been compacted' },
  ],
];

for (const [name, err, want, tls] of cases) {
  test(`etcd error: ${name}`, () => {
    const f = classifyEtcdError(err, 5000, tls);
    assert.equal(f.kind, want.kind);
    assert.equal(f.text, want.text);
    assert.equal(f.transient, want.transient ?? false);
    assert.ok(!/UNAVAILABLE|Resolution note|\n/.test(f.text), 'no gRPC noise, one line');
  });
}
