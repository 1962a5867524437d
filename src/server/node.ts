import { readdirSync, statSync } from 'node:fs';
import { networkInterfaces } from 'node:os';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { TorusError, isTorusError, toTorusError } from '../core/errors.js';
import { KNOWN_BLOCK_TYPES } from '../core/ids.js';
import type { MetadataService } from '../core/interfaces.js';
import { IDLE_REBALANCE, type GlobalMetadata, type PeerInfo } from '../core/models.js';
import { PROTOCOL_VERSION, VERSION } from '../core/version.js';
import { ClusterView } from '../distributor/cluster-view.js';
import type { ReadLevel, WriteLevel } from '../distributor/distributor.js';
import { openBlockClient, type BlockClient } from '../distributor/open.js';
import { HttpServer, type HttpServerOptions, type Routes } from '../http/server.js';
import { DASHBOARD_CSS, DASHBOARD_HEADERS, DASHBOARD_HTML, DASHBOARD_JS } from '../http/dashboard-page.js';
import { Dashboard } from './dashboard.js';
import { NodeMetrics, labelledCounters, type MetricSample } from '../http/metrics.js';
import { addPeers } from '../ring/index.js';
import { RpcServer, type RpcServerOptions } from '../rpc/server.js';
import type { PeerSecurity } from '../rpc/security.js';
import { FileBlockStore } from '../storage/file-store.js';
import { Rebalancer } from '../distributor/rebalance.js';
import { buildLiveSet, collectLocal, type GcReport } from '../volume/gc.js';
import { VolumeMeta } from '../volume/meta.js';
import { NEARLY_FULL, isStale, ringPeerOf, updateRing } from './cluster.js';
import { HistoryCompactor } from './compactor.js';
import { knownFrom, maintenances, writeKnown, type Maintenance } from './peer-records.js';
import { createIdentity, openPermissions, readIdentity, resolveStorageSize, type NodeIdentity } from './datadir.js';
import { NodeScrub } from './node-scrub.js';

// The storage node (torusd): identity, heartbeat, ring watch, HTTP. The composition root for
// everything a node runs; the CLI only parses flags into NodeOptions.

export const DEFAULT_PEER_PORT = 40000;
const WEEK_MS = 7 * 24 * 3_600_000;

/** What each limit's log line says happened, and the flag that sets it. */
const LIMIT_TEXT: Record<string, string> = {
  maxConnections: 'a connection was refused, the listener has its maximum (--peer-max-connections, --http-max-connections)',
  budget: 'the memory for requests and replies is used up; connections beyond their share wait (--peer-max-buffered)',
  stall: 'a client left a message half-sent or its replies unread, and was dropped (--peer-stall-timeout)',
  timeout: 'a request did not arrive in time, and its connection was closed',
  badRequest: 'a request did not parse, and its connection was closed',
};

export interface NodeOptions {
  /** Peer RPC protection, served and dialled (rpc/security.ts); plaintext if absent. */
  readonly peerSecurity?: PeerSecurity;
  /** The uuid this node's certificate names: a fresh data dir takes it, an existing one must have it. */
  readonly certUuid?: string;
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
  readonly readCacheBytes?: number;
  /** Bytes per second the rebalancer may send (0: unlimited). */
  readonly rebalanceRate?: number;
  readonly rebalanceIntervalMs?: number;
  /** Bytes of blocks the rebalancer holds in flight at once. */
  readonly rebalanceMemory?: number;
  /** How often to collect garbage; 0 turns GC off. */
  readonly gcIntervalMs?: number;
  /** Check every held block once per interval (default a week); 0 turns scrubbing off. */
  readonly scrubIntervalMs?: number;
  /** Scrub read rate, bytes per second; by default derived from the interval. */
  readonly scrubRate?: number;
  /** Delete orphaned blocks once orphaned this long (default a week); 0: never. */
  readonly orphanGraceMs?: number;
  readonly readLevel?: ReadLevel;
  readonly writeLevel?: WriteLevel;
  /** etcd history compaction, done by one node at a time (server/compactor.ts); retentionMs 0 turns it off here. */
  readonly compaction?: { readonly retentionMs: number; readonly maxRevisions: number; readonly intervalMs: number };
  /** Limits of the peer RPC listener (see RpcServerOptions); defaults there. */
  readonly peerLimits?: Pick<RpcServerOptions, 'maxConnections' | 'maxBufferedBytes' | 'stallTimeoutMs' | 'idleTimeoutMs'>;
  /** How long a call to another node may take (the RPC client's default, 5 s, if absent). */
  readonly peerTimeoutMs?: number;
  /** Limits of the HTTP listener. */
  readonly httpLimits?: Pick<HttpServerOptions, 'maxConnections'>;
  /** HTTPS and the bearer token /v1/* asks for. */
  readonly httpSecurity?: Pick<HttpServerOptions, 'tls' | 'bearerToken'>;
  readonly log: Logger;
}

