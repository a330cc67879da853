// The swapserve console: one ES module, no framework, no build step, nothing from a CDN.
// Every call goes to the server's own API with the key typed once per tab, so the key's
// scopes decide what works; the page only hides what the key could not do anyway.
import { lineChart } from "/ui/charts.js";

const KEY_STORE = "swapserve.key";
const state = { session: null, models: [], collections: [], timers: [], streams: [], openapi: null };

// --- small helpers -------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (k === "html") node.innerHTML = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) node.append(c instanceof Node ? c : String(c));
  return node;
}
const $ = (sel, root = document) => root.querySelector(sel);
const fmtBytes = (n) => (n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(2)} GB` : n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MB` : `${(n / 1024).toFixed(1)} kB`);
const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleString() : "never");
const num = (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));

class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.error = error;
  }
  get text() {
    const e = this.error;
    return `${this.status} ${e.code || e.type || ""}: ${e.message}${e.param ? ` (param ${e.param})` : ""}`;
  }
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

async function api(method, path, body, { raw = false } = {}) {
  const init = { method, headers: headers() };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const r = await fetch(path, init);
  if (!r.ok) {
    let err = { message: r.statusText };
    try { err = (await r.json()).error || err; } catch { /* not JSON */ }
    if (r.status === 401) askKey(err.message);
    throw new ApiError(r.status, err);
  }
  if (raw) return r;
  // JSON only: the exports are application/jsonl, one document per line, read as text
  const mime = (r.headers.get("content-type") || "").split(";")[0].trim();
  return mime === "application/json" || mime.endsWith("+json") ? r.json() : r.text();
}

function showError(target, err) {
  target.textContent = err instanceof ApiError ? err.text : String(err.message || err);
}

// Server-sent events over fetch (EventSource cannot send the Authorization header).
async function* sse(path, { method = "GET", body } = {}) {
  const init = { method, headers: headers({ Accept: "text/event-stream" }) };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const controller = new AbortController();
  init.signal = controller.signal;
  state.streams.push(controller);
  const r = await fetch(path, init);
  if (!r.ok) {
    let err = { message: r.statusText };
    try { err = (await r.json()).error || err; } catch { /* not JSON */ }
    throw new ApiError(r.status, err);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

function dropZone(label, accept, onFiles, { multiple = false } = {}) {
  const input = h("input", { type: "file", accept, multiple, hidden: true, onchange: () => onFiles([...input.files]) });
  const zone = h("div", { class: "drop", tabindex: 0 }, label, " ", h("button", { type: "button", class: "link", onclick: () => input.click() }, "or choose"), input);
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); onFiles([...e.dataTransfer.files]); });
  zone.input = input;
  return zone;
}

function download(name, text, type = "application/jsonl") {
  const a = h("a", { href: URL.createObjectURL(new Blob([text], { type })), download: name });
  document.body.append(a);
  a.click();
  a.remove();
}

const adminNote = () => h("p", { class: "admin-note" }, "Read-only: this key has the inference scope; changes need an admin key.");

// --- key and session -----------------------------------------------------------------------

function askKey(message) {
  const dialog = $("#key-dialog");
  $("#key-error").textContent = message || "";
  if (!dialog.open) dialog.showModal();
}

async function loadSession() {
  try {
    state.session = await api("GET", "/auth/session");
  } catch (err) {
    if (err.status === 401) return false;
    throw err;
  }
  const s = state.session;
  document.body.classList.toggle("readonly", !s.admin);
  $("#who-text").textContent = s.auth_enabled ? `key ${s.key_name} (${s.admin ? "admin" : "inference, read-only"})` : "no keys (open server)";
  $("#change-key").hidden = !s.auth_enabled;
  return true;
}

async function refreshModels() {
  // the models a chat can go to: /v1/models lists the embedder too (task "embed")
  try { state.models = (await api("GET", "/v1/models")).data.filter((m) => m.task !== "embed").map((m) => m.id); } catch { state.models = []; }
  try {
    state.collections = state.session.admin ? (await api("GET", "/rag/collections")).data.map((c) => c.id) : state.session.collections || [];
  } catch { state.collections = []; }
}

// --- pages ---------------------------------------------------------------------------------

const pages = { playground, adapters, training, knowledge, experiments, server };

async function route() {
  for (const t of state.timers) clearInterval(t);
  for (const c of state.streams) c.abort();
  state.timers = [];
  state.streams = [];
  const [name, query] = (location.hash.slice(1) || "playground").split("?");
  const page = pages[name] ? name : "playground";
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === page);
  const main = $("#main");
  main.replaceChildren(h("p", { class: "muted" }, "loading…"));
  main.dataset.page = page;
  await refreshModels();
  const content = await pages[page](new URLSearchParams(query || ""));
  main.replaceChildren(content);
}

