import { TorusError } from '../../core/errors.js';
import type { MetaKV, MetadataService, Unsubscribe } from '../../core/interfaces.js';
import type { GlobalMetadata, PeerInfo, RingModel } from '../../core/models.js';
import { decodePeer, encodePeer, notInitialized } from '../codec.js';
import { PREFIX } from '../keys.js';
import { MemoryKVStore } from './kv.js';

/**
 * The in-memory twin of EtcdMetadata: same contract, one process. Several "clients" share one
 * MemoryMetadataStore the way several processes share one etcd.
 */
export class MemoryMetadataStore {
  global: GlobalMetadata | undefined;
  ring: RingModel | undefined;
  readonly peers = new Map<string, { info: PeerInfo; expires: number }>();
  readonly ringWatchers = new Set<(ring: RingModel) => void>();
  now: () => number = Date.now;
  readonly kv = new MemoryKVStore();

  client(): MemoryMetadata {
    return new MemoryMetadata(this);
  }
}

export class MemoryMetadata implements MetadataService {
  private closed = false;
  private readonly unsubs = new Set<Unsubscribe>();

  constructor(private readonly store: MemoryMetadataStore = new MemoryMetadataStore()) {}

  private check(): void {
    if (this.closed) throw new TorusError('CLOSED', 'metadata client is closed');
  }

  async init(meta: GlobalMetadata, ring: RingModel): Promise<void> {
    this.check();
    if (this.store.global) throw new TorusError('EXISTS', 'the cluster is already initialized');
    this.store.global = meta;
    this.store.ring = ring;
    for (const w of this.store.ringWatchers) w(ring);
  }

  async globalMetadata(): Promise<GlobalMetadata> {
    this.check();
    if (!this.store.global) throw notInitialized();
    return this.store.global;
  }

  async wipe(): Promise<void> {
    this.check();
    this.store.global = undefined;
    this.store.ring = undefined;
    this.store.peers.clear();
    this.store.kv.clear(PREFIX);
  }

  kv(): MetaKV {
    return this.store.kv;
  }

  async getRing(): Promise<RingModel> {
    this.check();
    if (!this.store.ring) throw notInitialized();
    return this.store.ring;
  }

  async setRing(next: RingModel): Promise<void> {
    this.check();
    // Read and write with no await between them: that is this twin's compare-and-swap.
    const cur = this.store.ring;
    if (!cur) throw notInitialized();
    if (next.version !== cur.version + 1)
      throw new TorusError('NON_SEQUENTIAL_RING', `ring version ${next.version} does not follow the stored version ${cur.version}`);
    this.store.ring = next;
    for (const w of this.store.ringWatchers) w(next);
  }

  watchRing(onRing: (ring: RingModel) => void): Unsubscribe {
    this.check();
    let last = -1;
    const w = (ring: RingModel): void => {
      if (ring.version <= last) return;
      last = ring.version;
      onRing(ring);
    };
    // Asynchronous like the etcd watch, so callers cannot come to depend on a synchronous first call.
    queueMicrotask(() => {
      if (this.store.ring && this.unsubs.has(unsub)) w(this.store.ring);
    });
    this.store.ringWatchers.add(w);
    const unsub: Unsubscribe = () => {
      this.store.ringWatchers.delete(w);
      this.unsubs.delete(unsub);
    };
    this.unsubs.add(unsub);
    return unsub;
  }

  async registerPeer(info: PeerInfo, ttlMs: number): Promise<void> {
    this.check();
    // Through the codec, as etcd's records are: a field the codec drops is dropped here too.
    this.store.peers.set(info.uuid, { info: decodePeer(encodePeer(info)), expires: this.store.now() + ttlMs });
  }

  async unregisterPeer(uuid: string): Promise<void> {
    this.check();
    this.store.peers.delete(uuid);
  }

  async getPeers(): Promise<PeerInfo[]> {
    this.check();
    const now = this.store.now();
    const live: PeerInfo[] = [];
    for (const [uuid, p] of this.store.peers) {
      if (p.expires <= now) this.store.peers.delete(uuid);
      else live.push(p.info);
    }
    return live;
  }

  async close(): Promise<void> {
    for (const u of [...this.unsubs]) u();
    this.closed = true;
  }
}
