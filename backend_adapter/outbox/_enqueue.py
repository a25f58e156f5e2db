"""Writing events: one INSERT in the caller's transaction (sync and asyncio)."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from backend_adapter.outbox._table import (
    OUTBOX,
)
from relay.wire import encode_payload

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from sqlalchemy.orm import Session


def new_uid() -> str:
    # 128 bits from the OS's random source: unique without coordination, also across
    # forked workers (a seeded PRNG would repeat there). 4x cheaper than uuid4().hex.
    return secrets.token_hex(16)


def _row(biz_id: str, event: str, data: Any) -> dict[str, Any]:
    # Validate now, in the caller's transaction: a row the dispatcher cannot publish
    # would hold up its BizId's later events.
    encode_payload(biz_id, event, data)
    return {
        "biz_id": biz_id,
        "event": event,
        "data": orjson.dumps(data).decode(),
        "uid": new_uid(),
    }


def _inserted_id(result: sa.Result[Any]) -> int:
    key = cast("sa.CursorResult[Any]", result).inserted_primary_key
    assert key is not None
    return int(key[0])


def enqueue(
    target: Connection | Session, biz_id: str, event: str, data: Any, *, table: sa.Table = OUTBOX
) -> int:
    """INSERT one event in ``target``'s transaction; return the row id.

    ``target`` is a Core ``Connection`` or an ORM ``Session``. Raises InvalidInput /
    PayloadTooLarge before writing anything. The event is published with
    ``mid = "outbox:<uid>"`` (a random uid written with the row) once the transaction
    commits and a dispatcher runs.
    """
    result = target.execute(table.insert().values(_row(biz_id, event, data)))
    return _inserted_id(result)


def enqueue_many(
    target: Connection | Session,
    items: Iterable[tuple[str, str, Any]],
    *,
    table: sa.Table = OUTBOX,
) -> None:
    """INSERT several ``(biz_id, event, data)`` events, in order, in one executemany."""
    rows = [_row(*item) for item in items]
    if rows:
        target.execute(table.insert(), rows)


async def enqueue_async(
    target: AsyncConnection | AsyncSession,
    biz_id: str,
    event: str,
    data: Any,
    *,
    table: sa.Table = OUTBOX,
) -> int:
    """:func:`enqueue` for an ``AsyncConnection`` or ``AsyncSession``."""
    result = await target.execute(table.insert().values(_row(biz_id, event, data)))
    return _inserted_id(result)
