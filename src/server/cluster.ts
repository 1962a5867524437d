import { TorusError, isTorusError } from '../core/errors.js';
import type { MetadataService } from '../core/interfaces.js';
import type { PeerInfo, RingModel, RingPeer, RingType } from '../core/models.js';
import { addPeers, changeReplication, newRingModel, removePeers, validateRingModel } from '../ring/index.js';
import { forgetPeer, knownPeers, maintenances, type KnownPeer, type Maintenance } from './peer-records.js';

// Cluster administration shared by torusctl and torusd --auto-join: resolving peers, reading their
// state, and changing the ring with compare-and-swap.

/** MAINT: a ring member that is not heartbeating during a maintenance window (planned down). */
export type MemberStatus = 'OK' | 'Avail' | 'DOWN' | 'MAINT';

export interface PeerStatus {
  readonly uuid: string;
  /** The live record's, else the last known one's (a down member), else ''. */
  readonly address: string;
  readonly member: MemberStatus;
  readonly inRing: boolean;
  /** The live record, absent for a ring member that stopped heartbeating. */
  readonly info?: PeerInfo;
  /** What the node last said about itself; for a down member, its address and size. */
  readonly known?: KnownPeer;
  /** A maintenance window in force. */
  readonly maintenance?: Maintenance;
}

/** Share of capacity above which a node is reported as nearly full. */
export const NEARLY_FULL = 0.9;

/** A record older than this many heartbeats is stale even if its lease has not run out yet. */
const STALE_HEARTBEATS = 3;

export function isStale(info: PeerInfo, now: number): boolean {
  return now - info.lastSeen > STALE_HEARTBEATS * Math.max(info.heartbeatMs, 1000);
}

export async function peerStatuses(meta: MetadataService, now = Date.now()): Promise<{ ring: RingModel; peers: PeerStatus[] }> {
  const [ring, live, known, maint] = await Promise.all([meta.getRing(), meta.getPeers(), knownPeers(meta.kv()), maintenances(meta.kv(), now)]);
  const members = new Set(ring.peers.map((p) => p.uuid));
  const byUuid = new Map(live.filter((p) => p.address !== '').map((p) => [p.uuid, p]));
  const out: PeerStatus[] = [];
  const extra = (uuid: string): { known?: KnownPeer; maintenance?: Maintenance } => {
    const k = known.get(uuid);
    const m = maint.get(uuid);
    return { ...(k ? { known: k } : {}), ...(m ? { maintenance: m } : {}) };
  };
  const absent = (uuid: string): MemberStatus => (maint.has(uuid) ? 'MAINT' : 'DOWN');
  for (const info of byUuid.values()) {
    const inRing = members.has(info.uuid);
    const member: MemberStatus = isStale(info, now) ? absent(info.uuid) : inRing ? 'OK' : 'Avail';
    out.push({ uuid: info.uuid, address: info.address, member, inRing, info, ...extra(info.uuid) });
  }
  for (const p of ring.peers) {
    if (!byUuid.has(p.uuid)) out.push({ uuid: p.uuid, address: known.get(p.uuid)?.address ?? '', member: absent(p.uuid), inRing: true, ...extra(p.uuid) });
  }
  out.sort((a, b) => a.address.localeCompare(b.address) || a.uuid.localeCompare(b.uuid));
  return { ring, peers: out };
}

/** Whether the cluster's data sits where the current ring wants it, as far as heartbeats tell. */
export interface BalanceState {
  /** No live node moving data or yet to pass on the current ring, and no ring member down. */
  readonly balanced: boolean;
  /** Data may still be moving: some live node reports work, or has not passed on the current ring yet. */
  readonly rebalancing: boolean;
  readonly ringVersion: number;
  /** Live nodes that report a pass with work left. */
  readonly moving: readonly PeerStatus[];
  /** Live nodes whose last finished pass was on an older ring than the current one. */
  readonly waiting: readonly PeerStatus[];
  /** Ring members that are not heartbeating, and not in a maintenance window. */
  readonly down: readonly PeerStatus[];
  /** Ring members that are not heartbeating during a maintenance window (planned). */
  readonly planned: readonly PeerStatus[];
  /** Sums over the live nodes' published status. */
  readonly underReplicated: number;
  readonly blocksLeft: number;
  readonly bytesLeft: number;
  readonly rate: number;
  /** One line per reason the cluster is not balanced (empty when balanced). */
  readonly reasons: readonly string[];
}

