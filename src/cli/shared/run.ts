import { CommanderError, type Command } from 'commander';
import { toTorusError, type ErrorCode, type TorusError } from '../../core/errors.js';
import { fromSystemError } from './system-errors.js';

// The CLI edge: every error becomes one line on stderr and a stable exit status. A stack trace is
// printed only with --debug, because a user error is not a program crash. docs/cli.md is the
// contract; test/integration/cli-contract.test.ts holds every subcommand to it.

const exitCodes: Partial<Record<ErrorCode, number>> = {
  INVALID_ARGUMENT: 2,
  ETCD_UNAVAILABLE: 3,
  NOT_INITIALIZED: 4,
  EXISTS: 5,
  NOT_EXIST: 6,
  LOCKED: 7,
  WRONG_CLUSTER: 8,
  OUT_OF_SPACE: 9,
  PERMISSION_DENIED: 10,
};

/** The exit statuses of every program, as README.md and docs/cli.md list them (and the man pages). */
export const EXIT_STATUSES: readonly [number, string][] = [
  [0, 'success'],
  [1, 'other failure; torusctl health and rebalance status --watch: not healthy / not balanced'],
  [2, 'invalid argument or usage'],
  [3, 'etcd unreachable (the message names the endpoints)'],
  [4, 'cluster not initialized'],
  [5, 'already exists'],
  [6, 'no such peer, volume, snapshot or file'],
  [7, 'locked (a volume is in use elsewhere, or a device is still mounted)'],
  [8, 'data dir belongs to another cluster'],
  [9, 'out of space'],
  [10, 'permission denied (no credential, a wrong one, or one that does not allow this)'],
];

export function exitCodeFor(err: TorusError): number {
  return exitCodes[err.code] ?? 1;
}

export function reportError(prog: string, err: unknown, debug: boolean): number {
  const e = toTorusError(fromSystemError(err));
  process.stderr.write(`${prog}: ${e.message}\n`);
  if (debug && err instanceof Error && err.stack) process.stderr.write(`${err.stack}\n`);
  return exitCodeFor(e);
}

/** The full name of a (sub)command as typed: "torusctl volume create-block". */
function commandPath(cmd: Command): string {
  const names: string[] = [];
  for (let c: Command | null = cmd; c; c = c.parent) names.unshift(c.name());
  return names.join(' ');
}

/** commander's parse errors in our one-line form, with the hint on the same line. */
export function parseErrorLine(prog: string, cmd: Command, text: string): string {
  let msg = text.replace(/^error: /, '').trim();
  // A negative number is taken for an option by every argument parser; say what is really wrong.
  const negative = /^unknown option '(-\d[^']*)'/.exec(msg);
  if (negative) msg = `invalid value "${negative[1]}": sizes and counts cannot be negative`;
  return `${prog}: ${msg} (see \`${commandPath(cmd)} --help\`)\n`;
}

/**
 * commander gives each subcommand its own output and exit settings, and `addCommand` does not
 * copy them from the parent: set them on every command, or a subcommand's parse error exits 1
 * with commander's own wording.
 */
function configureTree(prog: string, cmd: Command): void {
  cmd.exitOverride();
  cmd.configureOutput({
    writeErr: (s) => process.stderr.write(s),
    outputError: (s, write) => write(parseErrorLine(prog, cmd, s)),
  });
  for (const sub of cmd.commands) configureTree(prog, sub);
}

/** Runs a commander program, mapping every failure to a one-line message and an exit status. */
export async function runProgram(prog: string, program: Command, argv: string[]): Promise<void> {
  configureTree(prog, program);
  const debug = argv.includes('--debug');
  try {
    await program.parseAsync(argv, { from: 'user' });
  } catch (err) {
    if (err instanceof CommanderError) {
      // Help and version are "errors" to commander; they already printed what they had to say.
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help') {
        process.exitCode = 0;
        return;
      }
      // Usage errors are status 2, whatever commander's own number (it uses 1).
      process.exitCode = 2;
      return;
    }
    process.exitCode = reportError(prog, err, debug);
  }
}
