// What both stores share: the counters a metrics module reads, and argument checks worded the
// same way so the in-memory twin fails exactly like the disk store.

import { TorusError } from '../core/errors.js';
import { formatBlockRef, isZeroRef, type BlockRef } from '../core/ids.js';
import type { BlockStore, JournalStore } from '../core/interfaces.js';

export interface BlockStoreStats {
  /** getBlock/readRange calls that returned data. */
  reads: number;
  /** putBlock calls that stored a block (no-op puts of a held ref are not counted). */
  writes: number;
  deletes: number;
  /** Bytes read from the medium, including whole sectors read to verify a smaller range. */
  bytesRead: number;
  /** Bytes written to the medium for blocks (padding included, metadata excluded). */
  bytesWritten: number;
  /** Bytes appended to open log blocks, and the gaps zeroed when they were sealed. */
  journalBytesWritten: number;
  /**
   * Zeros written into free slots never written before, so that journal appends into them have
   * no file-system allocation for their fdatasync to commit (see FileBlockStore.prepareWarm).
   */
  slotPrepBytes: number;
  /** Appends and seals refused because a newer writer fenced the volume. */
  fencedRefusals: number;
  /** Reads that found data not matching its checksum; the block was dropped each time. */
  checksumFailures: number;
  /**
   * Reads whose bytes failed their checksum in memory but were right when read from the disk
   * again: the block was kept (a buffer written to during the read, or memory at fault).
   */
  memoryChecksumFailures: number;
  /** Durability rounds actually performed (one fsync of each file); less than flushRequests when coalesced. */
  flushes: number;
  flushRequests: number;
  /**
   * Milliseconds spent in those fsyncs (data and table file, one after the other); for a journal
   * append synced in the job that writes it, the whole job, its write included.
   */
  syncMs: number;
  /** Slot records found torn at open (treated as free). */
  tornRecordsAtOpen: number;
  /** Refs found in more than one slot at open (crash between a delete and a re-put); one copy kept. */
  duplicatesAtOpen: number;
  /** Blocks written after the last durable generation whose data failed its check at open (dropped). */
  unsyncedDroppedAtOpen: number;
}

export function emptyStats(): BlockStoreStats {
  return {
    reads: 0,
    writes: 0,
    deletes: 0,
    bytesRead: 0,
    bytesWritten: 0,
    journalBytesWritten: 0,
    slotPrepBytes: 0,
    fencedRefusals: 0,
    checksumFailures: 0,
    memoryChecksumFailures: 0,
    flushes: 0,
    flushRequests: 0,
    syncMs: 0,
    tornRecordsAtOpen: 0,
    duplicatesAtOpen: 0,
    unsyncedDroppedAtOpen: 0,
  };
}

export type VerifyResult = 'ok' | 'missing' | 'corrupt';

/** What a scrubber learns about one stored copy, without the store dropping it. */
export interface BlockInspection {
  readonly status: VerifyResult;
  /** Why the copy is corrupt. */
  readonly reason?: string;
  /**
   * The CRC32C a good copy of the whole block has: the writer's, as the block's record keeps it,
   * or for a record from before that, what the block's intact sector checksums combine to.
   * Undefined when the copy is missing, or neither survives (then nothing fetched from elsewhere
   * can be checked here).
   */
  readonly crc?: number;
}

export interface ScrubReport {
  checked: number;
  corrupt: BlockRef[];
}

/** The BlockStore plus what operators, metrics and the rebalancer use on a local store. */
export interface LocalBlockStore extends BlockStore, JournalStore {
  stats(): BlockStoreStats;
  /** Reads and checks the whole block; a corrupt block is dropped (so a repair put can store it). */
  verifyBlock(ref: BlockRef): Promise<VerifyResult>;
  /**
   * Reads the whole block from the medium (not from any cache of checksums) and checks every
   * sector, and the sector checksums against the writer's CRC. Unlike verifyBlock it keeps a bad
   * copy: its intact sectors still serve reads until a checked replacement is stored.
   */
  inspectBlock(ref: BlockRef): Promise<BlockInspection>;
  /** Held blocks whose slots lie in [from, to) of [0, numBlocks()), in slot order (the data file's). */
  refsInSlots(from: number, to: number): Promise<BlockRef[]>;
  /** verifyBlock over every held block. */
  scrub(opts?: { signal?: AbortSignal; onProgress?: (checked: number, total: number) => void }): Promise<ScrubReport>;
}

export function checkBlockSize(blockSize: number, maxBlockSize: number): void {
  if (!Number.isSafeInteger(blockSize) || blockSize < 1 || blockSize > maxBlockSize)
    throw new TorusError('INVALID_ARGUMENT', `invalid block size ${blockSize}: must be an integer from 1 to ${maxBlockSize}`);
}

export function checkPut(ref: BlockRef, data: Uint8Array, blockSize: number): void {
  if (isZeroRef(ref)) throw new TorusError('INVALID_ARGUMENT', 'cannot store the zero block ref (it means "no block")');
  if (data.length > blockSize)
    throw new TorusError('INVALID_ARGUMENT', `block ${formatBlockRef(ref)} is ${data.length} bytes, larger than the block size ${blockSize}`);
}

export function checkRange(ref: BlockRef, offset: number, length: number, blockSize: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > blockSize)
    throw new TorusError(
      'INVALID_ARGUMENT',
      `range [${offset}, +${length}) is outside block ${formatBlockRef(ref)} of ${blockSize} bytes`,
    );
}

export function unavailable(ref: BlockRef): TorusError {
  return new TorusError('BLOCK_UNAVAILABLE', `block ${formatBlockRef(ref)} is not in this store`);
}

export function outOfSpace(used: number, total: number, blockSize: number): TorusError {
  return new TorusError('OUT_OF_SPACE', `block store full: ${used} of ${total} blocks used (block size ${blockSize})`);
}

export function closedError(): TorusError {
  return new TorusError('CLOSED', 'block store is closed');
}

export async function scrubStore(
  store: Pick<LocalBlockStore, 'refs' | 'verifyBlock'>,
  opts: { signal?: AbortSignal; onProgress?: (checked: number, total: number) => void } = {},
): Promise<ScrubReport> {
  const refs = store.refs();
  const report: ScrubReport = { checked: 0, corrupt: [] };
  for (const ref of refs) {
    opts.signal?.throwIfAborted();
    const r = await store.verifyBlock(ref);
    if (r === 'missing') continue;
    report.checked++;
    if (r === 'corrupt') report.corrupt.push(ref);
    opts.onProgress?.(report.checked, refs.length);
  }
  return report;
}
