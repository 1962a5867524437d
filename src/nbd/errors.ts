// The one place TorusError codes become NBD error numbers (STYLE habit 5). docs/protocols/nbd.md
// has the same table with the reasons. proto.md allows only EPERM, EIO, ENOMEM, EINVAL, ENOSPC,
// EOVERFLOW, ENOTSUP and ESHUTDOWN, and clients treat anything else as EINVAL, so every code
// lands on one of those; a Record over ErrorCode makes the compiler insist on a row per code.

import { toTorusError, type ErrorCode } from '../core/errors.js';
import { Errno, Rep } from './codec.js';

export const NBD_ERRNO: Readonly<Record<ErrorCode, Errno>> = {
  INVALID_ARGUMENT: Errno.EINVAL,
  OUT_OF_SPACE: Errno.ENOSPC,
  // A volume that lost (or never got) its exclusive lock must not be written: for writes that is
  // "not permitted", which is also what proto.md asks for writes to a read-only export. For a
  // read it is just a failed I/O; see nbdErrno.
  LOCKED: Errno.EIO,
  // Replica and disk failures: the client may retry, and EIO is what a local disk would say.
  NO_PEER: Errno.EIO,
  BLOCK_UNAVAILABLE: Errno.EIO,
  CORRUPT: Errno.EIO,
  IO: Errno.EIO,
  TIMEOUT: Errno.EIO,
  AGAIN: Errno.EIO,
  ETCD_UNAVAILABLE: Errno.EIO,
  // The device was closed under the request: this process is going away. proto.md's ESHUTDOWN
  // tells the client to disconnect cleanly instead of retrying against a dying server.
  CLOSED: Errno.ESHUTDOWN,
  // None of these should come out of a device; if one does it is a bug or a metadata failure,
  // and EIO is the honest answer to the client.
  EXISTS: Errno.EIO,
  NOT_EXIST: Errno.EIO,
  NOT_INITIALIZED: Errno.EIO,
  NON_SEQUENTIAL_RING: Errno.EIO,
  PROTOCOL: Errno.EIO,
  WRONG_CLUSTER: Errno.EIO,
  PERMISSION_DENIED: Errno.EPERM,
  INTERNAL: Errno.EIO,
};

/** The errno for a failure of a command; `writes` is true for WRITE, TRIM and WRITE_ZEROES. */
export function nbdErrno(err: unknown, writes: boolean): Errno {
  const code = toTorusError(err).code;
  if (code === 'LOCKED' && writes) return Errno.EPERM;
  return NBD_ERRNO[code];
}

/**
 * The option error for a provider that could not open an export for INFO or GO. NOT_EXIST (and
 * anything else unexpected) is "not available", a lock held elsewhere is policy, a closing
 * provider is a shutdown (proto.md: the client must then disconnect).
 */
export function openErrorReply(err: unknown): number {
  const code = toTorusError(err).code;
  if (code === 'LOCKED') return Rep.ERR_POLICY;
  if (code === 'CLOSED') return Rep.ERR_SHUTDOWN;
  return Rep.ERR_UNKNOWN;
}
