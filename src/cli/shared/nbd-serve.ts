import { Option, type Command } from 'commander';
import { TorusError } from '../../core/errors.js';
import type { DeviceProvider, MetadataService } from '../../core/interfaces.js';
import { parseDuration, parseSize } from '../../core/units.js';
import { labelledCounters, type MetricSample } from '../../http/metrics.js';
import { AccessRules } from '../../metadata/access.js';
import { DEFAULT_MAX_PAYLOAD } from '../../nbd/codec.js';
import { NBD_SERVER_DEFAULTS, NbdServer, type NbdServerOptions, type NbdServerStats, type NbdTlsOptions } from '../../nbd/server.js';
import { readCertDir, readPskFile } from './certs.js';
import { parseCount, tlsCertificatesDir, type GlobalOpts } from './config.js';

// Serving volumes over NBD, one assembly for both programs that do it: `torusblk nbdserve` (flags
// as they are: --max-connections) and `torusd --nbd-listen` (the same flags with an nbd- prefix,
// beside the node's --peer-* and --http-* ones). Flags, checks, TLS and access rules, limits,
// metrics: written once, so the two cannot drift apart.

/** '' for torusblk nbdserve, 'nbd-' for torusd. */
export type NbdFlagPrefix = '' | 'nbd-';

export interface NbdServeFlags {
  readonly readOnly: boolean;
  readonly writeCacheSize: string;
  readonly maxConnections: string;
  readonly maxBuffered: string;
  readonly stallTimeout: string;
  readonly idleTimeout: string;
  readonly tls: 'off' | 'on' | 'require';
  readonly tlsPskFile?: string;
  readonly access?: 'rules' | 'open';
}

/**
 * A storage node that serves NBD (torusd --nbd-listen) holds its store's memory beside the
 * volumes': it takes half a client's write cache by default. Measured (docs/performance.md,
 * twelfth round): P1 alternated four times, 64 MiB wrote as fast as 128 MiB (95 and 90 MiB/s against
 * 98 and 77) with 110 MiB less at the peak.
 */
const STORAGE_NODE_WRITE_CACHE = '64MiB';

/** The flags every NBD server takes (not where it listens: each program says that its own way). */
export function addNbdServeOptions(cmd: Command, prefix: NbdFlagPrefix): Command {
  const f = (name: string): string => `--${prefix}${name}`;
  return cmd
    .option(f('read-only'), 'serve every export read-only')
    .addOption(new Option(`${f('write-cache-size')} <size>`, 'dirty data per volume before a write forces a sync').default(prefix === 'nbd-' ? STORAGE_NODE_WRITE_CACHE : '128MiB'))
    .addOption(new Option(`${f('max-connections')} <n>`, 'NBD connections each listener accepts at once; more are closed on arrival').default(String(NBD_SERVER_DEFAULTS.maxConnections)))
    .addOption(
      new Option(`${f('max-buffered')} <size>`, 'NBD request and reply bytes held for all clients together; past it each connection still gets a fair share').default(
        `${NBD_SERVER_DEFAULTS.maxBufferedBytes / (1024 * 1024)}MiB`,
      ),
    )
    .addOption(new Option(`${f('stall-timeout')} <duration>`, 'drop an NBD client that leaves a request half-sent, or its replies unread, this long (0: never)').default(`${NBD_SERVER_DEFAULTS.stallTimeoutMs / 1000}s`))
    .addOption(
      new Option(`${f('idle-timeout')} <duration>`, 'close an NBD connection with no request for this long (0: never; kernel NBD keeps an idle connection as long as the device is attached)').default(
        String(NBD_SERVER_DEFAULTS.idleTimeoutMs),
      ),
    )
    .addOption(
      new Option(`${f('tls')} <mode>`, `NBD over TLS (STARTTLS) with --tls-certificates DIR or ${f('tls-psk-file')}: on lets clients choose, require refuses every client that does not`)
        .choices(['off', 'on', 'require'])
        .default('off'),
    )
    .option(`${f('tls-psk-file')} <file>`, 'pre-shared keys for NBD TLS-PSK, identity:hexkey a line (psktool)')
    .addOption(
      new Option(`${f('access')} <policy>`, 'rules: an NBD client opens only volumes torusctl access grants its identity; open: any client any volume (default: rules with TLS, open without)').choices([
        'rules',
        'open',
      ]),
    );
}

