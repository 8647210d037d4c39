"""Micro-benchmark: ns per ``EdgeIndexes.check_ip`` with 100,000 bans, against a set lookup.

Run with ``.venv/bin/python bench/edge_index.py``. The bans are a mix of /32, /24, /64 and /128
entries; the probes are half hits, half misses, IPv4 and IPv6. Each figure is the median of 5
repeats of one pass over the probes, including the loop, which the set baseline pays as well.
"""

from __future__ import annotations

import random
import socket
import statistics
import time
from collections.abc import Callable

from edgeauth.edge.index import EdgeIndexes, parse_client_ip
from edgeauth.replay import Entry

BANS = 100_000
PROBES = 100_000
REPEATS = 5
NOW = 1_700_000_000.0


def v4_text(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "big"))


def v6_text(value: int) -> str:
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


def build(rng: random.Random) -> tuple[EdgeIndexes, list[tuple[int, int]], list[str]]:
    """Return the indexes, the integer probes and the same probes as text."""
    indexes = EdgeIndexes()
    hits: list[tuple[int, int]] = []
    v6_base = 0x2001_0DB8 << 96
    seen: set[str] = set()
    i = 0
    while len(seen) < BANS:
        kind = i % 4
        expires_at = None if i % 3 else NOW + 3600
        if kind == 0:  # /32
            addr = rng.getrandbits(32)
            ip, hit = f"{v4_text(addr)}/32", (4, addr)
        elif kind == 1:  # /24
            addr = rng.getrandbits(24) << 8
            ip, hit = f"{v4_text(addr)}/24", (4, addr | rng.getrandbits(8))
        elif kind == 2:  # /64
            addr = v6_base | (rng.getrandbits(32) << 64)
            ip, hit = f"{v6_text(addr)}/64", (6, addr | rng.getrandbits(64))
        else:  # /128
            addr = v6_base | rng.getrandbits(96)
            ip, hit = f"{v6_text(addr)}/128", (6, addr)
        i += 1
        if ip in seen:
            continue
        seen.add(ip)
        indexes.bans.put(Entry(ip=ip, reason="", expires_at=expires_at, source="bench", seq=i))
        hits.append(hit)
    probes: list[tuple[int, int]] = []
    for i in range(PROBES):
        if i % 2:
            probes.append(rng.choice(hits))
        elif i % 4:
            probes.append((4, rng.getrandbits(32)))
        else:
            probes.append((6, v6_base | rng.getrandbits(96)))
    texts = [v4_text(a) if v == 4 else v6_text(a) for v, a in probes]
    return indexes, probes, texts


def median_ns(run: Callable[[], None], count: int) -> float:
    """Return the median over REPEATS runs of the time per item, in nanoseconds."""
    timings = []
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        run()
        timings.append((time.perf_counter_ns() - start) / count)
    return statistics.median(timings)


def main() -> None:
    rng = random.Random(42)
    started = time.perf_counter()
    indexes, probes, texts = build(rng)
    load_s = time.perf_counter() - started
    table: set[int] = {addr for _, addr in probes[1::2]}
    check_ip = indexes.check_ip

    def run_check() -> None:
        for version, addr in probes:
            check_ip(version, addr, NOW)

    def run_parse_and_check() -> None:
        for text in texts:
            parsed = parse_client_ip(text)
            if parsed is not None:
                check_ip(parsed[0], parsed[1], NOW)

    def run_set() -> None:
        for _version, addr in probes:
            addr in table  # noqa: B015 - the lookup is what is measured

    def run_empty() -> None:
        for _version, _addr in probes:
            pass

    refused = sum(check_ip(v, a, NOW) is not None for v, a in probes)
    check_ns = median_ns(run_check, len(probes))
    parse_ns = median_ns(run_parse_and_check, len(texts))
    set_ns = median_ns(run_set, len(probes))
    empty_ns = median_ns(run_empty, len(probes))
    print(f"bans: {len(indexes.bans)} (/32, /24, /64, /128), loaded in {load_s:.2f} s")
    print(f"probes: {len(probes)}, refused: {refused}")
    print(f"check_ip:                    {check_ns:7.1f} ns")
    print(f"parse_client_ip + check_ip:  {parse_ns:7.1f} ns")
    print(f"int in set (50,000 ints):    {set_ns:7.1f} ns")
    print(f"empty loop:                  {empty_ns:7.1f} ns")
    print(f"ratio check_ip / set:        {check_ns / set_ns:7.2f}x")
    print(
        f"ratio without the loop:      {(check_ns - empty_ns) / max(set_ns - empty_ns, 0.1):7.2f}x"
    )


if __name__ == "__main__":
    main()
