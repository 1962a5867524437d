import { createHmac, timingSafeEqual, X509Certificate } from 'node:crypto';
import net from 'node:net';
import tls from 'node:tls';
import { TorusError } from '../core/errors.js';
import type { PeerAddress } from './address.js';

// How peer RPC connections are protected (docs/security.md). Either way every byte after the TCP
// connect is TLS; what differs is how the two ends prove who they are:
// - 'x509': both ends present a certificate signed by the cluster CA. A node's certificate names
//   its uuid (URI SAN urn:uuid:...), and a client that dialled a node checks it is the node it
//   meant, so a machine that took over an address cannot pose as the node that had it.
// - 'secret': both ends hold a shared cluster secret. TLS runs with throwaway certificates, and
//   each end proves it holds the secret with an HMAC over keying material exported from that TLS
//   session (RFC 5705): a man in the middle has two sessions with different keying material, so
//   nothing he relays verifies, and nothing he sees can be replayed on another connection.
// - 'insecure': plaintext, only when the operator said the network is trusted
//   (--insecure-peer-network).

export interface X509PeerSecurity {
  readonly mode: 'x509';
  /** PEM, one or more CA certificates: during a CA rotation the old and the new. */
  readonly ca: Buffer;
  readonly serverCert: Buffer;
  readonly serverKey: Buffer;
  readonly clientCert: Buffer;
  readonly clientKey: Buffer;
}

export interface SecretPeerSecurity {
  readonly mode: 'secret';
  /** The accepted secrets; the first is the one this process proves with. During a rotation: new, old. */
  readonly secrets: readonly Buffer[];
  /** A throwaway self-signed certificate and key for the TLS layer (identity comes from the HMAC). */
  readonly cert: Buffer;
  readonly key: Buffer;
}

export type PeerSecurity = X509PeerSecurity | SecretPeerSecurity | { readonly mode: 'insecure' };

/** What the server learned about the other end from the TLS layer. */
export interface PeerAuth {
  /** Keying material exported from this TLS session (secret mode), for the HMAC. */
  readonly ekm?: Buffer;
  /** Who the certificate says the peer is (x509 mode), for logs. */
  readonly name?: string;
  /** Why the peer may not use peer RPC although TLS let it in. */
  readonly refusal?: string;
}

const EKM_LABEL = 'EXPORTER-torus-peer-auth';
const EKM_LENGTH = 32;
const MAC_LENGTH = 32;
/** A client proves with at most this many secrets at once (a rotation needs two). */
const MAX_SECRETS = 4;

const TLS_COMMON = { minVersion: 'TLSv1.3' } as const;

/** The uuid a certificate names (URI SAN urn:uuid:...), if any. */
export function certificateUuid(cert: X509Certificate | Buffer | string): string | undefined {
  const c = cert instanceof X509Certificate ? cert : new X509Certificate(cert);
  for (const part of (c.subjectAltName ?? '').split(', ')) {
    const m = /^URI:urn:uuid:([0-9a-fA-F-]{36})$/.exec(part.trim());
    if (m) return m[1]!.toLowerCase();
  }
  return undefined;
}

/** The common name of a certificate's subject, or '' without one. */
export function certificateName(cert: X509Certificate | Buffer | string): string {
  const c = cert instanceof X509Certificate ? cert : new X509Certificate(cert);
  for (const line of c.subject.split('\n')) if (line.startsWith('CN=')) return line.slice(3);
  return '';
}

function ekmOf(socket: tls.TLSSocket): Buffer {
  return socket.exportKeyingMaterial(EKM_LENGTH, EKM_LABEL, Buffer.alloc(0));
}

function mac(secret: Buffer, role: 'client' | 'server', ekm: Buffer): Buffer {
  return createHmac('sha256', secret).update(`torus peer ${role}\0`).update(ekm).digest();
}

/** The client's proof in HELLO (EXT_AUTH_HMAC): one MAC per secret it holds, new first. */
export function clientProof(s: SecretPeerSecurity, ekm: Buffer): Buffer {
  return Buffer.concat(s.secrets.slice(0, MAX_SECRETS).map((k) => mac(k, 'client', ekm)));
}

