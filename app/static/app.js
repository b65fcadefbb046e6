// imgcls demo page: plain JS, no build step.
"use strict";

const ACCEPTED_TYPES = ["image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "image/tiff"];
const ACCEPTED_EXT = /\.(jpe?g|png|webp|bmp|gif|tiff?)$/i;
const STATUS_TITLES = {
  400: "The image could not be read",
  401: "Not authorised",
  404: "Unknown model",
  413: "Too large",
  415: "Unsupported upload",
  422: "Invalid request",
  503: "Not ready",
  504: "Timed out",
};

const state = {
  file: null,
  info: { max_upload_mb: 20, max_pixels: 40000000 },
  models: {},          // name -> /models entry
  measured: {},        // name -> last measured total latency (ms)
  seq: 0,              // the latest request; an answer to an earlier one is dropped
  running: false,      // a request is on its way: the buttons wait for it
  shown: "",           // the picture the results on screen belong to (Grad-CAM's original)
  refreshTimer: 0,     // the pending re-read of /models while a model loads
};

const $ = (id) => document.getElementById(id);

// ---- API key -----------------------------------------------------------------------------
// When the service answers 401 the page asks for the key once, keeps it in this tab's session
// storage, and sends it as a bearer token on every call.
const KEY_STORAGE = "imgcls-api-key";

// The key each answer was asked with: a 401 forgets that key, never one entered since the call
// left (an answer still on its way when the user typed the key would otherwise throw it away).
const sentKeys = new WeakMap();

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  sentKeys.set(response, key);
  return response;
}

// `refused`: the 401 answer. A key stored since that call left stands (it was not refused):
// returns false then, true when the page asks.
function askForKey(refused) {
  const stored = sessionStorage.getItem(KEY_STORAGE);
  if (stored !== null && stored !== sentKeys.get(refused)) return false;
  sessionStorage.removeItem(KEY_STORAGE);
  const error = $("key-error");
  error.textContent = stored !== null ? "That key was refused: check it and try again." : "";
  error.hidden = !error.textContent;
  $("key-form").hidden = false;
  $("key-input").focus();
  return true;
}

function setupKeyForm() {
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    if (!/^[\x20-\x7e]+$/.test(key)) {  // a header carries it: the service's keys are ASCII
      const error = $("key-error");
      error.textContent = "An API key holds printable ASCII characters only: check it and try again.";
      error.hidden = false;
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key-input").value = "";
    $("key-form").hidden = true;
    showError("");
    loadModels();
  });
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function fmtParams(n) {
  if (n == null) return "–";
  return n >= 1e6 ? (n / 1e6).toFixed(1) + "M" : (n / 1e3).toFixed(0) + "k";
}
function fmtNum(x, digits = 1) { return x == null ? "–" : Number(x).toFixed(digits); }

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function apiError(response) {
  let detail = response.statusText;
  try {
    const body = await response.json();
    detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) { /* not JSON */ }
  const title = STATUS_TITLES[response.status] || "Request failed";
  let msg = `${title} (HTTP ${response.status}): ${detail}`;
  const retry = response.headers.get("Retry-After");
  if (retry) msg += ` — try again in ${retry} s.`;
  return msg;
}

// ---- image choice ------------------------------------------------------------------------
function checkFile(file) {
  const typeOk = ACCEPTED_TYPES.includes(file.type) || (!file.type && ACCEPTED_EXT.test(file.name));
  if (!typeOk) {
    return `“${file.name}” is not an image this service accepts (${file.type || "unknown type"}). ` +
      "Choose a JPEG, PNG, WebP, BMP, GIF or TIFF file.";
  }
  const limit = state.info.max_upload_mb * 1024 * 1024;
  if (file.size === 0) return `“${file.name}” is empty.`;
  if (file.size > limit) {
    return `“${file.name}” is ${(file.size / 1048576).toFixed(1)} MB; the limit is ${state.info.max_upload_mb} MB.`;
  }
  return null;
}

