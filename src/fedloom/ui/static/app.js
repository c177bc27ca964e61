// The fedloom dashboard: plain JavaScript, no build step and nothing fetched but fedloom's own JSON API.
// Views by address: #/ (runs), #/run/ID, #/run/ID/client/CLIENT, #/compare/ID,ID,...
// When a view has drawn everything, <body data-ready="VIEW"> says so (the browser tests wait for it).
"use strict";

const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];
const STATUS_COLOURS = { t: "#2ca02c", d: "#d62728", l: "#ff7f0e", r: "#9467bd", ".": "#f0f0f0" };
const HEATMAP_METRICS = { accuracy: "evaluate accuracy", loss: "evaluate loss", fit_loss: "fit loss", fit_seconds: "fit seconds" };
const SYSTEM_COLUMNS = [
  ["compute_seconds", "client compute s"], ["peak_rss_mb", "peak RSS MB"], ["cpu_seconds", "CPU s"], ["gpu_util", "GPU util %"], ["gpu_peak_mb", "GPU peak MB"],
  ["download_seconds", "download s"], ["upload_seconds", "upload s"],
];
const LIVE_MS = 2000;
const MARKED_POINTS = 300; // a series with at most this many points marks each one (with its value on hover)
const SHOWN_ROUNDS = 100; // the rounds table shows the last ones until asked for all
const LIST_MS = 5000;
const LOG_LEVELS = ["INFO", "WARNING", "ERROR", "CRITICAL"];
const SEARCH_MS = 250; // the logs are searched this long after the last keystroke

const view = document.getElementById("view");
const crumbs = document.getElementById("crumbs");
const liveBadge = document.getElementById("live");
let generation = 0; // bumped on every navigation; a render of an older view stops when it sees a newer one
let timer = null;

// ------------------------------------------------------------------------------------------------ helpers

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// As `fedloom runs show` prints a metric: four decimals, "-" for none.
function num(value) {
  return value === null || value === undefined || Number.isNaN(value) ? "-" : Number(value).toFixed(4);
}

function int(value) {
  return value === null || value === undefined ? "-" : Number(value).toLocaleString("en-US");
}

function short(value) {
  if (value === null || value === undefined) return "-";
  return Math.abs(value) >= 1000 || Number.isInteger(value) ? String(value) : Number(value).toPrecision(4);
}

async function api(path) {
  const answer = await fetch(path, { credentials: "same-origin" });
  const body = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error(body.detail || `${answer.status} ${answer.statusText}`);
  return body;
}

