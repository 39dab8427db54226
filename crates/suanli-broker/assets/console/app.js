// The operator console: polls the broker's two JSON views and draws them. Elements are built
// with the DOM API (no HTML strings, so no escaping to get wrong, and bar widths set through
// the style object, which the page's content security policy allows).
'use strict';

(() => {
  const POLL_MS = 1500;
  const TIMEOUT_MS = 5000;
  const $ = (id) => document.getElementById(id);

  const view = {
    pools: [],
    poolsText: '',
    overviewText: '',
    sortKey: 'order',
    sortDir: 1,
    filter: '',
    lastOk: 0,
    failingSince: 0,
  };

  // ---- small helpers -------------------------------------------------------------------

  function h(tag, props, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'text') el.textContent = v;
      else if (k === 'style') Object.assign(el.style, v);
      else el.setAttribute(k, v);
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid !== null && kid !== undefined) el.append(kid instanceof Node ? kid : String(kid));
    }
    return el;
  }

  function fill(id, ...kids) {
    const el = $(id);
    el.replaceChildren(...kids.flat(Infinity));
    return el;
  }

  // TFLOPS as P: whole numbers from 100P up, one decimal from 1P, two below.
  function P(tflops) {
    const p = tflops / 1000;
    const digits = p >= 100 || p === 0 ? 0 : p >= 1 ? 1 : 2;
    return p.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }

  const int = (n) => Number(n).toLocaleString('en-US');
  const ratio = (a, b) => (b > 0 ? a / b : 0);
  const pct = (a, b) => `${(ratio(a, b) * 100).toFixed(ratio(a, b) < 0.1 && a > 0 ? 1 : 0)}%`;
  const width = (f) => `${Math.max(0, Math.min(1, f)) * 100}%`;
  const words = (key) => String(key).replace(/_/g, ' ');

  function utilClass(f) {
    return f < 0.5 ? 'u0' : f < 0.75 ? 'u1' : f < 0.9 ? 'u2' : 'u3';
  }

  function bar(f, cls) {
    return h('div', { class: 'bar' }, h('i', { class: cls || utilClass(f), style: { width: width(f) } }));
  }

  // A number shown as P, with the exact TFLOPS kept for tools and tests.
  function setP(id, tflops) {
    const el = $(id);
    el.textContent = P(tflops);
    el.dataset.value = String(tflops);
  }

  function duration(ms) {
    const s = Math.round(ms / 1000);
    if (s < 60) return `${s} s`;
    const m = Math.round(s / 60);
    if (m < 60) return `${m} min`;
    const hours = Math.floor(m / 60);
    if (hours < 48) return `${hours} h ${m % 60} min`;
    return `${Math.round(hours / 24)} d`;
  }

  const clock = (ms) => new Date(ms).toLocaleTimeString('en-GB');
  const stamp = (ms) => new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');

  // ---- the summary ---------------------------------------------------------------------

  function renderSummary(o) {
    const t = o.total;
    setP('total-capacity', t.capacity_tflops);
    setP('total-allocated', t.allocated_tflops);
    setP('total-free', t.free_tflops);
    const pools = o.pools.healthy + o.pools.draining + o.pools.lost;
    $('total-devices').textContent = `${int(t.capacity_devices)} devices in ${int(pools)} pools`;
    $('total-util').textContent =
      `${pct(t.allocated_tflops, t.capacity_tflops)} · ` +
      `${int(t.allocated_devices)} of ${int(t.capacity_devices)} devices`;
    const used = ratio(t.allocated_tflops, t.capacity_tflops);
    fill('total-bar', h('i', { class: utilClass(used), style: { width: width(used) } }));
    $('total-unavailable').textContent =
      t.unavailable_devices > 0
        ? `${int(t.unavailable_devices)} devices out of service`
        : 'no device out of service';

    // The gauge: capacity and allocation against the district's marks.
    const top = Math.max(t.capacity_tflops, ...o.marks.map((m) => m.tflops)) * 1.06 || 1;
    const ticks = o.marks.map((m) => {
      const at = m.tflops / top;
      const cls = [t.capacity_tflops >= m.tflops ? 'tick reached' : 'tick', at > 0.8 ? 'end' : ''];
      return h('div', { class: cls.join(' '), style: { left: width(at) } },
        h('span', { text: `${P(m.tflops)}P ${m.label}` }));
    });
    fill('gauge',
      h('div', { class: 'track' },
        h('div', { class: 'fill cap', style: { width: width(t.capacity_tflops / top) } }),
        h('div', { class: 'fill alloc', style: { width: width(t.allocated_tflops / top) } })),
      ticks);

    const part = (name, id, u) => [
      h('b', { text: name }),
      bar(ratio(u.allocated_tflops, u.capacity_tflops), id === 'local' ? 'u1' : 'u0'),
      h('div', { class: 'fig' },
        h('span', { id: `${id}-allocated`, 'data-value': u.allocated_tflops, text: P(u.allocated_tflops) }),
        ' of ',
        h('span', { id: `${id}-capacity`, 'data-value': u.capacity_tflops, text: P(u.capacity_tflops) }),
        ` P · ${pct(u.allocated_tflops, u.capacity_tflops)} · ${pct(u.capacity_tflops, t.capacity_tflops)} of the fleet`),
    ];
    fill('local-external', h('div', { class: 'split' },
      part('Local', 'local', o.local), part('External', 'external', o.external)));

    const row = (label, value, id, colour) => [
      h('span', {}, colour ? h('span', { class: 'dot', style: { background: colour } }) : null, label),
      h('b', { id, 'data-value': value, text: int(value) }),
    ];
    const q = o.queue;
    fill('counts',
      row('Healthy pools', o.pools.healthy, 'pools-healthy', 'var(--ok)'),
      row('Draining', o.pools.draining, 'pools-draining', 'var(--warn)'),
      row('Lost', o.pools.lost, 'pools-lost', 'var(--bad)'),
      row('Live leases', o.live_leases, 'live-leases'),
      row('Queued requests', q.length, 'queue-length'),
      h('span', { class: 'muted small', style: { gridColumn: '1 / -1' } },
        q.by_priority.map((c) => `${int(c.count)} ${c.key}`).join(' · ')));
  }

  // Horizontal bars of a breakdown, largest capacity first.
  function renderBreakdown(id, parts) {
    const sorted = [...parts].sort((a, b) => b.capacity_tflops - a.capacity_tflops || a.key.localeCompare(b.key));
    fill(id, sorted.map((p) => {
      const f = ratio(p.allocated_tflops, p.capacity_tflops);
      return [
        h('span', { class: 'label', title: p.key, text: p.key }),
        h('div', { class: 'bar', 'data-key': p.key, 'data-capacity': p.capacity_tflops, 'data-allocated': p.allocated_tflops },
          h('i', { class: utilClass(f), style: { width: width(f) } })),
        h('span', { class: 'fig', text: `${P(p.allocated_tflops)} / ${P(p.capacity_tflops)} P · ${pct(p.allocated_tflops, p.capacity_tflops)}` }),
      ];
    }));
  }

  // ---- the queue and the tenants --------------------------------------------------------

  function size(r) {
    const models = r.models.length ? r.models.join('/') : 'any model';
    if (r.shape === 'gang') return `${r.nodes}×${r.devices_per_node} ${models}`;
    if (r.shape === 'elastic') return `${P(r.tflops)} P elastic, ${models}`;
    return '–';
  }

  function renderQueue(o) {
    const q = o.queue;
    $('queue-count').textContent = q.length > q.head.length
      ? `${int(q.length)} waiting · first ${int(q.head.length)} shown`
      : `${int(q.length)} waiting`;
    fill('queue-reasons', q.by_reason.map((c) =>
      h('span', { class: `badge r-${c.key}`, 'data-reason': c.key }, words(c.key), h('b', { text: int(c.count) }))));
    if (q.head.length === 0) {
      fill('queue-rows', h('tr', {}, h('td', { class: 'empty', colspan: 8, text: 'No request is waiting.' })));
      return;
    }
    const now = o.time_unix_ms;
    fill('queue-rows', q.head.map((r) => {
      const start = r.estimated_start_unix_ms;
      const eta = start === null || start === undefined
        ? h('span', { class: 'muted', text: '–' })
        : h('span', { title: stamp(start), text: start <= now ? 'due now' : `in ${duration(start - now)}` });
      return h('tr', { 'data-request': r.id },
        h('td', { class: 'num', text: r.position }),
        h('td', { text: `#${r.id}` }),
        h('td', { text: r.tenant || '–' }),
        h('td', { text: size(r), title: r.duration_ms ? `for ${duration(r.duration_ms)}` : null }),
        h('td', {}, h('span', { class: `badge p-${r.priority}`, text: r.priority })),
        h('td', {}, h('span', { class: `badge r-${r.reason}`, 'data-reason': r.reason, text: words(r.reason) })),
        h('td', { class: 'num muted', text: r.submit_time_unix_ms ? duration(Math.max(0, now - r.submit_time_unix_ms)) : '–' }),
        h('td', {}, eta));
    }));
  }

  // Jobs that ended most recently, newest first, with how they ended.
  function renderJobs(o) {
    const jobs = o.jobs || [];
    const failed = jobs.filter((j) => j.state !== 'completed').length;
    $('job-count').textContent = jobs.length ? `${int(jobs.length)} shown · ${int(failed)} failed` : '';
    if (jobs.length === 0) {
      fill('job-rows', h('tr', {}, h('td', { class: 'empty', colspan: 7, text: 'No job has ended yet.' })));
      return;
    }
    const now = o.time_unix_ms;
    fill('job-rows', jobs.map((j) => {
      const exit = j.signal !== null && j.signal !== undefined ? `signal ${j.signal}`
        : (j.exit_code !== null && j.exit_code !== undefined ? String(j.exit_code) : '–');
      return h('tr', { 'data-request': j.id, 'data-cause': j.cause },
        h('td', { text: `#${j.id}` }),
        h('td', { text: j.tenant }),
        h('td', { text: j.pools.join(', ') || '–' }),
        h('td', { title: stamp(j.ended_unix_ms), text: `${duration(Math.max(0, now - j.ended_unix_ms))} ago` }),
        h('td', {}, h('span', { class: `badge j-${j.cause}`, text: words(j.cause) })),
        h('td', { class: 'num', text: exit }),
        h('td', { class: 'muted', text: j.message || '' }));
    }));
  }

  // Each tenant's usage against its quota: its own share, then what it borrows beyond it.
  function renderTenants(o) {
    fill('tenants', o.tenants.map((t) => {
      const scale = Math.max(t.quota_tflops, t.used_tflops) || 1;
      const own = t.used_tflops - t.borrowed_tflops;
      const f = ratio(t.used_tflops, t.quota_tflops);
      return [
        h('span', { class: 'label', title: `weight ${t.weight}`, text: t.id }),
        h('div', {
          class: 'bar',
          'data-tenant': t.id,
          'data-value': t.used_tflops,
          'data-quota': t.quota_tflops,
          title: `${P(t.borrowed_tflops)} P borrowed beyond the quota`,
        },
        h('i', { class: utilClass(Math.min(f, 1)), style: { width: width(own / scale) } }),
        h('i', { class: 'borrowed', style: { left: width(own / scale), width: width(t.borrowed_tflops / scale) } }),
        t.used_tflops > t.quota_tflops ? h('span', { class: 'quota', style: { left: width(t.quota_tflops / scale) } }) : null),
        h('span', {
          class: 'fig',
          title: `${int(t.live_leases)} leases, ${int(t.queued)} queued`,
          text: `${P(t.used_tflops)} / ${P(t.quota_tflops)} P · ${pct(t.used_tflops, t.quota_tflops)}` +
            (t.queued > 0 ? ` · ${int(t.queued)} queued` : ''),
        }),
      ];
    }));
  }

  // ---- the pool table -------------------------------------------------------------------

  function poolRows(list) {
    return list.map((p, i) => ({
      ...p,
      order: i + 1,
      models: p.groups.map((g) => `${g.nodes}×${g.devices_per_node} ${g.model}`).join(', '),
      util: ratio(p.allocated_tflops, p.capacity_tflops),
    }));
  }

  function renderPools() {
    const terms = view.filter.toLowerCase().split(/\s+/).filter(Boolean);
    const shown = view.pools.filter((p) => {
      const text = `${p.id} ${p.display_name} ${p.kind} ${words(p.kind)} ${p.region} ${p.data_zone} ${p.health} ${p.models}`.toLowerCase();
      return terms.every((t) => text.includes(t));
    });
    const key = view.sortKey;
    const dir = view.sortDir;
    shown.sort((a, b) => {
      const x = a[key];
      const y = b[key];
      const c = typeof x === 'number' ? x - y : String(x).localeCompare(String(y));
      return c * dir || a.order - b.order;
    });
    $('pool-count').textContent = shown.length === view.pools.length
      ? `${int(view.pools.length)} pools`
      : `${int(shown.length)} of ${int(view.pools.length)} pools`;
    if (shown.length === 0) {
      fill('pool-rows', h('tr', {}, h('td', { class: 'empty', colspan: 11, text: 'No pool matches the filter.' })));
      return;
    }
    fill('pool-rows', shown.map((p) => h('tr', { 'data-pool': p.id },
      h('td', { class: 'num muted', text: p.order }),
      h('td', { title: p.display_name }, h('b', { text: p.id })),
      h('td', {}, h('span', { class: `badge k-${p.kind}`, text: words(p.kind) })),
      h('td', { text: p.region }),
      h('td', { class: 'num', text: `${p.rtt_ms} ms` }),
      h('td', { text: p.data_zone }),
      h('td', {
        class: 'models',
        title: p.groups.map((g) => `${g.nodes} nodes × ${g.devices_per_node} ${g.model}, ${g.interconnect}, ${(g.price_fen_per_device_hour / 100).toFixed(2)} CNY/device-hour`).join('\n'),
        text: p.models,
      }),
      h('td', {}, h('span', { class: `badge h-${p.health}`, text: p.health })),
      h('td', { class: 'num', 'data-value': p.capacity_tflops, text: P(p.capacity_tflops) }),
      h('td', { class: 'num', 'data-value': p.allocated_tflops, text: P(p.allocated_tflops) }),
      h('td', { class: 'util-col' },
        h('div', {}, bar(p.util), h('span', { text: pct(p.allocated_tflops, p.capacity_tflops) }))))));
  }

  function setUpPoolTable() {
    for (const th of document.querySelectorAll('#pools th[data-key]')) {
      th.addEventListener('click', () => {
        const key = th.dataset.key;
        if (view.sortKey === key) view.sortDir = -view.sortDir;
        else {
          view.sortKey = key;
          // Figures read best largest first, names A to Z.
          view.sortDir = ['capacity_tflops', 'allocated_tflops', 'util'].includes(key) ? -1 : 1;
        }
        for (const other of document.querySelectorAll('#pools th')) other.classList.remove('asc', 'desc');
        th.classList.add(view.sortDir > 0 ? 'asc' : 'desc');
        renderPools();
      });
    }
    $('pool-filter').addEventListener('input', (e) => {
      view.filter = e.target.value;
      renderPools();
    });
  }

  // ---- polling and the unreachable banner -----------------------------------------------

  class Refused extends Error {}

  async function get(path) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
    try {
      const r = await fetch(path, { signal: abort.signal, cache: 'no-store', credentials: 'same-origin' });
      if (r.status === 401) throw new Refused('the operator token was refused');
      if (!r.ok) throw new Error(`${path} answered HTTP ${r.status}`);
      return await r.text();
    } finally {
      clearTimeout(timer);
    }
  }

  function reachable(time) {
    view.lastOk = Date.now();
    view.failingSince = 0;
    document.body.classList.remove('stale');
    $('banner').hidden = true;
    const live = $('live');
    live.className = 'pill ok';
    live.textContent = 'live';
    $('updated').textContent = `broker time ${clock(time)}`;
  }

  function unreachable(err) {
    if (!view.failingSince) view.failingSince = Date.now();
    document.body.classList.add('stale');
    const live = $('live');
    live.className = 'pill bad';
    const banner = $('banner');
    banner.hidden = false;
    if (err instanceof Refused) {
      live.textContent = 'logged out';
      banner.replaceChildren(
        'The broker refused the operator token (it may have been restarted with new credentials). ',
        h('a', { href: './', text: 'Log in again' }), '.');
      return;
    }
    live.textContent = 'unreachable';
    const since = view.lastOk
      ? `The figures below are from ${clock(view.lastOk)}.`
      : 'No figures yet.';
    const down = Math.round((Date.now() - view.failingSince) / 1000);
    banner.textContent =
      `Broker unreachable for ${down} s (${err.message || err}). ${since} Retrying every ${POLL_MS / 1000} s.`;
  }

  async function poll() {
    try {
      const [overview, pools] = await Promise.all([get('api/overview'), get('api/pools')]);
      const o = JSON.parse(overview);
      // The overview carries the broker's clock and changes on every poll; the pool table
      // is redrawn only when a pool changed, so a selection in it survives an idle fleet.
      if (overview !== view.overviewText) {
        renderSummary(o);
        renderBreakdown('by-model', o.by_model);
        renderBreakdown('by-region', o.by_region);
        renderQueue(o);
        renderJobs(o);
        renderTenants(o);
        view.overviewText = overview;
      }
      if (pools !== view.poolsText) {
        view.pools = poolRows(JSON.parse(pools).pools);
        view.poolsText = pools;
        renderPools();
      }
      reachable(o.time_unix_ms);
      document.body.dataset.loaded = 'true';
    } catch (err) {
      unreachable(err);
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  setUpPoolTable();
  poll();
})();
