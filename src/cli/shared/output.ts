import Table from 'cli-table3';

// Table, CSV and JSON output for the CLIs. Tables go to humans, --csv and --json to scripts; the
// machine formats carry raw numbers (bytes, ms since epoch) where the table carries human ones.

export function renderTable(head: string[], rows: string[][]): string {
  // ASCII borders like the original's `list-peers`, so copy-pasted output looks the same everywhere.
  const t = new Table({
    head,
    style: { head: [], border: [] },
    chars: {
      top: '-', 'top-mid': '+', 'top-left': '+', 'top-right': '+',
      bottom: '-', 'bottom-mid': '+', 'bottom-left': '+', 'bottom-right': '+',
      left: '|', 'left-mid': '+', mid: '-', 'mid-mid': '+',
      right: '|', 'right-mid': '+', middle: '|',
    },
  });
  t.push(...rows);
  // cli-table3 draws a separator between every row with these chars; keep only the header rule.
  const lines = t.toString().split('\n');
  const rule = lines[0] ?? '';
  return lines.filter((l, i) => i === 0 || i === 2 || i === lines.length - 1 || l !== rule).join('\n');
}

function csvCell(v: string): string {
  return /[",\n]/.test(v) ? `"${v.replace(/"/g, '""')}"` : v;
}

export function renderCsv(head: string[], rows: string[][]): string {
  return [head, ...rows].map((r) => r.map(csvCell).join(',')).join('\n');
}

export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}
