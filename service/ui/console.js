// avsearch console: plain JS against the service's own API (same origin, no external assets).
"use strict";

const KEY_STORAGE = "avsearch.apiKey";
const OTHER = { audio: "visual", visual: "audio" };
const PALETTE = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000", "#8c564b", "#7f7f7f"];
const $ = (id) => document.getElementById(id);

const state = {
  access: null,        // "open" | "read-write" | "read-only"
  map: null,           // GET /v1/map answer
  screenPoints: [],    // [{x, y, modality, id}] in canvas pixels, for clicks
  highlight: null,     // {query: [x, y] | null, hits: [{id, x, y}], target}
  lastFile: null,      // {name, bytes, kind: "npy" | "json", vectors?: number[][]}
  timing: { firstResultMs: null },
};
window.avsearchConsole = state; // read by the tests and bench/ui_bench.py

// --- HTTP with the API key -------------------------------------------------------------------
let keyWaiters = [];

function askForKey(message) {
  $("key-error").textContent = message || "";
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$("key-form").addEventListener("submit", () => {
  sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
  $("key-input").value = "";
  const waiters = keyWaiters;
  keyWaiters = [];
  waiters.forEach((resolve) => resolve());
});

async function api(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.set("Authorization", "Bearer " + key);
    const response = await fetch(path, { ...options, headers });
    if (response.status === 401) { await askForKey(""); continue; }
    if (response.status === 403 && path === "/v1/access") {
      sessionStorage.removeItem(KEY_STORAGE);
      await askForKey("That key is not accepted here; check it and try again.");
      continue;
    }
    return response;
  }
}

async function apiJson(path, options) {
  const response = await api(path, options);
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (err) { body = { detail: text }; }
  if (!response.ok) {
    const error = new Error((body && body.detail) || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

// --- access: read-only keys get no write controls -------------------------------------------
async function loadAccess() {
  const { access } = await apiJson("/v1/access");
  state.access = access;
  const badge = { open: "no API keys configured", "read-write": "read-write key", "read-only": "read-only key" }[access];
  $("access-badge").textContent = badge;
  $("forget-key").hidden = access === "open";
  for (const element of document.querySelectorAll(".write-control")) {
    if (access === "read-only") element.remove(); // not hidden: absent, so no keyboard or reader reaches it
    else if (element.id !== "add-item-form") element.hidden = false; // that form shows only with an uploaded vector
  }
  syncQueryKind();
}

$("forget-key").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORAGE); location.reload(); });

const canWrite = () => state.access === "open" || state.access === "read-write";

// --- the search form ---------------------------------------------------------------------------
function direction() {
  const [source, target] = $("direction").value.split(":");
  return { source, target };
}

function queryKind() { return $("kind-file").checked ? "file" : "id"; }

function syncQueryKind() {
  const byFile = queryKind() === "file";
  $("by-id").hidden = byFile;
  $("by-file").hidden = !byFile;
  const addForm = $("add-item-form");
  if (addForm) addForm.hidden = !(byFile && state.lastFile && canWrite());
  $("query-modality").textContent = direction().source;
}

for (const id of ["kind-id", "kind-file"]) $(id).addEventListener("change", syncQueryKind);
$("direction").addEventListener("change", () => { syncQueryKind(); suggestIds(); });

let suggestTimer = null;
function suggestIds() {
  clearTimeout(suggestTimer);
  suggestTimer = setTimeout(async () => {
    const prefix = $("query-id").value;
    try {
      const found = await apiJson(`/v1/items/${direction().source}?prefix=${encodeURIComponent(prefix)}&limit=20`);
      const list = $("id-suggestions");
      list.replaceChildren(...found.ids.map((id) => Object.assign(document.createElement("option"), { value: id })));
    } catch (err) { /* suggestions are a convenience; the search reports real errors */ }
  }, 120);
}
$("query-id").addEventListener("input", suggestIds);
$("query-id").addEventListener("focus", suggestIds);

