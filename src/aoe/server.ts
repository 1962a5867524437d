// An ATA over Ethernet target (AoE r11) serving any BlockDevice over a PacketConn.
//
// Every frame is handled on its own: ATA commands run concurrently (a slow read never holds up
// the frames behind it), up to `bufferCount` at a time per initiator, the number the target
// advertises to each, and `maxInFlight` in all; frames beyond that are dropped, as r11 says a
// target does when its buffers are full, and the initiator retransmits. The per-initiator cap is
// what keeps one initiator flooding the target from taking every buffer from the others. Nothing a peer sends can throw out of the receive path: frames that do
// not parse are ignored, and device failures become ATA error registers (errors.ts).
//
// Addressing and access control, in the order applied to each frame:
//   0. an allow list set at start (--allow) without the source     -> ignored (AoE has no
//      authentication: a MAC is all there is, so a segment the operator does not control needs
//      it, and no initiator can change it)
//   1. not AoE, a response, or not for our MAC (or broadcast)      -> ignored
//   2. shelf/slot neither ours nor the broadcast values            -> ignored
//   3. MAC mask list non-empty and the source not on it            -> ignored (no service at all)
//   4. version other than 1                                        -> error 5, unsupported version
//   5. broadcast shelf or slot and not a Query Config              -> ignored (a broadcast write
//      would land on every target on the segment)
//   6. reserve list non-empty, source not on it, ATA other than
//      IDENTIFY DEVICE                                             -> error 6, target is reserved
// Edits of the MAC mask list and reservations from the network are refused (error 1, as a target
// without them) unless `remoteConfig` is on: with them any host on the segment could mask out
// everyone else or reserve the target for itself.

import { TorusError, toTorusError } from '../core/errors.js';
import type { BlockDevice } from '../core/interfaces.js';
import { LogThrottle } from '../core/limits.js';
import { AtaCmd, AtaErrorBit, AtaStatus, POWER_MODE_ACTIVE, commandLba, identifyDevice } from './ata.js';
import type { PacketConn } from './conn.js';
import { ataFailure } from './errors.js';
import {
  AOE_VERSION,
  AoeCommand,
  AoeError,
  BROADCAST_MAC,
  BROADCAST_SHELF,
  BROADCAST_SLOT,
  ConfigCommand,
  DirectiveCommand,
  MaskCommand,
  MaskError,
  ReserveCommand,
  SECTOR_SIZE,
  decodeFrame,
  decodeHeader,
  encodeAta,
  encodeConfig,
  encodeMask,
  encodeRaw,
  encodeReserve,
  formatMac,
  isBroadcastMac,
  isGroupMac,
  maxSectorsForMtu,
  parseMac,
  type AoeHeader,
  type AoeMessage,
  type AtaArg,
  type ConfigArg,
  type MaskArg,
  type ReserveArg,
} from './frame.js';

export interface AoeLogger {
  debug(obj: object, msg: string): void;
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}

const silent: AoeLogger = { debug: () => {}, info: () => {}, warn: () => {} };

/** What a target remembers between commands; `persist` is handed a copy after every change. */
export interface AoeTargetState {
  readonly config: Buffer;
  /** MAC mask list, "aa:bb:cc:dd:ee:ff" strings; empty means everyone is served. */
  readonly macMask: readonly string[];
  /** Reserve list; empty means not reserved. */
  readonly reserve: readonly string[];
}

