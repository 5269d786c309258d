// dmsae-ray web UI: live updates, charts (uPlot) and the stop / resume / delete buttons.
// Plain browser JavaScript, no build step. Data from the server is only ever put into the page
// with textContent (never innerHTML): run, latent and trial values are arbitrary text.
"use strict";

const UI_HEADERS = { "X-Requested-With": "dmsae-ui" }; // api/security.py: the cookie's CSRF rule
const ACTIVE = new Set(["pending", "running", "stopping"]);
const TERMINAL = new Set(["completed", "failed", "stopped"]);
const PALETTE = ["#2458c6", "#e8710a", "#1a7f37", "#c0292b", "#7b3fbf", "#8c564b", "#d6338a",
  "#5f6b7a", "#a0a01e", "#1597a5"];

// ----------------------------------------------------------------------------- helpers

function $(sel, root = document) { return root.querySelector(sel); }
function $$(sel, root = document) { return Array.from(root.querySelectorAll(sel)); }

function readData(id) {
  const node = document.getElementById(id);
  return node ? JSON.parse(node.textContent) : null;
}

// JSON as the API's event streams send it: Python writes NaN / Infinity, JSON.parse refuses them.
function parseJSON(text) {
  try { return JSON.parse(text); } catch (err) {
    return JSON.parse(text.replace(/\bNaN\b|-?\bInfinity\b/g, "null"));
  }
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) return "–";
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString("en-US");
  return Math.abs(v) >= 1e4 ? Math.round(v).toLocaleString("en-US") : String(Number(v.toPrecision(digits)));
}

function cell(tr, value, cls) {
  const td = document.createElement("td");
  td.textContent = value;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

async function api(method, path) {
  const r = await fetch(path, { method, headers: UI_HEADERS, credentials: "same-origin" });
  let body = null;
  try { body = parseJSON(await r.text()); } catch (err) { body = null; }
  return { ok: r.ok, status: r.status, body };
}

function detailOf(r) {
  const d = r.body && r.body.detail;
  if (!d) return `HTTP ${r.status}`;
  return typeof d === "string" ? d : JSON.stringify(d);
}

function setStatus(root, status) {
  $$("[data-role=status]", root).forEach((b) => {
    b.textContent = status;
    b.className = `status status-${status}`;
  });
}

// The runs list's progress: mirrors progress_of in api/ui.py.
function progressOf(view, cyclesTotal) {
  const total = Math.max(cyclesTotal || 1, 1);
  let done = view.cycle || 0;
  const p = view.progress || {};
  let within = 0;
  let label = view.stage || "";
  if (view.stage === "train" && p.tokens_total) {
    within = Math.min(1, (p.tokens_done || 0) / p.tokens_total);
    label = `train ${Math.round(100 * within)}%`;
  } else if (view.stage === "evaluate" || view.stage === "attribute") {
    within = 1;
  }
  if (view.status === "completed") { done = total; within = 0; label = ""; }
  return { fraction: Math.min(1, (done + 0.9 * within) / total), label,
    cycles: `${Math.min(done, total)}/${total}` };
}

function setBar(root, bar) {
  const prog = $("[data-role=progress]", root);
  const label = $("[data-role=progress-label]", root);
  if (prog) prog.value = bar.fraction;
  if (label) label.textContent = bar.cycles + (bar.label ? ` · ${bar.label}` : "");
}

// ----------------------------------------------------------------------------- charts

// A uPlot chart in a <figure>, rebuilt whenever its data changes (small data, rare updates).
// The figure's data-points attribute says how many x values it shows (the browser tests read it).
class Chart {
  constructor(el, opts) {
    this.el = el;
    this.opts = Object.assign({ height: 220, xLog: false, errors: false, integerX: false }, opts);
    this.u = null;
    this.last = null;
    el.dataset.points = "0";
    this.empty(opts.empty || "no data yet");
  }

  empty(text) {
    if (this.u) { this.u.destroy(); this.u = null; }
    this.el.replaceChildren();
    const cap = document.createElement("div");
    cap.className = "chart-empty";
    cap.textContent = `${this.opts.title}: ${text}`;
    this.el.appendChild(cap);
  }

  // xs: numbers; series: [{label, ys: [number|null], se: [number|null] (optional)}]
  set(xs, series) {
    this.last = [xs, series];
    this.el.dataset.points = String(xs.length);
    const shown = series.filter((s) => s.ys.some((v) => v !== null && v !== undefined));
    if (!xs.length || !shown.length || typeof uPlot === "undefined") {
      this.empty(this.opts.empty || "no data yet");
      return;
    }
    if (this.u) this.u.destroy();
    this.el.replaceChildren();
    const o = this.opts;
    const xAxis = { label: o.xLabel };
    if (o.integerX) xAxis.incrs = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000];
    const errorBars = (u) => {
      const ctx = u.ctx;
      shown.forEach((s, i) => {
        if (!s.se) return;
        ctx.save();
        ctx.strokeStyle = PALETTE[series.indexOf(s) % PALETTE.length];
        ctx.lineWidth = 1.5 * devicePixelRatio;
        xs.forEach((x, j) => {
          const y = s.ys[j], e = s.se[j];
          if (y === null || e === null || y === undefined || e === undefined) return;
          const px = u.valToPos(x, "x", true);
          ctx.beginPath();
          ctx.moveTo(px, u.valToPos(y - e, "y", true));
          ctx.lineTo(px, u.valToPos(y + e, "y", true));
          ctx.stroke();
        });
        ctx.restore();
      });
    };
    const opts = {
      width: Math.max(260, this.el.clientWidth - 14),
      height: o.height,
      title: o.title,
      scales: { x: o.xLog ? { time: false, distr: 3 } : { time: false }, y: o.yRange ? { range: o.yRange } : {} },
      axes: [xAxis, { label: o.yLabel, size: 60 }],
      series: [{ label: o.xLabel }].concat(shown.map((s) => ({
        label: s.label,
        stroke: PALETTE[series.indexOf(s) % PALETTE.length],
        width: 2,
        spanGaps: true,
        points: { show: xs.length <= 60, size: 6 },
      }))),
      hooks: o.errors ? { draw: [errorBars] } : {},
      legend: { live: true },
    };
    this.u = new uPlot(opts, [xs].concat(shown.map((s) => s.ys)), this.el);
  }

  resize() {
    if (this.u) this.u.setSize({ width: Math.max(260, this.el.clientWidth - 14), height: this.opts.height });
  }
}

