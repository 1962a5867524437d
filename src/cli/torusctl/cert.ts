import { Command, Option } from 'commander';
import { createCa, createSecretFile, issueCertificates } from '../shared/certs.js';
import { emit, outputOptions } from '../shared/output.js';

function collect(value: string, prev: string[]): string[] {
  return [...prev, ...value.split(',').map((s) => s.trim()).filter((s) => s !== '')];
}

export function certCommand(): Command {
  const cert = new Command('cert').description('make the cluster CA, node and client certificates, and peer secrets (docs/security.md)');
  cert.addCommand(
    outputOptions(new Command('init'))
      .description('create a cluster CA in DIR (ca-cert.pem, and ca-key.pem mode 0600: keep it offline once the certificates are issued)')
      .argument('<dir>', 'directory for the CA')
      .option('--name <cn>', 'common name of the CA')
      .addOption(new Option('--days <n>', 'validity in days').default('3650'))
      .action(async (dir: string, opts: { name?: string; days: string; json?: boolean }) => {
        await createCa(dir, { ...(opts.name ? { name: opts.name } : {}), days: Number(opts.days) });
        emit(opts, { dir, files: ['ca-cert.pem', 'ca-key.pem'] }, `Created a cluster CA in ${dir}`);
      }),
  );
  cert.addCommand(
    outputOptions(new Command('issue'))
      .description(
        'issue certificates for NAME into DIR/NAME (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem): the layout torusd, torusblk, torusctl, qemu, nbdkit and libnbd read',
      )
      .argument('<dir>', 'directory of the CA (torusctl cert init)')
      .argument('<name>', 'who they are for: a node or client name, the identity NBD access rules name')
      .option('--uuid <uuid>', "the node uuid to name (an existing node's, from torusctl list-peers); a fresh one by default")
      .option('--host <name,...>', 'host names and addresses the server certificate is valid for (besides localhost, 127.0.0.1, ::1)', collect, [] as string[])
      .option('--out <dir>', 'write here instead of DIR/NAME')
      .option('--nbd-only', 'for an NBD client: no node uuid in the certificates, so peer RPC refuses them and they open only the volumes torusctl access grants NAME')
      .addOption(new Option('--days <n>', 'validity in days').default('825'))
      .action(async (dir: string, name: string, opts: { uuid?: string; host: string[]; out?: string; days: string; nbdOnly?: boolean; json?: boolean }) => {
        const r = await issueCertificates(dir, name, {
          ...(opts.nbdOnly ? { nbdOnly: true } : {}),
          ...(opts.uuid ? { uuid: opts.uuid } : {}),
          hosts: opts.host,
          ...(opts.out ? { out: opts.out } : {}),
          days: Number(opts.days),
        });
        emit(
          opts,
          { name, uuid: opts.nbdOnly ? null : r.uuid, dir: r.dir },
          `Issued certificates for ${name} (${opts.nbdOnly ? 'NBD client only' : `node uuid ${r.uuid}`}) in ${r.dir}`,
        );
      }),
  );
  cert.addCommand(
    outputOptions(new Command('secret'))
      .description('write a new random peer secret to FILE (mode 0600), for --peer-secret-file')
      .argument('<file>', 'file to create')
      .action((file: string, opts: { json?: boolean }) => {
        createSecretFile(file);
        emit(opts, { file }, `Wrote a new peer secret to ${file}`);
      }),
  );
  return cert;
}