// Playground: one prompt, one or more models side by side, each answer streamed.
async function playground(params) {
  const want = params.get("model");
  const picks = h("div", { class: "row", id: "pg-models" }, state.models.map((m, i) =>
    h("label", { class: "inline" }, h("input", { type: "checkbox", value: m, checked: want ? m === want : i === 0 }), m)));
  const collection = h("input", { type: "text", id: "pg-collection", list: "pg-collections", placeholder: "none" });
  const topK = h("input", { type: "number", id: "pg-topk", value: "4", min: 1, max: 100, style: "width:5em" });
  const temperature = h("input", { type: "number", id: "pg-temperature", value: "0", min: 0, max: 2, step: 0.1, style: "width:6em" });
  const maxTokens = h("input", { type: "number", id: "pg-max-tokens", value: "64", min: 1, style: "width:6em" });
  const stop = h("input", { type: "text", id: "pg-stop", placeholder: "e.g. \\n (comma-separated)" });
  const format = h("select", { id: "pg-format" }, ["text", "json_object", "json_schema"].map((f) => h("option", { value: f }, f)));
  const schema = h("textarea", { id: "pg-schema", hidden: true, placeholder: '{"type": "object", "properties": {...}}' });
  format.addEventListener("change", () => { schema.hidden = format.value !== "json_schema"; });
  const prompt = h("textarea", { id: "pg-prompt", placeholder: "Ask something…" });
  const out = h("div", { class: "columns", id: "pg-answers" });
  const conversations = new Map(); // model -> [{role, content}]

  function column(model) {
    let col = out.querySelector(`[data-model="${CSS.escape(model)}"]`);
    if (!col) {
      col = h("div", { class: "answer", "data-model": model }, h("h3", {}, model), h("div", { class: "turns" }));
      out.append(col);
    }
    return col;
  }

  async function ask(model, text) {
    const col = column(model);
    const turns = $(".turns", col);
    const history = conversations.get(model) || [];
    history.push({ role: "user", content: text });
    conversations.set(model, history);
    turns.append(h("div", { class: "turn user" }, text));
    const answer = h("div", { class: "turn assistant" });
    const meta = h("div", { class: "meta" });
    const cites = h("ol", { class: "citations", hidden: true });
    const err = h("div", { class: "error", role: "alert" });
    turns.append(answer, cites, meta, err);
    const body = {
      model, messages: history, stream: true, stream_options: { include_usage: true },
      temperature: Number(temperature.value), max_tokens: Number(maxTokens.value),
    };
    const stops = stop.value.split(",").map((s) => s.replace(/\\n/g, "\n")).filter((s) => s.length);
    if (stops.length) body.stop = stops;
    if (format.value === "json_object") body.response_format = { type: "json_object" };
    if (format.value === "json_schema") {
      try { body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse(schema.value || "{}") } }; } catch (e) { err.textContent = `schema: ${e.message}`; return; }
    }
    if (collection.value.trim()) body.rag = { collection: collection.value.trim(), top_k: Number(topK.value) };
    let text_ = "", finish = "", usage = null;
    try {
      for await (const { data } of sse("/v1/chat/completions", { method: "POST", body })) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) { err.textContent = chunk.error.message; break; }
        if (chunk.citations) {
          cites.hidden = false;
          cites.replaceChildren(...(chunk.citations.length ? chunk.citations.map((c) => h("li", {}, h("b", {}, `[${c.index}] ${c.doc_id}`), ` #${c.chunk_index} `, h("span", { class: "muted" }, `score ${num(c.score, 2)}`), " — ", c.snippet)) : [h("li", { class: "muted" }, "retrieval found nothing above min_score")]));
        }
        for (const ch of chunk.choices || []) {
          if (ch.delta && ch.delta.content) { text_ += ch.delta.content; answer.textContent = text_; }
          if (ch.finish_reason) finish = ch.finish_reason;
        }
        if (chunk.usage) usage = chunk.usage;
      }
      history.push({ role: "assistant", content: text_ });
      meta.textContent = `finish: ${finish || "?"}` + (usage ? ` · ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : "");
    } catch (e) {
      history.pop();
      showError(err, e);
    }
  }

  const send = h("button", { type: "submit", id: "pg-send" }, "Send");
  const form = h("form", { onsubmit: async (e) => {
    e.preventDefault();
    const models = [...picks.querySelectorAll("input:checked")].map((i) => i.value);
    const text = prompt.value.trim();
    if (!models.length || !text) return;
    send.disabled = true;
    await Promise.all(models.map((m) => ask(m, text)));
    send.disabled = false;
  } },
  h("h3", {}, "Models (pick two or more to compare side by side)"), picks,
  h("div", { class: "row" },
    h("label", {}, "RAG collection", collection, h("datalist", { id: "pg-collections" }, state.collections.map((c) => h("option", { value: c })))),
    h("label", {}, "passages", topK),
    h("label", {}, "temperature", temperature), h("label", {}, "max tokens", maxTokens),
    h("label", {}, "stop", stop), h("label", {}, "response format", format)),
  schema, h("h3", {}, "Prompt"), prompt,
  h("div", { class: "row" }, send, h("button", { type: "button", class: "secondary", onclick: () => { conversations.clear(); out.replaceChildren(); } }, "New chat")));
  return h("div", {}, h("section", { class: "card" }, h("h2", {}, "Playground"), form), out);
}

// Adapters: the registry, with residency, and registration by path or upload.
async function adapters() {
  const list = h("tbody", { id: "adapter-rows" });
  const err = h("p", { class: "error", role: "alert", id: "adapter-error" });
  async function load() {
    if (!state.session.admin) {
      list.replaceChildren(...state.models.filter((m) => m !== "base").map((m) => h("tr", {}, h("td", {}, m), h("td", { colspan: 8, class: "muted" }, "details need an admin key"))));
      return;
    }
    const rows = (await api("GET", "/adapters")).data;
    list.replaceChildren(...(rows.length ? rows.map((a) => h("tr", { "data-name": a.name },
      h("td", {}, h("b", {}, a.name)),
      h("td", {}, a.kind || (a.config && a.config.peft_type) || "LORA"),
      h("td", { class: "n" }, a.rank), h("td", { class: "n" }, fmtBytes(a.size_bytes)),
      h("td", {}, h("span", { class: `pill ${a.location}` }, a.location)),
      h("td", { class: "n" }, a.requests), h("td", {}, fmtTime(a.last_used)),
      h("td", {}, h("code", {}, a.name), h("div", { class: "meta" }, "lora_name for /v1/load_lora_adapter and /v1/unload_lora_adapter")),
      h("td", {}, h("button", { class: "danger admin-only", type: "button", onclick: async () => {
        if (!confirm(`Delete adapter ${a.name}?`)) return;
        err.textContent = ""; result.textContent = "";
        try { await api("DELETE", `/adapters/${encodeURIComponent(a.name)}`); await load(); } catch (e) { showError(err, e); }
      } }, "Delete")))) : [h("tr", {}, h("td", { colspan: 9, class: "muted" }, "no adapters registered"))]));
  }
  const name = h("input", { type: "text", id: "reg-name", placeholder: "support-v2", required: true });
  const path = h("input", { type: "text", id: "reg-path", placeholder: "/path/on/the/server", style: "min-width:22em" });
  const replace = h("input", { type: "checkbox", id: "reg-replace" });
  let file = null;
  const picked = h("span", { class: "muted", id: "reg-file" });
  // one source at a time: a dropped archive clears the path, typing a path drops the archive
  const zone = dropZone("Drop a .tar.gz or .zip of the adapter folder here", ".tar.gz,.tgz,.tar,.zip", (files) => { file = files[0]; path.value = ""; picked.textContent = file ? `${file.name} (${fmtBytes(file.size)})` : ""; });
  path.addEventListener("input", () => { file = null; zone.input.value = ""; picked.textContent = ""; });
  const result = h("p", { class: "ok", id: "reg-result" });
  const form = h("form", { class: "admin-only", onsubmit: async (e) => {
    e.preventDefault();
    err.textContent = ""; result.textContent = "";
    try {
      let info;
      if (file) {
        const fd = new FormData();
        fd.append("name", name.value); fd.append("replace", String(replace.checked)); fd.append("file", file, file.name);
        info = await api("POST", "/adapters", fd);
      } else {
        info = await api("POST", "/adapters", { name: name.value, path: path.value, replace: replace.checked });
      }
      result.textContent = `registered ${info.name}: rank ${info.rank}, ${info.target_modules.length} modules, ${fmtBytes(info.size_bytes)}`;
      await load();
    } catch (e2) { showError(err, e2); }
  } },
  h("h3", {}, "Register"), h("div", { class: "row" }, h("label", {}, "name", name), h("label", {}, "folder on the server", path), h("label", { class: "inline" }, replace, "replace")),
  zone, picked, h("div", { class: "row" }, h("button", { type: "submit", id: "reg-submit" }, "Register")), result);
  await load();
  return h("div", {}, h("section", { class: "card" }, h("h2", {}, "Adapters"), adminNote(), err,
    h("table", {}, h("thead", {}, h("tr", {}, ["name", "kind", "rank", "size", "lives on", "requests", "last use", "vLLM name", ""].map((t) => h("th", {}, t)))), list)),
  h("section", { class: "card admin-only" }, form));
}

// Training: dry run first, then a job; progress and the loss curve from its event stream.
async function training(params) {
  if (!state.session.admin) return h("section", { class: "card" }, h("h2", {}, "Training"), h("p", { class: "admin-note", style: "display:block" }, "Training needs an admin key."));
  const err = h("p", { class: "error", role: "alert", id: "train-error" });
  const kind = h("select", { id: "train-kind" }, ["sft", "dpo"].map((k) => h("option", { value: k }, k.toUpperCase())));
  const name = h("input", { type: "text", id: "train-name", placeholder: "house-style", required: true });
  const fields = {
    max_steps: h("input", { type: "number", id: "train-max-steps", value: 20, min: 1, style: "width:6em" }),
    learning_rate: h("input", { type: "text", id: "train-lr", value: "2e-4", style: "width:6em" }),
    r: h("input", { type: "number", id: "train-r", value: 16, min: 1, style: "width:5em" }),
    batch_size: h("input", { type: "number", id: "train-batch", value: 4, min: 1, style: "width:5em" }),
    eval_fraction: h("input", { type: "text", id: "train-eval", value: "0.1", style: "width:5em" }),
  };
  const extra = h("textarea", { id: "train-extra", placeholder: '{"max_length": 512, "beta": 0.1}' });
  let file = null;
  const picked = h("span", { class: "muted", id: "train-file" });
  const zone = dropZone("Drop the training JSONL here", ".jsonl,.json,.txt", (files) => { file = files[0]; picked.textContent = file ? `${file.name} (${fmtBytes(file.size)})` : ""; start.disabled = true; });
  const preview = h("div", { id: "train-preview" });
  const start = h("button", { type: "button", id: "train-start", disabled: true }, "Start training");
  function formData() {
    const cfg = JSON.parse(extra.value.trim() || "{}");
    for (const [k, input] of Object.entries(fields)) if (input.value !== "") cfg[k] = Number(input.value);
    const fd = new FormData();
    fd.append("name", name.value);
    fd.append("config", JSON.stringify(cfg));
    if (file) fd.append("file", file, file.name);
    return fd;
  }
  const dry = h("button", { type: "button", id: "train-dry", class: "secondary", onclick: async () => {
    err.textContent = "";
    preview.replaceChildren();
    if (!file) { err.textContent = "choose a JSONL file first"; return; }
    try {
      const r = await api("POST", `/train/${kind.value}/dry_run`, formData());
      preview.replaceChildren(
        h("h3", {}, "Dry run: which tokens carry loss"),
        h("p", {}, `${r.counts.examples} examples (${r.counts.format}); longest ${r.lengths.longest} tokens, ${r.lengths.n_truncated} over max_length ${r.lengths.max_length}. First example (line ${r.first_line}): ${r.first_tokens} tokens, ${r.first_loss_tokens} carry loss (highlighted).`),
        maskView(r), h("p", { class: "meta" }, r.trainable_tokens));
      start.disabled = false;
    } catch (e) { showError(err, e); }
  } }, "Preview (dry run)");
  start.addEventListener("click", async () => {
    err.textContent = "";
    try {
      const job = await api("POST", `/train/${kind.value}`, formData());
      start.disabled = true;
      location.hash = `#training?job=${job.id}`;
    } catch (e) { showError(err, e); }
  });
  const jobs = h("tbody", { id: "job-rows" });
  const detail = h("div", { id: "job-detail" });
  async function loadJobs() {
    const rows = (await api("GET", "/train/jobs")).data.sort((a, b) => (b.created_at || 0) - (a.created_at || 0));
    jobs.replaceChildren(...rows.map((j) => h("tr", { class: `clickable${params.get("job") === j.id ? " selected" : ""}`, "data-job": j.id, onclick: () => { location.hash = `#training?job=${j.id}`; } },
      h("td", {}, j.name), h("td", {}, j.kind), h("td", {}, h("span", { class: `pill ${j.state}` }, j.state)),
      h("td", {}, h("div", { class: "progress" }, h("div", { style: `width:${Math.round((j.progress || 0) * 100)}%` }))),
      h("td", { class: "n" }, `${j.step}/${j.total_steps ?? "?"}`), h("td", { class: "n" }, num(j.loss)))));
  }
  await loadJobs();
  state.timers.push(setInterval(() => loadJobs().catch(() => {}), 5000));
  if (params.get("job")) followJob(params.get("job"), detail).catch((e) => showError(err, e));
  return h("div", { class: "split2" },
    h("section", { class: "card" }, h("h2", {}, "New training job"), err,
      h("div", { class: "row" }, h("label", {}, "method", kind), h("label", {}, "adapter name", name)),
      zone, picked,
      h("div", { class: "row" }, Object.entries(fields).map(([k, input]) => h("label", {}, k, input))),
      h("label", { class: "muted" }, "more config (JSON)"), extra,
      h("div", { class: "row" }, dry, start), preview),
    h("div", {}, h("section", { class: "card" }, h("h2", {}, "Jobs"), h("table", {}, h("thead", {}, h("tr", {}, ["adapter", "method", "state", "progress", "step", "loss"].map((t) => h("th", {}, t)))), jobs)), detail));
}

