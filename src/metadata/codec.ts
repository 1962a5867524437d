import { TorusError } from '../core/errors.js';
import type { GlobalMetadata, PeerInfo, RingModel, ScrubInfo } from '../core/models.js';
import { IDLE_REBALANCE, RING_TYPES } from '../core/models.js';

// Metadata values are JSON. Decoding validates shape, so a hand-edited or foreign key gives a
// clear error instead of undefined fields spreading through the program.

function obj(text: string, what: string): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw new TorusError('INTERNAL', `${what} in etcd is not valid JSON`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new TorusError('INTERNAL', `${what} in etcd is not an object`);
  return v as Record<string, unknown>;
}

function num(o: Record<string, unknown>, k: string, what: string, dflt?: number): number {
  const v = o[k] ?? dflt;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new TorusError('INTERNAL', `${what} in etcd has no valid "${k}"`);
  return v;
}

function str(o: Record<string, unknown>, k: string, what: string, dflt?: string): string {
  const v = o[k] ?? dflt;
  if (typeof v !== 'string') throw new TorusError('INTERNAL', `${what} in etcd has no valid "${k}"`);
  return v;
}

export function decodeGlobal(text: string): GlobalMetadata {
  const o = obj(text, 'global metadata');
  return {
    blockSize: num(o, 'blockSize', 'global metadata'),
    clusterId: str(o, 'clusterId', 'global metadata'),
    createdAt: str(o, 'createdAt', 'global metadata', ''),
  };
}

export function decodeRing(text: string): RingModel {
  const o = obj(text, 'ring');
  const type = str(o, 'type', 'ring');
  if (!(RING_TYPES as readonly string[]).includes(type)) throw new TorusError('INTERNAL', `ring in etcd has unknown type "${type}"`);
  const peers = o['peers'];
  if (!Array.isArray(peers)) throw new TorusError('INTERNAL', 'ring in etcd has no peer list');
  return {
    type: type as RingModel['type'],
    version: num(o, 'version', 'ring'),
    replication: num(o, 'replication', 'ring'),
    peers: peers.map((p: unknown) => {
      if (typeof p !== 'object' || p === null) throw new TorusError('INTERNAL', 'ring in etcd has a malformed peer');
      const po = p as Record<string, unknown>;
      return { uuid: str(po, 'uuid', 'ring peer'), totalBlocks: num(po, 'totalBlocks', 'ring peer') };
    }),
  };
}

export function decodePeer(text: string): PeerInfo {
  const o = obj(text, 'peer record');
  const w = 'peer record';
  const reb = (typeof o['rebalance'] === 'object' && o['rebalance'] !== null ? o['rebalance'] : {}) as Record<string, unknown>;
  return {
    uuid: str(o, 'uuid', w),
    address: str(o, 'address', w, ''),
    httpAddress: str(o, 'httpAddress', w, ''),
    lastSeen: num(o, 'lastSeen', w),
    heartbeatMs: num(o, 'heartbeatMs', w, 5000),
    totalBlocks: num(o, 'totalBlocks', w, 0),
    usedBlocks: num(o, 'usedBlocks', w, 0),
    blockSize: num(o, 'blockSize', w, 0),
    protocolVersion: num(o, 'protocolVersion', w, 0),
    version: str(o, 'version', w, ''),
    rebalance: {
      rebalancing: reb['rebalancing'] === true,
      blocksLeft: num(reb, 'blocksLeft', w, IDLE_REBALANCE.blocksLeft),
      bytesLeft: num(reb, 'bytesLeft', w, IDLE_REBALANCE.bytesLeft),
      blocksMoved: num(reb, 'blocksMoved', w, 0),
      bytesMoved: num(reb, 'bytesMoved', w, 0),
      rate: num(reb, 'rate', w, 0),
      lastFinish: num(reb, 'lastFinish', w, 0),
      underReplicated: num(reb, 'underReplicated', w, 0),
      // Absent in records from writers that did not publish it: no pass known, so not balanced.
      ringVersion: num(reb, 'ringVersion', w, 0),
    },
    ...(isObject(o['scrub']) ? { scrub: decodeScrub(o['scrub'], w) } : {}),
    ...(Array.isArray(o['blockTypes']) ? { blockTypes: o['blockTypes'].filter((t): t is number => Number.isInteger(t)) } : {}),
  };
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

const SCRUB_NUMBERS = [
  'intervalMs', 'rate', 'passStartedAt', 'passBytes', 'heldBytes', 'lastStartedAt', 'lastFinishedAt', 'lastBytes', 'lastErrors',
  'lastRepaired', 'nextPassAt', 'passes', 'checkedBytes', 'errors', 'repaired', 'dropped', 'pending', 'orphanBlocks', 'orphansDeleted', 'orphanGraceMs',
] as const;

/** Fields a writer did not publish read as 0, so records from other versions still decode. */
function decodeScrub(o: Record<string, unknown>, w: string): ScrubInfo {
  const nums = Object.fromEntries(SCRUB_NUMBERS.map((k) => [k, num(o, k, `${w} scrub`, 0)])) as Record<(typeof SCRUB_NUMBERS)[number], number>;
  const groups = Array.isArray(o['orphanGroups']) ? o['orphanGroups'].filter(isObject) : [];
  return {
    ...nums,
    orphanGroups: groups.map((g) => ({
      kind: g['kind'] === 'unknown-type' ? 'unknown-type' : 'unknown-volume',
      id: num(g, 'id', `${w} orphan group`, 0),
      blocks: num(g, 'blocks', `${w} orphan group`, 0),
      since: num(g, 'since', `${w} orphan group`, 0),
    })),
  };
}

/** The JSON a peer record is stored as; decodePeer reads it back. */
export function encodePeer(info: PeerInfo): string {
  return JSON.stringify({ ...info, rebalance: { ...info.rebalance, ringVersion: info.rebalance.ringVersion ?? 0 } });
}

export function notInitialized(): TorusError {
  return new TorusError('NOT_INITIALIZED', 'the cluster is not initialized: run `torusctl init` first');
}
