"""Rolling restarts through the shipped balancer configs: nobody is locked out, nothing lost.

A deploy restarts every node in turn (SIGTERM, wait for the exit, start, wait for
``/readyz``). Behind nginx with passive failure accounting (``max_fails=1``) that marked
every node failed in turn and left most clients outside for minutes; these tests run the
shipped templates, on real nginx and HAProxy, under load: every client is connected
again within 10 s of the last node coming back, and holds every accepted event once, in
order. The per-restart reconnect times are printed (``-rP``).
"""

from __future__ import annotations

from tests.cluster.conftest import MakeCluster
from tests.cluster.restarts import SETTINGS, Outcome, run_rolling_restart

CLIENTS = 150
TICK = 0.5  # seconds: 300 events/s in all


def _check(outcome: Outcome) -> None:
    assert outcome.not_connected_after == 0, outcome.report("rolling restart")
    assert (outcome.missing, outcome.wrong) == (0, 0), outcome.examples
    assert all(f.not_back == 0 for f in outcome.figures), outcome.report("rolling restart")


async def test_rolling_restart_behind_shipped_nginx_reconnects_everyone_without_loss(
    make_cluster: MakeCluster,
) -> None:
    """Three nodes restarted in turn behind the nginx template: all back in 10 s, no loss."""
    cluster = await make_cluster(3, **SETTINGS)
    outcome = await run_rolling_restart(cluster, CLIENTS, TICK)
    title = f"rolling restart, {CLIENTS} clients, {cluster.describe_balancer()}"
    print("\n" + outcome.report(title))
    _check(outcome)
    assert outcome.no_live_upstreams == 0


async def test_rolling_restart_behind_shipped_haproxy_reconnects_everyone_without_loss(
    make_cluster: MakeCluster,
) -> None:
    """Three nodes restarted in turn behind the HAProxy template: all back in 10 s, no loss."""
    cluster = await make_cluster(3, balancer="haproxy", **SETTINGS)
    outcome = await run_rolling_restart(cluster, CLIENTS, TICK, prefix="hap")
    print("\n" + outcome.report(f"rolling restart, {CLIENTS} clients, haproxy"))
    _check(outcome)
