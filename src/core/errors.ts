// One error type for the whole project. Every failure that crosses a module boundary is a
// TorusError with a stable code; each edge (CLI exit status, NBD errno, AoE error, RPC status)
// maps codes to its own vocabulary in exactly one place.

export const ErrorCodes = [
  'AGAIN', // a compare-and-swap lost a race; retrying may succeed
  'EXISTS',
  'NOT_EXIST',
  'LOCKED', // a volume lock is held by someone else, or we lost ours
  'NOT_INITIALIZED', // the cluster has no global metadata in etcd
  'INVALID_ARGUMENT', // user input that can never succeed as given
  'OUT_OF_SPACE',
  'BLOCK_UNAVAILABLE', // no replica could serve a block
  'NO_PEER', // the ring names no peer for a block, or too few are alive
  'NON_SEQUENTIAL_RING', // a ring change that is not version+1
  'ETCD_UNAVAILABLE',
  'TIMEOUT',
  'PROTOCOL', // a peer or client sent bytes that break the protocol
  'CORRUPT', // data failed its checksum
  'CLOSED', // the object was closed while the call was pending
  'WRONG_CLUSTER', // a data dir initialized for another cluster
  'IO', // the local disk failed
  'INTERNAL',
  'PERMISSION_DENIED', // no credential, a wrong one, or one that does not allow this
] as const;

export type ErrorCode = (typeof ErrorCodes)[number];

const retryableCodes: ReadonlySet<ErrorCode> = new Set([
  'AGAIN',
  'ETCD_UNAVAILABLE',
  'TIMEOUT',
  'BLOCK_UNAVAILABLE',
]);

export class TorusError extends Error {
  readonly code: ErrorCode;
  readonly retryable: boolean;

  /** `retryable` overrides the code's default, for a failure of that kind that waiting cannot cure. */
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; retryable?: boolean }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'TorusError';
    this.code = code;
    this.retryable = options?.retryable ?? retryableCodes.has(code);
  }
}

export function isTorusError(err: unknown, code?: ErrorCode): err is TorusError {
  return err instanceof TorusError && (code === undefined || err.code === code);
}

/** Wraps anything thrown into a TorusError, keeping TorusErrors as they are. */
export function toTorusError(err: unknown, fallback: ErrorCode = 'INTERNAL'): TorusError {
  if (err instanceof TorusError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new TorusError(fallback, message, { cause: err });
}