export const DEFAULT_COMPACTION = { retentionMs: 5 * 60_000, maxRevisions: 10_000, intervalMs: 10_000 } as const;

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


function allocatedBytes(dir: string): number {
  // What this node's files already occupy counts as available to it when --size is checked.
  let total = 0;
  try {
    for (const name of readdirSync(dir)) {
      const st = statSync(join(dir, name));
      if (st.isFile()) total += st.blocks * 512;
    }
  } catch {
    // no block dir yet
  }
  return total;
}

export class StorageNode {
  readonly address: string;
  readonly metrics: NodeMetrics;
  private readonly heartbeatMs: number;
  private readonly http: HttpServer | undefined;
  private readonly dashboard: Dashboard | undefined;
  private rpc: RpcServer | undefined;
  private client: BlockClient | undefined;
  private httpAddr = '';
  private peersSeen = 0;
  private lastHeartbeatOk = 0;
  private lastHeartbeatError = '';
  private heartbeats = 0;
  private heartbeatFailures = 0;
  private heartbeatTimer: NodeJS.Timeout | undefined;
  /** The heartbeat being written, if any; another is never started alongside it. */
  private heartbeatRunning: Promise<void> | undefined;
  /** A heartbeat was asked for while one was being written: write again right after it. */
  private heartbeatAgain = false;
  /** What the last written heartbeat said about the rebalancer, to publish changes at once. */
  private published = { ringVersion: -1, rebalancing: false };
  private gcTimer: NodeJS.Timeout | undefined;
  private rebalancer: Rebalancer | undefined;
  private scrub: NodeScrub | undefined;
  private compactor: HistoryCompactor | undefined;
  private gcRunning: Promise<void> | undefined;
  private readonly gcAbort = new AbortController();
  private gcStats = { runs: 0, skipped: 0, failures: 0, deleted: 0, lastError: '' };
  /** What the last complete GC pass saw (GcView fingerprint, the store's change mark). */
  private lastGc: { readonly fingerprint: string; readonly mark: number } | undefined;
  private warnedFull = false;
  private stopping = false;
  /** When /torus/lastknown/<uuid> was last written; it is refreshed about once a minute. */
  private knownWritten = 0;
  /** Maintenance windows in force, as of the last heartbeat. */
  private maint = new Map<string, Maintenance>();
  /** While the rebalancer moves data, progress is published every second, not every heartbeat. */
  private progressTimer: NodeJS.Timeout | undefined;
  /** Samples of what else this process runs (the NBD server of torusd --nbd-listen). */
  private readonly extraSamples: (() => MetricSample[])[] = [];

  private constructor(
    private readonly opts: NodeOptions,
    readonly identity: NodeIdentity,
    readonly global: GlobalMetadata,
    readonly store: FileBlockStore,
  ) {
    this.heartbeatMs = opts.heartbeatMs ?? 5000;
    this.address = opts.peerAddress ? parsePeerAddress(opts.peerAddress).url : '';
    this.metrics = new NodeMetrics(() => this.samples());
    if (opts.httpHost !== undefined || opts.httpPort !== undefined) {
      this.dashboard = new Dashboard(opts.meta, { uuid: identity.uuid, address: this.address }, () => this.client?.distributor, (err) =>
        opts.log.debug({ err: err.message }, 'dashboard'),
      );
      this.http = new HttpServer(this.metrics, { problems: () => this.problems(), status: () => this.status() }, this.dashboardRoutes(this.dashboard), {
        ...opts.httpLimits,
        ...opts.httpSecurity,
        onLimit: (what, detail) => opts.log.warn({ ...detail, limit: what }, `HTTP limit reached: ${LIMIT_TEXT[what] ?? what}`),
      });
    }
  }

  private dashboardRoutes(d: Dashboard): Routes {
    const file = (type: string, body: string): Routes[string] => (_req, res) => {
      res.writeHead(200, { 'content-type': type, ...DASHBOARD_HEADERS }).end(body);
    };
    return {
      '/': file('text/html; charset=utf-8', DASHBOARD_HTML),
      '/dashboard.css': file('text/css; charset=utf-8', DASHBOARD_CSS),
      '/dashboard.js': file('text/javascript; charset=utf-8', DASHBOARD_JS),
      '/v1/cluster': async (_req, res) => {
        try {
          const view = await d.view();
          res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' }).end(`${JSON.stringify(view)}\n`);
        } catch (err) {
          const e = toTorusError(err);
          res.writeHead(503, { 'content-type': 'application/json' }).end(`${JSON.stringify({ error: e.code, message: e.message })}\n`);
        }
      },
    };
  }

