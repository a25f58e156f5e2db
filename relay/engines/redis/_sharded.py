"""Live delivery on a Redis Cluster: sharded pub/sub, one reader per shard master.

A publish on a cluster ends in ``SPUBLISH`` (``wire.PUBLISH_CLUSTER_LUA``), which goes
only to the subscribers on the master of the channel's slot and counts them, so
``receivers`` and ``online`` are right. So the node reads with one connection per master
(:class:`ShardReader`, the single-server :class:`~relay.engines.redis._subscriber.Subscriber`
speaking ``SSUBSCRIBE``), each subscribed to the wanted channels whose slots that master
serves, and :class:`ShardedSubscriber` keeps them where the slot map says:

- A channel's slot moved away: Redis 7 pushes ``sunsubscribe`` for it, or refuses a
  (re)subscribe with ``-MOVED``. The reader drops the channel and the slot map is read
  again; the channel is subscribed on its new master.
- A master died: its reader's connection is lost. The slot map is read again every
  backoff step (50 to 250 ms) until another master (the promoted replica) serves its
  slots; that master gets a reader, the old one is closed, and its channels move over.
- After every such move, once the new subscriptions are confirmed, the node is told
  ``on_resubscribed(biz_ids)`` for the BizIds moved and repairs their gaps from
  history, as after a reconnect (a reader that reconnects to its own master names its
  BizIds the same way).

Each reader runs its own canary on a channel of its own that hashes to its master, so a
deaf shard is detected; the engine is ready while every master's reader is. The node's
control channel (kicks) is subscribed like any BizId's, on the master of its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from typing import Any, Final

from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.crc import key_slot

from relay.backoff import Backoff, Jitter
from relay.backoff import Retry as Retrying
from relay.engine import Control, EngineHandler
from relay.engines.redis._subscriber import (
    _SUBSCRIBE,
    Subscriber,
    Timings,
    _Session,
    safely,
    stop_task,
)
from relay.errors import EngineError, EngineUnavailable
from relay.wire import Event

__all__ = ["ShardReader", "ShardedSubscriber", "canary_channel"]

# While a reader is down the slot map is read again at least this often (seconds): a
# promoted replica is noticed that long after the cluster promoted it, at the cost of one
# CLUSTER SLOTS per step.
_FOLLOW_CAP: Final = 0.25


def canary_channel(control: str, owned: Collection[int]) -> str | None:
    """The first ``<control>:shard:<n>`` whose hash slot is one of ``owned``; None if there
    are none. About 16384 / len(owned) tries: a millisecond for a master of one slot."""
    if not owned:
        return None
    for n in range(1 << 20):
        channel = f"{control}:shard:{n}"
        if key_slot(channel.encode()) in owned:
            return channel
    return None  # never seen: 2**20 names missing every owned slot


class _Moved(EngineError):
    """The channel's slot is served by another master now."""


class NodeTarget:
    """What a reader needs of a pool: the connection class and one node's arguments."""

    connection_class = Connection

    def __init__(self, kwargs: dict[str, Any], host: str, port: int) -> None:
        self.connection_kwargs = {**kwargs, "host": host, "port": port}


class _Relay:
    """A reader's handler: events and controls go up as they are, health to the owner, and
    a resubscribe names the BizIds of that reader only (the other masters lost nothing)."""

    def __init__(self, owner: ShardedSubscriber) -> None:
        self._owner = owner
        self._handler = owner.handler
        self.reader: ShardReader | None = None

    def on_event(self, event: Event) -> None:
        self._handler.on_event(event)

    def on_control(self, control: Control) -> None:
        self._handler.on_control(control)

    def on_resubscribed(self, biz_ids: Collection[str] | None = None) -> None:
        if biz_ids is None and self.reader is not None:
            biz_ids = [biz_id for biz_id in self.reader.channels.values() if biz_id]
        self._handler.on_resubscribed(biz_ids)

    def on_health(self, healthy: bool) -> None:
        self._owner.health_changed()


