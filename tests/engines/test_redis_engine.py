"""What only the Redis engine does: junk on the wire, outages, hung servers, one connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

import pytest
from redis.asyncio.connection import Connection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.utils import HIREDIS_AVAILABLE
from structlog.testing import capture_logs

from relay.engine import Control, EngineOptions, SessionRecord
from relay.engines.redis import RedisEngine, decode_control, encode_control
from relay.engines.redis._compat import (
    hiredis_parser,
    pack_commands,
    send_packed,
    still_open,
    transport_of,
)
from relay.engines.redis._subscriber import _Feed
from relay.errors import EngineUnavailable, InvalidEnvelope
from relay.wire import ID_ZERO, Event, encode_live, encode_payload, parse_id, prove_recovery
from tests.conftest import MS
from tests.engines.conftest import REDIS_KINDS, RecordingHandler, StartEngine
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.timing import eventually

BOTH = pytest.mark.parametrize("start_engine", REDIS_KINDS, indirect=True)
# The registry on a Redis Cluster too: its keys live in many slots, the reaper scans every
# master (redis-py's cluster SCAN goes to each primary).
ALL = pytest.mark.parametrize(
    "start_engine",
    [*REDIS_KINDS, pytest.param("cluster", marks=pytest.mark.redis)],
    indirect=True,
)
REAL = pytest.mark.parametrize(
    "start_engine", [pytest.param("redis", marks=pytest.mark.redis)], indirect=True
)
FAST: dict[str, Any] = {
    "canary_interval": 0.2,
    "canary_deadline": 0.8,
    "socket_timeout": 0.5,
    "backoff_cap": 0.5,
    "subscribe_timeout": 2.0,
}
TTL_MS = EngineOptions().history_ttl * 1000


def events_named(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def test_control_encoding_round_trips() -> None:
    """Controls survive encode/decode; defaults fill gaps; junk raises InvalidEnvelope."""
    kick = Control("kick", client_id="c", session="s", code=4000, reason="newer", token="")
    assert decode_control(encode_control(kick)) == kick
    assert decode_control(b'{"action": "canary", "extra": 1}') == Control("canary")
    junk = [b"", b"nope", b"[]", b'{"action": 1}', b'{"action": "k", "code": "x"}']
    for data in [*junk, b'{"action": "k", "code": true}', b'{"action": "k", "session": 5}']:
        with pytest.raises(InvalidEnvelope):
            decode_control(data)


# -- junk from other publishers -----------------------------------------------------------


@BOTH
async def test_reader_skips_garbage_and_keeps_delivering(start_engine: StartEngine) -> None:
    """Garbage on a subscribed channel is logged without its bytes and skipped."""
    h = await start_engine()
    assert h.raw is not None
    await h.engine.subscribe("junk")
    foreign = encode_live("1-0", "0-0", encode_payload("someone-else", "e", None))
    with capture_logs() as logs:
        for data in (b"garbage-bytes", b"1-0 0-0 \xc1\xc1", foreign):
            await h.raw.publish(h.keys.channel("junk"), data)
        good = await h.engine.publish("junk", "e", {"ok": True})
        await h.handler.wait_until(lambda: bool(h.handler.events))
    assert [e.id for e in h.handler.events] == [good.id]
    bad = events_named(logs, "engine.bad_message")
    assert len(bad) == 3
    assert all(entry["size"] > 0 for entry in bad)
    assert "garbage-bytes" not in repr(bad)


@BOTH
async def test_reader_junk_flood_logs_at_most_ten_lines_a_second(
    start_engine: StartEngine,
) -> None:
    """A flood of junk is counted, not echoed line by line; delivery goes on."""
    h = await start_engine()
    assert h.raw is not None
    await h.engine.subscribe("flood")
    with capture_logs() as logs:
        for _ in range(500):
            await h.raw.publish(h.keys.channel("flood"), b"junk")
        good = await h.engine.publish("flood", "e", {"ok": True})
        await h.handler.wait_until(lambda: bool(h.handler.events))
    assert [e.id for e in h.handler.events] == [good.id]
    assert len(events_named(logs, "engine.bad_message")) <= 20


@BOTH
async def test_reader_skips_bad_control_message(start_engine: StartEngine) -> None:
    """A malformed control message is logged and skipped; the next one arrives."""
    h = await start_engine()
    assert h.raw is not None
    kick = Control("kick", client_id="c", session="s")
    with capture_logs() as logs:
        await h.raw.publish(h.keys.control(h.node_id), b"\x00not json")
        await h.engine.send_control(h.node_id, kick)
        await h.handler.wait_until(lambda: bool(h.handler.controls))
    assert h.handler.controls == [kick]
    assert len(events_named(logs, "engine.bad_message")) == 1


@BOTH
async def test_history_skips_junk_entries(start_engine: StartEngine) -> None:
    """Entries that are not envelopes are left out of history and logged."""
    h = await start_engine()
    assert h.raw is not None
    log = h.keys.log("mixed")
    first = (await h.engine.publish("mixed", "e", 1)).id
    await h.raw.xadd(log, {"p": b"junk", "prev": first})
    await h.raw.xadd(log, {"p": b"junk", "prev": b"not-an-id"})
    last = (await h.engine.publish("mixed", "e", 2)).id
    with capture_logs() as logs:
        history = await h.engine.history("mixed", ID_ZERO, 100)
    assert [e.id for e in history.entries] == [first, last]
    assert len(events_named(logs, "engine.bad_message")) == 2


@BOTH
async def test_history_junk_first_entry_proves_nothing(start_engine: StartEngine) -> None:
    """A first entry with an unreadable prev cannot vouch for what came before it."""
    h = await start_engine()
    assert h.raw is not None
    await h.raw.xadd(h.keys.log("bad-head"), {"p": b"junk", "prev": b"??"})
    published = await h.engine.publish("bad-head", "e", 1)
    since = ((await h.engine.history("bad-head", None, 1)).epoch_ms, 0)
    history = await h.engine.history("bad-head", since, 100)
    assert [e.id for e in history.entries] == [published.id]
    assert history.first_prev == history.first
    assert not prove_recovery(since, history, TTL_MS)


@BOTH
async def test_handler_failure_does_not_stop_reader(
    start_engine: StartEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception from on_event is logged; later events are still delivered."""
    h = await start_engine()
    record = h.handler.on_event

    def exploding(event: Event) -> None:
        record(event)
        if len(h.handler.events) == 1:
            raise RuntimeError("handler bug")

    monkeypatch.setattr(h.handler, "on_event", exploding)
    await h.engine.subscribe("boom")
    with capture_logs() as logs:
        ids = [(await h.engine.publish("boom", "e", n)).id for n in range(2)]
        await h.handler.wait_until(lambda: len(h.handler.events) == 2)
    assert [e.id for e in h.handler.events] == ids
    assert len(events_named(logs, "engine.handler_failed")) == 1


