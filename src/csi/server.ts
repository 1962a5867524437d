import { chmodSync, existsSync, mkdirSync, rmSync, statSync } from 'node:fs';
import { dirname } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { TorusError, isTorusError } from '../core/errors.js';
import { VERSION } from '../core/version.js';
import type { ControllerService } from './controller.js';
import { aborted, csiStatusOf, precondition } from './errors.js';
import type { NodeService } from './node.js';
import { csiServices } from './proto.js';

// The gRPC server a CO and its sidecars talk to on a unix socket: Identity always, Controller
// and Node as this instance serves them (a method of a service not served is UNIMPLEMENTED, as
// the spec asks). Every call goes through one wrapper: errors become gRPC statuses in one place
// (errors.ts), and a second call on a volume (or snapshot, or CO name) while one is still running
// is refused with ABORTED, the spec's answer for "operation pending".

export interface CsiLog {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
  debug(obj: object, msg: string): void;
}

export interface CsiServerOptions {
  /** unix:///path/to/csi.sock */
  endpoint: string;
  driverName: string;
  controller?: ControllerService;
  node?: NodeService;
  /** Whether the cluster is reachable and initialized (Probe). */
  ready(): Promise<boolean>;
  log: CsiLog;
}

type Handler = (req: Record<string, unknown>) => Promise<unknown>;

/** Calls the CO makes all the time, logged at debug level only. */
const ROUTINE = new Set(['GetPluginInfo', 'GetPluginCapabilities', 'Probe', 'ControllerGetCapabilities', 'NodeGetCapabilities', 'NodeGetInfo', 'NodeGetVolumeStats', 'ListVolumes', 'ListSnapshots']);

/** The request field that names what a call works on, for the one-call-at-a-time rule. */
function subject(req: Record<string, unknown>): string | undefined {
  for (const k of ['volume_id', 'source_volume_id', 'snapshot_id', 'name']) {
    const v = req[k];
    if (typeof v === 'string' && v) return `${k === 'snapshot_id' ? 'snap' : 'vol'}:${v}`;
  }
  return undefined;
}

export function socketPath(endpoint: string): string {
  const m = /^unix:\/\/(\/.+)$/.exec(endpoint);
  if (!m) throw new TorusError('INVALID_ARGUMENT', `invalid --endpoint "${endpoint}": expected unix:///absolute/path.sock`);
  return m[1]!;
}

export class CsiServer {
  private readonly server = new grpc.Server();
  private readonly busy = new Set<string>();
  private path = '';

  constructor(private readonly opts: CsiServerOptions) {
    const svc = csiServices();
    this.server.addService(svc.Identity.service, this.wrap({
      GetPluginInfo: async () => ({ name: opts.driverName, vendor_version: VERSION }),
      GetPluginCapabilities: async () => ({
        // Every instance answers alike (the spec asks for the sum over the deployment).
        capabilities: [{ service: { type: 'CONTROLLER_SERVICE' } }, { volume_expansion: { type: 'OFFLINE' } }],
      }),
      Probe: async () => {
        try {
          return { ready: { value: await opts.ready() } };
        } catch (err) {
          if (isTorusError(err, 'ETCD_UNAVAILABLE')) throw precondition(`not healthy: ${err.message}`);
          throw err;
        }
      },
    }));
    const c = opts.controller;
    if (c)
      this.server.addService(svc.Controller.service, this.wrap({
        CreateVolume: (r) => c.createVolume(r),
        DeleteVolume: (r) => c.deleteVolume(r),
        ControllerPublishVolume: (r) => c.controllerPublishVolume(r),
        ControllerUnpublishVolume: (r) => c.controllerUnpublishVolume(r),
        ValidateVolumeCapabilities: (r) => c.validateVolumeCapabilities(r),
        ListVolumes: (r) => c.listVolumes(r),
        ControllerGetCapabilities: async () => ({
          capabilities: [
            'CREATE_DELETE_VOLUME',
            'PUBLISH_UNPUBLISH_VOLUME',
            'LIST_VOLUMES',
            'LIST_VOLUMES_PUBLISHED_NODES',
            'CREATE_DELETE_SNAPSHOT',
            'LIST_SNAPSHOTS',
            'CLONE_VOLUME',
            'EXPAND_VOLUME',
            'SINGLE_NODE_MULTI_WRITER',
          ].map((type) => ({ rpc: { type } })),
        }),
        CreateSnapshot: (r) => c.createSnapshot(r),
        DeleteSnapshot: (r) => c.deleteSnapshot(r),
        ListSnapshots: (r) => c.listSnapshots(r),
        ControllerExpandVolume: (r) => c.controllerExpandVolume(r),
      }));
    const n = opts.node;
    if (n)
      this.server.addService(svc.Node.service, this.wrap({
        NodeStageVolume: (r) => n.stage(r),
        NodeUnstageVolume: (r) => n.unstage(r),
        NodePublishVolume: (r) => n.publish(r),
        NodeUnpublishVolume: (r) => n.unpublish(r),
        NodeGetVolumeStats: (r) => n.stats(r),
        NodeExpandVolume: (r) => n.expand(r),
        NodeGetCapabilities: async () => ({
          capabilities: ['STAGE_UNSTAGE_VOLUME', 'GET_VOLUME_STATS', 'EXPAND_VOLUME', 'VOLUME_CONDITION', 'SINGLE_NODE_MULTI_WRITER'].map((type) => ({ rpc: { type } })),
        }),
        NodeGetInfo: async () => ({ node_id: n.nodeId, max_volumes_per_node: 0 }),
      }));
  }

