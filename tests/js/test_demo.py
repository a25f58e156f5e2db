"""``make demo`` end to end in a real Chromium: the admin page changes labels, the canvas
(relay-client.js) draws them, and catches up after its node was stopped and started again.

The processes are the ones ``make demo`` starts (examples/label_service/demo.py: a private
redis-server, ``relay serve`` with tokens, the label service with its outbox), on free ports.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import BrowserContext, Page

from examples.label_service.demo import Demo, port_is_free
from tests.conftest import MS
from tests.js.conftest import ROOT, save_screenshot
from tests.support.ports import free_port

WAIT = 20_000 * MS
ONE_SECOND = 1000 * MS


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[Demo]:
    started = Demo(tmp_path, node_port=free_port(), service_port=free_port())
    await asyncio.to_thread(started.start)
    yield started
    await asyncio.to_thread(started.stop)


def service_labels(demo: Demo) -> list[dict[str, Any]]:
    """The labels as the service's database has them (what the canvas must show)."""
    with urllib.request.urlopen(
        f"{demo.service_url}/labels?biz_id=cml", timeout=5_000 * MS
    ) as answer:
        labels: list[dict[str, Any]] = json.load(answer)["labels"]
    return labels


async def canvas_labels(page: Page) -> list[dict[str, Any]]:
    """The labels drawn on the canvas: id, text, position."""
    drawn: list[dict[str, Any]] = await page.evaluate(
        """() => [...document.querySelectorAll('#board .label')].map((el) => ({
             id: Number(el.dataset.id), text: el.querySelector('.text').textContent,
             x: Number(el.dataset.x), y: Number(el.dataset.y) }))
           .sort((a, b) => a.id - b.id)"""
    )
    return drawn


def drawn_like(labels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: label[k] for k in ("id", "text", "x", "y")} for label in labels]


async def wait_canvas(page: Page, condition: str, arg: Any = None, timeout: float = WAIT) -> None:
    """Wait for a condition on the canvas page; ``d`` is ``window.demo``."""
    await page.wait_for_function(
        f"(arg) => {{ const d = window.demo; return {condition}; }}",
        arg=arg,
        timeout=timeout * 1000,
    )


async def add_label(admin: Page, text: str) -> None:
    await admin.fill("#text", text)
    await admin.click("#add button[type=submit]")
    await admin.wait_for_selector(f'#labels tbody tr:has-text("{text}")')


async def move_label(admin: Page, label_id: int, x: int, y: int) -> None:
    row = admin.locator(f'#labels tbody tr[data-id="{label_id}"]')
    await row.locator("input[name=x]").fill(str(x))
    await row.locator("input[name=y]").fill(str(y))
    await row.locator("button.move").click()
    # The board is drawn again once the service answered (the inputs hold what we typed).
    await admin.wait_for_function(
        """([id, x, y]) => {
             const chip = document.querySelector(`#admin-board .label[data-id="${id}"]`);
             return chip && chip.style.left === `${x}px` && chip.style.top === `${y}px`;
           }""",
        arg=[label_id, x, y],
    )


async def delete_label(admin: Page, label_id: int) -> None:
    await admin.locator(f'#labels tbody tr[data-id="{label_id}"] button.delete').click()
    await admin.wait_for_selector(f'#labels tbody tr[data-id="{label_id}"]', state="detached")


