import { X509Certificate } from 'node:crypto';
import type net from 'node:net';
import type { Duplex } from 'node:stream';
import tls from 'node:tls';
import { toTorusError, TorusError } from '../core/errors.js';
import type { BlockDevice, DeviceInfo, DeviceProvider } from '../core/interfaces.js';
import {
  BASE_ALLOCATION,
  ClientFlag,
  DEFAULT_MAX_PAYLOAD,
  HandshakeFlag,
  Info,
  KNOWN_CLIENT_FLAGS,
  Opt,
  Rep,
  TransmissionFlag,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoReply,
  encodeMetaContextReply,
  encodeOptionError,
  encodeOptionReply,
  encodeRepServer,
  optionName,
  parseExportName,
  parseInfoRequest,
  parseMetaContextRequest,
  type BlockSizeConstraints,
  type ClientMessage,
} from './codec.js';
import { openErrorReply } from './errors.js';

// The handshake of one NBD connection: the options a client sends before transmission
// (proto.md's fixed newstyle negotiation), STARTTLS, and which export it gets with what flags.
// The connection (server.ts) keeps the stream, its decoder and the export once opened, so that a
// client going away mid-option is torn down in one place; what the handshake decides reaches it
// through NegotiationLink.

export interface NbdLogger {
  debug(obj: object, msg: string): void;
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}

export interface NbdTlsOptions {
  /** 'on': a client may start TLS (proto.md SELECTIVETLS); 'require': it must, before any other option (FORCEDTLS). */
  readonly mode: 'on' | 'require';
  /** The server's certificate and key (PEM), for X.509. */
  readonly cert?: Buffer;
  readonly key?: Buffer;
  /** CA certificates (PEM): with them every X.509 client must present a certificate that chains to one. */
  readonly ca?: Buffer;
  /** Pre-shared keys by identity (GnuTLS psktool files: `identity:hexkey`), for TLS-PSK. */
  readonly psk?: ReadonlyMap<string, Buffer>;
}

/**
 * The access a client has to an export: 'rw', 'ro', or null (refused, and told no more than
 * that). `identity` is the common name of its certificate or its PSK identity; null for a client
 * that did not start TLS.
 */
export type NbdAccess = (identity: string | null, exportName: string) => Promise<'rw' | 'ro' | null>;

/** The context id we hand out for base:allocation (any nonzero value would do). */
export const ALLOCATION_CONTEXT_ID = 1;

/** Error texts sent to clients are cut to this; proto.md allows 4096 but logs hold the rest. */
const MAX_CLIENT_MESSAGE = 256;

/** The server's settings that negotiation reads. */
export interface NegotiationSettings {
  readonly readOnly: boolean;
  readonly maxOptions: number;
  readonly maxPayload: number;
  readonly maxOptionLength: number;
  readonly multiConn: boolean;
  readonly log: NbdLogger;
  readonly describe: (name: string, device: BlockDevice | DeviceInfo) => string | undefined;
  readonly tls: (NbdTlsOptions & { readonly context: tls.SecureContext; readonly caCerts: readonly X509Certificate[] }) | undefined;
  readonly access: NbdAccess | undefined;
}

/**
 * proto.md block size constraints for a device. Minimum 1: BlockDevice takes any byte offset and
 * length (a volume does the read-modify-write), so no client needs to be refused for alignment.
 * Preferred: the device's block size, so that aligned I/O of that size avoids read-modify-write,
 * kept within [512, 2 MiB] because proto.md requires at least 512 and clients (the kernel, qemu)
 * round requests up to it, and a huge value would turn small writes into huge ones. Maximum: the
 * payload limit, which is what this server will take in one READ or WRITE.
 */
export function blockSizeConstraints(device: { readonly blockSize: number }, maxPayload = DEFAULT_MAX_PAYLOAD): BlockSizeConstraints {
  let preferred = 512;
  while (preferred * 2 <= device.blockSize && preferred < 2 * 1024 * 1024) preferred *= 2;
  return { minimum: 1, preferred: Math.min(preferred, maxPayload), maximum: maxPayload };
}

