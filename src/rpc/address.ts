import { TorusError } from '../core/errors.js';

/** The original's default peer port, kept so addresses without a port mean the same thing. */
export const DEFAULT_PEER_PORT = 40000;

export interface PeerAddress {
  readonly host: string;
  readonly port: number;
}

/** Parses `tdp://host:port` (IPv6 as `tdp://[::1]:port`). */
export function parsePeerAddress(address: string): PeerAddress {
  let url: URL;
  try {
    url = new URL(address);
  } catch {
    throw new TorusError('INVALID_ARGUMENT', `invalid peer address "${address}": expected tdp://host:port`);
  }
  if (url.protocol !== 'tdp:')
    throw new TorusError('INVALID_ARGUMENT', `invalid peer address "${address}": scheme must be tdp://, not ${url.protocol}//`);
  if (url.hostname === '') throw new TorusError('INVALID_ARGUMENT', `invalid peer address "${address}": no host`);
  if ((url.pathname !== '' && url.pathname !== '/') || url.search !== '' || url.hash !== '' || url.username !== '')
    throw new TorusError('INVALID_ARGUMENT', `invalid peer address "${address}": only tdp://host:port is allowed`);
  const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
  const port = url.port === '' ? DEFAULT_PEER_PORT : Number(url.port);
  return { host, port };
}

export function formatPeerAddress(host: string, port: number): string {
  return host.includes(':') ? `tdp://[${host}]:${port}` : `tdp://${host}:${port}`;
}
