"""Transactional outbox: the event is a row written in the business transaction.

Why: publish-after-commit loses the event when the process dies, or Redis is down,
between the commit and the publish. Here the event is an INSERT into ``relay_outbox``
in the same transaction as the business change, so both commit or neither does, and a
dispatcher publishes the committed rows afterwards, however long Redis is away.

- :func:`enqueue` (or :func:`enqueue_async`) writes one row in the caller's transaction.
- :class:`OutboxDispatcher` publishes pending rows in id order with
  ``mid = "<mid_prefix>:<row uid>"`` and marks them ``published_at``; ``run_forever``
  retries with full-jitter backoff while Redis (or the database) is down.
- :func:`main` is ``relay outbox-dispatch --db-url ... --redis-url ...``.

Guarantees (docs/backend.md explains them at length):

- Mids unique by construction: each row carries a random ``uid`` (written by
  :func:`enqueue`, or by the dispatcher before a row's first publish), never the row
  id, which repeats in every other database and in a recreated or restored one. Redis
  would take such a repeat for a duplicate and drop it. A ``duplicate`` answer for a row
  whose mid another event holds is the warning ``outbox.unexpected_duplicate``, and the
  row goes out again under a new uid.
- No loss: a row stays pending until a publish of it succeeded and the mark committed.
- No duplicate in the BizId's history: a row published but not marked (a crash, a lost
  connection) is published again with the same ``mid``, which Redis recognises for
  ``dedupe_window`` seconds and answers ``duplicate=True`` without publishing. After a
  longer outage of the dispatcher itself, such a row is published a second time:
  at-least-once, not exactly-once, beyond the window.
- Order per BizId: rows of one BizId are published in id order. Two transactions that
  run at the same time may commit in the other order than their ids; the one committed
  first can then be published first. Transactions that do not overlap keep commit order.
- Several dispatchers on PostgreSQL: each claims a batch with ``FOR UPDATE SKIP LOCKED``
  and publishes a BizId's rows only up to the first pending row of that BizId it does
  not hold (another dispatcher has it, or it became visible after the claim); the rest
  wait for a later round. So no row is published by two dispatchers, and one BizId's
  rows never overtake each other. On SQLite run one dispatcher: it reads without
  locking (a write lock held across a Redis publish would block the application), so
  two would publish the same rows twice (harmless within the dedupe window, but wasted).

A row that can never be published (data or BizId that fails validation, a Redis key of
the wrong type) is a poison row: it stays pending with ``attempts`` and ``last_error``
set, later rows of its BizId wait behind it, other BizIds go on. Fix or delete it.

The package's modules: ``_table`` (definition, creation, the up-to-date check),
``_enqueue`` (writing rows), ``_dispatcher`` (publishing them) and ``_cli`` (``relay
outbox-dispatch``). Every name is imported from here; they share the logger
``backend_adapter.outbox``.
"""

from backend_adapter.outbox._cli import build_parser, main
from backend_adapter.outbox._dispatcher import DispatchStats, OutboxDispatcher
from backend_adapter.outbox._enqueue import enqueue, enqueue_async, enqueue_many
from backend_adapter.outbox._table import (
    METADATA,
    OUTBOX,
    create_outbox_table,
    define_outbox_table,
)

__all__ = [
    "METADATA",
    "OUTBOX",
    "DispatchStats",
    "OutboxDispatcher",
    "build_parser",
    "create_outbox_table",
    "define_outbox_table",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "main",
]