export interface AoeTargetOptions {
  /** Major address, 0..0xfffe (0xffff is broadcast). */
  readonly shelf: number;
  /** Minor address, 0..0xfe (0xff is broadcast). */
  readonly slot: number;
  /** Requests handled at once for one initiator, and the Buffer Count advertised. */
  readonly bufferCount?: number;
  /** Requests handled at once for all initiators together. Default 4 x bufferCount. */
  readonly maxInFlight?: number;
  /** Firmware version advertised in config responses. */
  readonly firmware?: number;
  readonly log?: AoeLogger;
  /** IDENTIFY DEVICE model string (40 characters at most). */
  readonly model?: string;
  /** IDENTIFY DEVICE serial number (20 characters at most); "SHELF.SLOT" by default. */
  readonly serial?: string;
  /** Config string, MAC mask list and reserve list to start with (for example, as persisted). */
  readonly state?: Partial<AoeTargetState>;
  /** Called after the config string, mask list or reserve list changes; failures are logged. */
  readonly persist?: (state: AoeTargetState) => void | Promise<void>;
  /** Largest MAC mask list accepted (list full beyond it); 64 by default. */
  readonly maxMaskEntries?: number;
  /** Only these initiators ("aa:bb:cc:dd:ee:ff") are served; the rest get no answer at all. Empty or absent: everyone. */
  readonly allow?: readonly string[];
  /** Let initiators edit the MAC mask list and reservations (AoE r11 says they may); off by default. */
  readonly remoteConfig?: boolean;
  /** Cap on sectors per command below what the MTU allows (tests use it). */
  readonly maxSectors?: number;
  /**
   * Reply to a write only once it is durable (written with FUA), and advertise the write cache as
   * disabled. For initiators that never send FLUSH CACHE, such as Linux's aoe driver: without it
   * their acknowledged writes are durable only at the device's next sync. Concurrent FUA writes
   * share one volume sync, so this costs latency more than throughput. Default false.
   */
  readonly writeThrough?: boolean;
}

export const AOE_TARGET_DEFAULTS = {
  bufferCount: 64,
  firmware: 0x0001,
  model: 'Torus AoE target',
  maxMaskEntries: 64,
} as const;

export interface AoeTargetStats {
  framesIn: number;
  /** Frames for someone else, from masked-out initiators, responses, broadcast non-queries. */
  ignored: number;
  /** Frames that did not parse. */
  malformed: number;
  replies: number;
  /** Replies the PacketConn dropped (queue full). */
  sendDrops: number;
  /** ATA requests dropped because `bufferCount` of their initiator's, or `maxInFlight` in all, were already running. */
  busyDrops: number;
  /** Initiators with commands running now. */
  initiators: number;
  ataCommands: number;
  ataErrors: number;
  aoeErrors: number;
  inFlight: number;
  peakInFlight: number;
  /** Frames from initiators not on the allow list (counted in `ignored` too). */
  notAllowed: number;
  /** MAC mask edits and reservations refused because remote configuration is off. */
  remoteConfigRefused: number;
}

const ATA_ARG_LEN = 12;

export class AoeTarget {
  readonly shelf: number;
  readonly slot: number;
  readonly bufferCount: number;
  readonly firmware: number;
  /** Sectors per ATA command, from the interface MTU (jumbo frames allow more). */
  readonly maxSectors: number;
  readonly maxInFlight: number;
  readonly totalSectors: number;
  readonly writeThrough: boolean;
  readonly stats: AoeTargetStats = {
    framesIn: 0,
    ignored: 0,
    malformed: 0,
    replies: 0,
    sendDrops: 0,
    busyDrops: 0,
    initiators: 0,
    ataCommands: 0,
    ataErrors: 0,
    aoeErrors: 0,
    inFlight: 0,
    peakInFlight: 0,
    notAllowed: 0,
    remoteConfigRefused: 0,
  };
  private readonly log: AoeLogger;
  private readonly identify: Buffer;
  private readonly maxMaskEntries: number;
  private readonly maxReserveEntries: number;
  private config: Buffer;
  private macMask: Buffer[];
  private readonly allow: readonly Buffer[];
  private readonly remoteConfig: boolean;
  private reserve: Buffer[];
  private readonly inFlight = new Set<Promise<void>>();
  /** Commands running per initiator MAC; an initiator with none has no entry. */
  private readonly perInitiator = new Map<string, number>();
  private readonly logThrottle = new LogThrottle();
  private started = false;
  private closing = false;
  private closed: Promise<void> | undefined;

