"""Engine implementations, chosen by URL: none means memory, any Redis URL means Redis."""

from __future__ import annotations

from relay.engine import Engine, EngineOptions
from relay.errors import ConfigError
from relay.redis_url import parse_redis_url

__all__ = ["REDIS_SCHEMES", "check_redis_url", "create_engine"]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")


def check_redis_url(url: str) -> str:
    """``url`` if it names a Redis the Redis engine can reach; ConfigError saying how if not."""
    if not url.lower().startswith(REDIS_SCHEMES):
        raise ConfigError(
            # Not quoted: a URL without its scheme may still carry a password.
            f"--redis-url (or RELAY_REDIS_URL) must start with {', '.join(REDIS_SCHEMES)},"
            " e.g. redis://127.0.0.1:6379/0"
        )
    try:
        parse_redis_url(url)
    except ConfigError as exc:
        raise ConfigError(f"--redis-url (or RELAY_REDIS_URL): {exc}") from None
    return url


def create_engine(redis_url: str | None, options: EngineOptions) -> Engine:
    """Build the engine a settings object asks for."""
    if not redis_url:
        from relay.engines.memory import MemoryEngine

        return MemoryEngine(options)
    from relay.engines.redis import RedisEngine

    engine: Engine = RedisEngine(check_redis_url(redis_url), options)
    return engine
