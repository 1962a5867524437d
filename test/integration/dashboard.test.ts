import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import { startCluster, type TestCluster } from '../helpers/cluster.js';
import { eventually, ok } from '../helpers/procs.js';

// torusd's web dashboard in a real headless browser (Debian's chromium, driven by playwright-core;
// no browser is downloaded): it loads against a running cluster with no request leaving the node,
// shows the cluster's numbers, and follows a node going down. TORUS_DASHBOARD_SCREENSHOT=FILE keeps
// a screenshot (the README's).

const CHROMIUM = '/usr/bin/chromium';
let cluster: TestCluster;
let browser: BrowserContext;
let page: Page;
let profile: string;

// The page's Content-Security-Policy forbids eval, so conditions are polled from here, not
// evaluated in the page.
const text = async (sel: string): Promise<string> => (await page.textContent(sel)) ?? '';
const table = (sel: string): Promise<(string | null)[][]> => page.$$eval(`${sel} tbody tr`, (trs) => trs.map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent)));
const foreign: string[] = [];

before(async () => {
  cluster = await startCluster({ nodes: 3, replication: 2, torusdArgs: ['--gc-interval', '0'] });
  const C = ['-C', cluster.etcd.endpoint];
  await ok('torusctl', [...C, 'volume', 'create', 'db', '10GiB']);
  await ok('torusctl', [...C, 'volume', 'create', 'logs', '512MiB']);
  profile = mkdtempSync(join(tmpdir(), 'torus-chromium-'));
  // A fresh profile (--user-data-dir, which playwright passes for a persistent context).
  browser = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  page = browser.pages()[0] ?? (await browser.newPage());
  const base = `http://127.0.0.1:${cluster.nodes[0]!.httpPort}`;
  page.on('request', (r) => {
    if (!r.url().startsWith(base) && !r.url().startsWith('data:')) foreign.push(r.url());
  });
  await page.goto(`${base}/`);
});

after(async () => {
  await browser?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
  await cluster?.stop();
});

test('the dashboard shows peers, ring, volumes and health of the running cluster', async () => {
  await eventually('HEALTHY', async () => (await text('#health')) === 'HEALTHY');
  const peers = await table('#peers');
  assert.equal(peers.length, 3);
  for (const n of cluster.nodes) {
    const row = peers.find((r) => r[0] === n.address);
    assert.ok(row, `${n.address} listed`);
    assert.equal(row[2], 'OK');
    assert.equal(row[4], '256 MiB');
  }
  assert.match(await text('#ring'), /ketama ring, version 2, 3 member\(s\), replication 2; balanced: yes/);
  const vols = await table('#volumes');
  assert.deepEqual(
    vols.map((r) => [r[0], r[1], r[3]]),
    [['db', '10 GiB', 'free'], ['logs', '512 MiB', 'free']],
  );
  await eventually('allocation counted', async () => (await table('#volumes')).every((r) => r[2] === '0 B'), 40_000);
  assert.match(await text('#capacity-text'), /of 768 MiB used/);
  assert.equal(await text('#rebalance'), 'balanced: nothing to move');
  assert.deepEqual(foreign, [], 'no request leaves the node');
  const shot = process.env['TORUS_DASHBOARD_SCREENSHOT'];
  if (shot) await page.screenshot({ path: shot, fullPage: true });
});

test('the dashboard follows a node going down: DOWN, DEGRADED, and an event', async () => {
  const victim = cluster.nodes[2]!;
  await cluster.kill(2);
  await eventually('the node DOWN on the page', async () => (await table('#peers')).some((r) => r[0] === victim.address && r[2] === 'DOWN'), 30_000);
  await eventually('DEGRADED', async () => (await text('#health')) === 'DEGRADED', 10_000);
  assert.match(await text('#problems'), /1 ring member\(s\) down/);
  // The down row keeps the node's address and size (its last known record).
  const row = (await table('#peers')).find((r) => r[0] === victim.address);
  assert.equal(row?.[4], '256 MiB');
  assert.match(row?.[6] ?? '', /^last seen /);
  await eventually('an event for it', async () => (await text('#events')).includes(`${victim.address}: OK -> DOWN`), 15_000);
  assert.deepEqual(foreign, []);
  const tmp = join(profile, 'shot.png');
  await page.screenshot({ path: tmp });
  assert.ok(existsSync(tmp) && statSync(tmp).size > 10_000, 'a screenshot of the page');
});
