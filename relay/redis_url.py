"""Redis connection strings: one URL names a single Redis, a Sentinel-watched master or a
Redis Cluster.

Pure: no I/O, no Redis client. The Redis engine and ``backend_adapter`` each build their
own redis-py pool (async or sync) from what :func:`parse_redis_url` returns, so every
entry point (``relay serve``, ``relay publish``, ``relay outbox-dispatch``, the
publishers) accepts the same strings:

- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://…`` (TLS), ``unix:///path``:
  one Redis; redis-py parses these itself (with its query options).
- ``redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/<service>[/db]``:
  the master that the sentinels at those addresses (port 26379 by default) name for
  ``<service>``. The userinfo is the master's (and replicas') password. Sentinels that
  require a password of their own take ``?sentinel_password=…`` (and
  ``sentinel_username=…``). After a failover every new connection asks the sentinels
  again, so clients follow the new master.
- ``redis+cluster://[[user]:password@]host[:port][,host[:port]…]``: a Redis Cluster
  (port 6379 by default); any reachable node is enough to learn the others. A cluster
  has only database 0, so a path other than ``/`` or ``/0`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, unquote

from relay.errors import ConfigError

__all__ = ["CLUSTER_PORT", "SENTINEL_PORT", "RedisTarget", "parse_redis_url"]

SENTINEL_PORT: Final = 26379
CLUSTER_PORT: Final = 6379
_DIRECT: Final = ("redis", "rediss", "unix")
_SENTINEL_QUERY: Final = frozenset({"sentinel_password", "sentinel_username"})


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where Redis is: one server (``url`` for redis-py), a Sentinel-watched master, or a
    cluster (``cluster_nodes``, the addresses to learn the cluster's layout from)."""

    url: str
    service: str = ""  # Sentinel's name of the master; "" for one server
    sentinels: tuple[tuple[str, int], ...] = ()
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    cluster_nodes: tuple[tuple[str, int], ...] = ()

    @property
    def is_sentinel(self) -> bool:
        return bool(self.service)

    @property
    def is_cluster(self) -> bool:
        return bool(self.cluster_nodes)

    def master_kwargs(self) -> dict[str, Any]:
        """Connection arguments of the master (and replicas) behind Sentinel."""
        kwargs: dict[str, Any] = {"db": self.db}
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        return kwargs

    def sentinel_kwargs(self, timeout: float | None) -> dict[str, Any]:
        """Connection arguments of the sentinels themselves.

        RESP2, as the data connections: with redis-py's default (RESP3) each new sentinel
        connection first sends HELLO 3 and then CLIENT MAINT_NOTIFICATIONS, which a
        sentinel refuses (an error reply, logged by redis-py at debug). Sentinel answers
        the same few commands either way; RESP2 saves those two round trips.
        """
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "protocol": 2,
        }
        if self.sentinel_username is not None:
            kwargs["username"] = self.sentinel_username
        if self.sentinel_password is not None:
            kwargs["password"] = self.sentinel_password
        return kwargs


def _host_port(text: str, scheme: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ConfigError(f"{scheme} URL: address {text!r} has no host")
    if not port_text:
        return host, default_port
    if not _digits(port_text) or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{scheme} URL: address {text!r} has a bad port")
    return host, int(port_text)


def _digits(text: str) -> bool:
    """ASCII digits only: "²" is a digit to str.isdigit, and int() refuses it."""
    return text.isascii() and text.isdigit()


def _hosts_url(
    rest: str, scheme: str, port: int
) -> tuple[str | None, str | None, tuple[tuple[str, int], ...], str]:
    """``[user[:password]@]host[:port][,…][/path]`` (after ``scheme://``, before ``?``):
    username, password, the addresses and the path. A lone userinfo is the password, as
    redis-py reads it."""
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None if colon else None
        password = unquote(secret) if colon else unquote(user) or None
    addresses = tuple(_host_port(part, scheme, port) for part in hosts.split(",") if part)
    return username, password, addresses, path


def _cluster(url: str, rest: str) -> RedisTarget:
    if "?" in rest:
        raise ConfigError("redis+cluster URL: takes no ?options")
    username, password, nodes, path = _hosts_url(rest, "redis+cluster", CLUSTER_PORT)
    if not nodes:
        raise ConfigError("redis+cluster URL: give at least one cluster node host:port")
    if path.rstrip("/") not in ("", "0"):
        raise ConfigError("redis+cluster URL: a Redis Cluster has only database 0")
    return RedisTarget(url, username=username, password=password, cluster_nodes=nodes)


def _sentinel(url: str, rest: str) -> RedisTarget:
    rest, _, query = rest.partition("?")
    username, password, sentinels, path = _hosts_url(rest, "redis+sentinel", SENTINEL_PORT)
    if not sentinels:
        raise ConfigError("redis+sentinel URL: give at least one sentinel host:port")
    service, _, db_text = path.partition("/")
    service = unquote(service)
    if not service:
        raise ConfigError("redis+sentinel URL: give the master's service name: …/<service>[/db]")
    db_text = db_text.rstrip("/")
    if db_text and not _digits(db_text):
        raise ConfigError(f"redis+sentinel URL: database {db_text!r} is not a number")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - _SENTINEL_QUERY)
    if unknown:
        raise ConfigError(
            f"redis+sentinel URL: unknown option(s) {', '.join(unknown)};"
            f" known: {', '.join(sorted(_SENTINEL_QUERY))}"
        )
    return RedisTarget(
        url,
        service,
        sentinels,
        int(db_text or 0),
        username,
        password,
        options.get("sentinel_username") or None,
        options.get("sentinel_password") or None,
    )


def parse_redis_url(url: str) -> RedisTarget:
    """Check ``url`` and say where Redis is; ConfigError names what is wrong."""
    if not isinstance(url, str) or not url:
        raise ConfigError("the Redis URL is empty")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ConfigError(
            "the Redis URL needs a scheme: redis://, rediss://, unix://, redis+sentinel://"
            " or redis+cluster://"
        )
    if scheme in _DIRECT:
        return RedisTarget(url)
    if scheme == "redis+sentinel":
        return _sentinel(url, rest)
    if scheme == "redis+cluster":
        return _cluster(url, rest)
    if scheme in ("rediss+sentinel", "rediss+cluster"):
        raise ConfigError(f"{scheme}:// is not supported by this version of Relay")
    raise ConfigError(
        f"unknown Redis URL scheme {scheme!r}: use redis://, rediss://, unix://,"
        " redis+sentinel:// or redis+cluster://"
    )
