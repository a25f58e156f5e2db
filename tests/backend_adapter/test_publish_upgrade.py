"""A rolling upgrade of the publish script never breaks the ``prev`` chain.

Publishers running earlier versions of relay/lua/publish.lua (kept verbatim in
tests/fixtures: publish_v1.lua reads ``prev`` back from the Stream, publish_v2.lua keeps
the newest id in a key and sets its TTL on every publish) and the current one write the
same BizIds, interleaved, on a real Redis. Every history entry and every live message
must name the entry published just before it: a wrong ``prev`` makes nodes close
sessions with 4509.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from relay.wire import PUBLISH_LUA, KeySpace, encode_payload, publish_call
from tests.conftest import MS
from tests.support.redis_server import RedisServer

FIXTURES = Path(__file__).parents[1] / "fixtures"
SCRIPTS = {
    "1": (FIXTURES / "publish_v1.lua").read_text(),
    "2": (FIXTURES / "publish_v2.lua").read_text(),
    "N": PUBLISH_LUA,
}
KEYS = KeySpace("relay")
TTL = 3600


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def publish(client: redis.Redis, script: str, biz_id: str, n: int, ttl: int = TTL) -> str:
    """Run ``script`` (EVAL, as any publisher may) for event ``n`` of ``biz_id``; its id."""
    payload = encode_payload(biz_id, "label.created", {"n": n})
    keys, args = publish_call(
        KEYS, biz_id, payload, mid=None, history_size=1000, history_ttl=ttl, dedupe_window=600
    )
    reply = client.eval(script, len(keys), *keys, *args)
    return reply[0].decode()


def history_chain(client: redis.Redis, biz_id: str) -> list[tuple[str, str]]:
    """``(id, prev)`` of every entry in the BizId's history, oldest first."""
    return [
        (sid.decode(), fields[b"prev"].decode()) for sid, fields in client.xrange(KEYS.log(biz_id))
    ]


def assert_chained(pairs: list[tuple[str, str]]) -> None:
    expected_prev = "0-0"
    for sid, prev in pairs:
        assert prev == expected_prev, f"entry {sid} names {prev}, not {expected_prev}"
        expected_prev = sid


def test_old_and_new_scripts_interleaved_keep_history_and_live_chain(
    client: redis.Redis,
) -> None:
    live = client.pubsub(ignore_subscribe_messages=True)
    live.subscribe(*(KEYS.channel(f"b{b}") for b in range(3)))
    # Every pattern of turns: runs of each version, and single alternations.
    turns = "NNN11N1NNN1111NN1N1N" + "NNN22N2NNN2222NN2N2N" + "N12N21NN11N22N1212NN"
    published: dict[str, list[str]] = {f"b{b}": [] for b in range(3)}
    for n, turn in enumerate(turns):
        biz_id = f"b{n % 3}" if n % 7 else "b0"
        script = SCRIPTS[turn]
        published[biz_id].append(publish(client, script, biz_id, n))

    messages: dict[str, list[tuple[str, str]]] = {b: [] for b in published}
    deadline = time.monotonic() + 10_000 * MS
    while len(turns) > sum(map(len, messages.values())) and time.monotonic() < deadline:
        message = live.get_message(timeout=100 * MS)
        if message is None:
            continue
        sid, prev, _ = message["data"].split(b" ", 2)
        biz_id = message["channel"].decode().split("{")[1].split("}")[0]
        messages[biz_id].append((sid.decode(), prev.decode()))
    live.close()
    for biz_id, ids in published.items():
        chain = history_chain(client, biz_id)
        assert [sid for sid, _ in chain] == ids
        assert_chained(chain)
        assert messages[biz_id] == chain


def test_new_script_after_history_expired_starts_a_fresh_chain(client: redis.Redis) -> None:
    publish(client, PUBLISH_LUA, "b1", 0)
    client.delete(KEYS.log("b1"))  # expired or flushed; the newest-id key may outlive it
    publish(client, PUBLISH_LUA, "b1", 1)
    assert_chained(history_chain(client, "b1"))


def test_new_script_without_its_newest_id_key_reads_the_history(client: redis.Redis) -> None:
    publish(client, PUBLISH_LUA, "b1", 0)
    client.delete(KEYS.channel("b1"))  # evicted under maxmemory, say
    publish(client, PUBLISH_LUA, "b1", 1)
    publish(client, PUBLISH_LUA, "b1", 2)
    assert_chained(history_chain(client, "b1"))


def test_history_outlives_the_last_publish_by_at_least_the_ttl(client: redis.Redis) -> None:
    for n in range(3):
        publish(client, PUBLISH_LUA, "b1", n, ttl=100)
        assert 100_000 < client.pttl(KEYS.log("b1")) <= 150_000
        assert 0 < client.pttl(KEYS.channel("b1")) <= client.pttl(KEYS.log("b1"))


def test_history_outlives_the_last_publish_whichever_version_wrote_before(
    client: redis.Redis,
) -> None:
    for n, turn in enumerate("N1N2NN1N"):
        sid = publish(client, SCRIPTS[turn], "b1", n, ttl=100)
        if turn == "N":
            assert 100_000 < client.pttl(KEYS.log("b1")) <= 150_000
            assert 0 < client.pttl(KEYS.channel("b1")) <= client.pttl(KEYS.log("b1"))
            assert client.get(KEYS.channel("b1")) == sid.encode()
    assert_chained(history_chain(client, "b1"))


def test_newest_id_key_keeps_its_ttl_until_the_history_ttl_is_extended(
    client: redis.Redis,
) -> None:
    publish(client, PUBLISH_LUA, "b1", 0, ttl=100)
    # As if 24 s went by: the Stream has more than ttl + ttl/4 left, so it is not extended.
    client.pexpire(KEYS.log("b1"), 126_000)
    client.pexpire(KEYS.channel("b1"), 101_000)
    sid = publish(client, PUBLISH_LUA, "b1", 1, ttl=100)
    assert 120_000 < client.pttl(KEYS.log("b1")) <= 126_000
    assert 95_000 < client.pttl(KEYS.channel("b1")) <= 101_000
    assert client.get(KEYS.channel("b1")) == sid.encode()
    # Below ttl + ttl/4: the Stream is extended, and the key's TTL is set with it.
    client.pexpire(KEYS.log("b1"), 124_000)
    publish(client, PUBLISH_LUA, "b1", 2, ttl=100)
    assert 145_000 < client.pttl(KEYS.log("b1")) <= 150_000
    assert 120_000 < client.pttl(KEYS.channel("b1")) <= 125_000
    assert_chained(history_chain(client, "b1"))
