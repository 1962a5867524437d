import { networkInterfaces } from 'node:os';
import type { Logger } from 'pino';
import { TorusError, isTorusError, toTorusError } from '../core/errors.js';
import type { MetadataService, Unsubscribe } from '../core/interfaces.js';
import { IDLE_REBALANCE, type GlobalMetadata, type PeerInfo, type RingModel } from '../core/models.js';
import { PROTOCOL_VERSION, VERSION } from '../core/version.js';
import { HttpServer } from '../http/server.js';
import { NodeMetrics } from '../http/metrics.js';
import { addPeers } from '../ring/index.js';
import { isStale, ringPeerOf, updateRing } from './cluster.js';
import { loadOrCreateIdentity, lockDataDir, resolveStorageSize, type NodeIdentity } from './datadir.js';

// The storage node (torusd): identity, heartbeat, ring watch, HTTP. The composition root for
// everything a node runs; the CLI only parses flags into NodeOptions.

export const DEFAULT_PEER_PORT = 40000;

export interface NodeOptions {
  readonly meta: MetadataService;
  /** How to describe etcd in messages (endpoints). */
  readonly etcdDesc: string;
  readonly dataDir: string;
  /** "20GiB" or "50%". */
  readonly size: string;
  /** Where peers reach this node (http://IP:PORT or tdp://IP:PORT); none = serves no blocks. */
  readonly peerAddress?: string;
  readonly httpHost?: string;
  readonly httpPort?: number;
  readonly autoJoin?: boolean;
  readonly heartbeatMs?: number;
  readonly log: Logger;
}

export interface PeerAddress {
  /** As advertised to peers and shown to users. */
  readonly url: string;
  readonly listenHost: string;
  readonly port: number;
}

