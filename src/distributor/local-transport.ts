import { TorusError, type ErrorCode } from '../core/errors.js';
import type { BlockRef } from '../core/ids.js';
import type { BlockStore, LogPiece, SectorRead } from '../core/interfaces.js';
import { appendJournal, journalService, sealJournal, storeBlocks, type JournalService } from '../rpc/server.js';
import type { PeerTarget, PeerTransport, PutItem } from './transport.js';

/**
 * This node's own disk, as the distributor's transport to its own uuid: no socket, no encoding,
 * no copy (a read returns what the store returns; a put hands the store the caller's buffer). The
 * requests do what the node's peer-RPC server does for the same ones from a peer
 * (rpc/server.ts: storeBlocks, appendJournal, sealJournal), so a journal append is fenced by the
 * store and synced before it is acknowledged whichever way it arrives.
 */
export class LocalTransport implements PeerTransport {
  private readonly journals: JournalService | undefined;

  constructor(readonly store: BlockStore) {
    this.journals = journalService(store);
  }

  private journal(): JournalService {
    if (!this.journals) throw new TorusError('INVALID_ARGUMENT', 'this node keeps no journals');
    return this.journals;
  }

  async get(_peer: PeerTarget, ref: BlockRef, offset: number, length: number): Promise<Buffer> {
    return length === 0 ? this.store.getBlock(ref) : this.store.readRange(ref, offset, length);
  }

  /** The store has checked every sector against its checksum already. */
  async getSectors(_peer: PeerTarget, ref: BlockRef, offset: number, length: number): Promise<SectorRead | undefined> {
    return this.store.readSectors(ref, offset, length);
  }

  async put(_peer: PeerTarget, items: readonly PutItem[]): Promise<(ErrorCode | null)[]> {
    return storeBlocks(this.store, items);
  }

  async has(_peer: PeerTarget, refs: readonly BlockRef[]): Promise<boolean[]> {
    return refs.map((r) => this.store.hasBlock(r));
  }

  async delete(_peer: PeerTarget, refs: readonly BlockRef[]): Promise<void> {
    for (const r of refs) await this.store.deleteBlock(r);
  }

  async flush(): Promise<void> {
    await this.store.flush();
  }

  /** The store lives and dies with this process: a flush always covers the puts before it. */
  instance(): string {
    return 'local';
  }

  async hasJournal(): Promise<boolean> {
    return this.journals !== undefined;
  }

  async appendLog(_peer: PeerTarget, ref: BlockRef, pieces: readonly LogPiece[], sync: boolean): Promise<void> {
    return appendJournal(this.journal(), ref, pieces, sync);
  }

  async sealLog(_peer: PeerTarget, ref: BlockRef, gapStart: number, gapEnd: number, crc: number, sync: boolean): Promise<void> {
    return sealJournal(this.journal(), ref, gapStart, gapEnd, crc, sync);
  }

  async fenceVolume(_peer: PeerTarget, volume: number, epoch: number): Promise<BlockRef[]> {
    return this.journal().fenceVolume(volume, epoch);
  }

  async readRaw(_peer: PeerTarget, ref: BlockRef): Promise<Buffer> {
    return this.journal().readRaw(ref);
  }
}