function maskView(r) {
  // text between the markers carries loss: shown highlighted
  const pre = h("pre", { id: "train-mask" });
  const parts = r.rendered.split(r.loss_open);
  pre.append(parts[0]);
  for (const part of parts.slice(1)) {
    const [inside, ...rest] = part.split(r.loss_close);
    pre.append(h("span", { class: "loss" }, inside), rest.join(r.loss_close));
  }
  return pre;
}

async function followJob(id, detail) {
  let job = await api("GET", `/train/jobs/${id}`);
  const bar = h("div", { style: `width:${Math.round(job.progress * 100)}%` });
  const status = h("p", { id: "job-status" });
  const chart = h("div", { class: "chart", id: "loss-chart" });
  const card = h("div", { id: "job-card" });
  const loss = job.loss_history.map((p) => [p.step, p.loss]);
  // the evals during training (eval_steps), live from `eval_loss` events; the eval after
  // training (result.eval) is one more point at the last step when there were none
  const evalLoss = (job.eval_loss_history || []).map((p) => [p.step, p.eval_loss]);
  let finalEval = null;
  const cancel = h("button", { type: "button", class: "danger", id: "job-cancel", onclick: async () => {
    try { job = await api("DELETE", `/train/jobs/${id}`); render(); } catch (e) { status.textContent = e.text || e.message; }
  } }, "Cancel");
  function render() {
    bar.style.width = `${Math.round((job.progress || 0) * 100)}%`;
    // the eval after training measures eval loss (adapter, base) before any answer: on a CPU
    // that alone takes minutes, so say so rather than show "answers 0/N" all that time
    const phase = job.phase !== "eval" ? "" : job.eval_done ? ` · eval answers ${job.eval_done}/${job.eval_total ?? "?"}` : ` · eval: loss, then ${job.eval_total ?? "?"} answers`;
    status.replaceChildren(h("span", { class: `pill ${job.state}` }, job.state), ` step ${job.step}/${job.total_steps ?? "?"} · loss ${num(job.loss)}${job.eval_loss != null ? ` · eval loss ${num(job.eval_loss)}` : ""} · eta ${job.eta_s ? `${Math.round(job.eta_s)} s` : "–"}${phase}`, job.error ? h("div", { class: "error" }, job.error) : "");
    const series = [{ name: "train loss", points: loss }];
    if (evalLoss.length) series.push({ name: "eval loss", points: evalLoss });
    else if (finalEval !== null) series.push({ name: "eval loss", points: [[job.step || job.total_steps || 1, finalEval]], dots: true });
    chart.replaceChildren(lineChart(series, { xLabel: "step", yLabel: "loss", title: `${job.name}: loss` }));
    cancel.hidden = ["succeeded", "failed", "cancelled", "interrupted"].includes(job.state);
  }
  detail.replaceChildren(h("section", { class: "card" }, h("h2", {}, `Job ${job.name}`), h("div", { class: "progress", id: "job-progress" }, bar), status, chart, cancel, card));
  render();
  const since = 0;
  try {
    for await (const { event, data } of sse(`/train/jobs/${id}/events?since=${since}`)) {
      const ev = JSON.parse(data);
      if (event === "progress") {
        Object.assign(job, { step: ev.step, total_steps: ev.total_steps, progress: ev.progress, eta_s: ev.eta_s, phase: ev.phase, eval_done: ev.eval_done, eval_total: ev.eval_total });
        if (ev.loss !== null && ev.phase === "train") { job.loss = ev.loss; if (!loss.length || loss[loss.length - 1][0] < ev.step) loss.push([ev.step, ev.loss]); }
      } else if (event === "eval_loss") {
        job.eval_loss = ev.eval_loss;
        if (!evalLoss.length || evalLoss[evalLoss.length - 1][0] < ev.step) evalLoss.push([ev.step, ev.eval_loss]);
      } else if (event === "state") {
        if (!["started", "running"].includes(ev.state) || job.state === "queued") job.state = ev.state === "started" ? "running" : ev.state;
        if (ev.error) job.error = ev.error;
      } else if (event === "end") {
        job = ev;
      }
      render();
    }
  } catch (e) { if (e.name !== "AbortError") status.append(h("div", { class: "error" }, e.text || e.message)); return; }
  job = await api("GET", `/train/jobs/${id}`);
  const ev = job.result && job.result.eval;
  if (ev && ev.eval_loss) finalEval = ev.eval_loss.adapter ?? null;
  render();
  if (job.state === "succeeded") {
    const c = await api("GET", `/train/jobs/${id}/card`);
    card.replaceChildren(h("h3", {}, "Card"),
      h("dl", { class: "kv", id: "card-facts" },
        h("dt", {}, "base model"), h("dd", {}, (c.base_model && (c.base_model.id || c.base_model.path)) || "–"),
        h("dt", {}, "data"), h("dd", {}, c.data ? `${c.data.examples ?? (c.data.counts && c.data.counts.examples) ?? "?"} examples, sha256 ${String(c.data.sha256 || "").slice(0, 12)}…` : "–"),
        h("dt", {}, "final loss"), h("dd", {}, num(job.result.final_loss)),
        h("dt", {}, "eval loss (base → adapter)"), h("dd", {}, ev && ev.eval_loss ? `${num(ev.eval_loss.base)} → ${num(ev.eval_loss.adapter)}` : "no eval"),
        h("dt", {}, "wall time"), h("dd", {}, `${num(job.result.wall_time_s, 1)} s`),
        h("dt", {}, "registered"), h("dd", {}, job.registered ? "yes: served by name" : job.registration_error || "no")),
      h("details", {}, h("summary", {}, "the whole card"), h("pre", {}, JSON.stringify(c, null, 2))),
      job.registered ? h("button", { type: "button", id: "try-adapter", onclick: () => { location.hash = `#playground?model=${encodeURIComponent(job.name)}`; } }, "Try it in the playground") : "");
  }
}

