"""``relay serve --workers N``: the supervisor of N node processes on one port.

The supervisor starts N ``relay serve --workers 1`` children (``SO_REUSEPORT``; each its
own node id, ``<node-id>-w<i>``), forwards SIGTERM/SIGINT to them, and restarts a worker
that exits on its own. After a crash the delay doubles with each crash in a row (a worker
that ran ``worker_restart_delay_max`` seconds starts afresh), so a worker that cannot
start does not spin; a worker that exits 0 drained on request and starts again at once
(:func:`_restart_delay`), also when the signal came while it was still starting
(:func:`_stop_signals_blocked`).

Orphans: each worker asks the kernel for SIGTERM when its parent dies
(``prctl(PR_SET_PDEATHSIG)``, Linux only), so a SIGKILLed supervisor takes its workers
with it: they drain (close 1012) and exit, as on an ordinary SIGTERM. A worker whose
supervisor died before it made that call notices the changed parent pid and stops too.
Elsewhere there is no such call; the workers then outlive a SIGKILLed supervisor.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from relay.backoff import Backoff, Jitter, Retry

__all__ = ["STOP_SIGNALS", "SUPERVISOR_PID_ENV", "die_with_supervisor", "supervise"]

SUPERVISOR_PID_ENV = "RELAY_SUPERVISOR_PID"
"""Set in each worker's environment: the pid whose death the worker follows."""

POLL_S = 0.1
"""How often the supervisor looks for exited workers and due restarts."""

_PR_SET_PDEATHSIG = 1

log = structlog.get_logger("relay.workers")


def die_with_supervisor() -> None:
    """In a worker: SIGTERM when the supervisor dies; stop now if it already has."""
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if not supervisor or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != int(supervisor):  # it died before the call above: reparented
        os.kill(os.getpid(), signal.SIGTERM)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGINT while a worker is started. The child inherits the mask, so a
    stop signal that reaches it before it has a handler (the interpreter's start and
    imports: 0.2-0.4 s) waits, where it used to kill the worker: a crash to this
    supervisor (restarted with backoff, logged as an error; exit 143 of the supervisor
    when it was stopping). The worker lets them in once it catches them
    (relay_cli.main), then drains and exits 0 as told. The supervisor's own signals wait
    until the worker is recorded, so they are forwarded to it too."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@dataclass
class _Worker:
    index: int
    retry: Retry  # crashes in a row, and the delay before the next start
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = None  # due restart (monotonic), while waiting out the delay


def _restart_delay(worker: _Worker, code: int, ran: float, restart_delay_max: float) -> float:
    """Seconds before ``worker``, which exited with ``code`` after ``ran`` s, starts again.

    Exit 0 is not a crash. A worker exits 0 only after draining on SIGTERM/SIGINT, and
    while the supervisor is not stopping that signal came to the worker alone: an operator
    recycling it (docs/operations.md). It is started again at once, as gunicorn's arbiter
    and uvicorn's supervisor do, and it breaks a row of crashes; the supervisor logs it at
    info, not error, since nothing failed. Any other code (a traceback, an OOM kill) is a
    crash: the delay doubles with each one in a row.
    """
    if code == 0:
        worker.retry.succeeded()
        return 0.0
    if ran >= restart_delay_max:
        worker.retry.succeeded()  # it ran a good while: not a crash loop
    return worker.retry.failed() or 0.0


def supervise(
    argv_for: Callable[[int], list[str]],
    count: int,
    *,
    env: dict[str, str],
    restart_delay: float,
    restart_delay_max: float,
    early_signals: Sequence[int] = (),
) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT; the exit code (0: every worker exited 0).

    ``argv_for(i)`` is worker ``i``'s argument list after ``python -m relay``. A worker
    killed by signal N counts as 128 + N.
    """
    backoff = Backoff(restart_delay, restart_delay_max, Jitter.NONE)
    workers = [_Worker(i, Retry(backoff)) for i in range(count)]
    stopping: list[int] = []
    env = dict(env, **{SUPERVISOR_PID_ENV: str(os.getpid())})

    def forward(signum: int, _: Any) -> None:
        stopping.append(signum)
        for worker in workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.proc.send_signal(signum)

    def start(worker: _Worker) -> None:
        argv = [sys.executable, "-m", "relay", *argv_for(worker.index)]
        with _stop_signals_blocked():
            worker.proc = subprocess.Popen(argv, env=env)
        worker.started = time.monotonic()
        worker.restart_at = None

    # Before the first spawn, so a SIGTERM that arrives meanwhile is forwarded too.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        start(worker)
    for signum in early_signals:  # caught before the forwarder was in place
        forward(signum, None)
    codes: dict[int, int] = {}
    while len(codes) < count:
        now = time.monotonic()
        for worker in workers:
            if worker.index in codes:
                continue
            if worker.restart_at is not None:
                if stopping:
                    codes[worker.index] = 0  # it had exited; nothing left to stop
                elif now >= worker.restart_at:
                    start(worker)
                    (log.warning if worker.retry.failures else log.info)(
                        "worker.restarted",
                        worker=worker.index,
                        pid=worker.proc.pid if worker.proc else None,
                        crashes_in_a_row=worker.retry.failures,
                    )
                continue
            assert worker.proc is not None
            code = worker.proc.poll()
            if code is None:
                continue
            if stopping:
                codes[worker.index] = 128 - code if code < 0 else code
                continue
            ran = now - worker.started
            delay = _restart_delay(worker, code, ran, restart_delay_max)
            worker.restart_at = now + delay
            (log.info if code == 0 else log.error)(
                "worker.exited",
                worker=worker.index,
                pid=worker.proc.pid,
                code=code,
                ran_s=round(ran, 3),
                restart_in_s=round(delay, 3),
            )
        time.sleep(POLL_S)
    return next((codes[i] for i in sorted(codes) if codes[i] != 0), 0)
