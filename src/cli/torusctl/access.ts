import { Command } from 'commander';
import { AccessRules } from '../../metadata/access.js';
import { withMeta } from '../shared/context.js';
import { emit, outputOptions, printJson, renderTable } from '../shared/output.js';

export function accessCommand(): Command {
  const access = new Command('access').description(
    "who may open a volume over NBD: a client certificate's common name or PSK identity, '*' (any client that proved one over TLS) or 'anonymous' (no TLS); no rule, no access (torusblk nbdserve --tls on|require)",
  );
  access.addCommand(
    outputOptions(new Command('grant'))
      .description('let IDENTITY open VOLUME (read-write, or read-only with --read-only)')
      .argument('<volume>')
      .argument('<identity>')
      .option('--read-only', 'read-only access')
      .action(async (volume: string, identity: string, opts: { readOnly?: boolean; json?: boolean }, cmd: Command) => {
        const mode = opts.readOnly ? 'ro' : 'rw';
        await withMeta(cmd, (meta) => new AccessRules(meta.kv()).grant(volume, identity, mode));
        emit(opts, { volume, identity, mode }, `${identity} may open ${volume} ${mode === 'ro' ? 'read-only' : 'read-write'}`);
      }),
  );
  access.addCommand(
    outputOptions(new Command('revoke'))
      .description("take IDENTITY's access to VOLUME away (connections already open keep theirs until they close)")
      .argument('<volume>')
      .argument('<identity>')
      .action(async (volume: string, identity: string, opts: { json?: boolean }, cmd: Command) => {
        const had = await withMeta(cmd, (meta) => new AccessRules(meta.kv()).revoke(volume, identity));
        emit(opts, { volume, identity, revoked: had }, had ? `${identity} may no longer open ${volume}` : `${identity} had no access to ${volume}`);
      }),
  );
  access.addCommand(
    outputOptions(new Command('list'))
      .description('the access rules, of one volume or all')
      .argument('[volume]')
      .action(async (volume: string | undefined, opts: { json?: boolean }, cmd: Command) => {
        const rules = await withMeta(cmd, (meta) => new AccessRules(meta.kv()).list(volume));
        if (opts.json) return printJson(rules);
        process.stdout.write(`${renderTable(['VOLUME', 'IDENTITY', 'ACCESS'], rules.map((r) => [r.volume, r.identity, r.mode === 'ro' ? 'read-only' : 'read-write']))}\n`);
      }),
  );
  return access;
}
