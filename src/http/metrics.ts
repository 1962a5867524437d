import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import { mallocStats, memoryReturns, type MallocStats } from '../core/malloc.js';

// The only module that knows about Prometheus. Other modules keep plain counters (their stats()
// objects); at scrape time a collect function turns them into samples, and this module turns
// samples into metrics. Latencies, which need histograms, come in through observeRpc() and
// observeVolumeIo().

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

const LATENCY_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];

function escapeLabel(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

/** `a="x",b="y"`: a series' labels in the exposition format, made once per series. */
function labelPairs(names: readonly [string, string], a: string, b: string): string {
  return `${names[0]}="${escapeLabel(a)}",${names[1]}="${escapeLabel(b)}"`;
}

/**
 * Series of a hot metric by its two label values, the first then the second: those are the same
 * string objects call after call (a volume's name, an operation), whose hashes V8 keeps, where a
 * key joined from both would be a new string to build and hash on every observation.
 */
class ByTwoLabels<V> {
  private readonly byA = new Map<string, Map<string, V>>();

  get(a: string, b: string): V | undefined {
    return this.byA.get(a)?.get(b);
  }

  set(a: string, b: string, v: V): void {
    let byB = this.byA.get(a);
    if (!byB) this.byA.set(a, (byB = new Map()));
    byB.set(b, v);
  }

  *values(): IterableIterator<V> {
    for (const byB of this.byA.values()) yield* byB.values();
  }
}

interface Series {
  readonly labels: string;
  /** Observations per bucket, not cumulative (summed when rendered). */
  readonly counts: Float64Array;
  sum: number;
  count: number;
}

/**
 * A latency histogram on the path a client waits on (every NBD request, every peer RPC).
 * prom-client validates and hashes the label set on each observe: about 3 µs, five times per
 * 4 KiB write+flush, measured as 3.5% of the serving node's CPU in P5. Here an observation is a
 * Map lookup and an increment, and the series become exposition text only at scrape time.
 */
export class HotHistogram {
  private readonly series = new ByTwoLabels<Series>();

  constructor(
    readonly name: string,
    private readonly help: string,
    private readonly labelNames: readonly [string, string],
    private readonly buckets: readonly number[],
  ) {}

  observe(a: string, b: string, seconds: number): void {
    let s = this.series.get(a, b);
    if (!s) {
      s = { labels: labelPairs(this.labelNames, a, b), counts: new Float64Array(this.buckets.length), sum: 0, count: 0 };
      this.series.set(a, b, s);
    }
    const i = this.buckets.findIndex((le) => seconds <= le);
    if (i >= 0) s.counts[i]!++;
    s.sum += seconds;
    s.count++;
  }

  /** The Prometheus text exposition format, as prom-client writes a histogram (`le` first). */
  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} histogram`];
    for (const s of this.series.values()) {
      let cumulative = 0;
      this.buckets.forEach((le, i) => {
        cumulative += s.counts[i]!;
        lines.push(`${this.name}_bucket{le="${le}",${s.labels}} ${cumulative}`);
      });
      lines.push(`${this.name}_bucket{le="+Inf",${s.labels}} ${s.count}`, `${this.name}_sum{${s.labels}} ${s.sum}`, `${this.name}_count{${s.labels}} ${s.count}`);
    }
    return lines.join('\n') + '\n';
  }
}

/** Plain totals by two labels for a hot path, rendered as a Prometheus counter at scrape time. */
class HotCounter {
  private readonly values = new ByTwoLabels<{ labels: string; value: number }>();

  constructor(
    private readonly name: string,
    private readonly help: string,
    private readonly labelNames: readonly [string, string],
  ) {}

  inc(a: string, b: string, by = 1): void {
    const v = this.values.get(a, b);
    if (v) v.value += by;
    else this.values.set(a, b, { labels: labelPairs(this.labelNames, a, b), value: by });
  }

  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} counter`];
    for (const v of this.values.values()) lines.push(`${this.name}{${v.labels}} ${v.value}`);
    return lines.join('\n') + '\n';
  }
}

