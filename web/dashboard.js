// tickpipe operator dashboard: one WebSocket for service status frames and sampled live ticks.
// The key lives in this tab's sessionStorage and is sent only in the first-message auth.
import { createChart, LineSeries } from "/vendor/lightweight-charts/lightweight-charts.standalone.production.mjs";
// Close codes that refuse the key itself (generated from server/wire.py): log out, say why.
import { KEY_REFUSED as LOGOUT_CODES } from "./wire.js";

const KEY_ITEM = "tickpipe-key";
const THROTTLE_MS = 250;        // samples: latest trade and quote per symbol, 4 times a second
const CHART_POINTS = 600;       // points kept for the charted symbol
const HISTORY_POINTS = 120;     // points kept per other symbol, so switching shows a recent past
const MAX_ERRORS = 20;
// Empty bars right of the last point, so the label under it is never cut by the chart's edge.
const RIGHT_OFFSET_BARS = 8;
const LOCAL_STALE_S = 5;        // without status frames (non-admin key): stale after this

const $ = (s) => document.querySelector(s);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

const S = {
  ws: null, key: null, retry: 500, timer: null, welcome: null, admin: false, clockSkewMs: 0,
  rows: new Map(),        // sym -> {tr, cells, lastTs, lastPrice}
  tiles: new Map(),       // part id -> {tile, state, name, reason, dl}
  status: null,           // the latest service_status event
  symStatus: new Map(),   // sym -> status row (ticks_per_s, stale, reason)
  history: new Map(),     // sym -> [{time, value}], bounded
  chartSym: null, chart: null, series: null,
  localErrors: [], errorsSig: null, samples: 0, redisInterrupted: false, lastError: null,
};

// -- connection -------------------------------------------------------------------------------

function setConn(state, text) {
  const c = $("#conn");
  c.dataset.state = state;
  c.textContent = text;
}

function connect() {
  clearTimeout(S.timer);
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
  const ws = new WebSocket(url);
  S.ws = ws;
  setConn("degraded", "connecting…");
  ws.onopen = () => ws.send(JSON.stringify({ op: "auth", key: S.key }));
  ws.onmessage = (m) => {
    if (ws !== S.ws) return;
    for (const ev of JSON.parse(m.data)) onEvent(ev);
  };
  ws.onclose = (e) => {
    if (ws !== S.ws) return;
    S.ws = null;
    if (LOGOUT_CODES[e.code]) {
      const why = S.lastError?.message || LOGOUT_CODES[e.code];
      logout(`${LOGOUT_CODES[e.code]}: ${why}`);
      return;
    }
    if (!S.key) return;
    setConn("down", `reconnecting in ${(S.retry / 1000).toFixed(1)} s…`);
    noteLocal("connection", "down", `connection closed (${e.code || "no code"}); reconnecting`);
    S.timer = setTimeout(connect, S.retry);
    S.retry = Math.min(S.retry * 2, 5000);
  };
}

function subscribe() {
  const msg = { op: "subscribe", id: "dashboard", symbols: ["*"], snapshot: true, throttle_ms: THROTTLE_MS };
  if (S.admin) msg.channels = ["status"];
  S.ws.send(JSON.stringify(msg));
}

function onEvent(ev) {
  switch (ev.type) {
    case "trade": case "quote": onTick(ev); break;
    case "service_status": onStatus(ev); break;
    case "welcome":
      S.retry = 500;
      S.welcome = ev;
      S.clockSkewMs = ev.server_time / 1e6 - Date.now();
      S.admin = ev.key.scopes.includes("admin");
      $("#who").textContent = `key ${ev.key.name} (${ev.key.scopes.join(", ")})`;
      setConn("up", "live");
      showDash();
      subscribe();
      if (!S.admin) showBanner("Service status needs a key with the admin scope; showing live samples only.", "degraded");
      break;
    case "subscribed":
      $("#sym-count").textContent = `${ev.symbols.length} symbols · samples every ${ev.throttle_ms} ms`;
      fillSymbolChoice(ev.symbols);
      break;
    case "status": onStreamStatus(ev); break;
    case "error":
      S.lastError = ev;
      noteLocal("server", ev.fatal ? "down" : "degraded", `${ev.code}: ${ev.message}`);
      break;
    default: break;
  }
}

