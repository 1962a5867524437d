import type { ErrorCode } from '../core/errors.js';
import type { BlockRef } from '../core/ids.js';
import type { PeerPool } from '../rpc/pool.js';
import type { PeerTarget, PeerTransport, PutItem } from './transport.js';

/** PeerTransport over the peer-RPC pool: one pipelined connection and breaker per peer. */
export class RpcTransport implements PeerTransport {
  constructor(private readonly pool: PeerPool) {}

  async get(peer: PeerTarget, ref: BlockRef, offset: number, length: number, timeoutMs?: number): Promise<Buffer> {
    const c = this.pool.client(peer);
    const opts = timeoutMs !== undefined ? { timeoutMs } : {};
    return length === 0 ? c.getBlock(ref, opts) : c.readRange(ref, offset, length, opts);
  }

  async put(peer: PeerTarget, items: readonly PutItem[]): Promise<(ErrorCode | null)[]> {
    const res = await this.pool.client(peer).putBlocks(items);
    return res.map((e) => (e ? e.code : null));
  }

  async has(peer: PeerTarget, refs: readonly BlockRef[]): Promise<boolean[]> {
    return this.pool.client(peer).hasBlocks(refs);
  }

  async delete(peer: PeerTarget, refs: readonly BlockRef[]): Promise<void> {
    await this.pool.client(peer).deleteBlocks(refs);
  }

  async flush(peer: PeerTarget): Promise<void> {
    await this.pool.client(peer).flush();
  }
}