  static async start(opts: NodeOptions): Promise<StorageNode> {
    const peer = opts.peerAddress ? parsePeerAddress(opts.peerAddress) : undefined; // fail on a bad flag before touching anything
    const global = await opts.meta.globalMetadata();
    const blockDir = join(opts.dataDir, 'block');
    // Every check that can refuse the flags runs before the data dir gets an identity.
    const bytes = resolveStorageSize(opts.size, opts.dataDir, allocatedBytes(blockDir));
    if (bytes < global.blockSize)
      throw new TorusError('INVALID_ARGUMENT', `--size ${opts.size} holds no block of the cluster's block size (${global.blockSize} bytes)`);
    const known = readIdentity(opts.dataDir, global.clusterId, opts.etcdDesc);
    const exposed = openPermissions(opts.dataDir);
    if (exposed.length > 0)
      opts.log.warn({ paths: exposed.slice(0, 10), more: Math.max(0, exposed.length - 10) }, `data dir ${opts.dataDir} is open to other users: chmod -R go-rwx ${opts.dataDir}`);
    if (known && opts.certUuid !== undefined && known.uuid !== opts.certUuid)
      throw new TorusError(
        'INVALID_ARGUMENT',
        `the node certificate names node ${opts.certUuid}, but data dir ${opts.dataDir} is node ${known.uuid}: issue this node's with torusctl cert issue CA-DIR NAME --uuid ${known.uuid}`,
      );
    // The block store's lock is the data dir's lock: one torusd per data dir.
    const store = await FileBlockStore.open({ dir: blockDir, blockSize: global.blockSize, sizeBytes: bytes });
    let node: StorageNode | undefined;
    try {
      const identity = known ?? createIdentity(opts.dataDir, global.clusterId, opts.certUuid);
      node = new StorageNode(opts, identity, global, store);
      await node.run(peer);
      return node;
    } catch (err) {
      if (node) await node.stop().catch(() => undefined);
      else await store.close().catch(() => undefined);
      throw err;
    }
  }

