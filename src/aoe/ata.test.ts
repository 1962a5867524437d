import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ErrorCodes, TorusError } from '../core/errors.js';
import { AtaCmd, AtaErrorBit, AtaStatus, LBA28_MAX_SECTORS, commandLba, identifyDevice } from './ata.js';
import { ATA_READ_ERROR, ataFailure } from './errors.js';

const word = (b: Buffer, n: number): number => b.readUInt16LE(n * 2);
const str = (b: Buffer, from: number, words: number): string => {
  let s = '';
  for (let i = 0; i < words; i++) s += String.fromCharCode(b[(from + i) * 2 + 1]!, b[(from + i) * 2]!);
  return s;
};

describe('ata: IDENTIFY DEVICE', () => {
  test('capacity in LBA28 (words 60-61) and LBA48 (words 100-103)', () => {
    const id = identifyDevice({ sectors: 131072, model: 'm', serial: 's', firmware: 'f' });
    assert.equal(word(id, 60) + word(id, 61) * 65536, 131072);
    assert.equal(word(id, 100) + word(id, 101) * 65536 + word(id, 102) * 2 ** 32 + word(id, 103) * 2 ** 48, 131072);
  });

  test('LBA28 capacity saturates at 0x0FFFFFFF while LBA48 carries the full count', () => {
    const sectors = 2 ** 40 / 512 + 3; // a 1 TiB-and-a-bit device
    const id = identifyDevice({ sectors, model: 'm', serial: 's', firmware: 'f' });
    assert.equal(word(id, 60) + word(id, 61) * 65536, LBA28_MAX_SECTORS);
    assert.equal(word(id, 100) + word(id, 101) * 65536 + word(id, 102) * 2 ** 32, sectors);
  });

  test('strings are space-padded with the characters of each word swapped', () => {
    const id = identifyDevice({ sectors: 1, model: 'Torus AoE', serial: '7.3', firmware: 'V1' });
    assert.equal(str(id, 27, 20), 'Torus AoE'.padEnd(40, ' '));
    assert.equal(str(id, 10, 10), '7.3'.padEnd(20, ' '));
    assert.equal(str(id, 23, 4), 'V1'.padEnd(8, ' '));
    assert.equal(id[27 * 2], 'o'.charCodeAt(0), 'the second character sits in the low byte');
    const long = identifyDevice({ sectors: 1, model: 'x'.repeat(60) + '\u00e9', serial: 'é', firmware: '' });
    assert.equal(str(long, 27, 20), 'x'.repeat(40));
    assert.equal(str(long, 10, 10), ' '.repeat(20), 'non-ASCII becomes spaces');
  });

  test('feature words: 48-bit, FLUSH CACHE (EXT), write cache, power management', () => {
    const id = identifyDevice({ sectors: 1, model: '', serial: '', firmware: '' });
    assert.equal(word(id, 83) & 0xc000, 0x4000, 'word 83 valid');
    assert.ok(word(id, 83) & (1 << 10) && word(id, 86) & (1 << 10), '48-bit supported and enabled');
    assert.ok(word(id, 83) & (1 << 12) && word(id, 83) & (1 << 13), 'FLUSH CACHE and FLUSH CACHE EXT');
    assert.ok(word(id, 82) & (1 << 5) && word(id, 85) & (1 << 5), 'volatile write cache supported and enabled');
    assert.ok(word(id, 82) & (1 << 3), 'power management (CHECK POWER MODE)');
    const wt = identifyDevice({ sectors: 1, model: '', serial: '', firmware: '', writeCache: false });
    assert.ok(word(wt, 82) & (1 << 5) && !(word(wt, 85) & (1 << 5)), 'write-through: write cache supported, disabled');
    assert.ok(word(id, 49) & (1 << 9), 'LBA');
    assert.equal(word(id, 84) & 0xc000, 0x4000);
    assert.equal(word(id, 87) & 0xc000, 0x4000);
  });

  test('word 106 reports the physical sector size; words 117-118 stay zero (512-byte logical sectors)', () => {
    const plain = identifyDevice({ sectors: 1, model: '', serial: '', firmware: '' });
    assert.equal(word(plain, 106), 0x4000);
    const big = identifyDevice({ sectors: 1, model: '', serial: '', firmware: '', physicalSectorSize: 4096 });
    assert.equal(word(big, 106), 0x4000 | 0x2000 | 3);
    assert.equal(word(big, 117), 0);
    assert.equal(word(big, 118), 0);
  });

  test('word 255 holds the signature and a checksum over all 512 bytes', () => {
    const id = identifyDevice({ sectors: 123456789, model: 'checksum', serial: '1', firmware: '2' });
    assert.equal(id[510], 0xa5);
    let sum = 0;
    for (const x of id) sum += x;
    assert.equal(sum % 256, 0);
  });
});

describe('ata: addressing and errors', () => {
  test('LBA28 commands drop the device-register nibble and the upper bytes; EXT commands use all 48 bits', () => {
    const raw = 0xabcd_e1234567; // lba3 = 0xe1: LBA bit plus the top nibble of the address
    assert.equal(commandLba(AtaCmd.READ_SECTORS, raw), 0x01234567);
    assert.equal(commandLba(AtaCmd.WRITE_SECTORS, 0xe0000005), 5);
    assert.equal(commandLba(AtaCmd.READ_SECTORS_EXT, raw), raw);
  });

  test('every error code has a read mapping; writes and flushes always abort', () => {
    for (const code of ErrorCodes) {
      assert.ok([AtaErrorBit.UNC, AtaErrorBit.ABRT].includes(ATA_READ_ERROR[code] as 0x40 | 0x04), code);
      assert.deepEqual(ataFailure(new TorusError(code, 'x'), 'write'), { status: AtaStatus.DRDY | AtaStatus.ERR, error: AtaErrorBit.ABRT });
      assert.deepEqual(ataFailure(new TorusError(code, 'x'), 'flush').error, AtaErrorBit.ABRT);
    }
    assert.equal(ataFailure(new TorusError('BLOCK_UNAVAILABLE', 'gone'), 'read').error, AtaErrorBit.UNC);
    assert.equal(ataFailure(new TorusError('CORRUPT', 'bad crc'), 'read').error, AtaErrorBit.UNC);
    assert.equal(ataFailure(new TorusError('LOCKED', 'lost lock'), 'read').error, AtaErrorBit.ABRT);
    assert.equal(ataFailure(new Error('plain'), 'read').error, AtaErrorBit.ABRT, 'foreign errors are INTERNAL');
  });
});
