// The client canvas: draws the labels of one client id, live, with Relay's JavaScript
// client (imported from the relay node), as the seed's WPF window did.
//
// The documented pattern for clients (docs/client.md): keep the cursor, and the picture it
// belongs to, in localStorage, so a reconnect or a reload of the page resumes where it left
// off; when a welcome does not say `recovered: true` (first start, or history could not
// prove it has everything), load the full state from the service's own API, then apply the
// events that follow. Every event carries the label as it now is, so applying one again,
// or over a fresh copy, gives the same picture.

const q = new URLSearchParams(location.search);
const clientId = q.get("client") || "cml";
const $ = (id) => document.getElementById(id);
const labels = new Map(); // id -> {id, biz_id, text, x, y}
const PICTURE_KEY = `demo:${clientId}:labels`;
const CURSOR_KEY = `relay:${clientId}:last_id`; // relay-client.js's default storeKey

// What the page has done, for people and for tests.
const demo = (window.demo = { state: "connecting", applied: [], reloads: 0, welcomes: [], errors: [], labels });

function now() {
  return new Date().toLocaleTimeString([], { hour12: false });
}

function log(text, system = false) {
  const top = $("log").firstChild;
  if (top && top.dataset.text === text) {
    // The same line again (reconnect attempts while the node is away): count, don't repeat.
    top.dataset.times = String(Number(top.dataset.times || "1") + 1);
    top.querySelector(".when").textContent = now();
    top.lastChild.textContent = `${text} ×${top.dataset.times}`;
    return;
  }
  const item = document.createElement("li");
  item.dataset.text = text;
  if (system) item.className = "sys";
  const when = document.createElement("span");
  when.className = "when";
  when.textContent = now();
  const what = document.createElement("span");
  what.textContent = text;
  item.append(when, what);
  $("log").prepend(item);
  while ($("log").children.length > 200) $("log").lastChild.remove();
}

function setState(state, text = state) {
  demo.state = state;
  $("conn").dataset.state = state;
  $("conn").textContent = text;
}

function draw(label, fresh = false) {
  let chip = document.querySelector(`#board [data-id="${label.id}"]`);
  if (!chip) {
    chip = document.createElement("div");
    chip.className = "label";
    chip.dataset.id = String(label.id);
    const pin = document.createElement("span");
    pin.className = "pin";
    const text = document.createElement("span");
    text.className = "text";
    chip.append(pin, text);
    $("board").append(chip);
  }
  chip.querySelector(".pin").textContent = String(label.id);
  chip.querySelector(".text").textContent = label.text;
  chip.style.left = `${label.x}px`;
  chip.style.top = `${label.y}px`;
  chip.dataset.x = String(label.x);
  chip.dataset.y = String(label.y);
  if (fresh) {
    chip.classList.add("fresh");
    setTimeout(() => chip.classList.remove("fresh"), 800);
  }
}

function erase(id) {
  document.querySelector(`#board [data-id="${id}"]`)?.remove();
}

function save() {
  localStorage.setItem(PICTURE_KEY, JSON.stringify([...labels.values()]));
}

function restore() {
  const saved = localStorage.getItem(PICTURE_KEY);
  if (saved == null) {
    localStorage.removeItem(CURSOR_KEY); // a cursor without its picture is worth nothing
    return;
  }
  for (const label of JSON.parse(saved)) {
    labels.set(label.id, label);
    draw(label);
  }
}

function counters() {
  $("count").textContent = String(labels.size);
  $("applied").textContent = String(demo.applied.length);
  $("reloads").textContent = String(demo.reloads);
}

async function reload(why) {
  setState("reloading", "loading labels");
  const answer = await fetch(`labels?biz_id=${encodeURIComponent(clientId)}`, { cache: "no-store" });
  if (!answer.ok) throw new Error(`GET /labels: HTTP ${answer.status}`);
  const { labels: fresh } = await answer.json();
  labels.clear();
  $("board").replaceChildren();
  for (const label of fresh) {
    labels.set(label.id, label);
    draw(label);
  }
  save();
  demo.reloads += 1;
  counters();
  log(`full state loaded from the service (${why}): ${fresh.length} labels`, true);
}

function apply(msg) {
  const data = msg.data || {};
  if (msg.event === "label.created" || msg.event === "label.moved") {
    labels.set(data.id, data);
    draw(data, true);
    log(`${msg.event} #${data.id} “${data.text}” at ${data.x},${data.y}`);
  } else if (msg.event === "label.deleted") {
    labels.delete(data.id);
    erase(data.id);
    log(`label.deleted #${data.id}`);
  } else {
    log(`${msg.event} (ignored)`);
  }
  save(); // before the client moves its cursor past this message
  demo.applied.push(msg.id);
  $("last-id").textContent = msg.id;
  counters();
}

async function main() {
  $("client-id").textContent = clientId;
  restore();
  counters();
  const config = await (await fetch("demo.json", { cache: "no-store" })).json();
  const board = $("board");
  board.style.width = `${config.width}px`;
  board.style.height = `${config.height}px`;
  const { RelayClient } = await import(`${config.relay_http}/client/relay-client.js`);
  const client = new RelayClient({
    url: config.relay_ws,
    clientId,
    store: localStorage,
    backoffMax: 5, // a demo: come back quickly once the node is up again
    token: async () => {
      const answer = await fetch(`token/${encodeURIComponent(clientId)}`, { cache: "no-store" });
      if (answer.status === 404) return null; // the node runs without tokens
      if (!answer.ok) throw new Error(`token: HTTP ${answer.status}`);
      return (await answer.json()).token;
    },
  });
  client.on("connected", async (welcome) => {
    demo.welcomes.push(welcome);
    $("node").textContent = welcome.node;
    $("recovered").textContent =
      welcome.recovered === true ? `recovered, ${welcome.replayed} replayed` : welcome.recovered === false ? "not recovered" : "first connect";
    log(`connected to ${welcome.node}` + (welcome.recovered === true ? `, ${welcome.replayed} missed events replayed` : ""), true);
    // Awaited: the client hands over the next message only after this returns.
    if (welcome.recovered !== true) await reload(welcome.recovered === false ? "history could not prove it has everything" : "first start");
    $("last-id").textContent = client.lastId ?? "–";
    setState("live");
  });
  client.on("message", apply);
  client.on("disconnected", ({ code, reason, willReconnect }) => {
    setState(willReconnect ? "reconnecting" : "stopped", willReconnect ? "reconnecting" : "stopped");
    log(`disconnected: ${code}${reason ? ` ${reason}` : ""}${willReconnect ? "; reconnecting" : ""}`, true);
  });
  client.on("error", (err) => {
    const text = String(err && (err.message || err.code || err));
    demo.errors.push(text);
    log(`error: ${text}`, true);
  });
  demo.client = client;
  client.start();
}

main().catch((err) => {
  demo.errors.push(String(err));
  setState("stopped", "failed");
  log(`the canvas could not start: ${err}`, true);
});
