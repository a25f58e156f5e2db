"""docs/wire.md is the contract other languages publish by: run it as written.

The Lua script in the docs must be relay/lua/publish.lua byte for byte; the Python
step-by-step block is executed as it stands (only the Redis URL and the script's path
are swapped in); the Java payload class is compiled and what it encodes is published
with the documented KEYS and ARGV; the curl command is run against a real node. Each
time a real client must receive the event. Nothing here goes through backend_adapter
or relay.wire's encoder.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
import redis

from tests.support.node import API_KEY, Listener, NodeUnderTest
from tests.support.redis_server import RedisServer
from tests.support.timing import MS

ROOT = Path(__file__).resolve().parents[2]
WIRE_MD = ROOT / "docs" / "wire.md"
PUBLISH_LUA = ROOT / "relay" / "lua" / "publish.lua"
MSGPACK_JAR = Path("/usr/share/java/msgpack-core.jar")


def block(marker: str, language: str) -> str:
    """The fenced ``language`` block right after ``<!-- marker -->`` in docs/wire.md."""
    text = WIRE_MD.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {re.escape(marker)} -->\n```{language}\n(.*?)```\n", text, re.S)
    assert match, f"docs/wire.md has no {language} block after <!-- {marker} -->"
    return match.group(1)


def documented_keys(biz: str, mid: str | None) -> list[str]:
    """KEYS as the docs' table gives them, for prefix ``relay``."""
    tag = f"relay:{{{biz}}}:"
    return [f"{tag}log", f"{tag}ch", f"{tag}session", f"{tag}mid:{mid}" if mid else f"{tag}log"]


def documented_args(payload: bytes, mid: str | None) -> list[Any]:
    return [payload, 100, 3600, mid or "", 600]


def test_wire_docs_quote_publish_lua_verbatim() -> None:
    """The script in docs/wire.md is relay/lua/publish.lua, byte for byte."""
    text = WIRE_MD.read_text(encoding="utf-8")
    match = re.search(
        r"<!-- publish.lua: begin -->\n```lua\n(.*?)```\n<!-- publish.lua: end -->", text, re.S
    )
    assert match, "docs/wire.md lost its publish.lua block markers"
    assert match.group(1) == PUBLISH_LUA.read_text(encoding="utf-8")


async def test_wire_docs_raw_redis_publish_reaches_client(
    redis_server: RedisServer, client: Listener, raw: redis.Redis
) -> None:
    """The Python step-by-step block, run as written: published, then a duplicate."""
    code = block("raw-publish: python", "python")
    code = code.replace("redis://127.0.0.1:6379/0", redis_server.url)
    code = code.replace('"relay/lua/publish.lua"', repr(str(PUBLISH_LUA)))
    first: dict[str, Any] = {}
    exec(code, first)
    again: dict[str, Any] = {}
    exec(code, again)
    # Without a mid, per the docs: KEYS[4] is the :log key and ARGV[4] is empty.
    payload = msgpack.packb(
        {"v": 1, "mid": None, "biz": "cml", "ev": "label.deleted", "data": [7], "ts": 1.5}
    )
    third = raw.eval(
        PUBLISH_LUA.read_text(), 4, *documented_keys("cml", None), *documented_args(payload, None)
    )

    assert (first["receivers"], first["online"], first["duplicate"]) == (1, 1, 0)
    assert (again["stream_id"], again["duplicate"]) == (first["stream_id"], 1)
    assert third[3] == 0
    messages = await client.wait_messages(2)
    assert [(m["id"], m["event"], m["data"]) for m in messages] == [
        (first["stream_id"].decode(), "label.created", {"id": 7, "text": "hello"}),
        (third[0].decode(), "label.deleted", [7]),
    ]
    await asyncio.sleep(50 * MS)
    assert len(client.messages) == 2  # the duplicate was not delivered


@pytest.mark.skipif(
    shutil.which("javac") is None or not MSGPACK_JAR.exists(),
    reason="needs javac and msgpack-java (apt-get install default-jdk-headless libmsgpack-java)",
)
async def test_wire_docs_java_payload_reaches_client(
    tmp_path: Path, client: Listener, raw: redis.Redis
) -> None:
    """docs/wire.md's RelayPayload.java, compiled, encodes a payload a client receives."""
    (tmp_path / "RelayPayload.java").write_text(block("java: RelayPayload", "java"))
    (tmp_path / "Emit.java").write_text(
        """
import java.util.*;

public class Emit {
    public static void main(String[] args) throws Exception {
        Map<String, Object> data = new LinkedHashMap<>();
        data.put("id", 7);
        data.put("text", "h\\u00e9llo");
        data.put("price", 1.5);
        data.put("big", 1L << 40);
        data.put("ok", true);
        data.put("none", null);
        data.put("tags", List.of("a", "b"));
        byte[] payload = RelayPayload.encode("cml", "label.created", data, args[0]);
        System.out.print(HexFormat.of().formatHex(payload));
    }
}
"""
    )

    def run_java() -> bytes:
        cp = f"{tmp_path}{os.pathsep}{MSGPACK_JAR}"
        subprocess.run(
            ["javac", "-cp", cp, "-d", str(tmp_path), *tmp_path.glob("*.java")],
            check=True,
            timeout=120_000 * MS,
        )
        out = subprocess.run(
            ["java", "-cp", cp, "Emit", "label-7"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60_000 * MS,
        ).stdout
        return bytes.fromhex(out)

    payload = await asyncio.to_thread(run_java)
    reply = raw.eval(
        PUBLISH_LUA.read_text(),
        4,
        *documented_keys("cml", "label-7"),
        *documented_args(payload, "label-7"),
    )
    assert reply[1:] == [1, 1, 0]
    [message] = await client.wait_messages(1)
    assert (message["event"], message["data"]) == (
        "label.created",
        {
            "id": 7,
            "text": "héllo",
            "price": 1.5,
            "big": 1 << 40,
            "ok": True,
            "none": None,
            "tags": ["a", "b"],
        },
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_wire_docs_curl_publish_reaches_client(
    relay: NodeUnderTest, client: Listener
) -> None:
    """The documented curl command, pointed at a real node, publishes to a client."""
    command = block("http-publish: curl", "sh").replace("http://relay.internal:8080", relay.base)
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "RELAY_API_KEY": API_KEY},
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 30_000 * MS)
    assert proc.returncode == 0, stdout
    answer = orjson.loads(stdout)
    assert {k: answer[k] for k in ("online", "receivers", "duplicate")} == {
        "online": True,
        "receivers": 1,
        "duplicate": False,
    }
    [message] = await client.wait_messages(1)
    assert (message["id"], message["event"], message["data"]) == (
        answer["id"],
        "label.created",
        {"id": 7, "text": "hello"},
    )
