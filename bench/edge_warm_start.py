"""Benchmark: edge warm start (``EdgeState.load``) and RSS with 1,000,000 bans in its SQLite file.

Run with ``.venv/bin/python bench/edge_warm_start.py``. It writes an edge SQLite file with the
edge's own schema (``edgeauth.edge.store.SCHEMA`` + ``edgeauth.state_sql.STATE_SCHEMA``, rows in
the normal form the edge writes them): 1,000,000 bans (880,000 IPv4 /32, 60,000 IPv6 /128,
40,000 IPv4 networks /16 /20 /24 /28, 20,000 IPv6 networks /48 /64; a third with an expiry),
1,000 allows, 100,000 revoked jtis and 1,000 revoked subjects, plus the meta rows (log id,
offset). Then, ``--repeats`` times, a fresh Python process imports the edge, notes its RSS, runs
``EdgeState.load()`` exactly as ``twistd edgeauth-edge`` does before opening its listeners
(adbapi read of every table, then the in-memory indexes), and reports the wall time of that load,
its RSS after load and its peak RSS (VmHWM). Medians over the repeats are printed, and each run.

Modes used internally: ``--load FILE`` (the measuring child; prints one JSON line).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BANS = 1_000_000
GOAL_S = 10.0
GOAL_RSS_MB = 400.0
# (family, prefix length, how many); the /32 and /128 rows make up the rest of BANS.
NETWORKS = (
    (4, 16, 1_000),
    (4, 20, 5_000),
    (4, 24, 30_000),
    (4, 28, 4_000),
    (6, 48, 5_000),
    (6, 64, 15_000),
)
V6_HOSTS = 60_000
ALLOWS = 1_000
REVOKED_JTIS = 100_000
REVOKED_SUBJECTS = 1_000
REASONS = ("ssh brute force", "credential stuffing", "scanner", "abuse report #4711", "spam")
SOURCES = ("operator:ops", "operator:alice", "edge:edge-3", "api:fail2ban")


def rss_kib(pid: int | str = "self") -> tuple[int, int]:
    """Return (VmRSS, VmHWM) in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    rss = re.search(r"VmRSS:\s+(\d+) kB", text)
    hwm = re.search(r"VmHWM:\s+(\d+) kB", text)
    assert rss is not None and hwm is not None
    return int(rss.group(1)), int(hwm.group(1))


def mb(kib: float) -> float:
    """KiB to MB (10^6 bytes)."""
    return kib * 1024 / 1e6


def network_text(version: int, value: int, plen: int) -> str:
    bits = 32 if version == 4 else 128
    masked = value & (((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1))
    if version == 4:
        return f"{socket.inet_ntoa(masked.to_bytes(4, 'big'))}/{plen}"
    return f"{socket.inet_ntop(socket.AF_INET6, masked.to_bytes(16, 'big'))}/{plen}"


def write_file(path: Path, now: float) -> dict[str, int]:
    """Create the edge file with the edge's schema; return the row counts."""
    from edgeauth.edge.store import SCHEMA
    from edgeauth.state_sql import ENTRY_COLUMNS, STATE_SCHEMA

    rng = random.Random(7)
    seen: set[str] = set()
    rows: list[tuple[str, str, float | None, str, int]] = []

    def add(ip: str) -> None:
        if ip in seen:
            return
        seen.add(ip)
        seq = len(rows) + 1
        expires_at = round(now + rng.randrange(3600, 30 * 86400), 3) if seq % 3 == 0 else None
        rows.append((ip, REASONS[seq % len(REASONS)], expires_at, SOURCES[seq % 4], seq))

    for version, plen, count in NETWORKS:
        goal = len(rows) + count
        while len(rows) < goal:
            value = rng.getrandbits(32) if version == 4 else (1 << 125) | rng.getrandbits(125)
            add(network_text(version, value, plen))
    goal = len(rows) + V6_HOSTS
    while len(rows) < goal:
        add(network_text(6, (1 << 125) | rng.getrandbits(125), 128))
    while len(rows) < BANS:
        add(network_text(4, rng.getrandbits(32), 32))
    allows = []
    while len(allows) < ALLOWS:
        ip = network_text(4, rng.getrandbits(32), 32)
        if ip not in seen:
            seen.add(ip)
            allows.append((ip, "partner", None, "operator:ops", BANS + len(allows) + 1))
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA + STATE_SCHEMA)
    with conn:
        conn.executemany(f"INSERT INTO bans ({ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?)", rows)
        conn.executemany(f"INSERT INTO allows ({ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?)", allows)
        conn.executemany(
            "INSERT INTO revoked_tokens (jti, expires_at, seq) VALUES (?, ?, ?)",
            [
                (f"{rng.getrandbits(128):032x}", now + 86400 if i % 2 else None, i)
                for i in range(REVOKED_JTIS)
            ],
        )
        conn.executemany(
            "INSERT INTO revoked_subjects (sub, before, seq) VALUES (?, ?, ?)",
            [(f"user-{i}", now - 60, i) for i in range(REVOKED_SUBJECTS)],
        )
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("log_id", "bench-log"), ("offset", str(BANS + ALLOWS))],
        )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"bans": len(rows), "allows": len(allows)}