@BOTH
async def test_scripts_reload_after_script_flush(start_engine: StartEngine) -> None:
    """With the script cache flushed (as after a restart) every scripted call still works."""
    h = await start_engine()
    assert h.raw is not None
    await h.engine.publish("flush", "e", 1)
    await h.engine.history("flush", None, 1)
    await h.raw.script_flush()
    result = await h.engine.publish("flush", "e", 2)
    assert (await h.engine.history("flush", ID_ZERO, 10)).entries[-1].id == result.id
    await h.raw.script_flush()
    assert await h.engine.claim_session(SessionRecord("flush", "n", "s", None, 1.0)) is None


# -- registry details ---------------------------------------------------------------------


@BOTH
async def test_client_status_offline_when_node_dead(start_engine: StartEngine) -> None:
    """A record held by a node that is not alive is offline, but still shown."""
    h = await start_engine()
    await h.engine.claim_session(SessionRecord("orphan", "ghost", "s1", None, time.time()))
    status = await h.engine.client_status("orphan")
    assert not status.online
    assert (status.node, status.session) == ("ghost", "s1")


@BOTH
async def test_claim_kicks_an_earlier_attempt_of_its_instance_on_another_node(
    start_engine: StartEngine,
) -> None:
    """A claim with a kick tells the node holding an earlier attempt of the same client
    instance, with that session's id; a displaced session without attempts, of another
    instance, of the claiming node, or a stale claim sends no kick (the node decides)."""
    a = await start_engine()
    b = await start_engine()
    assert a.engine.kicks_in_claim
    kick = Control("kick", "k1", "", 4000, "replaced by a newer session")

    async def claim(h: Any, session: str, attempt: str | None = None) -> None:
        record = SessionRecord("k1", h.node_id, session, None, time.time(), attempt)
        await h.engine.claim_session(record, kick=kick)

    await claim(a, "a1", "i.1")
    await claim(b, "b2", "i.2")  # kicks a1
    await claim(a, "a-other", "j.1")  # another instance: no kick
    await claim(b, "b-none")  # no attempt: no kick
    await claim(a, "a3", "i.3")  # the holder has no attempt: no kick
    await claim(a, "a4", "i.4")  # its own node: no kick
    await claim(b, "b-stale", "i.2")  # stale: refused, no kick
    marker = Control("kick", "marker")  # each node's control channel delivers in order
    for h in (a, b):
        await h.engine.send_control(h.node_id, marker)
    await a.handler.wait_until(lambda: marker in a.handler.controls)
    await b.handler.wait_until(lambda: marker in b.handler.controls)
    assert a.handler.controls == [Control("kick", "k1", "a1", 4000, kick.reason), marker]
    assert b.handler.controls == [marker]


