#!/usr/bin/env node
// Runs every compiled *.test.js under dist/ with node's test runner. Node 20's `node --test`
// neither expands globs nor complains when a directory holds no tests, so the files are listed
// here explicitly and an empty list is an error.
//
//   node scripts/run-tests.js                 all tests
//   node scripts/run-tests.js unit            unit tests (dist/src)
//   node scripts/run-tests.js integration     integration tests (dist/test)
//   node scripts/run-tests.js ring storage    only files whose path contains one of the words
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';

function walk(dir) {
  let out = [];
  let entries;
  try {
    entries = readdirSync(dir);
  } catch {
    return out;
  }
  for (const name of entries) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out = out.concat(walk(p));
    // A compiled test whose source is gone (renamed or deleted since the last build) is stale.
    else if (name.endsWith('.test.js') && existsSync(p.replace(/^dist\//, '').replace(/\.js$/, '.ts'))) out.push(p);
  }
  return out.sort();
}

const args = process.argv.slice(2);
let roots = ['dist/src', 'dist/test'];
let filters = args;
if (args[0] === 'unit') [roots, filters] = [['dist/src'], args.slice(1)];
else if (args[0] === 'integration') [roots, filters] = [['dist/test'], args.slice(1)];

const files = roots.flatMap(walk).filter((f) => filters.length === 0 || filters.some((w) => f.includes(w)));
if (files.length === 0) {
  console.error(`run-tests: no test files found under ${roots.join(', ')}${filters.length ? ` matching ${filters.join(' ')}` : ''}; did the build run?`);
  process.exit(1);
}
console.log(`run-tests: ${files.length} test files`);
// The tests that boot an emulated VM (no KVM: the guest's CPU is software) run afterwards, one at
// a time: beside another test file the guest got too little CPU for its own torusblk to answer
// etcd and its peers within their timeouts, and the kernel saw I/O errors that were the host's
// load, not Torus.
const vm = files.filter((f) => f.endsWith('-kernel.test.js'));
const rest = files.filter((f) => !vm.includes(f));
const run = (list, concurrency) =>
  list.length === 0 ? 0 : (spawnSync(process.execPath, ['--test', `--test-concurrency=${concurrency}`, '--test-timeout=600000', ...list], { stdio: 'inherit' }).status ?? 1);
const first = run(rest, 2);
const second = run(vm, 1);
process.exit(first || second);
