"""The pure parts: the packed command equals relay.wire's contract; retry policy; errors."""

from __future__ import annotations

import hashlib

import pytest
import redis.exceptions as rex
from redis.connection import Connection

from backend_adapter._core import (
    _NAMES_KEPT,
    PUBLISH_BATCH_SHA,
    PUBLISH_SHA,
    SCRIPT_LOAD,
    PublishCodec,
    RetryPolicy,
    is_transient,
    publish_failed,
)
from relay import wire
from relay.errors import ConfigError, PublishFailed


def redis_py_packing(*args: object) -> bytes:
    """What redis-py itself would send for ``args``."""
    return b"".join(Connection().pack_command(*args))


def bulks(*args: object) -> bytes:
    """The bulk strings redis-py sends for ``args`` within a command."""
    return redis_py_packing("X", *args).split(b"\r\nX\r\n", 1)[1]


@pytest.mark.parametrize("prefix", ["relay", "app:prod"])
@pytest.mark.parametrize("mid", [None, "outbox-17", "ünïcode-mid"])
def test_codec_command_matches_wire_publish_call(prefix: str, mid: str | None) -> None:
    """The hand-packed EVALSHA is byte for byte what redis-py sends for publish_call."""
    codec = PublishCodec(key_prefix=prefix, history_size=50, history_ttl=120, dedupe_window=30)
    command = codec.command("cml:42", "label.created", {"a": [1, 2]}, mid)
    # The payload carries a timestamp: recover it from the command to rebuild the rest.
    payload_start = command.index(b"\x86")  # a 6-entry MessagePack map
    payload = wire.decode_payload("1-0", "0-0", command[payload_start:].split(b"\r\n$", 1)[0])
    expected_payload = wire.encode_payload(
        "cml:42", "label.created", {"a": [1, 2]}, mid=mid, ts=payload.ts
    )
    keys, argv = wire.publish_call(
        wire.KeySpace(prefix),
        "cml:42",
        expected_payload,
        mid=mid,
        history_size=50,
        history_ttl=120,
        dedupe_window=30,
    )
    assert command == redis_py_packing("EVALSHA", PUBLISH_SHA, len(keys), *keys, *argv)


def test_codec_keys_of_a_bizid_seen_before_are_its_own() -> None:
    """A BizId's key bulks kept from its earlier events, with or without a mid, and after
    more BizIds than are kept came by, are what wire.publish_call names."""
    codec, keys = PublishCodec(key_prefix="app"), wire.KeySpace("app")
    seen = [f"b{i}" for i in range(_NAMES_KEPT + 10)]
    for biz_id in [*seen, "b0", "b7", seen[-1], "b7"]:
        for mid in (None, f"m-{biz_id}", None):
            names, dedupe, _, mid_arg = codec.encode(biz_id, "e", 1, mid)
            expected, argv = wire.publish_call(
                keys, biz_id, b"", mid=mid, history_size=1, history_ttl=1, dedupe_window=1
            )
            assert (names, dedupe, mid_arg) == (
                bulks(*expected),
                bulks(expected[3]),
                bulks(argv[3]),
            )


def test_codec_script_digest_and_load_command() -> None:
    """The digest is publish.lua's SHA-1, and SCRIPT LOAD carries the same text."""
    assert hashlib.sha1(wire.PUBLISH_LUA.encode()).hexdigest() == PUBLISH_SHA
    assert redis_py_packing("SCRIPT", "LOAD", wire.PUBLISH_LUA) == SCRIPT_LOAD


def test_codec_on_a_cluster_sends_the_spublish_scripts() -> None:
    """A cluster codec's EVALSHA names PUBLISH_CLUSTER_LUA (SPUBLISH), its run and batch
    commands PUBLISH_RUN_CLUSTER_LUA and PUBLISH_BATCH_CLUSTER_LUA, and its SCRIPT LOADs
    carry those texts; nothing else differs."""
    single, cluster = PublishCodec(), PublishCodec(cluster=True)
    sha = hashlib.sha1(wire.PUBLISH_CLUSTER_LUA.encode()).hexdigest()
    run_sha = hashlib.sha1(wire.PUBLISH_RUN_CLUSTER_LUA.encode()).hexdigest()
    head = b"*12\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n4\r\n"
    assert cluster.command("cml", "e", 1).startswith(head % sha.encode())
    assert single.command("cml", "e", 1).startswith(head % PUBLISH_SHA.encode())
    run = cluster.run_command(cluster.calls([("cml", "e", 1), ("cml", "e", 2)]))
    assert run_sha.encode() in run
    batch_sha = hashlib.sha1(wire.PUBLISH_BATCH_CLUSTER_LUA.encode()).hexdigest()
    assert batch_sha.encode() in cluster.batch_command(
        cluster.calls([("a", "e", 1), ("b", "e", 1)])
    )
    assert cluster.script_loads == [
        redis_py_packing("SCRIPT", "LOAD", wire.PUBLISH_CLUSTER_LUA),
        redis_py_packing("SCRIPT", "LOAD", wire.PUBLISH_RUN_CLUSTER_LUA),
        redis_py_packing("SCRIPT", "LOAD", wire.PUBLISH_BATCH_CLUSTER_LUA),
    ]
    assert single.script_loads == [
        SCRIPT_LOAD,
        redis_py_packing("SCRIPT", "LOAD", wire.PUBLISH_RUN_LUA),
        redis_py_packing("SCRIPT", "LOAD", wire.PUBLISH_BATCH_LUA),
    ]


