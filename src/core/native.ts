// Locating the native addons node-gyp builds into <repo>/build/Release/<name>.node (binding.gyp).
// They are found from this file by walking up to the directory holding binding.gyp, so the same
// code works from src/ under a TypeScript runner and from any compiled output directory.

import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository (package) root: the nearest ancestor of this module holding binding.gyp. */
export function packageRoot(from: string = dirname(fileURLToPath(import.meta.url))): string | undefined {
  let dir = from;
  for (;;) {
    if (existsSync(join(dir, 'binding.gyp'))) return dir;
    const up = dirname(dir);
    if (up === dir) return undefined;
    dir = up;
  }
}

/** Where the addon `name` is expected, whether or not it is built. */
export function nativeAddonPath(name: string): string | undefined {
  const root = packageRoot();
  return root === undefined ? undefined : join(root, 'build', 'Release', `${name}.node`);
}

/** The addon's exports, or undefined when it is not built. */
export function loadNativeAddon<T>(name: string): T | undefined {
  const path = nativeAddonPath(name);
  if (path === undefined || !existsSync(path)) return undefined;
  return createRequire(import.meta.url)(path) as T;
}
