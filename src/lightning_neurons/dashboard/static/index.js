// The Neurons tab of TensorBoard (lightning_neurons.dashboard.plugin). Plain ES module, no dependencies.
// Every text from the run is set with textContent (never innerHTML), so descriptions cannot inject markup.

const STATE_COLOURS = {
  changed: "#fb8f44", gained: "#2da44e", lost: "#cf222e", stable: "#8c959f", new: "#0969da", dead: "#24292f",
};
const STATES = Object.keys(STATE_COLOURS);
const CSS = `
body{font-family:Roboto,system-ui,sans-serif;margin:0;padding:12px 16px;color:#1f2328;background:#fff;font-size:13px}
.bar{display:flex;flex-wrap:wrap;gap:10px;align-items:center;margin-bottom:10px}
.bar label{color:#57606a}.bar select,.bar input{font:inherit;padding:2px 4px}
#epochLabel{min-width:70px;display:inline-block;font-weight:600}
.legend span{display:inline-block;margin-right:10px}.legend i{display:inline-block;width:10px;height:10px;
border-radius:2px;margin-right:3px;vertical-align:middle}
.charts{display:flex;gap:16px;flex-wrap:wrap;margin:6px 0 10px}
.chart{border:1px solid #d0d7de;border-radius:6px;padding:6px}.chart h4{margin:0 0 4px;font-size:12px;color:#57606a}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:8px}
.card{border:1px solid #d0d7de;border-left:6px solid #8c959f;border-radius:6px;padding:6px;cursor:pointer;
background:#fff}.card:hover{box-shadow:0 1px 4px #0003}
.card img,.tl img{max-width:100%;max-height:90px;image-rendering:pixelated;display:block;margin-bottom:4px}
.card .u{color:#57606a;font-size:11px}.card .d{font-weight:600;overflow-wrap:anywhere}
.card .s{color:#57606a;font-size:11px}.nocrop{height:20px;color:#8c959f;font-size:11px}
#status{color:#57606a;margin:6px 0}
#timeline{border:1px solid #d0d7de;border-radius:6px;padding:8px;margin:10px 0;display:none;background:#f6f8fa}
#timeline h3{margin:0 0 6px;font-size:14px}
.tl{display:flex;gap:6px;overflow-x:auto}.ep{flex:0 0 170px;border:1px solid #d0d7de;border-left:5px solid #8c959f;
border-radius:6px;padding:4px 6px;background:#fff}.ep .e{color:#57606a;font-size:11px}
.ep .d{font-weight:600;overflow-wrap:anywhere}.ep .x{color:#0a3069;font-size:11px;overflow-wrap:anywhere}
button{font:inherit;cursor:pointer}
`;

const state = {runs: [], run: null, layer: null, epoch: null, sort: "unit", filter: "", q: "", unit: null};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

async function getJson(route, params) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== null && v !== "" && v !== undefined));
  const response = await fetch(`./${route}?${query}`);
  if (!response.ok) throw new Error(`${route}: HTTP ${response.status}`);
  return response.json();
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

function cropImage(path) {
  if (!path) return el("div", {class: "nocrop", text: "no crops"});
  return el("img", {src: `./crop?${new URLSearchParams({run: state.run, path})}`, alt: "top crops", loading: "lazy"});
}

function card(u, showLayer) {
  const c = el("div", {class: "card", "data-unit": String(u.unit), "data-state": u.state,
    onclick: () => openTimeline(u.layer || state.layer, u.unit)});
  c.style.borderLeftColor = STATE_COLOURS[u.state] || "#8c959f";
  const significance = u.q_value !== null ? `q ${fmt(u.q_value)}` : (u.p_value !== null ? `p ${fmt(u.p_value)}` : "");
  c.append(
    cropImage(u.crop),
    el("div", {class: "u", text: `${showLayer ? u.layer + " · " : ""}unit ${u.unit} · ${u.state}`}),
    el("div", {class: "d", text: u.shown}),
    el("div", {class: "s", text: `score ${fmt(u.score)} ${significance}`}),
  );
  if (u.state === "changed" && u.previous_description) {
    c.append(el("div", {class: "s", text: `was: ${u.previous_description}`}));
  }
  return c;
}