  constructor(
    private readonly conn: PacketConn,
    private readonly device: BlockDevice,
    private readonly options: AoeTargetOptions,
  ) {
    const { shelf, slot } = options;
    if (!Number.isInteger(shelf) || shelf < 0 || shelf >= BROADCAST_SHELF)
      throw new TorusError('INVALID_ARGUMENT', `AoE shelf ${shelf} is not in 0..${BROADCAST_SHELF - 1}`);
    if (!Number.isInteger(slot) || slot < 0 || slot >= BROADCAST_SLOT)
      throw new TorusError('INVALID_ARGUMENT', `AoE slot ${slot} is not in 0..${BROADCAST_SLOT - 1}`);
    this.shelf = shelf;
    this.slot = slot;
    this.bufferCount = options.bufferCount ?? AOE_TARGET_DEFAULTS.bufferCount;
    if (!Number.isInteger(this.bufferCount) || this.bufferCount < 1 || this.bufferCount > 0xffff)
      throw new TorusError('INVALID_ARGUMENT', `AoE buffer count ${this.bufferCount} is not in 1..65535`);
    this.maxInFlight = options.maxInFlight ?? 4 * this.bufferCount;
    if (!Number.isInteger(this.maxInFlight) || this.maxInFlight < this.bufferCount)
      throw new TorusError('INVALID_ARGUMENT', `AoE maxInFlight ${this.maxInFlight} is below the buffer count ${this.bufferCount}`);
    this.firmware = options.firmware ?? AOE_TARGET_DEFAULTS.firmware;
    if (!Number.isInteger(this.firmware) || this.firmware < 0 || this.firmware > 0xffff)
      throw new TorusError('INVALID_ARGUMENT', `AoE firmware version ${this.firmware} is not in 0..65535`);
    const mtuSectors = maxSectorsForMtu(conn.mtu);
    this.maxSectors = Math.min(mtuSectors, options.maxSectors ?? mtuSectors);
    if (this.maxSectors < 1) throw new TorusError('INVALID_ARGUMENT', `MTU ${conn.mtu} of ${conn.name} is too small for AoE (one sector needs 548)`);
    this.totalSectors = Math.floor(device.size / SECTOR_SIZE);
    this.writeThrough = options.writeThrough ?? false;
    // A list must fit in one response frame: 10 + 4 + 8n (mask) and 10 + 2 + 6n (reserve) bytes.
    this.maxMaskEntries = Math.min(options.maxMaskEntries ?? AOE_TARGET_DEFAULTS.maxMaskEntries, Math.floor((conn.mtu - 14) / 8), 0xff);
    this.maxReserveEntries = Math.min(Math.floor((conn.mtu - 12) / 6), 0xff);
    this.log = options.log ?? silent;
    this.identify = identifyDevice({
      sectors: this.totalSectors,
      model: options.model ?? AOE_TARGET_DEFAULTS.model,
      serial: options.serial ?? `${shelf}.${slot}`,
      firmware: `V${this.firmware.toString(16)}`,
      physicalSectorSize: Math.min(device.blockSize, 4096),
      writeCache: !this.writeThrough,
    });
    const state = options.state ?? {};
    this.config = Buffer.from(state.config ?? Buffer.alloc(0));
    if (this.config.length > 1024) throw new TorusError('INVALID_ARGUMENT', 'AoE config string is longer than 1024 bytes');
    this.macMask = (state.macMask ?? []).map(parseMac);
    this.allow = (options.allow ?? []).map(parseMac);
    this.remoteConfig = options.remoteConfig ?? false;
    this.reserve = (state.reserve ?? []).map(parseMac);
  }

  /** Starts serving and advertises the target with an unsolicited config response. */
  start(): void {
    if (this.started) return;
    this.started = true;
    this.conn.onFrames((frames, err) => {
      if (err) this.log.warn({ err: err.message }, 'AoE receive error');
      for (const f of frames) this.receive(f);
    });
    this.advertise();
    this.log.info(
      { shelf: this.shelf, slot: this.slot, iface: this.conn.name, mac: formatMac(this.conn.mac), sectors: this.totalSectors, maxSectors: this.maxSectors },
      'AoE target started',
    );
  }

