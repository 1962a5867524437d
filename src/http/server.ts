import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { NodeMetrics } from './metrics.js';

// The node's HTTP endpoint: /metrics for Prometheus, /healthz for load balancers and
// orchestrators, /v1/status for humans and the dashboard.

export interface HealthSource {
  /** Empty when healthy; otherwise the reasons the node is not. */
  problems(): string[];
  status(): unknown;
}

/** More GET routes, by path: torusd's dashboard and its data. */
export type Routes = Readonly<Record<string, (req: IncomingMessage, res: ServerResponse) => Promise<void> | void>>;

export class HttpServer {
  private server: Server | undefined;

  constructor(
    private readonly metrics: NodeMetrics,
    private readonly health: HealthSource,
    private readonly routes: Routes = {},
  ) {}

  async listen(host: string, port: number): Promise<{ host: string; port: number }> {
    const server = createServer((req, res) => {
      void this.handle(req, res).catch((err: unknown) => {
        if (!res.headersSent) res.writeHead(500, { 'content-type': 'text/plain' });
        res.end(`${(err as Error).message}\n`);
      });
    });
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    const addr = server.address();
    return { host, port: typeof addr === 'object' && addr ? addr.port : port };
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' }).end();
      return;
    }
    const route = path !== undefined ? this.routes[path] : undefined;
    if (route) return route(req, res);
    switch (path) {
      case '/metrics': {
        const { contentType, body } = await this.metrics.render();
        res.writeHead(200, { 'content-type': contentType }).end(body);
        return;
      }
      case '/healthz': {
        const problems = this.health.problems();
        res.writeHead(problems.length === 0 ? 200 : 503, { 'content-type': 'text/plain' });
        res.end(problems.length === 0 ? 'ok\n' : `${problems.join('\n')}\n`);
        return;
      }
      case '/v1/status': {
        res.writeHead(200, { 'content-type': 'application/json' }).end(`${JSON.stringify(this.health.status(), null, 2)}\n`);
        return;
      }
      default:
        res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /metrics, /healthz or /v1/status\n');
    }
  }

  async close(): Promise<void> {
    const s = this.server;
    if (!s) return;
    this.server = undefined;
    s.closeAllConnections();
    await new Promise<void>((r) => s.close(() => r()));
  }
}
