import type { Command } from 'commander';
import type { Logger } from 'pino';
import { TorusError } from '../../core/errors.js';
import type { DeviceProvider, MetadataService } from '../../core/interfaces.js';
import { parseDuration, parseSize } from '../../core/units.js';
import { HttpServer } from '../../http/server.js';
import { NodeMetrics, counterSample as c, type MetricSample } from '../../http/metrics.js';
import { VolumeClient } from '../../volume/client.js';
import { MeasuredProvider, VolumeIo, publishIo } from '../../volume/io-stats.js';
import { peerSecurity, type BlockIoOpts, type GlobalOpts } from '../shared/config.js';
import { makeLogger } from '../shared/log.js';

// What every torusblk front end (NBD, AoE) shares: its log, its volume client, its metrics, its
// way to stop.

export interface ClientOpts extends GlobalOpts, BlockIoOpts, VolumeClientOpts {
  logLevel?: string;
  logFormat?: string;
  metrics?: string;
}

export function logger(opts: ClientOpts): Logger {
  return makeLogger('torusblk', opts);
}

export async function clientFor(
  meta: MetadataService,
  opts: BlockIoOpts & GlobalOpts & VolumeClientOpts,
  log: Logger,
  observeRpc?: (peer: string, op: string, seconds: number, code?: string) => void,
): Promise<VolumeClient> {
  const { security } = await peerSecurity(opts, false, (m) => log.warn(m));
  const requestTimeoutMs = peerTimeoutMs(opts);
  return VolumeClient.open(meta, {
    rpc: { security, ...(requestTimeoutMs !== undefined ? { requestTimeoutMs } : {}) },
    ...lockTtl(opts),
    readCacheBytes: parseSize(opts.readCacheSize),
    readLevel: opts.readLevel as 'block',
    writeLevel: opts.writeLevel as 'all',
    onError: (err) => log.warn({ err: err.message }, 'cluster'),
    ...(observeRpc ? { observeRpc } : {}),
  });
}

export interface VolumeClientOpts {
  lockTtl?: string;
  peerTimeout?: string;
}

/** --lock-ttl and --peer-timeout: every process that opens volumes (torusblk, torusd --nbd-listen) takes them. */
export function addVolumeClientOptions(cmd: Command, who: 'client' | 'node'): Command {
  return cmd
    .option(
      '--lock-ttl <duration>',
      `how long the volumes this ${who} opens stay locked after it dies or loses etcd (a new writer waits that long; too short and a stalled ${who} loses its volumes)`,
      '15s',
    )
    .option(
      '--peer-timeout <duration>',
      `how long a call to ${who === 'node' ? 'another' : 'a'} storage node may take before it fails and counts against that node (a slow or overloaded ${who === 'node' ? '' : 'client '}host needs longer)`,
      '5s',
    );
}

/** The lock TTL option for VolumeClient.open / over, when given. */
export function lockTtl(opts: VolumeClientOpts): { lockTtlMs?: number } {
  return opts.lockTtl !== undefined ? { lockTtlMs: durationFlag(opts.lockTtl, '--lock-ttl', 5000, 3_600_000, '5s to 1h') } : {};
}

export function peerTimeoutMs(opts: VolumeClientOpts): number | undefined {
  return opts.peerTimeout !== undefined ? durationFlag(opts.peerTimeout, '--peer-timeout', 500, 600_000, '500ms to 10m') : undefined;
}

/**
 * A duration flag within bounds. --lock-ttl: etcd leases are whole seconds, and below 5 s a busy
 * client loses its locks. --peer-timeout: a call to a storage node fails (and counts against its
 * breaker) after this long.
 */
function durationFlag(text: string, flag: string, minMs: number, maxMs: number, range: string): number {
  const ms = parseDuration(text);
  if (!(ms >= minMs && ms <= maxMs)) throw new TorusError('INVALID_ARGUMENT', `invalid ${flag} "${text}": expected a duration from ${range}`);
  return ms;
}

/** How often the volume holder publishes its I/O rates in etcd for `torusctl volume info`. */
const IO_PUBLISH_MS = 5000;

export function parseHostPort(text: string, flag: string): { host: string; port: number } {
  const m = /^(\[[0-9a-fA-F:]+\]|[^:]+):(\d{1,5})$/.exec(text);
  if (!m || Number(m[2]) > 65535) throw new TorusError('INVALID_ARGUMENT', `invalid ${flag} "${text}": expected host:port, e.g. 127.0.0.1:10809`);
  return { host: m[1]!.replace(/^\[|\]$/g, ''), port: Number(m[2]) };
}

/**
 * A torusblk process's client side: the volume client, per-volume I/O accounting, Prometheus
 * metrics on --metrics, and the I/O rates it publishes for the volumes it serves.
 */
export class ClientRuntime {
  readonly io: VolumeIo;
  private readonly sources: (() => MetricSample[])[] = [];
  private http: HttpServer | undefined;
  private stopPublishing: (() => Promise<void>) | undefined;

  private constructor(
    readonly vc: VolumeClient,
    readonly metrics: NodeMetrics,
  ) {
    this.io = new VolumeIo((volume, op, seconds, bytes, code) => metrics.observeVolumeIo(volume, op, seconds, bytes, code));
  }