/** Parses --peer-address. `http://` is accepted as the original's spelling for the peer port. */
export function parsePeerAddress(text: string): PeerAddress {
  let u: URL;
  try {
    u = new URL(text);
  } catch {
    throw new TorusError('INVALID_ARGUMENT', `invalid --peer-address "${text}": expected a URL such as http://10.0.0.5:40000`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'tdp:')
    throw new TorusError('INVALID_ARGUMENT', `invalid --peer-address "${text}": the scheme must be http:// or tdp://`);
  if (u.pathname !== '/' && u.pathname !== '' || u.search || u.username)
    throw new TorusError('INVALID_ARGUMENT', `invalid --peer-address "${text}": only scheme, host and port are allowed`);
  const host = u.hostname.replace(/^\[|\]$/g, '');
  if (!host) throw new TorusError('INVALID_ARGUMENT', `invalid --peer-address "${text}": no host`);
  // URL drops a port that equals the scheme's default (80 for http:), so read it back from the text.
  const explicit = /:(\d+)\/?$/.exec(text);
  const port = u.port ? Number(u.port) : explicit ? Number(explicit[1]) : DEFAULT_PEER_PORT;
  if (!(port > 0 && port < 65536)) throw new TorusError('INVALID_ARGUMENT', `invalid --peer-address "${text}": bad port`);
  // Binding every interface is fine, but peers need a routable address to dial.
  const advertised = host === '0.0.0.0' || host === '::' ? firstExternalIPv4() : host;
  const hostPart = advertised.includes(':') ? `[${advertised}]` : advertised;
  return { url: `${u.protocol}//${hostPart}:${port}`, listenHost: host, port };
}

function firstExternalIPv4(): string {
  for (const list of Object.values(networkInterfaces())) {
    for (const a of list ?? []) if (a.family === 'IPv4' && !a.internal) return a.address;
  }
  return '127.0.0.1';
}

export class StorageNode {
  readonly identity: NodeIdentity;
  readonly global: GlobalMetadata;
  readonly totalBlocks: number;
  readonly address: string;
  private ring: RingModel | undefined;
  private peersSeen = 0;
  private lastHeartbeatOk = 0;
  private lastHeartbeatError = '';
  private heartbeatTimer: NodeJS.Timeout | undefined;
  private unwatchRing: Unsubscribe | undefined;
  private readonly http: HttpServer | undefined;
  readonly metrics: NodeMetrics;
  private httpAddr: string = '';
  private stopping = false;
  private readonly unlockDir: () => void;
  private readonly heartbeatMs: number;
  private readonly usedBlocks = 0;

  private constructor(
    private readonly opts: NodeOptions,
    identity: NodeIdentity,
    global: GlobalMetadata,
    totalBlocks: number,
    unlockDir: () => void,
  ) {
    this.identity = identity;
    this.global = global;
    this.totalBlocks = totalBlocks;
    this.unlockDir = unlockDir;
    this.heartbeatMs = opts.heartbeatMs ?? 5000;
    this.address = opts.peerAddress ? parsePeerAddress(opts.peerAddress).url : '';
    this.metrics = new NodeMetrics({
      capacityBlocks: () => this.totalBlocks,
      usedBlocks: () => this.usedBlocks,
      blockSize: () => this.global.blockSize,
      ringVersion: () => this.ring?.version ?? 0,
      peersSeen: () => this.peersSeen,
    });
    if (opts.httpHost !== undefined || opts.httpPort !== undefined)
      this.http = new HttpServer(this.metrics, { problems: () => this.problems(), status: () => this.status() });
  }

  static async start(opts: NodeOptions): Promise<StorageNode> {
    if (opts.peerAddress) parsePeerAddress(opts.peerAddress); // fail on a bad flag before touching anything
    const global = await opts.meta.globalMetadata();
    // Every check that can refuse the flags runs before the data dir gets an identity.
    const bytes = resolveStorageSize(opts.size, opts.dataDir, 0);
    const totalBlocks = Math.floor(bytes / global.blockSize);
    if (totalBlocks < 1)
      throw new TorusError('INVALID_ARGUMENT', `--size ${opts.size} holds no block of the cluster's block size (${global.blockSize} bytes)`);
    const identity = loadOrCreateIdentity(opts.dataDir, global.clusterId, opts.etcdDesc);
    const unlock = lockDataDir(opts.dataDir);
    let node: StorageNode | undefined;
    try {
      node = new StorageNode(opts, identity, global, totalBlocks, unlock);
      await node.run();
      return node;
    } catch (err) {
      if (node) await node.stop().catch(() => undefined);
      else unlock();
      throw err;
    }
  }

  private async run(): Promise<void> {
    const log = this.opts.log;
    if (this.http) {
      const host = this.opts.httpHost ?? '127.0.0.1';
      const { port } = await this.http.listen(host, this.opts.httpPort ?? 4321);
      this.httpAddr = `http://${host.includes(':') ? `[${host}]` : host}:${port}`;
      log.info({ http: this.httpAddr }, 'serving HTTP');
    }
    this.unwatchRing = this.opts.meta.watchRing(
      (ring) => {
        const prev = this.ring?.version;
        this.ring = ring;
        log.info({ version: ring.version, type: ring.type, replication: ring.replication, members: ring.peers.length, member: ring.peers.some((p) => p.uuid === this.identity.uuid) }, prev === undefined ? 'ring loaded' : 'ring changed');
      },
      (err) => log.warn({ err: err.message }, 'ring watch error'),
    );
    // The first heartbeat is synchronous with start-up so `list-peers` shows the node as soon as
    // torusd says it is up, and a node that cannot register fails loudly instead of idling.
    await this.heartbeat();
    if (this.lastHeartbeatError) throw new TorusError('ETCD_UNAVAILABLE', `cannot register with etcd at ${this.opts.etcdDesc}: ${this.lastHeartbeatError}`);
    this.scheduleHeartbeat();
    if (this.opts.autoJoin) await this.autoJoin();
    log.info({ uuid: this.identity.uuid, address: this.address, blocks: this.totalBlocks, blockSize: this.global.blockSize }, 'torusd started');
  }

  private info(): PeerInfo {
    return {
      uuid: this.identity.uuid,
      address: this.address,
      httpAddress: this.httpAddr,
      lastSeen: Date.now(),
      heartbeatMs: this.heartbeatMs,
      totalBlocks: this.totalBlocks,
      usedBlocks: this.usedBlocks,
      blockSize: this.global.blockSize,
      protocolVersion: PROTOCOL_VERSION,
      rebalance: IDLE_REBALANCE,
      version: VERSION,
    };
  }

  private scheduleHeartbeat(): void {
    if (this.stopping) return;
    this.heartbeatTimer = setTimeout(() => {
      void this.heartbeat().finally(() => this.scheduleHeartbeat());
    }, this.heartbeatMs);
  }

  private async heartbeat(): Promise<void> {
    const end = this.metrics.etcdLatency.startTimer();
    try {
      // The lease outlives three missed heartbeats: one slow etcd round does not make a node DOWN.
      await this.opts.meta.registerPeer(this.info(), this.heartbeatMs * 3);
      this.peersSeen = (await this.opts.meta.getPeers()).filter((p) => !isStale(p, Date.now())).length;
      this.metrics.heartbeats.inc();
      if (this.lastHeartbeatError) this.opts.log.info('heartbeat restored');
      this.lastHeartbeatOk = Date.now();
      this.lastHeartbeatError = '';
    } catch (err) {
      this.metrics.heartbeatFailures.inc();
      const msg = toTorusError(err).message;
      if (msg !== this.lastHeartbeatError) this.opts.log.warn({ err: msg }, 'heartbeat failed');
      this.lastHeartbeatError = msg;
    } finally {
      end();
    }
  }

  private async autoJoin(): Promise<void> {
    try {
      await updateRing(this.opts.meta, (cur) => addPeers(cur, [ringPeerOf(this.info())]));
      this.opts.log.info('joined the ring');
    } catch (err) {
      if (isTorusError(err, 'EXISTS')) return; // already a member
      throw err;
    }
  }

  problems(): string[] {
    const out: string[] = [];
    if (this.lastHeartbeatError) out.push(`etcd: ${this.lastHeartbeatError}`);
    if (Date.now() - this.lastHeartbeatOk > 3 * this.heartbeatMs) out.push('no successful heartbeat in the last three intervals');
    if (!this.ring) out.push('ring not loaded yet');
    return out;
  }

  status(): Record<string, unknown> {
    return {
      uuid: this.identity.uuid,
      clusterId: this.identity.clusterId,
      address: this.address,
      blockSize: this.global.blockSize,
      totalBlocks: this.totalBlocks,
      usedBlocks: this.usedBlocks,
      ringVersion: this.ring?.version ?? 0,
      ringMember: this.ring?.peers.some((p) => p.uuid === this.identity.uuid) ?? false,
      lastHeartbeat: this.lastHeartbeatOk ? new Date(this.lastHeartbeatOk).toISOString() : null,
      problems: this.problems(),
      version: VERSION,
    };
  }

  get httpAddress(): string {
    return this.httpAddr;
  }

  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    clearTimeout(this.heartbeatTimer);
    this.unwatchRing?.();
    await this.http?.close();
    // Leaving the registry at once (rather than when the lease runs out) makes a clean stop
    // visible immediately; ring membership is untouched: a restart is not a removal.
    await this.opts.meta.unregisterPeer(this.identity.uuid).catch((err: unknown) => this.opts.log.warn({ err: toTorusError(err).message }, 'could not unregister'));
    this.unlockDir();
  }
}
