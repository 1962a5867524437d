import { ClientClosedError, GRPCDeadlineExceededError } from 'etcd3';

// What an etcd call's failure means, decided once from what gRPC and etcd say. Two questions
// matter to the caller: did any member receive the request (a write that may have been applied
// must not be sent again blindly), and is there a point in asking another member.

export type FailureKind =
  /** No etcd member received the request: it can be sent to any member, a write included. */
  | 'unsent'
  /** A member may have received it and its answer was lost: a write may or may not be applied. */
  | 'unknown'
  /** etcd answered, with an error: asking another member gets the same answer. */
  | 'answer';

export interface EtcdFailure {
  readonly kind: FailureKind;
  /** One line for people, without gRPC's codes and notes. */
  readonly text: string;
  /** The cluster is between leaders or busy, not gone: another round shortly may succeed. */
  readonly transient: boolean;
  /** etcd's own words, when it answered ('etcdserver: ...' without the prefix). */
  readonly etcd?: string;
}

// etcd's errors that mean "not now" rather than "no": a leader election, an overloaded or
// stopping member. A proposal that timed out may still be applied, so none of them is 'unsent'.
const TRANSIENT_ETCD =
  /^(no leader|leader changed|request timed out|request cancelled|server stopped|not capable|unhealthy cluster|timed out|proposal dropped|raft: proposal dropped)/;

/** `tls`: the member is spoken to over TLS (a connection reset then happened in its handshake). */
export function classifyEtcdError(err: unknown, timeoutMs: number, tls = false): EtcdFailure {
  if (err instanceof ClientClosedError) return { kind: 'unsent', text: 'the client is closed', transient: false };
  const raw = err instanceof Error ? err.message : String(err);
  // "14 UNAVAILABLE: details": the code is the class of the error; people need the details.
  const details = firstLine(raw.replace(/^\d+ [A-Z_]+: /, ''));
  const server = /etcdserver: (.*)$/.exec(details) ?? /^(mvcc: .*)$/.exec(details);
  if (server) {
    const said = server[1]!.trim();
    // Refused before it was proposed (etcd's apply is too far behind): nothing was applied.
    if (/^too many requests/.test(said)) return { kind: 'unsent', text: `etcd: ${said}`, transient: true, etcd: said };
    if (TRANSIENT_ETCD.test(said)) return { kind: 'unknown', text: `etcd: ${said}`, transient: true, etcd: said };
    return { kind: 'answer', text: `etcd: ${said}`, transient: false, etcd: said };
  }
  if (err instanceof GRPCDeadlineExceededError || /^Deadline exceeded/.test(details))
    return { kind: 'unknown', text: `no answer within ${formatSeconds(timeoutMs)}`, transient: false };
  const noConn = /^No connection established\. Last error: (.*?)(?:\. Resolution note:.*)?$/.exec(details);
  if (noConn) return { kind: 'unsent', text: describeConnectError(noConn[1]!, tls), transient: false };
  if (/^Stream refused by server/.test(details)) return { kind: 'unsent', text: 'the member refused the request', transient: false };
  if (/^Channel closed before call started/.test(details)) return { kind: 'unsent', text: 'connection closed', transient: false };
  if (/^Name resolution failed/.test(details)) return { kind: 'unsent', text: 'unknown host', transient: false };
  const http = /^Received HTTP status code (\d+)/.exec(details);
  // Something answers HTTP/2 there, but not etcd's gRPC API: no etcd received anything.
  if (http) return { kind: 'unsent', text: `answered HTTP ${http[1]}: not an etcd v3 endpoint`, transient: false };
  if (/^Connection dropped/.test(details)) return { kind: 'unknown', text: 'connection lost', transient: false };
  return { kind: 'unknown', text: details.replace(/\s*\(\d{4}-\d\d-\d\dT[\d:.]+Z\)/g, ''), transient: false };
}

/** The reason a connection could not be made, in a few words (gRPC wraps Node's socket errors). */
export function describeConnectError(text: string, tls = false): string {
  const t = text.replace(/^Error: /, '').replace(/\s*\(\d{4}-\d\d-\d\dT[\d:.]+Z\)/g, '').trim();
  if (/ECONNREFUSED/.test(t)) return 'connection refused';
  if (/ETIMEDOUT/.test(t)) return 'connection timed out';
  if (/EHOSTUNREACH|ENETUNREACH/.test(t)) return 'host unreachable';
  const host = /(?:ENOTFOUND|EAI_AGAIN) (\S+)/.exec(t);
  if (host) return `unknown host ${host[1]}`;
  if (/^Protocol error/.test(t)) return 'not an etcd v3 endpoint (it does not speak gRPC)';
  // gRPC's words for an HTTP/2 handshake that never completed: a TLS server spoken to in plain text.
  if (/^Failed to connect/.test(t)) return 'the connection failed in its handshake (a TLS endpoint spoken to without TLS?)';
  if (/disconnected before secure TLS connection/.test(t)) return 'TLS failed: the server closed the connection in the handshake (not a TLS endpoint?)';
  // A plain-text server that closes on a ClientHello it has not read resets instead of closing:
  // the same failure as above, told apart only by the timing of the server's read.
  if (/ECONNRESET/.test(t)) return tls ? 'TLS failed: the server reset the connection in the handshake (not a TLS endpoint?)' : 'connection reset while connecting';
  // OpenSSL: "...:error:0A00010B:SSL routines::wrong version number"; Node: "self-signed certificate".
  const ssl = /SSL routines:[^:]*:+(.*)$/.exec(t);
  if (ssl) return `TLS failed: ${ssl[1]}`;
  if (/certificate|TLS|SSL|handshake/i.test(t)) return `TLS failed: ${t}`;
  return t;
}

function firstLine(s: string): string {
  return (s.split('\n')[0] ?? '').trim();
}

function formatSeconds(ms: number): string {
  const s = ms / 1000;
  return `${Number.isInteger(s) ? s : s.toFixed(1)} s`;
}
