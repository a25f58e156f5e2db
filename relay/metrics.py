"""Prometheus metrics of one node, in a registry of its own (several nodes per process in tests)."""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["LATENCY_BUCKETS", "FastHistogram", "Metrics", "RateMeter", "Rates"]

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

    def counts(self) -> tuple[int, int, int]:
        """Messages out, events in, API publishes: the totals the rates are made of."""
        published = self.registry.get_sample_value("relay_publishes_total") or 0.0
        return self.messages_out, self.events_in, int(published)


@dataclass(frozen=True, slots=True)
class Rates:
    """Per-second rates between two readings of a node's counters."""

    messages_per_s: float = 0.0
    events_per_s: float = 0.0
    publishes_per_s: float = 0.0


class RateMeter:
    """Turns the counters into rates since this meter's previous reading.

    Each reader (the heartbeat, the status feed) keeps its own meter: its interval is its own.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._at = time.monotonic()
        self._last = metrics.counts()

    def read(self) -> Rates:
        now, counts = time.monotonic(), self._metrics.counts()
        elapsed = now - self._at
        if elapsed <= 0:
            return Rates()
        rates = [max(0, new - old) / elapsed for new, old in zip(counts, self._last, strict=True)]
        self._at, self._last = now, counts
        return Rates(*(round(r, 2) for r in rates))


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
