// ATA over Ethernet (AoE r11) frames: a pure codec, no sockets (STYLE habit 1).
//
// Layout (all multi-byte fields big-endian except the ATA LBA, which is little-endian as ATA's
// registers are):
//
//   0  dst MAC (6)   6  src MAC (6)   12  EtherType 0x88A2 (2)
//   14 ver<<4|flags (1: R=8 E=4)  15 error (1)  16 major/shelf (2)  18 minor/slot (1)
//   19 command (1)   20 tag (4)      24 argument ...
//
// Views, not copies (STYLE habit 2): decoded payloads (ATA data, config strings) are subarray
// views of the frame passed in. The raw socket hands every frame over as its own Buffer, so a view
// stays valid for as long as anyone holds it; callers that reuse frame buffers must copy first.
//
// Decoding is lenient only where the wire forces it: Ethernet pads frames shorter than 60 bytes,
// so trailing bytes after an argument are ignored; reserved bytes are ignored as r11 asks
// ("should be set to zero in all messages sent"). Everything else that cannot be parsed is a
// TorusError 'PROTOCOL', which servers treat as "ignore this frame".

import { TorusError } from '../core/errors.js';

export const AOE_ETHERTYPE = 0x88a2;
export const AOE_VERSION = 1;
export const ETH_HEADER_LEN = 14;
/** Ethernet header plus the AoE common header. */
export const AOE_HEADER_LEN = 24;
/** AoE header plus the ATA argument, before data. */
export const ATA_HEADER_LEN = AOE_HEADER_LEN + 12;
export const CONFIG_HEADER_LEN = AOE_HEADER_LEN + 8;
export const MASK_HEADER_LEN = AOE_HEADER_LEN + 4;
export const RESERVE_HEADER_LEN = AOE_HEADER_LEN + 2;
/** Ethernet's minimum frame without FCS; shorter frames are padded with zeros on encode. */
export const MIN_FRAME_LEN = 60;
export const SECTOR_SIZE = 512;
/** r11 section 3.2: a config string is at most 1024 bytes. */
export const MAX_CONFIG_LEN = 1024;
export const BROADCAST_SHELF = 0xffff;
export const BROADCAST_SLOT = 0xff;
export const BROADCAST_MAC: Buffer = Buffer.alloc(6, 0xff);

export const FLAG_RESPONSE = 0x08;
export const FLAG_ERROR = 0x04;

export const AoeCommand = { ATA: 0, CONFIG: 1, MAC_MASK: 2, RESERVE: 3 } as const;

/** r11 section 2.4: the error field of a response with the E flag. */
export const AoeError = {
  BAD_COMMAND: 1,
  BAD_ARGUMENT: 2,
  DEVICE_UNAVAILABLE: 3,
  CONFIG_STRING_PRESENT: 4,
  UNSUPPORTED_VERSION: 5,
  TARGET_RESERVED: 6,
} as const;

export const ConfigCommand = { READ: 0, TEST: 1, TEST_PREFIX: 2, SET: 3, FORCE_SET: 4 } as const;
export const MaskCommand = { READ: 0, EDIT: 1 } as const;
export const DirectiveCommand = { NONE: 0, ADD: 1, DELETE: 2 } as const;
export const MaskError = { UNSPECIFIED: 1, BAD_DIRECTIVE: 2, LIST_FULL: 3 } as const;
export const ReserveCommand = { READ: 0, SET: 1, FORCE_SET: 2 } as const;

/** ATA argument flag bits (r11 section 3.1). */
export const AtaFlag = { EXTENDED: 0x40, DEVICE: 0x10, ASYNC: 0x02, WRITE: 0x01 } as const;

export interface AoeHeader {
  readonly dst: Buffer;
  readonly src: Buffer;
  readonly version: number;
  readonly response: boolean;
  /** The E flag: the error field is meaningful. */
  readonly error: boolean;
  readonly errorCode: number;
  readonly shelf: number;
  readonly slot: number;
  readonly command: number;
  readonly tag: number;
}

