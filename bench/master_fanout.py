"""Benchmark: fan-out latency, CPU and memory of a ``twistd edgeauth-master`` with N SSE readers.

Run with ``.venv/bin/python bench/master_fanout.py`` after ``make install`` (the master runs from
the installed package). For N = 100, 1,000 and 5,000 it starts a fresh master (temp dir, WAL +
``synchronous=FULL``; ``sse_cycle`` raised so that no connection is cycled during a run) and, as a
same-run baseline, a fresh bare Twisted SSE server written below (no auth, no database). A separate
subscriber process opens N raw sockets to ``/v1/stream/events?offset=now&live=sse`` (each with its
own ``Edgeauth-Edge-Id``, as edges send) and reads them with epoll. The driver then posts bans one
at a time (``--events``, default 20, spaced by ``--spacing``) and records, on CLOCK_MONOTONIC
(system-wide on Linux, so both processes share it), when it started sending each POST; the
subscriber records when each data frame arrived (the time its epoll wait returned, so its own
processing adds at most one batch). Reported: delivery latency over every (subscriber, event) pair
(p50/p99/max), the time until the last subscriber had each event (median/max), server CPU per event
(utime+stime from /proc, including the POST itself) and server RSS (VmRSS) per subscriber.

The master's code is whatever ``import edgeauth`` finds in the environment ``twistd`` gets: the
installed package, or the checkout with ``PYTHONPATH=.`` (the header prints which). For a paired
A/B in the same run, ``--variant NAME=DIR`` adds a master run with ``PYTHONPATH=DIR`` (for instance
a copy of the tree with the previous ``fanout.py``), alternated with the others in every repeat.

Modes used internally: ``--serve-baseline`` and ``--subscribe``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import server

OPERATOR_TOKEN = "bench-operator-token-0123456789abcdef"
EDGE_TOKEN = "bench-edge-token-0123456789abcdef"
SIZES = (100, 1000, 5000)
GOALS_P99_MS = {1000: 25.0, 5000: 250.0}
GOAL_RSS_KIB = 10.0
WAVE = 50  # connections opened at once: Twisted's default listen backlog is 50
SEQ = re.compile(rb'"seq":(\d+)')
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the baseline: a bare Twisted SSE server (its own process) -------------------------------


def serve_baseline() -> None:
    """Serve SSE on GET and fan out each ``POST /ban/ip`` to every reader; print the port."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    readers: set[Any] = set()
    tail = [0]

    def control() -> bytes:
        doc = {"streamNextOffset": f"{tail[0]:016d}", "streamCursor": "0", "upToDate": True}
        return b"event: control\ndata: " + json.dumps(doc).encode() + b"\n\n"

    class Stream(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> int:  # noqa: N802 - twisted.web API
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-store")
            request.write(b": baseline stream\n\n" + control())
            readers.add(request)
            request.notifyFinish().addBoth(lambda _: readers.discard(request))
            return NOT_DONE_YET

        def render_POST(self, request: Any) -> bytes:  # noqa: N802 - twisted.web API
            body = json.loads(request.content.read())
            tail[0] += 1
            event = {"seq": tail[0], "type": "ip_banned", "timestamp": round(time.time(), 3)}
            event.update(ip=body["ip"] + "/32", reason=body["reason"], expires_at=None)
            data = json.dumps([event], separators=(",", ":")).encode()
            frame = b"event: data\ndata: " + data + b"\n\n" + control()
            for reader in list(readers):
                reader.write(frame)
            request.setResponseCode(201)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"event": event}).encode()

    port = reactor.listenTCP(0, Site(Stream()), interface="127.0.0.1")  # type: ignore[attr-defined]
    print(port.getHost().port, flush=True)
    reactor.run()  # type: ignore[attr-defined]


# --- the subscriber process ------------------------------------------------------------------


class _Reader:
    """One SSE connection: its socket, unparsed bytes and whether its stream is live."""

    __slots__ = ("sock", "buffer", "ready")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.ready = False


