// hubgate inspector: the requests the gate finished, live. Everything a request carries is put
// on the page as text (textContent, text nodes) and never as HTML; the Content-Security-Policy
// allows only this script.
'use strict';

const state = {
  events: [],          // summaries, newest first
  selected: null,      // id of the request in the detail view
  routes: new Set(),
  verdicts: new Set(),
  refetch: null,
  loads: 0,
  follow: null,
};

// An element with attributes and children; strings become text nodes.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('data-') || k === 'type' || k === 'placeholder' || k === 'id' || k === 'title') e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function filters() {
  return {
    route: document.getElementById('f-route').value,
    verdict: document.getElementById('f-verdict').value,
    status: document.getElementById('f-status').value.trim(),
    q: document.getElementById('f-q').value.trim(),
  };
}

function query(f) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(f)) if (v) p.set(k, v);
  return p.toString();
}

function matches(e, f) {
  return (!f.route || e.route === f.route)
    && (!f.verdict || e.verdict === f.verdict)
    && (!f.status || String(e.status) === f.status);
}

function time(ms) {
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour12: false }) + '.' + String(d.getMilliseconds()).padStart(3, '0');
}

function latency(us) {
  return us >= 1000 ? (us / 1000).toFixed(1) + ' ms' : us + ' µs';
}

function size(n) {
  return n >= 1024 ? (n / 1024).toFixed(1) + ' KiB' : n + ' B';
}

function statusClass(s) {
  return s >= 500 ? 's5' : s >= 400 ? 's4' : s >= 300 ? 's3' : 's2';
}

function row(e) {
  const tr = el('tr', { class: 'event' + (e.id === state.selected ? ' selected' : ''), 'data-id': String(e.id) },
    el('td', { class: 'time' }, time(e.time_ms)),
    el('td', { class: 'route' }, e.route),
    el('td', { class: 'method' }, e.method),
    el('td', { class: 'verdict v-' + e.verdict }, e.verdict, e.reason !== '-' ? el('span', { class: 'reason' }, ' ' + e.reason) : null),
    el('td', { class: 'status ' + statusClass(e.status) }, e.status),
    el('td', { class: 'latency' }, latency(e.latency_us)),
    el('td', { class: 'client' }, e.client),
    el('td', { class: 'cn' }, e.cn === null ? 'no certificate' : e.cn),
    el('td', { class: 'size' }, size(e.body_size)));
  tr.addEventListener('click', () => select(e.id));
  return tr;
}

function option(select, value) {
  if ([...select.options].some((o) => o.value === value)) return;
  select.append(el('option', { value }, value));
}

function remember(e) {
  if (!state.routes.has(e.route)) {
    state.routes.add(e.route);
    option(document.getElementById('f-route'), e.route);
  }
  if (!state.verdicts.has(e.verdict)) {
    state.verdicts.add(e.verdict);
    option(document.getElementById('f-verdict'), e.verdict);
  }
}

function render() {
  const body = document.getElementById('events');
  body.replaceChildren(...state.events.map(row));
  document.getElementById('count').textContent = state.events.length + ' shown';
}

async function load() {
  // Answers can come back out of order: only the latest request's is shown.
  const seq = ++state.loads;
  const r = await fetch('/api/events?' + query(filters()), { credentials: 'same-origin' });
  if (!r.ok || seq !== state.loads) return;
  const list = await r.json();
  if (seq !== state.loads) return;
  state.events = list.events;
  list.events.forEach(remember);
  render();
}

// Re-asks the server soon (text search looks into bodies, which only the server has).
function reload() {
  clearTimeout(state.refetch);
  state.refetch = setTimeout(load, 200);
}

