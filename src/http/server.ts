import { createHash, timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { Duplex } from 'node:stream';
import { LogThrottle, capConnections } from '../core/limits.js';
import type { NodeMetrics } from './metrics.js';

// The node's HTTP endpoint: /metrics for Prometheus, /healthz for load balancers and
// orchestrators, /v1/status for humans and the dashboard.
//
// Limits, so that no client can bring the node down through it: at most `maxConnections`; a
// whole request within 30 s (a client that sends nothing, or dribbles its headers, is cut off
// rather than waited for); at most 8 requests answered per connection (later ones get a 503 of a
// few bytes), because Node answers pipelined requests whether or not the client reads, and one
// that sent 5,000 GETs without reading made it buffer 500 MB; requests other than GET and HEAD
// are refused and the connection closed, so no body is read.

export interface HealthSource {
  /** Empty when healthy; otherwise the reasons the node is not. */
  problems(): string[];
  status(): unknown;
}

/** More GET routes, by path: torusd's dashboard and its data. */
export type Routes = Readonly<Record<string, (req: IncomingMessage, res: ServerResponse) => Promise<void> | void>>;

export interface HttpServerOptions {
  /** Connections at once; more are closed on arrival. Default 128. */
  readonly maxConnections?: number;
  /** A request (headers and all) must arrive within this. Default 30 s. */
  readonly requestTimeoutMs?: number;
  /** Told, at most once per ten seconds per kind, when a limit bites. */
  readonly onLimit?: (what: string, detail: object) => void;
  /** Serve HTTPS with this certificate and key (PEM). */
  readonly tls?: { readonly cert: Buffer; readonly key: Buffer };
  /**
   * /v1/* (status and the dashboard's data) only for requests with `Authorization: Bearer TOKEN`.
   * /metrics and /healthz stay open to scrapers and probes: they say how the node is, nothing
   * that lets anyone reach a block.
   */
  readonly bearerToken?: string;
}

export interface HttpServerStats {
  readonly refusedConnections: number;
  /** Requests whose headers or body did not arrive in time. */
  readonly timeouts: number;
  /** Requests that did not parse (bad syntax, headers over 16 KiB). */
  readonly badRequests: number;
}

export const HTTP_DEFAULTS = {
  maxConnections: 128,
  requestTimeoutMs: 30_000,
  keepAliveTimeoutMs: 5_000,
  maxRequestsPerSocket: 8,
} as const;

export class HttpServer {
  private server: Server | undefined;
  private readonly counters = { refusedConnections: 0, timeouts: 0, badRequests: 0 };
  private readonly logThrottle = new LogThrottle();

  constructor(
    private readonly metrics: NodeMetrics,
    private readonly health: HealthSource,
    private readonly routes: Routes = {},
    private readonly options: HttpServerOptions = {},
  ) {}

  stats(): HttpServerStats {
    return { ...this.counters };
  }

  private limitHit(what: string, detail: object): void {
    const held = this.logThrottle.take(what);
    if (held !== undefined) this.options.onLimit?.(what, held > 0 ? { ...detail, alsoSince: held } : detail);
  }

  async listen(host: string, port: number): Promise<{ host: string; port: number }> {
    const timeout = this.options.requestTimeoutMs ?? HTTP_DEFAULTS.requestTimeoutMs;
    const make = this.options.tls
      ? (o: object, h: (req: IncomingMessage, res: ServerResponse) => void): Server => createHttpsServer({ ...o, cert: this.options.tls!.cert, key: this.options.tls!.key, minVersion: 'TLSv1.2' }, h)
      : (o: object, h: (req: IncomingMessage, res: ServerResponse) => void): Server => createServer(o, h);
    const server = make(
      {
        headersTimeout: timeout,
        requestTimeout: timeout,
        keepAliveTimeout: HTTP_DEFAULTS.keepAliveTimeoutMs,
        // How often the timeouts are checked; Node's default lets them run 30 s late.
        connectionsCheckingInterval: Math.min(1000, Math.max(50, timeout / 4)),
      },
      (req, res) => {
        void this.handle(req, res).catch((err: unknown) => {
          if (!res.headersSent) res.writeHead(500, { 'content-type': 'text/plain' });
          res.end(`${(err as Error).message}\n`);
        });
      },
    );
    server.maxRequestsPerSocket = HTTP_DEFAULTS.maxRequestsPerSocket;
    const max = this.options.maxConnections ?? HTTP_DEFAULTS.maxConnections;
    capConnections(server, max, (remote) => {
      this.counters.refusedConnections++;
      this.limitHit('maxConnections', { remote, max });
    });
    server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => this.clientError(err, socket));
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

  /** Counts what went wrong, answers it in one line if the socket still can, and closes (not half: a client that does not read would hold it open). */
  private clientError(err: NodeJS.ErrnoException, socket: Duplex): void {
    let status = 400;
    if (err.code === 'ERR_HTTP_REQUEST_TIMEOUT' || err.code === 'ERR_HTTP_HEADERS_TIMEOUT') {
      status = 408;
      this.counters.timeouts++;
      this.limitHit('timeout', { err: err.code });
    } else if (err.code !== 'ECONNRESET') {
      if (err.code === 'HPE_HEADER_OVERFLOW') status = 431;
      this.counters.badRequests++;
      this.limitHit('badRequest', { err: err.code ?? err.message });
    }
    if (socket.writable && err.code !== 'ECONNRESET') socket.write(`HTTP/1.1 ${status} ${status === 408 ? 'Request Timeout' : 'Bad Request'}\r\nconnection: close\r\n\r\n`);
    socket.destroy();
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      // Closing, rather than reading and discarding whatever body it announced.
      res.writeHead(405, { allow: 'GET, HEAD', connection: 'close' }).end();
      return;
    }
    if (path?.startsWith('/v1/') && !this.authorized(req)) {
      res.writeHead(401, { 'www-authenticate': 'Bearer realm="torus"', 'content-type': 'text/plain' }).end('a bearer token is required for /v1/\n');
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

  /** Compared as digests, in constant time: the length of a wrong guess tells nothing either. */
  private authorized(req: IncomingMessage): boolean {
    const token = this.options.bearerToken;
    if (token === undefined) return true;
    const m = /^Bearer\s+(\S+)\s*$/i.exec(req.headers.authorization ?? '');
    if (!m) return false;
    const digest = (t: string): Buffer => createHash('sha256').update(t).digest();
    return timingSafeEqual(digest(m[1]!), digest(token));
  }

  async close(): Promise<void> {
    const s = this.server;
    if (!s) return;
    this.server = undefined;
    s.closeAllConnections();
    await new Promise<void>((r) => s.close(() => r()));
  }
}
