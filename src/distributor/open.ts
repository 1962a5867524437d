import { randomUUID } from 'node:crypto';
import type { BlockStore, MetadataService } from '../core/interfaces.js';
import type { GlobalMetadata } from '../core/models.js';
import { PeerPool, type PeerPoolOptions } from '../rpc/pool.js';
import { ClusterView } from './cluster-view.js';
import { Distributor, type ReadLevel, type WriteLevel } from './distributor.js';
import { RpcTransport, type RpcObserver } from './rpc-transport.js';

// Wiring shared by every process that does block I/O: the cluster view (ring + addresses), one
// peer-RPC pool, and the distributor on top.

export interface OpenOptions {
  readonly meta: MetadataService;
  /** A storage node passes its identity and disk; a client gets a fresh identity per process. */
  readonly self?: { readonly uuid: string; readonly store: BlockStore };
  readonly writeLevel?: WriteLevel;
  readonly readLevel?: ReadLevel;
  readonly readCacheBytes?: number;
  readonly rpc?: Partial<PeerPoolOptions>;
  readonly onError?: (err: Error) => void;
  readonly observeRpc?: RpcObserver;
}

export interface BlockClient {
  readonly uuid: string;
  readonly global: GlobalMetadata;
  readonly view: ClusterView;
  readonly pool: PeerPool;
  readonly distributor: Distributor;
  readonly transport: RpcTransport;
  close(): Promise<void>;
}

export async function openBlockClient(opts: OpenOptions): Promise<BlockClient> {
  const global = await opts.meta.globalMetadata();
  const uuid = opts.self?.uuid ?? randomUUID();
  const view = new ClusterView(opts.meta, opts.onError ? { onError: opts.onError } : {});
  await view.start();
  const pool = new PeerPool({ ...opts.rpc, identity: { uuid, clusterId: global.clusterId } });
  const transport = new RpcTransport(pool, opts.observeRpc);
  const distributor = new Distributor({
    blockSize: global.blockSize,
    ring: () => view.ring,
    target: (u) => view.target(u),
    transport,
    ...(opts.self ? { self: opts.self } : {}),
    ...(opts.writeLevel ? { writeLevel: opts.writeLevel } : {}),
    ...(opts.readLevel ? { readLevel: opts.readLevel } : {}),
    ...(opts.readCacheBytes !== undefined ? { readCacheBytes: opts.readCacheBytes } : {}),
    ...(opts.onError ? { onRepairError: (err: Error) => opts.onError?.(err) } : {}),
  });
  return {
    uuid,
    global,
    view,
    pool,
    distributor,
    transport,
    async close() {
      view.stop();
      await distributor.idle();
      await pool.close();
    },
  };
}
