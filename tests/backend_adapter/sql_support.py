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
