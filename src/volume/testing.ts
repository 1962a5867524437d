import type { KVSession } from '../core/interfaces.js';
import { Distributor } from '../distributor/distributor.js';
import { MemoryTransport } from '../distributor/memory-transport.js';
import { MemoryMetadataStore } from '../metadata/memory/memory.js';
import { createRing, newRingModel } from '../ring/index.js';
import { MemoryBlockStore } from '../storage/memory-store.js';
import { VolumeMeta } from './meta.js';
import type { VolumeContext } from './volume.js';

/** A whole cluster in memory (metadata, three stores at R=2, a distributor) for volume unit tests. */
/** `self`: the distributor is storage node "a"'s, which reads its own replicas from its store. */
export async function memoryCluster(blockSize = 4096, capacityBlocks = 100_000, readCacheBytes = 0, self = false) {
  const md = new MemoryMetadataStore();
  const meta = md.client();
  const transport = new MemoryTransport();
  const stores = ['a', 'b', 'c'].map((u) => {
    const s = new MemoryBlockStore({ blockSize, capacityBlocks });
    transport.add(u, s);
    return s;
  });
  const ring = createRing(newRingModel('ketama', 2, ['a', 'b', 'c'].map((uuid) => ({ uuid, totalBlocks: capacityBlocks })), 2));
  const dist = new Distributor({
    blockSize,
    ring: () => ring,
    target: (uuid) => ({ uuid, address: `mem://${uuid}` }),
    transport,
    readCacheBytes,
    ...(self ? { self: { uuid: 'a', store: stores[0]! } } : {}),
  });
  const vmeta = new VolumeMeta(meta.kv());
  const session: KVSession = await meta.kv().session(10_000);
  const ctx: VolumeContext = { meta: vmeta, store: dist, session };
  const used = (): number => stores.reduce((n, s) => n + s.usedBlocks(), 0);
  return { md, meta, vmeta, dist, stores, transport, session, ctx, used, newSession: () => meta.kv().session(10_000) };
}