function clearResults() {
  $("cards").replaceChildren();
  renderAgreement(null);
  $("random-warning").hidden = true;
}

function chooseFile(file) {
  if (!file) return;
  // a new picture: the results on screen, and any answer still on its way, were for another
  state.seq += 1;
  state.running = false;
  $("busy").textContent = "";
  clearResults();
  const problem = checkFile(file);
  const preview = $("preview");
  if (problem) {
    state.file = null;
    preview.hidden = true;
    $("file-name").textContent = "";
    showError(problem);
    updateButtons();
    return;
  }
  showError("");
  state.file = file;
  $("file-name").textContent = `${file.name} · ${(file.size / 1024).toFixed(0)} KB`;
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  updateButtons();
}

function setupUpload() {
  const input = $("file-input");
  $("preview").addEventListener("error", () => { $("preview").hidden = true; });  // not previewable
  const zone = $("dropzone");
  input.addEventListener("change", () => chooseFile(input.files[0]));
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => {
    e.preventDefault(); zone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, (e) => {
    e.preventDefault(); zone.classList.remove("over");
  }));
  zone.addEventListener("drop", (e) => chooseFile(e.dataTransfer.files[0]));
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.kind === "file");
    if (item) chooseFile(item.getAsFile());
  });
}

// ---- models ------------------------------------------------------------------------------
function modelOption(m) {
  const ready = m.status === "ready";
  const id = `model-${m.name.replace(/[^A-Za-z0-9_-]/g, "_")}`;
  const acc = m.acc1 != null ? `top-1 ${fmtNum(m.acc1)}%` : "no reference accuracy";
  const meta = `depth ${m.depth} · ${fmtParams(m.params)} params · ${fmtNum(m.gflops, 2)} GFLOPs · ${acc}`;
  const reason = ready ? "" : ` — ${m.status}${m.reason ? ": " + m.reason : ""}`;
  const box = el("input", {
    type: "checkbox", id, value: m.name, name: "models", disabled: !ready,
    "aria-describedby": `${id}-meta`,
  });
  box.addEventListener("change", updateButtons);
  const random = m.weights === "random" ? el("span", { class: "badge-random", text: "random weights" }) : null;
  return el("div", { class: "model-option" + (ready ? "" : " disabled") }, box,
    el("label", { for: id }, el("strong", { text: m.name }), random,
      el("span", { class: "meta", id: `${id}-meta`, text: meta + reason })));
}

function renderModels(models, keep = null) {
  // keep: on a refresh, the boxes the user had checked and the "not loaded" lists left open
  const groups = $("model-groups");
  const open = new Set([...groups.querySelectorAll("details[open]")].map((d) => d.dataset.family));
  groups.replaceChildren();
  for (const [family, title] of [["cnn", "Plain CNNs"], ["resnet", "ResNets"]]) {
    const fs = el("fieldset", { class: family }, el("legend", { text: title }));
    const inFamily = models.filter((m) => m.family === family);
    const served = inFamily.filter((m) => m.status !== "not-loaded");
    const others = inFamily.filter((m) => m.status === "not-loaded");
    if (!served.length) fs.append(el("p", { class: "muted", text: "None loaded by this service." }));
    served.forEach((m) => fs.append(modelOption(m)));
    if (others.length) {
      const det = el("details", { "data-family": family }, el("summary", { class: "muted", text: `${others.length} more in the catalog, not loaded` }));
      if (open.has(family)) det.open = true;
      others.forEach((m) => det.append(modelOption(m)));
      fs.append(det);
    }
    groups.append(fs);
  }
  groups.setAttribute("aria-busy", "false");
  // Preselect up to three ready models, mixing families (on a refresh: what the user checked).
  const ready = models.filter((m) => m.status === "ready");
  const pick = [...ready.filter((m) => m.family === "cnn").slice(0, 1), ...ready.filter((m) => m.family === "resnet").slice(0, 2)];
  const chosen = keep ? ready.filter((m) => keep.includes(m.name)) : (pick.length ? pick : ready.slice(0, 3));
  for (const m of chosen) {
    const box = document.querySelector(`input[name=models][value="${CSS.escape(m.name)}"]`);
    if (box) box.checked = true;
  }
  updateButtons();
}

