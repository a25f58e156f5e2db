"""Redis CPU per publish: ``python -m tests.backend_adapter.bench_redis_publish [N]``.

Starts a private redis-server and, in one run, sends N publishes of the same payload as
pipelined calls of: the earlier publish scripts (tests/fixtures/publish_v1.lua and
publish_v2.lua), the current relay/lua/publish.lua, relay/lua/publish_run.lua with runs
of RUN events of one BizId per call, and a plain PUBLISH (what a Socket.IO-style adapter
sends). Each is measured by Redis itself: ``INFO commandstats`` (usec_per_call of
evalsha and of the commands the script runs) and the ``INFO cpu`` delta
(used_cpu_user + used_cpu_sys, which also counts parsing and network I/O) per event.
With ``--subscribed``, one connection subscribes to every channel and reads what arrives,
so PUBLISH has a receiver to write to. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import redis

from relay.wire import PUBLISH_LUA, PUBLISH_RUN_LUA, KeySpace, encode_payload, publish_call
from tests.support.redis_server import RedisServer

FIXTURES = Path(__file__).parents[1] / "fixtures"
V1_LUA, V2_LUA = ((FIXTURES / f"publish_v{v}.lua").read_text() for v in (1, 2))
BIZ_IDS = 500
PIPELINE = 100
RUN = 10  # events of one BizId per call of publish_run.lua
REPEATS = 3


def cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run(client: redis.Redis, n: int, call: Any) -> dict[str, Any]:
    client.config_resetstat()
    started = cpu(client)
    for base in range(0, n, PIPELINE):
        pipe = client.pipeline(transaction=False)
        for i in range(base, base + PIPELINE):
            call(pipe, i)
        pipe.execute()
    spent = cpu(client) - started
    stats = client.info("commandstats")
    out: dict[str, Any] = {"cpu µs/event": spent / n * 1e6}
    for name, row in sorted(stats.items()):
        if name.startswith(("cmdstat_info", "cmdstat_config")):
            continue
        out[f"{name.removeprefix('cmdstat_')} µs/call, calls/event"] = (
            float(row["usec_per_call"]),
            int(row["calls"]) / n,
        )
    # Commands a script runs are counted inside its evalsha time as well as on their own.
    outer = stats.get("cmdstat_evalsha") or stats["cmdstat_publish"]
    out["total µs/event (commandstats)"] = float(outer["usec"]) / n
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    subscribed = "--subscribed" in sys.argv
    keys = KeySpace("relay")
    payload = encode_payload("b0", "label.created", {"label": 1, "name": "shipping label"})
    server = RedisServer().start()
    listener = None
    try:
        client = redis.Redis.from_url(server.url)
        if subscribed:  # one connection on every channel, as a node (or Socket.IO peer) is
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(**{keys.channel(f"b{b}"): lambda _: None for b in range(BIZ_IDS)})
            listener = pubsub.run_in_thread(sleep_time=0.01, daemon=True)
        v1_sha, v2_sha = client.script_load(V1_LUA), client.script_load(V2_LUA)
        new_sha = client.script_load(PUBLISH_LUA)
        batch_sha = client.script_load(PUBLISH_RUN_LUA)

        def script(sha: str) -> Any:
            def call(pipe: Any, i: int) -> None:
                k, a = publish_call(
                    keys,
                    f"b{i % BIZ_IDS}",
                    payload,
                    mid=None,
                    history_size=100,
                    history_ttl=3600,
                    dedupe_window=600,
                )
                pipe.evalsha(sha, len(k), *k, *a)

            return call

        def plain(pipe: Any, i: int) -> None:
            pipe.publish(keys.channel(f"b{i % BIZ_IDS}"), payload)

        def batch(pipe: Any, i: int) -> None:
            if i % RUN == 0:
                biz = f"b{i // RUN % BIZ_IDS}"
                run_keys = [keys.log(biz), keys.channel(biz), keys.session(biz)]
                run_keys += [keys.log(biz)] * RUN  # no mid: any key of the slot
                pipe.evalsha(
                    batch_sha, len(run_keys), *run_keys, 100, 3600, 600, *[payload, ""] * RUN
                )

        rounds = {
            "publish.lua v1": script(v1_sha),
            "publish.lua v2": script(v2_sha),
            "publish.lua (current)": script(new_sha),
            f"publish_run.lua, {RUN} events/call": batch,
            "plain PUBLISH (peer)": plain,
        }
        for call in rounds.values():  # warm: streams exist, scripts cached
            run(client, n // 10, call)
        for repeat in range(REPEATS):
            for name, call in rounds.items():
                print(f"== {name} ({n} events, payload {len(payload)} B, round {repeat + 1})")
                for key, value in run(client, n, call).items():
                    shown = value if isinstance(value, tuple) else (value,)
                    print(f"   {key:40}", "  ".join(f"{v:6.2f}" for v in shown))
    finally:
        if listener is not None:
            listener.stop()
        server.close()


if __name__ == "__main__":
    main()
