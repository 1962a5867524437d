import { TorusError, toTorusError, type ErrorCode } from '../core/errors.js';
import type { BlockRef } from '../core/ids.js';
import type { BlockStore, JournalStore, LogPiece, SectorRead } from '../core/interfaces.js';
import type { PeerTarget, PeerTransport, PutItem } from './transport.js';

/**
 * The in-process twin of the peer-RPC pool: each peer is a BlockStore in this process.
 * `down` makes a peer unreachable, as a killed node would be.
 */
export class MemoryTransport implements PeerTransport {
  readonly stores = new Map<string, BlockStore>();
  readonly down = new Set<string>();
  /** Each peer's process instance; a test sets a new one to stand for a restart. */
  readonly instances = new Map<string, string>();
  calls = { get: 0, put: 0, has: 0, delete: 0, flush: 0, append: 0, seal: 0 };
  /** getSectors calls that were given the caller's buffer to read into. */
  getsInto = 0;

  add(uuid: string, store: BlockStore): PeerTarget {
    this.stores.set(uuid, store);
    return { uuid, address: `mem://${uuid}` };
  }

  private store(peer: PeerTarget): BlockStore {
    if (this.down.has(peer.uuid)) throw new TorusError('TIMEOUT', `peer ${peer.uuid} is down`);
    const s = this.stores.get(peer.uuid);
    if (!s) throw new TorusError('BLOCK_UNAVAILABLE', `no peer ${peer.uuid}`);
    return s;
  }

  async get(peer: PeerTarget, ref: BlockRef, offset: number, length: number): Promise<Buffer> {
    this.calls.get++;
    const s = this.store(peer);
    return length === 0 ? s.getBlock(ref) : s.readRange(ref, offset, length);
  }

  async getSectors(peer: PeerTarget, ref: BlockRef, offset: number, length: number, _timeoutMs?: number, into?: Buffer): Promise<SectorRead | undefined> {
    this.calls.get++;
    const s = this.store(peer);
    // A copy, as a network would deliver: tests damage what a peer sends without touching its store.
    const read = await s.readSectors(ref, offset, length);
    if (into !== undefined && into.length === read.data.length) {
      this.getsInto++;
      into.set(read.data);
      return { ...read, sums: Buffer.from(read.sums), data: into };
    }
    return { ...read, sums: Buffer.from(read.sums), data: Buffer.from(read.data) };
  }

  async put(peer: PeerTarget, items: readonly PutItem[]): Promise<(ErrorCode | null)[]> {
    this.calls.put++;
    const s = this.store(peer);
    const out: (ErrorCode | null)[] = [];
    for (const it of items) {
      try {
        await s.putBlock(it.ref, it.data, it.crc === undefined ? undefined : { crc: it.crc });
        out.push(null);
      } catch (err) {
        out.push(toTorusError(err).code);
      }
    }
    return out;
  }

  async has(peer: PeerTarget, refs: readonly BlockRef[]): Promise<boolean[]> {
    this.calls.has++;
    const s = this.store(peer);
    return refs.map((r) => s.hasBlock(r));
  }

  async delete(peer: PeerTarget, refs: readonly BlockRef[]): Promise<void> {
    this.calls.delete++;
    const s = this.store(peer);
    for (const r of refs) await s.deleteBlock(r);
  }

  async flush(peer: PeerTarget): Promise<void> {
    this.calls.flush++;
    await this.store(peer).flush();
  }

  instance(peer: PeerTarget): string | undefined {
    return this.instances.get(peer.uuid) ?? 'first';
  }

  private journal(peer: PeerTarget): BlockStore & JournalStore {
    const s = this.store(peer) as BlockStore & Partial<JournalStore>;
    if (!s.appendLog) throw new TorusError('INVALID_ARGUMENT', `peer ${peer.uuid} keeps no volume journals`);
    return s as BlockStore & JournalStore;
  }

  async hasJournal(peer: PeerTarget): Promise<boolean> {
    return typeof (this.store(peer) as Partial<JournalStore>).appendLog === 'function';
  }

  async appendLog(peer: PeerTarget, ref: BlockRef, pieces: readonly LogPiece[], sync: boolean): Promise<void> {
    this.calls.append++;
    const s = this.journal(peer);
    // Copies, as a network would deliver: the writer may reuse its buffers.
    await s.appendLog(ref, pieces.map((p) => ({ offset: p.offset, data: Buffer.from(p.data) })));
    if (sync) await s.flush();
  }

  async sealLog(peer: PeerTarget, ref: BlockRef, gapStart: number, gapEnd: number, crc: number, sync: boolean): Promise<void> {
    this.calls.seal++;
    const s = this.journal(peer);
    await s.sealLog(ref, gapStart, gapEnd, crc);
    if (sync) await s.flush();
  }

  async fenceVolume(peer: PeerTarget, volume: number, epoch: number): Promise<BlockRef[]> {
    return this.journal(peer).fenceVolume(volume, epoch);
  }

  async readRaw(peer: PeerTarget, ref: BlockRef): Promise<Buffer> {
    this.calls.get++;
    return this.journal(peer).readRaw(ref);
  }
}