  private async run(peer: PeerAddress | undefined): Promise<void> {
    const log = this.opts.log;
    if (peer) {
      this.rpc = new RpcServer({
        service: this.store,
        identity: { uuid: this.identity.uuid, clusterId: this.global.clusterId },
        software: `torusd ${VERSION}`,
        ...(this.opts.peerSecurity ? { security: this.opts.peerSecurity } : {}),
        onConnectionError: (err, remote) => log.warn({ remote, err: err.message }, 'peer connection dropped'),
        ...this.opts.peerLimits,
        onLimit: (what, detail) => log.warn({ ...detail, limit: what }, `peer RPC limit reached: ${LIMIT_TEXT[what] ?? what}`),
      });
      try {
        await this.rpc.listen(peer.port, peer.listenHost);
      } catch (err) {
        throw new TorusError('INVALID_ARGUMENT', `cannot listen on ${peer.listenHost}:${peer.port} for --peer-address: ${(err as Error).message}`);
      }
      log.info({ address: this.address }, 'serving peer RPC');
    }
    if (this.http) {
      const host = this.opts.httpHost ?? '127.0.0.1';
      let port: number;
      try {
        ({ port } = await this.http.listen(host, this.opts.httpPort ?? 4321));
      } catch (err) {
        throw new TorusError('INVALID_ARGUMENT', `cannot listen on ${host}:${this.opts.httpPort ?? 4321} for --host/--port: ${(err as Error).message}`);
      }
      this.httpAddr = `${this.opts.httpSecurity?.tls ? 'https' : 'http'}://${host.includes(':') ? `[${host}]` : host}:${port}`;
      log.info({ http: this.httpAddr }, 'serving HTTP');
    }
    this.client = await openBlockClient({
      meta: this.opts.meta,
      self: { uuid: this.identity.uuid, store: this.store },
      rpc: {
        ...(this.opts.peerSecurity ? { security: this.opts.peerSecurity } : {}),
        ...(this.opts.peerTimeoutMs !== undefined ? { requestTimeoutMs: this.opts.peerTimeoutMs } : {}),
      },
      ...(this.opts.readCacheBytes !== undefined ? { readCacheBytes: this.opts.readCacheBytes } : {}),
      ...(this.opts.readLevel ? { readLevel: this.opts.readLevel } : {}),
      ...(this.opts.writeLevel ? { writeLevel: this.opts.writeLevel } : {}),
      onError: (err) => log.warn({ err: err.message }, 'cluster view'),
      observeRpc: (peer, op, seconds, code) => this.metrics.observeRpc(peer, op, seconds, code),
    });
    this.rebalancer = new Rebalancer({
      self: { uuid: this.identity.uuid, store: this.store },
      ring: () => this.view.ring,
      // A member down for planned maintenance is not called at all: no timeouts, no retries and
      // no log lines every pass. What it lacks is sent once it heartbeats again.
      target: (u) => (this.plannedDown(u) ? undefined : this.view.target(u)),
      transport: this.client.transport,
      blockSize: this.global.blockSize,
      rateBytesPerSec: this.opts.rebalanceRate ?? 0,
      intervalMs: this.opts.rebalanceIntervalMs ?? 10_000,
      // From the heartbeats: each member publishes the ring version of its last finished pass.
      peersCaughtUp: (version) => {
        const seen = new Map(this.view.peers.map((p) => [p.uuid, p.rebalance.ringVersion ?? 0]));
        return this.view.ring.members().every((u) => u === this.identity.uuid || (seen.get(u) ?? 0) >= version);
      },
      ...(this.opts.rebalanceMemory !== undefined ? { inFlightBytes: this.opts.rebalanceMemory } : {}),
      // A pass that caught up with a new ring, or finished moving, is published at once: until
      // then torusctl counts this node as still rebalancing. Not while heartbeats fail: retrying
      // etcd stays at the heartbeat's pace.
      onPass: (st) => {
        const changed = st.ringVersion !== this.published.ringVersion || st.rebalancing !== this.published.rebalancing;
        if (changed && !this.lastHeartbeatError) this.beat();
      },
      log,
    });
    this.scrub = new NodeScrub({
      dataDir: this.opts.dataDir,
      store: this.store,
      uuid: this.identity.uuid,
      client: this.client,
      meta: this.opts.meta,
      intervalMs: this.opts.scrubIntervalMs ?? WEEK_MS,
      ...(this.opts.scrubRate !== undefined ? { rateBytesPerSec: this.opts.scrubRate } : {}),
      orphanGraceMs: this.opts.orphanGraceMs ?? WEEK_MS,
      // Found or repaired a bad copy, or a pass began or ended: published at once, as the rebalancer's.
      onChange: () => {
        if (!this.lastHeartbeatError) this.beat();
      },
      log,
    });
    this.view.onRing((ring, prev) => {
      if (prev) this.rebalancer?.kick();
      log.info(
        { version: ring.version, type: ring.type, replication: ring.replication, members: ring.members().length, member: ring.members().includes(this.identity.uuid) },
        prev ? 'ring changed' : 'ring loaded',
      );
    });
    // The first heartbeat is part of start-up, so `list-peers` shows the node as soon as
    // torusd says it is up, and a node that cannot register fails loudly instead of idling.
    await this.heartbeat();
    if (this.lastHeartbeatError) throw new TorusError('ETCD_UNAVAILABLE', `cannot register with etcd at ${this.opts.etcdDesc}: ${this.lastHeartbeatError}`);
    this.scheduleHeartbeat();
    this.scheduleGc();
    this.rebalancer.start();
    this.scrub.start();
    const compaction = this.opts.compaction ?? DEFAULT_COMPACTION;
    if (compaction.retentionMs > 0) {
      this.compactor = new HistoryCompactor({ kv: this.opts.meta.kv(), id: this.identity.uuid, ...compaction, log });
      this.compactor.start();
    }
    this.dashboard?.start();
    this.progressTimer = setInterval(() => {
      // `rebalance status --watch` and the dashboard follow these; a heartbeat's pace made a
      // move of a few seconds look like nothing, then done.
      if (this.rebalancer?.status().rebalancing && !this.lastHeartbeatError) this.beat();
    }, Math.min(1000, this.heartbeatMs));
    if (this.opts.autoJoin) await this.autoJoin();
    log.info({ uuid: this.identity.uuid, address: this.address, blocks: this.store.numBlocks(), used: this.store.usedBlocks(), blockSize: this.global.blockSize }, 'torusd started');
  }

  /**
   * The node's own block client: its distributor reaches this node's disk directly, other nodes
   * over peer RPC. What torusd --nbd-listen serves volumes through.
   */
  get blockClient(): BlockClient {
    if (!this.client) throw new TorusError('INTERNAL', 'node not started');
    return this.client;
  }

  /** Adds what `f` returns to /metrics. */
  addSamples(f: () => MetricSample[]): void {
    this.extraSamples.push(f);
  }

  private get view(): ClusterView {
    if (!this.client) throw new TorusError('INTERNAL', 'node not started');
    return this.client.view;
  }

  private info(): PeerInfo {
    return {
      uuid: this.identity.uuid,
      address: this.address,
      httpAddress: this.httpAddr,
      lastSeen: Date.now(),
      heartbeatMs: this.heartbeatMs,
      totalBlocks: this.store.numBlocks(),
      usedBlocks: this.store.usedBlocks(),
      blockSize: this.global.blockSize,
      protocolVersion: PROTOCOL_VERSION,
      rebalance: this.rebalancer?.status() ?? IDLE_REBALANCE,
      version: VERSION,
      ...(this.scrub ? { scrub: this.scrub.info() } : {}),
      blockTypes: KNOWN_BLOCK_TYPES,
    };
  }

