import 'reflect-metadata';
import { randomBytes, randomUUID, webcrypto, X509Certificate } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join, resolve } from 'node:path';
import * as x509 from '@peculiar/x509';
import { TorusError } from '../../core/errors.js';
import { certificateUuid, type PeerSecurity } from '../../rpc/security.js';

// The cluster CA and the certificates it issues (`torusctl cert`), in the layout qemu, nbdkit and
// libnbd read from a directory: ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
// client-key.pem. Keys are EC P-256 (fast to make and to handshake with), written 0600 in
// directories 0700. A node's certificates name its uuid (URI SAN urn:uuid:...), which is how a
// peer dialling it knows it reached the node it meant; the common name is the NAME given, which
// is what NBD access rules (torusctl access) match.

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

type CryptoKey = webcrypto.CryptoKey;
type CryptoKeyPair = webcrypto.CryptoKeyPair;

const ALG = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;
const DAY = 86_400_000;
export const CA_FILES = { cert: 'ca-cert.pem', key: 'ca-key.pem' } as const;
export const LAYOUT = {
  ca: 'ca-cert.pem',
  serverCert: 'server-cert.pem',
  serverKey: 'server-key.pem',
  clientCert: 'client-cert.pem',
  clientKey: 'client-key.pem',
} as const;

function serial(): string {
  // Positive, 16 bytes: RFC 5280 allows up to 20 and asks for unpredictable ones.
  const b = randomBytes(16);
  b[0] = b[0]! & 0x7f;
  return b.toString('hex');
}

async function keyPair(): Promise<CryptoKeyPair> {
  return webcrypto.subtle.generateKey(ALG, true, ['sign', 'verify']) as Promise<CryptoKeyPair>;
}

async function keyPem(key: CryptoKey): Promise<string> {
  const der = Buffer.from(await webcrypto.subtle.exportKey('pkcs8', key));
  return `-----BEGIN PRIVATE KEY-----\n${der.toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '')}\n-----END PRIVATE KEY-----\n`;
}

function writePrivate(path: string, text: string): void {
  writeFileSync(path, text, { mode: 0o600 });
  chmodSync(path, 0o600); // whatever the umask, and if the file was there before
}

function writePublic(path: string, text: string): void {
  writeFileSync(path, text, { mode: 0o644 });
  chmodSync(path, 0o644);
}

function privateDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  chmodSync(dir, 0o700);
}

/** A CN or a name in a path: letters, digits and . _ @ - only, so it is safe in both. */
export function checkName(name: string): void {
  if (!/^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$/.test(name))
    throw new TorusError('INVALID_ARGUMENT', `invalid certificate name "${name}": letters, digits, '.', '_', '@' and '-', at most 64`);
}

/** `torusctl cert init DIR`: a new cluster CA. Refuses to overwrite one. */
export async function createCa(dir: string, opts: { name?: string; days?: number } = {}): Promise<{ cert: string }> {
  const certPath = join(dir, CA_FILES.cert);
  const keyPath = join(dir, CA_FILES.key);
  if (existsSync(keyPath) || existsSync(certPath)) throw new TorusError('EXISTS', `${resolve(dir)} already holds a CA (${CA_FILES.cert}); remove it first to make a new one`);
  const keys = await keyPair();
  const now = Date.now();
  const ca = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial(),
    name: `CN=${opts.name ?? `Torus cluster CA ${randomUUID().slice(0, 8)}`}`,
    notBefore: new Date(now - 3_600_000),
    notAfter: new Date(now + (opts.days ?? 3650) * DAY),
    keys,
    signingAlgorithm: ALG,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  privateDir(dir);
  writePrivate(keyPath, await keyPem(keys.privateKey));
  const pem = ca.toString('pem') + '\n';
  writePublic(certPath, pem);
  return { cert: pem };
}

export interface IssueOptions {
  /** The node uuid the certificates name; a fresh one by default. */
  readonly uuid?: string;
  /** Host names and addresses the server certificate is valid for, besides localhost, 127.0.0.1 and ::1. */
  readonly hosts?: readonly string[];
  readonly days?: number;
  /** Where to write; default CA_DIR/NAME. */
  readonly out?: string;
  /**
   * For an NBD client only: the certificates name no uuid, which peer RPC requires, so they open
   * the volumes access rules grant NAME and nothing else.
   */
  readonly nbdOnly?: boolean;
}

