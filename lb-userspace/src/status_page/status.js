// The status page: fetches /status/data every second and draws it. Every text from the daemon
// (and so from backends: agent replies, labels, check details) goes into the DOM through
// textContent or setAttribute, never as markup.
'use strict';

const TOKEN_KEY = 'lb-status-token';
const CHANGED_MS = 60 * 1000;
const TIMEOUT_MS = 5000;
// Rows drawn at most, after sorting and filtering: a redraw a second stays cheap for the
// browser on a node with thousands of backends (the filter or a service's page shows the rest).
const MAX_ROWS = 500;

// The per-service page: /status/service/NAME.
const SERVICE_PREFIX = '/status/service/';
const only = location.pathname.startsWith(SERVICE_PREFIX)
  ? decodeURIComponent(location.pathname.slice(SERVICE_PREFIX.length))
  : null;

// A token in the fragment (never sent to the server) is kept for this tab and taken out of
// the address bar, so it does not stay on screen or in the history.
function takeToken() {
  const m = location.hash.match(/(?:^#|&)token=([^&]*)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, '', location.pathname + location.search);
  }
}
takeToken();
// A fragment added to the open page (no reload): the next fetch uses it.
window.addEventListener('hashchange', takeToken);

const view = {
  prev: null, // the previous sample, for rates
  sort: { key: 'pps', dir: -1 },
  filter: '',
  trouble: false,
  seen: new Map(), // backend key -> { state, changedAt (page clock, ms) }
  rows: [],
  updates: 0,
};

const $ = (id) => document.getElementById(id);

// An element with text, attributes and children; strings become text nodes.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'text') e.textContent = String(v);
    else e.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(typeof c === 'string' ? document.createTextNode(c) : c);
  }
  return e;
}

const badge = (word, cls) => el('span', { class: 'badge ' + (cls || word), text: word });
const sub = (text) => (text ? el('span', { class: 'sub', text }) : null);
const fixed = (x, n) => (typeof x === 'number' && isFinite(x) ? x.toFixed(n) : '–');
const rate = (x) => (x === null || x === undefined ? '–' : x >= 100 ? x.toFixed(0) : x.toFixed(1));
const key = (service, id) => service + '\u0000' + id;

function ago(ms) {
  if (ms === null || ms === undefined || !isFinite(ms)) return '–';
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 120) return s + ' s ago';
  if (s < 7200) return Math.round(s / 60) + ' min ago';
  if (s < 172800) return Math.round(s / 3600) + ' h ago';
  return Math.round(s / 86400) + ' d ago';
}

function hostPort(addr, port) {
  return (String(addr).includes(':') ? '[' + addr + ']' : addr) + ':' + port;
}

// ---- the data -----------------------------------------------------------------------

async function fetchData() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: 'Bearer ' + token } : {};
  const url = '/status/data' + (only === null ? '' : '?service=' + encodeURIComponent(only));
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
  try {
    const r = await fetch(url, { headers, cache: 'no-store', signal: ctl.signal });
    const body = await r.json().catch(() => null);
    return { status: r.status, body };
  } finally {
    clearTimeout(timer);
  }
}

// Counters per second between two samples (null without both, or after a restart).
function per(now, then, field, secs) {
  if (!now || !then || secs <= 0 || typeof now[field] !== 'number' || now[field] < then[field]) return null;
  return (now[field] - then[field]) / secs;
}

// Per backend: the service's entry and its health joined, with rates from the last sample.
function backendRows(d, prev) {
  const secs = prev ? (d.at_ms - prev.at_ms) / 1000 : 0;
  const before = new Map();
  for (const s of prev ? prev.services : []) {
    for (const b of s.backends || []) before.set(key(s.name, b.id), b);
  }
  const health = new Map();
  for (const s of d.health || []) {
    for (const b of s.backends || []) health.set(key(s.service, b.id), b);
  }
  const rows = [];
  for (const s of d.services || []) {
    for (const b of s.backends || []) {
      const k = key(s.name, b.id);
      const h = health.get(k) || {};
      rows.push({
        key: k,
        service: s.name,
        id: b.id,
        address: hostPort(b.address, b.port),
        state: h.state || b.health || 'up',
        h,
        weight: b.weight,
        effective: b.effective_weight,
        maxconn: b.maxconn,
        active: b.active_flows,
        labels: Object.entries(b.labels || {}).map(([name, value]) => name + '=' + value),
        pps: per(b, before.get(k), 'packets', secs),
        fps: per(b, before.get(k), 'new_flows', secs),
      });
    }
  }
  return rows;
}

