"""Outbox mids are unique by construction: a uid per row, not the row id.

Row ids repeat across databases: two services' outboxes, a database recreated by a
developer, a restored backup. Redis remembers each ``mid`` for the dedupe window and
answers a repeat ``duplicate`` without sending it, so a mid made of the row id lost the
second database's events without a word. Each scenario here runs end to end: real
SQLite and PostgreSQL, real Redis, a real node and a WebSocket client that must get
every event.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from backend_adapter import ConfigError, Publisher
from backend_adapter.outbox import (
    OUTBOX,
    OutboxDispatcher,
    create_outbox_table,
    enqueue,
    enqueue_many,
    main,
)
from relay import wire
from tests.backend_adapter.sql_support import fresh_engine, postgres_database, sqlite_url
from tests.conftest import MS
from tests.support.node import Listener
from tests.support.redis_server import RedisServer

KEYS = wire.KeySpace()
ROOT = Path(__file__).resolve().parents[2]
WAIT = 10_000 * MS

# The table as Relay created it before rows had a uid (docs/backend.md of that time).
LEGACY_TABLE = {
    "sqlite": """
        CREATE TABLE relay_outbox (
            id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
            biz_id VARCHAR(128) NOT NULL,
            event VARCHAR(128) NOT NULL,
            data TEXT NOT NULL,
            created_at DATETIME DEFAULT CURRENT_TIMESTAMP NOT NULL,
            published_at DATETIME,
            stream_id VARCHAR(41),
            attempts INTEGER DEFAULT 0 NOT NULL,
            last_error TEXT
        )""",
    "postgresql": """
        CREATE TABLE relay_outbox (
            id BIGSERIAL NOT NULL PRIMARY KEY,
            biz_id VARCHAR(128) NOT NULL,
            event VARCHAR(128) NOT NULL,
            data TEXT NOT NULL,
            created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP NOT NULL,
            published_at TIMESTAMP WITH TIME ZONE,
            stream_id VARCHAR(41),
            attempts INTEGER DEFAULT 0 NOT NULL,
            last_error TEXT
        )""",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def two_db_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two separate databases of the same kind: two SQLite files, or two PostgreSQL DBs."""
    if request.param == "sqlite":
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        yield sqlite_url(tmp_path / "a"), sqlite_url(tmp_path / "b")
    else:
        with postgres_database() as first, postgres_database() as second:
            yield first, second


def outbox_engine(url: str) -> sa.Engine:
    engine = fresh_engine(url)
    create_outbox_table(engine)
    return engine


def drain(engine: sa.Engine, publisher: Publisher) -> tuple[int, int]:
    """Dispatch until nothing is pending; (published, duplicates) over all rounds."""
    published = duplicates = 0
    dispatcher = OutboxDispatcher(engine, publisher)
    for _ in range(10):
        stats = dispatcher.run_once()
        published += stats.published
        duplicates += stats.duplicates
        if dispatcher.pending() == 0:
            return published, duplicates
    raise AssertionError(f"{dispatcher.pending()} rows still pending")


def outbox_rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(OUTBOX).order_by(OUTBOX.c.id)))


async def all_messages(client: Listener, publisher: Publisher, count: int) -> list[Any]:
    """The data of every message the client got, once ``count`` and a sentinel arrived.

    The sentinel, published last, proves that nothing beyond ``count`` is still on its way.
    """
    publisher.publish("cml", "sentinel", None)
    messages = await client.wait_messages(count + 1, timeout=WAIT)
    assert messages[-1]["event"] == "sentinel", messages
    return [m["data"] for m in messages[:-1]]


