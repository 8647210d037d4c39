"""Prometheus metrics of an edge, in a registry of its own (one per edge instance)."""

from __future__ import annotations

import attrs
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()


@attrs.define
class EdgeMetrics:
    """The edge's metrics; ``render()`` gives the Prometheus text format."""

    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=True))
    checks: Counter = attrs.field(init=False)
    refusals: Counter = attrs.field(init=False)
    stream_connected: Gauge = attrs.field(init=False)
    lag_events: Gauge = attrs.field(init=False)
    lag_seconds: Gauge = attrs.field(init=False)
    last_applied: Gauge = attrs.field(init=False)
    reconnects: Counter = attrs.field(init=False)
    applied_events: Counter = attrs.field(init=False)
    snapshots: Counter = attrs.field(init=False)
    local_bans: Counter = attrs.field(init=False)
    ready: Gauge = attrs.field(init=False)
    origin_responses: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.checks = Counter(
            "edgeauth_edge_checks", "Gate decisions by result", ["result"], registry=r
        )
        self.refusals = Counter(
            "edgeauth_edge_refusals",
            "Requests refused as banned, by the source of the ban",
            ["source"],
            registry=r,
        )
        self.stream_connected = Gauge(
            "edgeauth_edge_stream_connected", "1 while the stream to a master is up", registry=r
        )
        self.lag_events = Gauge(
            "edgeauth_edge_lag_events",
            "Events the master announced that are not applied",
            registry=r,
        )
        self.lag_seconds = Gauge(
            "edgeauth_edge_lag_seconds",
            "Seconds the edge has been behind the master's tail",
            registry=r,
        )
        self.last_applied = Gauge(
            "edgeauth_edge_last_applied_timestamp_seconds",
            "Unix time of the last applied event or snapshot",
            registry=r,
        )
        self.reconnects = Counter(
            "edgeauth_edge_stream_reconnects",
            "Stream reconnections by reason",
            ["reason"],
            registry=r,
        )
        self.applied_events = Counter(
            "edgeauth_edge_applied_events", "Events applied by type", ["type"], registry=r
        )
        self.snapshots = Counter(
            "edgeauth_edge_snapshots_applied", "Snapshots applied (bootstraps)", registry=r
        )
        self.local_bans = Counter(
            "edgeauth_edge_local_bans", "Bans decided by this edge's failure pattern", registry=r
        )
        self.ready = Gauge("edgeauth_edge_ready", "1 while /readyz answers 200", registry=r)
        self.origin_responses = Counter(
            "edgeauth_edge_origin_responses",
            "Proxied responses by status class",
            ["status"],
            registry=r,
        )

    def render(self) -> bytes:
        """Return every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)
