// Training page: loss and validation bits-per-byte curves per stage, from GET /api/run; polls
// while a stage is still running.
"use strict";

const POLL_MS = 5000;
const SERIES = [
  { key: "loss", label: "training loss", color: "#2563eb" },
  { key: "val_bpb", label: "validation bits per byte", color: "#dc2626" },
];

// One line chart (SVG, no library): steps on x, values on y, with min/max tick labels.
function chart(points, color, label) {
  const W = 640, H = 220, L = 52, R = 12, T = 12, B = 28;
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  const xs = points.map((p) => p.step), ys = points.map((p) => p.value);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const sx = (x) => L + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (y1 === y0 ? 0.5 : 1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg.setAttribute("aria-label", `${label}: ${points.length} points, steps ${x0} to ${x1}, from ${ys[0].toFixed(4)} to ${ys[ys.length - 1].toFixed(4)}`);
  svg.appendChild(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }));
  svg.appendChild(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }));
  svg.appendChild(svgEl("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, y1.toFixed(3)));
  svg.appendChild(svgEl("text", { x: L - 4, y: H - B, "text-anchor": "end" }, y0.toFixed(3)));
  svg.appendChild(svgEl("text", { x: L, y: H - 8 }, `step ${x0}`));
  svg.appendChild(svgEl("text", { x: W - R, y: H - 8, "text-anchor": "end" }, `step ${x1}`));
  const path = points.map((p) => `${sx(p.step).toFixed(1)},${sy(p.value).toFixed(1)}`).join(" ");
  svg.appendChild(svgEl("polyline", { points: path, fill: "none", stroke: color, "stroke-width": 1.5, class: "curve" }));
  if (points.length === 1) svg.appendChild(svgEl("circle", { cx: sx(xs[0]), cy: sy(ys[0]), r: 3, fill: color }));
  return svg;
}

function summary(run) {
  const rows = [
    ["stage, step", `${run.stage ?? "not in a run directory"}, ${run.step ?? "?"}`],
    ["model", `${run.model.n_layer} layers, ${run.model.n_head} heads (${run.model.n_kv_head} kv), width ${run.model.n_embd}, context ${run.model.sequence_len}, window pattern ${run.model.window_pattern}`],
    ["parameters", run.parameters.toLocaleString()],
    ["vocabulary", `${run.vocab_size} tokens (${run.merges} merges)`],
  ];
  const table = document.createElement("table");
  table.className = "kv";
  for (const [k, v] of rows) {
    const tr = table.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = v;
  }
  $("summary").replaceChildren(table);
}

// The greedy continuations the model wrote at each evaluation: English emerging, step by step.
function samplesTable(records) {
  const details = document.createElement("details");
  details.className = "samples";
  details.open = true;
  const summary = document.createElement("summary");
  summary.textContent = `What the model wrote (greedy samples at ${records.length} step${records.length === 1 ? "" : "s"})`;
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  for (const h of ["step", "prompt", "continuation"]) {
    const th = document.createElement("th");
    th.textContent = h;
    head.appendChild(th);
  }
  const body = table.createTBody();
  for (const record of records) {
    record.samples.forEach((s, i) => {
      const tr = body.insertRow();
      tr.insertCell().textContent = i === 0 ? String(record.step) : "";
      tr.insertCell().textContent = s.prompt;
      const text = tr.insertCell();
      text.className = "sample-text";
      text.textContent = s.text;
    });
  }
  details.append(summary, table);
  return details;
}

// The stage timeline: one bar per stage that has run, placed on the run's own time axis.
function timelineChart(stages) {
  if (!stages.length) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = "No stage has run yet.";
    return p;
  }
  const t0 = Math.min(...stages.map((s) => s.start)), t1 = Math.max(...stages.map((s) => s.end));
  const span = Math.max(t1 - t0, 1e-3), W = 640, row = 22, label = 90;
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${row * stages.length + 4}`, class: "timeline", role: "img" });
  svg.setAttribute("aria-label", `stage timeline: ${stages.map((s) => `${s.key} ${fmtSeconds(s.seconds)}`).join(", ")}`);
  stages.forEach((s, i) => {
    const x = label + ((s.start - t0) / span) * (W - label - 70), w = Math.max(2, (s.seconds / span) * (W - label - 70));
    const y = i * row + 2;
    const name = svgEl("text", { x: 0, y: y + 14, class: "axis" });
    name.textContent = s.key;
    const bar = svgEl("rect", { x, y, width: w, height: row - 6, class: `span ${s.state}` });
    const title = svgEl("title", {});
    title.textContent = `${s.key}: ${s.state}, ${fmtSeconds(s.seconds)}`;
    bar.appendChild(title);
    const time = svgEl("text", { x: x + w + 4, y: y + 14, class: "axis" });
    time.textContent = fmtSeconds(s.seconds);
    svg.append(name, bar, time);
  });
  return svg;
}

function fmtSeconds(s) {
  if (s >= 3600) return `${Math.floor(s / 3600)}h${String(Math.round((s % 3600) / 60)).padStart(2, "0")}m`;
  if (s >= 60) return `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, "0")}s`;
  return `${s.toFixed(1)}s`;
}

function render(run) {
  summary(run);
  $("timeline").replaceChildren(timelineChart(run.timeline || []));
  const charts = $("charts");
  charts.replaceChildren();
  if (!run.stages.length) charts.innerHTML = "<p class=\"muted\">No stage history found for this run.</p>";
  for (const stage of run.stages) {
    const section = document.createElement("section");
    section.className = "stage";
    section.dataset.stage = stage.key;
    const h = document.createElement("h2");
    const progress = stage.total_steps ? ` — step ${stage.step} of ${stage.total_steps}` : "";
    h.textContent = `${stage.key}: ${stage.state}${progress}`;
    section.appendChild(h);
    let drawn = 0;
    for (const s of SERIES) {
      const points = stage[s.key];
      if (!points || !points.length) continue;
      const legend = document.createElement("div");
      legend.className = "legend";
      legend.innerHTML = `<span><span class="swatch" style="background:${s.color}"></span>${s.label}</span>`;
      section.append(legend, chart(points, s.color, `${stage.key} ${s.label}`));
      drawn++;
    }
    if (!drawn) section.insertAdjacentHTML("beforeend", "<p class=\"muted\">no loss or val-bpb records</p>");
    if (stage.samples && stage.samples.length) section.appendChild(samplesTable(stage.samples));
    charts.appendChild(section);
  }
  document.body.dataset.ready = "1";
}

async function refresh() {
  try {
    const run = await api("run");
    showError(null);
    render(run);
    if (run.running) setTimeout(refresh, POLL_MS);
  } catch (err) {
    showError(err);
    setTimeout(refresh, POLL_MS);
  }
}

refresh();