function parseNpy(buffer) {
  // numpy .npy v1/v2/v3: magic, version, header length, Python-dict header, then data.
  const bytes = new Uint8Array(buffer);
  if (bytes[0] !== 0x93 || String.fromCharCode(...bytes.slice(1, 6)) !== "NUMPY") throw new Error("not a .npy file (no NUMPY magic)");
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = (major === 1 ? 10 : 12) + headerLength;
  const header = new TextDecoder().decode(bytes.slice(major === 1 ? 10 : 12, start));
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  const fortran = /'fortran_order':\s*True/.test(header);
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const types = { "<f4": Float32Array, "<f8": Float64Array, "<i4": Int32Array, "|u1": Uint8Array, "<u1": Uint8Array };
  if (!types[descr] || fortran || shape.length < 1 || shape.length > 2) return { shape, descr, vectors: null };
  const flat = Array.from(new types[descr](buffer.slice(start)));
  const values = descr.endsWith("u1") ? flat.map((q) => q * 4 / 255 + 4 / 512 - 2) : flat; // 8-bit codes, YouTube-8M's rule, as the service reads them
  const width = shape[shape.length - 1];
  const vectors = [];
  for (let i = 0; i < values.length; i += width) vectors.push(values.slice(i, i + width));
  return { shape, descr, vectors };
}

function vectorsFromJson(value) {
  if (value && !Array.isArray(value) && Array.isArray(value.vectors)) value = value.vectors;
  if (Array.isArray(value) && value.length && typeof value[0] === "number") return [value];
  if (Array.isArray(value) && value.length && Array.isArray(value[0])) return value;
  throw new Error("a JSON vector file holds a list of numbers, a list of lists, or {\"vectors\": [...]}");
}

$("query-file").addEventListener("change", async () => {
  const file = $("query-file").files[0];
  state.lastFile = null;
  if (!file) return syncQueryKind();
  const bytes = await file.arrayBuffer();
  try {
    if (file.name.toLowerCase().endsWith(".json")) {
      const vectors = vectorsFromJson(JSON.parse(new TextDecoder().decode(bytes)));
      state.lastFile = { name: file.name, bytes, kind: "json", vectors };
    } else {
      const parsed = parseNpy(bytes);
      state.lastFile = { name: file.name, bytes, kind: "npy", vectors: parsed.vectors };
      $("file-note").textContent = `${file.name}: ${parsed.descr} array of shape (${parsed.shape.join(", ")}).`;
    }
    if (state.lastFile.vectors) $("file-note").textContent = `${file.name}: ${state.lastFile.vectors.length} vector(s) of ${state.lastFile.vectors[0].length} values.`;
  } catch (err) {
    $("file-note").textContent = `${file.name}: ${err.message}`;
  }
  syncQueryKind();
});

function readOptions() {
  const topK = parseInt($("top-k").value, 10);
  if (!(topK >= 1)) throw new Error("top k must be a whole number of at least 1");
  const thresholdText = $("threshold").value.trim();
  const threshold = thresholdText === "" ? null : Number(thresholdText);
  if (threshold !== null && !Number.isFinite(threshold)) throw new Error("the score threshold must be a number");
  const filterText = $("filter").value.trim();
  let filter = null;
  if (filterText) {
    try { filter = JSON.parse(filterText); } catch (err) { throw new Error("the metadata filter must be a JSON object, e.g. {\"label\": 3}"); }
    if (!filter || typeof filter !== "object" || Array.isArray(filter)) throw new Error("the metadata filter must be a JSON object");
  }
  return { topK, threshold, filter };
}

