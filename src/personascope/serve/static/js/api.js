// Calls to the personascope server: the API key (asked once, kept in sessionStorage only), JSON requests,
// and the streamed chat completion (server-sent events).

const KEY_NAME = "personascope.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_NAME) || "";
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_NAME);
}

// One pending key question at a time, however many requests were refused.
let asking = null;

function askForKey(message) {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("api-key-input");
  const error = document.getElementById("key-error");
  error.hidden = !message;
  error.textContent = message || "";
  input.value = "";
  asking = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const key = input.value.trim();
      if (key) sessionStorage.setItem(KEY_NAME, key);
      asking = null;
      resolve(Boolean(key));
    }, { once: true });
  });
  dialog.showModal();
  input.focus();
  return asking;
}

// fetch with the key; a 401 asks for the key (again) and retries.
async function authorised(url, init = {}) {
  for (;;) {
    const headers = new Headers(init.headers || {});
    const key = apiKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(url, { ...init, headers });
    if (response.status !== 401) {
      document.getElementById("forget-key").hidden = !key;
      return response;
    }
    const had = Boolean(key);
    forgetKey();
    const given = await askForKey(had ? "That key was refused; try again." : "");
    if (!given) throw new Error("an API key is needed");
  }
}

async function failure(response) {
  let detail = response.statusText;
  try {
    const body = await response.json();
    detail = body.error?.message || body.detail || JSON.stringify(body);
  } catch { /* not JSON */ }
  return new Error(`${response.status}: ${detail}`);
}

export async function getJSON(url) {
  const response = await authorised(url);
  if (!response.ok) throw await failure(response);
  return response.json();
}

// A file behind the key (e.g. the served run's report) as a same-origin blob: URL for a frame or a link.
export async function blobURL(url) {
  const response = await authorised(url);
  if (!response.ok) throw await failure(response);
  return URL.createObjectURL(await response.blob());
}

export async function postJSON(url, body) {
  const response = await authorised(url, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// POST a streamed chat completion; onChunk gets every parsed `data:` object until `[DONE]`.
export async function streamChat(body, onChunk, signal) {
  const response = await authorised("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r/g, "");  // events may end in CRLF; JSON never holds a raw CR
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      onChunk(chunk);
    }
  }
}
