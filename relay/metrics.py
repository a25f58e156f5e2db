"""Prometheus metrics of one node, in a registry of its own (several nodes per process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


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
        self.events_in = Counter(
            "relay_events_in", "Live events received from the engine", registry=r
        )
        self.messages_out = Counter(
            "relay_messages_out", "Message frames queued to sessions", registry=r
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
        self.latency = Histogram(
            "relay_publish_to_send_seconds",
            "Time from publish to fan-out onto the sessions' queues",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