function buildRequest() {
  const { source, target } = direction();
  const { topK, threshold, filter } = readOptions();
  const options = { modality: source, top_k: topK, target };
  if (threshold !== null) options.score_threshold = threshold;
  if (filter) options.filter = filter;
  if (queryKind() === "id") {
    const id = $("query-id").value.trim();
    if (!id) throw new Error(`type a stored ${source} id`);
    return { kind: "id", id, body: JSON.stringify({ ...options, ids: [id] }), contentType: "application/json", path: "/v1/search" };
  }
  const file = state.lastFile;
  if (!file) throw new Error("choose a .npy or .json vector file");
  if (file.kind === "json") {
    return { kind: "vectors", file, body: JSON.stringify({ ...options, vectors: file.vectors }), contentType: "application/json", path: "/v1/search" };
  }
  const query = new URLSearchParams({ modality: source, top_k: String(topK), target });
  if (threshold !== null) query.set("score_threshold", String(threshold));
  if (filter) query.set("filter", JSON.stringify(filter));
  return { kind: "vectors", file, body: file.bytes, contentType: "application/x-npy", path: "/v1/search?" + query };
}

function curlFor(request) {
  const quote = (s) => "'" + String(s).replace(/'/g, "'\\''") + "'";
  const url = location.origin + request.path;
  const auth = state.access === "open" ? "" : ` -H "Authorization: Bearer $AVSEARCH_API_KEY"`;
  const data = request.contentType === "application/x-npy" ? ` --data-binary @${quote(request.file.name)}` : ` -d ${quote(request.body)}`;
  return `curl -s -X POST ${quote(url)} -H 'Content-Type: ${request.contentType}'${auth}${data}`;
}

$("search-form").addEventListener("submit", (event) => { event.preventDefault(); runSearch(); });

async function runSearch() {
  let request;
  try { request = buildRequest(); } catch (err) { return showStatus(err.message, true); }
  $("curl-text").textContent = curlFor(request);
  showStatus("Searching…");
  const started = performance.now();
  let answer;
  try {
    answer = await apiJson(request.path, { method: "POST", body: request.body, headers: { "Content-Type": request.contentType } });
  } catch (err) {
    $("results-table").hidden = true;
    return showStatus(`Error ${err.status || ""}: ${err.message}`, true);
  }
  const elapsed = performance.now() - started;
  const hits = answer.results[0] || [];
  renderResults(hits, request, answer.results.length, elapsed);
  if (state.timing.firstResultMs === null) state.timing.firstResultMs = performance.now();
  highlightOnMap(request, hits).catch(() => {}); // the map is secondary: a failure here leaves the results
}

function showStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// --- results -----------------------------------------------------------------------------------
function youtubeLink(metadata) {
  // AVE, VEGAS, AudioSet and YouTube-8M name clips by YouTube id + start second.
  const idKey = ["youtube_id", "youtubeId", "yt_id", "ytid", "video_id"].find((k) => typeof metadata[k] === "string");
  if (!idKey || !/^[A-Za-z0-9_-]{11}$/.test(metadata[idKey])) return null;
  const startKey = ["start", "start_seconds", "start_time", "start_sec", "t"].find((k) => Number.isFinite(Number(metadata[k])) && metadata[k] !== null && metadata[k] !== "");
  const start = startKey ? Math.max(0, Math.floor(Number(metadata[startKey]))) : 0;
  return { key: idKey, href: `https://www.youtube.com/watch?v=${metadata[idKey]}&t=${start}s` };
}

function metadataList(metadata) {
  const list = document.createElement("ul");
  list.className = "meta";
  if (!metadata) return list;
  const youtube = youtubeLink(metadata);
  for (const [key, value] of Object.entries(metadata)) {
    const item = document.createElement("li");
    item.append(Object.assign(document.createElement("b"), { textContent: key + ": " }));
    const text = typeof value === "string" ? value : JSON.stringify(value);
    if (typeof value === "string" && /^https?:\/\/\S+$/.test(value)) {
      item.append(Object.assign(document.createElement("a"), { href: value, textContent: value, rel: "noopener noreferrer", target: "_blank" }));
    } else if (youtube && key === youtube.key) {
      item.append(Object.assign(document.createElement("a"), { href: youtube.href, textContent: `${value} (YouTube)`, rel: "noopener noreferrer", target: "_blank" }));
    } else {
      item.append(text);
    }
    list.append(item);
  }
  return list;
}

function renderResults(hits, request, queries, elapsedMs) {
  const { source, target } = direction();
  const body = $("results-body");
  body.replaceChildren();
  hits.forEach((hit, i) => {
    const row = body.insertRow();
    row.insertCell().textContent = String(i + 1);
    Object.assign(row.insertCell(), { className: "id", textContent: hit.id });
    const score = row.insertCell();
    score.innerHTML = `<div class="score"><span class="track" aria-hidden="true"><span class="fill"></span></span><span class="value"></span></div>`;
    score.querySelector(".fill").style.width = `${Math.max(0, Math.min(1, hit.score)) * 100}%`;
    score.querySelector(".value").textContent = hit.score.toFixed(3);
    row.insertCell().append(metadataList(hit.metadata));
    if (canWrite()) {
      const button = Object.assign(document.createElement("button"), { type: "button", className: "danger", textContent: "Delete" });
      button.setAttribute("aria-label", `Delete ${target} item ${hit.id}`);
      button.addEventListener("click", () => deleteItem(target, hit.id));
      row.insertCell().append(button);
    }
  });
  const what = request.kind === "id" ? `${source} item ${request.id}` : `${request.file.name}`;
  $("results-caption").textContent = `${hits.length} ${target} hits for ${what}` + (queries > 1 ? ` (query 1 of ${queries})` : "");
  $("results-table").hidden = false;
  showStatus(`${hits.length} results in ${elapsedMs.toFixed(0)} ms.`);
}

async function deleteItem(modality, id) {
  if (!confirm(`Delete the ${modality} item ${id}? This is saved at once.`)) return;
  try {
    await apiJson(`/v1/items/${modality}/${encodeURIComponent(id)}`, { method: "DELETE" });
    showStatus(`Deleted ${modality} item ${id}.`);
    await Promise.all([loadMap(), loadModel()]);
  } catch (err) { showStatus(`Error ${err.status || ""}: ${err.message}`, true); }
}

$("copy-curl").addEventListener("click", async () => {
  const text = $("curl-text").textContent;
  try { await navigator.clipboard.writeText(text); showStatus("curl copied."); } catch (err) {
    const range = document.createRange(); range.selectNodeContents($("curl-text"));
    const selection = getSelection(); selection.removeAllRanges(); selection.addRange(range);
    showStatus("Selected: press Ctrl+C to copy.");
  }
});

const addForm = $("add-item-form");
if (addForm) addForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const { source } = direction();
  const id = $("new-item-id").value.trim();
  const file = state.lastFile;
  try {
    if (!id) throw new Error("give the new item an id");
    if (!file || !file.vectors) throw new Error("upload a float .npy or a JSON vector file first");
    const metadataText = $("new-item-metadata").value.trim();
    const metadata = metadataText ? JSON.parse(metadataText) : null;
    const answer = await apiJson(`/v1/items/${source}`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ items: [{ id, vector: file.vectors[0], metadata }] }) });
    showStatus(`Added ${source} item ${id}; the index holds ${answer.count}.`);
    await Promise.all([loadMap(), loadModel()]);
  } catch (err) { showStatus(`Error ${err.status || ""}: ${err.message}`, true); }
});

