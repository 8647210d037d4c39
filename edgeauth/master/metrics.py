"""Prometheus metrics of the master, in a registry of their own (one per master instance).

They let an operator compute what a CDN in front of the master should reach: the catch-up hit
ratio (catch-up requests at the CDN vs. ``stream_requests_total{mode="catch_up"}`` here), the
long-poll collapse ratio and the SSE reconnect rate (``sse_cycled_total`` vs. SSE requests).
"""

from __future__ import annotations

import attrs
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The ``*_created`` series double the output and nobody alerts on them.
disable_created_metrics()


@attrs.define
class MasterMetrics:
    """The master's metrics; ``render()`` gives the Prometheus text format."""

    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=True))
    events_appended: Counter = attrs.field(init=False)
    append_seconds: Histogram = attrs.field(init=False)
    commit_group_size: Histogram = attrs.field(init=False)
    append_refused: Counter = attrs.field(init=False)
    subscribers: Gauge = attrs.field(init=False)
    stream_requests: Counter = attrs.field(init=False)
    bytes_sent: Counter = attrs.field(init=False)
    sse_cycled: Counter = attrs.field(init=False)
    slow_consumers: Counter = attrs.field(init=False)
    log_tail: Gauge = attrs.field(init=False)
    log_earliest: Gauge = attrs.field(init=False)
    log_writable: Gauge = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.events_appended = Counter(
            "edgeauth_master_events_appended", "Events committed to the log", ["type"], registry=r
        )
        self.append_seconds = Histogram(
            "edgeauth_master_append_seconds",
            "Time from an API write reaching the log to its durable commit",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.commit_group_size = Histogram(
            "edgeauth_master_commit_group_size",
            "Events committed per transaction (group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.append_refused = Counter(
            "edgeauth_master_append_refused", "Writes refused by the log", ["code"], registry=r
        )
        self.subscribers = Gauge(
            "edgeauth_master_subscribers", "Connected stream subscribers", ["kind"], registry=r
        )
        for kind in ("sse", "long_poll", "events_sse"):
            self.subscribers.labels(kind=kind).set(0)
        self.stream_requests = Counter(
            "edgeauth_master_stream_requests",
            "Stream and snapshot requests by mode and status",
            ["mode", "status"],
            registry=r,
        )
        self.bytes_sent = Counter(
            "edgeauth_master_stream_bytes_sent",
            "Body bytes written to stream readers",
            ["mode"],
            registry=r,
        )
        self.sse_cycled = Counter(
            "edgeauth_master_sse_cycled", "SSE connections closed by cycling", registry=r
        )
        self.slow_consumers = Counter(
            "edgeauth_master_slow_consumers_disconnected",
            "Subscribers disconnected for not draining their socket",
            registry=r,
        )
        self.log_tail = Gauge("edgeauth_master_log_tail_seq", "Seq of the last event", registry=r)
        self.log_earliest = Gauge(
            "edgeauth_master_log_earliest_seq", "Seq of the oldest retained event", registry=r
        )
        self.log_writable = Gauge(
            "edgeauth_master_log_writable",
            "1 when the last write check of the event log committed (every 15 s and on /readyz)",
            registry=r,
        )

    def render(self) -> bytes:
        """Return every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)
