import { TorusError } from './errors.js';

// Sizes as users type them: "512KiB", "20GiB", "10G", "1.5TB", "4096". IEC suffixes (KiB, MiB…)
// are powers of 1024; SI ones (KB, MB…, or bare K, M, G as go-humanize reads them) are powers of 1000.
// Written here rather than taken from a package because the popular ones read "1KB" as 1024 and
// accept trailing junk; a storage system must not guess how big a disk is.

const IEC: Record<string, number> = { kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, tib: 2 ** 40, pib: 2 ** 50, eib: 2 ** 60 };
const SI: Record<string, number> = { k: 1e3, kb: 1e3, m: 1e6, mb: 1e6, g: 1e9, gb: 1e9, t: 1e12, tb: 1e12, p: 1e15, pb: 1e15, e: 1e18, eb: 1e18 };

export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  if (!m) throw new TorusError('INVALID_ARGUMENT', `invalid size "${text}": expected a number with an optional unit such as 512KiB, 20GiB or 10G`);
  const value = Number(m[1]);
  const unit = (m[2] ?? '').toLowerCase();
  let mult: number | undefined;
  if (unit === '' || unit === 'b') mult = 1;
  else mult = IEC[unit] ?? SI[unit];
  if (mult === undefined)
    throw new TorusError('INVALID_ARGUMENT', `invalid size "${text}": unknown unit "${m[2]}" (use B, KiB, MiB, GiB, TiB, PiB or KB, MB, GB, TB, PB)`);
  const bytes = Math.floor(value * mult);
  if (!Number.isSafeInteger(bytes)) throw new TorusError('INVALID_ARGUMENT', `invalid size "${text}": too large`);
  return bytes;
}

const IEC_NAMES = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
const SI_NAMES = ['B', 'kB', 'MB', 'GB', 'TB', 'PB', 'EB'];

/** "5.0 GiB", "0 B", "512 KiB"; with si=true powers of 1000. */
export function formatSize(bytes: number, si = false): string {
  const base = si ? 1000 : 1024;
  const names = si ? SI_NAMES : IEC_NAMES;
  if (bytes < base) return `${bytes} B`;
  let unit = 0;
  let v = bytes;
  while (v >= base && unit < names.length - 1) {
    v /= base;
    unit++;
  }
  const digits = v >= 100 || Number.isInteger(v) ? 0 : 1;
  return `${v.toFixed(digits)} ${names[unit]}`;
}

/** Durations as typed: "500ms", "5s", "2m", or a bare number of seconds. */
export function parseDuration(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/.exec(text);
  if (!m) throw new TorusError('INVALID_ARGUMENT', `invalid duration "${text}": expected e.g. 500ms, 5s, 2m`);
  const mult = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? 's') as 'ms' | 's' | 'm' | 'h'];
  return Math.round(Number(m[1]) * mult);
}

/** "2 seconds ago", "just now", "3 minutes ago". */
export function formatAgo(ms: number): string {
  return Math.round(ms / 1000) < 1 ? 'just now' : `${formatSpan(ms)} ago`;
}

/** A length of time in its largest whole unit: "1 second", "3 minutes", "2 days". */
export function formatSpan(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  const plural = (n: number, w: string): string => `${n} ${w}${n === 1 ? '' : 's'}`;
  if (s < 60) return plural(s, 'second');
  if (s < 3600) return plural(Math.floor(s / 60), 'minute');
  if (s < 86400) return plural(Math.floor(s / 3600), 'hour');
  return plural(Math.floor(s / 86400), 'day');
}
