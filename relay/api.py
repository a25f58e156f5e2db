"""HTTP API, health, metrics, and the JavaScript client.

Every ``/api/*`` route needs ``Authorization: Bearer <api key>``; without a configured
key the API answers 404 (off). Errors are ``{"error": {"code", "message"}}`` with 400,
401, 404, 413 or 503.

``/client/relay-client.js`` serves the JS client shipped in the package
(``relay/static``, a link to ``clients/js/relay-client.js``) to pages of any origin, so a
page imports the client of the very node it talks to.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Final

import orjson
import structlog
from aiohttp import web

from relay.auth import api_key_matches
from relay.errors import EngineUnavailable, InvalidInput, PayloadTooLarge, RelayError
from relay.log import bad_request
from relay.wire import validate_client_id
from relay.ws import NODE_KEY

__all__ = ["CLIENT_SCRIPT_PATH", "add_routes", "client_script", "error_middleware"]

CLIENT_SCRIPT_PATH: Final = "/client/relay-client.js"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger("relay.api")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """API errors as JSON; never a traceback, in the answer or in the log."""
    node = request.config_dict[NODE_KEY]
    api_key = node.settings.api_key
    if not api_key:
        return _error(404, "api_disabled", "the HTTP API is off: start the node with --api-key")
    if not api_key_matches(request.headers.get("Authorization"), api_key):
        return _error(401, "unauthorized", "missing or wrong API key")
    try:
        return await handler(request)
    except PayloadTooLarge as exc:
        return _error(413, exc.code, str(exc))
    except InvalidInput as exc:
        return _error(400, exc.code, str(exc))
    except EngineUnavailable:
        return _error(503, "unavailable", "the broker is unavailable; retry later")
    except RelayError as exc:
        return _error(503, "engine_error", str(exc))
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "too_large", "request body too large")
    except web.HTTPException as exc:
        return _error(exc.status, "http_error", exc.reason)
    except ConnectionError:  # the client hung up mid-body: nobody reads the answer
        bad_request("client disconnected mid-request", path=request.path)
        return _error(400, "bad_request", "client disconnected")
    except Exception as exc:
        # Not ours: its message may carry anything, so only its type is logged.
        log.error("api.failed", path=request.path, error=type(exc).__name__)
        return _error(500, "internal_error", "internal error")


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidInput("body must be a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidInput("body must be a JSON object")
    return body


async def publish(request: web.Request) -> web.Response:
    body = await _body(request)
    node = request.config_dict[NODE_KEY]
    biz_id, event = body.get("biz_id"), body.get("event")
    if not isinstance(biz_id, str) or not isinstance(event, str):
        raise InvalidInput("'biz_id' and 'event' are required strings")
    result = await node.publish(biz_id, event, body.get("data"), mid=body.get("mid"))
    return _json(
        {
            "id": result.id,
            "online": result.online,
            "receivers": result.receivers,
            "duplicate": result.duplicate,
        }
    )


async def client_status(request: web.Request) -> web.Response:
    client_id = validate_client_id(request.match_info["client_id"])
    status = await request.config_dict[NODE_KEY].engine.client_status(client_id)
    return _json(
        {
            "client_id": status.client_id,
            "online": status.online,
            "node": status.node,
            "session": status.session,
            "since": status.since,
            "last_ack": status.last_ack,
        }
    )


async def kick_client(request: web.Request) -> web.Response:
    client_id = validate_client_id(request.match_info["client_id"])
    found = await request.config_dict[NODE_KEY].kick(client_id)
    if not found:
        return _error(404, "not_found", "no session of this client_id is known")
    return _json({"client_id": client_id, "kicked": True})


async def nodes(request: web.Request) -> web.Response:
    infos = await request.config_dict[NODE_KEY].engine.nodes()
    return _json(
        {
            "nodes": [
                {
                    "node": n.node,
                    "connections": n.connections,
                    "started_at": n.started_at,
                    "last_seen": n.last_seen,
                    **dataclasses.asdict(n.figures),
                }
                for n in infos
            ]
        }
    )


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok", "node": request.config_dict[NODE_KEY].id})


async def readyz(request: web.Request) -> web.Response:
    node = request.config_dict[NODE_KEY]
    if node.ready:
        return _json({"status": "ready", "node": node.id})
    body = {"status": "unavailable", "reason": node.unready_reason(), "node": node.id}
    if node.start_error is not None:
        body["error"] = node.start_error  # why it is still starting (never a secret)
    return _json(body, status=503)


def client_script() -> bytes:
    """The JS client's source as shipped in the package."""
    return (resources.files("relay") / "static" / "relay-client.js").read_bytes()


def _script_handler() -> Handler:
    """Serve the JS client: read once, any origin may import it, revalidated by ETag."""
    body = client_script()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {
        "Content-Type": "text/javascript; charset=utf-8",
        "Access-Control-Allow-Origin": "*",
        "Cache-Control": "no-cache",
        "ETag": etag,
        "X-Content-Type-Options": "nosniff",
    }

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers=headers)

    return handler


async def metrics(request: web.Request) -> web.Response:
    body = request.config_dict[NODE_KEY].metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


def add_routes(app: web.Application) -> None:
    """Health and metrics on ``app``; the API on a sub-application with its own middleware.

    WebSocket routes stay outside any middleware: a middleware's frame would live as long
    as each connection.
    """
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get(CLIENT_SCRIPT_PATH, _script_handler())
    api = web.Application(middlewares=[error_middleware])
    api.router.add_post("/publish", publish)
    api.router.add_get("/clients/{client_id}", client_status)
    api.router.add_delete("/clients/{client_id}", kick_client)
    api.router.add_get("/nodes", nodes)
    app.add_subapp("/api/", api)
