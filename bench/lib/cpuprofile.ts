import { readFileSync, writeFileSync } from 'node:fs';

// Reading V8 .cpuprofile files (node --cpu-prof): self time per function, the share of idle and
// GC, and collapsed stacks ("a;b;c <µs>") that flamegraph.pl, inferno or speedscope draw, plus a
// small SVG flame graph of our own so a run needs no other tool.

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}
interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface FunctionTime {
  /** function (file:line) */
  readonly name: string;
  readonly selfUs: number;
  /** Share of the busy (non-idle) time. */
  readonly busyShare: number;
}

export interface ProfileSummary {
  readonly file: string;
  readonly totalUs: number;
  readonly idleUs: number;
  readonly gcUs: number;
  readonly programUs: number;
  /** Self time by function, largest first. */
  readonly top: FunctionTime[];
  /** Self time by source file (or node: internal module), largest first. */
  readonly byFile: FunctionTime[];
}

const REPO_MARK = /^file:\/\/.*?\/(dist\/|node_modules\/)/;

function shortUrl(url: string): string {
  if (url === '') return '';
  // dist/src/rpc/client.js -> src/rpc/client.js (the profile is of the compiled output)
  return url.replace(REPO_MARK, (_m, dir: string) => (dir === 'dist/' ? '' : 'node_modules/')).replace(/^file:\/\//, '');
}

function label(f: CallFrame): string {
  const fn = f.functionName || '(anonymous)';
  const url = shortUrl(f.url);
  if (url === '') return fn;
  return `${fn} ${url}:${f.lineNumber + 1}`;
}

function fileOf(f: CallFrame): string {
  const url = shortUrl(f.url);
  if (url === '') return f.functionName.startsWith('(') ? f.functionName : '(native)';
  return url;
}

/**
 * Microseconds on the monotonic clock that both V8's profiler (startTime) and process.hrtime
 * use on Linux; samples outside it (process start-up, module loading, shutdown) are left out.
 */
export interface Window {
  readonly fromUs: number;
  readonly toUs: number;
}

function load(file: string, window?: Window): { prof: CpuProfile; byId: Map<number, ProfileNode>; parent: Map<number, number>; self: Map<number, number> } {
  const prof = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map(prof.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of prof.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  // timeDeltas[i] is the time between sample i-1 and sample i; it is charged to sample i-1,
  // which is what was running during it.
  const self = new Map<number, number>();
  let at = prof.startTime;
  for (let i = 0; i < prof.samples.length; i++) {
    at += prof.timeDeltas[i] ?? 0;
    if (window && (at < window.fromUs || at > window.toUs)) continue;
    const d = prof.timeDeltas[i + 1] ?? 0;
    const id = prof.samples[i]!;
    self.set(id, (self.get(id) ?? 0) + Math.max(0, d));
  }
  return { prof, byId, parent, self };
}

export function summarize(file: string, topN = 15, window?: Window): ProfileSummary {
  const { byId, self } = load(file, window);
  let total = 0;
  let idle = 0;
  let gc = 0;
  let program = 0;
  const byFn = new Map<string, number>();
  const byFile = new Map<string, number>();
  for (const [id, us] of self) {
    const f = byId.get(id)!.callFrame;
    total += us;
    if (f.functionName === '(idle)') {
      idle += us;
      continue;
    }
    if (f.functionName === '(garbage collector)') gc += us;
    if (f.functionName === '(program)') program += us;
    const k = label(f);
    byFn.set(k, (byFn.get(k) ?? 0) + us);
    const fk = fileOf(f);
    byFile.set(fk, (byFile.get(fk) ?? 0) + us);
  }
  const busy = Math.max(1, total - idle);
  const rank = (m: Map<string, number>): FunctionTime[] =>
    [...m]
      .sort((a, b) => b[1] - a[1])
      .slice(0, topN)
      .map(([name, selfUs]) => ({ name, selfUs, busyShare: selfUs / busy }));
  return { file, totalUs: total, idleUs: idle, gcUs: gc, programUs: program, top: rank(byFn), byFile: rank(byFile) };
}

/** Collapsed stacks, root first, weighted by µs; idle is left out. */
export function collapse(file: string, window?: Window): Map<string, number> {
  const { byId, parent, self } = load(file, window);
  const stacks = new Map<string, number>();
  for (const [id, us] of self) {
    if (us <= 0) continue;
    const leaf = byId.get(id)!;
    if (leaf.callFrame.functionName === '(idle)') continue;
    const frames: string[] = [];
    for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
      const f = byId.get(cur)!.callFrame;
      if (f.functionName === '(root)') break;
      frames.push(label(f).replace(/;/g, ','));
    }
    const key = frames.reverse().join(';');
    stacks.set(key, (stacks.get(key) ?? 0) + us);
  }
  return stacks;
}

export function writeFolded(stacks: Map<string, number>, out: string): void {
  writeFileSync(out, [...stacks].map(([k, v]) => `${k} ${Math.round(v)}`).join('\n') + '\n');
}

interface Frame {
  name: string;
  value: number;
  children: Map<string, Frame>;
}

function escapeXml(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

/** A static SVG flame graph (root at the bottom, widths by self+children time, hover for names). */
export function writeFlameSvg(stacks: Map<string, number>, out: string, title: string): void {
  const root: Frame = { name: 'all', value: 0, children: new Map() };
  for (const [key, us] of stacks) {
    root.value += us;
    let cur = root;
    for (const name of key.split(';')) {
      let next = cur.children.get(name);
      if (!next) cur.children.set(name, (next = { name, value: 0, children: new Map() }));
      next.value += us;
      cur = next;
    }
  }
  const width = 1600;
  const rowH = 16;
  let depth = 0;
  const rects: string[] = [];
  const total = Math.max(1, root.value);
  const draw = (f: Frame, x: number, level: number): void => {
    const w = (f.value / total) * width;
    if (w < 0.3) return;
    depth = Math.max(depth, level);
    rects.push(`${x.toFixed(2)}|${level}|${w.toFixed(2)}|${f.name}|${f.value}`);
    let cx = x;
    for (const c of [...f.children.values()].sort((a, b) => a.name.localeCompare(b.name))) {
      draw(c, cx, level + 1);
      cx += (c.value / total) * width;
    }
  };
  draw(root, 0, 0);
  const height = (depth + 1) * rowH + 40;
  const body = rects.map((r) => {
    const [x, level, w, name, value] = r.split('|') as [string, string, string, string, string];
    const y = height - (Number(level) + 1) * rowH - 10;
    const pct = ((Number(value) / total) * 100).toFixed(2);
    let h = 0;
    for (const ch of name) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
    const fill = `rgb(${205 + (h % 50)},${80 + ((h >>> 8) % 120)},${40 + ((h >>> 16) % 40)})`;
    const text = Number(w) > 40 ? `<text x="${(Number(x) + 3).toFixed(2)}" y="${y + 12}" font-size="11" font-family="monospace">${escapeXml(name.slice(0, Math.floor(Number(w) / 7)))}</text>` : '';
    return `<g><title>${escapeXml(name)} (${pct}%, ${(Number(value) / 1000).toFixed(1)} ms)</title><rect x="${x}" y="${y}" width="${w}" height="${rowH - 1}" fill="${fill}"/>${text}</g>`;
  });
  writeFileSync(
    out,
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">` +
      `<text x="4" y="16" font-size="14" font-family="sans-serif">${escapeXml(title)} (busy time, idle left out)</text>${body.join('')}</svg>\n`,
  );
}
