import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { isTorusError } from '../core/errors.js';
import {
  AOE_HEADER_LEN,
  AoeCommand,
  ATA_HEADER_LEN,
  BROADCAST_MAC,
  ConfigCommand,
  DirectiveCommand,
  MIN_FRAME_LEN,
  MaskCommand,
  ReserveCommand,
  decodeFrame,
  decodeHeader,
  encodeAta,
  encodeConfig,
  encodeMask,
  encodeRaw,
  encodeReserve,
  formatMac,
  isGroupMac,
  maxSectorsForMtu,
  parseMac,
} from './frame.js';

const A = parseMac('02:00:00:00:00:0a');
const B = parseMac('02:00:00:00:00:0b');
const hdr = { dst: A, src: B, response: false, shelf: 7, slot: 3, tag: 0xdeadbeef };

function protocolOnly(fn: () => unknown): void {
  try {
    fn();
  } catch (err) {
    if (!isTorusError(err, 'PROTOCOL')) throw err;
  }
}

describe('aoe frame codec', () => {
  test('header fields round-trip, with flags and error', () => {
    const f = encodeRaw({ ...hdr, command: 0x42, response: true, error: true, errorCode: 6 });
    assert.equal(f.length, MIN_FRAME_LEN, 'short frames are padded to the Ethernet minimum');
    const h = decodeHeader(f);
    assert.deepEqual(
      { dst: formatMac(h.dst), src: formatMac(h.src), version: h.version, response: h.response, error: h.error, code: h.errorCode, shelf: h.shelf, slot: h.slot, command: h.command, tag: h.tag },
      { dst: '02:00:00:00:00:0a', src: '02:00:00:00:00:0b', version: 1, response: true, error: true, code: 6, shelf: 7, slot: 3, command: 0x42, tag: 0xdeadbeef },
    );
    assert.equal(f[14], 0x1c, 'version 1 in the high nibble, R and E flags in the low');
    const m = decodeFrame(f);
    assert.equal(m.kind, 'other');
  });

  test('ATA round trip: flags, 48-bit LBA little-endian, data', () => {
    const data = Buffer.alloc(1024, 0x5a);
    const f = encodeAta(hdr, { extended: true, device: true, async: true, write: true, errFeature: 9, sectorCount: 2, cmdStatus: 0x34, lba: 0x123456789abc, data });
    assert.deepEqual([...f.subarray(28, 34)], [0xbc, 0x9a, 0x78, 0x56, 0x34, 0x12]);
    assert.equal(f[24], 0x53);
    const m = decodeFrame(f);
    assert.equal(m.kind, 'ata');
    if (m.kind !== 'ata') return;
    assert.deepEqual(
      { e: m.arg.extended, d: m.arg.device, a: m.arg.async, w: m.arg.write, f: m.arg.errFeature, n: m.arg.sectorCount, c: m.arg.cmdStatus, lba: m.arg.lba },
      { e: true, d: true, a: true, w: true, f: 9, n: 2, c: 0x34, lba: 0x123456789abc },
    );
    assert.ok(m.arg.data.equals(data));
  });

  test('an ATA request padded by Ethernet decodes with the padding as (ignored) data', () => {
    const f = encodeAta(hdr, { sectorCount: 1, cmdStatus: 0xec });
    assert.equal(f.length, 60);
    const m = decodeFrame(f);
    assert.ok(m.kind === 'ata' && m.arg.data.length === 60 - ATA_HEADER_LEN);
  });

  test('config round trip and limits', () => {
    const f = encodeConfig({ ...hdr, response: true }, { bufferCount: 64, firmware: 0x4019, sectorCount: 17, ccmd: ConfigCommand.FORCE_SET, config: Buffer.from('hello') });
    const m = decodeFrame(f);
    assert.ok(m.kind === 'config');
    if (m.kind !== 'config') return;
    assert.deepEqual({ ...m.arg, config: m.arg.config.toString() }, { bufferCount: 64, firmware: 0x4019, sectorCount: 17, aoeVersion: 1, ccmd: 4, config: 'hello' });
    assert.throws(() => encodeConfig(hdr, { bufferCount: 0, firmware: 0, sectorCount: 0, ccmd: 0, config: Buffer.alloc(1025) }), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    // a string length past the end of the frame is malformed ...
    const bad = Buffer.from(encodeConfig(hdr, { bufferCount: 0, firmware: 0, sectorCount: 0, ccmd: ConfigCommand.SET, config: Buffer.from('abc') }));
    bad.writeUInt16BE(200, 30);
    assert.throws(() => decodeFrame(bad), (e) => isTorusError(e, 'PROTOCOL'));
    // ... and so is one over 1024 even when the bytes are there
    const big = encodeConfig(hdr, { bufferCount: 0, firmware: 0, sectorCount: 0, ccmd: ConfigCommand.SET, config: Buffer.alloc(1024) });
    const longer = Buffer.concat([big, Buffer.alloc(8)]);
    longer.writeUInt16BE(1025, 30);
    assert.throws(() => decodeFrame(longer), (e) => isTorusError(e, 'PROTOCOL'));
    // but a read request's length is not looked at
    bad[29] = 0x10;
    assert.equal(decodeFrame(bad).kind, 'config');
  });

  test('MAC mask round trip, including a failed edit that carries no directives', () => {
    const directives = [
      { dcmd: DirectiveCommand.ADD, mac: A },
      { dcmd: DirectiveCommand.DELETE, mac: B },
    ];
    const m = decodeFrame(encodeMask(hdr, { mcmd: MaskCommand.EDIT, directives }));
    assert.ok(m.kind === 'mask');
    if (m.kind !== 'mask') return;
    assert.equal(m.arg.dirCount, 2);
    assert.deepEqual(
      m.arg.directives.map((d) => [d.dcmd, formatMac(d.mac)]),
      [
        [1, '02:00:00:00:00:0a'],
        [2, '02:00:00:00:00:0b'],
      ],
    );
    const failed = decodeFrame(encodeMask({ ...hdr, response: true }, { mcmd: MaskCommand.EDIT, merror: 3, dirCount: 1 }));
    assert.ok(failed.kind === 'mask' && failed.arg.merror === 3 && failed.arg.dirCount === 1 && failed.arg.directives.length === 0);
    const truncated = encodeMask(hdr, { mcmd: MaskCommand.EDIT, directives }).subarray(0, 28 + 8);
    assert.throws(() => decodeFrame(Buffer.concat([truncated])), (e) => isTorusError(e, 'PROTOCOL'));
  });

  test('reserve/release round trip; padding after the list is ignored', () => {
    const f = encodeReserve(hdr, { rcmd: ReserveCommand.SET, macs: [A] });
    assert.equal(f.length, 60);
    const m = decodeFrame(f);
    assert.ok(m.kind === 'reserve' && m.arg.rcmd === 1 && m.arg.macs.length === 1 && m.arg.macs[0]!.equals(A));
    const short = Buffer.from(f.subarray(0, 30));
    assert.throws(() => decodeFrame(short), (e) => isTorusError(e, 'PROTOCOL'));
    // a read request's count is not looked at
    short[24] = ReserveCommand.READ;
    assert.equal(decodeFrame(short).kind, 'reserve');
  });

  test('short frames, other EtherTypes and other versions are typed protocol errors', () => {
    assert.throws(() => decodeHeader(Buffer.alloc(23)), (e) => isTorusError(e, 'PROTOCOL'));
    const f = encodeRaw({ ...hdr, command: AoeCommand.ATA });
    const ip = Buffer.from(f);
    ip.writeUInt16BE(0x0800, 12);
    assert.throws(() => decodeHeader(ip), (e) => isTorusError(e, 'PROTOCOL'));
    const v2 = encodeRaw({ ...hdr, command: AoeCommand.ATA, version: 2 });
    assert.equal(decodeHeader(v2).version, 2, 'the header still decodes, so a target can say "unsupported version"');
    assert.throws(() => decodeFrame(v2), (e) => isTorusError(e, 'PROTOCOL'));
    assert.throws(() => decodeFrame(encodeRaw({ ...hdr, command: AoeCommand.ATA }).subarray(0, 35)), (e) => isTorusError(e, 'PROTOCOL'));
  });

  test('encode refuses out-of-range fields', () => {
    assert.throws(() => encodeAta({ ...hdr, shelf: 0x10000 }, { sectorCount: 0, cmdStatus: 0 }), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    assert.throws(() => encodeAta(hdr, { sectorCount: 256, cmdStatus: 0 }), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    assert.throws(() => encodeAta(hdr, { sectorCount: 1, cmdStatus: 0, lba: 2 ** 48 }), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    assert.throws(() => encodeRaw({ ...hdr, dst: Buffer.alloc(5), command: 0 }), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  });

  test('helpers: MACs and the MTU sector budget', () => {
    assert.equal(formatMac(parseMac('02-AB-00-00-00-01')), '02:ab:00:00:00:01');
    assert.throws(() => parseMac('02:ab:00'), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
    assert.ok(isGroupMac(BROADCAST_MAC));
    assert.ok(!isGroupMac(A));
    assert.equal(maxSectorsForMtu(1500), 2);
    assert.equal(maxSectorsForMtu(9000), 17);
    assert.equal(maxSectorsForMtu(500), 0);
    assert.equal(maxSectorsForMtu(65535), 127);
  });

  test('every truncation of every kind of valid frame decodes or is a PROTOCOL error', () => {
    const frames = [
      encodeAta(hdr, { write: true, sectorCount: 2, cmdStatus: 0x34, lba: 5, data: Buffer.alloc(1024, 1) }),
      encodeConfig(hdr, { bufferCount: 1, firmware: 2, sectorCount: 3, ccmd: ConfigCommand.SET, config: Buffer.from('x'.repeat(100)) }),
      encodeMask(hdr, { mcmd: MaskCommand.EDIT, directives: Array.from({ length: 10 }, () => ({ dcmd: 1, mac: A })) }),
      encodeReserve(hdr, { rcmd: ReserveCommand.FORCE_SET, macs: Array.from({ length: 10 }, () => B) }),
    ];
    for (const f of frames) for (let cut = 0; cut <= f.length; cut++) protocolOnly(() => decodeFrame(f.subarray(0, cut)));
  });

  test('fuzz: arbitrary bytes never throw anything but PROTOCOL', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), (bytes) => {
        protocolOnly(() => decodeFrame(bytes));
      }),
      { numRuns: 2000 },
    );
  });

  test('fuzz: arbitrary arguments behind a valid AoE v1 header never throw anything but PROTOCOL', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 3 }), fc.boolean(), fc.uint8Array({ maxLength: 1200 }), (command, response, arg) => {
        const f = Buffer.concat([encodeRaw({ ...hdr, command, response }).subarray(0, AOE_HEADER_LEN), arg]);
        protocolOnly(() => decodeFrame(f));
      }),
      { numRuns: 3000 },
    );
  });

  test('fuzz: encode/decode round trips for generated ATA and reserve messages', () => {
    fc.assert(
      fc.property(
        fc.record({
          sectorCount: fc.integer({ min: 0, max: 255 }),
          cmdStatus: fc.integer({ min: 0, max: 255 }),
          errFeature: fc.integer({ min: 0, max: 255 }),
          lba: fc.integer({ min: 0, max: 2 ** 48 - 1 }),
          extended: fc.boolean(),
          write: fc.boolean(),
          tag: fc.integer({ min: 0, max: 0xffffffff }),
          data: fc.uint8Array({ maxLength: 1100 }),
          macs: fc.array(fc.uint8Array({ minLength: 6, maxLength: 6 }), { maxLength: 40 }),
        }),
        (r) => {
          const m = decodeFrame(encodeAta({ ...hdr, tag: r.tag }, r));
          assert.ok(m.kind === 'ata');
          if (m.kind !== 'ata') return;
          assert.equal(m.header.tag, r.tag);
          assert.deepEqual([m.arg.sectorCount, m.arg.cmdStatus, m.arg.errFeature, m.arg.lba, m.arg.extended, m.arg.write], [r.sectorCount, r.cmdStatus, r.errFeature, r.lba, r.extended, r.write]);
          assert.ok(m.arg.data.subarray(0, r.data.length).equals(Buffer.from(r.data)));
          const rr = decodeFrame(encodeReserve(hdr, { rcmd: 2, macs: r.macs }));
          assert.ok(rr.kind === 'reserve');
          if (rr.kind === 'reserve') assert.deepEqual(rr.arg.macs.map(formatMac), r.macs.map(formatMac));
        },
      ),
      { numRuns: 500 },
    );
  });
});