function onStreamStatus(ev) {
  if (ev.code === "redis_unavailable") {
    S.redisInterrupted = true;
    setConn("degraded", "live data interrupted: Redis reconnecting…");
    showBanner("Live data interrupted: the server lost Redis and is reconnecting…", "down");
    noteLocal("live data", "down", ev.message);
  } else if (ev.code === "gap") {
    S.redisInterrupted = false;
    setConn("up", "live");
    hideBanner();
    noteLocal("live data", "up", "live data resumed after a Redis outage");
  } else if (ev.code === "conflating") {
    noteLocal("live data", "degraded", ev.message);
  }
}

function logout(message) {
  S.key = null;
  sessionStorage.removeItem(KEY_ITEM);
  clearTimeout(S.timer);
  if (S.ws) { const ws = S.ws; S.ws = null; ws.close(1000); }
  setConn("down", "logged out");
  $("#who").textContent = "";
  $("#dash").hidden = true;
  $("#logout").hidden = true;
  $("#login-panel").hidden = false;
  $("#login-error").textContent = message || "";
  $("#key").focus();
}

function showDash() {
  $("#login-panel").hidden = true;
  $("#dash").hidden = false;
  $("#logout").hidden = false;
  if (!S.chart) makeChart();
}

function showBanner(text, state) {
  const b = $("#banner");
  b.textContent = text;
  b.dataset.state = state;
  b.hidden = false;
}
function hideBanner() { $("#banner").hidden = true; }

// -- service tiles ------------------------------------------------------------------------------

const fmt = {
  n: (v) => (v === null || v === undefined ? "—" : Number(v).toLocaleString("en-US", { maximumFractionDigits: 1 })),
  s: (v) => (v === null || v === undefined || v < 0 ? "—" : v < 10 ? `${Number(v).toFixed(1)} s` : v < 120 ? `${Math.round(v)} s` : `${Math.round(v / 60)} min`),
  ms: (v) => (v === null || v === undefined ? "—" : `${Number(v).toFixed(2)} ms`),
  // A latency from under a millisecond to days (a replayed capture's event times are old).
  lat: (v) => (v === null || v === undefined ? "—" : v < 1000 ? `${Number(v).toFixed(v < 10 ? 2 : 0)} ms`
    : v < 60e3 ? `${(v / 1e3).toFixed(1)} s` : v < 36e5 ? `${(v / 6e4).toFixed(0)} min`
      : v < 864e5 ? `${(v / 36e5).toFixed(1)} h` : `${(v / 864e5).toFixed(0)} d`),
  mib: (v) => (v === null || v === undefined ? "—" : `${(v / 2 ** 20).toFixed(1)} MiB`),
};

function keyFigures(part) {
  const f = part.figures || {};
  switch (part.kind) {
    case "redis":
      return [["latency", fmt.ms(f.latency_ms)], ["memory", fmt.mib(f.used_memory_bytes)],
        ["clients", fmt.n(f.connected_clients)], ["version", f.version || "—"]];
    case "feed": {
      if (f.source) return sourceFigures(f.source, f);
      const rej = Object.values(f.rejected || {}).reduce((a, b) => a + b, 0);
      const last = (f.last_rejects || []).slice(-1)[0];
      return [["ticks/s", fmt.n(f.rate)], ["published", fmt.n(f.published)],
        ["last tick", fmt.s(f.last_tick_age_s)],
        ["rejected", rej ? `${fmt.n(rej)}${last ? ` (${last.reason})` : ""}` : "0"]];
    }
    case "recorder":
      return [["lag", fmt.s(f.lag_s)], ...(f.idle_s == null ? [] : [["idle for", fmt.s(f.idle_s)]]),
        ["batches waiting", fmt.n(f.lag_batches)],
        ["ticks waiting", f.lag_ticks == null || f.lag_ticks < 0 ? "—" : `≈ ${fmt.n(f.lag_ticks)}`],
        ["rows stored", fmt.n(f.rows_stored)], ["last flush", f.last_flush_age_s == null ? "—" : `${fmt.s(f.last_flush_age_s)} ago`],
        ["write errors", fmt.n(f.write_errors || 0)], ["files compacted", fmt.n(f.files_compacted || 0)]];
    case "web":
      return [["connections", fmt.n(f.connections)], ["subscriptions", fmt.n(f.subscriptions)],
        ["frames/s out", fmt.n(f.frames_per_s)], ["ticks/s out", fmt.n(f.ticks_out_per_s)],
        ["conflations", fmt.n(f.conflations)], ["slow closes", fmt.n(f.slow_consumer_closes)],
        ["Redis reconnects", fmt.n(f.pubsub_reconnects)]];
    default:
      return [];
  }
}

