import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { buildProgram as torusblk } from '../torusblk.js';
import { buildProgram as torusctl } from '../torusctl.js';
import { buildProgram as torusd } from '../torusd.js';
import { VERSION } from '../../core/version.js';
import { bashCompletion, manPage, zshCompletion } from './docs-gen.js';
import { EXIT_STATUSES } from './run.js';

// Completion and man pages come from the commander definitions: exercised in real bash and zsh,
// and the man pages in the repository must be what the definitions generate now.

const REPO = new URL('../../../../', import.meta.url).pathname;

function bashComplete(line: string): string[] {
  const words = line.split(' ');
  const script = `${bashCompletion('torusctl', torusctl())}
COMP_WORDS=(${words.map((w) => `'${w}'`).join(' ')}); COMP_CWORD=${words.length - 1}
_torusctl_complete; printf '%s\\n' "\${COMPREPLY[@]}"`;
  const r = spawnSync('bash', ['--norc', '-c', script], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  return r.stdout.split('\n').filter(Boolean);
}

test('bash completion: commands, subcommands, options, option values', () => {
  assert.deepEqual(bashComplete('torusctl vol'), ['volume']);
  const sub = bashComplete('torusctl volume ');
  for (const s of ['create-block', 'create', 'list', 'info', 'delete', 'resize']) assert.ok(sub.includes(s), `volume ${s}: ${sub.join(' ')}`);
  assert.ok(bashComplete('torusctl -C 127.0.0.1:2379 volume info --').includes('--json'));
  assert.ok(bashComplete('torusctl -C 127.0.0.1:2379 volume info --').includes('--bytes'));
  assert.deepEqual(bashComplete('torusctl init --ring-type k'), ['ketama']);
  assert.deepEqual(bashComplete('torusctl peer maintenance o').sort(), ['off', 'on']);
});

test('`torusctl completion bash|zsh` and `man` print what the generators make', () => {
  const bin = `${REPO}bin/torusctl.js`;
  for (const [args, want] of [
    [['completion', 'bash'], bashCompletion('torusctl', torusctl())],
    [['completion', 'zsh'], zshCompletion('torusctl', torusctl())],
    [['man'], manPage('torusctl', torusctl(), VERSION, EXIT_STATUSES)],
  ] as const) {
    const r = spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, want);
  }
});

test('zsh completion: the same tree, in a real zsh', (t) => {
  if (spawnSync('zsh', ['-c', 'true']).status !== 0) return t.skip('zsh is not installed (scripts/setup.js installs it)');
  // zsh's completion system needs a terminal; the generated function's own logic is run with
  // stand-ins for the builtins it ends in, which print what they were given.
  const run = (line: string): string => {
    const words = line.split(' ');
    const script = `compdef() { :; }
_describe() { local -a arr; arr=("\${(@P)4}"); print -l -- "\${arr[@]%%:*}"; }
compadd() { shift; print -l -- "$@"; }
_files() { print -- FILES; }
${zshCompletion('torusctl', torusctl())}
words=(${words.map((w) => `'${w}'`).join(' ')}); CURRENT=${words.length}
_torusctl`;
    const r = spawnSync('zsh', ['-f', '-c', script], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    return r.stdout;
  };
  assert.match(run('torusctl volume '), /^info$/m);
  assert.match(run('torusctl -C x volume info --'), /^--json$/m);
  assert.match(run('torusctl init --ring-type '), /^ketama$/m);
  assert.match(run('torusctl peer maintenance '), /^on$/m);
});

test('the man pages in man/ are what the definitions generate', () => {
  for (const [prog, build] of [['torusctl', torusctl], ['torusblk', torusblk], ['torusd', torusd]] as const) {
    const want = manPage(prog, build(), VERSION, EXIT_STATUSES);
    const have = readFileSync(`${REPO}man/${prog}.1`, 'utf8');
    assert.equal(have, want, `man/${prog}.1 is stale: regenerate with \`node bin/${prog}.js man > man/${prog}.1\``);
  }
  const ctl = manPage('torusctl', torusctl(), VERSION, EXIT_STATUSES);
  for (const s of ['volume info', 'peer maintenance on', '\\-\\-json', 'EXIT STATUS']) assert.ok(ctl.includes(s), s);
});
