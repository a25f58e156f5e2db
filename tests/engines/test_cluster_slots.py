"""Every script the engine runs is slot-safe on a real Redis Cluster.

A script's keys must hash to one slot (or Redis Cluster refuses the call with CROSSSLOT),
and a script may touch only the keys it declares (or Redis 7 refuses "a non local key").
Each script runs here through redis-py's cluster client with exactly the KEYS and ARGV the
engine passes (``relay.wire.publish_call``, ``KeySpace``), for BizIds spread over every
shard, so a script rewrite that breaks either rule fails here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster as ClusterClient

from relay.engines.redis._base import ACK_LUA, CLAIM_LUA, EPOCH_LUA, FORGET_LUA
from relay.redis_pool import async_cluster
from relay.wire import (
    HISTORY_LUA,
    PUBLISH_LUA,
    PUBLISH_RUN_LUA,
    KeySpace,
    encode_payload,
    parse_history_reply,
    parse_publish_reply,
    publish_call,
)
from tests.support.redis_cluster import RedisCluster

KEYS = KeySpace("relay")


def _spread(cluster: RedisCluster) -> list[str]:
    """BizIds whose slots cover every master."""
    by_master: dict[int, str] = {}
    for n in range(200):
        biz = f"biz-{n}"
        by_master.setdefault(cluster.master_of_slot(cluster.slot_of(KEYS.log(biz))), biz)
        if len(by_master) == len(cluster.masters()):
            break
    return sorted(by_master.values())


@pytest.fixture
async def client(redis_cluster: RedisCluster) -> AsyncIterator[ClusterClient]:
    found = async_cluster(redis_cluster.url)
    yield found
    await found.aclose()


async def test_publish_and_history_scripts_run_on_every_shard(
    redis_cluster: RedisCluster, client: ClusterClient
) -> None:
    """publish.lua (with and without a mid, and a duplicate mid) and history.lua answer on
    every shard: nothing is CROSSSLOT or touches an undeclared key."""
    cluster = client
    for biz in _spread(redis_cluster):
        ids = []
        for n, mid in enumerate([None, "m-1", "m-1"]):
            payload = encode_payload(biz, "ev", {"n": n}, mid=mid)
            keys, args = publish_call(
                KEYS, biz, payload, mid=mid, history_size=100, history_ttl=60, dedupe_window=60
            )
            reply = await cluster.eval(PUBLISH_LUA, len(keys), *keys, *args)
            ids.append(parse_publish_reply(reply))
        assert [r.duplicate for r in ids] == [False, False, True]
        assert ids[2].id == ids[1].id
        reply = await cluster.eval(HISTORY_LUA, 1, KEYS.log(biz), "0-0", 10)
        history = parse_history_reply(reply)
        assert [event.id for event in history.entries] == [ids[0].id, ids[1].id]


async def test_registry_scripts_run_on_every_shard(
    redis_cluster: RedisCluster, client: ClusterClient
) -> None:
    """claim, ack, forget and the epoch script: one key each, on whichever shard."""
    cluster = client
    for biz in _spread(redis_cluster):
        record = KEYS.session(biz)
        args = ["node-a", "s1", "", "1.0", "1", ""]
        assert await cluster.eval(CLAIM_LUA, 1, record, *args) is not None
        await cluster.eval(ACK_LUA, 1, record, "s1", "1-0")
        assert await cluster.hget(record, "last_ack") == b"1-0"
        assert await cluster.eval(FORGET_LUA, 1, record, "session", "s1") == 1
        assert await cluster.exists(record) == 0
    assert await cluster.eval(EPOCH_LUA, 1, "relay:epoch") > 0


async def test_publish_run_script_runs_on_every_shard(
    redis_cluster: RedisCluster, client: ClusterClient
) -> None:
    """publish_run.lua (backend_adapter's publish_many of a run of one BizId) with a
    duplicate mid inside the run answers on every shard."""
    for biz in _spread(redis_cluster):
        mids = [None, "m-1", "m-1"]
        payloads = [encode_payload(biz, "ev", {"n": n}, mid=mid) for n, mid in enumerate(mids)]
        keys = [KEYS.log(biz), KEYS.channel(biz), KEYS.session(biz)] + [
            KEYS.log(biz) if mid is None else KEYS.mid(biz, mid) for mid in mids
        ]
        argv: list[bytes | str | int] = [100, 60, 60]
        for payload, mid in zip(payloads, mids, strict=True):
            argv += [payload, mid or ""]
        reply = await client.eval(PUBLISH_RUN_LUA, len(keys), *keys, *argv)
        results = [parse_publish_reply(one) for one in reply]
        assert [r.duplicate for r in results] == [False, False, True]
        assert results[2].id == results[1].id