// Knowledge: collections, uploads, search, documents.
async function knowledge(params) {
  const err = h("p", { class: "error", role: "alert", id: "kb-error" });
  const selected = params.get("c") || state.collections[0] || "";
  const rows = h("tbody", { id: "kb-rows" });
  // the counts change with every upload and delete below: reloaded after each
  async function loadCollections() {
    if (!state.session.admin) return;
    const cols = (await api("GET", "/rag/collections")).data;
    rows.replaceChildren(...cols.map((c) => h("tr", { class: `clickable${c.id === selected ? " selected" : ""}`, "data-collection": c.id, onclick: () => { location.hash = `#knowledge?c=${encodeURIComponent(c.id)}`; } },
      h("td", {}, h("b", {}, c.id)), h("td", { class: "n" }, c.documents), h("td", { class: "n" }, c.chunks), h("td", {}, c.index_kind), h("td", { class: "muted" }, c.embedder))));
  }
  await loadCollections();
  const newName = h("input", { type: "text", id: "kb-new", placeholder: "notes" });
  const create = h("form", { class: "row admin-only", onsubmit: async (e) => {
    e.preventDefault();
    try { await api("POST", "/rag/collections", { name: newName.value }); location.hash = `#knowledge?c=${encodeURIComponent(newName.value)}`; } catch (e2) { showError(err, e2); }
  } }, h("label", {}, "new collection", newName), h("button", { type: "submit" }, "Create"));
  const target = h("input", { type: "text", id: "kb-collection", value: selected, list: "kb-list" });
  const query = h("input", { type: "text", id: "kb-query", placeholder: "what does the reactor run on?", style: "min-width:24em" });
  const topK = h("input", { type: "number", id: "kb-topk", value: 5, min: 1, max: 100, style: "width:5em" });
  const hits = h("ol", { class: "hits", id: "kb-hits" });
  const search = h("form", { class: "row", onsubmit: async (e) => {
    e.preventDefault();
    err.textContent = "";
    try {
      const r = await api("POST", `/rag/collections/${encodeURIComponent(target.value)}/search`, { query: query.value, top_k: Number(topK.value) });
      hits.replaceChildren(...(r.data.length ? r.data.map((x) => h("li", {}, h("span", { class: "score" }, num(x.score, 3)), h("b", {}, x.doc_id), ` #${x.chunk_index}`, h("div", {}, x.text))) : [h("li", { class: "muted" }, "no hits")]));
    } catch (e2) { showError(err, e2); }
  } }, h("label", {}, "collection", target, h("datalist", { id: "kb-list" }, state.collections.map((c) => h("option", { value: c })))), h("label", {}, "query", query), h("label", {}, "top k", topK), h("button", { type: "submit", id: "kb-search" }, "Search"));
  const docs = h("tbody", { id: "kb-docs" });
  const upload = h("div", { class: "admin-only" });
  async function loadDocs() {
    if (!selected || !state.session.admin) return;
    const r = await api("GET", `/rag/collections/${encodeURIComponent(selected)}/documents?limit=1000`);
    docs.replaceChildren(...r.data.map((d) => h("tr", {}, h("td", {}, d.id), h("td", { class: "n" }, d.chunks), h("td", { class: "n" }, d.chars), h("td", { class: "muted" }, JSON.stringify(d.metadata)),
      h("td", {}, h("button", { type: "button", class: "danger admin-only", onclick: async () => {
        err.textContent = "";
        try { await api("DELETE", `/rag/collections/${encodeURIComponent(selected)}/documents/${encodeURIComponent(d.id)}`); await Promise.all([loadDocs(), loadCollections()]); } catch (e) { showError(err, e); }
      } }, "Delete")))));
  }
  if (selected && state.session.admin) {
    const status = h("p", { class: "ok", id: "kb-upload-result" });
    upload.append(h("h3", {}, `Add files to ${selected}`), dropZone("Drop .md, .txt, .json or .jsonl files here", ".md,.txt,.json,.jsonl", async (files) => {
      err.textContent = ""; status.textContent = `uploading ${files.length} file(s)…`;
      const fd = new FormData();
      for (const f of files) fd.append("files", f, f.name);
      try {
        const r = await api("POST", `/rag/collections/${encodeURIComponent(selected)}/documents`, fd);
        status.textContent = `added ${r.added}, replaced ${r.replaced}, unchanged ${r.unchanged}; ${r.chunks} chunks embedded; ${r.documents} documents now`;
        await Promise.all([loadDocs(), loadCollections()]);
      } catch (e) { status.textContent = ""; showError(err, e); }
    }, { multiple: true }), status);
    await loadDocs();
  }
  return h("div", {},
    h("section", { class: "card" }, h("h2", {}, "Knowledge"), adminNote(), err,
      state.session.admin ? h("table", {}, h("thead", {}, h("tr", {}, ["collection", "documents", "chunks", "index", "embedder"].map((t) => h("th", {}, t)))), rows) : h("p", { class: "muted" }, "Listing collections needs an admin key; search one by name."),
      create),
    h("section", { class: "card" }, h("h2", {}, "Search"), search, hits),
    selected && state.session.admin ? h("section", { class: "card" }, h("h2", {}, `Documents in ${selected}`), upload,
      h("table", {}, h("thead", {}, h("tr", {}, ["id", "chunks", "chars", "metadata", ""].map((t) => h("th", {}, t)))), docs)) : "");
}

