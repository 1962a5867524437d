import { createInterface } from 'node:readline/promises';
import { Command } from 'commander';
import { TorusError } from '../../core/errors.js';
import { withMeta } from '../shared/context.js';

export function wipeCommand(): Command {
  return new Command('wipe')
    .description('delete all cluster metadata from etcd (volumes, ring, settings); data on the nodes becomes unreachable')
    .option('--yes-i-am-sure', 'do not ask for confirmation')
    .action(async (opts: { yesIAmSure?: boolean }, cmd: Command) => {
      if (!opts.yesIAmSure) {
        const rl = createInterface({ input: process.stdin, output: process.stderr });
        let answer = '';
        try {
          answer = await rl.question('This deletes every Torus key in etcd: all volumes, snapshots and the ring. Please type `YES` to continue: ');
        } catch {
          answer = '';
        } finally {
          rl.close();
        }
        if (answer.trim() !== 'YES') throw new TorusError('INVALID_ARGUMENT', 'not confirmed; nothing was deleted');
      }
      await withMeta(cmd, async (meta) => {
        await meta.wipe();
        process.stdout.write('Wiped all Torus metadata.\n');
      });
    });
}