function lineChart(title, xs, series, width = 320, height = 140) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  const pad = 24, n = xs.length;
  const x = (i) => pad + (n <= 1 ? 0 : (i * (width - 2 * pad)) / (n - 1));
  const maxY = Math.max(1e-9, ...Object.values(series).flat().filter((v) => v !== null));
  const y = (v) => height - pad - (v / maxY) * (height - 2 * pad);
  const axis = document.createElementNS(ns, "path");
  axis.setAttribute("d", `M${pad},${pad}V${height - pad}H${width - pad}`);
  axis.setAttribute("stroke", "#8c959f"); axis.setAttribute("fill", "none"); svg.append(axis);
  for (const [name, values] of Object.entries(series)) {
    const colour = STATE_COLOURS[name] || name;
    const pts = values.map((v, i) => (v === null ? null : `${x(i)},${y(v)}`)).filter(Boolean);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", pts.join(" ")); line.setAttribute("fill", "none");
    line.setAttribute("stroke", colour); line.setAttribute("stroke-width", "2"); svg.append(line);
  }
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", pad); label.setAttribute("y", 12); label.setAttribute("font-size", "10");
  label.textContent = `max ${maxY.toFixed(2)} · epochs ${xs[0] ?? ""}–${xs[n - 1] ?? ""}`; svg.append(label);
  return el("div", {class: "chart"}, el("h4", {text: title}), svg);
}

function conceptChart(xs, concepts, width = 360, height = 140) {
  const ns = "http://www.w3.org/2000/svg";
  const palette = ["#0969da", "#2da44e", "#fb8f44", "#8250df", "#cf222e", "#1b7c83", "#bf8700", "#6e7781", "#d0d7de"];
  const names = Object.keys(concepts);
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  const totals = xs.map((_, i) => names.reduce((s, c) => s + concepts[c][i], 0));
  const maxT = Math.max(1, ...totals), barW = Math.max(4, (width - 20) / Math.max(1, xs.length) - 4);
  xs.forEach((_, i) => {
    let top = height - 14;
    names.forEach((c, j) => {
      const h = (concepts[c][i] / maxT) * (height - 24);
      const r = document.createElementNS(ns, "rect");
      r.setAttribute("x", 10 + i * (barW + 4)); r.setAttribute("y", top - h);
      r.setAttribute("width", barW); r.setAttribute("height", h); r.setAttribute("fill", palette[j % palette.length]);
      const tip = document.createElementNS(ns, "title"); tip.textContent = `${c}: ${concepts[c][i]}`; r.append(tip);
      svg.append(r); top -= h;
    });
  });
  const legend = el("div", {class: "legend"});
  names.forEach((c, j) => legend.append(el("span", {}, el("i", {style: `background:${palette[j % palette.length]}`}),
    document.createTextNode(c))));
  return el("div", {class: "chart"}, el("h4", {text: "concept distribution (units per concept)"}), svg, legend);
}

