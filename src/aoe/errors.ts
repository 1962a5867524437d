// The one place TorusError codes from a device become ATA error registers (STYLE habit 5).
// docs/protocols/aoe.md has the same table with the reasons. A device failure is always an ATA
// error (status DRDY|ERR): AoE initiators fail the I/O at once on one, whereas an AoE-level error
// or no reply at all would have the Linux initiator retransmit for minutes before giving up.
// The Record over ErrorCode makes the compiler insist on a row per code.

import { toTorusError, type ErrorCode } from '../core/errors.js';
import { AtaErrorBit, AtaStatus } from './ata.js';

const { UNC, ABRT } = AtaErrorBit;

/** Error register for a failed read. */
export const ATA_READ_ERROR: Readonly<Record<ErrorCode, number>> = {
  // Data that exists but could not be fetched or verified: "uncorrectable data", as a disk
  // reports an unreadable sector.
  BLOCK_UNAVAILABLE: UNC,
  NO_PEER: UNC,
  CORRUPT: UNC,
  IO: UNC,
  TIMEOUT: UNC,
  AGAIN: UNC,
  ETCD_UNAVAILABLE: UNC,
  // Refusals: the command was not carried out.
  INVALID_ARGUMENT: ABRT,
  OUT_OF_SPACE: ABRT,
  LOCKED: ABRT,
  CLOSED: ABRT,
  EXISTS: ABRT,
  NOT_EXIST: ABRT,
  NOT_INITIALIZED: ABRT,
  NON_SEQUENTIAL_RING: ABRT,
  PROTOCOL: ABRT,
  WRONG_CLUSTER: ABRT,
  PERMISSION_DENIED: ABRT,
  INTERNAL: ABRT,
};

/** Result registers of a failed command. */
export interface AtaFailure {
  readonly status: number;
  readonly error: number;
}

/**
 * The registers for a device failure. WRITE SECTORS and FLUSH CACHE define only ABRT (and IDNF
 * for addresses, which the target checks itself before calling the device), so every write or
 * flush failure is ABRT; reads distinguish unreadable data (UNC) from refusals (ABRT).
 */
export function ataFailure(err: unknown, op: 'read' | 'write' | 'flush'): AtaFailure {
  const code = toTorusError(err).code;
  return { status: AtaStatus.DRDY | AtaStatus.ERR, error: op === 'read' ? ATA_READ_ERROR[code] : ABRT };
}