/** Transmission flags for an export. SEND_DF only makes sense once structured replies are on. */
export function transmissionFlags(opts: { readOnly: boolean; structured: boolean; multiConn: boolean }): number {
  let f = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_CACHE;
  if (opts.readOnly) f |= TransmissionFlag.READ_ONLY;
  else
    f |=
      TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO;
  if (opts.structured) f |= TransmissionFlag.SEND_DF;
  if (opts.multiConn) f |= TransmissionFlag.CAN_MULTI_CONN;
  return f;
}

export function caCertificates(pem: Buffer | undefined): X509Certificate[] {
  if (!pem) return [];
  const blocks = pem.toString('latin1').match(/-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----/g) ?? [];
  if (blocks.length === 0) throw new TorusError('INVALID_ARGUMENT', 'the CA file holds no certificate');
  return blocks.map((b) => new X509Certificate(b));
}

/**
 * Why a client's certificate is refused, or undefined if it was issued by one of the CAs (a CA
 * bundle during a rotation), is in its validity period and may authenticate a client. OpenSSL
 * checks the handshake's signatures; a TLSSocket made for a connection already accepted (as
 * STARTTLS needs) leaves the chain to us.
 */
export function clientCertificateProblem(socket: tls.TLSSocket, cas: readonly X509Certificate[]): string | undefined {
  const peer = socket.getPeerX509Certificate();
  if (!peer) return 'no client certificate';
  const now = Date.now();
  if (now < Date.parse(peer.validFrom) || now > Date.parse(peer.validTo)) return 'client certificate expired or not yet valid';
  if (peer.keyUsage && !peer.keyUsage.includes('1.3.6.1.5.5.7.3.2')) return 'certificate is not for client authentication';
  const ok = cas.some((ca) => now >= Date.parse(ca.validFrom) && now <= Date.parse(ca.validTo) && peer.checkIssued(ca) && peer.verify(ca.publicKey));
  return ok ? undefined : 'client certificate not issued by the CA';
}

export function secureContext(o: NbdTlsOptions): tls.SecureContext {
  if (!o.psk && !(o.cert && o.key)) throw new TorusError('INVALID_ARGUMENT', 'TLS needs a certificate and key, or pre-shared keys');
  try {
    return tls.createSecureContext({
      minVersion: 'TLSv1.2', // proto.md: MUST support 1.2
      ...(o.cert && o.key ? { cert: o.cert, key: o.key } : {}),
      ...(o.ca ? { ca: o.ca } : {}),
      // PSK suites are off by default in OpenSSL; TLS 1.3 suites stay as they are.
      ...(o.psk ? { ciphers: o.cert ? 'PSK:ECDHE-PSK:DHE-PSK:HIGH:!aNULL' : 'PSK:ECDHE-PSK:DHE-PSK' } : {}),
    });
  } catch (err) {
    throw new TorusError('INVALID_ARGUMENT', `TLS credentials cannot be used: ${(err as Error).message}`);
  }
}

/** What INFO and GO tell a client about an export. */
export interface ExportView {
  readonly name: string;
  readonly readOnly: boolean;
  readonly size: number;
  readonly flags: number;
  readonly blockSizes: BlockSizeConstraints;
  /** The device, or what the provider said about it without opening it. */
  readonly source: BlockDevice | DeviceInfo;
}

export interface OpenExport extends ExportView {
  readonly device: BlockDevice;
  readonly release: () => Promise<void>;
}

export function messageOf(err: unknown): string {
  const m = err instanceof Error ? err.message : String(err);
  return m.length > MAX_CLIENT_MESSAGE ? `${m.slice(0, MAX_CLIENT_MESSAGE - 3)}...` : m;
}

/** What transmission needs to know of the handshake, beyond the export. */
export interface Agreed {
  readonly structured: boolean;
  /** base:allocation is selected for the export: BLOCK_STATUS may be asked. */
  readonly allocation: boolean;
}

