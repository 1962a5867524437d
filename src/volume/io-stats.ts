import { hostname } from 'node:os';
import { toTorusError } from '../core/errors.js';
import type { BlockDevice, DeviceInfo, DeviceProvider, KVSession, MetaKV } from '../core/interfaces.js';

// Per-volume I/O accounting for the front ends (NBD, AoE): every device a provider hands out is
// wrapped, so both servers are measured the same way, at the device, without either knowing.
// Counters live here as plain numbers; latencies go to an observer (torusblk's Prometheus
// metrics, src/http), and the holder publishes its rates in etcd for `torusctl volume info`.

export type IoOp = 'read' | 'write' | 'flush' | 'trim' | 'write_zeroes' | 'block_status';

export interface IoTotals {
  reads: number;
  writes: number;
  flushes: number;
  trims: number;
  readBytes: number;
  writtenBytes: number;
  errors: number;
  inFlight: number;
}

export type IoObserver = (volume: string, op: IoOp, seconds: number, bytes: number, errorCode?: string) => void;

function zero(): IoTotals {
  return { reads: 0, writes: 0, flushes: 0, trims: 0, readBytes: 0, writtenBytes: 0, errors: 0, inFlight: 0 };
}

export class VolumeIo {
  private readonly totals = new Map<string, IoTotals>();

  constructor(private readonly observer?: IoObserver) {}

  /** Totals per export name since this process started. */
  all(): ReadonlyMap<string, Readonly<IoTotals>> {
    return this.totals;
  }

  private of(volume: string): IoTotals {
    let t = this.totals.get(volume);
    if (!t) this.totals.set(volume, (t = zero()));
    return t;
  }

  private async measure<T>(volume: string, op: IoOp, bytes: number, fn: () => Promise<T>): Promise<T> {
    const t = this.of(volume);
    const start = process.hrtime.bigint();
    t.inFlight++;
    let code: string | undefined;
    try {
      return await fn();
    } catch (err) {
      t.errors++;
      code = toTorusError(err).code;
      throw err;
    } finally {
      t.inFlight--;
      if (code === undefined) {
        if (op === 'read') {
          t.reads++;
          t.readBytes += bytes;
        } else if (op === 'write' || op === 'write_zeroes') {
          t.writes++;
          t.writtenBytes += bytes;
        } else if (op === 'flush') t.flushes++;
        else if (op === 'trim') t.trims++;
      }
      this.observer?.(volume, op, Number(process.hrtime.bigint() - start) / 1e9, code === undefined ? bytes : 0, code);
    }
  }

  /** The same device, measured. FUA writes count as writes: their sync is part of their latency. */
  wrap(volume: string, d: BlockDevice): BlockDevice {
    const m = <T>(op: IoOp, bytes: number, fn: () => Promise<T>): Promise<T> => this.measure(volume, op, bytes, fn);
    const wrapped: BlockDevice = {
      get size() {
        return d.size;
      },
      blockSize: d.blockSize,
      readOnly: d.readOnly,
      read: (offset, length) => m('read', length, () => d.read(offset, length)),
      write: (offset, data, fua, adopt) => m('write', data.length, () => d.write(offset, data, fua, adopt)),
      flush: () => m('flush', 0, () => d.flush()),
      trim: (offset, length) => m('trim', 0, () => d.trim(offset, length)),
      writeZeroes: (offset, length, opts) => m('write_zeroes', length, () => d.writeZeroes(offset, length, opts)),
      blockStatus: (offset, length) => m('block_status', 0, () => d.blockStatus(offset, length)),
    };
    if (d.readv) {
      const readv = d.readv.bind(d);
      wrapped.readv = (offset, length) => m('read', length, () => readv(offset, length));
    }
    if (d.readInto) {
      const readInto = d.readInto.bind(d);
      wrapped.readInto = (offset, into) => m('read', into.length, () => readInto(offset, into));
    }
    // The NBD server describes exports by the device's own description, when it has one.
    const description = (d as { description?: unknown }).description;
    if (typeof description === 'string') Object.assign(wrapped, { description });
    return wrapped;
  }
}

