"""Prometheus metrics of one node, in a registry of its own (several nodes per process in tests)."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["LATENCY_BUCKETS", "FastHistogram", "Metrics"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class FastHistogram:
    """A lock-free histogram for one event loop: bisect and two additions per sample."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class Metrics:
    """The node's counters. Updated per event or per session, never per frame per client."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge("relay_connections", "Open client sessions", registry=r)
        self.sessions_opened = Counter("relay_sessions_opened", "Sessions opened", registry=r)
        self.sessions_closed = Counter(
            "relay_sessions_closed", "Sessions closed by code", ["code"], registry=r
        )
        self.replayed = Counter(
            "relay_messages_replayed", "Messages replayed from history", registry=r
        )
        self.publishes = Counter("relay_publishes", "Publishes through the HTTP API", registry=r)
        self.overflows = Counter(
            "relay_queue_overflows", "Sessions closed 4508 for a full send queue", registry=r
        )
        self.gaps = Counter("relay_gaps_repaired", "Live-feed gaps filled from history", registry=r)
        self.engine_reconnects = Counter(
            "relay_engine_reconnects",
            "Engine resubscriptions after a connection loss",
            registry=r,
        )
        self.bad_frames = Counter(
            "relay_bad_client_frames", "Client frames answered with an error", registry=r
        )
        # Per-event figures are plain numbers, read only when /metrics is scraped: a
        # prometheus_client call takes a lock, too dear on the fan-out path.
        self.events_in = 0
        self.messages_out = 0
        self.latency = FastHistogram(LATENCY_BUCKETS)
        r.register(_HotCollector(self))

    def render(self) -> bytes:
        """The Prometheus text exposition of this node's metrics."""
        return generate_latest(self.registry)


class _HotCollector(Collector):
    """Exposes the plain per-event numbers of a Metrics object at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        yield CounterMetricFamily(
            "relay_events_in", "Live events received from the engine", value=m.events_in
        )
        yield CounterMetricFamily(
            "relay_messages_out", "Message frames queued to sessions", value=m.messages_out
        )
        yield HistogramMetricFamily(
            "relay_publish_to_send_seconds",
            "Time from publish to fan-out onto the sessions' queues",
            buckets=m.latency.buckets(),
            sum_value=m.latency.sum,
        )
