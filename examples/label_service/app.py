"""A tiny label service: the seed's Spring Boot backend, done the Relay way.

The seed's backend saved a label, then called the WebSocket server. A crash, an
exception or a broker outage between the two lost the event; a publish before the
commit showed clients a label that might roll back. Here each handler writes the label
row and its event (an outbox row, :func:`backend_adapter.outbox.enqueue`) in ONE SQLite
transaction, so both exist or neither does, and an :class:`OutboxDispatcher` in a
background thread publishes committed events to Relay — in order per BizId, retrying
while Redis is down, without duplicates. ``dispatcher.wake()`` after each commit keeps
the delay to a few milliseconds.

Endpoints (JSON):
    POST   /labels            {"biz_id": "cml", "text": "...", "x"?, "y"?}
                              -> 201 {"id", "biz_id", "text", "x", "y"}
    PATCH  /labels/{id}       {"x", "y"} -> 200 {"id", "biz_id", "text", "x", "y"}, or 404
    DELETE /labels/{id}       -> 200 {"id", "biz_id"}, or 404
    GET    /labels?biz_id=B   -> {"labels": [...]}
    GET    /token/{client_id} -> {"token": ...} when started with --relay-secret (demo only:
                                 a real backend issues tokens only to a logged-in user)

Pages (``make demo``): ``/`` the admin page (what the seed's Vue app did: create, move,
delete labels), ``/canvas?client=cml`` the client canvas (what the seed's WPF window
did: draw one client's labels, live, through relay-client.js from ``--relay-url``).

Events, published to the label's BizId, each carrying the label as it now is (applying
them again, or over a fresh copy of the labels, gives the same result):
``label.created`` and ``label.moved`` {id, biz_id, text, x, y}, ``label.deleted`` {id, biz_id}.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiohttp import web

from backend_adapter import InvalidInput, Publisher, issue_token
from backend_adapter.outbox import OutboxDispatcher, create_outbox_table, enqueue

metadata = sa.MetaData()
labels = sa.Table(
    "labels",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("biz_id", sa.String(128), nullable=False, index=True),
    sa.Column("text", sa.String(500), nullable=False),
    # Where the label sits on the client's canvas, in canvas pixels (the seed's
    # Canvas.SetLeft/SetTop).
    sa.Column("x", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("y", sa.Integer(), nullable=False, server_default="0"),
    sa.Column(
        "created_at",
        sa.DateTime(timezone=True),
        nullable=False,
        server_default=sa.func.current_timestamp(),
    ),
)

ENGINE = web.AppKey("engine", sa.Engine)
DISPATCHER = web.AppKey("dispatcher", OutboxDispatcher)
RUN_DISPATCHER = web.AppKey("run_dispatcher", bool)
SECRET = web.AppKey("secret", str)
RELAY_URL = web.AppKey("relay_url", str)
STATIC = Path(__file__).parent / "static"
CANVAS_WIDTH, CANVAS_HEIGHT = 800, 480  # the canvas the labels are placed on


def make_engine(db_url: str) -> sa.Engine:
    engine = sa.create_engine(db_url)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL: the dispatcher's reads never block a request's write, nor the reverse.
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            dbapi_connection.execute("PRAGMA busy_timeout=5000")

    metadata.create_all(engine)
    with engine.begin() as conn:  # a labels table of a version without positions
        present = {c["name"] for c in sa.inspect(conn).get_columns("labels")}
        for column in ("x", "y"):
            if column not in present:
                conn.execute(
                    sa.text(f"ALTER TABLE labels ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
                )
    create_outbox_table(engine)  # or upgrade one an older version made
    return engine


# -- the transactions: business row and event together ---------------------------------


def create_label(engine: sa.Engine, biz_id: str, text: str, x: int, y: int) -> dict[str, Any]:
    with engine.begin() as conn:
        insert = labels.insert().values(biz_id=biz_id, text=text, x=x, y=y).returning(labels.c.id)
        label_id = conn.execute(insert).scalar_one()
        label = {"id": label_id, "biz_id": biz_id, "text": text, "x": x, "y": y}
        # Same transaction: if this raises (a bad biz_id, say), the label is not stored.
        enqueue(conn, biz_id, "label.created", label)
    return label


def move_label(engine: sa.Engine, label_id: int, x: int, y: int) -> dict[str, Any] | None:
    with engine.begin() as conn:
        row = conn.execute(
            labels.update()
            .where(labels.c.id == label_id)
            .values(x=x, y=y)
            .returning(labels.c.biz_id, labels.c.text)
        ).first()
        if row is None:
            return None
        label = {"id": label_id, "biz_id": row.biz_id, "text": row.text, "x": x, "y": y}
        enqueue(conn, row.biz_id, "label.moved", label)
    return label


def delete_label(engine: sa.Engine, label_id: int) -> dict[str, Any] | None:
    with engine.begin() as conn:
        row = conn.execute(
            labels.delete().where(labels.c.id == label_id).returning(labels.c.biz_id)
        ).first()
        if row is None:
            return None
        gone = {"id": label_id, "biz_id": row.biz_id}
        enqueue(conn, row.biz_id, "label.deleted", gone)
    return gone


def list_labels(engine: sa.Engine, biz_id: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        query = sa.select(
            labels.c.id, labels.c.biz_id, labels.c.text, labels.c.x, labels.c.y
        ).where(labels.c.biz_id == biz_id)
        return [dict(row._mapping) for row in conn.execute(query.order_by(labels.c.id))]


# -- HTTP ---------------------------------------------------------------------------------


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=f'{{"error": "{message}"}}', content_type="application/json")


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise _bad_request("body must be JSON") from None
    if not isinstance(body, dict):
        raise _bad_request("body must be a JSON object")
    return body


def _position(body: dict[str, Any], default: tuple[int, int] | None) -> tuple[int, int]:
    """``x`` and ``y`` of the body, kept on the canvas; ``default`` when both are absent."""
    if default is not None and body.get("x") is None and body.get("y") is None:
        return default
    x, y = body.get("x"), body.get("y")
    if not isinstance(x, int | float) or not isinstance(y, int | float):
        raise _bad_request("x and y are required numbers")
    return (
        min(max(int(x), 0), CANVAS_WIDTH - 1),
        min(max(int(y), 0), CANVAS_HEIGHT - 1),
    )


def _label_id(request: web.Request) -> int:
    try:
        return int(request.match_info["label_id"])
    except ValueError:
        raise _bad_request("label id must be an integer") from None


async def post_label(request: web.Request) -> web.Response:
    body = await _json_body(request)
    biz_id, text = body.get("biz_id"), body.get("text")
    if not isinstance(biz_id, str) or not isinstance(text, str) or not text:
        raise _bad_request("biz_id and text are required strings")
    somewhere = (random.randrange(20, CANVAS_WIDTH - 180), random.randrange(20, CANVAS_HEIGHT - 60))
    x, y = _position(body, somewhere)
    try:
        # SQLite calls block: keep them off the event loop.
        label = await asyncio.to_thread(create_label, request.app[ENGINE], biz_id, text, x, y)
    except InvalidInput as exc:
        raise _bad_request(str(exc)) from None
    request.app[DISPATCHER].wake()
    return web.json_response(label, status=201)


async def patch_label(request: web.Request) -> web.Response:
    label_id = _label_id(request)
    x, y = _position(await _json_body(request), None)
    label = await asyncio.to_thread(move_label, request.app[ENGINE], label_id, x, y)
    if label is None:
        raise web.HTTPNotFound()
    request.app[DISPATCHER].wake()
    return web.json_response(label)


async def remove_label(request: web.Request) -> web.Response:
    label_id = _label_id(request)
    gone = await asyncio.to_thread(delete_label, request.app[ENGINE], label_id)
    if gone is None:
        raise web.HTTPNotFound()
    request.app[DISPATCHER].wake()
    return web.json_response(gone)


async def get_labels(request: web.Request) -> web.Response:
    biz_id = request.query.get("biz_id", "")
    found = await asyncio.to_thread(list_labels, request.app[ENGINE], biz_id)
    return web.json_response({"labels": found})


async def get_token(request: web.Request) -> web.Response:
    secret = request.app[SECRET]
    if not secret:
        raise web.HTTPNotFound(text="start the service with --relay-secret to issue tokens")
    try:
        token = issue_token(secret, request.match_info["client_id"], ttl=3600)
    except InvalidInput as exc:
        raise _bad_request(str(exc)) from None
    return web.json_response({"token": token})


def _page(name: str) -> Any:
    """A static file of the demo (``static/``), read at each request (they are small)."""
    kinds = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}

    async def handler(request: web.Request) -> web.Response:
        path = STATIC / name
        return web.Response(
            body=path.read_bytes(),
            content_type=kinds[path.suffix],
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    return handler


async def demo_config(request: web.Request) -> web.Response:
    """Where the pages find Relay: the node's HTTP base (the JS client is served there)."""
    relay = request.app[RELAY_URL].rstrip("/")
    if not relay:
        raise web.HTTPNotFound(text="start the service with --relay-url to use the canvas")
    ws = "ws" + relay[len("http") :] if relay.startswith("http") else relay
    return web.json_response(
        {"relay_http": relay, "relay_ws": ws, "width": CANVAS_WIDTH, "height": CANVAS_HEIGHT}
    )


