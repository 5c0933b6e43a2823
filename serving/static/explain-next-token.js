// Next-token page: the model's top-k next tokens after the prompt; a bar click appends its token.
"use strict";

const promptEl = $("prompt");
const temperatureEl = $("temperature");
const topKEl = $("top-k");

const predictLatest = latest((body) => api("next-token", body));

async function predict() {
  const body = {
    prompt: promptEl.value,
    temperature: Number(temperatureEl.value),
    top_k: Math.max(1, Math.min(200, Math.round(Number(topKEl.value)) || 1)),
  };
  try {
    const out = await predictLatest(body);
    if (!out) return;
    showError(null);
    $("stats").innerHTML =
      `<span><b>${out.prompt_tokens}</b> prompt tokens (with &lt;|bos|&gt;)</span>` +
      `<span>top ${out.tokens.length} hold <b>${(100 * out.top_mass).toFixed(1)}%</b></span>` +
      `<span>entropy <b>${out.entropy_bits.toFixed(2)}</b> bits</span>`;
    renderBars(out.tokens);
  } catch (err) { showError(err); }
}

function renderBars(tokens) {
  const max = Math.max(...tokens.map((t) => t.prob), 1e-9);
  const focused = [...$("bars").children].indexOf(document.activeElement); // a keyboard user keeps their place
  $("bars").replaceChildren(...tokens.map((t) => {
    const bar = document.createElement("button");
    bar.type = "button";
    bar.className = "bar";
    bar.dataset.id = t.id;
    bar.disabled = t.special; // special tokens stand for no text: nothing to append
    const pct = (100 * t.prob).toFixed(2) + "%";
    bar.setAttribute("aria-label", `${visible(t.text)}: ${pct}${t.special ? " (special token)" : ", append"}`);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = visible(t.text);
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = (100 * t.prob / max).toFixed(1) + "%";
    track.appendChild(fill);
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = pct;
    bar.append(label, track, prob);
    bar.addEventListener("click", () => { promptEl.value += t.text; predict(); });
    return bar;
  }));
  if (focused >= 0) { // the bar at the same place, or the next one that can be pressed
    const bars = [...$("bars").children];
    const keep = bars.slice(focused).find((b) => !b.disabled) ?? bars.find((b) => !b.disabled);
    if (keep) keep.focus();
  }
  document.body.dataset.ready = "1";
}

const debouncedPredict = debounce(predict, 200);
temperatureEl.addEventListener("input", () => {
  $("temperature-value").textContent = Number(temperatureEl.value).toFixed(1);
  debouncedPredict();
});
topKEl.addEventListener("change", predict);
promptEl.addEventListener("input", debouncedPredict);
$("predict").addEventListener("click", predict);
predict();