/** `torusctl cert issue DIR NAME`: DIR/NAME/ in the qemu/nbdkit/libnbd layout. */
export async function issueCertificates(caDir: string, name: string, opts: IssueOptions = {}): Promise<{ dir: string; uuid: string }> {
  checkName(name);
  const uuid = (opts.uuid ?? randomUUID()).toLowerCase();
  if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(uuid)) throw new TorusError('INVALID_ARGUMENT', `invalid --uuid "${opts.uuid}": expected a uuid`);
  const caCertPath = join(caDir, CA_FILES.cert);
  const caKeyPath = join(caDir, CA_FILES.key);
  if (!existsSync(caKeyPath)) throw new TorusError('NOT_EXIST', `${resolve(caDir)} holds no CA key (${CA_FILES.key}): run torusctl cert init ${caDir} first`);
  const caCertPem = readFileSync(caCertPath, 'utf8');
  const caCert = new x509.X509Certificate(caCertPem);
  const caKey = await webcrypto.subtle.importKey('pkcs8', pemBody(readFileSync(caKeyPath, 'utf8')), ALG, false, ['sign']);
  const out = opts.out ?? join(caDir, name);
  const now = Date.now();
  const hosts = ['localhost', '127.0.0.1', '::1', ...(opts.hosts ?? [])];
  const sans = (server: boolean): x509.JsonGeneralName[] => [
    ...(opts.nbdOnly ? [] : [{ type: 'url', value: `urn:uuid:${uuid}` } as x509.JsonGeneralName]),
    ...(server ? [...new Set(hosts)].map((h): x509.JsonGeneralName => (net.isIP(h) ? { type: 'ip', value: h } : { type: 'dns', value: h })) : []),
  ];
  const leaf = async (server: boolean): Promise<{ cert: string; key: string }> => {
    const keys = await keyPair();
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: serial(),
      subject: `CN=${name}`,
      issuer: caCert.subject,
      notBefore: new Date(now - 3_600_000),
      notAfter: new Date(now + (opts.days ?? 825) * DAY),
      publicKey: keys.publicKey,
      signingKey: caKey,
      signingAlgorithm: ALG,
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyAgreement, true),
        new x509.ExtendedKeyUsageExtension([server ? x509.ExtendedKeyUsage.serverAuth : x509.ExtendedKeyUsage.clientAuth]),
        ...(server || !opts.nbdOnly ? [new x509.SubjectAlternativeNameExtension(sans(server))] : []),
        await x509.AuthorityKeyIdentifierExtension.create(caCert),
        await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      ],
    });
    return { cert: cert.toString('pem') + '\n', key: await keyPem(keys.privateKey) };
  };
  const server = await leaf(true);
  const client = await leaf(false);
  privateDir(out);
  writePublic(join(out, LAYOUT.ca), caCertPem);
  writePublic(join(out, LAYOUT.serverCert), server.cert);
  writePrivate(join(out, LAYOUT.serverKey), server.key);
  writePublic(join(out, LAYOUT.clientCert), client.cert);
  writePrivate(join(out, LAYOUT.clientKey), client.key);
  return { dir: out, uuid };
}

function pemBody(pem: string): Buffer {
  return Buffer.from(pem.replace(/-----[^-]+-----/g, '').replace(/\s+/g, ''), 'base64');
}

/** A throwaway self-signed certificate for the TLS layer of secret mode (identity is the HMAC). */
export async function throwawayCertificate(): Promise<{ cert: Buffer; key: Buffer }> {
  const keys = await keyPair();
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial(),
    name: 'CN=torus peer',
    notBefore: new Date(now - 3_600_000),
    notAfter: new Date(now + 3650 * DAY),
    keys,
    signingAlgorithm: ALG,
  });
  return { cert: Buffer.from(cert.toString('pem')), key: Buffer.from(await keyPem(keys.privateKey)) };
}

/** A file holding keys or secrets must not be readable by everyone (group access is how Kubernetes mounts them): says so if it is. */
export function tooOpen(path: string): string | undefined {
  const mode = statSync(path).mode & 0o777;
  return (mode & 0o007) !== 0 ? `${path} is readable by every user (mode ${mode.toString(8).padStart(4, '0')}): chmod 600 it` : undefined;
}

function readRequired(dir: string, file: string, flag: string): Buffer {
  const path = join(dir, file);
  if (!existsSync(path)) throw new TorusError('INVALID_ARGUMENT', `${flag} ${dir}: no ${file} (make the directory with torusctl cert issue)`);
  return readFileSync(path);
}

export interface CertDir {
  readonly ca: Buffer;
  readonly serverCert: Buffer;
  readonly serverKey: Buffer;
  readonly clientCert: Buffer;
  readonly clientKey: Buffer;
  /** The uuid the server certificate names. */
  readonly uuid: string | undefined;
  /** Key files others can read. */
  readonly warnings: readonly string[];
}

