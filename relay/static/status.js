// Relay's status page: reads the node's /status/feed (one snapshot a second, pushed by the
// node) with the API key, and draws it. No build step, no dependencies.
//
// The key lives in sessionStorage (this tab only). The feed is read with fetch, not
// EventSource, because EventSource cannot send an Authorization header.

const KEY_STORE = "relay.status.apiKey";
const FEED = "status/feed";
const HISTORY = 120; // samples kept for the sparklines (two minutes)

const $ = (id) => document.getElementById(id);
const state = {
  key: null,
  controller: null,
  retry: 0,
  timer: null,
  last: null,
  series: { connections: [], messages: [], events: [], publishes: [] },
};

// -- formatting ----------------------------------------------------------------------------

function rate(n) {
  if (n == null) return "–";
  if (n >= 10000) return `${(n / 1000).toFixed(1)}k`;
  if (n >= 100) return Math.round(n).toLocaleString();
  return n.toFixed(n >= 10 ? 1 : 2).replace(/\.?0+$/, "") || "0";
}

function count(n) {
  return n == null ? "–" : Math.round(n).toLocaleString();
}

function bytes(n) {
  if (n == null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(n >= 10 || i === 0 ? 0 : 1)} ${units[i]}`;
}

function span(seconds) {
  if (!(seconds >= 0)) return "–";
  if (seconds < 60) return `${Math.floor(seconds)}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${Math.floor(seconds % 60)}s`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m`;
  return `${Math.floor(seconds / 86400)}d ${Math.floor((seconds % 86400) / 3600)}h`;
}

function clock(ts) {
  return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
}

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  if (text != null) node.textContent = text;
  return node;
}

// -- drawing -------------------------------------------------------------------------------

