import { TorusError } from '../core/errors.js';
import type { BlockDevice, DeviceProvider, Extent } from '../core/interfaces.js';

// An in-memory BlockDevice and a provider of named ones: the twin a Torus volume is tested
// against (STYLE habit 7). Sparse: a block has storage only once written, so blockStatus can
// report holes for never-written and trimmed whole blocks as a volume does for unallocated
// blocks. Writes are copied into the device's own blocks, so callers may pass views (the NBD
// codec does) and reads return fresh buffers nobody else holds.

/** A block that is allocated and reads as zeros (WRITE_ZEROES with NO_HOLE): no memory behind it. */
const ZERO_BLOCK = Symbol('zero block');
type Block = Buffer | typeof ZERO_BLOCK;

export type DeviceOp = 'read' | 'write' | 'flush' | 'trim' | 'writeZeroes' | 'blockStatus';

export interface MemoryDeviceOptions {
  readonly size: number;
  /** Allocation granularity, a power of two; 64 KiB by default. */
  readonly blockSize?: number;
  readonly readOnly?: boolean;
  /** Delay before each operation completes, in ms (a number, or a function called per op). */
  readonly latencyMs?: number | ((op: DeviceOp) => number);
  /** Shown to NBD clients as the export description. */
  readonly description?: string;
}

