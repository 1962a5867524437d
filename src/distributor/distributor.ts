import { crc32c } from '@node-rs/crc32';
import { TorusError, isTorusError, toTorusError, type ErrorCode } from '../core/errors.js';
import { verifySectorRead } from '../core/crc.js';
import { blockRefKey, formatBlockRef, type BlockRef } from '../core/ids.js';
import type { BlockStore, LogPiece, PutBlockOptions, Ring } from '../core/interfaces.js';
import { BlockCache } from '../core/lru.js';
import { LocalTransport } from './local-transport.js';
import type { PeerTarget, PeerTransport } from './transport.js';

// The distributor turns "store this block" into "store it on the R peers the ring names" and
// "read this block" into "read it from the first replica that has a good copy". It is what the
// volume layer sees as its block store. Every process that does block I/O has one: torusd (with
// its disk as the local store) and clients (without).

export const WRITE_LEVELS = ['all', 'one', 'local'] as const;
export type WriteLevel = (typeof WRITE_LEVELS)[number];
export const READ_LEVELS = ['block', 'seq', 'spread'] as const;
export type ReadLevel = (typeof READ_LEVELS)[number];

export interface DistributorOptions {
  readonly blockSize: number;
  readonly ring: () => Ring;
  readonly target: (uuid: string) => PeerTarget | undefined;
  readonly transport: PeerTransport;
  /** This process's node UUID and disk, when it is a storage node. */
  readonly self?: { readonly uuid: string; readonly store: BlockStore };
  readonly writeLevel?: WriteLevel;
  readonly readLevel?: ReadLevel;
  readonly readCacheBytes?: number;
  /** Per-peer timeout for a read; `block` level doubles it on each retry round. */
  readonly readTimeoutMs?: number;
  readonly onRepairError?: (err: Error, ref: BlockRef, peer: string) => void;
  /** Unflushed data held for re-sending; past it a put first flushes. */
  readonly maxPendingBytes?: number;
}

/** A peer and the transport that reaches it. */
interface Route {
  readonly target: PeerTarget;
  readonly transport: PeerTransport;
}

export interface DistributorStats {
  reads: number;
  readBytes: number;
  writes: number;
  writeBytes: number;
  cacheHits: number;
  /** Reads of a sequential stream fetched without being kept in the read cache. */
  cacheBypasses: number;
  checksumFailures: number;
  replicaFallbacks: number;
  repairs: number;
  repairFailures: number;
  spills: number;
  failedWrites: number;
  failedReads: number;
  flushes: number;
  /** Ranged reads served by a peer too old to send sector checksums: not checked end to end. */
  uncheckedReads: number;
}

export class Distributor {
  readonly blockSize: number;
  private readonly cache: BlockCache | undefined;
  private readonly writeLevel: WriteLevel;
  private readonly readLevel: ReadLevel;
  private readonly readTimeoutMs: number;
  /**
   * Blocks that no flush has made durable on enough peers yet, with their data. An entry stays
   * until it has `want` durable copies, even across failed flushes: a flush that cannot place a
   * block reports it, and the next flush tries again, so no later flush can succeed while an
   * earlier put it covers is short of copies.
   */
  private readonly pendingData = new Map<string, PendingBlock>();
  private pendingBytes = 0;
  /** Puts running now, by issue order: a flush waits for those issued before it started. */
  private readonly putsInFlight = new Map<number, Promise<unknown>>();
  private nextPutSeq = 0;
  /** Flush passes run one at a time; callers arriving during one share the next (group commit). */
  private runningPass: Promise<void> | undefined;
  private queuedPass: Promise<void> | undefined;
  private readonly maxPendingBytes: number;
  private readonly repairing = new Set<string>();
  /** This node's own disk, when it is a storage node: calls for its uuid go there, not over the network. */
  private readonly local: Route | undefined;
  readonly stats: DistributorStats = {
    reads: 0,
    readBytes: 0,
    writes: 0,
    writeBytes: 0,
    cacheHits: 0,
    cacheBypasses: 0,
    checksumFailures: 0,
    replicaFallbacks: 0,
    repairs: 0,
    repairFailures: 0,
    spills: 0,
    failedWrites: 0,
    failedReads: 0,
    flushes: 0,
    uncheckedReads: 0,
  };

