"""TTL rule ``by_time``: longer TTLs off-peak, shorter at peak hours, in a configured time zone.

``[ttl.by_time]`` keys: ``timezone`` (UTC), ``peak_hours`` (``8-20``: from 08:00 to 19:59;
ranges may wrap midnight, e.g. ``22-6``; several separated by ``;``), ``peak_factor`` (0.5),
``off_peak_factor`` (2.0). Time comes from ``ctx.now`` only.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from zope.interface import implementer

from edgeauth.edge.ttl import ITTLRule, TTLContext


def parse_hours(text: str) -> frozenset[int]:
    """Parse ``8-20;22-23`` into the set of hours it covers (end exclusive, may wrap)."""
    hours: set[int] = set()
    for part in text.replace(",", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        start_text, sep, end_text = part.partition("-")
        if not sep:
            raise ValueError(f"peak_hours: {part!r} is not a range like 8-20")
        start, end = int(start_text), int(end_text)
        if not (0 <= start <= 23 and 0 <= end <= 24):
            raise ValueError(f"peak_hours: {part!r} is out of 0..24")
        if start == end % 24:
            hours.update(range(24))  # "0-24" (or "6-6"): the whole day
            continue
        hour = start
        while hour != end % 24:
            hours.add(hour)
            hour = (hour + 1) % 24
    return frozenset(hours)


@implementer(ITTLRule)
class ByTime:
    """Scale TTLs by the hour of day in ``zone``."""

    name = "by_time"

    def __init__(
        self,
        zone: datetime.tzinfo,
        peak_hours: frozenset[int],
        peak_factor: float = 0.5,
        off_peak_factor: float = 2.0,
    ) -> None:
        """Configure the rule (see the module docstring)."""
        self.zone = zone
        self.peak_hours = peak_hours
        self.peak_factor = peak_factor
        self.off_peak_factor = off_peak_factor

    def __call__(self, ctx: TTLContext, ttl: float) -> float:
        """Return ``ttl`` times the peak or off-peak factor of ``ctx.now``'s local hour."""
        hour = datetime.datetime.fromtimestamp(ctx.now, self.zone).hour
        return ttl * (self.peak_factor if hour in self.peak_hours else self.off_peak_factor)


def make_rule(params: Mapping[str, str]) -> ByTime:
    """Build the rule from its ``[ttl.by_time]`` keys."""
    known = {"timezone", "peak_hours", "peak_factor", "off_peak_factor"}
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    zone_name = params.get("timezone", "UTC")
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {zone_name!r}") from None
    factors = {}
    for key, default in (("peak_factor", 0.5), ("off_peak_factor", 2.0)):
        factors[key] = float(params.get(key, default))
        if factors[key] < 0:
            raise ValueError(f"{key} must be >= 0")
    return ByTime(zone, parse_hours(params.get("peak_hours", "8-20")), **factors)
