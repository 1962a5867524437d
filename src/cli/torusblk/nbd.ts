import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command, Option } from 'commander';
import { TorusError } from '../../core/errors.js';
import { parseDuration, parseSize } from '../../core/units.js';
import { labelledCounters, type MetricSample } from '../../http/metrics.js';
import { DEFAULT_MAX_PAYLOAD } from '../../nbd/codec.js';
import { NBD_SERVER_DEFAULTS, NbdServer, type NbdServerOptions, type NbdServerStats, type NbdTlsOptions } from '../../nbd/server.js';
import type { MetadataService } from '../../core/interfaces.js';
import { AccessRules } from '../../metadata/access.js';
import { readCertDir, readPskFile } from '../shared/certs.js';
import { VolumeProvider } from '../../volume/provider.js';
import { connectMetadata, parseCount, tlsCertificatesDir } from '../shared/config.js';
import { emit, outputOptions } from '../shared/output.js';
import { ClientRuntime, logger, parseHostPort, untilSignal, type ClientOpts } from './common.js';
import { attachFuse, attachKernel, detachKernel, deviceBusy, freeNbdDevice, kernelHasNbd, type Attachment } from './attach.js';

interface ServeOpts extends ClientOpts {
  listen?: string;
  unix?: string;
  readOnly?: boolean;
  writeCacheSize: string;
  json?: boolean;
  maxConnections: string;
  maxBuffered: string;
  stallTimeout: string;
  idleTimeout: string;
  tls: 'off' | 'on' | 'require';
  tlsPskFile?: string;
  access?: 'rules' | 'open';
}

/**
 * NBD TLS and access from nbdserve's flags: certificates from --tls-certificates (the same
 * directory as peer RPC: server-cert.pem, server-key.pem, and ca-cert.pem that client
 * certificates must chain to), pre-shared keys from --tls-psk-file; access rules from etcd
 * (torusctl access) whenever TLS is on, unless --access open.
 */
function nbdSecurity(opts: ServeOpts, meta: MetadataService): Partial<NbdServerOptions> {
  let tls: NbdTlsOptions | undefined;
  if (opts.tls !== 'off') {
    const dir = tlsCertificatesDir(opts);
    const psk = opts.tlsPskFile !== undefined ? readPskFile(opts.tlsPskFile) : undefined;
    if (dir === undefined && !psk) throw new TorusError('INVALID_ARGUMENT', `--tls ${opts.tls} needs --tls-certificates DIR (torusctl cert issue) or --tls-psk-file FILE`);
    const certs = dir !== undefined ? readCertDir(dir) : undefined;
    tls = { mode: opts.tls, ...(certs ? { cert: certs.serverCert, key: certs.serverKey, ca: certs.ca } : {}), ...(psk ? { psk } : {}) };
  } else if (opts.tlsPskFile !== undefined) throw new TorusError('INVALID_ARGUMENT', '--tls-psk-file needs --tls on or --tls require');
  const access = opts.access ?? (tls ? 'rules' : 'open');
  const rules = new AccessRules(meta.kv());
  return {
    ...(tls ? { tls } : {}),
    ...(access === 'rules' ? { access: (identity: string | null, name: string) => rules.check(identity, name.split('@')[0]!) } : {}),
  };
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\./.test(host);
}

/** The server's limits from nbdserve's flags, each checked before anything starts. */
function serverLimits(opts: ServeOpts): Partial<NbdServerOptions> {
  const maxBufferedBytes = parseSize(opts.maxBuffered);
  // One request of the largest size must fit, or a client sending one would wait forever.
  if (maxBufferedBytes < DEFAULT_MAX_PAYLOAD) throw new TorusError('INVALID_ARGUMENT', `invalid --max-buffered "${opts.maxBuffered}": at least 32MiB, the largest request`);
  return {
    maxConnections: parseCount(opts.maxConnections, '--max-connections'),
    maxBufferedBytes,
    stallTimeoutMs: parseDuration(opts.stallTimeout),
    idleTimeoutMs: parseDuration(opts.idleTimeout),
  };
}

export function nbdSamples(st: NbdServerStats): MetricSample[] {
  return [
    { name: 'torus_nbd_connections', help: 'Open NBD connections', type: 'gauge', value: st.connections },
    { name: 'torus_nbd_in_flight', help: 'NBD requests being served', type: 'gauge', value: st.inFlight },
    { name: 'torus_nbd_handshakes_total', help: 'NBD handshakes completed', type: 'counter', value: st.handshakes },
    { name: 'torus_nbd_requests_total', help: 'NBD requests received', type: 'counter', value: st.requests },
    { name: 'torus_nbd_protocol_errors_total', help: 'NBD connections dropped for protocol errors', type: 'counter', value: st.protocolErrors },
    { name: 'torus_nbd_buffered_bytes', help: 'NBD requests, payloads and replies held in memory, for all connections', type: 'gauge', value: st.bufferedBytes },
    { name: 'torus_nbd_refused_connections_total', help: 'NBD connections closed on arrival (--max-connections)', type: 'counter', value: st.refusedConnections },
    { name: 'torus_nbd_oversized_requests_total', help: 'NBD requests refused for a length over the 32 MiB maximum', type: 'counter', value: st.oversizedRequests },
    { name: 'torus_nbd_stall_timeouts_total', help: 'NBD clients dropped for a payload left half-sent or replies left unread (--stall-timeout)', type: 'counter', value: st.stallTimeouts },
    { name: 'torus_nbd_idle_timeouts_total', help: 'Idle NBD connections closed (--idle-timeout)', type: 'counter', value: st.idleTimeouts },
    ...labelledCounters('torus_nbd_throttled_total', 'Times an NBD connection stopped being read, by the limit that stopped it (budget: --max-buffered)', 'limit', st.throttled),
  ];
}

