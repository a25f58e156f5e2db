"""The only place the Redis engine uses redis-py's private (underscore) names.

redis-py is allowed from 8.2 to 8.x (pyproject.toml); what is not public API there is
wrapped here, each with a fallback or a test in tests/engines/test_redis_engine.py
(``test_compat_*``) that fails when an upgrade moves it:

- the asyncio hiredis parser class (``redis._parsers._AsyncHiredisParser``), so the pool
  parses with hiredis, and its ``parse_error``, so the pub/sub reader's own hiredis Reader
  makes the same exceptions of error replies (MovedError, AskError, ...);
- the transport under a connected connection (``conn._writer.transport``), which the
  pub/sub reader reads itself and writes its (UN)SUBSCRIBEs to;
- hiredis' ``pack_command``, which packs in C what redis-py's async packer does in Python;
- the asyncio StreamReader of a connection (``conn._reader``), to tell without a read
  whether the server hung up on a connection the batcher kept;
- a connection's write without its timer (``conn._send_packed_command``), for the
  batcher, which bounds each round trip as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import InvalidResponse
from redis.utils import HIREDIS_AVAILABLE

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None = None
with contextlib.suppress(ImportError):  # a dependency (redis[hiredis]); redis-py works without
    from hiredis import pack_command as _hiredis_pack

__all__ = [
    "hiredis_parser",
    "pack_commands",
    "reply_reader",
    "send_packed",
    "still_open",
    "transport_of",
]


def hiredis_parser() -> dict[str, Any]:
    """Connection-pool keyword arguments that make redis-py parse with hiredis, if it can."""
    if not HIREDIS_AVAILABLE:
        return {}
    from redis._parsers import _AsyncHiredisParser

    return {"parser_class": _AsyncHiredisParser}


def reply_reader(nothing: object) -> Any:
    """A hiredis Reader that parses as redis-py's asyncio hiredis parser does, or None
    without hiredis.

    Replies are bytes; an error reply is an instance of the exception redis-py would
    raise for it (``parse_error``: MovedError, AskError, ... or ResponseError); a
    protocol error raises InvalidResponse; ``gets()`` returns ``nothing`` when no whole
    reply is buffered.
    """
    if not HIREDIS_AVAILABLE:
        return None
    import hiredis
    from redis._parsers import _AsyncHiredisParser

    return hiredis.Reader(
        protocolError=InvalidResponse,
        replyError=_AsyncHiredisParser.parse_error,
        notEnoughData=nothing,
    )


def transport_of(conn: AbstractConnection) -> asyncio.Transport | None:
    """The transport of a connected ``conn`` (redis-py's StreamWriter's), or None."""
    transport = getattr(getattr(conn, "_writer", None), "transport", None)
    return transport if callable(getattr(transport, "set_protocol", None)) else None


def pack_commands(conn: AbstractConnection, commands: list[tuple[Any, ...]]) -> list[bytes]:
    """Commands in RESP for ``conn``: hiredis packs in C what redis-py's async packer
    does in Python.

    Same bytes for str, bytes, int and float arguments; anything else goes to redis-py's
    packer for its DataError. Command names are single words (redis-py would split
    ``"CONFIG GET"``).
    """
    if _hiredis_pack is not None:
        try:
            return [_hiredis_pack(args) for args in commands]
        except TypeError:
            pass
    return conn.pack_commands(commands)


def still_open(conn: AbstractConnection) -> bool:
    """Connected, and no hang-up seen on it so far.

    What redis-py's pool checks with a read before handing a connection out, from the
    state the event loop already has (no read): a connection the server closed while it
    sat unused reads as not open once the loop has taken in the close.
    """
    reader = getattr(conn, "_reader", None)
    if not conn.is_connected or not isinstance(reader, asyncio.StreamReader):
        return False
    return not reader.at_eof() and reader.exception() is None


async def send_packed(conn: AbstractConnection, packed: list[bytes]) -> None:
    """Write packed commands on a connected ``conn`` without a timer of its own.

    ``send_packed_command`` wraps the write in ``asyncio.wait_for`` when the connection
    has a socket timeout: a task and a timer per write, about 2 % of a node's CPU per
    connect (py-spy). The caller bounds the time instead, and disconnects on any error.
    """
    write = getattr(conn, "_send_packed_command", None)
    if write is None:
        await conn.send_packed_command(packed, check_health=False)
    else:
        await write(packed)
