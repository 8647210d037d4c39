"""Benchmark: the edge response cache (issue 6): HIT throughput, invalidate-to-MISS, purge cost.

Run with ``.venv/bin/python bench/edge_cache.py [hit|propagation|purge|all]`` (``--help``).

``hit`` — cache-HIT req/s of a 1 KiB entry. Each server under test runs in a fresh process pinned
to core 0 (``os.sched_setaffinity``); the origin, the master and the load (``wrk -t1 -c50`` when
installed, else a small epoll keep-alive generator) share the other cores. Kinds, interleaved
(a, b, c, d, a, b, ...), ``--repeats`` times; medians and ratios are printed:

- ``bare``: a bare ``twisted.web`` resource returning the same 1 KiB from memory, on a stock
  ``Site`` (which formats an access log line per request, as ``Site`` does by default);
- ``bare-nolog``: the same resource on the edge's ``EdgeSite`` with the access log off, i.e. the
  same HTTP machinery the edge runs on: the strictest floor;
- ``static``: ``twistd web --path`` serving a 1 KiB file;
- ``edge``: ``twistd edgeauth-edge`` (gate, guard, cache; access log off), every request a HIT
  (checked with the edge's ``edgeauth_edge_cache_requests{result="hit"}`` counter);
- ``nginx``: nginx ``proxy_cache`` on the same origin, one worker (for the record).

``propagation`` — invalidate-to-MISS latency on N edges (default 10): ``twistd`` master and edges,
each edge logging through ``--logger=edge_cache.log_observer`` (every line stamped with its
``log_time`` to the microsecond). For each invalidation the driver records ``time.time()`` before
the POST; an edge's ``applied cache_invalidated seq N`` line is logged in the reactor turn in which
its store dropped the entries, so from then on that edge answers MISS. Every edge is then checked
end to end (a GET answers ``X-Cache: MISS``) and primed again (MISS, HIT) before the next one.

``purge`` — one process, no persistence: 1,000,000 entries under 10,000 tags (100 entries each)
in an ``EdgeCache``; the time to apply tag and key invalidations per matched entry, and HIT latency
before and after 10,000 invalidations: in-process lookups, and HTTP HITs through
``EdgeProxyResource`` measured by a client in another process (sequential keep-alive GETs).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from _common import free_ports

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BODY = b"x" * 1024
HEADERS = [
    (b"Content-Type", b"text/plain"),
    (b"Cache-Control", b"public, max-age=86400"),
    (b"X-Cache-Tags", b"item, bench"),
]
KINDS = ("bare", "bare-nolog", "static", "edge", "nginx")
OPERATOR_TOKEN = "bench-operator-token-0123456789abcdef"
EDGE_TOKEN = "bench-edge-token-0123456789abcdef"
APPLIED = re.compile(r"^(\d+\.\d+) .*applied cache_invalidated seq (\d+) ", re.M)
COMMITTED = re.compile(r"^(\d+\.\d+) .*cache_invalidated .*\(seq (\d+)\)$", re.M)
STDERR_PATH = Path(tempfile.gettempdir()) / "edgeauth-bench-edge-cache.stderr"


# -- helpers --------------------------------------------------------------------------------------


def pin(cpus: set[int]) -> None:
    """Pin this process to ``cpus`` when the machine has them."""
    available = os.sched_getaffinity(0)
    if cpus & available:
        os.sched_setaffinity(0, cpus & available)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def family_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its direct children (nginx workers)."""
    total = cpu_seconds(pid)
    with suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with suppress(OSError):
                total += cpu_seconds(int(child))
    return total


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def wait_http(port: int, path: str, proc: subprocess.Popen[Any], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process for port {port} exited ({proc.returncode})")
        with suppress(OSError, http.client.HTTPException):
            if http_get(port, path)[0] == 200:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing answers 200 on {port}{path}")


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_observer() -> Any:
    """The twistd ``--logger``: every event to ``$EDGEAUTH_BENCH_LOG``, stamped to the µs."""
    from twisted.logger import FileLogObserver, eventAsText

    stream = open(os.environ["EDGEAUTH_BENCH_LOG"], "a", encoding="utf-8")  # noqa: SIM115

    def format_event(event: dict[str, Any]) -> str:
        text = eventAsText(event, includeTimestamp=False, includeSystem=True)
        return f"{event['log_time']:.6f} {text}\n"

    return FileLogObserver(stream, format_event)


def env() -> dict[str, str]:
    return {
        **os.environ,
        "EDGEAUTH_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "EDGEAUTH_EDGE_TOKEN": EDGE_TOKEN,
        "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), str(REPO)]),
    }


def twistd(
    *args: str, cpus: set[int] | None = None, log: Path | None = None
) -> subprocess.Popen[Any]:
    argv = [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile="]
    extra = {}
    if log is not None:
        argv.append("--logger=edge_cache.log_observer")
        extra["EDGEAUTH_BENCH_LOG"] = str(log)
    with STDERR_PATH.open("a") as err:
        return subprocess.Popen(
            [*argv, *args],
            stdout=err,
            stderr=err,
            env={**env(), **extra},
            cwd=REPO,
            preexec_fn=(lambda: pin(cpus)) if cpus else None,
        )


def spawn_role(*args: str) -> tuple[subprocess.Popen[str], int]:
    """Start this script in another role; return the process and the port it printed."""
    with STDERR_PATH.open("a") as err:
        proc = subprocess.Popen(
            [sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=err, text=True,
            cwd=REPO, env=env(),
        )  # fmt: skip
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


@contextmanager
def master(work: Path, cpus: set[int] | None = None, log: Path | None = None) -> Iterator[int]:
    port = free_ports(1)[0]
    ini = work / "master.ini"
    ini.write_text(
        f"[master]\nlisten = tcp:{port}:interface=127.0.0.1\n"
        f"database = {work / 'master.sqlite3'}\n"
        "[tokens]\nops = operator env:EDGEAUTH_OPERATOR_TOKEN\n"
        "edges = edge env:EDGEAUTH_EDGE_TOKEN\n"
    )
    proc = twistd("edgeauth-master", "--config", str(ini), cpus=cpus, log=log)
    try:
        wait_http(port, "/healthz", proc)
        yield port
    finally:
        stop(proc)


def edge_process(
    work: Path, name: str, master_port: int, origin_port: int, *, cpus: set[int] | None = None,
    log: Path | None = None,
) -> tuple[subprocess.Popen[Any], int, int]:  # fmt: skip
    proxy, admin = free_ports(2)
    ini = work / f"{name}.ini"
    db = work / f"{name}.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        with suppress(FileNotFoundError):
            Path(f"{db}{suffix}").unlink()
    ini.write_text(
        f"[edge]\nid = {name}\nlisten = tcp:{proxy}:interface=127.0.0.1\n"
        f"admin_listen = tcp:{admin}:interface=127.0.0.1\n"
        f"origin = http://127.0.0.1:{origin_port}\nmasters = http://127.0.0.1:{master_port}\n"
        f"token = env:EDGEAUTH_EDGE_TOKEN\ndatabase = {db}\n"
        "[ttl]\nrules =\n"
    )
    proc = twistd("edgeauth-edge", "--config", str(ini), cpus=cpus, log=log)
    wait_http(admin, "/readyz", proc)
    return proc, proxy, admin


# -- the processes of ``hit`` --------------------------------------------------------------------


def run_origin(cpus: set[int], delay: float) -> None:
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Origin(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            for name, value in HEADERS:
                request.setHeader(name, value)
            return BODY

    pin(cpus)
    port = reactor.listenTCP(0, Site(Origin()), interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


def run_bare(cpus: set[int], nolog: bool) -> None:
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from edgeauth.edge.accesslog import EdgeSite

    class Bare(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader(b"Content-Type", b"text/plain")
            return BODY

    pin(cpus)
    site = EdgeSite(Bare(), reactor=reactor) if nolog else Site(Bare())
    port = reactor.listenTCP(0, site, interface="127.0.0.1", backlog=1024)
    print(port.getHost().port, flush=True)
    reactor.run()


def wrk_load(port: int, connections: int, duration: float, cpus: set[int]) -> tuple[int, int]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s",
         f"http://127.0.0.1:{port}/bench"],
        capture_output=True, text=True, check=True, preexec_fn=lambda: pin(cpus),
    ).stdout  # fmt: skip
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = sum(int(g) for g in errors.groups()) if errors else 0
    return requests - (int(bad.group(1)) if bad else 0), failed + (int(bad.group(1)) if bad else 0)


def python_load(port: int, connections: int, duration: float) -> tuple[int, int]:
    """Keep ``connections`` keep-alive connections busy; return (responses, errors)."""
    request = b"GET /bench HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    selector = selectors.DefaultSelector()
    buffers: dict[socket.socket, bytearray] = {}
    done = errors = 0
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        buffers[sock] = bytearray()
        selector.register(sock, selectors.EVENT_READ)
        sock.send(request)
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        for key, _ in selector.select(0.1):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            data = sock.recv(65536)
            if not data:
                errors += 1
                selector.unregister(sock)
                continue
            buf = buffers[sock]
            buf += data
            while (end := buf.find(b"\r\n\r\n")) >= 0:
                match = re.search(rb"content-length: *(\d+)", bytes(buf[:end]).lower())
                total = end + 4 + int(match.group(1)) if match else end + 4
                if len(buf) < total:
                    break
                del buf[:total]
                done += 1
                sock.send(request)
    for sock in buffers:
        sock.close()
    return done, errors


def metric(admin: int, name: str) -> float:
    _, _, body = http_get(admin, "/metrics")
    match = re.search(rf"^{re.escape(name)} (\S+)$", body.decode(), re.M)
    return float(match.group(1)) if match else 0.0


HIT_METRIC = 'edgeauth_edge_cache_requests_total{result="hit"}'


@contextmanager
def server(kind: str, ctx: dict[str, Any]) -> Iterator[tuple[int, int, Any]]:
    """Start one server under test; yield (port, pid for CPU, admin port or None)."""
    cpus, work = ctx["server_cpus"], ctx["work"]
    if kind in ("bare", "bare-nolog"):
        proc, port = spawn_role("--role", kind, "--cpus", ",".join(map(str, cpus)))
        try:
            yield port, proc.pid, None
        finally:
            stop(proc)
    elif kind == "static":
        port = free_ports(1)[0]
        root = work / "static"
        root.mkdir(exist_ok=True)
        (root / "bench").write_bytes(BODY)
        proc = twistd("web", "--path", str(root), "--listen", f"tcp:{port}:interface=127.0.0.1",
                      cpus=cpus)  # fmt: skip
        try:
            wait_http(port, "/bench", proc)
            yield port, proc.pid, None
        finally:
            stop(proc)
    elif kind == "edge":
        proc, port, admin = edge_process(
            work, "bench-edge", ctx["master_port"], ctx["origin_port"], cpus=cpus
        )
        try:
            first = http_get(port, "/bench")[1].get("x-cache")
            second = http_get(port, "/bench")[1].get("x-cache")
            if (first, second) != ("MISS", "HIT"):
                raise SystemExit(f"edge did not cache /bench: {first}, {second}")
            yield port, proc.pid, admin
        finally:
            stop(proc)
    else:
        port = free_ports(1)[0]
        conf = work / "nginx.conf"
        for sub in ("cache", "tmp"):
            (work / sub).mkdir(exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"{user}worker_processes 1;\ndaemon off;\npid {work}/nginx.pid;\n"
            f"error_log {work}/nginx-error.log;\nevents {{ worker_connections 4096; }}\n"
            "http {\n  access_log off;\n"
            f"  client_body_temp_path {work}/tmp/body; proxy_temp_path {work}/tmp/proxy;\n"
            f"  fastcgi_temp_path {work}/tmp/fcgi; uwsgi_temp_path {work}/tmp/uwsgi;\n"
            f"  scgi_temp_path {work}/tmp/scgi;\n"
            f"  proxy_cache_path {work}/cache keys_zone=bench:10m;\n"
            f"  upstream origin {{ server 127.0.0.1:{ctx['origin_port']}; keepalive 16; }}\n"
            f"  server {{\n    listen 127.0.0.1:{port};\n    location / {{\n"
            "      proxy_pass http://origin; proxy_http_version 1.1;\n"
            '      proxy_set_header Connection ""; proxy_cache bench;\n'
            "      add_header X-Cache $upstream_cache_status;\n    }\n  }\n}\n"
        )
        with STDERR_PATH.open("a") as err:
            proc = subprocess.Popen(
                ["nginx", "-p", str(work), "-c", str(conf)], stdout=err, stderr=err,
                preexec_fn=lambda: pin(cpus),
            )  # fmt: skip
        try:
            wait_http(port, "/bench", proc)
            if http_get(port, "/bench")[1].get("x-cache") != "HIT":
                raise SystemExit("nginx did not cache /bench")
            yield port, proc.pid, None
        finally:
            stop(proc)


def hit(args: argparse.Namespace) -> dict[str, Any]:
    available = sorted(os.sched_getaffinity(0))
    server_cpus = {available[0]}
    other_cpus = set(available[1:]) or server_cpus
    load = "wrk" if shutil.which("wrk") else "python"
    kinds = [k for k in args.kinds.split(",") if k and (k != "nginx" or shutil.which("nginx"))]
    STDERR_PATH.write_text("")
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="edgeauth-bench-cache-") as tmp:
        work = Path(tmp)
        origin, origin_port = spawn_role(
            "--role", "origin", "--cpus", ",".join(map(str, other_cpus))
        )
        try:
            with master(work, other_cpus) as master_port:
                ctx = {"server_cpus": server_cpus, "work": work, "master_port": master_port,
                       "origin_port": origin_port}  # fmt: skip
                print(
                    f"hit: server on cpu {sorted(server_cpus)}, origin+master+load on "
                    f"{sorted(other_cpus)}; load {load}, {args.connections} connections, "
                    f"{args.duration:g}s x {args.repeats} (+{args.warmup:g}s warm-up); "
                    f"body 1 KiB; kinds {', '.join(kinds)}",
                    flush=True,
                )
                for repeat in range(args.repeats):
                    for kind in kinds:
                        with server(kind, ctx) as (port, pid, admin):

                            def run(duration: float, port: int = port) -> tuple[int, int]:
                                if load == "wrk":
                                    return wrk_load(port, args.connections, duration, other_cpus)
                                return python_load(port, args.connections, duration)

                            run(args.warmup)
                            hits = metric(admin, HIT_METRIC) if admin else 0.0
                            cpu0, t0 = family_cpu(pid), time.monotonic()
                            done, errors = run(args.duration)
                            elapsed, used = time.monotonic() - t0, family_cpu(pid) - cpu0
                            note = ""
                            if admin:
                                share = (metric(admin, HIT_METRIC) - hits) / max(done, 1)
                                note = f" HITs {share * 100:.2f}% of responses"
                                if share < 0.999:
                                    raise SystemExit(f"only {share:.3%} of edge answers were HITs")
                        rps, us = done / elapsed, used / max(done, 1) * 1e6
                        results[kind].append((rps, us))
                        print(f"  run {repeat + 1} {kind:7} {rps:9.0f} req/s {us:7.1f} "
                              f"µs/req errors {errors}{note}", flush=True)  # fmt: skip
        finally:
            stop(origin)
    medians = {
        k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
        for k, v in results.items()
    }
    print(f"{'server':10} {'median req/s':>13} {'server µs/req':>14}")
    for kind, (rps, us) in medians.items():
        print(f"{kind:10} {rps:13.0f} {us:14.1f}")
    if "edge" in medians:
        edge = medians["edge"][0]
        for other, goal in (("bare", 0.7), ("bare-nolog", 0.7), ("static", 2.0), ("nginx", None)):
            if other in medians:
                ratio = edge / medians[other][0]
                verdict = "" if goal is None else (" meets" if ratio >= goal else " misses")
                goal_text = "" if goal is None else f" (goal >= {goal:g}x:{verdict})"
                print(f"edge HIT / {other}: {ratio:.2f}x req/s{goal_text}")
    return medians


# -- propagation ------------------------------------------------------------------------------


def propagation(args: argparse.Namespace) -> None:
    STDERR_PATH.write_text("")
    with tempfile.TemporaryDirectory(prefix="edgeauth-bench-inval-") as tmp:
        work = Path(tmp)
        origin, origin_port = spawn_role("--role", "origin")
        edges: list[tuple[subprocess.Popen[Any], int, int, Path]] = []
        master_log = work / "master.log"
        master_log.touch()
        try:
            with master(work, log=master_log) as master_port:
                for i in range(args.edges):
                    log = work / f"edge-{i}.log"
                    log.touch()
                    proc, proxy, admin = edge_process(
                        work, f"edge-{i}", master_port, origin_port, log=log
                    )
                    edges.append((proc, proxy, admin, log))
                conn = http.client.HTTPConnection("127.0.0.1", master_port, timeout=30)
                every: list[float] = []
                per_edge: list[float] = []
                checked = 0
                sent_at: dict[int, float] = {}
                offsets = [0] * len(edges)
                stamps: list[dict[int, float]] = [{} for _ in edges]

                def drain() -> None:
                    for i, (_p, _x, _a, log) in enumerate(edges):
                        with log.open("r", encoding="utf-8", errors="replace") as f:
                            f.seek(offsets[i])
                            text = f.read()
                        cut = text.rfind("\n") + 1
                        offsets[i] += len(text[:cut].encode())
                        for stamp, seq in APPLIED.findall(text[:cut]):
                            stamps[i][int(seq)] = float(stamp)

                for n in range(args.warmup + args.invalidations):
                    for _p, proxy, _a, _l in edges:  # prime: every edge HITs /item
                        for want in ("MISS", "HIT"):
                            got = http_get(proxy, "/item")[1].get("x-cache")
                            if got != want and not (want == "MISS" and got == "HIT"):
                                raise SystemExit(f"priming /item: {got}, wanted {want}")
                    body = json.dumps({"tags": ["item"]}).encode()
                    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}",
                               "Content-Type": "application/json"}  # fmt: skip
                    sent = time.time()
                    conn.request("POST", "/invalidate", body=body, headers=headers)
                    response = conn.getresponse()
                    seq = int(json.loads(response.read())["event"]["seq"])
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline:
                        drain()
                        if all(seq in s for s in stamps):
                            break
                        time.sleep(0.002)
                    else:
                        raise SystemExit(f"seq {seq} not applied everywhere within 10 s")
                    for _p, proxy, _a, _l in edges:
                        if http_get(proxy, "/item")[1].get("x-cache") != "MISS":
                            raise SystemExit("an edge did not MISS after the invalidation")
                        checked += 1
                    if n >= args.warmup:
                        times = [1000 * (s[seq] - sent) for s in stamps]
                        every.append(max(times))
                        per_edge.extend(times)
                        sent_at[seq] = sent
                    time.sleep(args.spacing)
                conn.close()
                text = master_log.read_text(errors="replace")
                commits = [
                    1000 * (float(stamp) - sent_at[int(seq)])
                    for stamp, seq in COMMITTED.findall(text)
                    if int(seq) in sent_at
                ]
        finally:
            for proc, *_ in edges:
                stop(proc)
            stop(origin)
    print(
        f"propagation: {args.edges} edges, {args.invalidations} tag invalidations (after "
        f"{args.warmup} warm-up), one at a time; POST sent -> edge logged 'applied "
        f"cache_invalidated' (store already changed); {checked} end-to-end MISS checks passed"
    )
    print(
        f"  every edge: p50 {pct(every, 0.5):.2f} ms, p99 {pct(every, 0.99):.2f} ms, max "
        f"{max(every):.2f} ms; per edge: p50 {pct(per_edge, 0.5):.2f} ms, p99 "
        f"{pct(per_edge, 0.99):.2f} ms (goal p99 <= 20 ms: "
        f"{'meets' if pct(every, 0.99) <= 20 else 'misses'}); of which the master's commit "
        f"(POST sent -> logged after commit): p50 {pct(commits, 0.5):.2f} ms, p99 "
        f"{pct(commits, 0.99):.2f} ms"
    )


# -- purge ------------------------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def latency_client(port: int, keys_file: str, count: int) -> None:
    """Sequential keep-alive GETs of random keys; print p50/p99 µs as JSON."""
    paths = Path(keys_file).read_text().split()
    rng = random.Random(7)
    conn = http.client.HTTPConnection("127.0.0.1", port)
    took = []
    for _ in range(count):
        path = rng.choice(paths)
        t0 = time.perf_counter()
        conn.request("GET", path, headers={"Host": "bench.example"})
        response = conn.getresponse()
        response.read()
        took.append((time.perf_counter() - t0) * 1e6)
        if response.getheader("X-Cache") != "HIT":
            raise SystemExit(f"{path}: {response.getheader('X-Cache')}")
    print(json.dumps({"p50": pct(took, 0.5), "p99": pct(took, 0.99), "n": count}))


def purge(args: argparse.Namespace) -> None:
    from twisted.internet import reactor, threads
    from twisted.internet.task import react

    from edgeauth.config import CacheSettings
    from edgeauth.edge.accesslog import EdgeSite
    from edgeauth.edge.cache import EdgeCache
    from edgeauth.edge.cache.policy import NO_RULES, Selector, group_headers
    from edgeauth.edge.cache.store import Entry
    from edgeauth.edge.origin_pool import OriginPool
    from edgeauth.edge.proxy import EdgeProxyResource
    from edgeauth.edge.ttl import TTLPipeline

    keys, tags = args.keys, args.tags
    pool = OriginPool(reactor, "http", "127.0.0.1", 9)
    settings = CacheSettings(max_entries=keys + 1, max_bytes=2**40, max_object_bytes=2**20)
    cache = EdgeCache(reactor, pool, settings, TTLPipeline((), 86400.0))
    now = time.time()
    headers = tuple((n.lower(), v) for n, v in HEADERS if n != b"X-Cache-Tags")
    serve = group_headers(headers)
    body = b"b" * 64
    tag_names = [f"t{n}" for n in range(tags)]
    t0 = time.perf_counter()
    for n in range(keys):
        cache._put(
            Entry(key=f"bench.example/item/{n}", variant="", vary=(), status=200, reason=b"OK",
                  headers=headers, serve_headers=serve, body=body, tags=(tag_names[n % tags],),
                  request_time=now, response_time=now, initial_age=0.0, ttl=86400.0,
                  fresh_until=now + 86400, stale_until=now + 86400, error_until=now + 86400,
                  must_revalidate=False, no_cache=False, etag=None, last_modified=None,
                  stored_at=now)
        )  # fmt: skip
    built = time.perf_counter() - t0
    print(
        f"purge: {keys:,} entries under {tags:,} tags ({keys // tags} each) stored in "
        f"{built:.1f} s ({built / keys * 1e6:.1f} µs/put); RSS {rss_mb():.0f} MB; persistence off"
    )
    rng = random.Random(1)

    def lookups(n: int = 200_000) -> float:
        """Median ns of one store lookup + freshness check, over batches."""
        from twisted.web.http_headers import Headers

        h = Headers()
        sample = [f"bench.example/item/{rng.randrange(keys)}" for _ in range(n)]
        batches = []
        for i in range(0, n, 20_000):
            t = time.perf_counter()
            for key in sample[i : i + 20_000]:
                entry, _ = cache.store.lookup(key, h)
                if entry is not None:
                    entry.fresh_for(now, NO_RULES)
            batches.append((time.perf_counter() - t) / 20_000 * 1e9)
        return statistics.median(batches)

    keys_file = Path(tempfile.mkstemp(prefix="edgeauth-bench-keys-")[1])

    async def http_latency(port: int, survivors: list[int]) -> dict[str, float]:
        keys_file.write_text("\n".join(f"/item/{n}" for n in survivors))
        out = await threads.deferToThread(
            subprocess.run,
            [sys.executable, __file__, "--role", "latency-client", "--port", str(port),
             "--keys-file", str(keys_file), "--count", str(args.http_requests)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        doc: dict[str, float] = json.loads(out.stdout)
        return doc

    async def main(_: Any) -> None:
        site = EdgeSite(EdgeProxyResource("127.0.0.1", 9, b"", reactor, pool=pool, cache=cache),
                        reactor=reactor)  # fmt: skip
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        number = port.getHost().port
        before_ns = lookups()
        before_http = await http_latency(number, list(range(0, keys, 7)))
        # 100 tag invalidations (100 entries each), then 9,900 key invalidations (1 entry each).
        tag_us, key_us, matched_tags, matched_keys = [], [], 0, 0
        for n in range(args.tag_invalidations):
            t = time.perf_counter()
            gone = cache.invalidate(Selector(tags=frozenset({tag_names[n]})), soft=False)
            tag_us.append((time.perf_counter() - t) * 1e6)
            matched_tags += gone
        victims = [k for k in range(keys) if k % tags >= args.tag_invalidations]
        victims = rng.sample(victims, args.invalidations - args.tag_invalidations)
        for k in victims:
            t = time.perf_counter()
            matched_keys += cache.invalidate(Selector(keys=((None, f"/item/{k}"),)), soft=False)
            key_us.append((time.perf_counter() - t) * 1e6)
        gone_set = set(victims)
        survivors = [
            k for k in range(0, keys, 7) if k % tags >= args.tag_invalidations and k not in gone_set
        ]
        after_ns = lookups()
        after_http = await http_latency(number, survivors)
        await port.stopListening()
        print(
            f"  {args.tag_invalidations} tag invalidations: {matched_tags:,} entries, "
            f"median {statistics.median(tag_us):.0f} µs each = "
            f"{sum(tag_us) / max(matched_tags, 1):.2f} µs per matched entry (p99 "
            f"{pct(tag_us, 0.99):.0f} µs)"
        )
        print(
            f"  {len(victims):,} key invalidations (host-less, via the target index): "
            f"{matched_keys:,} entries, median {statistics.median(key_us):.1f} µs each, "
            f"{sum(key_us) / max(matched_keys, 1):.2f} µs per matched entry"
        )
        print(
            f"  store lookup + freshness, median of batches: {before_ns:.0f} ns before, "
            f"{after_ns:.0f} ns after {args.invalidations:,} invalidations "
            f"({after_ns / before_ns:.2f}x)"
        )
        print(
            f"  HTTP HIT latency ({args.http_requests:,} sequential keep-alive GETs from another "
            f"process): p50 {before_http['p50']:.0f} µs / p99 {before_http['p99']:.0f} µs before, "
            f"p50 {after_http['p50']:.0f} µs / p99 {after_http['p99']:.0f} µs after "
            f"({after_http['p50'] / before_http['p50']:.2f}x p50); {len(cache.store):,} "
            f"entries left; RSS {rss_mb():.0f} MB"
        )
        keys_file.unlink()

    react(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "what", nargs="?", default="all", choices=("hit", "propagation", "purge", "all")
    )
    parser.add_argument("--duration", type=float, default=5.0, help="hit: seconds per timed run")
    parser.add_argument("--warmup", type=float, default=1.0, help="hit: seconds of warm-up")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS), help="hit: comma-separated subset")
    parser.add_argument("--edges", type=int, default=10, help="propagation: edge count")
    parser.add_argument("--invalidations", type=int, default=10_000,
                        help="purge: invalidations in all (propagation uses 200)")  # fmt: skip
    parser.add_argument("--tag-invalidations", type=int, default=100)
    parser.add_argument("--spacing", type=float, default=0.1, help="propagation: pause (s)")
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--tags", type=int, default=10_000)
    parser.add_argument("--http-requests", type=int, default=5000)
    roles = ("driver", "origin", "bare", "bare-nolog", "latency-client")
    parser.add_argument("--role", choices=roles, default="driver")
    parser.add_argument("--cpus", default="")
    parser.add_argument("--port", type=int)
    parser.add_argument("--keys-file")
    parser.add_argument("--count", type=int, default=5000)
    args = parser.parse_args()
    cpus = {int(c) for c in args.cpus.split(",") if c}
    if args.role == "origin":
        return run_origin(cpus, 0.0)
    if args.role in ("bare", "bare-nolog"):
        return run_bare(cpus, nolog=args.role == "bare-nolog")
    if args.role == "latency-client":
        return latency_client(args.port, args.keys_file, args.count)
    print(
        f"edgeauth edge cache benchmark; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load {', '.join(f'{x:.2f}' for x in os.getloadavg())}; edgeauth from {REPO}",
        flush=True,
    )
    if args.what in ("hit", "all"):
        hit(args)
    if args.what in ("propagation", "all"):
        propagation(argparse.Namespace(**{**vars(args), "invalidations": 200, "warmup": 5}))
    if args.what in ("purge", "all"):
        purge(args)


if __name__ == "__main__":
    main()
