// vlmscope viewer: graph by layer and position on a canvas, feature cards, signed patch
// heatmaps, pins and supernodes, interventions. No framework, no build step.
"use strict";

// Diverging map sampled from matplotlib's coolwarm (the PNG heatmaps use the same map).
const COOLWARM = ["#3b4cc0", "#5977e3", "#7b9ff9", "#9ebeff", "#c0d4f5", "#dddcdc",
  "#f2cbb7", "#f7ac8e", "#ee8468", "#d65244", "#b40426"].map(hexRgb);
const POS_EDGE = "#d65244", NEG_EDGE = "#3b4cc0";
const MIN_SHARE = 0.05;  // patches under 5% of the largest |value| get no outline

const $ = (id) => document.getElementById(id);
const S = {
  token: "", info: {}, slug: null, data: null, nodes: [], links: [], byId: new Map(),
  layout: null, selected: null, hovered: null, pins: new Set(), supernodes: [],
  checked: new Set(), nodeThreshold: 0.8, edgeThreshold: 0, pinnedOnly: false,
};
// What tests and benchmarks read: readiness, errors, timings, node positions.
window.__vlmscope = { ready: false, error: null, firstPaintMs: null, nodePos: (id) => nodePos(id) };

function hexRgb(h) { return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)); }
function coolwarm(t) {  // t in [-1, 1]
  const x = (Math.max(-1, Math.min(1, t)) + 1) / 2 * (COOLWARM.length - 1);
  const i = Math.min(COOLWARM.length - 2, Math.floor(x)), f = x - i;
  const a = COOLWARM[i], b = COOLWARM[i + 1];
  return `rgb(${a.map((v, k) => Math.round(v + (b[k] - v) * f)).join(",")})`;
}
function fmt(v, d = 3) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : v.toFixed(d);
}
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}
function message(text, isError = false) {
  const m = $("message");
  m.textContent = text || "";
  m.className = isError ? "error" : "";
  if (isError) window.__vlmscope.error = text;
}

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (opts.body !== undefined) {
    headers["Content-Type"] = "application/json";
    headers["X-Vlmscope-Token"] = S.token;
  }
  const r = await fetch(path, { method: opts.body !== undefined ? "POST" : "GET", headers,
    body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined });
  const text = await r.text();
  let obj = null;
  try { obj = JSON.parse(text); } catch (e) {
    if (r.ok) throw new Error(`${path}: the server sent something that is not JSON (${e.message})`);
  }
  if (!r.ok) throw new Error((obj && obj.error) || `${r.status} ${r.statusText}`);
  return obj;
}

// --- start --------------------------------------------------------------------------------------
async function init() {
  const params = new URLSearchParams(location.search);
  S.token = params.get("token") || sessionStorage.getItem("vlmscope-token") || "";
  if (params.get("token")) {
    sessionStorage.setItem("vlmscope-token", S.token);
    params.delete("token");  // keep the token out of the address bar and history
    history.replaceState(null, "", location.pathname + (params.toString() ? "?" + params : ""));
  }
  wireControls();
  try {
    S.info = await api("/api/info");
    $("intervene-panel").hidden = !S.info.interventions;
    const { graphs } = await api("/api/graphs");
    const sel = $("graph-select");
    sel.replaceChildren();
    for (const g of graphs) {
      if (!g.slug) { message(g.error, true); continue; }
      const label = (g.scan ? g.scan + " — " : "") + (g.prompt || g.slug);
      sel.append(el("option", { value: g.slug, text: label.length > 90 ? label.slice(0, 87) + "…" : label }));
    }
    if (!graphs.some((g) => g.slug)) {
      message(S.info.graphs ? "no graphs in the folder" : "no --graphs folder given");
      window.__vlmscope.ready = true;
      return;
    }
    const want = params.get("graph");
    if (want && graphs.some((g) => g.slug === want)) sel.value = want;
    await openGraph(sel.value);
  } catch (e) {
    message(e.message, true);
    window.__vlmscope.ready = true;
  }
}

function wireControls() {
  $("graph-select").addEventListener("change", (e) => openGraph(e.target.value));
  $("node-threshold").addEventListener("input", (e) => {
    S.nodeThreshold = +e.target.value; $("node-threshold-value").textContent = S.nodeThreshold.toFixed(2); redraw();
  });
  $("edge-threshold").addEventListener("input", (e) => {
    S.edgeThreshold = +e.target.value; $("edge-threshold-value").textContent = S.edgeThreshold.toFixed(2); redraw();
  });
  $("pinned-only").addEventListener("change", (e) => { S.pinnedOnly = e.target.checked; redraw(); });
  $("group-btn").addEventListener("click", groupSupernode);
  $("save-btn").addEventListener("click", saveAnnotations);
  $("intervene-btn").addEventListener("click", runIntervention);
  const wrap = $("graph-wrap");
  wrap.addEventListener("mousemove", onHover);
  wrap.addEventListener("mouseleave", () => { S.hovered = null; $("tooltip").hidden = true; drawOverlay(); });
  wrap.addEventListener("click", onClick);
  window.addEventListener("resize", () => { if (S.data) { layout(); redraw(); } });
}

