// A small AoE initiator for tests and measurements: a class over any PacketConn (the unit tests
// drive it over an in-memory segment), and a command line that runs it on a raw socket, one
// JSON line out per command, so integration tests can run it inside a network namespace:
//
//   node dist/test/helpers/aoe-initiator.js COMMAND --iface eth0 --shelf 7 --slot 3 [options]
//
//   discover                     config query (broadcast shelf/slot), prints the target's config
//   identify                     IDENTIFY DEVICE: capacity, model, feature words
//   scenario [--skip-flush-ext]  the full single-initiator script (see runScenario)
//   probe                        IDENTIFY, READ, WRITE (rewriting what it read), each ok / AoE error / timeout
//   reserve read|set|force [--macs self,MAC,...]      reserve/release; empty --macs releases
//   mask read|add|del [--macs self,MAC,...]          MAC mask list
//   config read|test|prefix|set|force [--string S]   query config information
//   bench --op read|write --seconds S --depth D       4 KiB-equivalent ops/s
//   put --file F --lba N [--flush]                   writes a file's sectors (then FLUSH CACHE EXT)
//   get --file F --lba N --count S                   reads S sectors into a file
//
// Every wait is bounded: each request has a timeout and a retry budget, and the process exits on
// its own when the command is done.

import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { pathToFileURL } from 'node:url';
import { TorusError } from '../../src/core/errors.js';
import {
  AoeCommand,
  AtaCmd,
  AtaStatus,
  BROADCAST_MAC,
  BROADCAST_SHELF,
  BROADCAST_SLOT,
  ConfigCommand,
  DirectiveCommand,
  MaskCommand,
  RawPacketConn,
  ReserveCommand,
  SECTOR_SIZE,
  decodeFrame,
  encodeAta,
  encodeConfig,
  encodeMask,
  encodeReserve,
  formatMac,
  maxSectorsForMtu,
  parseMac,
  type AoeMessage,
  type AtaArg,
  type ConfigArg,
  type MaskArg,
  type PacketConn,
  type ReserveArg,
} from '../../src/aoe/index.js';

export interface InitiatorOptions {
  readonly shelf: number;
  readonly slot: number;
  /** Per-attempt wait for a response. */
  readonly timeoutMs?: number;
  /** Attempts per request (retransmissions + 1). */
  readonly attempts?: number;
}

/** The AoE error flag set in a response. */
export class AoeErrorResponse extends Error {
  constructor(readonly code: number) {
    super(`AoE error ${code}`);
  }
}

/** An ATA error status in a response. */
export class AtaErrorResponse extends Error {
  constructor(
    readonly status: number,
    readonly error: number,
  ) {
    super(`ATA status 0x${status.toString(16)} error 0x${error.toString(16)}`);
  }
}

interface Pending {
  resolve: (m: AoeMessage) => void;
  command: number;
}

export class AoeInitiator {
  /** The target's MAC, learned from its first config response (broadcast until then). */
  target: Buffer = BROADCAST_MAC;
  config: ConfigArg | undefined;
  /** Sectors per command: the smaller of what the target advertises and our own MTU allows. */
  maxSectors = 2;
  /** Unsolicited config responses seen (the target's start-up advertisement). */
  readonly adverts: ConfigArg[] = [];
  private readonly pending = new Map<number, Pending>();
  private nextTag = (randomBytes(4).readUInt32BE(0) >>> 1) + 1;
  private readonly timeoutMs: number;
  private readonly attempts: number;

  constructor(
    readonly conn: PacketConn,
    readonly opts: InitiatorOptions,
  ) {
    this.timeoutMs = opts.timeoutMs ?? 300;
    this.attempts = opts.attempts ?? 10;
    conn.onFrames((frames) => {
      for (const f of frames) this.receive(f);
    });
  }

