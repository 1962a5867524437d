// torusd's web dashboard: one page, its stylesheet and its script, all served by the node itself
// (no CDN, no fonts, no external request: it works offline, and the Content-Security-Policy
// enforces that). The script polls /v1/cluster every 2 s and renders with textContent only.

export const DASHBOARD_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Torus</title>
<link rel="stylesheet" href="/dashboard.css">
<script src="/dashboard.js" defer></script>
</head>
<body>
<header>
  <h1>Torus</h1>
  <span id="health" class="badge">loading</span>
  <span id="summary"></span>
  <span id="updated" class="muted"></span>
</header>
<main>
  <section id="problems-section"><ul id="problems"></ul></section>
  <section>
    <h2>Ring</h2>
    <div id="ring"></div>
    <div id="capacity" class="bar"><div id="capacity-fill"></div></div>
    <div id="capacity-text" class="muted"></div>
  </section>
  <section>
    <h2>Rebalance</h2>
    <div id="rebalance"></div>
  </section>
  <section>
    <h2>Peers</h2>
    <table id="peers"><thead><tr><th>Address</th><th>UUID</th><th>State</th><th>Used</th><th>Size</th><th></th><th>Updated</th></tr></thead><tbody></tbody></table>
  </section>
  <section>
    <h2>Volumes</h2>
    <table id="volumes"><thead><tr><th>Name</th><th>Size</th><th>Allocated</th><th>Status</th><th>Snapshots</th></tr></thead><tbody></tbody></table>
  </section>
  <section>
    <h2>Recent events <span class="muted">(seen by this node)</span></h2>
    <ul id="events"></ul>
  </section>
</main>
<footer class="muted">Read-only. Data: <a href="/v1/cluster">/v1/cluster</a> · <a href="/metrics">/metrics</a> · <a href="/healthz">/healthz</a></footer>
</body>
</html>
`;

export const DASHBOARD_CSS = `
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f4f6f9; }
header { display: flex; gap: 1em; align-items: center; padding: .8em 1.5em; background: #1d2330; color: #fff; }
header h1 { font-size: 1.3em; margin: 0; }
main { padding: 1em 1.5em; display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
section { background: #fff; border-radius: 6px; padding: .8em 1em; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
#problems-section, section:has(#peers), section:has(#volumes), section:has(#events) { grid-column: 1 / 3; }
h2 { font-size: 1em; margin: 0 0 .6em; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #e3e7ee; white-space: nowrap; }
th { font-weight: 600; color: #58607a; }
.badge { padding: .15em .6em; border-radius: 1em; font-weight: 600; font-size: .9em; background: #888; color: #fff; }
.HEALTHY, .OK { background: #1f883d; } .DEGRADED, .DOWN { background: #cf222e; } .MAINTENANCE, .MAINT { background: #bf8700; } .Avail { background: #0969da; }
.muted { color: #8a92a6; }
header .muted { color: #aab; }
.bar { height: .7em; background: #e3e7ee; border-radius: .35em; overflow: hidden; margin: .4em 0; min-width: 6em; }
.bar > div { height: 100%; background: #0969da; }
.bar.full > div { background: #cf222e; }
#problems li.problem { color: #cf222e; } #problems li.note { color: #9a6700; }
#problems:empty::before { content: "No problems."; color: #1f883d; }
ul { margin: 0; padding-left: 1.2em; }
#events li { margin: .15em 0; }
footer { padding: 0 1.5em 1em; }
`;

export const DASHBOARD_JS = `
'use strict';
const $ = (id) => document.getElementById(id);
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }
function bar(pct, full) { const b = el('div', undefined, 'bar' + (full ? ' full' : '')); const f = el('div'); f.style.width = Math.min(100, pct || 0) + '%'; b.appendChild(f); return b; }
function rows(table, list, cells) {
  const body = table.tBodies[0];
  body.replaceChildren(...list.map((item) => { const tr = el('tr'); for (const c of cells(item)) { const td = el('td'); if (c instanceof Node) td.appendChild(c); else td.textContent = c; tr.appendChild(td); } return tr; }));
}
function render(v) {
  const h = v.health;
  $('health').textContent = h.status; $('health').className = 'badge ' + h.status;
  $('summary').textContent = 'ring v' + v.ring.version + ', ' + v.ring.members + ' member(s), replication ' + h.replication.effective + '/' + h.replication.wanted;
  $('updated').textContent = 'updated ' + new Date(v.generatedAt).toLocaleTimeString() + ' from ' + (v.node.address || v.node.uuid);
  $('problems').replaceChildren(...h.problems.map((p) => el('li', p, 'problem')), ...h.notes.map((p) => el('li', p, 'note')));
  $('ring').textContent = v.ring.type + ' ring, version ' + v.ring.version + ', ' + v.ring.members + ' member(s), replication ' + v.ring.replication + '; balanced: ' + (v.ring.balanced ? 'yes' : 'no');
  $('capacity-fill').style.width = v.capacity.usedPercent + '%';
  $('capacity-text').textContent = v.capacity.usedText + ' of ' + v.capacity.totalText + ' used (' + v.capacity.usedPercent + '%) on live nodes';
  const r = v.rebalance;
  $('rebalance').textContent = r.active
    ? (r.bytesLeft > 0 ? r.bytesLeftText + ' left at ' + r.rateText + ', ETA ' + r.etaText : 'in progress, amount not estimated yet') + (r.waiting.length ? '; waiting for ' + r.waiting.length + ' node(s) to pass on the current ring' : '')
    : 'balanced: nothing to move';
  rows($('peers'), v.peers, (p) => [p.address || '?', p.uuid.slice(0, 8), el('span', p.member + (p.maintenanceUntil && p.member !== 'MAINT' ? ' (maint)' : ''), 'badge ' + p.member), p.usedText, p.sizeText, bar(p.usedPercent, p.nearlyFull), p.updated]);
  $('peers').dataset.count = String(v.peers.length);
  rows($('volumes'), v.volumes, (x) => [x.name, x.sizeText, x.allocatedText, x.status + (x.holder ? ' (' + x.holder + ')' : ''), String(x.snapshots)]);
  $('events').replaceChildren(...v.events.map((e) => el('li', new Date(e.at).toLocaleTimeString() + '  ' + e.text)));
}
async function refresh() {
  try {
    const res = await fetch('/v1/cluster', { cache: 'no-store' });
    if (!res.ok) throw new Error(res.status + ' ' + (await res.text()));
    render(await res.json());
  } catch (err) {
    $('health').textContent = 'UNREACHABLE'; $('health').className = 'badge DEGRADED';
    $('updated').textContent = String(err.message || err);
  }
}
refresh();
setInterval(refresh, 2000);
`;

/** Headers for the dashboard's own files: nothing may be loaded from anywhere else. */
export const DASHBOARD_HEADERS = {
  'content-security-policy': "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
  'x-content-type-options': 'nosniff',
  'cache-control': 'no-cache',
};