// --- graph model ----------------------------------------------------------------------------
async function openGraph(slug) {
  const t0 = performance.now();
  window.__vlmscope.ready = false;
  window.__vlmscope.error = null;
  S.slug = slug;
  S.data = null; S.nodes = []; S.nLinks = 0; S.selected = null;
  clearPanels();
  message(`loading ${slug}…`);
  let data;
  // Pins and supernodes are asked for at once, beside the graph (one round trip less).
  const annotations = api(`/api/graphs/${encodeURIComponent(slug)}/annotations`);
  annotations.catch(() => {});  // awaited below, once the graph opened
  try {
    // The compact form (viewer/compact.py): the graph without its links as JSON, then the
    // links as typed arrays, strongest first. The graph's own JSON stays the file on disk.
    const r = await fetch(`/api/graphs/${encodeURIComponent(slug)}/compact`);
    const buf = await r.arrayBuffer();
    // Another graph was chosen while this one loaded: that call owns the page now (building
    // this model, or its pins, over it would show one graph's title on another's nodes and
    // save its pins under the other's name).
    if (S.slug !== slug) return;
    if (!r.ok) {
      let msg = `${r.status}`;
      try { msg = JSON.parse(new TextDecoder().decode(buf)).error; } catch (e) { /* keep the status */ }
      throw new Error(`cannot open ${slug}: ${msg}`);
    }
    const compact = decodeCompact(buf);
    data = compact.head;
    if (!data || !Array.isArray(data.nodes))
      throw new Error(`cannot open ${slug}: no nodes list`);
    window.__vlmscope.parsedMs = performance.now() - t0;
    buildModel(data, compact);
    window.__vlmscope.modelMs = performance.now() - t0;
  } catch (e) {
    if (S.slug !== slug) return;
    clearCanvas();
    message(e.message, true);
    window.__vlmscope.ready = true;
    return;
  }
  const meta = data.metadata || {};
  $("graph-title").textContent = meta.prompt || slug;
  const th = typeof meta.node_threshold === "number" ? meta.node_threshold : 0.8;
  S.nodeThreshold = th;
  $("node-threshold").value = th;
  $("node-threshold-value").textContent = th.toFixed(2);
  try {
    const ann = await annotations;
    if (S.slug !== slug) return;
    const q = data.qParams || {};
    S.pins = new Set([...(q.pinnedIds || []), ...ann.pinnedIds].filter((id) => S.byId.has(id)));
    S.supernodes = (ann.supernodes.length ? ann.supernodes : (q.supernodes || []));
  } catch (e) {
    if (S.slug !== slug) return;
    S.pins = new Set(); S.supernodes = [];
    message(e.message, true);
  }
  layout();
  window.__vlmscope.layoutMs = performance.now() - t0;
  redraw();
  window.__vlmscope.drawMs = performance.now() - t0;
  renderPins();
  renderImagePanel(null);
  requestAnimationFrame(() => {
    window.__vlmscope.firstPaintMs = performance.now();
    window.__vlmscope.openMs = performance.now() - t0;
    if (!window.__vlmscope.error) message("");
    window.__vlmscope.ready = true;
  });
}

function decodeCompact(buf) {
  const magic = new TextDecoder().decode(new Uint8Array(buf, 0, Math.min(4, buf.byteLength)));
  if (magic !== "VGC1") throw new Error("the server sent a graph in an unknown form");
  const dv = new DataView(buf);
  const J = dv.getUint32(4, true);
  const head = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 8, J)));
  const m = head.compact.links, off = 8 + J + ((4 - (J % 4)) % 4);
  if (off + 12 * m !== buf.byteLength) throw new Error("the compact graph is truncated");
  // Typed arrays read the platform's byte order: little-endian on every browser platform.
  return { head, src: new Int32Array(buf, off, m), dst: new Int32Array(buf, off + 4 * m, m),
    w: new Float32Array(buf, off + 8 * m, m) };
}

function buildModel(data, compact) {
  S.data = data;
  const tokens = (data.metadata && data.metadata.prompt_tokens) || [];
  let maxLayer = 0;
  for (const n of data.nodes) if (n.feature_type !== "logit" && isFinite(+n.layer)) maxLayer = Math.max(maxLayer, +n.layer);
  S.maxLayer = maxLayer;
  S.nodes = data.nodes.map((n, i) => {
    const type = n.feature_type || "";
    const isLogit = type === "logit", isInput = n.layer === "E" || type === "embedding";
    const row = isInput ? 0 : isLogit ? maxLayer + 2 : +n.layer + 1;
    const featIdx = type === "cross layer transcoder" ? parseInt(String(n.node_id).split("_")[1], 10) : null;
    return { i, id: String(n.node_id), type, row, ctx: +n.ctx_idx || 0, layer: n.layer,
      influence: typeof n.influence === "number" ? n.influence : null, activation: n.activation,
      featIdx, isLogit, isInput, isError: type.includes("error"), image: n.image || null,
      special: !!n.special, prob: n.token_prob || 0, clerp: n.clerp || "", raw: n, _label: null };
  });
  S.byId = new Map(S.nodes.map((n) => [n.id, n]));
  // Links stay in typed arrays (sorted by |weight|, largest first); per node, the indices of
  // its incoming and outgoing links in CSR form, so each list is sorted strongest first too.
  const { src, dst, w } = compact, m = w.length, nN = S.nodes.length;
  S.src = src; S.dst = dst; S.w = w; S.nLinks = m;
  S.maxW = m ? Math.abs(w[0]) || 1 : 1;
  S.inStart = csr(dst, nN); S.inIdx = csrFill(dst, S.inStart);
  S.outStart = csr(src, nN); S.outIdx = csrFill(src, S.outStart);
  S.tokens = tokens;
  // a loop, not Math.max(...nodes): spreading 100k+ arguments overflows the call stack
  let lastCtx = 0;
  for (const n of S.nodes) if (n.ctx > lastCtx) lastCtx = n.ctx;
  S.nPos = Math.max(tokens.length, 1 + lastCtx);
}