function named(p: PeerStatus): string {
  return p.address ? `${p.uuid} (${p.address})` : p.uuid;
}

/** How health and balance judgements word the ring members that are not heartbeating. */
export function downLine(down: readonly PeerStatus[]): string {
  return `${down.length} ring member(s) down: ${down.map(named).join(', ')}`;
}

/** How they word the members down for planned maintenance. */
export function plannedLine(planned: readonly PeerStatus[]): string {
  return `${planned.length} ring member(s) down for maintenance: ${planned.map((p) => `${named(p)} until ${p.maintenance?.until ?? '?'}`).join(', ')}`;
}

/** How balance judgements word the nodes still to pass on the current ring. */
export function waitingLine(n: number, ringVersion: number): string {
  return `waiting for ${n} node(s) to finish a pass on ring v${ringVersion}`;
}

/**
 * The one judgement of "balanced" that list-peers, health and rebalance status share.
 *
 * A node's published `rebalancing` flag describes its last pass, and that pass may predate the
 * current ring: right after a ring change every node still says "idle" until it has walked its
 * blocks against the new ring and heartbeated again. So a live node counts as still rebalancing
 * until its published `ringVersion` has caught up with the ring, if it is a ring member (it may
 * be missing copies or hold copies the new ring places elsewhere) or holds blocks (a removed
 * node draining). A live non-member holding nothing has nothing to move. DOWN nodes are left
 * to `down`: their records say nothing current.
 */
export function judgeBalance(ring: RingModel, peers: readonly PeerStatus[]): BalanceState {
  const live = peers.filter((p) => p.info && p.member !== 'DOWN' && p.member !== 'MAINT');
  const down = peers.filter((p) => p.inRing && p.member === 'DOWN');
  const planned = peers.filter((p) => p.inRing && p.member === 'MAINT');
  const moving = live.filter((p) => p.info!.rebalance.rebalancing);
  const waiting = live.filter((p) => (p.inRing || p.info!.usedBlocks > 0) && (p.info!.rebalance.ringVersion ?? 0) < ring.version);
  let underReplicated = 0;
  let blocksLeft = 0;
  let bytesLeft = 0;
  let rate = 0;
  for (const p of live) {
    const r = p.info!.rebalance;
    underReplicated += r.underReplicated ?? 0;
    blocksLeft += r.blocksLeft;
    bytesLeft += r.bytesLeft;
    rate += r.rate;
  }
  const rebalancing = moving.length > 0 || waiting.length > 0;
  const reasons: string[] = [];
  if (down.length > 0) reasons.push(downLine(down));
  if (planned.length > 0) reasons.push(plannedLine(planned));
  if (moving.length > 0) reasons.push(`${moving.length} node(s) moving data: ${moving.map((p) => p.address).join(', ')}`);
  if (waiting.length > 0) reasons.push(`${waitingLine(waiting.length, ring.version)}: ${waiting.map((p) => p.address).join(', ')}`);
  return { balanced: !rebalancing && down.length === 0 && planned.length === 0, rebalancing, ringVersion: ring.version, moving, waiting, down, planned, underReplicated, blocksLeft, bytesLeft, rate, reasons };
}

/**
 * Applies `change` to the current ring and stores the result as version+1, re-reading and
 * re-applying when another writer won the race. A change that is wrong for the new ring (peer
 * already removed, say) surfaces as the change's own error.
 */