// Notes each backend's state as the page sees it, and when it last changed; a row stands out
// for a minute after a change, whether the page saw it or the check's own record says so.
function markChanges(rows, d) {
  const now = Date.now();
  for (const r of rows) {
    const seen = view.seen.get(r.key);
    if (!seen) view.seen.set(r.key, { state: r.state, changedAt: null });
    else if (seen.state !== r.state) view.seen.set(r.key, { state: r.state, changedAt: now });
    const check = r.h.check;
    const byCheck = check && check.transitions > 0 ? d.now_ms - check.since_ms : Infinity;
    const changedAt = view.seen.get(r.key).changedAt;
    const byPage = changedAt === null ? Infinity : now - changedAt;
    r.changedAgo = Math.min(byCheck, byPage);
    r.changed = r.changedAgo < CHANGED_MS;
    // Since when: the check's record, else when the page saw the change.
    r.sinceAgo = check ? d.now_ms - check.since_ms : byPage;
  }
}

// ---- the backend table ------------------------------------------------------------------

const SEVERITY = { down: 0, drained: 1, up: 2 };

function stateCell(r) {
  const h = r.h;
  const why = [];
  if (h.check && h.check.reason) why.push(h.check.reason);
  if (h.agent && h.agent.state) {
    const a = h.agent.state;
    if (a.down) why.push(a.down);
    if (a.drain) why.push('agent: drain');
    if (a.maint) why.push('agent: maint');
  }
  // The operator's drain, a late heartbeat or gone from its source: said apart from health.
  if (h.drain && h.drain.detail) why.push(h.drain.detail);
  const idle = r.state === 'up' && r.effective === 0;
  return el(
    'td',
    { 'data-col': 'state' },
    badge(r.state),
    idle ? ' ' : null,
    idle ? badge('not serving', 'not-serving') : null,
    sub(why.join('; ')),
  );
}

// The other inputs of the effective weight, beside the checks' score and the configured weight.
function scoreInputs(h) {
  const parts = [];
  if (h.external) parts.push('external ' + fixed(h.external.score, 2));
  if (typeof h.slow_start_factor === 'number' && h.slow_start_factor < 1) {
    parts.push('slow start ' + fixed(h.slow_start_factor, 2));
  }
  if (h.load) parts.push('load ' + fixed(h.load.factor, 2));
  if (h.agent && h.agent.state && h.agent.state.weight) {
    const w = h.agent.state.weight;
    parts.push('agent ' + (w.percent !== undefined ? w.percent + '%' : 'weight ' + w.absolute));
  }
  return parts.join(' · ');
}

function lastCheck(h) {
  const last = h.check && h.check.last;
  if (!last) return el('td', { 'data-col': 'check', class: 'text', text: h.check ? 'not yet' : '–' });
  return el(
    'td',
    { 'data-col': 'check', class: 'text' },
    badge(last.ok ? 'ok' : 'fail'),
    ' ',
    el('span', { text: last.detail }),
  );
}

const COLUMNS = [
  { key: 'service', label: 'service', value: (r) => r.service,
    cell: (r) => el('td', { 'data-col': 'service' },
      el('a', { href: SERVICE_PREFIX + encodeURIComponent(r.service), text: r.service })) },
  { key: 'id', label: 'backend', value: (r) => r.id,
    cell: (r) => el('td', { 'data-col': 'backend' }, el('span', { class: 'id', text: r.id }), sub(r.address)) },
  { key: 'state', label: 'state', value: (r) => SEVERITY[r.state] ?? 3, cell: stateCell },
  { key: 'since', label: 'since', value: (r) => r.sinceAgo, num: true,
    cell: (r) => el('td', {
      'data-col': 'since', class: 'num',
      title: r.h.check ? new Date(r.h.check.since_ms).toISOString() + ' (' + r.h.check.transitions + ' changes)' : null,
      text: ago(r.sinceAgo) }) },
  { key: 'score', label: 'score', value: (r) => r.h.health_score, num: true,
    cell: (r) => el('td', { 'data-col': 'score', class: 'num' }, fixed(r.h.health_score, 2), sub(scoreInputs(r.h))) },
  { key: 'weight', label: 'weight', value: (r) => r.weight, num: true,
    cell: (r) => el('td', { 'data-col': 'weight', class: 'num', text: r.weight }) },
  { key: 'effective', label: 'effective', value: (r) => r.effective, num: true,
    cell: (r) => el('td', { 'data-col': 'effective', class: 'num', text: r.effective }) },
  { key: 'breaker', label: 'breaker', value: (r) => r.h.breaker || '',
    cell: (r) => el('td', { 'data-col': 'breaker' },
      r.h.check && r.h.check.breaker ? badge(r.h.breaker) : '–') },
  { key: 'active', label: 'active flows', value: (r) => r.active ?? -1, num: true,
    cell: (r) => el('td', { 'data-col': 'active', class: 'num' }, r.active === null || r.active === undefined ? '–' : String(r.active),
      sub(r.maxconn ? 'max ' + r.maxconn : '')) },
  { key: 'pps', label: 'packets/s', value: (r) => r.pps ?? -1, num: true,
    cell: (r) => el('td', { 'data-col': 'pps', class: 'num', text: rate(r.pps) }) },
  { key: 'fps', label: 'new flows/s', value: (r) => r.fps ?? -1, num: true,
    cell: (r) => el('td', { 'data-col': 'fps', class: 'num', text: rate(r.fps) }) },
  { key: 'check', label: 'last check', value: (r) => (r.h.check && r.h.check.last ? (r.h.check.last.ok ? 1 : 0) : 2),
    cell: (r) => lastCheck(r.h) },
  { key: 'latency', label: 'latency', value: (r) => (r.h.check && r.h.check.last ? r.h.check.last.latency_ms : -1), num: true,
    cell: (r) => el('td', { 'data-col': 'latency', class: 'num',
      text: r.h.check && r.h.check.last ? fixed(r.h.check.last.latency_ms, 1) + ' ms' : '–' }) },
  { key: 'agent', label: 'agent says', value: (r) => (r.h.agent && r.h.agent.last) || '',
    cell: (r) => el('td', { 'data-col': 'agent', class: 'text', text: (r.h.agent && r.h.agent.last) || '–' }) },
  { key: 'labels', label: 'labels', value: (r) => r.labels.join(' '),
    cell: (r) => el('td', { 'data-col': 'labels', class: 'text', text: r.labels.join(', ') || '–' }) },
];