def subscribe(port: int, count: int) -> None:
    """Open ``count`` SSE readers, say "ready", then record arrivals until told "done"."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 256), hard))
    epoll = select.epoll()
    readers: dict[int, _Reader] = {}
    arrivals: dict[int, list[float]] = {}
    closed = 0

    def feed(fd: int, now: float) -> None:
        nonlocal closed
        reader = readers[fd]
        try:
            data = reader.sock.recv(65536)
        except BlockingIOError:
            return
        if not data:
            closed += 1
            epoll.unregister(fd)
            reader.sock.close()
            del readers[fd]
            return
        buffer = reader.buffer + data
        end = buffer.rfind(b"\n\n")
        if end < 0:
            reader.buffer = buffer
            return
        complete, reader.buffer = buffer[: end + 2], buffer[end + 2 :]
        if not reader.ready:
            reader.ready = b"event: control" in complete
            return
        for frame in complete.split(b"\n\n"):  # chunked encoding: sizes sit between frames
            if b"event: data\n" in frame:
                for seq in SEQ.findall(frame):
                    arrivals.setdefault(int(seq), []).append(now)
                    if len(arrivals[int(seq)]) == len(readers):
                        print(f"got {int(seq)}", flush=True)

    for start in range(0, count, WAVE):
        wave = []
        for index in range(start, min(count, start + WAVE)):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.setblocking(False)
            sock.sendall(
                b"GET /v1/stream/events?offset=now&live=sse HTTP/1.1\r\nHost: bench\r\n"
                b"Authorization: Bearer " + EDGE_TOKEN.encode() + b"\r\n"
                b"Edgeauth-Edge-Id: bench-" + str(index).encode() + b"\r\n\r\n"
            )
            readers[sock.fileno()] = reader = _Reader(sock)
            epoll.register(sock.fileno(), select.EPOLLIN)
            wave.append(reader)
        deadline = time.monotonic() + 60
        while not all(r.ready for r in wave) and time.monotonic() < deadline:
            for fd, _ in epoll.poll(0.1):
                feed(fd, time.monotonic())
    print(f"ready {sum(r.ready for r in readers.values())} {closed}", flush=True)

    stdin = sys.stdin.fileno()
    epoll.register(stdin, select.EPOLLIN)
    cpu_start, wall_start = time.process_time(), time.monotonic()
    while True:
        events = epoll.poll(1.0, len(readers) + 8)  # every ready socket at once, one timestamp
        now = time.monotonic()
        if any(fd == stdin for fd, _ in events):
            break
        for fd, _ in events:
            feed(fd, now)
    cpu = (time.process_time() - cpu_start) / (time.monotonic() - wall_start)
    print(json.dumps({"arrivals": arrivals, "closed": closed, "cpu": cpu}), flush=True)
    for reader in readers.values():
        reader.sock.close()


# --- the driver ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """Return utime + stime of ``pid`` in seconds (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    """Return VmRSS of ``pid`` in KiB."""
    found = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert found is not None
    return int(found.group(1))


class Lines:
    """Reads lines from a child's stdout with a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.pending = b""

    def next(self, timeout: float) -> str | None:
        """Return the next line, or None at EOF or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()


def post_ban(conn: http.client.HTTPConnection, ip: str) -> tuple[float, int]:
    """POST one ban; return when sending started (monotonic) and the seq it got."""
    body = json.dumps({"ip": ip, "reason": "fanout bench"}).encode()
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}", "Content-Type": "application/json"}
    sent = time.monotonic()
    conn.request("POST", "/ban/ip", body=body, headers=headers)
    response = conn.getresponse()
    answer = response.read()
    if response.status != 201:
        raise SystemExit(f"ban refused: {response.status} {answer!r}")
    return sent, int(json.loads(answer)["event"]["seq"])


