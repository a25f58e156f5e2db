"""Chaos under load through nginx: a client gets every accepted event or is told it cannot.

The short form runs in ``make test`` (~2 minutes of faults); ``make chaos`` runs the long
form (20 minutes, 300 clients, ~500 events/s). Environment: ``CHAOS_SECONDS``,
``CHAOS_CLIENTS``, ``CHAOS_RATE`` (events/s in all), ``CHAOS_SEED`` (the fault sequence;
printed, so a failing run can be repeated). See tests/cluster/chaos.py for the faults and
the rule.
"""

from __future__ import annotations

import os

import pytest

from tests.cluster.chaos import SETTINGS, run_chaos
from tests.cluster.conftest import MakeCluster

SECONDS = float(os.environ.get("CHAOS_SECONDS", "120"))
CLIENTS = int(os.environ.get("CHAOS_CLIENTS", "150"))
RATE = float(os.environ.get("CHAOS_RATE", "150"))
SEED = int(os.environ.get("CHAOS_SEED", "20261204"))


@pytest.mark.timeout(SECONDS + 240)  # faults, then start-up, recovery and delivery
async def test_chaos_every_accepted_event_is_held_in_order_or_the_client_was_told(
    make_cluster: MakeCluster,
) -> None:
    """Random node kills and drains, Redis restarts, stalls and pub/sub kills: no silent loss."""
    cluster = await make_cluster(3, **SETTINGS)
    outcome = await run_chaos(cluster, seconds=SECONDS, clients=CLIENTS, rate=RATE, seed=SEED)
    report = outcome.report(f"chaos, {CLIENTS} clients via {cluster.describe_balancer()}")
    print("\n" + report)
    assert outcome.back_within <= 10.0, report  # nobody locked out by the balancer
    for verdict in (outcome.verdict, outcome.hot):
        assert verdict.silent == 0, report + "\n" + "\n".join(verdict.examples)
        assert (verdict.out_of_order, verdict.twice, verdict.terminal) == (0, 0, 0), report
    # The hot lane outran its history: the unprovable-gap paths ran and were judged.
    # Whether a live gap (4509) or only a resume gap (recovered: false) happens depends on
    # where the faults fall: 6 and 0 4509 closes with this seed, quiet vs loaded machine.
    # tests/test_gap.py proves the 4509 path deterministically; here it is reported.
    assert outcome.hot.recovered_false > 0 and outcome.hot.told > 0, report
    assert sum(outcome.faults.values()) >= SECONDS / 15, report  # the faults did happen