@ALL
async def test_nodes_drops_closed_and_stale_nodes(start_engine: StartEngine) -> None:
    """A closed node deregisters; a node-set member without a live hash is not listed."""
    a = await start_engine()
    b = await start_engine()
    assert a.raw is not None
    assert [n.node for n in await a.engine.nodes()] == sorted([a.node_id, b.node_id])
    await a.raw.zadd(a.keys.nodes(), {"ghost": time.time()})
    await b.engine.close()
    assert [n.node for n in await a.engine.nodes()] == [a.node_id]
    assert await a.raw.zscore(a.keys.nodes(), "ghost") is not None  # kept for the reaper


@ALL
async def test_dead_node_sessions_are_reaped_by_a_live_node(start_engine: StartEngine) -> None:
    """Records of a node silent past reap_after are forgotten, or handed to a live session."""
    a = await start_engine()
    assert a.raw is not None
    old = time.time() - 3600
    await a.raw.zadd(a.keys.nodes(), {"dead": old})
    engine = a.engine
    await engine.claim_session(SessionRecord("gone", "dead", "s-dead", None, old))
    await engine.claim_session(SessionRecord("shared", "dead", "s-1", None, old), exclusive=False)
    await engine.claim_session(
        SessionRecord("shared", a.node_id, "s-2", None, old + 1), exclusive=False
    )
    await engine.claim_session(
        SessionRecord("shared", "dead", "s-3", None, old + 2), exclusive=False
    )
    await engine.claim_session(SessionRecord("mine", a.node_id, "s-4", None, time.time()))
    await engine._reap_dead_nodes()
    assert not await a.raw.exists(a.keys.session("gone"))
    shared = await engine.client_status("shared")
    assert (shared.online, shared.node, shared.session) == (True, a.node_id, "s-2")
    assert not any(
        k.startswith(b"s:s-1") or k.startswith(b"s:s-3")
        for k in await a.raw.hkeys(a.keys.session("shared"))
    )
    assert (await engine.client_status("mine")).session == "s-4"
    assert await a.raw.zscore(a.keys.nodes(), "dead") is None


@ALL
async def test_node_taken_for_dead_asks_its_sessions_to_rejoin(start_engine: StartEngine) -> None:
    """A live node that was reaped learns it at its next heartbeat: Control("rejoin")."""
    a = await start_engine()
    assert a.raw is not None
    await a.raw.zrem(a.keys.nodes(), a.node_id)
    await a.engine.heartbeat(0)
    assert [c.action for c in a.handler.controls] == ["rejoin"]


@ALL
async def test_heartbeat_sets_node_ttl(start_engine: StartEngine) -> None:
    """The node's hash expires after node_ttl unless refreshed."""
    h = await start_engine(EngineOptions(node_ttl=5.0))
    assert h.raw is not None
    await h.engine.heartbeat(3)
    assert 0 < await h.raw.pttl(h.keys.node(h.node_id)) <= 5000


@BOTH
async def test_publish_refreshes_history_ttl(start_engine: StartEngine) -> None:
    """After each publish the stream lives at least history_ttl, at most 1.5 times it."""
    h = await start_engine(EngineOptions(history_ttl=100))
    assert h.raw is not None
    for _ in range(3):
        await h.engine.publish("ttl", "e", None)
        assert 100 < await h.raw.ttl(h.keys.log("ttl")) <= 150