  /** Stops receiving, waits for commands in flight to be answered, and closes the PacketConn. */
  close(): Promise<void> {
    if (!this.closed) {
      this.closing = true;
      this.closed = (async () => {
        await Promise.allSettled([...this.inFlight]);
        this.conn.close();
      })();
    }
    return this.closed;
  }

  state(): AoeTargetState {
    return { config: Buffer.from(this.config), macMask: this.macMask.map(formatMac), reserve: this.reserve.map(formatMac) };
  }

  /**
   * Broadcasts a config response so initiators on the segment learn of the target without asking.
   * With a MAC mask list it goes only to the listed initiators, as the others get no service.
   */
  advertise(): void {
    const dsts = this.macMask.length === 0 ? [BROADCAST_MAC] : this.macMask;
    try {
      for (const dst of dsts) this.send(this.configReply({ dst, tag: 0 }, ConfigCommand.READ));
    } catch (err) {
      // An interface that is down now may come up later; initiators' own queries will find us then.
      this.log.warn({ err: toTorusError(err).message }, 'AoE advertisement not sent');
    }
  }

  // ------------------------------------------------------------------------------- receive --

  /** Handles one frame. Never throws. */
  receive(frame: Buffer): void {
    this.stats.framesIn++;
    if (this.closing) return;
    try {
      this.dispatch(frame);
    } catch (err) {
      const e = toTorusError(err);
      if (e.code === 'PROTOCOL') {
        this.stats.malformed++;
        this.log.debug({ err: e.message }, 'ignoring malformed AoE frame');
      } else {
        this.log.warn({ err: e.message }, 'AoE frame handling failed');
      }
    }
  }

  private dispatch(frame: Buffer): void {
    const h = decodeHeader(frame);
    if (this.allow.length > 0 && !this.allow.some((m) => m.equals(h.src))) {
      this.stats.ignored++;
      this.stats.notAllowed++;
      return;
    }
    if (h.response || !this.forUs(h) || isGroupMac(h.src)) {
      this.stats.ignored++;
      return;
    }
    if (this.macMask.length > 0 && !this.macMask.some((m) => m.equals(h.src))) {
      this.stats.ignored++;
      return;
    }
    if (h.version !== AOE_VERSION) {
      this.replyError(h, AoeError.UNSUPPORTED_VERSION, frame.subarray(24, 24 + ATA_ARG_LEN));
      return;
    }
    const msg = decodeFrame(frame);
    const broadcast = h.shelf === BROADCAST_SHELF || h.slot === BROADCAST_SLOT;
    if (broadcast && msg.kind !== 'config') {
      this.stats.ignored++;
      return;
    }
    this.handle(msg, frame);
  }

  private forUs(h: AoeHeader): boolean {
    if (!h.dst.equals(this.conn.mac) && !isBroadcastMac(h.dst)) return false;
    return (h.shelf === this.shelf || h.shelf === BROADCAST_SHELF) && (h.slot === this.slot || h.slot === BROADCAST_SLOT);
  }

  private handle(msg: AoeMessage, frame: Buffer): void {
    switch (msg.kind) {
      case 'ata':
        this.startAta(msg.header, msg.arg, frame);
        return;
      case 'config':
        this.handleConfig(msg.header, msg.arg);
        return;
      case 'mask':
        this.handleMask(msg.header, msg.arg);
        return;
      case 'reserve':
        this.handleReserve(msg.header, msg.arg);
        return;
      case 'other':
        this.replyError(msg.header, AoeError.BAD_COMMAND, msg.payload.subarray(0, Math.max(0, this.conn.mtu - 10)));
        return;
    }
  }

  // --------------------------------------------------------------------------------- reply --

  private replyHeader(h: { readonly src?: Buffer; readonly dst?: Buffer; readonly tag: number }, command: number) {
    return {
      dst: h.dst ?? h.src ?? BROADCAST_MAC,
      src: this.conn.mac,
      response: true,
      shelf: this.shelf,
      slot: this.slot,
      command,
      tag: h.tag,
    };
  }

  private send(frame: Buffer): void {
    if (this.conn.send(frame)) this.stats.replies++;
    else this.stats.sendDrops++;
  }