  private receive(frame: Buffer): void {
    let m: AoeMessage;
    try {
      m = decodeFrame(frame);
    } catch {
      return;
    }
    if (!m.header.response) return;
    if (m.header.shelf !== this.opts.shelf || m.header.slot !== this.opts.slot) return;
    const p = this.pending.get(m.header.tag);
    if (p && p.command === m.header.command) {
      this.pending.delete(m.header.tag);
      p.resolve(m);
    } else if (m.kind === 'config' && m.header.tag === 0) {
      this.adverts.push(m.arg);
    }
  }

  private tag(): number {
    this.nextTag = (this.nextTag + 1) >>> 0 || 1;
    return this.nextTag;
  }

  /**
   * Sends a request and waits for the response with its tag, retransmitting (same tag, as the
   * target cannot tell) until the attempts run out. Undefined if nobody answered.
   */
  async exchange(command: number, build: (tag: number) => Buffer, attempts = this.attempts): Promise<AoeMessage | undefined> {
    const tag = this.tag();
    const frame = build(tag);
    try {
      for (let i = 0; i < attempts; i++) {
        const answer = new Promise<AoeMessage | undefined>((resolve) => {
          const timer = setTimeout(() => resolve(undefined), this.timeoutMs);
          this.pending.set(tag, {
            command,
            resolve: (m) => {
              clearTimeout(timer);
              resolve(m);
            },
          });
        });
        this.conn.send(frame);
        const m = await answer;
        if (m) return m;
      }
      return undefined;
    } finally {
      this.pending.delete(tag);
    }
  }

  private header(dst: Buffer = this.target) {
    return { dst, src: this.conn.mac, response: false, shelf: this.opts.shelf, slot: this.opts.slot };
  }

  private async must(command: number, build: (tag: number) => Buffer): Promise<AoeMessage> {
    const m = await this.exchange(command, build);
    if (!m) throw new TorusError('TIMEOUT', `no AoE response from e${this.opts.shelf}.${this.opts.slot}`);
    if (m.header.error) throw new AoeErrorResponse(m.header.errorCode);
    return m;
  }

  /** Config query to the broadcast MAC (and the broadcast shelf/slot if asked); learns the target. */
  async discover(opts: { broadcastAddress?: boolean } = {}): Promise<ConfigArg> {
    const hdr = { ...this.header(BROADCAST_MAC), ...(opts.broadcastAddress ? { shelf: BROADCAST_SHELF, slot: BROADCAST_SLOT } : {}) };
    const want = { shelf: this.opts.shelf, slot: this.opts.slot };
    const m = await this.must(AoeCommand.CONFIG, (tag) =>
      encodeConfig({ ...hdr, tag }, { bufferCount: 0, firmware: 0, sectorCount: 0, ccmd: ConfigCommand.READ }),
    );
    if (m.kind !== 'config' || m.header.shelf !== want.shelf || m.header.slot !== want.slot) throw new Error('unexpected discover response');
    this.target = Buffer.from(m.header.src);
    this.config = m.arg;
    const ours = maxSectorsForMtu(this.conn.mtu);
    this.maxSectors = Math.max(1, Math.min(ours, m.arg.sectorCount === 0 ? 2 : m.arg.sectorCount));
    return m.arg;
  }

  /** Query Config with a sub-command; undefined when the target stays silent (a failed test). */
  async queryConfig(ccmd: number, config: Buffer = Buffer.alloc(0), attempts?: number): Promise<{ error: number; arg: ConfigArg } | undefined> {
    const m = await this.exchange(
      AoeCommand.CONFIG,
      (tag) => encodeConfig({ ...this.header(), tag }, { bufferCount: 0, firmware: 0, sectorCount: 0, ccmd, config }),
      attempts,
    );
    if (!m) return undefined;
    if (m.kind !== 'config') throw new Error('unexpected config response');
    return { error: m.header.error ? m.header.errorCode : 0, arg: m.arg };
  }

