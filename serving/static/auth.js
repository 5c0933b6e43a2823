// The API key of the pages (chat and explainers): asked for once, kept in localStorage, and sent as
// `Authorization: Bearer <key>` with every API request. A service that needs no key never asks.
"use strict";

const API_KEY_STORAGE = "nanorun-api-key";
let keyRequest = null; // the open dialog's promise, shared by the requests that wait for it

function storedApiKey() {
  return localStorage.getItem(API_KEY_STORAGE) || "";
}

function withApiKey(init) {
  const headers = { ...((init && init.headers) || {}) };
  const key = storedApiKey();
  if (key) headers.Authorization = "Bearer " + key;
  return { ...(init || {}), headers };
}

async function refusalText(response) {
  try {
    const body = await response.clone().json();
    return (body.error && body.error.message) || response.status + " " + response.statusText;
  } catch {
    return response.status + " " + response.statusText;
  }
}

// A dialog asking for the key, saying why (`reason`); resolves once one is saved, rejects with an
// Error saying the service needs a key when the dialog is dismissed.
function askForApiKey(reason) {
  if (keyRequest) return keyRequest;
  keyRequest = new Promise((resolve, reject) => {
    const dialog = document.createElement("dialog");
    dialog.id = "api-key-dialog";
    dialog.innerHTML =
      '<form method="dialog">' +
      "<h2>API key needed</h2>" +
      '<p id="api-key-reason" role="alert"></p>' +
      '<label>API key <input id="api-key" type="password" autocomplete="off" required></label>' +
      '<p class="muted">Kept in this browser (localStorage) and sent only to this service.</p>' +
      '<menu><button id="api-key-save" type="submit">Save</button> ' +
      '<button id="api-key-cancel" type="button">Cancel</button></menu>' +
      "</form>";
    dialog.querySelector("#api-key-reason").textContent = reason;
    document.body.appendChild(dialog);
    const input = dialog.querySelector("#api-key");
    let saved = false;
    dialog.querySelector("form").addEventListener("submit", () => {
      const key = input.value.trim();
      if (!key) return;
      localStorage.setItem(API_KEY_STORAGE, key);
      saved = true;
    });
    dialog.querySelector("#api-key-cancel").addEventListener("click", () => dialog.close());
    dialog.addEventListener("close", () => {
      dialog.remove();
      keyRequest = null;
      if (saved) resolve();
      else reject(new Error("this service needs an API key (" + reason + ")"));
    });
    dialog.showModal();
    input.focus();
  });
  return keyRequest;
}

// fetch() with the key; on 401 the key is asked for (again), and the request repeated with it.
async function fetchWithApiKey(url, init) {
  for (;;) {
    const response = await fetch(url, withApiKey(init));
    if (response.status !== 401) return response;
    const refused = storedApiKey();
    const text = await refusalText(response);
    if (refused) localStorage.removeItem(API_KEY_STORAGE);
    await askForApiKey(refused ? "The saved API key was refused: " + text : "This service needs an API key: " + text);
  }
}