  constructor(private readonly opts: DistributorOptions) {
    this.blockSize = opts.blockSize;
    this.writeLevel = opts.writeLevel ?? 'all';
    this.readLevel = opts.readLevel ?? 'block';
    this.readTimeoutMs = opts.readTimeoutMs ?? 2000;
    this.maxPendingBytes = opts.maxPendingBytes ?? 256 * 1024 * 1024;
    if (this.writeLevel === 'local' && !opts.self)
      throw new TorusError('INVALID_ARGUMENT', 'write level "local" needs a local disk: only storage nodes can use it');
    this.local = opts.self ? { target: { uuid: opts.self.uuid, address: 'local' }, transport: new LocalTransport(opts.self.store) } : undefined;
    if (opts.self?.store.readSectorsInto) this.readRangeInto = (ref, offset, into, crc, sequential) => this.rangeInto(ref, offset, into, crc, sequential === true);
    const cacheBytes = opts.readCacheBytes ?? 0;
    this.cache = cacheBytes >= opts.blockSize ? new BlockCache(cacheBytes) : undefined;
  }

  private isSelf(uuid: string): boolean {
    return this.opts.self?.uuid === uuid;
  }

  /** Where calls for `uuid` go: this node's disk for its own uuid, else the peer over the network (undefined: no known address). */
  private route(uuid: string): Route | undefined {
    if (this.local && this.isSelf(uuid)) return this.local;
    const target = this.opts.target(uuid);
    return target ? { target, transport: this.opts.transport } : undefined;
  }

  /** route(), or NO_PEER when the peer has no known address. */
  private reach(uuid: string): Route {
    const to = this.route(uuid);
    if (!to) throw new TorusError('NO_PEER', `peer ${uuid} has no known address (down?)`);
    return to;
  }

  // ---- writes ----

  /**
   * Stores a block on its replicas. With write level `all` it resolves only when R peers hold
   * it; a failed owner is replaced by the next peer in ring order, and fewer than R successes is
   * an error, never a quiet partial success. Durable after `flush`.
   */
  async putBlock(ref: BlockRef, data: Uint8Array, opts: PutBlockOptions = {}): Promise<void> {
    if (data.length > this.blockSize) throw new TorusError('INVALID_ARGUMENT', `block of ${data.length} bytes exceeds the block size ${this.blockSize}`);
    // Memory pressure: make what is pending durable (and forgettable) before taking more. Not
    // through flush(): that waits for puts in flight, and those may be waiting here too.
    if (this.pendingBytes >= this.maxPendingBytes) await this.flushPass();
    const seq = this.nextPutSeq++;
    const run = this.putTracked(ref, data, opts);
    this.putsInFlight.set(seq, run);
    try {
      await run;
    } finally {
      this.putsInFlight.delete(seq);
    }
  }

  private async putTracked(ref: BlockRef, data: Uint8Array, opts: PutBlockOptions): Promise<void> {
    // One private copy serves the replicas, the re-send after a failed flush, and the cache:
    // the caller owns `data` and may reuse it as soon as we return, unless it says it never will.
    const block = opts.immutable && data.length === this.blockSize ? asBuffer(data) : padTo(data, this.blockSize);
    // Every replica checks what it stores against the writer's CRC; a caller that has it
    // (the volume keeps it in the inode) saves a pass over the bytes.
    const crc = opts.crc ?? crc32c(block) >>> 0;
    const ring = this.opts.ring();
    const perm = ring.getPeers(ref);
    if (perm.peers.length === 0 || perm.replication === 0)
      throw new TorusError('NO_PEER', 'the ring has no members: add storage nodes with `torusctl peer add`');
    const key = blockRefKey(ref);
    try {
      if (this.writeLevel === 'local') {
        await this.putOne(this.opts.self!.uuid, ref, block, crc, 1);
      } else {
        const want = this.writeLevel === 'one' ? 1 : perm.replication;
        await this.putReplicas(ref, block, crc, perm.peers, want, new Set(), want);
      }
    } catch (err) {
      this.stats.failedWrites++;
      // Copies that landed before the put failed are garbage, not a promise to anyone: the caller
      // saw the error. Unless an earlier, successful put of the same ref still needs them.
      const e = this.pendingData.get(key);
      if (e && !e.acked) this.dropPending(key);
      throw err;
    }
    const e = this.pendingData.get(key);
    if (e) e.acked = true;
    this.stats.writes++;
    this.stats.writeBytes += data.length;
    // A client keeps what it wrote for the reads that follow. Cached as a buffer of its own: a
    // block of a bigger write is a view of it (an NBD WRITE of 1 MiB is 16 blocks of 64 KiB), and
    // a cached view would keep the whole write in memory. A storage node keeps only blocks read
    // from other nodes: what it serves over NBD is written by a host whose page cache keeps the
    // bytes anyway, and a stream of writes (P1) filled its cache with copies no read asked for
    // (a 64 KiB copy per remote block, and the cache's whole budget held through every write).
    if (this.cache && !this.opts.self) this.cache.set(key, ownBuffer(block));
  }

