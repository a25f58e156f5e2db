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
    POST   /labels            {"biz_id": "cml", "text": "..."} -> 201 {"id", "biz_id", "text"}
    DELETE /labels/{id}       -> 200 {"id", "biz_id"}, or 404
    GET    /labels?biz_id=B   -> {"labels": [...]}
    GET    /token/{client_id} -> {"token": ...} when started with --relay-secret (demo only:
                                 a real backend issues tokens only to a logged-in user)

Events, published to the label's BizId: ``label.created`` {id, biz_id, text} and
``label.deleted`` {id, biz_id}.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
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


def make_engine(db_url: str) -> sa.Engine:
    engine = sa.create_engine(db_url)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL: the dispatcher's reads never block a request's write, nor the reverse.
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            dbapi_connection.execute("PRAGMA busy_timeout=5000")

    metadata.create_all(engine)
    create_outbox_table(engine)  # or upgrade one an older version made
    return engine


# -- the transactions: business row and event together ---------------------------------


def create_label(engine: sa.Engine, biz_id: str, text: str) -> dict[str, Any]:
    with engine.begin() as conn:
        insert = labels.insert().values(biz_id=biz_id, text=text).returning(labels.c.id)
        label = {"id": conn.execute(insert).scalar_one(), "biz_id": biz_id, "text": text}
        # Same transaction: if this raises (a bad biz_id, say), the label is not stored.
        enqueue(conn, biz_id, "label.created", label)
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
        query = sa.select(labels.c.id, labels.c.biz_id, labels.c.text).where(
            labels.c.biz_id == biz_id
        )
        return [dict(row._mapping) for row in conn.execute(query.order_by(labels.c.id))]


# -- HTTP ---------------------------------------------------------------------------------


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=f'{{"error": "{message}"}}', content_type="application/json")


async def post_label(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        raise _bad_request("body must be JSON") from None
    biz_id, text = body.get("biz_id"), body.get("text")
    if not isinstance(biz_id, str) or not isinstance(text, str) or not text:
        raise _bad_request("biz_id and text are required strings")
    try:
        # SQLite calls block: keep them off the event loop.
        label = await asyncio.to_thread(create_label, request.app[ENGINE], biz_id, text)
    except InvalidInput as exc:
        raise _bad_request(str(exc)) from None
    request.app[DISPATCHER].wake()
    return web.json_response(label, status=201)


async def remove_label(request: web.Request) -> web.Response:
    try:
        label_id = int(request.match_info["label_id"])
    except ValueError:
        raise _bad_request("label id must be an integer") from None
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
    run_dispatcher: bool = True,
    poll_interval: float = 1.0,
) -> web.Application:
    """The service; with ``run_dispatcher=False`` run ``relay outbox-dispatch`` beside it."""
    engine = make_engine(db_url)
    app = web.Application()
    app[ENGINE] = engine
    app[SECRET] = relay_secret
    app[RUN_DISPATCHER] = run_dispatcher
    app[DISPATCHER] = OutboxDispatcher(engine, Publisher(redis_url), poll_interval=poll_interval)
    app.cleanup_ctx.append(_dispatcher_thread)
    app.router.add_post("/labels", post_label)
    app.router.add_delete("/labels/{label_id}", remove_label)
    app.router.add_get("/labels", get_labels)
    app.router.add_get("/token/{client_id}", get_token)
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
        run_dispatcher=not args.no_dispatcher,
    )
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0
