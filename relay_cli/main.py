"""``relay serve | publish | tail | token | clients | nodes | outbox-dispatch | bench``.

Every ``serve`` flag also reads ``RELAY_<FLAG>``. The other commands talk to Redis
(``--redis-url``) or to a node's HTTP API (``--http URL --api-key K``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import orjson

import relay
from relay.config import Settings, add_arguments, mask_url, resolve_settings
from relay.errors import ConfigError, EngineError, RelayError

__all__ = ["main"]


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# -- serve --------------------------------------------------------------------------------


_early_signals: list[int] = []
"""SIGTERM/SIGINT that arrived while a node was still starting (before its event loop)."""


def _catch_early_signals() -> None:
    stop_signals = (signal.SIGTERM, signal.SIGINT)
    for sig in stop_signals:
        signal.signal(sig, lambda signum, _: _early_signals.append(signum))
    # A worker of --workers starts with them blocked (relay_cli/workers.py): one sent
    # during its start waited, and arrives now, to be caught.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)


def _serve(args: argparse.Namespace) -> int:
    from relay.log import configure_logging

    settings, _ = _settings(args)
    configure_logging(settings.log_format, settings.log_level, settings.bad_request_log_rate)
    import structlog

    log = structlog.get_logger("relay.cli")
    settings.check_auth()
    if settings.allow_anonymous:
        log.warning(
            "auth.anonymous_enabled",
            message="--allow-anonymous: ANY client may connect as ANY client_id. Demo use only.",
        )
    if settings.workers > 1:
        return _serve_workers(settings, list(args.argv))
    from relay.app import serve
    from relay_cli.workers import die_with_supervisor

    die_with_supervisor()
    _install_uvloop()
    log.info("node.configured", settings=settings.redacted())
    if settings.sched_slice_ms:
        _request_sched_slice(settings.sched_slice_ms, log)
    try:
        asyncio.run(
            serve(
                settings,
                reuse_port=bool(os.environ.get("RELAY_REUSE_PORT")),
                signalled=_early_signals,
            )
        )
    except EngineError as exc:
        raise _redis_failed(settings.redis_url, exc) from None
    return 0


def _request_sched_slice(ms: float, log: Any) -> None:
    """--sched-slice-ms, before the event loop and its threads exist (they inherit it).
    Logged once; a refusal is a warning: the node runs on with the kernel's slice."""
    from relay_cli.sched import SliceRefused, request_slice

    try:
        granted = request_slice(ms)
    except SliceRefused as exc:
        log.warning(
            "node.sched_slice_refused",
            requested_ms=ms,
            reason=str(exc),
            message="--sched-slice-ms has no effect; the node runs with the kernel's slice",
        )
    else:
        log.info("node.sched_slice", slice_ms=granted / 1e6)


def _settings(args: argparse.Namespace) -> tuple[Settings, dict[str, str]]:
    """Flags > env > ``--config`` file (or RELAY_CONFIG) > defaults, with each one's source."""
    from relay.configfile import load_config_file

    path = args.config or os.environ.get("RELAY_CONFIG")
    file = load_config_file(path) if path else None
    return resolve_settings(args, file=file, file_name=path or "")


def _config_check(args: argparse.Namespace) -> int:
    """Print what `relay serve` would run with, after the checks it makes before starting."""
    from relay.configfile import render_settings

    settings, sources = _settings(args)
    settings.check_auth()
    print(render_settings(settings, sources), end="")
    return 0


def _redis_failed(url: str | None, exc: EngineError) -> ConfigError:
    """One line for an operator: which Redis (password masked), why, and what to fix."""
    why = str(exc)
    cause = exc.__cause__
    while isinstance(cause, RelayError):  # to the redis or socket error underneath
        cause = cause.__cause__
    if cause is not None and type(cause).__name__ not in why:
        why += f" ({type(cause).__name__}: {cause})"
    return ConfigError(
        f"Redis at {mask_url(url or '')}: {why}; check --redis-url (RELAY_REDIS_URL) and"
        " that Redis runs and is reachable from here"
    )


