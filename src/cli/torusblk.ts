import { Command } from 'commander';
import { startMemoryReturner, tuneMalloc } from '../core/malloc.js';
import { VERSION } from '../core/version.js';
import { addBlockIoOptions, addGlobalOptions } from './shared/config.js';
import { aoeCommand } from './torusblk/aoe.js';
import { csiCommand } from './torusblk/csi.js';
import { nbdCommand, nbdserveCommand } from './torusblk/nbd.js';
import { addVolumeClientOptions } from './torusblk/common.js';
import { EXIT_STATUSES, runProgram } from './shared/run.js';
import { docsCommands } from './shared/docs-gen.js';
import { versionCommand } from './shared/output.js';
import { addLogOptions } from './shared/log.js';
import { createVolumeCommand } from './torusctl/volume.js';

// The client: serves volumes over NBD (and AoE).
export function buildProgram(): Command {
  const program = new Command('torusblk')
    .description('serve Torus block volumes to this machine (NBD, AoE, Kubernetes CSI)')
    .version(`torusblk\nVersion: ${VERSION}`, '--version');
  addGlobalOptions(addBlockIoOptions(addLogOptions(program)));
  addVolumeClientOptions(program, 'client');
  program.option('--metrics <host:port>', 'serve Prometheus metrics (per-volume I/O, latency histograms, NBD/AoE counters) on http://HOST:PORT/metrics');
  program.addCommand(nbdserveCommand());
  program.addCommand(nbdCommand());
  program.addCommand(aoeCommand());
  program.addCommand(csiCommand());
  const volume = new Command('volume').description('manage block volumes (see also torusctl volume)');
  volume.addCommand(createVolumeCommand('create', 'create a thin-provisioned block volume'));
  program.addCommand(volume);
  program.addCommand(versionCommand('torusblk'));
  for (const c of docsCommands('torusblk', buildProgram, VERSION, EXIT_STATUSES)) program.addCommand(c);
  return program;
}

export function main(argv: string[]): void {
  tuneMalloc();
  startMemoryReturner();
  void runProgram('torusblk', buildProgram(), argv).then(() => process.exit(process.exitCode ?? 0));
}