  /** An AoE-level error: the header with E set, followed by the request's argument echoed. */
  private replyError(h: AoeHeader, code: number, arg: Uint8Array): void {
    this.stats.aoeErrors++;
    this.send(encodeRaw({ ...this.replyHeader({ dst: h.src, tag: h.tag }, h.command), error: true, errorCode: code }, arg));
  }

  // -------------------------------------------------------------------------------- config --

  private configReply(to: { readonly dst: Buffer; readonly tag: number }, ccmd: number, error?: number): Buffer {
    return encodeConfig(
      { ...this.replyHeader(to, AoeCommand.CONFIG), ...(error !== undefined ? { error: true, errorCode: error } : {}) },
      { bufferCount: this.bufferCount, firmware: this.firmware, sectorCount: this.maxSectors, ccmd, config: this.config },
    );
  }

  private handleConfig(h: AoeHeader, c: ConfigArg): void {
    const to = { dst: h.src, tag: h.tag };
    switch (c.ccmd) {
      case ConfigCommand.READ:
        break;
      case ConfigCommand.TEST:
        // Test commands let an initiator find targets by config string: silence means "not me".
        if (!c.config.equals(this.config)) return;
        break;
      case ConfigCommand.TEST_PREFIX:
        if (c.config.length > this.config.length || !this.config.subarray(0, c.config.length).equals(c.config)) return;
        break;
      case ConfigCommand.SET:
        if (this.config.length > 0) {
          this.stats.aoeErrors++;
          this.send(this.configReply(to, c.ccmd, AoeError.CONFIG_STRING_PRESENT));
          return;
        }
        this.setConfig(c.config);
        break;
      case ConfigCommand.FORCE_SET:
        this.setConfig(c.config);
        break;
      default:
        this.stats.aoeErrors++;
        this.send(this.configReply(to, c.ccmd, AoeError.BAD_ARGUMENT));
        return;
    }
    this.send(this.configReply(to, c.ccmd));
  }

  private setConfig(config: Buffer): void {
    this.config = Buffer.from(config);
    this.persist();
  }

  private persist(): void {
    const hook = this.options.persist;
    if (!hook) return;
    const state = this.state();
    try {
      void Promise.resolve(hook(state)).catch((err: unknown) => this.log.warn({ err: toTorusError(err).message }, 'persisting AoE target state failed'));
    } catch (err) {
      this.log.warn({ err: toTorusError(err).message }, 'persisting AoE target state failed');
    }
  }

  // ---------------------------------------------------------------------------- MAC mask --

  private handleMask(h: AoeHeader, m: MaskArg): void {
    const hdr = this.replyHeader({ dst: h.src, tag: h.tag }, AoeCommand.MAC_MASK);
    if (m.mcmd === MaskCommand.EDIT && !this.remoteConfig) return this.refuseRemoteConfig(h, 'MAC mask edit', Buffer.from([0, m.mcmd, m.merror, m.dirCount]));
    if (m.mcmd === MaskCommand.EDIT) {
      let changed = false;
      for (let i = 0; i < m.directives.length; i++) {
        const d = m.directives[i]!;
        let merror = 0;
        if (d.dcmd === DirectiveCommand.NONE) continue;
        if (d.dcmd === DirectiveCommand.ADD) {
          if (this.macMask.some((x) => x.equals(d.mac))) continue;
          if (this.macMask.length >= this.maxMaskEntries) merror = MaskError.LIST_FULL;
          else {
            this.macMask.push(Buffer.from(d.mac));
            changed = true;
          }
        } else if (d.dcmd === DirectiveCommand.DELETE) {
          const before = this.macMask.length;
          this.macMask = this.macMask.filter((x) => !x.equals(d.mac));
          changed ||= this.macMask.length !== before;
        } else {
          merror = MaskError.BAD_DIRECTIVE;
        }
        if (merror !== 0) {
          // Directives before the failing one stay applied; the count says where it stopped.
          if (changed) this.persist();
          this.send(encodeMask(hdr, { mcmd: m.mcmd, merror, dirCount: i }));
          return;
        }
      }
      if (changed) this.persist();
    } else if (m.mcmd !== MaskCommand.READ) {
      this.replyError(h, AoeError.BAD_ARGUMENT, Buffer.from([0, m.mcmd, m.merror, m.dirCount]));
      return;
    }
    this.send(encodeMask(hdr, { mcmd: m.mcmd, directives: this.macMask.map((mac) => ({ dcmd: DirectiveCommand.NONE, mac })) }));
  }