function csr(ends, n) {
  const start = new Int32Array(n + 1);
  for (let k = 0; k < ends.length; k++) start[ends[k] + 1]++;
  for (let i = 0; i < n; i++) start[i + 1] += start[i];
  return start;
}
function csrFill(ends, start) {
  const idx = new Int32Array(ends.length), at = start.slice(0, -1);
  for (let k = 0; k < ends.length; k++) idx[at[ends[k]]++] = k;
  return idx;
}
// The links into / out of a node as small objects, strongest first.
function linkAt(k) {
  const w = S.w[k];
  return { s: S.nodes[S.src[k]], t: S.nodes[S.dst[k]], w, a: Math.abs(w) };
}
function inLinks(n) {
  const out = [];
  for (let j = S.inStart[n.i]; j < S.inStart[n.i + 1]; j++) out.push(linkAt(S.inIdx[j]));
  return out;
}
function outLinks(n) {
  const out = [];
  for (let j = S.outStart[n.i]; j < S.outStart[n.i + 1]; j++) out.push(linkAt(S.outIdx[j]));
  return out;
}
function label(n) {
  if (n._label === null) n._label = nodeLabel(n.raw, S.tokens);
  return n._label;
}

function nodeLabel(n, tokens) {
  const tok = tokens[n.ctx_idx] !== undefined ? tokens[n.ctx_idx] : "";
  if (n.feature_type === "logit") return n.clerp || `logit ${n.feature}`;
  if (n.layer === "E" || n.feature_type === "embedding") return n.image ? (n.clerp || tok) : `“${tok}”`;
  if ((n.feature_type || "").includes("error")) return `error L${n.layer} @ “${tok}”`;
  const f = String(n.node_id).split("_")[1];
  return (n.clerp ? n.clerp + " " : "") + `L${n.layer} #${f} @ “${tok}”`;
}

function visible(n) {
  if (S.pinnedOnly) return S.pins.has(n.id) || inSupernode(n.id);
  if (n.isInput || n.isLogit || S.pins.has(n.id)) return true;
  return n.influence === null || n.influence <= S.nodeThreshold + 1e-9;
}
function inSupernode(id) { return S.supernodes.some((sn) => sn.slice(1).includes(id)); }

// --- layout and drawing ---------------------------------------------------------------------
const MARGIN = { left: 52, right: 16, top: 16, bottom: 96 };
function layout() {
  const wrap = $("graph-wrap");
  const nRows = S.maxLayer + 3;
  const colW = Math.max(10, (wrap.clientWidth - MARGIN.left - MARGIN.right) / S.nPos);
  const rowH = Math.max(34, (wrap.clientHeight - MARGIN.top - MARGIN.bottom) / nRows);
  const W = Math.ceil(MARGIN.left + MARGIN.right + colW * S.nPos);
  const H = Math.ceil(MARGIN.top + MARGIN.bottom + rowH * nRows);
  const cells = new Map();
  for (const n of S.nodes) {
    const key = n.row * 1e6 + n.ctx;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  for (const group of cells.values()) {
    group.sort((a, b) => (a.influence ?? 0) - (b.influence ?? 0));
    const spacing = Math.min(colW * 0.9 / group.length, 9);
    group.forEach((n, j) => {
      n.x = MARGIN.left + (n.ctx + 0.5) * colW + (j - (group.length - 1) / 2) * spacing;
      n.y = MARGIN.top + (nRows - 1 - n.row + 0.5) * rowH;
    });
  }
  S.X = Float32Array.from(S.nodes, (n) => n.x);
  S.Y = Float32Array.from(S.nodes, (n) => n.y);
  S.layout = { W, H, colW, rowH, nRows };
  const dpr = window.devicePixelRatio || 1;
  for (const c of [$("edge-canvas"), $("graph-canvas"), $("overlay-canvas")]) {
    c.width = W * dpr; c.height = H * dpr; c.style.width = W + "px"; c.style.height = H + "px";
    c.getContext("2d").setTransform(dpr, 0, 0, dpr, 0, 0);
  }
}

function nodePos(id) {
  const n = S.byId.get(id);
  if (!n || n.x === undefined) return null;
  const r = $("graph-canvas").getBoundingClientRect();
  return { x: r.left + n.x, y: r.top + n.y, visible: visible(n) };
}

function clearCanvas() {
  S.edgeGen = (S.edgeGen || 0) + 1;  // stops edge drawing still in progress
  for (const c of [$("edge-canvas"), $("graph-canvas"), $("overlay-canvas")]) c.getContext("2d").clearRect(0, 0, c.width, c.height);
}

// Two layers: edges (with the row bands and labels under them) on #edge-canvas, nodes and
// supernodes on #graph-canvas above it. Nodes and the counts are drawn at once; the edges of a
// large graph are drawn progressively (see drawEdges).
function redraw() {
  if (!S.data || !S.layout) return;
  const ctx = $("graph-canvas").getContext("2d");
  const { W, H } = S.layout;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "11px system-ui, 'DejaVu Sans', sans-serif";
  const vis = new Uint8Array(S.nodes.length);
  let nNodes = 0;
  for (const n of S.nodes) if (visible(n)) { vis[n.i] = 1; nNodes++; }
  const shown = shownLinks(vis), nEdges = shown.length;
  const tA = performance.now();
  drawEdges(shown);
  const tB = performance.now();
  // Supernodes: a labelled box around their visible members.
  for (const sn of S.supernodes) {
    const ms = sn.slice(1).map((id) => S.byId.get(id)).filter((n) => n && vis[n.i]);
    if (!ms.length) continue;
    const x0 = Math.min(...ms.map((n) => n.x)) - 8, x1 = Math.max(...ms.map((n) => n.x)) + 8;
    const y0 = Math.min(...ms.map((n) => n.y)) - 8, y1 = Math.max(...ms.map((n) => n.y)) + 8;
    ctx.strokeStyle = "#6a3d9a"; ctx.lineWidth = 1.5; ctx.setLineDash([4, 3]);
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0); ctx.setLineDash([]);
    ctx.fillStyle = "#6a3d9a"; ctx.fillText(sn[0], x0, y0 - 3);
  }
  // Nodes: one path per shape and colour, filled once; a 12 px grid for hit tests.
  drawNodes(ctx, vis);
  const grid = new Map();
  for (const n of S.nodes) {
    if (!vis[n.i]) continue;
    const key = Math.floor(n.x / 12) * 65536 + Math.floor(n.y / 12);
    const cell = grid.get(key);
    if (cell) cell.push(n); else grid.set(key, [n]);
  }
  S.grid = grid;
  window.__vlmscope.drawSteps = [tB - tA, performance.now() - tB];
  $("counts").textContent = `${nNodes} nodes, ${nEdges} edges shown (of ${S.nodes.length}, ${S.nLinks})`;
  window.__vlmscope.shown = { nodes: nNodes, edges: nEdges };
  drawOverlay();
}