function drawHeader() {
  const tr = $('backends').tHead.rows[0];
  tr.replaceChildren();
  for (const c of COLUMNS) {
    const sorted = view.sort.key === c.key;
    const th = el('th', {
      class: c.num ? 'num' : null,
      'data-col': c.key,
      'aria-sort': sorted ? (view.sort.dir > 0 ? 'ascending' : 'descending') : null,
    }, el('button', { type: 'button', text: c.label }));
    th.querySelector('button').addEventListener('click', () => {
      // Numbers sort largest first, as lb top does; a second click turns it round.
      view.sort = view.sort.key === c.key
        ? { key: c.key, dir: -view.sort.dir }
        : { key: c.key, dir: c.num ? -1 : 1 };
      drawHeader();
      drawBackends();
    });
    tr.append(th);
  }
}

function visible(r) {
  if (view.trouble && r.state === 'up' && r.effective > 0) return false;
  if (!view.filter) return true;
  const hay = [r.service, r.id, r.address, r.state, ...r.labels, (r.h.agent && r.h.agent.last) || '']
    .join('\n')
    .toLowerCase();
  return hay.includes(view.filter);
}

function drawBackends() {
  const col = COLUMNS.find((c) => c.key === view.sort.key) || COLUMNS[0];
  const cmp = (a, b) => {
    const x = col.value(a);
    const y = col.value(b);
    const c = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
    return c * view.sort.dir || a.service.localeCompare(b.service) || a.id.localeCompare(b.id);
  };
  const rows = view.rows.filter(visible).sort(cmp);
  const body = $('backends').tBodies[0];
  body.replaceChildren(
    ...rows.slice(0, MAX_ROWS).map((r) => {
      const tr = el('tr', {
        'data-service': r.service,
        'data-backend': r.id,
        'data-state': r.state,
        class: r.changed ? 'changed' : null,
        title: r.changed ? 'state changed ' + ago(r.changedAgo) : null,
      });
      for (const c of COLUMNS) tr.append(c.cell(r));
      return tr;
    }),
  );
  $('shown').textContent =
    Math.min(rows.length, MAX_ROWS) + ' of ' + view.rows.length + ' backends shown' +
    (rows.length > MAX_ROWS ? ' (the first ' + MAX_ROWS + ' as sorted: filter, or open a service, for the others)' : '');
}

// ---- services and drops -------------------------------------------------------------------

function drawServices(d, prev) {
  const secs = prev ? (d.at_ms - prev.at_ms) / 1000 : 0;
  const before = new Map((prev ? prev.services : []).map((s) => [s.name, s]));
  const health = new Map((d.health || []).map((s) => [s.service, s]));
  const bgp = d.bgp || {};
  const body = $('services').tBodies[0];
  body.replaceChildren(
    ...(d.services || []).map((s) => {
      const h = health.get(s.name) || { backends: [] };
      const up = h.backends.filter((b) => b.state === 'up').length;
      const state = el('td', { 'data-col': 'state' }, badge(s.panic ? 'panic' : 'ok'));
      if (bgp.enabled && bgp.services && bgp.services[s.name]) {
        const a = bgp.services[s.name];
        const b = badge(a.announced ? 'announced' : 'withdrawn');
        if (a.reason) b.setAttribute('title', a.reason);
        state.append(' ', b);
      }
      const strategy = s.strategy === 'adaptive' && s.in_effect ? 'adaptive → ' + s.in_effect : s.strategy;
      return el(
        'tr',
        { 'data-service': s.name },
        el('td', { 'data-col': 'service' }, el('a', { href: SERVICE_PREFIX + encodeURIComponent(s.name), text: s.name })),
        el('td', { 'data-col': 'vip', text: hostPort(s.vip, s.port) + '/' + s.protocol }),
        el('td', { 'data-col': 'strategy', text: strategy }),
        el('td', { 'data-col': 'forwarding', text: s.forwarding }),
        state,
        el('td', { 'data-col': 'up', class: 'num', text: up + ' / ' + s.backends.length }),
        el('td', { 'data-col': 'fps', class: 'num', text: rate(per(s, before.get(s.name), 'new_flows', secs)) }),
        el('td', { 'data-col': 'pps', class: 'num', text: rate(per(s, before.get(s.name), 'packets', secs)) }),
      );
    }),
  );
}

