// Shared helpers of the explainer pages (plain JavaScript, no build step, no external requests).
"use strict";

const $ = (id) => document.getElementById(id);

// POST (or GET, without a body) one of the app's JSON endpoints, with the API key (auth.js); an
// error reply becomes an Error with the server's message (which names the offending field).
async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetchWithApiKey("../api/" + path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((data.error && data.error.message) || response.status + " " + response.statusText);
  return data;
}

// Show an error under the page's controls, or clear it (null).
function showError(err) {
  const el = $("error");
  el.textContent = err ? "Error: " + err.message : "";
  el.hidden = !err;
}

// Run `fn` at most once per `ms` of quiet: typing and sliders do not flood the server.
function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

// Make the latest call win: an older reply that arrives late is dropped.
function latest(fn) {
  let seq = 0;
  return async (...args) => {
    const mine = ++seq;
    const result = await fn(...args);
    return mine === seq ? result : undefined;
  };
}

function svgEl(name, attrs, text) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// A token's text made visible: spaces as ·, newlines as ↵, tabs as →.
function visible(text) {
  return text.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "→") || "∅";
}

// Render tokens as coloured spans whose text is exactly each token's characters, so the spans read
// (and copy) as the original text; the id and bytes show on hover and keyboard focus.
function renderTokens(container, tokens, detail) {
  container.replaceChildren();
  tokens.forEach((t, i) => {
    const span = document.createElement("span");
    span.className = "tok c" + (i % 6);
    span.textContent = t.text;
    span.tabIndex = 0;
    span.dataset.id = t.id;
    const info = `#${i} id ${t.id} ${JSON.stringify(t.piece)} bytes [${t.bytes.join(" ")}]`;
    span.title = info;
    span.setAttribute("aria-label", `token ${i}: ${visible(t.piece)}, id ${t.id}`);
    const show = () => { if (detail) detail.textContent = info; };
    span.addEventListener("mouseenter", show);
    span.addEventListener("focus", show);
    container.appendChild(span);
  });
}
