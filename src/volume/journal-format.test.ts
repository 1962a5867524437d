import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import { BlockType } from '../core/ids.js';
import fc from 'fast-check';
import { LogBlockBuilder, parseLogBlock, RECORD_HEADER_SIZE, RecordType, type JournalRecord } from './journal-format.js';
import { OverlayIndex, type Source } from './overlay.js';
import { decodeRunPage, decodeRunPageLogs, encodeRunPage, logKeyOf, pageEntries, type RunEntry } from './runs.js';

const BS = 64 * 1024;
const at = { volume: 5, epoch: 9, index: 3 * 2 ** 24 + 7 };

function fill(records: { type: number; len: number }[], firstLsn: number): { b: LogBlockBuilder; added: JournalRecord[] } {
  const b = new LogBlockBuilder(at, BS);
  const added: JournalRecord[] = [];
  let lsn = firstLsn;
  for (const r of records) {
    const len = r.type === RecordType.Data ? r.len : 0;
    const rec: JournalRecord =
      r.type === RecordType.Data
        ? { type: RecordType.Data, lsn, offset: lsn * 512, length: len, data: randomBytes(len) }
        : r.type === RecordType.Block
          ? { type: RecordType.Block, lsn, offset: lsn * 65536, length: 65536, block: { ref: { type: BlockType.Data, volume: 5, inode: 9, index: 2 ** 40 + lsn }, crc: (lsn * 2654435761) >>> 0 } }
          : { type: r.type as JournalRecord['type'], lsn, offset: lsn * 4096, length: r.len };
    if (!b.fits(rec)) break;
    const off = b.add(rec);
    if (rec.type === RecordType.Data) assert.equal(off % (len % 4096 === 0 ? 4096 : 512), 0, 'data aligned');
    added.push(rec);
    lsn++;
  }
  return { b, added };
}

const arbRecords = fc.array(
  fc.record({ type: fc.constantFrom(RecordType.Data, RecordType.Data, RecordType.Data, RecordType.Zero, RecordType.Trim, RecordType.Resize, RecordType.Block), len: fc.oneof(fc.constant(4096), fc.integer({ min: 1, max: 20000 })) }),
  { maxLength: 40 },
);

describe('journal records in a log block', () => {
  it('parse back exactly what was added, from the pieces the replicas got', () => {
    fc.assert(
      fc.property(arbRecords, fc.integer({ min: 1, max: 2 ** 40 }), (recs, first) => {
        const { b, added } = fill(recs, first);
        // What a replica holds: an old slot's bytes overwritten by the pieces sent.
        const slot = randomBytes(BS);
        for (const p of b.take()) Buffer.from(p.data).copy(slot, p.offset);
        const { records } = parseLogBlock(slot, at, first);
        assert.deepEqual(records, added);
        // Sealing zeroes the gap: the seal CRC is of the builder's bytes.
        const { gapStart, gapEnd } = b.sealInfo();
        slot.fill(0, gapStart, gapEnd);
        assert.deepEqual(slot, b.buf);
      }),
      { numRuns: 200 },
    );
  });

  it('stops at a torn record, a gap in the LSNs, or a header of another block', () => {
    const { b, added } = fill(Array.from({ length: 10 }, () => ({ type: RecordType.Data, len: 3000 })), 100);
    const buf = Buffer.from(b.buf);
    // Record 6's data damaged (as if its write never reached the disk): the tail ends at 6.
    const torn = Buffer.from(buf);
    torn[added[6]!.offset === 0 ? 0 : b.buf.indexOf(added[6]!.data!)]! ^= 1;
    assert.equal(parseLogBlock(torn, at, 100).records.length, 6);
    const hdr = Buffer.from(buf);
    hdr[BS - 3 * RECORD_HEADER_SIZE + 10]! ^= 1;
    assert.equal(parseLogBlock(hdr, at, 100).records.length, 2);
    assert.equal(parseLogBlock(buf, at, 101).records.length, 0, 'an LSN out of order');
    assert.equal(parseLogBlock(buf, { ...at, index: at.index + 1 }, 100).records.length, 0, 'a header of another log block');
    assert.equal(parseLogBlock(buf, { ...at, epoch: 8 }, 100).records.length, 0, "another session's");
  });

  it('sends only what was added since the last take, and everything again after untake', () => {
    const b = new LogBlockBuilder(at, BS);
    b.add({ type: RecordType.Data, lsn: 1, offset: 0, length: 4096, data: randomBytes(4096) });
    assert.deepEqual(b.take().map((p) => [p.offset, p.data.length]), [[0, 4096], [BS - 64, 64]]);
    b.add({ type: RecordType.Data, lsn: 2, offset: 0, length: 100, data: randomBytes(100) });
    assert.deepEqual(b.take().map((p) => [p.offset, p.data.length]), [[4096, 100], [BS - 128, 64]]);
    assert.deepEqual(b.take(), []);
    b.untake();
    assert.deepEqual(b.take().map((p) => [p.offset, p.data.length]), [[0, 4196], [BS - 128, 128]]);
  });
});

