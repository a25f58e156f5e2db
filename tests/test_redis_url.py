"""Redis URLs: one server or a Sentinel-watched master; bad strings are refused by name."""

from __future__ import annotations

import pytest

from relay.engines import check_redis_url
from relay.errors import ConfigError
from relay.redis_url import CLUSTER_PORT, SENTINEL_PORT, parse_redis_url


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://:pw@h:6380/2", "unix:///run/redis.sock?db=1"]
)
def test_redis_url_single_server_is_left_to_redis_py(url: str) -> None:
    """redis://, rediss:// and unix:// name one server, passed on as given."""
    target = parse_redis_url(url)
    assert (target.is_sentinel, target.url) == (False, url)


def test_redis_url_sentinel_names_hosts_service_db_and_password() -> None:
    """Several sentinels, the service, the db and the master's password are read."""
    target = parse_redis_url("redis+sentinel://:s%40cret@10.0.0.1:26380,h2,[::1]:5000/main/3")
    assert target.is_sentinel
    assert target.sentinels == (("10.0.0.1", 26380), ("h2", SENTINEL_PORT), ("::1", 5000))
    assert (target.service, target.db) == ("main", 3)
    assert target.master_kwargs() == {"db": 3, "password": "s@cret"}
    assert target.sentinel_kwargs(1.0) == {
        "socket_timeout": 1.0,
        "socket_connect_timeout": 1.0,
        "protocol": 2,
    }


def test_redis_url_sentinel_user_and_sentinel_password() -> None:
    """user:password@ is the master's ACL user; ?sentinel_password= authenticates sentinels."""
    target = parse_redis_url(
        "redis+sentinel://app:pw@h:1/svc?sentinel_password=sp&sentinel_username=su"
    )
    assert target.master_kwargs() == {"db": 0, "username": "app", "password": "pw"}
    assert target.sentinel_kwargs(None)["password"] == "sp"
    assert target.sentinel_kwargs(None)["username"] == "su"


def test_redis_url_sentinel_lone_userinfo_is_the_password() -> None:
    """redis+sentinel://secret@host/svc: like redis-py, a lone userinfo is a password."""
    assert parse_redis_url("redis+sentinel://secret@h/svc").master_kwargs() == {
        "db": 0,
        "password": "secret",
    }


def test_redis_url_cluster_names_every_node_and_the_password() -> None:
    """redis+cluster:// lists seed nodes (port 6379 by default) and the nodes' password."""
    target = parse_redis_url("redis+cluster://app:s%40cret@10.0.0.1:7000,h2,[::1]:7002/")
    assert target.is_cluster and not target.is_sentinel
    assert target.cluster_nodes == (("10.0.0.1", 7000), ("h2", CLUSTER_PORT), ("::1", 7002))
    assert (target.username, target.password) == ("app", "s@cret")
    assert parse_redis_url("redis+cluster://secret@h:1/0").password == "secret"


def test_redis_url_cluster_is_served_by_the_node() -> None:
    """relay serve takes redis+cluster:// (sharded pub/sub), password and all."""
    assert check_redis_url("redis+cluster://:pw@h:1,h2:2") == "redis+cluster://:pw@h:1,h2:2"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "empty"),
        ("localhost:6379", "needs a scheme"),
        ("http://h/0", "unknown Redis URL scheme"),
        ("redis+sentinel:///svc", "at least one sentinel"),
        ("redis+sentinel://h:1", "service name"),
        ("redis+sentinel://h:1/", "service name"),
        ("redis+sentinel://h:x/svc", "bad port"),
        ("redis+sentinel://h:70000/svc", "bad port"),
        ("redis+sentinel://h:1/svc/zero", "not a number"),
        ("redis+sentinel://h:\u00b2/svc", "bad port"),  # a digit to str.isdigit only
        ("redis+sentinel://h:1/svc/\u00b2", "not a number"),
        ("redis+sentinel://h:1/svc?socket_timeout=1", "unknown option"),
        ("rediss+cluster://h:1", "not supported"),
        ("redis+cluster://", "at least one cluster node"),
        ("redis+cluster://h:1/3", "only database 0"),
        ("redis+cluster://h:1,h:x", "bad port"),
        ("redis+cluster://h:1?ssl=1", "takes no"),
    ],
)
def test_redis_url_refuses_malformed_strings(url: str, says: str) -> None:
    """Each mistake gets a ConfigError that says what is wrong."""
    with pytest.raises(ConfigError, match=says):
        parse_redis_url(url)


def test_redis_url_errors_never_show_the_password() -> None:
    """A refused URL's error message does not repeat its password."""
    with pytest.raises(ConfigError) as caught:
        parse_redis_url("redis+sentinel://:hunter2@h:1/svc/x?sentinel_password=hunter3")
    assert "hunter" not in str(caught.value)


def test_redis_url_check_names_the_flag_for_sentinel_mistakes() -> None:
    """relay's --redis-url check accepts a sentinel URL and names the flag when it is wrong."""
    good = "redis+sentinel://:pw@h1:26379,h2/main/0"
    assert check_redis_url(good) == good
    with pytest.raises(ConfigError, match=r"--redis-url \(or RELAY_REDIS_URL\): .*service name"):
        check_redis_url("redis+sentinel://h1:26379")
