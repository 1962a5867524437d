import { TorusError } from '../core/errors.js';
import type { MetaKV } from '../core/interfaces.js';
import { PREFIX } from './keys.js';

// Per-volume NBD access rules (docs/security.md): which client identities may open a volume,
// read-write or read-only. An identity is the common name of a client certificate or a PSK
// identity; '*' is any client that proved an identity over TLS; 'anonymous' a client that did
// not start TLS (a server in --tls on mode). No rule, no access. Kept in etcd beside the
// volumes: one key per rule, so grants and revocations are single writes and never race.

export type AccessMode = 'rw' | 'ro';

export interface AccessRule {
  readonly volume: string;
  readonly identity: string;
  readonly mode: AccessMode;
}

/** Any client that proved an identity over TLS. */
export const ANY_IDENTITY = '*';
/** A client that did not start TLS. */
export const ANONYMOUS = 'anonymous';

const ACCESS_PREFIX = `${PREFIX}access/`;
const IDENTITY = /^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$/;
const VOLUME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

function ruleKey(volume: string, identity: string): string {
  return `${ACCESS_PREFIX}${volume}/${identity}`;
}

export function checkIdentity(identity: string): void {
  if (identity !== ANY_IDENTITY && !IDENTITY.test(identity))
    throw new TorusError('INVALID_ARGUMENT', `invalid client identity "${identity}": a certificate common name or PSK identity (letters, digits, '.', '_', '@', '-'), '${ANY_IDENTITY}' or '${ANONYMOUS}'`);
}

function checkVolume(volume: string): void {
  if (!VOLUME.test(volume)) throw new TorusError('INVALID_ARGUMENT', `invalid volume name "${volume}"`);
}

/** Stored as JSON like every value under /torus/: `"rw"` or `"ro"`. */
function parseMode(value: string): AccessMode | undefined {
  let v: unknown;
  try {
    v = JSON.parse(value);
  } catch {
    return undefined;
  }
  return v === 'rw' || v === 'ro' ? v : undefined;
}

export class AccessRules {
  constructor(private readonly kv: MetaKV) {}

  async grant(volume: string, identity: string, mode: AccessMode): Promise<void> {
    checkVolume(volume);
    checkIdentity(identity);
    await this.kv.txn([], [{ op: 'put', key: ruleKey(volume, identity), value: JSON.stringify(mode) }]);
  }

  /** False if there was no such rule. */
  async revoke(volume: string, identity: string): Promise<boolean> {
    checkVolume(volume);
    checkIdentity(identity);
    const key = ruleKey(volume, identity);
    const r = await this.kv.txn([{ key, target: 'version', cmp: '>', value: 0 }], [{ op: 'delete', key }]);
    return r.succeeded;
  }

  async list(volume?: string): Promise<AccessRule[]> {
    if (volume !== undefined) checkVolume(volume);
    const { entries } = await this.kv.list(volume === undefined ? ACCESS_PREFIX : `${ACCESS_PREFIX}${volume}/`);
    const out: AccessRule[] = [];
    for (const e of entries) {
      const [v, id] = e.key.slice(ACCESS_PREFIX.length).split('/');
      const mode = parseMode(e.value);
      if (v && id && mode) out.push({ volume: v, identity: id, mode });
    }
    return out.sort((a, b) => a.volume.localeCompare(b.volume) || a.identity.localeCompare(b.identity));
  }

  /** What `identity` (null: no TLS) may do with `volume`: its own rule, else '*' for a proven identity; null if nothing. */
  async check(identity: string | null, volume: string): Promise<AccessMode | null> {
    if (!VOLUME.test(volume)) return null;
    const rules = new Map((await this.list(volume)).map((r) => [r.identity, r.mode]));
    if (identity === null) return rules.get(ANONYMOUS) ?? null;
    return rules.get(identity) ?? rules.get(ANY_IDENTITY) ?? null;
  }
}