async function openTimeline(layer, unit) {
  state.unit = {layer, unit};
  const box = document.getElementById("timeline");
  box.style.display = "block";
  box.replaceChildren(el("h3", {text: `${layer} · unit ${unit}: loading…`}));
  const data = await getJson("unit", {run: state.run, layer, unit});
  const strip = el("div", {class: "tl"});
  for (const e of data.epochs) {
    const cell = el("div", {class: "ep", "data-epoch": String(e.epoch)});
    cell.style.borderLeftColor = STATE_COLOURS[e.state] || "#8c959f";
    // What the HTML report's cell shows (the same entry of dashboard.queries.layer_timelines).
    const q = e.q_value !== null ? " · q " + fmt(e.q_value) : "";
    const conf = e.confidence !== null ? " · conf " + fmt(e.confidence, 2) : "";
    const sim = e.similarity !== null ? " · sim " + fmt(e.similarity, 2) : "";
    cell.append(el("div", {class: "e", text: `epoch ${e.epoch} · ${e.state}`}), cropImage(e.crop),
      el("div", {class: "d", text: e.shown}));
    if (e.kind) cell.append(el("div", {class: "e", text: e.kind}));
    cell.append(el("div", {class: "e", text: `score ${fmt(e.score)}${q}${conf}${sim}`}));
    if (e.baseline) {
      cell.append(el("div", {class: "x", text: "new baseline: the settings changed, not compared"}));
    } else if (["changed", "gained", "lost"].includes(e.state) && e.previous_description !== null) {
      cell.append(el("div", {class: "x", text: `was: ${e.previous_description}`}));
    }
    if (e.concepts_changed && e.state !== "changed") {
      const overlap = e.concept_jaccard !== null ? ` (overlap ${fmt(e.concept_jaccard, 2)})` : "";
      cell.append(el("div", {class: "x", text: `concept set changed${overlap}`}));
    }
    if (e.combination.length) {
      cell.append(el("div", {class: "x", text: "combination: " + e.combination.map((a) => `${a.text} (${fmt(a.score, 2)})`).join(" + ")}));
    }
    if (e.alternatives.length) {
      cell.append(el("div", {class: "x", text: "alternatives: " + e.alternatives.map((a) => a.text).join(", ")}));
    }
    if (e.ablation.length) {
      cell.append(el("div", {class: "x", text: "ablation hurts: " + e.ablation.map((a) => `${a.class} (${fmt(a.drop, 2)})`).join(", ")}));
    }
    strip.append(cell);
  }
  box.replaceChildren(
    el("h3", {text: `${layer} · unit ${unit}: ${data.epochs.length} explained epochs`},
      el("button", {text: " close", style: "margin-left:12px", onclick: () => { box.style.display = "none"; }})),
    strip);
}

async function showCharts() {
  const charts = document.getElementById("charts");
  const data = await getJson("charts", {run: state.run, layer: state.layer});
  const {changed, gained, lost, dead} = data.fraction;
  charts.replaceChildren(
    lineChart("fraction of units changed / gained / lost / dead", data.epochs, {changed, gained, lost, dead}),
    conceptChart(data.epochs, data.concepts));
}

async function showGrid() {
  const grid = document.getElementById("grid");
  const status = document.getElementById("status");
  if (state.q) {
    const data = await getJson("search", {run: state.run, q: state.q, epoch: state.epoch});
    status.textContent = `"${state.q}": ${data.matched} units at epoch ${data.epoch} (` +
      Object.entries(data.layers).map(([l, n]) => `${l}: ${n}`).join(", ") + ")";
    grid.replaceChildren(...data.units.map((u) => card(u, true)));
    return;
  }
  const data = await getJson("layer", {run: state.run, layer: state.layer, epoch: state.epoch, sort: state.sort,
    state: state.filter, limit: 300});
  const counts = STATES.map((s) => `${s} ${data.counts[s] || 0}`).join(" · ");
  status.textContent = `${data.layer} at epoch ${data.epoch}: ${data.matched} of ${data.total} units shown (${counts})`;
  grid.replaceChildren(...data.units.map((u) => card(u, false)));
}

function currentRun() {
  return state.runs.find((r) => r.key === state.run);
}

function fillSelect(select, values, current, label = (v) => v) {
  select.replaceChildren(...values.map((v) => el("option", {value: v, text: label(v)})));
  if (current !== null && values.includes(current)) select.value = current;
}