  private scheduleHeartbeat(): void {
    if (this.stopping) return;
    clearTimeout(this.heartbeatTimer);
    this.heartbeatTimer = setTimeout(() => this.beat(), this.heartbeatMs);
  }

  /** Writes a heartbeat now (after the one in flight, if any); the timer restarts from it. */
  private beat(): void {
    if (this.stopping) return;
    if (this.heartbeatRunning) {
      this.heartbeatAgain = true;
      return;
    }
    clearTimeout(this.heartbeatTimer);
    this.heartbeatRunning = this.heartbeat().finally(() => {
      this.heartbeatRunning = undefined;
      if (this.heartbeatAgain) {
        this.heartbeatAgain = false;
        this.beat();
      } else this.scheduleHeartbeat();
    });
  }

  private async heartbeat(): Promise<void> {
    try {
      const info = this.info();
      // The lease outlives three missed heartbeats: one slow etcd round does not make a node DOWN.
      await this.opts.meta.registerPeer(info, this.heartbeatMs * 3);
      this.published = { ringVersion: info.rebalance.ringVersion ?? 0, rebalancing: info.rebalance.rebalancing };
      this.peersSeen = (await this.opts.meta.getPeers()).filter((p) => !isStale(p, Date.now())).length;
      this.heartbeats++;
      if (this.lastHeartbeatError) this.opts.log.info('heartbeat restored');
      this.lastHeartbeatOk = Date.now();
      this.lastHeartbeatError = '';
      const full = info.usedBlocks / Math.max(1, info.totalBlocks);
      if (full >= NEARLY_FULL && !this.warnedFull) this.opts.log.warn({ used: info.usedBlocks, total: info.totalBlocks }, 'storage is nearly full');
      this.warnedFull = full >= NEARLY_FULL;
    } catch (err) {
      this.heartbeatFailed(err);
      return;
    }
    // Bookkeeping beside the heartbeat: its failure is not the heartbeat's.
    try {
      this.maint = await maintenances(this.opts.meta.kv());
      if (Date.now() - this.knownWritten >= 60_000) {
        await writeKnown(this.opts.meta.kv(), knownFrom(this.info()));
        this.knownWritten = Date.now();
      }
    } catch (err) {
      this.opts.log.debug({ err: toTorusError(err).message }, 'maintenance and last-known records not refreshed');
    }
  }

  private heartbeatFailed(err: unknown): void {
    this.heartbeatFailures++;
    const msg = toTorusError(err).message;
    if (msg !== this.lastHeartbeatError) this.opts.log.warn({ err: msg }, 'heartbeat failed');
    this.lastHeartbeatError = msg;
  }

  private scheduleGc(): void {
    const every = this.opts.gcIntervalMs ?? 30_000;
    if (this.stopping || every <= 0) return;
    this.gcTimer = setTimeout(() => {
      this.gcRunning = this.collectGarbage().then(() => undefined).finally(() => {
        this.gcRunning = undefined;
        this.scheduleGc();
      });
    }, every);
  }

