import { readFileSync } from 'node:fs';
import type { IOptions } from 'etcd3';
import { TorusError } from '../../core/errors.js';
import type { MetaKV, MetadataService, Unsubscribe } from '../../core/interfaces.js';
import type { GlobalMetadata, PeerInfo, RingModel } from '../../core/models.js';
import { decodeGlobal, decodePeer, decodeRing, encodePeer, notInitialized } from '../codec.js';
import { PREFIX, keys } from '../keys.js';
import { EtcdEndpoints, type MemberChangeListener } from './endpoints.js';
import { EtcdKV, rangeOf, txnOf } from './kv.js';
import { EtcdLease, leaseTtlMs } from './lease.js';
import { followKey } from './watch.js';

export interface EtcdTls {
  readonly caFile?: string;
  readonly certFile?: string;
  readonly keyFile?: string;
}

export interface EtcdOptions {
  /** host:port list; a scheme (http:// or https://) is added when missing. */
  readonly endpoints: readonly string[];
  readonly tls?: EtcdTls;
  /** etcd RBAC user and password (never from the command line: callers read them from a file or the environment). */
  readonly auth?: { readonly username: string; readonly password: string };
  /** Deadline for each call, failover to other members included; an unreachable etcd fails within this. */
  readonly callTimeoutMs?: number;
  /** Tests: the endpoint (index) to try first instead of a random one. */
  readonly firstChoice?: number;
  readonly onMemberChange?: MemberChangeListener;
}