// A live venue source (a feed started with --source): its figures replace the feed's.
function sourceFigures(src, f) {
  const bad = (src.malformed || 0) + (src.unexpected || 0);
  return [["symbols", (src.symbols || []).join(", ")], ["msgs/s", fmt.n(src.messages_per_s)],
    ["ticks/s", fmt.n(f.rate)], ["latency p50", fmt.lat(src.latency_p50_ms)],
    ["latency p99", fmt.lat(src.latency_p99_ms)], ["reconnects", fmt.n(src.reconnects)],
    ["upstream gaps", src.upstream_gaps ? `${fmt.n(src.upstream_gaps)} (${fmt.n(src.missing_trades)} trades)` : "0"],
    ["bad messages", fmt.n(bad)], ["venue errors", fmt.n(src.venue_errors)],
    ["last error", src.last_error || "—"]];
}

// The last minute's latency (each second's median), as a small line: no axes, its range in the title.
const SVG = "http://www.w3.org/2000/svg";
function sparkline(t, values) {
  if (!t.spark) {
    t.spark = document.createElementNS(SVG, "svg");
    t.spark.setAttribute("class", "spark");
    t.spark.setAttribute("viewBox", "0 0 100 20");
    t.spark.setAttribute("preserveAspectRatio", "none");
    t.spark.append(document.createElementNS(SVG, "polyline"));
    t.tile.insertBefore(t.spark, t.dl);
  }
  const v = values || [];
  const lo = Math.min(...v), hi = Math.max(...v);
  const points = v.map((x, i) => `${v.length > 1 ? (i * 100) / (v.length - 1) : 50},${hi > lo ? 19 - ((x - lo) * 18) / (hi - lo) : 10}`);
  t.spark.firstChild.setAttribute("points", points.join(" "));
  t.spark.dataset.points = String(v.length);
  t.spark.setAttribute("aria-label", v.length ? `latency ${fmt.lat(lo)} to ${fmt.lat(hi)} over the last minute` : "no latency yet");
}

function tile(part) {
  let t = S.tiles.get(part.id);
  if (!t) {
    const tileEl = el("article", "tile");
    tileEl.dataset.id = part.id;
    const head = el("header");
    const name = el("span", "name", part.id);
    const state = el("span", "state");
    head.append(name, state);
    const reason = el("p", "reason");
    const dl = el("dl");
    tileEl.append(head, reason, dl);
    $("#tiles").append(tileEl);
    t = { tile: tileEl, state, reason, dl, figs: "" };
    S.tiles.set(part.id, t);
  }
  return t;
}

// Tiles share each row's width: as many columns as fit, spread evenly over the rows they need.
const TILE_MIN_REM = 15;
function layoutTiles() {
  const box = $("#tiles");
  const n = S.tiles.size;
  if (!n || !box.clientWidth) return;
  const rem = parseFloat(getComputedStyle(document.documentElement).fontSize);
  const gap = parseFloat(getComputedStyle(box).columnGap) || 0;
  const fit = Math.max(1, Math.floor((box.clientWidth + gap) / (TILE_MIN_REM * rem + gap)));
  const cols = Math.ceil(n / Math.ceil(n / fit));
  if (box.style.getPropertyValue("--tile-cols") !== String(cols)) box.style.setProperty("--tile-cols", cols);
}
new ResizeObserver(layoutTiles).observe($("#tiles"));

function renderTiles(parts) {
  const ids = new Set(parts.map((p) => p.id));
  const before = S.tiles.size;
  for (const [id, t] of S.tiles) if (!ids.has(id)) { t.tile.remove(); S.tiles.delete(id); }
  for (const part of parts) {
    const t = tile(part);
    const src = part.figures && part.figures.source;
    t.tile.dataset.state = part.state;
    t.state.dataset.state = part.state;
    // A source's own state (connecting, live, reconnecting, down), coloured by the part's.
    t.state.textContent = src ? src.state : part.state;
    if (src) {
      t.tile.dataset.kind = "source";
      t.tile.dataset.source = src.state;
      sparkline(t, src.latency_ms);
    }
    t.reason.textContent = part.reason;
    t.tile.title = part.reason;
    const figs = keyFigures(part);
    const sig = figs.map((r) => r.join("=")).join("|");
    if (sig !== t.figs) {
      t.figs = sig;
      t.dl.replaceChildren(...figs.flatMap(([k, v]) => [el("dt", "", k), el("dd", "", v)]));
    }
  }
  if (S.tiles.size !== before) layoutTiles();
}

