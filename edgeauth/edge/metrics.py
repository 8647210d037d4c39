"""Prometheus metrics of an edge, in a registry of its own (one per edge instance)."""

from __future__ import annotations

from collections.abc import Callable

import attrs
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()


class LabelCounts(Collector):
    """A Prometheus counter with one label, its counts kept as plain numbers in a dict.

    The request guard counts every request (checks by result, refusals by ban source, origin
    responses by status class). ``Counter.labels(...).inc()`` validates the labels and takes a
    lock each time (about 1.4 µs, and a refused request is counted twice); here an increment is
    a dict update. The exposition is the one a ``Counter`` with the same name,
    documentation and label gives (``<name>_total{<label>="..."}``, in first-seen order).

    Not thread-safe: increment and collect on one thread (the reactor's; ``/metrics`` is served
    there).

    Args:
        name: the metric name, without ``_total``.
        documentation: its help text.
        label: the name of its one label.
        registry: where it is registered.
    """

    def __init__(
        self, name: str, documentation: str, label: str, registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.counts: dict[str, float] = {}
        """The count of each label value."""
        registry.register(self)

    def inc(self, value: str, amount: float = 1.0) -> None:
        """Add ``amount`` to the count of the label value ``value``."""
        counts = self.counts
        counts[value] = counts.get(value, 0.0) + amount

    def describe(self) -> list[CounterMetricFamily]:
        """The metric without samples (the registry checks names with it)."""
        return [CounterMetricFamily(self.name, self.documentation, labels=[self.label])]

    def collect(self) -> list[CounterMetricFamily]:
        """The metric and one sample per label value."""
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, count in self.counts.items():
            family.add_metric([value], count)
        return [family]


@attrs.define
class EdgeMetrics:
    """The edge's metrics; ``render()`` gives the Prometheus text format."""

    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=True))
    checks: LabelCounts = attrs.field(init=False)
    refusals: LabelCounts = attrs.field(init=False)
    stream_connected: Gauge = attrs.field(init=False)
    lag_events: Gauge = attrs.field(init=False)
    lag_seconds: Gauge = attrs.field(init=False)
    last_applied: Gauge = attrs.field(init=False)
    reconnects: Counter = attrs.field(init=False)
    applied_events: Counter = attrs.field(init=False)
    snapshots: Counter = attrs.field(init=False)
    local_bans: Counter = attrs.field(init=False)
    ready: Gauge = attrs.field(init=False)
    origin_responses: LabelCounts = attrs.field(init=False)
    cache_requests: Counter = attrs.field(init=False)
    cache_invalidations: Counter = attrs.field(init=False)
    cache_invalidated_entries: Counter = attrs.field(init=False)
    cache_evictions: Counter = attrs.field(init=False)
    cache_entries: Gauge = attrs.field(init=False)
    cache_bytes: Gauge = attrs.field(init=False)
    cache_refreshes: Gauge = attrs.field(init=False)
    cache_refresh_queue: Gauge = attrs.field(init=False)
    cache_fills: Gauge = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.checks = LabelCounts(
            "edgeauth_edge_checks", "Gate decisions by result", "result", registry=r
        )
        self.refusals = LabelCounts(
            "edgeauth_edge_refusals",
            "Requests refused as banned, by the source of the ban",
            "source",
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
        self.origin_responses = LabelCounts(
            "edgeauth_edge_origin_responses",
            "Proxied responses by status class",
            "status",
            registry=r,
        )
        self._cache_metrics(r)

    def _cache_metrics(self, r: CollectorRegistry) -> None:
        self.cache_requests = Counter(
            "edgeauth_edge_cache_requests",
            "GET/HEAD and other requests by X-Cache result (hit, miss, stale, bypass)",
            ["result"],
            registry=r,
        )
        self.cache_invalidations = Counter(
            "edgeauth_edge_cache_invalidations",
            "cache_invalidated events applied, by kind (hard, soft)",
            ["kind"],
            registry=r,
        )
        self.cache_invalidated_entries = Counter(
            "edgeauth_edge_cache_invalidated_entries",
            "Cached entries dropped (hard) or marked stale (soft) by invalidations",
            ["kind"],
            registry=r,
        )
        self.cache_evictions = Counter(
            "edgeauth_edge_cache_evictions", "Entries evicted by the LRU bounds", registry=r
        )
        self.cache_entries = Gauge(
            "edgeauth_edge_cache_entries", "Cached entries (variants)", registry=r
        )
        self.cache_bytes = Gauge(
            "edgeauth_edge_cache_bytes", "Bytes charged to cached entries", registry=r
        )
        self.cache_refreshes = Gauge(
            "edgeauth_edge_cache_refreshes_in_flight", "Background refreshes running", registry=r
        )
        self.cache_refresh_queue = Gauge(
            "edgeauth_edge_cache_refreshes_queued", "Background refreshes waiting", registry=r
        )
        self.cache_fills = Gauge(
            "edgeauth_edge_cache_fills_in_flight", "Collapsed origin fills running", registry=r
        )

    def bind_cache(
        self,
        *,
        entries: Callable[[], float],
        size: Callable[[], float],
        refreshing: Callable[[], float],
        queued: Callable[[], float],
        filling: Callable[[], float],
    ) -> None:
        """Read the cache gauges from the cache itself at each scrape."""
        self.cache_entries.set_function(entries)
        self.cache_bytes.set_function(size)
        self.cache_refreshes.set_function(refreshing)
        self.cache_refresh_queue.set_function(queued)
        self.cache_fills.set_function(filling)

    def render(self) -> bytes:
        """Return every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)
