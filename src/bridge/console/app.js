// The bmw console: plain JavaScript, no framework, no build step. One page
// with hash-routed tabs; every read and action goes to the bridge's own REST
// API with the operator's token (sessionStorage, sent as
// `Authorization: Bearer`). The page keeps itself current from the live feed
// (`/bmw/events/stream`, Server-Sent Events read with fetch so the token can
// be sent): task events and bucket change notices make it refresh only the
// page on screen, at most once a second.
"use strict";

const PAGES = ["workers", "daemon", "queues", "async", "periodic", "events"];
const DAEMON_PAGE_SIZE = 50;
const ASYNC_PAGE_SIZE = 100;
const EVENTS_KEPT = 500;
const QUEUE_SAMPLES = 60; // 5 minutes at one sample each 5 s
const QUEUE_SAMPLE_MS = 5000;
const GONE_SHOWN_MS = 30000;
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  page: "workers",
  daemon: { offset: 0, total: 0, filter: {} },
  async: { filter: {}, cursor: null, rows: [] },
  events: [],
  eventsPaused: false,
  eventFilter: {},
  lastError: new Map(), // uni_id -> last daemon error seen in the feed
  workers: new Map(), // worker_id -> { entry, gone_at }
  heartbeat: new Map(), // worker_id -> Date of the last heartbeat seen
  queueHistory: new Map(), // queue -> [{ t, processed, failed }]
  refreshAt: new Map(), // page -> timer
  lastRefresh: new Map(),
  refreshTook: new Map(), // page -> how long its last refresh took (ms)
};

// ---------------------------------------------------------------- helpers

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function token() {
  return sessionStorage.getItem("bmw-token") || "";
}

function headers(extra = {}) {
  const h = { Accept: "application/json", ...extra };
  if (token()) h.Authorization = "Bearer " + token();
  return h;
}

function notice(message, ok = false) {
  const box = $("#notice");
  box.textContent = message;
  box.className = ok ? "notice ok" : "notice";
  box.hidden = !message;
}

/** Calls the API; resolves to { envelope, response } or throws with the envelope's message. */
async function api(method, path, body) {
  const init = { method, headers: headers(), cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let envelope;
  try {
    envelope = await response.json();
  } catch (_) {
    envelope = { result: false, code: response.status, message: response.statusText };
  }
  if (response.status === 401) {
    notice("The bridge asks for a token: type it in the Token field.");
    $("#token").focus();
  }
  if (!response.ok || envelope.result === false) {
    throw new Error(envelope.message || "HTTP " + response.status);
  }
  return { envelope, response };
}

async function act(what, method, path, body) {
  try {
    await api(method, path, body);
    notice(what + ": done", true);
    refreshSoon(state.page, 0);
  } catch (e) {
    notice(what + ": " + e.message);
  }
}

/** A button that asks for a second press before it does something destructive. */
function dangerButton(label, action, attrs = {}) {
  let armed = null;
  const button = el("button", { type: "button", class: "danger", ...attrs }, label);
  button.addEventListener("click", () => {
    if (armed) {
      clearTimeout(armed);
      armed = null;
      button.classList.remove("armed");
      button.textContent = label;
      action();
      return;
    }
    button.classList.add("armed");
    button.textContent = "Confirm " + label.toLowerCase();
    armed = setTimeout(() => {
      armed = null;
      button.classList.remove("armed");
      button.textContent = label;
    }, 4000);
  });
  return button;
}

function short(value, length = 60) {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text && text.length > length ? text.slice(0, length - 1) + "…" : text || "";
}

/** A time as the clock shows it, with the date when it is not today. */
function time(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (isNaN(d)) return iso;
  const today = d.toDateString() === new Date().toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

function ago(date) {
  if (!date) return "";
  const s = Math.max(0, Math.round((Date.now() - date.getTime()) / 1000));
  return s < 60 ? s + " s ago" : Math.round(s / 60) + " min ago";
}

function formValues(form) {
  const values = {};
  for (const [name, value] of new FormData(form)) {
    if (String(value).trim()) values[name] = String(value).trim();
  }
  return values;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== "") q.set(k, v);
  return q.toString();
}

function fillBody(table, rows, empty) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows);
  if (!rows.length) {
    body.append(el("tr", {}, el("td", { colspan: table.tHead.rows[0].cells.length, class: "hint" }, empty)));
  }
}

