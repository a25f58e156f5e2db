"""The Redis engine's :class:`~relay.engine.SessionRegistry`: one hash per client_id.

Claims, releases and acks are scripts (relay/lua/claim.lua, forget.lua, ack.lua), so the
fencing by session holds across nodes; a kick is a PUBLISH to the holder node's control
channel. The claim script publishes the kick of an earlier attempt of the same client
instance on another node itself (not on a Redis Cluster, where that channel is a shard
channel of another slot than the record).
"""

from __future__ import annotations

from typing import Any

from relay.engine import ClientStatus, Control, SessionRecord
from relay.engines.redis._base import RedisBase, as_float
from relay.engines.redis._subscriber import as_text, encode_control
from relay.wire import validate_client_id

__all__ = ["RedisSessionRegistry"]


def _session_record(client_id: str, flat: list[Any]) -> SessionRecord | None:
    if not flat:
        return None
    fields = {as_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}
    return SessionRecord(
        client_id,
        as_text(fields.get("node")),
        as_text(fields.get("session")),
        as_text(fields.get("since")) or None,
        as_float(fields.get("connected_at")),
        as_text(fields.get("attempt")) or None,
    )


class RedisSessionRegistry(RedisBase):
    """Who holds each client_id, fenced by session; kicks through the control channel."""

    @property
    def kicks_in_claim(self) -> bool:
        return not self._cluster

    async def claim_session(
        self, record: SessionRecord, *, exclusive: bool = True, kick: Control | None = None
    ) -> SessionRecord | None:
        validate_client_id(record.client_id)
        args = [
            record.node,
            record.session,
            record.since or "",
            repr(record.connected_at),
            "1" if exclusive else "0",
            record.attempt or "",
        ]
        if kick is not None and exclusive and record.attempt and not self._cluster:
            args += [self._keys.control(""), record.client_id, str(kick.code), kick.reason]
        else:
            args.append("")
        async with self._guard("claim_session", batched=True):
            flat = await self._evalsha(
                self._claim_script, [self._keys.session(record.client_id)], args
            )
        return _session_record(record.client_id, flat)

    async def release_session(
        self, client_id: str, session: str, *, restore: SessionRecord | None = None
    ) -> bool:
        validate_client_id(client_id)
        args = ["session", session]
        if restore is not None:
            args += [
                restore.node,
                restore.session,
                restore.since or "",
                repr(restore.connected_at),
                restore.attempt or "",
            ]
        async with self._guard("release_session", batched=True):
            removed = await self._evalsha(
                self._forget_script, [self._keys.session(client_id)], args
            )
        return bool(removed)

    async def record_ack(self, client_id: str, session: str, message_id: str) -> None:
        validate_client_id(client_id)
        async with self._guard("record_ack", batched=True):
            await self._evalsha(
                self._ack_script, [self._keys.session(client_id)], [session, message_id]
            )

    async def client_status(self, client_id: str) -> ClientStatus:
        """Online only if a record exists and its node is alive; the record is shown anyway."""
        validate_client_id(client_id)
        async with self._guard("client_status"):
            record = await self._redis.hgetall(self._keys.session(client_id))
            if not record:
                return ClientStatus(client_id, False, None, None, None, None)
            fields = {as_text(k): as_text(v) for k, v in record.items()}
            node = fields.get("node", "")
            alive = bool(node) and bool(await self._redis.exists(self._keys.node(node)))
        return ClientStatus(
            client_id,
            alive,
            node or None,
            fields.get("session") or None,
            fields.get("since") or None,
            fields.get("last_ack") or None,
        )

    async def send_control(self, node_id: str, control: Control) -> None:
        # Batched: a reconnect herd from a dead node sends one kick per client at once,
        # which one by one would exhaust the connection pool.
        async with self._guard("send_control", batched=True):
            await self._batch.call(
                self._publish_command, self._keys.control(node_id), encode_control(control)
            )