function drawBackground(ctx) {
  const { W, H, colW, rowH, nRows } = S.layout;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "11px system-ui, 'DejaVu Sans', sans-serif";
  // Row bands and labels.
  for (let r = 0; r < nRows; r++) {
    const y = MARGIN.top + (nRows - 1 - r) * rowH;
    if (r % 2) { ctx.fillStyle = "#f6f7f9"; ctx.fillRect(MARGIN.left, y, W - MARGIN.left, rowH); }
    ctx.fillStyle = "#666";
    ctx.fillText(r === 0 ? "input" : r === nRows - 1 ? "logits" : `L${r - 1}`, 6, y + rowH / 2 + 4);
  }
  // Position labels (every k-th when columns are narrow).
  const every = Math.max(1, Math.ceil(14 / colW));
  ctx.fillStyle = "#444";
  for (let p = 0; p < S.nPos; p += every) {
    const x = MARGIN.left + (p + 0.5) * colW;
    ctx.save(); ctx.translate(x + 3, H - MARGIN.bottom + 6); ctx.rotate(Math.PI / 3);
    const t = String(S.tokens[p] ?? p).replace(/\n/g, "⏎");
    ctx.fillText(t.length > 12 ? t.slice(0, 11) + "…" : t, 0, 0);
    ctx.restore();
  }
}

// Edges. All of them are accumulated into a density image (a line walk per edge: stroking 100k
// long antialiased lines is what makes a software rasteriser slow), and the strongest are
// stroked on top with widths by |weight|. Links come strongest first, so the first
// FIRST_EDGES of them are accumulated before the first paint and the rest in slices of
// SLICE_MS between frames, the page staying responsive; the layer is then drawn again with all
// of them. A newer redraw (threshold moved, graph changed) abandons an unfinished one.
const FIRST_EDGES = 5000, SLICE_MS = 50;
function drawEdges(shown) {
  const gen = S.edgeGen = (S.edgeGen || 0) + 1;
  const job = densityJob(shown, S.layout.W, S.layout.H);
  accumulate(job, FIRST_EDGES);
  paintEdges(job);
  window.__vlmscope.edgesDone = false;
  const finish = () => requestAnimationFrame(() => {
    if (gen !== S.edgeGen) return;
    window.__vlmscope.edgesDone = true;
    window.__vlmscope.edgesMs = performance.now();
  });
  if (job.done === shown.length) { finish(); return; }
  const slice = () => {  // started after the first frame is painted
    if (gen !== S.edgeGen) return;
    const t0 = performance.now();
    while (job.done < shown.length && performance.now() - t0 < SLICE_MS) accumulate(job, 4000);
    if (job.done < shown.length) { setTimeout(slice, 0); return; }
    paintEdges(job);
    finish();
  };
  requestAnimationFrame(() => setTimeout(slice, 0));
}

function paintEdges(job) {
  const ctx = $("edge-canvas").getContext("2d");
  drawBackground(ctx);
  drawDensity(ctx, job);
  drawStrongEdges(ctx, job.links.subarray(0, Math.min(STRONG_EDGES, job.links.length)));
}

const STRONG_EDGES = 1500;
// Indices of the links drawn: at or above the edge threshold (a prefix, as links are sorted
// by |weight|), between two visible nodes; strongest first.
function shownLinks(vis) {
  const minA = S.edgeThreshold * S.maxW, w = S.w, src = S.src, dst = S.dst;
  let lo = 0, hi = S.nLinks;
  while (lo < hi) { const mid = (lo + hi) >> 1; if (Math.abs(w[mid]) >= minA) lo = mid + 1; else hi = mid; }
  const out = new Int32Array(lo);
  let n = 0;
  for (let k = 0; k < lo; k++) if (vis[src[k]] && vis[dst[k]]) out[n++] = k;
  return out.subarray(0, n);
}

// Past 20k edges the density image is built at half resolution (4x fewer pixels, half the
// steps per line) and scaled up: a dense background, with the strongest edges crisp on top.
function densityJob(links, W, H) {
  const k = links.length > 20000 ? 0.5 : 1;
  const w = Math.max(1, Math.round(W * k)), h = Math.max(1, Math.round(H * k));
  return { links, k, w, h, W, H, done: 0, pos: new Float32Array(w * h), neg: new Float32Array(w * h) };
}

