// modern_llm chat page. POSTs the conversation to /api/chat and reads the Server-Sent-Events reply with
// fetch + a stream reader (EventSource cannot POST). Model text is only ever set with textContent.
// URL parameters: ?q=TEXT fills the input, &autosend=1 sends it once the page has loaded.
"use strict";

const state = { messages: [], busy: false, info: null };
const $ = (id) => document.getElementById(id);

function setStatus(text) {
  $("status").textContent = text;
}

function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  el.appendChild(body);
  $("messages").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function formatScore(score) {
  return score === null || score === undefined ? "" : "verifier P(correct) = " + score.toFixed(3);
}

function numberInput(id) {
  return Number($(id).value);
}

// Parse complete "event: X\ndata: Y\n\n" frames out of buffer; return the unparsed rest.
function drainFrames(buffer, onEvent) {
  let cut;
  while ((cut = buffer.indexOf("\n\n")) !== -1) {
    const frame = buffer.slice(0, cut);
    buffer = buffer.slice(cut + 2);
    let event = "message";
    const data = [];
    for (const line of frame.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
    }
    if (data.length) onEvent(event, JSON.parse(data.join("\n")));
  }
  return buffer;
}

function showAlternatives(payload) {
  const list = $("alternatives-list");
  list.replaceChildren();
  for (const sample of payload.samples) {
    const item = document.createElement("li");
    item.className = "alternative";
    item.textContent = sample.text || "(empty)";
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = [formatScore(sample.score), sample.num_tokens + " tokens, " + sample.finish_reason]
      .filter(Boolean)
      .join(" · ");
    item.appendChild(meta);
    list.appendChild(item);
  }
}

async function send(text) {
  if (state.busy || !text.trim()) return;
  state.busy = true;
  document.body.dataset.state = "busy";
  $("send").disabled = true;
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.dataset.done = "false";
  const body = reply.querySelector(".text");
  setStatus("generating…");
  let finalText = null;
  try {
    const response = await fetch("/api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        messages: state.messages,
        max_new_tokens: numberInput("max-new-tokens"),
        temperature: numberInput("temperature"),
        alternatives: numberInput("alternatives"),
        alt_temperature: numberInput("alt-temperature"),
      }),
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({ error: response.statusText }));
      throw new Error(err.error || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    const onEvent = (event, payload) => {
      if (event === "token") {
        body.textContent += payload.text;
      } else if (event === "done") {
        finalText = payload.text;
        body.textContent = payload.text;
        reply.dataset.done = "true";
        const meta = document.createElement("span");
        meta.className = "meta";
        const score = formatScore(payload.score);
        if (score) {
          const s = document.createElement("span");
          s.className = "score";
          s.textContent = score + " · ";
          meta.appendChild(s);
        }
        meta.appendChild(
          document.createTextNode(payload.num_tokens + " tokens in " + payload.seconds + " s, " + payload.finish_reason)
        );
        reply.appendChild(meta);
        setStatus(numberInput("alternatives") > 0 ? "sampling alternatives…" : "");
      } else if (event === "alternatives") {
        showAlternatives(payload);
      } else if (event === "error") {
        throw new Error(payload.message);
      }
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = drainFrames(buffer + decoder.decode(value, { stream: true }), onEvent);
    }
    drainFrames(buffer + decoder.decode() + "\n\n", onEvent);
    if (finalText === null) throw new Error("the stream ended before the reply was complete");
    state.messages.push({ role: "assistant", content: finalText });
    setStatus("");
  } catch (err) {
    reply.dataset.done = "error";
    addMessage("error", "Error: " + err.message);
    state.messages.pop(); // the unanswered user turn is not part of the conversation
    setStatus("");
  } finally {
    state.busy = false;
    $("send").disabled = false;
    document.body.dataset.state = "idle";
  }
}

async function loadInfo() {
  try {
    const info = await (await fetch("/api/info")).json();
    state.info = info;
    $("model-name").textContent = info.model;
    $("verifier-badge").hidden = !info.verifier;
    $("max-new-tokens").value = info.defaults.max_new_tokens;
    $("alternatives").value = info.defaults.alternatives;
    $("alt-temperature").value = info.defaults.alt_temperature;
  } catch (err) {
    setStatus("could not read /api/info: " + err.message);
  }
}

function wire() {
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("reset").addEventListener("click", () => {
    if (state.busy) return;
    state.messages = [];
    $("messages").replaceChildren();
    $("alternatives-list").replaceChildren();
  });
}

async function start() {
  wire();
  await loadInfo();
  document.body.dataset.state = "idle";
  const params = new URLSearchParams(window.location.search);
  const q = params.get("q");
  if (q) {
    $("input").value = q;
    if (params.get("autosend") === "1") {
      $("input").value = "";
      await send(q);
    }
  }
}

start();
