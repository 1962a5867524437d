import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Command } from 'commander';
import { buildProgram as torusblk } from '../../src/cli/torusblk.js';
import { buildProgram as torusctl } from '../../src/cli/torusctl.js';
import { startEtcd, type EtcdHandle } from '../helpers/etcd.js';
import { REPO, removeDir, runCli, type CliResult } from '../helpers/procs.js';

// docs/cli.md, checked for every subcommand of torusctl and torusblk, found by walking the very
// definitions that print --help (a new command is held to the contract without being listed
// here): usage errors exit 2 with one `PROG: ...` line naming the --help to read, an unreachable
// etcd exits 3 and an uninitialized cluster 4, each in one line, and every command that prints a
// result has --json (and --csv only beside it, never with it).

type Prog = 'torusctl' | 'torusblk';
interface Leaf {
  readonly prog: Prog;
  readonly path: string[];
  readonly cmd: Command;
}

/** Commands that print no result of their own, or never talk to etcd. */
const NO_JSON = new Set(['completion', 'man']);
const NO_ETCD = new Set(['completion', 'man', 'version', 'config']);
/**
 * torusblk aoe opens its raw socket before anything else, and this test has no Ethernet interface
 * to give it; torusblk csi serves its socket whatever etcd's state (a CSI driver must answer its
 * probes; calls that need etcd fail one by one).
 */
const SOCKET_FIRST = new Set(['aoe', 'csi']);
/** init and wipe succeed on an uninitialized cluster: that is their job. */
const WORKS_UNINITIALIZED = new Set(['init', 'wipe', ...NO_ETCD]);
/** `torusctl cert ...` makes files in the working directory and never talks to etcd. */
const offline = (l: Leaf): boolean => NO_ETCD.has(l.path.at(-1)!) || l.path[0] === 'cert';

function leaves(prog: Prog, cmd: Command, path: string[] = []): Leaf[] {
  if (cmd.commands.length === 0) return [{ prog, path, cmd }];
  return cmd.commands.flatMap((c) => leaves(prog, c, [...path, c.name()]));
}

const scratch = mkdtempSync(join(tmpdir(), 'torus-contract-'));
let outputs = 0;

/** A valid value for each argument name, so that only the case under test is wrong. */
function sample(arg: string): string {
  switch (arg) {
    case 'size':
      return '1GiB';
    case 'volume@snapshot':
      return 'vol1@s1';
    case 'input':
      return join(REPO, 'package.json');
    case 'output':
      return join(scratch, `out-${outputs++}.img`);
    case 'peers':
    case 'peer':
      return 'http://127.0.0.1:1';
    case 'n':
      return '2';
    case 'shell':
      return 'bash';
    case 'iface':
      return 'lo';
    case 'shelf':
    case 'slot':
      return '1';
    default:
      return 'vol1';
  }
}

function requiredArgs(cmd: Command): string[] {
  // Mandatory options too (torusblk csi --endpoint), each with a value that parses.
  const mandatory = cmd.options.filter((o) => o.mandatory).flatMap((o) => [o.long!, o.long === '--endpoint' ? `unix://${join(scratch, `csi-${outputs++}.sock`)}` : sample(o.attributeName())]);
  return [...mandatory, ...cmd.registeredArguments.filter((a) => a.required).map((a) => sample(a.name()))];
}

/** A whole valid invocation, where the required arguments alone are not one. */
const VALID: Readonly<Record<string, string[]>> = {
  'torusctl peer add': ['--all-peers'],
  'torusctl wipe': ['--yes-i-am-sure'],
  'torusblk nbd': ['vol1'],
};
const validArgs = (l: Leaf): string[] => VALID[`${l.prog} ${l.path.join(' ')}`] ?? requiredArgs(l.cmd);

const all: Leaf[] = [...leaves('torusctl', torusctl()), ...leaves('torusblk', torusblk())];
const name = (l: Leaf): string => `${l.prog} ${l.path.join(' ')}`;

