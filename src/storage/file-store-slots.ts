// The states a FileBlockStore slot is in, in memory. Opening sets them from the records
// (file-store-open.ts), reads check them (file-store-read.ts), writes move them (file-store.ts).

import { RECORD_SIZE } from './format.js';

// Slot lifecycle. FREE -> WRITING -> USED -> CLEARING -> PENDING -(flush)-> FREE, or -> DRAINING
// (reads still in flight) -> FREE. LOST: a record write failed, so what the disk holds is unknown;
// the slot stays out of use until the next open reads the truth back. A log block goes FREE ->
// WRITING -> OPEN (appends) -> USED (sealed), and can be deleted while OPEN.
export const FREE = 0;
export const WRITING = 1;
export const USED = 2;
export const CLEARING = 3;
export const PENDING = 4;
export const DRAINING = 5;
export const LOST = 6;
/** An open log block: appended to, no checksums yet (docs/journal.md). Sealing makes it USED. */
export const OPEN = 7;

export const ZERO_RECORD = Buffer.alloc(RECORD_SIZE);