async function refresh() {
  state.runs = await getJson("runs", {});
  const runSel = document.getElementById("run");
  if (!state.runs.length) {
    document.getElementById("status").textContent = "No run with neuron explanations under the logdir yet.";
    return;
  }
  if (!currentRun()) state.run = state.runs[0].key;
  fillSelect(runSel, state.runs.map((r) => r.key), state.run, (k) => {
    const r = state.runs.find((x) => x.key === k); return `${r.run} / ${r.explainer}`;
  });
  const run = currentRun();
  if (!run.layers.includes(state.layer)) state.layer = run.layers[0] || null;
  fillSelect(document.getElementById("layer"), run.layers, state.layer);
  const slider = document.getElementById("epoch");
  const epochs = run.epochs;
  slider.max = String(Math.max(0, epochs.length - 1));
  const atEnd = state.epoch === null || state.epochAtEnd;
  const idx = atEnd ? epochs.length - 1 : Math.max(0, epochs.indexOf(state.epoch));
  slider.value = String(idx);
  state.epoch = epochs[idx] ?? null;
  state.epochAtEnd = idx === epochs.length - 1;
  document.getElementById("epochLabel").textContent = `epoch ${state.epoch}`;
  document.getElementById("epochCount").textContent = `(${epochs.length} explained)`;
  await Promise.all([showGrid(), showCharts()]);
  if (state.unit) await openTimeline(state.unit.layer, state.unit.unit);
}

export function render() {
  document.head.append(el("style", {text: CSS}));
  const legend = el("div", {class: "legend"});
  for (const s of STATES) legend.append(el("span", {}, el("i", {style: `background:${STATE_COLOURS[s]}`}), document.createTextNode(s)));
  const bar = el("div", {class: "bar"},
    el("label", {text: "run"}), el("select", {id: "run", onchange: (e) => { state.run = e.target.value; state.unit = null; refresh(); }}),
    el("label", {text: "layer"}), el("select", {id: "layer", onchange: (e) => { state.layer = e.target.value; refresh(); }}),
    el("label", {text: "epoch"}),
    el("input", {id: "epoch", type: "range", min: "0", max: "0", step: "1", oninput: (e) => {
      const run = currentRun(); const i = Number(e.target.value);
      state.epoch = run.epochs[i]; state.epochAtEnd = i === run.epochs.length - 1;
      document.getElementById("epochLabel").textContent = `epoch ${state.epoch}`; showGrid();
    }}),
    el("span", {id: "epochLabel"}), el("span", {id: "epochCount", class: "s"}),
    el("input", {id: "search", type: "search", placeholder: "search concept, e.g. stripes", onchange: (e) => {
      state.q = e.target.value.trim(); showGrid();
    }}),
    el("label", {text: "sort"}),
    el("select", {id: "sort", onchange: (e) => { state.sort = e.target.value; showGrid(); }},
      el("option", {value: "unit", text: "unit"}), el("option", {value: "score", text: "score"}),
      el("option", {value: "drift", text: "drift"})),
    el("label", {text: "state"}),
    el("select", {id: "filter", onchange: (e) => { state.filter = e.target.value; showGrid(); }},
      el("option", {value: "", text: "all"}), ...STATES.map((s) => el("option", {value: s, text: s}))),
    el("button", {id: "reload", text: "reload", onclick: () => refresh()}),
  );
  // Deep links (plugin_entry.html?name=neurons&run=...&layer=...&unit=...&q=...): open a view directly.
  const params = new URLSearchParams(location.search);
  state.run = params.get("run"); state.layer = params.get("layer"); state.q = params.get("q") || "";
  if (params.get("epoch") !== null) { state.epoch = Number(params.get("epoch")); state.epochAtEnd = false; }
  if (params.get("unit") !== null) state.unit = {layer: params.get("layer"), unit: Number(params.get("unit"))};
  bar.querySelector("#search").value = state.q;
  document.body.append(bar, legend, el("div", {id: "charts", class: "charts"}), el("div", {id: "timeline"}),
    el("div", {id: "status"}), el("div", {id: "grid", class: "grid"}));
  refresh().catch((err) => { document.getElementById("status").textContent = String(err); });
  // New rounds of a run in training appear on reload, and by themselves every 30 s.
  setInterval(() => { if (!document.hidden) refresh().catch(() => {}); }, 30000);
}