function selected() {
  return [...document.querySelectorAll("input[name=models]:checked")].map((b) => b.value);
}

function updateButtons() {
  const n = selected().length;
  $("classify-btn").disabled = state.running || !state.file || n < 1;
  $("compare-btn").disabled = state.running || !state.file || n < 2 || n > 8;
}

// While a served model is loading (a service just started, weights downloading, a worker
// restarting), the list is read again every few seconds, so that it can be picked once it is
// ready without reloading the page.
const REFRESH_MS = 2000;

async function loadModels() {
  try {
    const [info, models] = await Promise.all([api("/info"), api("/models")]);
    if (info.status === 401 || models.status === 401) {
      askForKey(info.status === 401 ? info : models);
      return;
    }
    if (info.ok) state.info = await info.json();
    if (!models.ok) throw new Error(await apiError(models));
    const list = (await models.json()).models;
    for (const m of list) state.models[m.name] = m;
    $("limits-hint").textContent = `JPEG, PNG, WebP, BMP, GIF or TIFF, up to ${state.info.max_upload_mb} MB`;
    // after the key form (a key refused mid-session), what the user had checked stays checked
    const keep = selected();
    renderModels(list, keep.length ? keep : null);
    if (list.some((m) => m.status === "loading")) scheduleRefresh();
  } catch (e) {
    showError(`Could not load the model list: ${e.message}`);
  }
}

// One timer at a time: the key form's loadModels may start a refresh while one is pending.
function scheduleRefresh() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(refreshModels, REFRESH_MS);
}

async function refreshModels() {
  let list;
  try {
    const r = await api("/models");
    // a key refused (the service restarted with another): ask for it; entering it loads again
    if (r.status === 401) { askForKey(r); return; }
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    list = (await r.json()).models;
  } catch (e) {  // the service restarting, say: keep what is shown and try again
    scheduleRefresh();
    return;
  }
  // what the user checked stays checked; nothing was ready to check before: preselect as at load
  const before = Object.values(state.models).some((m) => m.status === "ready");
  const focused = document.activeElement?.id;
  for (const m of list) state.models[m.name] = m;
  renderModels(list, before ? selected() : null);
  if (focused && $(focused)) $(focused).focus();
  if (list.some((m) => m.status === "loading")) scheduleRefresh();
}

// ---- results -----------------------------------------------------------------------------
function card(result) {
  const m = state.models[result.model] || {};
  const family = m.family || "";
  const preds = el("ol", { class: "preds", "aria-label": `Top predictions of ${result.model}` });
  for (const p of result.predictions) {
    const pct = (p.score * 100).toFixed(1);
    preds.append(el("li", { class: "pred", "data-index": p.index },
      el("div", { class: "pred-row" }, el("span", { class: "pred-label", text: `${p.rank}. ${p.label}`, title: p.label }),
        el("span", { class: "pred-score", text: `${pct}%` })),
      el("div", { class: "bar", role: "presentation" }, el("span", { style: `width:${Math.max(0.5, p.score * 100)}%` }))));
  }
  const lat = result.latency_ms;
  const rows = [
    ["decode", `${fmtNum(lat.decode)} ms`], ["preprocess", `${fmtNum(lat.preprocess)} ms`],
    ["queue", `${fmtNum(lat.queue)} ms`], ["inference", `${fmtNum(lat.inference)} ms`],
    ["total", `${fmtNum(lat.total)} ms`], ["batch size", String(result.batch_size)],
    ["device", result.device], ["precision", result.precision], ["weights", result.weights],
  ];
  const dl = el("dl");
  for (const [k, v] of rows) dl.append(el("dt", { text: k }), el("dd", { text: v }));
  const random = result.weights === "random" ? el("span", { class: "badge-random", text: "random weights" }) : null;
  return el("article", { class: `card ${family}`, "data-model": result.model },
    el("h3", { text: result.model }, random),
    el("div", { class: "family", text: `${family === "cnn" ? "plain CNN" : family === "resnet" ? "ResNet" : family} · depth ${m.depth ?? "?"}` }),
    preds, camFigure(result), dl);
}

