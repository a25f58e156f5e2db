"""``relay outbox-dispatch`` (and ``python -m backend_adapter.outbox``): flags and env."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import sqlalchemy as sa

from backend_adapter._sync import Publisher
from backend_adapter.outbox._dispatcher import OutboxDispatcher
from backend_adapter.outbox._table import (
    OUTBOX,
    create_outbox_table,
    define_outbox_table,
)
from relay.errors import ConfigError, RelayError

log = logging.getLogger("backend_adapter.outbox")  # one logger for the whole outbox


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"RELAY_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay outbox-dispatch",
        description="Publish the rows of a transactional outbox table to Relay until stopped.",
    )
    parser.add_argument(
        "--db-url",
        default=_env("OUTBOX_DB_URL"),
        help="SQLAlchemy URL of the database holding the outbox (env RELAY_OUTBOX_DB_URL)",
    )
    parser.add_argument(
        "--redis-url", default=_env("REDIS_URL"), help="Redis of the relay (env RELAY_REDIS_URL)"
    )
    parser.add_argument(
        "--redis-min-replicas",
        type=int,
        default=int(_env("REDIS_MIN_REPLICAS", "0") or 0),
        help="a row counts as published only once this many Redis replicas hold it (WAIT);"
        " env RELAY_REDIS_MIN_REPLICAS",
    )
    parser.add_argument("--table", default=_env("OUTBOX_TABLE", "relay_outbox"))
    parser.add_argument(
        "--create-table",
        action="store_true",
        help="create the table if missing, and upgrade one made by an older version",
    )
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds (default 0.5)")
    parser.add_argument("--max-backoff", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument(
        "--retention",
        type=float,
        default=86400.0,
        help="delete rows published this many seconds ago; 0 keeps them (default 86400)",
    )
    parser.add_argument("--mid-prefix", default=_env("OUTBOX_MID_PREFIX", "outbox"))
    parser.add_argument("--once", action="store_true", help="drain what is pending, then exit")
    parser.add_argument("--key-prefix", default=_env("KEY_PREFIX", "relay"))
    parser.add_argument("--history-size", type=int, default=int(_env("HISTORY_SIZE", "100") or 0))
    parser.add_argument("--history-ttl", type=int, default=int(_env("HISTORY_TTL", "3600") or 0))
    parser.add_argument("--dedupe-window", type=int, default=int(_env("DEDUPE_WINDOW", "600") or 0))
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``relay outbox-dispatch``: run a dispatcher until SIGTERM/SIGINT (or ``--once``).

    Exit status 0 when stopped (or drained with ``--once``), 1 when ``--once`` could not
    drain (Redis or the database down), 2 for bad arguments.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if not args.db_url or not args.redis_url:
        print("relay outbox-dispatch: --db-url and --redis-url are required", file=sys.stderr)
        return 2
    try:
        table = (
            OUTBOX if args.table == OUTBOX.name else define_outbox_table(sa.MetaData(), args.table)
        )
        publisher = Publisher(
            args.redis_url,
            key_prefix=args.key_prefix,
            history_size=args.history_size,
            history_ttl=args.history_ttl,
            dedupe_window=args.dedupe_window,
            min_replicas=args.redis_min_replicas,
        )
        dispatcher = OutboxDispatcher(
            args.db_url,
            publisher,
            table=table,
            batch_size=args.batch_size,
            poll_interval=args.poll_interval,
            max_backoff=args.max_backoff,
            mid_prefix=args.mid_prefix,
            retention=args.retention or None,
        )
    except (RelayError, sa.exc.ArgumentError) as exc:
        print(f"relay outbox-dispatch: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # SQLAlchemy's URL parser on a bad port, say
        print(f"relay outbox-dispatch: bad --db-url: {exc}", file=sys.stderr)
        return 2
    with publisher, dispatcher:
        try:
            if args.create_table:
                create_outbox_table(dispatcher.engine, table)
            if args.once:
                return _drain(dispatcher)

            def on_signal(signum: int, frame: FrameType | None) -> None:
                log.info("outbox.stopping: signal %d", signum)
                dispatcher.stop()

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            log.info("outbox.started: table %s, batch %d", table.name, args.batch_size)
            dispatcher.run_forever()
        except ConfigError as exc:
            print(f"relay outbox-dispatch: {exc}", file=sys.stderr)
            return 2
    return 0


def _drain(dispatcher: OutboxDispatcher) -> int:
    total = 0
    try:
        while True:
            stats = dispatcher.run_once()
            total += stats.published
            renewed = stats.collisions or stats.uids_assigned  # ready for the next round
            if not renewed and (stats.published == 0 or stats.claimed < dispatcher.batch_size):
                break
    except ConfigError:
        raise
    except Exception as exc:
        log.error("outbox.drain_failed after %d row(s): %s", total, exc)
        return 1
    log.info("outbox.drained: %d row(s) published", total)
    return 0