def measure(pid: int, port: int, count: int, events: int, spacing: float) -> dict[str, Any]:
    """Connect ``count`` subscribers to ``port``, post ``events`` bans, return the figures."""
    warm = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    post_ban(warm, "192.0.2.1")  # first requests: lazy imports and caches, before measuring RSS
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sse:
        sse.sendall(
            b"GET /v1/stream/events?offset=now&live=sse HTTP/1.1\r\nHost: bench\r\n"
            b"Authorization: Bearer " + EDGE_TOKEN.encode() + b"\r\n\r\n"
        )
        seen = b""
        while b"event: control" not in seen and (chunk := sse.recv(65536)):
            seen += chunk
    time.sleep(0.5)
    rss_before = rss_kib(pid)
    argv = [sys.executable, __file__, "--subscribe", str(port), str(count)]
    sub = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        lines = Lines(sub)
        started = time.monotonic()
        ready = lines.next(300)
        if ready is None or not ready.startswith("ready "):
            raise SystemExit(f"subscribers did not connect: {ready!r}")
        connect_seconds = time.monotonic() - started
        connected = int(ready.split()[1])
        time.sleep(1.0)
        rss_after = rss_kib(pid)
        cpu_before = cpu_seconds(pid)
        sent: dict[int, float] = {}
        complete: dict[int, float] = {}
        for index in range(events):
            when, seq = post_ban(warm, f"198.51.100.{index + 1}")
            sent[seq] = when
            while (line := lines.next(10)) is not None:
                if line == f"got {seq}":
                    complete[seq] = time.monotonic()
                    break
            time.sleep(spacing)
        cpu = cpu_seconds(pid) - cpu_before
        assert sub.stdin is not None
        sub.stdin.write(b"done\n")
        sub.stdin.flush()
        report = json.loads(lines.next(120) or "{}")
    finally:
        if sub.poll() is None:
            sub.kill()
        sub.wait()
        warm.close()
    arrivals = {int(seq): times for seq, times in report["arrivals"].items()}
    latencies = sorted(
        1000 * (t - sent[seq]) for seq, times in arrivals.items() if seq in sent for t in times
    )
    last = [1000 * (max(arrivals[seq]) - sent[seq]) for seq in sent if seq in arrivals]
    delivered = len(latencies)
    return {
        "connected": connected,
        "connect_s": connect_seconds,
        "delivered": delivered,
        "expected": connected * events,
        "closed": report["closed"],
        "p50": latencies[delivered // 2],
        "p99": latencies[min(delivered - 1, int(delivered * 0.99))],
        "max": latencies[-1],
        "last_median": statistics.median(last),
        "cpu_ms_per_event": 1000 * cpu / events,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_per_sub_kib": (rss_after - rss_before) / count,
        "sub_cpu": report["cpu"],
    }


def code_location(env: dict[str, str]) -> str:
    """Return the directory ``import edgeauth`` resolves to with ``env`` (what twistd runs)."""
    probe = "import edgeauth, os; print(os.path.dirname(edgeauth.__file__))"
    found = subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        cwd="/",  # ``-c`` puts the working directory first on sys.path; twistd does not
        capture_output=True,
        text=True,
        check=True,
    )
    return found.stdout.strip()


