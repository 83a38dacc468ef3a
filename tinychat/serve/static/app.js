// The chat page: keeps the conversation in memory, streams replies from /v1/chat/completions (SSE over
// fetch), renders them with the local Markdown renderer, and offers stop and regenerate. No CDN, no build.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"), regen: $("regenerate"),
    system: $("system"), temp: $("temperature"), tempValue: $("temperature-value"), maxTokens: $("max-tokens"),
    apiKey: $("api-key"), model: $("model-name"), status: $("status"), newChat: $("new-chat"), form: $("composer"),
    kbPanel: $("kb-panel"), kbSwitch: $("kb-switch"), kbInfo: $("kb-info"), kbUpload: $("kb-upload"),
  };
  const history = []; // [{role, content}]
  let model = null;
  let controller = null;

  // ---------------------------------------------------------------- settings survive a reload
  const saved = JSON.parse(localStorage.getItem("tinychat.settings") || "{}");
  if (saved.system !== undefined) ui.system.value = saved.system;
  if (saved.temperature !== undefined) ui.temp.value = saved.temperature;
  if (saved.maxTokens !== undefined) ui.maxTokens.value = saved.maxTokens;
  if (saved.apiKey !== undefined) ui.apiKey.value = saved.apiKey;
  if (saved.kb !== undefined) ui.kbSwitch.checked = saved.kb;
  function saveSettings() {
    ui.tempValue.textContent = Number(ui.temp.value).toFixed(2);
    localStorage.setItem("tinychat.settings", JSON.stringify({
      system: ui.system.value, temperature: ui.temp.value, maxTokens: ui.maxTokens.value, apiKey: ui.apiKey.value,
      kb: ui.kbSwitch.checked,
    }));
  }
  for (const x of [ui.system, ui.temp, ui.maxTokens, ui.apiKey, ui.kbSwitch]) x.addEventListener("input", saveSettings);
  ui.apiKey.addEventListener("change", loadModel);
  saveSettings();

  function headers() {
    const h = { "Content-Type": "application/json" };
    if (ui.apiKey.value) h["Authorization"] = "Bearer " + ui.apiKey.value;
    return h;
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      return (body.error && body.error.message) || resp.statusText;
    } catch (e) {
      return resp.status + " " + resp.statusText;
    }
  }

  async function loadModel() {
    try {
      const resp = await fetch("/v1/models", { headers: headers() });
      if (!resp.ok) throw new Error(await errorText(resp));
      const body = await resp.json();
      model = body.data[0].id;
      ui.model.textContent = "model: " + model + " (" + body.data[0].max_model_len + " tokens)";
    } catch (e) {
      model = null;
      ui.model.textContent = "not connected: " + e.message;
    }
    loadKb();
  }

  // ---------------------------------------------------------------- the knowledge base (serve --kb DIR)
  async function loadKb() {
    try {
      const resp = await fetch("/v1/rag/documents", { headers: headers() });
      if (!resp.ok) throw new Error(await errorText(resp));
      const body = await resp.json();
      const chunks = body.data.reduce((n, d) => n + d.chunks, 0);
      ui.kbInfo.textContent = body.data.length + " documents, " + chunks + " chunks";
      ui.kbPanel.hidden = false;
    } catch (e) {
      ui.kbPanel.hidden = true; // this server has no knowledge base
      ui.kbSwitch.checked = false;
    }
  }

  ui.kbUpload.addEventListener("change", async () => {
    const file = ui.kbUpload.files[0];
    if (!file) return;
    const form = new FormData();
    form.append("file", file);
    const h = headers();
    delete h["Content-Type"]; // the browser sets the multipart boundary
    ui.status.textContent = "uploading " + file.name + "…";
    try {
      const resp = await fetch("/v1/rag/documents", { method: "POST", headers: h, body: form });
      if (!resp.ok) throw new Error(await errorText(resp));
      ui.status.textContent = "added " + file.name;
    } catch (e) {
      ui.status.textContent = "upload failed: " + e.message;
    }
    ui.kbUpload.value = "";
    loadKb();
  });

  function showSources(div, sources, text) {
    if (!sources || !sources.length) return;
    const cited = new Set([...text.matchAll(/\[(\d+)\]/g)].map((m) => Number(m[1])));
    const box = document.createElement("details");
    box.className = "sources";
    const summary = document.createElement("summary");
    summary.textContent = "Sources (" + sources.length + ")";
    box.appendChild(summary);
    const list = document.createElement("ol");
    for (const s of sources) {
      const li = document.createElement("li");
      li.value = s.n;
      if (cited.has(s.n)) li.className = "cited";
      const name = document.createElement("b");
      name.textContent = s.name + (s.heading ? " › " + s.heading : "");
      const snippet = document.createElement("div");
      snippet.className = "snippet";
      snippet.textContent = s.text.length > 300 ? s.text.slice(0, 300) + "…" : s.text;
      li.append(name, snippet);
      list.appendChild(li);
    }
    box.appendChild(list);
    div.appendChild(box);
  }

  // ---------------------------------------------------------------- rendering
  function bubble(role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    const label = document.createElement("div");
    label.className = "role";
    label.textContent = role === "user" ? "You" : role === "assistant" ? "Assistant" : "Error";
    const body = document.createElement("div");
    body.className = "body";
    div.append(label, body);
    setText(div, role, text);
    ui.messages.appendChild(div);
    ui.messages.scrollTop = ui.messages.scrollHeight;
    return div;
  }

  function setText(div, role, text) {
    const body = div.querySelector(".body");
    if (role === "assistant") body.replaceChildren(window.renderMarkdown(text));
    else body.textContent = text;
  }

  function showThought(div, thought) {
    let box = div.querySelector("details.reasoning");
    if (!thought) return;
    if (!box) {
      box = document.createElement("details");
      box.className = "reasoning";
      box.append(document.createElement("summary"), document.createElement("div"));
      box.firstChild.textContent = "reasoning";
      div.insertBefore(box, div.querySelector(".body"));
    }
    box.lastChild.textContent = thought;  // text, never HTML
  }

  function busy(on) {
    ui.send.disabled = on;
    ui.stop.hidden = !on;
    ui.regen.hidden = on || !history.length;
  }

  // ---------------------------------------------------------------- talking to the server
  async function complete() {
    if (!model) await loadModel();
    if (!model) {
      bubble("error", "The server is not reachable: " + ui.model.textContent);
      return;
    }
    const messages = [];
    if (ui.system.value.trim()) messages.push({ role: "system", content: ui.system.value });
    messages.push(...history);
    const div = bubble("assistant", "");
    div.classList.add("streaming");
    let text = "";
    let thought = "";  // the reply's reasoning_content: shown folded above the answer
    let sources = null;
    let pending = false;
    const redraw = () => {
      pending = false;
      showThought(div, thought);
      setText(div, "assistant", text);
      ui.messages.scrollTop = ui.messages.scrollHeight;
    };
    controller = new AbortController();
    busy(true);
    ui.status.textContent = "";
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), signal: controller.signal,
        body: JSON.stringify(Object.assign({
          model, messages, stream: true, temperature: Number(ui.temp.value),
          max_tokens: Math.max(1, parseInt(ui.maxTokens.value, 10) || 256),
        }, ui.kbSwitch.checked && !ui.kbPanel.hidden ? { rag: { k: 4 } } : {})),
      });
      if (!resp.ok) throw new Error(await errorText(resp));
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let finish = null;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            if (chunk.sources) sources = chunk.sources;
            const choice = chunk.choices && chunk.choices[0];
            if (!choice) continue;
            if (choice.delta && choice.delta.reasoning_content) thought += choice.delta.reasoning_content;
            if (choice.delta && choice.delta.content) text += choice.delta.content;
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
        if (!pending) {
          pending = true;
          requestAnimationFrame(redraw);
        }
      }
      if (finish === "length") ui.status.textContent = "(stopped at the max tokens limit)";
    } catch (e) {
      if (e.name === "AbortError") {
        ui.status.textContent = "(stopped)";
      } else {
        div.remove();
        bubble("error", e.message);
        controller = null;
        busy(false);
        return;
      }
    }
    redraw();
    showSources(div, sources, text);
    div.classList.remove("streaming");
    const reply = { role: "assistant", content: text };
    if (thought) reply.reasoning_content = thought;  // sent back, the template renders the same tokens again
    history.push(reply);
    controller = null;
    busy(false);
  }

  function send() {
    const text = ui.input.value;
    if (!text.trim() || controller) return;
    ui.input.value = "";
    history.push({ role: "user", content: text });
    bubble("user", text);
    complete();
  }

  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  ui.stop.addEventListener("click", () => controller && controller.abort());
  // Regenerate: drop the last reply (or the error shown instead of one) and ask again.
  ui.regen.addEventListener("click", () => {
    if (controller || !history.length) return;
    const last = ui.messages.lastElementChild;
    if (history[history.length - 1].role === "assistant") history.pop();
    if (last && !last.classList.contains("user")) last.remove();
    complete();
  });
  ui.newChat.addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    ui.messages.replaceChildren();
    ui.status.textContent = "";
    busy(false);
  });

  loadModel();
})();