// Experiments: offline runs with the report's charts, and online splits.
async function experiments(params) {
  if (!state.session.admin) return h("section", { class: "card" }, h("h2", {}, "Experiments"), h("p", { class: "admin-note", style: "display:block" }, "Experiments and splits need an admin key."));
  const err = h("p", { class: "error", role: "alert", id: "exp-error" });
  let questions = null;
  const picked = h("span", { class: "muted", id: "exp-file" });
  const zone = dropZone("Drop a questions JSONL ({question, references, doc_id?} per line)", ".jsonl", async (files) => {
    questions = (await files[0].text()).split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l));
    picked.textContent = `${questions.length} questions from ${files[0].name}`;
  });
  const arms = h("tbody", { id: "exp-arms" });
  function armRow(name = "", model = "base", collection = "") {
    const row = h("tr", {},
      h("td", {}, h("input", { type: "text", class: "arm-name", value: name, style: "width:9em" })),
      h("td", {}, h("select", { class: "arm-model" }, state.models.map((m) => h("option", { value: m, selected: m === model }, m)))),
      h("td", {}, h("select", { class: "arm-rag" }, h("option", { value: "" }, "none"), state.collections.map((c) => h("option", { value: c, selected: c === collection }, c)))),
      h("td", {}, h("button", { type: "button", class: "link", onclick: () => row.remove() }, "remove")));
    arms.append(row);
  }
  armRow("base", "base");
  if (state.collections.length) armRow("base+rag", "base", state.collections[0]);
  else armRow("base-2", "base");
  const maxTokens = h("input", { type: "number", id: "exp-max-tokens", value: 32, min: 1, style: "width:6em" });
  const topK = h("input", { type: "number", id: "exp-topk", value: 4, min: 1, max: 100, style: "width:5em" });
  const name = h("input", { type: "text", id: "exp-name", placeholder: "optional" });
  const startBtn = h("button", { type: "button", id: "exp-start", onclick: async () => {
    err.textContent = "";
    if (!questions) { err.textContent = "choose a questions file first"; return; }
    const body = { questions, max_tokens: Number(maxTokens.value), arms: [...arms.children].map((r) => {
      const a = { name: $(".arm-name", r).value, model: $(".arm-model", r).value };
      if ($(".arm-rag", r).value) a.rag = { collection: $(".arm-rag", r).value, top_k: Number(topK.value) };
      return a;
    }) };
    if (name.value) body.name = name.value;
    try { const exp = await api("POST", "/ab/experiments", body); location.hash = `#experiments?exp=${exp.id}`; } catch (e) { showError(err, e); }
  } }, "Start experiment");
  const list = h("tbody", { id: "exp-rows" });
  async function loadList() {
    const rows = (await api("GET", "/ab/experiments")).data.sort((a, b) => b.created - a.created);
    list.replaceChildren(...rows.map((x) => h("tr", { class: `clickable${params.get("exp") === x.id ? " selected" : ""}`, onclick: () => { location.hash = `#experiments?exp=${x.id}`; } },
      h("td", {}, x.name || x.id), h("td", {}, h("span", { class: `pill ${x.status}` }, x.status)),
      h("td", {}, h("div", { class: "progress" }, h("div", { style: `width:${Math.round(x.progress.fraction * 100)}%` }))), h("td", { class: "n" }, `${x.progress.done}/${x.progress.total}`), h("td", {}, x.arms.map((a) => a.name).join(", ")))));
  }
  await loadList();
  const detail = h("div", { id: "exp-detail" });
  if (params.get("exp")) showExperiment(params.get("exp"), detail, loadList).catch((e) => showError(err, e));
  const splits = await splitsSection();
  return h("div", {},
    h("div", { class: "split2" },
      h("section", { class: "card" }, h("h2", {}, "New experiment"), err, zone, picked,
        h("table", {}, h("thead", {}, h("tr", {}, ["arm", "model", "RAG collection", ""].map((t) => h("th", {}, t)))), arms),
        h("div", { class: "row" }, h("button", { type: "button", class: "secondary", onclick: () => armRow(`arm${arms.children.length + 1}`) }, "Add arm"), h("label", {}, "max tokens", maxTokens), h("label", {}, "passages (RAG arms)", topK), h("label", {}, "name", name), startBtn)),
      h("section", { class: "card" }, h("h2", {}, "Experiments"), h("table", {}, h("thead", {}, h("tr", {}, ["name", "status", "progress", "done", "arms"].map((t) => h("th", {}, t)))), list))),
    detail, splits);
}

