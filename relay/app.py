"""The aiohttp application and the process lifecycle: start, serve, drain on SIGTERM.

The Application owns the node through ``cleanup_ctx``; on shutdown the node drains
(sessions closed 1012, deregistered) before aiohttp closes what is left.
:func:`create_app` also starts it before serving; :func:`serve` listens first
and then starts the node, so health answers while it waits for Redis. A node that
takes no sessions (starting, draining, Redis unavailable) refuses a handshake at once,
with 1013 or 1012 after the upgrade (what WebSocketSharp can read). Behind a load
balancer that retries a 503 on another node and says so with the ``X-Relay-Lb-Retry``
request header (deploy/nginx/ and deploy/haproxy/ templates do), it answers HTTP 503
instead: the balancer hands the client to a node that takes it, where a 1012 would send
the client back (least_conn picks the node with the fewest connections, which a draining
node is).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from relay.api import add_routes
from relay.config import Settings
from relay.edge import EDGE_KEY, Edge, adopt, adopt_observer
from relay.engine import Engine
from relay.engines import create_engine
from relay.errors import ConfigError
from relay.metrics import Metrics
from relay.node import Node
from relay.status import add_status_routes
from relay.ws import LB_RETRY_HEADER, NODE_KEY

__all__ = [
    "EDGE_KEY",
    "LB_RETRY_HEADER",
    "NODE_KEY",
    "accept_queue",
    "create_app",
    "listening_socket",
    "migrates_queued_connections",
    "serve",
]

log = structlog.get_logger("relay.app")


def create_app(
    settings: Settings, engine: Engine | None = None, *, start: bool = True
) -> web.Application:
    """An Application serving one node. ``engine`` overrides the one settings ask for.

    With ``start`` the node starts (one attempt) before the Application serves; without,
    the caller starts it (:func:`serve` does, once it listens, so health answers meanwhile).
    """
    engine = engine or create_engine(settings.redis_url, settings.engine_options)
    node = Node(settings, engine, Metrics())
    app = web.Application(
        client_max_size=2 * settings.max_payload + 4096,
    )
    app[NODE_KEY] = node
    # The one WebSocket server is the edge (relay.edge). aiohttp sees only observers and
    # upgrades arriving on a keep-alive connection it serves, and gives their socket to it.
    app[EDGE_KEY] = Edge(node)
    app.router.add_get("/ws/{client_id}", adopt)
    app.router.add_get("/observe/{client_id}", adopt_observer)
    add_routes(app)
    add_status_routes(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if start:
            await node.start()
        yield
        await drain(app)
        # The edge's heartbeat sweep and any socket it still holds end with the app (also
        # when it is mounted in another server and only ever saw adopted WebSockets).
        await app[EDGE_KEY].close()

    async def drain(app: web.Application) -> None:
        # On shutdown, before aiohttp closes the connections: its WebSockets then get
        # 1012 (reconnect at once, resume) rather than a dropped socket. `relay serve`
        # has drained already, with the full --drain-grace.
        if not node.draining:
            await node.drain(min(settings.drain_grace, 2.0))

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(drain)
    return app


async def _start_unless_stopped(node: Node, timeout: float, stop: asyncio.Event) -> None:
    """Start the node, waiting for the engine; give up quietly if told to stop first."""
    starting = asyncio.create_task(node.start(timeout), name="relay-node-start")
    stopping = asyncio.create_task(stop.wait(), name="relay-stop-wait")
    try:
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not starting.done():
            starting.cancel()
        await asyncio.gather(stopping, return_exceptions=True)
    with contextlib.suppress(asyncio.CancelledError):
        await starting


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A bound, listening socket; ConfigError naming the flags when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = exc.strerror or type(exc).__name__
        if exc.errno == errno.EADDRINUSE:
            why += " (another process listens there)"
        raise ConfigError(
            f"cannot listen on {host}:{port}: {why}; choose another --port/--host"
            " (RELAY_PORT, RELAY_HOST)"
        ) from None
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def accept_queue(sock: socket.socket) -> int | None:
    """Connections waiting in a listening socket's accept queue (Linux; else None).

    For a listener, TCP_INFO's ``tcpi_unacked`` is the accept queue's length.
    """
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None or sock.fileno() < 0:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 32)
    except OSError:
        return None
    return int.from_bytes(info[24:28], sys.byteorder) if len(info) >= 28 else None


def migrates_queued_connections() -> bool | None:
    """Whether a closing SO_REUSEPORT listener hands its queued connections to the others
    (``net.ipv4.tcp_migrate_req``, Linux 5.14+, per network namespace); None: unknown."""
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as setting:
            return setting.read().strip() == "1"
    except OSError:
        return None


def _leave_port(edge: Edge, sock: socket.socket) -> None:
    """Close a --workers worker's share of the port, saying what the kernel did with the
    connections that were waiting to be accepted: without ``tcp_migrate_req`` each is
    reset (docs/operations.md, "Several workers on one port")."""
    queued = accept_queue(sock)
    edge.stop_listening()
    migrated = migrates_queued_connections()
    if queued and not migrated:
        log.warning(
            "listener.closed",
            queued=queued,
            reset=queued,
            message="connections waiting to be accepted were reset by the kernel;"
            " sysctl net.ipv4.tcp_migrate_req=1 hands them to the other workers",
        )
    else:
        log.info("listener.closed", queued=queued or 0, migrated=migrated)


def _exit_now(code: int) -> None:
    """End the process at once, its log lines written out first."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _exit_at_grace(grace: float, node: Node) -> threading.Timer:
    """Exit 0 ``grace`` seconds from now (SIGTERM), whatever the event loop is doing.

    The drain keeps to its deadline only between the loop's turns, and a starved worker
    can spend seconds in one turn: thousands of close handshakes ending together. One of
    8 workers on 2 cores with 12,480 sessions (grace 10 s) looked at the clock again
    3.3 s after a 20 ms sleep, at 11.4 s, and exited after 12.7 s. This timer runs in a
    thread of its own (it needs only the interpreter lock, which a busy loop yields every
    5 ms) and ends the process as the drain itself does when its time is up: the
    sessions still open are left to the kernel, and a node not yet deregistered expires
    with its TTL. ``node.exit_forced`` says where the loop was.
    """
    main = threading.main_thread().ident
    began = time.monotonic()

    def fire() -> None:
        frame = sys._current_frames().get(main or 0)
        where: list[str] = []
        while frame is not None and len(where) < 4:
            code = frame.f_code
            where.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {code.co_name}")
            frame = frame.f_back
        log.warning(
            "node.exit_forced",
            node=node.id,
            after_s=round(time.monotonic() - began, 3),
            left=len(node.sessions),
            stopping=node.stopped,  # past the drain, stopping its loops and the engine
            where=where,
        )
        _exit_now(0)

    timer = threading.Timer(max(1.0, grace), fire)
    timer.daemon = True
    timer.start()
    return timer