def unbulk(bulk: bytes) -> bytes:
    return bulk[bulk.index(b"\r\n") + 2 : -2]


@pytest.mark.parametrize("mids", [(None, None, None), ("m1", None, "ünï")])
def test_codec_batch_command_matches_wire_publish_batch_call(mids: tuple[str | None, ...]) -> None:
    """The hand-packed EVALSHA of publish_batch.lua is what redis-py sends for
    publish_batch_call."""
    codec = PublishCodec(key_prefix="app", history_size=50, history_ttl=120, dedupe_window=30)
    items = [
        (biz, "e", {"n": n}, mid) for n, (biz, mid) in enumerate(zip("abc", mids, strict=True))
    ]
    calls = codec.calls(items)
    command = codec.commands(calls)
    keys, argv = wire.publish_batch_call(
        wire.KeySpace("app"),
        [(c.biz_id, unbulk(c.payload), mid) for c, mid in zip(calls, mids, strict=True)],
        history_size=50,
        history_ttl=120,
        dedupe_window=30,
    )
    assert command == redis_py_packing("EVALSHA", PUBLISH_BATCH_SHA, len(keys), *keys, *argv)


def test_codec_plan_one_call_per_biz_id_and_singles_together() -> None:
    """Each BizId's events in one call in their order, the single events together, no call
    above max_per_call; on a cluster only the single events of one slot share a call."""
    items = [("a", "e", 1), ("b", "e", 1), ("a", "e", 2), ("c", "e", 1), ("d", "e", 1)]
    items += [("a", "e", 3), ("e", "e", 1)]
    assert PublishCodec().plan([]) == []

    def biz_ids(codec: PublishCodec) -> list[list[str]]:
        calls = codec.calls(items)
        groups = codec.plan(calls)
        assert sorted(c for group in groups for c in map(calls.index, group)) == list(range(7))
        for group in groups:  # in the order given within each group
            assert [calls.index(c) for c in group] == sorted(calls.index(c) for c in group)
        return [[c.biz_id for c in group] for group in groups]

    assert biz_ids(PublishCodec()) == [["b", "c", "d", "e"], ["a", "a", "a"]]
    assert biz_ids(PublishCodec(max_per_call=2)) == [["b", "c"], ["d", "e"], ["a", "a"], ["a"]]
    assert biz_ids(PublishCodec(cluster=True)) == [["b"], ["c"], ["d"], ["e"], ["a", "a", "a"]]
    with pytest.raises(ConfigError):
        PublishCodec(max_per_call=0)


def test_codec_calls_validate_every_item_first() -> None:
    """One bad item in a batch raises before any command exists."""
    codec = PublishCodec()
    calls = codec.calls([("a", "e", 1), ("b", "e", 2, "m")])
    assert [c.biz_id for c in calls] == ["a", "b"]
    assert all(c.outcome is None for c in calls)
    with pytest.raises(wire.InvalidClientId):
        codec.calls([("a", "e", 1), ("b b", "e", 2)])


def test_codec_result_parses_script_reply() -> None:
    """The script's reply becomes a PublishResult."""
    reply = [b"5-1", 2, 1, 0]
    assert PublishCodec.result(reply) == wire.PublishResult("5-1", True, 2, False)


@pytest.mark.parametrize("attempt", range(8))
def test_retry_policy_delay_is_full_jitter_capped(attempt: int) -> None:
    """Delays are in [0, min(cap, base * 2**n)]."""
    policy = RetryPolicy(retries=8, backoff=0.05, max_backoff=1.0)
    bound = min(1.0, 0.05 * 2**attempt)
    delays = [policy.delay(attempt) for _ in range(200)]
    assert all(0 <= d <= bound for d in delays)
    assert max(delays) > bound / 2  # really spread over the range


def test_retry_policy_rejects_negative_settings() -> None:
    """A negative retry count or backoff is a ConfigError."""
    with pytest.raises(ConfigError):
        RetryPolicy(retries=-1)
    with pytest.raises(ConfigError):
        RetryPolicy(backoff=-0.1)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (rex.ConnectionError("refused"), True),
        (rex.TimeoutError("slow"), True),
        (rex.BusyLoadingError("LOADING"), True),
        (rex.ReadOnlyError("READONLY"), True),
        (TimeoutError(), True),
        (rex.AuthenticationError("bad password"), False),
        (rex.ResponseError("WRONGTYPE"), False),
        (rex.NoScriptError("NOSCRIPT"), False),
        (ValueError("bug"), False),
    ],
)
def test_is_transient_classifies_redis_errors(exc: Exception, transient: bool) -> None:
    """Only errors that say nothing about the command are worth retrying."""
    assert is_transient(exc) is transient


def test_publish_failed_names_biz_id_attempts_and_cause() -> None:
    """The message says which BizId, how many attempts, and why; __cause__ is kept."""
    cause = rex.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    error = publish_failed("cml", 4, cause)
    assert isinstance(error, PublishFailed)
    assert str(error) == (
        "publish to BizId 'cml' failed after 4 attempts: "
        "ConnectionError: Error 111 connecting to 127.0.0.1:6379. Connection refused."
    )
    assert error.__cause__ is cause
    assert str(publish_failed("x", None, rex.ResponseError("boom"))).endswith(
        "'x' failed: ResponseError: boom"
    )