// Grad-CAM overlay under the predictions: hover (or tap/click, which pins it) shows the original.
function camFigure(result) {
  const exp = result.explanation;
  if (!exp) return null;
  const original = el("img", { class: "cam-original", src: state.shown, alt: `${result.model}: the image` });
  const overlay = el("img", { class: "cam-overlay", src: exp.overlay, alt: `${result.model}: where it looked for ${exp.target.label}` });
  const btn = el("button", { type: "button", class: "cam", "data-showing": "overlay", "aria-pressed": "false",
    title: "Tap to switch between the heatmap and the original" }, original, overlay);
  btn.addEventListener("click", () => {
    const showOriginal = btn.dataset.showing === "overlay";
    btn.dataset.showing = showOriginal ? "original" : "overlay";
    btn.setAttribute("aria-pressed", String(showOriginal));
  });
  return el("figure", { class: "cam-figure" }, btn,
    el("figcaption", { class: "muted", text: `Grad-CAM for “${exp.target.label}” (red: used most)` }));
}

function renderAgreement(agreement) {
  const box = $("agreement");
  if (!agreement) { box.hidden = true; box.replaceChildren(); return; }
  const c = agreement.top1_consensus;
  const parts = [el("h3", { text: "Agreement" })];
  if (c) parts.push(el("p", { class: "consensus" }, "Consensus top-1: ", el("strong", { text: c.label }), ` — ${c.votes} of ${c.of} models`));
  if (agreement.pairwise.length) {
    const table = el("table", {}, el("thead", {}, el("tr", {},
      el("th", { text: "models" }), el("th", { text: "same top-1" }), el("th", { text: "top-k overlap" }), el("th", { text: "JS divergence" }))));
    const body = el("tbody");
    for (const p of agreement.pairwise) {
      body.append(el("tr", {}, el("td", { text: `${p.a} · ${p.b}` }), el("td", { text: p.top1_same ? "yes" : "no" }),
        el("td", { text: `${(p.topk_overlap * 100).toFixed(0)}%` }), el("td", { text: p.js_divergence.toFixed(3) })));
    }
    table.append(body);
    parts.push(el("div", { class: "table-wrap" }, table));
  } else {
    parts.push(el("p", { class: "muted", text: "No two of these models share a label set, so no pairwise agreement." }));
  }
  box.replaceChildren(...parts);
  box.hidden = false;
}

function renderResults(results, agreement) {
  $("cards").replaceChildren(...results.map(card));
  renderAgreement(agreement);
  const random = results.filter((r) => r.weights === "random").map((r) => r.model);
  const warn = $("random-warning");
  warn.hidden = !random.length;
  warn.textContent = random.length
    ? `Warning: ${random.join(", ")} ran with RANDOM weights — their predictions are meaningless.` : "";
  for (const r of results) state.measured[r.model] = r.latency_ms.inference;
  renderChart();
}