// ---------------------------------------------------------------- routing

function route() {
  const wanted = location.hash.replace(/^#/, "");
  state.page = PAGES.includes(wanted) ? wanted : "workers";
  for (const page of PAGES) {
    $("#page-" + page).hidden = page !== state.page;
    const tab = $("#tab-" + page);
    if (page === state.page) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  document.title = $("#tab-" + state.page).textContent + " · bmw console";
  refreshSoon(state.page, 0);
}

/**
 * Refreshes `page` if it is on screen: at once when `delay` is 0, else at
 * most once a second, and no more than a third of the time (a page that
 * takes 500 ms to read, 10,000 daemon tasks, is read at most every 1.5 s).
 */
function refreshSoon(page, delay = 1000) {
  if (page !== state.page || state.refreshAt.has(page)) return;
  const since = Date.now() - (state.lastRefresh.get(page) || 0);
  const spacing = Math.max(delay, 3 * (state.refreshTook.get(page) || 0));
  const wait = delay === 0 ? 0 : Math.max(0, spacing - since);
  state.refreshAt.set(page, setTimeout(async () => {
    state.refreshAt.delete(page);
    const started = Date.now();
    state.lastRefresh.set(page, started);
    try {
      await REFRESH[page]();
    } catch (e) {
      notice(page + ": " + e.message);
    }
    state.refreshTook.set(page, Date.now() - started);
  }, wait));
}

// ---------------------------------------------------------------- workers

async function refreshWorkers() {
  const { envelope } = await api("GET", "/bmw/worker/");
  const now = Date.now();
  const live = new Set();
  for (const entry of envelope.data || []) {
    live.add(entry.worker_id);
    state.workers.set(entry.worker_id, { entry, gone_at: null });
  }
  for (const [id, w] of state.workers) {
    if (live.has(id)) continue;
    if (!w.gone_at) w.gone_at = now;
    if (now - w.gone_at > GONE_SHOWN_MS) state.workers.delete(id);
  }
  const rows = [...state.workers.values()]
    .sort((a, b) => a.entry.worker_id.localeCompare(b.entry.worker_id))
    .map(({ entry, gone_at }) => {
      const sum = (m) => Object.values(m || {}).reduce((a, b) => a + b, 0);
      // The entry's own time (newer workers), else when the page saw it written.
      const beat = entry.heartbeat_at ? new Date(entry.heartbeat_at) : state.heartbeat.get(entry.worker_id);
      const weights = entry.queue_weights || {};
      const queues = (entry.queues || []).map((q) => weights[q] ? q + " ×" + weights[q] : q).join(", ");
      return el("tr", { class: gone_at ? "gone" : "", "data-worker-id": entry.worker_id },
        el("td", {}, el("code", {}, entry.worker_id), gone_at ? el("span", { class: "state-gone" }, " going away") : null),
        el("td", {}, entry.host + " / " + entry.pid),
        el("td", {}, entry.version),
        el("td", {}, queues),
        el("td", {}, short((entry.kinds || []).join(", "), 80)),
        el("td", { class: "num" }, entry.daemon_quota ? entry.running + " / " + entry.daemon_quota : entry.running),
        el("td", { class: "num" }, entry.concurrency ? (entry.async_active || 0) + " / " + entry.concurrency : ""),
        el("td", { class: "num" }, sum(entry.async_processed) + " / " + sum(entry.async_failed)),
        el("td", {}, time(entry.started_at)),
        el("td", { class: "beat" }, gone_at ? "gone " + ago(new Date(gone_at)) : beat ? ago(beat) : "—"));
    });
  fillBody($("#workers-table"), rows, "No live worker.");
  if ([...state.workers.values()].some((w) => w.gone_at)) refreshSoon("workers", 5000);
}

// ---------------------------------------------------------------- daemon tasks

async function refreshDaemon() {
  const d = state.daemon;
  const { envelope, response } = await api("GET", "/bmw/task/?" + query({
    task_type: "daemon", ...d.filter, limit: DAEMON_PAGE_SIZE, offset: d.offset,
  }));
  d.total = Number(response.headers.get("bmw-total-count") || 0);
  const rows = (envelope.data || []).map((task) => {
    const b = task.binding || {};
    const stateText = task.state === "retrying" && b.next_retry_at
      ? "retry at " + time(b.next_retry_at) : task.state;
    const uni = task.uni_id;
    // A kind without a dimension of its own is identified by its payload.
    const dimension = task.dimension && task.dimension !== uni ? task.dimension : "";
    return el("tr", { "data-uni-id": uni },
      el("td", { class: "nowrap" }, el("code", { title: uni }, short(uni, 26))),
      el("td", {}, task.kind),
      el("td", {}, dimension),
      el("td", { class: "nowrap" }, el("code", { title: JSON.stringify(task.payload) }, short(task.payload, 32))),
      el("td", {}, (task.options || {}).queue || ""),
      el("td", { class: "worker nowrap", "data-worker": b.worker_id || "" },
        b.worker_id ? el("code", { title: b.worker_id }, short(b.worker_id, 24)) : "—"),
      el("td", { class: "nowrap state state-" + task.state }, stateText),
      el("td", { class: "num" }, b.retry_count),
      el("td", { class: "num" }, b.reload_count),
      el("td", { class: "error" }, state.lastError.get(uni) || ""),
      el("td", { class: "nowrap" },
        el("button", { type: "button", class: "reload", onclick: () => act("Reload " + uni, "POST", "/bmw/task/daemon/reload", { task_uni_id: uni }) }, "Reload"),
        dangerButton("Delete", () => act("Delete " + uni, "DELETE", "/bmw/task/", { task_type: "daemon", task_uni_id: uni }), { "data-action": "delete" })));
  });
  fillBody($("#daemon-table"), rows, "No daemon task matches.");
  const first = d.total ? d.offset + 1 : 0;
  const last = Math.min(d.offset + DAEMON_PAGE_SIZE, d.total);
  $("#daemon-range").textContent = first + "–" + last + " of " + d.total;
  $("#daemon-prev").disabled = d.offset === 0;
  $("#daemon-next").disabled = last >= d.total;
}

// ---------------------------------------------------------------- queues

async function refreshQueues() {
  const { envelope } = await api("GET", "/bmw/queue/");
  const now = Date.now();
  const rows = (envelope.data || []).map((q) => {
    const ring = state.queueHistory.get(q.queue) || [];
    ring.push({ t: now, processed: q.processed, failed: q.failed });
    while (ring.length > QUEUE_SAMPLES + 1) ring.shift();
    state.queueHistory.set(q.queue, ring);
    const n = (v) => el("td", { class: "num" }, v);
    return el("tr", { "data-queue": q.queue },
      el("td", {}, q.queue), n(q.pending), n(q.scheduled), n(q.active), n(q.retry),
      n(q.archived), n(q.processed), n(q.failed), el("td", {}, chart(q.queue, ring)));
  });
  fillBody($("#queues-table"), rows, "No queue yet.");
  await refreshStorage();
  clearTimeout(state.queueTimer);
  state.queueTimer = setTimeout(() => refreshSoon("queues", 0), QUEUE_SAMPLE_MS);
}

/** Bars of processed (up) and failed (down) per sample interval. */
/** The storage table, and a warning naming every stream near its limit. */
async function refreshStorage() {
  const { envelope } = await api("GET", "/bmw/storage/");
  const streams = envelope.data || [];
  const n = (v) => el("td", { class: "num" }, v ? String(v) : "none");
  const rows = streams.map((s) => el("tr", { "data-stream": s.stream, class: s.near_full ? "near-full" : "" },
    el("td", {}, s.stream), el("td", { class: "num" }, String(s.bytes)), n(s.max_bytes),
    el("td", { class: "num" }, String(s.messages)), n(s.max_messages),
    el("td", { class: "num" }, Math.round(s.used_ratio * 100) + " %"), el("td", {}, s.when_full)));
  fillBody($("#storage-table"), rows, "No stream yet.");
  const full = streams.filter((s) => s.near_full);
  const box = $("#storage-warning");
  box.hidden = full.length === 0;
  box.textContent = full.length === 0 ? "" : "Near the storage limit: " +
    full.map((s) => s.stream + " " + Math.round(s.used_ratio * 100) + " % (" + s.when_full + ")").join(", ") +
    ". Let workers drain it, or raise --storage-max-bytes and run bmw provision.";
}

function chart(queue, ring) {
  const width = 240, height = 40, mid = height / 2;
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("role", "img");
  const deltas = [];
  for (let i = 1; i < ring.length; i++) {
    deltas.push({
      t: ring[i].t,
      processed: Math.max(0, ring[i].processed - ring[i - 1].processed),
      failed: Math.max(0, ring[i].failed - ring[i - 1].failed),
    });
  }
  const total = deltas.reduce((a, d) => a + d.processed + d.failed, 0);
  svg.setAttribute("aria-label", queue + ": " + total + " processed or failed in the last " + Math.round((Date.now() - ring[0].t) / 1000) + " s");
  const max = Math.max(1, ...deltas.map((d) => Math.max(d.processed, d.failed)));
  const span = QUEUE_SAMPLES * QUEUE_SAMPLE_MS;
  const bar = Math.max(2, width / QUEUE_SAMPLES - 1);
  const now = Date.now();
  const axis = document.createElementNS(SVG_NS, "line");
  axis.setAttribute("class", "axis");
  axis.setAttribute("x1", 0); axis.setAttribute("x2", width);
  axis.setAttribute("y1", mid); axis.setAttribute("y2", mid);
  svg.append(axis);
  deltas.forEach((d) => {
    const x = width - bar - ((now - d.t) / span) * (width - bar);
    if (x < 0) return;
    for (const [kind, value, up] of [["processed", d.processed, true], ["failed", d.failed, false]]) {
      if (!value) continue;
      const h = Math.max(1, (value / max) * (mid - 1));
      const rect = document.createElementNS(SVG_NS, "rect");
      rect.setAttribute("class", kind);
      rect.setAttribute("x", x.toFixed(1));
      rect.setAttribute("y", (up ? mid - h : mid).toFixed(1));
      rect.setAttribute("width", bar.toFixed(1));
      rect.setAttribute("height", h.toFixed(1));
      svg.append(rect);
    }
  });
  return svg;
}

// ---------------------------------------------------------------- async tasks

async function refreshAsync(more = false) {
  const a = state.async;
  if (!more) {
    a.cursor = null;
    a.rows = [];
  }
  if (a.filter.task_id) {
    try {
      const { envelope } = await api("GET", "/bmw/task/?" + query({ task_type: "async", task_id: a.filter.task_id }));
      a.rows = [envelope.data];
    } catch (e) {
      a.rows = [];
      notice(e.message);
    }
    a.cursor = null;
  } else {
    const { envelope, response } = await api("GET", "/bmw/task/?" + query({
      task_type: "async", kind: a.filter.kind, queue: a.filter.queue, state: a.filter.state,
      limit: ASYNC_PAGE_SIZE, cursor: more ? a.cursor : undefined,
    }));
    a.rows = a.rows.concat(envelope.data || []);
    a.cursor = response.headers.get("bmw-next-cursor");
  }
  const rows = a.rows.map((t) => el("tr", { "data-task-id": t.task_id },
    el("td", {}, el("code", {}, t.task_id)),
    el("td", {}, t.kind),
    el("td", {}, t.queue),
    el("td", { class: "state state-" + t.state }, t.state),
    el("td", { class: "num" }, t.attempts + " / " + (t.max_retry + 1)),
    el("td", { class: "error" }, short(t.last_error || "", 80)),
    el("td", {}, time(t.updated_at)),
    el("td", {},
      el("button", { type: "button", class: "details", onclick: () => showAsync(t) }, "Details"),
      t.state === "archived"
        ? el("button", { type: "button", class: "requeue", onclick: () => act("Requeue " + t.task_id, "POST", "/bmw/task/async/requeue", { task_id: t.task_id }) }, "Requeue")
        : null,
      dangerButton("Delete", () => act("Delete " + t.task_id, "DELETE", "/bmw/task/", { task_type: "async", task_id: t.task_id }), { "data-action": "delete" }))));
  fillBody($("#async-table"), rows, "No async task matches.");
  $("#async-range").textContent = a.rows.length + " shown" + (a.cursor ? ", more available" : "");
  $("#async-more").disabled = !a.cursor;
}

function showAsync(task) {
  const box = $("#async-detail");
  box.replaceChildren(
    el("h3", {}, "Task ", el("code", {}, task.task_id)),
    el("p", {}, task.kind + " on " + task.queue + ": " + task.state + ", attempt " + task.attempts + " of " + (task.max_retry + 1)),
    el("p", {}, "Payload: ", el("code", {}, JSON.stringify(task.payload))),
    el("h4", {}, "Errors"),
    (task.errors && task.errors.length)
      ? el("ol", {}, task.errors.map((e) => el("li", { class: "error" }, e)))
      : el("p", { class: "hint" }, "none"),
    el("button", { type: "button", onclick: () => { box.hidden = true; } }, "Close"));
  box.hidden = false;
  box.focus();
}

/** Every dead letter of the searched queue (and kind), all pages of it. */
async function allDeadLetters() {
  const f = state.async.filter;
  const dead = [];
  let cursor;
  do {
    const { envelope, response } = await api("GET", "/bmw/task/?" + query({
      task_type: "async", state: "archived", queue: f.queue, kind: f.kind, limit: 1000, cursor,
    }));
    dead.push(...(envelope.data || []));
    cursor = response.headers.get("bmw-next-cursor") || undefined;
  } while (cursor);
  return dead;
}

async function requeueAllDead() {
  let dead;
  try {
    dead = await allDeadLetters();
  } catch (e) {
    notice("Requeue all: " + e.message);
    return;
  }
  let done = 0;
  const failures = [];
  for (const t of dead) {
    try {
      await api("POST", "/bmw/task/async/requeue", { task_id: t.task_id });
      done++;
    } catch (e) {
      failures.push(t.task_id + ": " + e.message);
    }
  }
  if (failures.length) notice("Requeued " + done + "; refused: " + failures.join("; "));
  else notice("Requeued " + done + " dead letters", true);
  refreshSoon("async", 0);
}

// ---------------------------------------------------------------- periodic

async function refreshPeriodic() {
  const { envelope } = await api("GET", "/bmw/task/?task_type=periodic");
  const rows = (envelope.data || []).map((p) => {
    const schedule = p.schedule_header || short(p.schedule, 40);
    const opts = p.options || {};
    return el("tr", { "data-kind": p.kind },
      el("td", {}, p.kind),
      el("td", {}, el("code", {}, schedule)),
      el("td", {}, p.timezone || "UTC"),
      el("td", {}, p.queue || opts.queue || ""),
      el("td", { class: "state " + (p.paused ? "state-paused" : "state-running") }, p.paused ? "paused" : "active"),
      el("td", {}, time(p.next_run_at)),
      el("td", {}, time(p.last_run_at)),
      el("td", { class: "outcome-" + (p.last_outcome || "") }, p.last_outcome || ""),
      el("td", { class: "num" }, p.runs || 0),
      el("td", {},
        p.paused
          ? el("button", { type: "button", class: "resume", onclick: () => act("Resume " + p.kind, "POST", "/bmw/task/periodic/resume", { kind: p.kind }) }, "Resume")
          : el("button", { type: "button", class: "pause", onclick: () => act("Pause " + p.kind, "POST", "/bmw/task/periodic/pause", { kind: p.kind }) }, "Pause"),
        dangerButton("Delete", () => act("Delete " + p.kind, "DELETE", "/bmw/task/", { task_type: "periodic", kind: p.kind }), { "data-action": "delete" })));
  });
  fillBody($("#periodic-table"), rows, "No periodic task.");
}

// ---------------------------------------------------------------- live events

function eventMatches(e, f) {
  if (f.kind && !(e.kind === f.kind || (e.kind || "").startsWith(f.kind + ":"))) return false;
  if (f.what && e.what !== f.what) return false;
  if (f.task && !((e.uni_id || "").includes(f.task) || (e.task_id || "").includes(f.task))) return false;
  return true;
}

function eventItem(e) {
  const task = e.uni_id || e.task_id || "";
  const extra = e.what === "moved" ? " from " + e.from + " to " + e.to : e.error ? " — " + e.error : "";
  return el("li", { "data-what": e.what, "data-task": task },
    el("time", {}, (e.time || "").replace("T", " ").slice(0, 23)), " ",
    el("span", { class: "what what-" + e.what }, e.what), " ",
    e.task_type + " " + e.kind + " ", el("code", {}, short(task, 56)),
    " on " + short(e.worker_id || "", 40) + extra);
}

function renderEvents() {
  const list = $("#events-list");
  const shown = state.events.filter((e) => eventMatches(e, state.eventFilter)).slice(-200).reverse();
  list.replaceChildren(...shown.map(eventItem));
  if (!shown.length) list.append(el("li", { class: "hint" }, "Nothing yet: events appear as they happen."));
}

function onTaskEvent(e) {
  state.events.push(e);
  if (state.events.length > EVENTS_KEPT) state.events.splice(0, state.events.length - EVENTS_KEPT);
  if (e.task_type === "daemon") {
    if (e.what === "error" || e.what === "retry") state.lastError.set(e.uni_id, e.error);
    if (e.what === "started") state.lastError.delete(e.uni_id);
    refreshSoon("daemon");
    if (e.what === "moved" || e.what === "started" || e.what === "stopped") refreshSoon("workers");
  } else if (e.task_type === "async") {
    refreshSoon("async");
    refreshSoon("queues");
  } else if (e.task_type === "periodic") {
    refreshSoon("periodic");
    refreshSoon("queues");
  }
  if (state.page === "events" && !state.eventsPaused) renderEvents();
}

function onChange(c) {
  if (c.bucket === "workers") {
    for (const id of c.workers || []) state.heartbeat.set(id, new Date());
    refreshSoon("workers");
  } else {
    refreshSoon("daemon");
    refreshSoon("workers");
  }
}

// ---------------------------------------------------------------- the feed

let feedAbort = null;

function feedState(text, cls) {
  const s = $("#feed-state");
  s.textContent = "feed: " + text;
  s.className = "feed " + (cls || "");
}

async function openFeed() {
  if (feedAbort) feedAbort.abort();
  const abort = new AbortController();
  feedAbort = abort;
  try {
    const response = await fetch("/bmw/events/stream", {
      headers: headers({ Accept: "text/event-stream" }), cache: "no-store", signal: abort.signal,
    });
    if (!response.ok) {
      feedState(response.status === 401 ? "needs a token" : "refused (" + response.status + ")", "down");
      if (response.status === 401) return;
      throw new Error("HTTP " + response.status);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        dispatch(block);
      }
    }
  } catch (e) {
    if (abort.signal.aborted) return;
  }
  if (feedAbort !== abort) return;
  feedState("reconnecting", "down");
  setTimeout(() => { if (feedAbort === abort) openFeed(); }, 2000);
}

function dispatch(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return;
  let value;
  try {
    value = JSON.parse(data.join("\n"));
  } catch (_) {
    return;
  }
  if (event === "ready") {
    feedState("live", "live");
    refreshSoon(state.page, 0);
  } else if (event === "task") onTaskEvent(value);
  else if (event === "change") onChange(value);
}

// ---------------------------------------------------------------- start

const REFRESH = {
  workers: refreshWorkers,
  daemon: refreshDaemon,
  queues: refreshQueues,
  async: () => refreshAsync(false),
  periodic: refreshPeriodic,
  events: async () => renderEvents(),
};

function start() {
  $("#token").value = token();
  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("#token").value.trim();
    if (value) sessionStorage.setItem("bmw-token", value);
    else sessionStorage.removeItem("bmw-token");
    notice("");
    openFeed();
    refreshSoon(state.page, 0);
  });
  $("#daemon-filter").addEventListener("submit", (e) => {
    e.preventDefault();
    state.daemon.filter = formValues(e.target);
    state.daemon.offset = 0;
    refreshSoon("daemon", 0);
  });
  $("#daemon-prev").addEventListener("click", () => {
    state.daemon.offset = Math.max(0, state.daemon.offset - DAEMON_PAGE_SIZE);
    refreshSoon("daemon", 0);
  });
  $("#daemon-next").addEventListener("click", () => {
    state.daemon.offset += DAEMON_PAGE_SIZE;
    refreshSoon("daemon", 0);
  });
  $("#async-filter").addEventListener("submit", (e) => {
    e.preventDefault();
    state.async.filter = formValues(e.target);
    refreshSoon("async", 0);
  });
  $("#async-more").addEventListener("click", () => refreshAsync(true).catch((e) => notice(e.message)));
  $("#async-requeue-all").addEventListener("click", requeueAllDead);
  $("#events-filter").addEventListener("submit", (e) => {
    e.preventDefault();
    state.eventFilter = formValues(e.target);
    renderEvents();
  });
  $("#events-pause").addEventListener("click", (e) => {
    state.eventsPaused = !state.eventsPaused;
    e.target.setAttribute("aria-pressed", String(state.eventsPaused));
    e.target.textContent = state.eventsPaused ? "Resume" : "Pause";
    if (!state.eventsPaused) renderEvents();
  });
  window.addEventListener("hashchange", route);
  route();
  openFeed();
}

start();