async function showExperiment(id, detail, refresh) {
  const box = h("section", { class: "card" });
  detail.replaceChildren(box);
  const draw = async () => {
    const x = await api("GET", `/ab/experiments/${id}`);
    const head = [h("h2", {}, `Experiment ${x.name || x.id}`), h("div", { class: "progress" }, h("div", { style: `width:${Math.round(x.progress.fraction * 100)}%` })),
      h("p", {}, h("span", { class: `pill ${x.status}` }, x.status), ` ${x.progress.done}/${x.progress.total} questions`, x.error ? h("span", { class: "error" }, ` ${x.error}`) : "")];
    if (x.status === "running") {
      head.push(h("button", { type: "button", class: "danger", onclick: async () => { await api("DELETE", `/ab/experiments/${id}`); } }, "Cancel"));
      box.replaceChildren(...head);
      return false;
    }
    if (!x.summary) { box.replaceChildren(...head); return true; }
    // the report's own charts (server/ab/report.py), inline
    const html = await api("GET", `/ab/experiments/${id}/report`);
    const doc = new DOMParser().parseFromString(html, "text/html");
    const charts = h("div", { class: "chart", id: "exp-charts" }, ...[...doc.querySelectorAll("svg")].map((s) => document.importNode(s, true)));
    const metrics = ["exact_match", "token_f1", "rouge_l"];
    const ci = (d) => `${num(d.mean)} [${num(d.low)}, ${num(d.high)}]`;
    const diff = (d) => `${d.diff >= 0 ? "+" : ""}${num(d.diff)} [${num(d.low)}, ${num(d.high)}]`;
    const table = h("table", { id: "exp-summary" }, h("thead", {}, h("tr", {}, ["arm", "exact match", "token F1", "ROUGE-L", "TTFT mean", "latency p50 / p95", "errors"].map((t) => h("th", {}, t)))),
      h("tbody", {}, Object.entries(x.summary.arms).map(([n, a]) => h("tr", {}, h("td", {}, n), metrics.map((m) => h("td", { class: "n" }, ci(a.scores[m]))), h("td", { class: "n" }, `${num(a.ttft_s.mean, 2)} s`), h("td", { class: "n" }, `${num(a.latency_s.p50, 2)} / ${num(a.latency_s.p95, 2)} s`), h("td", { class: "n" }, a.errors)))));
    const comps = h("table", {}, h("thead", {}, h("tr", {}, ["difference (95% paired bootstrap)", ...metrics].map((t) => h("th", {}, t)))),
      h("tbody", {}, x.summary.comparisons.map((c) => h("tr", {}, h("td", {}, `${c.arm} − ${c.baseline}`), metrics.map((m) => h("td", { class: "n" }, diff(c[m])))))));
    box.replaceChildren(...head, charts, table, comps,
      h("button", { type: "button", class: "secondary", onclick: () => window.open(URL.createObjectURL(new Blob([html], { type: "text/html" }))) }, "Open the full report"));
    return true;
  };
  if (!(await draw())) {
    const t = setInterval(async () => {
      try { if (await draw()) { clearInterval(t); refresh(); } } catch (e) { clearInterval(t); box.append(h("p", { class: "error" }, e.text || e.message)); }
    }, 2000);
    state.timers.push(t);
  }
}

