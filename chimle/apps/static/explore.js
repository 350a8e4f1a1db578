// chimle explore: the page's logic. Plain JavaScript, no library, nothing loaded from outside the server.
// Every result the server returns keeps its latent code on the server; the page refers to it by id.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null, input: null, items: {}, a: null, b: null, shown: [], painted: false, file: null, example: null, job: null,
  reference: null, viewing: null,
};

function say(text, error = false) {
  const m = $("message");
  m.textContent = text;
  m.classList.toggle("error", error);
}

// One request at a time from this page (the server runs one model job at a time anyway): the buttons are
// disabled while it runs, bar Cancel; the status bar at the bottom of the window says what is running.
function busy(on, what = "") {
  // looking at results (full size, Close) stays possible while a job runs
  for (const b of document.querySelectorAll("button")) {
    if (b.id !== "cancel" && b.id !== "viewer-close" && !b.classList.contains("view")) b.disabled = on;
  }
  $("busy").hidden = !on;
  $("progress-area").hidden = !on;
  $("cancel").hidden = !on || !state.job;
  if (on) {
    $("progress").removeAttribute("value"); // indeterminate until the server reports
    $("progress-text").textContent = `${what}...`;
  }
}

async function call(path, options = {}, what = "working") {
  busy(true, what);
  const t0 = performance.now();
  const tick = setInterval(() => {
    $("progress-text").textContent = `${what}... ${((performance.now() - t0) / 1000).toFixed(0)} s`;
  }, 500);
  try {
    const data = await fetchJSON(path, options);
    if (data.message) say(data.message);
    return data;
  } finally {
    clearInterval(tick);
    busy(false);
  }
}

