"""Engine implementations, chosen by URL: none means memory, ``redis://`` means Redis."""

from __future__ import annotations

from relay.engine import Engine, EngineOptions
from relay.errors import ConfigError

__all__ = ["create_engine"]


def create_engine(redis_url: str | None, options: EngineOptions) -> Engine:
    """Build the engine a settings object asks for."""
    if not redis_url:
        from relay.engines.memory import MemoryEngine

        return MemoryEngine(options)
    if redis_url.startswith(("redis://", "rediss://", "unix://")):
        from relay.engines.redis import RedisEngine

        engine: Engine = RedisEngine(redis_url, options)
        return engine
    raise ConfigError("redis URL must start with redis://, rediss:// or unix://")