const CHARTS = [];
function chart(id, opts) {
  const el = document.getElementById(id);
  if (!el) return null;
  const c = new Chart(el, opts);
  CHARTS.push(c);
  return c;
}
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => CHARTS.forEach((c) => c.resize()), 150);
});

// ----------------------------------------------------------------------------- buttons

function setButtons(container, status) {
  if (!container) return;
  const allowed = { stop: ACTIVE.has(status), resume: status === "stopped" || status === "failed",
    delete: TERMINAL.has(status) };
  $$("button[data-action]", container).forEach((b) => { b.disabled = !allowed[b.dataset.action]; });
}

// Stop, resume and delete call the REST API; onView(action, view) gets the API's answer.
function wireActions(container, getStatus, onView) {
  if (!container) return;
  const kind = container.dataset.kind; // "distillations" or "sweeps"
  const id = container.dataset.id;
  const what = kind === "sweeps" ? "sweep" : "run";
  const msg = $("[data-role=message]", container);
  $$("button[data-action]", container).forEach((button) => {
    button.addEventListener("click", async () => {
      const action = button.dataset.action;
      if (action === "delete" && !window.confirm(`Delete ${what} ${id} with all its files?`)) return;
      $$("button[data-action]", container).forEach((b) => { b.disabled = true; });
      msg.textContent = `${action}…`;
      let r;
      try {
        r = action === "delete" ? await api("DELETE", `/v1/${kind}/${id}`)
          : await api("POST", `/v1/${kind}/${id}/${action}`);
      } catch (err) {
        r = { ok: false, status: 0, body: { detail: String(err) } };
      }
      if (r.ok && action === "delete") {
        window.location.assign(kind === "sweeps" ? "/ui/sweeps" : "/ui/");
        return;
      }
      msg.textContent = r.ok ? `${action}: HTTP ${r.status}` : `${action} refused: ${detailOf(r)}`;
      if (r.ok && r.body) onView(action, r.body);
      else setButtons(container, getStatus());
    });
  });
}

// ----------------------------------------------------------------------------- runs list

