"""Publish-after-commit on real SQLite and PostgreSQL, seen by a real client of a real node.

"Nothing was published" is proven, not waited for: after the case under test, a sentinel
event is published to the same BizId, and since one BizId's events arrive in publish
order, the sentinel arriving first means nothing was published before it.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from backend_adapter import AsyncPublisher, InvalidInput, Publisher
from backend_adapter.after_commit import AfterCommit, QueuedEvent, dbapi_transaction
from relay.errors import ConfigError
from tests.backend_adapter.conftest import dead_url
from tests.backend_adapter.sql_support import fresh_engine
from tests.support.node import Listener
from tests.support.redis_server import RedisServer
from tests.support.timing import MS

HAS_ASYNC = all(importlib.util.find_spec(m) for m in ("greenlet", "aiosqlite"))
needs_async = pytest.mark.skipif(
    not HAS_ASYNC, reason="AsyncSession needs greenlet and aiosqlite (pip install -e '.[dev]')"
)


class Base(DeclarativeBase):
    pass


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(primary_key=True)
    biz_id: Mapped[str] = mapped_column(sa.String(128))
    text: Mapped[str] = mapped_column(sa.String(200), unique=True)


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = fresh_engine(db_url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def hooks(sync_publisher: Publisher) -> AfterCommit:
    return AfterCommit(sync_publisher)


async def received(client: Listener, publisher: Publisher) -> list[tuple[str, Any]]:
    """Every (event, data) the client got before a sentinel published now; consumes them."""
    publisher.publish("cml", "sentinel", None)
    await client.wait_for(lambda: any(m["event"] == "sentinel" for m in client.messages))
    frames = client.frames
    end = next(i for i, f in enumerate(frames) if f.get("event") == "sentinel")
    events = [(f["event"], f["data"]) for f in frames[:end] if f.get("type") == "message"]
    del frames[: end + 1]
    return events


def labels(engine: sa.Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(sa.select(Label.text).order_by(Label.id)))


async def test_after_commit_commit_delivers_event(
    engine: sa.Engine, hooks: AfterCommit, client: Listener, sync_publisher: Publisher
) -> None:
    """A committed transaction's event reaches the client, with the flushed row's id."""
    with Session(engine) as session, session.begin():
        label = Label(biz_id="cml", text="first")
        session.add(label)
        session.flush()
        label_id = label.id
        hooks.publish(session, "cml", "label.created", {"id": label_id}, mid=f"label-{label_id}")
    assert await received(client, sync_publisher) == [("label.created", {"id": label_id})]


async def test_after_commit_rollback_delivers_nothing(
    engine: sa.Engine, hooks: AfterCommit, client: Listener, sync_publisher: Publisher
) -> None:
    """An explicit rollback drops the queued event, and the next commit does not revive it."""
    with Session(engine) as session:
        session.add(Label(biz_id="cml", text="gone"))
        session.flush()
        hooks.publish(session, "cml", "label.created", {"text": "gone"})
        session.rollback()
        session.commit()  # a later, empty commit on the same session
    assert await received(client, sync_publisher) == []
    assert labels(engine) == []


async def test_after_commit_exception_after_flush_delivers_nothing(
    engine: sa.Engine, hooks: AfterCommit, client: Listener, sync_publisher: Publisher
) -> None:
    """The row was flushed and the event queued, then the block raised: no row, no event."""
    with pytest.raises(RuntimeError, match="boom"), Session(engine) as session, session.begin():
        session.add(Label(biz_id="cml", text="half"))
        session.flush()
        hooks.publish(session, "cml", "label.created", {"text": "half"})
        raise RuntimeError("boom")
    assert await received(client, sync_publisher) == []
    assert labels(engine) == []


async def test_after_commit_failed_commit_then_retry_publishes_once(
    engine: sa.Engine, hooks: AfterCommit, client: Listener, sync_publisher: Publisher
) -> None:
    """A commit that fails (unique violation) publishes nothing; its retry publishes once."""
    with Session(engine) as session, session.begin():
        session.add(Label(biz_id="cml", text="taken"))
    with Session(engine) as session:
        for text in ("taken", "free"):  # the handler's retry loop
            try:
                session.add(Label(biz_id="cml", text=text))
                hooks.publish(session, "cml", "label.created", {"text": text})
                session.commit()
                break
            except sa.exc.IntegrityError:
                session.rollback()
        session.commit()  # committing again publishes nothing more
    assert await received(client, sync_publisher) == [("label.created", {"text": "free"})]


async def test_after_commit_savepoint_rollback_keeps_outer_events(
    engine: sa.Engine, hooks: AfterCommit, client: Listener, sync_publisher: Publisher
) -> None:
    """A rolled-back savepoint drops its own events only; a released one waits for COMMIT."""
    with Session(engine) as session, session.begin():
        hooks.publish(session, "cml", "e", "before")
        with pytest.raises(RuntimeError), session.begin_nested():
            hooks.publish(session, "cml", "e", "in rolled-back savepoint")
            raise RuntimeError
        with session.begin_nested():
            hooks.publish(session, "cml", "e", "in released savepoint")
        assert await received(client, sync_publisher) == []  # not before the real commit
        hooks.publish(session, "cml", "e", "after")
    assert await received(client, sync_publisher) == [
        ("e", "before"),
        ("e", "in released savepoint"),
        ("e", "after"),
    ]


async def test_after_commit_outer_rollback_drops_released_savepoint_events(
    engine: sa.Engine, hooks: AfterCommit, client: Listener, sync_publisher: Publisher
) -> None:
    """Events of a released savepoint die with the outer transaction's rollback."""
    with Session(engine) as session:
        with session.begin_nested():
            hooks.publish(session, "cml", "e", "nested")
        session.rollback()
    assert await received(client, sync_publisher) == []