function renderChart() {
  const pts = Object.entries(state.measured)
    .map(([name, ms]) => ({ name, ms, m: state.models[name] || {} }))
    .filter((p) => p.m.acc1 != null);
  const chart = $("chart");
  if (!pts.length) { chart.replaceChildren(el("p", { class: "muted", text: "Run a model to plot it." })); return; }
  const W = 640, H = 320, L = 52, R = 16, T = 14, B = 40;
  const xs = pts.map((p) => p.ms), ys = pts.map((p) => p.m.acc1);
  const x0 = 0, x1 = Math.max(...xs) * 1.15 || 1;
  const y0 = Math.floor(Math.min(...ys) - 5), y1 = Math.ceil(Math.max(...ys) + 3);
  const sx = (v) => L + (v - x0) / (x1 - x0) * (W - L - R);
  const sy = (v) => T + (1 - (v - y0) / (y1 - y0 || 1)) * (H - T - B);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text) n.textContent = text;
    svg.append(n);
    return n;
  };
  add("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#888" });
  add("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#888" });
  for (let i = 0; i <= 4; i++) {
    const xv = x0 + (x1 - x0) * i / 4, yv = y0 + (y1 - y0) * i / 4;
    add("text", { x: sx(xv), y: H - B + 16, "text-anchor": "middle", "font-size": 11, fill: "#555" }, xv.toFixed(0));
    add("text", { x: L - 6, y: sy(yv) + 4, "text-anchor": "end", "font-size": 11, fill: "#555" }, yv.toFixed(0));
  }
  add("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", "font-size": 12 }, "measured inference latency (ms)");
  add("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", "font-size": 12, transform: `rotate(-90 14 ${(T + H - B) / 2})` }, "reference top-1 (%)");
  for (const p of pts) {
    const cx = sx(p.ms), cy = sy(p.m.acc1);
    const color = p.m.family === "cnn" ? "#d95f02" : "#1b9e77";
    if (p.m.family === "cnn") add("rect", { x: cx - 5, y: cy - 5, width: 10, height: 10, fill: color, class: "pt" });
    else add("circle", { cx, cy, r: 6, fill: color, class: "pt" });
    add("text", { x: cx + 8, y: cy - 6, "font-size": 11 }, p.name);
  }
  chart.replaceChildren(svg);
}

// ---- actions -----------------------------------------------------------------------------
async function run(kind) {
  const models = selected();
  if (!state.file || state.running) return;
  const token = ++state.seq;
  const current = () => token === state.seq;  // false once another picture or request came
  const picture = $("preview").src || "";
  const topK = Math.min(20, Math.max(1, parseInt($("top-k").value, 10) || 5));
  const form = new FormData();
  form.append("file", state.file, state.file.name);
  const params = new URLSearchParams({ top_k: String(topK) });
  const explain = $("explain-toggle").checked;
  if (kind === "classify") params.set("model", models[0]);
  else params.set("models", models.join(","));
  if (explain && kind === "compare") params.set("explain", "gradcam");
  showError("");
  $("busy").textContent = kind === "classify" ? `Classifying with ${models[0]}…` : `Comparing ${models.length} models…`;
  state.running = true;
  updateButtons();
  try {
    const response = await api(`/${kind}?${params}`, { method: "POST", body: form });
    if (!current()) return;
    if (response.status === 401 && !askForKey(response)) {
      showError("The API key was entered while this ran: run it again.");
      return;
    }
    if (!response.ok) { showError(await apiError(response)); return; }
    const body = await response.json();
    let explainError = "";
    if (explain && kind === "classify") {
      const params = new URLSearchParams({ model: models[0], method: "gradcam", heatmap: "false" });
      const exp = await api(`/explain?${params}`, { method: "POST", body: form });
      if (!current()) return;
      if (exp.status === 401) askForKey(exp);
      if (exp.ok) body.explanation = await exp.json();
      else explainError = await apiError(exp);  // the classification still shows
    }
    if (!current()) return;
    state.shown = picture;
    if (kind === "classify") renderResults([body], null);
    else renderResults(body.results, body.agreement);
    if (explainError) showError(`No Grad-CAM: ${explainError}`);
    $("busy").textContent = "Done.";
  } catch (e) {
    if (current()) showError(`The request failed: ${e.message}`);
  } finally {
    if (current()) {
      state.running = false;
      if ($("busy").textContent !== "Done.") $("busy").textContent = "";
      updateButtons();
    }
  }
}

setupKeyForm();
setupUpload();
$("classify-btn").addEventListener("click", () => run("classify"));
$("compare-btn").addEventListener("click", () => run("compare"));
renderChart();
loadModels();