function onStatus(ev) {
  S.status = ev;
  const o = $("#overall");
  o.dataset.state = ev.status;
  o.textContent = `status ${ev.status}`;
  o.title = ev.reason;
  $("#rates").textContent = `ticks in ${fmt.n(ev.rates.ticks_in_per_s)}/s · out ${fmt.n(ev.rates.ticks_out_per_s)}/s`;
  renderTiles(ev.services);
  S.symStatus = new Map(ev.symbols.map((s) => [s.sym, s]));
  for (const s of ev.symbols) {
    const r = row(s.sym);
    r.cells.rate.textContent = fmt.n(s.ticks_per_s);
    r.tr.title = s.reason;
  }
  const redis = ev.services.find((p) => p.kind === "redis");
  if (redis && redis.state === "down") {
    showBanner(`Redis is down: ${redis.reason}. The server keeps retrying; the page reconnects by itself.`, "down");
  } else if (!S.redisInterrupted && S.admin) hideBanner();
  renderErrors();
}

// -- symbols table ------------------------------------------------------------------------------

function row(sym) {
  let r = S.rows.get(sym);
  if (!r) {
    const tr = el("tr");
    tr.dataset.sym = sym;
    const cells = {};
    for (const name of ["sym", "last", "bid", "ask", "spread", "rate", "age"]) {
      cells[name] = el("td", name === "sym" ? "" : "num");
      tr.append(cells[name]);
    }
    cells.sym.textContent = sym;
    tr.onclick = () => chooseSymbol(sym);
    // keep the table sorted by symbol
    const after = [...S.rows.keys()].filter((s) => s > sym).sort()[0];
    $("#symbols tbody").insertBefore(tr, after ? S.rows.get(after).tr : null);
    r = { tr, cells, lastTs: 0, lastPrice: null, bid: null, ask: null, dec: 2 };
    S.rows.set(sym, r);
  }
  return r;
}

// Prices of one symbol keep the most decimals seen for it, so the columns line up.
function price(r, v) {
  const s = String(v);
  const d = s.includes(".") && !s.includes("e") ? s.length - s.indexOf(".") - 1 : 0;
  r.dec = Math.min(8, Math.max(r.dec, d));
  return v.toFixed(r.dec);
}

function onTick(ev) {
  S.samples++;
  const r = row(ev.sym);
  r.lastTs = Math.max(r.lastTs, ev.ts);
  if (ev.type === "trade") {
    const c = r.cells.last;
    c.textContent = price(r, ev.price);
    c.className = r.lastPrice === null || ev.price === r.lastPrice ? "" : ev.price > r.lastPrice ? "up" : "dn";
    r.lastPrice = ev.price;
    addPoint(ev.sym, ev.ts, ev.price);
  } else {
    // A one-sided quote (a book with no bid or no ask) leaves that side out: shown as "—".
    r.bid = ev.bid ?? null; r.ask = ev.ask ?? null;
    r.cells.bid.textContent = r.bid === null ? "—" : price(r, r.bid);
    r.cells.ask.textContent = r.ask === null ? "—" : price(r, r.ask);
    r.cells.spread.textContent = r.bid === null || r.ask === null ? "—" : (r.ask - r.bid).toFixed(r.dec);
  }
}

function refreshAges() {
  const now = Date.now() + S.clockSkewMs;
  for (const [sym, r] of S.rows) {
    const age = r.lastTs ? Math.max(0, now / 1000 - r.lastTs / 1e9) : null;
    r.cells.age.textContent = age === null ? "—" : fmt.s(age);
    const st = S.symStatus.get(sym);
    const stale = S.admin && st ? st.stale : age === null || age > LOCAL_STALE_S;
    r.tr.classList.toggle("stale", Boolean(stale));
  }
}

// -- chart --------------------------------------------------------------------------------------

function cssVar(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }

function chartColors() {
  return {
    layout: { background: { color: cssVar("--panel") }, textColor: cssVar("--fg") },
    grid: { vertLines: { color: cssVar("--line") }, horzLines: { color: cssVar("--line") } },
  };
}

function makeChart() {
  S.chart = createChart($("#chart"), {
    autoSize: true,
    ...chartColors(),
    timeScale: { timeVisible: true, secondsVisible: true, rightOffset: RIGHT_OFFSET_BARS },
    rightPriceScale: { borderVisible: false },
  });
  S.series = S.chart.addSeries(LineSeries, { color: cssVar("--accent"), lineWidth: 2 });
}