  private async putOne(uuid: string, ref: BlockRef, data: Buffer, crc: number, want: number): Promise<void> {
    const to = this.reach(uuid);
    const [status] = await to.transport.put(to.target, [{ ref, data, crc }]);
    const instance = to.transport.instance?.(to.target);
    if (status) throw new TorusError(status, `peer ${to.target.address} refused block ${formatBlockRef(ref)}: ${status}`);
    this.addPending(uuid, ref, data, crc, instance, want);
  }

  private addPending(peer: string, ref: BlockRef, data: Buffer, crc: number, instance: string | undefined, want: number): void {
    const key = blockRefKey(ref);
    let entry = this.pendingData.get(key);
    if (!entry) {
      entry = { ref, data, crc, want, pending: new Map(), durable: new Set(), acked: false };
      this.pendingData.set(key, entry);
      this.pendingBytes += data.length;
    }
    entry.pending.set(peer, instance);
  }

  private dropPending(key: string): void {
    const entry = this.pendingData.get(key);
    if (!entry) return;
    this.pendingData.delete(key);
    this.pendingBytes -= entry.data.length;
  }

  /** Bytes written but not yet made durable by a flush. */
  get unflushedBytes(): number {
    return this.pendingBytes;
  }

  /**
   * Bytes held in memory beside their budgets: the block cache (--read-cache-size), and the
   * copies of unflushed puts kept for re-sending (a put past that budget flushes first).
   */
  memory(): { readCache: number; readCacheLimit: number; unflushed: number; unflushedLimit: number } {
    return { readCache: this.cache?.usedBytes ?? 0, readCacheLimit: this.cache ? (this.opts.readCacheBytes ?? 0) : 0, unflushed: this.pendingBytes, unflushedLimit: this.maxPendingBytes };
  }

  /** Puts `want` more copies on peers of `allPeers` outside `exclude`; `durableWant` is the block's R. */
  private async putReplicas(
    ref: BlockRef,
    data: Buffer,
    crc: number,
    allPeers: readonly string[],
    want: number,
    exclude: ReadonlySet<string>,
    durableWant: number,
  ): Promise<void> {
    const peers = exclude.size === 0 ? allPeers : allPeers.filter((p) => !exclude.has(p));
    let next = want;
    let ok = 0;
    const errors: string[] = [];
    let outOfSpace = 0;
    // Owners in parallel; each failure pulls in the next peer of the permutation (a spill),
    // so one dead owner does not fail the write while another node can take the copy.
    const attempt = async (i: number): Promise<void> => {
      const uuid = peers[i]!;
      try {
        await this.putOne(uuid, ref, data, crc, durableWant);
        ok++;
      } catch (err) {
        const e = toTorusError(err);
        if (e.code === 'OUT_OF_SPACE') outOfSpace++;
        errors.push(`${this.opts.target(uuid)?.address ?? uuid}: ${e.message}`);
        if (next < peers.length) {
          this.stats.spills++;
          await attempt(next++);
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(want, peers.length) }, (_, i) => attempt(i)));
    if (ok < want) {
      const code: ErrorCode = outOfSpace > 0 && outOfSpace >= errors.length ? 'OUT_OF_SPACE' : 'NO_PEER';
      throw new TorusError(code, `wrote block ${formatBlockRef(ref)} to only ${ok} of ${want} replicas (${errors.join('; ')})`);
    }
  }

  /**
   * Makes durable every put issued before this call, whoever else is flushing: it waits for the
   * puts still running, then for a flush pass that starts after they completed. A peer whose
   * flush fails is treated as lost for those blocks: they are sent to the next peers in ring
   * order and flushed there, so the call succeeds as long as R copies can be made durable
   * somewhere. A block that cannot be is reported, and stays pending for the next flush.
   */
  async flush(): Promise<void> {
    const issued = this.nextPutSeq;
    const running = [...this.putsInFlight].filter(([seq]) => seq < issued).map(([, p]) => p.catch(noop));
    if (running.length > 0) await Promise.all(running);
    await this.flushPass();
  }

