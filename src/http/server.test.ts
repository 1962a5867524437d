import assert from 'node:assert/strict';
import https from 'node:https';
import net from 'node:net';
import { after, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { throwawayCertificate } from '../cli/shared/certs.js';
import { NodeMetrics } from './metrics.js';
import { HttpServer, type HttpServerOptions } from './server.js';

// The node's HTTP endpoint against clients that hold on, dribble, pipeline without reading or
// send bodies (issue 13): each is cut off and counted, and the endpoint keeps answering.

const servers: HttpServer[] = [];
after(async () => {
  for (const s of servers) await s.close();
});

async function start(opts: HttpServerOptions = {}) {
  let healthCalls = 0;
  const server = new HttpServer(new NodeMetrics(() => []), {
    problems: () => {
      healthCalls++;
      return [];
    },
    status: () => ({}),
  }, {}, opts);
  servers.push(server);
  const { port } = await server.listen('127.0.0.1', 0);
  const open = (): net.Socket => {
    const s = net.connect(port, '127.0.0.1');
    s.on('error', () => {});
    // Reading, so that the server's closing is seen (a socket whose data sits unread never ends).
    s.resume();
    return s;
  };
  const closed = (s: net.Socket): Promise<void> => new Promise((r) => (s.destroyed ? r() : s.once('close', () => r())));
  const get = async (path: string): Promise<number> => (await fetch(`http://127.0.0.1:${port}${path}`)).status;
  return { server, open, closed, get, healthCalls: () => healthCalls };
}

async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, rej) => (t = setTimeout(() => rej(new Error(`timed out: ${what}`)), ms)))]);
  } finally {
    clearTimeout(t);
  }
}

test('takes at most maxConnections; more are closed on arrival and counted', async () => {
  const h = await start({ maxConnections: 2 });
  const held = [h.open(), h.open()];
  await sleep(50);
  const extra = h.open();
  await within(h.closed(extra), 5000, 'the extra connection closed');
  assert.equal(h.server.stats().refusedConnections, 1);
  for (const s of held) s.destroy();
  await sleep(50);
  assert.equal(await h.get('/healthz'), 200);
});

test('a client that sends nothing, or dribbles its headers, is cut off after the request timeout', async () => {
  const h = await start({ requestTimeoutMs: 400 });
  const silent = h.open();
  const dribbler = h.open();
  dribbler.write('GET /metrics HTTP/1.1\r\n');
  const drip = setInterval(() => dribbler.write('X-A: b\r\n'), 50);
  try {
    await within(Promise.all([h.closed(silent), h.closed(dribbler)]), 5000, 'slow clients cut off');
  } finally {
    clearInterval(drip);
  }
  assert.ok(h.server.stats().timeouts >= 1);
  assert.equal(await h.get('/healthz'), 200);
});

test('a client pipelining requests without reading gets at most 8 answered, the rest a 503', async () => {
  const h = await start();
  const s = h.open();
  s.pause();
  s.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'.repeat(2000));
  await sleep(300);
  assert.equal(h.healthCalls(), 8, `${h.healthCalls()} pipelined requests were answered`);
  let replies = '';
  s.on('data', (d: Buffer) => (replies += d.toString()));
  s.resume();
  await sleep(300);
  assert.equal(replies.match(/^HTTP\/1\.1 200/gm)?.length, 8);
  assert.ok((replies.match(/^HTTP\/1\.1 503/gm)?.length ?? 0) > 0);
  s.destroy();
});

test('a request with a body is refused and its connection closed, the body unread', async () => {
  const h = await start();
  const s = h.open();
  let reply = '';
  s.on('data', (d: Buffer) => (reply += d.toString()));
  s.write('POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n');
  s.write(Buffer.alloc(64 * 1024));
  await within(h.closed(s), 5000, 'the connection closed');
  assert.match(reply, /^HTTP\/1\.1 405/);
});

async function startWith(opts: HttpServerOptions): Promise<number> {
  const server = new HttpServer(new NodeMetrics(() => []), { problems: () => [], status: () => ({ uuid: 'node-status' }) }, {}, opts);
  servers.push(server);
  return (await server.listen('127.0.0.1', 0)).port;
}

test('with a bearer token, /v1/* answers only requests that bear it; /metrics and /healthz stay open', async () => {
  const port = await startWith({ bearerToken: 'correct-horse-battery-staple' });
  const url = (p: string): string => `http://127.0.0.1:${port}${p}`;
  const none = await fetch(url('/v1/status'));
  assert.equal(none.status, 401);
  assert.equal(none.headers.get('www-authenticate'), 'Bearer realm="torus"');
  assert.doesNotMatch(await none.text(), /node-status/);
  for (const bad of ['Bearer wrong', 'Bearer correct-horse-battery-stapl', 'Basic Y29ycmVjdA==', 'correct-horse-battery-staple'])
    assert.equal((await fetch(url('/v1/status'), { headers: { authorization: bad } })).status, 401, bad);
  const good = await fetch(url('/v1/status'), { headers: { authorization: 'Bearer correct-horse-battery-staple' } });
  assert.equal(good.status, 200);
  assert.match(await good.text(), /node-status/);
  assert.equal((await fetch(url('/metrics'))).status, 200);
  assert.equal((await fetch(url('/healthz'))).status, 200);
});

test('over TLS: HTTPS with the given certificate, and plaintext HTTP gets no answer', async () => {
  const port = await startWith({ tls: await throwawayCertificate() });
  const body = await new Promise<string>((resolve, reject) => {
    https
      .get({ host: '127.0.0.1', port, path: '/healthz', rejectUnauthorized: false }, (res) => {
        let b = '';
        res.on('data', (d: Buffer) => (b += d.toString()));
        res.on('end', () => resolve(b));
      })
      .on('error', reject);
  });
  assert.equal(body, 'ok\n');
  await assert.rejects(fetch(`http://127.0.0.1:${port}/healthz`, { signal: AbortSignal.timeout(5000) }));
});
