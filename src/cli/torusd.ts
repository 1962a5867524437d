import { Command, Option } from 'commander';
import { startMemoryReturner, tuneMalloc } from '../core/malloc.js';
import { TorusError } from '../core/errors.js';
import { VERSION } from '../core/version.js';
import { HTTP_DEFAULTS } from '../http/server.js';
import { DEFAULT_MAX_FRAME_SIZE } from '../rpc/codec.js';
import { SERVER_DEFAULTS } from '../rpc/server.js';
import { DEFAULT_COMPACTION, StorageNode } from '../server/node.js';
import { parseDuration, parseSize } from '../core/units.js';
import type { ReadLevel, WriteLevel } from '../distributor/distributor.js';
import { existsSync, readFileSync } from 'node:fs';
import { readCertDir, tooOpen } from './shared/certs.js';
import { addBlockIoOptions, addGlobalOptions, connectMetadata, parseCount, parsePort, peerSecurity, resolveConnection, tlsCertificatesDir, type BlockIoOpts, type GlobalOpts } from './shared/config.js';
import { EXIT_STATUSES, reportError, runProgram } from './shared/run.js';
import { docsCommands } from './shared/docs-gen.js';
import { addLogOptions, makeLogger } from './shared/log.js';
import { addNbdServeOptions, listenNbd, nbdSamples, nbdServeFlags, nbdServerOptions, type NbdLog } from './shared/nbd-serve.js';
import { addVolumeClientOptions, ClientRuntime, lockTtl, parseHostPort, peerTimeoutMs, type VolumeClientOpts } from './torusblk/common.js';
import type { Logger } from 'pino';
import type { MetadataService } from '../core/interfaces.js';
import type { NbdServerOptions } from '../nbd/server.js';
import { VolumeClient } from '../volume/client.js';
import { VolumeProvider, type VolumeBudgets } from '../volume/provider.js';
import { volumeBudgets, volumeMemoryOptions, volumeMemorySamples } from './shared/volume-memory.js';

interface TorusdOpts extends GlobalOpts, BlockIoOpts, VolumeClientOpts {
  dataDir: string;
  size: string;
  peerAddress?: string;
  host?: string;
  port?: string;
  autoJoin?: boolean;
  heartbeat: string;
  gcInterval: string;
  scrubInterval: string;
  scrubRate: string;
  orphanGrace: string;
  rebalanceRate: string;
  rebalanceInterval: string;
  rebalanceMemory: string;
  compactionRetention: string;
  compactionMaxRevisions: string;
  compactionInterval: string;
  logLevel?: string;
  logFormat?: string;
  peerMaxConnections: string;
  peerMaxBuffered: string;
  peerStallTimeout: string;
  peerIdleTimeout: string;
  httpMaxConnections: string;
  httpTls?: boolean;
  httpTokenFile?: string;
  nbdListen?: string;
  nbdUnix?: string;
  nbdWriteCacheSize: string;
  nbdJournalTailSize: string;
  nbdOverlaySegments: string;
  nbdPageCacheSize: string;
}

/** --http-tls and --http-token-file: the certificate from --tls-certificates, the token from its file (never from argv). */
function httpSecurityFrom(opts: TorusdOpts, warn: (m: string) => void): { tls?: { cert: Buffer; key: Buffer }; bearerToken?: string } {
  let tls: { cert: Buffer; key: Buffer } | undefined;
  if (opts.httpTls) {
    const dir = tlsCertificatesDir(opts);
    if (dir === undefined) throw new TorusError('INVALID_ARGUMENT', '--http-tls needs --tls-certificates DIR (its server-cert.pem and server-key.pem)');
    const c = readCertDir(dir);
    tls = { cert: c.serverCert, key: c.serverKey };
  }
  let bearerToken: string | undefined;
  if (opts.httpTokenFile !== undefined) {
    if (!existsSync(opts.httpTokenFile)) throw new TorusError('INVALID_ARGUMENT', `--http-token-file ${opts.httpTokenFile}: no such file`);
    bearerToken = readFileSync(opts.httpTokenFile, 'utf8').trim();
    if (bearerToken.length < 16 || /\s/.test(bearerToken)) throw new TorusError('INVALID_ARGUMENT', `--http-token-file ${opts.httpTokenFile}: the token must be one word of at least 16 characters`);
    const open = tooOpen(opts.httpTokenFile);
    if (open) warn(open);
  }
  return { ...(tls ? { tls } : {}), ...(bearerToken !== undefined ? { bearerToken } : {}) };
}