  /** An ATA command; the response's argument (status, error, data). AoeErrorResponse for AoE errors. */
  async ata(fields: { cmd: number; lba?: number; count?: number; data?: Uint8Array; ext?: boolean; write?: boolean }): Promise<AtaArg> {
    const m = await this.must(AoeCommand.ATA, (tag) =>
      encodeAta(
        { ...this.header(), tag },
        {
          extended: fields.ext ?? false,
          write: fields.write ?? false,
          sectorCount: fields.count ?? 0,
          cmdStatus: fields.cmd,
          lba: fields.lba ?? 0,
          ...(fields.data ? { data: fields.data } : {}),
        },
      ),
    );
    if (m.kind !== 'ata') throw new Error('unexpected ATA response');
    return m.arg;
  }

  private static check(a: AtaArg): AtaArg {
    if ((a.cmdStatus & (AtaStatus.BSY | AtaStatus.DF | AtaStatus.DRQ | AtaStatus.ERR)) !== 0) throw new AtaErrorResponse(a.cmdStatus, a.errFeature);
    return a;
  }

  async identify(): Promise<Buffer> {
    const a = AoeInitiator.check(await this.ata({ cmd: AtaCmd.IDENTIFY_DEVICE, count: 1 }));
    if (a.data.length < 512) throw new Error(`IDENTIFY returned ${a.data.length} bytes`);
    return Buffer.from(a.data.subarray(0, 512));
  }

  /** The LBA28 address bytes as the Linux initiator sends them (LBA mode bits in byte 3's high nibble). */
  private static lba28(lba: number): number {
    return (lba & 0x00ffffff) + ((((lba >>> 24) & 0x0f) | 0xe0) * 0x1000000);
  }

  async readSectors(lba: number, count: number, ext: boolean): Promise<Buffer> {
    const a = AoeInitiator.check(
      await this.ata({ cmd: ext ? AtaCmd.READ_SECTORS_EXT : AtaCmd.READ_SECTORS, lba: ext ? lba : AoeInitiator.lba28(lba), count, ext }),
    );
    if (a.data.length < count * SECTOR_SIZE) throw new Error(`read of ${count} sectors returned ${a.data.length} bytes`);
    return Buffer.from(a.data.subarray(0, count * SECTOR_SIZE));
  }

  async writeSectors(lba: number, data: Buffer, ext: boolean): Promise<void> {
    const count = data.length / SECTOR_SIZE;
    AoeInitiator.check(
      await this.ata({ cmd: ext ? AtaCmd.WRITE_SECTORS_EXT : AtaCmd.WRITE_SECTORS, lba: ext ? lba : AoeInitiator.lba28(lba), count, ext, write: true, data }),
    );
  }

  /** Reads or writes any number of sectors, split into frames and run `depth` at a time. */
  async transfer(op: 'read' | 'write', lba: number, count: number, ext: boolean, data?: Buffer, depth = 16): Promise<Buffer> {
    const out = Buffer.alloc(count * SECTOR_SIZE);
    const chunks: { at: number; n: number }[] = [];
    for (let at = 0; at < count; at += this.maxSectors) chunks.push({ at, n: Math.min(this.maxSectors, count - at) });
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < chunks.length) {
        const c = chunks[next++]!;
        if (op === 'read') (await this.readSectors(lba + c.at, c.n, ext)).copy(out, c.at * SECTOR_SIZE);
        else await this.writeSectors(lba + c.at, data!.subarray(c.at * SECTOR_SIZE, (c.at + c.n) * SECTOR_SIZE), ext);
      }
    };
    await Promise.all(Array.from({ length: Math.min(depth, chunks.length) }, worker));
    return out;
  }

  async flush(ext: boolean): Promise<AtaArg> {
    return this.ata({ cmd: ext ? AtaCmd.FLUSH_CACHE_EXT : AtaCmd.FLUSH_CACHE, ext });
  }

  async reserve(rcmd: number, macs: readonly Buffer[] = []): Promise<{ error: number; arg: ReserveArg }> {
    const m = await this.exchange(AoeCommand.RESERVE, (tag) => encodeReserve({ ...this.header(), tag }, { rcmd, macs }));
    if (!m) throw new TorusError('TIMEOUT', 'no reserve/release response');
    if (m.kind !== 'reserve') throw new Error('unexpected reserve response');
    return { error: m.header.error ? m.header.errorCode : 0, arg: m.arg };
  }

  async mask(mcmd: number, directives: readonly { dcmd: number; mac: Buffer }[] = [], attempts?: number): Promise<{ error: number; arg: MaskArg } | undefined> {
    const m = await this.exchange(AoeCommand.MAC_MASK, (tag) => encodeMask({ ...this.header(), tag }, { mcmd, directives }), attempts);
    if (!m) return undefined;
    if (m.kind !== 'mask') throw new Error('unexpected mask response');
    return { error: m.header.error ? m.header.errorCode : 0, arg: m.arg };
  }

  close(): void {
    this.conn.close();
  }
}