/** Reads a --tls-certificates directory. A client-only directory (no server files) is accepted when `server` is false. */
export function readCertDir(dir: string, flag = '--tls-certificates', server = true): CertDir {
  if (!existsSync(dir)) throw new TorusError('INVALID_ARGUMENT', `${flag} ${dir}: no such directory`);
  const ca = readRequired(dir, LAYOUT.ca, flag);
  const clientCert = readRequired(dir, LAYOUT.clientCert, flag);
  const clientKey = readRequired(dir, LAYOUT.clientKey, flag);
  const hasServer = existsSync(join(dir, LAYOUT.serverCert));
  const serverCert = server || hasServer ? readRequired(dir, LAYOUT.serverCert, flag) : clientCert;
  const serverKey = server || hasServer ? readRequired(dir, LAYOUT.serverKey, flag) : clientKey;
  let uuid: string | undefined;
  try {
    for (const pem of [ca, serverCert, clientCert]) new X509Certificate(pem);
    uuid = certificateUuid(serverCert);
  } catch (err) {
    throw new TorusError('INVALID_ARGUMENT', `${flag} ${dir}: a certificate cannot be read: ${(err as Error).message}`);
  }
  const warnings = [LAYOUT.serverKey, LAYOUT.clientKey]
    .filter((f) => existsSync(join(dir, f)))
    .map((f) => tooOpen(join(dir, f)))
    .filter((w): w is string => w !== undefined);
  return { ca, serverCert, serverKey, clientCert, clientKey, uuid, warnings };
}

/** Reads a --peer-secret-file: one secret a line, the first the one to prove with (a rotation lists new, then old). */
export function readSecretFile(path: string): Buffer[] {
  if (!existsSync(path)) throw new TorusError('INVALID_ARGUMENT', `--peer-secret-file ${path}: no such file`);
  const secrets = readFileSync(path, 'utf8')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'));
  if (secrets.length === 0) throw new TorusError('INVALID_ARGUMENT', `--peer-secret-file ${path} holds no secret`);
  if (secrets.some((s) => s.length < 32))
    throw new TorusError('INVALID_ARGUMENT', `--peer-secret-file ${path}: a secret shorter than 32 characters (make one with torusctl cert secret FILE)`);
  return secrets.map((s) => Buffer.from(s));
}

/** A GnuTLS PSK file (psktool): `identity:hexkey` a line, as nbdkit, qemu and libnbd read it. */
export function readPskFile(path: string): Map<string, Buffer> {
  if (!existsSync(path)) throw new TorusError('INVALID_ARGUMENT', `--tls-psk-file ${path}: no such file`);
  const keys = new Map<string, Buffer>();
  for (const [i, line] of readFileSync(path, 'utf8').split('\n').entries()) {
    if (line.trim() === '') continue;
    const m = /^([^:\s]+):([0-9a-fA-F]+)$/.exec(line.trim());
    if (!m || m[2]!.length % 2 !== 0 || m[2]!.length < 32)
      throw new TorusError('INVALID_ARGUMENT', `--tls-psk-file ${path} line ${i + 1}: expected identity:hexkey (psktool -u NAME -p FILE), a key of at least 16 bytes`);
    keys.set(m[1]!, Buffer.from(m[2]!, 'hex'));
  }
  if (keys.size === 0) throw new TorusError('INVALID_ARGUMENT', `--tls-psk-file ${path} holds no key`);
  return keys;
}

/** `torusctl cert secret FILE`: 32 random bytes, hex, mode 0600. */
export function createSecretFile(path: string): void {
  if (existsSync(path)) throw new TorusError('EXISTS', `${path} already exists`);
  writePrivate(path, `${randomBytes(32).toString('hex')}\n`);
}

export interface PeerSecurityOpts {
  tlsCertificates?: string;
  peerSecretFile?: string;
  insecurePeerNetwork?: boolean;
}

export interface ResolvedPeerSecurity {
  readonly security: PeerSecurity;
  /** The uuid the node certificate names (x509 mode). */
  readonly uuid?: string;
  readonly warnings: readonly string[];
}

/** The peer RPC protection the flags ask for; refuses plaintext unless the network was declared trusted. */
export async function resolvePeerSecurity(opts: PeerSecurityOpts, server: boolean): Promise<ResolvedPeerSecurity> {
  const given = [opts.tlsCertificates, opts.peerSecretFile, opts.insecurePeerNetwork].filter((v) => v !== undefined && v !== false).length;
  if (given > 1) throw new TorusError('INVALID_ARGUMENT', 'give one of --tls-certificates, --peer-secret-file and --insecure-peer-network');
  if (opts.tlsCertificates !== undefined) {
    const d = readCertDir(opts.tlsCertificates, '--tls-certificates', server);
    return {
      security: { mode: 'x509', ca: d.ca, serverCert: d.serverCert, serverKey: d.serverKey, clientCert: d.clientCert, clientKey: d.clientKey },
      ...(d.uuid ? { uuid: d.uuid } : {}),
      warnings: d.warnings,
    };
  }
  if (opts.peerSecretFile !== undefined) {
    const secrets = readSecretFile(opts.peerSecretFile);
    const w = tooOpen(opts.peerSecretFile);
    return { security: { mode: 'secret', secrets, ...(await throwawayCertificate()) }, warnings: w ? [w] : [] };
  }
  if (opts.insecurePeerNetwork) return { security: { mode: 'insecure' }, warnings: [] };
  throw new TorusError(
    'PERMISSION_DENIED',
    'peer RPC needs a credential: --tls-certificates DIR (see torusctl cert), --peer-secret-file FILE, or --insecure-peer-network on a network you trust',
  );
}
