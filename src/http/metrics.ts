import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

// The only module that knows about Prometheus. Other modules expose plain numbers (stats()
// functions, counters) and this one turns them into metrics at scrape time.

export interface NodeMetricsSource {
  capacityBlocks(): number;
  usedBlocks(): number;
  blockSize(): number;
  ringVersion(): number;
  peersSeen(): number;
}

export class NodeMetrics {
  readonly registry = new Registry();
  readonly heartbeats: Counter;
  readonly heartbeatFailures: Counter;
  readonly etcdLatency: Histogram;

  constructor(source: NodeMetricsSource) {
    collectDefaultMetrics({ register: this.registry, prefix: 'torus_' });
    const r = [this.registry];
    new Gauge({
      name: 'torus_storage_blocks_total',
      help: 'Capacity of the local block store, in blocks',
      registers: r,
      collect() {
        this.set(source.capacityBlocks());
      },
    });
    new Gauge({
      name: 'torus_storage_blocks',
      help: 'Blocks stored in the local block store',
      registers: r,
      collect() {
        this.set(source.usedBlocks());
      },
    });
    new Gauge({
      name: 'torus_storage_capacity_bytes',
      help: 'Capacity of the local block store, in bytes',
      registers: r,
      collect() {
        this.set(source.capacityBlocks() * source.blockSize());
      },
    });
    new Gauge({
      name: 'torus_storage_used_bytes',
      help: 'Bytes used in the local block store',
      registers: r,
      collect() {
        this.set(source.usedBlocks() * source.blockSize());
      },
    });
    new Gauge({
      name: 'torus_ring_version',
      help: 'Version of the ring this node currently follows',
      registers: r,
      collect() {
        this.set(source.ringVersion());
      },
    });
    new Gauge({
      name: 'torus_server_peers_total',
      help: 'Peers registered in etcd as of the last heartbeat',
      registers: r,
      collect() {
        this.set(source.peersSeen());
      },
    });
    this.heartbeats = new Counter({ name: 'torus_server_heartbeats_total', help: 'Heartbeats written to etcd', registers: r });
    this.heartbeatFailures = new Counter({ name: 'torus_server_heartbeat_failures_total', help: 'Heartbeats that failed', registers: r });
    this.etcdLatency = new Histogram({
      name: 'torus_etcd_heartbeat_seconds',
      help: 'Time to write a heartbeat to etcd',
      buckets: [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
      registers: r,
    });
  }

  async render(): Promise<{ contentType: string; body: string }> {
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }
}