// Walk the next `count` links of the job into its density buffers.
function accumulate(job, count) {
  const { links, k, w, h, pos, neg } = job;
  const X = S.X, Y = S.Y, src = S.src, dst = S.dst, wt = S.w, inv = 1 / S.maxW;
  const end = Math.min(links.length, job.done + count);
  for (let e = job.done; e < end; e++) {
    const l = links[e], s = src[l], t = dst[l], wl = wt[l];
    const buf = wl >= 0 ? pos : neg, v = 0.12 + 0.88 * Math.sqrt(Math.abs(wl) * inv);
    // Both ends clamped onto the image, so every step of the walk stays on it.
    let x = Math.min(Math.max(X[s] * k, 0), w - 1), y = Math.min(Math.max(Y[s] * k, 0), h - 1);
    const x1 = Math.min(Math.max(X[t] * k, 0), w - 1), y1 = Math.min(Math.max(Y[t] * k, 0), h - 1);
    const dx = x1 - x, dy = y1 - y;
    const n = Math.max(1, Math.ceil(Math.max(Math.abs(dx), Math.abs(dy))));
    const sx = dx / n, sy = dy / n;
    for (let i = 0; i <= n; i++, x += sx, y += sy) buf[(y | 0) * w + (x | 0)] += v;
  }
  job.done = end;
}

function drawDensity(ctx, job) {
  if (!job.done) return;
  const { w, h, pos, neg } = job;
  const img = new ImageData(w, h), d = img.data;
  const P = hexRgb(POS_EDGE), N = hexRgb(NEG_EDGE);
  const g = job.k < 1 ? 0.45 : 0.9;  // a half-resolution pixel gathers about twice the line
  for (let i = 0; i < w * h; i++) {
    const p = pos[i], q = neg[i], t = p + q;
    if (t === 0) continue;
    const f = p / t, j = 4 * i;
    d[j] = P[0] * f + N[0] * (1 - f); d[j + 1] = P[1] * f + N[1] * (1 - f); d[j + 2] = P[2] * f + N[2] * (1 - f);
    d[j + 3] = 255 * Math.min(0.8, 1 - Math.exp(-g * t));
  }
  const off = document.createElement("canvas");
  off.width = w; off.height = h;
  off.getContext("2d").putImageData(img, 0, 0);
  ctx.drawImage(off, 0, 0, job.W, job.H);
}

// The strongest links, stroked with one path per sign and width (widths in 0.5 px steps).
function drawStrongEdges(ctx, links) {
  const X = S.X, Y = S.Y, src = S.src, dst = S.dst, wt = S.w;
  const buckets = new Map();
  for (let e = 0; e < links.length; e++) {
    const l = links[e], wl = wt[l];
    const width = Math.round(2 * Math.max(1, 3.5 * Math.sqrt(Math.abs(wl) / S.maxW))) / 2;
    const key = (wl >= 0 ? 1 : -1) * width;
    let path = buckets.get(key);
    if (!path) buckets.set(key, (path = new Path2D()));
    path.moveTo(X[src[l]], Y[src[l]]); path.lineTo(X[dst[l]], Y[dst[l]]);
  }
  ctx.globalAlpha = 0.55;
  for (const [key, path] of buckets) {
    ctx.strokeStyle = key >= 0 ? POS_EDGE : NEG_EDGE;
    ctx.lineWidth = Math.abs(key);
    ctx.stroke(path);
  }
  ctx.globalAlpha = 1;
}

const NODE_STYLES = {
  logit: "#e08a00", image: "#8e44ad", special: "#bbb", input: "#555", error: "#9aa0a6", feature: "#2f6fbf",
};
function nodeStyle(n) {
  if (n.isLogit) return "logit";
  if (n.isInput) return n.image ? "image" : n.special ? "special" : "input";
  return n.isError ? "error" : "feature";
}

function drawNodes(ctx, vis) {
  const r = 3.5, paths = {};
  for (const k of Object.keys(NODE_STYLES)) paths[k] = new Path2D();
  const pinned = new Path2D();
  for (const n of S.nodes) {
    if (!vis[n.i]) continue;
    const style = nodeStyle(n), p = paths[style];
    const shape = (q) => {
      if (style === "logit") {
        q.moveTo(n.x, n.y - 5); q.lineTo(n.x + 5, n.y); q.lineTo(n.x, n.y + 5); q.lineTo(n.x - 5, n.y); q.closePath();
      } else if (n.isInput) q.rect(n.x - r, n.y - r, 2 * r, 2 * r);
      else if (style === "error") q.rect(n.x - 3, n.y - 3, 6, 6);
      else { q.moveTo(n.x + r, n.y); q.arc(n.x, n.y, r, 0, 2 * Math.PI); }
    };
    shape(p);
    if (S.pins.has(n.id)) shape(pinned);
  }
  for (const [k, color] of Object.entries(NODE_STYLES)) { ctx.fillStyle = color; ctx.fill(paths[k]); }
  ctx.strokeStyle = "#6a3d9a"; ctx.lineWidth = 2; ctx.stroke(pinned);
}

function drawOverlay() {
  const c = $("overlay-canvas"), ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  const focus = [S.selected, S.hovered].filter(Boolean);
  for (const n of focus) {
    const ls = [...inLinks(n), ...outLinks(n)].filter((l) => visible(l.s) && visible(l.t));
    for (const l of ls) {
      ctx.strokeStyle = l.w >= 0 ? POS_EDGE : NEG_EDGE;
      ctx.globalAlpha = 0.9;
      ctx.lineWidth = 0.8 + 3 * Math.sqrt(l.a / S.maxW);
      ctx.beginPath(); ctx.moveTo(l.s.x, l.s.y); ctx.lineTo(l.t.x, l.t.y); ctx.stroke();
    }
    ctx.globalAlpha = 1;
    ctx.beginPath(); ctx.arc(n.x, n.y, 7, 0, 2 * Math.PI);
    ctx.strokeStyle = n === S.selected ? "#111" : "#666"; ctx.lineWidth = 2; ctx.stroke();
  }
}