export interface AtaArg {
  /** E: the command is an LBA48 one. */
  readonly extended: boolean;
  /** D: the device/head register's DEV bit. */
  readonly device: boolean;
  /** A: an asynchronous write (the target may answer before the data is stored). */
  readonly async: boolean;
  /** W: data is written to the device. */
  readonly write: boolean;
  /** Request: feature register. Response: error register. */
  readonly errFeature: number;
  readonly sectorCount: number;
  /** Request: ATA command. Response: status register. */
  readonly cmdStatus: number;
  /** The six LBA bytes as one number (little-endian on the wire); always < 2^48. */
  readonly lba: number;
  readonly data: Buffer;
}

export interface ConfigArg {
  readonly bufferCount: number;
  readonly firmware: number;
  /** Maximum sectors per ATA command the target accepts; 0 means 2 for old targets. */
  readonly sectorCount: number;
  readonly aoeVersion: number;
  readonly ccmd: number;
  readonly config: Buffer;
}

export interface Directive {
  readonly dcmd: number;
  readonly mac: Buffer;
}

export interface MaskArg {
  readonly mcmd: number;
  readonly merror: number;
  /**
   * The number of directives, or with merror set, the index of the directive that failed (the
   * directives before it were applied and none are carried).
   */
  readonly dirCount: number;
  readonly directives: readonly Directive[];
}

export interface ReserveArg {
  readonly rcmd: number;
  readonly macs: readonly Buffer[];
}

export type AoeMessage =
  | { readonly kind: 'ata'; readonly header: AoeHeader; readonly arg: AtaArg }
  | { readonly kind: 'config'; readonly header: AoeHeader; readonly arg: ConfigArg }
  | { readonly kind: 'mask'; readonly header: AoeHeader; readonly arg: MaskArg }
  | { readonly kind: 'reserve'; readonly header: AoeHeader; readonly arg: ReserveArg }
  /** A command this codec does not parse (vendor-specific 0xF0-0xFF, or unknown): the raw argument. */
  | { readonly kind: 'other'; readonly header: AoeHeader; readonly payload: Buffer };

function protocol(msg: string): TorusError {
  return new TorusError('PROTOCOL', `AoE: ${msg}`);
}

function invalid(msg: string): TorusError {
  return new TorusError('INVALID_ARGUMENT', `AoE encode: ${msg}`);
}

// ---------------------------------------------------------------------------------- decoding --

/**
 * The Ethernet and AoE headers alone. Succeeds for any version, so a target can answer a frame
 * of a version it does not speak with "unsupported version".
 */
export function decodeHeader(frame: Uint8Array): AoeHeader {
  const b = asBuffer(frame);
  if (b.length < AOE_HEADER_LEN) throw protocol(`frame of ${b.length} bytes is shorter than the ${AOE_HEADER_LEN}-byte AoE header`);
  const type = b.readUInt16BE(12);
  if (type !== AOE_ETHERTYPE) throw protocol(`EtherType 0x${type.toString(16).padStart(4, '0')} is not AoE`);
  const vf = b[14]!;
  return {
    dst: b.subarray(0, 6),
    src: b.subarray(6, 12),
    version: vf >> 4,
    response: (vf & FLAG_RESPONSE) !== 0,
    error: (vf & FLAG_ERROR) !== 0,
    errorCode: b[15]!,
    shelf: b.readUInt16BE(16),
    slot: b[18]!,
    command: b[19]!,
    tag: b.readUInt32BE(20),
  };
}

/** A whole AoE v1 frame. Throws TorusError 'PROTOCOL' for anything short, malformed or not v1. */
export function decodeFrame(frame: Uint8Array): AoeMessage {
  const b = asBuffer(frame);
  const header = decodeHeader(b);
  if (header.version !== AOE_VERSION) throw protocol(`version ${header.version} is not supported`);
  switch (header.command) {
    case AoeCommand.ATA:
      return { kind: 'ata', header, arg: decodeAta(b) };
    case AoeCommand.CONFIG:
      return { kind: 'config', header, arg: decodeConfig(b, header.response) };
    case AoeCommand.MAC_MASK:
      return { kind: 'mask', header, arg: decodeMask(b, header.response) };
    case AoeCommand.RESERVE:
      return { kind: 'reserve', header, arg: decodeReserve(b, header.response) };
    default:
      return { kind: 'other', header, payload: b.subarray(AOE_HEADER_LEN) };
  }
}

