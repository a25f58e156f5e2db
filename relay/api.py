"""HTTP API, health, metrics, and the JavaScript client.

Every ``/api/*`` route needs ``Authorization: Bearer <api key>``; without a configured
key the API answers 404 (off). Errors are ``{"error": {"code", "message"}}`` with 400,
401, 404, 413 or 503.

``/client/relay-client.js`` serves the JS client shipped in the package
(``relay/static``, a link to ``clients/js/relay-client.js``) to pages of any origin, so a
page imports the client of the very node it talks to.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources
from typing import Any, Final

import orjson
import structlog
from aiohttp import web

from relay.auth import api_key_matches
from relay.errors import (
    EngineUnavailable,
    InvalidClientId,
    InvalidInput,
    PayloadTooLarge,
    RelayError,
)
from relay.log import bad_request
from relay.node import Node
from relay.protocol import encode_http_error
from relay.wire import PublishResult, validate_client_id
from relay.ws import NODE_KEY

__all__ = ["CLIENT_SCRIPT_PATH", "add_routes", "client_script", "error_middleware"]

CLIENT_SCRIPT_PATH: Final = "/client/relay-client.js"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger("relay.api")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        body=encode_http_error(code, message), status=status, content_type="application/json"
    )


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


PUBLISH_FIELDS: Final = ("biz_id", "event", "data", "mid")


def _unknown(fields: Iterable[str], allowed: tuple[str, ...], what: str) -> InvalidInput:
    """400 naming the fields nobody reads (a typo such as ``"date"`` would lose data)."""
    names = sorted(fields)
    shown = ", ".join(repr(name[:64]) for name in names[:8]) + (", …" if len(names) > 8 else "")
    plural = "s" if len(names) > 1 else ""
    return InvalidInput(f"unknown field{plural} {shown}; {what} has {', '.join(allowed)}")


def publish_fields(body: Any) -> tuple[str, str, Any, str | None]:
    """``(biz_id, event, data, mid)`` of one publish object; InvalidInput naming the field.

    The values are checked again (and fully) by the wire encoder; this names what is
    wrong in the API's own words.
    """
    if not isinstance(body, dict):
        raise InvalidInput("an event must be a JSON object")
    unknown = body.keys() - PUBLISH_FIELDS
    if unknown:
        raise _unknown(unknown, PUBLISH_FIELDS, "an event")
    biz_id, event, mid = body.get("biz_id"), body.get("event"), body.get("mid")
    if not isinstance(biz_id, str):
        raise InvalidInput("'biz_id' is required: a string")
    try:
        validate_client_id(biz_id)
    except InvalidClientId:
        raise InvalidClientId(
            "'biz_id' must be 1-128 characters of A-Z a-z 0-9 _ . : @ -"
        ) from None
    if not isinstance(event, str):
        raise InvalidInput("'event' is required: a string")
    if mid is not None and not isinstance(mid, str):
        raise InvalidInput("'mid' must be a string")
    return biz_id, event, body.get("data"), mid


def _answer(result: PublishResult) -> dict[str, Any]:
    return {
        "id": result.id,
        "online": result.online,
        "receivers": result.receivers,
        "duplicate": result.duplicate,
    }


def _failure(exc: RelayError) -> dict[str, Any]:
    """One event's error in a batch answer: the code and message a single publish gives."""
    if isinstance(exc, InvalidInput):
        code, message = exc.code, str(exc)
    elif isinstance(exc, EngineUnavailable):
        code, message = "unavailable", "the broker is unavailable; retry later"
    else:
        code, message = "engine_error", str(exc)
    return {"error": {"code": code, "message": message}}


async def publish(request: web.Request) -> web.Response:
    body = await _body(request)
    node = request.config_dict[NODE_KEY]
    if "events" in body:
        return _json({"results": await _publish_batch(node, body)})
    biz_id, event, data, mid = publish_fields(body)
    return _json(_answer(await node.publish(biz_id, event, data, mid=mid)))


async def _publish_batch(node: Node, body: dict[str, Any]) -> list[dict[str, Any]]:
    """One result per event, in order: its answer, or its own error.

    The events of one BizId go to the engine as one run, in the order given (on Redis:
    one script call); different BizIds go concurrently. A run holding an event the
    engine refuses (too large) is published event by event, so only that event fails.
    """
    unknown = body.keys() - {"events"}
    if unknown:
        raise _unknown(unknown, ("events",), "a batch")
    events = body["events"]
    limit = node.settings.publish_batch_max
    if not isinstance(events, list) or not events:
        raise InvalidInput("'events' must be a non-empty list of events")
    if len(events) > limit:
        raise InvalidInput(
            f"'events' has {len(events)} events; at most {limit} per call (--publish-batch-max)"
        )
    results: list[dict[str, Any]] = [{} for _ in events]
    by_biz: dict[str, list[tuple[int, tuple[str, Any, str | None]]]] = {}
    for i, item in enumerate(events):
        try:
            biz_id, event, data, mid = publish_fields(item)
        except InvalidInput as exc:
            results[i] = _failure(exc)
        else:
            by_biz.setdefault(biz_id, []).append((i, (event, data, mid)))

    async def publish_one_by_one(
        biz_id: str, items: list[tuple[int, tuple[str, Any, str | None]]]
    ) -> None:
        for i, (event, data, mid) in items:
            try:
                results[i] = _answer(await node.publish(biz_id, event, data, mid=mid))
            except RelayError as exc:
                results[i] = _failure(exc)

    async def publish_run(
        biz_id: str, items: list[tuple[int, tuple[str, Any, str | None]]]
    ) -> None:
        try:
            answers = await node.publish_run(biz_id, [fields for _, fields in items])
        except InvalidInput:
            await publish_one_by_one(biz_id, items)
            return
        except RelayError as exc:
            for i, _ in items:
                results[i] = _failure(exc)
            return
        for (i, _), answer in zip(items, answers, strict=True):
            results[i] = _answer(answer)

    await asyncio.gather(*(publish_run(b, items) for b, items in by_biz.items()))
    return results


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
    return _json({"nodes": [info.to_dict() for info in infos]})


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
