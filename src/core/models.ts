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