function decodeAta(b: Buffer): AtaArg {
  if (b.length < ATA_HEADER_LEN) throw protocol(`ATA frame of ${b.length} bytes is shorter than ${ATA_HEADER_LEN}`);
  const f = b[24]!;
  return {
    extended: (f & AtaFlag.EXTENDED) !== 0,
    device: (f & AtaFlag.DEVICE) !== 0,
    async: (f & AtaFlag.ASYNC) !== 0,
    write: (f & AtaFlag.WRITE) !== 0,
    errFeature: b[25]!,
    sectorCount: b[26]!,
    cmdStatus: b[27]!,
    lba: b.readUIntLE(28, 6),
    // bytes 34-35 reserved; data may include Ethernet padding, so its length is only a lower bound
    data: b.subarray(ATA_HEADER_LEN),
  };
}

function decodeConfig(b: Buffer, response: boolean): ConfigArg {
  if (b.length < CONFIG_HEADER_LEN) throw protocol(`config frame of ${b.length} bytes is shorter than ${CONFIG_HEADER_LEN}`);
  const vc = b[29]!;
  const ccmd = vc & 0x0f;
  const len = b.readUInt16BE(30);
  const room = b.length - CONFIG_HEADER_LEN;
  let config: Buffer;
  if (!response && ccmd === ConfigCommand.READ) {
    // A read carries no string; initiators are not required to zero the length, so ignore it.
    config = b.subarray(CONFIG_HEADER_LEN, CONFIG_HEADER_LEN);
  } else {
    if (len > MAX_CONFIG_LEN) throw protocol(`config string length ${len} exceeds ${MAX_CONFIG_LEN}`);
    if (len > room) throw protocol(`config string length ${len} exceeds the ${room} bytes in the frame`);
    config = b.subarray(CONFIG_HEADER_LEN, CONFIG_HEADER_LEN + len);
  }
  return {
    bufferCount: b.readUInt16BE(24),
    firmware: b.readUInt16BE(26),
    sectorCount: b[28]!,
    aoeVersion: vc >> 4,
    ccmd,
    config,
  };
}

function decodeMask(b: Buffer, response: boolean): MaskArg {
  if (b.length < MASK_HEADER_LEN) throw protocol(`MAC mask frame of ${b.length} bytes is shorter than ${MASK_HEADER_LEN}`);
  const mcmd = b[25]!;
  const merror = b[26]!;
  const dirCount = b[27]!;
  // A read request carries no directives, and a failed edit's response carries none either
  // (its count is the index of the failing directive).
  if ((!response && mcmd === MaskCommand.READ) || (response && merror !== 0)) return { mcmd, merror, dirCount, directives: [] };
  const need = MASK_HEADER_LEN + 8 * dirCount;
  if (b.length < need) throw protocol(`MAC mask list of ${dirCount} directives needs ${need} bytes, frame has ${b.length}`);
  const directives: Directive[] = [];
  for (let i = 0; i < dirCount; i++) {
    const at = MASK_HEADER_LEN + 8 * i;
    directives.push({ dcmd: b[at + 1]!, mac: b.subarray(at + 2, at + 8) });
  }
  return { mcmd, merror, dirCount, directives };
}

function decodeReserve(b: Buffer, response: boolean): ReserveArg {
  if (b.length < RESERVE_HEADER_LEN) throw protocol(`reserve/release frame of ${b.length} bytes is shorter than ${RESERVE_HEADER_LEN}`);
  const rcmd = b[24]!;
  const n = b[25]!;
  if (!response && rcmd === ReserveCommand.READ) return { rcmd, macs: [] };
  const need = RESERVE_HEADER_LEN + 6 * n;
  if (b.length < need) throw protocol(`reserve list of ${n} addresses needs ${need} bytes, frame has ${b.length}`);
  const macs: Buffer[] = [];
  for (let i = 0; i < n; i++) macs.push(b.subarray(RESERVE_HEADER_LEN + 6 * i, RESERVE_HEADER_LEN + 6 * i + 6));
  return { rcmd, macs };
}

// ---------------------------------------------------------------------------------- encoding --

export interface HeaderFields {
  readonly dst: Uint8Array;
  readonly src: Uint8Array;
  readonly response: boolean;
  readonly error?: boolean;
  readonly errorCode?: number;
  readonly shelf: number;
  readonly slot: number;
  readonly command: number;
  readonly tag: number;
  /** 1 unless a test wants to send something else. */
  readonly version?: number;
}

