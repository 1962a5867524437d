// The slice of the ATA command set (ATA8-ACS) an AoE target speaks: command codes, status and
// error bits, LBA extraction, and the IDENTIFY DEVICE block. Pure; no I/O.

export const AtaCmd = {
  READ_SECTORS: 0x20,
  READ_SECTORS_EXT: 0x24,
  WRITE_SECTORS: 0x30,
  WRITE_SECTORS_EXT: 0x34,
  CHECK_POWER_MODE: 0xe5,
  FLUSH_CACHE: 0xe7,
  FLUSH_CACHE_EXT: 0xea,
  IDENTIFY_DEVICE: 0xec,
} as const;

/** Status register bits. */
export const AtaStatus = { BSY: 0x80, DRDY: 0x40, DF: 0x20, DRQ: 0x08, ERR: 0x01 } as const;

/** Error register bits. */
export const AtaErrorBit = { UNC: 0x40, IDNF: 0x10, ABRT: 0x04 } as const;

/** CHECK POWER MODE's sector count for "active or idle". */
export const POWER_MODE_ACTIVE = 0xff;

/** The largest sector count LBA28 can address (words 60-61 saturate here). */
export const LBA28_MAX_SECTORS = 0x0fffffff;

/** The LBA a command addresses: 28 bits for the original commands, 48 for the EXT ones. */
export function commandLba(cmd: number, lba: number): number {
  // LBA28 commands carry the device register (0xE0: LBA mode + obsolete bits) in the high nibble
  // of the fourth LBA byte, and nothing meaningful in the fifth and sixth.
  if (cmd === AtaCmd.READ_SECTORS || cmd === AtaCmd.WRITE_SECTORS) return lba % 2 ** 32 & LBA28_MAX_SECTORS;
  return lba;
}

export function isExtCommand(cmd: number): boolean {
  return cmd === AtaCmd.READ_SECTORS_EXT || cmd === AtaCmd.WRITE_SECTORS_EXT || cmd === AtaCmd.FLUSH_CACHE_EXT;
}

export interface IdentifyOptions {
  /** Capacity in 512-byte sectors. */
  readonly sectors: number;
  readonly model: string;
  readonly serial: string;
  readonly firmware: string;
  /** Physical sector size to report, a power of two from 512 to 4096 bytes. */
  readonly physicalSectorSize?: number;
  /** Whether the volatile write cache is enabled (default true); supported either way. */
  readonly writeCache?: boolean;
}

/**
 * The 512-byte IDENTIFY DEVICE data (ATA8-ACS 7.16). Words are little-endian; strings are
 * space-padded ASCII with the two characters of each word swapped, as ATA stores them.
 */
export function identifyDevice(o: IdentifyOptions): Buffer {
  const b = Buffer.alloc(512);
  const w = (word: number, value: number): void => {
    b.writeUInt16LE(value & 0xffff, word * 2);
  };
  const str = (word: number, words: number, s: string): void => {
    const text = s.replace(/[^\x20-\x7e]/g, ' ').slice(0, words * 2).padEnd(words * 2, ' ');
    for (let i = 0; i < words; i++) {
      b[(word + i) * 2] = text.charCodeAt(2 * i + 1);
      b[(word + i) * 2 + 1] = text.charCodeAt(2 * i);
    }
  };
  const sectors = Math.max(0, Math.floor(o.sectors));
  const lba28 = Math.min(sectors, LBA28_MAX_SECTORS);

  // Legacy CHS geometry (words 1, 3, 6 and 54-58) for initiators that predate LBA: 16 heads,
  // 63 sectors per track, cylinders capped at 16383 as ATA prescribes for large devices.
  const cylinders = Math.min(16383, Math.floor(lba28 / (16 * 63)));
  w(0, 0x0040); // ATA device, fixed (not removable)
  w(1, cylinders);
  w(3, 16);
  w(6, 63);
  str(10, 10, o.serial);
  str(23, 4, o.firmware);
  str(27, 20, o.model);
  w(47, 0x8000); // READ/WRITE MULTIPLE not supported (low byte 0)
  w(49, 1 << 9); // LBA supported
  w(50, 0x4000);
  w(53, 0x0001); // words 54-58 are valid
  w(54, cylinders);
  w(55, 16);
  w(56, 63);
  const chs = cylinders * 16 * 63;
  w(57, chs);
  w(58, Math.floor(chs / 0x10000));
  w(60, lba28);
  w(61, Math.floor(lba28 / 0x10000));
  w(80, 0x01f0); // ATA/ATAPI-4 through ATA8-ACS
  // Words 82-87: command sets supported (82-84) and enabled (85-87).
  //   82/85 bit 5: volatile write cache, bit 3: power management (CHECK POWER MODE)
  //   83/86 bit 13: FLUSH CACHE EXT, bit 12: FLUSH CACHE, bit 10: 48-bit addressing
  //   83/84/87 bit 14 "shall be one" marks the words valid
  // Advertising the write cache matters: it tells initiators that data is durable only after a
  // FLUSH CACHE, which is exactly the device's write-back contract. A write-through target (each
  // write durable before its reply) says the cache is supported but disabled.
  w(82, (1 << 5) | (1 << 3));
  w(83, (1 << 14) | (1 << 13) | (1 << 12) | (1 << 10));
  w(84, 1 << 14);
  w(85, ((o.writeCache ?? true) ? 1 << 5 : 0) | (1 << 3));
  w(86, (1 << 13) | (1 << 12) | (1 << 10));
  w(87, 1 << 14);
  // Words 100-103: the LBA48 capacity as a 64-bit little-endian count of sectors.
  w(100, sectors % 0x10000);
  w(101, Math.floor(sectors / 0x10000) % 0x10000);
  w(102, Math.floor(sectors / 0x100000000) % 0x10000);
  w(103, 0);
  // Word 106: bit 14 valid, bit 13 "several logical sectors per physical", bits 3:0 log2 of the
  // ratio. Bit 12 stays clear, so words 117-118 (logical sector size) stay zero: 512 bytes.
  const phys = o.physicalSectorSize ?? 512;
  const ratioLog2 = Math.round(Math.log2(Math.max(512, Math.min(4096, phys)) / 512));
  w(106, (1 << 14) | (ratioLog2 > 0 ? (1 << 13) | ratioLog2 : 0));
  w(117, 0);
  w(118, 0);
  // Word 255: signature 0xA5 and a checksum making all 512 bytes sum to zero mod 256.
  b[510] = 0xa5;
  let sum = 0;
  for (let i = 0; i < 511; i++) sum += b[i]!;
  b[511] = (256 - (sum % 256)) % 256;
  return b;
}
