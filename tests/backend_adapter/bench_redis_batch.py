"""Redis's CPU per event of the publish scripts as a harness-like S1 publisher drives them.

``python -m tests.backend_adapter.bench_redis_batch [calls] [rounds]``, or with
``--callgrind`` (redis-server under valgrind: instructions per event, independent of the
machine's load, and a profile per variant in ``$TMPDIR/relay-callgrind``).

One private redis-server; 1,000 BizIds, each with a session record and a subscriber on
its channel (one connection that reads and discards, like a node); calls of 100 events of
distinct BizIds (what ``AsyncPublisher`` sends for a batch of ``gather``'d publishes), no
``mid``. The variants run interleaved, round after round. Per event: Redis's ``INFO cpu``
delta and ``INFO commandstats`` (the EVALSHA and each command it sent), or instructions.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from relay.wire import (
    PUBLISH_BATCH_LUA,
    PUBLISH_LUA,
    KeySpace,
    _batched,
    _lua,
    encode_payload,
    publish_batch_call,
)
from tests.support.ports import free_port, wait_port
from tests.support.redis_server import REDIS_BIN
from tests.support.timing import MS

BIZ_IDS = 1_000
PER_CALL = 100
PEER = "PUBLISH"  # in place of a script's SHA: each event a plain PUBLISH, what socket.io sends
KEYS = KeySpace()

FIXTURES = Path(__file__).parents[1] / "fixtures"
FLOOR = """local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
                            'p', ARGV[1], 'prev', '0-0')
local receivers = redis.call('PUBLISH', KEYS[2], id .. ' 0-0 ' .. ARGV[1])
return {id, receivers, 0, 0}
"""
# publish.lua's lines of TTL arithmetic, which the batch runs once per call
SETTINGS = "local ttl_ms = tonumber(ARGV[3]) * 1000\nlocal slack_ms = math.floor(ttl_ms / 4)\n"
EMPTY = "return {'0-0', 0, 0, 0}\n"
TABLES = (FIXTURES / "publish_batch_tables.lua").read_text()  # a table per event's reply


def _tables(script: str) -> str:
    """publish_batch.lua as it was until 2026-12-06: a table of four per event, the TTL's
    arithmetic and the lookup of redis.call once per event."""
    body = re.sub(r"KEYS\[(\d)\]", r"KEYS[k + \1]", script)
    argv = {"1": "payload", "2": "ARGV[1]", "3": "ARGV[2]", "4": "mid", "5": "ARGV[3]"}
    body = re.sub(r"ARGV\[(\d)\]", lambda m: argv[m.group(1)], body)
    return TABLES.replace("-- <publish.lua>\n", body)


VARIANTS: dict[str, str] = {
    "publish_batch.lua": PUBLISH_BATCH_LUA,
    "publish_batch.lua of 2026-12-05 (tables)": _tables(PUBLISH_LUA),
    "empty, flat reply": _batched(_lua("publish_batch.lua"), SETTINGS + EMPTY),
    "empty, table per event": _tables(EMPTY),
    "floor (XADD + PUBLISH), flat reply": _batched(_lua("publish_batch.lua"), SETTINGS + FLOOR),
}


def _resp(*args: bytes | str | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class Subscriber(threading.Thread):
    """One connection subscribed to every BizId's channel, reading and discarding."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(_resp("SUBSCRIBE", *(KEYS.channel(f"b{i}") for i in range(BIZ_IDS))))
        self.stopped = False

    def run(self) -> None:
        while not self.stopped:
            if not self.sock.recv(1 << 20):
                return