function table(header, rows, attrs = "") {
  const head = header.map((h) => `<th>${esc(h)}</th>`).join("");
  const body = rows.map((row) => `<tr>${row.map((cell) => `<td>${cell}</td>`).join("")}</tr>`).join("");
  return `<table ${attrs}><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
}

function runLink(ref, label = ref) {
  return `<a class="run" href="#/run/${encodeURIComponent(ref)}">${esc(label)}</a>`;
}

function setCrumbs(parts) {
  crumbs.innerHTML = parts.map(([label, href]) => (href ? `<a href="${href}">${esc(label)}</a>` : esc(label))).join(" / ");
}

function ready(name) {
  document.body.dataset.ready = name;
}

function stopTimer() {
  if (timer !== null) clearTimeout(timer);
  timer = null;
  liveBadge.hidden = true;
}

function poll(ms, again) {
  const mine = generation;
  timer = setTimeout(async () => {
    if (mine !== generation) return;
    try {
      await again();
    } catch (error) {
      console.warn(error);
    }
    if (mine === generation) poll(ms, again);
  }, ms);
}

// ------------------------------------------------------------------------------------------------ charts

// A line chart as SVG text: series is [{label, colour, points: [[x, y], ...]}], one polyline each. Up to
// MARKED_POINTS points a series also marks each point with a circle and a <title> (its value on hover); the
// <svg> says how many points it draws in data-points.
function lineChart(series, { width = 460, height = 220, metric = "" } = {}) {
  const pad = { left: 52, right: 12, top: 10, bottom: 28 };
  const all = series.flatMap((s) => s.points);
  const total = all.length;
  if (!total) return `<svg class="chart" data-metric="${esc(metric)}" data-points="0" width="${width}" height="${height}"></svg>`;
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const [x, y] of all) {
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
  }
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const sy = (y) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  const parts = [`<svg class="chart" xmlns="http://www.w3.org/2000/svg" data-metric="${esc(metric)}" data-points="${total}" width="${width}" height="${height}" role="img">`];
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    parts.push(`<line x1="${pad.left}" x2="${width - pad.right}" y1="${sy(y).toFixed(1)}" y2="${sy(y).toFixed(1)}" stroke="#eee"/>`);
    parts.push(`<text x="${pad.left - 4}" y="${(sy(y) + 4).toFixed(1)}" font-size="10" text-anchor="end">${short(y)}</text>`);
  }
  for (const x of [x0, Math.round((x0 + x1) / 2), x1]) {
    parts.push(`<text x="${sx(x).toFixed(1)}" y="${height - 8}" font-size="10" text-anchor="middle">${short(x)}</text>`);
  }
  parts.push(`<line x1="${pad.left}" x2="${pad.left}" y1="${pad.top}" y2="${height - pad.bottom}" stroke="#999"/>`);
  parts.push(`<line x1="${pad.left}" x2="${width - pad.right}" y1="${height - pad.bottom}" y2="${height - pad.bottom}" stroke="#999"/>`);
  for (const s of series) {
    const coords = s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`);
    parts.push(`<polyline fill="none" stroke="${s.colour}" stroke-width="1.5" data-label="${esc(s.label)}" points="${coords.join(" ")}"/>`);
    if (s.points.length > MARKED_POINTS) continue; // a long curve is its line alone: thousands of markers help nobody
    s.points.forEach(([x, y], i) => {
      const [cx, cy] = coords[i].split(",");
      parts.push(`<circle class="point" cx="${cx}" cy="${cy}" r="2.2" fill="${s.colour}"><title>${esc(s.label)} round ${x}: ${num(y)}</title></circle>`);
    });
  }
  parts.push("</svg>");
  return parts.join("");
}

function figure(caption, svg) {
  return `<figure><figcaption>${esc(caption)}</figcaption>${svg}</figure>`;
}

// Viridis, by a few of its stops, for heat maps (dark: low, yellow: high), as [r, g, b].
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function viridis(t) {
  const at = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(at), VIRIDIS.length - 2);
  const f = at - i;
  return VIRIDIS[i].map((v, k) => Math.round(v + (VIRIDIS[i + 1][k] - v) * f));
}

function hex(colour) {
  return [1, 3, 5].map((i) => parseInt(colour.slice(i, i + 2), 16));
}

// A grid of clients (rows) by rounds (columns) on a canvas: rgbOf(row, column) gives each cell's [r, g, b],
// tipOf(row, column) its tooltip; clicking a row opens that client. The cells are painted as one pixel each
// into an image that is then scaled up, so 100,000 cells draw in milliseconds.
function grid(canvas, runId, clients, rounds, rgbOf, tipOf) {
  const cellW = Math.max(1, Math.min(40, Math.floor(900 / Math.max(rounds.length, 1))));
  const cellH = Math.max(3, Math.min(18, Math.floor(420 / Math.max(clients.length, 1))));
  const labelW = cellH >= 10 ? 90 : 0;
  canvas.width = labelW + cellW * rounds.length;
  canvas.height = cellH * clients.length;
  canvas.dataset.clients = clients.length;
  canvas.dataset.rounds = rounds.length;
  if (!clients.length || !rounds.length) return;
  const cells = new ImageData(rounds.length, clients.length);
  for (let i = 0; i < clients.length; i++) {
    for (let j = 0; j < rounds.length; j++) {
      const at = (i * rounds.length + j) * 4;
      const [r, g, b] = rgbOf(i, j);
      cells.data[at] = r; cells.data[at + 1] = g; cells.data[at + 2] = b; cells.data[at + 3] = 255;
    }
  }
  const small = document.createElement("canvas");
  small.width = rounds.length;
  small.height = clients.length;
  small.getContext("2d").putImageData(cells, 0, 0);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(small, labelW, 0, cellW * rounds.length, cellH * clients.length);
  if (labelW) {
    ctx.font = `${Math.min(cellH - 2, 11)}px system-ui, sans-serif`;
    ctx.textBaseline = "middle";
    ctx.fillStyle = "#333";
    clients.forEach((client, i) => ctx.fillText(client, 2, i * cellH + cellH / 2, labelW - 4));
  }
  const cell = (event) => {
    const box = canvas.getBoundingClientRect();
    const x = ((event.clientX - box.left) * canvas.width) / box.width - labelW;
    const y = ((event.clientY - box.top) * canvas.height) / box.height;
    return [Math.floor(y / cellH), Math.max(0, Math.floor(x / cellW))];
  };
  canvas.onmousemove = (event) => {
    const [i, j] = cell(event);
    canvas.title = i < clients.length && j < rounds.length ? tipOf(i, j) : "";
  };
  canvas.onclick = (event) => {
    const [i] = cell(event);
    if (i < clients.length) location.hash = `#/run/${encodeURIComponent(runId)}/client/${encodeURIComponent(clients[i])}`;
  };
}