@BOTH
async def test_unexpected_confirmation_counts_as_resubscribe(start_engine: StartEngine) -> None:
    """A subscription confirmation nobody asked for triggers on_resubscribed."""
    h = await start_engine()
    engine = h.engine
    assert isinstance(engine, RedisEngine)
    await engine.subscribe("again")
    assert engine._sub is not None
    session = engine._sub._session
    assert session is not None
    await session.conn.send_command("SUBSCRIBE", h.keys.channel("again"))
    await h.handler.wait_until(lambda: h.handler.resubscribes == 1)


# -- one connection -----------------------------------------------------------------------


@REAL
async def test_one_pubsub_connection_for_many_subscriptions(start_engine: StartEngine) -> None:
    """Fifty BizIds and the control channel share one named pub/sub connection."""
    h = await start_engine()
    assert h.raw is not None
    for n in range(50):
        await h.engine.subscribe(f"many-{n}")
    subscribers = [c for c in await h.raw.client_list() if int(c["sub"]) > 0]
    assert [(c["name"], int(c["sub"])) for c in subscribers] == [(f"relay-sub:{h.node_id}", 51)]


@REAL
async def test_close_releases_connections_and_node(start_engine: StartEngine) -> None:
    """After close() the pub/sub connection is gone and the node key deleted."""
    h = await start_engine()
    raw = h.raw
    assert raw is not None
    await h.engine.close()

    async def released() -> bool:
        return not any(int(c["sub"]) > 0 for c in await raw.client_list())

    await eventually(released)
    assert not await raw.exists(h.keys.node(h.node_id))


# -- outages ------------------------------------------------------------------------------


async def test_start_fails_fast_when_redis_unreachable() -> None:
    """Nothing listening: start() raises EngineUnavailable quickly; close() still works."""
    engine = RedisEngine(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5)
    began = time.monotonic()
    with pytest.raises(EngineUnavailable):
        await engine.start("lonely", RecordingHandler())
    assert time.monotonic() - began < 3000 * MS
    await engine.close()
    assert not engine.ready


@REAL
async def test_redis_down_raises_engine_unavailable(
    own_redis: RedisServer, start_engine: StartEngine
) -> None:
    """With Redis gone, commands raise EngineUnavailable and the engine turns unready."""
    h = await start_engine(url=own_redis.url, **{**FAST, "subscribe_timeout": 0.3})
    own_redis.kill()
    with pytest.raises(EngineUnavailable):
        await h.engine.publish("down", "e", None)
    with pytest.raises(EngineUnavailable):
        await h.engine.history("down", None, 10)
    await h.handler.wait_until(lambda: not h.engine.ready)
    assert h.handler.health == [False]
    with pytest.raises(EngineUnavailable):
        await h.engine.subscribe("down")


@REAL
async def test_restart_resubscribes_and_delivers(
    own_redis: RedisServer, start_engine: StartEngine
) -> None:
    """After a Redis restart the engine resubscribes, says so, and delivers again."""
    h = await start_engine(url=own_redis.url, **FAST)
    await h.engine.subscribe("restart")
    before = await h.engine.publish("restart", "e", 1)
    await h.handler.wait_until(lambda: len(h.handler.events) == 1)
    old_epoch = (await h.engine.history("restart", None, 1)).epoch_ms
    with capture_logs() as logs:
        own_redis.restart()
        await h.handler.wait_until(lambda: h.handler.resubscribes == 1, 5000)
        await h.handler.wait_until(lambda: h.engine.ready, 5000)
    after = await h.engine.publish("restart", "e", 2)
    await h.handler.wait_until(lambda: len(h.handler.events) == 2)
    assert h.handler.events[1].id == after.id
    names = {entry["event"] for entry in logs}
    assert {"engine.disconnected", "engine.reconnected", "engine.resubscribed"} <= names
    since = parse_id(before.id)
    history = await h.engine.history("restart", since, 10)
    assert history.epoch_ms > old_epoch  # the restart lost the data, and the epoch says so
    assert not prove_recovery(since, history, TTL_MS)