async def test_after_commit_close_without_commit_drops_events(
    engine: sa.Engine, hooks: AfterCommit, client: Listener, sync_publisher: Publisher
) -> None:
    """close() ends the transaction unpublished; a reused session starts clean."""
    session = Session(engine)
    session.add(Label(biz_id="cml", text="closed"))
    session.flush()
    hooks.publish(session, "cml", "e", "closed")
    session.close()
    hooks.publish(session, "cml", "e", "reused")
    session.commit()
    assert await received(client, sync_publisher) == [("e", "reused")]


def test_after_commit_invalid_event_raises_inside_the_transaction(
    engine: sa.Engine, hooks: AfterCommit
) -> None:
    """Validation happens when queuing, where the transaction can still roll back."""
    with Session(engine) as session, session.begin():
        with pytest.raises(InvalidInput):
            hooks.publish(session, "not a biz id!", "e", 1)
        with pytest.raises(InvalidInput):
            hooks.publish(session, "cml", "e", {1, 2})


def test_after_commit_publish_failure_goes_to_on_error_not_to_commit(engine: sa.Engine) -> None:
    """Redis unreachable after the commit: the commit stands, on_error gets the events."""
    failures: list[tuple[Exception, list[QueuedEvent]]] = []
    with Publisher(dead_url(), retries=0) as publisher:
        hooks = AfterCommit(publisher, on_error=lambda exc, events: failures.append((exc, events)))
        with Session(engine) as session, session.begin():
            session.add(Label(biz_id="cml", text="kept"))
            hooks.publish(session, "cml", "label.created", {"text": "kept"})
    assert labels(engine) == ["kept"]
    assert [events for _, events in failures] == [
        [("cml", "label.created", {"text": "kept"}, None)]
    ]


def test_after_commit_async_publisher_needs_a_loop(engine: sa.Engine) -> None:
    """An AsyncPublisher cannot publish for a session used outside any event loop."""
    hooks = AfterCommit(AsyncPublisher(dead_url()))
    with Session(engine) as session, pytest.raises(ConfigError, match="asyncio"):
        hooks.publish(session, "cml", "e", 1)