// ------------------------------------------------------------------------------------------------ run list

async function runsView() {
  setCrumbs([["runs", null]]);
  const selected = new Set();
  const draw = async () => {
    const runs = await api("/api/runs");
    const rows = runs.map((run) => {
      const best = run.best ? `${esc(run.best.name)} ${num(run.best.value)} <span class="muted">(round ${run.best.round})</span>` : "-";
      const box = `<input type="checkbox" class="pick" value="${esc(run.ref)}" ${selected.has(run.ref) ? "checked" : ""} aria-label="select ${esc(run.run_id)}">`;
      return [
        `${box} ${runLink(run.ref, run.run_id)}`, esc(run.name), `<span class="status-${esc(run.status)}">${esc(run.status)}</span>`,
        esc(run.strategy ?? "-"), int(run.clients), int(run.rounds), best, num(run.epsilon), esc(run.created_at.slice(0, 19).replace("T", " ")),
      ];
    });
    view.innerHTML = runs.length
      ? `<h1>Runs</h1><div class="toolbar"><button id="compare" disabled>Compare selected</button><span class="muted">${runs.length} runs</span></div>` +
        table(["run", "name", "status", "strategy", "clients", "rounds", "best", "epsilon", "created (UTC)"], rows, 'id="runs"')
      : `<h1>Runs</h1><p class="muted">No runs yet. Start one with <code>fedloom simulate</code>; it appears here.</p>`;
    const button = document.getElementById("compare");
    const sync = () => { if (button) button.disabled = selected.size < 2; };
    view.querySelectorAll("input.pick").forEach((box) => {
      box.onchange = () => { box.checked ? selected.add(box.value) : selected.delete(box.value); sync(); };
    });
    if (button) button.onclick = () => { location.hash = `#/compare/${[...selected].map(encodeURIComponent).join(",")}`; };
    sync();
  };
  await draw();
  timings.complete = performance.now();
  ready("runs");
  poll(LIST_MS, draw);
}

// ------------------------------------------------------------------------------------------------ one run

async function runView(runId) {
  setCrumbs([["runs", "#/"], [runId, null]]);
  const mine = generation;
  const base = `/api/runs/${encodeURIComponent(runId)}`;
  let shown = null; // the rounds and status the page shows, to redraw only when they change
  const draw = async () => {
    // All four requests go out at once; the run's own page is drawn as soon as it arrives, the client
    // sections as theirs do.
    const detailing = api(base);
    const clienting = api(`${base}/clients`);
    const heating = api(`${base}/heatmap?metric=${heatMetric}`);
    const profiling = api(`${base}/profile`);
    const detail = await detailing;
    const state = `${detail.run.rounds}/${detail.run.status}`;
    if (state === shown || mine !== generation) return;
    const scroll = window.scrollY;
    view.innerHTML = runPage(detail);
    const all = document.getElementById("all-rounds");
    if (all) all.onclick = () => { document.getElementById("rounds-table").innerHTML = roundsTable(detail, 0); all.parentElement.remove(); };
    window.scrollTo(0, scroll);
    timings.content = performance.now();
    const [clients, heat, prof] = await Promise.all([clienting, heating, profiling]);
    if (mine !== generation) return;
    document.getElementById("participation").innerHTML = legend(clients);
    drawTimeline(runId, clients);
    document.getElementById("profile-section").innerHTML = profileTable(runId, prof, clients);
    drawHeatmap(runId, heat);
    document.getElementById("metric").onchange = async (event) => {
      drawHeatmap(runId, await api(`${base}/heatmap?metric=${encodeURIComponent(event.target.value)}`));
    };
    await watchLogs(runId, null);
    window.scrollTo(0, scroll);
    shown = state;
    document.body.dataset.rounds = detail.run.rounds;
    document.body.dataset.status = detail.run.status;
    liveBadge.hidden = detail.run.status !== "running";
    if (detail.run.status !== "running") stopTimer();
  };
  await draw();
  timings.complete = performance.now();
  ready("run");
  if (document.body.dataset.status === "running") poll(LIVE_MS, draw);
}