export interface MemoryDeviceStats {
  reads: number;
  writes: number;
  fuaWrites: number;
  flushes: number;
  trims: number;
  zeroes: number;
  blockStatus: number;
  /** Writes (including trims and zeroes) completed since the last flush began. */
  unflushed: number;
  /** Operations running right now, and the most seen at once. */
  active: number;
  peakActive: number;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class MemoryDevice implements BlockDevice {
  readonly size: number;
  readonly blockSize: number;
  readonly readOnly: boolean;
  readonly description: string | undefined;
  readonly stats: MemoryDeviceStats = { reads: 0, writes: 0, fuaWrites: 0, flushes: 0, trims: 0, zeroes: 0, blockStatus: 0, unflushed: 0, active: 0, peakActive: 0 };
  /**
   * Called before every operation; a returned error is thrown instead of doing it. Tests use it
   * to make a device fail the way a volume would (BLOCK_UNAVAILABLE, OUT_OF_SPACE, LOCKED...).
   */
  fault: ((op: DeviceOp, offset: number, length: number) => TorusError | undefined) | undefined;
  private latency: number | ((op: DeviceOp) => number);
  private readonly blocks = new Map<number, Block>();

  constructor(options: MemoryDeviceOptions) {
    const blockSize = options.blockSize ?? 64 * 1024;
    if (!Number.isSafeInteger(options.size) || options.size < 0) throw new TorusError('INVALID_ARGUMENT', `device size ${options.size} is not a byte count`);
    if (!Number.isInteger(blockSize) || blockSize < 1 || (blockSize & (blockSize - 1)) !== 0 || blockSize > 2 ** 30)
      throw new TorusError('INVALID_ARGUMENT', `block size ${blockSize} is not a power of two up to 1 GiB`);
    this.size = options.size;
    this.blockSize = blockSize;
    this.readOnly = options.readOnly ?? false;
    this.description = options.description;
    this.latency = options.latencyMs ?? 0;
  }

  setLatency(latency: number | ((op: DeviceOp) => number)): void {
    this.latency = latency;
  }

  /** Blocks with storage (data or allocated zeros). */
  get allocatedBlocks(): number {
    return this.blocks.size;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    await this.begin('read', offset, length, false);
    try {
      this.stats.reads++;
      const out = Buffer.alloc(length);
      this.forEachBlock(offset, length, (index, start, end, at) => {
        const b = this.blocks.get(index);
        if (b !== undefined && b !== ZERO_BLOCK) out.set(b.subarray(start, end), at);
      });
      return out;
    } finally {
      this.stats.active--;
    }
  }

  async write(offset: number, data: Uint8Array, fua = false): Promise<void> {
    await this.begin('write', offset, data.length, true);
    try {
      this.stats.writes++;
      if (fua) this.stats.fuaWrites++;
      this.forEachBlock(offset, data.length, (index, start, end, at) => {
        this.materialize(index).set(data.subarray(at, at + end - start), start);
      });
      if (!fua) this.stats.unflushed++;
    } finally {
      this.stats.active--;
    }
  }

  async flush(): Promise<void> {
    // Everything completed before this call is covered: memory is as durable as it gets, so the
    // bookkeeping is all there is. Counted before the delay so that writes completing during
    // the delay stay unflushed, as they would on a real device.
    const covered = this.stats.unflushed;
    await this.begin('flush', 0, 0, false);
    try {
      this.stats.flushes++;
      this.stats.unflushed -= covered;
    } finally {
      this.stats.active--;
    }
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.begin('trim', offset, length, true);
    try {
      this.stats.trims++;
      this.zeroRange(offset, length, false);
      this.stats.unflushed++;
    } finally {
      this.stats.active--;
    }
  }

  async writeZeroes(offset: number, length: number, opts: { noHole?: boolean; fua?: boolean } = {}): Promise<void> {
    await this.begin('writeZeroes', offset, length, true);
    try {
      this.stats.zeroes++;
      this.zeroRange(offset, length, opts.noHole ?? false);
      if (opts.fua) this.stats.fuaWrites++;
      else this.stats.unflushed++;
    } finally {
      this.stats.active--;
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    await this.begin('blockStatus', offset, length, false);
    try {
      this.stats.blockStatus++;
      const out: Extent[] = [];
      const add = (len: number, hole: boolean, zero: boolean): void => {
        const last = out[out.length - 1];
        if (last && last.hole === hole && last.zero === zero) out[out.length - 1] = { length: last.length + len, hole, zero };
        else out.push({ length: len, hole, zero });
      };
      if (length === 0) return [{ length: 0, hole: false, zero: false }];
      const bs = this.blockSize;
      const firstIndex = Math.floor(offset / bs);
      const lastIndex = Math.floor((offset + length - 1) / bs);
      const clip = (index: number): number => Math.min((index + 1) * bs, offset + length) - Math.max(index * bs, offset);
      if (lastIndex - firstIndex + 1 > 4 * this.blocks.size) {
        // A mostly empty range: visit only the allocated blocks, the rest is one hole.
        const allocated = [...this.blocks.keys()].filter((i) => i >= firstIndex && i <= lastIndex).sort((a, b) => a - b);
        let pos = offset;
        for (const index of allocated) {
          const start = Math.max(index * bs, offset);
          if (start > pos) add(start - pos, true, true);
          add(clip(index), false, this.blocks.get(index) === ZERO_BLOCK);
          pos = start + clip(index);
        }
        if (pos < offset + length) add(offset + length - pos, true, true);
      } else {
        for (let index = firstIndex; index <= lastIndex; index++) {
          const b = this.blocks.get(index);
          add(clip(index), b === undefined, b === undefined || b === ZERO_BLOCK);
        }
      }
      return out;
    } finally {
      this.stats.active--;
    }
  }

  private async begin(op: DeviceOp, offset: number, length: number, writes: boolean): Promise<void> {
    const ms = typeof this.latency === 'function' ? this.latency(op) : this.latency;
    if (ms > 0) await sleep(ms);
    if (writes && this.readOnly) throw new TorusError('INVALID_ARGUMENT', 'device is read-only');
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size)
      throw new TorusError('INVALID_ARGUMENT', `range ${offset}+${length} is outside the ${this.size}-byte device`);
    const injected = this.fault?.(op, offset, length);
    if (injected) throw injected;
    this.stats.active++;
    if (this.stats.active > this.stats.peakActive) this.stats.peakActive = this.stats.active;
  }

  /** Calls fn for each block touched by the range: block index, range inside the block, position in the range. */
  private forEachBlock(offset: number, length: number, fn: (index: number, start: number, end: number, at: number) => void): void {
    const bs = this.blockSize;
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const index = Math.floor(pos / bs);
      const start = pos - index * bs;
      const stop = Math.min(bs, end - index * bs);
      fn(index, start, stop, pos - offset);
      pos = index * bs + stop;
    }
  }

