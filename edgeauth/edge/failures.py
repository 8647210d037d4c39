"""Sliding-window failure counting: decide when a client has failed often enough to be banned.

PROTOCOL.md §6 "Failure pattern": ``threshold`` failures from one client within ``window`` seconds
ban it locally. IPv6 clients are counted (and banned) by their ``ipv6_prefix`` network, since one
host usually holds a whole /64. This module only counts and decides; the gate records the ban. It
does no I/O and reads no clock: ``now`` is always an argument.

Memory is bounded twice: a key keeps at most ``threshold - 1`` timestamps (older ones are pruned,
and reaching ``threshold`` resets it), and at most ``max_tracked`` keys are kept, the one whose last
failure is oldest being evicted first.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import OrderedDict, deque

from edgeauth.edge.index import parse_client_ip

__all__ = ["FailureWindow"]


class FailureWindow:
    """Count failures per client in a sliding window and say when one must be banned.

    Args:
        threshold: failures within ``window`` that trigger a ban (at least 1).
        window: the window length in seconds (positive).
        ipv6_prefix: the prefix length IPv6 clients are grouped by (0 to 128, usually 64).
        max_tracked: the most client keys held at once (at least 1).

    Raises:
        ValueError: a parameter is out of range.
    """

    def __init__(
        self, threshold: int, window: float, ipv6_prefix: int, max_tracked: int = 100_000
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        if not window > 0:
            raise ValueError("window must be positive")
        if not 0 <= ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be between 0 and 128")
        if max_tracked < 1:
            raise ValueError("max_tracked must be at least 1")
        self.threshold = threshold
        self.window = float(window)
        self.ipv6_prefix = ipv6_prefix
        self.max_tracked = max_tracked
        self._mask6 = ((1 << 128) - 1) ^ ((1 << (128 - ipv6_prefix)) - 1)
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def key_for(self, client_ip: str) -> str | None:
        """Return the normalised network a client is counted and banned by, or None for garbage.

        An IPv4 client (IPv4-mapped IPv6 included) is its /32; an IPv6 client is its
        ``ipv6_prefix`` network, e.g. ``2001:db8:1:2::/64``.
        """
        parsed = parse_client_ip(client_ip)
        if parsed is None:
            return None
        version, addr = parsed
        if version == 4:
            return f"{socket.inet_ntoa(addr.to_bytes(4, 'big'))}/32"
        return str(ipaddress.IPv6Network((addr & self._mask6, self.ipv6_prefix)))

    def record(self, client_ip: str, now: float) -> str | None:
        """Record one failure of a client at ``now``.

        Args:
            client_ip: the client address (not a network); garbage is ignored.
            now: the current Unix time.

        Returns:
            The normalised network to ban when this failure is the ``threshold``-th within the
            last ``window`` seconds (the client's count then starts again from zero), else None.
        """
        key = self.key_for(client_ip)
        if key is None:
            return None
        failures = self._failures.get(key)
        if failures is None:
            if len(self._failures) >= self.max_tracked:
                self._failures.popitem(last=False)
            failures = self._failures[key] = deque()
        else:
            self._failures.move_to_end(key)
        horizon = now - self.window
        while failures and failures[0] <= horizon:
            failures.popleft()
        failures.append(now)
        if len(failures) >= self.threshold:
            del self._failures[key]
            return key
        return None

    def count(self, key: str, now: float) -> int:
        """Return how many failures of ``key`` (from :meth:`key_for`) are inside the window."""
        horizon = now - self.window
        return sum(1 for t in self._failures.get(key, ()) if t > horizon)

    def sweep(self, now: float) -> int:
        """Forget the keys whose failures all fell out of the window; return how many."""
        horizon = now - self.window
        stale = [key for key, failures in self._failures.items() if failures[-1] <= horizon]
        for key in stale:
            del self._failures[key]
        return len(stale)

    def forget(self, key: str) -> bool:
        """Drop the count of ``key`` (e.g. once it is banned); return whether it was tracked."""
        return self._failures.pop(key, None) is not None

    def __len__(self) -> int:
        return len(self._failures)
