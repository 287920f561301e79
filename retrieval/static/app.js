// compress-edge search page: no framework, no build step. Talks to /info, /gallery, /search, /thumb/{id}.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, last: null, offset: 0, pageSize: 48 };

function text(tag, content, cls) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  el.textContent = content; // data from the index is always text, never markup
  return el;
}

function setStatus(message, isError) {
  $("status").textContent = message || "";
  $("status").classList.toggle("error", Boolean(isError));
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function options() {
  const k = parseInt($("k").value, 10);
  const p = $("param").value.trim();
  return { k: Number.isFinite(k) ? k : undefined, param: p === "" ? undefined : parseInt(p, 10) };
}

async function loadInfo() {
  const info = await getJSON("/info");
  state.info = info;
  const idx = info.index, spec = info.model.spec;
  const tuned = idx.tuned && idx.tuned.recall_at_k != null
    ? `, tuned to recall@${idx.tuned.k} ${idx.tuned.recall_at_k.toFixed(3)}` : "";
  $("about").textContent = `${idx.key} index of ${idx.vectors.toLocaleString()} images (${idx.dim} dims${tuned}); ` +
    `model ${spec.arch} at ${spec.image_size}px via ${info.model.backend}`;
  $("k").max = info.limits.max_k;
  if (idx.search_parameter) {
    $("param-label").hidden = false;
    $("param-name").textContent = idx.search_parameter;
    $("param").max = info.limits.max_search_param;
    const tunedValue = idx.search_params[idx.search_parameter];
    if (tunedValue != null) $("param").placeholder = `tuned: ${tunedValue}`;
  }
}

// A clickable element of class `cls` holding the item's thumbnail (loaded when scrolled to).
function imageTile(tag, cls, item, alt) {
  const el = document.createElement(tag);
  el.className = cls;
  el.dataset.id = item.id;
  const img = document.createElement("img");
  if (item.thumb) img.src = item.thumb;
  img.alt = alt;
  img.loading = "lazy";
  el.append(img);
  return el;
}

function showResult(result, queryLabel) {
  const list = $("neighbours");
  list.replaceChildren();
  for (const n of result.neighbours) {
    const li = imageTile("li", "neighbour", n, n.label_name || `#${n.id}`);
    if (queryLabel != null && n.label_name === queryLabel) li.classList.add("same");
    li.append(text("div", `#${n.rank}  `, "rank"));
    li.lastChild.append(text("span", n.score.toFixed(4), "score"));
    li.append(text("div", n.label_name || (n.path ? n.path.split("/").pop() : `id ${n.id}`), "label"));
    li.title = n.path || String(n.id);
    li.addEventListener("click", () => searchId(n.id, n.label_name));
    list.append(li);
  }
  const vote = $("vote");
  if (result.vote) {
    vote.hidden = false;
    vote.replaceChildren(text("span", "kNN vote: "), text("strong", result.vote.label_name ?? String(result.vote.label)),
      text("span", ` (${(100 * result.vote.confidence).toFixed(1)} %)`));
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.round(120 * result.vote.confidence)}px`;
    vote.append(bar);
  } else {
    vote.hidden = true;
  }
  const t = result.timings;
  const parts = [];
  if (t.decode_ms != null) parts.push(`decode ${t.decode_ms.toFixed(1)} ms`);
  parts.push(result.query.kind === "id" ? "embed: stored" : `embed ${t.embed_ms.toFixed(1)} ms`);
  parts.push(`search ${t.search_ms.toFixed(2)} ms`, `server total ${t.total_ms.toFixed(1)} ms`);
  const params = Object.entries(result.search_params).map(([a, b]) => `${a}=${b}`).join(", ");
  $("timings").textContent = `${parts.join(" · ")} · k=${result.k}${params ? " · " + params : ""}`;
  setStatus(`${result.neighbours.length} neighbours`);
  $("again").disabled = false;
}

async function searchFile(file) {
  state.last = { file };
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").hidden = true;
  const form = new FormData();
  form.append("image", file, file.name || "query");
  const o = options();
  if (o.k !== undefined) form.append("k", String(o.k));
  if (o.param !== undefined) form.append("param", String(o.param));
  setStatus("searching…");
  try {
    showResult(await getJSON("/search", { method: "POST", body: form }), null);
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function searchId(id, label) {
  state.last = { id, label };
  const preview = $("preview");
  preview.src = `/thumb/${id}`;
  preview.hidden = false;
  $("drop-text").hidden = true;
  setStatus("searching…");
  try {
    const body = JSON.stringify({ id, ...options() });
    showResult(await getJSON("/search", { method: "POST", headers: { "Content-Type": "application/json" }, body }),
      label);
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function loadGallery() {
  const page = await getJSON(`/gallery?offset=${state.offset}&limit=${state.pageSize}`);
  const box = $("gallery");
  box.replaceChildren();
  for (const item of page.items) {
    const name = item.label_name || item.name || `#${item.id}`;
    const tile = imageTile("div", "tile", item, name);
    tile.append(text("div", name, "label"));
    tile.addEventListener("click", () => searchId(item.id, item.label_name));
    box.append(tile);
  }
  const end = page.offset + page.items.length;
  $("gallery-pos").textContent = page.total ? `${page.offset + 1}–${end} of ${page.total}` : "empty";
  $("prev").disabled = page.offset === 0;
  $("next").disabled = end >= page.total;
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => { if (e.target.files.length) searchFile(e.target.files[0]); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) searchFile(e.dataTransfer.files[0]); });
  $("again").addEventListener("click", () => {
    if (state.last && state.last.file) searchFile(state.last.file);
    else if (state.last) searchId(state.last.id, state.last.label);
  });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.pageSize); loadGallery(); });
  $("next").addEventListener("click", () => { state.offset += state.pageSize; loadGallery(); });
}

wire();
loadInfo().then(loadGallery).catch((e) => setStatus(e.message, true));
