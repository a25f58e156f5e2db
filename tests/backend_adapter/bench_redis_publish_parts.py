"""Where a publish's Redis CPU goes: ``python -m tests.backend_adapter.bench_redis_publish_parts``.

Two measurements on one private redis-server, in one run (optional arguments: calls per
variant and round, rounds):

1. Each command of the publish script alone, in a loop of 20,000 ``redis.call`` inside
   one EVALSHA: what one call costs with the Lua-to-Redis bridge, without the script's
   fixed cost. One long command, so the machine's load hardly shows.
2. Whole calls sent by ``redis-benchmark`` (a C client: the load generator takes less of
   the machine than redis-py would; ``-P 100``, keys drawn from 500 BizIds), rounds
   interleaved: a plain PUBLISH (what Socket.IO's adapter sends), an empty script (the
   fixed cost of EVALSHA and of FCALL, without arguments and with publish.lua's 4 keys
   and 5 arguments), the three versions of publish.lua (tests/fixtures/publish_v1.lua,
   publish_v2.lua, relay/lua/publish.lua), and the floor: a script that only XADDs and
   PUBLISHes (no ``prev``, TTL or dedupe). Each script also as a Redis Function (FUNCTION
   LOAD, FCALL). Then several events per call: relay/lua/publish_batch.lua (publish.lua
   for each event, any BizIds) with 1, 10 and 100 events a call, and publish_run.lua (one
   BizId's run) with 10. Redis measures each: the ``INFO cpu`` delta per event (which
   also counts reading and parsing the request) and ``usec_per_call`` from ``INFO
   commandstats`` divided by the events a call.

redis-benchmark draws each ``__rand_int__`` on its own, so one call's keys belong to
different BizIds; every key exists after the warm-up round, so each script takes the same
path as with one BizId's keys. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import redis

from relay.wire import PUBLISH_BATCH_LUA, PUBLISH_LUA, PUBLISH_RUN_LUA, encode_payload
from tests.support.redis_server import RedisServer

FIXTURES = Path(__file__).parents[1] / "fixtures"
LOOPS = 20_000
BIZ_IDS = 500
EMPTY = "return {'0-0', 0, 0, 0}"
FLOOR = """local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
                            'p', ARGV[1], 'prev', '0-0')
local receivers = redis.call('PUBLISH', KEYS[2], id .. ' 0-0 ' .. ARGV[1])
return {id, receivers, 0, 0}
"""
SCRIPTS = {
    "empty script": EMPTY,
    "publish.lua v1": (FIXTURES / "publish_v1.lua").read_text(),
    "publish.lua v2": (FIXTURES / "publish_v2.lua").read_text(),
    "publish.lua (current)": PUBLISH_LUA,
    "floor: XADD + PUBLISH only": FLOOR,
}
# One redis.call each, as publish.lua sends it (KEYS and ARGV as in the loop below).
CALLS = {
    "nothing (the loop itself)": "local x = i",
    "PTTL stream": "redis.call('PTTL', KEYS[1])",
    "GET newest id": "redis.call('GET', KEYS[2])",
    "XREVRANGE stream + - COUNT 1": "redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)",
    "XADD MAXLEN ~ 100": "redis.call('XADD', KEYS[1], 'MAXLEN', '~', 100, '*', 'p', p, 'prev', '')",
    "XADD, no trim": "redis.call('XADD', KEYS[5], '*', 'p', p, 'prev', '')",
    "SET newest id PX <Lua number>": "redis.call('SET', KEYS[2], '1-1', 'PX', ttl_ms)",
    "SET newest id PX <string>": "redis.call('SET', KEYS[2], '1-1', 'PX', '3600000')",
    "SET newest id KEEPTTL": "redis.call('SET', KEYS[2], '1-1', 'KEEPTTL')",
    "PEXPIRE stream": "redis.call('PEXPIRE', KEYS[1], ttl_ms)",
    "SET mid EX (dedupe)": "redis.call('SET', KEYS[4], '1-1', 'EX', '600')",
    "PUBLISH (no receiver)": "redis.call('PUBLISH', KEYS[2], '1-1 0-0 ' .. p)",
    "EXISTS session": "redis.call('EXISTS', KEYS[3])",
    "message concat (Lua only)": "local m = '1-1' .. ' ' .. '0-0' .. ' ' .. p",
}
LOOP = """local p, ttl_ms = ARGV[1], 3600000
for i = 1, tonumber(ARGV[2]) do
  %s