function nodeAt(ev) {
  if (!S.grid) return null;
  const rect = $("graph-canvas").getBoundingClientRect();
  const x = ev.clientX - rect.left, y = ev.clientY - rect.top;
  let best = null, bd = 64;
  const gx = Math.floor(x / 12), gy = Math.floor(y / 12);
  for (let i = -1; i <= 1; i++) for (let j = -1; j <= 1; j++) {
    for (const n of S.grid.get((gx + i) * 65536 + gy + j) || []) {
      const d = (n.x - x) ** 2 + (n.y - y) ** 2;
      if (d < bd) { bd = d; best = n; }
    }
  }
  return best;
}

function onHover(ev) {
  const n = nodeAt(ev);
  if (n === S.hovered) return;
  S.hovered = n;
  const tip = $("tooltip");
  if (!n) { tip.hidden = true; drawOverlay(); return; }
  tip.textContent = `${label(n)}\ninfluence ${fmt(n.influence)}` + (n.activation != null ? `   activation ${fmt(n.activation)}` : "");
  tip.style.left = n.x + 12 + "px"; tip.style.top = n.y + 10 + "px";
  tip.hidden = false;
  drawOverlay();
}

function onClick(ev) {
  const n = nodeAt(ev);
  if (n) selectNode(n);
}

// --- side panels ------------------------------------------------------------------------------
function clearPanels() {
  $("node-info").replaceChildren("Click a node.");
  $("feature-card").replaceChildren("Click a feature node to see its card.");
  $("intervene-target").textContent = "Click a feature node.";
  $("intervene-result").replaceChildren();
}

function nodeLink(n) {
  return el("a", { class: "node-link", text: label(n), onclick: () => selectNode(n) });
}

function selectNode(n) {
  S.selected = n;
  drawOverlay();
  const info = $("node-info");
  info.className = "";
  const pin = el("button", { type: "button", id: "pin-btn", text: S.pins.has(n.id) ? "Unpin" : "Pin",
    onclick: () => { togglePin(n); selectNode(n); } });
  const tbl = el("table");
  const rows = [["id", n.id], ["type", n.type + (n.image ? " (image patch)" : "")], ["layer", String(n.layer)],
    ["position", `${n.ctx} “${S.tokens[n.ctx] ?? ""}”`], ["influence", fmt(n.influence)]];
  if (n.activation != null) rows.push(["activation", fmt(n.activation)]);
  if (n.isLogit) rows.push(["probability", fmt(n.prob)]);
  for (const [k, v] of rows) tbl.append(el("tr", {}, el("th", { text: k }), el("td", { text: v })));
  const edges = (list, other) => {
    const t = el("table");
    for (const l of list.slice(0, 8)) {  // strongest first already
      t.append(el("tr", {}, el("td", {}, nodeLink(other(l))),
        el("td", { class: "num " + (l.w >= 0 ? "pos-v" : "neg-v"), text: fmt(l.w) })));
    }
    return t;
  };
  const ins = inLinks(n), outs = outLinks(n);
  info.replaceChildren(el("div", { class: "row" }, el("b", { text: label(n) }), pin), tbl,
    el("div", { class: "muted", text: `strongest inputs (${ins.length})` }), edges(ins, (l) => l.s),
    el("div", { class: "muted", text: `strongest outputs (${outs.length})` }), edges(outs, (l) => l.t));
  if (n.featIdx !== null) loadFeatureCard(n);
  else $("feature-card").replaceChildren(el("span", { class: "muted", text: "Not a feature node." }));
  if (n.image) renderImagePanel(n);
  $("intervene-target").textContent = n.featIdx !== null
    ? `L${n.layer} #${n.featIdx} at position ${n.ctx} (activation ${fmt(n.activation)})` : "Click a feature node.";
}

async function loadFeatureCard(n) {
  const box = $("feature-card");
  box.className = "";
  if (!S.info.features) {
    box.replaceChildren(el("div", { class: "unavailable", text: S.info.features_message || "features unavailable" }));
    return;
  }
  box.replaceChildren(el("span", { class: "muted", text: "loading…" }));
  let card;
  try {
    card = await api(`/api/features/${encodeURIComponent(n.layer)}/${n.featIdx}`);
  } catch (e) {
    box.replaceChildren(el("div", { class: "unavailable", text: e.message }));
    return;
  }
  if (S.selected !== n) return;
  box.replaceChildren(renderCard(card));
}

function renderCard(card) {
  const root = el("div", { id: "card", "data-feature": `${card.key}/${card.index}` });
  root.append(el("div", {}, el("b", { text: `Layer ${card.key}, feature ${card.index}` }),
    el("span", { class: "muted", text: `   density ${(100 * card.density).toPrecision(3)}%   max ${fmt(card.max_activation)}` })));
  root.append(histogram(card.histogram.counts));
  if (card.top_logits) {
    const col = (title, list, cls) => el("div", {}, el("div", { class: "muted", text: title }),
      ...list.map(([t, v]) => el("div", {}, el("span", { class: cls, text: fmt(v, 2) + " " }), el("code", { text: JSON.stringify(t) }))));
    root.append(el("div", { class: "logits" }, col("promotes", card.top_logits.positive, "pos-v"), col("suppresses", card.top_logits.negative, "neg-v")));
  }
  root.append(el("div", { class: "muted", text: `top ${card.examples.length} examples` }));
  for (const ex of card.examples) root.append(renderExample(ex, card.max_activation || 1));
  return root;
}

function histogram(counts) {
  const c = el("canvas", { width: 400, height: 46, class: "hist" });
  const ctx = c.getContext("2d");
  const m = Math.max(1, ...counts);
  const w = 400 / counts.length;
  ctx.fillStyle = "#2f6fbf";
  counts.forEach((v, i) => { const h = 40 * Math.log1p(v) / Math.log1p(m); ctx.fillRect(i * w, 42 - h, w - 1, h); });
  ctx.fillStyle = "#888"; ctx.font = "9px sans-serif";
  ctx.fillText("1e-4", 0, 46); ctx.fillText("1", 196, 46); ctx.fillText("1e4", 380, 46);
  return c;
}