// --- the map -----------------------------------------------------------------------------------
async function loadMap() {
  state.map = await apiJson("/v1/map");
  const fields = new Set();
  for (const modality of Object.keys(state.map.points)) for (const m of state.map.points[modality].metadata) Object.keys(m).forEach((k) => fields.add(k));
  const select = $("color-by");
  const chosen = select.value;
  select.replaceChildren(new Option("modality", "@modality"), ...[...fields].sort().map((f) => new Option(f, f)));
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "@modality";
  const shown = Object.entries(state.map.points).map(([m, p]) => `${p.ids.length} of ${state.map.totals[m]} ${m}`).join(", ");
  const variance = state.map.explained_variance.map((v) => (100 * v).toFixed(0) + " %").join(" + ");
  $("map-note").textContent = `PCA of ${shown} items (random sample); the two axes hold ${variance} of its variance.`;
  drawMap();
}

function colourRule(field) {
  if (field === "@modality") return { colour: (m) => (m.modality === "audio" ? PALETTE[0] : PALETTE[1]), legend: [["audio", PALETTE[0]], ["visual", PALETTE[1]]] };
  const values = [];
  for (const p of Object.values(state.map.points)) for (const m of p.metadata) values.push(m[field]);
  const present = values.filter((v) => v !== undefined && v !== null);
  const distinct = [...new Set(present)];
  if (distinct.length > PALETTE.length && present.every((v) => typeof v === "number")) {
    const lo = Math.min(...present), hi = Math.max(...present);
    const ramp = (v) => { const t = hi > lo ? (v - lo) / (hi - lo) : 0.5; return `hsl(${240 - 200 * t}, 75%, ${35 + 15 * t}%)`; };
    return { colour: (m) => (typeof m[field] === "number" ? ramp(m[field]) : "#bbbbbb"), legend: [[`${lo}`, ramp(lo)], [`${hi}`, ramp(hi)], ["missing", "#bbbbbb"]] };
  }
  const counts = new Map();
  present.forEach((v) => counts.set(v, (counts.get(v) || 0) + 1));
  const top = [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, PALETTE.length - 1).map(([v]) => v)
    .sort((a, b) => (typeof a === "number" && typeof b === "number" ? a - b : String(a).localeCompare(String(b))));
  const index = new Map(top.map((v, i) => [v, PALETTE[i]]));
  const legend = top.map((v) => [String(v), index.get(v)]);
  if (distinct.length > top.length) legend.push(["other", "#7f7f7f"]);
  legend.push(["missing", "#bbbbbb"]);
  return { colour: (m) => (m[field] === undefined || m[field] === null ? "#bbbbbb" : index.get(m[field]) || "#7f7f7f"), legend };
}

