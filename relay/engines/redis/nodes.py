"""The Redis engine's :class:`~relay.engine.NodeRegistry`: a hash per node with a TTL
and a sorted set of all nodes; a live node reaps the session records of dead ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Final

from redis.typing import EncodableT, FieldT

from relay.engine import Control, NodeFigures, NodeInfo
from relay.engines.redis._base import RedisBase, as_float
from relay.engines.redis._subscriber import as_text, safely
from relay.errors import EngineError

__all__ = ["RedisNodeRegistry"]


_FIGURES: Final = tuple(f.name for f in dataclasses.fields(NodeFigures))


def _figures(fields: dict[str, Any]) -> NodeFigures:
    """A node hash's figures; a field missing (an older node) or unreadable keeps its default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(NodeFigures):
        raw = fields.get(f.name)
        if raw is None:
            continue
        text = as_text(raw)
        if f.type == "str":
            values[f.name] = text
            continue
        number = as_float(text)
        values[f.name] = int(number) if f.type == "int" else number
    return NodeFigures(**values)


class RedisNodeRegistry(RedisBase):
    """Node liveness and load; reaping the records of nodes silent too long."""

    async def heartbeat(self, connections: int, figures: NodeFigures | None = None) -> None:
        """Write this node's hash with a TTL of ``node_ttl`` and its score in the node set."""
        self._subscriber()
        now = time.time()
        key = self._keys.node(self._node_id)
        mapping: dict[FieldT, EncodableT] = {
            "connections": connections,
            "started_at": repr(self._started_at),
            "last_seen": repr(now),
        }
        for name in _FIGURES:  # every one, so a heartbeat without figures resets them
            value = getattr(figures or NodeFigures(), name)
            mapping[name] = repr(value) if isinstance(value, float) else value
        async with self._guard("heartbeat"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(key, mapping=mapping)
            pipe.pexpire(key, max(1, int(self.options.node_ttl * 1000)))
            pipe.zadd(self._keys.nodes(), {self._node_id: now})
            added = (await pipe.execute())[-1]
        if added and self._registered and self._handler is not None:
            # Another node took us for dead and forgot our sessions' records: our clients
            # must connect again to be found. The node closes them with 1012.
            self._log.warning("engine.reaped_while_alive")
            safely(self._log, self._handler.on_control, Control("rejoin"))
        if now - self._reaped_at > self._reap_after / 2 and (
            self._reaper is None or self._reaper.done()
        ):
            self._reaped_at = now
            self._reaper = asyncio.create_task(self._reap_dead_nodes(), name="relay-reaper")

    async def _reap_dead_nodes(self) -> None:
        """Forget the session records of nodes silent for ``reap_after``; one node each.

        Removing the dead node from the node set is the lock: whoever's ZREM succeeds
        scans the records. Only a node's death costs a scan, never a connect.
        """
        nodes_key = self._keys.nodes()
        pattern = f"{self.options.key_prefix}:{{*}}:session"
        try:
            async with self._guard("reap"):
                cutoff = time.time() - self._reap_after
                dead = [as_text(m) for m in await self._redis.zrangebyscore(nodes_key, 0, cutoff)]
            for node in dead:
                if node == self._node_id:
                    continue
                async with self._guard("reap"):
                    if await self._redis.exists(self._keys.node(node)):
                        continue
                    if not await self._redis.zrem(nodes_key, node):
                        continue  # another node is reaping it
                fixed = 0
                async for key in self._redis.scan_iter(match=pattern, count=1000):
                    async with self._guard("reap", batched=True):
                        fixed += int(
                            await self._evalsha(self._forget_script, [as_text(key)], ["node", node])
                        )
                self._log.info("engine.node_reaped", dead_node=node, records=fixed)
        except EngineError as exc:
            self._log.warning("engine.reap_failed", error=str(exc))

    async def nodes(self) -> list[NodeInfo]:
        """Live nodes, by id: members of the node set whose hash has not expired.

        Dead members stay in the set until a live node reaps their sessions.
        """
        async with self._guard("nodes"):
            members = [as_text(m) for m in await self._redis.zrange(self._keys.nodes(), 0, -1)]
            pipe = self._redis.pipeline(transaction=False)
            for member in members:
                pipe.hgetall(self._keys.node(member))
            rows = await pipe.execute()
        result = []
        for member, row in zip(members, rows, strict=True):
            if row:
                fields = {as_text(k): v for k, v in row.items()}
                result.append(
                    NodeInfo(
                        member,
                        int(as_float(fields.get("connections"))),
                        as_float(fields.get("started_at")),
                        as_float(fields.get("last_seen")),
                        _figures(fields),
                    )
                )
        return sorted(result, key=lambda n: n.node)