/** What negotiation needs of the connection it runs on. */
export interface NegotiationLink {
  readonly remote: string;
  /** Bytes received and not yet decoded. */
  readonly buffered: number;
  send(parts: Buffer[]): void;
  closeGracefully(): void;
  abort(): void;
  /** Stops reading the stream and hands it over, for the TLS handshake. */
  takeStream(): Duplex;
  /** Reads and writes `stream` from now on. */
  useStream(stream: Duplex): void;
  /** Keeps an opened export unless the connection went away while it was being opened. */
  adopt(exp: OpenExport): boolean;
  /** An option is answered: read on, or, if the connection closed meanwhile, let go of the export. */
  optionDone(): void;
  /** The export is chosen and adopted: requests follow. */
  transmit(agreed: Agreed): void;
}

export class Negotiation {
  /** An option is being answered: no more input is read until it is. */
  optionBusy = false;
  private readonly log: NbdLogger;
  private optionsSeen = 0;
  private noZeroes = false;
  private structured = false;
  /** STARTTLS done: everything since went over TLS. */
  private tlsDone = false;
  /** Who the client proved to be over TLS (certificate CN, PSK identity); null before or without TLS. */
  private identity: string | null = null;
  /** The access rules grant this client read-only access to the export it opens. */
  private grantedReadOnly = false;
  /** The export name the last successful SET_META_CONTEXT selected base:allocation for. */
  private metaExport: string | null = null;

  constructor(
    private readonly link: NegotiationLink,
    private readonly provider: DeviceProvider,
    private readonly s: NegotiationSettings,
  ) {
    this.log = s.log;
  }