async function splitsSection() {
  const err = h("p", { class: "error", role: "alert" });
  const rows = h("tbody", { id: "split-rows" });
  const paths = state.openapi ? Object.keys(state.openapi.paths) : [];
  // DPO pairs always; KTO (single rated answers) where this server has that export
  const exports = paths.filter((p) => p.startsWith("/ab/splits/{name}/") && p.endsWith(".jsonl"));
  async function load() {
    const list = (await api("GET", "/ab/splits")).data;
    rows.replaceChildren(...(list.length ? list.map((s) => h("tr", {},
      h("td", {}, h("b", {}, s.name), h("div", { class: "meta" }, `model "${s.model}"`)),
      h("td", {}, s.arms.map((a) => h("div", {}, `${a.name}: ${a.model}${a.rag ? ` + ${a.rag.collection}` : ""} (weight ${a.weight})`))),
      h("td", {}, s.arms.map((a) => h("div", { class: "n" }, `${a.name}: ${s.counts[a.name] ?? 0} responses, ${(s.feedback || {})[a.name] ?? 0} feedback`))),
      h("td", {}, exports.map((p) => {
        const file = p.split("/").pop();
        return h("button", { type: "button", class: "secondary", onclick: async () => {
          try { download(`${s.name}-${file}`, await api("GET", p.replace("{name}", encodeURIComponent(s.name)))); } catch (e) { showError(err, e); }
        } }, file.startsWith("pref") ? "DPO pairs" : file.replace(".jsonl", "").toUpperCase());
      })))) : [h("tr", {}, h("td", { colspan: 4, class: "muted" }, "no splits"))]));
  }
  const name = h("input", { type: "text", placeholder: "support", id: "split-name" });
  const spec = h("input", { type: "text", placeholder: "a=base:1, b=my-adapter:1", id: "split-arms", style: "min-width:20em" });
  const create = h("form", { class: "row", onsubmit: async (e) => {
    e.preventDefault();
    err.textContent = "";
    const arms = spec.value.split(",").map((s) => s.trim()).filter(Boolean).map((s) => {
      const [armName, rest] = s.split("=");
      const [model, weight] = (rest || "").split(":");
      return { name: armName.trim(), model: (model || "").trim(), weight: weight ? Number(weight) : 1 };
    });
    try { await api("POST", "/ab/splits", { name: name.value, arms }); await load(); } catch (e2) { showError(err, e2); }
  } }, h("label", {}, "split name", name), h("label", {}, "arms (name=model:weight, ...)", spec), h("button", { type: "submit" }, "Create split"));
  await load();
  return h("section", { class: "card" }, h("h2", {}, "Online splits"),
    h("p", { class: "muted" }, 'Clients send model "ab:<split>"; each user sticks to one arm. Feedback (POST /ab/feedback) becomes training data.'),
    err, h("table", {}, h("thead", {}, h("tr", {}, ["split", "arms", "traffic and feedback", "export"].map((t) => h("th", {}, t)))), rows), create);
}