  /**
   * One pass covers every block pending when it starts. A caller arriving while a pass runs may
   * have puts that pass missed, so it waits for the next one; everyone arriving before that next
   * pass starts shares it.
   */
  private flushPass(): Promise<void> {
    if (this.queuedPass) return this.queuedPass;
    if (!this.runningPass) return this.startPass();
    const queued = this.runningPass.catch(noop).then(() => {
      this.queuedPass = undefined;
      return this.startPass();
    });
    this.queuedPass = queued;
    return queued;
  }

  private startPass(): Promise<void> {
    const p = this.runPass().finally(() => {
      if (this.runningPass === p) this.runningPass = undefined;
    });
    this.runningPass = p;
    return p;
  }

  private async runPass(): Promise<void> {
    // Blocks whose put has returned: one still running is still placing its copies, and belongs
    // to a caller that has not flushed yet (flush() waits for the puts issued before it).
    const targets = [...this.pendingData.values()].filter((e) => e.acked);
    const failed = new Set<string>();
    for (let round = 0; round < 4; round++) {
      const open = targets.filter((e) => this.pendingData.get(blockRefKey(e.ref)) === e && e.durable.size < e.want);
      if (open.length === 0) {
        this.stats.flushes++;
        return;
      }
      // Which peers to flush, and what each flush is to cover: the copies taken so far, with the
      // process that took each. A copy taken while the flush runs is left for a later one.
      const byPeer = new Map<string, { entry: PendingBlock; instance: string | undefined }[]>();
      for (const e of open)
        for (const [peer, instance] of e.pending) {
          let list = byPeer.get(peer);
          if (!list) byPeer.set(peer, (list = []));
          list.push({ entry: e, instance });
        }
      const outcomes = await Promise.all(
        [...byPeer].map(async ([peer, covered]) => {
          try {
            const to = this.reach(peer);
            await to.transport.flush(to.target);
            return { peer, covered, ok: true, instance: to.transport.instance?.(to.target) };
          } catch {
            return { peer, covered, ok: false, instance: undefined };
          }
        }),
      );
      for (const { peer, covered, ok, instance } of outcomes) {
        let restarted = false;
        for (const { entry, instance: took } of covered) {
          // A flush answered by another process than the put does not cover the put: the peer
          // restarted in between, and what it had not synced may be gone.
          if (ok && took !== instance) restarted = true;
          if (entry.pending.get(peer) === took) entry.pending.delete(peer);
          if (ok && took === instance) entry.durable.add(peer);
        }
        if (!ok || restarted) failed.add(peer);
      }
      for (const e of open) if (e.durable.size >= e.want) this.dropPending(blockRefKey(e.ref));
      // What a failed peer took may be lost: send another copy to a peer that neither holds it
      // nor failed, and let the next round flush it there.
      const short = open.filter((e) => e.durable.size < e.want && e.durable.size + e.pending.size < e.want);
      const errors: string[] = [];
      await Promise.all(
        short.map(async (e) => {
          const exclude = new Set([...failed, ...e.durable, ...e.pending.keys()]);
          const more = e.want - e.durable.size - e.pending.size;
          try {
            this.stats.spills += more;
            await this.putReplicas(e.ref, e.data, e.crc, this.opts.ring().getPeers(e.ref).peers, more, exclude, e.want);
          } catch (err) {
            errors.push(toTorusError(err).message);
          }
        }),
      );
      if (errors.length > 0) {
        this.stats.failedWrites += errors.length;
        throw new TorusError('NO_PEER', `flush failed: ${errors.length} block(s) could not be made durable on enough peers (${errors[0]})`);
      }
    }
    throw new TorusError('NO_PEER', 'flush failed: peers kept failing while flushing');
  }

  // ---- journals (docs/journal.md) ----
  //
  // A volume's journal goes to exactly the replicas its head names, never elsewhere: these calls
  // address one peer each (this node's own store when it is one), and leave choosing peers,
  // retrying and moving the journal to the volume layer.

  /** The ring's owners of a log segment (its placement key), in preference order, and R. */
  journalOwners(ref: BlockRef): { peers: readonly string[]; replication: number } {
    const p = this.opts.ring().getPeers(ref);
    return { peers: p.peers, replication: p.replication };
  }

  /** The storage node this distributor runs in (torusd), if any: its own disk needs no hop. */
  localPeer(): string | undefined {
    return this.opts.self?.uuid;
  }

  /** Whether `peer` can hold a journal: known, reachable, and new enough to keep journals. */
  async journalCapable(peer: string): Promise<boolean> {
    const to = this.route(peer);
    if (!to) return false;
    try {
      return await to.transport.hasJournal(to.target);
    } catch {
      return false;
    }
  }

