"""The outbox table: its definition, creation, and the check that it is up to date."""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from relay.errors import ConfigError


def define_outbox_table(
    metadata: sa.MetaData, name: str = "relay_outbox", *, schema: str | None = None
) -> sa.Table:
    """Add an outbox table to ``metadata`` (for your own Alembic metadata, say).

    ``data`` holds the event's data as JSON text, so a backend in another language can
    INSERT rows too. ``uid`` (32 hex digits, random) makes the row's ``mid`` unique
    across databases; a row written without one gets it from the dispatcher. The
    partial indexes cover only pending rows: the claim and the per-BizId order check
    stay fast however many published rows are kept.
    """
    pending = sa.text("published_at IS NULL")
    published = sa.text("published_at IS NOT NULL")
    return sa.Table(
        name,
        metadata,
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("biz_id", sa.String(128), nullable=False),
        sa.Column("event", sa.String(128), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.current_timestamp(),
        ),
        sa.Column("published_at", sa.DateTime(timezone=True)),
        sa.Column("stream_id", sa.String(41)),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text()),
        # Last, so that a table upgraded with ALTER TABLE ADD COLUMN has the same shape.
        # Nullable: a row INSERTed without one gets it from the dispatcher.
        sa.Column("uid", sa.String(32)),
        sa.Index(f"{name}_pending", "id", postgresql_where=pending, sqlite_where=pending),
        sa.Index(
            f"{name}_pending_biz", "biz_id", "id", postgresql_where=pending, sqlite_where=pending
        ),
        sa.Index(
            f"{name}_published",
            "published_at",
            postgresql_where=published,
            sqlite_where=published,
        ),
        # Ids increase for good, as on PostgreSQL: a row id names one event in logs and
        # lookups even after the newest rows were purged.
        sqlite_autoincrement=True,
        schema=schema,
    )


METADATA: Final = sa.MetaData()
OUTBOX: Final = define_outbox_table(METADATA)
"""The default ``relay_outbox`` table."""


def create_outbox_table(engine: Engine, table: sa.Table = OUTBOX) -> None:
    """CREATE the outbox table and its indexes if they do not exist; upgrade an old one.

    A table made before rows had a ``uid`` gets the column (``ALTER TABLE ... ADD
    COLUMN uid VARCHAR(32)``, nullable, so no rewrite); the dispatcher gives its pending
    rows one. Safe to call on every start, from several processes.
    """
    with engine.begin() as conn:
        table.create(conn, checkfirst=True)
    for column in _missing_columns(engine, table):
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(_add_column(engine, table, column))
        except sa.exc.DBAPIError:
            if column in _missing_columns(engine, table):
                raise
            # Another process added it in the meantime.


def _missing_columns(engine: Engine, table: sa.Table) -> list[sa.Column[Any]]:
    """Columns of ``table`` that the database's table lacks (added by later versions)."""
    have = {c["name"] for c in sa.inspect(engine).get_columns(table.name, schema=table.schema)}
    return [c for c in table.columns if c.name not in have]


def _add_column(engine: Engine, table: sa.Table, column: sa.Column[Any]) -> str:
    name = engine.dialect.identifier_preparer.format_table(table)
    return f"ALTER TABLE {name} ADD COLUMN {column.name} {column.type.compile(engine.dialect)}"


def check_table(engine: Engine, table: sa.Table) -> None:
    """Raise ConfigError, saying what to run, if the table is missing or older than us."""
    if not sa.inspect(engine).has_table(table.name, schema=table.schema):
        raise ConfigError(
            f"outbox table {table.name!r} does not exist: create it with "
            "create_outbox_table(engine), `relay outbox-dispatch --create-table`, or the SQL "
            "in docs/backend.md"
        )
    missing = _missing_columns(engine, table)
    if missing:
        raise ConfigError(
            f"outbox table {table.name!r} lacks column(s) "
            f"{', '.join(c.name for c in missing)} (it was made by an older version): "
            "upgrade it with create_outbox_table(engine), `relay outbox-dispatch "
            "--create-table`, or "
            + "; ".join(_add_column(engine, table, column) for column in missing)
        )