function drawMap() {
  const canvas = $("map");
  const context = canvas.getContext("2d");
  const ratio = window.devicePixelRatio || 1;
  const width = 900, height = 460, pad = 18;
  canvas.width = width * ratio; canvas.height = height * ratio;
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, width, height);
  if (!state.map) return;
  const all = [];
  for (const [modality, p] of Object.entries(state.map.points)) p.xy.forEach(([x, y], i) => all.push({ x, y, modality, id: p.ids[i], meta: { ...p.metadata[i], modality } }));
  const extra = state.highlight ? [...(state.highlight.query ? [state.highlight.query] : []), ...state.highlight.hits.map((h) => [h.x, h.y])] : [];
  const xs = all.map((p) => p.x).concat(extra.map((e) => e[0])), ys = all.map((p) => p.y).concat(extra.map((e) => e[1]));
  if (!xs.length) return;
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (width - 2 * pad);
  const sy = (y) => height - pad - ((y - y0) / (y1 - y0 || 1)) * (height - 2 * pad);
  const rule = colourRule($("color-by").value);
  state.screenPoints = [];
  context.globalAlpha = state.highlight ? 0.45 : 0.8;
  for (const p of all) {
    const x = sx(p.x), y = sy(p.y);
    context.fillStyle = rule.colour(p.meta);
    context.beginPath();
    if (p.modality === "audio") context.arc(x, y, 3, 0, 2 * Math.PI); else context.rect(x - 2.6, y - 2.6, 5.2, 5.2);
    context.fill();
    state.screenPoints.push({ x, y, modality: p.modality, id: p.id });
  }
  context.globalAlpha = 1;
  if (state.highlight) {
    context.lineWidth = 2; context.strokeStyle = "#111";
    for (const hit of state.highlight.hits) { context.beginPath(); context.arc(sx(hit.x), sy(hit.y), 6.5, 0, 2 * Math.PI); context.stroke(); }
    if (state.highlight.query) {
      const [qx, qy] = [sx(state.highlight.query[0]), sy(state.highlight.query[1])];
      context.lineWidth = 3; context.strokeStyle = "#fff";
      context.beginPath(); context.moveTo(qx - 9, qy - 9); context.lineTo(qx + 9, qy + 9); context.moveTo(qx + 9, qy - 9); context.lineTo(qx - 9, qy + 9); context.stroke();
      context.lineWidth = 2; context.strokeStyle = "#000"; context.stroke();
    }
  }
  $("legend").replaceChildren(...rule.legend.map(([label, colour]) => {
    const item = document.createElement("li");
    const swatch = Object.assign(document.createElement("span"), { className: "swatch" });
    swatch.style.background = colour;
    item.append(swatch, label);
    return item;
  }), ...(state.highlight ? [Object.assign(document.createElement("li"), { textContent: "✕ query, ○ hits" })] : []));
  canvas.dataset.points = String(all.length); // for the tests: how many points were drawn
}

