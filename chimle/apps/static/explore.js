// chimle explore: the page's logic. Plain JavaScript, no library, nothing loaded from outside the server.
// Every result the server returns keeps its latent code on the server; the page refers to it by id.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, input: null, items: {}, a: null, b: null, shown: [], painted: false, file: null };

function say(text, error = false) {
  const m = $("message");
  m.textContent = text;
  m.classList.toggle("error", error);
}

// One request at a time from this page (the server runs one model job at a time anyway); the spinner
// and disabled buttons say that work is running.
async function call(path, options = {}, what = "working") {
  const buttons = [...document.querySelectorAll("button")];
  buttons.forEach((b) => (b.disabled = true));
  $("busy").hidden = false;
  $("busy-text").textContent = what + "...";
  const t0 = performance.now();
  const tick = setInterval(() => {
    $("busy-text").textContent = `${what}... ${((performance.now() - t0) / 1000).toFixed(0)} s`;
  }, 500);
  try {
    const r = await fetch(path, options);
    let data;
    try {
      data = await r.json();
    } catch (e) {
      data = { message: `the server answered ${r.status} without a message` };
    }
    if (!r.ok) throw new Error(data.message || `error ${r.status}`);
    if (data.message) say(data.message);
    return data;
  } finally {
    clearInterval(tick);
    $("busy").hidden = true;
    buttons.forEach((b) => (b.disabled = false));
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

const postJSON = (path, body, what) =>
  call(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }, what);

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
  for (const [href, text] of [[item.png, "PNG"], [item.npz, "code .npz"]]) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    a.setAttribute("download", "");
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
    ctx.lineWidth = num("brush");
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

async function init() {
  setupPainting();
  $("num").addEventListener("input", () => ($("num-out").textContent = $("num").value));
  const info = await attempt(() => call("api/info", {}, "loading"));
  if (!info) return;
  state.info = info;
  $("model-info").textContent =
    `${info.model} · task ${info.task || "none"} · ${info.levels} levels` + (info.scale > 1 ? ` · x${info.scale}` : "");
  $("degrade").disabled = !info.can_degrade;
  $("degrade").checked = info.can_degrade; // a photo is a real full-resolution image unless unticked
  $("example").replaceChildren(...info.examples.map((n) => new Option(n, n)));
  const levels = [...Array(info.levels).keys()].map((i) => new Option(`${i + 1}`, `${i + 1}`));
  $("level").replaceChildren(...levels);
  $("level").value = String(info.defaults.level);
  say("Upload an image (or use an example), then draw samples.");

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
      const data = await postJSON("api/sample", { input: state.input.input, num: num("num"), seed: num("seed") },
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
      const data = await postJSON("api/vary", body, "varying");
      show("variations", data.items);
      select(state.a);
    }),
  );

  $("interpolate").addEventListener("click", () =>
    attempt(async () => {
      if (!state.a || !state.b) throw new Error("select two samples: click one (A), shift-click another (B)");
      const data = await postJSON("api/interpolate", { a: state.a, b: state.b, steps: num("steps") },
        "interpolating");
      show("frames", data.items);
      select(state.a);
      select(state.b, true);
    }),
  );

  $("clear-hint").addEventListener("click", clearHint);
  $("reference").addEventListener("change", () =>
    attempt(async () => {
      const file = $("reference").files[0];
      if (!file || !state.input) throw new Error("load an input first, then a reference image");
      const q = `input=${state.input.input}&name=${encodeURIComponent(file.name)}`;
      await call(`api/reference?${q}`, { method: "POST", body: file }, "reading the reference");
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
      const data = await postJSON("api/guided", body, "searching");
      show("guided-results", data.items, false);
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
