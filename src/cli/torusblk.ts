import { Command } from 'commander';
import { tuneMalloc } from '../core/malloc.js';
import { VERSION } from '../core/version.js';
import { addBlockIoOptions, addGlobalOptions } from './shared/config.js';
import { aoeCommand } from './torusblk/aoe.js';
import { csiCommand } from './torusblk/csi.js';
import { nbdCommand, nbdserveCommand } from './torusblk/nbd.js';
import { runProgram } from './shared/run.js';
import { createVolumeAction } from './torusctl/volume.js';

// The client: serves volumes over NBD (and AoE).
export function buildProgram(): Command {
  const program = new Command('torusblk')
    .description('serve Torus block volumes to this machine (NBD, AoE, Kubernetes CSI)')
    .version(`torusblk\nVersion: ${VERSION}`, '--version')
    .showHelpAfterError('(run with --help for usage)');
  addGlobalOptions(addBlockIoOptions(program));
  program.addCommand(nbdserveCommand());
  program.addCommand(nbdCommand());
  program.addCommand(aoeCommand());
  program.addCommand(csiCommand());
  const volume = new Command('volume').description('manage block volumes (see also torusctl volume)');
  volume.addCommand(
    new Command('create').description('create a thin-provisioned block volume').argument('<name>').argument('<size>', 'size, e.g. 10GiB').action(createVolumeAction()),
  );
  program.addCommand(volume);
  program.addCommand(
    new Command('version').description('print the version').action(() => {
      process.stdout.write(`torusblk\nVersion: ${VERSION}\n`);
    }),
  );
  return program;
}

export function main(argv: string[]): void {
  tuneMalloc();
  void runProgram('torusblk', buildProgram(), argv).then(() => process.exit(process.exitCode ?? 0));
}
