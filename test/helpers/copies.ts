import { rpcAddress } from '../../src/distributor/cluster-view.js';
import type { BlockClient } from '../../src/distributor/open.js';
import type { MetadataService } from '../../src/core/interfaces.js';
import { buildLiveSet } from '../../src/volume/gc.js';
import { VolumeMeta } from '../../src/volume/meta.js';

// How many copies each live block has, asked of every storage node directly (HAS), not taken
// from anything the nodes report about themselves: the ground truth for "every block has R copies
// again". Asked: every registered node and every ring member whose address this client has seen
// (a node whose lease expired is still asked at its last address, so a long-lived watcher sees it
// the moment it answers again). A node that does not answer within the timeout holds nothing.

export interface CopyReport {
  /** Live refs: every data block and inode page reachable from a head or snapshot. */
  readonly live: number;
  /** Fewest and most reachable copies of any live block (0 when there are none). */
  readonly min: number;
  readonly max: number;
  /** copies -> number of live blocks with that many. */
  readonly histogram: Record<string, number>;
  /** Live blocks that some ring owner does not hold (a copy spilled elsewhere, or missing). */
  readonly misplaced: number;
  readonly replication: number;
  /** Per registered node: how many live blocks it holds, or why it could not say. */
  readonly peers: Record<string, { address: string; held: number } | { address: string; error: string }>;
}

export async function countCopies(meta: MetadataService, client: BlockClient, timeoutMs = 3000): Promise<CopyReport> {
  const live = await buildLiveSet(new VolumeMeta(meta.kv()), client.distributor);
  const refs = live.refs();
  const counts = refs.map(() => 0);
  const ring = client.view.ring;
  const owners = refs.map((r) => {
    const perm = ring.getPeers(r);
    return new Set(perm.peers.slice(0, perm.replication));
  });
  const ownerHits = refs.map(() => 0);
  const peers: CopyReport['peers'] = {};
  await client.view.refreshPeers();
  const targets = new Map<string, string>();
  for (const p of await meta.getPeers()) if (p.address !== '') targets.set(p.uuid, rpcAddress(p.address));
  for (const uuid of ring.members()) {
    const t = client.view.target(uuid);
    if (t && !targets.has(uuid)) targets.set(uuid, t.address);
  }
  await Promise.all(
    [...targets].map(async ([uuid, address]) => {
      const p = { uuid, address };
      try {
        const has = refs.length === 0 ? [] : await client.pool.client(p).hasBlocks(refs, { timeoutMs });
        let held = 0;
        has.forEach((h, i) => {
          if (h) {
            counts[i]!++;
            held++;
            if (owners[i]!.has(p.uuid)) ownerHits[i]!++;
          }
        });
        peers[p.uuid] = { address: p.address, held };
      } catch (err) {
        peers[p.uuid] = { address: p.address, error: (err as Error).message };
      }
    }),
  );
  const histogram: Record<string, number> = {};
  for (const c of counts) histogram[String(c)] = (histogram[String(c)] ?? 0) + 1;
  return {
    live: refs.length,
    min: counts.length > 0 ? Math.min(...counts) : 0,
    max: counts.length > 0 ? Math.max(...counts) : 0,
    histogram,
    misplaced: ownerHits.filter((n, i) => n < owners[i]!.size).length,
    replication: ring.replication,
    peers,
  };
}
