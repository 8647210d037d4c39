"""Benchmark: acknowledged bans per second of a ``twistd edgeauth-master`` over HTTP keep-alive.

Run with ``.venv/bin/python bench/master_append.py`` after ``make install`` (the master runs from
the installed package). It starts the master as a subprocess (temp dir, SQLite in WAL mode with
``synchronous=FULL`` as the product sets it, so every group commit fsyncs) and, as a same-run
baseline, a bare ``twisted.web`` resource that answers 201 without any database work (also a
subprocess). For each concurrency (1, 8, 64 keep-alive connections) and each repeat it runs a
separate load-generator process: a small asyncio client that writes pre-built requests on raw
sockets, one request in flight per connection, and measures each request from write to the last
byte of its answer. Every run is bounded by time (warm-up, then a fixed window). Printed: median
over repeats of acknowledged requests per second, p50/p99 latency, server CPU per request, and the
load generator's own CPU use (near 100 % would mean it is the bottleneck).

``--access-log MODE`` sets ``[master] access_log`` (otherwise the product default applies).
``--paired ROUNDS`` compares instead, at 64 clients, masters with several access log modes (and,
with ``--other PATH``, one run from another source tree, e.g. the code before a change) and the
baseline, all started once and loaded in turn, in random order each round: the per-round ratios
are steadier than separate runs on a noisy machine.
Modes used internally: ``--serve-baseline`` (the bare resource) and ``--load`` (the client).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import server

TOKEN = "bench-operator-token-0123456789abcdef"
CONCURRENCY = (1, 8, 64)
GOAL_64 = 4000.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
BASELINE_BODY = (
    b'{"event":{"seq":1,"type":"ip_banned","timestamp":1763850000.123,"ip":"10.0.0.1/32",'
    b'"reason":"bench","expires_at":null,"source":"operator:ops"},"offset":"0000000000000001"}'
)


# --- the baseline server (its own process) ---------------------------------------------------


def serve_baseline() -> None:
    """Serve ``POST /ban/ip`` → 201 with a fixed body from a bare resource; print the port."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Created(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:  # noqa: N802 - twisted.web API
            request.content.read()
            request.setResponseCode(201)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            return BASELINE_BODY

    # The same Site options as the master (no form parsing where Twisted offers the switch).
    from edgeauth.master.service import _SITE_OPTIONS

    site = Site(Created(), **_SITE_OPTIONS)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    print(port.getHost().port, flush=True)
    reactor.run()  # type: ignore[attr-defined]


# --- the load generator (its own process) ----------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive connection with one request in flight at a time."""

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.buffer = b""
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.idle = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send()

    def send(self) -> None:
        request = self.load.next_request()
        if request is None or self.transport is None:
            if not self.idle.done():
                self.idle.set_result(None)
            return
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            self.buffer = buffer
            return
        head = buffer[:end]
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if match is not None:
            if len(buffer) < end + 4 + int(match.group(1)):
                self.buffer = buffer
                return
        elif not buffer.endswith(b"\r\n0\r\n\r\n"):  # chunked: no pipelining, so this is the end
            self.buffer = buffer
            return
        self.buffer = b""
        self.load.done(self.sent_at, time.perf_counter(), head[9:12] == b"201")
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.load.lost += 1
        if not self.idle.done():
            self.idle.set_result(None)


class _Load:
    """Issues pre-built requests until the window closes and records those that completed in it."""

    def __init__(self, requests: list[bytes], start: float, end: float) -> None:
        self.requests = requests
        self.index = 0
        self.start = start
        self.end = end
        self.latencies: list[float] = []
        self.errors = 0
        self.lost = 0
        self.answered = 0

    def next_request(self) -> bytes | None:
        if time.perf_counter() >= self.end:
            return None
        request = self.requests[self.index % len(self.requests)]
        self.index += 1
        return request

    def done(self, sent: float, received: float, ok: bool) -> None:
        self.answered += 1
        if not ok:
            self.errors += 1
        elif sent >= self.start and received <= self.end:
            self.latencies.append(received - sent)