def calls(sha: str, n: int, rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(n):
        events = []
        for biz in rng.sample(range(BIZ_IDS), PER_CALL):
            data = {"seq": rng.randrange(50_000), "ts": 1765000000000.5, "biz": f"b{biz}"}
            events.append((f"b{biz}", encode_payload(f"b{biz}", "bench", data), None))
        if sha == PEER:  # the same events as plain PUBLISHes (JSON is about as long)
            out.append(b"".join(_resp("PUBLISH", KEYS.channel(b), p) for b, p, _ in events))
            continue
        names, args = publish_batch_call(
            KEYS, events, history_size=100, history_ttl=3600, dedupe_window=600
        )
        out.append(_resp("EVALSHA", sha, len(names), *names, *args))
    return out


def drive(port: int, commands: list[bytes], per: int) -> None:
    """Send every call, 10 in flight, and read the replies (``per`` replies a call)."""
    client = redis.Redis(port=port)
    conn = client.connection_pool.get_connection()
    for i in range(0, len(commands), 10):
        group = commands[i : i + 10]
        conn.send_packed_command([b"".join(group)])
        for _ in range(len(group) * per):
            reply = conn.read_response()
            if isinstance(reply, redis.ResponseError):
                raise reply
    client.connection_pool.release(conn)


def instructions(dump: Path) -> float:
    """The instructions a callgrind dump counted (its totals line)."""
    for _ in range(100):
        if dump.exists():
            for line in dump.read_text().splitlines():
                if line.startswith(("totals:", "summary:")) and int(line.split()[1]):
                    return float(line.split()[1])
        time.sleep(0.1)
    raise RuntimeError(f"no totals in {dump}")


def cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 200
    rounds = int(args[1]) if len(args) > 1 else 5
    grind = "--callgrind" in sys.argv
    port = free_port()
    outdir = Path(os.environ.get("TMPDIR", "/tmp")) / "relay-callgrind"
    outdir.mkdir(exist_ok=True)
    server_args = [
        REDIS_BIN,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--client-output-buffer-limit",
        "pubsub 0 0 0",
    ]
    if grind:
        server_args = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={outdir}/cg.%p",
            "--instr-atstart=no",
            *server_args,
        ]
    proc = subprocess.Popen(server_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, 60_000 * MS)
        client = redis.Redis(port=port)
        for i in range(BIZ_IDS):
            client.hset(KEYS.session(f"b{i}"), mapping={"node": "n1", "session": f"s{i}"})
        sub = Subscriber(port)
        sub.start()
        time.sleep(0.5)
        shas = {name: client.script_load(lua) for name, lua in VARIANTS.items()}
        shas["plain PUBLISH (the peer's one command)"] = PEER
        rng = random.Random(1)
        for sha in shas.values():  # every stream and newest-id key exists after
            drive(port, calls(sha, max(n // 10, 20), rng), PER_CALL if sha == PEER else 1)
        rows: dict[str, list[tuple[float, ...]]] = {name: [] for name in shas}
        dumps = 0
        for r in range(rounds):
            for name, sha in shas.items():
                commands = calls(sha, n, rng)
                events = n * PER_CALL
                client.config_resetstat()
                if grind:
                    subprocess.run(
                        ["callgrind_control", "-i", "on", str(proc.pid)],
                        check=True,
                        stdout=subprocess.DEVNULL,
                    )
                started = cpu(client)
                drive(port, commands, PER_CALL if sha == PEER else 1)
                spent = cpu(client) - started
                if grind:
                    subprocess.run(
                        ["callgrind_control", "-i", "off", str(proc.pid)],
                        check=True,
                        stdout=subprocess.DEVNULL,
                    )
                    dumps += 1
                    subprocess.run(
                        ["callgrind_control", "--dump", str(proc.pid)],
                        check=True,
                        stdout=subprocess.DEVNULL,
                    )
                    ir = instructions(outdir / f"cg.{proc.pid}.{dumps}")
                stats = client.info("commandstats")
                outer = "cmdstat_publish" if sha == PEER else "cmdstat_evalsha"
                row = [spent / events * 1e6, float(stats[outer]["usec"]) / events]
                inner = sum(
                    float(v["usec"])
                    for k, v in stats.items()
                    if k not in (outer, "cmdstat_info", "cmdstat_config|resetstat")
                )
                row.append(inner / events)
                rows[name].append((ir / events,) if grind else tuple(row))
                if r == 0 and not grind:
                    print(
                        name, {k[8:]: round(float(v["usec"]) / events, 3) for k, v in stats.items()}
                    )
        sub.stopped = True
        print(f"{rounds} rounds of {n} calls of {PER_CALL} events; per event, median (min)")
        heads = ["instructions"] if grind else ["INFO cpu", "EVALSHA usec", "its commands"]
        print(f"{'':36}" + "".join(f" {h:>16}" for h in heads))
        for name, values in rows.items():
            cols = list(zip(*values, strict=True))
            print(
                f"{name:36}"
                + "".join(f" {statistics.median(c):8.2f} ({min(c):5.2f})" for c in cols)
            )
        if grind:
            print(f"profiles: {outdir}/cg.{proc.pid}.N, one a variant and round in the order above")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