  async journalAppend(peer: string, ref: BlockRef, pieces: readonly LogPiece[], sync: boolean): Promise<void> {
    const to = this.reach(peer);
    await to.transport.appendLog(to.target, ref, pieces, sync);
  }

  async journalSeal(peer: string, ref: BlockRef, gapStart: number, gapEnd: number, crc: number, sync: boolean): Promise<void> {
    const to = this.reach(peer);
    await to.transport.sealLog(to.target, ref, gapStart, gapEnd, crc, sync);
  }

  async journalFence(peer: string, volume: number, epoch: number): Promise<BlockRef[]> {
    const to = this.reach(peer);
    return to.transport.fenceVolume(to.target, volume, epoch);
  }

  async journalReadRaw(peer: string, ref: BlockRef): Promise<Buffer> {
    const to = this.reach(peer);
    return to.transport.readRaw(to.target, ref, this.readTimeoutMs * 4);
  }

  // ---- reads ----

  /**
   * The whole block, from the first replica with a good copy. `crc` (CRC32C of the whole block,
   * as the volume's inode records it) is checked end to end when given. `sequential`: part of a
   * sequential stream, which is answered from the read cache but not kept in it: a stream would
   * push out what random reads come back to, and a block not kept can go straight into a
   * storage node's reply buffer (readRangeInto).
   */
  getBlock(ref: BlockRef, crc?: number, sequential?: boolean): Promise<Buffer> {
    return this.block(ref, crc, this.servedLocally(ref), sequential === true);
  }

  /**
   * `local`: servedLocally(ref), as the caller knows it already. `into`: the caller's buffer,
   * which a read the cache will not keep fills straight from the network (readInto).
   */
  private async block(ref: BlockRef, crc: number | undefined, local: boolean, sequential: boolean, into?: Buffer): Promise<Buffer> {
    const cache = this.cache;
    if (!cache || local) return this.read(ref, 0, 0, crc, local, into);
    const key = blockRefKey(ref);
    const cached = cache.get(key);
    if (cached) {
      this.stats.cacheHits++;
      return cached;
    }
    if (sequential) {
      this.stats.cacheBypasses++;
      return this.read(ref, 0, 0, crc, false, into);
    }
    const data = await this.read(ref, 0, 0, crc, false);
    cache.set(key, data);
    return data;
  }

  /**
   * Whether this node's own disk holds `ref`, so that a read is served from it. The read cache
   * leaves those alone: the kernel's page cache keeps a storage node's own replicas already, and
   * the cache's budget is better spent on what a miss would fetch over the network.
   */
  private servedLocally(ref: BlockRef): boolean {
    const self = this.opts.self;
    return self !== undefined && self.store.hasBlock(ref);
  }

  /**
   * Part of a block; only the sectors touched are read. With `crc` (the writer's CRC of the whole
   * block, as the inode keeps it) every byte is checked end to end: the replica sends the block's
   * sector checksums with the sectors, and they must combine to `crc`.
   */
  readRange(ref: BlockRef, offset: number, length: number, crc?: number, sequential?: boolean): Promise<Buffer> {
    this.checkRange(offset, length);
    return this.range(ref, offset, length, crc, this.servedLocally(ref), sequential === true);
  }

  private checkRange(offset: number, length: number): void {
    if (offset < 0 || length <= 0 || offset + length > this.blockSize)
      throw new TorusError('INVALID_ARGUMENT', `range ${offset}+${length} is outside a ${this.blockSize}-byte block`);
  }

