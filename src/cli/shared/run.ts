import { CommanderError, type Command } from 'commander';
import { toTorusError, type ErrorCode, type TorusError } from '../../core/errors.js';

// The CLI edge: every error becomes one line on stderr and a stable exit status. A stack trace is
// printed only with --debug, because a user error is not a program crash.

const exitCodes: Partial<Record<ErrorCode, number>> = {
  INVALID_ARGUMENT: 2,
  ETCD_UNAVAILABLE: 3,
  NOT_INITIALIZED: 4,
  EXISTS: 5,
  NOT_EXIST: 6,
  LOCKED: 7,
  WRONG_CLUSTER: 8,
  OUT_OF_SPACE: 9,
};

export function exitCodeFor(err: TorusError): number {
  return exitCodes[err.code] ?? 1;
}

export function reportError(prog: string, err: unknown, debug: boolean): number {
  const e = toTorusError(err);
  process.stderr.write(`${prog}: ${e.message}\n`);
  if (debug && err instanceof Error && err.stack) process.stderr.write(`${err.stack}\n`);
  return exitCodeFor(e);
}

/** Runs a commander program, mapping every failure to a one-line message and an exit status. */
export async function runProgram(prog: string, program: Command, argv: string[]): Promise<void> {
  program.exitOverride();
  program.configureOutput({
    writeErr: (s) => process.stderr.write(s),
    // commander prints "error: ..." itself; prefix it with the program so users know who spoke.
    outputError: (s, write) => write(`${prog}: ${s.replace(/^error: /, '')}`),
  });
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
      process.exitCode = err.exitCode === 1 ? 2 : err.exitCode;
      return;
    }
    process.exitCode = reportError(prog, err, debug);
  }
}
