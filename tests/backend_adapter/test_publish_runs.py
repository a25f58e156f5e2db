"""publish_many sends a run of events of one BizId as one script call (publish_run.lua).

The items of one BizId share a Redis Cluster slot, so they go in one EVALSHA, in their
order, even when other BizIds' items come between them: Redis pays the per-call script
cost once per run instead of once per event.
What a receiver sees must not change: every event, in order, each naming its
predecessor, with dedupe and the online flag as for single publishes.
"""

from __future__ import annotations

from pathlib import Path

import redis

from backend_adapter import AsyncPublisher, Publisher
from relay import wire
from tests.backend_adapter.conftest import assert_chained, history
from tests.support.node import Listener

KEYS = wire.KeySpace("relay")
FIXTURES = Path(__file__).parents[1] / "fixtures"
EARLIER_LUA = [(FIXTURES / f"publish_v{v}.lua").read_text() for v in (1, 2)]


def test_a_run_of_one_biz_id_is_one_script_call(
    sync_publisher: Publisher, raw: redis.Redis
) -> None:
    # Both scripts loaded: no NOSCRIPT below (another test may have EVALed publish.lua alone).
    sync_publisher.publish_many([("warm", "e", None)] * 2)
    raw.config_resetstat()
    items = [("cml", "e", i) for i in range(5)] + [("other", "e", 0)] + [("cml", "e", 5)]
    results = sync_publisher.publish_many(items)
    assert int(raw.info("commandstats")["cmdstat_evalsha"]["calls"]) == 2  # cml x6, other
    assert [r.id for r in results[:5] + results[6:]] == [e.id for e in history(raw, "cml")]
    assert_chained(history(raw, "cml"))


async def test_a_run_arrives_in_order_with_the_online_flag(
    publisher: AsyncPublisher, raw: redis.Redis, client: Listener
) -> None:
    items = [("cml", "e", i) for i in range(5)] + [("other", "e", 0)] + [("cml", "e", 5)]
    results = await publisher.publish_many(items)
    messages = await client.wait_messages(6)
    assert [m["data"] for m in messages] == [0, 1, 2, 3, 4, 5]
    assert [m["id"] for m in messages] == [r.id for r in results[:5] + results[6:]]
    assert [(r.online, r.receivers) for r in results] == [(True, 1)] * 5 + [(False, 0)] + [
        (True, 1)
    ]
    assert_chained(history(raw, "cml"))
    assert client.close_code is None


def test_dedupe_inside_a_run_and_against_earlier_publishes(
    sync_publisher: Publisher, raw: redis.Redis
) -> None:
    first = sync_publisher.publish("cml", "e", "a", mid="m-a")
    results = sync_publisher.publish_many(
        [
            ("cml", "e", "a", "m-a"),
            ("cml", "e", "b", "m-b"),
            ("cml", "e", "b", "m-b"),
            ("cml", "e", "c"),
        ]
    )
    assert [(r.id, r.duplicate) for r in results[:3]] == [
        (first.id, True),
        (results[1].id, False),
        (results[1].id, True),
    ]
    assert [e.data for e in history(raw, "cml")] == ["a", "b", "c"]
    assert_chained(history(raw, "cml"))


def test_runs_interleaved_with_earlier_scripts_keep_the_chain(
    sync_publisher: Publisher, raw: redis.Redis
) -> None:
    for round_ in range(4):
        sync_publisher.publish_many([("cml", "e", f"{round_}.{i}") for i in range(3)])
        payload = wire.encode_payload("cml", "e", f"{round_}.old")
        raw.eval(
            EARLIER_LUA[round_ % 2],
            4,
            KEYS.log("cml"),
            KEYS.channel("cml"),
            KEYS.session("cml"),
            KEYS.log("cml"),
            payload,
            1000,
            3600,
            "",
            600,
        )
    events = history(raw, "cml")
    assert len(events) == 16
    assert_chained(events)


def test_a_run_survives_a_flushed_script_cache(sync_publisher: Publisher, raw: redis.Redis) -> None:
    sync_publisher.publish_many([("cml", "e", i) for i in range(2)])
    raw.script_flush()
    results = sync_publisher.publish_many([("cml", "e", i) for i in range(2, 5)])
    assert len(results) == 3
    assert [e.data for e in history(raw, "cml")] == [0, 1, 2, 3, 4]
    assert_chained(history(raw, "cml"))


def test_a_run_keeps_the_history_ttl_and_the_newest_id_key_as_a_single_publish_does(
    raw: redis.Redis,
) -> None:
    def run(n: int) -> list[str]:
        events = [(wire.encode_payload("ttl", "e", f"{n}.{i}"), None) for i in range(3)]
        keys, args = wire.publish_run_call(
            KEYS, "ttl", events, history_size=1000, history_ttl=100, dedupe_window=600
        )
        return [
            reply[0].decode() for reply in raw.eval(wire.PUBLISH_RUN_LUA, len(keys), *keys, *args)
        ]

    run(0)
    assert 145_000 < raw.pttl(KEYS.log("ttl")) <= 150_000
    assert 120_000 < raw.pttl(KEYS.channel("ttl")) <= 125_000
    # As if 24 s went by: more than ttl + ttl/4 left, so the TTLs are kept.
    raw.pexpire(KEYS.log("ttl"), 126_000)
    raw.pexpire(KEYS.channel("ttl"), 101_000)
    ids = run(1)
    assert 120_000 < raw.pttl(KEYS.log("ttl")) <= 126_000
    assert 95_000 < raw.pttl(KEYS.channel("ttl")) <= 101_000
    assert raw.get(KEYS.channel("ttl")) == ids[-1].encode()
    raw.pexpire(KEYS.log("ttl"), 124_000)  # below ttl + ttl/4: extended, the key with it
    run(2)
    assert 145_000 < raw.pttl(KEYS.log("ttl")) <= 150_000
    assert 120_000 < raw.pttl(KEYS.channel("ttl")) <= 125_000
    assert_chained(history(raw, "ttl"))
