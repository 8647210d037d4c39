"""Tests for edgeauth.edge.failures: the sliding-window failure pattern of PROTOCOL.md §6."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeauth.edge.failures import FailureWindow
from edgeauth.events import normalize_ip


def test_threshold_reached_at_nth_failure() -> None:
    """The Nth failure inside the window returns the /32 to ban, not the N-1th."""
    window = FailureWindow(threshold=3, window=10.0, ipv6_prefix=64)
    assert window.record("198.51.100.7", 100.0) is None
    assert window.record("198.51.100.7", 105.0) is None
    assert window.record("198.51.100.7", 109.99) == "198.51.100.7/32"


def test_counter_resets_after_ban() -> None:
    """After a ban decision the client's count starts again from zero."""
    window = FailureWindow(threshold=2, window=10.0, ipv6_prefix=64)
    window.record("198.51.100.7", 1.0)
    assert window.record("198.51.100.7", 2.0) == "198.51.100.7/32"
    assert len(window) == 0
    assert window.record("198.51.100.7", 3.0) is None
    assert window.record("198.51.100.7", 4.0) == "198.51.100.7/32"


def test_spread_out_failures_do_not_ban() -> None:
    """Failures further apart than the window never add up to the threshold."""
    window = FailureWindow(threshold=3, window=10.0, ipv6_prefix=64)
    for i in range(20):
        assert window.record("198.51.100.7", i * 5.0) is None
    assert window.count("198.51.100.7/32", 95.0) == 2


def test_window_edge_is_exclusive() -> None:
    """A failure exactly `window` seconds old no longer counts."""
    window = FailureWindow(threshold=2, window=10.0, ipv6_prefix=64)
    window.record("198.51.100.7", 0.0)
    assert window.record("198.51.100.7", 10.0) is None
    assert window.record("198.51.100.7", 19.99) == "198.51.100.7/32"


def test_threshold_one_bans_at_once() -> None:
    """With threshold 1 the first failure is enough."""
    window = FailureWindow(threshold=1, window=1.0, ipv6_prefix=64)
    assert window.record("203.0.113.1", 0.0) == "203.0.113.1/32"


def test_clients_are_counted_separately() -> None:
    """Failures of different IPv4 clients never add up."""
    window = FailureWindow(threshold=2, window=10.0, ipv6_prefix=64)
    assert window.record("198.51.100.7", 1.0) is None
    assert window.record("198.51.100.8", 1.0) is None
    assert len(window) == 2


def test_ipv6_grouped_by_prefix() -> None:
    """IPv6 clients in one /64 share a count and are banned as that /64."""
    window = FailureWindow(threshold=3, window=10.0, ipv6_prefix=64)
    assert window.record("2001:db8:1:2::1", 1.0) is None
    assert window.record("2001:db8:1:3::1", 1.0) is None  # another /64
    assert window.record("2001:db8:1:2:aaaa::9", 2.0) is None
    assert window.record("2001:DB8:1:2:ffff:ffff:ffff:ffff", 3.0) == "2001:db8:1:2::/64"


def test_ipv6_other_prefix_and_mapped_ipv4() -> None:
    """The IPv6 prefix is configurable; an IPv4-mapped client is counted as its IPv4 /32."""
    window = FailureWindow(threshold=1, window=10.0, ipv6_prefix=48)
    assert window.record("2001:db8:1:2::1", 0.0) == "2001:db8:1::/48"
    assert window.record("::ffff:192.0.2.1", 0.0) == "192.0.2.1/32"
    assert FailureWindow(1, 1.0, 128).record("2001:db8::5", 0.0) == "2001:db8::5/128"


def test_garbage_is_ignored() -> None:
    """An unparsable client address is neither counted nor banned."""
    window = FailureWindow(threshold=1, window=10.0, ipv6_prefix=64)
    assert window.record("not an ip", 0.0) is None
    assert window.key_for("1.2.3.4/32") is None
    assert len(window) == 0


