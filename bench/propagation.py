"""Benchmark: ban propagation, POST to the master -> enforced on every edge, with 1 and 10 edges.

Run with ``.venv/bin/python bench/propagation.py``. The master and the edges run as
``twistd -n edgeauth-master`` / ``twistd -n edgeauth-edge`` subprocesses with this checkout first
on their ``PYTHONPATH`` (so they run the working tree's code; the plugins come from the installed
package or the checkout's ``twisted/plugins``), each edge with its own proxy and admin ports and
its own SQLite file; the origin is a closed port (never used: the banned clients are refused
before it). Every process is stopped by its PID (SIGTERM, then SIGKILL after 20 s).

For each edge count a fresh master and fresh edges start; once every edge is ready (``/readyz``)
and has applied a few warm-up bans, the driver posts ``--bans`` bans one at a time over one
keep-alive connection, each after the previous one was enforced everywhere and ``--spacing``
seconds passed. For each ban it records ``time.time()`` just before sending the POST.

How enforcement is observed (resolution well under 1 ms, no polling in the measured path):
every process runs with ``--logger=propagation.log_observer`` (defined below), a file observer
like twistd's ``--logfile`` one but stamping each line with the event's ``log_time`` to the
microsecond. An edge logs ``applied ip_banned seq N`` right after the event went into the index
every check reads, in the same reactor turn, so that stamp is when the edge starts refusing
the address. The master logs the append after its commit (WAL, ``synchronous=FULL``). All
processes share one machine and ``CLOCK_REALTIME``. The driver reads the logs (polling them every
2 ms, which only decides when it posts the next ban, never a figure). At the end, each edge is
also checked end to end: a client bound to a banned 127.77.0.x address gets 403 ``ip_banned``
from its proxy port, a client from an address never banned does not.

Reported per edge count: latency to *every* edge (max over edges per ban) p50/p99/max, latency
per (edge, ban) p50/p99, the master's part (POST sent -> committed, and -> 201 received), and
SSE reconnects during the run (the master cycles streams every ``sse_cycle`` = 60 s by default).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import free_ports

OPERATOR_TOKEN = "bench-operator-token-0123456789abcdef"
EDGE_TOKEN = "bench-edge-token-0123456789abcdef"
GOAL_P99_MS = 20.0
EDGE_COUNTS = (1, 10)
WARMUP = 5
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
APPLIED = re.compile(r"^(\d+\.\d+) .*applied ip_banned seq (\d+) from", re.M)
COMMITTED = re.compile(r"^(\d+\.\d+) .*ip_banned .*\(seq (\d+)\)$", re.M)


def log_observer() -> Any:
    """The twistd ``--logger``: write every event to ``$EDGEAUTH_BENCH_LOG``, stamped to the µs."""
    from twisted.logger import FileLogObserver, eventAsText

    stream = open(os.environ["EDGEAUTH_BENCH_LOG"], "a", encoding="utf-8")  # noqa: SIM115

    def format_event(event: dict[str, Any]) -> str:
        text = eventAsText(event, includeTimestamp=False, includeSystem=True)
        return f"{event['log_time']:.6f} {text}\n"

    return FileLogObserver(stream, format_event)


# --- processes ------------------------------------------------------------------------------


class Proc:
    """One twistd subprocess; stopped by its PID."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], work: Path) -> None:
        self.name = name
        self.log = work / f"{name}.log"
        self.log.touch()
        with (work / f"{name}.out").open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**env, "EDGEAUTH_BENCH_LOG": str(self.log)},
            )
        self.offset = 0
        self.pending = ""

    def new_lines(self) -> str:
        """Return complete log lines written since the last call."""
        with self.log.open("r", encoding="utf-8", errors="replace") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        self.pending += chunk
        cut = self.pending.rfind("\n") + 1
        lines, self.pending = self.pending[:cut], self.pending[cut:]
        return lines

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM to its PID, SIGKILL after 20 s."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def http_get(
    port: int, path: str, timeout: float = 2.0, source: str | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=timeout, source_address=(source, 0) if source else None
    )
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(proc: Proc, port: int, path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            break
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_get(port, path)[0] == 200:
                return
        time.sleep(0.05)
    out = (proc.log.parent / f"{proc.name}.out").read_text(errors="replace")
    raise SystemExit(f"{proc.name} not ready on {path}:\n{proc.log.read_text()[-3000:]}\n{out}")


@contextlib.contextmanager
def fleet(edges: int, work: Path) -> Iterator[tuple[Proc, int, list[tuple[Proc, int, int]]]]:
    """Start a master and ``edges`` edges; yield (master, port, [(edge, proxy, admin)])."""
    twistd = str(Path(sys.executable).parent / "twistd")
    env = {
        **os.environ,
        "EDGEAUTH_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "EDGEAUTH_EDGE_TOKEN": EDGE_TOKEN,
        # The checkout's code (the working tree under test), then this file for --logger.
        "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), str(REPO)]),
    }
    ports = free_ports(2 + 2 * edges)
    master_port, origin_port = ports[0], ports[1]  # origin_port stays closed
    (work / "master.ini").write_text(
        "[master]\n"
        f"listen = tcp:{master_port}:interface=127.0.0.1\n"
        f"database = {work / 'master.sqlite3'}\n"
        "[tokens]\n"
        "ops = operator env:EDGEAUTH_OPERATOR_TOKEN\n"
        "edges = edge env:EDGEAUTH_EDGE_TOKEN\n"
    )
    base = [twistd, "-n", "--pidfile=", "--logger=propagation.log_observer"]
    procs: list[Proc] = []
    try:
        master = Proc(
            "master", [*base, "edgeauth-master", "--config", str(work / "master.ini")], env, work
        )
        procs.append(master)
        wait_ready(master, master_port, "/healthz")
        started = []
        for i in range(edges):
            proxy, admin = ports[2 + 2 * i], ports[3 + 2 * i]
            ini = work / f"edge-{i}.ini"
            ini.write_text(
                "[edge]\n"
                f"id = edge-{i}\n"
                f"listen = tcp:{proxy}:interface=127.0.0.1\n"
                f"admin_listen = tcp:{admin}:interface=127.0.0.1\n"
                f"origin = http://127.0.0.1:{origin_port}\n"
                f"masters = http://127.0.0.1:{master_port}\n"
                "token = env:EDGEAUTH_EDGE_TOKEN\n"
                f"database = {work / f'edge-{i}.sqlite3'}\n"
                "ping_interval = 15\n"
            )
            edge = Proc(f"edge-{i}", [*base, "edgeauth-edge", "--config", str(ini)], env, work)
            procs.append(edge)
            started.append((edge, proxy, admin))
        for edge, _proxy, admin in started:
            wait_ready(edge, admin, "/readyz")
        yield master, master_port, started
    finally:
        for proc in reversed(procs):
            proc.stop()


# --- measuring ------------------------------------------------------------------------------


def post_ban(conn: http.client.HTTPConnection, ip: str) -> tuple[float, float, int]:
    """POST one ban; return (time.time() before sending, after the 201, seq)."""
    body = json.dumps({"ip": ip, "reason": "propagation bench"}).encode()
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}", "Content-Type": "application/json"}
    sent = time.time()
    conn.request("POST", "/ban/ip", body=body, headers=headers)
    response = conn.getresponse()
    answer = response.read()
    acked = time.time()
    if response.status != 201:
        raise SystemExit(f"ban refused: {response.status} {answer!r}")
    return sent, acked, int(json.loads(answer)["event"]["seq"])


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def measure(edges: int, bans: int, spacing: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edgeauth-propagation-") as tmp:
        work = Path(tmp)
        with fleet(edges, work) as (master, master_port, started):
            applied: list[dict[int, float]] = [{} for _ in started]
            committed: dict[int, float] = {}

            def drain() -> None:
                for i, (edge, _p, _a) in enumerate(started):
                    for stamp, seq in APPLIED.findall(edge.new_lines()):
                        applied[i][int(seq)] = float(stamp)
                for stamp, seq in COMMITTED.findall(master.new_lines()):
                    committed[int(seq)] = float(stamp)

            def wait_everywhere(seq: int, timeout: float = 10.0) -> bool:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    drain()
                    if all(seq in a for a in applied):
                        return True
                    time.sleep(0.002)
                return False

            conn = http.client.HTTPConnection("127.0.0.1", master_port, timeout=30)
            for i in range(WARMUP):
                _s, _a, seq = post_ban(conn, f"192.0.2.{i + 1}")
                if not wait_everywhere(seq, 30.0):
                    raise SystemExit(f"warm-up ban seq {seq} not applied everywhere")
            reconnects_before = reconnects(started)
            rows: list[tuple[float, float, int]] = []
            missing = 0
            for i in range(bans):
                ip = f"127.77.{i // 250}.{i % 250 + 1}"
                sent, acked, seq = post_ban(conn, ip)
                if not wait_everywhere(seq):
                    missing += 1
                rows.append((sent, acked, seq))
                time.sleep(spacing)
            conn.close()
            drain()
            reconnects_after = reconnects(started)
            verified = verify(started, bans)
        for edge, _p, _a in started:
            text = edge.log.read_text(errors="replace") if edge.log.exists() else ""
            if "Traceback" in text:
                print(f"  {edge.name} logged a traceback:\n{text[-2000:]}")
    every, per_edge, commit, ack = [], [], [], []
    for sent, acked, seq in rows:
        stamps = [a[seq] for a in applied if seq in a]
        if len(stamps) == len(applied):
            every.append(1000 * (max(stamps) - sent))
        per_edge.extend(1000 * (s - sent) for s in stamps)
        if seq in committed:
            commit.append(1000 * (committed[seq] - sent))
        ack.append(1000 * (acked - sent))
    return {
        "edges": edges,
        "bans": bans,
        "missing": missing,
        "every": every,
        "per_edge": per_edge,
        "commit": commit,
        "ack": ack,
        "reconnects": reconnects_after - reconnects_before,
        "verified": verified,
    }


def reconnects(started: list[tuple[Proc, int, int]]) -> int:
    total = 0
    for _edge, _proxy, admin in started:
        status, body = http_get(admin, "/status")
        if status == 200:
            total += int(json.loads(body).get("reconnects") or 0)
    return total


def verify(started: list[tuple[Proc, int, int]], bans: int) -> str:
    """End to end: banned sources get 403 ip_banned from every proxy, another source does not."""
    samples = [0, bans // 2, bans - 1]
    bad = []
    for edge, proxy, admin in started:
        for i in samples:
            source = f"127.77.{i // 250}.{i % 250 + 1}"
            status, body = http_get(proxy, "/", source=source)
            if status != 403 or b"ip_banned" not in body:
                bad.append(f"{edge.name} {source}: {status}")
            code, doc = http_get(admin, f"/explain?ip={source}")
            view = json.loads(doc) if code == 200 else {}
            if not (view.get("refused") is True or view.get("verdict") == "refused"):
                bad.append(f"{edge.name} explain {source}: {code} {doc[:80]!r}")
        status, _body = http_get(proxy, "/", source="127.78.0.1")
        if status == 403:
            bad.append(f"{edge.name} 127.78.0.1 (never banned) got 403")
    if bad:
        return "FAILED: " + "; ".join(bad[:6])
    return (
        f"ok ({len(samples)} banned sources x {len(started)} edges refused 403 ip_banned "
        "through the proxy and /explain; an unbanned source was not refused)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bans", type=int, default=200, help="bans per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs (fresh processes) per N")
    parser.add_argument("--spacing", type=float, default=0.02, help="seconds between bans")
    parser.add_argument("--edges", type=int, nargs="*", default=list(EDGE_COUNTS))
    args = parser.parse_args()

    print("edgeauth ban propagation benchmark", flush=True)
    print(
        f"  python {sys.version.split()[0]}, {os.cpu_count()} CPUs (master, edges and driver "
        f"share them), load {', '.join(f'{x:.2f}' for x in os.getloadavg())}; edgeauth from "
        f"{REPO / 'edgeauth'}"
    )
    print(
        f"  {args.repeats} runs x {args.bans} bans one at a time, {args.spacing * 1000:g} ms "
        "after the previous one was enforced everywhere; clock: time.time() before the POST vs "
        "the log_time of each edge's 'applied ip_banned seq N' line (stamped in-process when the "
        "index changed; resolution 1 us); master: WAL + synchronous=FULL, SSE stream mode, "
        "default sse_cycle 60 s",
        flush=True,
    )
    summary = []
    for edges in args.edges:
        runs = []
        for run in range(args.repeats):
            r = measure(edges, args.bans, args.spacing)
            runs.append(r)
            every, per_edge = r["every"], r["per_edge"]
            print(
                f"  {edges:>2} edge(s) run {run + 1}: every edge p50 {pct(every, 0.5):.2f} ms, "
                f"p99 {pct(every, 0.99):.2f} ms, max {max(every):.2f} ms; per edge p50 "
                f"{pct(per_edge, 0.5):.2f} ms p99 {pct(per_edge, 0.99):.2f} ms; master commit "
                f"p50 {pct(r['commit'], 0.5):.2f} ms p99 {pct(r['commit'], 0.99):.2f} ms, "
                f"201 p50 {pct(r['ack'], 0.5):.2f} ms; not "
                f"applied within 10 s: {r['missing']}; SSE reconnects {r['reconnects']}; "
                f"end-to-end check: {r['verified']}",
                flush=True,
            )
        pooled = [x for r in runs for x in r["every"]]
        summary.append(
            {
                "edges": edges,
                "applied": len(pooled),
                "posted": sum(r["bans"] for r in runs),
                "p50": statistics.median(pct(r["every"], 0.5) for r in runs),
                "p99": statistics.median(pct(r["every"], 0.99) for r in runs),
                "max": statistics.median(max(r["every"]) for r in runs),
                "pooled_p99": pct(pooled, 0.99),
                "pooled_max": max(pooled),
                "edge_p50": statistics.median(pct(r["per_edge"], 0.5) for r in runs),
                "commit": statistics.median(pct(r["commit"], 0.5) for r in runs),
                "commit_p99": statistics.median(pct(r["commit"], 0.99) for r in runs),
                "ack": statistics.median(pct(r["ack"], 0.5) for r in runs),
                "missing": sum(r["missing"] for r in runs),
                "reconnects": sum(r["reconnects"] for r in runs),
                "verified": all(r["verified"].startswith("ok") for r in runs),
            }
        )
    print()
    print(
        "| edges | bans applied everywhere | every edge p50 ms | p99 ms | max ms | p99 ms, all "
        "runs pooled | max ms, pooled | per edge p50 ms | master commit p50 ms | commit p99 ms "
        "| POST 201 p50 ms | SSE reconnects |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        print(
            f"| {s['edges']} | {s['applied']}/{s['posted']} | {s['p50']:.2f} | {s['p99']:.2f} | "
            f"{s['max']:.2f} | {s['pooled_p99']:.2f} | {s['pooled_max']:.2f} | "
            f"{s['edge_p50']:.2f} | {s['commit']:.2f} | {s['commit_p99']:.2f} | {s['ack']:.2f} | "
            f"{s['reconnects']} |"
        )
    print(f"(every figure but the pooled ones: the median over the {args.repeats} runs)")
    print()
    for s in summary:
        ok = s["p99"] <= GOAL_P99_MS and not s["missing"] and s["verified"]
        print(
            f"goal p99 <= {GOAL_P99_MS:g} ms with {s['edges']} edge(s): "
            f"{'meets' if ok else 'misses'} (median p99 {s['p99']:.2f} ms, pooled "
            f"{s['pooled_p99']:.2f} ms; end-to-end checks {'ok' if s['verified'] else 'FAILED'})"
        )


if __name__ == "__main__":
    main()