function renderExample(ex, maxAct) {
  const div = el("div", { class: "example" });
  div.append(el("div", { class: "act", text: `activation ${fmt(ex.activation)}` }));
  const ctxDiv = el("div", { class: "ctx" });
  ex.tokens.forEach((t, j) => {
    const a = Math.max(0, ex.acts[j] || 0) / maxAct;
    const s = el("span", { class: "tok" + (j === ex.focus ? " focus" : ""), text: t.replace(/\n/g, "⏎"), title: fmt(ex.acts[j]) });
    s.style.background = `rgba(230, 120, 20, ${Math.min(1, a).toFixed(3)})`;
    ctxDiv.append(s);
  });
  div.append(ctxDiv);
  if (ex.image) {
    const pics = el("div", { class: "pics" });
    const whole = el("canvas", { width: 110, height: 110, class: "example-image" });
    const crop = el("canvas", { width: 64, height: 64, class: "example-crop" });
    pics.append(whole, crop, el("span", { class: "muted", text: ex.image.label }));
    div.append(pics);
    const img = new Image();
    img.onload = () => {
      const s = Math.min(110 / img.width, 110 / img.height);
      whole.width = Math.round(img.width * s); whole.height = Math.round(img.height * s);
      const g = whole.getContext("2d");
      g.imageSmoothingEnabled = false;
      g.drawImage(img, 0, 0, whole.width, whole.height);
      const [x0, y0, x1, y1] = ex.image.box || [0, 0, img.width, img.height];
      g.lineWidth = 3; g.strokeStyle = "#111"; g.strokeRect(x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
      g.lineWidth = 1.5; g.strokeStyle = "#ffd400"; g.strokeRect(x0 * s, y0 * s, (x1 - x0) * s, (y1 - y0) * s);
      const cg = crop.getContext("2d");
      cg.imageSmoothingEnabled = false;
      cg.drawImage(img, x0, y0, x1 - x0, y1 - y0, 0, 0, 64, 64);
      crop.dataset.loaded = "1";
    };
    img.src = `/api/feature-files/${ex.image.file.split("/").map(encodeURIComponent).join("/")}`;
  }
  return div;
}

// --- image heatmap ----------------------------------------------------------------------------
function imageSrc(entry) {
  if (entry.data) return entry.data;
  if (!entry.path || entry.path.startsWith("/") || /^[A-Za-z]:/.test(entry.path)) return null;
  return `/api/graph-files/${entry.path.split("/").map(encodeURIComponent).join("/")}`;
}

function renderImagePanel(node) {
  const data = S.data, controls = $("image-controls"), note = $("image-note");
  const imgs = (data && data.images) || [], effects = (data && data.patch_effects) || [];
  const canvas = $("image-canvas"), bar = $("colorbar-canvas");
  if (!imgs.length) {
    controls.replaceChildren(); note.textContent = "This graph has no images.";
    canvas.width = canvas.width; bar.width = bar.width;
    return;
  }
  if (!node || !S.imageChoice || S.imageChoice.slug !== S.slug) {
    const target = effects.find((e) => (S.byId.get(e.logit) || {}).isLogit) || effects[0];
    S.imageChoice = { slug: S.slug, key: target ? `${target.logit}|${target.image}|${target.view}` : null };
  }
  if (node && node.image) {
    const cur = (S.imageChoice.key || "").split("|");
    const hit = effects.find((e) => e.logit === cur[0] && e.image === node.image.index && e.view === node.image.view);
    if (hit) S.imageChoice.key = `${hit.logit}|${hit.image}|${hit.view}`;
  }
  const sel = el("select", { id: "effect-select" });
  for (const e of effects) {
    const key = `${e.logit}|${e.image}|${e.view}`;
    const o = el("option", { value: key, text: `target ${JSON.stringify(e.token)} p=${e.probability.toFixed(2)} · image ${e.image}${e.view ? " view " + e.view : ""}` });
    if (key === S.imageChoice.key) o.selected = true;
    sel.append(o);
  }
  sel.addEventListener("change", () => { S.imageChoice.key = sel.value; renderImagePanel(null); });
  controls.replaceChildren(sel);
  const eff = effects.find((e) => `${e.logit}|${e.image}|${e.view}` === S.imageChoice.key);
  const entry = eff ? imgs.find((e) => e.index === eff.image) : imgs[0];
  const src = entry && imageSrc(entry);
  if (!src) { note.textContent = "Image not available: only files under the graphs folder are served."; return; }
  const img = new Image();
  img.onload = () => drawHeatmap(img, entry, eff, node);
  img.onerror = () => { note.textContent = `Image not available (${entry.path || "embedded"}).`; };
  img.src = src;
}

function drawHeatmap(img, entry, eff, node) {
  const canvas = $("image-canvas"), bar = $("colorbar-canvas"), note = $("image-note");
  const s = Math.min(280 / img.width, 280 / img.height);
  canvas.width = Math.round(img.width * s); canvas.height = Math.round(img.height * s);
  const g = canvas.getContext("2d");
  g.imageSmoothingEnabled = false;
  g.drawImage(img, 0, 0, canvas.width, canvas.height);  // the picture keeps its colours
  if (!eff) { note.textContent = "No patch effects in this graph."; return; }
  const vals = eff.values, rows = vals.length, cols = rows ? vals[0].length : 0;
  const m = Math.max(1e-30, ...vals.flat().map(Math.abs));
  // The grid covers the whole image (view 0 of processors that crop is written by the PNG
  // heatmap with its crop box; the viewer shows the grid over the whole picture).
  const cw = canvas.width / cols, ch = canvas.height / rows, inset = 0.08;
  S.heatGeom = { cw, ch, rows, cols, image: eff.image, view: eff.view };
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
    const v = vals[r][c], share = Math.abs(v) / m;
    if (!(share >= MIN_SHARE)) continue;
    const lw = 1 + 4 * share;
    const x = (c + inset) * cw, y = (r + inset) * ch, w = cw * (1 - 2 * inset), h = ch * (1 - 2 * inset);
    g.lineWidth = lw + 2; g.strokeStyle = "#111"; g.strokeRect(x, y, w, h);
    g.lineWidth = lw; g.strokeStyle = coolwarm(v / m); g.strokeRect(x, y, w, h);
  }
  if (node && node.image && node.image.index === eff.image && node.image.view === eff.view && node.image.col >= 0) {
    g.setLineDash([3, 2]); g.lineWidth = 2; g.strokeStyle = "#fff";
    g.strokeRect(node.image.col * cw + 1, node.image.row * ch + 1, cw - 2, ch - 2); g.setLineDash([]);
  }
  // Colour bar with values.
  const bh = canvas.height;
  bar.height = bh;
  const b = bar.getContext("2d");
  b.clearRect(0, 0, bar.width, bh);
  for (let y = 0; y < bh - 20; y++) { b.fillStyle = coolwarm(1 - 2 * y / (bh - 21)); b.fillRect(4, 10 + y, 14, 1); }
  b.strokeStyle = "#333"; b.strokeRect(4, 10, 14, bh - 20);
  b.fillStyle = "#222"; b.font = "10px sans-serif";
  for (const t of [1, 0.5, 0, -0.5, -1]) {
    const y = 10 + (1 - t) / 2 * (bh - 20);
    b.fillRect(18, y, 4, 1);
    b.fillText(fmt(t * m, 3), 24, y + 3);
  }
  note.textContent = `Outline colour and width: signed influence of each patch on ${JSON.stringify(eff.token)} ` +
    `(red raises it, blue lowers it; largest |value| ${fmt(m)}). Click a patch to select its node.`;
  canvas.onclick = (ev) => {
    const rect = canvas.getBoundingClientRect();
    const c = Math.floor((ev.clientX - rect.left) / cw), r = Math.floor((ev.clientY - rect.top) / ch);
    const n = S.nodes.find((x) => x.image && x.image.index === eff.image && x.image.view === eff.view && x.image.row === r && x.image.col === c);
    if (n) selectNode(n);
  };
  canvas.dataset.drawn = "1";
}