$("color-by").addEventListener("change", drawMap);

$("map").addEventListener("click", (event) => {
  const canvas = $("map");
  const box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * (900 / box.width), y = (event.clientY - box.top) * (460 / box.height);
  let best = null, bestDistance = 10 * 10;
  for (const p of state.screenPoints) {
    const d = (p.x - x) ** 2 + (p.y - y) ** 2;
    if (d < bestDistance) { best = p; bestDistance = d; }
  }
  if (!best) return;
  const sameModality = direction().source === direction().target;
  $("direction").value = `${best.modality}:${sameModality ? best.modality : OTHER[best.modality]}`;
  $("kind-id").checked = true;
  $("query-id").value = best.id;
  syncQueryKind();
  runSearch();
});

function project(vector) {
  const { mean, components } = state.map;
  return components.map((axis) => axis.reduce((sum, a, i) => sum + a * (vector[i] - mean[i]), 0));
}

async function locate(modality, ids) {
  if (!ids.length) return [];
  const answer = await apiJson("/v1/map/locate", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ modality, ids }) });
  return answer.points;
}

async function highlightOnMap(request, hits) {
  if (!state.map) return;
  const { source, target } = direction();
  let query = null;
  if (request.kind === "id") {
    const [point] = await locate(source, [request.id]);
    query = [point.x, point.y];
  } else {
    const embedBody = request.contentType === "application/x-npy" ? request.body : JSON.stringify({ modality: source, vectors: request.file.vectors.slice(0, 1) });
    const path = request.contentType === "application/x-npy" ? `/v1/embed?modality=${source}` : "/v1/embed";
    const embedded = await apiJson(path, { method: "POST", headers: { "Content-Type": request.contentType }, body: embedBody });
    query = project(embedded.embeddings[0]);
  }
  const located = await locate(target, hits.map((h) => h.id));
  state.highlight = { query, hits: located, target };
  drawMap();
}

// --- model and index -------------------------------------------------------------------------
function fact(list, term, value) {
  list.append(Object.assign(document.createElement("dt"), { textContent: term }), Object.assign(document.createElement("dd"), { textContent: value }));
}