@REAL
async def test_killed_pubsub_connection_resubscribes(start_engine: StartEngine) -> None:
    """Redis cutting the subscriber (as on output-buffer overflow) leads to a resubscribe."""
    h = await start_engine(**FAST)
    assert h.raw is not None
    await h.engine.subscribe("cut")
    await h.raw.client_kill_filter(_type="pubsub")
    await h.handler.wait_until(lambda: h.handler.resubscribes == 1)
    result = await h.engine.publish("cut", "e", None)
    await h.handler.wait_until(lambda: [e.id for e in h.handler.events] == [result.id])


@REAL
async def test_batched_calls_survive_redis_closing_their_idle_connections(
    start_engine: StartEngine,
) -> None:
    """Redis hanging up on the command connections between two calls (a restart, a
    client timeout, CLIENT KILL) costs the next call nothing: it runs on a new one."""
    h = await start_engine(**FAST)
    assert h.raw is not None
    first = await h.engine.publish("idle-cut", "e", 1)
    killed = await h.raw.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    await asyncio.sleep(50 * MS)  # the hang-up reaches the engine's event loop
    history = await h.engine.history("idle-cut", ID_ZERO, 10)
    assert [e.id for e in history.entries] == [first.id]
    second = await h.engine.publish("idle-cut", "e", 2)
    assert parse_id(second.id) > parse_id(first.id)


@REAL
async def test_hung_redis_turns_unready_then_recovers(
    own_redis: RedisServer, start_engine: StartEngine
) -> None:
    """SIGSTOP: the canary misses, ready goes False; after SIGCONT it recovers and delivers."""
    h = await start_engine(url=own_redis.url, **FAST)
    await h.engine.subscribe("hung")
    assert h.engine.ready
    own_redis.stop_process()
    try:
        await h.handler.wait_until(lambda: not h.engine.ready, 3000)
        await asyncio.sleep(1000 * MS)  # reconnect attempts meet the hung server too
        assert h.handler.health == [False]
        assert not h.engine.ready
    finally:
        own_redis.continue_process()
    await h.handler.wait_until(lambda: h.engine.ready, 6000)
    assert h.handler.health == [False, True]
    assert h.handler.resubscribes >= 1
    result = await h.engine.publish("hung", "e", None)
    await h.handler.wait_until(lambda: [e.id for e in h.handler.events] == [result.id])


@REAL
async def test_hung_redis_commands_give_up_with_engine_unavailable(
    own_redis: RedisServer, start_engine: StartEngine
) -> None:
    """SIGSTOP: batched registry and history calls raise EngineUnavailable, not hang."""
    h = await start_engine(url=own_redis.url, **FAST, command_timeout=0.5)
    record = SessionRecord("stuck", h.node_id, "s-1", None, time.time())
    await h.engine.history("stuck", None, 10)  # a pooled connection, already handshaken
    own_redis.stop_process()
    try:
        calls = [
            h.engine.claim_session(record),
            h.engine.history("stuck", None, 10),
            h.engine.release_session("stuck", "s-1"),
            h.engine.publish("stuck", "e", None),
        ]
        async with asyncio.timeout(5000 * MS):
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        own_redis.continue_process()
    assert all(isinstance(outcome, EngineUnavailable) for outcome in outcomes), outcomes
    assert all("TimeoutError" in str(outcome) for outcome in outcomes)


@REAL
async def test_subscribe_waiters_time_out_each_on_its_own_deadline(
    own_redis: RedisServer, start_engine: StartEngine
) -> None:
    """Two subscribes of one channel to a hung Redis: each waits its full timeout, then
    EngineUnavailable; a confirmed subscribe is never failed by a later timer."""
    timeout = 0.4
    h = await start_engine(url=own_redis.url, **{**FAST, "subscribe_timeout": timeout})
    await h.engine.subscribe("early")
    loop = asyncio.get_running_loop()

    async def subscribe_timed() -> tuple[BaseException | None, float]:
        began = loop.time()
        try:
            await h.engine.subscribe("hung-sub")
        except EngineUnavailable as exc:
            return exc, loop.time() - began
        return None, loop.time() - began

    own_redis.stop_process()
    try:
        first = asyncio.ensure_future(subscribe_timed())
        await asyncio.sleep(timeout / 2)
        second = asyncio.ensure_future(subscribe_timed())
        async with asyncio.timeout(5000 * MS):
            (error1, waited1), (error2, waited2) = await asyncio.gather(first, second)
    finally:
        own_redis.continue_process()
    assert isinstance(error1, EngineUnavailable) and isinstance(error2, EngineUnavailable)
    assert waited1 >= timeout and waited2 >= timeout
    await h.handler.wait_until(lambda: h.engine.ready, 6000)
    result = await h.engine.publish("early", "e", None)
    await h.handler.wait_until(lambda: result.id in [e.id for e in h.handler.events])