// --- pins and supernodes ----------------------------------------------------------------------
function togglePin(n) {
  if (S.pins.has(n.id)) S.pins.delete(n.id); else S.pins.add(n.id);
  renderPins(); redraw();
}

function renderPins() {
  const list = $("pins-list");
  if (!S.pins.size) { list.className = "muted"; list.replaceChildren("No pinned nodes."); }
  else {
    list.className = "";
    list.replaceChildren(...[...S.pins].map((id) => {
      const n = S.byId.get(id);
      const box = el("input", { type: "checkbox", class: "pin-check", "data-id": id });
      box.checked = S.checked.has(id);
      box.addEventListener("change", () => { if (box.checked) S.checked.add(id); else S.checked.delete(id); });
      return el("div", {}, box, " ", n ? nodeLink(n) : el("span", { text: id }));
    }));
  }
  $("supernodes-list").replaceChildren(...S.supernodes.map((sn, i) => el("div", { class: "supernode" },
    el("b", { text: sn[0] }), el("span", { class: "muted", text: `${sn.length - 1} nodes` }),
    el("button", { type: "button", text: "ungroup", onclick: () => { S.supernodes.splice(i, 1); renderPins(); redraw(); } }))));
}

function groupSupernode() {
  const label = $("supernode-label").value.trim();
  const ids = [...S.checked].filter((id) => S.pins.has(id));
  if (!label || ids.length === 0) { $("save-status").textContent = "check pinned nodes and give a label"; return; }
  S.supernodes.push([label, ...ids]);
  S.checked.clear();
  $("supernode-label").value = "";
  renderPins(); redraw();
}

async function saveAnnotations() {
  const status = $("save-status");
  try {
    const r = await api(`/api/graphs/${encodeURIComponent(S.slug)}/annotations`,
      { body: { pinnedIds: [...S.pins], supernodes: S.supernodes } });
    status.textContent = `saved to ${r.saved}`;
  } catch (e) {
    status.textContent = `not saved: ${e.message}`;
  }
}

// --- interventions ----------------------------------------------------------------------------
async function runIntervention() {
  const n = S.selected, out = $("intervene-result");
  if (!n || n.featIdx === null) { out.textContent = "select a feature node first"; return; }
  out.textContent = "running (the model loads on first use)…";
  try {
    const r = await api("/api/intervene", { body: { slug: S.slug, interventions: [
      { layer: +n.layer, pos: n.ctx, feature: n.featIdx, value: +$("intervene-value").value }] } });
    const t = el("table", {}, el("tr", {}, el("th", { text: "clean" }), el("th", { text: "p" }), el("th", { text: "intervened" }), el("th", { text: "p" })));
    r.clean.forEach(([tok, p], i) => {
      const [tok2, p2] = r.intervened[i];
      t.append(el("tr", {}, el("td", { text: JSON.stringify(tok) }), el("td", { class: "num", text: p.toFixed(3) }),
        el("td", { text: JSON.stringify(tok2) }), el("td", { class: "num", text: p2.toFixed(3) })));
    });
    out.replaceChildren(t);
  } catch (e) {
    out.textContent = e.message;
  }
}

init();