function parseRate(text: string, flag: string): number {
  const rate = parseSize(text);
  if (rate <= 0) throw new TorusError('INVALID_ARGUMENT', `invalid ${flag} ${text}: must be above 0 (or auto)`);
  return rate;
}

/** --nbd-listen / --nbd-unix and the flags that go with them, checked before the node starts; undefined when it serves no NBD. */
function nbdOptionsFrom(opts: TorusdOpts, meta: MetadataService, log: NbdLog): NbdServerOptions | undefined {
  lockTtl(opts); // checked with the rest, though only exports use it
  if (opts.nbdListen === undefined && opts.nbdUnix === undefined) return undefined;
  const flags = nbdServeFlags(opts, 'nbd-');
  exportBudgets(opts);
  const listenTcp = opts.nbdListen !== undefined ? parseHostPort(opts.nbdListen, '--nbd-listen') : undefined;
  return nbdServerOptions(flags, 'nbd-', { ...(listenTcp ? { listenTcp } : {}), ...(opts.nbdUnix !== undefined ? { listenUnix: opts.nbdUnix } : {}) }, opts, meta, log);
}

function exportBudgets(opts: TorusdOpts): VolumeBudgets {
  return volumeBudgets(
    { writeCacheSize: opts.nbdWriteCacheSize, journalTailSize: opts.nbdJournalTailSize, pageCacheSize: opts.nbdPageCacheSize, overlaySegments: opts.nbdOverlaySegments },
    'nbd-',
  );
}

interface NodeExports {
  close(): Promise<void>;
}

/**
 * The node serves the cluster's volumes over NBD, through its own block client: this node's
 * replicas are read and written on its disk directly, the others' over peer RPC, and a flush
 * is acknowledged once R replicas (this one among them) have it on stable storage, as from any
 * client. If this process dies, so do the exports; the data stays on the other replicas.
 */
async function serveExports(node: StorageNode, meta: MetadataService, nbd: NbdServerOptions, opts: TorusdOpts, log: Logger): Promise<NodeExports> {
  const flags = nbdServeFlags(opts, 'nbd-');
  const vc = VolumeClient.over(meta, node.blockClient, lockTtl(opts));
  const rt = ClientRuntime.over(meta, vc, node.metrics, (f) => node.addSamples(f), log);
  const volumes = new VolumeProvider(vc, {
    readOnly: flags.readOnly,
    ...exportBudgets(opts),
  });
  let served;
  try {
    served = await listenNbd(rt.measured(volumes), nbd, opts.nbdListen !== undefined ? '--nbd-listen' : '--nbd-unix');
  } catch (err) {
    await rt.close();
    throw err;
  }
  const { server, tcp, unix } = served;
  rt.addSamples(() => [...nbdSamples(server.stats(), 'nbd-'), ...volumeMemorySamples(volumes, 'nbd-')]);
  log.info({ ...(tcp ? { nbd: tcp } : {}), ...(unix ? { nbdUnix: unix } : {}) }, `serving NBD on ${[tcp, unix].filter(Boolean).join(' and ')}; exports are volume names (VOLUME@SNAPSHOT read-only)`);
  return {
    async close() {
      log.info('stopping NBD: finishing requests and syncing volumes');
      await server.close();
      await volumes.closeAll();
      await rt.close();
    },
  };
}

