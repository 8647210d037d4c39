"""The TTL pipeline and its shipped rules, driven by an injected time (no clock inside rules)."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest

from edgeauth.config import load_settings
from edgeauth.edge.ttl import TTLContext, TTLPipeline, TTLRuleError, load_rule, resolve_ttl
from edgeauth.edge.ttl.by_frequency import ByFrequency
from edgeauth.edge.ttl.by_time import make_rule as make_by_time
from edgeauth.edge.ttl.by_time import parse_hours


def ctx(now: float, client: str = "198.51.100.7") -> TTLContext:
    return TTLContext(client_ip=client, method=b"GET", path=b"/x", now=now)


def utc(hour: int, minute: int = 0) -> float:
    return float(calendar.timegm((2026, 11, 24, hour, minute, 0)))


@pytest.mark.parametrize(
    ("hour", "expected"),
    [(0, 200.0), (7, 200.0), (8, 50.0), (12, 50.0), (19, 50.0), (20, 200.0), (23, 200.0)],
)
def test_by_time_peak_and_off_peak_utc(hour: int, expected: float) -> None:
    """Peak hours 8-20 halve the TTL, other hours double it."""
    rule = make_by_time({"peak_hours": "8-20"})
    assert rule(ctx(utc(hour, 30)), 100.0) == expected


def test_by_time_uses_the_configured_zone() -> None:
    """09:00 UTC is 18:00 in Tokyo (peak) and 04:00 in New York in winter (off-peak)."""
    tokyo = make_by_time({"timezone": "Asia/Tokyo", "peak_hours": "17-22"})
    new_york = make_by_time({"timezone": "America/New_York", "peak_hours": "17-22"})
    assert tokyo(ctx(utc(9)), 100.0) == 50.0
    assert new_york(ctx(utc(9)), 100.0) == 200.0


@pytest.mark.parametrize(
    ("text", "hours"),
    [
        ("8-20", set(range(8, 20))),
        ("22-6", {22, 23, 0, 1, 2, 3, 4, 5}),
        ("0-24", set(range(24))),
        ("1-2;5-6", {1, 5}),
    ],
)
def test_parse_hours(text: str, hours: set[int]) -> None:
    """Hour ranges are end-exclusive, may wrap midnight and may be listed."""
    assert parse_hours(text) == hours


@pytest.mark.parametrize(
    "params",
    [{"peak_hours": "8"}, {"peak_hours": "8-30"}, {"timezone": "Mars/Olympus"}, {"colour": "x"}],
)
def test_by_time_bad_params(params: dict[str, str]) -> None:
    """Bad parameters are refused when the rule is built."""
    with pytest.raises(ValueError):
        make_by_time(params)


def test_by_frequency_first_seen_then_frequent() -> None:
    """A new client gets half the TTL; after frequent_after hits it gets factor x."""
    rule = ByFrequency(factor=3.0, first_seen_factor=0.5, frequent_after=5, window=60)
    assert rule(ctx(1000.0), 100.0) == 50.0
    answers = [rule(ctx(1000.0 + i), 100.0) for i in range(1, 6)]
    assert answers == [150.0, 200.0, 250.0, 300.0, 300.0]
    other = rule(ctx(1010.0, client="203.0.113.9"), 100.0)
    assert other == 50.0


def test_by_frequency_window_restarts_the_count() -> None:
    """After the window has passed, a client counts as first seen again."""
    rule = ByFrequency(window=60)
    rule(ctx(0.0), 100.0)
    rule(ctx(10.0), 100.0)
    assert rule(ctx(100.0), 100.0) == 50.0


def test_by_frequency_memory_is_bounded() -> None:
    """At most max_clients addresses are remembered."""
    rule = ByFrequency(max_clients=10)
    for i in range(100):
        rule(ctx(0.0, client=f"10.0.0.{i}"), 1.0)
    assert len(rule._seen) == 10


def test_pipeline_applies_in_order_and_clamps() -> None:
    """Rules run in the configured order; the result is clamped to [0, max_ttl]."""
    frequency = load_rule("by_frequency", {"first_seen_factor": "0.5"})
    by_time = load_rule("by_time", {"peak_hours": "0-24", "peak_factor": "4"})
    pipeline = TTLPipeline((frequency, by_time), max_ttl=150.0)
    assert resolve_ttl(ctx(utc(3)), 60.0, pipeline) == 120.0
    assert resolve_ttl(ctx(utc(3), client="192.0.2.1"), 1000.0, pipeline) == 150.0
    negative = TTLPipeline((load_rule("ttl_rule_double", {"by": "-1"}),), max_ttl=10.0)
    assert resolve_ttl(ctx(0.0), 5.0, negative) == 0.0


def test_a_rule_in_a_test_module_listed_in_the_ini_takes_effect(tmp_path: Path) -> None:
    """A new rule is one module and one name in the ini file, no other code touched."""
    ini = tmp_path / "ttl.ini"
    ini.write_text(
        "[ttl]\nrules = ttl_rule_double, by_time\nmax_ttl = 1000\n"
        "[ttl.ttl_rule_double]\nby = 3\n[ttl.by_time]\npeak_hours = 0-24\n"
        "peak_factor = 1\n"
    )
    settings = load_settings(str(ini), environ={})
    pipeline = TTLPipeline.from_settings(
        settings.ttl.rules, settings.ttl.params, settings.ttl.max_ttl
    )
    assert [rule.name for rule in pipeline.rules] == ["ttl_rule_double", "by_time"]
    assert resolve_ttl(ctx(utc(12)), 100.0, pipeline) == 300.0


def test_unknown_rule_is_a_clear_error() -> None:
    """A rule name that imports nothing is refused with its name."""
    with pytest.raises(TTLRuleError, match="no_such_rule"):
        load_rule("no_such_rule", {})
