import { toTorusError, type ErrorCode } from '../core/errors.js';
import type { BlockRef } from '../core/ids.js';
import type { LogPiece, SectorRead } from '../core/interfaces.js';
import type { PeerPool } from '../rpc/pool.js';
import type { PeerTarget, PeerTransport, PutItem } from './transport.js';

/** Told about every call: which peer, which operation, how long, and its error code if it failed. */
export type RpcObserver = (peer: string, op: string, seconds: number, errorCode?: ErrorCode) => void;

/** PeerTransport over the peer-RPC pool: one pipelined connection and breaker per peer. */
export class RpcTransport implements PeerTransport {
  constructor(
    private readonly pool: PeerPool,
    private readonly observe?: RpcObserver,
  ) {}

  private async timed<T>(peer: PeerTarget, op: string, fn: () => Promise<T>): Promise<T> {
    if (!this.observe) return fn();
    const start = process.hrtime.bigint();
    try {
      const v = await fn();
      this.observe(peer.uuid, op, Number(process.hrtime.bigint() - start) / 1e9);
      return v;
    } catch (err) {
      this.observe(peer.uuid, op, Number(process.hrtime.bigint() - start) / 1e9, toTorusError(err).code);
      throw err;
    }
  }

  get(peer: PeerTarget, ref: BlockRef, offset: number, length: number, timeoutMs?: number): Promise<Buffer> {
    const opts = timeoutMs !== undefined ? { timeoutMs } : {};
    return this.timed(peer, 'get', () => {
      const c = this.pool.client(peer);
      return length === 0 ? c.getBlock(ref, opts) : c.readRange(ref, offset, length, opts);
    });
  }

  getSectors(peer: PeerTarget, ref: BlockRef, offset: number, length: number, timeoutMs?: number, into?: Buffer): Promise<SectorRead | undefined> {
    const opts = timeoutMs !== undefined ? { timeoutMs } : {};
    return this.timed(peer, 'get', () => this.pool.client(peer).readSectors(ref, offset, length, opts, into));
  }

  put(peer: PeerTarget, items: readonly PutItem[]): Promise<(ErrorCode | null)[]> {
    return this.timed(peer, 'put', async () => (await this.pool.client(peer).putBlocks(items)).map((e) => (e ? e.code : null)));
  }

  has(peer: PeerTarget, refs: readonly BlockRef[]): Promise<boolean[]> {
    return this.timed(peer, 'has', () => this.pool.client(peer).hasBlocks(refs));
  }

  delete(peer: PeerTarget, refs: readonly BlockRef[]): Promise<void> {
    return this.timed(peer, 'delete', () => this.pool.client(peer).deleteBlocks(refs));
  }

  flush(peer: PeerTarget): Promise<void> {
    return this.timed(peer, 'flush', () => this.pool.client(peer).flush());
  }

  instance(peer: PeerTarget): string | undefined {
    return this.pool.client(peer).instance;
  }

  hasJournal(peer: PeerTarget): Promise<boolean> {
    return this.pool.client(peer).hasJournal();
  }

  appendLog(peer: PeerTarget, ref: BlockRef, pieces: readonly LogPiece[], sync: boolean): Promise<void> {
    return this.timed(peer, 'append', () => this.pool.client(peer).appendLog(ref, pieces, { sync }));
  }

  sealLog(peer: PeerTarget, ref: BlockRef, gapStart: number, gapEnd: number, crc: number, sync: boolean): Promise<void> {
    return this.timed(peer, 'seal', () => this.pool.client(peer).sealLog(ref, gapStart, gapEnd, crc, { sync }));
  }

  fenceVolume(peer: PeerTarget, volume: number, epoch: number): Promise<BlockRef[]> {
    return this.timed(peer, 'fence', () => this.pool.client(peer).fenceVolume(volume, epoch));
  }

  readRaw(peer: PeerTarget, ref: BlockRef, timeoutMs?: number): Promise<Buffer> {
    return this.timed(peer, 'get', () => this.pool.client(peer).readRaw(ref, timeoutMs !== undefined ? { timeoutMs } : {}));
  }
}
