// dfserve web viewer: plain JS, no build step. Talks to the API of the server that serves it:
// GET /v1/models, POST /v1/rollouts + WS /v1/rollouts/{id}/stream (Start), WS /v1/sessions
// (Play: the keyboard drives the world at the model's fps).
"use strict";

const $ = (id) => document.getElementById(id);
const el = {
  apiKey: $("api-key"), model: $("model"), modelInfo: $("model-info"), example: $("example"),
  upload: $("upload"), uploadInfo: $("upload-info"), schedule: $("schedule"),
  sampler: $("sampler"), steps: $("steps"), guidance: $("guidance"), seed: $("seed"),
  frames: $("frames"), actions: $("actions"), start: $("start"), cancel: $("cancel"),
  download: $("download"), play: $("play"), idleNoop: $("idle-noop"), canvas: $("frame"),
  overlay: $("overlay"), status: $("status"), progress: $("progress"), counter: $("counter"),
  legend: $("legend"), notes: $("notes"), error: $("error"),
};
const ctx = el.canvas.getContext("2d", { willReadFrequently: true });
const state = {
  models: [], model: null,
  rollout: null, // {id, ws, total, last, done}
  session: null, // {ws, fps, actions, timer, pressed[], held Map, inflight, bindings}
  shown: 0, // frames drawn in the current run
  draws: Promise.resolve(), // frames are drawn in order
};

// ------------------------------------------------------------------------------ API

const KEY_STORE = "dfserve.apiKey";
el.apiKey.value = localStorage.getItem(KEY_STORE) || "";
el.apiKey.addEventListener("change", () => {
  localStorage.setItem(KEY_STORE, el.apiKey.value.trim());
  loadModels();
});