  private wrap(handlers: Record<string, Handler>): grpc.UntypedServiceImplementation {
    const impl: grpc.UntypedServiceImplementation = {};
    for (const [method, fn] of Object.entries(handlers)) {
      impl[method] = (call: grpc.ServerUnaryCall<Record<string, unknown>, unknown>, cb: grpc.sendUnaryData<unknown>) => {
        void this.run(method, call.request, fn).then(
          (res) => cb(null, res),
          (err: unknown) => {
            const st = csiStatusOf(err);
            cb({ code: st.code, details: st.details });
          },
        );
      };
    }
    return impl;
  }

  private async run(method: string, req: Record<string, unknown>, fn: Handler): Promise<unknown> {
    const key = subject(req);
    const what = { method, ...(key ? { on: key.slice(key.indexOf(':') + 1) } : {}) };
    if (key && this.busy.has(key)) {
      this.opts.log.warn(what, 'refused: another call on it is still running');
      throw aborted(`an operation on ${key.slice(key.indexOf(':') + 1)} is already in progress`);
    }
    if (key) this.busy.add(key);
    const t0 = Date.now();
    try {
      const res = await fn(req);
      this.opts.log[ROUTINE.has(method) ? 'debug' : 'info']({ ...what, ms: Date.now() - t0 }, 'ok');
      return res;
    } catch (err) {
      const st = csiStatusOf(err);
      this.opts.log.warn({ ...what, code: grpc.status[st.code], err: st.details, ms: Date.now() - t0 }, 'failed');
      throw err;
    } finally {
      if (key) this.busy.delete(key);
    }
  }

  /** Binds the socket (replacing a stale one left by an earlier run) and starts serving. */
  async listen(): Promise<string> {
    const path = socketPath(this.opts.endpoint);
    mkdirSync(dirname(path), { recursive: true });
    if (existsSync(path)) {
      if (!statSync(path).isSocket()) throw new TorusError('INVALID_ARGUMENT', `${path} exists and is not a socket`);
      rmSync(path);
    }
    await new Promise<void>((resolve, reject) =>
      this.server.bindAsync(`unix://${path}`, grpc.ServerCredentials.createInsecure(), (err) => (err ? reject(new TorusError('INVALID_ARGUMENT', `cannot listen on ${path}: ${err.message}`)) : resolve())),
    );
    // The CO's sidecars may run as other users of the pod's group (fsGroup); nobody else may call.
    chmodSync(path, 0o660);
    this.path = path;
    return path;
  }

  /** Stops taking calls, lets running ones finish, removes the socket. */
  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.server.tryShutdown(() => resolve()));
    if (this.path) rmSync(this.path, { force: true });
  }
}
