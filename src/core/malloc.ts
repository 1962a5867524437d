// glibc malloc settings for the long-running processes (native/malloc_tuning.c says why): big
// Buffers reuse freed heap memory instead of fresh pages the kernel must fault in and zero on every
// allocation. TORUS_MALLOC_TUNING=0 keeps glibc's defaults (for comparisons, or if a workload's
// memory ever grows under these settings).

import v8 from 'node:v8';
import vm from 'node:vm';
import { loadNativeAddon } from './native.js';

interface MallocAddon {
  tune(mmapThreshold: number, trimThreshold: number): boolean;
  stats?(): MallocStats;
  trim?(): boolean;
}

/** What malloc's arenas hold (mmapped chunks included), and how much of that is free. */
export interface MallocStats {
  readonly heapBytes: number;
  readonly freeBytes: number;
}

/** Requests below this come from the heap, not from a fresh mmap (glibc's largest allowed, 32 MiB). */
export const MMAP_THRESHOLD = 32 * 2 ** 20;
/** Free memory at the heap top kept for reuse before it goes back to the kernel. */
export const TRIM_THRESHOLD = 64 * 2 ** 20;

let tuned: boolean | undefined;
let addon: MallocAddon | undefined;

/** Applies the settings once per process; true when they are in force. Never throws. */
export function tuneMalloc(env: NodeJS.ProcessEnv = process.env): boolean {
  if (tuned !== undefined) return tuned;
  if (env['TORUS_MALLOC_TUNING'] === '0') return (tuned = false);
  try {
    addon = loadNativeAddon<MallocAddon>('malloc_tuning');
    tuned = addon?.tune(MMAP_THRESHOLD, TRIM_THRESHOLD) ?? false;
  } catch {
    // A missing or broken build only costs speed.
    tuned = false;
  }
  return tuned;
}

/** malloc's figures; undefined without the addon or with glibc's defaults kept. */
export function mallocStats(): MallocStats | undefined {
  return tuned ? addon?.stats?.() : undefined;
}

export interface ReturnerOptions {
  /** How often to look (ms). */
  readonly intervalMs: number;
  /** Free malloc memory kept resident, however long the process is quiet. */
  readonly keepBytes: number;
  /** Looks in a row the event loop must have been busy for less than `quietShare` of the time. */
  readonly quietLooks: number;
  readonly quietShare: number;
}

// Idle, not merely lightly loaded: a full collection stops the process for as long as marking its
// live heap takes (140-260 ms for 258 MiB of live objects here), and a node serving a trickle of
// requests should not meet that. An idle node's event loop is about 1% busy.
export const RETURNER_DEFAULTS: ReturnerOptions = { intervalMs: 1000, keepBytes: TRIM_THRESHOLD, quietLooks: 3, quietShare: 0.05 };

/** The process's hooks a returner uses (tests give their own). */
export interface ReturnerHooks {
  stats(): MallocStats | undefined;
  trim(): void;
  rss(): number;
  /** V8's heap in use and the memory its objects hold outside it (Buffers), garbage not yet collected included. */
  heapUsed(): number;
  /** A full garbage collection; undefined when it cannot be asked for. */
  readonly gc: (() => void) | undefined;
}

/**
 * A full collection on request: V8 offers it only with --expose-gc, which a flag set now gives
 * to contexts made afterwards. Undefined if that ever stops working.
 */
function exposedGc(): (() => void) | undefined {
  try {
    v8.setFlagsFromString('--expose-gc');
    const gc: unknown = vm.runInNewContext('gc');
    return typeof gc === 'function' ? (gc as () => void) : undefined;
  } catch {
    return undefined;
  }
}

function processHooks(): ReturnerHooks {
  return {
    stats: mallocStats,
    trim: () => addon?.trim?.(),
    rss: () => process.memoryUsage.rss(),
    heapUsed: () => {
      const h = v8.getHeapStatistics();
      return h.used_heap_size + h.external_memory;
    },
    gc: exposedGc(),
  };
}

/**
 * Gives memory back to the kernel once the process has gone quiet, V8's garbage first, then what
 * malloc keeps free. Under load neither is collected eagerly: V8 lets garbage pile up to a few
 * times the live heap between full collections, and the malloc thresholds above keep freed
 * buffers resident so a busy node reuses them instead of faulting in fresh pages. After a burst
 * both would stay resident until the next one: a storage node that served a few benchmark jobs
 * held hundreds of MiB of them. A return waits for an idle event loop, so a node under load
 * keeps its buffers and sees no collection pause; the price is the page faults of the next
 * burst's first allocations, and a full collection's pause on an idle node, which follows the
 * live heap, not the garbage.
 */
export class MemoryReturner {
  private timer: NodeJS.Timeout | undefined;
  private quiet = 0;
  private elu = performance.eventLoopUtilization();
  private rssAfter: number | undefined;
  private heapAfter = 0;
  /** A collection happened and its memory has not been trimmed yet. */
  private trimOwed = false;
  /** Returns done (collections and trims), and the resident bytes they gave back. */
  readonly stats = { returns: 0, returnedBytes: 0 };

  constructor(
    private readonly o: ReturnerOptions = RETURNER_DEFAULTS,
    private readonly now: ReturnerHooks = processHooks(),
  ) {}

  start(): this {
    if (this.timer || this.now.stats() === undefined) return this;
    this.timer = setInterval(() => this.look(), this.o.intervalMs).unref();
    return this;
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  /** One look: `busy` is the event loop's share of busy time since the last (for tests). */
  look(busy = this.busySinceLast()): boolean {
    this.quiet = busy < this.o.quietShare ? this.quiet + 1 : 0;
    if (this.quiet < this.o.quietLooks) return false;
    const before = this.now.rss();
    let returned = false;
    // Garbage Buffers hold malloc memory until V8 collects them: collect first, then trim.
    if (this.now.gc && this.now.heapUsed() > this.heapAfter + this.o.keepBytes) {
      this.now.gc();
      this.heapAfter = this.now.heapUsed();
      this.trimOwed = true;
      returned = true;
    }
    const st = this.now.stats();
    // Free chunks stay free in malloc's books after a trim, pages given back or not: another
    // trim is worth its walk only once the process has grown again since the last, or after a
    // collection. V8 frees the collected Buffers' memory on a thread of its own, possibly after
    // gc() returned: what a collection frees is trimmed at a later look if not at once.
    if (st && st.freeBytes > this.o.keepBytes && (this.trimOwed || this.rssAfter === undefined || before >= this.rssAfter + this.o.keepBytes / 4)) {
      this.now.trim();
      this.trimOwed = false;
      returned = true;
    }
    if (!returned) return false;
    this.rssAfter = this.now.rss();
    this.stats.returns++;
    this.stats.returnedBytes += Math.max(0, before - this.rssAfter);
    return true;
  }

  private busySinceLast(): number {
    const next = performance.eventLoopUtilization();
    const share = performance.eventLoopUtilization(next, this.elu).utilization;
    this.elu = next;
    return share;
  }
}

let returner: MemoryReturner | undefined;

/** Starts the process's returner (after tuneMalloc; nothing without the thresholds in force). */
export function startMemoryReturner(): void {
  returner ??= new MemoryReturner().start();
}

/** What the process's returner did so far; zeros when it never started. */
export function memoryReturns(): { returns: number; returnedBytes: number } {
  return returner?.stats ?? { returns: 0, returnedBytes: 0 };
}
