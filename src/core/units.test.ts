import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isTorusError } from './errors.js';
import { formatAgo, formatSize, formatSpan, parseDuration, parseSize } from './units.js';

test('parseSize reads IEC and SI units exactly', () => {
  assert.equal(parseSize('512KiB'), 524288);
  assert.equal(parseSize('20GiB'), 20 * 2 ** 30);
  assert.equal(parseSize('10G'), 10e9);
  assert.equal(parseSize('10GB'), 10e9);
  assert.equal(parseSize('1.5 MiB'), 1572864);
  assert.equal(parseSize('4096'), 4096);
  assert.equal(parseSize('4096B'), 4096);
  assert.equal(parseSize('1tib'), 2 ** 40);
});

test('parseSize refuses junk with INVALID_ARGUMENT', () => {
  for (const bad of ['10QB', '', 'GiB', '-1GiB', '1GiB extra', '1e3', '5 5', '100000PiB'])
    assert.throws(() => parseSize(bad), (e) => isTorusError(e, 'INVALID_ARGUMENT'), bad);
});

test('formatSize', () => {
  assert.equal(formatSize(0), '0 B');
  assert.equal(formatSize(5 * 2 ** 30), '5 GiB');
  assert.equal(formatSize(1536), '1.5 KiB');
  assert.equal(formatSize(64 * 2 ** 20), '64 MiB');
  assert.equal(formatSize(1500, true), '1.5 kB');
});

test('parseDuration and formatAgo', () => {
  assert.equal(parseDuration('500ms'), 500);
  assert.equal(parseDuration('5s'), 5000);
  assert.equal(parseDuration('2m'), 120000);
  assert.equal(parseDuration('3'), 3000);
  assert.throws(() => parseDuration('soon'), (e) => isTorusError(e, 'INVALID_ARGUMENT'));
  assert.equal(formatAgo(200), 'just now');
  assert.equal(formatAgo(1000), '1 second ago');
  assert.equal(formatAgo(2000), '2 seconds ago');
  assert.equal(formatAgo(180_000), '3 minutes ago');
  assert.equal(formatSpan(0), '0 seconds');
  assert.equal(formatSpan(7 * 86_400_000), '7 days');
});
