import { Command, Option } from 'commander';
import { AoeTarget, RawPacketConn, formatMac } from '../../aoe/index.js';
import { TorusError } from '../../core/errors.js';
import { formatSize, parseDuration } from '../../core/units.js';
import { VolumeProvider } from '../../volume/provider.js';
import { counterSample as c, type MetricSample } from '../../http/metrics.js';
import { connectMetadata } from '../shared/config.js';
import { emit, outputOptions } from '../shared/output.js';
import { ClientRuntime, logger, untilSignal, type ClientOpts } from './common.js';
import { volumeBudgets, volumeMemoryOptions, volumeMemorySamples } from '../shared/volume-memory.js';

interface AoeOpts extends ClientOpts {
  json?: boolean;
  writeBack?: boolean;
  syncInterval: string;
  bufferCount: string;
  writeCacheSize: string;
  journalTailSize: string;
  pageCacheSize: string;
  overlaySegments: string;
  allow?: string;
  allowRemoteConfig?: boolean;
}

function parseAddress(text: string, what: string, max: number): number {
  if (!/^\d{1,5}$/.test(text) || Number(text) > max) throw new TorusError('INVALID_ARGUMENT', `invalid AoE ${what} "${text}": expected a number from 0 to ${max}`);
  return Number(text);
}

function aoeSamples(st: AoeTarget['stats']): MetricSample[] {
  return [
    { name: 'torus_aoe_in_flight', help: 'ATA commands being served', type: 'gauge', value: st.inFlight },
    c('torus_aoe_frames_total', 'AoE frames received', st.framesIn),
    c('torus_aoe_ata_commands_total', 'ATA commands served', st.ataCommands),
    c('torus_aoe_ata_errors_total', 'ATA commands answered with an error', st.ataErrors),
    c('torus_aoe_errors_total', 'AoE error replies', st.aoeErrors),
    c('torus_aoe_malformed_frames_total', 'Frames that did not parse', st.malformed),
    c('torus_aoe_busy_drops_total', "Commands dropped because their initiator's buffer count, or 4x it in all, was reached", st.busyDrops),
    { name: 'torus_aoe_initiators', help: 'Initiators with commands being served', type: 'gauge', value: st.initiators },
    c('torus_aoe_send_drops_total', 'Replies dropped by the socket', st.sendDrops),
    c('torus_aoe_not_allowed_total', 'Frames from initiators not on --allow, ignored', st.notAllowed),
    c('torus_aoe_remote_config_refused_total', 'MAC mask edits and reservations refused (--allow-remote-config is off)', st.remoteConfigRefused),
  ];
}

function parseAllow(text: string | undefined): string[] {
  if (text === undefined) return [];
  const macs = text.split(',').map((m) => m.trim().toLowerCase()).filter((m) => m !== '');
  for (const m of macs) if (!/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/.test(m)) throw new TorusError('INVALID_ARGUMENT', `invalid --allow "${m}": expected MAC addresses like 52:54:00:12:34:56, comma-separated`);
  if (macs.length === 0) throw new TorusError('INVALID_ARGUMENT', '--allow names no MAC address');
  return macs;
}