export function nbdserveCommand(): Command {
  return outputOptions(new Command('nbdserve'))
    .description('serve every volume over NBD by export name (VOLUME, or VOLUME@SNAPSHOT read-only)')
    .option('-l, --listen <host:port>', 'TCP address to listen on; anything but loopback must be asked for', '127.0.0.1:10809')
    .option('--unix <path>', 'also listen on a unix socket')
    .option('--read-only', 'serve every export read-only')
    .addOption(new Option('--write-cache-size <size>', 'dirty data per volume before a write forces a sync').default('128MiB'))
    .addOption(new Option('--max-connections <n>', 'connections each listener accepts at once; more are closed on arrival').default(String(NBD_SERVER_DEFAULTS.maxConnections)))
    .addOption(
      new Option('--max-buffered <size>', 'request and reply bytes held for all clients together; past it each connection still gets a fair share').default(
        `${NBD_SERVER_DEFAULTS.maxBufferedBytes / (1024 * 1024)}MiB`,
      ),
    )
    .addOption(new Option('--stall-timeout <duration>', 'drop a client that leaves a request half-sent, or its replies unread, this long (0: never)').default(`${NBD_SERVER_DEFAULTS.stallTimeoutMs / 1000}s`))
    .addOption(
      new Option('--idle-timeout <duration>', 'close a connection with no request for this long (0: never; kernel NBD keeps an idle connection as long as the device is attached)').default(
        String(NBD_SERVER_DEFAULTS.idleTimeoutMs),
      ),
    )
    .addOption(new Option('--tls <mode>', 'NBD over TLS (STARTTLS) with --tls-certificates DIR or --tls-psk-file: on lets clients choose, require refuses every client that does not').choices(['off', 'on', 'require']).default('off'))
    .option('--tls-psk-file <file>', 'pre-shared keys for TLS-PSK, identity:hexkey a line (psktool)')
    .addOption(new Option('--access <policy>', 'rules: a client opens only volumes torusctl access grants its identity; open: any client any volume (default: rules with TLS, open without)').choices(['rules', 'open']))
    .action(async (_o: unknown, c: Command) => {
      const opts = c.optsWithGlobals<ServeOpts>();
      const listen = parseHostPort(opts.listen ?? '127.0.0.1:10809', '--listen');
      const limits = serverLimits(opts);
      const log = logger(opts);
      const meta = connectMetadata(opts, log);
      let security: Partial<NbdServerOptions>;
      try {
        security = nbdSecurity(opts, meta);
      } catch (err) {
        await meta.close();
        throw err;
      }
      if (!security.tls && !isLoopback(listen.host))
        log.warn({ listen: opts.listen }, 'serving NBD beyond loopback without TLS: anyone who reaches this address can read and write the volumes (use --tls require, docs/security.md)');
      await meta.globalMetadata();
      const rt = await ClientRuntime.open(meta, opts, log);
      const volumes = new VolumeProvider(rt.vc, { readOnly: opts.readOnly ?? false, writeCacheBytes: parseSize(opts.writeCacheSize) });
      const server = new NbdServer(rt.measured(volumes), {
        listenTcp: listen,
        ...(opts.unix ? { listenUnix: opts.unix } : {}),
        readOnly: opts.readOnly ?? false,
        ...limits,
        ...security,
        log: { debug: (o, m) => log.debug(o, m), info: (o, m) => log.info(o, m), warn: (o, m) => log.warn(o, m) },
      });
      rt.addSamples(() => nbdSamples(server.stats()));
      let addrs;
      try {
        addrs = await server.listen();
      } catch (err) {
        await rt.close();
        await meta.close();
        throw new TorusError('INVALID_ARGUMENT', `cannot listen: ${(err as Error).message}`);
      }
      const tcp = addrs.tcp ? `${security.tls ? 'nbds' : 'nbd'}://${addrs.tcp.host.includes(':') ? `[${addrs.tcp.host}]` : addrs.tcp.host}:${addrs.tcp.port}` : '';
      const unix = addrs.unix ? `nbd+unix:///?socket=${addrs.unix}` : '';
      const where = [tcp, unix].filter(Boolean).join(' and ');
      emit(opts, { serving: { tcp: tcp || null, unix: unix || null }, metrics: opts.metrics ? `http://${opts.metrics}/metrics` : null }, `serving NBD on ${where}; exports are volume names (VOLUME@SNAPSHOT read-only)`);
      const sig = await untilSignal();
      log.info({ signal: sig }, 'stopping: finishing requests and syncing volumes');
      await server.close();
      await volumes.closeAll();
      await rt.close();
      await meta.close();
      emit(opts, { stopped: true, synced: true }, 'stopped; every volume synced');
    });
}