  // ------------------------------------------------------------------------ reserve/release --

  private handleReserve(h: AoeHeader, r: ReserveArg): void {
    const hdr = this.replyHeader({ dst: h.src, tag: h.tag }, AoeCommand.RESERVE);
    const listReply = (extra: { error?: boolean; errorCode?: number } = {}): Buffer =>
      encodeReserve({ ...hdr, ...extra }, { rcmd: r.rcmd, macs: this.reserve });
    if ((r.rcmd === ReserveCommand.SET || r.rcmd === ReserveCommand.FORCE_SET) && !this.remoteConfig)
      return this.refuseRemoteConfig(h, 'reservation', Buffer.from([r.rcmd, r.macs.length]));
    if (r.rcmd === ReserveCommand.SET && !this.mayUse(h.src)) {
      this.stats.aoeErrors++;
      this.send(listReply({ error: true, errorCode: AoeError.TARGET_RESERVED }));
      return;
    }
    if (r.rcmd === ReserveCommand.SET || r.rcmd === ReserveCommand.FORCE_SET) {
      // A set from a reserving initiator (or on a free target) replaces the list; an empty list releases.
      if (r.macs.length > this.maxReserveEntries) {
        this.replyError(h, AoeError.BAD_ARGUMENT, Buffer.from([r.rcmd, r.macs.length]));
        return;
      }
      this.reserve = r.macs.map((m) => Buffer.from(m));
      this.persist();
    } else if (r.rcmd !== ReserveCommand.READ) {
      this.replyError(h, AoeError.BAD_ARGUMENT, Buffer.from([r.rcmd, r.macs.length]));
      return;
    }
    this.send(listReply());
  }

  private refuseRemoteConfig(h: AoeHeader, what: string, arg: Buffer): void {
    this.stats.remoteConfigRefused++;
    if (this.logThrottle.take('remoteConfig') !== undefined)
      this.log.info({ from: formatMac(h.src) }, `AoE ${what} from the network refused (torusblk aoe --allow-remote-config enables it)`);
    this.replyError(h, AoeError.BAD_COMMAND, arg);
  }

  private mayUse(src: Buffer): boolean {
    return this.reserve.length === 0 || this.reserve.some((m) => m.equals(src));
  }

  // ------------------------------------------------------------------------------------ ATA --

  private startAta(h: AoeHeader, a: AtaArg, frame: Buffer): void {
    const who = formatMac(h.src);
    const mine = this.perInitiator.get(who) ?? 0;
    if (mine >= this.bufferCount || this.stats.inFlight >= this.maxInFlight) {
      this.stats.busyDrops++;
      const held = this.logThrottle.take('busy');
      if (held !== undefined)
        this.log.warn(
          { initiator: who, running: mine, total: this.stats.inFlight, bufferCount: this.bufferCount, maxInFlight: this.maxInFlight, alsoSince: held },
          'AoE buffers full: dropping commands beyond the buffer count (the initiator retransmits; --buffer-count)',
        );
      return;
    }
    this.stats.ataCommands++;
    if (a.cmdStatus !== AtaCmd.IDENTIFY_DEVICE && !this.mayUse(h.src)) {
      this.replyError(h, AoeError.TARGET_RESERVED, frame.subarray(24, 24 + ATA_ARG_LEN));
      return;
    }
    this.stats.inFlight++;
    this.perInitiator.set(who, mine + 1);
    this.stats.initiators = this.perInitiator.size;
    if (this.stats.inFlight > this.stats.peakInFlight) this.stats.peakInFlight = this.stats.inFlight;
    const p = this.runAta(h, a, frame)
      .catch((err: unknown) => this.log.warn({ err: toTorusError(err).message }, 'AoE ATA command failed unexpectedly'))
      .finally(() => {
        this.stats.inFlight--;
        const left = (this.perInitiator.get(who) ?? 1) - 1;
        if (left > 0) this.perInitiator.set(who, left);
        else this.perInitiator.delete(who);
        this.stats.initiators = this.perInitiator.size;
        this.inFlight.delete(p);
      });
    this.inFlight.add(p);
  }

