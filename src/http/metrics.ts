import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

// The only module that knows about Prometheus. Other modules keep plain counters (their stats()
// objects); at scrape time a collect function turns them into samples, and this module turns
// samples into metrics. Latencies, which need histograms, come in through observeRpc().

export interface MetricSample {
  readonly name: string;
  readonly help: string;
  /** Counters are monotonic totals read from a stats object; gauges are levels. */
  readonly type: 'counter' | 'gauge';
  readonly value: number;
  readonly labels?: Readonly<Record<string, string>>;
}

/** A counter sample (a total read from a stats object). */
export function counterSample(name: string, help: string, value: number): MetricSample {
  return { name, help, type: 'counter', value };
}

/** One counter with a label, a sample per value of it: `{ budget: 3, requests: 0 }` by `limit`. */
export function labelledCounters(name: string, help: string, label: string, values: Readonly<Record<string, number>>): MetricSample[] {
  return Object.entries(values).map(([key, value]) => ({ name, help, type: 'counter', value, labels: { [label]: key } }));
}

export class NodeMetrics {
  readonly registry = new Registry();
  private readonly gauges = new Map<string, Gauge>();
  private readonly counters = new Map<string, { metric: Counter; last: Map<string, number> }>();
  private readonly rpcLatency: Histogram;
  private readonly rpcErrors: Counter;
  private volume: { latency: Histogram; requests: Counter; bytes: Counter; errors: Counter } | undefined;

  constructor(private readonly collect: () => MetricSample[]) {
    collectDefaultMetrics({ register: this.registry, prefix: 'torus_' });
    this.rpcLatency = new Histogram({
      name: 'torus_rpc_request_seconds',
      help: 'Peer RPC request latency by peer and operation',
      labelNames: ['peer', 'op'],
      buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
      registers: [this.registry],
    });
    this.rpcErrors = new Counter({
      name: 'torus_rpc_request_errors_total',
      help: 'Peer RPC requests that failed, by peer, operation and error code',
      labelNames: ['peer', 'op', 'code'],
      registers: [this.registry],
    });
  }

  observeRpc(peer: string, op: string, seconds: number, errorCode?: string): void {
    this.rpcLatency.observe({ peer, op }, seconds);
    if (errorCode) this.rpcErrors.inc({ peer, op, code: errorCode });
  }

  /**
   * One request on a volume served by this process (torusblk's NBD and AoE front ends), measured
   * at the device: latency by operation, bytes, and errors by code. The histograms exist only in
   * processes that serve volumes.
   */
  observeVolumeIo(volume: string, op: string, seconds: number, bytes: number, errorCode?: string): void {
    this.volume ??= {
      latency: new Histogram({
        name: 'torus_volume_request_seconds',
        help: 'Volume request latency at the device, by volume and operation (flush: until the data is on R replicas and the head moved in etcd)',
        labelNames: ['volume', 'op'],
        buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
        registers: [this.registry],
      }),
      requests: new Counter({ name: 'torus_volume_requests_total', help: 'Volume requests completed, by volume and operation', labelNames: ['volume', 'op'], registers: [this.registry] }),
      bytes: new Counter({ name: 'torus_volume_bytes_total', help: 'Bytes read and written on a volume, by direction', labelNames: ['volume', 'direction'], registers: [this.registry] }),
      errors: new Counter({ name: 'torus_volume_errors_total', help: 'Volume requests that failed, by volume, operation and error code', labelNames: ['volume', 'op', 'code'], registers: [this.registry] }),
    };
    const v = this.volume;
    v.latency.observe({ volume, op }, seconds);
    if (errorCode) {
      v.errors.inc({ volume, op, code: errorCode });
      return;
    }
    v.requests.inc({ volume, op });
    if (bytes > 0 && op === 'read') v.bytes.inc({ volume, direction: 'read' }, bytes);
    else if (bytes > 0 && (op === 'write' || op === 'write_zeroes')) v.bytes.inc({ volume, direction: 'write' }, bytes);
  }

  private apply(s: MetricSample): void {
    const labels = s.labels ?? {};
    const labelNames = Object.keys(labels).sort();
    if (s.type === 'gauge') {
      let g = this.gauges.get(s.name);
      if (!g) {
        g = new Gauge({ name: s.name, help: s.help, labelNames, registers: [this.registry] });
        this.gauges.set(s.name, g);
      }
      g.set(labels, s.value);
      return;
    }
    let c = this.counters.get(s.name);
    if (!c) {
      c = { metric: new Counter({ name: s.name, help: s.help, labelNames, registers: [this.registry] }), last: new Map() };
      this.counters.set(s.name, c);
    }
    const key = JSON.stringify(labelNames.map((k) => labels[k]));
    const prev = c.last.get(key) ?? 0;
    // A source that restarted (a reconnected client, say) counts again from zero.
    const delta = s.value >= prev ? s.value - prev : s.value;
    c.last.set(key, s.value);
    if (delta > 0) c.metric.inc(labels, delta);
    else c.metric.inc(labels, 0);
  }

  async render(): Promise<{ contentType: string; body: string }> {
    // A gauge shows what its source reports now: the series of a closed volume go with it.
    for (const g of this.gauges.values()) g.reset();
    for (const s of this.collect()) this.apply(s);
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }
}
