// gemmakit's chat page: streams /v1/chat/completions (OpenAI's SSE chunks) into the conversation.
// Every piece of model or user text goes into the page through textContent, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), send = $("send"), stop = $("stop");
let messages = [];   // the conversation sent with every request: {role, content}
let controller = null;  // aborts the running request (Stop)

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.dataset.role = role;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function note(div, text) {
  const n = document.createElement("div");
  n.className = "note";
  n.textContent = text;
  div.appendChild(n);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function settings() {
  const num = (id) => Number($(id).value);
  return { temperature: num("temperature"), top_p: num("top_p"), max_tokens: Math.max(1, Math.floor(num("max_tokens"))) };
}

async function ask(text) {
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  const body = document.createTextNode("");
  out.appendChild(body);
  controller = new AbortController();
  send.disabled = true; stop.disabled = false;
  let answer = "", finish = null, guard = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ messages, stream: true, ...settings() }),
    });
    if (!r.ok) {
      let msg = "HTTP " + r.status;
      try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices || []) {
          if (c.delta && c.delta.content) { answer += c.delta.content; body.textContent = answer; }
          if (c.finish_reason) { finish = c.finish_reason; guard = c.guard || null; }
        }
        log.scrollTop = log.scrollHeight;
      }
    }
    if (finish === "content_filter") {
      note(out, "blocked by the guard" + (guard ? " (" + guard.side + ": " + (guard.flagged.join(", ") || guard.reason) + ")" : ""));
      messages.pop();  // the blocked exchange leaves the conversation, as in `gemmakit chat --guard`
    } else {
      messages.push({ role: "assistant", content: answer });
      if (finish === "length") note(out, "(cut at max tokens)");
    }
  } catch (e) {
    if (e.name === "AbortError") {
      note(out, "(stopped)");
      messages.push({ role: "assistant", content: answer });
    } else {
      note(out, "error: " + e.message);
      messages.pop();
    }
  } finally {
    controller = null;
    send.disabled = false; stop.disabled = true;
    out.dataset.done = "1";
    input.focus();
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  ask(text);
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
stop.addEventListener("click", () => { if (controller) controller.abort(); });
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  messages = [];
  log.replaceChildren();
});

fetch("/v1/models", { headers: headers() })
  .then((r) => (r.ok ? r.json() : null))
  .then((m) => { $("model").textContent = m && m.data[0] ? m.data[0].id : ""; })
  .catch(() => {});