function formatMap(value) {
  if (!value || typeof value !== "object") return String(value ?? "—");
  return Object.entries(value).map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(3) : JSON.stringify(v)}`).join(", ");
}

async function loadModel() {
  const [info, indexes] = await Promise.all([apiJson("/v1/info"), apiJson("/v1/indexes")]);
  const m = info.manifest;
  $("model-line").textContent = `model ${info.model} · ${Object.entries(info.index_sizes).map(([k, v]) => `${v} ${k}`).join(" · ")} · ${Object.values(info.providers)[0] || ""}`;
  const list = $("manifest");
  list.replaceChildren();
  fact(list, "version", `${info.model} (sha256 of manifest.json)`);
  fact(list, "schema", String(m.schema_version ?? "—"));
  fact(list, "created", String(m.created ?? "—"));
  fact(list, "input widths", formatMap(m.input_dims).replace(/\.000/g, ""));
  fact(list, "embedding width", String(m.embedding_dim ?? "—"));
  fact(list, "ONNX opset", String(m.opset ?? "—"));
  for (const [split, figures] of Object.entries(m.evaluation || {})) {
    const headline = figures ? Object.fromEntries(["a2v", "v2a", "avg"].filter((k) => k in figures).map((k) => [k, figures[k]])) : null;
    fact(list, `mAP, ${split} split`, headline && Object.keys(headline).length ? formatMap(headline) : "not recorded");
  }
  fact(list, "providers", formatMap(info.providers).replace(/"/g, ""));
  $("index-body").replaceChildren(...Object.entries(indexes).map(([modality, card]) => {
    const row = document.createElement("tr");
    const params = { ...card.search_params, ...(Object.keys(card.build_params).length ? { build: card.build_params } : {}) };
    for (const text of [modality, card.factory, String(card.count), String(card.dim), Object.keys(params).length ? JSON.stringify(params) : "defaults", card.search_device]) {
      row.append(Object.assign(document.createElement("td"), { textContent: text }));
    }
    return row;
  }));
}

async function loadLive() {
  const stats = await apiJson("/v1/stats");
  const window_ = stats.window || {};
  const list = $("live");
  list.replaceChildren();
  const ms = (v) => (v === null || v === undefined ? "—" : `${v.toFixed(2)} ms`);
  fact(list, "searches/s", window_.searches_per_s === undefined || window_.searches_per_s === null ? "—" : window_.searches_per_s.toFixed(1));
  fact(list, "p50", ms(window_.p50_ms));
  fact(list, "p99", ms(window_.p99_ms));
  fact(list, "searches since start", String(stats.since_start.searches));
}

async function loadReport() {
  const report = await apiJson("/v1/report");
  const box = $("report");
  box.replaceChildren();
  if (!report.plots.length) return;
  box.append(Object.assign(document.createElement("h3"), { textContent: "Training report" }));
  const plots = Object.assign(document.createElement("div"), { className: "plots" });
  for (const name of report.plots) {
    const blob = await (await api(`/v1/report/${encodeURIComponent(name)}`)).blob(); // fetched with the key: <img src> cannot send it
    const figure = document.createElement("figure");
    figure.append(Object.assign(document.createElement("img"), { src: URL.createObjectURL(blob), alt: `training report plot ${name}` }), Object.assign(document.createElement("figcaption"), { textContent: name }));
    plots.append(figure);
  }
  box.append(plots);
}

const reloadButton = $("reload");
if (reloadButton) reloadButton.addEventListener("click", async () => {
  $("reload-status").textContent = "Reloading…";
  try {
    const answer = await apiJson("/v1/admin/reload", { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });  // admin posts are JSON only
    $("reload-status").textContent = `Serving model ${answer.model} (was ${answer.previous_model}).`;
    await Promise.all([loadModel(), loadMap()]);
  } catch (err) { $("reload-status").textContent = `Not reloaded: ${err.message}`; }
});

// --- start -------------------------------------------------------------------------------------
async function whenReady() {
  for (;;) {
    try { return await loadModel(); } catch (err) {
      if (err.status !== 503) throw err;
      $("model-line").textContent = `not ready yet: ${err.message}`;
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
}

async function start() {
  await loadAccess();
  await whenReady();
  await Promise.all([loadMap(), loadLive(), loadReport().catch(() => {})]);
  document.body.dataset.ready = "true";
  setInterval(() => { if (!document.hidden) loadLive().catch(() => {}); }, 2000);
}

start().catch((err) => showStatus(`The console could not start: ${err.message}`, true));