/**
 * Checks a client's proof; returns the server's proof (made with the secret that matched), or
 * null if no MAC in it verifies with any secret this server accepts.
 */
export function verifyClientProof(s: SecretPeerSecurity, ekm: Buffer, proof: Buffer | undefined): Buffer | null {
  if (!proof || proof.length === 0 || proof.length % MAC_LENGTH !== 0 || proof.length > MAX_SECRETS * MAC_LENGTH) return null;
  for (const k of s.secrets) {
    const want = mac(k, 'client', ekm);
    for (let at = 0; at < proof.length; at += MAC_LENGTH) if (timingSafeEqual(want, proof.subarray(at, at + MAC_LENGTH))) return mac(k, 'server', ekm);
  }
  return null;
}

export function verifyServerProof(s: SecretPeerSecurity, ekm: Buffer, proof: Buffer | undefined): boolean {
  if (!proof || proof.length !== MAC_LENGTH) return false;
  return s.secrets.some((k) => timingSafeEqual(mac(k, 'server', ekm), proof));
}

/** The keying material of a client connection in secret mode (after 'secureConnect'). */
export function connectionEkm(stream: unknown): Buffer | undefined {
  return stream instanceof tls.TLSSocket ? ekmOf(stream) : undefined;
}

/** Options for tls.createServer: a peer without a certificate from the CA never gets to HELLO. */
export function serverTlsOptions(s: PeerSecurity): tls.TlsOptions | null {
  if (s.mode === 'x509') return { ...TLS_COMMON, ca: s.ca, cert: s.serverCert, key: s.serverKey, requestCert: true, rejectUnauthorized: true };
  if (s.mode === 'secret') return { ...TLS_COMMON, cert: s.cert, key: s.key, requestCert: false };
  return null;
}

/** What the server learned from a finished TLS handshake. */
export function serverPeerAuth(s: PeerSecurity, socket: tls.TLSSocket): PeerAuth {
  if (s.mode === 'secret') return { ekm: ekmOf(socket) };
  const cert = socket.getPeerCertificate();
  const uuid = cert.raw ? certificateUuid(cert.raw) : undefined;
  const name = `${cert.subject?.CN ?? '?'}${uuid ? ` (${uuid})` : ''}`;
  // Certificates without a uuid are for NBD clients (torusctl cert issue --nbd-only): the same CA
  // signs them, and they must not reach every block.
  if (!uuid) return { name, refusal: `certificate of ${name} names no uuid: it is for NBD only` };
  return { name };
}

/**
 * Dials `target` over TLS. In x509 mode the server's certificate must chain to the CA and, when
 * `expectUuid` is given, name that uuid; host names are not checked (peers are addressed by IP
 * and named by uuid).
 */
export function dialTls(s: X509PeerSecurity | SecretPeerSecurity, target: PeerAddress, expectUuid: string | undefined): tls.TLSSocket {
  const base: tls.ConnectionOptions = { ...TLS_COMMON, host: target.host, port: target.port, ...(net.isIP(target.host) === 0 ? { servername: target.host } : {}) };
  const socket =
    s.mode === 'secret' ? tls.connect({ ...base, rejectUnauthorized: false, cert: s.cert, key: s.key }) : dialX509(s, base, expectUuid);
  socket.setNoDelay(true);
  return socket;
}

function dialX509(s: X509PeerSecurity, base: tls.ConnectionOptions, expectUuid: string | undefined): tls.TLSSocket {
  return tls.connect({
    ...base,
    ca: s.ca,
    cert: s.clientCert,
    key: s.clientKey,
    rejectUnauthorized: true,
    checkServerIdentity: (_host, cert) => {
      if (expectUuid === undefined) return undefined;
      const uuid = cert.raw ? certificateUuid(cert.raw) : undefined;
      if (uuid === expectUuid) return undefined;
      return new TorusError('NO_PEER', `its certificate names ${uuid ? `node ${uuid}` : 'no node'}, not the expected ${expectUuid}`);
    },
  });
}