// ------------------------------------------------------------------------------ identify data --

export interface IdentifyInfo {
  sectors48: number;
  sectors28: number;
  lba48: boolean;
  flushExt: boolean;
  writeCacheEnabled: boolean;
  model: string;
  serial: string;
  firmware: string;
  checksumOk: boolean;
}

export function parseIdentify(id: Buffer): IdentifyInfo {
  const word = (n: number): number => id.readUInt16LE(n * 2);
  const str = (from: number, words: number): string => {
    let s = '';
    for (let i = 0; i < words; i++) s += String.fromCharCode(id[(from + i) * 2 + 1]!, id[(from + i) * 2]!);
    return s.trim();
  };
  let sum = 0;
  for (const x of id) sum += x;
  return {
    sectors48: word(100) + word(101) * 0x10000 + word(102) * 0x100000000,
    sectors28: word(60) + word(61) * 0x10000,
    lba48: ((word(83) | word(86)) & (1 << 10)) !== 0,
    flushExt: (word(83) & (1 << 13)) !== 0,
    writeCacheEnabled: (word(85) & (1 << 5)) !== 0,
    model: str(27, 20),
    serial: str(10, 10),
    firmware: str(23, 4),
    // word 255 is optional: vblade leaves it zero
    checksumOk: id[510] !== 0xa5 || sum % 256 === 0,
  };
}

// ------------------------------------------------------------------------------------ scenario --

function pattern(seed: number, bytes: number): Buffer {
  const b = Buffer.alloc(bytes);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < bytes; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b.writeUInt32LE(x >>> 0, i);
  }
  return b;
}

async function outcome(fn: () => Promise<unknown>): Promise<string> {
  try {
    await fn();
    return 'ok';
  } catch (err) {
    if (err instanceof AoeErrorResponse) return `aoe-error-${err.code}`;
    if (err instanceof AtaErrorResponse) return `ata-error-${err.error.toString(16)}`;
    if (err instanceof TorusError && err.code === 'TIMEOUT') return 'timeout';
    return `failed: ${(err as Error).message}`;
  }
}

/**
 * The script run against vblade and against our target alike: discovery, identity, byte-exact
 * patterns through LBA28 and LBA48 (multi-frame, concurrent), FLUSH, CHECK POWER MODE, an
 * unsupported command, and the Query Config sub-commands. Reports facts; the test judges them.
 */
