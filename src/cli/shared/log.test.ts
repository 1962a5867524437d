import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { test } from 'node:test';

// Logs on a terminal are for people; elsewhere they are JSON with ISO 8601 times. The logger
// writes to fd 2 itself, so each case runs in a child process whose stderr is captured.

const LOG = new URL('./log.js', import.meta.url).href;

function logLine(opts: object, tty: boolean): string {
  const script = `const { makeLogger } = await import(${JSON.stringify(LOG)});
makeLogger('torusd', ${JSON.stringify(opts)}, ${tty}).info({ uuid: 'u1' }, 'torusd started');`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  return r.stderr;
}

test('auto: human lines on a terminal, JSON with ISO times elsewhere; --log-format overrides', () => {
  const human = logLine({}, true);
  assert.match(human, /^\S*\[?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\]?\S* \S*INFO\S*.*torusd started/m);
  assert.doesNotMatch(human, /^\{/);
  const json = JSON.parse(logLine({}, false)) as { time: string; msg: string; uuid: string; svc: string };
  assert.match(json.time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
  assert.deepEqual([json.msg, json.uuid, json.svc], ['torusd started', 'u1', 'torusd']);
  assert.doesNotThrow(() => JSON.parse(logLine({ logFormat: 'json' }, true)));
  assert.match(logLine({ logFormat: 'human' }, false), /INFO.*torusd started/);
  assert.equal(logLine({ logLevel: 'warn' }, false), '', 'below the level: nothing');
});
