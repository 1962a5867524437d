import { Command } from 'commander';
import { VERSION } from '../core/version.js';
import { accessCommand } from './torusctl/access.js';
import { certCommand } from './torusctl/cert.js';
import { configCommand } from './torusctl/config.js';
import { healthCommand, rebalanceCommand } from './torusctl/health.js';
import { initCommand } from './torusctl/init.js';
import { listPeersCommand, peerCommand } from './torusctl/peers.js';
import { ringCommand } from './torusctl/ring.js';
import { scrubCommand } from './torusctl/scrub.js';
import { blockCommand, volumeCommand } from './torusctl/volume.js';
import { wipeCommand } from './torusctl/wipe.js';
import { addGlobalOptions } from './shared/config.js';
import { EXIT_STATUSES, runProgram } from './shared/run.js';
import { docsCommands } from './shared/docs-gen.js';
import { versionCommand } from './shared/output.js';

export function buildProgram(): Command {
  const program = new Command('torusctl')
    .description('administer a Torus cluster')
    .version(`torusctl\nVersion: ${VERSION}`, '--version')
    .enablePositionalOptions(false);
  addGlobalOptions(program);
  for (const c of [initCommand(), wipeCommand(), configCommand(), certCommand(), accessCommand(), listPeersCommand(), peerCommand(), ringCommand(), volumeCommand(), blockCommand(), healthCommand(), rebalanceCommand(), scrubCommand()]) program.addCommand(c);
  program.addCommand(versionCommand('torusctl'));
  for (const c of docsCommands('torusctl', buildProgram, VERSION, EXIT_STATUSES)) program.addCommand(c);
  return program;
}

export function main(argv: string[]): void {
  void runProgram('torusctl', buildProgram(), argv).then(() => process.exit(process.exitCode ?? 0));
}