export async function runScenario(ini: AoeInitiator, opts: { flushExt?: boolean } = {}): Promise<Record<string, unknown>> {
  const r: Record<string, unknown> = {};
  const cfg = await ini.discover({ broadcastAddress: true });
  r.config = { bufferCount: cfg.bufferCount, firmware: cfg.firmware, sectorCount: cfg.sectorCount, aoeVersion: cfg.aoeVersion, target: formatMac(ini.target) };
  r.maxSectors = ini.maxSectors;
  const id = parseIdentify(await ini.identify());
  r.identify = id;
  const sectors = id.lba48 ? id.sectors48 : id.sectors28;
  // LBA28 near the start and LBA48 at the very end; both cross frame boundaries and run concurrently.
  const n = 64;
  const cases = [
    { name: 'lba28', lba: 8, ext: false },
    { name: 'lba48', lba: sectors - n, ext: true },
  ];
  for (const c of cases) {
    const data = pattern(c.lba + 1, n * SECTOR_SIZE);
    await ini.transfer('write', c.lba, n, c.ext, data);
    const back = await ini.transfer('read', c.lba, n, c.ext);
    r[c.name] = back.equals(data) ? 'match' : 'MISMATCH';
  }
  // The same data through the other addressing mode: one device, two ways in.
  const cross = await ini.transfer('read', 8, n, true);
  r.crossRead = cross.equals(pattern(9, n * SECTOR_SIZE)) ? 'match' : 'MISMATCH';
  r.beyondEnd = await outcome(() => ini.readSectors(sectors, 1, true));
  const flush = await ini.flush(false);
  r.flush = `status-${flush.cmdStatus.toString(16)}`;
  if (opts.flushExt !== false) r.flushExt = `status-${(await ini.flush(true)).cmdStatus.toString(16)}`;
  const power = await ini.ata({ cmd: AtaCmd.CHECK_POWER_MODE });
  r.checkPower = { status: power.cmdStatus, count: power.sectorCount };
  const smart = await ini.ata({ cmd: 0xb0 });
  r.unsupported = { status: smart.cmdStatus, error: smart.errFeature };
  // Query Config sub-commands, leaving the string as we found it.
  const before = (await ini.queryConfig(ConfigCommand.READ))?.arg.config ?? Buffer.alloc(0);
  const s = Buffer.from(`torus-test-${process.pid}`);
  r.configSetEmpty = (await ini.queryConfig(ConfigCommand.FORCE_SET, Buffer.alloc(0)))?.error;
  r.configSet = (await ini.queryConfig(ConfigCommand.SET, s))?.error;
  r.configSetAgain = (await ini.queryConfig(ConfigCommand.SET, Buffer.from('other')))?.error;
  r.configTestExact = (await ini.queryConfig(ConfigCommand.TEST, s, 2)) ? 'answered' : 'silent';
  r.configTestWrong = (await ini.queryConfig(ConfigCommand.TEST, Buffer.from('torus-test-'), 2)) ? 'answered' : 'silent';
  r.configPrefix = (await ini.queryConfig(ConfigCommand.TEST_PREFIX, Buffer.from('torus-test-'), 2)) ? 'answered' : 'silent';
  r.configPrefixWrong = (await ini.queryConfig(ConfigCommand.TEST_PREFIX, Buffer.from('nope'), 2)) ? 'answered' : 'silent';
  r.configRead = (await ini.queryConfig(ConfigCommand.READ))?.arg.config.toString();
  await ini.queryConfig(ConfigCommand.FORCE_SET, before);
  return r;
}

/** What a second initiator can do right now: each of IDENTIFY, READ and WRITE as ok / aoe-error-N / timeout. */
export async function probe(ini: AoeInitiator): Promise<Record<string, string>> {
  const identify = await outcome(() => ini.identify());
  let read: Buffer | undefined;
  const readOutcome = await outcome(async () => {
    read = await ini.readSectors(0, 1, true);
  });
  // Rewrite what was read, so a probe that gets through changes nothing.
  const write = await outcome(() => ini.writeSectors(0, read ?? Buffer.alloc(SECTOR_SIZE), true));
  return { identify, read: readOutcome, write };
}

