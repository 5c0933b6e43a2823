// Attention page: a tokens x tokens heatmap of one layer/head's attention probabilities.
"use strict";

const promptEl = $("prompt");
const layerEl = $("layer");
const headEl = $("head");
const fetchMap = latest((body) => api("attention", body));

function options(select, n, label) {
  select.replaceChildren(...Array.from({ length: n }, (_, i) => new Option(label(i), i)));
}

async function show() {
  try {
    const out = await fetchMap({ prompt: promptEl.value, layer: Number(layerEl.value), head: Number(headEl.value) });
    if (!out) return;
    showError(null);
    $("stats").innerHTML =
      `<span><b>${out.tokens.length}</b> tokens</span>` +
      `<span>layer ${out.layer}: ${out.window === null ? "full context" : `sliding window of <b>${out.window}</b> tokens`}</span>` +
      `<span class="muted">colour: square root of the weight (small weights stay visible)</span>`;
    draw(out);
  } catch (err) { showError(err); }
}

function rowText(out, q) {
  const top = out.weights[q].map((w, k) => [w, k]).filter(([w]) => w > 0).sort((a, b) => b[0] - a[0]).slice(0, 5);
  return `query ${q} ${JSON.stringify(out.tokens[q])} attends to: ` +
    top.map(([w, k]) => `${JSON.stringify(out.tokens[k])}#${k} ${(100 * w).toFixed(1)}%`).join(", ");
}

// The heatmap: one square per (query, key); masked squares (the future, and keys beyond a sliding
// window) are pale grey, so the causal triangle and the window's band are visible.
function draw(out) {
  const T = out.tokens.length;
  const cell = Math.max(8, Math.min(26, Math.floor(560 / T)));
  const margin = 96;
  const size = margin + T * cell;
  const svg = $("heatmap");
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${size} ${size}`);
  svg.setAttribute("width", size);
  svg.setAttribute("height", size);
  svg.setAttribute("aria-label", `attention of layer ${out.layer}, head ${out.head}: ${T} by ${T} tokens`);
  const short = (t) => visible(t).slice(0, 12);
  out.tokens.forEach((t, i) => {
    const y = margin + i * cell + cell / 2 + 4;
    const label = svgEl("text", { x: margin - 4, y, "text-anchor": "end", class: "row-label", tabindex: 0 }, short(t));
    const info = () => { $("cell-info").textContent = rowText(out, i); };
    label.addEventListener("focus", info);
    label.addEventListener("mouseenter", info);
    svg.appendChild(label);
    const x = margin + i * cell + cell / 2 + 4;
    svg.appendChild(svgEl("text", { x, y: margin - 4, transform: `rotate(-60 ${x} ${margin - 4})` }, short(t)));
  });
  out.weights.forEach((row, q) => {
    row.forEach((w, k) => {
      const masked = k > q || (out.window !== null && q - k > out.window);
      const rect = svgEl("rect", {
        x: margin + k * cell, y: margin + q * cell, width: cell - 1, height: cell - 1,
        class: "cell", "data-q": q, "data-k": k,
        fill: masked ? "#f3f3f3" : `rgba(29, 78, 216, ${Math.sqrt(w).toFixed(4)})`,
      });
      rect.appendChild(svgEl("title", {}, `${short(out.tokens[q])} → ${short(out.tokens[k])}: ${(100 * w).toFixed(2)}%`));
      rect.addEventListener("mouseenter", () => {
        $("cell-info").textContent = `query ${q} ${JSON.stringify(out.tokens[q])} → key ${k} ${JSON.stringify(out.tokens[k])}: ${(100 * w).toFixed(2)}%${masked ? " (masked)" : ""}`;
      });
      svg.appendChild(rect);
    });
  });
  document.body.dataset.ready = "1";
}

async function init() {
  try {
    const run = await api("run");
    options(layerEl, run.model.n_layer, (i) => `${i}${run.windows[i] >= 0 ? ` (window ${run.windows[i]})` : ""}`);
    options(headEl, run.model.n_head, (i) => String(i));
  } catch (err) { showError(err); return; }
  layerEl.addEventListener("change", show);
  headEl.addEventListener("change", show);
  $("show").addEventListener("click", show);
  promptEl.addEventListener("keydown", (e) => { if (e.key === "Enter") show(); });
  promptEl.addEventListener("input", debounce(show, 300));
  show();
}

init();
