"""The Redis engine's :class:`~relay.engine.Broker`: publish, history, live subscriptions.

A publish is one script (relay/lua/publish.lua): append to the BizId's Stream, trim,
expire, PUBLISH. A history read carries the dataset's epoch in the same round trip.
Subscriptions are forwarded to the node's one pub/sub connection (``_subscriber``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors

from relay.engines.redis._base import RedisBase
from relay.errors import InvalidInput
from relay.wire import (
    History,
    PublishResult,
    StreamId,
    decode_payload,
    encode_payload,
    format_id,
    parse_history_reply,
    parse_id,
    parse_publish_reply,
    publish_call,
    publish_run_call,
    validate_client_id,
)

__all__ = ["RedisBroker"]


def _parse_history(reply: list[Any], epoch_ms: int, skipped: list[str]) -> History:
    """Like :func:`relay.wire.parse_history_reply`, but junk entries are left out.

    The reason for each skipped entry is appended to ``skipped``. A first entry whose
    ``prev`` is unreadable is kept as a bound but can no longer prove a recovery.
    """
    try:
        return parse_history_reply(reply, epoch_ms)
    except InvalidInput:
        pass
    head = list(reply[:5])
    try:
        parse_id(head[2])
    except InvalidInput:
        skipped.append("first entry has a malformed prev")
        head[2] = head[1]
    rest = reply[5:]
    kept: list[Any] = []
    for i in range(0, len(rest) - 2, 3):
        triple = rest[i : i + 3]
        try:
            decode_payload(*triple)
        except InvalidInput as exc:
            skipped.append(str(exc))
            continue
        kept.extend(triple)
    return parse_history_reply(head + kept, epoch_ms)


class RedisBroker(RedisBase):
    """Publish, history and live subscriptions on Redis Streams and pub/sub."""

    async def publish(
        self, biz_id: str, event: str, data: Any, *, mid: str | None = None
    ) -> PublishResult:
        opts = self.options
        payload = encode_payload(biz_id, event, data, mid=mid, max_size=opts.max_payload)
        keys, args = publish_call(
            self._keys,
            biz_id,
            payload,
            mid=mid,
            history_size=opts.history_size,
            history_ttl=opts.history_ttl,
            dedupe_window=opts.dedupe_window,
        )
        async with self._guard("publish", batched=True):
            reply = await self._evalsha(self._publish_script, keys, args, replicated=True)
        return parse_publish_reply(reply)

    async def publish_run(
        self, biz_id: str, events: Sequence[tuple[str, Any, str | None]]
    ) -> list[PublishResult]:
        """One EVALSHA of publish_run.lua: ~3.4 µs of Redis per event instead of ~8."""
        opts = self.options
        encoded = [
            (encode_payload(biz_id, event, data, mid=mid, max_size=opts.max_payload), mid)
            for event, data, mid in events
        ]
        if not encoded:
            return []
        keys, args = publish_run_call(
            self._keys,
            biz_id,
            encoded,
            history_size=opts.history_size,
            history_ttl=opts.history_ttl,
            dedupe_window=opts.dedupe_window,
        )
        async with self._guard("publish", batched=True):
            reply = await self._evalsha(self._publish_run_script, keys, args, replicated=True)
        return [parse_publish_reply(one) for one in reply]

    async def history(self, biz_id: str, since: StreamId | None, limit: int) -> History:
        """Read history with the dataset's epoch; an entry that is not an envelope is skipped."""
        validate_client_id(biz_id)
        args: list[str | int] = ["" if since is None else format_id(since), limit]
        async with self._guard("history", batched=True):
            epoch, reply = await self._history_and_epoch(self._keys.log(biz_id), args)
        skipped: list[str] = []
        result = _parse_history(reply, int(epoch), skipped)
        for reason in skipped:
            self._log.warning("engine.bad_message", source="history", biz_id=biz_id, reason=reason)
        return result

    async def _history_and_epoch(self, log_key: str, args: list[str | int]) -> list[Any]:
        """The epoch and the history script, sent together: one round trip."""
        epoch, history = self._epoch_script, self._history_script
        try:
            return await self._batch.call_many(
                ("EVALSHA", epoch.sha, 1, self._epoch_key),
                ("EVALSHA", history.sha, 1, log_key, *args),
            )
        except redis_errors.NoScriptError:
            pass
        # Scripts flushed (a restart, SCRIPT FLUSH): the batcher bounds only its own round
        # trips, so the reload and the retry get a bound of their own.
        async with asyncio.timeout(self._command_timeout):
            for script in (epoch, history):
                script.sha = await self._redis.script_load(script.script)
            return await self._batch.call_many(
                ("EVALSHA", epoch.sha, 1, self._epoch_key),
                ("EVALSHA", history.sha, 1, log_key, *args),
            )

    async def subscribe(self, biz_id: str) -> None:
        """Subscribe; returns when Redis confirmed it, EngineUnavailable if it did not in time.

        An :meth:`unsubscribe` of the same BizId while this waits makes it return at once.
        """
        validate_client_id(biz_id)
        await self._subscriber().subscribe(self._keys.channel(biz_id).encode(), biz_id)

    async def unsubscribe(self, biz_id: str) -> None:
        await self._subscriber().unsubscribe(self._keys.channel(biz_id).encode())
