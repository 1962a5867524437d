import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { Option, type Command } from 'commander';
import { TorusError } from '../../core/errors.js';
import { EtcdMetadata } from '../../metadata/etcd/etcd.js';
import { parseDuration } from '../../core/units.js';
import { resolvePeerSecurity, type PeerSecurityOpts, type ResolvedPeerSecurity } from './certs.js';

// Connection settings shared by torusd, torusctl and torusblk: etcdctl's `-C host:port`, etcd TLS
// files, and named profiles in ~/.torus/config.json. Precedence: flag > profile > default.

export const DEFAULT_ETCD = '127.0.0.1:2379';

export interface Profile {
  etcd?: string;
  'etcd-ca-file'?: string;
  'etcd-cert-file'?: string;
  'etcd-key-file'?: string;
  'etcd-user'?: string;
  /** Paths only: a profile names where the credential is, never holds it. */
  'tls-certificates'?: string;
  'peer-secret-file'?: string;
  'etcd-password-file'?: string;
}

export interface ConfigFile {
  etcd_config: Record<string, Profile>;
}

export interface GlobalOpts {
  etcd?: string;
  etcdCertFile?: string;
  etcdKeyFile?: string;
  etcdCaFile?: string;
  etcdUser?: string;
  etcdPasswordFile?: string;
  etcdTimeout?: string;
  config?: string;
  profile?: string;
  debug?: boolean;
  tlsCertificates?: string;
  peerSecretFile?: string;
  insecurePeerNetwork?: boolean;
}

export function addGlobalOptions(cmd: Command): Command {
  return cmd
    .option('-C, --etcd <host:port[,host:port...]>', `etcd endpoints (default ${DEFAULT_ETCD}, or the profile's)`)
    .option('--etcd-cert-file <file>', 'client certificate for etcd TLS')
    .option('--etcd-key-file <file>', 'client key for etcd TLS')
    .option('--etcd-ca-file <file>', 'CA bundle to verify etcd with')
    .option('--etcd-user <name>', 'etcd user (RBAC); or $TORUS_ETCD_USER')
    .option('--etcd-password-file <file>', "the etcd user's password, read from FILE (never given on the command line); or $TORUS_ETCD_PASSWORD")
    .addOption(new Option('--etcd-timeout <duration>', 'give up on an etcd call after this long').default('5s'))
    .option('--config <file>', 'CLI config file (default ~/.torus/config.json)')
    .option('--profile <name>', 'profile in the config file', 'default')
    .option('--tls-certificates <dir>', 'peer RPC over TLS with the certificates in DIR (ca-cert.pem, server-*.pem, client-*.pem; torusctl cert issue); or $TORUS_TLS_CERTIFICATES')
    .option('--peer-secret-file <file>', 'peer RPC over TLS, both ends proving they hold the cluster secret in FILE; or $TORUS_PEER_SECRET_FILE')
    .option('--insecure-peer-network', 'peer RPC in plaintext with no authentication, only on a network where every host is trusted; or TORUS_INSECURE_PEER_NETWORK=1')
    .option('--debug', 'print stack traces and debug logs');
}

export function defaultConfigPath(): string {
  return join(homedir(), '.torus', 'config.json');
}

export function readConfigFile(path: string): ConfigFile {
  if (!existsSync(path)) return { etcd_config: {} };
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new TorusError('INVALID_ARGUMENT', `config file ${path} is not valid JSON: ${(err as Error).message}`);
  }
  const cfg = parsed as Partial<ConfigFile>;
  if (typeof cfg !== 'object' || cfg === null || typeof cfg.etcd_config !== 'object' || cfg.etcd_config === null)
    throw new TorusError('INVALID_ARGUMENT', `config file ${path} has no "etcd_config" object`);
  return { etcd_config: cfg.etcd_config };
}

export function writeConfigFile(path: string, cfg: ConfigFile): void {
  // Profiles may name key files; keep them private like ~/.ssh.
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  writeFileSync(path, `${JSON.stringify(cfg, null, '\t')}\n`, { mode: 0o600 });
  chmodSync(path, 0o600);
}

export interface ResolvedConnection {
  endpoints: string[];
  caFile?: string;
  certFile?: string;
  keyFile?: string;
  auth?: { username: string; password: string };
  timeoutMs: number;
}

const HOSTPORT = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9._-]+):(\d{1,5})$/;