def run_once(
    name: str, count: int, args: argparse.Namespace, env: dict[str, str]
) -> dict[str, Any]:
    """Start a fresh master (or variant) or baseline, measure it with ``count`` readers, stop it."""
    with tempfile.TemporaryDirectory(prefix="edgeauth-fanout-") as tmp:
        work = Path(tmp)
        ini = work / "master.ini"
        ini.write_text(
            "[master]\nlisten = tcp:0:interface=127.0.0.1\n"
            f"database = {work / 'master.sqlite3'}\nsse_cycle = 3600\n"
            "[tokens]\nops = operator env:EDGEAUTH_OPERATOR_TOKEN\n"
            "edges = edge env:EDGEAUTH_EDGE_TOKEN\n"
        )
        if name != "baseline":
            argv = [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "--logfile"]
            argv += [str(work / "out.log"), "edgeauth-master", "--config", str(ini)]
        else:
            argv = [sys.executable, __file__, "--serve-baseline"]
        with server(argv, work / "out.log", env) as (pid, port):
            result = measure(pid, port, count, args.events, args.spacing)
            log_text = (work / "out.log").read_text(errors="replace")
        if "Traceback" in log_text:
            print(f"  {name} logged a traceback:\n{log_text[-3000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20, help="bans posted per N")
    parser.add_argument("--spacing", type=float, default=0.2, help="seconds between bans")
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="runs per N and server")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also run a master with PYTHONPATH=DIR, reported as NAME (repeatable)",
    )
    args = parser.parse_args()
    variants: dict[str, str] = {}
    for spec in args.variant:
        name, sep, directory = spec.partition("=")
        if not sep or not name or name in ("master", "baseline"):
            parser.error(f"--variant wants NAME=DIR with a new NAME, not {spec!r}")
        variants[name] = str(Path(directory).resolve())

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(args.sizes) + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))
    env = {**os.environ, "EDGEAUTH_OPERATOR_TOKEN": OPERATOR_TOKEN}
    env["EDGEAUTH_EDGE_TOKEN"] = EDGE_TOKEN
    if env.get("PYTHONPATH"):  # absolute, so that the probe below and twistd read the same path
        paths = env["PYTHONPATH"].split(os.pathsep)
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in paths if p)
    print("edgeauth master fan-out benchmark", flush=True)
    print(f"  python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    print(
        f"  {args.events} bans per N, {args.spacing:g} s apart; subscribers: one separate epoll "
        "process; clock: CLOCK_MONOTONIC in both processes"
    )
    print(
        "  master: WAL + synchronous=FULL (each ban is fsync'd before it is fanned out), "
        "sse_cycle 3600 s (no cycling during a run), ping_interval 15 s, logging to a file"
    )
    envs = {"master": env, "baseline": env}
    for name, directory in variants.items():
        envs[name] = {**env, "PYTHONPATH": directory}
    names = ["master", *variants, "baseline"]
    for name in names[:-1]:
        print(f"  {name}: edgeauth from {code_location(envs[name])}")
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for count in args.sizes:
            for name in names:
                result = run_once(name, count, args, envs[name])
                runs.setdefault((name, count), []).append(result)
                print(
                    f"  run {repeat + 1} N={count:<5} {name:8} connected {result['connected']} "
                    f"in {result['connect_s']:.1f} s, delivered {result['delivered']}/"
                    f"{result['expected']}, closed {result['closed']}, p50 {result['p50']:.1f} "
                    f"ms p99 {result['p99']:.1f} ms max {result['max']:.1f} ms, CPU "
                    f"{result['cpu_ms_per_event']:.1f} ms/event, RSS {result['rss_before_kib']} "
                    f"-> {result['rss_after_kib']} KiB, subscriber-process CPU "
                    f"{result['sub_cpu']:.0%}",
                    flush=True,
                )
    results = {
        key: {field: statistics.median(r[field] for r in values) for field in values[0]}
        for key, values in runs.items()
    }
    print()
    print(f"Medians of {args.repeats} repeats (each with a fresh server)")
    print(
        "| N | server | p50 ms | p99 ms | max ms | last reader, median ms | CPU ms/event "
        "| CPU us/event/reader | RSS MiB | RSS KiB/reader |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for count in args.sizes:
        for name in names:
            r = results[(name, count)]
            print(
                f"| {count} | {name} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} "
                f"| {r['last_median']:.1f} | {r['cpu_ms_per_event']:.1f} "
                f"| {1000 * r['cpu_ms_per_event'] / count:.1f} | {r['rss_after_kib'] / 1024:.1f} "
                f"| {r['rss_per_sub_kib']:.1f} |"
            )
    print()
    print("Ratios to the baseline of the same repeat (median over repeats): p99, CPU per event")
    for count in args.sizes:
        base = runs[("baseline", count)]
        for name in names[:-1]:
            pairs = list(zip(runs[(name, count)], base, strict=True))
            p99_ratio = statistics.median(r["p99"] / b["p99"] for r, b in pairs)
            cpu_ratio = statistics.median(
                r["cpu_ms_per_event"] / max(b["cpu_ms_per_event"], 1e-9) for r, b in pairs
            )
            print(f"  N={count:<5} {name:8} p99 x{p99_ratio:.2f}  CPU x{cpu_ratio:.2f}")
    print()
    for count, goal in GOALS_P99_MS.items():
        if ("master", count) in results:
            p99 = results[("master", count)]["p99"]
            verdict = "meets" if p99 <= goal else "misses"
            print(f"goal p99 <= {goal:g} ms at N={count}: {verdict} ({p99:.1f} ms)")
    largest = max(args.sizes)
    per_sub = results[("master", largest)]["rss_per_sub_kib"]
    verdict = "meets" if per_sub <= GOAL_RSS_KIB else "misses"
    print(
        f"goal RSS <= {GOAL_RSS_KIB:g} KiB per subscriber: {verdict} "
        f"({per_sub:.1f} KiB at N={largest}, the least noisy estimate)"
    )

    print(f"load at the end {os.getloadavg()} (other processes share these CPUs)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-baseline"]:
        serve_baseline()
    elif sys.argv[1:2] == ["--subscribe"]:
        subscribe(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
