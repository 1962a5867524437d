import { hostname } from 'node:os';
import { TorusError } from '../core/errors.js';
import type { MetaKV } from '../core/interfaces.js';
import type { PeerInfo } from '../core/models.js';

// Two records about storage nodes that outlive a node's lease-bound heartbeat record:
//
//   /torus/lastknown/<uuid>    what the node last said about itself (address, capacity, when):
//                              lets list-peers show a DOWN member's address and size, and lets
//                              `peer remove --force ADDRESS` find it. Written by torusd at start,
//                              at least once a minute, and when it stops cleanly.
//   /torus/maintenance/<uuid>  a planned outage (`torusctl peer maintenance on`): until `until`,
//                              the member's absence is reported as planned (MAINT, not DOWN), health
//                              passes, and rebalancers stop calling it. Past `until` the record is
//                              ignored and normal rules resume; `off` deletes it.

const LASTKNOWN = '/torus/lastknown/';
const MAINTENANCE = '/torus/maintenance/';

export interface KnownPeer {
  readonly uuid: string;
  readonly address: string;
  readonly httpAddress: string;
  readonly totalBlocks: number;
  readonly usedBlocks: number;
  readonly blockSize: number;
  /** ms since epoch: the heartbeat (or clean stop) this record was written at. */
  readonly lastSeen: number;
}

export interface Maintenance {
  readonly uuid: string;
  /** ISO 8601. */
  readonly since: string;
  /** ISO 8601: normal rules resume after this. */
  readonly until: string;
  /** Who asked (host name of the torusctl that wrote it). */
  readonly by: string;
  readonly reason: string;
}

function parse<T>(value: string): T | undefined {
  try {
    return JSON.parse(value) as T;
  } catch {
    return undefined; // a record we cannot read describes nothing; never fail a listing over it
  }
}

export function knownFrom(info: PeerInfo): KnownPeer {
  const { uuid, address, httpAddress, totalBlocks, usedBlocks, blockSize, lastSeen } = info;
  return { uuid, address, httpAddress, totalBlocks, usedBlocks, blockSize, lastSeen };
}

export async function writeKnown(kv: MetaKV, k: KnownPeer): Promise<void> {
  await kv.txn([], [{ op: 'put', key: LASTKNOWN + k.uuid, value: JSON.stringify(k) }]);
}

export async function knownPeers(kv: MetaKV): Promise<Map<string, KnownPeer>> {
  const { entries } = await kv.list(LASTKNOWN);
  const out = new Map<string, KnownPeer>();
  for (const e of entries) {
    const k = parse<KnownPeer>(e.value);
    if (k && typeof k.uuid === 'string') out.set(k.uuid, k);
  }
  return out;
}

export async function forgetPeer(kv: MetaKV, uuid: string): Promise<void> {
  await kv.txn([], [
    { op: 'delete', key: LASTKNOWN + uuid },
    { op: 'delete', key: MAINTENANCE + uuid },
  ]);
}

/** Maintenance records in force at `now` (expired ones are left out: normal rules apply). */
export async function maintenances(kv: MetaKV, now = Date.now()): Promise<Map<string, Maintenance>> {
  const { entries } = await kv.list(MAINTENANCE);
  const out = new Map<string, Maintenance>();
  for (const e of entries) {
    const m = parse<Maintenance>(e.value);
    if (m && typeof m.uuid === 'string' && Date.parse(m.until) > now) out.set(m.uuid, m);
  }
  return out;
}

export async function startMaintenance(kv: MetaKV, uuid: string, forMs: number, reason: string, now = Date.now()): Promise<Maintenance> {
  if (!(forMs > 0)) throw new TorusError('INVALID_ARGUMENT', 'a maintenance window must last longer than 0s');
  const m: Maintenance = { uuid, since: new Date(now).toISOString(), until: new Date(now + forMs).toISOString(), by: hostname(), reason };
  await kv.txn([], [{ op: 'put', key: MAINTENANCE + uuid, value: JSON.stringify(m) }]);
  return m;
}

/** Ends a maintenance window; false when there was none in force. */
export async function endMaintenance(kv: MetaKV, uuid: string): Promise<boolean> {
  const had = (await maintenances(kv)).has(uuid);
  await kv.txn([], [{ op: 'delete', key: MAINTENANCE + uuid }]);
  return had;
}