def build_requests(host: str, port: int, count: int, first: int, path: str) -> list[bytes]:
    """Return ``count`` complete POST requests, each banning a distinct 10.0.0.0/8 address."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    out = []
    for i in range(first, first + count):
        body = f'{{"ip":"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}","reason":"bench"}}'
        out.append(head.format(length=len(body)).encode() + body.encode())
    return out


async def _run_load(
    host: str, port: int, clients: int, warmup: float, seconds: float, first: int
) -> dict[str, Any]:
    requests = build_requests(host, port, 120_000, first, "/ban/ip")
    loop = asyncio.get_running_loop()
    now = time.perf_counter()
    load = _Load(requests, now + warmup, now + warmup + seconds)
    cpu_before = time.process_time()
    connections = []
    for _ in range(clients):
        _, protocol = await loop.create_connection(lambda: _Connection(load), host, port)
        connections.append(protocol)
    await asyncio.wait_for(asyncio.gather(*(c.idle for c in connections)), warmup + seconds + 30)
    wall = time.perf_counter() - now
    cpu = time.process_time() - cpu_before
    for connection in connections:
        if connection.transport is not None:
            connection.transport.close()
    latencies = sorted(load.latencies)
    return {
        "completed": len(latencies),
        "rps": len(latencies) / seconds,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        if latencies
        else None,
        "answered": load.answered,
        "errors": load.errors,
        "lost": load.lost,
        "loadgen_cpu": cpu / wall,
    }


# --- the driver ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """Return utime + stime of ``pid`` in seconds (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def filesystem_of(path: Path) -> str:
    """Return 'device (type)' of the mount that holds ``path``."""
    best = ("?", "?", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount, kind = line.split()[:3]
        if str(path.resolve()).startswith(mount) and len(mount) >= len(best[2]):
            best = (device, kind, mount)
    return f"{best[0]} ({best[1]})"


def fsync_ms(directory: Path, count: int = 50) -> float:
    """Return the median time of a 4 KiB write + fsync in ``directory``."""
    path = directory / "fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(count):
            started = time.perf_counter()
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return 1000 * statistics.median(times)


def run_load(port: int, clients: int, warmup: float, seconds: float, first: int) -> dict[str, Any]:
    """Run one load-generator process against ``port`` and return its figures."""
    argv = [sys.executable, __file__, "--load", str(port), str(clients), str(warmup)]
    argv += [str(seconds), str(first)]
    done = subprocess.run(argv, capture_output=True, timeout=warmup + seconds + 60, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def median(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured start of each run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the database lives")
    parser.add_argument(
        "--access-log",
        choices=("twistd", "off", "buffered", "sampled"),
        default=None,
        help="[master] access_log for the master (default: the product default, twistd)",
    )
    parser.add_argument(
        "--paired",
        type=int,
        metavar="ROUNDS",
        default=0,
        help="instead: alternate the masters of --modes (and --other) with the baseline, 64 "
        "clients, ROUNDS rounds in random order, and print medians and per-round ratios",
    )
    parser.add_argument(
        "--modes",
        default="twistd,off,buffered",
        help="with --paired: the access_log modes to compare (comma-separated)",
    )
    parser.add_argument(
        "--other",
        action="append",
        default=[],
        metavar="PYTHONPATH",
        help="with --paired: also a master run from this source tree (e.g. a `git archive "
        "HEAD edgeauth` export: the code before a change), with its default settings; may be "
        "given several times",
    )
    args = parser.parse_args()
    if args.paired:
        paired(args)
        return

    from edgeauth.master import log as event_log
    from edgeauth.master.service import _SITE_OPTIONS

    pragmas = inspect.getsource(event_log._open_connection)
    assert "synchronous=FULL" in pragmas and "journal_mode=WAL" in pragmas, pragmas
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "EDGEAUTH_OPERATOR_TOKEN": TOKEN}
    with tempfile.TemporaryDirectory(prefix="edgeauth-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        ini = work / "master.ini"
        database = work / "master.sqlite3"
        access = ""
        if args.access_log is not None:
            access = f"access_log = {args.access_log}\naccess_log_path = {work / 'access.log'}\n"
        ini.write_text(
            f"[master]\nlisten = tcp:0:interface=127.0.0.1\ndatabase = {database}\n{access}"
            "[tokens]\nops = operator env:EDGEAUTH_OPERATOR_TOKEN\n"
        )
        print("edgeauth master append benchmark")
        print(f"  python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
        print(f"  database {database} on {filesystem_of(work)}")
        print("  SQLite journal_mode=WAL, synchronous=FULL (as edgeauth.master.log sets it)")
        print(f"  4 KiB write+fsync on that filesystem: median {fsync_ms(work):.2f} ms")
        print(f"  twisted.web Site options of master and baseline: {_SITE_OPTIONS or 'defaults'}")
        import edgeauth

        print(f"  master package: {Path(edgeauth.__file__).parent} (this process's edgeauth)")
        mode = args.access_log or "the default"
        print(
            f"  the master logs to a file (twistd --logfile) an audit line per ban; access_log = "
            f"{mode} (twistd: one more line per request in that file, buffered/sampled: lines "
            "written off the reactor thread to access.log); the baseline logs nothing"
        )
        print(
            f"  {args.repeats} repeats x {args.seconds:g} s (+{args.warmup:g} s warm-up) per "
            "concurrency; load generator: separate asyncio process, keep-alive, 1 request in "
            "flight per connection"
        )
        master_argv = [str(bin_dir / "twistd"), "-n", "--pidfile=", "--logfile"]
        master_argv += [str(work / "twistd.log"), "edgeauth-master", "--config", str(ini)]
        baseline_argv = [sys.executable, __file__, "--serve-baseline"]
        results: dict[tuple[str, int], list[dict[str, Any]]] = {}
        first = 0
        with (
            server(master_argv, work / "twistd.log", env) as (master_pid, master_port),
            server(baseline_argv, work / "baseline.out", env) as (base_pid, base_port),
        ):
            targets = {"master": (master_pid, master_port), "baseline": (base_pid, base_port)}
            for repeat in range(args.repeats):
                for clients in CONCURRENCY:
                    for name, (pid, port) in targets.items():
                        cpu_before = cpu_seconds(pid)
                        result = run_load(port, clients, args.warmup, args.seconds, first)
                        cpu = cpu_seconds(pid) - cpu_before
                        answered = result["answered"]
                        result["server_cpu_us"] = 1e6 * cpu / answered if answered else None
                        first += 150_000
                        results.setdefault((name, clients), []).append(result)
                        print(
                            f"  run {repeat + 1} {name:8} c={clients:<3} {result['rps']:8.0f}/s "
                            f"p50 {result['p50_ms']:.2f} ms p99 {result['p99_ms']:.2f} ms "
                            f"errors {result['errors']} loadgen CPU {result['loadgen_cpu']:.0%}",
                            flush=True,
                        )
            master_log = (work / "twistd.log").read_text(errors="replace")
        size_mb = database.stat().st_size / 1e6
    print()
    print(f"Medians of {args.repeats} repeats (database grew to {size_mb:.1f} MB)")
    print(
        "| clients | master req/s | p50 ms | p99 ms | CPU us/req | baseline req/s | p50 ms "
        "| p99 ms | CPU us/req | master/baseline |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for clients in CONCURRENCY:
        row = []
        for name in ("master", "baseline"):
            runs = results[(name, clients)]
            row.append(
                (
                    median([r["rps"] for r in runs]),
                    median([r["p50_ms"] for r in runs]),
                    median([r["p99_ms"] for r in runs]),
                    median([r["server_cpu_us"] for r in runs]),
                )
            )
        (m_rps, m_p50, m_p99, m_cpu), (b_rps, b_p50, b_p99, b_cpu) = row
        print(
            f"| {clients} | {m_rps:.0f} | {m_p50:.2f} | {m_p99:.2f} | {m_cpu:.0f} | {b_rps:.0f} "
            f"| {b_p50:.2f} | {b_p99:.2f} | {b_cpu:.0f} | {m_rps / b_rps:.2f} |"
        )
    errors = sum(r["errors"] + r["lost"] for runs in results.values() for r in runs)
    print(f"errors or lost connections: {errors}")
    if "Traceback" in master_log:
        print("the master logged a traceback:\n" + master_log[-3000:])
    m64 = median([r["rps"] for r in results[("master", 64)]])
    verdict = "meets" if m64 >= GOAL_64 else "misses"
    print(f"goal >= {GOAL_64:.0f}/s at 64 clients: {verdict} ({m64:.0f}/s)")

    print(f"load at the end {os.getloadavg()} (other processes share these CPUs)")


def paired(args: argparse.Namespace) -> None:
    """Alternate several masters and the baseline at 64 clients; every server stays up."""
    import random

    bin_dir = Path(sys.executable).parent
    configs: dict[str, tuple[str | None, str]] = {}
    for index, other in enumerate(args.other):
        configs["other tree" if len(args.other) == 1 else f"other tree {index + 1}"] = (other, "")
    for mode in args.modes.split(","):
        configs[f"access_log={mode}"] = (None, f"access_log = {mode}\n")
    print(f"edgeauth master append benchmark, paired: {args.paired} rounds x 64 clients")
    print(f"  python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    print(f"  {args.seconds:g} s (+{args.warmup:g} s warm-up) per server and round, random order")
    with (
        tempfile.TemporaryDirectory(prefix="edgeauth-bench-", dir=args.dir) as tmp,
        contextlib.ExitStack() as stack,
    ):
        targets: dict[str, tuple[int, int]] = {}
        for index, (name, (pythonpath, keys)) in enumerate(configs.items()):
            work = Path(tmp) / str(index)
            work.mkdir()
            ini = work / "master.ini"
            if pythonpath is None:  # this tree: the access log keys apply
                keys += f"access_log_path = {work / 'access.log'}\n"
            ini.write_text(
                f"[master]\nlisten = tcp:0:interface=127.0.0.1\n"
                f"database = {work / 'master.sqlite3'}\n{keys}"
                "[tokens]\nops = operator env:EDGEAUTH_OPERATOR_TOKEN\n"
            )
            env = {**os.environ, "EDGEAUTH_OPERATOR_TOKEN": TOKEN}
            if pythonpath is not None:
                env["PYTHONPATH"] = pythonpath
            argv = [str(bin_dir / "twistd"), "-n", "--pidfile=", "--logfile"]
            argv += [str(work / "twistd.log"), "edgeauth-master", "--config", str(ini)]
            targets[name] = stack.enter_context(server(argv, work / "twistd.log", env))
        env = {**os.environ, "EDGEAUTH_OPERATOR_TOKEN": TOKEN}
        baseline_argv = [sys.executable, __file__, "--serve-baseline"]
        targets["baseline"] = stack.enter_context(
            server(baseline_argv, Path(tmp) / "baseline.out", env)
        )
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        first = 0
        for round_ in range(args.paired):
            order = list(targets)
            random.shuffle(order)
            for name in order:
                pid, port = targets[name]
                cpu_before = cpu_seconds(pid)
                result = run_load(port, 64, args.warmup, args.seconds, first)
                first += 150_000
                result["server_cpu_us"] = 1e6 * (cpu_seconds(pid) - cpu_before) / result["answered"]
                runs[name].append(result)
            print(
                f"  round {round_ + 1}: "
                + ", ".join(
                    f"{name} {runs[name][-1]['rps']:.0f}/s {runs[name][-1]['server_cpu_us']:.0f} us"
                    for name in targets
                ),
                flush=True,
            )
    print()
    print(
        "| server | median req/s | min-max req/s | CPU us/req | p99 ms | / baseline (per round) |"
    )
    print("|---|---|---|---|---|---|")
    for name, results in runs.items():
        rps = [r["rps"] for r in results]
        ratio = statistics.median(
            r["rps"] / b["rps"] for r, b in zip(results, runs["baseline"], strict=True)
        )
        print(
            f"| {name} | {median(rps):.0f} | {min(rps):.0f}-{max(rps):.0f} "
            f"| {median([r['server_cpu_us'] for r in results]):.0f} "
            f"| {median([r['p99_ms'] for r in results]):.1f} | {ratio:.2f} |"
        )
    print(f"load at the end {os.getloadavg()} (other processes share these CPUs)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-baseline"]:
        serve_baseline()
    elif sys.argv[1:2] == ["--load"]:
        port_, clients_, warmup_, seconds_, first_ = sys.argv[2:7]
        figures = asyncio.run(
            _run_load(
                "127.0.0.1", int(port_), int(clients_), float(warmup_), float(seconds_), int(first_)
            )
        )
        print(json.dumps(figures))
    else:
        main()