function runsPage() {
  const table = $("#runs");
  const known = new Set($$("tr[data-run-id]").map((tr) => tr.dataset.runId));
  setInterval(async () => {
    let r;
    try { r = await api("GET", "/ui/runs.json"); } catch (err) { return; }
    if (!r.ok || !r.body) return;
    const ids = r.body.items.map((v) => v.id);
    if (ids.length !== known.size || ids.some((i) => !known.has(i))) {
      window.location.reload(); // a run came or went
      return;
    }
    if (!table) return;
    r.body.items.forEach((v) => {
      const tr = $(`tr[data-run-id="${v.id}"]`, table);
      if (!tr) return;
      setStatus(tr, v.status);
      setBar(tr, v.bar);
      $("[data-role=stage]", tr).textContent = v.stage || "";
      $("[data-role=core-size]", tr).textContent = fmt(v.core_size);
    });
  }, 4000);
}

// ----------------------------------------------------------------------------- a run

function runPage() {
  const run = readData("run-data");
  const id = run.id;
  let status = run.status;
  const cycles = new Map(run.cycles.map((c) => [c.cycle, c]));
  const actions = $(".actions");
  const ev = (c, k) => (c.eval || {})[k];
  const charts = {
    core: chart("chart-core", { title: "Core size", xLabel: "cycle", yLabel: "latents", integerX: true }),
    jaccard: chart("chart-jaccard", { title: "Jaccard to the previous core", xLabel: "cycle", yLabel: "Jaccard", integerX: true, yRange: [0, 1.05] }),
    l0: chart("chart-l0", { title: "L0 and core L0", xLabel: "cycle", yLabel: "active latents / token", integerX: true }),
    fve: chart("chart-fve", { title: "Fraction of variance explained", xLabel: "cycle", yLabel: "FVE", integerX: true }),
    ce: chart("chart-ce", { title: "CE loss recovered", xLabel: "cycle", yLabel: "CE recovered", integerX: true }),
    mse: chart("chart-train-mse", { title: "Training: reconstruction MSE", xLabel: "step", yLabel: "MSE (normalised)", empty: "no training steps logged yet" }),
    trainL0: chart("chart-train-l0", { title: "Training: L0", xLabel: "step", yLabel: "L0", empty: "no training steps logged yet" }),
  };

  function renderCycles() {
    const list = Array.from(cycles.values()).sort((a, b) => a.cycle - b.cycle);
    const tbody = $("#cycles tbody");
    tbody.replaceChildren();
    list.forEach((c) => {
      const tr = document.createElement("tr");
      tr.dataset.cycle = String(c.cycle);
      cell(tr, c.cycle, "num");
      cell(tr, fmt(c.core_in), "num");
      cell(tr, fmt(c.core_size), "num");
      cell(tr, fmt(c.fraction), "num");
      cell(tr, fmt(c.jaccard), "num");
      cell(tr, fmt(ev(c, "l0")), "num");
      cell(tr, fmt(ev(c, "core_l0")), "num");
      cell(tr, fmt(ev(c, "fve")), "num");
      cell(tr, fmt(ev(c, "ce_loss_score")), "num");
      cell(tr, fmt((c.train || {}).mse), "num");
      cell(tr, fmt(c.seconds), "num");
      tbody.appendChild(tr);
    });
    $("#no-cycles").hidden = list.length > 0;
    const xs = list.map((c) => c.cycle);
    const col = (f) => list.map((c) => { const v = f(c); return v === undefined ? null : v; });
    charts.core.set(xs, [{ label: "selected (out)", ys: col((c) => c.core_size) },
      { label: "frozen (in)", ys: col((c) => c.core_in) }]);
    charts.jaccard.set(xs, [{ label: "Jaccard", ys: col((c) => c.jaccard) }]);
    charts.l0.set(xs, [{ label: "L0", ys: col((c) => ev(c, "l0")) }, { label: "core L0", ys: col((c) => ev(c, "core_l0")) }]);
    charts.fve.set(xs, [{ label: "FVE", ys: col((c) => ev(c, "fve")) }]);
    charts.ce.set(xs, [{ label: "CE recovered", ys: col((c) => ev(c, "ce_loss_score")) }]);
  }

  function apply(p) { // a progress event, or a run view from the API
    status = p.status;
    setStatus(document, status);
    setBar(document, progressOf(p, run.cycles_total));
    $("[data-role=stage]").textContent = p.stage || "–";
    $("[data-role=core-size]").textContent = fmt(p.core_size);
    if (p.ray_job_id) $("[data-role=ray-job]").textContent = p.ray_job_id;
    const err = $("[data-role=error]");
    err.textContent = p.error || "";
    err.hidden = !p.error;
    setButtons(actions, status);
    (p.cycles || []).forEach((c) => cycles.set(c.cycle, c));
    if (p.cycles) renderCycles();
  }

  let curveTimer = null;
  async function loadCurve() {
    let r;
    try { r = await api("GET", `/ui/runs/${id}/curve.json`); } catch (err) { return; }
    if (!r.ok || !r.body) return;
    const per = r.body.cycles || {};
    const names = Object.keys(per).sort((a, b) => a - b);
    const steps = Array.from(new Set(names.flatMap((n) => per[n].step))).sort((a, b) => a - b);
    const ys = (key) => names.map((n) => {
      const at = new Map(per[n].step.map((s, i) => [s, per[n][key][i]]));
      return { label: `cycle ${n}`, ys: steps.map((s) => (at.has(s) ? at.get(s) : null)) };
    });
    charts.mse.set(steps, ys("mse"));
    charts.trainL0.set(steps, ys("l0"));
    $("#curve-note").textContent = r.body.error ? `Training curve unavailable: ${r.body.error}` : "";
  }
  function pollCurve() {
    clearInterval(curveTimer);
    curveTimer = setInterval(() => { if (ACTIVE.has(status)) loadCurve(); else clearInterval(curveTimer); }, 5000);
  }

  let source = null;
  function follow() {
    if (source) source.close();
    source = new EventSource(`/v1/distillations/${id}/events`);
    source.addEventListener("cycle", (e) => {
      const c = parseJSON(e.data);
      cycles.set(c.cycle, c);
      renderCycles();
      loadCurve();
    });
    source.addEventListener("progress", (e) => apply(parseJSON(e.data)));
    source.addEventListener("end", (e) => {
      apply(parseJSON(e.data));
      source.close(); // else EventSource reconnects to a stream that ends at once
      loadCurve();
    });
  }

  wireActions(actions, () => status, (action, view) => {
    apply(view);
    if (action === "resume" || action === "stop") { follow(); pollCurve(); }
  });
  renderCycles();
  loadCurve();
  if (!TERMINAL.has(status)) { follow(); pollCurve(); }
}

