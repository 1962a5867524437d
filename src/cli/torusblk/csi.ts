import { existsSync } from 'node:fs';
import { hostname } from 'node:os';
import { fileURLToPath } from 'node:url';
import { Command, Option } from 'commander';
import { isTorusError, TorusError } from '../../core/errors.js';
import { ProcessAttacher } from '../../csi/attach-process.js';
import { DEFAULT_DRIVER_NAME } from '../../csi/common.js';
import { ControllerService } from '../../csi/controller.js';
import { NodeService } from '../../csi/node.js';
import { CsiServer } from '../../csi/server.js';
import type { VolumeClient } from '../../volume/client.js';
import { VolumeMeta } from '../../volume/meta.js';
import { connectMetadata, resolveConnection, type BlockIoOpts, type GlobalOpts } from '../shared/config.js';
import { emit, outputOptions } from '../shared/output.js';
import { clientFor, logger, untilSignal } from './common.js';

// `torusblk csi`: the Kubernetes CSI driver (src/csi) on a unix socket, as the controller (one per
// cluster, beside the provisioner, attacher, snapshotter and resizer sidecars), the node plugin
// (one per node, beside the node-driver-registrar), or both.

interface CsiOpts extends GlobalOpts, BlockIoOpts {
  endpoint: string;
  nodeId?: string;
  mode: 'all' | 'controller' | 'node';
  driverName: string;
  json?: boolean;
}

/** This program, for the per-volume `torusblk nbd` processes the node service starts. */
function torusblkBin(): string {
  const bin = fileURLToPath(new URL('../../../../bin/torusblk.js', import.meta.url));
  if (!existsSync(bin)) throw new TorusError('INTERNAL', `${bin} not found`);
  return bin;
}

/** The flags that make a child torusblk talk to the same cluster the same way. */
function childArgs(opts: CsiOpts): string[] {
  const c = resolveConnection(opts);
  return [
    '-C', c.endpoints.join(','),
    ...(c.caFile ? ['--etcd-ca-file', c.caFile] : []),
    ...(c.certFile ? ['--etcd-cert-file', c.certFile] : []),
    ...(c.keyFile ? ['--etcd-key-file', c.keyFile] : []),
    '--etcd-timeout', opts.etcdTimeout ?? '5s',
    '--read-cache-size', opts.readCacheSize,
    '--read-level', opts.readLevel,
    '--write-level', opts.writeLevel,
    ...(opts.debug ? ['--debug'] : []),
  ];
}

export function csiCommand(): Command {
  return outputOptions(new Command('csi'))
    .description('serve the Kubernetes CSI driver (Identity, Controller, Node) on a unix socket')
    .requiredOption('--endpoint <unix:///path>', 'the socket to serve gRPC on, e.g. unix:///csi/csi.sock')
    .option('--node-id <name>', 'this node\'s name as the CO knows it (default: the host name)')
    .addOption(new Option('--mode <mode>', 'which services to serve').choices(['all', 'controller', 'node']).default('all'))
    .option('--driver-name <name>', 'the driver name (CSIDriver, StorageClass provisioner)', DEFAULT_DRIVER_NAME)
    .action(async (_o: unknown, c: Command) => {
      const opts = c.optsWithGlobals<CsiOpts>();
      const log = logger(opts);
      const meta = connectMetadata(opts);
      const vmeta = new VolumeMeta(meta.kv());
      let vc: Promise<VolumeClient> | undefined;
      const controller =
        opts.mode === 'node'
          ? undefined
          : new ControllerService({
              kv: meta.kv(),
              vmeta,
              openVolume: async (name) => {
                vc ??= clientFor(meta, opts, log);
                return (await vc).openVolume(name);
              },
              snapshot: async (name, snap) => {
                vc ??= clientFor(meta, opts, log);
                return (await vc).snapshot(name, snap);
              },
              clone: async (name, source, size) => {
                vc ??= clientFor(meta, opts, log);
                return (await vc).clone(name, source, size);
              },
            });
      const node =
        opts.mode === 'controller'
          ? undefined
          : new NodeService({
              nodeId: opts.nodeId ?? hostname(),
              attacher: new ProcessAttacher(process.execPath, [torusblkBin(), ...childArgs(opts)], (volume, line) => log.info({ volume }, line)),
              checkVolume: async (name) => void (await vmeta.get(name)),
            });
      const server = new CsiServer({
        endpoint: opts.endpoint,
        driverName: opts.driverName,
        ...(controller ? { controller } : {}),
        ...(node ? { node } : {}),
        ready: async () => {
          try {
            await meta.globalMetadata();
            return true;
          } catch (err) {
            if (isTorusError(err, 'NOT_INITIALIZED')) return false;
            throw err;
          }
        },
        log: { info: (o, m) => log.info(o, m), warn: (o, m) => log.warn(o, m), debug: (o, m) => log.debug(o, m) },
      });
      const path = await server.listen();
      emit(
        opts,
        { serving: `unix://${path}`, driver: opts.driverName, mode: opts.mode, node: node?.nodeId ?? null },
        `serving CSI driver ${opts.driverName} (${opts.mode === 'all' ? 'controller and node' : opts.mode}${node ? `, node ${node.nodeId}` : ''}) on unix://${path}`,
      );
      const sig = await untilSignal();
      log.info({ signal: sig }, 'stopping');
      await server.close();
      // Staged volumes keep their attachment processes: stopping them here would pull the device
      // from under file systems pods still use.
      if (vc) await (await vc).close();
      await meta.close();
    });
}