  static async open(meta: MetadataService, opts: ClientOpts, log: Logger): Promise<ClientRuntime> {
    const listen = opts.metrics !== undefined ? parseHostPort(opts.metrics, '--metrics') : undefined;
    const sources: (() => MetricSample[])[] = [];
    const metrics = new NodeMetrics(() => sources.flatMap((f) => f()));
    const vc = await clientFor(meta, opts, log, (peer, op, seconds, code) => metrics.observeRpc(peer, op, seconds, code));
    const rt = new ClientRuntime(vc, metrics);
    rt.sources.push(() => distributorSamples(vc));
    // The collect function reads the runtime's list: front ends add theirs once they exist.
    sources.push(() => rt.sources.flatMap((f) => f()));
    try {
      if (listen) {
        rt.http = new HttpServer(metrics, { problems: () => [], status: () => ({ volumes: Object.fromEntries(rt.io.all()) }) });
        try {
          await rt.http.listen(listen.host, listen.port);
        } catch (err) {
          throw new TorusError('INVALID_ARGUMENT', `cannot listen on ${opts.metrics} for --metrics: ${(err as Error).message}`);
        }
        log.info({ metrics: `http://${opts.metrics}/metrics` }, 'serving metrics');
      }
      rt.publish(meta, log);
    } catch (err) {
      await rt.close();
      throw err;
    }
    return rt;
  }

  /**
   * A runtime over a volume client and metrics a storage node already has (torusd --nbd-listen):
   * the node's /metrics shows the volumes' I/O, through `addTo`.
   */
  static over(meta: MetadataService, vc: VolumeClient, metrics: NodeMetrics, addTo: (f: () => MetricSample[]) => void, log: Logger): ClientRuntime {
    const rt = new ClientRuntime(vc, metrics);
    rt.sources.push(() => distributorSamples(vc));
    addTo(() => rt.sources.flatMap((f) => f()));
    rt.publish(meta, log);
    return rt;
  }

  private publish(meta: MetadataService, log: Logger): void {
    this.stopPublishing = publishIo(meta.kv(), () => this.vc.session(), this.io, IO_PUBLISH_MS, (err) => log.debug({ err: err.message }, 'I/O rates not published'));
  }

  /** The provider the front ends serve from: every device measured. */
  measured(inner: DeviceProvider): MeasuredProvider {
    return new MeasuredProvider(inner, this.io);
  }

  /** A front end's own counters, read at every scrape. */
  addSamples(f: () => MetricSample[]): void {
    this.sources.push(f);
  }

  async close(): Promise<void> {
    await this.stopPublishing?.().catch(() => undefined);
    await this.http?.close();
    await this.vc.close();
  }
}

function distributorSamples(vc: VolumeClient): MetricSample[] {
  const d = vc.block.distributor.stats;
  const m = vc.block.distributor.memory();
  return [
    gauge('torus_client_read_cache_bytes', 'Bytes in the block cache (read and written blocks, shared by every volume of the process)', m.readCache),
    gauge('torus_client_read_cache_limit_bytes', 'The block cache budget (--read-cache-size)', m.readCacheLimit),
    gauge('torus_client_unflushed_bytes', 'Copies of blocks put but not yet flushed, kept to send again', m.unflushed),
    gauge('torus_client_unflushed_limit_bytes', 'Unflushed bytes past which a put flushes first', m.unflushedLimit),
    c('torus_client_block_reads_total', 'Blocks (or ranges) read from storage nodes', d.reads),
    c('torus_client_block_read_bytes_total', 'Bytes read from storage nodes', d.readBytes),
    c('torus_client_block_writes_total', 'Blocks written to storage nodes (each to R replicas)', d.writes),
    c('torus_client_block_written_bytes_total', 'Bytes written to storage nodes (once per block, not per replica)', d.writeBytes),
    c('torus_client_cache_hits_total', 'Reads answered from the read cache (shared by every volume of the process)', d.cacheHits),
    c('torus_client_cache_bypasses_total', 'Reads of sequential streams fetched without being kept in the read cache', d.cacheBypasses),
    c('torus_client_checksum_failures_total', 'Replica copies that failed their checksum', d.checksumFailures),
    c('torus_client_replica_fallbacks_total', 'Reads that needed another replica', d.replicaFallbacks),
    c('torus_client_spills_total', 'Writes that went to the next peer because an owner failed', d.spills),
    c('torus_client_failed_writes_total', 'Block writes that failed', d.failedWrites),
    c('torus_client_failed_reads_total', 'Block reads that failed on every replica', d.failedReads),
    c('torus_client_flushes_total', 'Flushes sent to storage nodes', d.flushes),
  ];
}

function gauge(name: string, help: string, value: number, labels?: Record<string, string>): MetricSample {
  return { name, help, type: 'gauge', value, ...(labels ? { labels } : {}) };
}

/** Resolves on SIGINT or SIGTERM. */
export function untilSignal(): Promise<string> {
  return new Promise((resolve) => {
    const on = (sig: string): void => {
      process.off('SIGINT', onInt);
      process.off('SIGTERM', onTerm);
      resolve(sig);
    };
    const onInt = (): void => on('SIGINT');
    const onTerm = (): void => on('SIGTERM');
    process.on('SIGINT', onInt);
    process.on('SIGTERM', onTerm);
  });
}