// ----------------------------------------------------------------------------- core browser

function corePage() {
  const box = $("#contexts-state");
  if (!box) return;
  const { run, cycle, state } = box.dataset;
  const retry = $("#retry-contexts");
  if (retry) {
    retry.addEventListener("click", async () => {
      retry.disabled = true;
      await api("POST", `/ui/runs/${run}/core/compute.json?cycle=${cycle}`);
      window.location.reload();
    });
  }
  if (state !== "computing") return;
  const timer = setInterval(async () => {
    let r;
    try { r = await api("GET", `/ui/runs/${run}/core/status.json?cycle=${cycle}`); } catch (err) { return; }
    if (r.ok && r.body && r.body.state !== "computing") {
      clearInterval(timer);
      window.location.reload();
    }
  }, 1500);
}

// ----------------------------------------------------------------------------- transfer

const TRANSFER_METRICS = [
  ["fve", "fraction of variance explained"], ["ce_loss_score", "CE loss recovered"],
  ["explained_variance", "explained variance"], ["kl_div_score", "KL score"],
  ["mse", "MSE (raw scale)"], ["frac_alive", "fraction alive"],
];

function transferPage() {
  const data = readData("transfer-data");
  const box = $("#transfer-charts");
  if (!data || !box) return;
  const points = data.points || [];
  const variants = Array.from(new Set(points.map((p) => p.variant)));
  const l0s = Array.from(new Set(points.map((p) => p.mean.l0).filter((v) => v !== null && v > 0))).sort((a, b) => a - b);
  TRANSFER_METRICS.forEach(([key, title]) => {
    if (!points.some((p) => p.mean[key] !== null && p.mean[key] !== undefined)) return;
    const fig = document.createElement("figure");
    fig.className = "chart";
    fig.id = `chart-transfer-${key}`;
    box.appendChild(fig);
    const c = new Chart(fig, { title: `${title} vs measured L0`, xLabel: "measured L0", yLabel: key, xLog: true, errors: true });
    CHARTS.push(c);
    c.set(l0s, variants.map((v) => {
      const mine = points.filter((p) => p.variant === v);
      const at = (f) => l0s.map((x) => { const p = mine.find((q) => q.mean.l0 === x); return p ? f(p) : null; });
      return { label: v, ys: at((p) => p.mean[key]), se: at((p) => p.se[key]) };
    }));
  });
}

