"""TTL rule ``by_frequency``: clients seen often get up to ``factor`` × longer TTLs.

A client seen for the first time (within ``window`` seconds) gets ``first_seen_factor`` × the
TTL; from then on the factor grows linearly with the number of requests seen in the window, up to
``factor`` at ``frequent_after`` requests. The counts are kept in a bounded table keyed by client
address, and time comes from ``ctx.now`` only.

``[ttl.by_frequency]`` keys: ``factor`` (2.0), ``first_seen_factor`` (0.5), ``frequent_after``
(10), ``window`` (3600 s), ``max_clients`` (100000).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from zope.interface import implementer

from edgeauth.edge.ttl import ITTLRule, TTLContext


def _positive(params: Mapping[str, str], key: str, default: float) -> float:
    value = float(params.get(key, default))
    if not value > 0:
        raise ValueError(f"{key} must be > 0, got {value}")
    return value


@implementer(ITTLRule)
class ByFrequency:
    """Scale TTLs by how often the client has been seen recently."""

    name = "by_frequency"

    def __init__(
        self,
        *,
        factor: float = 2.0,
        first_seen_factor: float = 0.5,
        frequent_after: int = 10,
        window: float = 3600.0,
        max_clients: int = 100_000,
    ) -> None:
        """Configure the rule (see the module docstring)."""
        self.factor = factor
        self.first_seen_factor = first_seen_factor
        self.frequent_after = max(2, frequent_after)
        self.window = window
        self.max_clients = max_clients
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def hits(self, client_ip: str, now: float) -> int:
        """Count one request of ``client_ip`` at ``now``; return its count in the window."""
        start, count = self._seen.pop(client_ip, (now, 0))
        if now - start > self.window:
            start, count = now, 0
        count += 1
        self._seen[client_ip] = (start, count)
        while len(self._seen) > self.max_clients:
            self._seen.popitem(last=False)
        return count

    def __call__(self, ctx: TTLContext, ttl: float) -> float:
        """Return ``ttl`` scaled between ``first_seen_factor`` and ``factor``."""
        count = self.hits(ctx.client_ip, ctx.now)
        if count <= 1:
            return ttl * self.first_seen_factor
        progress = min(1.0, (count - 1) / (self.frequent_after - 1))
        return ttl * (1.0 + (self.factor - 1.0) * progress)


def make_rule(params: Mapping[str, str]) -> ByFrequency:
    """Build the rule from its ``[ttl.by_frequency]`` keys."""
    known = {"factor", "first_seen_factor", "frequent_after", "window", "max_clients"}
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    return ByFrequency(
        factor=_positive(params, "factor", 2.0),
        first_seen_factor=_positive(params, "first_seen_factor", 0.5),
        frequent_after=int(_positive(params, "frequent_after", 10)),
        window=_positive(params, "window", 3600.0),
        max_clients=int(_positive(params, "max_clients", 100_000)),
    )
