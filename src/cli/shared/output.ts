import Table from 'cli-table3';
import { Command as CommanderCommand, Option, type Command } from 'commander';
import { VERSION } from '../../core/version.js';
import { formatSize } from '../../core/units.js';

// Table, CSV and JSON output for the CLIs. Tables go to humans, --csv and --json to scripts; the
// machine formats carry raw numbers (bytes) and ISO 8601 times where the table carries human ones.

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

export interface OutputOpts {
  json?: boolean;
  csv?: boolean;
  bytes?: boolean;
  si?: boolean;
}

/**
 * The output flags of the CLI contract (docs/cli.md): --json on every command that prints
 * something, --csv on listings (not with --json), --bytes where sizes are shown.
 */
export function outputOptions(cmd: Command, what: { csv?: boolean; bytes?: boolean } = {}): Command {
  cmd.option('--json', 'print JSON: sizes in bytes, times in ISO 8601');
  if (what.csv) cmd.addOption(new Option('--csv', 'print CSV: sizes in bytes, times in ISO 8601').conflicts('json'));
  if (what.bytes) cmd.option('--bytes', 'print sizes in bytes instead of KiB, MiB, GiB');
  return cmd;
}

/** A size for people: human units, or bytes with --bytes. */
export function sizeText(bytes: number, o: OutputOpts = {}): string {
  return o.bytes ? String(bytes) : formatSize(bytes, o.si ?? false);
}

/** The result of a command: `json` with --json, else `text` (a line or lines). */
export function emit(o: { json?: boolean }, json: unknown, text: string): void {
  if (o.json) printJson(json);
  else process.stdout.write(text.endsWith('\n') ? text : `${text}\n`);
}

/** Times in machine output: ISO 8601, or null for "never". */
export function isoTime(ms: number | undefined | null): string | null {
  return ms ? new Date(ms).toISOString() : null;
}

/** `PROG version`: the same text as --version, or JSON. */
export function versionCommand(prog: string): Command {
  return outputOptions(new CommanderCommand('version').description('print the version')).action((o: { json?: boolean }) =>
    emit(o, { program: prog, version: VERSION }, `${prog}\nVersion: ${VERSION}`),
  );
}