/** Runs many CLI processes, a few at a time (the machine is shared). */
async function pool<T, R>(items: readonly T[], n: number, fn: (t: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array<R>(items.length);
  let next = 0;
  await Promise.all(
    Array.from({ length: n }, async () => {
      while (next < items.length) {
        const i = next++;
        out[i] = await fn(items[i]!);
      }
    }),
  );
  return out;
}

function oneLine(l: Leaf, r: CliResult, status: number, re: RegExp, what: string): void {
  const lines = r.stderr.split('\n').filter((x) => x !== '' && !x.startsWith('{'));
  assert.equal(r.code, status, `${name(l)} ${what}: exit ${r.code}, want ${status}\n${r.stderr}`);
  assert.equal(lines.length, 1, `${name(l)} ${what}: one line on stderr, got:\n${r.stderr}`);
  assert.ok(lines[0]!.startsWith(`${l.prog}: `), `${name(l)} ${what}: starts with "${l.prog}: ": ${lines[0]}`);
  assert.match(lines[0]!, re, `${name(l)} ${what}`);
}

let etcd: EtcdHandle;
const home = mkdtempSync(join(tmpdir(), 'torus-contract-home-'));
const env = { HOME: home };

before(async () => {
  etcd = await startEtcd();
});

after(async () => {
  await etcd?.stop();
  removeDir(scratch);
  removeDir(home);
});

describe('every subcommand against docs/cli.md', () => {
  test('the walk finds the commands the docs promise', () => {
    const names = all.map(name);
    for (const n of ['torusctl volume info', 'torusctl peer maintenance on', 'torusctl block dump', 'torusblk nbdserve', 'torusctl completion'])
      assert.ok(names.includes(n), `${n} in ${names.join(', ')}`);
    assert.ok(all.length >= 30, `${all.length} commands`);
  });

  test('--json on every command that prints a result; --csv only beside --json and never with it', async () => {
    for (const l of all) {
      if (NO_JSON.has(l.path.at(-1)!)) continue;
      const flags = l.cmd.options.map((o) => o.long);
      assert.ok(flags.includes('--json'), `${name(l)} has --json`);
    }
    const csv = all.filter((l) => l.cmd.options.some((o) => o.long === '--csv'));
    assert.ok(csv.length >= 3);
    await pool(csv, 4, async (l) => oneLine(l, await runCli(l.prog, [...l.path, ...requiredArgs(l.cmd), '--json', '--csv'], { env }), 2, /'--csv' cannot be used with option '--json'/, '--json --csv'));
  });

  test('an unknown option: exit 2, one line naming the --help to read', async () => {
    await pool(all, 4, async (l) => {
      const r = await runCli(l.prog, [...l.path, '--no-such-flag', ...requiredArgs(l.cmd)], { env });
      oneLine(l, r, 2, new RegExp(`unknown option '--no-such-flag' \\(see \`${l.prog} ${l.path.join(' ')} --help\`\\)$`), 'unknown option');
    });
  });

  test('a missing argument, an extra argument, a negative size: exit 2, one line', async () => {
    const withArgs = all.filter((l) => l.cmd.registeredArguments.some((a) => a.required));
    await pool(withArgs, 4, async (l) => oneLine(l, await runCli(l.prog, l.path, { env }), 2, /missing required argument/, 'no arguments'));
    const fixed = all.filter((l) => !l.cmd.registeredArguments.some((a) => a.variadic || !a.required));
    await pool(fixed, 4, async (l) => oneLine(l, await runCli(l.prog, [...l.path, ...requiredArgs(l.cmd), 'extra'], { env }), 2, /too many arguments/, 'an extra argument'));
    const sized = all.filter((l) => l.cmd.registeredArguments.some((a) => a.name() === 'size'));
    assert.ok(sized.length >= 3);
    await pool(sized, 4, async (l) => {
      const args = l.cmd.registeredArguments.map((a) => (a.name() === 'size' ? '-5GiB' : sample(a.name())));
      oneLine(l, await runCli(l.prog, [...l.path, ...args], { env }), 2, /invalid value "-5GiB": sizes and counts cannot be negative/, 'a negative size');
    });
  });

  test('etcd unreachable: exit 3, one line naming the endpoint', async () => {
    const talk = all.filter((l) => !offline(l) && !SOCKET_FIRST.has(l.path.at(-1)!));
    await pool(talk, 4, async (l) => {
      const r = await runCli(l.prog, ['-C', '127.0.0.1:1', '--etcd-timeout', '1s', ...l.path, ...validArgs(l)], { env, timeoutMs: 20_000 });
      oneLine(l, r, 3, /127\.0\.0\.1:1/, 'etcd unreachable');
    });
  });

  test('cluster not initialized: exit 4, one line saying to run init', async () => {
    const need = all.filter((l) => !WORKS_UNINITIALIZED.has(l.path.at(-1)!) && !offline(l) && !SOCKET_FIRST.has(l.path.at(-1)!));
    await pool(need, 4, async (l) => {
      const r = await runCli(l.prog, ['-C', etcd.endpoint, ...l.path, ...validArgs(l)], { env, timeoutMs: 20_000 });
      oneLine(l, r, 4, /not initialized.*torusctl init/, 'not initialized');
    });
  });
});
