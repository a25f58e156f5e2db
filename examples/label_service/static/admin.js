// The admin page: create, move and delete the labels of one client through the label
// service's API. Each call commits the label and its event in one transaction (outbox);
// the service's dispatcher publishes the event to Relay right after.

const $ = (id) => document.getElementById(id);
let labels = [];

function biz() {
  return $("biz").value.trim() || "cml";
}

function fail(message) {
  $("error").textContent = message;
}

async function call(method, path, body) {
  const answer = await fetch(path, {
    method,
    headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!answer.ok) {
    const text = await answer.text();
    throw new Error(`${method} ${path}: HTTP ${answer.status} ${text}`);
  }
  fail("");
  return answer.json();
}

async function refresh() {
  const { labels: fresh } = await call("GET", `labels?biz_id=${encodeURIComponent(biz())}`);
  labels = fresh;
  render();
}

function cellWith(child) {
  const td = document.createElement("td");
  td.append(child);
  return td;
}

function numberInput(name, value) {
  const input = document.createElement("input");
  input.type = "number";
  input.name = name;
  input.value = String(value);
  return input;
}

function button(text, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  if (cls) b.className = cls;
  b.addEventListener("click", () => onClick().catch((err) => fail(String(err.message || err))));
  return b;
}

function render() {
  const rows = labels.map((label) => {
    const row = document.createElement("tr");
    row.dataset.id = String(label.id);
    const id = document.createElement("td");
    id.textContent = String(label.id);
    const text = document.createElement("td");
    text.textContent = label.text;
    const x = numberInput("x", label.x);
    const y = numberInput("y", label.y);
    row.append(
      id,
      text,
      cellWith(x),
      cellWith(y),
      cellWith(button("Move", "ghost move", () => move(label.id, Number(x.value), Number(y.value)))),
      cellWith(button("Delete", "danger delete", () => remove(label.id))),
    );
    return row;
  });
  $("labels").tBodies[0].replaceChildren(...rows);
  $("empty").hidden = labels.length > 0;
  const board = $("admin-board");
  board.replaceChildren(
    ...labels.map((label) => {
      const chip = document.createElement("div");
      chip.className = "label";
      chip.dataset.id = String(label.id);
      chip.style.left = `${label.x}px`;
      chip.style.top = `${label.y}px`;
      const pin = document.createElement("span");
      pin.className = "pin";
      pin.textContent = String(label.id);
      const text = document.createElement("span");
      text.textContent = label.text;
      chip.append(pin, text);
      draggable(chip, label);
      return chip;
    }),
  );
}

function draggable(chip, label) {
  chip.addEventListener("pointerdown", (down) => {
    chip.setPointerCapture(down.pointerId);
    const start = { x: down.clientX, y: down.clientY, left: label.x, top: label.y };
    const at = (ev) => ({
      x: Math.round(Math.max(0, start.left + ev.clientX - start.x)),
      y: Math.round(Math.max(0, start.top + ev.clientY - start.y)),
    });
    const onMove = (ev) => {
      const p = at(ev);
      chip.style.left = `${p.x}px`;
      chip.style.top = `${p.y}px`;
    };
    const onUp = (ev) => {
      chip.removeEventListener("pointermove", onMove);
      chip.removeEventListener("pointerup", onUp);
      const p = at(ev);
      if (p.x !== label.x || p.y !== label.y) move(label.id, p.x, p.y).catch((err) => fail(String(err.message || err)));
    };
    chip.addEventListener("pointermove", onMove);
    chip.addEventListener("pointerup", onUp);
  });
}

async function move(id, x, y) {
  await call("PATCH", `labels/${id}`, { x, y });
  await refresh();
}

async function remove(id) {
  await call("DELETE", `labels/${id}`);
  await refresh();
}

$("add").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  call("POST", "labels", { biz_id: biz(), text })
    .then(() => {
      $("text").value = "";
      return refresh();
    })
    .catch((err) => fail(String(err.message || err)));
});

$("biz").addEventListener("change", () => {
  $("biz-name").textContent = biz();
  $("canvas-link").href = `canvas?client=${encodeURIComponent(biz())}`;
  refresh().catch((err) => fail(String(err.message || err)));
});

refresh().catch((err) => fail(String(err.message || err)));