def test_pack_commands_matches_redis_py() -> None:
    """The batcher's packer writes redis-py's bytes, and refuses what redis-py refuses."""
    conn = Connection()
    commands: list[tuple[Any, ...]] = [
        ("EVALSHA", "f" * 40, 1, "relay:{c}:session", "n1", "s-x", "", "1732612345.5", "1", ""),
        ("SUBSCRIBE", b"relay:{a}:ch", b"relay:{b}:ch"),
        ("SET", "k", 1.5, -7, b"\x00\xff", "é" * 3000),
    ]
    assert b"".join(pack_commands(conn, commands)) == b"".join(conn.pack_commands(commands))
    with pytest.raises(DataError):
        pack_commands(conn, [("SET", "k", True)])


@pytest.mark.redis
@pytest.mark.skipif(not HIREDIS_AVAILABLE, reason="redis-py without hiredis: nothing to find")
async def test_compat_hiredis_parser_and_transport_are_found(redis_server: RedisServer) -> None:
    """With hiredis, the installed redis-py still has the parser class and the transport
    _compat uses: the pub/sub reader's feed, put under that transport, gets the replies
    (error replies as redis-py's exception classes), and redis-py still closes the
    connection.

    Fails when an upgrade moves them (the engine would fall back silently and slower)."""
    assert hiredis_parser()
    pool = ConnectionPool.from_url(redis_server.url, protocol=2, **hiredis_parser())
    conn = await pool.get_connection()
    replies: list[Any] = []
    feed = _Feed.of(replies.append)
    transport = transport_of(conn)
    assert feed is not None and transport is not None
    feed.attach(transport)
    commands: list[tuple[Any, ...]] = [("PING",), ("GET", "k", "x"), ("EVALSHA", "0" * 40, 0)]
    await conn.send_packed_command(pack_commands(conn, commands))
    await eventually(lambda: len(replies) == 3)
    pong, error, unknown_script = replies
    assert pong == b"PONG"
    assert isinstance(error, ResponseError) and "wrong number of arguments" in str(error)
    assert isinstance(unknown_script, NoScriptError)  # redis-py's class, as MOVED's would be
    async with asyncio.timeout(5000 * MS):
        await pool.disconnect()  # waits for the StreamWriter to hear of the close
    with pytest.raises(RedisConnectionError):
        await feed.ended


async def test_compat_still_open_sees_the_connection_state(redis_server: RedisServer) -> None:
    """The installed redis-py still keeps the StreamReader still_open reads: a live
    connection is open, one the server closed is not. (Were it moved, the batcher would
    keep no connection between round trips and connects would cost more, silently.)"""
    pool = ConnectionPool.from_url(redis_server.url, protocol=2)
    conn = await pool.get_connection()
    try:
        await conn.send_command("CLIENT", "ID")
        client_id = await conn.read_response()
        assert still_open(conn)
        killer = await pool.get_connection()
        await killer.send_command("CLIENT", "KILL", "ID", client_id)
        assert await killer.read_response() == 1
        await pool.release(killer)
        await eventually(lambda: not still_open(conn))
    finally:
        await pool.release(conn)
        await pool.disconnect()


async def test_compat_send_packed_writes_without_a_timer(redis_server: RedisServer) -> None:
    """The installed redis-py still has the bare write send_packed uses (were it moved,
    every batch would pay for a wait_for task again, silently), and it writes."""
    pool = ConnectionPool.from_url(redis_server.url, protocol=2, socket_timeout=5.0)
    conn = await pool.get_connection()
    try:
        assert callable(getattr(conn, "_send_packed_command", None))
        await send_packed(conn, pack_commands(conn, [("PING",), ("ECHO", "x")]))
        assert [await conn.read_response(), await conn.read_response()] == [b"PONG", b"x"]
    finally:
        await pool.release(conn)
        await pool.disconnect()
