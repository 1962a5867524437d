import { resolve } from 'node:path';
import { Command } from 'commander';
import { defaultConfigPath, readConfigFile, writeConfigFile, parseEndpoints, type GlobalOpts, type Profile } from '../shared/config.js';
import { emit, outputOptions, printJson } from '../shared/output.js';

export function configCommand(): Command {
  return outputOptions(new Command('config'))
    .description('save connection settings (-C, etcd TLS files) as a named profile in ~/.torus/config.json')
    .option('--view', 'print the config file (JSON, as stored)')
    .action(async (opts: { view?: boolean; json?: boolean }, cmd: Command) => {
      const g = cmd.optsWithGlobals<GlobalOpts>();
      const path = g.config ?? defaultConfigPath();
      const cfg = readConfigFile(path);
      if (opts.view) {
        printJson(cfg);
        return;
      }
      const name = g.profile ?? 'default';
      const prev: Profile = cfg.etcd_config[name] ?? {};
      const next: Profile = { ...prev };
      if (g.etcd !== undefined) next.etcd = parseEndpoints(g.etcd).join(',');
      if (g.etcdCaFile !== undefined) next['etcd-ca-file'] = g.etcdCaFile;
      if (g.etcdCertFile !== undefined) next['etcd-cert-file'] = g.etcdCertFile;
      if (g.etcdKeyFile !== undefined) next['etcd-key-file'] = g.etcdKeyFile;
      if (g.etcdUser !== undefined) next['etcd-user'] = g.etcdUser;
      if (g.etcdPasswordFile !== undefined) next['etcd-password-file'] = resolve(g.etcdPasswordFile);
      // The paths, never what the files hold.
      if (g.tlsCertificates !== undefined) next['tls-certificates'] = resolve(g.tlsCertificates);
      if (g.peerSecretFile !== undefined) next['peer-secret-file'] = resolve(g.peerSecretFile);
      next.etcd ??= '127.0.0.1:2379';
      cfg.etcd_config[name] = next;
      writeConfigFile(path, cfg);
      emit(opts, { profile: name, path, settings: next }, `Saved profile "${name}" to ${path}`);
    });
}