  private materialize(index: number): Buffer {
    const b = this.blocks.get(index);
    if (b !== undefined && b !== ZERO_BLOCK) return b;
    const fresh = Buffer.alloc(this.blockSize);
    this.blocks.set(index, fresh);
    return fresh;
  }

  private zeroRange(offset: number, length: number, noHole: boolean): void {
    const bs = this.blockSize;
    this.forEachBlock(offset, length, (index, start, end) => {
      const b = this.blocks.get(index);
      const whole = start === 0 && (end === bs || index * bs + end === this.size);
      if (whole) {
        if (noHole) this.blocks.set(index, ZERO_BLOCK);
        else this.blocks.delete(index);
      } else if (b !== undefined && b !== ZERO_BLOCK) {
        b.fill(0, start, end);
      } else if (b === undefined && noHole) {
        // the rest of an absent block reads as zeros too, so allocating it all is exact
        this.blocks.set(index, ZERO_BLOCK);
      }
    });
  }
}

export interface MemoryDeviceProviderOptions {
  /** The export served for the empty name; none by default (clients get "unknown export"). */
  readonly defaultExport?: string;
}

/**
 * Named MemoryDevices. `open` hands every connection of a name the same device object, which
 * is what lets the NBD server advertise multi-conn: a FLUSH on one connection is a flush of the
 * one device all of them write to. Read-only opens get a read-only view of that same device.
 */
export class MemoryDeviceProvider implements DeviceProvider {
  private readonly devices = new Map<string, MemoryDevice>();
  private readonly defaultExport: string | undefined;
  /** Opens not yet released, per name. */
  readonly openCount = new Map<string, number>();

  constructor(devices: Record<string, MemoryDevice> = {}, options: MemoryDeviceProviderOptions = {}) {
    for (const [name, d] of Object.entries(devices)) this.devices.set(name, d);
    this.defaultExport = options.defaultExport;
  }

  add(name: string, device: MemoryDevice): MemoryDevice {
    this.devices.set(name, device);
    return device;
  }

  create(name: string, options: MemoryDeviceOptions): MemoryDevice {
    return this.add(name, new MemoryDevice(options));
  }

  get(name: string): MemoryDevice | undefined {
    return this.devices.get(name);
  }

  list(): Promise<string[]> {
    return Promise.resolve([...this.devices.keys()]);
  }

  open(name: string, opts: { readOnly: boolean }): Promise<{ device: BlockDevice; release(): Promise<void> }> {
    const resolved = name === '' && this.defaultExport !== undefined ? this.defaultExport : name;
    const device = this.devices.get(resolved);
    if (!device) return Promise.reject(new TorusError('NOT_EXIST', `no export named "${name}"`));
    this.openCount.set(resolved, (this.openCount.get(resolved) ?? 0) + 1);
    let released = false;
    return Promise.resolve({
      device: opts.readOnly && !device.readOnly ? readOnlyView(device) : device,
      release: () => {
        if (!released) {
          released = true;
          this.openCount.set(resolved, (this.openCount.get(resolved) ?? 1) - 1);
        }
        return Promise.resolve();
      },
    });
  }
}

/** The same device with writes refused, so read-only and read-write users share one cache. */
function readOnlyView(d: MemoryDevice): BlockDevice & { readonly description: string | undefined } {
  const refuse = (): Promise<never> => Promise.reject(new TorusError('INVALID_ARGUMENT', 'device is open read-only'));
  return {
    size: d.size,
    blockSize: d.blockSize,
    readOnly: true,
    description: d.description,
    read: (o, l) => d.read(o, l),
    write: refuse,
    flush: () => d.flush(),
    trim: refuse,
    writeZeroes: refuse,
    blockStatus: (o, l) => d.blockStatus(o, l),
  };
}
