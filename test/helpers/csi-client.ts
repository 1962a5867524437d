import * as grpc from '@grpc/grpc-js';
import { csiServices } from '../../src/csi/proto.js';

// A CSI client for tests: plays what kubelet and the sidecars send, over the driver's socket.
// `call` resolves with the response, or with {code, details} for a gRPC error.

export interface CsiFailure {
  readonly code: grpc.status;
  readonly details: string;
}

export interface CsiClient {
  call(service: 'Identity' | 'Controller' | 'Node', method: string, req?: object): Promise<Record<string, unknown>>;
  /** The error a call fails with; throws if it succeeds. */
  fails(service: 'Identity' | 'Controller' | 'Node', method: string, req?: object): Promise<CsiFailure>;
  close(): void;
}

export function csiClient(socket: string): CsiClient {
  const svc = csiServices();
  const target = `unix://${socket}`;
  const creds = grpc.credentials.createInsecure();
  const clients = {
    Identity: new svc.Identity(target, creds),
    Controller: new svc.Controller(target, creds),
    Node: new svc.Node(target, creds),
  };
  const raw = (service: keyof typeof clients, method: string, req: object): Promise<{ ok: true; res: Record<string, unknown> } | { ok: false; err: CsiFailure }> =>
    new Promise((resolve) => {
      const client = clients[service] as unknown as Record<string, (r: object, o: grpc.CallOptions, cb: (e: grpc.ServiceError | null, r: Record<string, unknown>) => void) => void>;
      const fn = client[method];
      if (!fn) throw new Error(`${service} has no method ${method}`);
      fn.call(client, req, { deadline: Date.now() + 180_000 }, (e, r) => resolve(e ? { ok: false, err: { code: e.code, details: e.details } } : { ok: true, res: r }));
    });
  return {
    async call(service, method, req = {}) {
      const r = await raw(service, method, req);
      if (!r.ok) throw new Error(`${service}.${method} failed: ${grpc.status[r.err.code]}: ${r.err.details}`);
      return r.res;
    },
    async fails(service, method, req = {}) {
      const r = await raw(service, method, req);
      if (r.ok) throw new Error(`${service}.${method} succeeded, expected an error: ${JSON.stringify(r.res)}`);
      return r.err;
    },
    close() {
      for (const c of Object.values(clients)) c.close();
    },
  };
}