def test_memory_bounded_by_max_tracked() -> None:
    """At most max_tracked keys are kept; the least recently failing key is evicted first."""
    window = FailureWindow(threshold=3, window=100.0, ipv6_prefix=64, max_tracked=3)
    window.record("10.0.0.1", 0.0)
    window.record("10.0.0.2", 1.0)
    window.record("10.0.0.3", 2.0)
    window.record("10.0.0.1", 3.0)  # 10.0.0.1 is now the most recent
    window.record("10.0.0.4", 4.0)  # evicts 10.0.0.2, the stalest
    assert len(window) == 3
    assert window.count("10.0.0.2/32", 4.0) == 0
    assert window.count("10.0.0.1/32", 4.0) == 2
    assert window.record("10.0.0.1", 5.0) == "10.0.0.1/32"
    for i in range(1000):
        window.record(f"10.1.{i // 256}.{i % 256}", 10.0 + i)
    assert len(window) == 3


def test_timestamps_per_key_bounded() -> None:
    """A key never holds more than threshold - 1 timestamps, however many failures arrive."""
    window = FailureWindow(threshold=5, window=1.0, ipv6_prefix=64)
    for i in range(10_000):
        window.record("10.0.0.1", i * 0.3)
        assert len(window._failures.get("10.0.0.1/32", ())) < 5


def test_forget_and_sweep() -> None:
    """Forgetting drops one key; sweeping drops keys whose failures all left the window."""
    window = FailureWindow(threshold=5, window=10.0, ipv6_prefix=64)
    window.record("10.0.0.1", 0.0)
    window.record("10.0.0.2", 5.0)
    assert window.forget("10.0.0.1/32")
    assert not window.forget("10.0.0.1/32")
    window.record("10.0.0.3", 0.0)
    assert window.sweep(14.0) == 1
    assert len(window) == 1
    assert window.count("10.0.0.2/32", 14.0) == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold": 0, "window": 1.0, "ipv6_prefix": 64}, "threshold"),
        ({"threshold": 1, "window": 0.0, "ipv6_prefix": 64}, "window"),
        ({"threshold": 1, "window": 1.0, "ipv6_prefix": 129}, "ipv6_prefix"),
        ({"threshold": 1, "window": 1.0, "ipv6_prefix": 64, "max_tracked": 0}, "max_tracked"),
    ],
)
def test_invalid_parameters(kwargs: dict[str, Any], field: str) -> None:
    """Out-of-range parameters are refused at construction."""
    with pytest.raises(ValueError, match=field):
        FailureWindow(**kwargs)


@given(
    st.lists(st.floats(0, 100, allow_nan=False), max_size=30).map(sorted),
    st.integers(1, 5),
    st.floats(0.5, 20),
)
def test_matches_naive_sliding_window(times: list[float], threshold: int, length: float) -> None:
    """Ban decisions equal a naive recount of failures since the last ban, within the window."""
    window = FailureWindow(threshold=threshold, window=length, ipv6_prefix=64)
    since_ban: list[float] = []
    for now in times:
        since_ban.append(now)
        inside = [t for t in since_ban if t > now - length]
        expected = "192.0.2.9/32" if len(inside) >= threshold else None
        if expected:
            since_ban = []
        assert window.record("192.0.2.9", now) == expected


@given(st.integers(0, 2**128 - 1), st.integers(0, 128))
def test_ipv6_keys_are_normal_forms(value: int, prefix: int) -> None:
    """Every key for an IPv6 client is the normal form normalize_ip gives its network."""
    client = str(ipaddress.IPv6Address(value))
    key = FailureWindow(threshold=1, window=1.0, ipv6_prefix=prefix).key_for(client)
    assert key is not None
    assert normalize_ip(key) == key
    assert ipaddress.ip_address(client) in ipaddress.ip_network(key) or "." in key
