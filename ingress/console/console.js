/* llm-broker operator console.
 * Vanilla ES2020, no build step, no dependency. Written for a strict CSP: no inline script or
 * style, no HTML parsed from strings (server data is untrusted text: it only ever reaches the page as textContent
 * or as an attribute value). Sections: dom, api, format, ui, polling, charts, pages, router.
 */
(() => {
  'use strict';

  // ================================================================ dom
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const THEME_KEY = 'llm-broker.console.theme';
  const $ = (sel, root = document) => root.querySelector(sel);

  function append(node, kids) {
    for (const k of kids.flat(Infinity)) {
      if (k == null || k === false) continue;
      node.append(k instanceof Node ? k : String(k));
    }
    return node;
  }

  // el('a', {class, text, data: {x: 1}, on: {click: fn}, href: ...}, ...children)
  function el(tag, props, ...kids) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v == null || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = String(v);
      else if (k === 'data') Object.entries(v).forEach(([dk, dv]) => { if (dv != null) node.dataset[dk] = String(dv); });
      else if (k === 'on') Object.entries(v).forEach(([ev, fn]) => node.addEventListener(ev, fn));
      else if (k === 'value' || k === 'disabled' || k === 'selected' || k === 'checked') node[k] = v;
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    return append(node, kids);
  }

  function svg(tag, attrs, ...kids) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v != null) node.setAttribute(k, String(v));
    return append(node, kids);
  }

  const range = (n) => Array.from({ length: Math.max(0, n | 0) }, (_, i) => i);
  const enc = encodeURIComponent;

  // ================================================================ api
  const session = { user: '', csrf: '', expires_at: 0, show_prompts: false, version: '' };
  let leaving = false;

  class ApiError extends Error {
    constructor(message, status, type, code) {
      super(message);
      this.status = status;
      this.type = type || '';
      this.code = code || '';
    }
  }

  function toLogin() {
    if (leaving) return;
    leaving = true;
    if (current) stopPage(current);
    location.assign('/admin/login');
  }

  async function api(path, method = 'GET', body) {
    const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
    if (method !== 'GET') {
      init.headers['X-CSRF-Token'] = session.csrf;
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body === undefined ? {} : body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      throw new ApiError('the server cannot be reached (' + (e && e.message ? e.message : 'network error') + ')', 0, 'network');
    }
    if (res.status === 401) {
      toLogin();
      throw new ApiError('the session has ended', 401, 'authentication');
    }
    const text = await res.text().catch(() => '');
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!res.ok) {
      const err = data && typeof data === 'object' ? data.error : null;
      const msg = err && typeof err === 'object' ? err.message || err.type : typeof err === 'string' ? err : '';
      throw new ApiError(msg || `HTTP ${res.status} ${res.statusText || ''}`.trim(), res.status, err && err.type, err && err.code);
    }
    if (data === null || typeof data !== 'object') throw new ApiError('the server answered something that is not a JSON object', res.status, 'format');
    return data;
  }

  const errText = (e) => (e && e.message) || String(e);

  // ================================================================ format
  const NF = new Intl.NumberFormat('en-US');
  const nowS = () => Date.now() / 1000;
  const isNum = (n) => typeof n === 'number' && isFinite(n);
  const num = (n) => (isNum(n) ? NF.format(n) : '–');
  const fixed = (n, d) => (isNum(n) ? n.toLocaleString('en-US', { minimumFractionDigits: d, maximumFractionDigits: d }) : '–');
  const pct = (f) => (isNum(f) ? Math.round(f * 100) + ' %' : '–');

  function compact(n) {
    if (!isNum(n)) return '–';
    const a = Math.abs(n);
    const cut = (v, u) => (v >= 100 ? Math.round(v) : +v.toFixed(1)) + u;
    if (a >= 1e9) return cut(n / 1e9, 'G');
    if (a >= 1e6) return cut(n / 1e6, 'M');
    if (a >= 1e4) return cut(n / 1e3, 'k');
    return Number.isInteger(n) ? NF.format(n) : fixed(n, a < 1 ? 2 : 1);
  }

  function usd(n) {
    if (!isNum(n)) return '–';
    const a = Math.abs(n);
    if (a === 0) return '$0.00';
    if (a < 0.01) return (n < 0 ? '-$' : '$') + a.toPrecision(2);
    return (n < 0 ? '-$' : '$') + fixed(a, 2);
  }

  function bytes(b) {
    if (!isNum(b)) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let v = b, i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? String(Math.round(v)) : v.toFixed(v < 10 ? 1 : 0)) + ' ' + units[i];
  }

  // 0.41 -> "410 ms", 12 -> "12 s", 185 -> "3 min 5 s", 7500 -> "2 h 5 min"
  function duration(s, coarse = false) {
    if (!isNum(s)) return '–';
    s = Math.max(0, s);
    if (s < 1) return coarse ? '0 s' : Math.round(s * 1000) + ' ms';
    if (s < 10 && !coarse) return s.toFixed(1).replace(/\.0$/, '') + ' s';
    if (s < 60) return Math.floor(s) + ' s';
    if (s < 3600) {
      const m = Math.floor(s / 60), r = Math.floor(s % 60);
      return r && m < 10 && !coarse ? `${m} min ${r} s` : `${m} min`;
    }
    if (s < 86400) {
      const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
      return m ? `${h} h ${m} min` : `${h} h`;
    }
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
    return h ? `${d} d ${h} h` : `${d} d`;
  }

  function ago(ts, now = nowS()) {
    if (!isNum(ts) || ts <= 0) return '–';
    const d = now - ts;
    if (Math.abs(d) < 1) return 'just now';
    return d > 0 ? duration(d, true) + ' ago' : 'in ' + duration(-d, true);
  }

  const iso = (ts) => new Date(ts * 1000).toISOString();
  const utc = (ts) => (isNum(ts) && ts > 0 ? iso(ts).replace('T', ' ').replace(/\.\d+Z$/, ' UTC') : '');
  const two = (n) => String(n).padStart(2, '0');
  const hhmm = (ts) => { const d = new Date(ts * 1000); return `${two(d.getHours())}:${two(d.getMinutes())}`; };
  const clock = (d = new Date()) => `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
  const utcDay = (ts) => iso(ts).slice(0, 10);
  // the last 14 UTC days, today included: start (unix s, 13 days ago), from and to (YYYY-MM-DD)
  const last14 = () => { const end = nowS(), start = end - 13 * 86400; return { start, from: utcDay(start), to: utcDay(end) }; };

  // a relative time with the exact UTC time as tooltip
  const when = (ts, now) => (isNum(ts) && ts > 0 ? el('time', { datetime: iso(ts), title: utc(ts), text: ago(ts, now) }) : el('span', { class: 'muted', text: '–' }));

  // ================================================================ ui
  const TONES = {
    completed: 'ok', closed: 'ok', active: 'ok', delivered: 'ok', ok: 'ok', succeeded: 'ok',
    running: 'info', in_progress: 'info', validating: 'info', finalizing: 'info', interactive: 'info',
    queued: 'muted', pending: 'muted', cancelled: 'muted', canceled: 'muted', ended: 'muted',
    half_open: 'warn', expired: 'warn', cancelling: 'warn', retrying: 'warn',
    failed: 'bad', open: 'bad', revoked: 'bad', dead_lettered: 'bad', down: 'bad', error: 'bad',
  };
  const tone = (status) => TONES[String(status).toLowerCase()] || 'muted';
  const pill = (text, t) => el('span', { class: 'pill tone-' + (t || tone(text)), data: { status: text }, text: String(text).replace(/_/g, ' ') });
  const httpPill = (code) => (isNum(code) && code ? el('span', { class: 'pill tone-' + (code < 300 ? 'ok' : code < 500 ? 'warn' : 'bad'), text: String(code) }) : el('span', { class: 'muted', text: '–' }));
  const mono = (text, cls) => el('span', { class: 'mono' + (cls ? ' ' + cls : ''), text: text == null ? '–' : String(text) });

  // a progress bar from parts [{frac, tone}]
  function bar(parts, title) {
    const b = el('div', { class: 'bar', title: title || null, role: 'img', 'aria-label': title || null });
    for (const p of parts) {
      const seg = el('span', { class: 'tone-' + (p.tone || 'info') });
      seg.style.width = Math.max(0, Math.min(100, (p.frac || 0) * 100)).toFixed(2) + '%';
      b.append(seg);
    }
    return b;
  }

  function stat(label, value, t, href, unit) {
    const v = el(href ? 'a' : 'span', { class: 'stat-value' + (t ? ' tone-' + t : ''), href: href || null }, value, unit ? el('small', { text: ' ' + unit }) : null);
    return el('div', { class: 'stat', data: { stat: label.replace(/\s+/g, '-') } }, v, el('span', { class: 'stat-label', text: label }));
  }

  // cols: [label | {label, cls}]; rows: <tr> elements
  function table(cols, rows, emptyText, cls) {
    const head = el('tr', null, cols.map((c) => el('th', { scope: 'col', class: c.cls || null, text: c.label === undefined ? c : c.label })));
    const body = el('tbody', null, rows.length ? rows : el('tr', { class: 'empty' }, el('td', { colspan: cols.length, text: emptyText || 'nothing here' })));
    return el('div', { class: 'table-wrap' }, el('table', { class: 'table' + (cls ? ' ' + cls : '') }, el('thead', null, head), body));
  }

  const td = (content, cls) => el('td', { class: cls || null }, content);
  const card = (title, attrs, ...kids) => el('section', Object.assign({ class: 'card' }, attrs), title ? el('div', { class: 'card-head' }, el('h2', { text: title })) : null, kids);
  const kv = (pairs) => el('dl', { class: 'kv' }, pairs.filter(Boolean).map(([k, v]) => el('div', null, el('dt', { text: k }), el('dd', null, v == null || v === '' ? el('span', { class: 'muted', text: '–' }) : v))));

  let toastTimer = 0;
  function toast(content, kind = 'ok', ms = 6000) {
    const t = $('#toast');
    t.replaceChildren();
    append(t, [content]);
    t.className = 'toast ' + kind;
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, ms);
  }

  // asks in <dialog id="confirm">; resolves true on #confirm-ok
  function ask(text, okLabel = 'Confirm', danger = false) {
    const dlg = $('#confirm'), ok = $('#confirm-ok'), cancel = $('#confirm-cancel');
    if (dlg.open) return Promise.resolve(false);
    $('#confirm-text').textContent = text;
    ok.textContent = okLabel;
    ok.classList.toggle('danger', danger);
    ok.classList.toggle('primary', !danger);
    return new Promise((resolve) => {
      const done = (v) => {
        ok.removeEventListener('click', onOk);
        cancel.removeEventListener('click', onCancel);
        dlg.removeEventListener('close', onCancel);
        if (dlg.open) dlg.close();
        resolve(v);
      };
      const onOk = () => done(true), onCancel = () => done(false);
      ok.addEventListener('click', onOk);
      cancel.addEventListener('click', onCancel);
      dlg.addEventListener('close', onCancel);
      dlg.showModal();
      cancel.focus();
    });
  }

  // a new key's secret, shown once in <dialog id="secret">
  function showSecret(key) {
    const dlg = $('#secret');
    $('#secret-title').textContent = `New secret for ${key.id || 'the key'}${key.name ? ' (' + key.name + ')' : ''}`;
    $('#secret-value').value = key.key || '';
    $('#secret-copy').textContent = 'Copy';
    if (!dlg.open) dlg.showModal();
    $('#secret-value').select();
  }

  async function copySecret() {
    const input = $('#secret-value'), btn = $('#secret-copy');
    let done = false;
    try {
      await navigator.clipboard.writeText(input.value);
      done = true;
    } catch (_) {
      input.select();
      try { done = document.execCommand('copy'); } catch (e2) { done = false; }
    }
    btn.textContent = done ? 'Copied' : 'Select and copy by hand';
  }

  // runs an action's promise, reports failures in the toast (no unhandled rejection)
  const guard = (fn) => (ev) => { Promise.resolve().then(() => fn(ev)).catch((e) => { if (!leaving) toast('Failed: ' + errText(e), 'error', 9000); }); };

  // ================================================================ polling
  let current = null; // the shown page's context

  function live(ok, err) {
    const box = $('#live'), text = $('#updated');
    if (!box) return;
    if (ok) {
      box.className = 'live ok';
      box.dataset.updated = String(Date.now());
      text.textContent = 'updated ' + clock();
      box.title = 'live: refreshes while this tab is visible';
    } else {
      box.className = 'live stale';
      const last = box.dataset.updated ? ' · last ' + clock(new Date(+box.dataset.updated)) : '';
      text.textContent = 'stale' + last;
      box.title = err ? errText(err) : 'stale';
    }
  }

  function showErrors(ctx) {
    const msgs = [...ctx.errors.values()];
    ctx.alert.hidden = !msgs.length;
    ctx.alert.replaceChildren(...msgs.map((m) => el('div', { text: m })));
  }

  function markSettled(ctx, p) {
    if (p.settled) return;
    p.settled = true;
    if (--ctx.waiting <= 0 && ctx.alive) $('#page').dataset.loaded = '1';
  }

  // polls fn every everyMs (0: only when run() is called) while the page is shown and the tab visible;
  // never two runs of one poller at once (a run asked for meanwhile follows the current one)
  function poll(ctx, label, everyMs, fn, initial = true) {
    const p = { busy: false, again: false, timer: 0, everyMs, settled: !initial };
    const schedule = () => {
      clearTimeout(p.timer);
      p.timer = ctx.alive && !document.hidden && p.everyMs ? setTimeout(p.run, p.everyMs) : 0;
    };
    p.run = async () => {
      clearTimeout(p.timer);
      if (!ctx.alive || leaving) return;
      if (p.busy) { p.again = true; return; }
      if (document.hidden) return;
      p.busy = true;
      try {
        await fn(p);
        if (!ctx.alive) return;
        ctx.errors.delete(label);
        live(true);
      } catch (e) {
        if (!ctx.alive || leaving) return;
        ctx.errors.set(label, `${label}: ${errText(e)}`);
        live(false, e);
      } finally {
        p.busy = false;
        if (ctx.alive && !leaving) {
          showErrors(ctx);
          markSettled(ctx, p);
          if (p.again) { p.again = false; p.run(); } else schedule();
        }
      }
    };
    p.stop = () => { clearTimeout(p.timer); p.timer = 0; };
    if (initial) ctx.waiting++;
    ctx.pollers.push(p);
    if (initial) queueMicrotask(p.run);
    return p;
  }

  function stopPage(ctx) {
    ctx.alive = false;
    ctx.pollers.forEach((p) => p.stop());
  }

  document.addEventListener('visibilitychange', () => {
    if (!current) return;
    if (document.hidden) current.pollers.forEach((p) => p.stop());
    else current.pollers.forEach((p) => { if (p.everyMs || !p.settled) p.run(); });
  });

  // ================================================================ charts
  const colors = new Map();
  const colorFor = (ns, name) => {
    const k = ns + ':' + name;
    if (!colors.has(k)) colors.set(k, [...colors.keys()].filter((x) => x.startsWith(ns + ':')).length);
    return colors.get(k) % 8;
  };

  function niceStep(max, ticks) {
    const raw = max / ticks, p = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / p;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
  }

  function chartBox(ctx, name, title, sub) {
    const box = { name, data: null, draw: null };
    box.svg = svg('svg', { class: 'chart', 'data-chart': name, role: 'img', 'aria-label': title });
    box.tip = el('div', { class: 'chart-tip', hidden: true });
    box.legend = el('ul', { class: 'legend' });
    box.sub = el('span', { class: 'card-sub', text: sub || '' });
    box.wrap = el('div', { class: 'chart-wrap' }, box.svg, box.tip);
    box.card = el('section', { class: 'card chart-card', data: { card: name } },
      el('div', { class: 'card-head' }, el('h2', { text: title }), box.sub), box.wrap, box.legend);
    box.svg.addEventListener('pointermove', (e) => hover(box, e));
    box.svg.addEventListener('pointerleave', () => { box.tip.hidden = true; if (box.guide) box.guide.setAttribute('visibility', 'hidden'); });
    ctx.charts.push(box);
    return box;
  }

  const chartWidth = (box) => Math.max(280, Math.round(box.wrap.clientWidth || 560));

  function noData(box, W, H, text) {
    box.svg.append(svg('text', { class: 'nodata', x: W / 2, y: H / 2, 'text-anchor': 'middle' }, text || 'no data'));
  }

  function fillLegend(box, series) {
    box.legend.replaceChildren(...series.map((s) => el('li', { data: { series: s.name }, title: s.label != null && s.label !== s.name && s.name ? s.name : null },
      el('span', { class: 'swatch c' + s.color }), s.label != null ? s.label : s.name)));
  }

  function clearChart(box, sub) {
    box.data = null;
    box.geom = null;
    box.draw = null;
    box.svg.replaceChildren();
    box.legend.replaceChildren();
    box.tip.hidden = true;
    if (sub != null) box.sub.textContent = sub;
  }

  // d: {labels, tips, keys (ints to align x labels on), series: [{name, label?, color, values}], fmt, dots,
  //     integer (counts: no tick between whole numbers), empty (the text shown without data)}
  function drawLine(box, d) {
    box.data = d;
    box.draw = () => drawLine(box, d);
    const W = chartWidth(box), H = W < 480 ? 190 : 230, pad = { l: 48, r: 14, t: 12, b: 26 };
    const n = d.labels.length, iw = W - pad.l - pad.r, ih = H - pad.t - pad.b;
    const s = box.svg;
    s.replaceChildren();
    s.setAttribute('viewBox', `0 0 ${W} ${H}`);
    fillLegend(box, d.series);
    if (!n || !d.series.length) { box.geom = null; return noData(box, W, H, d.empty); }
    const max = Math.max(0, ...d.series.flatMap((x) => x.values.filter(isNum)));
    const step = Math.max(d.integer ? 1 : 0, niceStep(max > 0 ? max : 1, 4)), top = Math.max(step, Math.ceil(max / step) * step);
    const x = (i) => pad.l + (n === 1 ? iw / 2 : (i * iw) / (n - 1));
    const y = (v) => pad.t + ih - ((isNum(v) ? v : 0) / top) * ih;
    const grid = svg('g', { class: 'grid' }), axis = svg('g', { class: 'axis' });
    for (let k = 0; k * step <= top + step / 1e6; k++) {
      const yy = y(k * step).toFixed(1);
      grid.append(svg('line', { x1: pad.l, x2: W - pad.r, y1: yy, y2: yy }));
      axis.append(svg('text', { x: pad.l - 8, y: +yy + 4, 'text-anchor': 'end' }, d.fmt(k * step)));
    }
    const most = Math.max(2, Math.floor(iw / (d.labelW || 58)));
    const every = [1, 2, 3, 5, 7, 10, 15, 30, 60, 120, 240].find((e) => n / e <= most) || Math.ceil(n / most);
    range(n).forEach((i) => {
      if ((d.keys ? d.keys[i] : i) % every !== 0) return;
      axis.append(svg('text', { x: x(i).toFixed(1), y: H - 8, 'text-anchor': 'middle' }, d.labels[i]));
      grid.append(svg('line', { class: 'tick', x1: x(i).toFixed(1), x2: x(i).toFixed(1), y1: pad.t + ih, y2: pad.t + ih + 4 }));
    });
    axis.append(svg('line', { class: 'base', x1: pad.l, x2: W - pad.r, y1: pad.t + ih, y2: pad.t + ih }));
    const lines = svg('g', { class: 'lines' });
    for (const sr of d.series) {
      const path = sr.values.map((v, i) => `${i ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join('');
      lines.append(svg('path', { class: 'series c' + sr.color, 'data-series': sr.name, d: path }));
      if (d.dots) sr.values.forEach((v, i) => lines.append(svg('circle', { class: 'dot c' + sr.color, cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 2.5 })));
    }
    box.guide = svg('line', { class: 'guide', x1: 0, x2: 0, y1: pad.t, y2: pad.t + ih, visibility: 'hidden' });
    s.append(grid, axis, box.guide, lines);
    box.geom = { W, pad, iw, n, x };
  }

  function hover(box, e) {
    const d = box.data, g = box.geom;
    if (!d || !g) return;
    const r = box.svg.getBoundingClientRect();
    if (!r.width) return;
    const gx = ((e.clientX - r.left) * g.W) / r.width;
    const i = Math.max(0, Math.min(g.n - 1, Math.round(((gx - g.pad.l) / g.iw) * Math.max(1, g.n - 1))));
    box.guide.setAttribute('x1', g.x(i).toFixed(1));
    box.guide.setAttribute('x2', g.x(i).toFixed(1));
    box.guide.setAttribute('visibility', 'visible');
    const rows = d.series.slice().sort((a, b) => (b.values[i] || 0) - (a.values[i] || 0)).slice(0, 10);
    box.tip.replaceChildren(el('div', { class: 'tip-title', text: d.tips[i] }),
      ...rows.map((sr) => el('div', { class: 'tip-row' }, el('span', { class: 'swatch c' + sr.color }), el('span', { text: sr.label != null ? sr.label : sr.name }), el('b', { text: d.fmt(sr.values[i] || 0, true) }))));
    box.tip.hidden = false;
    const px = (g.x(i) * r.width) / g.W, tw = box.tip.offsetWidth;
    box.tip.style.left = Math.max(0, px + 14 + tw > r.width ? px - 14 - tw : px + 14) + 'px';
    box.tip.style.top = '8px';
  }

  // horizontal bars; rows: [{label, value}]
  function drawBars(box, rows, fmt, attr) {
    box.data = null;
    box.geom = null;
    box.draw = () => drawBars(box, rows, fmt, attr);
    const W = chartWidth(box), rowH = 26, labelW = Math.min(170, Math.round(W * 0.36)), valueW = 64;
    const H = Math.max(80, rows.length * rowH + 12);
    const s = box.svg;
    s.replaceChildren();
    s.setAttribute('viewBox', `0 0 ${W} ${H}`);
    box.legend.replaceChildren();
    if (!rows.length) return noData(box, W, H);
    const max = Math.max(1, ...rows.map((r) => r.value)), bw = W - labelW - valueW - 8;
    const chars = Math.max(6, Math.floor(labelW / 7.2));
    rows.forEach((r, i) => {
      const y = 6 + i * rowH, w = Math.max(2, (r.value / max) * bw);
      const label = r.label.length > chars ? r.label.slice(0, chars - 1) + '…' : r.label;
      s.append(svg('g', { class: 'bar', [attr]: r.label },
        svg('title', null, `${r.label}: ${fmt(r.value)}`),
        svg('text', { class: 'label', x: labelW - 8, y: y + rowH / 2 + 4, 'text-anchor': 'end' }, label),
        svg('rect', { class: 'c' + (i % 8), x: labelW, y: y + 4, width: w.toFixed(1), height: rowH - 9, rx: 3 }),
        svg('text', { class: 'value', x: labelW + w + 6, y: y + rowH / 2 + 4 }, fmt(r.value))));
    });
  }

  let resizeTimer = 0;
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (current) current.charts.forEach((b) => b.draw && b.draw()); }, 150);
  });

  // ================================================================ pages
  // ---------------------------------------------------------------- overview
  function providerCard(p) {
    const classes = Array.isArray(p.classes) ? p.classes : [];
    const used = p.slots ? (p.slots - (p.free_slots || 0)) / p.slots : 0;
    const dead = stat('dead letters', num(p.dead_letters), p.dead_letters > 0 ? 'bad' : '', '#/dead-letters');
    dead.firstChild.addEventListener('click', () => { dlq.provider = p.name; });
    return el('article', { class: 'card provider', data: { provider: p.name } },
      el('div', { class: 'card-head' }, el('h3', { text: p.name }),
        p.workers ? pill(`${p.workers} worker${p.workers === 1 ? '' : 's'}`, 'ok') : pill('no worker', 'bad')),
      el('div', { class: 'stats' },
        stat('queued', num(p.queued), p.queued > 0 ? 'info' : ''),
        stat('in flight', num(p.in_flight)),
        dead),
      el('div', { class: 'slots' },
        el('div', { class: 'slots-text' }, el('span', { text: 'slots' }), el('b', { text: `${num(p.free_slots)} free of ${num(p.slots)}` })),
        bar([{ frac: used, tone: used > 0.9 ? 'bad' : used > 0.7 ? 'warn' : 'info' }], `${pct(used)} of the slots in use`)),
      el('table', { class: 'mini' },
        el('thead', null, el('tr', null, el('th', { text: 'class' }), el('th', { class: 'num', text: 'queued' }), el('th', { class: 'num', text: 'oldest wait' }))),
        el('tbody', null, classes.length ? classes.map((c) => el('tr', { data: { priority: c.priority } },
          td(c.priority), td(num(c.queued), 'num'),
          td(el('span', { class: c.oldest_wait_s > 30 ? 'tone-warn' : '', text: c.queued ? duration(c.oldest_wait_s) : '–' }), 'num')))
          : el('tr', null, el('td', { colspan: 3, class: 'muted', text: 'no class' })))));
  }

  function redisCard(r) {
    r = r || {};
    const mem = r.used_memory_human || (isNum(r.used_memory) ? bytes(r.used_memory) : '');
    return [el('div', { class: 'card-head' }, el('h2', { text: 'Redis' }), pill(r.ok ? 'ok' : 'down', r.ok ? 'ok' : 'bad')),
      r.ok ? null : el('p', { class: 'error', text: r.error ? String(r.error.message || r.error) : 'Redis does not answer' }),
      el('div', { class: 'stats' },
        stat('latency', isNum(r.latency_ms) ? fixed(r.latency_ms, r.latency_ms < 10 ? 2 : 0) : '–', r.latency_ms > 20 ? 'warn' : '', null, isNum(r.latency_ms) ? 'ms' : ''),
        stat('ops / s', num(r.ops_per_sec)),
        stat('clients', num(r.connected_clients))),
      kv([['memory', r.maxmemory ? `${mem} of ${bytes(r.maxmemory)}` : mem ? `${mem} (no limit)` : ''],
        ['version', r.version], ['uptime', isNum(r.uptime_s) ? duration(r.uptime_s, true) : '']])];
  }

  function pageOverview(ctx, root) {
    const cards = el('div', { class: 'grid providers', data: { section: 'providers' } });
    const thr = chartBox(ctx, 'throughput', 'Throughput', 'completed per minute');
    const errs = chartBox(ctx, 'errors', 'Errors', 'failed + dead-lettered + expired per minute');
    const circuits = el('div');
    const redis = el('section', { class: 'card redis', data: { section: 'redis' } });
    root.append(cards, el('div', { class: 'grid two' }, thr.card, errs.card),
      el('div', { class: 'grid two-one' }, card('Circuits', { data: { section: 'circuits' } }, circuits), redis));

    poll(ctx, 'overview', 5000, async () => {
      const d = await api('/admin/api/overview');
      const providers = Array.isArray(d.providers) ? d.providers : [];
      providers.forEach((p) => colorFor('p', p.name));
      cards.replaceChildren(...(providers.length ? providers.map(providerCard) : [el('div', { class: 'card empty-state', text: 'no provider configured' })]));
      const order = { open: 0, half_open: 1, closed: 2 };
      const circ = (Array.isArray(d.circuits) ? d.circuits : []).slice().sort((a, b) => (order[a.state] ?? 3) - (order[b.state] ?? 3) || String(a.deployment).localeCompare(b.deployment));
      circuits.replaceChildren(table(['deployment', 'provider', 'state', { label: 'open in', cls: 'num' }],
        circ.map((c) => el('tr', { data: { deployment: c.deployment, state: c.state } },
          td(mono(c.deployment)), td(c.provider), td(pill(c.state)),
          td(el('span', { class: c.open_in ? 'tone-bad' : 'muted', title: 'workers that see this circuit not closed', text: `${num(c.open_in)} / ${num(c.workers)}` }), 'num'))),
        'no circuit reported'));
      redis.replaceChildren(...redisCard(d.redis).filter(Boolean));
    });

    poll(ctx, 'series', 30000, async () => {
      const s = await api('/admin/api/series');
      const n = s.points || 0, stepS = s.step_s || 60;
      const times = range(n).map((i) => s.start + i * stepS);
      const provs = s.providers || {}, names = Object.keys(provs).sort();
      const vals = (a) => range(n).map((i) => (Array.isArray(a) && isNum(a[i]) ? a[i] : 0));
      const base = { labels: times.map(hhmm), tips: times.map((t) => `${hhmm(t)}–${hhmm(t + stepS)}`), keys: times.map((t) => Math.round(t / 60)), fmt: compact };
      const tp = names.map((p) => ({ name: p, color: colorFor('p', p), values: vals(provs[p].completed) }));
      const er = names.map((p) => {
        const [f, dl, ex] = [vals(provs[p].failed), vals(provs[p].dead_lettered), vals(provs[p].expired)];
        return { name: p, color: colorFor('p', p), values: range(n).map((i) => f[i] + dl[i] + ex[i]) };
      });
      const sum = (ss) => ss.reduce((a, x) => a + x.values.reduce((b, v) => b + v, 0), 0);
      drawLine(thr, { ...base, series: tp });
      drawLine(errs, { ...base, series: er });
      thr.sub.textContent = `${num(sum(tp))} completed in the last ${duration(n * stepS, true)}`;
      errs.sub.textContent = `${num(sum(er))} failed, dead-lettered or expired`;
    });
  }

  // ---------------------------------------------------------------- workers
  function pageWorkers(ctx, root) {
    const head = el('div', { class: 'stats wide' });
    const list = el('div');
    root.append(card(null, { class: 'card' }, head), list);
    poll(ctx, 'workers', 5000, async () => {
      const d = await api('/admin/api/workers');
      const ws = Array.isArray(d.workers) ? d.workers : [], ttl = d.ttl_s || 15, now = typeof d.now === 'number' ? d.now : nowS();
      let slots = 0, held = 0;
      ws.forEach((w) => (w.providers || []).forEach((p) => { slots += p.slots || 0; held += p.held || 0; }));
      head.replaceChildren(stat('live workers', num(ws.length), ws.length ? 'ok' : 'bad'), stat('slots', num(slots)),
        stat('held', num(held), held ? 'info' : ''), stat('heartbeat ttl', duration(ttl)));
      list.replaceChildren(table(['worker', 'host / pid', 'providers', 'version', 'uptime', 'last heartbeat'],
        ws.map((w) => {
          const age = now - (w.beat_at || 0);
          return el('tr', { data: { worker: w.id } }, td(mono(w.id)), td([w.host, el('span', { class: 'muted', text: ' · pid ' + w.pid })]),
            td(el('div', { class: 'slot-list' }, (w.providers || []).map((p) => el('div', { class: 'slot-row', data: { provider: p.name } },
              el('span', { class: 'slot-name', text: p.name }),
              bar([{ frac: p.slots ? p.held / p.slots : 0, tone: 'info' }], `${p.held} of ${p.slots} slots held, ${p.free} free`),
              el('span', { class: 'muted small', text: `${num(p.held)} / ${num(p.slots)}` }))))),
            td(w.version), td(el('span', { title: 'started ' + utc(w.started_at), text: duration(now - w.started_at, true) })),
            td(el('span', { class: age > ttl ? 'tone-bad' : age > ttl / 2 ? 'tone-warn' : '', title: utc(w.beat_at), text: ago(w.beat_at, now) })));
        }), 'no live worker'));
    });
  }

  // ---------------------------------------------------------------- jobs
  const jobFilters = { tenant: '', status: '' };
  const JOB_STATUSES = ['queued', 'in_progress', 'completed', 'failed', 'cancelled', 'expired'];
  const ENDED = new Set(['completed', 'failed', 'cancelled', 'expired']);
  const jobLink = (id) => el('a', { class: 'mono', href: '#/jobs/' + enc(id), text: id });

  function pageJobs(ctx, root) {
    const idInput = el('input', { id: 'job-id', type: 'search', placeholder: 'job id', autocomplete: 'off', spellcheck: 'false', 'aria-label': 'job id' });
    const lookup = el('form', { id: 'job-lookup', class: 'toolbar', role: 'search' }, idInput, el('button', { id: 'job-find', class: 'btn primary', type: 'submit', text: 'Open job' }));
    lookup.addEventListener('submit', (e) => { e.preventDefault(); const id = idInput.value.trim(); if (id) location.hash = '#/jobs/' + enc(id); });
    const tenant = el('input', { id: 'job-tenant', type: 'search', placeholder: 'any tenant', value: jobFilters.tenant, autocomplete: 'off', 'aria-label': 'tenant' });
    const status = el('select', { id: 'job-status', 'aria-label': 'status' }, el('option', { value: 'any', text: 'any' }),
      JOB_STATUSES.map((s) => el('option', { value: s, text: s, selected: jobFilters.status === s })));
    status.value = jobFilters.status || 'any';
    const filters = el('form', { id: 'job-filters', class: 'toolbar' }, el('label', { class: 'field' }, el('span', { text: 'tenant' }), tenant),
      el('label', { class: 'field' }, el('span', { text: 'status' }), status), el('span', { class: 'muted small', text: '50 most recent' }));
    const list = el('div');
    root.append(el('div', { class: 'toolbar-row' }, lookup, filters), list);

    const p = poll(ctx, 'jobs', 10000, async () => {
      const q = new URLSearchParams();
      if (jobFilters.tenant) q.set('tenant', jobFilters.tenant);
      if (jobFilters.status) q.set('status', jobFilters.status);
      q.set('limit', '50');
      const d = await api('/admin/api/jobs?' + q);
      const jobs = Array.isArray(d.jobs) ? d.jobs : [], now = nowS();
      list.replaceChildren(table(['job', 'tenant', 'status', 'model', 'provider', 'priority', 'created', { label: 'took', cls: 'num' }, { label: 'attempts', cls: 'num' }, 'http'],
        jobs.map((j) => el('tr', { class: 'clickable', data: { job: j.id } }, td(jobLink(j.id)), td(j.tenant), td(pill(j.status)), td(j.model), td(j.provider), td(j.priority),
          td(when(j.created_at, now)), td(j.completed_at ? duration(j.completed_at - j.created_at) : '–', 'num'), td(num(j.attempts), 'num'), td(httpPill(j.http_status)))),
        'no job matches these filters'));
    });
    list.addEventListener('click', (e) => {
      const tr = e.target.closest('tr[data-job]');
      if (tr && !e.target.closest('a')) location.hash = '#/jobs/' + enc(tr.dataset.job);
    });
    let typing = 0;
    const refilter = () => { jobFilters.tenant = tenant.value.trim(); jobFilters.status = status.value === 'any' ? '' : status.value; p.run(); };
    tenant.addEventListener('input', () => { clearTimeout(typing); typing = setTimeout(refilter, 400); });
    status.addEventListener('change', refilter);
    filters.addEventListener('submit', (e) => { e.preventDefault(); clearTimeout(typing); refilter(); });
  }

  function jobDetail(j) {
    const now = nowS(), t = j.timings || {};
    const total = t.total_s || (t.queued_s || 0) + (t.run_s || 0);
    const history = Array.isArray(j.history) ? j.history : [];
    const meta = j.metadata && typeof j.metadata === 'object' ? Object.entries(j.metadata) : [];
    const w = j.webhook;
    return [
      el('div', { class: 'stats wide' }, stat('status', String(j.status).replace(/_/g, ' '), tone(j.status)), stat('http status', j.http_status ? String(j.http_status) : '–', j.http_status >= 500 ? 'bad' : j.http_status >= 400 ? 'warn' : ''),
        stat('attempts', num(j.attempts)), stat('total', duration(t.total_s))),
      el('div', { class: 'grid two' },
        card('Job', null, kv([['tenant', j.tenant], ['model', j.model], ['provider', j.provider], ['priority', j.priority], ['stream', j.stream ? 'yes' : 'no'],
          ['result', isNum(j.result_bytes) ? bytes(j.result_bytes) : ''], ['created', when(j.created_at, now)], ['started', when(j.started_at, now)],
          ['completed', when(j.completed_at, now)], ['deadline', when(j.deadline, now)]])),
        card('Timings', null,
          bar([{ frac: total ? (t.queued_s || 0) / total : 0, tone: 'muted' }, { frac: total ? (t.run_s || 0) / total : 0, tone: 'info' }], 'queued, then running'),
          el('div', { class: 'stats' }, stat('queued', duration(t.queued_s)), stat('running', duration(t.run_s)), stat('total', duration(t.total_s))))),
      j.error ? card('Error', { class: 'card error-card' }, el('pre', { class: 'code', text: typeof j.error === 'string' ? j.error : JSON.stringify(j.error, null, 2) })) : null,
      card('History', null, history.length ? el('ol', { class: 'timeline' }, history.map((h) => el('li', { class: 'tone-' + (h.status && h.status < 300 ? 'ok' : h.status && h.status < 500 ? 'warn' : 'bad') },
        el('div', { class: 'tl-head' }, mono(h.deployment), httpPill(h.status), el('span', { class: 'muted', text: duration(h.seconds) }), h.at ? when(h.at, now) : null),
        h.error ? el('div', { class: 'tl-error', text: String(h.error) }) : null)))
        : el('p', { class: 'muted', text: 'no attempt recorded' })),
      el('div', { class: 'grid two' },
        card('Webhook', null, w ? kv([['url', mono(w.url)], ['status', pill(w.status)], ['attempts', num(w.attempts)], ['answer', httpPill(w.code)],
          ['at', when(w.at, now)], w.error ? ['error', el('span', { class: 'tone-bad', text: w.error })] : null]) : el('p', { class: 'muted', text: 'no webhook' })),
        card('Metadata', null, meta.length ? kv(meta.map(([k, v]) => [k, typeof v === 'string' ? v : JSON.stringify(v)])) : el('p', { class: 'muted', text: 'no metadata' }))),
    ];
  }

  function pageJob(ctx, root, id) {
    const status = el('span');
    const body = el('div', { class: 'stack' });
    const prompt = card('Prompt', { id: 'prompt-section' });
    root.append(el('div', { class: 'detail-head' }, el('a', { class: 'btn small ghost', href: '#/jobs', text: '← Jobs' }), el('h2', { class: 'mono job-id', text: id }), status), body, prompt);
    const showPrompt = (pr) => {
      prompt.querySelectorAll('pre, .prompt-note').forEach((n) => n.remove());
      append(prompt, [el('pre', { id: 'prompt', class: 'code', text: pr.body == null ? '' : String(pr.body) }),
        pr.truncated ? el('p', { class: 'prompt-note muted', text: 'truncated: only the start of the body is stored' }) : null]);
    };
    if (session.show_prompts) {
      const btn = el('button', { id: 'show-prompt', class: 'btn', type: 'button', text: 'Show the request body' });
      btn.addEventListener('click', guard(async () => {
        btn.disabled = true;
        try {
          const d = await api(`/admin/api/jobs/${enc(id)}?prompt=1`);
          if (d.prompt) showPrompt(d.prompt);
          else prompt.append(el('p', { class: 'prompt-note muted', text: 'no request body is stored for this job' }));
        } finally { btn.disabled = false; }
      }));
      prompt.append(el('p', { class: 'muted', text: 'The request body is shown only when asked for.' }), btn);
    } else {
      prompt.append(el('p', { class: 'muted', text: 'Prompts are hidden by configuration (console.show_prompts is off).' }));
    }
    poll(ctx, 'job', 5000, async (p) => {
      let j;
      try {
        j = await api('/admin/api/jobs/' + enc(id));
      } catch (e) {
        if (e.status !== 404) throw e;
        p.everyMs = 0;
        status.replaceChildren(pill('not found', 'muted'));
        body.replaceChildren(el('div', { class: 'card empty-state', data: { empty: 'job' } }, el('h3', { text: 'no such job' }),
          el('p', { class: 'muted', text: `No job has the id ${id} (or it has expired).` })));
        prompt.hidden = true;
        return;
      }
      prompt.hidden = false;
      if (ENDED.has(j.status)) p.everyMs = 0; // an ended job no longer changes
      status.replaceChildren(pill(j.status));
      body.replaceChildren(...jobDetail(j).filter(Boolean));
      if (j.prompt) showPrompt(j.prompt);
    });
  }

  // ---------------------------------------------------------------- dead letters
  const dlq = { provider: '' };
  const entryKey = (id) => String(id).split('-').map(Number);
  const ek = (prov, id) => prov + '/' + id; // entry ids are unique within one provider's stream only
  const olderThan = (a, b) => { const [am, as] = entryKey(a), [bm, bs] = entryKey(b); return am < bm || (am === bm && as < bs); };

  function pageDeadLetters(ctx, root) {
    const select = el('select', { id: 'dlq-provider', 'aria-label': 'provider' }, el('option', { value: 'all', text: 'all' }));
    const totals = el('div', { class: 'chips' });
    const purgeAll = el('button', { id: 'purge-all', class: 'btn danger', type: 'button', text: 'Purge all', disabled: true });
    const inspect = el('section', { id: 'dlq-inspect', class: 'card inspect', hidden: true });
    const list = el('div');
    const more = el('button', { id: 'dlq-more', class: 'btn', type: 'button', text: 'Load more', hidden: true });
    root.append(el('div', { class: 'toolbar-row' }, el('label', { class: 'field' }, el('span', { text: 'provider' }), select), totals, el('span', { class: 'spacer' }), purgeAll),
      inspect, list, el('div', { class: 'center' }, more));
    let fresh = [], extra = [], next = null, extraNext = null, total = {};

    const url = (before) => {
      const q = new URLSearchParams();
      if (dlq.provider) q.set('provider', dlq.provider);
      q.set('count', '50');
      if (before) q.set('before', before);
      return '/admin/api/dead-letters?' + q;
    };
    const render = () => {
      const now = nowS(), rows = fresh.concat(extra);
      list.replaceChildren(table(['at', 'provider', 'job', 'tenant / model', 'error', { label: 'body', cls: 'num' }, { label: '', cls: 'actions' }],
        rows.map((e) => el('tr', { data: { entry: e.id, provider: e.provider }, class: inspect.dataset.key === ek(e.provider, e.id) ? 'selected' : null },
          td(when(e.at, now)), td(e.provider),
          td([e.job ? jobLink(e.job) : '–', e.replayed_as ? el('div', { class: 'small replayed' }, 'replayed as ', jobLink(e.replayed_as)) : null]), td([e.tenant || '–', el('div', { class: 'muted small', text: e.model || '' })]),
          td(el('span', { class: 'clip', title: e.error || '', text: e.error || '–' }), 'error-cell'),
          td(bytes(e.body_bytes) + (e.body_truncated ? ' (cut)' : ''), 'num'),
          td(el('div', { class: 'row-actions' },
            el('button', { class: 'btn small', type: 'button', data: { action: 'inspect' }, text: 'Inspect' }),
            el('button', { class: 'btn small', type: 'button', data: { action: 'replay' }, text: 'Replay', disabled: !e.replayable, title: e.replayable ? null : 'this dead letter cannot be replayed' }),
            el('button', { class: 'btn small danger', type: 'button', data: { action: 'purge' }, text: 'Purge' })), 'actions'))),
        dlq.provider ? `no dead letter for ${dlq.provider}` : 'no dead letter'));
      more.hidden = !(extra.length ? extraNext : next);
      const n = dlq.provider ? total[dlq.provider] || 0 : 0;
      purgeAll.disabled = !dlq.provider || !n;
      purgeAll.textContent = dlq.provider ? `Purge all ${num(n)} of ${dlq.provider}` : 'Purge all';
      purgeAll.title = dlq.provider ? '' : 'choose a provider first';
    };

    const p = poll(ctx, 'dead letters', 10000, async () => {
      const asked = dlq.provider;
      const d = await api(url());
      if (asked !== dlq.provider) return;
      const provs = Array.isArray(d.providers) ? d.providers : [];
      const have = [...select.options].slice(1).map((o) => o.value).join('\n');
      if (have !== provs.join('\n')) select.replaceChildren(select.options[0], ...provs.map((v) => el('option', { value: v, text: v })));
      if (dlq.provider && !provs.includes(dlq.provider)) select.append(el('option', { value: dlq.provider, text: dlq.provider }));
      select.value = dlq.provider || 'all';
      total = d.total || {};
      totals.replaceChildren(...Object.entries(total).map(([k, v]) => el('span', { class: 'chip' + (v ? ' tone-bad' : ''), data: { provider: k } }, k + ' ', el('b', { text: num(v) }))));
      fresh = Array.isArray(d.entries) ? d.entries : [];
      next = d.next_before || null;
      const keys = new Set(fresh.map((e) => ek(e.provider, e.id))), last = fresh.length ? fresh[fresh.length - 1].id : null;
      extra = last ? extra.filter((e) => !keys.has(ek(e.provider, e.id)) && olderThan(e.id, last)) : [];
      render();
    });

    select.addEventListener('change', () => { dlq.provider = select.value === 'all' ? '' : select.value; fresh = []; extra = []; next = extraNext = null; inspect.hidden = true; render(); p.run(); });
    more.addEventListener('click', guard(async () => {
      more.disabled = true;
      try {
        const d = await api(url(extra.length ? extraNext : next));
        const seen = new Set(fresh.concat(extra).map((e) => ek(e.provider, e.id)));
        extra = extra.concat((d.entries || []).filter((e) => !seen.has(ek(e.provider, e.id))));
        extraNext = d.next_before || null;
        render();
      } finally { more.disabled = false; }
    }));
    purgeAll.addEventListener('click', guard(async () => {
      const prov = dlq.provider;
      if (!prov || !(await ask(`Purge all ${num(total[prov] || 0)} dead letters of ${prov}? They cannot be replayed afterwards.`, 'Purge all', true))) return;
      const r = await api(`/admin/api/dead-letters/${enc(prov)}/purge`, 'POST', {});
      toast(`Purged ${num(r.purged)} dead letter${r.purged === 1 ? '' : 's'} of ${prov}`);
      extra = [];
      p.run();
    }));

    const openInspect = async (prov, id) => {
      inspect.hidden = false;
      inspect.dataset.entry = id;
      inspect.dataset.key = ek(prov, id);
      render();
      inspect.replaceChildren(el('div', { class: 'card-head' }, el('h2', { text: 'Dead letter ' + id }), closeBtn()), el('p', { class: 'muted', text: 'loading…' }));
      let e;
      try { e = await api(`/admin/api/dead-letters/${enc(prov)}/${enc(id)}`); } catch (err) {
        inspect.replaceChildren(el('div', { class: 'card-head' }, el('h2', { text: 'Dead letter ' + id }), closeBtn()), el('p', { class: 'error', text: errText(err) }));
        return;
      }
      if (inspect.dataset.key !== ek(prov, id)) return;
      inspect.replaceChildren(el('div', { class: 'card-head' }, el('h2', { text: 'Dead letter ' + id }), closeBtn()),
        kv([['provider', e.provider], ['at', when(e.at)], ['job', e.job ? jobLink(e.job) : ''], ['tenant', e.tenant], ['model', e.model],
          ['replayable', e.replayable ? 'yes' : 'no'], ['replayed as', e.replayed_as ? jobLink(e.replayed_as) : '']]),
        el('h3', { text: 'Error' }), el('pre', { class: 'code error-text', text: e.error || '' }),
        el('h3', { text: `Body (${bytes(e.body_bytes)}${e.body_truncated ? ', truncated' : ''})` }),
        e.body == null ? el('p', { class: 'muted', text: session.show_prompts ? 'no body stored' : 'The body is hidden by configuration (console.show_prompts is off).' })
          : el('pre', { class: 'code', id: 'dlq-body', text: String(e.body) }));
    };
    const closeBtn = () => el('button', { class: 'btn small ghost', type: 'button', text: 'Close', on: { click: () => { inspect.hidden = true; delete inspect.dataset.key; render(); } } });

    list.addEventListener('click', guard(async (ev) => {
      const btn = ev.target.closest('button[data-action]'), tr = ev.target.closest('tr[data-entry]');
      if (!btn || !tr || btn.disabled) return;
      const id = tr.dataset.entry, prov = tr.dataset.provider, base = `/admin/api/dead-letters/${enc(prov)}/${enc(id)}`;
      if (btn.dataset.action === 'inspect') return openInspect(prov, id);
      if (btn.dataset.action === 'replay') {
        if (!(await ask(`Replay dead letter ${id} of ${prov} as a new job?`, 'Replay'))) return;
        const r = await api(base + '/replay', 'POST', {});
        toast(['Replayed as ', jobLink(r.job_id), ` (${r.status || 'queued'})`], 'ok', 10000);
      } else if (btn.dataset.action === 'purge') {
        if (!(await ask(`Purge dead letter ${id} of ${prov}? It cannot be replayed afterwards.`, 'Purge', true))) return;
        const r = await api(base + '/purge', 'POST', {});
        toast(`Purged ${num(r.purged)} dead letter${r.purged === 1 ? '' : 's'}`);
        extra = extra.filter((e) => ek(e.provider, e.id) !== ek(prov, id));
        if (inspect.dataset.key === ek(prov, id)) { inspect.hidden = true; delete inspect.dataset.key; }
      }
      p.run();
    }));
  }

  // ---------------------------------------------------------------- tenants and keys
  let selectedTenant = '';

  function budgetCell(b, s) {
    if (!b) return el('span', { class: 'muted', text: 'no budget' });
    const spent = s ? s.usd : null, f = isNum(spent) && b.usd ? spent / b.usd : 0;
    return el('div', { class: 'budget' }, bar([{ frac: f, tone: f >= 1 ? 'bad' : f >= 0.8 ? 'warn' : 'ok' }], `${pct(f)} of the budget spent`),
      el('span', { class: 'small', text: `${usd(spent)} of ${usd(b.usd)} ${b.period || ''}` }));
  }

  function pageTenants(ctx, root) {
    const spend = chartBox(ctx, 'spend', 'Spend per tenant', 'cost per day (UTC), last 14 days');
    const models = chartBox(ctx, 'models', 'Requests by model', 'today (UTC)');
    const tenants = el('div');
    const keys = el('section', { id: 'keys', class: 'card' });
    const keyUse = chartBox(ctx, 'keys', 'Usage by key', '');
    keyUse.card.id = 'key-usage';
    root.append(el('div', { class: 'grid two' }, spend.card, models.card), card('Tenants', { data: { section: 'tenants' } }, tenants),
      el('div', { class: 'stack', data: { section: 'tenant-keys' } }, keys, keyUse.card));
    let usage14 = new Map(), keyNames = new Map();

    poll(ctx, 'tenants', 30000, async () => {
      const { start, from, to } = last14();
      const [t, u, m] = await Promise.allSettled([api('/admin/v1/tenants'),
        api(`/admin/v1/usage?group_by=day,tenant&from=${from}&to=${to}`), api(`/admin/v1/usage?group_by=model&from=${to}&to=${to}`)]);
      if (u.status === 'fulfilled') {
        const rows = Array.isArray(u.value.data) ? u.value.data : [];
        const days = range(14).map((i) => utcDay(start + i * 86400));
        const names = [...new Set(rows.map((r) => r.tenant))].sort();
        usage14 = new Map(names.map((n) => [n, { requests: 0, cost: 0 }]));
        const series = names.map((n) => ({ name: n, color: colorFor('t', n), values: days.map(() => 0) }));
        const idx = new Map(names.map((n, i) => [n, i]));
        rows.forEach((r) => {
          const di = days.indexOf(r.day), u14 = usage14.get(r.tenant);
          if (di >= 0) series[idx.get(r.tenant)].values[di] += r.cost_usd || 0;
          u14.requests += r.requests || 0;
          u14.cost += r.cost_usd || 0;
        });
        drawLine(spend, { labels: days.map((d) => d.slice(5)), tips: days, keys: range(14).map((i) => i + 1), labelW: 44, series, fmt: (v, exact) => (exact ? usd(v) : compactUsd(v)), dots: true });
        spend.sub.textContent = `${usd([...usage14.values()].reduce((a, x) => a + x.cost, 0))} in the last 14 days (UTC)`;
      } else {
        spend.svg.replaceChildren();
        spend.sub.textContent = 'usage unavailable: ' + errText(u.reason);
      }
      if (m.status === 'fulfilled') {
        const rows = (Array.isArray(m.value.data) ? m.value.data : []).map((r) => ({ label: r.model || '(none)', value: r.requests || 0 }))
          .filter((r) => r.value > 0).sort((a, b) => b.value - a.value).slice(0, 12);
        drawBars(models, rows, num, 'data-model');
        models.sub.textContent = `${num(rows.reduce((a, r) => a + r.value, 0))} requests today (UTC)`;
      } else {
        models.svg.replaceChildren();
        models.sub.textContent = 'usage unavailable: ' + errText(m.reason);
      }
      if (t.status === 'rejected') throw t.reason;
      const list = Array.isArray(t.value.data) ? t.value.data : [], now = nowS();
      tenants.replaceChildren(table(['tenant', 'budget', { label: 'remaining', cls: 'num' }, 'resets', { label: 'requests 14 d', cls: 'num' }, { label: 'cost 14 d', cls: 'num' }, 'created'],
        list.map((x) => {
          const u14 = usage14.get(x.name) || { requests: 0, cost: 0 };
          return el('tr', { class: 'clickable' + (x.name === selectedTenant ? ' selected' : ''), tabindex: 0, data: { tenant: x.name } },
            td(el('b', { text: x.name })), td(budgetCell(x.budget, x.spend)), td(x.spend ? usd(x.spend.remaining_usd) : '–', 'num'),
            td(x.spend && x.spend.resets_at ? when(x.spend.resets_at, now) : x.budget ? el('span', { class: 'muted', text: 'never' }) : '–'),
            td(num(u14.requests), 'num'), td(usd(u14.cost), 'num'), td(when(x.created_at, now)));
        }), 'no tenant yet (create one with the admin API or llm-broker admin)'));
      if (selectedTenant && !list.some((x) => x.name === selectedTenant)) { selectedTenant = ''; renderKeys(null); }
    });

    // the keys table and the usage-by-key chart of the selected tenant, refreshed together
    const keysPoll = poll(ctx, 'keys', 30000, async () => {
      if (!selectedTenant) return renderKeys(null);
      const asked = selectedTenant, { start, from, to } = last14();
      const [k, u] = await Promise.allSettled([api('/admin/v1/keys?tenant=' + enc(asked)),
        api(`/admin/v1/usage?tenant=${enc(asked)}&group_by=day,key&from=${from}&to=${to}`)]);
      if (asked !== selectedTenant) return;
      if (k.status === 'fulfilled') renderKeys(Array.isArray(k.value.data) ? k.value.data : []);
      if (u.status === 'fulfilled') drawKeyUsage(asked, Array.isArray(u.value.data) ? u.value.data : [], start);
      else clearChart(keyUse, 'usage unavailable: ' + errText(u.reason));
      if (k.status === 'rejected') throw k.reason;
    }, !!selectedTenant);
    renderKeys(null);

    // requests per day and key; key "" is the config file's keys
    function drawKeyUsage(tenant, rows, start) {
      const days = range(14).map((i) => utcDay(start + i * 86400));
      const idOf = (r) => (r.key == null ? '' : String(r.key));
      const byId = new Map();
      let requests = 0, cost = 0;
      rows.forEach((r) => {
        const id = idOf(r);
        if (!byId.has(id)) byId.set(id, { name: id, color: colorFor('k', id), values: days.map(() => 0), total: 0 });
        const sr = byId.get(id), di = days.indexOf(r.day);
        if (di >= 0) sr.values[di] += r.requests || 0;
        sr.total += r.requests || 0;
        requests += r.requests || 0;
        cost += r.cost_usd || 0;
      });
      const series = [...byId.values()];
      const named = (id) => (id ? keyNames.get(id) || id : 'config keys');
      const count = new Map();
      series.forEach((sr) => count.set(named(sr.name), (count.get(named(sr.name)) || 0) + 1));
      series.forEach((sr) => { const n = named(sr.name); sr.label = count.get(n) > 1 && sr.name && n !== sr.name ? `${n} (${sr.name})` : n; });
      series.sort((a, b) => b.total - a.total || a.label.localeCompare(b.label));
      drawLine(keyUse, { labels: days.map((d) => d.slice(5)), tips: days, keys: range(14).map((i) => i + 1), labelW: 44, series, integer: true,
        fmt: (v, exact) => (exact ? num(v) : compact(v)), dots: true, empty: 'no request in the last 14 days' });
      keyUse.sub.textContent = series.length
        ? `${num(requests)} request${requests === 1 ? '' : 's'} · ${usd(cost)} in the last 14 days (UTC)`
        : `no usage of ${tenant}'s keys in the last 14 days (UTC)`;
      if (series.length) delete keyUse.card.dataset.empty; else keyUse.card.dataset.empty = '1';
    }

    function renderKeys(list) {
      if (list == null) {
        keyUse.card.hidden = !selectedTenant;
        clearChart(keyUse, selectedTenant ? 'loading…' : '');
        keyNames = new Map();
      } else {
        keyNames = new Map(list.filter((k) => k.id && k.name).map((k) => [k.id, String(k.name)]));
      }
      if (!selectedTenant) {
        keys.replaceChildren(el('div', { class: 'card-head' }, el('h2', { text: 'Keys' })), el('p', { class: 'muted', text: 'Select a tenant above to see and manage its keys.' }));
        return;
      }
      const name = el('input', { id: 'key-name', name: 'name', placeholder: 'name, e.g. ci', required: true, autocomplete: 'off', 'aria-label': 'key name' });
      const models = el('input', { id: 'key-models', name: 'models', placeholder: 'models, comma separated (optional)', autocomplete: 'off', 'aria-label': 'models' });
      const form = el('form', { id: 'create-key', class: 'toolbar' }, name, models, el('button', { id: 'key-create', class: 'btn primary', type: 'submit', text: 'Create key' }));
      form.addEventListener('submit', (e) => { e.preventDefault(); guard(() => createKey(name.value.trim(), models.value))(); });
      const now = nowS();
      keys.replaceChildren(el('div', { class: 'card-head' }, el('h2', null, 'Keys of ', el('span', { class: 'mono', text: selectedTenant }))), form,
        list == null ? el('p', { class: 'muted', text: 'loading…' }) : table(['key', 'name', 'status', 'models', 'budget', 'created', 'expires', { label: '', cls: 'actions' }],
          list.map((k) => el('tr', { data: { key: k.id, status: k.status } },
            td([mono(k.id), el('div', { class: 'muted small mono', text: k.hint || '' })]), td([k.name || '–', k.admin ? el('span', { class: 'pill tone-warn', text: 'admin' }) : null]),
            td(pill(k.status)), td(k.models && k.models.length ? el('span', { class: 'small', text: k.models.join(', ') }) : el('span', { class: 'muted', text: 'all' })),
            td(budgetCell(k.budget, k.spend)), td(when(k.created_at, now)), td(k.expires_at ? when(k.expires_at, now) : el('span', { class: 'muted', text: 'never' })),
            td(el('div', { class: 'row-actions' },
              el('button', { class: 'btn small', type: 'button', data: { action: 'rotate', key: k.id }, text: 'Rotate', disabled: k.status !== 'active' }),
              el('button', { class: 'btn small danger', type: 'button', data: { action: 'revoke', key: k.id }, text: 'Revoke', disabled: k.status === 'revoked' })), 'actions'))),
          'this tenant has no key'));
    }

    async function createKey(name, modelsText) {
      const tenant = selectedTenant, models = modelsText.split(',').map((s) => s.trim()).filter(Boolean);
      if (!tenant || !(await ask(`Create a key "${name}" for tenant ${tenant}${models.length ? ' for ' + models.join(', ') : ' for every model'}?`, 'Create key'))) return;
      const k = await api('/admin/v1/keys', 'POST', { tenant, name, models });
      showSecret(k);
      toast(`Key ${k.id} created for ${tenant}`);
      keysPoll.run();
    }

    tenants.addEventListener('click', (e) => selectRow(e.target.closest('tr[data-tenant]')));
    tenants.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { const tr = e.target.closest('tr[data-tenant]'); if (tr) { e.preventDefault(); selectRow(tr); } } });
    function selectRow(tr) {
      if (!tr || tr.dataset.tenant === selectedTenant) return;
      selectedTenant = tr.dataset.tenant;
      tenants.querySelectorAll('tr[data-tenant]').forEach((r) => r.classList.toggle('selected', r === tr));
      renderKeys(null);
      keysPoll.run();
    }

    keys.addEventListener('click', guard(async (e) => {
      const btn = e.target.closest('button[data-action][data-key]');
      if (!btn || btn.disabled) return;
      const id = btn.dataset.key;
      if (btn.dataset.action === 'revoke') {
        if (!(await ask(`Revoke key ${id}? Every client using it is refused from now on; this cannot be undone.`, 'Revoke', true))) return;
        const k = await api(`/admin/v1/keys/${enc(id)}/revoke`, 'POST', {});
        toast(`Key ${k.id || id} is ${k.status || 'revoked'}`);
      } else if (btn.dataset.action === 'rotate') {
        if (!(await ask(`Rotate key ${id}? A new secret is issued; the old one keeps working for the grace period only.`, 'Rotate'))) return;
        const k = await api(`/admin/v1/keys/${enc(id)}/rotate`, 'POST', {});
        showSecret(k);
        toast(`Key ${k.id || id} rotated`);
      }
      keysPoll.run();
    }));
  }

  const compactUsd = (v) => (v >= 1000 ? '$' + compact(v) : v >= 10 || v === 0 ? '$' + Math.round(v) : '$' + +v.toPrecision(2));

  // ---------------------------------------------------------------- batches
  const CANCELLABLE = new Set(['validating', 'in_progress']);

  function pageBatches(ctx, root) {
    const head = el('div', { class: 'stats wide' });
    const list = el('div');
    root.append(card(null, null, head), list);
    const p = poll(ctx, 'batches', 5000, async () => {
      const d = await api('/admin/api/batches');
      const bs = Array.isArray(d.batches) ? d.batches : [], now = nowS();
      const running = bs.filter((b) => CANCELLABLE.has(b.status));
      const left = running.reduce((a, b) => { const c = b.request_counts || {}; return a + Math.max(0, (c.total || 0) - (c.completed || 0) - (c.failed || 0)); }, 0);
      head.replaceChildren(stat('running', num(running.length), running.length ? 'info' : ''), stat('requests left', num(left)), stat('listed', num(bs.length)));
      list.replaceChildren(table(['batch', 'api', 'tenant', 'status', 'progress', 'created', 'expires', { label: '', cls: 'actions' }],
        bs.map((b) => {
          const c = b.request_counts || {}, tot = c.total || 0, done = c.completed || 0, failed = c.failed || 0;
          return el('tr', { data: { batch: b.id, status: b.status } }, td(mono(b.id)), td(b.api), td(b.tenant), td(pill(b.status)),
            td(el('div', { class: 'progress' }, bar([{ frac: tot ? done / tot : 0, tone: 'ok' }, { frac: tot ? failed / tot : 0, tone: 'bad' }], `${done} completed, ${failed} failed of ${tot}`),
              el('span', { class: 'small' }, `${num(done + failed)} / ${num(tot)}`, failed ? el('span', { class: 'tone-bad', text: ` · ${num(failed)} failed` }) : null))),
            td(when(b.created_at, now)), td(when(b.expires_at, now)),
            td(CANCELLABLE.has(b.status) ? el('button', { class: 'btn small danger', type: 'button', data: { action: 'cancel', batch: b.id }, text: 'Cancel' }) : null, 'actions'));
        }), 'no batch'));
    });
    list.addEventListener('click', guard(async (e) => {
      const btn = e.target.closest('button[data-action="cancel"][data-batch]');
      if (!btn || btn.disabled) return;
      const id = btn.dataset.batch;
      if (!(await ask(`Cancel batch ${id}? Its requests not yet sent are not run.`, 'Cancel batch', true))) return;
      const b = await api(`/admin/api/batches/${enc(id)}/cancel`, 'POST', {});
      toast(`Batch ${b.id || id} is ${String(b.status || 'cancelling').replace(/_/g, ' ')}`);
      p.run();
    }));
  }

  // ================================================================ router
  const PAGES = {
    overview: { title: 'Overview', render: pageOverview },
    workers: { title: 'Workers', render: pageWorkers },
    jobs: { title: 'Jobs', render: pageJobs },
    'dead-letters': { title: 'Dead letters', render: pageDeadLetters },
    tenants: { title: 'Tenants and keys', render: pageTenants },
    batches: { title: 'Batches', render: pageBatches },
  };

  function parseHash() {
    const [name, ...rest] = location.hash.replace(/^#\/?/, '').split('/');
    let arg = rest.join('/');
    try { arg = decodeURIComponent(arg); } catch (_) { /* keep it raw */ }
    return PAGES[name] ? { name, arg: name === 'jobs' ? arg : '' } : null;
  }

  function route() {
    let r = parseHash();
    if (!r) {
      history.replaceState(null, '', '#/overview');
      r = { name: 'overview', arg: '' };
    }
    if (current) stopPage(current);
    const page = $('#page');
    page.replaceChildren();
    page.dataset.page = r.name;
    delete page.dataset.loaded;
    if (r.arg) page.dataset.job = r.arg; else delete page.dataset.job;
    document.querySelectorAll('a[data-page]').forEach((a) => {
      const on = a.dataset.page === r.name;
      a.classList.toggle('active', on);
      if (on) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
    });
    const title = r.arg ? 'Job' : PAGES[r.name].title;
    $('#page-title').textContent = title;
    document.title = `${title} · llm-broker`;
    $('#sidebar').classList.remove('open');
    $('#nav-toggle').setAttribute('aria-expanded', 'false');
    const ctx = { name: r.name, alive: true, pollers: [], charts: [], errors: new Map(), waiting: 0 };
    ctx.alert = el('div', { class: 'alert', role: 'alert', hidden: true });
    page.append(ctx.alert);
    current = ctx;
    const root = el('div', { class: 'stack' });
    page.append(root);
    (r.arg ? pageJob : PAGES[r.name].render)(ctx, root, r.arg);
    if (!ctx.waiting) page.dataset.loaded = '1';
  }

  // ================================================================ chrome and start
  function applyTheme(t) {
    document.documentElement.dataset.theme = t;
    const btn = $('#theme-toggle');
    if (btn) {
      const other = t === 'dark' ? 'light' : 'dark';
      btn.title = `Switch to the ${other} theme`;
      btn.setAttribute('aria-label', btn.title);
    }
  }

  function storedTheme() {
    try { const t = localStorage.getItem(THEME_KEY); return t === 'dark' || t === 'light' ? t : ''; } catch (_) { return ''; }
  }

  function initChrome() {
    const mq = window.matchMedia ? window.matchMedia('(prefers-color-scheme: dark)') : null;
    applyTheme(storedTheme() || (mq && mq.matches ? 'dark' : 'light'));
    if (mq && mq.addEventListener) mq.addEventListener('change', (e) => { if (!storedTheme()) applyTheme(e.matches ? 'dark' : 'light'); });
    $('#theme-toggle').addEventListener('click', () => {
      const t = document.documentElement.dataset.theme === 'dark' ? 'light' : 'dark';
      try { localStorage.setItem(THEME_KEY, t); } catch (_) { /* private mode: not remembered */ }
      applyTheme(t);
      if (current) current.charts.forEach((b) => b.draw && b.draw());
    });
    $('#nav-toggle').addEventListener('click', () => {
      const open = $('#sidebar').classList.toggle('open');
      $('#nav-toggle').setAttribute('aria-expanded', String(open));
    });
    $('#logout').addEventListener('click', async () => {
      const btn = $('#logout');
      btn.disabled = true;
      try {
        await fetch('/admin/logout', { method: 'POST', credentials: 'same-origin', headers: { 'X-CSRF-Token': session.csrf, 'Content-Type': 'application/json' }, body: '{}' });
      } catch (_) { /* go to the login page anyway */ }
      leaving = true;
      if (current) stopPage(current);
      location.assign('/admin/login');
    });
    $('#secret-copy').addEventListener('click', () => { copySecret().catch(() => {}); });
    $('#secret-close').addEventListener('click', () => $('#secret').close());
    $('#secret').addEventListener('close', () => { $('#secret-value').value = ''; });
    $('#toast').addEventListener('click', (e) => { if (!e.target.closest('a')) $('#toast').hidden = true; });
  }

  async function start() {
    initChrome();
    try {
      Object.assign(session, await api('/admin/api/session'));
    } catch (e) {
      if (e.status === 401 || leaving) return;
      const page = $('#page');
      const retry = el('button', { class: 'btn primary', type: 'button', text: 'Retry' });
      retry.addEventListener('click', () => location.reload());
      page.replaceChildren(el('div', { class: 'card empty-state' }, el('h3', { text: 'The console cannot start' }), el('p', { class: 'error', text: errText(e) }), retry));
      page.dataset.loaded = '1';
      live(false, e);
      return;
    }
    $('#user').textContent = session.user || 'operator';
    $('#user').title = session.expires_at ? 'session ends ' + utc(session.expires_at) : '';
    $('#version').textContent = session.version ? 'llm-broker ' + session.version : '';
    window.addEventListener('hashchange', route);
    route();
  }

  start().catch((e) => { if (!leaving) toast('The console failed: ' + errText(e), 'error', 15000); });
})();
