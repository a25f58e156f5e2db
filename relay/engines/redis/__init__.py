"""The Redis engine: history in Streams, live delivery over one pub/sub connection per node.

The URL names one Redis or, with ``redis+sentinel://``, the master that Sentinel names:
every new connection (the pool's and the pub/sub one) asks the sentinels, so after a
failover the engine reconnects to the new master and repairs gaps as after a restart.
With ``redis+cluster://`` it names a Redis Cluster: live delivery is sharded pub/sub, one
pub/sub connection per master (``_sharded``).
With ``EngineOptions.min_replicas`` a publish returns only once ``WAIT`` says that many
replicas hold it (:mod:`relay.engines.redis._batch`; on a cluster, that many replicas of the
master of its BizId's slot: :mod:`relay.engines.redis._cluster`).

Commands (publish, history, registry) go through a connection pool: hiredis, RESP2, and an
explicit retry of one quick attempt on connection errors only, so an outage surfaces as
:class:`~relay.errors.EngineUnavailable` within ``socket_timeout`` instead of being hidden
for seconds (FIELD-NOTES).

Live delivery does not use redis-py's ``PubSub``: it reconnects and resubscribes silently,
and what was published meanwhile is gone without a sign. Instead one raw connection per
node is driven by one reader task. Every reconnect is explicit (jittered exponential
backoff), resubscribes every wanted channel, and then calls
``handler.on_resubscribed()`` so the node replays each BizId's gap from history. A
subscription confirmation nobody asked for is treated the same way.

A hung Redis (SIGSTOP) leaves the socket open and silent, so a canary proves delivery: every
``canary_interval`` seconds ``Control(action="canary")`` is published through the pool to
the node's own control channel; if none has come back on the pub/sub connection for
``canary_deadline`` seconds the engine turns unready (``on_health(False)``) and replaces the
pub/sub connection. The next canary that comes back makes it ready again. Canaries are
consumed here and never reach ``on_control``.

Control messages are JSON objects with the fields of :class:`~relay.engine.Control`
(``{"action": "kick", "client_id": …, "session": …, "code": 4000, "reason": …,
"token": …}``), so an operator can read them with ``redis-cli SUBSCRIBE`` and any language
can send one; missing fields take their defaults, unknown fields are ignored.

Junk written by another publisher never stops anything: a bad live message or history
entry is logged as ``engine.bad_message`` (size and reason, never the bytes) and skipped.

Keys are those of DESIGN.md ("Redis layout") plus ``<prefix>:epoch``: the Redis clock when
Relay first saw this dataset, set if missing and returned with every history read as
``History.epoch_ms``. A restart without persistence or a FLUSHALL deletes it, so a client
whose ``since`` predates the data Redis still has is never told it recovered everything.

The package has one module per interface of :mod:`relay.engine`: ``broker``,
``sessions`` (the session registry) and ``nodes`` (the node registry), joined with the
lifecycle in ``engine``; ``_subscriber`` is the pub/sub side, ``_batch`` pipelines
commands, ``_cluster`` stands in for the batcher on a Redis Cluster and ``_sharded`` for
the pub/sub side there (sharded pub/sub, a reader per master), and ``_compat`` is the only module
that uses redis-py's private (underscore) names. The connection pool (Sentinel included)
comes from :mod:`relay.redis_pool`, which the publishers share.

Keeping the heartbeat going is the node's job: :meth:`RedisEngine.start` registers the node
once and :meth:`RedisEngine.close` deregisters it.
"""

from relay.engines.redis._subscriber import decode_control, encode_control
from relay.engines.redis.engine import RedisEngine

__all__ = ["RedisEngine", "decode_control", "encode_control"]