export class NodeMetrics {
  readonly registry = new Registry();
  private readonly gauges = new Map<string, Gauge>();
  private readonly counters = new Map<string, { metric: Counter; last: Map<string, number> }>();
  private readonly rpcLatency = new HotHistogram('torus_rpc_request_seconds', 'Peer RPC request latency by peer and operation', ['peer', 'op'], LATENCY_BUCKETS);
  private readonly rpcErrors: Counter;
  private volume: { latency: HotHistogram; requests: HotCounter; bytes: HotCounter; errors: Counter } | undefined;

  constructor(private readonly collect: () => MetricSample[]) {
    collectDefaultMetrics({ register: this.registry, prefix: 'torus_' });
    this.mallocMetrics();
    this.rpcErrors = new Counter({
      name: 'torus_rpc_request_errors_total',
      help: 'Peer RPC requests that failed, by peer, operation and error code',
      labelNames: ['peer', 'op', 'code'],
      registers: [this.registry],
    });
  }

  /** What glibc's malloc holds beside V8's heap, and what the process gave back once quiet. */
  private mallocMetrics(): void {
    const registers = [this.registry];
    for (const [name, help, pick] of [
      ['torus_malloc_heap_bytes', "Memory malloc's arenas hold (Buffers' bytes live there), in use or free", (st: MallocStats) => st.heapBytes],
      ['torus_malloc_free_bytes', 'Of it, freed and kept for reuse; given back to the kernel once the process is quiet, past 64 MiB', (st: MallocStats) => st.freeBytes],
    ] as const) {
      new Gauge({
        name,
        help,
        registers,
        collect() {
          const st = mallocStats();
          if (st) this.set(pick(st));
        },
      });
    }
    let counted = 0;
    new Counter({
      name: 'torus_memory_returned_bytes_total',
      help: 'Resident bytes given back to the kernel once the process was quiet (a V8 collection, then malloc_trim), measured right after each',
      registers,
      collect() {
        const now = memoryReturns().returnedBytes;
        if (now > counted) this.inc(now - counted);
        counted = now;
      },
    });
  }

  observeRpc(peer: string, op: string, seconds: number, errorCode?: string): void {
    this.rpcLatency.observe(peer, op, seconds);
    if (errorCode) this.rpcErrors.inc({ peer, op, code: errorCode });
  }

  /**
   * One request on a volume served by this process (torusblk's NBD and AoE front ends), measured
   * at the device: latency by operation, bytes, and errors by code. The histograms exist only in
   * processes that serve volumes.
   */
  observeVolumeIo(volume: string, op: string, seconds: number, bytes: number, errorCode?: string): void {
    this.volume ??= {
      latency: new HotHistogram(
        'torus_volume_request_seconds',
        'Volume request latency at the device, by volume and operation (flush: until the data is on R replicas)',
        ['volume', 'op'],
        [...LATENCY_BUCKETS, 10],
      ),
      requests: new HotCounter('torus_volume_requests_total', 'Volume requests completed, by volume and operation', ['volume', 'op']),
      bytes: new HotCounter('torus_volume_bytes_total', 'Bytes read and written on a volume, by direction', ['volume', 'direction']),
      errors: new Counter({ name: 'torus_volume_errors_total', help: 'Volume requests that failed, by volume, operation and error code', labelNames: ['volume', 'op', 'code'], registers: [this.registry] }),
    };
    const v = this.volume;
    v.latency.observe(volume, op, seconds);
    if (errorCode) {
      v.errors.inc({ volume, op, code: errorCode });
      return;
    }
    v.requests.inc(volume, op);
    if (bytes > 0 && op === 'read') v.bytes.inc(volume, 'read', bytes);
    else if (bytes > 0 && (op === 'write' || op === 'write_zeroes')) v.bytes.inc(volume, 'write', bytes);
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
    const hot = [this.rpcLatency, ...(this.volume ? [this.volume.latency, this.volume.requests, this.volume.bytes] : [])];
    return { contentType: this.registry.contentType, body: (await this.registry.metrics()) + '\n' + hot.map((m) => m.render()).join('\n') };
  }
}
