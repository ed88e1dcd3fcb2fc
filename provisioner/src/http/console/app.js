// nodekeeper's console: the fleet at a glance, a host's page, live through the event stream,
// and the operator's actions behind a confirmation. Plain JavaScript, no build step, nothing
// fetched but this server's own API with the token the user gave (kept in this tab only).
// Every value from the server goes into the page as text, never as markup.
'use strict';

const state = {
  token: sessionStorage.getItem('nk-token'),
  hosts: [], instances: [], operations: [], host: null,
  refreshTimer: null, streamAbort: null, lastEventId: null,
};

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v; else if (k.startsWith('data-')) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? '-' : String(c)));
  return e;
}

async function api(method, path, body) {
  const headers = { Authorization: 'Bearer ' + state.token, Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (!r.ok) {
    const e = new Error(data && data.error ? data.error.message : `${r.status} ${text}`);
    e.status = r.status;
    throw e;
  }
  return data;
}

function ago(rfc3339) {
  if (!rfc3339) return 'never';
  const s = Math.max(0, Math.round((Date.now() - Date.parse(rfc3339)) / 1000));
  return s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}

function show(view) {
  for (const v of ['login-view', 'fleet-view', 'host-view', 'events-view']) $('#' + v).hidden = !view.includes(v);
  $('#logout').hidden = view.includes('login-view');
}

// --- log in and out -------------------------------------------------------------------------

async function login(token) {
  state.token = token;
  try {
    await api('GET', '/api/v1/hosts');
  } catch (e) {
    state.token = null;
    sessionStorage.removeItem('nk-token');
    $('#login-error').textContent = e.status === 401 ? 'That token is not valid (or expired, or revoked).' : e.message;
    return false;
  }
  sessionStorage.setItem('nk-token', token);
  $('#who').textContent = token.split('.').slice(1, -1).join('.');
  startStream();
  route();
  return true;
}

function logout() {
  sessionStorage.removeItem('nk-token');
  state.token = null;
  if (state.streamAbort) state.streamAbort.abort();
  $('#who').textContent = '';
  show(['login-view']);
}

// --- data -----------------------------------------------------------------------------------

async function refresh() {
  if (!state.token) return;
  try {
    const [hosts, instances, operations] = await Promise.all([
      api('GET', '/api/v1/hosts'),
      api('GET', '/api/v1/instances'),
      api('GET', '/api/v1/operations?running=true&limit=200'),
    ]);
    Object.assign(state, { hosts, instances, operations });
    const m = location.hash.match(/^#\/host\/([^/]+)$/);
    if (m) state.host = await api('GET', `/api/v1/hosts/${m[1]}/details`);
    render();
  } catch (e) {
    if (e.status === 401) logout();
  }
}

function refreshSoon() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(refresh, 250);
}

// --- the event stream (fetch, so the token goes in a header, not the URL) --------------------

async function startStream() {
  if (state.streamAbort) state.streamAbort.abort();
  const abort = new AbortController();
  state.streamAbort = abort;
  while (!abort.signal.aborted && state.token) {
    try {
      const headers = { Authorization: 'Bearer ' + state.token, Accept: 'text/event-stream' };
      if (state.lastEventId) headers['Last-Event-ID'] = state.lastEventId;
      const r = await fetch('/api/v1/events/stream', { headers, signal: abort.signal });
      if (r.status === 401) { logout(); return; }
      if (!r.ok) throw new Error(String(r.status));
      $('#live').textContent = 'live';
      $('#live').className = 'live on';
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf('\n\n')) >= 0) {
          onMessage(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
      }
    } catch (_) { /* reconnect below */ }
    $('#live').textContent = 'offline';
    $('#live').className = 'live off';
    if (!abort.signal.aborted) await new Promise((ok) => setTimeout(ok, 2000));
  }
}

