// qmesh Gate dashboard: sign in with the admin key, then follow the Gate's
// snapshot stream (/api/dashboard/stream, server-sent events read with
// fetch so the key travels as a Bearer header) and redraw. Falls back to
// polling /api/dashboard when streaming fails. Every value from the Gate is
// written with textContent: service names and versions come from whatever
// answered a scan and are never trusted as markup.
"use strict";

const KEY_STORE = "qmesh.adminKey";
const POLL_MS = 2000;
const RETRY_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";

let key = sessionStorage.getItem(KEY_STORE);
let stream = null; // AbortController of the running stream
let lastUpdate = 0;
let mode = "off";
let pollTimer = null;

// -- DOM helpers ----------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name === "style") el.style.cssText = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "text") el.textContent = value;
    else el.setAttribute(name, String(value));
  }
  for (const child of children.flat()) if (child) el.append(child);
  return el;
}

const $ = (id) => document.getElementById(id);

// -- formatting --------------------------------------------------------------------------

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

function count(n) {
  if (n === null || n === undefined) return "–";
  for (const [unit, scale] of [["T", 1e12], ["B", 1e9], ["M", 1e6], ["K", 1e3]]) {
    if (n >= scale) return `${+(n / scale).toPrecision(2)}${unit}`;
  }
  return String(n);
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return "just now";
  if (seconds < 90) return `${seconds.toFixed(seconds < 10 ? 1 : 0)}s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

function duration(seconds) {
  if (seconds < 90) return `${Math.round(seconds)}s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} d`;
}

function usd(n) {
  if (n === null || n === undefined) return "–";
  if (n === 0) return "$0";
  if (Math.abs(n) >= 100) return `$${n.toFixed(0)}`;
  if (Math.abs(n) >= 1) return `$${n.toFixed(2)}`;
  return `$${n.toFixed(4)}`;
}

function rate(n) {
  if (!n) return "0";
  return n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2);
}

function pct(used, total) {
  return total ? Math.max(0, Math.min(100, (100 * used) / total)) : 0;
}

function pill(state, text) {
  return h("span", { class: `pill ${state}`, "data-pill": state, text: text || state });
}

function kindBadge(kind) {
  return h("span", { class: `badge kind-${String(kind).replace(/[^a-z0-9-]/gi, "-")}`, text: kind });
}

function meter(name, percent, value, cls) {
  const level = percent >= 90 ? "crit" : percent >= 75 ? "hot" : "";
  return h("div", { class: "meter" },
    h("span", { class: "name", text: name }),
    h("span", { class: "val", text: value }),
    h("div", { class: `bar ${cls || ""} ${level}` }, h("span", { style: `width:${percent.toFixed(1)}%` })));
}

function empty(text) {
  return h("div", { class: "empty", text });
}

// -- charts ------------------------------------------------------------------------------------

function sparkline(points, color) {
  const width = 300;
  const height = 42;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none" });
  if (!points || points.length < 2) {
    svg.append(s("line", { x1: 0, y1: height - 1, x2: width, y2: height - 1, stroke: "#2a3b57" }));
    return svg;
  }
  const t0 = points[0][0];
  const t1 = points[points.length - 1][0];
  const top = Math.max(...points.map((p) => p[1]), 1e-9);
  const x = (t) => ((t - t0) / Math.max(t1 - t0, 1e-9)) * width;
  const y = (v) => height - 2 - (v / top) * (height - 6);
  const line = points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
  svg.append(
    s("polygon", { class: "chart-area", fill: color, points: `0,${height} ${line} ${width},${height}` }),
    s("polyline", { class: "chart-line", stroke: color, points: line }),
  );
  return svg;
}

function burnChart(budget) {
  const width = 560;
  const height = 150;
  const pad = { l: 46, r: 10, t: 10, b: 20 };
  const limit = budget.limit_usd || 0;
  const start = budget.period_start;
  const end = budget.period_end;
  const now = Date.now() / 1000;
  const x = (t) => pad.l + ((t - start) / Math.max(end - start, 1)) * (width - pad.l - pad.r);
  const low = Math.min(0, ...budget.burn.map((p) => p[1]));
  const y = (v) => pad.t + (1 - (v - low) / Math.max(limit - low, 1e-9)) * (height - pad.t - pad.b);
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img",
    "aria-label": `burn-down of budget ${budget.budget}` });
  for (const frac of [0, 0.5, 1]) {
    const v = low + (limit - low) * frac;
    svg.append(
      s("line", { class: "axis", x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v), "stroke-dasharray": frac ? "2 4" : "" }),
      s("text", { class: "axis-label", x: pad.l - 6, y: y(v) + 3, "text-anchor": "end", text: usd(v) }),
    );
  }
  const fmt = (t) => new Date(t * 1000).toLocaleDateString(undefined, { month: "short", day: "numeric" });
  const fmtTime = (t) => new Date(t * 1000).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
  const label = budget.period === "day" ? fmtTime : fmt;
  svg.append(
    s("text", { class: "axis-label", x: pad.l, y: height - 5, text: label(start) }),
    s("text", { class: "axis-label", x: width - pad.r, y: height - 5, "text-anchor": "end", text: label(end) }),
    // The ideal: spend evenly to zero at the period's end.
    s("line", { x1: x(start), y1: y(limit), x2: x(end), y2: y(0), stroke: "#56677f", "stroke-dasharray": "5 5", "stroke-width": 1.2 }),
  );
  const actual = budget.burn.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
  const colour = budget.state === "block" ? "#f2606b" : budget.state === "shift" ? "#f2b84b" : "#4fd1c5";
  const last = budget.burn[budget.burn.length - 1];
  // The projection: the burn rate so far, carried to the period's end.
  const projectedLeft = limit - (budget.projected_usd || 0);
  svg.append(
    s("line", { x1: x(Math.min(last[0], now)), y1: y(last[1]), x2: x(end), y2: y(projectedLeft), stroke: colour, "stroke-dasharray": "2 3", "stroke-width": 1.2, opacity: 0.8 }),
    s("polyline", { points: `${x(start)},${y(low)} ${actual} ${x(last[0])},${y(low)}`, fill: colour, opacity: 0.1 }),
    s("polyline", { points: actual, fill: "none", stroke: colour, "stroke-width": 2 }),
    s("line", { x1: x(now), x2: x(now), y1: pad.t, y2: height - pad.b, stroke: "#8193ad", "stroke-width": 0.8, opacity: 0.6 }),
  );
  return svg;
}

// -- panels --------------------------------------------------------------------------------------

function renderHeader(d) {
  $("gate-name").textContent = d.gate.name;
  $("gate-meta").textContent = `qmesh ${d.gate.version} · ${d.gate.host} · up ${duration(d.gate.uptime_s)}`;
  const health = d.health.status;
  const pillEl = $("health-pill");
  pillEl.className = `pill ${health}`;
  pillEl.textContent = { ok: "healthy", warn: "degraded", bad: "unhealthy" }[health] || health;
  pillEl.setAttribute("data-health", health);
  document.title = `${health === "ok" ? "●" : health === "warn" ? "▲" : "■"} ${d.gate.name} · qmesh`;

  const problems = $("problems");
  const worst = d.health.problems.filter((p) => p.level !== "info");
  problems.hidden = worst.length === 0;
  problems.className = `problems ${health}`;
  problems.replaceChildren(...worst.slice(0, 6).map((p) =>
    h("div", { class: "item" }, h("strong", { text: p.what }), " ", h("span", { class: "muted", text: `— ${p.why}` }))));
}

function tile(label, value, sub, attrs) {
  return h("div", { class: "tile", ...(attrs || {}) },
    h("div", { class: "label", text: label }),
    h("div", { class: "value", text: value }),
    h("div", { class: "sub" }, sub));
}

function renderTiles(d) {
  const n = d.summary.nodes;
  const r = d.routing;
  $("tiles").replaceChildren(
    tile("Nodes", String(n.fresh + n.stale + n.gone), [
      h("span", { class: "ok", text: `${n.fresh} fresh` }), " · ",
      h("span", { class: n.stale ? "warn" : "", text: `${n.stale} stale` }), " · ",
      h("span", { class: n.gone ? "bad" : "", text: `${n.gone} gone` }),
    ], { "data-tile": "nodes" }),
    tile("GPUs", String(d.summary.gpus), d.summary.gpus ? "across fresh and stale nodes" : "CPU-only so far"),
    tile("Models", String(d.summary.models), `${d.summary.models_loaded} loaded`),
    tile("Services", String(d.summary.services),
      `${d.summary.services_fresh} answering${d.summary.unreachable ? ` · ${d.summary.unreachable} absent/unknown` : ""}`),
    tile("Decisions / s", r.available ? rate(r.decisions_per_s) : "–",
      r.available ? `${r.decisions_total} total · ${r.failovers_total} failovers` : "router not running"),
    tile("Tunnel", String(d.summary.sessions), `sessions · ${d.tunnel.resumptions} resumptions`),
  );
}

function renderNodes(d) {
  const root = $("nodes");
  $("nodes-note").textContent = `stale after ${d.thresholds.stale_after_missed} missed heartbeats, gone after ${d.thresholds.gone_after_missed}`;
  if (!d.nodes.length) {
    root.replaceChildren(empty("No daemon has reported to this Gate yet. Enroll one with `qmesh enroll daemon NAME` and run `qmesh --role daemon`."));
    return;
  }
  root.replaceChildren(...d.nodes.map((node) => {
    const meters = [];
    if (node.cpu.percent !== null && node.cpu.percent !== undefined) {
      const load = (node.cpu.load || []).map((v) => v.toFixed(2)).join(" ");
      meters.push(meter("CPU", node.cpu.percent, `${node.cpu.percent.toFixed(0)}% · ${node.cpu.cores} cores · load ${load}`));
    }
    if (node.ram.total) {
      const used = node.ram.total - node.ram.available;
      meters.push(meter("RAM", pct(used, node.ram.total), `${bytes(used)} / ${bytes(node.ram.total)}`, "mem"));
    }
    for (const gpu of node.gpus) {
      meters.push(meter(`GPU${gpu.index}`, gpu.utilization_pct || 0,
        `${gpu.utilization_pct ?? "–"}% · ${gpu.temperature_c ?? "–"}°C · ${gpu.power_w ? gpu.power_w.toFixed(0) + " W" : "–"}`, "gpu"));
      meters.push(meter("VRAM", pct(gpu.vram_used, gpu.vram_total), `${bytes(gpu.vram_used)} / ${bytes(gpu.vram_total)}`, "gpu"));
    }
    const mm = node.model_memory;
    if (mm && mm.budget) {
      meters.push(meter("Model mem", pct(mm.used, mm.budget), `${bytes(mm.used)} / ${bytes(mm.budget)} budget`, "mem"));
    }
    const hw = node.gpus.length ? node.gpus.map((g) => g.name).join(", ") : "CPU-only";
    return h("article", { class: "card", "data-node": node.name, "data-state": node.state },
      h("div", { class: "card-head" }, h("h3", { text: node.name }), pill(node.state), h("span", { class: "spacer" }),
        h("span", { class: "muted", text: `seen ${ago(node.age_s)}` })),
      h("div", { class: "card-meta" },
        node.gate ? h("span", { class: "badge", "data-gate": node.gate, text: `via ${node.gate}` }) : null,
        h("span", { text: node.address || "" }), h("span", { text: node.version || "" }), h("span", { text: hw }),
        node.bandwidth_gbps ? h("span", { text: `${node.bandwidth_gbps.toFixed(1)} GB/s RAM` }) : null),
      node.state !== "fresh" ? h("div", { class: "reason", "data-reason": "", text: node.reason }) : null,
      h("div", { class: "meters" }, meters.length ? meters : h("span", { class: "muted", text: "no telemetry yet" })),
      h("div", { class: "chips" }, node.models.length ? node.models.map((m) =>
        h("span", { class: `chip ${m.state}`, title: `${m.runtime} · ${m.state}` }, h("span", { class: "st" }), m.id,
          m.quantization ? h("span", { class: "badge quant", text: m.quantization }) : null,
          m.queue_depth ? h("span", { class: "muted", text: `q${m.queue_depth}` }) : null))
        : h("span", { class: "muted", text: "no models" })),
    );
  }));
}

function renderModels(d) {
  const table = $("models");
  const loaded = d.models.filter((m) => m.state === "loaded").length;
  $("models-note").textContent = `${d.models.length} known · ${loaded} loaded`;
  if (!d.models.length) {
    table.replaceChildren(h("tbody", {}, h("tr", {}, h("td", {}, empty("No models reported or discovered yet.")))));
    return;
  }
  table.replaceChildren(
    h("thead", {}, h("tr", {}, ["Model", "Where", "Runtime", "State", "Quant", "Params", "Context", "Size", "Queue", "Speed"].map((t) => h("th", { text: t })))),
    h("tbody", {}, d.models.map((m) =>
      h("tr", { "data-model": m.id, "data-where": m.node },
        h("td", {}, h("strong", { text: m.id }), m.family ? h("div", { class: "fine", text: m.family }) : null),
        h("td", {}, h("span", { class: "mono", text: m.node }), " ", m.node_state !== "fresh" ? pill(m.node_state) : null),
        h("td", { text: m.runtime }),
        h("td", {}, pill(m.state)),
        h("td", {}, m.quantization ? h("span", { class: "badge quant", text: m.quantization }) : "–"),
        h("td", { class: "num", text: count(m.parameters) }),
        h("td", { class: "num", text: m.context_length ? count(m.context_length) : "–" }),
        h("td", { class: "num", text: bytes(m.size_bytes) }),
        h("td", { class: "num", text: m.active || m.queue_depth ? `${m.active} + ${m.queue_depth}` : "–" }),
        h("td", { class: "num", text: m.predicted_tps ? `${m.predicted_tps.toFixed(0)} tok/s` : "–" }),
      ))),
  );
}

function renderServices(d) {
  const table = $("services");
  const disc = d.discovery;
  const note = $("discovery-note");
  $("scan-now").disabled = !disc || !disc.enabled;
  if (!disc || !disc.enabled) {
    note.textContent = "discovery is off";
  } else {
    const last = disc.last;
    note.textContent = `${disc.targets} address(es) · every ${disc.interval_s}s` +
      (last ? ` · last scan ${ago(d.gate.now - last.finished)} in ${last.duration_s.toFixed(2)}s` : " · first scan running") +
      (disc.scanning ? " · scanning…" : "");
  }
  if (!d.services.length) {
    table.replaceChildren(h("tbody", {}, h("tr", {}, h("td", {}, empty(disc && disc.enabled
      ? "Nothing found yet at the configured addresses."
      : "No discovery targets: list networks, hosts and ports under [gate.discovery] in the Gate's config.")))));
    return;
  }
  table.replaceChildren(
    h("thead", {}, h("tr", {}, ["Address", "Kind", "Software", "Models", "State", "Source", "Last seen", "Why"].map((t) => h("th", { text: t })))),
    h("tbody", {}, d.services.map((svc) =>
      h("tr", { "data-service": svc.name, "data-kind": svc.kind, "data-state": svc.state },
        h("td", {}, h("span", { class: "mono", text: svc.name })),
        h("td", {}, kindBadge(svc.kind)),
        h("td", { text: [svc.server, svc.version].filter(Boolean).join(" ") || "–" }),
        h("td", {}, svc.models.length ? h("div", { class: "chips" }, svc.models.map((m) =>
          h("span", { class: `chip ${m.state}` }, h("span", { class: "st" }), m.id,
            m.quantization ? h("span", { class: "badge quant", text: m.quantization }) : null))) : "–"),
        h("td", {}, pill(svc.state)),
        h("td", {}, svc.source, svc.managed_by ? h("div", { class: "fine", text: `driven by ${svc.managed_by}` }) : null),
        h("td", { text: svc.kind === "absent" ? "never" : ago(svc.age_s) }),
        h("td", { class: "why", text: svc.reason }),
      ))),
  );
}

function stat(label, value, points, colour) {
  return h("div", { class: "stat" },
    h("div", { class: "label", text: label }),
    h("div", { class: "value", text: value }),
    sparkline(points, colour));
}

function renderRouting(d) {
  const r = d.routing;
  const root = $("routing");
  $("routing-note").textContent = r.available ? `${r.candidates} candidates` : "";
  const parts = [
    h("div", { class: "stats" },
      stat("Decisions / s", r.available ? rate(r.decisions_per_s) : "–", r.series.decisions, "#4fd1c5"),
      stat("Model requests", String(r.llm_requests_total), r.series.requests, "#63b3ed"),
      stat("HTTP / s", rate(r.http_requests_per_s), r.series.http, "#a78bfa")),
  ];
  if (r.note) parts.push(h("p", { class: "muted", text: r.note }));
  parts.push(h("div", { class: "sub-head", text: `Recent failovers (${r.failovers_total ?? 0} total)` }));
  if (r.recent_failovers.length) {
    parts.push(h("div", {}, r.recent_failovers.slice(0, 6).map((f) =>
      h("div", { class: "failover" },
        h("span", { class: "muted", text: new Date(f.ts * 1000).toLocaleTimeString() }), "  ",
        h("span", { class: "mono", text: f.from.join(", ") }), h("span", { class: "arrow", text: "→" }),
        h("span", { class: "mono", text: f.to || "nowhere" }), " ", pill(f.outcome === "ok" ? "ok" : "bad", f.outcome),
        h("div", { class: "fine", text: f.errors.join("; ") })))));
  } else {
    parts.push(h("p", { class: "muted", text: "None: every request was answered by its first choice." }));
  }
  if (r.recent_decisions && r.recent_decisions.length) {
    parts.push(h("div", { class: "sub-head", text: "Recent decisions" }));
    parts.push(h("div", { class: "table-wrap" }, h("table", { class: "grid" },
      h("thead", {}, h("tr", {}, ["DSN", "Chosen", "Why", "Decided in"].map((t) => h("th", { text: t })))),
      h("tbody", {}, r.recent_decisions.map((x) => h("tr", {},
        h("td", { class: "mono", text: x.dsn }),
        h("td", {}, kindBadge(x.kind), " ", h("span", { class: "mono", text: x.chosen })),
        h("td", { class: "why", text: x.reason }),
        h("td", { class: "num", text: `${x.decision_us} µs` })))))));
  }
  root.replaceChildren(...parts);
}

function renderBudgets(d) {
  const b = d.budgets;
  const root = $("budgets");
  $("budgets-note").textContent = b.items.length ? `${b.items.length} configured` : "";
  if (!b.items.length) {
    root.replaceChildren(empty(b.note || "No budgets."));
    return;
  }
  root.replaceChildren(...b.items.map((x) =>
    h("div", { class: "budget", "data-budget": x.budget },
      h("div", { class: "budget-head" }, h("h3", { text: x.budget }), pill(x.state),
        h("span", { class: "muted", text: `${x.mode} · per ${x.period}` }), h("span", { class: "spacer" }),
        h("span", { text: `${usd(x.spent_usd)} of ${usd(x.limit_usd)}` })),
      meter("Spent", x.used_pct || 0, `${(x.used_pct || 0).toFixed(1)}% · ${usd(x.burn_usd_per_hour)}/h · projected ${usd(x.projected_usd)}`),
      burnChart(x),
      h("div", { class: "legend" },
        h("span", {}, h("i", { style: "background:#4fd1c5" }), "remaining"),
        h("span", {}, h("i", { style: "background:#56677f" }), "even burn"),
        h("span", {}, h("i", { style: "background:#4fd1c5;opacity:.6" }), "projection")))));
}

function renderTunnel(d) {
  const t = d.tunnel;
  $("tunnel-note").textContent = `${t.resumptions} resumptions · ${t.handshake_failures} failed handshakes`;
  const table = $("tunnel");
  if (!t.sessions.length) {
    table.replaceChildren(h("tbody", {}, h("tr", {}, h("td", {}, empty("No edge is connected.")))));
    return;
  }
  table.replaceChildren(
    h("thead", {}, h("tr", {}, ["Peer", "Role", "Connection", "Streams", "RTT"].map((x) => h("th", { text: x })))),
    h("tbody", {}, t.sessions.map((x) => h("tr", {},
      h("td", { class: "mono", text: x.peer }),
      h("td", { text: x.role }),
      h("td", {}, pill(x.attached ? "ok" : "warn", x.attached ? "attached" : "resuming")),
      h("td", { class: "num", text: x.streams }),
      h("td", { class: "num", text: x.rtt_ms === null ? "–" : `${x.rtt_ms.toFixed(1)} ms` })))),
  );
}

function render(d) {
  lastUpdate = Date.now();
  renderHeader(d);
  renderTiles(d);
  renderNodes(d);
  renderRouting(d);
  renderBudgets(d);
  renderModels(d);
  renderServices(d);
  renderTunnel(d);
  $("footer").textContent = `inventory version ${d.version} · ${new Date(d.gate.now * 1000).toLocaleString()}`;
  document.body.setAttribute("data-loaded", "true");
}

// -- data --------------------------------------------------------------------------------------------

function setMode(next, text) {
  mode = next;
  const live = $("live");
  live.className = `live ${next}`;
  $("live-text").textContent = text;
}

function refused() {
  sessionStorage.removeItem(KEY_STORE);
  key = null;
  stop();
  showLogin("The Gate refused that key.");
}

async function fetchSnapshot() {
  const response = await fetch("/api/dashboard", { headers: { authorization: `Bearer ${key}` }, cache: "no-store" });
  if (response.status === 401 || response.status === 403) { refused(); return null; }
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  return response.json();
}

async function follow() {
  const controller = new AbortController();
  stream = controller;
  const response = await fetch("/api/dashboard/stream", {
    headers: { authorization: `Bearer ${key}`, accept: "text/event-stream" },
    signal: controller.signal,
    cache: "no-store",
  });
  if (response.status === 401 || response.status === 403) { refused(); return; }
  if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
  setMode("on", "live");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data || event.startsWith("event: reconnect")) continue;
      render(JSON.parse(data));
    }
  }
}

async function run() {
  while (key) {
    try {
      await follow();
      // The Gate ended the stream (its lifetime is capped): reconnect at once.
    } catch (error) {
      if (!key || (error && error.name === "AbortError")) return;
      // Streaming failed (a proxy that buffers, the Gate restarting): poll meanwhile.
      setMode("polling", "polling");
      try {
        const d = await fetchSnapshot();
        if (d) render(d);
      } catch (_) {
        setMode("off", "Gate unreachable");
      }
      await new Promise((resolve) => { pollTimer = setTimeout(resolve, mode === "off" ? RETRY_MS : POLL_MS); });
    }
  }
}

function stop() {
  if (stream) stream.abort();
  stream = null;
  if (pollTimer) clearTimeout(pollTimer);
}

function showLogin(message) {
  $("app").hidden = true;
  $("login").hidden = false;
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("key").focus();
}

async function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  setMode("off", "connecting…");
  run();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const candidate = $("key").value.trim();
    if (!candidate) return;
    // Check the key before keeping it, so a typo says so here.
    const response = await fetch("/api/dashboard", { headers: { authorization: `Bearer ${candidate}` } });
    if (response.status === 401 || response.status === 403) {
      showLogin(response.status === 403 ? "That key is not the admin key." : "The Gate refused that key.");
      return;
    }
    key = candidate;
    sessionStorage.setItem(KEY_STORE, key);
    $("key").value = "";
    if (response.ok) render(await response.json());
    start();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    key = null;
    stop();
    showLogin("");
  });
  $("scan-now").addEventListener("click", async () => {
    const button = $("scan-now");
    button.disabled = true;
    button.textContent = "Scanning…";
    try {
      await fetch("/api/discovery/scan", { method: "POST", headers: { authorization: `Bearer ${key}` } });
    } finally {
      button.disabled = false;
      button.textContent = "Scan now";
    }
  });
  setInterval(() => {
    if (mode !== "on" || !lastUpdate) return;
    const quiet = (Date.now() - lastUpdate) / 1000;
    $("live-text").textContent = quiet < 3 ? "live" : `live · no update for ${quiet.toFixed(0)}s`;
  }, 1000);
  if (key) start();
  else showLogin("");
});
