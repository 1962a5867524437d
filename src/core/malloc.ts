// glibc malloc settings for the long-running processes (native/malloc_tuning.c says why): big
// Buffers reuse freed heap memory instead of fresh pages the kernel must fault in and zero on every
// allocation. TORUS_MALLOC_TUNING=0 keeps glibc's defaults (for comparisons, or if a workload's
// memory ever grows under these settings).

import { loadNativeAddon } from './native.js';

interface MallocAddon {
  tune(mmapThreshold: number, trimThreshold: number): boolean;
}

/** Requests below this come from the heap, not from a fresh mmap (glibc's largest allowed, 32 MiB). */
export const MMAP_THRESHOLD = 32 * 2 ** 20;
/** Free memory at the heap top kept for reuse before it goes back to the kernel. */
export const TRIM_THRESHOLD = 64 * 2 ** 20;

let tuned: boolean | undefined;

/** Applies the settings once per process; true when they are in force. Never throws. */
export function tuneMalloc(env: NodeJS.ProcessEnv = process.env): boolean {
  if (tuned !== undefined) return tuned;
  if (env['TORUS_MALLOC_TUNING'] === '0') return (tuned = false);
  try {
    const addon = loadNativeAddon<MallocAddon>('malloc_tuning');
    tuned = addon?.tune(MMAP_THRESHOLD, TRIM_THRESHOLD) ?? false;
  } catch {
    // A missing or broken build only costs speed.
    tuned = false;
  }
  return tuned;
}
