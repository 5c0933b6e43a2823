// nanorun chat web UI: plain JavaScript, no build step. Talks to the OpenAI-compatible API next
// to it (v1/chat/completions with stream: true, with the API key from auth.js) and keeps the
// conversation in localStorage.
"use strict";

const HISTORY_KEY = "nanorun-chat-history";
const SETTINGS_KEY = "nanorun-chat-settings";
const $ = (id) => document.getElementById(id);
const messagesEl = $("messages");
const inputEl = $("input");
const sendEl = $("send");
const noticeEl = $("notice");
const settingsEls = { temperature: $("temperature"), top_k: $("top-k"), max_tokens: $("max-tokens") };

let history = loadJSON(HISTORY_KEY, []);
let controller = null; // AbortController of the reply being streamed

function loadJSON(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}

function saveHistory() { localStorage.setItem(HISTORY_KEY, JSON.stringify(history)); }

function saveSettings() {
  const s = {};
  for (const [k, el] of Object.entries(settingsEls)) s[k] = el.value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(s));
}

function settings() {
  return {
    temperature: Number(settingsEls.temperature.value),
    top_k: Math.round(Number(settingsEls.top_k.value)),
    max_tokens: Math.round(Number(settingsEls.max_tokens.value)),
  };
}

function addBubble(role, text) {
  const el = document.createElement("div");
  el.className = "message " + role;
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = text;
  el.appendChild(body);
  messagesEl.appendChild(el);
  messagesEl.scrollTop = messagesEl.scrollHeight;
  return el;
}

function render() {
  messagesEl.replaceChildren();
  history.forEach((m) => addBubble(m.role, m.content));
  addRegenerate();
}

function addRegenerate() {
  const last = messagesEl.querySelector(".message.assistant:last-of-type");
  messagesEl.querySelectorAll(".actions").forEach((a) => a.remove());
  if (!last || history.length === 0 || history[history.length - 1].role !== "assistant") return;
  const actions = document.createElement("div");
  actions.className = "actions";
  const button = document.createElement("button");
  button.type = "button";
  button.id = "regenerate";
  button.textContent = "Regenerate";
  button.onclick = regenerate;
  actions.appendChild(button);
  last.appendChild(actions);
}

function showNotice(text) {
  noticeEl.textContent = text || "";
  noticeEl.hidden = !text;
}

function setBusy(busy) {
  sendEl.disabled = busy;
  document.body.dataset.busy = busy ? "1" : "";
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch {
    return response.status + " " + response.statusText;
  }
}

async function reply() {
  const bubble = addBubble("assistant", "");
  const content = bubble.querySelector(".content");
  let text = "";
  setBusy(true);
  showNotice("");
  controller = new AbortController();
  try {
    const response = await fetchWithApiKey("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages: history, stream: true, ...settings() }),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    showNotice(response.headers.get("x-nanorun-notice"));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of frame.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            text += delta.content;
            content.textContent = text;
            messagesEl.scrollTop = messagesEl.scrollHeight;
          }
        }
      }
    }
    history.push({ role: "assistant", content: text });
    saveHistory();
    bubble.dataset.done = "1";
  } catch (err) {
    if (err.name === "AbortError") {
      bubble.remove();
    } else {
      bubble.className = "message error";
      content.textContent = "Error: " + err.message;
    }
  } finally {
    controller = null;
    setBusy(false);
    addRegenerate();
  }
}

function regenerate() {
  if (controller) return;
  if (history.length && history[history.length - 1].role === "assistant") history.pop();
  saveHistory();
  render();
  reply();
}

function clearChat() {
  if (controller) controller.abort();
  history = [];
  saveHistory();
  showNotice("");
  render();
}

const HELP = "Commands: /clear (new conversation), /temperature X (0..2), /topk N (0..200), /help";

function command(text) {
  const [name, arg] = text.trim().split(/\s+/, 2);
  const num = Number(arg);
  switch (name) {
    case "/clear": clearChat(); return;
    case "/help": addBubble("system", HELP); return;
    case "/temperature":
      if (arg === undefined || isNaN(num) || num < 0 || num > 2) addBubble("system", "temperature must be between 0 and 2");
      else { settingsEls.temperature.value = num; saveSettings(); addBubble("system", "temperature = " + num); }
      return;
    case "/topk":
      if (arg === undefined || !Number.isInteger(num) || num < 0 || num > 200) addBubble("system", "top-k must be an integer between 0 and 200");
      else { settingsEls.top_k.value = num; saveSettings(); addBubble("system", "top-k = " + num); }
      return;
    default: addBubble("system", "unknown command " + name + ". " + HELP);
  }
}

function send(event) {
  event.preventDefault();
  const text = inputEl.value;
  if (!text.trim() || controller) return;
  inputEl.value = "";
  if (text.trim().startsWith("/")) { command(text); return; }
  // a user turn left unanswered (its reply failed) is replaced: roles must alternate
  if (history.length && history[history.length - 1].role === "user") history.pop();
  history.push({ role: "user", content: text });
  saveHistory();
  render();
  reply();
}

$("composer").addEventListener("submit", send);
inputEl.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
$("clear").addEventListener("click", clearChat);
for (const el of Object.values(settingsEls)) el.addEventListener("change", saveSettings);

const saved = loadJSON(SETTINGS_KEY, {});
for (const [k, el] of Object.entries(settingsEls)) if (saved[k] !== undefined) el.value = saved[k];
fetchWithApiKey("v1/models").then((r) => r.json()).then((m) => {
  if (m.data && m.data[0]) $("model").textContent = m.data[0].id;
}).catch(() => {});
render();