  private async runAta(h: AoeHeader, a: AtaArg, frame: Buffer): Promise<void> {
    const reply = (fields: { status: number; error?: number; sectorCount?: number; data?: Uint8Array }): void => {
      if ((fields.status & AtaStatus.ERR) !== 0) this.stats.ataErrors++;
      this.send(
        encodeAta(this.replyHeader({ dst: h.src, tag: h.tag }, AoeCommand.ATA), {
          extended: a.extended,
          device: a.device,
          async: a.async,
          write: a.write,
          errFeature: fields.error ?? 0,
          sectorCount: fields.sectorCount ?? 0,
          cmdStatus: fields.status,
          lba: a.lba,
          ...(fields.data ? { data: fields.data } : {}),
        }),
      );
    };
    const ok = AtaStatus.DRDY;
    const cmd = a.cmdStatus;
    switch (cmd) {
      case AtaCmd.IDENTIFY_DEVICE:
        reply({ status: ok, data: this.identify });
        return;
      case AtaCmd.CHECK_POWER_MODE:
        reply({ status: ok, sectorCount: POWER_MODE_ACTIVE });
        return;
      case AtaCmd.FLUSH_CACHE:
      case AtaCmd.FLUSH_CACHE_EXT:
        try {
          // The reply is the initiator's durability guarantee, so it waits for the device.
          await this.device.flush();
          reply({ status: ok });
        } catch (err) {
          reply({ ...ataFailure(err, 'flush'), sectorCount: a.sectorCount });
        }
        return;
      case AtaCmd.READ_SECTORS:
      case AtaCmd.READ_SECTORS_EXT:
      case AtaCmd.WRITE_SECTORS:
      case AtaCmd.WRITE_SECTORS_EXT:
        break;
      default:
        reply({ status: AtaStatus.DRDY | AtaStatus.ERR, error: AtaErrorBit.ABRT, sectorCount: a.sectorCount });
        return;
    }

    const write = cmd === AtaCmd.WRITE_SECTORS || cmd === AtaCmd.WRITE_SECTORS_EXT;
    const count = a.sectorCount;
    const bytes = count * SECTOR_SIZE;
    if (count > this.maxSectors || (write && a.data.length < bytes)) {
      // More than we advertised, or a write whose frame does not hold its data: not an ATA
      // failure but a malformed AoE argument (vblade answers the same way).
      this.replyError(h, AoeError.BAD_ARGUMENT, frame.subarray(24, 24 + ATA_ARG_LEN));
      return;
    }
    const lba = commandLba(cmd, a.lba);
    if (lba + count > this.totalSectors) {
      reply({ status: AtaStatus.DRDY | AtaStatus.ERR, error: AtaErrorBit.IDNF, sectorCount: count });
      return;
    }
    if (count === 0) {
      // ATA's "0 means 256/65536" cannot fit in one AoE frame; like vblade, treat it as nothing to do.
      reply({ status: ok });
      return;
    }
    if (write) {
      try {
        // A view into the received frame: the PacketConn hands over each frame as its own Buffer.
        await this.device.write(lba * SECTOR_SIZE, a.data.subarray(0, bytes), this.writeThrough);
        reply({ status: ok });
      } catch (err) {
        reply({ ...ataFailure(err, 'write'), sectorCount: count });
      }
      return;
    }
    let data: Buffer;
    try {
      data = await this.device.read(lba * SECTOR_SIZE, bytes);
    } catch (err) {
      reply({ ...ataFailure(err, 'read'), sectorCount: count });
      return;
    }
    reply({ status: ok, data });
  }
}
