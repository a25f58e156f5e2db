"""The transactional outbox on real SQLite and PostgreSQL, with a real Redis and node.

What the outbox promises is checked where it can break: Redis gone while rows are
committed, a dispatcher SIGKILLed between publish and mark, two dispatchers racing on
one PostgreSQL table. Delivery is read back from the BizIds' Streams (every entry names
its ``mid``, ``outbox:<row uid>``) or from a real client. Mids unique across databases
are tested in test_outbox_mids.py.
"""

from __future__ import annotations

import importlib.util
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session

from backend_adapter import InvalidInput, Publisher
from backend_adapter.outbox import (
    OUTBOX,
    DispatchStats,
    OutboxDispatcher,
    create_outbox_table,
    enqueue,
    enqueue_async,
    enqueue_many,
    main,
)
from relay import wire
from tests.backend_adapter.sql_support import fresh_engine, sqlite_url
from tests.support.node import Listener
from tests.support.redis_server import RedisServer
from tests.support.timing import MS, wait_until

KEYS = wire.KeySpace()
ROOT = Path(__file__).resolve().parents[2]
HAS_ASYNC = all(importlib.util.find_spec(m) for m in ("greenlet", "aiosqlite"))


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = fresh_engine(db_url)
    create_outbox_table(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = fresh_engine(pg_url)
    create_outbox_table(engine)
    yield engine
    engine.dispose()


def stream_mids(raw: redis.Redis, biz_id: str) -> list[str | None]:
    """The mids of a BizId's history, oldest first."""
    return [
        wire.decode_payload(sid, fields[b"prev"], fields[b"p"]).mid
        for sid, fields in raw.xrange(KEYS.log(biz_id))
    ]


def rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(OUTBOX).order_by(OUTBOX.c.id)))


def failed_rounds(caplog: pytest.LogCaptureFixture) -> int:
    return sum(r.getMessage().startswith("outbox.dispatch_failed") for r in caplog.records)


