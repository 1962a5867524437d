// What a volume may hold after its writer died (docs/journal.md): every write a successful flush
// covered, then some prefix of the writes after those, in order, the last of which may be torn
// (its first bytes applied and not the rest), as a disk may tear a write never acknowledged.

/** The bytes volume-writer.js writes as write `i`. */
export function writeBytes(i: number, len: number): Buffer {
  const b = Buffer.alloc(len);
  let x = (i * 2654435761 + 1) >>> 0;
  for (let j = 0; j < len; j++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[j] = x >>> 24;
  }
  return b;
}

export interface WriterLog {
  readonly writes: { i: number; off: number; len: number }[];
  /** The last write a successful flush covered (-1: none). */
  readonly acked: number;
}

export function parseWriterLog(out: string): WriterLog {
  const writes: { i: number; off: number; len: number }[] = [];
  let acked = -1;
  for (const line of out.split('\n')) {
    const w = /^w (\d+) (\d+) (\d+)$/.exec(line);
    if (w) writes.push({ i: Number(w[1]), off: Number(w[2]), len: Number(w[3]) });
    const f = /^flushed \d+ (\d+)$/.exec(line);
    if (f) acked = Math.max(acked, Number(f[1]));
  }
  return { writes, acked };
}

/**
 * Checks `got` against `before` (the volume when the writer opened it) and the writer's log.
 * Returns how many of the unacknowledged writes it holds (the last possibly torn), or throws.
 */
export function checkJournalState(got: Buffer, before: Buffer, log: WriterLog): number {
  const img = Buffer.from(before);
  const apply = (w: { i: number; off: number; len: number }): void => void writeBytes(w.i, w.len).copy(img, w.off);
  for (const w of log.writes) if (w.i <= log.acked) apply(w);
  const rest = log.writes.filter((w) => w.i > log.acked);
  for (let k = 0; ; k++) {
    if (got.equals(img)) return k;
    if (k >= rest.length) break;
    const w = rest[k]!;
    if (tornOver(got, img, w.off, writeBytes(w.i, w.len))) return k + 1;
    apply(w);
  }
  throw new Error(`the volume holds neither the ${log.acked + 1} acknowledged writes nor them plus a prefix of the ${rest.length} after`);
}

function tornOver(got: Buffer, base: Buffer, off: number, data: Buffer): boolean {
  const end = off + data.length;
  if (!got.subarray(0, off).equals(base.subarray(0, off)) || !got.subarray(end).equals(base.subarray(end))) return false;
  let cut = 0;
  while (cut < data.length && got[off + cut] === data[cut]) cut++;
  return got.subarray(off + cut, end).equals(base.subarray(off + cut, end));
}
