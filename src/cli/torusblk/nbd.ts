import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command, Option } from 'commander';
import { TorusError } from '../../core/errors.js';
import { NbdServer } from '../../nbd/server.js';
import { VolumeProvider } from '../../volume/provider.js';
import { connectMetadata } from '../shared/config.js';
import { addNbdServeOptions, listenNbd, nbdSamples, nbdServeFlags, nbdServerOptions } from '../shared/nbd-serve.js';
import { emit, outputOptions } from '../shared/output.js';
import { ClientRuntime, logger, parseHostPort, untilSignal, type ClientOpts } from './common.js';
import { volumeBudgets, volumeMemoryOptions, volumeMemorySamples } from '../shared/volume-memory.js';
import { attachFuse, attachKernel, detachKernel, deviceBusy, freeNbdDevice, kernelHasNbd, type Attachment } from './attach.js';

interface ServeOpts extends ClientOpts {
  listen?: string;
  unix?: string;
  writeCacheSize: string;
  journalTailSize: string;
  pageCacheSize: string;
  overlaySegments: string;
  json?: boolean;
}

export function nbdserveCommand(): Command {
  const cmd = volumeMemoryOptions(outputOptions(new Command('nbdserve')))
    .description('serve every volume over NBD by export name (VOLUME, or VOLUME@SNAPSHOT read-only)')
    .option('-l, --listen <host:port>', 'TCP address to listen on; anything but loopback must be asked for', '127.0.0.1:10809')
    .option('--unix <path>', 'also listen on a unix socket');
  return addNbdServeOptions(cmd, '').action(async (_o: unknown, c: Command) => {
    const opts = c.optsWithGlobals<ServeOpts>();
    const flags = nbdServeFlags(opts, '');
    const listen = parseHostPort(opts.listen ?? '127.0.0.1:10809', '--listen');
    const log = logger(opts);
    const meta = connectMetadata(opts, log);
    let options;
    try {
      options = nbdServerOptions(flags, '', { listenTcp: listen, ...(opts.unix ? { listenUnix: opts.unix } : {}) }, opts, meta, log);
    } catch (err) {
      await meta.close();
      throw err;
    }
    await meta.globalMetadata();
    const rt = await ClientRuntime.open(meta, opts, log);
    const volumes = new VolumeProvider(rt.vc, { readOnly: flags.readOnly, ...volumeBudgets({ ...opts, writeCacheSize: flags.writeCacheSize }) });
    let served;
    try {
      served = await listenNbd(rt.measured(volumes), options, '--listen');
    } catch (err) {
      await rt.close();
      await meta.close();
      throw err;
    }
    const { server, tcp, unix } = served;
    rt.addSamples(() => [...nbdSamples(server.stats(), ''), ...volumeMemorySamples(volumes)]);
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
  return volumeMemoryOptions(outputOptions(new Command('nbd')))
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
      const volumes = new VolumeProvider(rt.vc, volumeBudgets(opts));
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
      rt.addSamples(() => [...nbdSamples(server.stats(), ''), ...volumeMemorySamples(volumes)]);
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