async def test_outbox_two_databases_on_one_redis_deliver_every_event(
    two_db_urls: tuple[str, str], sync_publisher: Publisher, client: Listener
) -> None:
    """Two outboxes, rows 1..3 each for one BizId, one Redis: the client gets all 6."""
    engines = [outbox_engine(url) for url in two_db_urls]
    try:
        for n, engine in enumerate(engines):
            with engine.begin() as conn:
                enqueue_many(conn, [("cml", "label.created", [n, k]) for k in (1, 2, 3)])
        assert [r.id for r in outbox_rows(engines[0])] == [r.id for r in outbox_rows(engines[1])]
        drained = [drain(engine, sync_publisher) for engine in engines]
        received = await all_messages(client, sync_publisher, 6)
    finally:
        for engine in engines:
            engine.dispose()
    assert received == [[0, 1], [0, 2], [0, 3], [1, 1], [1, 2], [1, 3]]
    assert drained == [(3, 0), (3, 0)]  # published, duplicates


async def test_outbox_recreated_database_delivers_its_new_rows(
    db_url: str, sync_publisher: Publisher, client: Listener
) -> None:
    """The outbox dropped and created again within the dedupe window: new rows arrive."""
    engine = outbox_engine(db_url)
    with engine.begin() as conn:
        enqueue_many(conn, [("cml", "label.created", ["old", k]) for k in (1, 2, 3)])
    assert drain(engine, sync_publisher) == (3, 0)
    engine.dispose()
    if engine.dialect.name == "sqlite":
        Path(str(engine.url.database)).unlink()

    engine = outbox_engine(db_url)  # a new, empty database: ids start at 1 again
    try:
        with engine.begin() as conn:
            enqueue_many(conn, [("cml", "label.created", ["new", k]) for k in (1, 2, 3)])
        assert [r.id for r in outbox_rows(engine)] == [1, 2, 3]
        drained = drain(engine, sync_publisher)
    finally:
        engine.dispose()
    received = await all_messages(client, sync_publisher, 6)
    assert received == [["old", 1], ["old", 2], ["old", 3], ["new", 1], ["new", 2], ["new", 3]]
    assert drained == (3, 0)  # published, duplicates


async def test_outbox_restored_backup_delivers_rows_written_after_the_restore(
    tmp_path: Path, sync_publisher: Publisher, client: Listener
) -> None:
    """Backup, more rows published, backup restored: the ids drawn again still arrive."""
    url = sqlite_url(tmp_path)
    database = tmp_path / "app.db"
    engine = outbox_engine(url)
    with engine.begin() as conn:
        enqueue_many(conn, [("cml", "e", "before backup")])
    assert drain(engine, sync_publisher) == (1, 0)
    engine.dispose()
    backup = database.read_bytes()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        enqueue_many(conn, [("cml", "e", "lost with the disk")])
    assert drain(engine, sync_publisher) == (1, 0)
    engine.dispose()

    database.write_bytes(backup)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            enqueue(conn, "cml", "e", "after restore")
        assert [r.id for r in outbox_rows(engine)] == [1, 2]  # id 2 drawn a second time
        assert drain(engine, sync_publisher) == (1, 0)
    finally:
        engine.dispose()
    received = await all_messages(client, sync_publisher, 3)
    assert received == ["before backup", "lost with the disk", "after restore"]