  /** `local`, `into`: as for block(); `sequential` as for getBlock. */
  private async range(ref: BlockRef, offset: number, length: number, crc: number | undefined, local: boolean, sequential: boolean, into?: Buffer): Promise<Buffer> {
    const cache = this.cache;
    if (!cache || local) return this.read(ref, offset, length, crc, local, into);
    const key = blockRefKey(ref);
    const cached = cache.get(key);
    if (cached) {
      this.stats.cacheHits++;
      return cached.subarray(offset, offset + length);
    }
    // Small reads are cached by aligned chunk, so a working set of scattered 4 KiB reads can hit
    // without every miss fetching its whole block. The replica verifies whole sectors anyway, so
    // fetching the aligned span costs little more than the exact range.
    const c0 = Math.floor(offset / CACHE_CHUNK);
    const c1 = Math.ceil((offset + length) / CACHE_CHUNK);
    if (c1 - c0 > MAX_CACHED_CHUNKS) return this.read(ref, offset, length, crc, false);
    const chunks: Buffer[] = [];
    for (let c = c0; c < c1; c++) {
      const chunk = cache.get(`${key}@${c}`);
      if (!chunk) break;
      chunks.push(chunk);
    }
    const at = offset - c0 * CACHE_CHUNK;
    if (chunks.length === c1 - c0) {
      this.stats.cacheHits++;
      const joined = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
      return joined.subarray(at, at + length);
    }
    if (sequential) {
      this.stats.cacheBypasses++;
      return this.read(ref, offset, length, crc, false, into);
    }
    const start = c0 * CACHE_CHUNK;
    const span = await this.read(ref, start, Math.min(c1 * CACHE_CHUNK, this.blockSize) - start, crc, false);
    // Cached as a copy of its own when it is a view: a small RPC payload can pin a 64 KiB socket
    // buffer (src/rpc/codec.ts), which would let the cache hold 16 times what it counts. A buffer
    // that is all of its memory is kept as it is (callers never write into what a read returns:
    // cache hits hand out the cached bytes themselves).
    const own = ownBuffer(span);
    for (let c = c0; c < c1; c++) cache.set(`${key}@${c}`, own.subarray((c - c0) * CACHE_CHUNK, (c - c0 + 1) * CACHE_CHUNK));
    return span.subarray(at, at + length);
  }

  /**
   * readRange (getBlock when `into` is the whole block) into the caller's buffer. A storage node's
   * own replica is read straight into it, checked the same way, without a buffer of its own; what
   * comes from anywhere else (another node, the cache) is copied in. Only a storage node's
   * distributor has it (VolumeBlockStore.readRangeInto).
   */
  readonly readRangeInto?: (ref: BlockRef, offset: number, into: Buffer, crc?: number, sequential?: boolean) => Promise<void>;

  private async rangeInto(ref: BlockRef, offset: number, into: Buffer, crc: number | undefined, sequential: boolean): Promise<void> {
    const length = into.length;
    this.checkRange(offset, length);
    // Whether this node holds the block, once known, so that the paths below do not ask again.
    let local: boolean | undefined;
    const self = this.opts.self;
    const store = self?.store;
    const sector = store?.sectorSize ?? 0;
    // Whole sectors, checked against the writer's CRC: what a replica reads or sends is then
    // exactly the bytes asked for, and can go straight into `into`.
    const sectors = crc !== undefined && sector > 0 && offset % sector === 0 && (length % sector === 0 || offset + length === this.blockSize);
    if (sectors && store?.readSectorsInto && this.readLevel !== 'spread') {
      try {
        const read = await store.readSectorsInto(ref, offset, into);
        if (read) {
          verifySectorRead(read, this.blockSize, crc, offset, length, false, () => `block ${formatBlockRef(ref)} from ${self!.uuid}`);
          this.stats.reads++;
          this.stats.readBytes += length;
          return;
        }
        // Not one of this node's blocks: read where it is, below.
        local = false;
      } catch (err) {
        if (isTorusError(err, 'INVALID_ARGUMENT')) throw err;
        // The other replicas, the local failure noted so that the bad copy is repaired.
        copyUnlessSame(await this.readReplicas(ref, offset, length, crc, true, { uuid: self!.uuid, err }, into), into);
        return;
      }
    }
    local ??= this.servedLocally(ref);
    // Another node's bytes are copied into `into` from each socket read when nothing keeps them.
    const direct = sectors ? into : undefined;
    const data = offset === 0 && length === this.blockSize ? await this.block(ref, crc, local, sequential, direct) : await this.range(ref, offset, length, crc, local, sequential, direct);
    copyUnlessSame(data, into);
  }

  /** `local`: servedLocally(ref). */
  private candidates(ref: BlockRef, local: boolean): string[] {
    const perm = this.opts.ring().getPeers(ref);
    const order = [...perm.peers];
    // Our own disk first when we are a replica: no network, same verification.
    const self = this.opts.self;
    if (self && local) {
      const i = order.indexOf(self.uuid);
      if (i > 0) order.splice(i, 1);
      if (i !== 0) order.unshift(self.uuid);
    }
    return order;
  }

  /** `into`: as for block(); only a checked read (with `crc`) from another node uses it. */
  private async readFrom(uuid: string, ref: BlockRef, offset: number, length: number, timeoutMs: number, crc?: number, into?: Buffer): Promise<Buffer> {
    const what = (): string => `block ${formatBlockRef(ref)} from ${uuid}`;
    // A whole block is checked the same way: the sector checksums the store has just verified
    // combine into the block's CRC, so its bytes are not run through a CRC a second time here.
    if (crc !== undefined) return this.readChecked(uuid, ref, offset, length === 0 ? this.blockSize : length, timeoutMs, crc, what, into);
    const to = this.route(uuid);
    if (!to) throw new TorusError('BLOCK_UNAVAILABLE', `peer ${uuid} has no known address`);
    return to.transport.get(to.target, ref, offset, length, timeoutMs);
  }