async def test_demo_canvas_follows_the_admin_page_across_a_node_restart(
    demo: Demo, context: BrowserContext, tmp_path: Path
) -> None:
    """Admin creates → canvas draws it within 1 s; node stopped, labels created, moved and
    deleted meanwhile, node started: the canvas shows exactly the service's labels, every
    missed event applied once, without a full reload."""
    admin = await context.new_page()
    await admin.goto(demo.admin_url)
    canvas = await context.new_page()
    await canvas.set_viewport_size({"width": 1180, "height": 640})
    await canvas.goto(demo.canvas_url)
    await wait_canvas(canvas, "d.state === 'live'")
    assert await canvas.evaluate("() => window.demo.reloads") == 1  # first start: full state

    await admin.fill("#text", "Building A")
    began = time.monotonic()
    await admin.click("#add button[type=submit]")
    await wait_canvas(canvas, "d.labels.size === 1", timeout=ONE_SECOND)
    elapsed = time.monotonic() - began
    print(f"admin click -> label on the canvas: {elapsed * 1000:.0f} ms")  # for the note (-s)
    assert elapsed < ONE_SECOND
    for text in ("Gate 2", "Camera 7"):
        await add_label(admin, text)
    await move_label(admin, 2, 300, 200)
    await wait_canvas(canvas, "d.labels.size === 3 && d.labels.get(2).x === 300")
    # Dragging a label on the admin board moves it too (label 3: drawn last, on top).
    before = await canvas.evaluate("() => window.demo.labels.get(3)")
    box = await admin.locator('#admin-board .label[data-id="3"]').bounding_box()
    assert box is not None
    await admin.mouse.move(box["x"] + 10, box["y"] + 10)
    await admin.mouse.down()
    await admin.mouse.move(box["x"] + 60, box["y"] + 40, steps=5)
    await admin.mouse.up()
    await wait_canvas(
        canvas,
        "d.labels.get(3).x === arg[0] && d.labels.get(3).y === arg[1]",
        [before["x"] + 50, before["y"] + 30],
    )
    assert await canvas_labels(canvas) == drawn_like(service_labels(demo))

    # The node goes away; the admin keeps working (the outbox publishes to Redis).
    await asyncio.to_thread(demo.stop_node)
    await wait_canvas(canvas, "d.state === 'reconnecting'")
    applied_before = await canvas.evaluate("() => window.demo.applied.length")
    await add_label(admin, "While down")
    await move_label(admin, 1, 520, 340)
    await delete_label(admin, 3)
    await asyncio.to_thread(demo.start_node)
    restarted = time.monotonic()

    want = drawn_like(service_labels(demo))
    await wait_canvas(canvas, "d.state === 'live' && d.applied.length >= arg", applied_before + 3)
    print(f"node ready -> canvas caught up: {(time.monotonic() - restarted) * 1000:.0f} ms")
    assert await canvas_labels(canvas) == want
    seen = await canvas.evaluate(
        "() => ({applied: window.demo.applied, reloads: window.demo.reloads,"
        " last: window.demo.welcomes.at(-1), errors: window.demo.errors})"
    )
    assert len(seen["applied"]) == len(set(seen["applied"])) == applied_before + 3  # once each
    assert seen["last"]["recovered"] is True and seen["last"]["replayed"] == 3
    assert seen["reloads"] == 1  # caught up from history, not by reloading
    # Labels glide to their place (CSS transitions): photograph them where they stop.
    await canvas.evaluate("() => Promise.all(document.getAnimations().map((a) => a.finished))")
    await save_screenshot(canvas, tmp_path, "demo-canvas.png")

    # A reload of the page resumes from localStorage: same picture, nothing replayed twice.
    await canvas.reload()
    await wait_canvas(canvas, "d.state === 'live'")
    assert await canvas_labels(canvas) == want
    assert await canvas.evaluate("() => [window.demo.reloads, window.demo.applied.length]") == [
        0,
        0,
    ]


async def test_demo_canvas_reloads_the_labels_when_history_is_lost(
    demo: Demo, context: BrowserContext
) -> None:
    """Redis restarted empty (history gone) while labels change: the welcome says
    recovered: false and the canvas loads the labels from the service: same picture."""
    admin = await context.new_page()
    await admin.goto(demo.admin_url)
    canvas = await context.new_page()
    await canvas.goto(demo.canvas_url)
    await wait_canvas(canvas, "d.state === 'live'")
    for text in ("North door", "South door"):
        await add_label(admin, text)
    await wait_canvas(canvas, "d.labels.size === 2")

    await asyncio.to_thread(demo.restart_redis)
    await add_label(admin, "After the restart")  # the outbox publishes into the new Redis
    await move_label(admin, 1, 50, 60)
    await wait_canvas(canvas, "d.reloads >= 2 && d.state === 'live'")
    await wait_canvas(canvas, "d.labels.size === 3 && d.labels.get(1).x === 50")
    assert await canvas_labels(canvas) == drawn_like(service_labels(demo))
    # The node may also be asked to re-register its sessions (the new Redis forgot it):
    # a later welcome then resumes, recovered, from the reloaded position.
    recovered = await canvas.evaluate("() => window.demo.welcomes.map((w) => w.recovered)")
    assert False in recovered[1:]
    assert await canvas.evaluate("() => window.demo.errors") == []


def test_demo_launcher_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    """`make demo`'s launcher prints both pages, and SIGINT stops Redis, node and service."""
    node_port, service_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "examples.label_service.demo",
            "--port",
            str(node_port),
            "--service-port",
            str(service_port),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60_000 * MS
    while not any("Ctrl-C stops everything" in line for line in lines):
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
        assert time.monotonic() < deadline
    printed = "".join(lines)
    redis_port = int(printed.split("Redis redis://127.0.0.1:")[1].split("/")[0])
    assert f"http://127.0.0.1:{service_port}/\n" in printed  # the admin page
    assert f"http://127.0.0.1:{service_port}/canvas?client=cml" in printed
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30_000 * MS) == 0
    proc.stdout.close()
    for port in (node_port, service_port, redis_port):
        assert port_is_free("127.0.0.1", port)