async def test_outbox_copied_database_delivers_shared_rows_once_and_new_rows_each(
    tmp_path: Path,
    sync_publisher: Publisher,
    client: Listener,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A file copied with pending rows: those go out once, each copy's new rows go out."""
    (tmp_path / "copy").mkdir()
    original = outbox_engine(sqlite_url(tmp_path))
    with original.begin() as conn:
        enqueue_many(conn, [("cml", "e", "pending 1"), ("cml", "e", "pending 2")])
    original.dispose()
    (tmp_path / "copy" / "app.db").write_bytes((tmp_path / "app.db").read_bytes())
    copy = sa.create_engine(sqlite_url(tmp_path / "copy"))
    original = sa.create_engine(sqlite_url(tmp_path))
    try:
        with original.begin() as conn:
            enqueue(conn, "cml", "e", "original 3")
        with copy.begin() as conn:
            enqueue(conn, "cml", "e", "copy 3")
        with caplog.at_level(logging.WARNING, logger="backend_adapter.outbox"):
            drained = [drain(original, sync_publisher), drain(copy, sync_publisher)]
    finally:
        original.dispose()
        copy.dispose()
    received = await all_messages(client, sync_publisher, 4)
    assert received == ["pending 1", "pending 2", "original 3", "copy 3"]
    assert drained == [(3, 0), (3, 2)]  # the copy's two shared rows: duplicates, marked
    assert [r for r in caplog.records if r.name == "backend_adapter.outbox"] == []


async def test_outbox_row_written_without_uid_gets_one_before_publish(
    db_url: str, sync_publisher: Publisher, client: Listener, raw: redis.Redis
) -> None:
    """A row INSERTed by another service (no uid) is given one, then published in order."""
    engine = outbox_engine(db_url)
    try:
        with engine.begin() as conn:
            enqueue(conn, "cml", "e", 1)
            conn.execute(OUTBOX.insert().values(biz_id="cml", event="e", data="2"))
            enqueue(conn, "cml", "e", 3)
        assert drain(engine, sync_publisher) == (3, 0)
        published = outbox_rows(engine)
    finally:
        engine.dispose()
    assert all(len(r.uid) == 32 for r in published)
    mids = [
        wire.decode_payload(sid, f[b"prev"], f[b"p"]).mid for sid, f in raw.xrange(KEYS.log("cml"))
    ]
    assert mids == [f"outbox:{r.uid}" for r in published]
    assert await all_messages(client, sync_publisher, 3) == [1, 2, 3]


async def test_outbox_duplicate_of_another_event_is_a_warning_and_republished(
    two_db_urls: tuple[str, str],
    sync_publisher: Publisher,
    client: Listener,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A uid another event already used (a row copied by hand): loud, and still delivered."""
    engines = [outbox_engine(url) for url in two_db_urls]
    shared = uuid.uuid4().hex
    try:
        for n, engine in enumerate(engines):
            with engine.begin() as conn:
                conn.execute(
                    OUTBOX.insert().values(biz_id="cml", event="e", data=f'"db{n}"', uid=shared)
                )
                enqueue(conn, "cml", "e", f"db{n} after")
        assert drain(engines[0], sync_publisher) == (2, 0)
        with caplog.at_level(logging.WARNING, logger="backend_adapter.outbox"):
            dispatcher = OutboxDispatcher(engines[1], sync_publisher)
            stats = dispatcher.run_once()
            assert (stats.published, stats.duplicates, stats.collisions) == (1, 0, 1)
            assert drain(engines[1], sync_publisher) == (1, 0)
        [row, _] = outbox_rows(engines[1])
    finally:
        for engine in engines:
            engine.dispose()
    [warning] = [r for r in caplog.records if r.getMessage().startswith("outbox.unexpected_")]
    assert warning.levelno == logging.WARNING
    text = warning.getMessage()
    assert f"row {row.id}" in text and f"outbox:{shared}" in text and "'cml'" in text
    assert row.uid != shared and row.published_at is not None
    received = await all_messages(client, sync_publisher, 4)
    # The colliding row goes out again under a new uid, after the row that followed it.
    assert received == ["db0", "db0 after", "db1 after", "db1"]


async def test_outbox_duplicate_of_the_same_event_is_quiet(
    db_url: str,
    sync_publisher: Publisher,
    client: Listener,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Published but not marked (a crash), published again: a duplicate, no warning."""
    data = [{"n": n, "tags": ["a", n / 2, None, True]} for n in range(3)]
    engine = outbox_engine(db_url)
    try:
        with engine.begin() as conn:
            enqueue_many(conn, [("cml", "e", d) for d in data])
        [*_, last] = outbox_rows(engine)
        sync_publisher.publish("cml", "e", data[2], mid=f"outbox:{last.uid}")  # crashed round
        with caplog.at_level(logging.INFO, logger="backend_adapter.outbox"):
            assert drain(engine, sync_publisher) == (3, 1)
    finally:
        engine.dispose()
    outbox_logs = [r for r in caplog.records if r.name == "backend_adapter.outbox"]
    assert [r for r in outbox_logs if r.levelno >= logging.WARNING] == []
    assert await all_messages(client, sync_publisher, 3) == [data[2], data[0], data[1]]


# -- tables made before the uid column --------------------------------------------------------


def legacy_engine(url: str) -> sa.Engine:
    engine = fresh_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(LEGACY_TABLE[engine.dialect.name])
        conn.exec_driver_sql(
            "INSERT INTO relay_outbox (biz_id, event, data) VALUES ('cml', 'e', '\"before\"')"
        )
    return engine


def test_outbox_old_table_is_a_clear_error_until_upgraded(
    db_url: str, sync_publisher: Publisher
) -> None:
    """A table without uid: the dispatcher says what to run; create_outbox_table upgrades."""
    engine = legacy_engine(db_url)
    try:
        with pytest.raises(ConfigError, match=r"uid.*create_outbox_table.*--create-table"):
            OutboxDispatcher(engine, sync_publisher).run_once()
        create_outbox_table(engine)
        create_outbox_table(engine)  # idempotent
        with engine.begin() as conn:
            enqueue(conn, "cml", "e", "after")
        assert drain(engine, sync_publisher) == (2, 0)
        assert [(r.data, len(r.uid)) for r in outbox_rows(engine)] == [
            ('"before"', 32),
            ('"after"', 32),
        ]
    finally:
        engine.dispose()


def test_outbox_documented_upgrade_gives_the_table_the_code_expects(
    db_url: str, sync_publisher: Publisher
) -> None:
    """The ALTER TABLE in docs/backend.md turns an old table into today's, on each database."""
    text = (ROOT / "docs" / "backend.md").read_text()
    match = re.search(r"<!-- outbox-sql: upgrade -->\s*```sql\n(.*?)```", text, re.S)
    assert match, "docs/backend.md has no upgrade SQL"
    engine = legacy_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(match.group(1).strip().rstrip(";"))
        columns = [c["name"] for c in sa.inspect(engine).get_columns("relay_outbox")]
        assert columns == [c.name for c in OUTBOX.columns]
        assert drain(engine, sync_publisher) == (1, 0)
    finally:
        engine.dispose()


def test_outbox_upgrade_from_several_processes_at_once(db_url: str) -> None:
    """Four starts upgrading one old table at the same moment: all succeed, one column."""
    engine = legacy_engine(db_url)
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def upgrade() -> None:
        start.wait()
        try:
            create_outbox_table(engine)
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert errors == []
        columns = [c["name"] for c in sa.inspect(engine).get_columns("relay_outbox")]
        assert columns == [c.name for c in OUTBOX.columns]
    finally:
        engine.dispose()


def test_outbox_missing_table_is_a_clear_error(db_url: str, sync_publisher: Publisher) -> None:
    """No outbox table at all: ConfigError naming the ways to create it, not an SQL error."""
    engine = fresh_engine(db_url)
    try:
        with pytest.raises(ConfigError, match=r"does not exist.*--create-table"):
            OutboxDispatcher(engine, sync_publisher).run_once()
    finally:
        engine.dispose()


async def test_outbox_cli_on_old_table_exits_2_or_upgrades(
    db_url: str,
    redis_server: RedisServer,
    sync_publisher: Publisher,
    client: Listener,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`relay outbox-dispatch` on an old table: exit 2 with the fix; --create-table drains."""
    legacy_engine(db_url).dispose()
    args = ["--db-url", db_url, "--redis-url", redis_server.url, "--once"]
    assert main(args) == 2
    assert "--create-table" in capsys.readouterr().err
    assert main([*args, "--create-table"]) == 0
    assert await all_messages(client, sync_publisher, 1) == ["before"]