export async function updateRing(meta: MetadataService, change: (cur: RingModel) => RingModel, attempts = 10): Promise<RingModel> {
  for (let i = 0; ; i++) {
    const cur = await meta.getRing();
    const next = change(cur);
    validateRingModel(next); // before it can reach etcd
    try {
      await meta.setRing(next);
      return next;
    } catch (err) {
      const raced = isTorusError(err, 'AGAIN') || isTorusError(err, 'NON_SEQUENTIAL_RING');
      if (!raced || i + 1 >= attempts) {
        if (raced) throw new TorusError('AGAIN', `the ring kept changing under us (${attempts} attempts); try again`);
        throw err;
      }
      await new Promise((r) => setTimeout(r, 20 + Math.random() * 80 * (i + 1)));
    }
  }
}

function matches(p: { uuid: string; address: string }, sel: string): boolean {
  return p.uuid === sel || p.address === sel || p.address.replace(/^[a-z]+:\/\//, '') === sel.replace(/^[a-z]+:\/\//, '');
}

/** Live peers (with a peer address) named by address or UUID; every selector must match one. */
export function resolveLivePeers(live: readonly PeerInfo[], selectors: readonly string[]): PeerInfo[] {
  const servers = live.filter((p) => p.address !== '');
  const out = new Map<string, PeerInfo>();
  for (const sel of selectors) {
    const found = servers.filter((p) => matches(p, sel));
    if (found.length === 0) throw new TorusError('NOT_EXIST', `no running peer ${sel}: check \`torusctl list-peers\``);
    for (const p of found) out.set(p.uuid, p);
  }
  return [...out.values()];
}

export function ringPeerOf(p: PeerInfo): RingPeer {
  return { uuid: p.uuid, totalBlocks: Math.max(1, p.totalBlocks) };
}

export async function addPeersToRing(meta: MetadataService, selectors: readonly string[], all: boolean): Promise<{ added: PeerInfo[]; ring: RingModel }> {
  if (all === (selectors.length > 0)) throw new TorusError('INVALID_ARGUMENT', 'name peers to add by address or UUID, or pass --all-peers (not both)');
  await meta.getRing(); // "not initialized" before "no running peers"
  const live = (await meta.getPeers()).filter((p) => p.address !== '' && !isStale(p, Date.now()));
  const chosen = all ? live : resolveLivePeers(live, selectors);
  if (chosen.length === 0) throw new TorusError('NOT_EXIST', 'no running peers to add: start torusd first');
  const ring = await updateRing(meta, (cur) => addPeers(cur, chosen.map(ringPeerOf)));
  return { added: chosen, ring };
}

/**
 * The ring member a selector names: a live node's address or UUID, or a down member's UUID or
 * last known address. NOT_EXIST when none.
 */
export async function resolveMember(meta: MetadataService, sel: string): Promise<{ uuid: string; address: string; live: boolean }> {
  const [ring, live, known] = await Promise.all([meta.getRing(), meta.getPeers(), knownPeers(meta.kv())]);
  const now = Date.now();
  const l = live.find((p) => p.address !== '' && matches(p, sel) && ring.peers.some((m) => m.uuid === p.uuid));
  if (l) return { uuid: l.uuid, address: l.address, live: !isStale(l, now) };
  const m = ring.peers.find((p) => p.uuid === sel || matches({ uuid: p.uuid, address: known.get(p.uuid)?.address ?? '' }, sel));
  if (m) return { uuid: m.uuid, address: known.get(m.uuid)?.address ?? '', live: false };
  throw new TorusError('NOT_EXIST', `no ring member ${sel}: check \`torusctl list-peers\``);
}

export async function removePeersFromRing(
  meta: MetadataService,
  selectors: readonly string[],
  force: boolean,
  allowDegraded = false,
): Promise<{ removed: string[]; ring: RingModel }> {
  if (selectors.length === 0) throw new TorusError('INVALID_ARGUMENT', 'name the peers to remove by address or UUID');
  const [cur, live, known] = await Promise.all([meta.getRing(), meta.getPeers(), knownPeers(meta.kv())]);
  const uuids = new Set<string>();
  const gone = new Set<string>();
  for (const sel of selectors) {
    const liveMatch = live.filter((p) => p.address !== '' && matches(p, sel));
    // A down member by UUID, or by the address it last had.
    const member = cur.peers.find((p) => p.uuid === sel || matches({ uuid: p.uuid, address: known.get(p.uuid)?.address ?? '' }, sel));
    if (liveMatch.length > 0) {
      for (const p of liveMatch) uuids.add(p.uuid);
    } else if (member) {
      if (!force) throw new TorusError('INVALID_ARGUMENT', `peer ${sel} is down; to remove a node that is gone for good, use --force`);
      uuids.add(member.uuid);
      gone.add(member.uuid);
    } else {
      throw new TorusError('NOT_EXIST', `no peer ${sel} in the ring or running: check \`torusctl list-peers\``);
    }
  }
  const ring = await updateRing(meta, (r) => {
    const left = r.peers.filter((p) => !uuids.has(p.uuid)).length;
    // The same rule as set-replication: fewer members than copies is degraded, and says so.
    if (left < r.replication && !allowDegraded)
      throw new TorusError(
        'INVALID_ARGUMENT',
        `removing ${uuids.size} peer(s) leaves ${left} ring member(s) for replication ${r.replication}: add peers first, lower it with \`torusctl ring set-replication\`, or pass --allow-degraded`,
      );
    return removePeers(r, [...uuids]);
  });
  // A node gone for good: nothing more to remember about it.
  for (const u of gone) await forgetPeer(meta.kv(), u);
  return { removed: [...uuids], ring };
}

export async function setReplication(meta: MetadataService, n: number, allowDegraded: boolean): Promise<RingModel> {
  if (!Number.isInteger(n) || n < 1) throw new TorusError('INVALID_ARGUMENT', `replication must be a whole number >= 1, got ${n}`);
  return updateRing(meta, (cur) => {
    if (n > cur.peers.length && !allowDegraded)
      throw new TorusError(
        'INVALID_ARGUMENT',
        `replication ${n} exceeds the ${cur.peers.length} ring member(s): add peers first, or pass --allow-degraded to keep fewer copies until they join`,
      );
    return changeReplication(cur, n);
  });
}

export async function manualChange(
  meta: MetadataService,
  opts: { type: RingType; replication: number; uuids: readonly string[]; allPeers: boolean; force: boolean },
): Promise<RingModel> {
  if (opts.allPeers && opts.uuids.length > 0) throw new TorusError('INVALID_ARGUMENT', 'use either --uuids or --all-peers, not both');
  const live = (await meta.getPeers()).filter((p) => p.address !== '');
  const cur = await meta.getRing();
  let peers: RingPeer[];
  if (opts.allPeers) peers = live.map(ringPeerOf);
  else {
    peers = opts.uuids.map((u) => {
      const l = live.find((p) => p.uuid === u);
      if (l) return ringPeerOf(l);
      const m = cur.peers.find((p) => p.uuid === u);
      if (m && opts.force) return m;
      throw new TorusError('NOT_EXIST', `peer ${u} is not running${m ? ' (pass --force to keep a down member)' : ''}`);
    });
  }
  if (opts.type === 'empty') peers = [];
  if (opts.replication > peers.length && opts.type !== 'empty' && !opts.force)
    throw new TorusError('INVALID_ARGUMENT', `replication ${opts.replication} exceeds the ${peers.length} peer(s) chosen; pass --force to accept degraded replication`);
  return updateRing(meta, (c) => newRingModel(opts.type, opts.type === 'empty' ? 1 : opts.replication, peers, c.version + 1));
}