def load_child(path: str) -> None:
    """Measure ``EdgeState.load()`` of ``path`` in this (fresh) process; print one JSON line."""
    import gc

    from twisted.internet import reactor, task
    from twisted.internet.defer import Deferred

    import edgeauth
    from edgeauth.edge.state import EdgeState
    from edgeauth.edge.store import EdgeStore

    rss_before, _ = rss_kib()
    result: dict[str, Any] = {"rss_before_kib": rss_before, "edgeauth": edgeauth.__file__}

    async def run(_reactor: Any) -> None:
        store = EdgeStore(path, reactor)
        state = EdgeState(store, reactor, "bench")
        started = time.perf_counter()
        cpu = time.process_time()
        await state.load()
        result["load_s"] = time.perf_counter() - started
        result["cpu_s"] = time.process_time() - cpu
        result["counts"] = state.counts()
        result["rss_after_kib"], result["hwm_kib"] = rss_kib()
        gc.collect()
        result["rss_after_gc_kib"], _ = rss_kib()
        await store.close()
        print(json.dumps(result), flush=True)

    task.react(lambda r: Deferred.fromCoroutine(run(r)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        try:
            load_child(args.load)
        except SystemExit:
            pass
        return

    print("edgeauth edge warm-start benchmark", flush=True)
    print(
        f"  python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    with tempfile.TemporaryDirectory(prefix="edgeauth-warm-") as tmp:
        path = Path(tmp) / "edge.sqlite3"
        started = time.perf_counter()
        counts = write_file(path, time.time())
        print(
            f"  wrote {path.stat().st_size / 2**20:.0f} MiB: {counts['bans']:,} bans, "
            f"{counts['allows']:,} allows, {REVOKED_JTIS:,} revoked jtis, {REVOKED_SUBJECTS:,} "
            f"revoked subjects in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        runs: list[dict[str, Any]] = []
        for i in range(args.repeats):
            out = subprocess.run(
                [sys.executable, __file__, "--load", str(path)],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode != 0 or not lines:
                raise SystemExit(f"load child failed ({out.returncode}):\n{out.stderr[-3000:]}")
            run = json.loads(lines[-1])
            runs.append(run)
            print(
                f"  run {i + 1}: load {run['load_s']:.2f} s (CPU {run['cpu_s']:.2f} s), RSS "
                f"{mb(run['rss_before_kib']):.0f} MB before -> {mb(run['rss_after_kib']):.0f} MB "
                f"after load ({mb(run['rss_after_gc_kib']):.0f} MB after gc.collect), peak "
                f"{mb(run['hwm_kib']):.0f} MB; {run['counts']}",
                flush=True,
            )
    print(f"  edgeauth from {os.path.dirname(runs[0]['edgeauth'])}")
    load_s = statistics.median(r["load_s"] for r in runs)
    rss_mb = mb(statistics.median(r["rss_after_kib"] for r in runs))
    hwm_mb = mb(statistics.median(r["hwm_kib"] for r in runs))
    print()
    print("| figure | median | goal |")
    print("|---|---:|---:|")
    print(f"| EdgeState.load() wall time | {load_s:.2f} s | <= {GOAL_S:g} s |")
    print(f"| RSS after load | {rss_mb:.0f} MB | <= {GOAL_RSS_MB:g} MB |")
    print(f"| peak RSS during load (VmHWM) | {hwm_mb:.0f} MB | |")
    print()
    verdict = "meets" if load_s <= GOAL_S else "misses"
    print(f"goal warm start <= {GOAL_S:g} s: {verdict} ({load_s:.2f} s)")
    verdict = "meets" if rss_mb <= GOAL_RSS_MB and hwm_mb <= GOAL_RSS_MB else "misses"
    print(
        f"goal RSS <= {GOAL_RSS_MB:g} MB: {verdict} (after load {rss_mb:.0f} MB, "
        f"peak {hwm_mb:.0f} MB; MB = 10^6 bytes)"
    )


if __name__ == "__main__":
    main()