async def _dispatcher_thread(app: web.Application) -> AsyncIterator[None]:
    """Run the outbox dispatcher in a thread for the application's lifetime."""
    dispatcher = app[DISPATCHER]
    running = (
        asyncio.create_task(asyncio.to_thread(dispatcher.run_forever))
        if app[RUN_DISPATCHER]
        else None
    )
    yield
    dispatcher.stop()
    if running is not None:
        await running
    dispatcher.publisher.close()
    app[ENGINE].dispose()


def create_app(
    db_url: str,
    redis_url: str,
    *,
    relay_secret: str = "",
    relay_url: str = "",
    run_dispatcher: bool = True,
    poll_interval: float = 1.0,
) -> web.Application:
    """The service; with ``run_dispatcher=False`` run ``relay outbox-dispatch`` beside it."""
    engine = make_engine(db_url)
    app = web.Application()
    app[ENGINE] = engine
    app[SECRET] = relay_secret
    app[RELAY_URL] = relay_url
    app[RUN_DISPATCHER] = run_dispatcher
    app[DISPATCHER] = OutboxDispatcher(engine, Publisher(redis_url), poll_interval=poll_interval)
    app.cleanup_ctx.append(_dispatcher_thread)
    app.router.add_post("/labels", post_label)
    app.router.add_patch("/labels/{label_id}", patch_label)
    app.router.add_delete("/labels/{label_id}", remove_label)
    app.router.add_get("/labels", get_labels)
    app.router.add_get("/token/{client_id}", get_token)
    app.router.add_get("/", _page("admin.html"))
    app.router.add_get("/canvas", _page("canvas.html"))
    app.router.add_get("/static/canvas.js", _page("canvas.js"))
    app.router.add_get("/static/admin.js", _page("admin.js"))
    app.router.add_get("/static/demo.css", _page("demo.css"))
    app.router.add_get("/demo.json", demo_config)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.label_service", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--db", default="sqlite:///labels.db", help="SQLAlchemy URL")
    parser.add_argument(
        "--redis-url", default=os.environ.get("RELAY_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--relay-secret", default=os.environ.get("RELAY_AUTH_SECRET", ""))
    parser.add_argument(
        "--relay-url",
        default=os.environ.get("RELAY_URL", ""),
        help="a relay node's HTTP address, for the canvas page (http://127.0.0.1:8080)",
    )
    parser.add_argument(
        "--no-dispatcher",
        action="store_true",
        help="do not dispatch the outbox here (run `relay outbox-dispatch` instead)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(
        args.db,
        args.redis_url,
        relay_secret=args.relay_secret,
        relay_url=args.relay_url,
        run_dispatcher=not args.no_dispatcher,
    )
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0