  greet(): void {
    this.link.send([encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)]);
  }

  onMessage(msg: ClientMessage): void {
    switch (msg.type) {
      case 'clientFlags':
        if ((msg.flags & ~KNOWN_CLIENT_FLAGS) !== 0) {
          // proto.md: the server MUST drop the connection on unknown client flags
          this.log.info({ remote: this.link.remote, flags: msg.flags }, 'nbd client sent unknown client flags');
          this.link.abort();
          return;
        }
        // Clients without FIXED_NEWSTYLE are served fixed-newstyle replies anyway (proto.md
        // allows it): the only such clients left send EXPORT_NAME at once, which has no reply.
        this.noZeroes = (msg.flags & ClientFlag.NO_ZEROES) !== 0;
        return;
      case 'optionTooLong':
        // proto.md lets a server drop a client it deems hostile; a body this size is refused
        // from its header alone, so none of it is ever buffered.
        this.log.info({ remote: this.link.remote, option: optionName(msg.option), length: msg.length }, 'nbd option too long; dropping client');
        this.link.send([encodeOptionError(msg.option, Rep.ERR_TOO_BIG, `option data of ${msg.length} bytes exceeds ${this.s.maxOptionLength}`)]);
        this.link.closeGracefully();
        return;
      case 'option':
        if (++this.optionsSeen > this.s.maxOptions) {
          this.log.info({ remote: this.link.remote }, 'nbd client sent too many options; dropping it');
          this.link.abort();
          return;
        }
        this.optionBusy = true;
        this.handleOption(msg.option, msg.data).then(
          () => {
            this.optionBusy = false;
            this.link.optionDone();
          },
          (err: unknown) => {
            this.optionBusy = false;
            this.log.warn({ remote: this.link.remote, err: messageOf(err) }, 'nbd option handling failed');
            this.link.abort();
            this.link.optionDone();
          },
        );
        return;
      default:
        throw new TorusError('INTERNAL', `unexpected ${msg.type} during the handshake`);
    }
  }

  private reply(option: number, type: number, data?: Buffer): void {
    this.link.send([encodeOptionReply(option, type, data)]);
  }

  private replyError(option: number, type: number, message: string): void {
    this.link.send([encodeOptionError(option, type, message)]);
  }

  private async handleOption(option: number, data: Buffer): Promise<void> {
    this.log.debug({ remote: this.link.remote, option: optionName(option), length: data.length }, 'nbd option');
    // FORCEDTLS (proto.md): before STARTTLS every option but ABORT is refused, and EXPORT_NAME,
    // which cannot be refused, ends the session.
    if (this.s.tls?.mode === 'require' && !this.tlsDone && option !== Opt.STARTTLS && option !== Opt.ABORT) {
      if (option !== Opt.EXPORT_NAME) return this.replyError(option, Rep.ERR_TLS_REQD, 'this server requires TLS: send STARTTLS first');
      this.log.info({ remote: this.link.remote }, 'nbd EXPORT_NAME without TLS on a server that requires it; dropping client');
      return this.link.abort();
    }
    switch (option) {
      case Opt.EXPORT_NAME:
        return this.optExportName(data);
      case Opt.ABORT:
        // proto.md: reply ACK (data, if any, is ignored), then the client hangs up
        this.reply(option, Rep.ACK);
        this.link.closeGracefully();
        return;
      case Opt.LIST:
        return this.optList(data);
      case Opt.STARTTLS:
        return this.startTls(data);
      case Opt.INFO:
      case Opt.GO:
        return this.optInfoGo(option, data);
      case Opt.STRUCTURED_REPLY:
        if (data.length !== 0) return this.replyError(option, Rep.ERR_INVALID, 'STRUCTURED_REPLY takes no data');
        this.structured = true;
        return this.reply(option, Rep.ACK);
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT:
        return this.optMetaContext(option, data);
      default:
        // includes EXTENDED_HEADERS: clients fall back to compact headers on ERR_UNSUP
        return this.replyError(option, Rep.ERR_UNSUP, `${optionName(option)} is not supported`);
    }
  }

  /**
   * NBD_OPT_STARTTLS: ACK in plaintext, then the TLS handshake on the same connection; options
   * go on over TLS. A failed handshake ends the session (proto.md: too late to go on without).
   */
  private async startTls(data: Buffer): Promise<void> {
    const t = this.s.tls;
    // NOTLS mode: proto.md allows ERR_UNSUP "if it does not support STARTTLS at all"
    if (!t) return this.replyError(Opt.STARTTLS, Rep.ERR_UNSUP, 'TLS is not supported by this server');
    if (this.tlsDone) return this.replyError(Opt.STARTTLS, Rep.ERR_INVALID, 'TLS is already on');
    if (data.length !== 0) return this.replyError(Opt.STARTTLS, Rep.ERR_INVALID, 'STARTTLS takes no data');
    // Bytes sent after STARTTLS and before the TLS handshake could only be an injection.
    if (this.link.buffered > 0) {
      this.log.info({ remote: this.link.remote }, 'nbd client sent data after STARTTLS before the TLS handshake; dropping it');
      return this.link.abort();
    }
    const raw = this.link.takeStream();
    raw.on('error', () => {}); // the TLS socket reports errors from here on
    await new Promise<void>((resolve) => raw.write(encodeOptionReply(Opt.STARTTLS, Rep.ACK), () => resolve()));
    let pskIdentity: string | null = null;
    const psk = t.psk;
    const secure = new tls.TLSSocket(raw as net.Socket, {
      isServer: true,
      secureContext: t.context,
      requestCert: t.ca !== undefined,
      // Checked below, so that the refusal is logged and counted like any other.
      rejectUnauthorized: false,
      ...(psk
        ? {
            pskCallback: (_socket: tls.TLSSocket, id: string): Buffer | null => {
              const key = psk.get(id);
              if (key) pskIdentity = id;
              return key ?? null;
            },
          }
        : {}),
    } as tls.TLSSocketOptions);
    const ok = await new Promise<boolean>((resolve) => {
      secure.once('secure', () => resolve(true));
      secure.once('error', (err) => {
        this.log.info({ remote: this.link.remote, err: err.message }, 'nbd TLS handshake failed; dropping client');
        resolve(false);
      });
      secure.once('close', () => resolve(false));
    });
    const refusal = ok && pskIdentity === null && t.ca !== undefined ? clientCertificateProblem(secure, t.caCerts) : undefined;
    if (refusal !== undefined) {
      this.log.info({ remote: this.link.remote, err: refusal }, 'nbd client certificate refused; dropping client');
    } else if (ok) {
      const cn: unknown = secure.getPeerCertificate().subject?.CN;
      this.identity = pskIdentity ?? (typeof cn === 'string' && cn !== '' ? cn : null);
      this.tlsDone = true;
      // Nothing negotiated in plaintext carries over (a man in the middle could have chosen it).
      this.structured = false;
      this.metaExport = null;
      this.link.useStream(secure);
      this.log.debug({ remote: this.link.remote, identity: this.identity }, 'nbd TLS on');
      return;
    }
    secure.destroy();
    this.link.useStream(secure);
    this.link.abort();
  }

  /**
   * The access rules' word on an export for this client; null also when the rules cannot be
   * read (refusing is the safe side).
   */
  private async allowed(name: string): Promise<'rw' | 'ro' | null> {
    const access = this.s.access;
    if (!access) return 'rw';
    try {
      return await access(this.identity, name);
    } catch (err) {
      this.log.warn({ remote: this.link.remote, export: name, err: messageOf(err) }, 'nbd access rules cannot be read; refusing');
      return null;
    }
  }

  private refused(name: string): void {
    this.log.info({ remote: this.link.remote, identity: this.identity ?? '(no TLS)', export: name }, 'nbd client not allowed this export');
  }

  private view(name: string, source: BlockDevice | DeviceInfo): ExportView {
    if (!Number.isSafeInteger(source.size) || source.size < 0) throw new TorusError('INTERNAL', `device for "${name}" reports size ${source.size}`);
    const readOnly = this.s.readOnly || this.grantedReadOnly || source.readOnly;
    return {
      name,
      readOnly,
      size: source.size,
      flags: transmissionFlags({ readOnly, structured: this.structured, multiConn: this.s.multiConn }),
      blockSizes: blockSizeConstraints(source, this.s.maxPayload),
      source,
    };
  }

  private async open(name: string): Promise<OpenExport> {
    const { device, release } = await this.provider.open(name, { readOnly: this.s.readOnly || this.grantedReadOnly });
    try {
      return { ...this.view(name, device), device, release };
    } catch (err) {
      await release();
      throw err;
    }
  }

  /** For INFO: the provider's word if it can give one without opening (no lock), else open and release. */
  private async look(name: string): Promise<ExportView> {
    if (this.provider.info) return this.view(name, await this.provider.info(name, { readOnly: this.s.readOnly || this.grantedReadOnly }));
    const exp = await this.open(name);
    await exp.release().catch(() => {});
    return exp;
  }

  private async optExportName(data: Buffer): Promise<void> {
    let name: string;
    try {
      name = parseExportName(data);
    } catch (err) {
      this.log.info({ remote: this.link.remote, err: messageOf(err) }, 'nbd EXPORT_NAME with a malformed name; dropping client');
      return this.link.abort();
    }
    const grant = await this.allowed(name);
    if (grant === null) {
      // EXPORT_NAME has no error reply: proto.md says terminate the session
      this.refused(name);
      return this.link.abort();
    }
    this.grantedReadOnly = grant === 'ro';
    let exp: OpenExport;
    try {
      exp = await this.open(name);
    } catch (err) {
      // EXPORT_NAME has no error reply: proto.md says terminate the session
      this.log.info({ remote: this.link.remote, export: name, err: messageOf(err) }, 'nbd EXPORT_NAME for an export that cannot be opened; dropping client');
      return this.link.abort();
    }
    if (!this.link.adopt(exp)) return;
    this.link.send([encodeExportNameReply(exp.size, exp.flags, this.noZeroes)]);
    this.transmit(exp);
  }

  private transmit(exp: ExportView): void {
    this.link.transmit({ structured: this.structured, allocation: this.metaExport === exp.name });
  }

  private async optList(data: Buffer): Promise<void> {
    if (data.length !== 0) return this.replyError(Opt.LIST, Rep.ERR_INVALID, 'LIST takes no data');
    let names: string[];
    try {
      names = await this.provider.list();
    } catch (err) {
      const shut = toTorusError(err).code === 'CLOSED';
      return this.replyError(Opt.LIST, shut ? Rep.ERR_SHUTDOWN : Rep.ERR_POLICY, `cannot list exports: ${messageOf(err)}`);
    }
    const visible: string[] = [];
    for (const n of names) if ((await this.allowed(n)) !== null) visible.push(n);
    for (const n of visible) this.link.send([encodeRepServer(Opt.LIST, n)]);
    this.reply(Opt.LIST, Rep.ACK);
  }

  private async optInfoGo(option: number, data: Buffer): Promise<void> {
    let req;
    try {
      req = parseInfoRequest(data);
    } catch (err) {
      return this.replyError(option, Rep.ERR_INVALID, messageOf(err));
    }
    const go = option === Opt.GO;
    const grant = await this.allowed(req.name);
    if (grant === null) {
      this.refused(req.name);
      // The same answer whether the export exists or not.
      return this.replyError(option, Rep.ERR_POLICY, `not allowed to open "${req.name}"`);
    }
    this.grantedReadOnly = grant === 'ro';
    let exp: ExportView;
    try {
      if (go) {
        const opened = await this.open(req.name);
        if (!this.link.adopt(opened)) return;
        exp = opened;
      } else exp = await this.look(req.name);
    } catch (err) {
      return this.replyError(option, openErrorReply(err), `export "${req.name}" is not available: ${messageOf(err)}`);
    }
    this.link.send([encodeInfoReply(option, { type: Info.EXPORT, size: exp.size, flags: exp.flags })]);
    if (req.requests.includes(Info.NAME)) this.link.send([encodeInfoReply(option, { type: Info.NAME, name: exp.name })]);
    if (req.requests.includes(Info.DESCRIPTION)) {
      const d = this.s.describe(exp.name, exp.source);
      if (d !== undefined) this.link.send([encodeInfoReply(option, { type: Info.DESCRIPTION, description: d })]);
    }
    // Sent whether asked or not: clients must ignore unrequested info, and it tells those that
    // understand it about the 32 MiB cap even if they forgot to ask.
    this.link.send([encodeInfoReply(option, { type: Info.BLOCK_SIZE, ...exp.blockSizes })]);
    this.reply(option, Rep.ACK);
    if (go) this.transmit(exp);
  }

  private optMetaContext(option: number, data: Buffer): void {
    const set = option === Opt.SET_META_CONTEXT;
    // proto.md: SET replaces the selection even when it fails
    if (set) this.metaExport = null;
    if (!this.structured) return this.replyError(option, Rep.ERR_INVALID, 'negotiate STRUCTURED_REPLY first');
    let req;
    try {
      req = parseMetaContextRequest(data);
    } catch (err) {
      return this.replyError(option, Rep.ERR_INVALID, messageOf(err));
    }
    let found = !set && req.queries.length === 0;
    for (const q of req.queries) {
      const colon = q.indexOf(':');
      if (colon <= 0) return this.replyError(option, Rep.ERR_INVALID, `query "${q}" has no namespace`);
      // other namespaces and unknown base: leaves MUST be ignored, not refused
      if (q.slice(0, colon) !== 'base') continue;
      const leaf = q.slice(colon + 1);
      if (leaf === 'allocation' || (!set && leaf === '')) found = true;
    }
    // The export is checked when GO names it: opening it here could take a volume's lock twice.
    if (found) this.link.send([encodeMetaContextReply(option, set ? ALLOCATION_CONTEXT_ID : 0, BASE_ALLOCATION)]);
    if (set && found) this.metaExport = req.name;
    this.reply(option, Rep.ACK);
  }
}