function spark(canvas, values) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 200;
  const height = canvas.clientHeight || 36;
  if (canvas.width !== Math.round(width * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  if (values.length < 2) return;
  const style = getComputedStyle(document.documentElement);
  const top = Math.max(...values, 1);
  const step = width / (HISTORY - 1);
  const x0 = width - (values.length - 1) * step;
  const y = (v) => height - 2 - (v / top) * (height - 4);
  ctx.beginPath();
  values.forEach((v, i) => (i ? ctx.lineTo(x0 + i * step, y(v)) : ctx.moveTo(x0, y(v))));
  ctx.strokeStyle = style.getPropertyValue("--spark").trim();
  ctx.lineWidth = 1.5;
  ctx.stroke();
  ctx.lineTo(width, height);
  ctx.lineTo(x0, height);
  ctx.closePath();
  ctx.fillStyle = style.getPropertyValue("--spark-fill").trim();
  ctx.fill();
}

function push(series, value) {
  series.push(value);
  if (series.length > HISTORY) series.shift();
}

const KIND_CLASS = {
  "gap.repaired": "ok",
  "gap.unrecoverable": "bad",
  "gap.handed_over": "ok",
  "session.closed_4509": "warn",
  "engine.resubscribed": "warn",
  "engine.health_changed": "warn",
  "node.draining": "warn",
};

function describe(event) {
  const { ts, kind, ...rest } = event;
  if (kind === "engine.health_changed") return rest.healthy ? "live delivery proven again" : "live delivery not proven: broker lost or hung";
  return Object.entries(rest)
    .map(([k, v]) => `${k}=${v}`)
    .join("  ");
}

function cell(row, text, cls = "") {
  row.append(el("td", cls ? { class: cls } : {}, text));
}

function render(snap) {
  state.last = snap;
  const t = snap.totals;
  $("self-node").textContent = snap.node;
  $("t-ready").textContent = count(t.ready);
  $("t-nodes").textContent = count(t.nodes);
  $("t-nodes-sub").textContent = t.nodes === t.ready ? "all ready" : `${t.nodes - t.ready} not ready`;
  $("t-connections").textContent = count(t.connections);
  $("t-messages").textContent = rate(t.messages_per_s);
  $("t-events").textContent = rate(t.events_per_s);
  $("t-publishes").textContent = rate(t.publishes_per_s);
  push(state.series.connections, t.connections);
  push(state.series.messages, t.messages_per_s);
  push(state.series.events, t.events_per_s);
  push(state.series.publishes, t.publishes_per_s);
  for (const name of Object.keys(state.series)) spark($(`s-${name}`), state.series[name]);

  const e = snap.engine;
  $("e-kind").textContent = e.engine;
  const engineState = !e.reachable ? "down" : !e.ready ? "slow" : "ok";
  const pill = $("e-state");
  pill.className = `pill ${engineState}`;
  pill.textContent = { ok: "healthy", slow: "not proven", down: "unreachable" }[engineState];
  $("e-latency").textContent = e.latency_ms != null ? `${e.latency_ms.toFixed(2)} ms` : "";
  $("e-detail").textContent = e.reachable
    ? [e.version && `v${e.version}`, e.used_memory != null && bytes(e.used_memory), e.clients != null && `${e.clients} clients`]
        .filter(Boolean)
        .join(" · ") || (e.engine === "memory" ? "in this process" : "")
    : e.error;
  $("engine-tile").dataset.state = engineState;

  const body = $("nodes").tBodies[0];
  const rows = [];
  for (const n of snap.nodes) {
    const row = el("tr", { "data-node": n.node, "data-state": n.state });
    const id = el("td", { class: "id" }, n.node);
    if (n.self) id.append(el("span", { class: "me", title: "the node this page is connected to" }, "this"));
    row.append(id);
    cell(row, n.address || "–", "mono");
    const st = el("td");
    st.append(el("span", { class: `pill ${n.state}` }, n.state));
    row.append(st);
    cell(row, n.started_at ? span(snap.at - n.started_at) : "–", "num");
    cell(row, n.self ? "now" : `${span(snap.at - n.last_seen)} ago`, "num");
    cell(row, count(n.connections), "num conns");
    cell(row, rate(n.messages_per_s), "num msgs");
    cell(row, rate(n.events_per_s), "num events");
    cell(row, rate(n.publishes_per_s), "num pubs");
    cell(row, count(n.gaps_repaired), n.gaps_repaired ? "num" : "num zero");
    cell(row, count(n.gaps_unrecoverable), n.gaps_unrecoverable ? "num alert" : "num zero");
    cell(row, count(n.closed_4509), n.closed_4509 ? "num alert" : "num zero");
    rows.push(row);
  }
  body.replaceChildren(...rows);
  $("registry-note").hidden = !snap.registry_error;

  const list = $("recent");
  list.replaceChildren(
    ...snap.recent.map((ev) => {
      const item = el("li");
      item.append(el("span", { class: "when" }, clock(ev.ts)));
      item.append(el("span", { class: `kind ${KIND_CLASS[ev.kind] || ""}` }, ev.kind));
      item.append(el("span", { class: "what", title: describe(ev) }, describe(ev)));
      return item;
    }),
  );
  $("recent-empty").hidden = snap.recent.length > 0;
  $("updated").textContent = `updated ${clock(snap.at)}`;
}

// -- the feed ------------------------------------------------------------------------------

function link(kind, text) {
  $("link").dataset.state = kind;
  $("link-text").textContent = text;
}

function showLogin(message = "") {
  stopFeed();
  $("main").hidden = true;
  $("sign-out").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  link("idle", "not connected");
  $("api-key").value = "";
  $("api-key").focus();
}

function stopFeed() {
  clearTimeout(state.timer);
  state.timer = null;
  if (state.controller) state.controller.abort();
  state.controller = null;
}

function retryLater(why) {
  const delay = Math.min(5000, 500 * 2 ** state.retry) * (0.5 + Math.random() / 2);
  state.retry += 1;
  link("retrying", `${why}; retrying in ${Math.ceil(delay / 1000)} s`);
  state.timer = setTimeout(openFeed, delay);
}

async function openFeed() {
  stopFeed();
  const controller = new AbortController();
  state.controller = controller;
  link("retrying", state.last ? "reconnecting…" : "connecting…");
  let response;
  try {
    response = await fetch(FEED, {
      headers: { Authorization: `Bearer ${state.key}`, Accept: "text/event-stream" },
      cache: "no-store",
      signal: controller.signal,
    });
  } catch (err) {
    if (!controller.signal.aborted) retryLater("node unreachable");
    return;
  }
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_STORE);
    state.key = null;
    showLogin("Wrong API key.");
    return;
  }
  if (response.status === 404) {
    showLogin("This node has no API key configured (start it with --api-key).");
    return;
  }
  if (!response.ok || !response.body) {
    retryLater(response.status === 503 ? "too many status pages open" : `HTTP ${response.status}`);
    return;
  }
  $("login").hidden = true;
  $("main").hidden = false;
  $("sign-out").hidden = false;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const chunk = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = chunk
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        state.retry = 0;
        link("live", "live");
        render(JSON.parse(data));
      }
    }
  } catch (err) {
    if (controller.signal.aborted) return;
  }
  if (!controller.signal.aborted) retryLater("feed ended");
}

function start(key) {
  state.key = key;
  state.retry = 0;
  openFeed();
}

$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORE, key);
  $("login-error").textContent = "";
  start(key);
});

$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORE);
  state.key = null;
  showLogin();
});

// Ages ("seen 2s ago") keep moving between snapshots only if we redraw; the feed does it.
const saved = sessionStorage.getItem(KEY_STORE);
if (saved) start(saved);
else showLogin();