describe('overlay index', () => {
  it('takes each byte from the newest source that covers it', () => {
    fc.assert(
      fc.property(fc.array(fc.record({ index: fc.integer({ min: 0, max: 2 }), start: fc.nat(99), len: fc.integer({ min: 1, max: 60 }) }), { maxLength: 40 }), (ops) => {
        const ov = new OverlayIndex();
        const model = new Map<number, number[]>();
        ops.forEach((o, i) => {
          const end = Math.min(100, o.start + o.len);
          const src: Source = { lsn: i, zero: false, data: undefined, log: undefined };
          ov.insert(o.index, o.start, end, src, 1000 * i + o.start);
          const m = model.get(o.index) ?? new Array<number>(100).fill(-1);
          for (let b = o.start; b < end; b++) m[b] = i;
          model.set(o.index, m);
        });
        let total = 0;
        for (const [index, m] of model) {
          const got = new Array<number>(100).fill(-1);
          let last = -1;
          for (const s of ov.segments(index)) {
            assert.ok(s.start >= last, 'sorted, not overlapping');
            last = s.end;
            // `at` moves with the range: byte b of the segment is byte (at + b - start) of its source.
            for (let b = s.start; b < s.end; b++) {
              got[b] = s.src.lsn;
              assert.equal(s.at + (b - s.start), 1000 * s.src.lsn + b);
            }
          }
          total += ov.segments(index).length;
          assert.deepEqual(got, m);
        }
        assert.equal(ov.size, total);
      }),
      { numRuns: 300 },
    );
  });

  it('a fold drops what it took in and keeps what came after', () => {
    const ov = new OverlayIndex();
    const s = (lsn: number): Source => ({ lsn, zero: false, data: undefined, log: undefined });
    ov.insert(1, 0, 10, s(1), 0);
    ov.insert(1, 20, 30, s(5), 0);
    ov.insert(1, 5, 8, s(Infinity), 0);
    ov.reset(1, 4);
    assert.deepEqual(ov.segments(1).map((x) => [x.start, x.end, x.src.lsn]), [[5, 8, Infinity], [20, 30, 5]]);
    ov.reset(1, 10);
    assert.equal(ov.size, 1);
    ov.truncate(1);
    assert.equal(ov.size, 0);
  });
});

describe('overlay runs', () => {
  it('round-trip through pages of any size', () => {
    const arbEntry: fc.Arbitrary<RunEntry> = fc.oneof(
      fc.record({
        kind: fc.constant('log' as const),
        index: fc.maxSafeNat(),
        lsn: fc.maxSafeNat(),
        start: fc.nat(0xffffffff),
        length: fc.nat(0xffffffff),
        log: fc.record({ volume: fc.integer({ min: 1, max: 3 }), epoch: fc.integer({ min: 0, max: 5 }), index: fc.integer({ min: 0, max: 5 }), crc: fc.nat(0xffffffff) }),
        logOffset: fc.nat(0xffffffff),
      }),
      fc.record({ kind: fc.constantFrom('zero' as const, 'trim' as const), index: fc.maxSafeNat(), lsn: fc.maxSafeNat(), start: fc.nat(0xffffffff), length: fc.nat(0xffffffff) }),
      fc.record({ kind: fc.constant('reset' as const), index: fc.maxSafeNat(), lsn: fc.maxSafeNat() }),
    ).map((e) => ({ ...e }) as RunEntry);
    fc.assert(
      fc.property(fc.array(arbEntry, { maxLength: 200 }), fc.constantFrom(512, 4096, 65536), fc.boolean(), (entries, size, base) => {
        // One CRC per log block, as a writer knows it.
        const crcs = new Map<string, number>();
        const norm = entries.map((e) => {
          if (e.kind !== 'log') return e;
          const k = `${e.log.volume}:${e.log.epoch}:${e.log.index}`;
          if (!crcs.has(k)) crcs.set(k, e.log.crc);
          return { ...e, log: { volume: e.log.volume, epoch: e.log.epoch, index: e.log.index, crc: crcs.get(k)! } };
        });
        const pages = pageEntries(norm, size);
        const back: RunEntry[] = [];
        for (const p of pages) {
          const buf = encodeRunPage({ prev: null, base, entries: p }, size);
          const d = decodeRunPage(buf);
          assert.equal(d.base, base);
          back.push(...d.entries);
          // The log table alone (what GC reads) names exactly the log blocks the entries use.
          const named = new Set(d.entries.flatMap((e) => (e.kind === 'log' ? [logKeyOf(e.log)] : [])));
          const logs = decodeRunPageLogs(buf);
          assert.deepEqual(new Set(logs.logs.map(logKeyOf)), named);
          assert.equal(logs.logs.length, named.size);
          assert.equal(logs.base, base);
        }
        assert.deepEqual(back, norm);
      }),
      { numRuns: 100 },
    );
  });
});
