import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command, Option } from 'commander';
import { TorusError } from '../../core/errors.js';
import { parseSize } from '../../core/units.js';
import { NbdServer } from '../../nbd/server.js';
import { VolumeProvider } from '../../volume/provider.js';
import { connectMetadata, type BlockIoOpts, type GlobalOpts } from '../shared/config.js';
import { clientFor, logger, untilSignal } from './common.js';
import { attachFuse, attachKernel, detachKernel, freeNbdDevice, kernelHasNbd, type Attachment } from './attach.js';

interface ServeOpts extends GlobalOpts, BlockIoOpts {
  listen?: string;
  unix?: string;
  readOnly?: boolean;
  writeCacheSize: string;
}

function parseListen(text: string): { host: string; port: number } {
  const m = /^(\[[0-9a-fA-F:]+\]|[^:]+):(\d{1,5})$/.exec(text);
  if (!m || Number(m[2]) > 65535) throw new TorusError('INVALID_ARGUMENT', `invalid --listen "${text}": expected host:port, e.g. 127.0.0.1:10809`);
  return { host: m[1]!.replace(/^\[|\]$/g, ''), port: Number(m[2]) };
}

export function nbdserveCommand(): Command {
  return new Command('nbdserve')
    .description('serve every volume over NBD by export name (VOLUME, or VOLUME@SNAPSHOT read-only)')
    .option('-l, --listen <host:port>', 'TCP address to listen on; anything but loopback must be asked for', '127.0.0.1:10809')
    .option('--unix <path>', 'also listen on a unix socket')
    .option('--read-only', 'serve every export read-only')
    .addOption(new Option('--write-cache-size <size>', 'dirty data per volume before a write forces a sync').default('128MiB'))
    .action(async (_o: unknown, c: Command) => {
      const opts = c.optsWithGlobals<ServeOpts>();
      const listen = parseListen(opts.listen ?? '127.0.0.1:10809');
      const log = logger(opts);
      const meta = connectMetadata(opts, log);
      await meta.globalMetadata();
      const vc = await clientFor(meta, opts, log);
      const provider = new VolumeProvider(vc, { readOnly: opts.readOnly ?? false, writeCacheBytes: parseSize(opts.writeCacheSize) });
      const server = new NbdServer(provider, {
        listenTcp: listen,
        ...(opts.unix ? { listenUnix: opts.unix } : {}),
        readOnly: opts.readOnly ?? false,
        log: { debug: (o, m) => log.debug(o, m), info: (o, m) => log.info(o, m), warn: (o, m) => log.warn(o, m) },
      });
      let addrs;
      try {
        addrs = await server.listen();
      } catch (err) {
        await vc.close();
        await meta.close();
        throw new TorusError('INVALID_ARGUMENT', `cannot listen: ${(err as Error).message}`);
      }
      const where = [addrs.tcp ? `nbd://${addrs.tcp.host.includes(':') ? `[${addrs.tcp.host}]` : addrs.tcp.host}:${addrs.tcp.port}` : '', addrs.unix ? `nbd+unix:///?socket=${addrs.unix}` : '']
        .filter(Boolean)
        .join(' and ');
      process.stdout.write(`serving NBD on ${where}; exports are volume names (VOLUME@SNAPSHOT read-only)\n`);
      const sig = await untilSignal();
      log.info({ signal: sig }, 'stopping: finishing requests and syncing volumes');
      await server.close();
      await provider.closeAll();
      await vc.close();
      await meta.close();
      process.stdout.write('stopped; every volume synced\n');
    });
}

export function nbdCommand(): Command {
  return new Command('nbd')
    .description('attach a volume as a local block device (kernel NBD via nbd-client, or nbdfuse + loop device without the module)')
    .argument('[volume]', 'volume to attach')
    .argument('[device]', '/dev/nbdN (default: the first free one)')
    .option('-d, --detach <device>', 'detach a kernel NBD device and exit')
    .option('--no-fallback', 'fail instead of using nbdfuse when the kernel has no NBD module')
    .addOption(new Option('--write-cache-size <size>', 'dirty data before a write forces a sync').default('128MiB'))
    .action(async (volume: string | undefined, device: string | undefined, o: { detach?: string; fallback: boolean }, c: Command) => {
      const opts = c.optsWithGlobals<ServeOpts>();
      if (o.detach) {
        await detachKernel(o.detach);
        process.stdout.write(`detached ${o.detach}\n`);
        return;
      }
      if (!volume) throw new TorusError('INVALID_ARGUMENT', 'name the volume to attach (or -d DEVICE to detach)');
      const kernel = await kernelHasNbd();
      if (!kernel && device) throw new TorusError('NOT_EXIST', `${device}: this kernel has no NBD module (modprobe nbd failed)`);
      if (!kernel && !o.fallback) throw new TorusError('NOT_EXIST', 'this kernel has no NBD module (modprobe nbd failed); drop --no-fallback to use nbdfuse and a loop device instead');
      const log = logger(opts);
      const meta = connectMetadata(opts, log);
      await meta.globalMetadata();
      const vc = await clientFor(meta, opts, log);
      const provider = new VolumeProvider(vc, { writeCacheBytes: parseSize(opts.writeCacheSize) });
      // Opening here, before any client connects, takes the lock and fails early if it is taken.
      const held = await provider.open(volume, { readOnly: false }).catch(async (err: unknown) => {
        await vc.close();
        await meta.close();
        throw err;
      });
      const dir = mkdtempSync(join(tmpdir(), 'torusblk-'));
      const socket = join(dir, 'nbd.sock');
      const server = new NbdServer(provider, { listenUnix: socket, log: { debug: (x, m) => log.debug(x, m), info: (x, m) => log.info(x, m), warn: (x, m) => log.warn(x, m) } });
      let att: Attachment | undefined;
      try {
        await server.listen();
        if (kernel) att = await attachKernel(socket, volume, device ?? freeNbdDevice(), held.device.blockSize);
        else {
          process.stderr.write('torusblk: this kernel has no NBD module; using nbdfuse and a loop device instead\n');
          att = await attachFuse(socket, volume);
        }
        process.stdout.write(`Attached ${volume} to ${att.device}${att.how === 'nbdfuse' ? ' (nbdfuse + loop)' : ''}. Press Ctrl-C to sync and detach.\n`);
        const sig = await untilSignal();
        log.info({ signal: sig }, 'detaching');
      } finally {
        // Order matters: the device lets go first (it may still write), then the volume syncs.
        if (att) await att.detach().catch((err: unknown) => log.warn({ err: (err as Error).message }, 'detach'));
        await server.close().catch(() => undefined);
        await held.release();
        await provider.closeAll();
        await vc.close();
        await meta.close();
        rmSync(dir, { recursive: true, force: true });
      }
      process.stdout.write(`Detached ${volume}; synced.\n`);
    });
}