function checkInt(name: string, v: number, max: number): void {
  if (!Number.isInteger(v) || v < 0 || v > max) throw invalid(`${name} ${v} is not an integer in 0..${max}`);
}

function checkMac(name: string, mac: Uint8Array): void {
  if (mac.length !== 6) throw invalid(`${name} is ${mac.length} bytes, a MAC address is 6`);
}

function writeHeader(b: Buffer, h: HeaderFields): void {
  checkMac('dst', h.dst);
  checkMac('src', h.src);
  const version = h.version ?? AOE_VERSION;
  checkInt('version', version, 15);
  checkInt('error code', h.errorCode ?? 0, 0xff);
  checkInt('shelf', h.shelf, 0xffff);
  checkInt('slot', h.slot, 0xff);
  checkInt('command', h.command, 0xff);
  checkInt('tag', h.tag, 0xffffffff);
  b.set(h.dst, 0);
  b.set(h.src, 6);
  b.writeUInt16BE(AOE_ETHERTYPE, 12);
  b[14] = (version << 4) | (h.response ? FLAG_RESPONSE : 0) | (h.error ? FLAG_ERROR : 0);
  b[15] = h.errorCode ?? 0;
  b.writeUInt16BE(h.shelf, 16);
  b[18] = h.slot;
  b[19] = h.command;
  b.writeUInt32BE(h.tag, 20);
}

function alloc(len: number): Buffer {
  return Buffer.alloc(Math.max(len, MIN_FRAME_LEN));
}

export interface AtaFields {
  readonly extended?: boolean;
  readonly device?: boolean;
  readonly async?: boolean;
  readonly write?: boolean;
  readonly errFeature?: number;
  readonly sectorCount: number;
  readonly cmdStatus: number;
  readonly lba?: number;
  readonly data?: Uint8Array;
}

export function encodeAta(h: Omit<HeaderFields, 'command'>, a: AtaFields): Buffer {
  checkInt('sector count', a.sectorCount, 0xff);
  checkInt('cmd/status', a.cmdStatus, 0xff);
  checkInt('err/feature', a.errFeature ?? 0, 0xff);
  const lba = a.lba ?? 0;
  checkInt('lba', lba, 2 ** 48 - 1);
  const data = a.data ?? new Uint8Array(0);
  const b = alloc(ATA_HEADER_LEN + data.length);
  writeHeader(b, { ...h, command: AoeCommand.ATA });
  b[24] =
    (a.extended ? AtaFlag.EXTENDED : 0) | (a.device ? AtaFlag.DEVICE : 0) | (a.async ? AtaFlag.ASYNC : 0) | (a.write ? AtaFlag.WRITE : 0);
  b[25] = a.errFeature ?? 0;
  b[26] = a.sectorCount;
  b[27] = a.cmdStatus;
  b.writeUIntLE(lba, 28, 6);
  b.set(data, ATA_HEADER_LEN);
  return b;
}

export interface ConfigFields {
  readonly bufferCount: number;
  readonly firmware: number;
  readonly sectorCount: number;
  readonly ccmd: number;
  readonly config?: Uint8Array;
  readonly aoeVersion?: number;
}

export function encodeConfig(h: Omit<HeaderFields, 'command'>, c: ConfigFields): Buffer {
  checkInt('buffer count', c.bufferCount, 0xffff);
  checkInt('firmware', c.firmware, 0xffff);
  checkInt('sector count', c.sectorCount, 0xff);
  checkInt('ccmd', c.ccmd, 0x0f);
  const aoeVersion = c.aoeVersion ?? AOE_VERSION;
  checkInt('AoE version', aoeVersion, 0x0f);
  const config = c.config ?? new Uint8Array(0);
  if (config.length > MAX_CONFIG_LEN) throw invalid(`config string of ${config.length} bytes exceeds ${MAX_CONFIG_LEN}`);
  const b = alloc(CONFIG_HEADER_LEN + config.length);
  writeHeader(b, { ...h, command: AoeCommand.CONFIG });
  b.writeUInt16BE(c.bufferCount, 24);
  b.writeUInt16BE(c.firmware, 26);
  b[28] = c.sectorCount;
  b[29] = (aoeVersion << 4) | c.ccmd;
  b.writeUInt16BE(config.length, 30);
  b.set(config, CONFIG_HEADER_LEN);
  return b;
}

