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

  /** Transactional access to the rest of the keyspace (volumes, locks, snapshots). */
  kv(): MetaKV;

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
   * The sectors covering [offset, offset+length), verified against the block's sector checksums,
   * together with all of those checksums: a reader that knows the writer's CRC of the whole
   * block checks that they combine to it (verifySectorRead), so every byte it serves is
   * checked end to end without reading the whole block.
   */
  readSectors(ref: BlockRef, offset: number, length: number): Promise<SectorRead>;
  /**
   * readSectors into the caller's memory: `into` receives the sectors from `offset` (a multiple
   * of the sector size) on, and its length is whole sectors or reaches the end of the block. The
   * answer's `data` is `into`. Lets a reply buffer be filled straight from the disk, without a
   * buffer per read. Undefined when the store does not hold the block (so that a caller that
   * reads here when it can asks once, not twice); on failure `into` holds garbage.
   */
  readSectorsInto?(ref: BlockRef, offset: number, into: Buffer): Promise<SectorRead | undefined>;
  /** The sector size of readSectors' checksums; a store with readSectorsInto tells it. */
  readonly sectorSize?: number;
  /**
   * Stores a block (data shorter than blockSize is zero-padded). Storing a ref that already
   * exists is a no-op. OUT_OF_SPACE when full; CORRUPT when `opts.crc` is given and the block
   * as stored does not match it (damaged on the way). Durable only after `flush`.
   */
  putBlock(ref: BlockRef, data: Uint8Array, opts?: { readonly crc?: number }): Promise<void>;
  /** Held and sealed: an open log block is not (yet) a block anyone can read or copy. */
  hasBlock(ref: BlockRef): boolean;
  deleteBlock(ref: BlockRef): Promise<void>;
  /** Makes every put, delete, append and seal completed before the call durable. */
  flush(): Promise<void>;
  numBlocks(): number;
  usedBlocks(): number;
  /** A snapshot of the refs held (open log blocks included), safe to iterate while the store changes. */
  refs(): BlockRef[];
  /**
   * A mark that grows as blocks are stored, opened and sealed here: every one of those finished
   * before the call is at or below it. With refsChangedSince, a walk that only needs what changed
   * (the rebalancer's quiet passes) need not list every block.
   */
  changeMark?(): number;
  /** The refs held whose block was stored, opened or sealed after `mark` (open log blocks included). */
  refsChangedSince?(mark: number): BlockRef[];
  close(): Promise<void>;
}

/** A piece of an APPEND: bytes at an offset inside the log block. */
export interface LogPiece {
  readonly offset: number;
  readonly data: Uint8Array;
}

/**
 * What a storage node does for volume journals (docs/journal.md). A log block (BlockType.Log) is
 * open while a writer appends to it and sealed into an ordinary block after; the ref's inode is
 * the writer's session epoch, checked against the volume's fence.
 */
export interface JournalStore {
  /**
   * Writes `pieces` into the open log block `ref`, opening it first if it is new. LOCKED when the
   * volume is fenced above the ref's epoch; INVALID_ARGUMENT when the block is already sealed or
   * a piece falls outside the block. Durable after `flush`, or, with `sync`, when it resolves.
   */
  appendLog(ref: BlockRef, pieces: readonly LogPiece[], sync?: boolean): Promise<void>;
  /**
   * Seals an open log block: bytes [gapStart, gapEnd) become zeros, and the block becomes an
   * ordinary immutable one, checked against `crc` (the writer's CRC of it, gap zeroed): CORRUPT
   * if it differs. Sealing a block already sealed with that CRC is a no-op. Crash-safe: the
   * block is open or sealed after any crash, never half of each. Durable after `flush`.
   */
  sealLog(ref: BlockRef, gapStart: number, gapEnd: number, crc: number): Promise<void>;
  /**
   * Raises the volume's fence to `epoch`, durably, before answering: from then on appends and
   * seals of its log blocks below that epoch are refused. LOCKED if it is already fenced higher.
   * Returns the volume's open log blocks.
   */
  fenceVolume(volume: number, epoch: number): Promise<BlockRef[]>;
  /** A block's bytes as stored, open log blocks included (unverified for those: journal replay checks its records). */
  readRaw(ref: BlockRef): Promise<Buffer>;
  /** True for an open log block held here. */
  isOpenLog(ref: BlockRef): boolean;
}

/** A range of a device and what it holds, as NBD's base:allocation reports it. */
export interface Extent {
  readonly length: number;
  /** No storage behind it (never written, or trimmed). */
  readonly hole: boolean;
  /** Reads as zeros. */
  readonly zero: boolean;
}

/** How a caller hands a block to a store. */
export interface PutBlockOptions {
  /** The caller never modifies the data again, so the store may keep it instead of copying. */
  readonly immutable?: boolean;
  /**
   * CRC32C of the whole block, zero-padded to the block size, as the writer computed it: each
   * replica checks what it stores against it, and readers check what they read.
   */
  readonly crc?: number;
}

/** Sectors of one block and the checksums of all its sectors (BlockStore.readSectors). */
export interface SectorRead {
  readonly sectorSize: number;
  /** CRC32C of every sector of the block, u32 little-endian, in order. */
  readonly sums: Buffer;
  /** Where `data` starts in the block: a multiple of sectorSize. */
  readonly offset: number;
  /** Whole sectors (the block's last one may be short). */
  readonly data: Buffer;
}

