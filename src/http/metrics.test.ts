import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Counter, Histogram, Registry } from 'prom-client';
import { HotHistogram, NodeMetrics } from './metrics.js';

// The latency histograms on the request path are kept by hand (prom-client's observe cost 3 µs);
// what a scraper reads must not change for it: the same lines prom-client writes.

const BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];
const OBSERVED: readonly [string, string, number][] = [
  ['v1', 'write', 0.00007],
  ['v1', 'write', 0.0001],
  ['v1', 'flush', 0.00061],
  ['v1', 'flush', 0.0031],
  ['v1', 'flush', 7.5],
  ['v"2\\x\n', 'read', 0.02],
  ['v1', 'write', 0.3],
];

function samples(text: string): string[] {
  return text
    .split('\n')
    .filter((l) => l !== '' && !l.startsWith('#'))
    .sort();
}

test('a hot histogram renders what prom-client renders for the same observations', async () => {
  const registry = new Registry();
  const reference = new Histogram({ name: 'x_seconds', help: 'h', labelNames: ['volume', 'op'], buckets: BUCKETS, registers: [registry] });
  const hot = new HotHistogram('x_seconds', 'h', ['volume', 'op'], BUCKETS);
  for (const [volume, op, s] of OBSERVED) {
    reference.observe({ volume, op }, s);
    hot.observe(volume, op, s);
  }
  const want = await registry.metrics();
  const got = hot.render();
  assert.deepEqual(samples(got), samples(want));
  assert.match(got, /^# TYPE x_seconds histogram$/m);
  // Cumulative buckets, +Inf equal to the count (7.5 s is above every bucket).
  assert.match(got, /^x_seconds_bucket\{le="0.005",volume="v1",op="flush"\} 2$/m);
  assert.match(got, /^x_seconds_bucket\{le="\+Inf",volume="v1",op="flush"\} 3$/m);
  assert.match(got, /^x_seconds_bucket\{le="0.0001",volume="v1",op="write"\} 2$/m);
});

test('a node scrape carries the volume and RPC series, counted as prom-client counted them', async () => {
  const m = new NodeMetrics(() => []);
  const registry = new Registry();
  const requests = new Counter({ name: 'torus_volume_requests_total', help: 'h', labelNames: ['volume', 'op'], registers: [registry] });
  const bytes = new Counter({ name: 'torus_volume_bytes_total', help: 'h', labelNames: ['volume', 'direction'], registers: [registry] });
  const io: [string, string, number, number, string?][] = [
    ['v', 'write', 0.0001, 4096],
    ['v', 'write', 0.0002, 8192],
    ['v', 'write_zeroes', 0.0002, 65536],
    ['v', 'read', 0.0004, 4096],
    ['v', 'flush', 0.0006, 0],
    ['v', 'flush', 0.0009, 0, 'NO_PEER'],
    ['w', 'read', 0.0004, 512],
  ];
  for (const [volume, op, s, n, code] of io) {
    m.observeVolumeIo(volume, op, s, n, code);
    if (code) continue;
    requests.inc({ volume, op });
    if (n > 0) bytes.inc({ volume, direction: op === 'read' ? 'read' : 'write' }, n);
  }
  m.observeRpc('peer-a', 'append', 0.0003);
  m.observeRpc('peer-a', 'append', 0.002, 'TIMEOUT');
  const { body } = await m.render();
  const want = samples(await registry.metrics());
  for (const line of want) assert.ok(body.split('\n').includes(line), `${line} in\n${body}`);
  assert.match(body, /^torus_volume_request_seconds_count\{volume="v",op="flush"\} 2$/m);
  assert.match(body, /^torus_volume_errors_total\{volume="v",op="flush",code="NO_PEER"\} 1$/m);
  assert.match(body, /^torus_rpc_request_seconds_count\{peer="peer-a",op="append"\} 2$/m);
  assert.match(body, /^torus_rpc_request_errors_total\{peer="peer-a",op="append",code="TIMEOUT"\} 1$/m);
  // Every family once, and prom-client's own metrics still there.
  for (const family of ['torus_volume_request_seconds', 'torus_volume_requests_total', 'torus_rpc_request_seconds', 'torus_process_cpu_seconds_total']) {
    assert.equal(body.split('\n').filter((l) => l === `# TYPE ${family} ${family.endsWith('_seconds') ? 'histogram' : 'counter'}`).length, 1, family);
  }
});