  /** A ranged read checked against the writer's CRC through the block's sector checksums. */
  private async readChecked(uuid: string, ref: BlockRef, offset: number, length: number, timeoutMs: number, crc: number, what: () => string, into?: Buffer): Promise<Buffer> {
    const to = this.route(uuid);
    if (!to) throw new TorusError('BLOCK_UNAVAILABLE', `peer ${uuid} has no known address`);
    const read = await to.transport.getSectors(to.target, ref, offset, length, timeoutMs, to === this.local ? undefined : into);
    // Our own store has checked the sectors against its checksums; the combination is what is
    // left. What came over the network is checked sector by sector again.
    if (read) return verifySectorRead(read, this.blockSize, crc, offset, length, to !== this.local, what);
    // A node from before sector checksums were served: a whole block is checked against the
    // writer's CRC here, a part by that node against its own sums only.
    if (offset === 0 && length === this.blockSize) {
      const data = await to.transport.get(to.target, ref, 0, 0, timeoutMs);
      if ((crc32c(data) >>> 0) !== crc >>> 0) throw new TorusError('CORRUPT', `${what()} fails its end-to-end checksum`);
      return data;
    }
    this.stats.uncheckedReads++;
    return to.transport.get(to.target, ref, offset, length, timeoutMs);
  }

  /** `local`: this node's own disk holds `ref` (servedLocally), as the caller has just asked; `into` as for block(). */
  private async read(ref: BlockRef, offset: number, length: number, crc: number | undefined, local: boolean, into?: Buffer): Promise<Buffer> {
    // Our own replica, the common case on a storage node: read at once, without walking the ring
    // for a list of candidates. A failure goes on to the other replicas like any failed read.
    if (!local || this.readLevel === 'spread') return this.readReplicas(ref, offset, length, crc, local, undefined, into);
    const self = this.opts.self!.uuid;
    try {
      const data = await this.readFrom(self, ref, offset, length, this.readTimeoutMs, crc);
      this.stats.reads++;
      this.stats.readBytes += data.length;
      return data;
    } catch (err) {
      if (isTorusError(err, 'INVALID_ARGUMENT')) throw err;
      return this.readReplicas(ref, offset, length, crc, true, { uuid: self, err }, into);
    }
  }

  /**
   * Reads from the replicas in turn (or all owners at once, `spread`); `tried` failed already;
   * `local` and `into` as for read. Replicas asked one at a time may share `into`: a reply that
   * comes after its call gave up writes nothing (PeerClient.readSectors). Replicas asked at once
   * may not.
   */
  private async readReplicas(ref: BlockRef, offset: number, length: number, crc: number | undefined, local: boolean, tried?: { uuid: string; err: unknown }, into?: Buffer): Promise<Buffer> {
    const peers = this.candidates(ref, local);
    if (peers.length === 0) throw new TorusError('NO_PEER', 'the ring has no members');
    const bad: string[] = [];
    const errors: string[] = [];
    let transient = false;
    const note = (uuid: string, err: unknown): void => {
      const e = toTorusError(err);
      if (e.code === 'CORRUPT') {
        this.stats.checksumFailures++;
        bad.push(uuid);
      } else if (e.code !== 'BLOCK_UNAVAILABLE' && e.code !== 'NOT_EXIST') {
        transient = true;
      }
      errors.push(`${uuid}: ${e.message}`);
    };
    const done = (data: Buffer, from: string): Buffer => {
      this.stats.reads++;
      this.stats.readBytes += data.length;
      if (bad.length > 0) this.scheduleRepair(ref, bad, from, crc);
      return data;
    };
    if (tried) note(tried.uuid, tried.err);

    if (this.readLevel === 'spread') {
      const owners = peers.slice(0, Math.max(1, this.opts.ring().getPeers(ref).replication));
      let winner: string | undefined;
      const attempts = owners.map(async (u) => {
        try {
          return [await this.readFrom(u, ref, offset, length, this.readTimeoutMs, crc), u] as const;
        } catch (err) {
          note(u, err);
          // A bad copy found after another replica already answered still gets repaired.
          if (winner !== undefined && isTorusError(err, 'CORRUPT')) this.scheduleRepair(ref, [u], winner, crc);
          throw err;
        }
      });
      try {
        const [data, from] = await Promise.any(attempts);
        winner = from;
        return done(data, from);
      } catch {
        // every owner failed: fall through to a sequential pass over everyone
      }
    }
    const rounds = this.readLevel === 'block' ? 3 : 1;
    for (let round = 0; round < rounds; round++) {
      const timeout = this.readTimeoutMs * 2 ** round;
      for (const [i, uuid] of peers.entries()) {
        if (bad.includes(uuid) || (round === 0 && uuid === tried?.uuid)) continue;
        try {
          const data = await this.readFrom(uuid, ref, offset, length, timeout, crc, into);
          if (i > 0 || round > 0 || tried) this.stats.replicaFallbacks++;
          return done(data, uuid);
        } catch (err) {
          note(uuid, err);
          if (isTorusError(err, 'INVALID_ARGUMENT')) throw err;
        }
      }
      // Another round, with longer timeouts, only helps when a replica timed out or was unreachable.
      if (!transient) break;
      transient = false;
    }
    this.stats.failedReads++;
    throw new TorusError('BLOCK_UNAVAILABLE', `no replica could serve block ${formatBlockRef(ref)} (${errors.slice(0, 4).join('; ')})`);
  }