function camel(flag: string): string {
  return flag.replace(/-([a-z])/g, (_m, c: string) => c.toUpperCase());
}

/** The values of addNbdServeOptions' flags, from commander's options object. */
export function nbdServeFlags(opts: object, prefix: NbdFlagPrefix): NbdServeFlags {
  const o = opts as Record<string, unknown>;
  const get = <T>(name: string): T => o[camel(prefix + name)] as T;
  const tlsPskFile = get<string | undefined>('tls-psk-file');
  const access = get<'rules' | 'open' | undefined>('access');
  return {
    readOnly: get<boolean | undefined>('read-only') ?? false,
    writeCacheSize: get('write-cache-size'),
    maxConnections: get('max-connections'),
    maxBuffered: get('max-buffered'),
    stallTimeout: get('stall-timeout'),
    idleTimeout: get('idle-timeout'),
    tls: get('tls'),
    ...(tlsPskFile !== undefined ? { tlsPskFile } : {}),
    ...(access !== undefined ? { access } : {}),
  };
}

/** The server's limits, each checked before anything starts. */
function serverLimits(f: NbdServeFlags, prefix: NbdFlagPrefix): Partial<NbdServerOptions> {
  const maxBufferedBytes = parseSize(f.maxBuffered);
  // One request of the largest size must fit, or a client sending one would wait forever.
  if (maxBufferedBytes < DEFAULT_MAX_PAYLOAD) throw new TorusError('INVALID_ARGUMENT', `invalid --${prefix}max-buffered "${f.maxBuffered}": at least 32MiB, the largest request`);
  return {
    maxConnections: parseCount(f.maxConnections, `--${prefix}max-connections`),
    maxBufferedBytes,
    stallTimeoutMs: parseDuration(f.stallTimeout),
    idleTimeoutMs: parseDuration(f.idleTimeout),
  };
}

/**
 * NBD TLS and access: certificates from --tls-certificates (the same directory as peer RPC:
 * server-cert.pem, server-key.pem, and ca-cert.pem that client certificates must chain to),
 * pre-shared keys from the PSK file; access rules from etcd (torusctl access) whenever TLS is
 * on, unless the access policy says open.
 */
function nbdSecurity(f: NbdServeFlags, prefix: NbdFlagPrefix, global: GlobalOpts, meta: MetadataService): Partial<NbdServerOptions> {
  let tls: NbdTlsOptions | undefined;
  if (f.tls !== 'off') {
    const dir = tlsCertificatesDir(global);
    const psk = f.tlsPskFile !== undefined ? readPskFile(f.tlsPskFile) : undefined;
    if (dir === undefined && !psk) throw new TorusError('INVALID_ARGUMENT', `--${prefix}tls ${f.tls} needs --tls-certificates DIR (torusctl cert issue) or --${prefix}tls-psk-file FILE`);
    const certs = dir !== undefined ? readCertDir(dir) : undefined;
    tls = { mode: f.tls, ...(certs ? { cert: certs.serverCert, key: certs.serverKey, ca: certs.ca } : {}), ...(psk ? { psk } : {}) };
  } else if (f.tlsPskFile !== undefined) throw new TorusError('INVALID_ARGUMENT', `--${prefix}tls-psk-file needs --${prefix}tls on or --${prefix}tls require`);
  const access = f.access ?? (tls ? 'rules' : 'open');
  const rules = new AccessRules(meta.kv());
  return {
    ...(tls ? { tls } : {}),
    ...(access === 'rules' ? { access: (identity: string | null, name: string) => rules.check(identity, name.split('@')[0]!) } : {}),
  };
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\./.test(host);
}

export interface NbdLog {
  debug(o: object, m: string): void;
  info(o: object, m: string): void;
  warn(o: object, m: string): void;
}

/**
 * Everything about the server that the flags decide, checked before the program starts anything:
 * a bad flag is one line and exit status 2, with nothing half started.
 */
