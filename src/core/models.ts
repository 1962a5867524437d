// Metadata records as stored in etcd (JSON, so `etcdctl get` stays readable) and passed between
// modules. Field names are part of the on-etcd format: add fields, never rename them.

export interface GlobalMetadata {
  /** Cluster-wide block size in bytes, fixed at init. */
  readonly blockSize: number;
  /** Random id written at init; a data dir remembers it to refuse joining another cluster. */
  readonly clusterId: string;
  readonly createdAt: string;
}

export interface RebalanceInfo {
  /** True while the node is moving blocks for the current ring version. */
  readonly rebalancing: boolean;
  /** Blocks and bytes still to move (estimate), and moved so far in the current pass. */
  readonly blocksLeft: number;
  readonly bytesLeft: number;
  readonly blocksMoved: number;
  readonly bytesMoved: number;
  /** Bytes per second over the last pass (moved + re-replicated). */
  readonly rate: number;
  /** ms since epoch of the last finished pass, 0 if none. */
  readonly lastFinish: number;
  /** Blocks held here whose owners could not all be confirmed to hold them in the last pass. */
  readonly underReplicated?: number;
  /**
   * Version of the ring the last finished pass was made on; 0 (or absent, in records from other
   * writers) when no pass is known to have finished. A node whose value is below the current
   * ring's version has not yet checked its blocks against that ring, whatever `rebalancing` says.
   */
  readonly ringVersion?: number;
}

export const IDLE_REBALANCE: RebalanceInfo = Object.freeze({
  rebalancing: false,
  blocksLeft: 0,
  bytesLeft: 0,
  blocksMoved: 0,
  bytesMoved: 0,
  rate: 0,
  lastFinish: 0,
  ringVersion: 0,
});

/** A kind of orphaned block a storage node holds: see docs/architecture.md, "Orphans". */
export interface OrphanGroupInfo {
  /** `unknown-type`: a block type this node's build does not know; `unknown-volume`: a volume id etcd never handed out. */
  readonly kind: 'unknown-type' | 'unknown-volume';
  /** The block type or the volume id. */
  readonly id: number;
  readonly blocks: number;
  /** ms since epoch this node first found them orphaned (the grace period runs from here). */
  readonly since: number;
}

/** A storage node's background scrub and orphan handling, as published with its heartbeat. */
export interface ScrubInfo {
  /** Every held block is read and checked once per interval (ms); 0: scrubbing is off. */
  readonly intervalMs: number;
  /** The read rate limit, bytes per second. */
  readonly rate: number;
  /** The pass under way: when it started (0: none), and bytes checked so far of the bytes held. */
  readonly passStartedAt: number;
  readonly passBytes: number;
  readonly heldBytes: number;
  /** The last finished pass (0s when none yet). */
  readonly lastStartedAt: number;
  readonly lastFinishedAt: number;
  readonly lastBytes: number;
  readonly lastErrors: number;
  readonly lastRepaired: number;
  /** When the next pass is due (ms since epoch; 0 while one runs or scrubbing is off). */
  readonly nextPassAt: number;
  /** Since the data dir's first scrub: passes finished, bytes checked. */
  readonly passes: number;
  readonly checkedBytes: number;
  /** Since the data dir's first scrub: bad copies found, replaced by a checked copy from another replica, and dropped (no checksum left here to check a replacement against). */
  readonly errors: number;
  readonly repaired: number;
  readonly dropped: number;
  /** Bad copies still here, waiting for a good copy from another replica. */
  readonly pending: number;
  /** Orphaned blocks held now, the kinds (at most 16 listed), and those deleted after the grace period since start. */
  readonly orphanBlocks: number;
  readonly orphanGroups: readonly OrphanGroupInfo[];
  readonly orphansDeleted: number;
  /** ms an orphan is kept before it is deleted; 0: never deleted. */
  readonly orphanGraceMs: number;
}

/** What a process publishes about itself under its lease. */
export interface PeerInfo {
  readonly uuid: string;
  /** Peer RPC address as a URL (tdp://host:port); empty for clients that serve no blocks. */
  readonly address: string;
  /** HTTP address (metrics, health), empty if not served. */
  readonly httpAddress: string;
  /** ms since epoch of the heartbeat that wrote this record. */
  readonly lastSeen: number;
  /** Heartbeat interval in ms, so readers know when a record is stale. */
  readonly heartbeatMs: number;
  readonly totalBlocks: number;
  readonly usedBlocks: number;
  readonly blockSize: number;
  readonly protocolVersion: number;
  readonly rebalance: RebalanceInfo;
  readonly version: string;
  /** Storage nodes: the scrubber's state; absent from clients and from builds without one. */
  readonly scrub?: ScrubInfo;
  /** Storage nodes: the block types this build knows; another node keeps orphans of these types. */
  readonly blockTypes?: readonly number[];
}

export const RING_TYPES = ['empty', 'single', 'mod', 'ketama'] as const;
export type RingType = (typeof RING_TYPES)[number];

/** A ring member: a peer's identity and its weight. */
export interface RingPeer {
  readonly uuid: string;
  /** Capacity in blocks; ketama weights by it. */
  readonly totalBlocks: number;
}

export interface RingModel {
  readonly type: RingType;
  readonly version: number;
  readonly replication: number;
  readonly peers: readonly RingPeer[];
}