function live() {
  const conn = document.getElementById('conn');
  const es = new EventSource('/api/events/stream');
  es.onopen = () => { conn.textContent = 'connected'; conn.className = 'conn on'; load(); };
  es.onerror = () => { conn.textContent = 'disconnected'; conn.className = 'conn off'; };
  es.addEventListener('request', (m) => {
    const e = JSON.parse(m.data);
    remember(e);
    const f = filters();
    if (f.q) { reload(); return; }
    if (!matches(e, f)) return;
    state.events.unshift(e);
    if (state.events.length > 2000) state.events.length = 2000;
    document.getElementById('events').prepend(row(e));
    document.getElementById('count').textContent = state.events.length + ' shown';
  });
  es.addEventListener('lagged', reload);
}

function pair(dl, k, v) {
  dl.append(el('dt', {}, k), el('dd', {}, v));
}

function bytesOf(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

// Bash ANSI-C quoting: printable ASCII as is, everything else as \xNN.
function shellBytes(bytes) {
  let s = "$'";
  for (const b of bytes) {
    if (b >= 0x20 && b < 0x7f && b !== 0x27 && b !== 0x5c) s += String.fromCharCode(b);
    else s += '\\x' + b.toString(16).padStart(2, '0');
  }
  return s + "'";
}

function shellWord(text) {
  return shellBytes(new TextEncoder().encode(text));
}

function curl(d) {
  // The authority the client addressed (HTTP/2 sends no Host header).
  const host = d.authority || location.hostname + ':8443';
  const skip = new Set(['host', 'content-length', 'connection', 'transfer-encoding', 'authorization', 'cookie', 'proxy-authorization']);
  const lines = ['curl --cert meta-client.pem --key meta-client.key'];
  if (d.method === 'GET') {
    // The verification request's query string is never kept (it holds the verify token).
    lines.push(shellWord('https://' + host + d.path + '?hub.mode=subscribe&hub.challenge=CHALLENGE&hub.verify_token=TOKEN'));
    return lines.join(' \\\n  ');
  }
  lines.push('-X ' + d.method, shellWord('https://' + host + d.path));
  for (const [k, v] of d.headers) if (!skip.has(k)) lines.push('-H ' + shellWord(k + ': ' + v));
  lines.push('--data-binary ' + shellBytes(bytesOf(d.body_base64)));
  return lines.join(' \\\n  ');
}

async function replay(id) {
  const button = document.getElementById('d-replay');
  button.disabled = true;
  const r = await fetch('/api/events/' + id + '/replay', { method: 'POST', credentials: 'same-origin' });
  const text = r.ok ? 'replayed: ' + (await r.json()).replayed : 'refused: ' + (await r.text());
  document.getElementById('d-replay-result').textContent = text;
  setTimeout(() => select(id), 300);
}

async function select(id) {
  state.selected = id;
  for (const tr of document.querySelectorAll('tr.event')) tr.classList.toggle('selected', tr.dataset.id === String(id));
  const pane = document.getElementById('detail');
  const r = await fetch('/api/events/' + id, { credentials: 'same-origin' });
  if (!r.ok) { pane.replaceChildren(el('p', {}, 'This request is no longer kept.')); return; }
  const d = await r.json();
  const dl = el('dl', { id: 'd-summary' });
  pair(dl, 'received', new Date(d.time_ms).toISOString());
  pair(dl, 'route', d.route);
  pair(dl, 'request', d.method + ' ' + d.path);
  pair(dl, 'verdict', d.verdict + (d.reason !== '-' ? ' (' + d.reason + ')' : ''));
  pair(dl, 'status', String(d.status));
  pair(dl, 'latency', latency(d.latency_us));
  pair(dl, 'client', d.client);
  pair(dl, 'certificate', d.cn === null ? 'no certificate' : d.cn);
  pair(dl, 'signature', d.signature
    ? d.signature.algorithm + ', app_secrets[' + d.signature.secret_index + '] (' + d.secrets + ' configured)'
    : (d.method === 'POST' ? 'did not match' : 'not asked (verification request)'));
  if (d.backend_status !== null) pair(dl, 'backend answered', String(d.backend_status));
  pair(dl, 'body', size(d.body_size) + (d.body_truncated ? ' (first 64 KiB kept)' : ''));

  const headers = el('table', { id: 'd-headers' }, ...d.headers.map(([k, v]) => el('tr', {}, el('th', {}, k), el('td', {}, v))));
  let pretty = 'not JSON';
  try {
    pretty = JSON.stringify(JSON.parse(new TextDecoder().decode(bytesOf(d.body_base64))), null, 2);
  } catch (_) { /* shown as is */ }

  const parts = [
    el('h2', {}, 'Request #' + d.id),
    el('p', { id: 'd-explanation', class: 'explanation v-' + d.verdict }, d.explanation),
    dl,
  ];
  if (d.spool.length) {
    const dead = d.spool.some((s) => s.state === 'dead');
    parts.push(el('h3', {}, 'Spool'),
      el('table', { id: 'd-spool' },
        el('tr', {}, el('th', {}, 'event'), el('th', {}, 'state'), el('th', {}, 'attempts'), el('th', {}, 'last error')),
        ...d.spool.map((s) => el('tr', {}, el('td', {}, s.id), el('td', { class: 'state' }, s.state),
          el('td', {}, s.attempts === null ? '–' : s.attempts), el('td', {}, s.last_error || '')))));
    if (dead) {
      const b = el('button', { id: 'd-replay', type: 'button' }, 'Replay dead events');
      b.addEventListener('click', () => replay(d.id));
      parts.push(b, el('span', { id: 'd-replay-result' }));
    }
  }
  const curlText = el('pre', { id: 'd-curl-text', class: 'hidden' }, curl(d));
  const copy = el('button', { id: 'd-curl', type: 'button' }, 'Copy as curl');
  copy.addEventListener('click', async () => {
    curlText.classList.remove('hidden');
    try { await navigator.clipboard.writeText(curlText.textContent); copy.textContent = 'Copied'; } catch (_) { copy.textContent = 'Select the text below'; }
  });
  parts.push(el('div', { class: 'actions' }, copy), curlText,
    el('h3', {}, 'Headers' + (d.headers_truncated ? ' (first 16 KiB kept)' : '')), headers,
    el('h3', {}, 'Body, as received'), el('pre', { id: 'd-body-raw' }, d.body_text),
    el('h3', {}, 'Body, as JSON'), el('pre', { id: 'd-body-json' }, pretty));
  pane.replaceChildren(...parts);
  // While the spool still works on it, the state is followed.
  if (d.spool.some((s) => s.state === 'pending' || s.state === 'in_flight')) {
    clearTimeout(state.follow);
    state.follow = setTimeout(() => { if (state.selected === id) select(id); }, 1000);
  }
}

function build() {
  const f = (id, label, control) => el('label', { class: 'filter' }, label, control);
  const toolbar = el('div', { class: 'toolbar' },
    f('f-route', 'route ', el('select', { id: 'f-route' }, el('option', { value: '' }, 'all'))),
    f('f-verdict', 'verdict ', el('select', { id: 'f-verdict' }, el('option', { value: '' }, 'all'))),
    f('f-status', 'status ', el('input', { id: 'f-status', type: 'text', placeholder: '403', size: 4 })),
    f('f-q', 'search ', el('input', { id: 'f-q', type: 'search', placeholder: 'body, client, CN, reason' })),
    el('span', { id: 'count' }));
  const table = el('table', { class: 'events' },
    el('thead', {}, el('tr', {}, ...['time', 'route', 'method', 'verdict', 'status', 'latency', 'client', 'certificate', 'body'].map((h) => el('th', {}, h)))),
    el('tbody', { id: 'events' }));
  const layout = el('div', { class: 'layout' },
    el('section', { class: 'list' }, table),
    el('section', { id: 'detail', class: 'detail' }, el('p', { class: 'hint' }, 'Select a request to see what reached the gate and why it was answered so.')));
  document.querySelector('main').replaceChildren(toolbar, layout);
  for (const id of ['f-route', 'f-verdict']) document.getElementById(id).addEventListener('change', load);
  for (const id of ['f-status', 'f-q']) document.getElementById(id).addEventListener('input', reload);
}

build();
load();
live();
