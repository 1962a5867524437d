import type { ErrorCode } from '../core/errors.js';
import type { BlockRef } from '../core/ids.js';
import type { LogPiece, SectorRead } from '../core/interfaces.js';

// What the distributor needs from the network: block operations addressed to one peer. The
// peer-RPC pool is the real one; tests use MemoryTransport, which calls stores in-process.

export interface PeerTarget {
  readonly uuid: string;
  readonly address: string;
}

export interface PutItem {
  readonly ref: BlockRef;
  readonly data: Uint8Array;
  /** The writer's CRC32C of the whole block; the peer refuses to store other bytes (CORRUPT). */
  readonly crc?: number;
}

export interface PeerTransport {
  /** `length` 0 with `offset` 0 reads the whole block. */
  get(peer: PeerTarget, ref: BlockRef, offset: number, length: number, timeoutMs?: number): Promise<Buffer>;
  /**
   * Sectors covering the range, with the block's sector checksums, for an end-to-end check
   * against the writer's CRC; undefined when the peer cannot serve them (an older node).
   * `into` (exactly the sectors' length): the transport may read the bytes into it, and then
   * returns it as `data`; it writes nothing into it once the returned promise has settled.
   */
  getSectors(peer: PeerTarget, ref: BlockRef, offset: number, length: number, timeoutMs?: number, into?: Buffer): Promise<SectorRead | undefined>;
  /** One status per item: null for stored, else the error code. */
  put(peer: PeerTarget, items: readonly PutItem[]): Promise<(ErrorCode | null)[]>;
  has(peer: PeerTarget, refs: readonly BlockRef[]): Promise<boolean[]>;
  delete(peer: PeerTarget, refs: readonly BlockRef[]): Promise<void>;
  flush(peer: PeerTarget): Promise<void>;
  /**
   * Which process of the peer answered the call just awaited (read right after the await): a
   * FLUSH answered by another process than the PUT before it does not make that PUT durable.
   * Undefined when the peer does not say; then no restart can be seen.
   */
  instance?(peer: PeerTarget): string | undefined;

  // Volume journals (docs/journal.md).
  /** The peer keeps journals (an older node does not). */
  hasJournal(peer: PeerTarget): Promise<boolean>;
  appendLog(peer: PeerTarget, ref: BlockRef, pieces: readonly LogPiece[], sync: boolean): Promise<void>;
  sealLog(peer: PeerTarget, ref: BlockRef, gapStart: number, gapEnd: number, crc: number, sync: boolean): Promise<void>;
  fenceVolume(peer: PeerTarget, volume: number, epoch: number): Promise<BlockRef[]>;
  readRaw(peer: PeerTarget, ref: BlockRef, timeoutMs?: number): Promise<Buffer>;
}
