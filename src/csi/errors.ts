// The one place TorusError codes become gRPC status codes for CSI callers (STYLE habit 5), and
// the CSI edge's own answers that have no TorusError (a capacity out of range, a call already in
// flight for the volume). The Record over ErrorCode makes the compiler insist on a row per code.

import { status } from '@grpc/grpc-js';
import { toTorusError, type ErrorCode } from '../core/errors.js';

export const CSI_STATUS: Readonly<Record<ErrorCode, status>> = {
  INVALID_ARGUMENT: status.INVALID_ARGUMENT,
  NOT_EXIST: status.NOT_FOUND,
  // A volume (or snapshot) of that name exists with other properties: the spec's "already exists
  // but is incompatible".
  EXISTS: status.ALREADY_EXISTS,
  // The volume's lock is held: it is staged on a node (in use), which is the spec's
  // FAILED_PRECONDITION for deleting, expanding or staging it elsewhere.
  LOCKED: status.FAILED_PRECONDITION,
  // A lost compare-and-swap race: the caller retries with back-off, as for ABORTED.
  AGAIN: status.ABORTED,
  OUT_OF_SPACE: status.RESOURCE_EXHAUSTED,
  NOT_INITIALIZED: status.FAILED_PRECONDITION,
  ETCD_UNAVAILABLE: status.UNAVAILABLE,
  TIMEOUT: status.DEADLINE_EXCEEDED,
  NO_PEER: status.UNAVAILABLE,
  BLOCK_UNAVAILABLE: status.UNAVAILABLE,
  CLOSED: status.UNAVAILABLE,
  CORRUPT: status.DATA_LOSS,
  IO: status.INTERNAL,
  NON_SEQUENTIAL_RING: status.INTERNAL,
  PROTOCOL: status.INTERNAL,
  WRONG_CLUSTER: status.INTERNAL,
  PERMISSION_DENIED: status.PERMISSION_DENIED,
  INTERNAL: status.INTERNAL,
};

/** An answer the CSI edge gives in the spec's own terms. */
export class CsiError extends Error {
  constructor(
    readonly code: status,
    message: string,
  ) {
    super(message);
    this.name = 'CsiError';
  }
}

export function csiStatusOf(err: unknown): { code: status; details: string } {
  if (err instanceof CsiError) return { code: err.code, details: err.message };
  const e = toTorusError(err);
  return { code: CSI_STATUS[e.code], details: e.message };
}

export const invalid = (msg: string): CsiError => new CsiError(status.INVALID_ARGUMENT, msg);
export const notFound = (msg: string): CsiError => new CsiError(status.NOT_FOUND, msg);
export const precondition = (msg: string): CsiError => new CsiError(status.FAILED_PRECONDITION, msg);
export const outOfRange = (msg: string): CsiError => new CsiError(status.OUT_OF_RANGE, msg);
export const alreadyExists = (msg: string): CsiError => new CsiError(status.ALREADY_EXISTS, msg);
export const aborted = (msg: string): CsiError => new CsiError(status.ABORTED, msg);