// Server: /ready facts and the load over the last minutes.
async function server() {
  const facts = h("dl", { class: "kv", id: "ready-facts" });
  const now = h("p", { id: "load-now" });
  const chart = h("div", { class: "chart", id: "tps-chart" });
  const chart2 = h("div", { class: "chart", id: "queue-chart" });
  async function draw() {
    let ready;
    try { ready = await api("GET", "/ready"); } catch (e) { ready = { status: e.error ? e.error.message : "unreachable" }; }
    const show = { status: ready.status, model: ready.model, engine: ready.engine, device: ready.device, quantization: ready.quantization, "context window": ready.max_model_len,
      parameters: ready.num_parameters && ready.num_parameters.toLocaleString(), "weights in memory": ready.weights_bytes && `${fmtBytes(ready.weights_bytes)} (${ready.weights_vs_fp32} of float32)`, "process RSS": ready.process_rss_bytes && fmtBytes(ready.process_rss_bytes) };
    facts.replaceChildren(...Object.entries(show).filter(([, v]) => v !== undefined).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]));
    const hist = await api("GET", "/metrics/history");
    const pts = hist.data;
    const t0 = pts.length ? pts[pts.length - 1].time : 0;
    const x = (p) => (p.time - t0) / 60;
    const last = pts[pts.length - 1];
    now.textContent = last ? `now: ${num(last.completion_tokens_per_s, 1)} tokens/s generated, ${num(last.requests_per_s, 2)} requests/s, queue depth ${last.queue_depth}, ${last.running} running, last batch ${last.batch_size} rows (a sample every ${hist.interval_s} s)` : `no samples yet (one every ${hist.interval_s} s)`;
    chart.replaceChildren(lineChart([{ name: "completion tokens/s", points: pts.map((p) => [x(p), p.completion_tokens_per_s]) }, { name: "prompt tokens/s", points: pts.map((p) => [x(p), p.prompt_tokens_per_s]) }], { xLabel: "minutes (0 = now)", yLabel: "tokens/s", title: "Throughput" }));
    chart2.replaceChildren(lineChart([{ name: "queue depth", points: pts.map((p) => [x(p), p.queue_depth]) }, { name: "batch size", points: pts.map((p) => [x(p), p.batch_size]) }], { xLabel: "minutes (0 = now)", yLabel: "rows", title: "Queue and batch" }));
  }
  await draw();
  state.timers.push(setInterval(() => draw().catch(() => {}), 5000));
  return h("div", {}, h("section", { class: "card" }, h("h2", {}, "Server"), facts), h("section", { class: "card" }, h("h2", {}, "Load"), now, chart, chart2));
}

// --- start ---------------------------------------------------------------------------------

async function start() {
  window.addEventListener("hashchange", () => { if (state.session) route(); });
  const begin = async () => {
    try { state.openapi = await api("GET", "/openapi.json"); } catch { state.openapi = null; }
    route();
  };
  $("#key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("#key-input").value.trim());
    if (await loadSession()) { $("#key-dialog").close(); begin(); } else askKey("That key was refused.");
  });
  $("#change-key").addEventListener("click", () => askKey(""));
  if (await loadSession()) begin(); else askKey("");
}

start();