class ShardReader(Subscriber):
    """One master's reader: SSUBSCRIBE, one command per slot; a channel whose slot moved
    away is handed back to the :class:`ShardedSubscriber`."""

    _SUBSCRIBE_COMMAND = b"SSUBSCRIBE"
    _UNSUBSCRIBE_COMMAND = b"SUNSUBSCRIBE"
    _SUBSCRIBED = b"ssubscribe"
    _UNSUBSCRIBED = b"sunsubscribe"
    _MESSAGE_KIND = b"smessage"

    def __init__(
        self, owner: ShardedSubscriber, name: str, canary: str, target: NodeTarget
    ) -> None:
        relay = _Relay(owner)
        super().__init__(
            target,  # type: ignore[arg-type]  # a pool as far as the reader is concerned
            owner.cluster,  # type: ignore[arg-type]  # for spublish only
            relay,
            canary,
            owner.client_name,
            owner.timings,
            owner.log.bind(shard=name),
        )
        self.name = name
        self._owner = owner
        relay.reader = self

    def launch(self) -> None:
        """Connect and run the canary; ready once the first canary comes back."""
        self._task = asyncio.create_task(self._run(), name=f"relay-redis-shard:{self.name}")
        self.start_canary()

    @property
    def channels(self) -> dict[bytes, str]:
        return self._channels

    @property
    def canary(self) -> bytes:
        return self._control_channel

    def _commands(self, kind: bytes, channels: list[bytes]) -> list[list[bytes]]:
        # Every channel of one SSUBSCRIBE must hash to one slot (CROSSSLOT otherwise).
        name = self._SUBSCRIBE_COMMAND if kind == _SUBSCRIBE else self._UNSUBSCRIBE_COMMAND
        by_slot: dict[int, list[bytes]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel), []).append(channel)
        return [[name, *group] for group in by_slot.values()]

    async def _publish(self, channel: str, data: bytes) -> None:
        await self._owner.cluster.spublish(channel, data)

    def _on_error_reply(self, session: _Session, error: redis_errors.ResponseError) -> None:
        if not isinstance(error, redis_errors.AskError):  # MovedError is an AskError
            # CLUSTERDOWN, TRYAGAIN, ...: no slot to tell which command it answers, so this
            # connection is out of step; the reader connects again and resubscribes.
            self._owner.topology_changed()
            raise error
        # Every command of this slot on this connection is refused the same way, so all
        # of them are settled at the first refusal: a subscribe is dropped (the owner moves
        # the channel), an unsubscribe has nothing left to end here.
        slot = error.slot_id
        pending = [channel for channel in session.ops if key_slot(channel) == slot]
        refused = [channel for channel in pending if _SUBSCRIBE in session.ops[channel]]
        for channel in pending:
            if channel in refused:
                self._drop(session, channel)
            else:
                del session.ops[channel]
        self._log.info("engine.slot_moved", slot=slot, channels=len(refused), reply="moved")
        self._owner.topology_changed()

    def _on_dropped(self, session: _Session, channel: bytes) -> None:
        self._drop(session, channel)
        # Debug: a reshard ends one subscription per channel; the owner logs each move once.
        self._log.debug("engine.slot_moved", slot=key_slot(channel), reply="sunsubscribe")
        self._owner.topology_changed()

    def _drop(self, session: _Session, channel: bytes) -> None:
        """Forget ``channel`` here: its slot is served elsewhere; the owner moves it."""
        session.sent.discard(channel)
        session.ops.pop(channel, None)
        if channel == self._control_channel:
            self._owner.canary_lost(self)
            return
        self._channels.pop(channel, None)
        for waiter in self._waiters.pop(channel, ()):
            if not waiter.done():
                waiter.set_exception(_Moved("slot moved"))
        self._owner.dropped(self, channel)
        if channel in session.awaiting:
            session.awaiting.discard(channel)
            if not session.awaiting:
                self._session_live(session)

    def _on_disconnected(self) -> None:
        self._owner.topology_changed()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def live(self) -> bool:
        return self._session is not None and self._session.live