// What the browser tests and benchmarks/dashboard.py read: when the last view showed its first content and
// when it had drawn everything (milliseconds since the page started loading).
const timings = (window.fedloomTimings = {});
let heatMetric = "accuracy";

function runPage(detail) {
  const run = detail.run;
  const summary = [
    ["status", `<span class="status-${esc(run.status)}">${esc(run.status)}</span>${run.error ? ` <span class="error">${esc(run.error)}</span>` : ""}`],
    ["name", esc(run.name)], ["strategy", esc(run.strategy ?? "-")], ["clients", int(run.clients)], ["rounds", int(run.rounds)],
    ["created (UTC)", esc(run.created_at)], ["finished (UTC)", esc(run.finished_at ?? "-")],
    ["best", run.best ? `${esc(run.best.name)} ${num(run.best.value)} (round ${run.best.round})` : "-"],
    ["params sha256", `<code>${esc(run.params_sha256 ?? "-")}</code>`],
  ];
  const charts = detail.metrics.map((metric) => {
    const points = detail.rounds.filter((r) => r[metric] !== null && r[metric] !== undefined).map((r) => [r.round, r[metric]]);
    return figure(metric, lineChart([{ label: metric, colour: COLOURS[0], points }], { metric }));
  });
  const hidden = Math.max(0, detail.rounds.length - SHOWN_ROUNDS);
  const options = Object.entries(HEATMAP_METRICS)
    .map(([value, label]) => `<option value="${value}" ${value === heatMetric ? "selected" : ""}>${label}</option>`).join("");
  return `<h1>Run ${esc(run.run_id)}</h1>` +
    table(["", ""], summary, 'class="summary"') +
    `<h2>Metrics per round</h2><div class="charts" id="charts">${charts.join("") || '<p class="muted">No metrics recorded yet.</p>'}</div>` +
    `<h2>Clients</h2><div class="toolbar"><label>Heat map of <select id="metric">${options}</select></label>` +
    `<span id="heat-scale" class="muted">loading…</span></div><div class="scroll"><canvas id="heatmap"></canvas></div>` +
    `<h2>Participation</h2><div class="legend" id="participation"></div><div class="scroll"><canvas id="timeline"></canvas></div>` +
    `<h2>System profile</h2><div id="profile-section"><p class="muted">loading…</p></div>` +
    `<h2>Privacy</h2>${privacy(detail.privacy)}` +
    `<h2>Client logs</h2>${logsSection(true)}` +
    `<h2>Rounds</h2>${hidden ? `<p class="muted">The last ${SHOWN_ROUNDS} of ${detail.rounds.length} rounds. <button id="all-rounds">Show all</button></p>` : ""}` +
    `<div class="scroll tall" id="rounds-table">${roundsTable(detail, hidden)}</div>` +
    `<h2>Config</h2><pre id="config">${esc(JSON.stringify(detail.config, null, 2))}</pre>`;
}

// The rounds table as `fedloom runs show` prints it, from round index `from` on.
function roundsTable(detail, from) {
  const columns = ["round", "seconds", "num_selected", "num_ok", "num_dropped", ...detail.metrics];
  const counts = new Set(["round", "num_selected", "num_ok", "num_dropped"]);
  const rows = detail.rounds.slice(from).map((r) => columns.map((c) => (counts.has(c) ? esc(r[c]) : num(r[c]))));
  return table(columns, rows, 'id="rounds"');
}

