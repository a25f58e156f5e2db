"""The test cluster and relay.redis_pool's cluster clients: formed by redis-cli, a killed
master's replica takes over, slots move with their keys, and the clients built from a
``redis+cluster://`` URL follow all of it."""

from __future__ import annotations

import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient

from relay.errors import ConfigError
from relay.redis_pool import async_cluster, async_pool, sync_cluster, sync_pool
from tests.support.redis_cluster import RedisCluster


def _client(cluster: RedisCluster) -> ClusterClient:
    return sync_cluster(cluster.url)


def test_cluster_has_three_masters_each_with_a_replica(redis_cluster: RedisCluster) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    assert all(len(redis_cluster.replicas_of(port)) == 1 for port in masters)
    assert redis_cluster.url.startswith("redis+cluster://127.0.0.1:")


def test_killed_master_is_replaced_by_its_replica_keeping_keys(own_cluster: RedisCluster) -> None:
    old = own_cluster.master_of_slot(own_cluster.slot_of("{biz}:k"))
    with own_cluster.client(old) as master:
        master.set("{biz}:k", "v")
        # WAIT counts replicas that have this connection's writes, so it must run on the
        # master's own connection: a cluster client sends it to any node.
        assert master.wait(1, 10_000) == 1
    replica = own_cluster.replicas_of(old)[0]
    new, _ = own_cluster.kill_master_and_wait_failover(old)
    assert new == replica
    assert own_cluster.master_of_slot(own_cluster.slot_of("{biz}:k")) == new
    client = _client(own_cluster)
    assert client.get("{biz}:k") == b"v"
    client.close()


def test_moved_slot_takes_its_keys_and_redirects(own_cluster: RedisCluster) -> None:
    client = _client(own_cluster)
    client.set("{biz}:k", "v")
    slot = own_cluster.slot_of("{biz}:k")
    source = own_cluster.master_of_slot(slot)
    target = next(port for port in own_cluster.masters() if port != source)
    own_cluster.move_slot(slot, target)
    assert own_cluster.master_of_slot(slot) == target
    with own_cluster.client(source) as old, own_cluster.client(target) as new:
        with pytest.raises(redis.exceptions.MovedError, match=f"^{slot} 127.0.0.1:{target}$"):
            old.get("{biz}:k")
        assert new.get("{biz}:k") == b"v"
    assert client.get("{biz}:k") == b"v"  # redis-py follows MOVED
    own_cluster.reshard(target, source, 10)
    assert len(own_cluster.masters()) == 3
    client.close()


async def test_async_cluster_client_reaches_every_shard(redis_cluster: RedisCluster) -> None:
    """Keys of different hash tags land on different masters; the asyncio client reads and
    writes them all, and a password-less URL needs no auth."""
    client = async_cluster(redis_cluster.url)
    try:
        tags = [f"{{biz-{n}}}:k" for n in range(30)]
        for key in tags:
            await client.set(key, key)
        assert [await client.get(key) for key in tags] == [key.encode() for key in tags]
        slots = {redis_cluster.master_of_slot(redis_cluster.slot_of(key)) for key in tags}
        assert len(slots) == 3
    finally:
        await client.aclose()


@pytest.mark.parametrize("build", [async_pool, sync_pool])
def test_single_server_pools_refuse_a_cluster_url(build: object) -> None:
    with pytest.raises(ConfigError, match="names a cluster"):
        build("redis+cluster://h:1")  # type: ignore[operator]


@pytest.mark.parametrize("build", [async_cluster, sync_cluster])
def test_cluster_clients_refuse_other_urls(build: object) -> None:
    with pytest.raises(ConfigError, match="redis\\+cluster:// URL"):
        build("redis://h:1/0")  # type: ignore[operator]
