// Tokenizer page: the run's tokens of the text, and a replay of BPE with the first N merges.
"use strict";

const textEl = $("text");
const mergesEl = $("merges");

function compareLine(name, entry) {
  return entry.available
    ? `${name}: <b>${entry.count}</b> tokens`
    : `<span class="muted" title="${entry.reason.replace(/"/g, "&quot;")}">${name}: not available offline</span>`;
}

const tokenize = latest((text) => api("tokenize", { text }));
const replay = latest((text, merges) => api("bpe-replay", { text, merges, list_merges: 60 }));

async function updateTokens() {
  try {
    const out = await tokenize(textEl.value);
    if (!out) return;
    showError(null);
    renderTokens($("tokens"), out.tokens, $("detail"));
    $("stats").innerHTML = [
      `<span><b id="token-count">${out.count}</b> tokens</span>`,
      `<span><b>${out.chars}</b> characters, <b>${out.bytes}</b> bytes</span>`,
      `<span><b>${out.chars_per_token ?? "–"}</b> chars/token</span>`,
      ...Object.entries(out.compare).map(([name, entry]) => `<span>${compareLine(name, entry)}</span>`),
    ].join("");
  } catch (err) { showError(err); }
}

async function updateReplay() {
  $("merge-count").textContent = mergesEl.value;
  try {
    const out = await replay(textEl.value, Number(mergesEl.value));
    if (!out) return;
    showError(null);
    renderTokens($("replay-tokens"), out.tokens, $("detail"));
    $("replay-count").textContent = out.count;
    $("merge-total").textContent = out.total_merges;
    const m = out.last_merge;
    $("last-merge").textContent = m
      ? `merge ${out.merges} (token ${m.id}): ${visible(m.left)} + ${visible(m.right)} → ${visible(m.text)}`
      : "no merges: every token is one byte";
    const list = $("merge-list");
    list.replaceChildren(...out.first_merges.map((m) => {
      const li = document.createElement("li");
      li.textContent = `${visible(m.left)} + ${visible(m.right)} → ${visible(m.text)}`;
      return li;
    }));
    if (!out.first_merges.length) list.innerHTML = "<li class=\"muted\">move the slider to apply merges</li>";
  } catch (err) { showError(err); }
}

async function init() {
  const run = await api("run").catch((err) => { showError(err); return null; });
  if (run) {
    mergesEl.max = run.merges;
    mergesEl.value = Math.min(run.merges, 20);
    $("merge-total").textContent = run.merges;
  }
  textEl.addEventListener("input", debounce(() => { updateTokens(); updateReplay(); }, 150));
  mergesEl.addEventListener("input", debounce(updateReplay, 60));
  await Promise.all([updateTokens(), updateReplay()]);
  document.body.dataset.ready = "1";
}

init();