export function buildProgram(): Command {
  const program = new Command('torusd')
    .description('Torus storage node: pools this disk into the cluster and serves its blocks to peers')
    .version(`torusd\nVersion: ${VERSION}`, '--version')
    .option('--data-dir <dir>', 'where this node keeps its identity and blocks', 'torus-data')
    .option('--size <size>', 'storage to offer: bytes (20GiB) or a share of the filesystem (50%)', '1GiB')
    .option('--peer-address <url>', 'address peers reach this node on, e.g. http://10.0.0.5:40000 (required)')
    .option('--host <host>', 'serve HTTP (/metrics, /healthz) on this host')
    .option('--port <port>', 'HTTP port (with --host)', '4321')
    .option('--auto-join', 'add this node to the ring at start')
    .addOption(new Option('--heartbeat <duration>', 'how often to report to etcd').default('5s'))
    .addOption(new Option('--rebalance-rate <size>', 'bytes per second a node may send while rebalancing (0: unlimited)').default('100MiB'))
    .addOption(new Option('--rebalance-interval <duration>', 'pause between rebalance passes when nothing moved (at least 19x the last pass, not counting failed calls, so walking takes at most 5% of the time)').default('10s'))
    .addOption(new Option('--rebalance-memory <size>', 'blocks the rebalancer holds in flight at once: read here, not yet acknowledged by their receiver').default('64MiB'))
    .addOption(new Option('--gc-interval <duration>', 'how often to delete blocks no volume can reach any more (0: never)').default('30s'))
    .addOption(new Option('--scrub-interval <duration>', 'read and check every block held once per interval, repairing bad copies from other replicas (0: never)').default('168h'))
    .addOption(new Option('--scrub-rate <size>', "scrub read rate per second; auto: the interval's share of the data held, 1MiB to 64MiB").default('auto'))
    .addOption(new Option('--orphan-grace <duration>', 'delete blocks of unknown types or never-created volumes once orphaned this long (0: report only)').default('168h'))
    .addOption(new Option('--compaction-retention <duration>', 'etcd history to keep; one node at a time compacts the rest (0: this node never compacts)').default('5m'))
    .addOption(new Option('--compaction-max-revisions <n>', 'keep at most this many etcd revisions, however recent').default(String(DEFAULT_COMPACTION.maxRevisions)))
    .addOption(new Option('--compaction-interval <duration>', 'how often the compacting node looks at etcd').default('10s'))
    .addOption(new Option('--peer-max-connections <n>', 'peer RPC connections accepted at once; more are closed on arrival').default(String(SERVER_DEFAULTS.maxConnections)))
    .addOption(
      new Option('--peer-max-buffered <size>', 'peer RPC frames and replies held for all connections together; past it each connection still gets a fair share').default(
        `${SERVER_DEFAULTS.maxBufferedBytes / (1024 * 1024)}MiB`,
      ),
    )
    .addOption(new Option('--peer-stall-timeout <duration>', 'drop a peer that leaves a frame half-sent, or its replies unread, this long (0: never)').default(`${SERVER_DEFAULTS.stallTimeoutMs / 1000}s`))
    .addOption(new Option('--peer-idle-timeout <duration>', 'close a peer connection with nothing sent or in flight this long (0: never; peers reconnect on demand)').default(`${SERVER_DEFAULTS.idleTimeoutMs / 1000}s`))
    .option('--http-tls', "serve HTTP over TLS with the node's server certificate from --tls-certificates")
    .option('--http-token-file <file>', '/v1/* only for requests bearing the token in FILE (Authorization: Bearer); /metrics and /healthz stay open')
    .addOption(new Option('--http-max-connections <n>', 'HTTP connections accepted at once; more are closed on arrival').default(String(HTTP_DEFAULTS.maxConnections)))
    .option('--nbd-listen <host:port>', "serve the cluster's volumes over NBD here, as torusblk nbdserve does, reading this node's own replicas without a network hop (off by default)")
    .option('--nbd-unix <path>', 'serve them over NBD on this unix socket too (or only)');
  volumeMemoryOptions(addNbdServeOptions(program, 'nbd-'), 'nbd-');
  addVolumeClientOptions(program, 'node');
  program
    .showHelpAfterError('(run torusd --help for usage)')
    .action(async (opts: TorusdOpts) => {
      // Without it the node registers no address: peers cannot reach it and it can never join.
      if (!opts.peerAddress)
        throw new TorusError('INVALID_ARGUMENT', '--peer-address is required: the address peers reach this node on, e.g. --peer-address http://10.0.0.5:40000');
      const log = makeLogger('torusd', opts);
      const peerSec = await peerSecurity(opts, true, (m) => log.warn(m));
      if (peerSec.security.mode === 'insecure') log.warn('peer RPC is plaintext with no authentication (--insecure-peer-network): anyone who reaches the peer port can read and overwrite every block');
      const conn = resolveConnection(opts);
      const meta = connectMetadata(opts, log);
      const heartbeatMs = parseDuration(opts.heartbeat);
      const peerLimits = {
        maxConnections: parseCount(opts.peerMaxConnections, '--peer-max-connections'),
        maxBufferedBytes: parseSize(opts.peerMaxBuffered),
        stallTimeoutMs: parseDuration(opts.peerStallTimeout),
        idleTimeoutMs: parseDuration(opts.peerIdleTimeout),
      };
      // The largest frame must fit, or a peer sending one would wait forever.
      if (peerLimits.maxBufferedBytes < DEFAULT_MAX_FRAME_SIZE)
        throw new TorusError('INVALID_ARGUMENT', `invalid --peer-max-buffered "${opts.peerMaxBuffered}": at least 17MiB, the largest frame`);
      const rebalanceMemory = parseSize(opts.rebalanceMemory);
      if (rebalanceMemory <= 0) throw new TorusError('INVALID_ARGUMENT', `invalid --rebalance-memory "${opts.rebalanceMemory}": must be above 0`);
      const httpLimits = { maxConnections: parseCount(opts.httpMaxConnections, '--http-max-connections') };
      const httpSecurity = httpSecurityFrom(opts, (m) => log.warn(m));
      let nbd: NbdServerOptions | undefined;
      let node: StorageNode;
      try {
        nbd = nbdOptionsFrom(opts, meta, log);
        node = await StorageNode.start({
          meta,
          etcdDesc: conn.endpoints.join(','),
          dataDir: opts.dataDir,
          size: opts.size,
          peerSecurity: peerSec.security,
          ...(peerSec.uuid !== undefined ? { certUuid: peerSec.uuid } : {}),
          ...(opts.peerAddress !== undefined ? { peerAddress: opts.peerAddress } : {}),
          ...(opts.host !== undefined ? { httpHost: opts.host, httpPort: parsePort(opts.port ?? '4321', '--port') } : {}),
          autoJoin: opts.autoJoin ?? false,
          heartbeatMs,
          gcIntervalMs: parseDuration(opts.gcInterval),
          scrubIntervalMs: parseDuration(opts.scrubInterval),
          ...(opts.scrubRate === 'auto' ? {} : { scrubRate: parseRate(opts.scrubRate, '--scrub-rate') }),
          orphanGraceMs: parseDuration(opts.orphanGrace),
          rebalanceRate: parseSize(opts.rebalanceRate),
          rebalanceIntervalMs: parseDuration(opts.rebalanceInterval),
          rebalanceMemory,
          readCacheBytes: parseSize(opts.readCacheSize),
          readLevel: opts.readLevel as ReadLevel,
          writeLevel: opts.writeLevel as WriteLevel,
          compaction: {
            retentionMs: parseDuration(opts.compactionRetention),
            maxRevisions: parseCount(opts.compactionMaxRevisions, '--compaction-max-revisions'),
            intervalMs: Math.max(100, parseDuration(opts.compactionInterval)),
          },
          peerLimits,
          ...(peerTimeoutMs(opts) !== undefined ? { peerTimeoutMs: peerTimeoutMs(opts)! } : {}),
          httpLimits,
          httpSecurity,
          log,
        });
      } catch (err) {
        await meta.close();
        throw err;
      }
      let exports: NodeExports | undefined;
      if (nbd) {
        try {
          exports = await serveExports(node, meta, nbd, opts, log);
        } catch (err) {
          await node.stop().catch(() => undefined);
          await meta.close();
          throw err;
        }
      }
      await new Promise<void>((resolve) => {
        const shutdown = (sig: string): void => {
          log.info({ signal: sig }, 'stopping');
          process.off('SIGINT', onInt);
          process.off('SIGTERM', onTerm);
          // The exports first: their volumes sync through this node and its peers.
          void (exports?.close() ?? Promise.resolve())
            .then(() => node.stop())
            .catch((err: unknown) => {
              process.exitCode = reportError('torusd', err, opts.debug ?? false);
            })
            .finally(() => void meta.close().finally(resolve));
        };
        const onInt = (): void => shutdown('SIGINT');
        const onTerm = (): void => shutdown('SIGTERM');
        process.on('SIGINT', onInt);
        process.on('SIGTERM', onTerm);
      });
      log.info('stopped');
    });
  addGlobalOptions(addBlockIoOptions(addLogOptions(program)));
  for (const c of docsCommands('torusd', buildProgram, VERSION, EXIT_STATUSES)) program.addCommand(c);
  return program;
}

export function main(argv: string[]): void {
  tuneMalloc();
  startMemoryReturner();
  void runProgram('torusd', buildProgram(), argv).then(() => {
    // grpc keeps handles open for a while after close; a stopped daemon should exit now.
    process.exit(process.exitCode ?? 0);
  });
}