  /**
   * One GC pass over this node's blocks; a failure anywhere deletes nothing. Skipped when its
   * outcome cannot differ from the last complete pass's: the same volume metadata (every key at
   * the same revision), no block stored here since, no orphan seen and not yet dealt with. An idle
   * cluster then walks no trees at all.
   */
  async collectGarbage(): Promise<GcReport | undefined> {
    try {
      const meta = new VolumeMeta(this.opts.meta.kv());
      // Taken first: a block stored after it makes the next pass run.
      const mark = this.store.changeMark();
      const view = await meta.gcView();
      const last = this.lastGc;
      if (last && last.fingerprint === view.fingerprint && last.mark === mark && !this.scrub?.orphansPending()) {
        this.gcStats.skipped++;
        return { checked: 0, deleted: 0, revision: view.revision };
      }
      this.lastGc = undefined;
      const live = await buildLiveSet(meta, this.client!.distributor, view);
      const report = await collectLocal(live, this.store, this.gcAbort.signal);
      if (!this.gcAbort.signal.aborted) {
        await this.scrub?.afterGc(live);
        this.lastGc = { fingerprint: view.fingerprint, mark };
      }
      this.gcStats.runs++;
      this.gcStats.deleted += report.deleted;
      if (report.deleted > 0) this.opts.log.info({ deleted: report.deleted, checked: report.checked, revision: report.revision }, 'garbage collected');
      return report;
    } catch (err) {
      this.gcStats.failures++;
      this.gcStats.lastError = toTorusError(err).message;
      this.opts.log.warn({ err: this.gcStats.lastError }, 'garbage collection skipped');
      return undefined;
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

  /** A ring member in a maintenance window that is not heartbeating. */
  private plannedDown(uuid: string): boolean {
    if (!this.maint.has(uuid)) return false;
    const live = this.view.peers.find((p) => p.uuid === uuid);
    return !live || isStale(live, Date.now());
  }

  problems(): string[] {
    const out: string[] = [];
    if (this.lastHeartbeatError) out.push(`etcd: ${this.lastHeartbeatError}`);
    if (Date.now() - this.lastHeartbeatOk > 3 * this.heartbeatMs) out.push('no successful heartbeat in the last three intervals');
    const used = this.store.usedBlocks() / Math.max(1, this.store.numBlocks());
    if (used >= NEARLY_FULL) out.push(`storage ${(used * 100).toFixed(1)}% full`);
    return out;
  }

  status(): Record<string, unknown> {
    let ring: { version: number; member: boolean } | null = null;
    try {
      ring = { version: this.view.ring.version, member: this.view.ring.members().includes(this.identity.uuid) };
    } catch {
      ring = null;
    }
    return {
      uuid: this.identity.uuid,
      address: this.address,
      blockSize: this.global.blockSize,
      totalBlocks: this.store.numBlocks(),
      usedBlocks: this.store.usedBlocks(),
      ring,
      lastHeartbeat: this.lastHeartbeatOk ? new Date(this.lastHeartbeatOk).toISOString() : null,
      problems: this.problems(),
      storage: this.store.stats(),
      rpc: this.rpc?.stats() ?? null,
      scrub: this.scrub?.info() ?? null,
      etcdCompaction: this.compactor?.status() ?? null,
      version: VERSION,
    };
  }

  private samples(): MetricSample[] {
    const bs = this.global.blockSize;
    const st = this.store.stats();
    const out: MetricSample[] = [
      { name: 'torus_storage_blocks_total', help: 'Capacity of the local block store, in blocks', type: 'gauge', value: this.store.numBlocks() },
      { name: 'torus_storage_blocks', help: 'Blocks stored in the local block store', type: 'gauge', value: this.store.usedBlocks() },
      { name: 'torus_storage_capacity_bytes', help: 'Capacity of the local block store, in bytes', type: 'gauge', value: this.store.numBlocks() * bs },
      { name: 'torus_storage_used_bytes', help: 'Bytes used in the local block store', type: 'gauge', value: this.store.usedBlocks() * bs },
      { name: 'torus_storage_read_blocks_total', help: 'Blocks (or ranges) read from the local store', type: 'counter', value: st.reads },
      { name: 'torus_storage_written_blocks_total', help: 'Blocks written to the local store', type: 'counter', value: st.writes },
      { name: 'torus_storage_deleted_blocks_total', help: 'Blocks deleted from the local store', type: 'counter', value: st.deletes },
      { name: 'torus_storage_read_bytes_total', help: 'Bytes read from the local medium', type: 'counter', value: st.bytesRead },
      { name: 'torus_storage_written_bytes_total', help: 'Bytes of whole blocks written to the local medium', type: 'counter', value: st.bytesWritten },
      { name: 'torus_storage_journal_written_bytes_total', help: 'Bytes appended to volume journals (open log blocks), seal padding included', type: 'counter', value: st.journalBytesWritten },
      { name: 'torus_storage_slot_prep_written_bytes_total', help: 'Zeros written into never-written free slots so that journal appends into them allocate nothing', type: 'counter', value: st.slotPrepBytes },
      { name: 'torus_storage_journal_fenced_refusals_total', help: 'Journal appends and seals refused from a writer a newer one fenced', type: 'counter', value: st.fencedRefusals },
      { name: 'torus_storage_checksum_failures_total', help: 'Local reads whose data failed its checksum', type: 'counter', value: st.checksumFailures },
      {
        name: 'torus_storage_memory_checksum_failures_total',
        help: 'Local reads whose bytes failed their checksum in memory but were right on disk when read again (the block was kept)',
        type: 'counter',
        value: st.memoryChecksumFailures,
      },
      { name: 'torus_storage_flushes_total', help: 'fsync rounds of the local store', type: 'counter', value: st.flushes },
      { name: 'torus_storage_sync_seconds_total', help: 'Time spent in the fsyncs of those rounds', type: 'counter', value: st.syncMs / 1000 },
      { name: 'torus_server_heartbeats_total', help: 'Heartbeats written to etcd', type: 'counter', value: this.heartbeats },
      { name: 'torus_server_heartbeat_failures_total', help: 'Heartbeats that failed', type: 'counter', value: this.heartbeatFailures },
      ...this.rebalanceSamples(),
      ...(this.scrub?.samples() ?? []),
      { name: 'torus_gc_runs_total', help: 'Garbage collection passes completed', type: 'counter', value: this.gcStats.runs },
      { name: 'torus_gc_skipped_total', help: 'Garbage collection passes skipped because nothing they depend on changed since the last', type: 'counter', value: this.gcStats.skipped },
      { name: 'torus_gc_failures_total', help: 'Garbage collection passes skipped after an error', type: 'counter', value: this.gcStats.failures },
      { name: 'torus_gc_deleted_blocks_total', help: 'Blocks deleted by garbage collection', type: 'counter', value: this.gcStats.deleted },
      { name: 'torus_server_peers_total', help: 'Peers registered in etcd as of the last heartbeat', type: 'gauge', value: this.peersSeen },
      ...this.compactionSamples(),
      ...this.extraSamples.flatMap((f) => f()),
    ];
    if (this.client) {
      try {
        out.push({ name: 'torus_ring_version', help: 'Version of the ring this node follows', type: 'gauge', value: this.view.ring.version });
        out.push(...this.clusterSamples());
      } catch {
        // ring not read yet
      }
      const d = this.client.distributor.stats;
      out.push(
        { name: 'torus_distributor_block_reads_total', help: 'Blocks read through the distributor', type: 'counter', value: d.reads },
        { name: 'torus_distributor_block_writes_total', help: 'Blocks written through the distributor', type: 'counter', value: d.writes },
        { name: 'torus_distributor_checksum_failures_total', help: 'Replica copies that failed their checksum', type: 'counter', value: d.checksumFailures },
        { name: 'torus_distributor_repairs_total', help: 'Bad replica copies replaced', type: 'counter', value: d.repairs },
      );
    }
    const r = this.rpc?.stats();
    if (r) {
      out.push(
        { name: 'torus_rpc_server_held_bytes', help: 'Peer RPC frames, payloads and replies held in memory, for all connections', type: 'gauge', value: r.heldBytes },
        { name: 'torus_rpc_server_pool_idle_bytes', help: 'Peer RPC receive buffers kept for reuse, not held by any request (at most 32 MiB)', type: 'gauge', value: r.pool.idleBytes },
        { name: 'torus_rpc_server_reply_pool_idle_bytes', help: 'Peer RPC sector reply buffers kept for reuse, not held by any reply (at most 4 MiB)', type: 'gauge', value: r.replyPool.idleBytes },
        { name: 'torus_rpc_server_held_bytes_limit', help: 'The peer RPC memory budget (--peer-max-buffered)', type: 'gauge', value: this.rpc!.budget.limit },
        { name: 'torus_rpc_server_refused_connections_total', help: 'Peer RPC connections closed on arrival (--peer-max-connections)', type: 'counter', value: r.refusedConnections },
        { name: 'torus_rpc_server_stall_timeouts_total', help: 'Peer RPC clients dropped for a frame left half-sent or replies left unread (--peer-stall-timeout)', type: 'counter', value: r.stallTimeouts },
        { name: 'torus_rpc_server_idle_timeouts_total', help: 'Idle peer RPC connections closed (--peer-idle-timeout)', type: 'counter', value: r.idleTimeouts },
        ...labelledCounters('torus_rpc_server_throttled_total', 'Times a peer RPC connection stopped being read, by the limit that stopped it', 'limit', r.throttled),
        { name: 'torus_rpc_server_connections', help: 'Open peer RPC connections', type: 'gauge', value: r.connections },
        { name: 'torus_rpc_server_in_flight', help: 'Peer RPC requests being served', type: 'gauge', value: r.inFlight },
        { name: 'torus_rpc_server_requests_total', help: 'Peer RPC requests served', type: 'counter', value: r.requests },
        { name: 'torus_rpc_server_protocol_errors_total', help: 'Peer RPC connections dropped for protocol errors', type: 'counter', value: r.protocolErrors },
        { name: 'torus_rpc_server_received_bytes_total', help: 'Peer RPC bytes received', type: 'counter', value: r.bytesIn },
        { name: 'torus_rpc_server_sent_bytes_total', help: 'Peer RPC bytes sent', type: 'counter', value: r.bytesOut },
      );
    }
    const h = this.http?.stats();
    if (h) {
      out.push(
        { name: 'torus_http_refused_connections_total', help: 'HTTP connections closed on arrival (--http-max-connections)', type: 'counter', value: h.refusedConnections },
        { name: 'torus_http_timeouts_total', help: 'HTTP requests that did not arrive in time', type: 'counter', value: h.timeouts },
        { name: 'torus_http_bad_requests_total', help: 'HTTP requests that did not parse', type: 'counter', value: h.badRequests },
      );
    }
    return out;
  }

  private compactionSamples(): MetricSample[] {
    const c = this.compactor?.status();
    if (!c) return [];
    return [
      { name: 'torus_etcd_compactor_leader', help: '1 while this node is the one compacting etcd history', type: 'gauge', value: c.leader ? 1 : 0 },
      { name: 'torus_etcd_compactions_total', help: 'etcd history compactions made by this node', type: 'counter', value: c.compactions },
      { name: 'torus_etcd_compaction_failures_total', help: 'Compaction rounds that failed', type: 'counter', value: c.failures },
      { name: 'torus_etcd_compacted_revision', help: 'Revision this node last compacted etcd history to', type: 'gauge', value: c.compactedRevision },
      { name: 'torus_etcd_db_size_bytes', help: "etcd's database size as last seen by this node while compacting (one member's)", type: 'gauge', value: c.dbSizeBytes },
    ];
  }

  /**
   * The cluster as this node sees it (ring, peers polled every 2 s, maintenance windows): every
   * node reports the same figures, so alert rules take max() over nodes, and one node's scrape is
   * enough while any node is up.
   */
  private clusterSamples(): MetricSample[] {
    const ring = this.view.ring;
    const now = Date.now();
    const members = ring.members();
    let down = 0;
    let planned = 0;
    for (const u of members) {
      const p = this.view.peers.find((x) => x.uuid === u);
      if (p && !isStale(p, now)) continue;
      if (this.maint.has(u)) planned++;
      else down++;
    }
    return [
      { name: 'torus_cluster_members', help: 'Ring members', type: 'gauge', value: members.length },
      { name: 'torus_cluster_members_down', help: 'Ring members not heartbeating, maintenance windows not counted', type: 'gauge', value: down },
      { name: 'torus_cluster_members_maintenance', help: 'Ring members down during a maintenance window', type: 'gauge', value: planned },
      { name: 'torus_cluster_replication', help: 'Copies the ring asks for', type: 'gauge', value: ring.replication },
      { name: 'torus_server_etcd_up', help: '1 when the last heartbeat reached etcd, else 0', type: 'gauge', value: this.lastHeartbeatError ? 0 : 1 },
    ];
  }

  private rebalanceSamples(): MetricSample[] {
    const r = this.rebalancer?.status();
    const held = this.rebalancer?.inFlight;
    if (!r || !held) return [];
    return [
      { name: 'torus_rebalance_active', help: '1 while this node is moving blocks', type: 'gauge', value: r.rebalancing ? 1 : 0 },
      { name: 'torus_rebalance_blocks_left', help: 'Estimated blocks still to move in this pass', type: 'gauge', value: r.blocksLeft },
      { name: 'torus_rebalance_bytes_left', help: 'Estimated bytes still to move in this pass', type: 'gauge', value: r.bytesLeft },
      { name: 'torus_rebalance_rate_bytes', help: 'Bytes per second moved in the current or last pass', type: 'gauge', value: r.rate },
      { name: 'torus_rebalance_under_replicated_blocks', help: 'Blocks held here whose owners are not all confirmed', type: 'gauge', value: r.underReplicated },
      { name: 'torus_rebalance_passes_total', help: 'Rebalance passes completed', type: 'counter', value: r.passes },
      { name: 'torus_rebalance_full_passes_total', help: 'Rebalance passes that checked every block held (the others checked only blocks stored or sealed since the last settled pass)', type: 'counter', value: r.fullPasses },
      { name: 'torus_rebalance_last_pass_blocks', help: 'Blocks the last rebalance pass checked', type: 'gauge', value: r.lastChecked },
      { name: 'torus_rebalance_inflight_bytes', help: 'Bytes of blocks read for sending and not yet acknowledged by their receiver', type: 'gauge', value: held.used },
      { name: 'torus_rebalance_inflight_bytes_peak', help: 'The most bytes of blocks in flight at once since start', type: 'gauge', value: held.peak },
      { name: 'torus_rebalance_inflight_bytes_limit', help: 'The budget for blocks in flight (--rebalance-memory)', type: 'gauge', value: held.limit },
    ];
  }

  get httpAddress(): string {
    return this.httpAddr;
  }

  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    clearTimeout(this.heartbeatTimer);
    clearTimeout(this.gcTimer);
    clearInterval(this.progressTimer);
    this.dashboard?.stop();
    this.gcAbort.abort();
    await this.rebalancer?.stop();
    await this.scrub?.stop();
    await this.compactor?.stop().catch((err: unknown) => this.opts.log.warn({ err: toTorusError(err).message }, 'could not hand over etcd compaction'));
    // A heartbeat still being written would otherwise land after the unregister below.
    await this.heartbeatRunning;
    await this.gcRunning;
    await this.http?.close();
    await this.client?.close();
    await this.rpc?.close();
    // Leaving the registry at once (rather than when the lease runs out) makes a clean stop
    // visible immediately; ring membership is untouched: a restart is not a removal.
    // What list-peers shows for this node while it is down: its address, size, and when it left.
    if (this.address) await writeKnown(this.opts.meta.kv(), knownFrom(this.info())).catch(() => undefined);
    await this.opts.meta.unregisterPeer(this.identity.uuid).catch((err: unknown) => this.opts.log.warn({ err: toTorusError(err).message }, 'could not unregister'));
    await this.store.flush().catch(() => undefined);
    await this.store.close();
  }
}