/**
 * A byte-addressable virtual disk: what the NBD and AoE front ends serve. A Torus volume is one;
 * tests use an in-memory one. Offsets and lengths are bytes; every method throws TorusError
 * (INVALID_ARGUMENT past the end, OUT_OF_SPACE, NO_PEER/BLOCK_UNAVAILABLE when replicas fail,
 * LOCKED when the device lost its exclusive lock, INVALID_ARGUMENT for writes to a read-only one).
 */
export interface BlockDevice {
  readonly size: number;
  /** The device's natural block size (the cluster block size for volumes); a power of two. */
  readonly blockSize: number;
  readonly readOnly: boolean;
  /** The bytes, read-only: the result may be shared with a cache, so callers copy to modify. */
  read(offset: number, length: number): Promise<Buffer>;
  /** The same bytes in pieces, in order, when the device holds them apart (also read-only). */
  readv?(offset: number, length: number): Promise<readonly Buffer[]>;
  /**
   * The same bytes into the caller's buffer (`into.length` of them), which the caller reuses once
   * it is done with them: for a front end that keeps its reply buffers. On failure `into` holds
   * garbage.
   */
  readInto?(offset: number, into: Buffer): Promise<void>;
  /**
   * `fua`: durable before it resolves, as if followed by flush(). `adopt`: the caller hands `data`
   * over and never touches it again, so the device may keep it instead of copying (the NBD server
   * passes request payloads it owns).
   */
  write(offset: number, data: Uint8Array, fua?: boolean, adopt?: boolean): Promise<void>;
  /** Makes every write completed before the call durable. */
  flush(): Promise<void>;
  /** Discards a range: it reads as zeros afterwards and whole blocks free their storage. */
  trim(offset: number, length: number): Promise<void>;
  /** Zeroes a range; with `noHole` the range stays allocated. */
  writeZeroes(offset: number, length: number, opts?: { noHole?: boolean; fua?: boolean }): Promise<void>;
  /** Extents covering [offset, offset+length), in order, at least one. */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
}

/** What a front end may tell a client about an export without opening it. */
export interface DeviceInfo {
  readonly size: number;
  readonly blockSize: number;
  readonly readOnly: boolean;
  readonly description?: string;
}

/** Opens devices by export name for a front end; `release` when a connection is done with it. */
export interface DeviceProvider {
  list(): Promise<string[]>;
  open(name: string, opts: { readOnly: boolean }): Promise<{ device: BlockDevice; release(): Promise<void> }>;
  /**
   * The export as open() would give it, without opening it: failing as open() would, but taking
   * no lock (NBD_OPT_INFO asks this of every export a client merely looks at). Without it the
   * front end opens and releases.
   */
  info?(name: string, opts: { readOnly: boolean }): Promise<DeviceInfo>;
}

// ---- transactional key-value access, for metadata that lives beyond the fixed keys above ----

export interface KVEntry {
  readonly key: string;
  readonly value: string;
  /** Revision of the last change to this key. */
  readonly modRevision: number;
  /** Number of changes since the key was created. */
  readonly version: number;
  /** The lease the key is bound to, '' if none. */
  readonly lease: string;
}

export type KVCompare =
  | { readonly key: string; readonly target: 'version' | 'mod'; readonly cmp: '==' | '!=' | '<' | '>'; readonly value: number }
  | { readonly key: string; readonly target: 'value'; readonly cmp: '==' | '!='; readonly value: string };

export type KVOp =
  | { readonly op: 'put'; readonly key: string; readonly value: string; /** bind to this session's lease */ readonly session?: KVSession }
  | { readonly op: 'delete'; readonly key: string; readonly prefix?: boolean }
  | { readonly op: 'get'; readonly key: string; readonly prefix?: boolean };

export interface KVTxnResult {
  readonly succeeded: boolean;
  readonly revision: number;
  /** For each 'get' op of the branch that ran, in order: the entries it found. */
  readonly gets: readonly (readonly KVEntry[])[];
}

/** A lease kept alive by the process; keys bound to it vanish when it is lost. */
export interface KVSession {
  readonly id: string;
  /** False once etcd said the lease is gone, or it could not be renewed before its TTL ran out. */
  readonly alive: boolean;
  /**
   * Calls `cb` once the lease is lost. Returns what stops that: a holder that goes away first
   * must call it, or the session keeps the holder (and all it refers to) alive with the callback.
   */
  onLost(cb: () => void): () => void;
  revoke(): Promise<void>;
}

/** The keyspace's history and size, as the member that answered sees them. */
export interface MetaStatus {
  /** The newest revision. */
  readonly revision: number;
  /** Space the store takes on disk (etcd: the database file, which only defragmentation shrinks). */
  readonly dbSizeBytes: number;
}

export interface MetaKV {
  get(key: string): Promise<KVEntry | undefined>;
  /** Every key under the prefix, read at one revision. */
  list(prefix: string): Promise<{ entries: KVEntry[]; revision: number }>;
  /**
   * One transaction. `timeoutMs` shortens the client's deadline for it: for a caller that can
   * resolve an unknown outcome itself and prefers that to waiting (VolumeMeta.commit).
   */
  txn(compares: readonly KVCompare[], success: readonly KVOp[], failure?: readonly KVOp[], opts?: { readonly timeoutMs?: number }): Promise<KVTxnResult>;
  /** A new lease with this TTL, renewed in the background until revoked or lost. */
  session(ttlMs: number): Promise<KVSession>;
  status(): Promise<MetaStatus>;
  /**
   * Forgets the history before `revision` (etcd keeps every revision until compacted); a
   * revision compacted already is no error. Nothing here reads old revisions; watches that
   * resume from one read the key again.
   */
  compact(revision: number): Promise<void>;
}
