"""Real databases for the after-commit and outbox tests: a SQLite file and a PostgreSQL
database of the test's own, created on the local server and dropped afterwards.

The machine runs PostgreSQL on 127.0.0.1:5432 with trust auth (``RELAY_TEST_PG_URL``
overrides the admin URL). Each test module gets its own ``relay_test_<random>``
database, so parallel runs and other projects' data never meet.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from backend_adapter import Publisher
from backend_adapter.outbox import (
    OUTBOX,
    DispatchStats,
    OutboxDispatcher,
    create_outbox_table,
    enqueue_many,
)

PG_ADMIN_URL = os.environ.get("RELAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")


@contextmanager
def postgres_database() -> Iterator[str]:
    """CREATE a fresh database; yield its SQLAlchemy URL (psycopg 3); DROP it after."""
    name = f"relay_test_{secrets.token_hex(6)}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with _admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'app.db'}"


def fresh_engine(url: str) -> sa.Engine:
    """An engine on ``url`` with every table of a previous test dropped."""
    engine = sa.create_engine(url)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA public CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA public"))
    return engine


def dispatch_after_a_crash(
    directory: Path, publisher: Publisher, bizs: list[str]
) -> tuple[DispatchStats, DispatchStats]:
    """Two dispatch rounds of one row per BizId (data: the BizId) in a fresh SQLite
    outbox, after a dispatcher died before marking: the 2nd of every three rows went out
    as itself, the 3rd's mid went out with another event (``"other"``, no data).

    The first round must find the originals of both kinds of duplicate and tell them apart
    (of 3k rows: 2k published, k duplicates, k collisions); the second publishes the
    collided rows under new uids. Each BizId's history then reads ``[bizid]``, or
    ``[None, bizid]`` for the collided ones.
    """
    engine = sa.create_engine(sqlite_url(directory))
    try:
        create_outbox_table(engine)
        with engine.begin() as conn:
            enqueue_many(conn, [(biz, "e", biz) for biz in bizs])
        with engine.connect() as conn:
            rows = list(conn.execute(sa.select(OUTBOX).order_by(OUTBOX.c.id)))
        for n, row in enumerate(rows):
            if n % 3 == 1:
                publisher.publish(row.biz_id, "e", row.biz_id, mid=f"outbox:{row.uid}")
            elif n % 3 == 2:
                publisher.publish(row.biz_id, "other", None, mid=f"outbox:{row.uid}")
        dispatcher = OutboxDispatcher(engine, publisher)
        first, second = dispatcher.run_once(), dispatcher.run_once()
        assert dispatcher.pending() == 0
        return first, second
    finally:
        engine.dispose()