/** A provider whose devices are measured by `io`, by export name. */
export class MeasuredProvider implements DeviceProvider {
  constructor(
    private readonly inner: DeviceProvider,
    readonly io: VolumeIo,
  ) {}

  list(): Promise<string[]> {
    return this.inner.list();
  }

  async open(name: string, opts: { readOnly: boolean }): Promise<{ device: BlockDevice; release(): Promise<void> }> {
    const got = await this.inner.open(name, opts);
    return { device: this.io.wrap(name, got.device), release: () => got.release() };
  }

  /** Passed through: without it a front end would open (and lock) a volume just to describe it. */
  async info(name: string, opts: { readOnly: boolean }): Promise<DeviceInfo> {
    if (this.inner.info) return this.inner.info(name, opts);
    const { device, release } = await this.inner.open(name, opts);
    await release();
    return { size: device.size, blockSize: device.blockSize, readOnly: device.readOnly };
  }
}

const STATS = '/torus/volumestats/';

/** What the process serving a volume says about its I/O, under its lease: `torusctl volume info` reads it. */
export interface PublishedIo {
  readonly host: string;
  readonly pid: number;
  /** ISO 8601. */
  readonly at: string;
  readonly intervalSec: number;
  readonly totals: IoTotals;
  /** Per second over the last interval. */
  readonly rates: { readOps: number; writeOps: number; flushOps: number; readBytes: number; writtenBytes: number };
}

export async function readPublishedIo(kv: MetaKV, volume: string): Promise<PublishedIo | undefined> {
  const e = await kv.get(STATS + volume);
  if (!e) return undefined;
  try {
    return JSON.parse(e.value) as PublishedIo;
  } catch {
    return undefined;
  }
}

/**
 * Publishes every volume's I/O totals and rates every `intervalMs`, bound to `session`'s lease so
 * a dead process's figures vanish with it. Returns a stop function.
 */
export function publishIo(kv: MetaKV, session: () => Promise<KVSession>, io: VolumeIo, intervalMs: number, onError?: (err: Error) => void): () => Promise<void> {
  const prev = new Map<string, { t: number; totals: IoTotals }>();
  let timer: NodeJS.Timeout | undefined;
  let running: Promise<void> | undefined;
  let stopped = false;
  const once = async (): Promise<void> => {
    const s = await session();
    const now = Date.now();
    for (const [volume, t] of io.all()) {
      // Only exports named as volumes (VOLUME@SNAP exports have no record of their own).
      if (volume.includes('@')) continue;
      const p = prev.get(volume);
      const secs = p ? Math.max(0.001, (now - p.t) / 1000) : 0;
      const rate = (a: number, b: number): number => (secs > 0 ? Math.round(((a - b) / secs) * 10) / 10 : 0);
      const rec: PublishedIo = {
        host: hostname(),
        pid: process.pid,
        at: new Date(now).toISOString(),
        intervalSec: Math.round(secs),
        totals: { ...t },
        rates: {
          readOps: rate(t.reads, p?.totals.reads ?? 0),
          writeOps: rate(t.writes, p?.totals.writes ?? 0),
          flushOps: rate(t.flushes, p?.totals.flushes ?? 0),
          readBytes: rate(t.readBytes, p?.totals.readBytes ?? 0),
          writtenBytes: rate(t.writtenBytes, p?.totals.writtenBytes ?? 0),
        },
      };
      prev.set(volume, { t: now, totals: { ...t } });
      await kv.txn([], [{ op: 'put', key: STATS + volume, value: JSON.stringify(rec), session: s }]);
    }
  };
  const loop = (): void => {
    timer = setTimeout(() => {
      running = once()
        .catch((err: unknown) => onError?.(toTorusError(err)))
        .finally(() => {
          running = undefined;
          if (!stopped) loop();
        });
    }, intervalMs);
    timer.unref();
  };
  loop();
  return async () => {
    stopped = true;
    clearTimeout(timer);
    await running;
    const names = [...io.all().keys()].filter((v) => !v.includes('@'));
    if (names.length > 0) await kv.txn([], names.map((v) => ({ op: 'delete' as const, key: STATS + v }))).catch(() => undefined);
  };
}
