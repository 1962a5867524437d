// Reads served from the page cache on the calling thread (native/page_cache_read.c), so a read of
// cached bytes costs a syscall instead of two thread hand-offs. Without the addon every read goes
// through libuv's thread pool as before.

import { loadNativeAddon } from '../core/native.js';

interface PageCacheAddon {
  readCached(fd: number, buf: Uint8Array, position: number): number;
  dropCache(fd: number): void;
}

function load(): PageCacheAddon | undefined {
  try {
    return loadNativeAddon<PageCacheAddon>('page_cache_read');
  } catch {
    // A broken build must not stop the store: the thread pool still reads everything.
    return undefined;
  }
}

const addon = load();
let enabled = true;

/** True when reads can be served from the page cache without the thread pool. */
export const pageCacheReadsAvailable = addon !== undefined;

/** Turns the page-cache path off or on (tests that need a read to stay in flight turn it off). */
export function usePageCacheReads(on: boolean): void {
  enabled = on;
}

/**
 * Reads into `buf` at `position` what the page cache holds, without ever waiting for the disk:
 * the bytes read (from 0 up to buf.length; a prefix), 0 when nothing was cached or the addon is
 * missing. The caller reads the rest the ordinary way.
 */
export function readCached(fd: number, buf: Buffer, position: number): number {
  if (!addon || !enabled || buf.length === 0) return 0;
  return Math.max(0, addon.readCached(fd, buf, position));
}

/** Evicts a file's clean pages from the page cache (tests use it to force the slow path). */
export function dropCache(fd: number): void {
  addon?.dropCache(fd);
}