/** Ops per second of 4 KiB-equivalent transfers (bytes moved / 4096 / seconds), `depth` in flight. */
export async function bench(ini: AoeInitiator, op: 'read' | 'write', seconds: number, depth: number, sectors: number): Promise<Record<string, number>> {
  const per = ini.maxSectors;
  const data = pattern(7, per * SECTOR_SIZE);
  const span = Math.max(per, Math.min(sectors, 1 << 20) - per);
  let bytes = 0;
  let frames = 0;
  const deadline = Date.now() + seconds * 1000;
  const start = process.hrtime.bigint();
  let cursor = 0;
  const worker = async (): Promise<void> => {
    while (Date.now() < deadline) {
      const lba = cursor;
      cursor = (cursor + per) % span;
      if (op === 'read') await ini.readSectors(lba, per, true);
      else await ini.writeSectors(lba, data, true);
      bytes += per * SECTOR_SIZE;
      frames++;
    }
  };
  await Promise.all(Array.from({ length: depth }, worker));
  const elapsed = Number(process.hrtime.bigint() - start) / 1e9;
  return { opsPerSec4k: Math.round(bytes / 4096 / elapsed), framesPerSec: Math.round(frames / elapsed), mibPerSec: Math.round((bytes / 1048576 / elapsed) * 10) / 10, sectorsPerFrame: per, depth, seconds: Math.round(elapsed * 10) / 10 };
}

/**
 * A hostile initiator: READ frames of one sector, `burst` every millisecond for `seconds`, never
 * waiting for an answer (each with its own tag), spread over the first MiB. Counts what comes back.
 */
export async function flood(ini: AoeInitiator, seconds: number, burst: number): Promise<Record<string, number>> {
  let sent = 0;
  let tag = 0x40000000;
  const deadline = Date.now() + seconds * 1000;
  while (Date.now() < deadline) {
    for (let i = 0; i < burst; i++) {
      ini.conn.send(
        encodeAta({ dst: ini.target, src: ini.conn.mac, response: false, shelf: ini.opts.shelf, slot: ini.opts.slot, tag: tag++ }, { extended: true, write: false, sectorCount: 1, cmdStatus: AtaCmd.READ_SECTORS_EXT, lba: sent % 2048 }),
      );
      sent++;
    }
    await new Promise((r) => setTimeout(r, 1));
  }
  return { sent, seconds };
}

// -------------------------------------------------------------------------------------- main --

function macList(text: string | undefined, self: Buffer): Buffer[] {
  if (!text) return [];
  return text.split(',').filter(Boolean).map((m) => (m === 'self' ? self : parseMac(m)));
}