def _tune_gc() -> None:
    """Keep the collector's pauses out of the delivery path.

    Everything alive at start (modules, settings, the engine) moves to the permanent
    generation, and young collections run less often: a full collection over thousands
    of sessions' objects is a multi-millisecond pause in the middle of fan-out.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


async def serve(
    settings: Settings, *, reuse_port: bool = False, signalled: list[int] | None = None
) -> None:
    """Run one node until SIGTERM/SIGINT, then drain: readiness 503, 1012s, deregister.

    The node listens first and then starts: while Redis is unreachable it keeps trying
    (``--start-timeout``, 0 = for ever), ``/healthz`` 200 and ``/readyz`` 503 meanwhile,
    and handshakes are refused at once. Past the timeout EngineUnavailable is raised.

    ``signalled`` holds signals caught before the loop ran (see relay_cli): a node told
    to stop while starting still drains and exits 0.
    """
    app = create_app(settings, start=False)
    node = app[NODE_KEY]
    # keepalive_timeout is aiohttp's only deadline on reading a request head: it runs
    # from accept (or the last response) until a whole head has arrived.
    # shutdown_timeout: how long HTTP requests still running after the drain may take
    # (the drain's grace is over by then; a status feed ends at shutdown by itself).
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=1.0,
        keepalive_timeout=settings.handshake_timeout,
    )
    await runner.setup()
    sock = listening_socket(settings.host, settings.port, reuse_port)
    assert runner.server is not None  # made by setup()
    edge = app[EDGE_KEY]
    await edge.listen(sock, runner.server)
    _tune_gc()
    log.info(
        "node.listening",
        node=node.id,
        host=settings.host,
        port=settings.port,
        engine=node.engine.name,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if signalled:
        stop.set()
    try:
        await _start_unless_stopped(node, settings.start_timeout, stop)
    except BaseException:
        edge.stop_listening()
        await edge.close()
        await runner.cleanup()
        raise
    await stop.wait()
    backstop = _exit_at_grace(settings.drain_grace, node)
    if reuse_port:
        # A worker of `relay serve --workers N` shares its port: closing its listener at
        # once hands new connections, its own clients' reconnects among them, to the
        # other workers, which answer the health checks too. (Left open, the kernel
        # keeps sending it a share of them, each refused: 26,595 failed handshakes when
        # one of 8 workers drained 13,828 of 100,000 clients, docs/benchmarks.md.)
        _leave_port(edge, sock)
    # Readiness turns 503 at once; the listener stays open for health checks while
    # sessions are closed in batches, then everything stops.
    await node.drain(exiting=True)
    if node.sessions:
        # The drain's deadline came with sessions still open, left as they are: exit
        # now and let the kernel close their sockets, rather than spend the time past
        # the grace that closing them one by one, and the loop's and interpreter's
        # teardown of them, would take (8.6 s for 8,642 in a starved worker).
        _exit_now(0)
    # Stop listening first, and let connections accepted in the last instant send their
    # request (answered 1012/503): aiohttp's cleanup drops the data of a connection it
    # closes before its first request and then waits shutdown_timeout (5 s) for it.
    edge.stop_listening()
    await asyncio.sleep(0.1)
    await edge.close()
    await runner.cleanup()
    backstop.cancel()
    # Closing the loop would restore the default dispositions, and a second SIGTERM
    # (a supervisor repeating itself) would then kill a process that drained cleanly
    # with 143 instead of letting it exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
