"""The node serves the JS client: the shipped bytes, to any origin, as a JavaScript module."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest

from relay.api import CLIENT_SCRIPT_PATH, client_script
from tests.js.conftest import ROOT
from tests.support.node import NodeUnderTest, node_settings

SOURCE = ROOT / "clients" / "js" / "relay-client.js"


@pytest.fixture
async def relay() -> AsyncIterator[NodeUnderTest]:
    node = await NodeUnderTest(node_settings()).start()
    yield node
    await node.stop()


def test_package_ships_the_same_bytes_as_clients_js() -> None:
    """relay/static/relay-client.js is the one in clients/js (a link, not a copy)."""
    assert client_script() == SOURCE.read_bytes()
    shipped = ROOT / "relay" / "static" / "relay-client.js"
    assert shipped.is_symlink() and shipped.resolve() == SOURCE.resolve()


def test_package_json_names_the_module_and_its_version() -> None:
    """clients/js/package.json: an ES module whose entry is relay-client.js, same version."""
    package = json.loads((SOURCE.parent / "package.json").read_text())
    assert package["type"] == "module" and package["exports"] == "./relay-client.js"
    assert "dependencies" not in package  # no dependencies: ws is the app's choice in Node
    version = re.search(r'export const VERSION = "([^"]+)"', SOURCE.read_text())
    assert version is not None and version.group(1) == package["version"]


async def test_node_serves_the_client_to_any_origin(relay: NodeUnderTest) -> None:
    """GET /client/relay-client.js: the bytes, a JS type, CORS for every origin, an ETag."""
    url = relay.base + CLIENT_SCRIPT_PATH
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Origin": "https://app.example"}) as response:
            assert response.status == 200
            assert await response.read() == SOURCE.read_bytes()
            assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            etag = response.headers["ETag"]
        async with http.get(url, headers={"If-None-Match": etag}) as again:
            assert again.status == 304
            assert again.headers["Access-Control-Allow-Origin"] == "*"