export function normalizeEndpoints(endpoints: readonly string[], tls: boolean): string[] {
  return endpoints.map((e) => (/^[a-z]+:\/\//.test(e) ? e : `${tls ? 'https' : 'http'}://${e}`));
}

/** MetadataService on a real etcd v3 cluster, any minority of whose members may be down. */
export class EtcdMetadata implements MetadataService {
  readonly endpoints: EtcdEndpoints;
  private readonly kvImpl: EtcdKV;
  private lease: EtcdLease | undefined;
  private closed = false;

  constructor(opts: EtcdOptions) {
    const tls = opts.tls;
    const useTls = Boolean(tls?.caFile || tls?.certFile);
    let credentials: IOptions['credentials'];
    if (useTls) {
      credentials = {
        rootCertificate: tls?.caFile ? readFileSync(tls.caFile) : Buffer.alloc(0),
        ...(tls?.keyFile ? { privateKey: readFileSync(tls.keyFile) } : {}),
        ...(tls?.certFile ? { certChain: readFileSync(tls.certFile) } : {}),
      };
    }
    this.endpoints = new EtcdEndpoints({
      endpoints: normalizeEndpoints(opts.endpoints, useTls),
      timeoutMs: opts.callTimeoutMs ?? 5000,
      ...(credentials ? { credentials } : {}),
      ...(opts.auth ? { auth: opts.auth } : {}),
      ...(opts.firstChoice !== undefined ? { firstChoice: opts.firstChoice } : {}),
      ...(opts.onMemberChange ? { onMemberChange: opts.onMemberChange } : {}),
    });
    this.kvImpl = new EtcdKV(this.endpoints);
  }

  describeEndpoints(): string {
    return this.endpoints.describe();
  }

  async init(meta: GlobalMetadata, ring: RingModel): Promise<void> {
    const res = await txnOf(
      this.endpoints,
      'init',
      [{ key: keys.global, target: 'version', cmp: '==', value: 0 }],
      [
        { op: 'put', key: keys.global, value: JSON.stringify(meta) },
        { op: 'put', key: keys.ring, value: JSON.stringify(ring) },
      ],
    );
    if (!res.succeeded) throw new TorusError('EXISTS', 'the cluster is already initialized (use `torusctl init --view` to see its settings, `torusctl wipe` to start over)');
  }

  async globalMetadata(): Promise<GlobalMetadata> {
    const e = (await rangeOf(this.endpoints, 'read global metadata', keys.global, false)).entries[0];
    if (!e) throw notInitialized();
    return decodeGlobal(e.value);
  }

  async wipe(): Promise<void> {
    await txnOf(this.endpoints, 'wipe', [], [{ op: 'delete', key: PREFIX, prefix: true }], [], 'idempotent');
  }

  private async getRingWithRevision(): Promise<{ ring: RingModel; modRevision: number }> {
    const e = (await rangeOf(this.endpoints, 'read ring', keys.ring, false)).entries[0];
    if (!e) {
      // Tell "not initialized" apart from a cluster whose ring key was damaged.
      await this.globalMetadata();
      throw new TorusError('INTERNAL', 'the cluster has global metadata but no ring');
    }
    return { ring: decodeRing(e.value), modRevision: e.modRevision };
  }

  async getRing(): Promise<RingModel> {
    return (await this.getRingWithRevision()).ring;
  }

  async setRing(next: RingModel): Promise<void> {
    const { ring: cur, modRevision } = await this.getRingWithRevision();
    if (next.version !== cur.version + 1) {
      throw new TorusError('NON_SEQUENTIAL_RING', `ring version ${next.version} does not follow the stored version ${cur.version}`);
    }
    const res = await txnOf(this.endpoints, 'write ring', [{ key: keys.ring, target: 'mod', cmp: '==', value: modRevision }], [
      { op: 'put', key: keys.ring, value: JSON.stringify(next) },
    ]);
    if (!res.succeeded) throw new TorusError('AGAIN', 'the ring was changed concurrently; retry');
  }

  watchRing(onRing: (ring: RingModel) => void, onError?: (err: Error) => void): Unsubscribe {
    if (this.closed) throw new TorusError('CLOSED', 'metadata client is closed');
    let lastVersion = -1;
    return followKey(
      this.endpoints,
      keys.ring,
      'ring',
      (text) => {
        try {
          const ring = decodeRing(text);
          // Rings only move forward; a replayed or stale value is not news.
          if (ring.version <= lastVersion) return;
          lastVersion = ring.version;
          onRing(ring);
        } catch (err) {
          onError?.(err as Error);
        }
      },
      (err) => onError?.(err),
    );
  }

  async registerPeer(info: PeerInfo, ttlMs: number): Promise<void> {
    if (this.closed) throw new TorusError('CLOSED', 'metadata client is closed');
    // Each heartbeat renews the process's lease, or takes a new one when etcd forgot it (it
    // expired while we were cut off) or the TTL changed.
    let lease = this.lease;
    if (lease && (lease.ttlMs !== leaseTtlMs(ttlMs) || !(await lease.renew()))) {
      lease.release();
      lease = undefined;
    }
    lease ??= this.lease = await EtcdLease.grant(this.endpoints, ttlMs);
    // A put of our own record: sending it twice is harmless, so it may go to another member.
    await txnOf(this.endpoints, 'register peer', [], [{ op: 'put', key: keys.node(info.uuid), value: encodePeer(info), session: lease }], [], 'idempotent');
  }

  async unregisterPeer(uuid: string): Promise<void> {
    await txnOf(this.endpoints, 'unregister peer', [], [{ op: 'delete', key: keys.node(uuid) }], [], 'idempotent');
    const lease = this.lease;
    this.lease = undefined;
    if (lease) await lease.revoke().catch(() => undefined);
  }

  async getPeers(): Promise<PeerInfo[]> {
    const { entries } = await rangeOf(this.endpoints, 'list peers', keys.nodesPrefix, true);
    const peers: PeerInfo[] = [];
    for (const e of entries) {
      try {
        peers.push(decodePeer(e.value));
      } catch {
        // A record we cannot read is skipped rather than hiding every other peer.
      }
    }
    return peers;
  }

  kv(): MetaKV {
    return this.kvImpl;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.lease?.release();
    this.endpoints.close();
  }
}