export function aoeCommand(): Command {
  return volumeMemoryOptions(outputOptions(new Command('aoe')))
    .description('serve a volume as ATA-over-Ethernet target eSHELF.SLOT on an Ethernet interface (needs CAP_NET_RAW)')
    .argument('<volume>', 'volume to serve (taken exclusively, as for NBD)')
    .argument('<iface>', 'Ethernet interface, e.g. eth0')
    .argument('<shelf>', 'AoE major address, 0-65534')
    .argument('<slot>', 'AoE minor address, 0-254')
    .option(
      '--write-back',
      'answer writes before they are durable and advertise a write cache: data is safe only after the initiator sends FLUSH CACHE, or after the next --sync-interval (Linux\'s aoe driver never flushes)',
    )
    .option('--sync-interval <duration>', 'with --write-back: sync written data at least this often', '5s')
    .option('--buffer-count <n>', 'ATA commands handled at once (the Buffer Count advertised to initiators)', '64')
    .addOption(new Option('--write-cache-size <size>', 'dirty data before a write forces a sync').default('128MiB'))
    .option('--allow <mac,...>', 'serve only these initiators (MAC addresses); others get no answer. AoE has no other authentication: use it on any segment you do not control')
    .option('--allow-remote-config', 'let initiators edit the MAC mask list and reservations over the network (AoE r11 allows it; any host on the segment could then lock the others out)')
    .action(async (volume: string, iface: string, shelfText: string, slotText: string, _o: unknown, c: Command) => {
      const opts = c.optsWithGlobals<AoeOpts>();
      const shelf = parseAddress(shelfText, 'shelf', 0xfffe);
      const slot = parseAddress(slotText, 'slot', 0xfe);
      const bufferCount = Number(opts.bufferCount);
      if (!Number.isInteger(bufferCount) || bufferCount < 1 || bufferCount > 0xffff)
        throw new TorusError('INVALID_ARGUMENT', `invalid --buffer-count "${opts.bufferCount}": expected 1 to 65535`);
      const syncEvery = parseDuration(opts.syncInterval);
      const writeBack = opts.writeBack ?? false;
      const allow = parseAllow(opts.allow);
      const log = logger(opts);
      // The socket first: without CAP_NET_RAW or with a wrong interface there is nothing to lock.
      const conn = RawPacketConn.open(iface);
      const meta = connectMetadata(opts, log);
      let rt: ClientRuntime | undefined;
      let held;
      try {
        await meta.globalMetadata();
        rt = await ClientRuntime.open(meta, opts, log);
        const volumes = new VolumeProvider(rt.vc, volumeBudgets(opts));
        const provider = rt.measured(volumes);
        held = await provider.open(volume, { readOnly: false });
        const device = held.device;
        const target = new AoeTarget(conn, device, {
          shelf,
          slot,
          bufferCount,
          // Linux's initiator never sends FLUSH CACHE, so by default each write is durable (its
          // volume sync shared with every write in flight) before the initiator hears of it.
          writeThrough: !writeBack,
          allow,
          remoteConfig: opts.allowRemoteConfig ?? false,
          serial: `${volume}`.slice(0, 20),
          log: { debug: (o, m) => log.debug(o, m), info: (o, m) => log.info(o, m), warn: (o, m) => log.warn(o, m) },
        });
        target.start();
        if (allow.length === 0) log.warn({ iface }, 'serving AoE to every host on the segment: AoE has no authentication (--allow MAC,... restricts it)');
        rt.addSamples(() => [...aoeSamples(target.stats), ...volumeMemorySamples(volumes)]);
        let syncing = false;
        const timer = writeBack
          ? setInterval(() => {
              if (syncing) return;
              syncing = true;
              device
                .flush()
                .catch((err: unknown) => log.warn({ err: (err as Error).message }, 'periodic sync failed'))
                .finally(() => (syncing = false));
            }, syncEvery)
          : undefined;
        emit(
          opts,
          { volume, size: device.size, target: `e${shelf}.${slot}`, interface: conn.name, mac: formatMac(conn.mac), sectorsPerFrame: target.maxSectors, writeBack },
          `serving ${volume} (${formatSize(device.size)}) as AoE target e${shelf}.${slot} on ${conn.name} (${formatMac(conn.mac)}, ${target.maxSectors} sectors per frame, ` +
            `${writeBack ? `write-back, synced every ${opts.syncInterval} and on FLUSH CACHE` : 'write-through'}). Press Ctrl-C to sync and stop.`,
        );
        const sig = await untilSignal();
        log.info({ signal: sig }, 'stopping: answering commands in flight and syncing');
        if (timer) clearInterval(timer);
        await target.close();
        await device.flush();
        await held.release();
        await volumes.closeAll();
        emit(opts, { stopped: true, synced: true }, `stopped; ${volume} synced`);
      } finally {
        conn.close();
        await held?.release().catch(() => undefined);
        await rt?.close().catch(() => undefined);
        await meta.close().catch(() => undefined);
      }
    });
}