end
return 0
"""


def cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def per_call(client: redis.Redis, payload: bytes, rounds: int) -> None:
    keys = [f"relay:{{b}}:{name}" for name in ("log", "ch", "session", "mid:m", "log2")]
    client.xadd(keys[0], {"p": payload, "prev": "0-0"})
    client.set(keys[1], "1-1", px=3_600_000)
    shas = {name: client.script_load(LOOP % code) for name, code in CALLS.items()}
    usec: dict[str, list[float]] = {name: [] for name in CALLS}
    for _ in range(rounds):
        for name, sha in shas.items():
            client.config_resetstat()
            client.evalsha(sha, len(keys), *keys, payload, LOOPS)
            client.delete(keys[4])
            usec[name].append(float(client.info("commandstats")["cmdstat_evalsha"]["usec"]) / LOOPS)
    print(f"1. one redis.call in a loop of {LOOPS} inside one EVALSHA, µs per call")
    print(f"   {'':32} {'min':>6} {'median':>7}")
    for name, values in usec.items():
        print(f"   {name:32} {min(values):6.2f} {statistics.median(values):7.2f}")


def whole_calls(client: redis.Redis, port: int, n: int, rounds: int) -> None:
    bench = shutil.which("redis-benchmark")
    if bench is None:
        print("2. skipped: no redis-benchmark on PATH")
        return
    names = {name: f"s{i}" for i, name in enumerate(SCRIPTS)}
    library = "#!lua name=relaybench\n" + "".join(
        f"redis.register_function('{names[name]}', function(KEYS, ARGV)\n{lua}\nend)\n"
        for name, lua in SCRIPTS.items()
    )
    client.function_load(library, replace=True)
    b = "relay:{b__rand_int__}"
    keys = [f"{b}:log", f"{b}:ch", f"{b}:session", f"{b}:log"]
    args = ["4", *keys, "x" * 78, "100", "3600", "", "600"]
    # (command, the command INFO commandstats counts, events per call)
    variants: dict[str, tuple[list[str], str, int]] = {
        "PUBLISH (plain, the peer)": (["PUBLISH", f"{b}:ch", "x" * 78], "publish", 1),
        "EVALSHA empty, no keys or args": (
            ["EVALSHA", client.script_load(EMPTY), "0"],
            "evalsha",
            1,
        ),
        "FCALL empty, no keys or args": (["FCALL", names["empty script"], "0"], "fcall", 1),
    }
    for name, lua in SCRIPTS.items():
        variants[f"EVALSHA {name}"] = (["EVALSHA", client.script_load(lua), *args], "evalsha", 1)
        variants[f"FCALL {name}"] = (["FCALL", names[name], *args], "fcall", 1)
    batch_sha = client.script_load(PUBLISH_BATCH_LUA)
    for per in (1, 10, 100):
        keys_, argv = [], []
        for _ in range(per):
            keys_ += keys
            argv += ["x" * 78, ""]
        batch = ["EVALSHA", batch_sha, str(4 * per), *keys_, "100", "3600", "600", *argv]
        variants[f"EVALSHA publish_batch.lua, {per} events/call"] = (batch, "evalsha", per)
    run = [f"{b}:log", f"{b}:ch", f"{b}:session"] + [f"{b}:log"] * 10
    argv = ["x" * 78, ""] * 10
    run_call = ["EVALSHA", client.script_load(PUBLISH_RUN_LUA), "13", *run, "100", "3600", "600"]
    variants["EVALSHA publish_run.lua, 10 events/call"] = ([*run_call, *argv], "evalsha", 10)
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for round_ in range(rounds + 1):  # round 0 warms up: every key exists afterwards
        for name, (command, outer, per) in variants.items():
            client.config_resetstat()
            started = cpu(client)
            calls = (n if round_ else n // 10) // per
            subprocess.run(
                [
                    bench,
                    "-p",
                    str(port),
                    "-n",
                    str(calls),
                    "-P",
                    "100",
                    "-c",
                    "1",
                    "-r",
                    str(BIZ_IDS),
                    "-q",
                    *command,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            spent = cpu(client) - started
            stats = client.info("commandstats")[f"cmdstat_{outer}"]
            if round_:
                events = calls * per
                rows[name].append((spent / events * 1e6, float(stats["usec_per_call"]) / per))
    print(f"2. whole calls by redis-benchmark, {n} events per variant and round, {rounds} rounds")
    print(f"   {'':44} {'INFO cpu µs/event':>24} {'usec_per_call/event':>24}")
    for name, values in rows.items():
        cpus, usecs = [v[0] for v in values], [v[1] for v in values]
        print(
            f"   {name:44} {statistics.median(cpus):6.2f} ({min(cpus):5.2f}-{max(cpus):5.2f})"
            f"     {statistics.median(usecs):6.2f} ({min(usecs):5.2f}-{max(usecs):5.2f})"
        )


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    payload = encode_payload("b0", "label.created", {"label": 1, "name": "shipping label"})
    server = RedisServer().start()
    try:
        client = redis.Redis.from_url(server.url)
        per_call(client, payload, rounds)
        whole_calls(client, server.port, n, rounds)
    finally:
        server.close()


if __name__ == "__main__":
    main()
