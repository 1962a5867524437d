import { readFileSync } from 'node:fs';
import { noop } from 'cockatiel';
import { Etcd3, EtcdError, type IOptions, GRPCDeadlineExceededError, GRPCUnavailableError, type Lease, type Watcher } from 'etcd3';
import { TorusError, isTorusError } from '../../core/errors.js';
import type { MetaKV, MetadataService, Unsubscribe } from '../../core/interfaces.js';
import type { GlobalMetadata, PeerInfo, RingModel } from '../../core/models.js';
import { decodeGlobal, decodePeer, decodeRing, encodePeer, notInitialized } from '../codec.js';
import { PREFIX, keys } from '../keys.js';
import { EtcdKV } from './kv.js';

export interface EtcdTls {
  readonly caFile?: string;
  readonly certFile?: string;
  readonly keyFile?: string;
}

export interface EtcdOptions {
  /** host:port list; a scheme (http:// or https://) is added when missing. */
  readonly endpoints: readonly string[];
  readonly tls?: EtcdTls;
  /** Deadline for each unary call; an unreachable etcd fails within this. */
  readonly callTimeoutMs?: number;
}

export function normalizeEndpoints(endpoints: readonly string[], tls: boolean): string[] {
  return endpoints.map((e) => (/^[a-z]+:\/\//.test(e) ? e : `${tls ? 'https' : 'http'}://${e}`));
}

/** MetadataService on a real etcd v3 cluster. */
export class EtcdMetadata implements MetadataService {
  private readonly client: Etcd3;
  private readonly endpoints: string[];
  private readonly callTimeoutMs: number;
  private lease: Lease | undefined;
  private leaseTtlMs = 0;
  private closed = false;

  constructor(opts: EtcdOptions) {
    const tls = opts.tls;
    const useTls = Boolean(tls?.caFile || tls?.certFile);
    this.endpoints = normalizeEndpoints(opts.endpoints, useTls);
    this.callTimeoutMs = opts.callTimeoutMs ?? 5000;
    let credentials: IOptions['credentials'];
    if (useTls) {
      credentials = {
        rootCertificate: tls?.caFile ? readFileSync(tls.caFile) : Buffer.alloc(0),
        ...(tls?.keyFile ? { privateKey: readFileSync(tls.keyFile) } : {}),
        ...(tls?.certFile ? { certChain: readFileSync(tls.certFile) } : {}),
      };
    }
    const deadline = this.callTimeoutMs;
    this.client = new Etcd3({
      hosts: this.endpoints,
      dialTimeout: deadline,
      ...(credentials ? { credentials } : {}),
      // Every unary call gets a deadline so an unreachable etcd is an error within seconds,
      // not a hang. Streams (watches) are long-lived and reconnect on their own.
      defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + deadline }),
      // The library's default retries three times behind a breaker; a CLI user waiting on a
      // dead endpoint would then wait several deadlines. Callers here retry where it is safe.
      faultHandling: { host: () => noop, global: noop },
      // A partition must show up as failed calls within seconds, and a healed one must be used
      // again within seconds: gRPC's own defaults notice neither (reconnect backoff up to 120 s).
      grpcOptions: {
        'grpc.keepalive_time_ms': 10_000,
        'grpc.keepalive_timeout_ms': 5000,
        'grpc.initial_reconnect_backoff_ms': 500,
        'grpc.max_reconnect_backoff_ms': 2000,
      },
    });
  }

  describeEndpoints(): string {
    return this.endpoints.join(',');
  }

  /** Translates etcd/grpc failures into TorusErrors that name the endpoint. */
  private wrap(err: unknown, what: string): TorusError {
    if (isTorusError(err)) return err;
    if (err instanceof GRPCUnavailableError || err instanceof GRPCDeadlineExceededError) {
      return new TorusError('ETCD_UNAVAILABLE', `cannot reach etcd at ${this.describeEndpoints()} (${what}): ${firstLine(err.message)}`, { cause: err });
    }
    if (err instanceof EtcdError || err instanceof Error) {
      const msg = firstLine(err.message);
      if (/deadline|unavailable|ECONNREFUSED|connect|No connection established|ENOTFOUND|timed? ?out/i.test(msg))
        return new TorusError('ETCD_UNAVAILABLE', `cannot reach etcd at ${this.describeEndpoints()} (${what}): ${msg}`, { cause: err });
      return new TorusError('INTERNAL', `etcd ${what}: ${msg}`, { cause: err });
    }
    return new TorusError('INTERNAL', `etcd ${what}: ${String(err)}`);
  }

  private async call<T>(what: string, fn: () => Promise<T>): Promise<T> {
    if (this.closed) throw new TorusError('CLOSED', 'metadata client is closed');
    try {
      return await fn();
    } catch (err) {
      throw this.wrap(err, what);
    }
  }

  async init(meta: GlobalMetadata, ring: RingModel): Promise<void> {
    const res = await this.call('init', () =>
      this.client
        .if(keys.global, 'Version', '==', 0)
        .then(this.client.put(keys.global).value(JSON.stringify(meta)), this.client.put(keys.ring).value(JSON.stringify(ring)))
        .commit(),
    );
    if (!res.succeeded) throw new TorusError('EXISTS', 'the cluster is already initialized (use `torusctl init --view` to see its settings, `torusctl wipe` to start over)');
  }

  async globalMetadata(): Promise<GlobalMetadata> {
    const v = await this.call('read global metadata', () => this.client.get(keys.global).string());
    if (v === null) throw notInitialized();
    return decodeGlobal(v);
  }

  async wipe(): Promise<void> {
    await this.call('wipe', () => this.client.delete().prefix(PREFIX).exec());
  }

  private async getRingWithRevision(): Promise<{ ring: RingModel; modRevision: string }> {
    const res = await this.call('read ring', () => this.client.get(keys.ring).exec());
    const kv = res.kvs[0];
    if (!kv) {
      // Tell "not initialized" apart from a cluster whose ring key was damaged.
      await this.globalMetadata();
      throw new TorusError('INTERNAL', 'the cluster has global metadata but no ring');
    }
    return { ring: decodeRing(kv.value.toString()), modRevision: kv.mod_revision };
  }

  async getRing(): Promise<RingModel> {
    return (await this.getRingWithRevision()).ring;
  }

  async setRing(next: RingModel): Promise<void> {
    const { ring: cur, modRevision } = await this.getRingWithRevision();
    if (next.version !== cur.version + 1) {
      throw new TorusError('NON_SEQUENTIAL_RING', `ring version ${next.version} does not follow the stored version ${cur.version}`);
    }
    const res = await this.call('write ring', () =>
      this.client.if(keys.ring, 'Mod', '==', modRevision).then(this.client.put(keys.ring).value(JSON.stringify(next))).commit(),
    );
    if (!res.succeeded) throw new TorusError('AGAIN', 'the ring was changed concurrently; retry');
  }

  watchRing(onRing: (ring: RingModel) => void, onError?: (err: Error) => void): Unsubscribe {
    let watcher: Watcher | undefined;
    let stopped = false;
    let lastVersion = -1;
    const deliver = (text: string): void => {
      try {
        const ring = decodeRing(text);
        // Rings only move forward; a replayed or stale event is not news.
        if (ring.version <= lastVersion) return;
        lastVersion = ring.version;
        onRing(ring);
      } catch (err) {
        onError?.(err as Error);
      }
    };
    void (async () => {
      try {
        const res = await this.call('read ring', () => this.client.get(keys.ring).exec());
        if (stopped) return;
        const kv = res.kvs[0];
        if (kv) deliver(kv.value.toString());
        const start = BigInt(res.header.revision) + 1n;
        // The watch resumes from the revision after the read, so no change between the
        // read and the watch is missed; the library re-attaches it after disconnects.
        const w = await this.client.watch().key(keys.ring).startRevision(start.toString()).create();
        if (stopped) {
          await w.cancel();
          return;
        }
        watcher = w;
        w.on('put', (kv2) => deliver(kv2.value.toString()));
        w.on('error', (err) => onError?.(this.wrap(err, 'watch ring')));
      } catch (err) {
        onError?.(this.wrap(err, 'watch ring'));
      }
    })();
    return () => {
      stopped = true;
      void watcher?.cancel().catch(() => undefined);
    };
  }

  /** The process's lease, created on first use and re-created if etcd forgot it. */
  private async ensureLease(ttlMs: number): Promise<Lease> {
    if (this.lease && !this.lease.revoked() && this.leaseTtlMs === ttlMs) return this.lease;
    const lease = this.client.lease(Math.max(1, Math.ceil(ttlMs / 1000)), { autoKeepAlive: false });
    lease.on('lost', () => undefined);
    await this.call('grant lease', () => lease.grant());
    this.lease = lease;
    this.leaseTtlMs = ttlMs;
    return lease;
  }

  async registerPeer(info: PeerInfo, ttlMs: number): Promise<void> {
    let lease = await this.ensureLease(ttlMs);
    try {
      // keepaliveOnce is a stream call, which gets no deadline from defaultCallOptions.
      await this.call('renew lease', () => withDeadline(lease.keepaliveOnce(), this.callTimeoutMs, 'renew lease'));
    } catch (err) {
      if (isTorusError(err, 'ETCD_UNAVAILABLE')) throw err;
      // The lease expired while we were cut off: take a fresh one.
      this.lease = undefined;
      lease = await this.ensureLease(ttlMs);
    }
    await this.call('register peer', () => lease.put(keys.node(info.uuid)).value(encodePeer(info)).exec());
  }

  async unregisterPeer(uuid: string): Promise<void> {
    await this.call('unregister peer', () => this.client.delete().key(keys.node(uuid)).exec());
    const lease = this.lease;
    this.lease = undefined;
    if (lease) await lease.revoke().catch(() => undefined);
  }

  async getPeers(): Promise<PeerInfo[]> {
    const all = await this.call('list peers', () => this.client.getAll().prefix(keys.nodesPrefix).strings());
    const peers: PeerInfo[] = [];
    for (const text of Object.values(all)) {
      try {
        peers.push(decodePeer(text));
      } catch {
        // A record we cannot read is skipped rather than hiding every other peer.
      }
    }
    return peers;
  }

  private kvImpl: EtcdKV | undefined;

  kv(): MetaKV {
    this.kvImpl ??= new EtcdKV(this.client, (what, fn) => this.call(what, fn));
    return this.kvImpl;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.lease) this.lease.release();
    this.client.close();
  }
}

function firstLine(s: string): string {
  return (s.split('\n')[0] ?? '').trim();
}

/** Rejects like a gRPC deadline (wrap() makes it ETCD_UNAVAILABLE) if `p` takes longer than `ms`. */
function withDeadline<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  // If the deadline wins, a later failure of `p` is nobody's business, but must not go unhandled.
  p.catch(() => undefined);
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new GRPCDeadlineExceededError(`${what}: deadline exceeded`)), ms);
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}
