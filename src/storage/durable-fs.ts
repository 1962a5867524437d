// Names made durable. A file's fsync makes its bytes durable, not its name: a create, a rename or
// a mkdir reaches stable storage only with an fsync of the directory holding it (POSIX; ext4 in
// its default mode usually gets there within seconds, which is why the gap rarely shows, but a
// power cut in those seconds loses the name and, with it, everything under it). The power-cut
// harness (powercut.ts) holds code to this rule.

import { closeSync, fsyncSync, mkdirSync, openSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';

/** Block data, tables and journals are this process's alone, whatever the umask (which can only take bits away). */
export const PRIVATE_FILE = 0o600;

export function fsyncDirSync(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

export async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** mkdir -p whose new directories survive a power cut: each one's parent is synced. */
export function mkdirDurableSync(dir: string, mode = 0o700): void {
  const first = mkdirSync(dir, { recursive: true, mode });
  if (first === undefined) return;
  // From the first directory created down to `dir`: each new entry lives in its parent.
  for (let d = resolve(dir); ; d = dirname(d)) {
    fsyncDirSync(dirname(d));
    if (d === resolve(first)) break;
  }
}