export function parseEndpoints(text: string): string[] {
  const list = text
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s.length > 0);
  if (list.length === 0) throw new TorusError('INVALID_ARGUMENT', 'no etcd endpoint given');
  for (const e of list) {
    const bare = e.replace(/^https?:\/\//, '');
    const m = HOSTPORT.exec(bare);
    if (!m || Number(m[2]) < 1 || Number(m[2]) > 65535)
      throw new TorusError('INVALID_ARGUMENT', `invalid etcd endpoint "${e}": expected host:port, e.g. 127.0.0.1:2379`);
  }
  return list;
}

export function resolveConnection(opts: GlobalOpts): ResolvedConnection {
  const cfgPath = opts.config ?? defaultConfigPath();
  const explicitConfig = opts.config !== undefined;
  if (explicitConfig && !existsSync(cfgPath)) throw new TorusError('INVALID_ARGUMENT', `config file ${cfgPath} does not exist`);
  const cfg = readConfigFile(cfgPath);
  const profileName = opts.profile ?? 'default';
  const profile = cfg.etcd_config[profileName];
  if (!profile && profileName !== 'default') throw new TorusError('INVALID_ARGUMENT', `no profile "${profileName}" in ${cfgPath}`);
  const p = profile ?? {};
  const caFile = opts.etcdCaFile ?? p['etcd-ca-file'];
  const certFile = opts.etcdCertFile ?? p['etcd-cert-file'];
  const keyFile = opts.etcdKeyFile ?? p['etcd-key-file'];
  for (const [flag, f] of [['--etcd-ca-file', caFile], ['--etcd-cert-file', certFile], ['--etcd-key-file', keyFile]] as const)
    if (f && !existsSync(f)) throw new TorusError('INVALID_ARGUMENT', `${flag}: file ${f} does not exist`);
  if (Boolean(certFile) !== Boolean(keyFile))
    throw new TorusError('INVALID_ARGUMENT', '--etcd-cert-file and --etcd-key-file must be given together');
  const auth = etcdAuth(opts, p);
  return {
    endpoints: parseEndpoints(opts.etcd ?? p.etcd ?? DEFAULT_ETCD),
    ...(caFile ? { caFile } : {}),
    ...(certFile ? { certFile } : {}),
    ...(keyFile ? { keyFile } : {}),
    ...(auth ? { auth } : {}),
    timeoutMs: parseDuration(opts.etcdTimeout ?? '5s'),
  };
}

/**
 * The etcd user and password: the user from --etcd-user, TORUS_ETCD_USER or the profile; the
 * password from --etcd-password-file (or the profile's file), else TORUS_ETCD_PASSWORD. Never
 * from argv, where ps shows it to every user; the profile keeps the file's path, not the secret.
 */
function etcdAuth(opts: GlobalOpts, p: Profile): { username: string; password: string } | undefined {
  const username = opts.etcdUser ?? process.env.TORUS_ETCD_USER ?? p['etcd-user'];
  const file = opts.etcdPasswordFile ?? process.env.TORUS_ETCD_PASSWORD_FILE ?? p['etcd-password-file'];
  let password: string | undefined;
  if (file !== undefined) {
    if (!existsSync(file)) throw new TorusError('INVALID_ARGUMENT', `--etcd-password-file: file ${file} does not exist`);
    password = readFileSync(file, 'utf8').replace(/\r?\n$/, '');
  } else password = process.env.TORUS_ETCD_PASSWORD;
  if (username === undefined && password === undefined) return undefined;
  if (username === undefined || password === undefined || password === '')
    throw new TorusError('INVALID_ARGUMENT', 'etcd authentication needs both a user (--etcd-user) and a password (--etcd-password-file or $TORUS_ETCD_PASSWORD)');
  return { username, password };
}

/** The --tls-certificates directory, from the flag, the environment or the profile (NBD's TLS uses it too). */
export function tlsCertificatesDir(opts: GlobalOpts): string | undefined {
  if (opts.tlsCertificates !== undefined) return opts.tlsCertificates;
  if (process.env.TORUS_TLS_CERTIFICATES) return process.env.TORUS_TLS_CERTIFICATES;
  return readConfigFile(opts.config ?? defaultConfigPath()).etcd_config[opts.profile ?? 'default']?.['tls-certificates'];
}

function credentialGiven(o: PeerSecurityOpts): boolean {
  return o.tlsCertificates !== undefined || o.peerSecretFile !== undefined || o.insecurePeerNetwork === true;
}

/**
 * The peer RPC credential: from the flags; else from the environment (TORUS_TLS_CERTIFICATES,
 * TORUS_PEER_SECRET_FILE, TORUS_INSECURE_PEER_NETWORK=1); else from the profile's paths.
 */