/**
 * Waits for a signal, then until the device can be let go of: detaching a device under a mounted
 * file system fails every write it still has to make (ext4 then remounts read-only), so while it
 * is mounted torusblk says so and waits for the umount.
 */
async function untilDetachable(device: string, log: { info(o: object, m: string): void }): Promise<void> {
  let sig = await untilSignal();
  for (;;) {
    const busy = deviceBusy(device);
    if (!busy) break;
    process.stderr.write(`torusblk: not detaching ${device}: it is ${busy}; unmount it and torusblk syncs and detaches by itself\n`);
    log.info({ signal: sig, device, busy }, 'detach postponed: device in use');
    // Poll for the umount; another Ctrl-C meanwhile only repeats the reason.
    const next = untilSignal();
    for (;;) {
      const woke = await Promise.race([next.then((s) => ({ s })), new Promise<undefined>((r) => setTimeout(() => r(undefined), 500))]);
      if (woke) {
        sig = woke.s;
        break;
      }
      if (!deviceBusy(device)) return;
    }
  }
}

export function nbdCommand(): Command {
  return outputOptions(new Command('nbd'))
    .description('attach a volume as a local block device (kernel NBD via nbd-client, or nbdfuse + loop device without the module); Ctrl-C syncs and detaches, once the device is unmounted')
    .argument('[volume]', 'volume to attach')
    .argument('[device]', '/dev/nbdN (default: the first free one)')
    .option('-d, --detach <device>', 'detach a kernel NBD device and exit')
    .option('--no-fallback', 'fail instead of using nbdfuse when the kernel has no NBD module')
    .addOption(new Option('--write-cache-size <size>', 'dirty data before a write forces a sync').default('128MiB'))
    .action(async (volume: string | undefined, device: string | undefined, o: { detach?: string; fallback: boolean }, c: Command) => {
      const opts = c.optsWithGlobals<ServeOpts>();
      if (o.detach) {
        const busy = deviceBusy(o.detach);
        if (busy) throw new TorusError('LOCKED', `not detaching ${o.detach}: it is ${busy}; unmount it first`);
        await detachKernel(o.detach);
        emit(opts, { detached: o.detach }, `detached ${o.detach}`);
        return;
      }
      if (!volume) throw new TorusError('INVALID_ARGUMENT', 'name the volume to attach (or -d DEVICE to detach)');
      const kernel = await kernelHasNbd();
      if (!kernel && device) throw new TorusError('NOT_EXIST', `${device}: this kernel has no NBD module (modprobe nbd failed)`);
      if (!kernel && !o.fallback) throw new TorusError('NOT_EXIST', 'this kernel has no NBD module (modprobe nbd failed); drop --no-fallback to use nbdfuse and a loop device instead');
      const log = logger(opts);
      const meta = connectMetadata(opts, log);
      await meta.globalMetadata();
      const rt = await ClientRuntime.open(meta, opts, log);
      const volumes = new VolumeProvider(rt.vc, { writeCacheBytes: parseSize(opts.writeCacheSize) });
      const provider = rt.measured(volumes);
      // Opening here, before any client connects, takes the lock and fails early if it is taken.
      const held = await provider.open(volume, { readOnly: false }).catch(async (err: unknown) => {
        await rt.close();
        await meta.close();
        throw err;
      });
      const dir = mkdtempSync(join(tmpdir(), 'torusblk-'));
      const socket = join(dir, 'nbd.sock');
      const server = new NbdServer(provider, { listenUnix: socket, log: { debug: (x, m) => log.debug(x, m), info: (x, m) => log.info(x, m), warn: (x, m) => log.warn(x, m) } });
      rt.addSamples(() => nbdSamples(server.stats()));
      let att: Attachment | undefined;
      try {
        await server.listen();
        if (kernel) att = await attachKernel(socket, volume, device ?? freeNbdDevice(), held.device.blockSize);
        else {
          process.stderr.write('torusblk: this kernel has no NBD module; using nbdfuse and a loop device instead\n');
          att = await attachFuse(socket, volume);
        }
        emit(
          opts,
          { volume, device: att.device, how: att.how },
          `Attached ${volume} to ${att.device}${att.how === 'nbdfuse' ? ' (nbdfuse + loop)' : ''}. Press Ctrl-C to sync and detach (after umount).`,
        );
        await untilDetachable(att.device, log);
        log.info({ device: att.device }, 'detaching');
      } finally {
        // Order matters: the device lets go first (it may still write), then the volume syncs.
        if (att) await att.detach().catch((err: unknown) => log.warn({ err: (err as Error).message }, 'detach'));
        await server.close().catch(() => undefined);
        await held.release();
        await volumes.closeAll();
        await rt.close();
        await meta.close();
        rmSync(dir, { recursive: true, force: true });
      }
      emit(opts, { volume, detached: true, synced: true }, `Detached ${volume}; synced.`);
    });
}