function legend(clients) {
  const swatch = (colour, label) => `<span><i class="swatch" style="background:${colour}"></i>${esc(label)}</span>`;
  return Object.entries(clients.legend).map(([k, label]) => swatch(STATUS_COLOURS[k], label)).join("") + swatch(STATUS_COLOURS["."], "not asked");
}

function drawHeatmap(runId, heat) {
  heatMetric = heat.metric;
  let [lo, hi, any] = [Infinity, -Infinity, false];
  for (const row of heat.values) {
    for (const v of row) {
      if (v === null) continue;
      any = true;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  const span = hi - lo || 1;
  const blank = hex("#e8e8e8");
  document.getElementById("heat-scale").textContent = any ? `${short(lo)} (dark) to ${short(hi)} (yellow); grey: no value` : "no values";
  grid(
    document.getElementById("heatmap"), runId, heat.clients, heat.rounds,
    (i, j) => (heat.values[i][j] === null ? blank : viridis((heat.values[i][j] - lo) / span)),
    (i, j) => `${heat.clients[i]} round ${heat.rounds[j]}: ${num(heat.values[i][j])}`,
  );
}

function drawTimeline(runId, clients) {
  const ids = clients.clients.map((c) => c.client_id);
  const rgb = Object.fromEntries(Object.entries(STATUS_COLOURS).map(([k, colour]) => [k, hex(colour)]));
  grid(
    document.getElementById("timeline"), runId, ids, clients.rounds,
    (i, j) => rgb[clients.clients[i].participation[j]] || [0, 0, 0],
    (i, j) => `${ids[i]} round ${clients.rounds[j]}: ${clients.legend[clients.clients[i].participation[j]] || "not asked"}`,
  );
}

function profileTable(runId, prof, clients) {
  const counts = Object.fromEntries(clients.clients.map((c) => [c.client_id, c]));
  const system = SYSTEM_COLUMNS.filter(([key]) => prof.some((row) => row[key] !== null));
  const header = ["client", "trained", "dropped", "late", "refused", "capped", "mean fit s", "mean evaluate s", "bytes down", "bytes up", ...system.map(([, label]) => label)];
  const rows = prof.map((row) => {
    const c = counts[row.client_id] || {};
    return [clientLink(runId, row.client_id), int(c.trained), int(c.dropped), int(c.late), int(c.refused), int(c.capped), num(row.fit_seconds), num(row.evaluate_seconds),
      int(row.bytes_down), int(row.bytes_up), ...system.map(([key]) => num(row[key]))];
  });
  return rows.length ? `<div class="scroll tall">${table(header, rows, 'id="profile"')}</div>` : '<p class="muted">No client records.</p>';
}

function privacy(p) {
  const parts = [];
  if (p.epsilon.length) {
    const last = p.epsilon[p.epsilon.length - 1][1];
    parts.push(`<p>Epsilon spent after the last round: <b>${num(last)}</b> at delta ${short(p.delta)}.</p>`);
    parts.push(figure("epsilon", lineChart([{ label: "epsilon", colour: COLOURS[1], points: p.epsilon }], { metric: "epsilon" })));
  }
  if (p.protection === "secagg") parts.push("<p>Updates were summed under secure aggregation: the server saw only their sum.</p>");
  if (p.protection === "paillier") parts.push("<p>Updates were added under Paillier encryption: the server saw only ciphertexts.</p>");
  return parts.join("") || '<p class="muted">No differential privacy, secure aggregation or encryption was recorded.</p>';
}

// ------------------------------------------------------------------------------------------------ client logs

// The search over what clients logged (the lines they sent with their replies). The filter outlives a live
// run's redraws; the section says in data-query what its table shows, for the browser tests.
const logFilter = { run: "", q: "", level: "", client: "" };

function logsSection(withClients) {
  const levels = LOG_LEVELS.map((l) => `<option value="${l}" ${logFilter.level === l ? "selected" : ""}>${l} and up</option>`).join("");
  const clients = withClients ? `<label>client <select id="log-client"><option value="">all</option></select></label>` : "";
  return `<div id="logs-section"><div class="toolbar"><input id="log-search" type="search" placeholder="search the lines" value="${esc(logFilter.q)}" aria-label="search the client logs">` +
    `<label>level <select id="log-level"><option value="">all</option>${levels}</select></label>${clients}<span id="log-count" class="muted">loading…</span></div>` +
    `<div class="scroll tall" id="log-lines"></div></div>`;
}

async function watchLogs(runId, clientId) {
  const mine = generation;
  if (logFilter.run !== runId) Object.assign(logFilter, { run: runId, q: "", level: "", client: "" });
  const search = document.getElementById("log-search");
  const level = document.getElementById("log-level");
  const client = document.getElementById("log-client");
  search.value = logFilter.q;
  level.value = logFilter.level;
  const show = async () => {
    const who = clientId ?? logFilter.client;
    const query = new URLSearchParams({ limit: "200" });
    if (logFilter.q) query.set("q", logFilter.q);
    if (logFilter.level) query.set("level", logFilter.level);
    if (who) query.set("client", who);
    const found = await api(`/api/runs/${encodeURIComponent(runId)}/logs?${query}`);
    if (mine !== generation) return;
    if (client && client.options.length === 1) {
      client.innerHTML += found.clients.map((c) => `<option value="${esc(c)}" ${c === logFilter.client ? "selected" : ""}>${esc(c)}</option>`).join("");
    }
    const rows = found.lines.map((line) => [
      esc(line.at.slice(11, 23)), esc(line.round), clientLink(runId, line.client_id), esc(line.phase),
      `<span class="level-${esc(line.level)}">${esc(line.level)}</span>`, esc(line.logger), `<span class="line">${esc(line.message)}</span>`,
    ]);
    const shown = found.matched > found.lines.length ? `; the last ${found.lines.length} shown` : "";
    const lines = `${int(found.matched)} line${found.matched === 1 ? "" : "s"}`;
    document.getElementById("log-count").textContent = found.matched ? `${lines}${shown}` : "no lines";
    document.getElementById("log-lines").innerHTML = rows.length ? table(["at (UTC)", "round", "client", "phase", "level", "logger", "message"], rows, 'id="logs"') : "";
    document.getElementById("logs-section").dataset.query = `${logFilter.q}|${logFilter.level}|${who}`;
  };
  let pending = null;
  const later = () => { clearTimeout(pending); pending = setTimeout(show, SEARCH_MS); };
  search.oninput = () => { logFilter.q = search.value.trim(); later(); };
  level.onchange = () => { logFilter.level = level.value; show(); };
  if (client) client.onchange = () => { logFilter.client = client.value; show(); };
  await show();
}

function clientLink(runId, clientId) {
  return `<a class="client" href="#/run/${encodeURIComponent(runId)}/client/${encodeURIComponent(clientId)}">${esc(clientId)}</a>`;
}

// ------------------------------------------------------------------------------------------------ one client

async function clientView(runId, clientId) {
  setCrumbs([["runs", "#/"], [runId, `#/run/${encodeURIComponent(runId)}`], [clientId, null]]);
  const detail = await api(`/api/runs/${encodeURIComponent(runId)}/clients/${encodeURIComponent(clientId)}`);
  const series = (phase, key) => detail.records.filter((r) => r.phase === phase && r[key] !== null).map((r) => [r.round, r[key]]);
  const own = (phase, name) => detail.records.filter((r) => r.phase === phase && typeof r.metrics[name] === "number").map((r) => [r.round, r.metrics[name]]);
  const reported = ["fit", "evaluate"].flatMap((phase) => [...new Set(detail.records.filter((r) => r.phase === phase).flatMap((r) => Object.keys(r.metrics)))]
    .filter((name) => !["loss", "accuracy"].includes(name)).sort().map((name) => [`${phase} ${name}`, own(phase, name)]));
  const charts = [["evaluate", "accuracy"], ["evaluate", "loss"], ["fit", "loss"], ["fit", "seconds"]]
    .map(([phase, key]) => [`${phase} ${key}`, series(phase, key)]).concat(reported)
    .filter(([, points]) => points.length)
    .map(([label, points]) => figure(label, lineChart([{ label, colour: COLOURS[0], points }], { metric: label })));
  const hidden = Math.max(0, detail.records.length - 2 * SHOWN_ROUNDS);
  const rows = detail.records.slice(hidden).map((r) => [
    esc(r.round), esc(r.phase), esc(r.status), int(r.num_examples), num(r.loss), num(r.accuracy), num(r.seconds),
    int(r.bytes_down), int(r.bytes_up),
    `<span class="text">${esc(Object.entries(r.metrics).map(([k, v]) => `${k}=${short(v)}`).join(" "))}${r.detail ? ` <span class="error">${esc(r.detail)}</span>` : ""}</span>`,
  ]);
  const events = detail.events.map((e) => [esc(e.seq), esc(e.at), esc(e.round ?? "-"), esc(e.event), int(e.bytes), esc(e.detail ?? "")]);
  view.innerHTML = `<h1>Client ${esc(clientId)}</h1><p class="muted">in run ${runLink(runId)}</p>` +
    `<div class="charts">${charts.join("")}</div>` +
    `<h2>Records</h2>${hidden ? `<p class="muted">The last ${detail.records.length - hidden} of ${detail.records.length} records.</p>` : ""}<div class="scroll tall">${table(["round", "phase", "status", "examples", "loss", "accuracy", "seconds", "bytes down", "bytes up", "metrics"], rows, 'id="records"')}</div>` +
    (events.length ? `<h2>Events</h2>${table(["#", "at (UTC)", "round", "event", "bytes", "detail"], events, 'id="events"')}` : "") +
    `<h2>Logs</h2>${logsSection(false)}`;
  await watchLogs(runId, clientId);
  timings.complete = performance.now();
  ready("client");
}

// ------------------------------------------------------------------------------------------------ compare

async function compareView(ids) {
  setCrumbs([["runs", "#/"], ["compare", null]]);
  const query = ids.map((id) => `run=${encodeURIComponent(id)}`).join("&");
  const data = await api(`/api/compare?${query}`);
  const legend = data.runs.map((run, i) => `<span><i class="swatch" style="background:${COLOURS[i % COLOURS.length]}"></i>${runLink(run.ref, run.run_id)}</span>`).join("");
  const charts = data.metrics.map((metric) => figure(metric, lineChart(
    data.series[metric].map((points, i) => ({ label: data.runs[i].run_id, colour: COLOURS[i % COLOURS.length], points })),
    { metric, width: 520, height: 260 },
  )));
  const runs = data.runs.map((run) => [runLink(run.ref, run.run_id), esc(run.status), esc(run.strategy ?? "-"), int(run.clients), int(run.rounds),
    run.best ? `${esc(run.best.name)} ${num(run.best.value)}` : "-", num(run.epsilon)]);
  const differ = data.differ.map((d) => [esc(d.name), ...d.values.map((v) => esc(typeof v === "string" ? v : JSON.stringify(v)))]);
  view.innerHTML = `<h1>Compare ${data.runs.length} runs</h1><div class="legend">${legend}</div>` +
    table(["run", "status", "strategy", "clients", "rounds", "best", "epsilon"], runs) +
    `<h2>Metrics per round</h2><div class="charts" id="charts">${charts.join("") || '<p class="muted">The runs share no metric.</p>'}</div>` +
    `<h2>Config differences</h2><p class="muted">${data.differ.length} settings differ; ${data.same} are the same.</p>` +
    (differ.length ? table(["setting", ...data.runs.map((r) => r.run_id)], differ, 'id="differ"') : "");
  timings.complete = performance.now();
  ready("compare");
}

// ------------------------------------------------------------------------------------------------ routing

async function route() {
  generation += 1;
  stopTimer();
  for (const key of Object.keys(timings)) delete timings[key];
  delete document.body.dataset.ready;
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  try {
    if (parts[0] === "run" && parts[1] && parts[2] === "client" && parts[3]) await clientView(parts[1], parts[3]);
    else if (parts[0] === "run" && parts[1]) await runView(parts[1]);
    else if (parts[0] === "compare" && parts[1]) await compareView(parts[1].split(",").filter(Boolean));
    else await runsView();
  } catch (error) {
    view.innerHTML = `<p class="error">${esc(error.message)}</p><p><a href="#/">Back to the runs</a></p>`;
    ready("error");
  }
}

window.addEventListener("hashchange", route);
route();