function drawDrops(d, prev) {
  const out = $('drops');
  if (!prev) {
    out.textContent = '–';
    return;
  }
  const secs = (d.at_ms - prev.at_ms) / 1000;
  const drops = [];
  for (const [name, v] of Object.entries(d.counters || {})) {
    const was = prev.counters[name];
    if (name.startsWith('drop_') && secs > 0 && v > was) drops.push([name.slice(5), (v - was) / secs]);
  }
  drops.sort((a, b) => b[1] - a[1]);
  out.replaceChildren(
    ...(drops.length
      ? drops.map(([n, r]) => el('span', { class: 'drop', 'data-reason': n, text: n + ' ' + rate(r) + '/s' }))
      : [document.createTextNode('none')]),
  );
}

function drawInterfaces(d, prev) {
  const secs = prev ? (d.at_ms - prev.at_ms) / 1000 : 0;
  const before = new Map(((prev && prev.interfaces) || []).map((i) => [i.interface, i]));
  $('interfaces').replaceChildren(
    ...(d.interfaces || []).map((i) => {
      const errors = i.xdp_tx_errors;
      const was = before.get(i.interface);
      const growing = secs > 0 && was && typeof errors === 'number' && errors > was.xdp_tx_errors;
      let text = i.interface + ': ' + i.mode + (i.adopted ? ' (adopted)' : '');
      text += ', XDP TX errors ' + (typeof errors === 'number' ? errors : 'not counted by the driver');
      if (growing) text += ' (' + rate((errors - was.xdp_tx_errors) / secs) + '/s)';
      return el('span', {
        class: growing ? 'iface rising' : 'iface',
        'data-interface': i.interface,
        'data-mode': i.mode,
        'data-tx-errors': typeof errors === 'number' ? errors : null,
        text,
      });
    }),
  );
}

// ---- the loop -------------------------------------------------------------------------------

function problem(text) {
  const e = $('error');
  e.textContent = text;
  e.hidden = !text;
}

function draw(d) {
  const prev = view.prev;
  view.rows = backendRows(d, prev);
  markChanges(view.rows, d);
  $('instance').textContent = 'instance ' + d.instance;
  drawServices(d, prev);
  drawDrops(d, prev);
  drawInterfaces(d, prev);
  drawBackends();
  view.prev = d;
  view.updates += 1;
  document.body.dataset.updates = String(view.updates);
  const u = $('updated');
  u.textContent = 'updated ' + new Date().toLocaleTimeString();
  u.classList.remove('stale');
  $('content').hidden = false;
}

async function tick() {
  let wait = 1000;
  try {
    const { status, body } = await fetchData();
    const detail = body && body.detail ? body.detail : 'HTTP ' + status;
    if (status === 200 && body) {
      wait = body.refresh_ms || wait;
      problem('');
      $('token-form').hidden = true;
      draw(body);
    } else if (status === 401 || status === 403) {
      problem('not allowed: ' + detail);
      $('token-form').hidden = false;
      $('content').hidden = true;
    } else if (status === 404) {
      problem(detail);
      $('content').hidden = true;
    } else {
      problem('the daemon answered: ' + detail);
    }
  } catch (e) {
    problem('cannot reach the daemon: ' + (e && e.name === 'AbortError' ? 'no answer within 5 s' : e));
    $('updated').classList.add('stale');
  }
  setTimeout(tick, wait);
}

function start() {
  if (only !== null) {
    $('scope').textContent = 'service ' + only;
    document.title = 'lb status: ' + only;
  }
  drawHeader();
  $('filter').addEventListener('input', (e) => {
    view.filter = e.target.value.trim().toLowerCase();
    drawBackends();
  });
  $('trouble').addEventListener('change', (e) => {
    view.trouble = e.target.checked;
    drawBackends();
  });
  $('token-form').addEventListener('submit', (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $('token').value.trim());
    $('token').value = '';
    problem('');
  });
  tick();
}

start();