export function nbdServerOptions(
  f: NbdServeFlags,
  prefix: NbdFlagPrefix,
  where: { listenTcp?: { host: string; port: number }; listenUnix?: string },
  global: GlobalOpts,
  meta: MetadataService,
  log: NbdLog,
): NbdServerOptions {
  const limits = serverLimits(f, prefix);
  const security = nbdSecurity(f, prefix, global, meta);
  if (!security.tls && where.listenTcp && !isLoopback(where.listenTcp.host))
    log.warn(
      { listen: `${where.listenTcp.host}:${where.listenTcp.port}` },
      `serving NBD beyond loopback without TLS: anyone who reaches this address can read and write the volumes (use --${prefix}tls require, docs/security.md)`,
    );
  return { ...where, readOnly: f.readOnly, ...limits, ...security, log: { debug: (o, m) => log.debug(o, m), info: (o, m) => log.info(o, m), warn: (o, m) => log.warn(o, m) } };
}

/**
 * Starts the server; the URLs it serves on, as users type them (nbd:// or nbds://, nbd+unix://).
 * `flag`: the flag that named the address, for the message when it cannot be had.
 */
export async function listenNbd(provider: DeviceProvider, options: NbdServerOptions, flag: string): Promise<{ server: NbdServer; tcp: string; unix: string }> {
  const server = new NbdServer(provider, options);
  let addrs;
  try {
    addrs = await server.listen();
  } catch (err) {
    await server.close().catch(() => undefined);
    throw new TorusError('INVALID_ARGUMENT', `${(err as Error).message} (${flag})`);
  }
  const tcp = addrs.tcp ? `${options.tls ? 'nbds' : 'nbd'}://${addrs.tcp.host.includes(':') ? `[${addrs.tcp.host}]` : addrs.tcp.host}:${addrs.tcp.port}` : '';
  const unix = addrs.unix ? `nbd+unix:///?socket=${addrs.unix}` : '';
  return { server, tcp, unix };
}

/** The server's counters for /metrics; `prefix` as the flags have it, to name them in the help. */
export function nbdSamples(st: NbdServerStats, prefix: NbdFlagPrefix): MetricSample[] {
  return [
    { name: 'torus_nbd_connections', help: 'Open NBD connections', type: 'gauge', value: st.connections },
    { name: 'torus_nbd_in_flight', help: 'NBD requests being served', type: 'gauge', value: st.inFlight },
    { name: 'torus_nbd_handshakes_total', help: 'NBD handshakes completed', type: 'counter', value: st.handshakes },
    { name: 'torus_nbd_requests_total', help: 'NBD requests received', type: 'counter', value: st.requests },
    { name: 'torus_nbd_protocol_errors_total', help: 'NBD connections dropped for protocol errors', type: 'counter', value: st.protocolErrors },
    { name: 'torus_nbd_buffered_bytes', help: 'NBD requests, payloads and replies held in memory, for all connections', type: 'gauge', value: st.bufferedBytes },
    { name: 'torus_nbd_reply_buffers_idle_bytes', help: 'NBD reply buffers kept for reuse, not held by any reply (at most 8 MiB)', type: 'gauge', value: st.replyBuffersIdleBytes },
    { name: 'torus_nbd_buffered_limit_bytes', help: `The budget of NBD requests, payloads and replies held for all connections (--${prefix}max-buffered)`, type: 'gauge', value: st.bufferedLimit },
    { name: 'torus_nbd_refused_connections_total', help: `NBD connections closed on arrival (--${prefix}max-connections)`, type: 'counter', value: st.refusedConnections },
    { name: 'torus_nbd_oversized_requests_total', help: 'NBD requests refused for a length over the 32 MiB maximum', type: 'counter', value: st.oversizedRequests },
    { name: 'torus_nbd_stall_timeouts_total', help: `NBD clients dropped for a payload left half-sent or replies left unread (--${prefix}stall-timeout)`, type: 'counter', value: st.stallTimeouts },
    { name: 'torus_nbd_idle_timeouts_total', help: `Idle NBD connections closed (--${prefix}idle-timeout)`, type: 'counter', value: st.idleTimeouts },
    ...labelledCounters('torus_nbd_throttled_total', `Times an NBD connection stopped being read, by the limit that stopped it (budget: --${prefix}max-buffered)`, 'limit', st.throttled),
  ];
}
