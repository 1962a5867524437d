// Self time by function and by file for .cpuprofile files (node --cpu-prof), plus collapsed
// stacks and an SVG flame graph next to each: what bench/perf.ts --profile does for its runs,
// for any profile.
//
//   node dist/bench/cpuprofile-report.js [--top 20] [--from-us N --to-us N] FILE.cpuprofile...
//
// --from-us/--to-us keep only the samples in that window of the monotonic clock (V8's
// startTime and process.hrtime share it on Linux), e.g. to leave out start-up.

import { basename, dirname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { collapse, summarize, writeFlameSvg, writeFolded, type Window } from './lib/cpuprofile.js';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { top: { type: 'string', default: '20' }, 'from-us': { type: 'string' }, 'to-us': { type: 'string' } },
});
if (positionals.length === 0) {
  process.stderr.write('usage: node dist/bench/cpuprofile-report.js [--top N] [--from-us N --to-us N] FILE.cpuprofile...\n');
  process.exit(2);
}
const span: Window | undefined =
  values['from-us'] !== undefined || values['to-us'] !== undefined ? { fromUs: Number(values['from-us'] ?? 0), toUs: Number(values['to-us'] ?? Number.MAX_SAFE_INTEGER) } : undefined;
for (const file of positionals) {
  const s = summarize(file, Number(values.top), span);
  const busy = s.totalUs - s.idleUs;
  const out = [
    `${file}: ${(s.totalUs / 1e6).toFixed(1)} s sampled, busy ${((busy / Math.max(1, s.totalUs)) * 100).toFixed(0)}%, GC ${((s.gcUs / Math.max(1, busy)) * 100).toFixed(0)}% of busy`,
    'self time by function (share of busy time):',
    ...s.top.map((f) => `  ${(f.busyShare * 100).toFixed(1).padStart(5)}%  ${f.name}`),
    'by file:',
    ...s.byFile.slice(0, 10).map((f) => `  ${(f.busyShare * 100).toFixed(1).padStart(5)}%  ${f.name}`),
  ];
  const stacks = collapse(file, span);
  const stem = join(dirname(file), basename(file, '.cpuprofile'));
  writeFolded(stacks, `${stem}.folded`);
  writeFlameSvg(stacks, `${stem}.svg`, basename(file));
  out.push(`wrote ${stem}.folded and ${stem}.svg`);
  process.stdout.write(out.join('\n') + '\n\n');
}