function authHeaders() {
  const key = el.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function wsUrl(path, query = {}) {
  const key = el.apiKey.value.trim();
  if (key) query.token = key;
  const qs = new URLSearchParams(query).toString();
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}${path}${qs ? "?" + qs : ""}`;
}

async function api(method, path, body) {
  const init = { method, headers: authHeaders() };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  // A retried POST is the same job (Idempotency-Key); 429/503 wait for Retry-After.
  if (method === "POST") init.headers["Idempotency-Key"] = uniqueId();
  for (let attempt = 0; ; attempt++) {
    const r = await fetch(path, init);
    if (r.ok) return r;
    if ((r.status === 429 || r.status === 503) && attempt < 4) {
      const wait = Number(r.headers.get("Retry-After")) || 2 ** attempt;
      setStatus(`queue full · retrying in ${wait} s`, "queued");
      await new Promise((resolve) => setTimeout(resolve, wait * 1000));
      continue;
    }
    throw new Error(await errorText(r));
  }
}

function uniqueId() { // crypto.randomUUID needs a secure context (https or localhost)
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

async function errorText(r) {
  try {
    const d = (await r.json()).detail;
    if (typeof d === "string") return `${r.status}: ${d}`;
    const acc = d.accepted ? ` (accepted: ${[].concat(d.accepted).join(", ")})` : "";
    return `${r.status} ${d.field ? d.field + ": " : ""}${d.message}${acc}`;
  } catch (e) {
    return `${r.status} ${r.statusText}`;
  }
}

function errorMessage(doc) {
  const d = doc.detail || {};
  return `${d.field ? d.field + ": " : ""}${d.message || "error"}`;
}

// ------------------------------------------------------------------------------ UI state

function setStatus(text, kind) {
  el.status.textContent = text;
  el.status.className = `status ${kind || text}`;
}

// Errors get their own line under the canvas, which wraps: the status pill only says "error".
function showError(message) {
  el.error.textContent = message;
  el.error.hidden = !message;
}

function setProgress(done, total) {
  el.progress.max = Math.max(total || 1, 1);
  el.progress.value = done;
  el.counter.textContent = total ? `${done} / ${total} frames` : `${done} frames`;
}

function setBusy(mode) { // null | "rollout" | "play"
  el.start.disabled = mode !== null;
  el.cancel.disabled = mode !== "rollout";
  el.play.textContent = mode === "play" ? "Stop" : "Play";
  el.play.classList.toggle("active", mode === "play");
  el.play.disabled = mode === "rollout";
  for (const c of [el.model, el.example, el.upload, el.schedule, el.sampler, el.steps,
                   el.guidance, el.seed, el.frames, el.actions]) c.disabled = mode !== null;
}

function resetCanvas() { // a new run: no frame of the previous one stays on screen
  state.shown = 0;
  el.canvas.dataset.frames = "0";
  ctx.clearRect(0, 0, el.canvas.width, el.canvas.height);
  el.overlay.textContent = "waiting for the first frame…";
  el.overlay.hidden = false;
  showError("");
}

function drawFrame(blob, counts = true) {
  state.draws = state.draws.then(async () => {
    const bitmap = await createImageBitmap(blob);
    if (el.canvas.width !== bitmap.width || el.canvas.height !== bitmap.height) {
      el.canvas.width = bitmap.width;
      el.canvas.height = bitmap.height;
    }
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    el.overlay.hidden = true;
    if (counts) {
      state.shown += 1;
      el.canvas.dataset.frames = String(state.shown);
    }
  }).catch((e) => console.error("frame decode failed", e));
  return state.draws;
}

// ------------------------------------------------------------------------------ models

async function loadModels() {
  try {
    const doc = await (await api("GET", "/v1/models")).json();
    state.models = doc.models;
    el.model.replaceChildren(...doc.models.map((m) => new Option(m.id, m.id, m.default, m.default)));
    selectModel();
    setStatus("idle");
  } catch (e) {
    setStatus("error");
    showError(`Could not load the models: ${e.message}`);
  }
}

function selectModel() {
  const m = state.models.find((x) => x.id === el.model.value) || state.models[0];
  if (!m) return;
  state.model = m;
  el.modelInfo.textContent = `${m.resolution}×${m.resolution} · ${m.fps} fps · window ` +
    `${m.n_frames} frames · ` +
    (m.actions ? `${m.actions.length} actions` : "unconditional (no actions)");
  const fill = (select, values, chosen) => select.replaceChildren(
    ...values.map((v) => new Option(v, v, v === chosen, v === chosen)));
  fill(el.example, [...m.examples, ""], m.examples[0]);
  el.example.options[el.example.options.length - 1].textContent = "— uploaded context —";
  fill(el.schedule, m.schedules, m.defaults.schedule);
  fill(el.sampler, m.samplers, m.defaults.sampler);
  el.steps.value = m.defaults.steps;
  el.guidance.value = m.defaults.guidance;
  el.frames.max = m.max_rollout_frames;
  el.canvas.width = el.canvas.height = m.resolution;
}

el.model.addEventListener("change", selectModel);
el.upload.addEventListener("change", () => {
  const n = el.upload.files.length;
  el.uploadInfo.textContent = n ? `${n} file${n > 1 ? "s" : ""} selected` : "";
  if (n) el.example.value = "";
});
el.example.addEventListener("change", () => {
  if (el.example.value) { el.upload.value = ""; el.uploadInfo.textContent = ""; }
});

function numberOrNull(input) {
  return input.value === "" ? null : Number(input.value);
}

function samplingParams() {
  const p = { model: state.model.id, schedule: el.schedule.value, sampler: el.sampler.value,
              steps: numberOrNull(el.steps), guidance: numberOrNull(el.guidance),
              seed: numberOrNull(el.seed) };
  return Object.fromEntries(Object.entries(p).filter(([, v]) => v !== null && v !== ""));
}

function contextSource() {
  if (el.upload.files.length) return { files: [...el.upload.files] };
  if (el.example.value) return { example: el.example.value };
  throw new Error("choose an example or upload context images / a video");
}

// ------------------------------------------------------------------------------ rollouts

async function startRollout() {
  let src;
  try { src = contextSource(); } catch (e) { return fail(e.message); }
  const params = { ...samplingParams(), frames: numberOrNull(el.frames) };
  const actions = el.actions.value.split(",").map((a) => a.trim()).filter(Boolean);
  if (actions.length) params.actions = actions.map((a) => (/^\d+$/.test(a) ? Number(a) : a));
  setBusy("rollout");
  resetCanvas();
  el.download.disabled = true;
  el.notes.textContent = "";
  setStatus("submitting", "queued");
  try {
    let r;
    if (src.files) {
      const form = new FormData();
      form.append("params", JSON.stringify(params));
      for (const f of src.files) form.append("files", f, f.name);
      r = await api("POST", "/v1/rollouts", form);
    } else {
      r = await api("POST", "/v1/rollouts", { ...params, example: src.example });
    }
    const doc = await r.json();
    state.rollout = { id: doc.id, total: params.frames || 0, last: -1, done: false, tries: 0 };
    if (doc.notes && doc.notes.length) el.notes.textContent = doc.notes.join(" · ");
    const status = await (await api("GET", `/v1/rollouts/${doc.id}`)).json();
    state.rollout.total = status.progress.frames_total;
    setProgress(0, state.rollout.total);
    openStream();
  } catch (e) {
    fail(e.message);
  }
}

function openStream() {
  const ro = state.rollout;
  const ws = new WebSocket(wsUrl(`/v1/rollouts/${ro.id}/stream`,
                                 { format: "png", after: String(ro.last) }));
  ws.binaryType = "blob";
  ro.ws = ws;
  let header = null;
  ws.onmessage = (ev) => {
    if (typeof ev.data !== "string") {
      if (header) {
        ro.last = header.index;
        drawFrame(ev.data);
        header = null;
      }
      return;
    }
    const msg = JSON.parse(ev.data);
    ro.tries = 0;
    if (msg.type === "queued") setStatus(`queued · position ${msg.position + 1}`, "queued");
    else if (msg.type === "started") setStatus("running");
    else if (msg.type === "frame") header = msg;
    else if (msg.type === "progress") setProgress(msg.frames_done, msg.frames_total);
    else if (msg.type === "error") fail(errorMessage(msg));
    else if (msg.type === "done") finishRollout(msg);
  };
  ws.onclose = () => {
    if (ro.done || state.rollout !== ro) return;
    if (ro.tries++ < 5) { // dropped: resume after the last frame shown
      setStatus("reconnecting", "queued");
      setTimeout(openStream, 500 * 2 ** ro.tries);
    } else fail("the stream was lost");
  };
}

async function finishRollout(msg) {
  const ro = state.rollout;
  ro.done = true;
  await state.draws;
  setStatus(msg.status, msg.status);
  showError(msg.error || "");
  if (msg.status === "succeeded") setProgress(ro.total, ro.total);
  el.download.disabled = msg.status !== "succeeded";
  setBusy(null);
}

async function cancelRollout() {
  const ro = state.rollout;
  if (!ro || ro.done) return;
  setStatus("cancelling", "queued"); // before the DELETE: `done` may arrive before its answer
  el.cancel.disabled = true;
  try {
    await api("DELETE", `/v1/rollouts/${ro.id}`);
  } catch (e) {
    fail(e.message);
  }
}

async function downloadVideo() {
  const ro = state.rollout;
  if (!ro) return;
  try {
    const blob = await (await api("GET", `/v1/rollouts/${ro.id}/video`)).blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `dfserve-${ro.id.slice(0, 8)}.mp4`;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
  } catch (e) {
    fail(e.message);
  }
}

function fail(message) {
  setStatus("error", "error");
  showError(message);
  if (state.rollout) { state.rollout.done = true; state.rollout.ws?.close(); }
  setBusy(null);
}

// ------------------------------------------------------------------------------ play

// Movement keys first (arrows and WASD), space = "do"; every other action gets the next free
// key of 1-9, 0, then letters. The legend on screen is made from the same table.
const MOVES = [
  [["ArrowLeft", "a"], ["move_left", "left"]], [["ArrowRight", "d"], ["move_right", "right"]],
  [["ArrowUp", "w"], ["move_up", "up"]], [["ArrowDown", "s"], ["move_down", "down"]],
  [[" "], ["do", "interact", "use"]],
];
const SPARE_KEYS = "1234567890qertyuiopfghjklzxcvbnm".split("");
const KEY_LABEL = { ArrowLeft: "←", ArrowRight: "→", ArrowUp: "↑", ArrowDown: "↓", " ": "space" };

function keyBindings(actions) {
  const keys = new Map(); // key -> action index
  const taken = new Set();
  for (const [ks, names] of MOVES) {
    const i = actions.findIndex((a) => names.includes(a));
    if (i >= 0) { ks.forEach((k) => keys.set(k, i)); taken.add(i); }
  }
  let spare = 0;
  actions.forEach((_, i) => {
    if (taken.has(i)) return;
    while (spare < SPARE_KEYS.length && keys.has(SPARE_KEYS[spare])) spare++;
    if (spare < SPARE_KEYS.length) keys.set(SPARE_KEYS[spare++], i);
  });
  return keys;
}

function renderLegend(actions, keys) {
  const byAction = actions.map(() => []);
  for (const [k, i] of keys) byAction[i].push(KEY_LABEL[k] || k.toUpperCase());
  el.legend.replaceChildren(...actions.map((name, i) => {
    const span = document.createElement("span");
    span.className = "key";
    span.dataset.action = name;
    span.append(...byAction[i].map((k) => Object.assign(document.createElement("kbd"),
                                                       { textContent: k })), ` ${name}`);
    return span;
  }));
  el.legend.hidden = false;
}

async function startPlay() {
  let src;
  try { src = contextSource(); } catch (e) { return fail(e.message); }
  const start = { type: "start", ...samplingParams(), format: "png" };
  try {
    if (src.example) start.example = src.example;
    else if (src.files.length === 1 && src.files[0].type.startsWith("video/")) {
      start.context_video = await dataUrl(src.files[0]);
    } else start.context = await Promise.all(src.files.map(dataUrl));
  } catch (e) { return fail(`could not read the files: ${e}`); }
  setBusy("play");
  resetCanvas();
  el.download.disabled = true;
  setProgress(0, 0);
  setStatus("connecting", "queued");
  const ws = new WebSocket(wsUrl("/v1/sessions"));
  ws.binaryType = "blob";
  const s = { ws, fps: 10, actions: [], keys: new Map(), pressed: [], held: new Set(),
              inflight: 0, frames: 0, header: null, timer: null, ended: false };
  state.session = s;
  ws.onopen = () => ws.send(JSON.stringify(start));
  ws.onmessage = (ev) => {
    if (typeof ev.data !== "string") {
      if (s.header && s.header.type === "frame") {
        s.inflight = Math.max(0, s.inflight - 1);
        s.frames += 1;
        setProgress(s.frames, 0);
      }
      if (s.header) drawFrame(ev.data, s.header.type === "frame");
      s.header = null;
      return;
    }
    const msg = JSON.parse(ev.data);
    if (msg.type === "queued") setStatus(`queued · position ${msg.position + 1}`, "queued");
    else if (msg.type === "ready") {
      s.fps = msg.fps;
      s.actions = msg.actions;
      s.keys = keyBindings(msg.actions);
      renderLegend(msg.actions, s.keys);
      setStatus(`playing · ${msg.fps} fps`, "playing");
      s.timer = setInterval(() => tick(s), 1000 / msg.fps);
    } else if (msg.type === "frame" || msg.type === "context") s.header = msg;
    else if (msg.type === "error") {
      s.inflight = 0;
      setStatus("error", "error");
      showError(errorMessage(msg));
    } else if (msg.type === "done") {
      s.ended = true;
      setStatus(msg.reason || msg.error || `session ${msg.status}`, "idle");
    }
  };
  ws.onclose = () => endPlay(s);
}

function tick(s) {
  if (s.ws.readyState !== WebSocket.OPEN || s.inflight >= 2) return; // keep latency low
  let action = s.pressed.shift();
  if (action === undefined && s.held.size) action = [...s.held].pop();
  if (action === undefined && el.idleNoop.checked) {
    const noop = s.actions.indexOf("noop");
    if (noop >= 0) action = noop;
  }
  if (action === undefined) return;
  s.inflight += 1;
  s.ws.send(JSON.stringify({ type: "action", action }));
}

function endPlay(s) {
  if (!s || state.session !== s) return;
  clearInterval(s.timer);
  state.session = null;
  el.legend.hidden = true;
  if (!s.ended && !el.status.classList.contains("error")) setStatus("session closed", "idle");
  setBusy(null);
}

function stopPlay() {
  const s = state.session;
  if (!s) return;
  if (s.ws.readyState === WebSocket.OPEN) s.ws.send(JSON.stringify({ type: "stop" }));
  setTimeout(() => s.ws.close(), 2000);
  endPlay(s);
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

function keyOf(ev) {
  return ev.key.length === 1 ? ev.key.toLowerCase() : ev.key;
}

// Keys typed into a text field or a select are the field's; a focused checkbox or button
// (just clicked) must not swallow Play's keys.
function typingIn(target) {
  if (target instanceof HTMLSelectElement || target instanceof HTMLTextAreaElement) return true;
  return target instanceof HTMLInputElement &&
    !["checkbox", "radio", "button", "submit", "reset", "range", "file"].includes(target.type);
}

document.addEventListener("keydown", (ev) => {
  const s = state.session;
  if (!s || !s.keys.size || typingIn(ev.target)) return;
  const action = s.keys.get(keyOf(ev));
  if (action === undefined) return;
  ev.preventDefault();
  if (!ev.repeat) { s.pressed.push(action); s.held.add(action); }
  el.legend.querySelector(`[data-action="${s.actions[action]}"]`)?.classList.add("active");
});
document.addEventListener("keyup", (ev) => {
  const s = state.session;
  if (!s || typingIn(ev.target)) return;
  const action = s.keys.get(keyOf(ev));
  if (action === undefined) return;
  ev.preventDefault(); // space on a focused button or checkbox would click it on keyup
  s.held.delete(action);
  el.legend.querySelector(`[data-action="${s.actions[action]}"]`)?.classList.remove("active");
});

// ------------------------------------------------------------------------------ wiring

el.start.addEventListener("click", startRollout);
el.cancel.addEventListener("click", cancelRollout);
el.download.addEventListener("click", downloadVideo);
el.play.addEventListener("click", () => (state.session ? stopPlay() : startPlay()));
setBusy(null);
loadModels();