@contextmanager
def running(dispatcher: OutboxDispatcher) -> Iterator[threading.Thread]:
    """``dispatcher.run_forever()`` in a thread for the duration of the block."""
    thread = threading.Thread(target=dispatcher.run_forever, name="dispatcher", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        dispatcher.stop()
        thread.join(10)
        assert not thread.is_alive()


class CountingDispatcher(OutboxDispatcher):
    """A dispatcher that keeps the stats of every round it ran."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: list[DispatchStats] = []

    def run_once(self) -> DispatchStats:
        stats = super().run_once()
        self.rounds.append(stats)
        return stats

    def total(self, field: str) -> int:
        return sum(getattr(stats, field) for stats in self.rounds)


# -- enqueue and dispatch -----------------------------------------------------------------------


async def test_outbox_committed_event_reaches_client_rolled_back_does_not(
    engine: sa.Engine, sync_publisher: Publisher, client: Listener, raw: redis.Redis
) -> None:
    """Commit → published with mid outbox:<uid> and marked; rollback or raise → no row."""
    with engine.begin() as conn:
        kept = enqueue(conn, "cml", "label.created", {"id": 1})
    with engine.connect() as conn:
        enqueue(conn, "cml", "label.created", {"id": 2})
        conn.rollback()
    with pytest.raises(RuntimeError), Session(engine) as session, session.begin():
        enqueue(session, "cml", "label.created", {"id": 3})
        session.flush()
        raise RuntimeError
    stats = OutboxDispatcher(engine, sync_publisher).run_once()
    assert (stats.claimed, stats.published, stats.duplicates) == (1, 1, 0)
    [message] = await client.wait_messages(1)
    assert (message["event"], message["data"]) == ("label.created", {"id": 1})
    [row] = rows(engine)
    assert (row.id, row.stream_id, row.attempts) == (kept, message["id"], 0)
    assert row.published_at is not None
    assert stream_mids(raw, "cml") == [f"outbox:{row.uid}"]


def test_outbox_enqueue_validates_in_the_transaction(engine: sa.Engine) -> None:
    """A row the dispatcher could never publish is refused when written."""
    with engine.begin() as conn:
        with pytest.raises(InvalidInput):
            enqueue(conn, "bad biz!", "e", 1)
        with pytest.raises(InvalidInput):
            enqueue_many(conn, [("cml", "e", 1), ("cml", "e", {1, 2})])
    assert rows(engine) == []


@pytest.mark.skipif(not HAS_ASYNC, reason="AsyncSession needs greenlet and aiosqlite")
async def test_outbox_enqueue_async_in_async_session(
    tmp_path: Path, sync_publisher: Publisher, raw: redis.Redis
) -> None:
    """enqueue_async writes in an AsyncSession's transaction."""
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    url = sqlite_url(tmp_path)
    create_outbox_table(sync_engine := sa.create_engine(url))
    async_engine = create_async_engine(url.replace("sqlite://", "sqlite+aiosqlite://"))
    async with AsyncSession(async_engine) as session, session.begin():
        row_id = await enqueue_async(session, "cml", "e", {"async": True})
    await async_engine.dispose()
    assert OutboxDispatcher(sync_engine, sync_publisher).run_once().published == 1
    [row] = rows(sync_engine)
    assert row.id == row_id and stream_mids(raw, "cml") == [f"outbox:{row.uid}"]
    sync_engine.dispose()


def test_outbox_publishes_in_id_order_across_batches(
    engine: sa.Engine, redis_server: RedisServer, raw: redis.Redis
) -> None:
    """Small batches, interleaved BizIds: each Stream holds its rows in id order."""
    items = [(f"b{i % 7}", "e", i) for i in range(230)]
    with engine.begin() as conn:
        enqueue_many(conn, items)
    with Publisher(redis_server.url, history_size=1000) as publisher:
        dispatcher = CountingDispatcher(engine, publisher, batch_size=50)
        while dispatcher.run_once().claimed:
            pass
    assert [s.published for s in dispatcher.rounds] == [50, 50, 50, 50, 30, 0]
    uids = {biz: [r.uid for r in rows(engine) if r.biz_id == biz] for biz in {b for b, *_ in items}}
    for biz, row_uids in uids.items():
        assert stream_mids(raw, biz) == [f"outbox:{uid}" for uid in row_uids]


# -- Redis down -----------------------------------------------------------------------------------


def test_outbox_redis_down_while_committing_100_delivers_each_once_in_order(
    engine: sa.Engine, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis killed, 100 events committed, Redis back: all delivered once, in BizId order."""
    bizs = [f"biz{n}" for n in range(7)]
    with Publisher(own_redis.url, retries=0, timeout=0.5, history_size=1000) as publisher:
        dispatcher = OutboxDispatcher(
            engine, publisher, batch_size=30, poll_interval=0.02, backoff=0.02, max_backoff=0.2
        )
        with running(dispatcher):
            own_redis.kill()
            for n in range(25):  # 25 transactions of 4 events, BizIds interleaved
                with Session(engine) as session, session.begin():
                    for k in range(4):
                        enqueue(session, bizs[(n * 4 + k) % 7], "label.created", n * 4 + k)
                dispatcher.wake()
            # Several failed rounds (not a sleep that would pass without any).
            wait_until(lambda: failed_rounds(caplog) >= 3)
            assert dispatcher.pending() == 100
            own_redis.start()
            wait_until(lambda: dispatcher.pending() == 0)
    raw = redis.Redis(port=own_redis.port)
    published = rows(engine)
    assert len(published) == 100 and all(r.published_at for r in published)
    for biz in bizs:
        expected = [f"outbox:{r.uid}" for r in published if r.biz_id == biz]
        assert stream_mids(raw, biz) == expected
    assert sum(raw.xlen(KEYS.log(biz)) for biz in bizs) == 100
    raw.close()


# -- crash between publish and mark --------------------------------------------------------------

STALL_AFTER_PUBLISH = """
import sys, time
from backend_adapter import Publisher
from backend_adapter.outbox import OutboxDispatcher

class StallBeforeMark(OutboxDispatcher):
    def _record(self, conn, outcome):
        print("published", len(outcome.done), flush=True)
        time.sleep(60)  # SIGKILLed here: published, never marked

with Publisher(sys.argv[2]) as publisher:
    StallBeforeMark(sys.argv[1], publisher).run_once()
"""


async def test_outbox_dispatcher_killed_between_publish_and_mark_delivers_nothing_twice(
    engine: sa.Engine,
    db_url: str,
    redis_server: RedisServer,
    sync_publisher: Publisher,
    client: Listener,
    raw: redis.Redis,
) -> None:
    """SIGKILL after publish, before mark; a new dispatcher's publishes are all duplicates."""
    with engine.begin() as conn:
        enqueue_many(conn, [("cml", "label.created", n) for n in range(20)])
    proc = subprocess.Popen(
        [sys.executable, "-c", STALL_AFTER_PUBLISH, db_url, redis_server.url],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == ["published", "20"]
    finally:
        proc.kill()
        proc.wait(10_000 * MS)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -9
    await client.wait_messages(20)
    assert all(r.published_at is None for r in rows(engine))

    dispatcher = CountingDispatcher(engine, sync_publisher)
    # PostgreSQL releases the dead dispatcher's row locks once it sees the socket close.
    wait_until(lambda: dispatcher.run_once().published > 0 or dispatcher.pending() == 0)
    assert (dispatcher.total("published"), dispatcher.total("duplicates")) == (20, 20)
    assert all(r.published_at for r in rows(engine))
    assert stream_mids(raw, "cml") == [f"outbox:{r.uid}" for r in rows(engine)]
    sync_publisher.publish("cml", "sentinel", None)
    messages = await client.wait_messages(21)
    assert [m["data"] for m in messages] == [*range(20), None]


class CrashBeforeMark(OutboxDispatcher):
    """Publishes, then dies before marking (the in-process twin of the SIGKILL above)."""

    def _record(self, conn: sa.Connection, outcome: Any) -> None:
        raise SystemExit("crashed between publish and mark")


async def test_outbox_dedupe_window_bounds_the_recovery(
    tmp_path: Path, redis_server: RedisServer, client: Listener
) -> None:
    """Within dedupe_window a re-publish is a duplicate; after it, a second delivery."""
    engine = fresh_engine(sqlite_url(tmp_path))
    create_outbox_table(engine)
    with engine.begin() as conn:
        enqueue(conn, "cml", "e", "once")
    with Publisher(redis_server.url, dedupe_window=1) as publisher:
        with pytest.raises(SystemExit):
            CrashBeforeMark(engine, publisher).run_once()
        with pytest.raises(SystemExit):
            CrashBeforeMark(engine, publisher).run_once()  # inside the window: a duplicate
        time.sleep(1100 * MS)  # past dedupe_window (1 s)
        stats = OutboxDispatcher(engine, publisher).run_once()  # after it: a new event
    assert (stats.published, stats.duplicates) == (1, 0)
    messages = await client.wait_messages(2)
    assert [m["data"] for m in messages] == ["once", "once"]
    assert messages[0]["id"] != messages[1]["id"]
    engine.dispose()


# -- several dispatchers on PostgreSQL ----------------------------------------------------------


def test_outbox_two_dispatchers_on_postgres_deliver_every_event_once_in_order(
    pg_engine: sa.Engine, pg_url: str, redis_server: RedisServer, raw: redis.Redis
) -> None:
    """Two dispatchers (own connections) drain one table while a producer keeps writing."""
    rng = random.Random(5)
    bizs = [f"biz{n}" for n in range(30)]
    with pg_engine.begin() as conn:
        enqueue_many(conn, [(rng.choice(bizs), "e", n) for n in range(1500)])

    def produce() -> None:
        for batch in range(30):
            with pg_engine.begin() as conn:
                enqueue_many(
                    conn, [(rng.choice(bizs), "e", 1500 + batch * 50 + k) for k in range(50)]
                )
            time.sleep(0.005)

    publishers = [Publisher(redis_server.url, history_size=10_000) for _ in range(2)]
    dispatchers = [
        CountingDispatcher(pg_url, publisher, batch_size=50, poll_interval=0.01)
        for publisher in publishers
    ]
    producer = threading.Thread(target=produce)
    with running(dispatchers[0]), running(dispatchers[1]):
        producer.start()
        producer.join()
        wait_until(lambda: dispatchers[0].pending() == 0, timeout=20_000 * MS)
    for dispatcher, publisher in zip(dispatchers, publishers, strict=True):
        dispatcher.close()
        publisher.close()

    published = [d.total("published") for d in dispatchers]
    assert sum(published) == 3000 and min(published) > 0, published
    assert [d.total("duplicates") for d in dispatchers] == [0, 0]  # nobody published twice
    all_rows = rows(pg_engine)
    for biz in bizs:
        assert stream_mids(raw, biz) == [f"outbox:{r.uid}" for r in all_rows if r.biz_id == biz]


def test_outbox_dispatcher_skips_bizid_whose_earlier_row_another_holds(
    pg_engine: sa.Engine, sync_publisher: Publisher, raw: redis.Redis
) -> None:
    """Rows after a row locked elsewhere wait; other BizIds go on; nothing is reordered."""
    with pg_engine.begin() as conn:
        enqueue_many(conn, [("a", "e", 1), ("b", "e", 2), ("a", "e", 3), ("b", "e", 4)])
    first_a = rows(pg_engine)[0].id
    with pg_engine.connect() as other:  # another dispatcher, mid-round, holding row a#1
        other.execute(sa.select(OUTBOX).where(OUTBOX.c.id == first_a).with_for_update())
        stats = OutboxDispatcher(pg_engine, sync_publisher).run_once()
        assert (stats.claimed, stats.published, stats.held_back) == (3, 2, 1)
        assert stream_mids(raw, "a") == []
        other.rollback()
    stats = OutboxDispatcher(pg_engine, sync_publisher).run_once()
    assert (stats.published, stats.held_back) == (2, 0)
    assert stream_mids(raw, "a") == [f"outbox:{r.uid}" for r in rows(pg_engine) if r.biz_id == "a"]


# -- poison rows, purge, CLI ----------------------------------------------------------------------


def test_outbox_poison_row_holds_back_its_bizid_only(
    engine: sa.Engine, sync_publisher: Publisher, raw: redis.Redis
) -> None:
    """Unpublishable data: error recorded, its BizId waits behind it, others go on."""
    with engine.begin() as conn:
        enqueue(conn, "cml", "e", 1)
        conn.execute(OUTBOX.insert().values(biz_id="cml", event="e", data="{not json", uid="x"))
        enqueue_many(conn, [("cml", "e", 3), ("other", "e", 4)])
    dispatcher = OutboxDispatcher(engine, sync_publisher)
    stats = dispatcher.run_once()
    assert (stats.published, stats.failed, stats.held_back) == (2, 1, 1)
    poison = rows(engine)[1]
    assert poison.attempts == 1 and "JSONDecodeError" in poison.last_error
    assert len(stream_mids(raw, "cml")) == 1 and len(stream_mids(raw, "other")) == 1
    assert dispatcher.run_once().claimed == 0  # the BizId is parked, not retried at once
    with engine.begin() as conn:
        conn.execute(OUTBOX.update().where(OUTBOX.c.id == poison.id).values(data="2"))
    stats = OutboxDispatcher(engine, sync_publisher).run_once()
    assert (stats.published, stats.failed) == (2, 0)
    assert stream_mids(raw, "cml") == [f"outbox:{r.uid}" for r in rows(engine) if r.biz_id == "cml"]


def test_outbox_redis_refusing_one_bizid_holds_back_only_that_bizid(
    engine: sa.Engine, sync_publisher: Publisher, raw: redis.Redis
) -> None:
    """A Redis error that retrying cannot fix (WRONGTYPE) poisons one row, not the batch."""
    raw.set(KEYS.log("jammed"), "not a stream")
    with engine.begin() as conn:
        enqueue_many(
            conn, [("cml", "e", 1), ("jammed", "e", 2), ("jammed", "e", 3), ("cml", "e", 4)]
        )
    stats = OutboxDispatcher(engine, sync_publisher).run_once()
    assert (stats.published, stats.failed, stats.held_back) == (2, 1, 1)
    assert "WRONGTYPE" in rows(engine)[1].last_error
    assert len(stream_mids(raw, "cml")) == 2


def test_outbox_purge_deletes_only_old_published_rows(
    engine: sa.Engine, sync_publisher: Publisher
) -> None:
    """purge(older_than) keeps pending rows and recently published ones."""
    with engine.begin() as conn:
        enqueue_many(conn, [("cml", "e", n) for n in range(5)])
    dispatcher = OutboxDispatcher(engine, sync_publisher, batch_size=3)
    dispatcher.run_once()
    assert dispatcher.purge(3600) == 0
    time.sleep(0.01)
    assert dispatcher.purge(0.005) == 3
    assert [r.data for r in rows(engine)] == ["3", "4"]


def test_outbox_cli_once_creates_table_and_drains(
    tmp_path: Path, redis_server: RedisServer, raw: redis.Redis
) -> None:
    """`relay outbox-dispatch --once` (backend_adapter.outbox.main) publishes and exits 0."""
    url = sqlite_url(tmp_path)
    args = ["--db-url", url, "--redis-url", redis_server.url, "--batch-size", "4"]
    assert main([*args, "--create-table", "--once"]) == 0
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        enqueue_many(conn, [("cml", "e", n) for n in range(10)])
    assert main([*args, "--once"]) == 0
    assert len(stream_mids(raw, "cml")) == 10
    assert all(r.published_at for r in rows(engine))
    engine.dispose()
    dead = ["--db-url", url, "--redis-url", "redis://127.0.0.1:1/0", "--once"]
    with engine.begin() as conn:
        enqueue(conn, "cml", "e", "late")
    assert main(dead) == 1
    assert main(["--db-url", url]) == 2


def test_outbox_cli_bad_database_url_exits_2_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A --db-url SQLAlchemy cannot read (here a port that is not a number) is a usage
    error, exit 2 with one line, not a traceback; the line names no password."""
    url = "postgresql://relay:s3cret@db:notaport/app"
    assert main(["--db-url", url, "--redis-url", "redis://127.0.0.1:1/0", "--once"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relay outbox-dispatch: ") and err.count("\n") == 1
    assert "s3cret" not in err


# -- the documented schema ------------------------------------------------------------------------


def documented_sql(dialect: str) -> str:
    """The ```sql block under the "<dialect>" migration heading of docs/backend.md."""
    text = (ROOT / "docs" / "backend.md").read_text()
    match = re.search(rf"<!-- outbox-sql: {dialect} -->\s*```sql\n(.*?)```", text, re.S)
    assert match, f"docs/backend.md has no outbox SQL for {dialect}"
    return match.group(1)


def test_outbox_documented_migrations_match_the_table(db_url: str) -> None:
    """The SQL in docs/backend.md creates the table the code expects, on each database."""
    engine = fresh_engine(db_url)
    with engine.begin() as conn:
        for statement in documented_sql(engine.dialect.name).split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
    inspector = sa.inspect(engine)
    columns = {c["name"]: c for c in inspector.get_columns("relay_outbox")}
    assert list(columns) == [c.name for c in OUTBOX.columns]
    for column in OUTBOX.columns:
        assert columns[column.name]["nullable"] == column.nullable, column.name
    indexes = {i["name"]: i["column_names"] for i in inspector.get_indexes("relay_outbox")}
    assert indexes == {i.name: [c.name for c in i.columns] for i in OUTBOX.indexes}
    with engine.begin() as conn:
        enqueue(conn, "cml", "e", 1)
    assert rows(engine)[0].attempts == 0
    engine.dispose()