// ----------------------------------------------------------------------------- sweeps

function sweepPage() {
  let view = readData("sweep-data");
  const id = view.id;
  let status = view.status;
  const actions = $(".actions");
  const charts = {
    core: chart("chart-sweep-core", { title: "Core size per cycle", xLabel: "cycle", yLabel: "latents", integerX: true }),
    jaccard: chart("chart-sweep-jaccard", { title: "Jaccard per cycle", xLabel: "cycle", yLabel: "Jaccard", integerX: true, yRange: [0, 1.05] }),
    key: chart("chart-sweep-key", { title: "Final core size", xLabel: (view.keys || [])[0] || "swept key", yLabel: "latents", empty: "needs a numeric swept key and a committed cycle" }),
  };

  function render() {
    const summary = view.summary || { rows: [], cycles: {} };
    const rows = summary.rows || [];
    const cols = rows.length ? Object.keys(rows[0]).filter((k) => k !== "run_dir") : ["trial"];
    const thead = $("#trials thead");
    const tbody = $("#trials tbody");
    const htr = document.createElement("tr");
    cols.forEach((k) => { const th = document.createElement("th"); th.textContent = k; htr.appendChild(th); });
    thead.replaceChildren(htr);
    tbody.replaceChildren();
    rows.forEach((r) => {
      const tr = document.createElement("tr");
      tr.dataset.trial = r.trial;
      cols.forEach((k) => {
        const td = cell(tr, k === "error" ? (r[k] || "") : fmt(r[k], 4), typeof r[k] === "number" ? "num" : "");
        if (k === "status") { td.textContent = ""; const b = document.createElement("span"); b.className = `status status-${r[k]}`; b.textContent = r[k]; td.appendChild(b); }
      });
      tbody.appendChild(tr);
    });
    const per = summary.cycles || {};
    const trials = Object.keys(per);
    const xs = Array.from(new Set(trials.flatMap((t) => per[t].map((c) => c.cycle)))).sort((a, b) => a - b);
    const line = (t, key) => xs.map((x) => { const c = per[t].find((q) => q.cycle === x); return c && c[key] !== undefined ? c[key] : null; });
    charts.core.set(xs, trials.map((t) => ({ label: t, ys: line(t, "core_size") })));
    charts.jaccard.set(xs, trials.map((t) => ({ label: t, ys: line(t, "jaccard") })));
    const key = (view.keys || [])[0];
    const pts = rows.filter((r) => typeof r[key] === "number" && typeof r.core_size === "number").sort((a, b) => a[key] - b[key]);
    charts.key.set(pts.map((r) => r[key]), [{ label: "core size", ys: pts.map((r) => r.core_size) }]);
    const counts = summary.counts || {};
    $("[data-role=counts]").textContent = `${view.trials} (${Object.entries(counts).map(([k, n]) => `${n} ${k}`).join(", ")})`;
    setStatus(document, status);
    const err = $("[data-role=error]");
    err.textContent = view.error || "";
    err.hidden = !view.error;
    setButtons(actions, status);
  }

  let pending = null;
  async function refresh() { // the whole view, at most every 2 s
    if (pending) return;
    pending = setTimeout(async () => {
      pending = null;
      const r = await api("GET", `/v1/sweeps/${id}`);
      if (r.ok && r.body) { view = r.body; status = view.status; render(); }
    }, 2000);
  }
  let source = null;
  function follow() {
    if (source) source.close();
    source = new EventSource(`/v1/sweeps/${id}/events`);
    source.addEventListener("trial", refresh);
    source.addEventListener("progress", (e) => { status = parseJSON(e.data).status; setStatus(document, status); setButtons(actions, status); refresh(); });
    source.addEventListener("end", () => { source.close(); refresh(); });
  }
  wireActions(actions, () => status, (action, v) => {
    if (v.status) { status = v.status; setStatus(document, status); setButtons(actions, status); }
    refresh();
    if (action === "resume") follow();
  });
  render();
  if (!TERMINAL.has(status)) follow();
}

// ----------------------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  ({ runs: runsPage, run: runPage, core: corePage, transfer: transferPage, sweep: sweepPage }[page] || (() => {}))();
});
