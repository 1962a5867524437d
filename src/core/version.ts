import { readFileSync } from 'node:fs';

// The package version, read once from package.json (three levels up from dist/src/core).
function readVersion(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

export const VERSION = readVersion();
/** Peer protocol version published in heartbeats; peers refuse to mix incompatible versions. */
export const PROTOCOL_VERSION = 1;