class ShardedSubscriber:
    """The Subscriber's interface on a Redis Cluster: one :class:`ShardReader` per master."""

    def __init__(
        self,
        cluster: RedisCluster,
        connection: dict[str, Any],
        handler: EngineHandler,
        control_channel: str,
        client_name: str,
        timings: Timings,
        log: Any,
    ) -> None:
        self.cluster = cluster
        self.handler = handler
        self.client_name = client_name
        self.timings = timings
        self.log = log
        self._connection = connection
        self._control = control_channel
        self._channels: dict[bytes, str] = {}  # wanted: BizId channels, and "" for control
        self._home: dict[bytes, ShardReader] = {}  # the reader each channel was given to
        self._readers: dict[str, ShardReader] = {}  # by master "host:port"
        self._retired: set[asyncio.Task[None]] = set()  # readers being closed
        self._changed = asyncio.Event()
        self._settled = asyncio.Event()  # set after each pass over the slot map
        self._task: asyncio.Task[None] | None = None
        self._reported: bool | None = None  # the health last told to the handler
        self._closed = False

    @property
    def ready(self) -> bool:
        readers = self._readers.values()
        return not self._closed and bool(readers) and all(r.ready for r in readers)

    async def start(self) -> None:
        """Read the slot map, start a reader per master and subscribe the control channel;
        return once every reader's canary came back, or raise EngineUnavailable."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timings.subscribe_timeout
        try:
            async with asyncio.timeout(self.timings.subscribe_timeout):
                await self.cluster.initialize()
        except (TimeoutError, redis_errors.RedisError, OSError) as exc:
            raise EngineUnavailable(f"redis cluster unreachable ({type(exc).__name__})") from None
        self._place_readers()
        self._task = asyncio.create_task(self._follow(), name="relay-redis-topology")
        await self.subscribe(self._control.encode(), "")
        while not self.ready:
            if loop.time() > deadline:
                raise EngineUnavailable("redis did not return every shard's canary in time")
            await asyncio.sleep(0.01)
        self._reported = True

    def start_canary(self) -> None:
        """Nothing to do: each reader runs its own canary from the start."""

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            await stop_task(self._task)
        for reader in list(self._readers.values()):
            await reader.close()
        self._readers.clear()
        if self._retired:
            await asyncio.wait(self._retired)

    async def subscribe(self, channel: bytes, biz_id: str) -> None:
        """Subscribe on the master of the channel's slot, following the slot if it moves
        meanwhile; EngineUnavailable if Redis does not confirm in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timings.subscribe_timeout
        self._channels[channel] = biz_id
        while True:
            reader = self._reader_for(channel)
            if reader is not None:
                old = self._home.get(channel)
                self._home[channel] = reader
                if old is not None and old is not reader:
                    await old.unsubscribe(channel)
                try:
                    await reader.subscribe(channel, biz_id)
                except _Moved:
                    pass  # read the slot map again, then subscribe where it says
                except EngineError:
                    if self._closed or not reader.closed:
                        if self._home.get(channel) is reader:
                            del self._home[channel]
                        self._channels.pop(channel, None)
                        raise
                if channel not in self._channels:
                    return  # unsubscribed meanwhile
                if (
                    self._home.get(channel) is reader
                    and channel in reader.channels
                    and not reader.closed
                ):
                    return
            if loop.time() > deadline:
                self._channels.pop(channel, None)
                raise EngineUnavailable("no master confirmed the subscription in time")
            self._settled.clear()
            self._changed.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await self._settled.wait()

    async def unsubscribe(self, channel: bytes) -> None:
        if self._channels.pop(channel, None) is None:
            return
        reader = self._home.pop(channel, None)
        if reader is not None:
            await reader.unsubscribe(channel)

    # -- what the readers report ------------------------------------------------------

    def topology_changed(self) -> None:
        """A reader saw the slot map change (MOVED, sunsubscribe, a lost connection)."""
        self._changed.set()

    def dropped(self, reader: ShardReader, channel: bytes) -> None:
        if self._home.get(channel) is reader:
            del self._home[channel]
        self._changed.set()

    def canary_lost(self, reader: ShardReader) -> None:
        """The reader's canary channel moved away: a new reader takes over its master."""
        if self._readers.get(reader.name) is reader:
            self._retire(reader)
        self._changed.set()

    def health_changed(self) -> None:
        if self._reported is None or self._closed:
            return  # start() waits for every reader itself
        healthy = self.ready
        if healthy != self._reported:
            self._reported = healthy
            safely(self.log, self.handler.on_health, healthy)

    # -- following the slot map -------------------------------------------------------

    def _reader_for(self, channel: bytes) -> ShardReader | None:
        """The reader of the master serving the channel's slot, by the slot map as read."""
        try:
            node = self.cluster.nodes_manager.get_node_from_slot(key_slot(channel))
        except (redis_errors.RedisError, IndexError, KeyError):
            return None
        return self._readers.get(node.name)

    def _retire(self, reader: ShardReader) -> None:
        """Close ``reader``; its channels are placed again by the next pass."""
        del self._readers[reader.name]
        for channel, home in list(self._home.items()):
            if home is reader:
                del self._home[channel]
        task = asyncio.get_running_loop().create_task(reader.close())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
        self.log.info("engine.shard_closed", shard=reader.name)

    def _place_readers(self) -> None:
        """A reader for every master of the slot map, none for anything else."""
        masters = {node.name: node for node in self.cluster.get_primaries()}
        for name, reader in list(self._readers.items()):
            if name not in masters:
                self._retire(reader)
        for name, node in masters.items():
            if name in self._readers:
                continue
            canary = self._canary_channel(name)
            if canary is None:
                continue  # a master without slots
            target = NodeTarget(self._connection, node.host, int(node.port))
            reader = self._readers[name] = ShardReader(self, name, canary, target)
            reader.launch()
            self.log.info("engine.shard_opened", shard=name)
        self.health_changed()

    def _canary_channel(self, name: str) -> str | None:
        """A channel of this node's whose slot the master ``name`` serves."""
        slots = self.cluster.nodes_manager.slots_cache
        owned = {slot for slot, nodes in slots.items() if nodes and nodes[0].name == name}
        return canary_channel(self._control, owned)

    async def _follow(self) -> None:
        """After every reported change, and every backoff step while a reader is down or
        a channel could not be placed: read the slot map, then put readers and channels
        where it says."""
        timings = self.timings
        retry = Retrying(
            Backoff(timings.backoff_base, min(timings.backoff_cap, _FOLLOW_CAP), Jitter.HALF)
        )
        delay = 0.0
        while True:
            if delay:
                await asyncio.sleep(delay)
            else:
                await self._changed.wait()
            self._changed.clear()
            moved: int | None = None
            try:
                async with asyncio.timeout(timings.socket_timeout * 2):
                    await self.cluster.nodes_manager.initialize()
            except (TimeoutError, redis_errors.RedisError, OSError, IndexError) as exc:
                self.log.debug("engine.slots_unread", error=type(exc).__name__)
            else:
                try:
                    self._place_readers()
                    moved = await self._rehome()
                except Exception:  # a bug here must not stop the following for good
                    self.log.exception("engine.topology_failed")
            self._settled.set()
            if not all(r.live for r in self._readers.values()):
                delay = retry.failed() or timings.backoff_cap  # a master is down
            elif moved != 0:
                # Channels moved (look once more) or could not be placed: the nodes that
                # answer CLUSTER SLOTS learn of a slot's move one after the other.
                retry.succeeded()
                delay = timings.backoff_base
            else:
                retry.succeeded()
                delay = 0.0

    async def _rehome(self) -> int | None:
        """Subscribe each wanted channel on the master of its slot; once every move is
        confirmed, the node repairs gaps. How many moved; None if some could not."""
        moves: list[tuple[bytes, str, ShardReader]] = []
        unplaced = 0
        for channel, biz_id in list(self._channels.items()):
            reader = self._reader_for(channel)
            if reader is None:
                unplaced += 1
                continue
            old = self._home.get(channel)
            self._home[channel] = reader
            if channel in reader.channels:
                continue
            if old is not None and old is not reader:
                await old.unsubscribe(channel)
            moves.append((channel, biz_id, reader))
        if moves:
            outcomes = await asyncio.gather(
                *(reader.subscribe(channel, biz_id) for channel, biz_id, reader in moves),
                return_exceptions=True,
            )
            failed = sum(isinstance(outcome, BaseException) for outcome in outcomes)
            self.log.info("engine.resubscribed", reason="slots_moved", channels=len(moves) - failed)
            # What was published while a channel moved is in history: the node repairs
            # those BizIds (control channels have no history).
            moved = [biz_id for _, biz_id, _ in moves if biz_id]
            if moved:
                safely(self.log, self.handler.on_resubscribed, moved)
            unplaced += failed
        return None if unplaced else len(moves)