# -- AsyncSession + AsyncPublisher -------------------------------------------------------------


@needs_async
async def test_after_commit_async_session_commit_rollback_and_order(
    db_url: str,
    engine: sa.Engine,
    client: Listener,
    sync_publisher: Publisher,
    redis_server: RedisServer,
) -> None:
    """AsyncSession: commits publish (in commit order), rollback and raise publish nothing."""
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async_url = db_url.replace("sqlite://", "sqlite+aiosqlite://", 1)
    async_engine = create_async_engine(async_url)
    async with AsyncPublisher(redis_server.url) as publisher:
        hooks = AfterCommit(publisher)
        async with AsyncSession(async_engine) as session:
            for n in range(20):
                async with session.begin():
                    session.add(Label(biz_id="cml", text=f"a{n}"))
                    await session.flush()
                    hooks.publish(session, "cml", "label.created", n)
            session.add(Label(biz_id="cml", text="rolled back"))
            hooks.publish(session, "cml", "label.created", "rolled back")
            await session.rollback()
            with pytest.raises(RuntimeError):
                async with session.begin():
                    session.add(Label(biz_id="cml", text="raised"))
                    await session.flush()
                    hooks.publish(session, "cml", "label.created", "raised")
                    raise RuntimeError
        await hooks.wait()
    await async_engine.dispose()
    assert await received(client, sync_publisher) == [("label.created", n) for n in range(20)]
    assert len(labels(engine)) == 20


# -- plain DB-API ------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite3", "psycopg"])
def dbapi_connection(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """A plain DB-API connection with a fresh ``notes`` table, and its INSERT statement."""
    if request.param == "sqlite3":
        conn: Any = sqlite3.connect(tmp_path / "plain.db")
        insert = "INSERT INTO notes (biz_id, text) VALUES (?, ?)"
    else:
        conn = psycopg.connect(str(request.getfixturevalue("pg_url")).replace("+psycopg", "", 1))
        insert = "INSERT INTO notes (biz_id, text) VALUES (%s, %s)"
    conn.execute("DROP TABLE IF EXISTS notes")
    conn.execute("CREATE TABLE notes (biz_id VARCHAR(128), text VARCHAR(200))")
    conn.commit()
    yield conn, insert
    conn.close()


async def test_dbapi_transaction_commit_publishes_and_exception_rolls_back(
    dbapi_connection: tuple[Any, str], client: Listener, sync_publisher: Publisher
) -> None:
    """DB-API helper: the committed block's events go out; a raising block's do not."""
    conn, insert = dbapi_connection
    with dbapi_transaction(conn, sync_publisher) as events:
        conn.execute(insert, ("cml", "kept"))
        events.publish("cml", "note.created", "kept")
        events.publish("cml", "note.created", "kept too")
    with pytest.raises(RuntimeError), dbapi_transaction(conn, sync_publisher) as events:
        conn.execute(insert, ("cml", "dropped"))
        events.publish("cml", "note.created", "dropped")
        raise RuntimeError
    assert await received(client, sync_publisher) == [
        ("note.created", "kept"),
        ("note.created", "kept too"),
    ]
    assert [row[0] for row in conn.execute("SELECT text FROM notes").fetchall()] == ["kept"]


def test_after_commit_dbapi_helper_works_without_sqlalchemy() -> None:
    """Without SQLAlchemy: backend_adapter and dbapi_transaction import; the outbox says why not."""
    code = """
import sys
sys.modules["sqlalchemy"] = None  # what `import sqlalchemy` sees when it is not installed
import backend_adapter
from backend_adapter import dbapi_transaction
try:
    backend_adapter.OutboxDispatcher
except ImportError as exc:
    print(exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        timeout=60_000 * MS,
    ).stdout
    assert "pip install 'relay[sql]'" in out
