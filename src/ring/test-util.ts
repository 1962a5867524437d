// Deterministic inputs for the ring tests: balance and movement figures must be reproducible,
// so nothing here uses Math.random.

import type { BlockRef } from '../core/ids.js';
import type { RingPeer } from '../core/models.js';

/** mulberry32: a tiny seeded PRNG, uniform in [0, 1). */
export function seededRandom(seed: number): () => number {
  let s = seed | 0;
  return () => {
    s = (s + 0x6d2b79f5) | 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

export function randomUuid(rnd: () => number): string {
  const hex = (n: number): string => Array.from({ length: n }, () => Math.floor(rnd() * 16).toString(16)).join('');
  return `${hex(8)}-${hex(4)}-${hex(4)}-${hex(4)}-${hex(12)}`;
}

export function randomPeers(rnd: () => number, n: number, totalBlocks: number): RingPeer[] {
  return Array.from({ length: n }, () => ({ uuid: randomUuid(rnd), totalBlocks }));
}

/** Refs spread over the whole key space. */
export function randomRefs(rnd: () => number, n: number): BlockRef[] {
  return Array.from({ length: n }, () => ({
    type: rnd() < 0.1 ? 1 : 0,
    volume: Math.floor(rnd() * 2 ** 40),
    inode: Math.floor(rnd() * 2 ** 32),
    index: Math.floor(rnd() * 2 ** 32),
  }));
}

/** Refs as a real volume makes them: a few volumes and inodes, consecutive indexes. */
export function sequentialRefs(n: number): BlockRef[] {
  const out: BlockRef[] = [];
  for (let i = 0; out.length < n; i++) out.push({ type: 0, volume: 1 + (i % 3), inode: 1 + Math.floor(i / 30000), index: i % 30000 });
  return out;
}
