// The scrubber's verdict on one stored copy, as a pure function of what the disk holds for its
// slot (record, sector checksum array, data) and what the store committed for it in memory.

import { crc32c } from '@node-rs/crc32';
import { blockCrcFromSectors } from '../core/crc.js';
import type { BlockInspection } from './common.js';
import { decodeRecord, refKey, sectorsPerBlock } from './format.js';

export interface SlotContents {
  /** The index key of the block the store holds in this slot, and the write that put it there. */
  readonly key: string;
  readonly generation: number;
  /** The CRC of the checksum array that the store committed (read at open, or written by the put). */
  readonly checksumsCrc: number;
  readonly record: Buffer;
  readonly sums: Buffer;
  readonly data: Buffer;
  readonly blockSize: number;
  readonly sectorSize: number;
}

/**
 * Checks every sector against its checksum, the array against the committed CRC, the record
 * against what the store holds, and the sector checksums against the writer's CRC. The CRC a
 * replacement must have comes from the record when it is intact and keeps one, else from the
 * array when that is intact (it was checked against the writer's CRC at the put, when there was one).
 */
export function inspectSlot(c: SlotContents): BlockInspection {
  const problems: string[] = [];
  const rec = decodeRecord(c.record);
  const recordOk = rec.kind === 'used' && refKey(rec.ref) === c.key && rec.generation === c.generation && rec.checksumsCrc === c.checksumsCrc;
  if (!recordOk) problems.push('its slot record on disk is damaged');
  const writerCrc = recordOk && rec.kind === 'used' ? rec.blockCrc : undefined;
  let crc = writerCrc;
  if (crc32c(c.sums) !== c.checksumsCrc) {
    problems.push('its sector checksum array does not match its record');
  } else {
    const combined = blockCrcFromSectors(c.sums, c.blockSize, c.sectorSize);
    crc ??= combined;
    const bad: number[] = [];
    for (let s = 0; s < sectorsPerBlock(c.blockSize, c.sectorSize); s++) {
      const sector = c.data.subarray(s * c.sectorSize, Math.min((s + 1) * c.sectorSize, c.blockSize));
      if (crc32c(sector) !== c.sums.readUInt32LE(s * 4)) bad.push(s);
    }
    if (bad.length > 0) problems.push(`sector${bad.length > 1 ? 's' : ''} ${bad.join(', ')} ${bad.length > 1 ? 'do' : 'does'} not match ${bad.length > 1 ? 'their checksums' : 'its checksum'}`);
    else if (writerCrc !== undefined && combined !== writerCrc) problems.push("its sector checksums do not combine to the writer's CRC");
  }
  const out = crc === undefined ? {} : { crc: crc >>> 0 };
  return problems.length === 0 ? { status: 'ok', ...out } : { status: 'corrupt', reason: problems.join('; '), ...out };
}