export async function peerSecurity(opts: GlobalOpts, server: boolean, warn: (msg: string) => void = (m) => process.stderr.write(`warning: ${m}\n`)): Promise<ResolvedPeerSecurity> {
  const env = process.env;
  const fromEnv: PeerSecurityOpts = {
    ...(env.TORUS_TLS_CERTIFICATES ? { tlsCertificates: env.TORUS_TLS_CERTIFICATES } : {}),
    ...(env.TORUS_PEER_SECRET_FILE ? { peerSecretFile: env.TORUS_PEER_SECRET_FILE } : {}),
    ...(env.TORUS_INSECURE_PEER_NETWORK === '1' || env.TORUS_INSECURE_PEER_NETWORK === 'true' ? { insecurePeerNetwork: true } : {}),
  };
  let merged: PeerSecurityOpts = credentialGiven(opts) ? opts : fromEnv;
  if (!credentialGiven(merged)) {
    const cfgPath = opts.config ?? defaultConfigPath();
    const p = readConfigFile(cfgPath).etcd_config[opts.profile ?? 'default'] ?? {};
    merged = {
      ...(p['tls-certificates'] !== undefined ? { tlsCertificates: p['tls-certificates'] } : {}),
      ...(p['peer-secret-file'] !== undefined ? { peerSecretFile: p['peer-secret-file'] } : {}),
    };
  }
  const r = await resolvePeerSecurity(merged, server);
  for (const w of r.warnings) warn(w);
  return r;
}

/** Where a long-running process says that an etcd member failed, or answers again. */
export interface MemberLog {
  warn(obj: object, msg: string): void;
  info(obj: object, msg: string): void;
}

/**
 * gRPC names a TLS server by the endpoint's host, and Node warns on stderr (DEP0123) when that is
 * an IP address, as etcd endpoints usually are: noise before a command's output that the user
 * can do nothing about (the certificate is still checked against the address).
 */
function quietIpServerNameWarning(): void {
  const emit = process.emitWarning.bind(process);
  process.emitWarning = ((warning: string | Error, ...rest: unknown[]) => {
    const o = rest[0];
    const code = typeof o === 'object' && o !== null ? (o as { code?: string }).code : rest[1];
    if (code === 'DEP0123') return;
    (emit as (...a: unknown[]) => void)(warning, ...rest);
  }) as typeof process.emitWarning;
}

export function connectMetadata(opts: GlobalOpts, log?: MemberLog): EtcdMetadata {
  const c = resolveConnection(opts);
  if (c.caFile || c.certFile || c.endpoints.some((e) => e.startsWith('https://'))) quietIpServerNameWarning();
  return new EtcdMetadata({
    endpoints: c.endpoints,
    callTimeoutMs: c.timeoutMs,
    ...(log
      ? {
          onMemberChange: ({ member, up, why }) =>
            up ? log.info({ member }, 'etcd member answers again') : log.warn({ member, err: why }, 'etcd member failed'),
        }
      : {}),
    ...(c.auth ? { auth: c.auth } : {}),
    tls: {
      ...(c.caFile ? { caFile: c.caFile } : {}),
      ...(c.certFile ? { certFile: c.certFile } : {}),
      ...(c.keyFile ? { keyFile: c.keyFile } : {}),
    },
  });
}

export function parsePort(text: string, flag: string): number {
  const n = Number(text);
  if (!/^\d+$/.test(text.trim()) || n < 0 || n > 65535) throw new TorusError('INVALID_ARGUMENT', `invalid ${flag} "${text}": expected a port number 0-65535`);
  return n;
}

/** A whole number of at least `min`, for flags such as --max-connections. */
export function parseCount(text: string, flag: string, min = 1): number {
  const n = Number(text);
  if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(n) || n < min) throw new TorusError('INVALID_ARGUMENT', `invalid ${flag} "${text}": expected a whole number of at least ${min}`);
  return n;
}

export interface BlockIoOpts {
  readCacheSize: string;
  readLevel: string;
  writeLevel: string;
}

/** Flags of every process that reads and writes blocks (torusd, torusblk). */
export function addBlockIoOptions(cmd: Command): Command {
  return cmd
    .addOption(new Option('--read-cache-size <size>', 'memory for the cache of recently read blocks (on a storage node, of those read from other nodes: its own are in the kernel page cache)').default('50MiB'))
    .addOption(new Option('--read-level <level>', 'block: retry replicas with growing timeouts; seq: one pass; spread: ask all replicas at once').choices(['block', 'seq', 'spread']).default('block'))
    .addOption(new Option('--write-level <level>', 'all: a write succeeds on R replicas; one: on one; local: on this node\'s disk').choices(['all', 'one', 'local']).default('all'));
}