  /** Replaces bad copies with the good one, in the background. A failed repair is retried by the next read. */
  private scheduleRepair(ref: BlockRef, bad: string[], goodFrom: string, crc: number | undefined): void {
    const key = blockRefKey(ref);
    if (this.repairing.has(key)) return;
    this.repairing.add(key);
    void (async () => {
      try {
        const good = await this.readFrom(goodFrom, ref, 0, 0, this.readTimeoutMs * 4, crc);
        const putOpts = crc === undefined ? undefined : { crc };
        for (const uuid of bad) {
          try {
            const to = this.route(uuid);
            if (!to) continue;
            // The bad copy must go first: a put of a ref the store already holds is a no-op.
            await to.transport.delete(to.target, [ref]);
            const [status] = await to.transport.put(to.target, [{ ref, data: good, ...putOpts }]);
            if (status) throw new TorusError(status, `repair put refused: ${status}`);
            await to.transport.flush(to.target);
            this.stats.repairs++;
          } catch (err) {
            this.stats.repairFailures++;
            this.opts.onRepairError?.(toTorusError(err), ref, uuid);
          }
        }
      } catch (err) {
        this.stats.repairFailures++;
        this.opts.onRepairError?.(toTorusError(err), ref, goodFrom);
      } finally {
        this.repairing.delete(key);
      }
    })();
  }

  /** Waits for background repairs (tests and shutdown). */
  async idle(): Promise<void> {
    while (this.repairing.size > 0) await new Promise((r) => setTimeout(r, 10));
  }
}

interface PendingBlock {
  readonly ref: BlockRef;
  readonly data: Buffer;
  readonly crc: number;
  /** Durable copies the block needs: R, or 1 for write levels `one` and `local`. */
  readonly want: number;
  /** Peers that took the block and have not flushed since, each with the process instance that took it (see PeerTransport.instance). */
  readonly pending: Map<string, string | undefined>;
  /** Peers that have it on stable storage. */
  readonly durable: Set<string>;
  /** A put of it succeeded: its caller was told it is stored, so a later failed put of the same ref must not forget it. */
  acked: boolean;
}

function noop(): void {}

/** Copies `data` into `into`, unless the read already put it there. */
function copyUnlessSame(data: Buffer, into: Buffer): void {
  if (data.buffer !== into.buffer || data.byteOffset !== into.byteOffset) data.copy(into);
}

/** Granularity of the cache for reads smaller than a block (the replicas' sector size). */
const CACHE_CHUNK = 4096;
/** Ranged reads spanning more chunks than this are not cached (they are rare and large). */
const MAX_CACHED_CHUNKS = 16;

/** `data` itself when it is all of its memory, else a copy outside Buffer's shared pool: keeping it pins nothing else. */
function ownBuffer(data: Buffer): Buffer {
  if (data.byteOffset === 0 && data.buffer.byteLength === data.length) return data;
  const own = Buffer.allocUnsafeSlow(data.length);
  data.copy(own);
  return own;
}

function asBuffer(data: Uint8Array): Buffer {
  return Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

function padTo(data: Uint8Array, size: number): Buffer {
  const b = Buffer.alloc(size);
  b.set(data);
  return b;
}