export interface MaskFields {
  readonly mcmd: number;
  readonly merror?: number;
  /** Defaults to directives.length; set it (with no directives) for a failed edit's response. */
  readonly dirCount?: number;
  readonly directives?: readonly { readonly dcmd: number; readonly mac: Uint8Array }[];
}

export function encodeMask(h: Omit<HeaderFields, 'command'>, m: MaskFields): Buffer {
  const directives = m.directives ?? [];
  const dirCount = m.dirCount ?? directives.length;
  checkInt('mcmd', m.mcmd, 0xff);
  checkInt('merror', m.merror ?? 0, 0xff);
  checkInt('directive count', dirCount, 0xff);
  if (directives.length > 0 && directives.length !== dirCount) throw invalid(`directive count ${dirCount} but ${directives.length} directives`);
  const b = alloc(MASK_HEADER_LEN + 8 * directives.length);
  writeHeader(b, { ...h, command: AoeCommand.MAC_MASK });
  b[25] = m.mcmd;
  b[26] = m.merror ?? 0;
  b[27] = dirCount;
  directives.forEach((d, i) => {
    checkInt('dcmd', d.dcmd, 0xff);
    checkMac('directive MAC', d.mac);
    b[MASK_HEADER_LEN + 8 * i + 1] = d.dcmd;
    b.set(d.mac, MASK_HEADER_LEN + 8 * i + 2);
  });
  return b;
}

export function encodeReserve(h: Omit<HeaderFields, 'command'>, r: { readonly rcmd: number; readonly macs?: readonly Uint8Array[] }): Buffer {
  const macs = r.macs ?? [];
  checkInt('rcmd', r.rcmd, 0xff);
  checkInt('MAC count', macs.length, 0xff);
  const b = alloc(RESERVE_HEADER_LEN + 6 * macs.length);
  writeHeader(b, { ...h, command: AoeCommand.RESERVE });
  b[24] = r.rcmd;
  b[25] = macs.length;
  macs.forEach((m, i) => {
    checkMac('reserve MAC', m);
    b.set(m, RESERVE_HEADER_LEN + 6 * i);
  });
  return b;
}

/** A header followed by an argument taken as raw bytes: error replies echo the request's argument. */
export function encodeRaw(h: HeaderFields, payload: Uint8Array = new Uint8Array(0)): Buffer {
  const b = alloc(AOE_HEADER_LEN + payload.length);
  writeHeader(b, h);
  b.set(payload, AOE_HEADER_LEN);
  return b;
}

// ----------------------------------------------------------------------------------- helpers --

function asBuffer(u: Uint8Array): Buffer {
  return Buffer.isBuffer(u) ? u : Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

/** "aa:bb:cc:dd:ee:ff" */
export function formatMac(mac: Uint8Array): string {
  return [...mac].map((x) => x.toString(16).padStart(2, '0')).join(':');
}

/** Parses "aa:bb:cc:dd:ee:ff" (or with '-' separators); INVALID_ARGUMENT otherwise. */
export function parseMac(text: string): Buffer {
  const m = /^([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})$/i.exec(text.trim());
  if (!m) throw new TorusError('INVALID_ARGUMENT', `"${text}" is not a MAC address like 02:00:00:00:00:01`);
  return Buffer.from(m.slice(1).map((h) => parseInt(h, 16)));
}

export function isBroadcastMac(mac: Uint8Array): boolean {
  return mac.length === 6 && mac.every((x) => x === 0xff);
}

/** Group (multicast or broadcast) addresses have the low bit of the first octet set. */
export function isGroupMac(mac: Uint8Array): boolean {
  return ((mac[0] ?? 0) & 1) === 1;
}

/**
 * Sectors one ATA command may carry on an interface with this MTU. The Linux initiator computes
 * (MTU - 36) / 512, counting the 14-byte Ethernet header against the MTU although the MTU
 * excludes it; using the same conservative formula means we never advertise more than it would
 * send, and a reply always fits in a frame. Capped by the one-byte sector count field.
 */
export function maxSectorsForMtu(mtu: number): number {
  return Math.max(0, Math.min(0xff, Math.floor((mtu - ATA_HEADER_LEN) / SECTOR_SIZE)));
}
