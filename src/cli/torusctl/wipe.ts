import { createInterface } from 'node:readline/promises';
import { Command } from 'commander';
import { TorusError } from '../../core/errors.js';
import { withMeta } from '../shared/context.js';
import { emit, outputOptions } from '../shared/output.js';

/** One line from standard input; '' when it ends first (a pipe, /dev/null, no terminal at all). */
async function askLine(prompt: string): Promise<string> {
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  const ended = new Promise<string>((resolve) => rl.once('close', () => resolve('')));
  try {
    return await Promise.race([rl.question(prompt), ended]);
  } catch {
    return '';
  } finally {
    rl.close();
  }
}

export function wipeCommand(): Command {
  return outputOptions(new Command('wipe'))
    .description('delete all cluster metadata from etcd (volumes, ring, settings); data on the nodes becomes unreachable')
    .option('--yes-i-am-sure', 'do not ask for confirmation')
    .action(async (opts: { yesIAmSure?: boolean; json?: boolean }, cmd: Command) => {
      if (!opts.yesIAmSure) {
        // Without an answer (standard input closed or empty) nothing is deleted, and that is said.
        const answer = await askLine('This deletes every Torus key in etcd: all volumes, snapshots and the ring. Please type `YES` to continue: ');
        if (answer.trim() !== 'YES')
          throw new TorusError('INVALID_ARGUMENT', `not confirmed${answer.trim() === '' ? ' (no answer on standard input; pass --yes-i-am-sure to wipe without asking)' : ''}; nothing was deleted`);
      }
      await withMeta(cmd, async (meta) => {
        await meta.wipe();
        emit(opts, { wiped: true }, 'Wiped all Torus metadata.');
      }, { initialized: false });
    });
}
