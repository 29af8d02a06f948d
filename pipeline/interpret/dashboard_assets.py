"""Static HTML/CSS/JS of the feature dashboard (no external resources: it must open from disk, offline).

The page holds the feature index as inline JSON; a feature view (``#f=<id>``) loads that feature's
shard ``data/shard-<k>.js`` with a ``<script>`` tag, which browsers allow on ``file://`` (``fetch``
is not), so the dashboard needs no server. All text goes in through ``textContent``, never as HTML.
"""

from __future__ import annotations

CSS = """
body{font:14px system-ui,sans-serif;margin:1.2em;color:#222}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}tr.row:hover{background:#fff6e0;cursor:pointer}
.tok{white-space:pre-wrap;border-radius:2px}.tok.hl{outline:1px solid #e80}
.ex{font-family:ui-monospace,monospace;font-size:12px;margin:3px 0;padding:3px;border-left:3px solid #ddd}
.meta{color:#777;font-size:11px}.grid{display:flex;gap:2em;flex-wrap:wrap}.box{min-width:260px}
#search{width:28em;padding:3px}.bar{fill:#e80}a{color:#05a}td.toks{font-family:ui-monospace,monospace;font-size:12px}
"""

JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("index-data").textContent);
const shards = {};
window.__shard = function (k, data) { shards[k] = data; };
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function fmt(x, d) { return (x === null || x === undefined || Number.isNaN(x)) ? "" : Number(x).toFixed(d); }
// A token's leading space shown as "\u2423" and a newline as "\u21b5", so " on" and "on" differ on screen.
function vis(s) { return String(s).replace(/^ /, "\u2423").replace(/\n/g, "\u21b5"); }
// Distinct tokens in order of first appearance, repeated ones counted: "\u2423well \u00d75".
function tokenList(ts) {
  const n = new Map(); for (const t of ts) n.set(t, (n.get(t) || 0) + 1);
  return [...n].map(([t, k]) => vis(t) + (k > 1 ? " \u00d7" + k : "")).join("  ");
}
function ci(key) { return D.columns.findIndex(c => c.key === key); }
const ASCENDING = new Set(["rank", "feature"]);  // lower is first; every other column opens highest first
let sortCol = D.sort || "feature", sortDir = ASCENDING.has(sortCol) ? 1 : -1;
function renderIndex() {
  const root = document.getElementById("app"); root.replaceChildren();
  root.appendChild(el("h1", {}, "Features of " + D.hook));
  root.appendChild(el("p", {class: "meta"}, D.summary));
  const q = el("input", {id: "search", placeholder: "search explanations, topics, ids"});
  q.value = window.__query || ""; root.appendChild(q);
  const tbl = el("table", {id: "features"}); const head = el("tr");
  for (const c of D.columns) {
    if (c.hidden) continue;
    const th = el("th", {"data-col": c.key}, c.label + (c.key === sortCol ? (sortDir < 0 ? " \u25bc" : " \u25b2") : ""));
    th.onclick = () => {
      sortDir = (sortCol === c.key) ? -sortDir : (ASCENDING.has(c.key) ? 1 : -1); sortCol = c.key; renderIndex();
    };
    head.appendChild(th);
  }
  tbl.appendChild(head);
  const ki = D.columns.findIndex(c => c.key === sortCol);
  const rows = D.rows.slice().sort((a, b) => {
    const x = a[ki], y = b[ki];
    if (x === null) return 1; if (y === null) return -1;
    return (x < y ? -1 : x > y ? 1 : 0) * sortDir;
  });
  const body = el("tbody");
  for (const r of rows) {
    const tr = el("tr", {class: "row", "data-feature": r[0]});
    D.columns.forEach((c, i) => {
      if (c.hidden) return;
      if (c.why !== undefined && r[i] === null && r[c.why]) { tr.appendChild(el("td", {class: "meta"}, r[c.why])); return; }
      let v = c.tokens ? tokenList(r[i] || []) : c.digits === undefined ? r[i] : fmt(r[i], c.digits);
      if (c.ci && r[i] !== null && r[c.ci[0]] !== null) v += " [" + fmt(r[c.ci[0]], 3) + ", " + fmt(r[c.ci[1]], 3) + "]";
      tr.appendChild(el("td", c.tokens ? {class: "toks"} : {}, v));
    });
    tr.onclick = () => { location.hash = "#f=" + r[0]; };
    body.appendChild(tr);
  }
  tbl.appendChild(body); root.appendChild(tbl);
  const filter = () => {
    const s = q.value.toLowerCase(); window.__query = q.value;
    for (const tr of body.children) tr.style.display = tr.textContent.toLowerCase().includes(s) ? "" : "none";
  };
  q.oninput = filter; filter();
}
function histogram(counts) {
  const w = 360, h = 90, n = counts.length, mx = Math.max(1, ...counts), H = D.hist;
  const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", w + 20); svg.setAttribute("height", h + 40); svg.setAttribute("class", "hist");
  const text = (x, y, s, anchor) => {
    const t = document.createElementNS(ns, "text"); t.setAttribute("x", x); t.setAttribute("y", y);
    t.setAttribute("font-size", "10"); t.setAttribute("text-anchor", anchor || "middle"); t.textContent = s;
    svg.appendChild(t);
  };
  // One tick per decade of activation (bins are log-spaced, H.per_decade to a decade from 10^H.log_min).
  for (let b = 0; b <= n; b += H.per_decade) {
    const x = b * w / n, tick = document.createElementNS(ns, "line");
    tick.setAttribute("x1", x); tick.setAttribute("x2", x); tick.setAttribute("y1", h); tick.setAttribute("y2", h + 4);
    tick.setAttribute("stroke", "#555"); tick.setAttribute("class", "tick"); svg.appendChild(tick);
    text(Math.min(x, w - 8), h + 15, "1e" + (H.log_min + b / H.per_decade), b === 0 ? "start" : "middle");
  }
  text(w, 10, "max " + mx, "end");
  counts.forEach((c, i) => {
    const r = document.createElementNS(ns, "rect"), bh = h * Math.sqrt(c / mx);
    r.setAttribute("x", i * w / n); r.setAttribute("y", h - bh); r.setAttribute("width", Math.max(1, w / n - 1));
    r.setAttribute("height", bh); r.setAttribute("class", "bar"); svg.appendChild(r);
  });
  text(0, h + 30, H.label, "start");
  return svg;
}
function example(ex, vocab) {
  const div = el("div", {class: "ex"});
  const mx = Math.max(...ex.acts, 1e-9);
  ex.toks.forEach((t, i) => {
    const a = ex.acts[i], s = el("span", {class: a > 0 ? "tok hl" : "tok", title: fmt(a, 3)}, vocab[t]);
    if (a > 0) s.style.background = "rgba(255,136,0," + (0.15 + 0.85 * a / mx).toFixed(2) + ")";
    div.appendChild(s);
  });
  div.appendChild(el("div", {class: "meta"}, ex.kind + " #" + ex.rank + " \u00b7 max " + fmt(ex.max, 3) +
    " \u00b7 context " + ex.context + (ex.title ? " \u00b7 " + ex.title : "") + (ex.label ? " [" + ex.label + "]" : "")));
  return div;
}
function table(rows, heads, link, tokens) {
  const t = el("table"); const h = el("tr"); heads.forEach(x => h.appendChild(el("th", {}, x))); t.appendChild(h);
  for (const r of rows) {
    const tr = el("tr");
    r.forEach((v, i) => {
      const td = el("td");
      if (link && i === 0 && v >= 0) { const a = el("a", {href: "#f=" + v}, v); td.appendChild(a); }
      else td.textContent = typeof v === "number" && !Number.isInteger(v) ? fmt(v, 3) : (tokens && i === 0 ? vis(v) : v);
      tr.appendChild(td);
    });
    t.appendChild(tr);
  }
  return t;
}
function renderFeature(id) {
  const k = Math.floor(id / D.shard_size);
  if (!shards[k]) {
    const s = el("script", {src: "data/shard-" + String(k).padStart(4, "0") + ".js"});
    s.onload = () => renderFeature(id);
    s.onerror = () => { document.getElementById("app").textContent = "feature " + id + ": no data"; };
    document.head.appendChild(s); return;
  }
  const f = shards[k].features[id], vocab = shards[k].vocab;
  const root = document.getElementById("app"); root.replaceChildren();
  root.appendChild(el("p", {}, "")).appendChild(el("a", {href: "#"}, "\u2190 all features"));
  const row = D.rows.find(r => r[0] === id) || [];
  root.appendChild(el("h1", {id: "feature-title"}, "Feature " + id));
  root.appendChild(el("p", {class: "explanation"}, f.explanation || ""));
  const why = row[ci("why")], det = f.detection === null && why ? "n/a (" + why + ")" : fmt(f.detection, 3);
  root.appendChild(el("p", {class: "meta"}, "explainer " + (f.explainer || "") + " \u00b7 detection balanced accuracy " +
    det + " \u00b7 fuzzing " + fmt(f.fuzzing, 3) + " \u00b7 frequency " + fmt(row[ci("frequency")], 5) +
    " \u00b7 rank " + row[ci("rank")]));
  const grid = el("div", {class: "grid"});
  const b1 = el("div", {class: "box"}); b1.appendChild(el("h3", {}, "Activation histogram")); b1.appendChild(histogram(f.hist));
  b1.appendChild(el("h3", {}, "Topic alignment (AUROC)")); b1.appendChild(table(f.topics, ["topic", "AUROC"]));
  const b2 = el("div", {class: "box"}); b2.appendChild(el("h3", {}, "Logit lens: promoted"));
  b2.appendChild(table(f.promoted, ["token", "logit"], false, true));
  b2.appendChild(el("h3", {}, "suppressed")); b2.appendChild(table(f.suppressed, ["token", "logit"], false, true));
  const b3 = el("div", {class: "box"}); b3.appendChild(el("h3", {}, "Nearest (decoder cosine)"));
  b3.appendChild(table(f.neighbours, ["feature", "cos"], true));
  b3.appendChild(el("h3", {}, "Co-occurring (Jaccard)")); b3.appendChild(table(f.cooc, ["feature", "J"], true));
  grid.append(b1, b2, b3); root.appendChild(grid);
  root.appendChild(el("h3", {}, "Examples"));
  const exs = el("div", {id: "examples"}); f.examples.forEach(ex => exs.appendChild(example(ex, vocab)));
  root.appendChild(exs);
}
function route() {
  const m = location.hash.match(/^#f=(\d+)$/);
  if (m) renderFeature(parseInt(m[1], 10)); else renderIndex();
}
window.addEventListener("hashchange", route);
route();
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{css}</style></head>
<body><div id="app"></div>
<script type="application/json" id="index-data">{data}</script>
<script>{js}</script>
</body></html>
"""

HOOKS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>SAE feature dashboards</title><style>{css}</style></head>
<body><h1>SAE feature dashboards</h1><ul id="hooks">{items}</ul></body></html>
"""