function onMessage(block) {
  let data = null;
  for (const line of block.split('\n')) {
    if (line.startsWith('id:')) state.lastEventId = line.slice(3).trim();
    if (line.startsWith('data:')) data = line.slice(5).trim();
  }
  if (!data) return; // a keep-alive comment
  let event;
  try { event = JSON.parse(data); } catch (_) { return; }
  const list = $('#events');
  list.prepend(el('li', {}, `${event.at}  ${event.actor}  ${event.kind}  ${event.message}`));
  while (list.children.length > 100) list.lastChild.remove();
  refreshSoon();
}

// --- rendering ------------------------------------------------------------------------------

function render() {
  const m = location.hash.match(/^#\/host\/([^/]+)$/);
  if (m) renderHost(); else renderFleet();
}

function stateCell(s) {
  return el('td', { class: `state ${s}` }, s);
}

function renderFleet() {
  show(['fleet-view', 'events-view']);
  const counts = {};
  for (const h of state.hosts) counts[h.state] = (counts[h.state] || 0) + 1;
  const summary = $('#summary');
  summary.replaceChildren(
    ...['active', 'suspect', 'fenced', 'reimaging', 'maintenance'].map((s) =>
      el('div', { class: 'card', id: `count-${s}` }, el('b', {}, counts[s] || 0), s)),
    el('div', { class: 'card' }, el('b', {}, state.instances.filter((i) => !i.deleted).length), 'instances'),
  );
  const perHost = {};
  for (const i of state.instances.filter((i) => !i.deleted)) {
    const p = (perHost[i.host] = perHost[i.host] || { all: 0, ha: 0 });
    p.all += 1;
    if (i.ha) p.ha += 1;
  }
  const opOf = {};
  for (const o of state.operations) opOf[o.target] = o;
  $('#hosts').replaceChildren(...state.hosts.map((h) => {
    const op = opOf[h.name];
    return el('tr', { 'data-host': h.name },
      el('td', {}, el('a', { href: `#/host/${encodeURIComponent(h.name)}` }, h.name)),
      stateCell(h.state),
      el('td', { class: 'heartbeat' }, ago(h.last_heartbeat)),
      el('td', {}, (perHost[h.name] || { all: 0 }).all),
      el('td', {}, (perHost[h.name] || { ha: 0 }).ha),
      el('td', { class: 'operation' }, op ? `${op.kind} #${op.id}: ${op.step}` : '-'));
  }));
  $('#operations').replaceChildren(...state.operations.map((o) => el('tr', { 'data-operation': o.id },
    el('td', {}, o.id), el('td', {}, o.kind),
    el('td', {}, el('a', { href: `#/host/${encodeURIComponent(o.target)}` }, o.target)),
    el('td', { class: 'step' }, o.step), el('td', {}, o.attempts), el('td', {}, o.last_error))));
}

async function renderHost() {
  show(['host-view', 'events-view']);
  const d = state.host;
  if (!d) return;
  const h = d.host;
  $('#host-name').textContent = h.name;
  $('#host-state').textContent = h.state;
  $('#host-state').className = `state ${h.state}`;
  const fields = [
    ['MAC', h.mac], ['IP', h.ip], ['BMC', h.bmc_url], ['image', h.image],
    ['boot', d.boot ? `${d.boot.boot_path}${d.boot.boot_mode ? ', ' + d.boot.boot_mode : ''}` : null],
    ['last heartbeat', ago(h.last_heartbeat)],
    ['instances', `${d.instances.total} (${d.instances.ha} HA)`],
  ];
  $('#host-fields').replaceChildren(...fields.flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
  const [ops, instances] = await Promise.all([
    api('GET', `/api/v1/operations?host=${encodeURIComponent(h.name)}&limit=20`),
    api('GET', `/api/v1/instances?host=${encodeURIComponent(h.name)}`),
  ]);
  $('#host-operations').replaceChildren(...ops.map((o) => el('tr', { 'data-operation': o.id },
    el('td', {}, o.id), el('td', {}, o.kind), el('td', { class: 'status' }, o.status), el('td', { class: 'step' }, o.step),
    el('td', {}, o.attempts), el('td', {}, ago(o.updated_at)), el('td', {}, o.last_error))));
  $('#host-instances').replaceChildren(...instances.filter((i) => !i.deleted).map((i) => el('tr', {},
    el('td', {}, i.name), el('td', {}, i.uuid), el('td', {}, i.generation), el('td', {}, i.ha ? 'yes' : 'no'),
    el('td', {}, i.storage), el('td', {}, i.held ? 'held' : ''))));
}

// --- actions --------------------------------------------------------------------------------

const ACTIONS = {
  'power-on': ['power on', (n) => api('POST', `/api/v1/hosts/${n}/power`, { action: 'on' })],
  'power-off': ['power off (hard)', (n) => api('POST', `/api/v1/hosts/${n}/power`, { action: 'off' })],
  'power-cycle': ['power cycle', (n) => api('POST', `/api/v1/hosts/${n}/power`, { action: 'cycle' })],
  reimage: ['reimage (its disk is overwritten)', (n) => api('POST', `/api/v1/hosts/${n}/reimage`, {})],
  drain: ['drain (its HA instances move, then it is in maintenance)', (n) => api('POST', `/api/v1/hosts/${n}/drain`, {})],
  'maintenance-on': ['put in maintenance', (n) => api('POST', `/api/v1/hosts/${n}/maintenance`, { state: 'on' })],
  'maintenance-off': ['take out of maintenance', (n) => api('POST', `/api/v1/hosts/${n}/maintenance`, { state: 'off' })],
  'mark-fenced': ['mark as powered off (its HA instances move: be sure it is off)', (n) => api('POST', `/api/v1/hosts/${n}/mark-fenced`)],
  cancel: ['cancel the operation that runs on', async (n) => {
    const running = await api('GET', `/api/v1/operations?host=${n}&running=true&limit=1`);
    if (!running.length) throw new Error('no operation runs on this host');
    return api('POST', `/api/v1/operations/${running[0].id}/cancel`);
  }],
};

function confirmThen(text) {
  return new Promise((resolve) => {
    $('#confirm-text').textContent = text;
    $('#confirm').hidden = false;
    const done = (answer) => () => { $('#confirm').hidden = true; resolve(answer); };
    $('#confirm-yes').onclick = done(true);
    $('#confirm-no').onclick = done(false);
  });
}

async function act(action) {
  const host = state.host && state.host.host.name;
  if (!host || !ACTIONS[action]) return;
  const [what, call] = ACTIONS[action];
  if (!(await confirmThen(`Really ${what}: ${host}?`))) return;
  $('#action-result').className = '';
  $('#action-result').textContent = `${what}: ${host}…`;
  try {
    const answer = await call(encodeURIComponent(host));
    const op = answer && answer.operation;
    $('#action-result').textContent = op ? `${what}: operation ${op.id} (${op.kind}), step ${op.step}` : `${what}: done`;
  } catch (e) {
    $('#action-result').className = 'error';
    $('#action-result').textContent = e.message;
  }
  refreshSoon();
}

// --- wiring ---------------------------------------------------------------------------------

function route() {
  if (!state.token) { show(['login-view']); return; }
  state.host = null;
  refresh();
}

window.addEventListener('hashchange', route);
document.addEventListener('DOMContentLoaded', () => {
  $('#login').addEventListener('submit', (e) => { e.preventDefault(); login($('#token').value.trim()); });
  $('#logout').addEventListener('click', logout);
  for (const b of document.querySelectorAll('#actions button')) b.addEventListener('click', () => act(b.dataset.action));
  // Heartbeats make no events: the ages are refreshed every 5 s besides.
  setInterval(() => { if (state.token) refresh(); }, 5000);
  if (state.token) login(state.token); else show(['login-view']);
});