def _without_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` minus ``--flag value`` and ``--flag=value`` for each of ``flags``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in flags)):
            out.append(arg)
    return out


def _serve_workers(settings: Settings, argv: list[str]) -> int:
    """N node processes on one port (SO_REUSEPORT), each with its own node id.

    SIGTERM and SIGINT are forwarded to every worker (each drains); a worker that exits
    on its own is restarted with backoff (relay_cli/workers.py). The exit code is 0 only if
    every worker exited 0; a worker killed by signal N counts as 128 + N.
    """
    from relay_cli.workers import supervise

    base = _without_flags(argv, ("--workers", "--node-id"))
    return supervise(
        lambda i: [*base, "--workers", "1", "--node-id", f"{settings.node_id}-w{i}"],
        settings.workers,
        env=dict(os.environ, RELAY_REUSE_PORT="1", RELAY_WORKERS="1"),
        restart_delay=settings.worker_restart_delay,
        restart_delay_max=settings.worker_restart_delay_max,
        early_signals=_early_signals,
    )


# -- publish, clients, nodes ---------------------------------------------------------------


HTTP_TIMEOUT = 30.0
"""Seconds a CLI call to a node's HTTP API may take, connect included."""


async def _http(base: str, method: str, path: str, api_key: str | None, body: Any = None) -> Any:
    """One call to a node's API; every failure is a RelayError an operator can act on."""
    import aiohttp

    url = base.rstrip("/") + path
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as http,
            http.request(method, url, json=body, headers=headers) as response,
        ):
            raw = await response.read()
    except aiohttp.ClientConnectorError as exc:
        error = exc.os_error  # asyncio's text is "Connect call failed (host, port)"
        # A resolver error (socket.gaierror) has a negative errno and its own text.
        code = error.errno or 0
        why = os.strerror(code) if code > 0 else error.strerror or str(error)
        raise ConfigError(
            f"cannot reach a node at {base}: {why}; check --http (RELAY_HTTP) and that the"
            " node runs"
        ) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ConfigError(
            f"the node at {base} did not answer {method} {path}"
            f" ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''}); check --http"
            " (RELAY_HTTP)"
        ) from None
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ConfigError(
            f"{base} answered {method} {path} with HTTP {response.status} that is not JSON:"
            " is --http (RELAY_HTTP) the base URL of a relay node?"
        ) from None
    if response.status >= 400:
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        hint = "; check --api-key (RELAY_API_KEY)" if response.status == 401 else ""
        raise RelayError(f"HTTP {response.status}: {error.get('message', payload)}{hint}")
    return payload


def _need_target(args: argparse.Namespace) -> None:
    """--redis-url or --http, well-formed, before anything is sent."""
    from relay.engines import check_redis_url

    if args.http:
        if not args.http.startswith(("http://", "https://")):
            raise ConfigError(
                "--http (or RELAY_HTTP) is a node's base URL with its scheme,"
                f" e.g. http://127.0.0.1:8080 (got {args.http!r})"
            )
    elif args.redis_url:
        check_redis_url(args.redis_url)
    else:
        raise ConfigError(
            "give --redis-url URL (RELAY_REDIS_URL) or --http URL (RELAY_HTTP) with --api-key"
        )


def _json_argument(name: str, text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(
            f"{name} is not JSON ({exc}); quote it for the shell, e.g. '{{\"id\": 1}}'"
        ) from None


async def _publish(args: argparse.Namespace) -> int:
    _need_target(args)
    data = _json_argument("DATA", args.data) if args.data else None
    if args.http:
        body = {"biz_id": args.biz_id, "event": args.event, "data": data}
        if args.mid:
            body["mid"] = args.mid
        result = await _http(args.http, "POST", "/api/publish", args.api_key, body)
    else:
        from backend_adapter import AsyncPublisher

        async with AsyncPublisher(
            args.redis_url, key_prefix=args.key_prefix, min_replicas=args.redis_min_replicas
        ) as publisher:
            res = await publisher.publish(args.biz_id, args.event, data, mid=args.mid)
        result = {
            "id": res.id,
            "online": res.online,
            "receivers": res.receivers,
            "duplicate": res.duplicate,
        }
    print(orjson.dumps(result).decode())
    return 0


async def _clients(args: argparse.Namespace) -> int:
    _need_target(args)
    for client_id in args.client_ids:
        if args.http:
            result = await _http(args.http, "GET", f"/api/clients/{client_id}", args.api_key)
        else:
            result = await _with_redis_engine(args, "client_status", client_id)
        print(orjson.dumps(result).decode())
    return 0


async def _nodes(args: argparse.Namespace) -> int:
    _need_target(args)
    if args.http:
        result = await _http(args.http, "GET", "/api/nodes", args.api_key)
    else:
        result = {"nodes": await _with_redis_engine(args, "nodes")}
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0


async def _with_redis_engine(args: argparse.Namespace, method: str, *call_args: Any) -> Any:
    """Read the registry directly, without registering as a node."""
    from dataclasses import asdict, is_dataclass

    from relay.engine import EngineOptions
    from relay.engines.redis import RedisEngine

    engine = RedisEngine(args.redis_url, EngineOptions(key_prefix=args.key_prefix))
    try:
        result = await getattr(engine, method)(*call_args)
    finally:
        await engine.close()
    if isinstance(result, list):
        # NodeInfo flattens its figures, as /api/nodes does.
        return [r.to_dict() if hasattr(r, "to_dict") else asdict(r) for r in result]
    return asdict(result) if is_dataclass(result) and not isinstance(result, type) else result


async def _tail(args: argparse.Namespace) -> int:
    from relay.client import tail

    if not args.url.startswith(("ws://", "wss://", "http://", "https://")):
        raise ConfigError(
            "--url (or RELAY_URL) is a node's URL with its scheme, e.g. ws://127.0.0.1:8080"
            f" (got {args.url!r})"
        )
    if not args.as_client and not args.api_key:
        raise ConfigError(
            "relay tail watches as an observer, which needs the node's API key: give "
            "--api-key (or RELAY_API_KEY). --as-client connects as the client itself "
            "instead, and replaces the client's own session."
        )
    await tail(
        args.url,
        args.client_id,
        since=args.since,
        token=args.token,
        api_key=None if args.as_client else args.api_key,
        fmt=args.format,
    )
    return 0


def _token(args: argparse.Namespace) -> int:
    from backend_adapter import issue_token
    from relay.wire import validate_client_id

    if not args.auth_secret:
        raise ConfigError("give --auth-secret (or RELAY_AUTH_SECRET): the nodes' token secret")
    if args.ttl <= 0:
        raise ConfigError("--ttl must be a positive number of seconds")
    secret = args.auth_secret.split(",")[0].strip()  # the first of a rotation list signs
    print(issue_token(secret, validate_client_id(args.client_id), ttl=args.ttl))
    return 0


# -- entry point ---------------------------------------------------------------------------


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    help: str,
    *,
    default: Any = None,
    secret: bool = False,
    env: str | None = None,
    **kwargs: Any,
) -> None:
    """``--flag`` that defaults to ``RELAY_<FLAG>``; its help shows the default and the env."""
    env = env or "RELAY_" + flag.lstrip("-").replace("-", "_").upper()
    shown = "" if secret or default is None else f" (default: {default})"
    parser.add_argument(
        flag,
        default=os.environ.get(env, default),
        help=f"{help}{shown} [env {env}]".replace("%", "%%"),
        **kwargs,
    )


def _target_flags(parser: argparse.ArgumentParser) -> None:
    _option(parser, "--redis-url", "talk to Redis directly, e.g. redis://127.0.0.1:6379/0")
    _option(
        parser, "--http", "or go through a node's HTTP API: its base URL, e.g. http://host:8080"
    )
    _option(parser, "--api-key", "the node's API key, with --http", secret=True)
    _option(parser, "--key-prefix", "Redis key prefix, with --redis-url", default="relay")


_DESCRIPTION = """\
Relay pushes business events to the client connected with the same id (the BizId),
on whichever node it is connected.

Settings also read an environment variable RELAY_<FLAG> (--redis-url:
RELAY_REDIS_URL); a flag given on the command line wins. `relay COMMAND --help`
shows each command's flags with their defaults and [env vars].
"""

_EPILOG = """\
examples:
  relay serve --allow-anonymous --api-key dev-key          one node, memory engine
  relay serve --redis-url redis://127.0.0.1:6379/0 --auth-secret "$(openssl rand -hex 32)"
  relay publish cml label.created '{"id": 1}' --http http://127.0.0.1:8080 --api-key dev-key
  relay tail cml --url ws://127.0.0.1:8080 --api-key dev-key
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"relay {relay.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        usage="relay serve [options]",
        help="run a relay node",
        description="Run a relay node. Each flag's env var is in brackets; "
        "docs/configuration.md explains every setting.",
    )
    add_arguments(serve)
    serve.set_defaults(run=_serve)

    config = sub.add_parser(
        "config",
        help="check a configuration: `relay config check [serve's flags]`",
        description="Configuration tools.",
    )
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser(
        "check",
        usage="relay config check [--config FILE] [serve's options]",
        help="print the settings `relay serve` would run with (secrets masked)",
        description="Print the settings `relay serve` would run with, given the same flags,"
        " RELAY_* env vars and --config file, as TOML with secrets masked and each value's"
        " source; exit 2 with the reason if serve would refuse them.",
    )
    add_arguments(check)
    check.set_defaults(run=_config_check)

    publish = sub.add_parser(
        "publish",
        help="publish an event to a BizId",
        description="Publish one event, through Redis (--redis-url) or a node (--http).",
    )
    publish.add_argument("biz_id", metavar="BIZ_ID", help="the client id to deliver to")
    publish.add_argument("event", metavar="EVENT", help="the event name, e.g. label.created")
    publish.add_argument("data", metavar="DATA", nargs="?", help="JSON data (default: null)")
    publish.add_argument(
        "--mid", help="message id for idempotent publish (default: none; no env var)"
    )
    _option(
        publish,
        "--redis-min-replicas",
        "with --redis-url: succeed only once this many replicas hold the event (Redis WAIT)",
        default=0,
        type=int,
    )
    _target_flags(publish)
    publish.set_defaults(run=lambda a: asyncio.run(_publish(a)))

    tail = sub.add_parser(
        "tail",
        help="print CLIENT_ID's events as they arrive (an observer: the client stays connected)",
        description="Print CLIENT_ID's events as they arrive, one JSON line each; "
        "welcome and close lines go to stderr. Reconnects until Ctrl-C.",
    )
    tail.add_argument("client_id", metavar="CLIENT_ID")
    _option(tail, "--url", "the node (or load balancer)", default="ws://127.0.0.1:8080")
    tail.add_argument(
        "--since", help="replay what is still in history after this id first (no env var)"
    )
    _option(tail, "--api-key", "the node's API key (observers need it)", secret=True)
    tail.add_argument(
        "--as-client",
        action="store_true",
        help="connect as the client itself (with --token): replaces the client's session"
        " (no env var)",
    )
    _option(tail, "--token", "connection token, with --as-client", secret=True)
    _option(tail, "--format", "wire format", default="json", choices=("json", "msgpack"))
    tail.set_defaults(run=lambda a: asyncio.run(_tail(a)))

    token = sub.add_parser("token", help="print a connection token for CLIENT_ID")
    token.add_argument("client_id", metavar="CLIENT_ID")
    _option(
        token, "--ttl", "seconds until it expires", default=3600, type=int, env="RELAY_TOKEN_TTL"
    )
    _option(token, "--auth-secret", "the nodes' token secret (the first of a list)", secret=True)
    token.set_defaults(run=_token)

    clients = sub.add_parser("clients", help="show where client ids are connected")
    clients.add_argument("client_ids", nargs="+", metavar="CLIENT_ID")
    _target_flags(clients)
    clients.set_defaults(run=lambda a: asyncio.run(_clients(a)))

    sub.add_parser("bench", help="run Relay's benchmark (see docs/benchmarks.md; --help)")
    sub.add_parser(
        "outbox-dispatch",
        help="publish a transactional outbox table (--db-url, --redis-url; --help for more)",
        add_help=False,
    )

    nodes = sub.add_parser("nodes", help="list live nodes")
    _target_flags(nodes)
    nodes.set_defaults(run=lambda a: asyncio.run(_nodes(a)))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["outbox-dispatch"]:
        # Its own parser owns every flag, --help included.
        from backend_adapter.outbox import main as outbox_main

        return outbox_main(argv[1:])
    if argv[:1] == ["bench"]:
        from relay.bench.runner import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["serve"]:
        _catch_early_signals()  # a node stopped while starting still drains and exits 0
    args = build_parser().parse_args(argv)
    args.argv = argv  # `serve --workers N` starts its workers with the same arguments
    if args.command != "serve":
        # Their stdout is JSON for scripts: engine log lines go to stderr, warnings only.
        from relay.log import configure_logging

        configure_logging("console", "warning")
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except EngineError as exc:
        url = getattr(args, "redis_url", None)
        print(f"relay: {_redis_failed(url, exc) if url else exc}", file=sys.stderr)
        return 2
    except RelayError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