async function main(): Promise<void> {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      iface: { type: 'string', default: 'eth0' },
      shelf: { type: 'string', default: '7' },
      slot: { type: 'string', default: '3' },
      macs: { type: 'string' },
      string: { type: 'string' },
      op: { type: 'string', default: 'read' },
      seconds: { type: 'string', default: '5' },
      depth: { type: 'string', default: '16' },
      'skip-flush-ext': { type: 'boolean', default: false },
      'timeout-ms': { type: 'string', default: '300' },
      file: { type: 'string' },
      lba: { type: 'string', default: '0' },
      count: { type: 'string', default: '0' },
      flush: { type: 'boolean', default: false },
    },
  });
  const [command, sub] = positionals;
  const conn = RawPacketConn.open(values.iface);
  const ini = new AoeInitiator(conn, { shelf: Number(values.shelf), slot: Number(values.slot), timeoutMs: Number(values['timeout-ms']) });
  // Nothing here may outlive its command: a hard stop in case a wait was not bounded after all.
  setTimeout(() => {
    process.stderr.write('aoe-initiator: gave up after 120 s\n');
    process.exit(3);
  }, 120_000).unref();
  const out = (o: unknown): void => {
    process.stdout.write(`${JSON.stringify(o)}\n`);
  };
  try {
    // A masked-out initiator gets no answer at all: note it and carry on addressing the broadcast
    // MAC, so probe and mask can still report what each command gets.
    let discovered = 'ok';
    try {
      await ini.discover();
    } catch (err) {
      if (!(err instanceof TorusError && err.code === 'TIMEOUT') || (command !== 'probe' && command !== 'mask')) throw err;
      discovered = 'timeout';
    }
    switch (command) {
      case 'discover':
        out({ mac: formatMac(conn.mac), target: formatMac(ini.target), config: { ...ini.config, config: ini.config?.config.toString() }, maxSectors: ini.maxSectors });
        break;
      case 'identify':
        out(parseIdentify(await ini.identify()));
        break;
      case 'scenario':
        out(await runScenario(ini, { flushExt: !values['skip-flush-ext'] }));
        break;
      case 'probe':
        out({ discover: discovered, ...(await probe(ini)) });
        break;
      case 'reserve': {
        const rcmd = { read: ReserveCommand.READ, set: ReserveCommand.SET, force: ReserveCommand.FORCE_SET }[sub ?? 'read'];
        if (rcmd === undefined) throw new Error(`reserve ${sub}?`);
        const r = await ini.reserve(rcmd, macList(values.macs, conn.mac));
        out({ error: r.error, macs: r.arg.macs.map(formatMac) });
        break;
      }
      case 'mask': {
        if (sub === 'read' || sub === undefined) {
          const r = await ini.mask(MaskCommand.READ);
          out(r ? { error: r.error, merror: r.arg.merror, macs: r.arg.directives.map((d) => formatMac(d.mac)) } : { timeout: true });
        } else {
          const dcmd = sub === 'add' ? DirectiveCommand.ADD : sub === 'del' ? DirectiveCommand.DELETE : Number(sub);
          const r = await ini.mask(
            MaskCommand.EDIT,
            macList(values.macs, conn.mac).map((mac) => ({ dcmd, mac })),
          );
          out(r ? { error: r.error, merror: r.arg.merror, dirCount: r.arg.dirCount, macs: r.arg.directives.map((d) => formatMac(d.mac)) } : { timeout: true });
        }
        break;
      }
      case 'config': {
        const ccmd = { read: 0, test: 1, prefix: 2, set: 3, force: 4 }[sub ?? 'read'];
        if (ccmd === undefined) throw new Error(`config ${sub}?`);
        const r = await ini.queryConfig(ccmd, Buffer.from(values.string ?? ''), 2);
        out(r ? { error: r.error, config: r.arg.config.toString() } : { silent: true });
        break;
      }
      case 'put': {
        // Writes --file at --lba (LBA48), then FLUSH CACHE EXT with --flush.
        const data = readFileSync(values.file!);
        if (data.length % SECTOR_SIZE !== 0) throw new Error(`${values.file} is not a whole number of sectors`);
        await ini.transfer('write', Number(values.lba), data.length / SECTOR_SIZE, true, data);
        const flushed = values.flush ? (await ini.flush(true)).cmdStatus : undefined;
        out({ sectors: data.length / SECTOR_SIZE, ...(flushed !== undefined ? { flushStatus: flushed } : {}) });
        break;
      }
      case 'get': {
        const got = await ini.transfer('read', Number(values.lba), Number(values.count), true);
        writeFileSync(values.file!, got);
        out({ sectors: Number(values.count) });
        break;
      }
      case 'flood':
        out(await flood(ini, Number(values.seconds), Number(values.depth)));
        break;
      case 'bench': {
        const id = parseIdentify(await ini.identify());
        out(await bench(ini, values.op === 'write' ? 'write' : 'read', Number(values.seconds), Number(values.depth), id.sectors48));
        break;
      }
      default:
        throw new Error(`unknown command ${command}`);
    }
  } finally {
    ini.close();
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().then(
    () => process.exit(0),
    (err: unknown) => {
      process.stderr.write(`aoe-initiator: ${err instanceof Error ? err.message : String(err)}\n`);
      process.exit(1);
    },
  );
}
