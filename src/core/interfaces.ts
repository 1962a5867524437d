// The seams between the architectural pieces. Each consumer depends on these, never on a
// concrete implementation, and each has an in-memory twin for unit tests.

import type { BlockRef } from './ids.js';
import type { GlobalMetadata, PeerInfo, RingModel, RingType } from './models.js';

/** Placement for one block: every ring member in preference order; the first `replication` own it. */
export interface PeerPermutation {
  readonly peers: readonly string[];
  readonly replication: number;
}

/** A ring is a pure function from a block to an ordered list of peers. Immutable. */
export interface Ring {
  readonly type: RingType;
  readonly version: number;
  /** The replication asked for; effective replication is min(this, members). */
  readonly replication: number;
  members(): readonly string[];
  getPeers(ref: BlockRef): PeerPermutation;
  describe(): string;
  toModel(): RingModel;
}

export interface Unsubscribe {
  (): void;
}

/**
 * Cluster metadata and coordination. etcd is the real one; metadata/memory is the twin.
 * Every method throws TorusError: NOT_INITIALIZED before `init`, ETCD_UNAVAILABLE when the
 * service cannot be reached in time.
 */
export interface MetadataService {
  /** Creates the cluster: global metadata and the first ring. EXISTS if already initialized. */
  init(meta: GlobalMetadata, ring: RingModel): Promise<void>;
  globalMetadata(): Promise<GlobalMetadata>;
  /** Deletes every key the cluster owns. */
  wipe(): Promise<void>;

  getRing(): Promise<RingModel>;
  /**
   * Replaces the ring if and only if the stored ring still has version `next.version - 1`.
   * NON_SEQUENTIAL_RING if `next` is not exactly one version ahead of what is stored,
   * AGAIN if another writer got there first.
   */
  setRing(next: RingModel): Promise<void>;
  /** Calls back with every ring stored from now on (and the current one first). */
  watchRing(onRing: (ring: RingModel) => void, onError?: (err: Error) => void): Unsubscribe;

  /**
   * Publishes this process's PeerInfo bound to its lease, so it vanishes when the process
   * stops renewing. `ttlMs` is the lease time-to-live.
   */
  registerPeer(info: PeerInfo, ttlMs: number): Promise<void>;
  /** Removes this process's registration and revokes its lease. */
  unregisterPeer(uuid: string): Promise<void>;
  getPeers(): Promise<PeerInfo[]>;

  close(): Promise<void>;
}

/** A local store of immutable blocks (a storage node's disk, or memory). */
export interface BlockStore {
  readonly blockSize: number;
  /** The whole block, verified. BLOCK_UNAVAILABLE if absent, CORRUPT if a checksum fails. */
  getBlock(ref: BlockRef): Promise<Buffer>;
  /** `length` bytes at `offset` inside the block; only the sectors touched are read and verified. */
  readRange(ref: BlockRef, offset: number, length: number): Promise<Buffer>;
  /**
   * Stores a block (data shorter than blockSize is zero-padded). Storing a ref that already
   * exists is a no-op. OUT_OF_SPACE when full. Durable only after `flush`.
   */
  putBlock(ref: BlockRef, data: Uint8Array): Promise<void>;
  hasBlock(ref: BlockRef): boolean;
  deleteBlock(ref: BlockRef): Promise<void>;
  /** Makes every put and delete completed before the call durable. */
  flush(): Promise<void>;
  numBlocks(): number;
  usedBlocks(): number;
  /** A snapshot of the refs held, safe to iterate while the store changes. */
  refs(): BlockRef[];
  close(): Promise<void>;
}