function addPoint(sym, tsNs, value) {
  const time = Math.floor(tsNs / 1e9);
  let h = S.history.get(sym);
  if (!h) { h = []; S.history.set(sym, h); }
  const last = h[h.length - 1];
  if (last && time < last.time) return; // out of order after a reconnect: skip
  if (last && last.time === time) last.value = value; else h.push({ time, value });
  if (!S.chartSym) chooseSymbol(sym);
  if (sym !== S.chartSym) {
    if (h.length > HISTORY_POINTS * 1.5) h.splice(0, h.length - HISTORY_POINTS);
    return;
  }
  if (h.length > CHART_POINTS * 1.2) {
    h.splice(0, h.length - CHART_POINTS);
    S.series.setData(h);
  } else {
    S.series.update({ time, value });
  }
  // as the symbol table shows it (same decimals for every price of the symbol)
  $("#chart-last").textContent = S.rows.get(sym)?.cells.last.textContent ?? String(value);
}

function chooseSymbol(sym) {
  if (S.chartSym) S.rows.get(S.chartSym)?.tr.classList.remove("selected");
  S.chartSym = sym;
  S.rows.get(sym)?.tr.classList.add("selected");
  $("#chart-sym").value = sym;
  S.series?.setData(S.history.get(sym) || []);
  S.chart?.timeScale().scrollToRealTime();
}

function fillSymbolChoice(symbols) {
  const sel = $("#chart-sym");
  const have = new Set([...sel.options].map((o) => o.value));
  for (const s of symbols) if (!have.has(s)) sel.append(new Option(s, s));
  if (S.chartSym) sel.value = S.chartSym;
}

// -- errors -------------------------------------------------------------------------------------

function noteLocal(part, state, message) {
  S.localErrors.push({ ts: (Date.now() + S.clockSkewMs) * 1e6, part, state, message });
  if (S.localErrors.length > MAX_ERRORS) S.localErrors.splice(0, S.localErrors.length - MAX_ERRORS);
  renderErrors();
}

function renderErrors() {
  const all = [...(S.status?.errors || []), ...S.localErrors]
    .sort((a, b) => b.ts - a.ts).slice(0, MAX_ERRORS);
  const sig = all.map((e) => `${e.ts}${e.part}`).join();
  if (sig === S.errorsSig) return;
  S.errorsSig = sig;
  if (!all.length) {
    $("#errors").replaceChildren(el("li", "muted", "none since this page opened"));
    return;
  }
  $("#errors").replaceChildren(...all.map((e) => {
    const li = el("li");
    li.dataset.state = e.state === "rejected" ? "degraded" : e.state;
    const t = el("time", "", new Date(e.ts / 1e6).toLocaleTimeString());
    li.append(t, el("span", "part", e.part), el("span", "", e.message));
    return li;
  }));
}

// -- theme and page wiring ----------------------------------------------------------------------

const THEMES = ["auto", "dark", "light"];
function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  localStorage.setItem("tickpipe-theme", theme);
  $("#theme").textContent = `theme: ${theme}`;
  S.chart?.applyOptions(chartColors());
  S.series?.applyOptions({ color: cssVar("--accent") });
}
$("#theme").onclick = () => {
  const cur = document.documentElement.dataset.theme;
  applyTheme(THEMES[(THEMES.indexOf(cur) + 1) % THEMES.length]);
};
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => applyTheme(document.documentElement.dataset.theme));
$("#theme").textContent = `theme: ${document.documentElement.dataset.theme}`;

// A new login starts clean: nothing said about an earlier key (a rejected one, or another
// key's service status) stays on the page.
function resetSession() {
  S.localErrors = [];
  S.status = null;
  S.errorsSig = null;
  S.redisInterrupted = false;
  for (const t of S.tiles.values()) t.tile.remove();
  S.tiles.clear();
  hideBanner();
  renderErrors();
}

$("#login").onsubmit = (e) => {
  e.preventDefault();
  const key = $("#key").value.trim();
  if (!key) { $("#login-error").textContent = "paste a key first"; return; }
  $("#key").value = "";
  $("#login-error").textContent = "";
  resetSession();
  sessionStorage.setItem(KEY_ITEM, key);
  S.key = key;
  S.retry = 500;
  S.lastError = null;
  connect();
};
$("#logout").onclick = () => logout("logged out");
$("#chart-sym").onchange = (e) => chooseSymbol(e.target.value);
setInterval(refreshAges, 500);

// For tests and the curious: what the page holds, without reaching into the DOM.
window.tickpipe = {
  chartPoints: () => (S.series ? S.series.data().length : 0),
  chartSymbol: () => S.chartSym,
  samples: () => S.samples,
  rows: () => S.rows.size,
};

S.key = sessionStorage.getItem(KEY_ITEM);
if (S.key) connect(); else logout("");