async function fetchJSON(path, options = {}) {
  const r = await fetch(path, options);
  let data;
  try {
    data = await r.json();
  } catch (e) {
    data = { message: `the server answered ${r.status} without a message` };
  }
  if (!r.ok && r.status !== 202) throw new Error(data.message || `error ${r.status}`);
  return data;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function seconds(s) {
  return s < 90 ? `${Math.max(1, Math.round(s))} s` : `${Math.round(s / 60)} min`;
}

// What the status bar says about a job: its place in the queue, or its progress and the time left.
function describe(st) {
  if (st.state === "queued") {
    const ahead = `${st.ahead} job${st.ahead === 1 ? "" : "s"} ahead`;
    const eta = st.running_eta_s !== undefined ? `, the running one ends in about ${seconds(st.running_eta_s)}` : "";
    return `${st.what}: waiting in the queue, ${ahead}${eta} (waited ${seconds(st.waited_s)})`;
  }
  const bits = [`${st.what}: ${Math.round(st.fraction * 100)}%`];
  if (st.note) bits.push(st.note);
  bits.push(`${seconds(st.elapsed_s)}`);
  if (st.eta_s !== undefined) bits.push(`about ${seconds(st.eta_s)} left`);
  return bits.join(", ");
}

// A model operation as a job: queued on the server, followed by polling its status (progress, estimate,
// place in the queue, the best so far of a search) until it ends; Cancel stops it.
async function runJob(op, body, what, onStatus = null) {
  state.job = null;
  say(""); // the last message (an error, say) no longer applies
  busy(true, what);
  try {
    let st = await fetchJSON(`api/jobs/${op}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    state.job = st.job;
    $("cancel").hidden = false;
    for (;;) {
      $("progress-text").textContent = describe(st);
      if (st.state === "running") $("progress").value = st.fraction;
      if (onStatus) onStatus(st);
      if (["done", "error", "cancelled"].includes(st.state)) break;
      await sleep(st.state === "queued" ? 500 : 250);
      st = await fetchJSON(`api/jobs/${st.job}`);
    }
    if (st.state !== "done") throw new Error(st.message);
    if (st.result.message) say(st.result.message);
    return st.result;
  } finally {
    state.job = null;
    busy(false);
  }
}

async function attempt(fn) {
  try {
    return await fn();
  } catch (e) {
    say(String(e.message || e), true);
    return null;
  }
}


// A whole number from a field, or an error that names the field (an empty field would otherwise reach
// the server as null: JSON has no NaN).
function num(id) {
  const el = $(id);
  const name = el.dataset.name || el.id;
  const text = el.value.trim();
  const lo = el.min === "" ? -Infinity : Number(el.min);
  const hi = el.max === "" ? Infinity : Number(el.max);
  const range = `${lo}..${hi === Infinity ? "" : hi}`;
  if (text === "") throw new Error(`${name} is empty: enter a whole number in ${range}`);
  if (!/^-?\d+$/.test(text)) throw new Error(`${name} must be a whole number in ${range}, got '${text}'`);
  const v = parseInt(text, 10);
  if (v < lo || v > hi) throw new Error(`${name} must be in ${range}, got ${v}`);
  return v;
}

// -- results ----------------------------------------------------------------------------------

function card(item) {
  state.items[item.id] = item;
  const f = document.createElement("figure");
  f.className = "card";
  f.dataset.id = item.id;
  if (item.distance !== undefined) f.dataset.distance = item.distance;
  const img = document.createElement("img");
  img.src = item.png;
  img.alt = item.label;
  const cap = document.createElement("figcaption");
  const bits = [item.label];
  if (item.consistency !== undefined) bits.push(`LR error ${item.consistency.toFixed(2)}/255`);
  const dist = document.createElement("span");
  dist.className = "dist";
  if (item.distance !== undefined) dist.textContent = ` · d = ${item.distance.toPrecision(4)}`;
  cap.append(bits.join(" · "), dist, document.createElement("br"));
  const view = document.createElement("button");
  view.className = "view";
  view.textContent = "full size";
  view.setAttribute("aria-label", `full size: ${item.label}`);
  view.addEventListener("click", (ev) => {
    ev.stopPropagation();
    openViewer(item.id);
  });
  cap.append(view);
  for (const [href, text] of [[item.png, "PNG"], [item.npz, "code .npz"]]) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    a.setAttribute("download", ""); // the server's name: input, model, what made it (seed, level), id
    a.setAttribute("aria-label", `download ${text} of ${item.label}`);
    a.addEventListener("click", (ev) => ev.stopPropagation());
    cap.append(a);
  }
  f.append(img, cap);
  f.addEventListener("click", (ev) => select(item.id, ev.shiftKey));
  return f;
}

function show(galleryId, items, plain = true) {
  const g = $(galleryId);
  g.replaceChildren(...items.map(card));
  if (plain) state.shown.push(...items.map((it) => it.id));
}

// -- full-size view, side by side with the input, the real image, B or the reference ------------------

function openViewer(id) {
  state.viewing = id;
  const item = state.items[id];
  $("viewer-img").src = item.png;
  $("viewer-img").alt = item.label;
  $("viewer-cap").textContent = `${item.label} (full size)`;
  const opts = $("compare-with").options;
  for (const o of opts) {
    if (o.value === "target") o.disabled = !(state.input && state.input.target_png);
    if (o.value === "b") o.disabled = !state.b || state.b === id;
    if (o.value === "reference") o.disabled = !state.reference;
  }
  if ($("compare-with").selectedOptions[0].disabled) $("compare-with").value = "";
  compareWith();
  if (!$("viewer").open) $("viewer").showModal();
}

function compareWith() {
  const what = $("compare-with").value;
  const other = $("viewer-other");
  $("viewer-other-fig").hidden = !what;
  if (!what) return;
  const [w, h] = [state.input.width, state.input.height];
  const src = {
    input: [state.input.input_png, "the input, enlarged to the outputs' size"],
    target: [state.input.target_png, "the real image"],
    b: [state.b && state.items[state.b].png, state.b && `B: ${state.items[state.b].label}`],
    reference: [state.reference, "the reference image"],
  }[what];
  other.src = src[0];
  other.alt = src[1];
  // at the outputs' size, pixel for pixel beside the result (the input enlarged without smoothing)
  other.width = w;
  other.height = h;
  $("viewer-other-cap").textContent = src[1];
}

function showPreview(preview) {
  const cards = preview.map((p) => {
    const f = document.createElement("figure");
    f.className = "card preview";
    const img = document.createElement("img");
    img.src = p.png;
    img.alt = p.label;
    const cap = document.createElement("figcaption");
    cap.textContent = p.label;
    f.append(img, cap);
    return f;
  });
  $("guided-results").replaceChildren(...cards);
}

function select(id, asB = false) {
  if (asB) state.b = id;
  else state.a = id;
  for (const c of document.querySelectorAll(".card")) {
    c.classList.toggle("sel-a", c.dataset.id === state.a);
    c.classList.toggle("sel-b", c.dataset.id === state.b);
  }
  $("sel-a").textContent = state.a ? state.items[state.a].label : "none";
  $("sel-b").textContent = state.b ? state.items[state.b].label : "none";
  if (!asB) {
    $("paint-base").src = state.items[id].png;
  }
}

// -- input ------------------------------------------------------------------------------------

function setInput(data) {
  state.input = data;
  state.shown = [];
  state.a = state.b = null;
  for (const g of ["samples", "variations", "frames", "guided-results"]) $(g).replaceChildren();
  $("input-img").src = data.input_png;
  $("target-fig").hidden = !data.target_png;
  if (data.target_png) $("target-img").src = data.target_png;
  const c = $("paint");
  c.width = data.width;
  c.height = data.height;
  $("paint-base").src = data.target_png || data.input_png;
  $("reference").value = "";
  $("use-reference").checked = false;
  $("use-reference").disabled = true;
  $("reference-fig").hidden = true;
  state.reference = null;
  clearHint();
}

// The file is kept: ticking or unticking "degrade it first" reads it again with the new setting (choosing
// the same file again fires no change event), and the field is emptied so that choosing it again does.
async function upload(file) {
  state.file = file;
  state.example = null;
  $("file").value = "";
  const q = `name=${encodeURIComponent(file.name)}&degrade=${$("degrade").checked ? 1 : 0}`;
  const data = await attempt(() => call(`api/input?${q}`, { method: "POST", body: file }, "reading the image"));
  if (data) setInput(data);
}

// -- painting the hint ------------------------------------------------------------------------

function clearHint() {
  const c = $("paint");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  state.painted = false;
}

function setupPainting() {
  const c = $("paint");
  const ctx = c.getContext("2d");
  let last = null;
  const at = (ev) => {
    const r = c.getBoundingClientRect();
    return [((ev.clientX - r.left) * c.width) / r.width, ((ev.clientY - r.top) * c.height) / r.height];
  };
  const stroke = (p, q) => {
    ctx.strokeStyle = ctx.fillStyle = $("color").value;
    ctx.lineWidth = num("brush") * (state.info ? state.info.scale : 1); // input pixels -> output pixels
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(p[0], p[1]);
    ctx.lineTo(q[0], q[1]);
    ctx.stroke();
    state.painted = true;
  };
  c.addEventListener("pointerdown", (ev) => {
    c.setPointerCapture(ev.pointerId);
    last = at(ev);
    stroke(last, last);
  });
  c.addEventListener("pointermove", (ev) => {
    if (!last) return;
    const p = at(ev);
    stroke(last, p);
    last = p;
  });
  const end = () => (last = null);
  c.addEventListener("pointerup", end);
  c.addEventListener("pointercancel", end);
}

// -- wiring -----------------------------------------------------------------------------------

function brushText() {
  const n = parseInt($("brush").value, 10);
  const s = state.info ? state.info.scale : 1;
  $("brush-out").textContent = s > 1 ? `${n} input px = ${n * s} output px` : `${n} px`;
}

// The model's facts (and the menu of models) on the page.
function applyInfo(info) {
  state.info = info;
  $("model").replaceChildren(...info.models.map((n) => new Option(n, n)));
  if (!info.models.includes(info.model)) $("model").prepend(new Option(info.model_short, info.model));
  $("model").value = info.model;
  $("model").disabled = info.models.length < 2;
  $("model-info").textContent =
    `task ${info.task || "none"} · ${info.levels} levels` + (info.scale > 1 ? ` · x${info.scale}` : "");
  $("degrade").disabled = !info.can_degrade;
  $("degrade").checked = info.defaults.degrade; // a photo is a real full-resolution image unless unticked
  $("example").replaceChildren(...info.examples.map((n) => new Option(n, n)));
  const levels = [...Array(info.levels).keys()].map((i) => new Option(`${i + 1}`, `${i + 1}`));
  $("level").replaceChildren(...levels);
  $("level").value = String(info.defaults.level);
  brushText();
}

// Another model: the inputs and results of the previous one are gone (their codes fit it alone).
function resetPage() {
  state.input = null;
  state.file = state.example = null;
  state.items = {};
  state.shown = [];
  state.a = state.b = null;
  for (const g of ["samples", "variations", "frames", "guided-results"]) $(g).replaceChildren();
  for (const id of ["input-img", "target-img", "paint-base"]) $(id).removeAttribute("src");
  $("target-fig").hidden = true;
  $("reference-fig").hidden = true;
  $("sel-a").textContent = $("sel-b").textContent = "none";
}

async function init() {
  setupPainting();
  $("num").addEventListener("input", () => ($("num-out").textContent = $("num").value));
  const info = await attempt(() => call("api/info", {}, "loading"));
  if (!info) return;
  applyInfo(info);
  say("Upload an image (or use an example), then draw samples.");
  $("brush").addEventListener("input", brushText);
  $("compare-with").addEventListener("change", compareWith);
  $("viewer-close").addEventListener("click", () => $("viewer").close());
  $("model").addEventListener("change", () =>
    attempt(async () => {
      const name = $("model").value;
      const data = await call(`api/model?name=${encodeURIComponent(name)}`, { method: "POST" }, `loading ${name}`);
      applyInfo(data);
      resetPage();
    }),
  );

  $("file").addEventListener("change", () => $("file").files[0] && upload($("file").files[0]));
  const loadExample = async (name) => {
    state.file = null;
    state.example = name;
    const q = `name=${encodeURIComponent(name)}&degrade=${$("degrade").checked ? 1 : 0}`;
    const data = await attempt(() => call(`api/example?${q}`, { method: "POST" }, "loading the example"));
    if (data) setInput(data);
  };
  $("load-example").addEventListener("click", () => loadExample($("example").value));
  // the input just read (a file or an example) is read again with the new setting
  $("degrade").addEventListener("change", () => {
    if (state.file) upload(state.file);
    else if (state.example) loadExample(state.example);
  });

  $("sample").addEventListener("click", () =>
    attempt(async () => {
      if (!state.input) throw new Error("upload an image or pick an example first");
      const data = await runJob("sample", { input: state.input.input, num: num("num"), seed: num("seed") },
        "sampling");
      show("samples", data.items);
      select(data.items[0].id);
      if (data.items.length > 1) select(data.items[1].id, true);
    }),
  );

  $("vary").addEventListener("click", () =>
    attempt(async () => {
      if (!state.a) throw new Error("select a sample (A) first");
      const body = { item: state.a, level: num("level"), num: num("num"), seed: num("seed") + 1 };
      const data = await runJob("vary", body, "varying");
      show("variations", data.items);
      select(state.a);
    }),
  );

  $("interpolate").addEventListener("click", () =>
    attempt(async () => {
      if (!state.a || !state.b) throw new Error("select two samples: click one (A), shift-click another (B)");
      const data = await runJob("interpolate", { a: state.a, b: state.b, steps: num("steps") }, "interpolating");
      show("frames", data.items);
      select(state.a);
      select(state.b, true);
    }),
  );

  $("clear-hint").addEventListener("click", clearHint);
  $("cancel").addEventListener("click", () => {
    if (state.job) attempt(() => fetchJSON(`api/jobs/${state.job}/cancel`, { method: "POST" }));
  });
  $("reference").addEventListener("change", () =>
    attempt(async () => {
      const file = $("reference").files[0];
      if (!file || !state.input) throw new Error("load an input first, then a reference image");
      const q = `input=${state.input.input}&name=${encodeURIComponent(file.name)}`;
      const data = await call(`api/reference?${q}`, { method: "POST", body: file }, "reading the reference");
      state.reference = `${data.reference_png}?v=${Date.now()}`;
      $("reference-img").src = state.reference;
      $("reference-fig").hidden = false;
      $("reference").value = "";
      $("use-reference").disabled = false;
      $("use-reference").checked = true;
    }),
  );

  $("guided").addEventListener("click", () =>
    attempt(async () => {
      if (!state.input) throw new Error("upload an image or pick an example first");
      const useRef = $("use-reference").checked;
      const body = {
        input: state.input.input,
        hint: useRef || !state.painted ? null : $("paint").toDataURL("image/png"),
        reference: useRef,
        k: num("k"),
        samples: num("candidates"),
        refine_steps: num("refine"),
        seed: num("seed"),
        compare: state.shown,
      };
      // the best so far of each match (partial outputs of the finished levels) while it searches
      const data = await runJob("guided", body, "searching", (st) => {
        if (st.preview && st.preview.length) showPreview(st.preview);
      });
      show("guided-results", data.items, false);
      if (useRef) {
        // the reference beside the results it was searched for
        const f = document.createElement("figure");
        f.className = "card reference";
        const img = document.createElement("img");
        img.src = state.reference;
        img.alt = "the reference image";
        const cap = document.createElement("figcaption");
        cap.textContent = "the reference image";
        f.append(img, cap);
        $("guided-results").prepend(f);
      }
      // the plain samples shown before get their distance to the hint too
      for (const p of data.plain) {
        for (const c of document.querySelectorAll(`.card[data-id="${p.id}"]`)) {
          c.dataset.distance = p.distance;
          c.querySelector(".dist").textContent = ` · d = ${p.distance.toPrecision(4)}`;
        }
      }
    }),
  );
}

document.addEventListener("DOMContentLoaded", init);
