"""Benchmark: req/s and CPU per request of the stock ``ReverseProxyResource`` and the edge's proxy.

Run with ``.venv/bin/python bench/edge_proxy.py`` (``--help`` for options). Every part runs in its
own process: an origin answering 1 KiB (see ``--origin``), the proxy under test (a fresh process
per run, pinned to one core with ``os.sched_setaffinity``), and the load: ``wrk`` when installed,
else the small epoll keep-alive load generator below; both keep ``--connections`` connections busy
for ``--duration`` seconds. Proxies run interleaved (a, b, c, a, b, c, ...), ``--repeats`` times;
the medians and the ratios are printed.

- (a) ``stock``: Twisted's ``ReverseProxyResource`` (a new HTTP/1.0 origin connection per
  request, ``Connection: close`` passed back to the client);
- (b) ``edge``: ``EdgeProxyResource`` (pooled keep-alive origin connections, httptools);
- (c) ``edge+log``: (b) with the buffered access log on;
- (d) ``agent``: a minimal proxy resource forwarding with Twisted's ``Agent`` over a persistent
  ``HTTPConnectionPool`` (the pass-through alternative the edge's own client replaced);
- (e) ``banned``: (b) with a gate hook refusing every request with 403 ``ip_banned``: a real
  ``Gate`` over ``EdgeIndexes`` holding a ban on 127.0.0.0/8, behind a ``RequestGuard`` (client
  address, metrics) whose ``RequestGuard.gate_hook`` is the proxy's hook, as ``EdgeService``
  sets it up; the origin is never reached;
- (f) ``bare403``: a bare twisted.web resource answering a fixed 403 JSON body (the floor).

Ratios printed: (b)/(a) edge/stock, (b)/(d) edge/Agent, (e)/(f) banned/bare-403 floor (goal
>= 0.8x), and with ``--before`` edge/edge-before and edge-before/stock. For (e) and (f) every 403
counts as an answered request.

Both proxies are served by the same ``EdgeSite`` with the access log off, so the difference is
the resource. ``proxy µs/req`` is the proxy process's CPU time (user + system) per request
answered, which does not depend on which side is the bottleneck.

Set-up (printed at the start of a run):

- ``--origin-cpu same`` (the default; issue 5's set-up): the origin is pinned to the proxy's core
  and the load generator has the other core to itself, so req/s is bounded by proxy + origin CPU
  on one core. ``other``: the origin shares the load generator's core (the set-up of the earlier
  figures in docs/benchmarks.md), so req/s follows the proxy's CPU alone until that core is full.
- ``--origin twisted`` (the default): a twisted.web resource on ``EdgeSite`` (~60 µs a request).
  ``raw``: a minimal asyncio server parsing requests with httptools and answering the same 1 KiB
  body with ``Content-Length`` (keep-alive unless the request asks to close, as the stock proxy's
  HTTP/1.0 requests do), ~10 µs a request, so the ratios are about the proxies.
- ``--before DIR``: the kind ``edge-before`` (in the default ``--kinds``) is ``edge`` with
  ``edgeauth`` imported from ``DIR`` (e.g. ``git archive HEAD edgeauth | tar -x -C DIR``), for a
  paired before/after in one run. Without it ``edge-before`` imports the checkout (an A/A pair)
  and the run must start in the checkout; leave it out of ``--kinds`` otherwise.
- ``--gc-freeze on`` (the default): each proxy process calls ``gc.freeze()`` once it is set up,
  as ``EdgeService.start`` does, so full collections do not rescan the imported modules; every
  kind gets the same. ``off`` for the figures of earlier runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BODY = b"x" * 1024
KINDS = ("stock", "edge", "edge+log", "agent", "banned", "bare403", "edge-before")
REFUSING = ("banned", "bare403")
BANNED_BODY = b'{"error":"ip_banned","ref":1}'


# -- the processes under test ------------------------------------------------------------------


def pin(cpus: set[int]) -> None:
    """Pin this process to ``cpus`` when the machine has them."""
    available = os.sched_getaffinity(0)
    if cpus & available:
        os.sched_setaffinity(0, cpus & available)


def run_origin(cpus: set[int]) -> None:
    from twisted.internet import reactor
    from twisted.web.resource import Resource

    from edgeauth.edge.accesslog import EdgeSite

    class Origin(Resource):
        isLeaf = True

        def render_GET(self, request: object) -> bytes:
            return BODY

    pin(cpus)
    port = reactor.listenTCP(0, EdgeSite(Origin(), reactor=reactor), interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


def run_raw_origin(cpus: set[int]) -> None:
    """A minimal asyncio HTTP/1.x server answering ``BODY`` to every request (httptools)."""
    import asyncio

    from httptools import HttpRequestParser

    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(BODY)
    keep_alive = head + b"\r\n" + BODY
    close = head + b"Connection: close\r\n\r\n" + BODY

    class Origin(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.parser = HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except Exception:
                self.transport.close()

        def on_message_complete(self) -> None:
            if self.parser.should_keep_alive():
                self.transport.write(keep_alive)
            else:
                self.transport.write(close)
                self.transport.close()

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(
            Origin, "127.0.0.1", 0, backlog=1024
        )
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    pin(cpus)
    asyncio.run(serve())


def banned_gate_hook(reactor: Any) -> Any:
    """A gate hook refusing every loopback client: 403 ``ip_banned``, as the edge builds it.

    The hook is ``RequestGuard.gate_hook``, the one ``EdgeService`` gives its proxy.
    """
    from types import SimpleNamespace

    from edgeauth.edge.clientip import TrustedProxies
    from edgeauth.edge.gate import Gate
    from edgeauth.edge.guard import RequestGuard
    from edgeauth.edge.index import EdgeIndexes
    from edgeauth.edge.metrics import EdgeMetrics
    from edgeauth.events import IpBanned

    indexes = EdgeIndexes()
    indexes.apply(IpBanned(seq=1, timestamp=time.time(), source="master", ip="127.0.0.0/8"))
    gate = Gate(indexes, None, (), None, (), 600.0, "bench", lambda event: None)
    state = SimpleNamespace(synced=True, indexes=indexes)
    guard = RequestGuard(
        gate,
        TrustedProxies([]),
        state,  # type: ignore[arg-type]
        EdgeMetrics(),
        reactor,
    )
    return guard.gate_hook


def agent_resource(origin_port: int, reactor: Any) -> Any:
    """A minimal proxy resource forwarding with ``Agent`` over a persistent connection pool."""
    from twisted.web.client import Agent, HTTPConnectionPool, readBody
    from twisted.web.http_headers import Headers
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Request

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 100
    agent = Agent(reactor, pool=pool)
    base = b"http://127.0.0.1:%d" % origin_port
    hop = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host"}

    class AgentProxy(Resource):
        isLeaf = True

        def render(self, request: Request) -> object:
            headers = Headers()
            for name, values in request.requestHeaders.getAllRawHeaders():
                if name.lower() not in hop:
                    headers.setRawHeaders(name, values)
            d = agent.request(request.method, base + request.uri, headers)
            lost: list[object] = []
            request.notifyFinish().addErrback(lost.append)

            def got(response: Any) -> Any:
                request.setResponseCode(response.code, response.phrase)
                for name, values in response.headers.getAllRawHeaders():
                    if name.lower() not in hop:
                        request.responseHeaders.setRawHeaders(name, values)
                return readBody(response).addCallback(body)

            def body(data: bytes) -> None:
                if lost:
                    return
                request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(data)])
                request.write(data)
                request.finish()

            def failed(failure: Any) -> None:
                if not lost and not request.finished:
                    request.setResponseCode(502)
                    request.finish()

            d.addCallback(got).addErrback(failed)
            return NOT_DONE_YET

    return AgentProxy()


def bare_403_resource() -> Any:
    """A bare twisted.web resource answering a fixed 403 JSON body: the framework's floor."""
    from twisted.web.resource import Resource
    from twisted.web.server import Request

    class Bare403(Resource):
        isLeaf = True

        def render(self, request: Request) -> bytes:
            request.setResponseCode(403)
            request.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
            request.responseHeaders.setRawHeaders(b"Cache-Control", [b"no-store"])
            return BANNED_BODY

    return Bare403()


def run_proxy(
    kind: str, origin_port: int, cpus: set[int], log_dir: str, freeze: bool = True
) -> None:
    from twisted.internet import reactor
    from twisted.web.proxy import ReverseProxyResource
    from twisted.web.server import Request

    from edgeauth.edge.accesslog import BufferedAccessLog, EdgeSite
    from edgeauth.edge.proxy import EdgeProxyResource, EdgeRequest

    pin(cpus)
    resource: Any
    access_log = None
    factory: type[Request] = Request
    if kind == "stock":
        resource = ReverseProxyResource("127.0.0.1", origin_port, b"", reactor)
    elif kind == "agent":
        resource = agent_resource(origin_port, reactor)
    elif kind == "bare403":
        resource = bare_403_resource()
    else:  # edge, edge+log, banned, edge-before (the same code, imported from --before)
        gate = banned_gate_hook(reactor) if kind == "banned" else None
        resource = EdgeProxyResource("127.0.0.1", origin_port, b"", reactor, gate=gate)
        factory = EdgeRequest
        if kind == "edge+log":
            access_log = BufferedAccessLog(reactor, os.path.join(log_dir, "access.log"))
    site = EdgeSite(resource, reactor=reactor, access_log=access_log, requestFactory=factory)
    port = reactor.listenTCP(0, site, interface="127.0.0.1", backlog=1024)
    if freeze:
        # As EdgeService.start does once its state is loaded: what exists now lives as long as
        # the process, so full collections need not scan it (every kind gets the same).
        gc.freeze()
    print(port.getHost().port, flush=True)
    reactor.run()


# -- load --------------------------------------------------------------------------------------


def python_load(port: int, connections: int, duration: float) -> tuple[int, int]:
    """Keep ``connections`` keep-alive connections busy; return (responses, errors)."""
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    selector = selectors.DefaultSelector()
    buffers: dict[socket.socket, bytearray] = {}
    done = errors = 0

    def open_one() -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        buffers[sock] = bytearray()
        selector.register(sock, selectors.EVENT_READ)
        sock.send(request)

    def drop(sock: socket.socket) -> None:
        selector.unregister(sock)
        del buffers[sock]
        sock.close()

    for _ in range(connections):
        open_one()
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        for key, _ in selector.select(0.1):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                errors += 1
                drop(sock)
                open_one()
                continue
            buf = buffers[sock]
            buf += data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = bytes(buf[:end]).lower()
                match = re.search(rb"content-length: *(\d+)", head)
                if match is None:
                    raise SystemExit(f"response without Content-Length: {head!r}")
                total = end + 4 + int(match.group(1))
                if len(buf) < total:
                    break
                del buf[:total]
                done += 1
                if b"connection: close" in head:
                    drop(sock)
                    open_one()
                    break
                sock.send(request)
    for sock in list(buffers):
        drop(sock)
    return done, errors


def wrk_load(
    port: int, connections: int, duration: float, cpus: set[int], refusing: bool = False
) -> tuple[int, int]:
    """Run wrk; return (answered, errors); with ``refusing`` a non-2xx answer counts as answered."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: pin(cpus),
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = sum(int(g) for g in errors.groups()) if errors else 0
    if refusing:
        return requests, failed
    return requests - (int(bad.group(1)) if bad else 0), failed + (int(bad.group(1)) if bad else 0)


# -- driver ------------------------------------------------------------------------------------


STDERR_PATH = Path(tempfile.gettempdir()) / "edgeauth-bench-edge-proxy.stderr"


def spawn(*args: str, tree: Path = ROOT) -> tuple[subprocess.Popen[str], int]:
    """Start this script in another role; return the process and the port it printed.

    The process imports ``edgeauth`` from ``tree`` (the checkout by default).
    """
    with STDERR_PATH.open("a") as stderr:
        proc = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(tree)},
        )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_answer(kind: str, port: int) -> None:
    """Make sure the process under test answers what its kind should (403 or the origin body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if kind in REFUSING:
        ok = response.status == 403 and json.loads(body)["error"] == "ip_banned"
    else:
        ok = response.status == 200 and body == BODY
    if not ok:
        raise SystemExit(f"{kind}: unexpected answer {response.status} {body[:80]!r}")


def measure(args: argparse.Namespace, kind: str, origin_port: int) -> tuple[float, float, int]:
    """One fresh proxy process: warm up, then one timed run; (req/s, proxy µs/req, errors)."""
    proxy_cpus, other_cpus = args.proxy_cpus, args.other_cpus
    cpus = ",".join(map(str, proxy_cpus))
    tree = Path(args.before) if kind == "edge-before" else ROOT
    proc, port = spawn(
        "--role", "proxy", "--kind", kind, "--origin-port", str(origin_port),
        "--cpus", cpus, "--log-dir", args.log_dir, "--gc-freeze", args.gc_freeze, tree=tree,
    )  # fmt: skip
    try:
        check_answer(kind, port)
        load = args.load

        def run(duration: float) -> tuple[int, int]:
            if load == "wrk":
                return wrk_load(port, args.connections, duration, other_cpus, kind in REFUSING)
            return python_load(port, args.connections, duration)

        run(args.warmup)
        before_cpu, before = cpu_seconds(proc.pid), time.monotonic()
        done, errors = run(args.duration)
        elapsed, used = time.monotonic() - before, cpu_seconds(proc.pid) - before_cpu
        return done / elapsed, used / max(done, 1) * 1e6, errors
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per timed run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset")
    for flag, choices, text in (  # the first choice is the default
        ("--origin-cpu", ("same", "other"), "origin on the proxy's core (issue 5's set-up) or "
         "on the load generator's"),
        ("--origin", ("twisted", "raw"), "twisted.web resource on EdgeSite, or a minimal "
         "asyncio + httptools server"),
        ("--gc-freeze", ("on", "off"), "gc.freeze() in the proxy process before serving, as "
         "the edge service does"),
    ):  # fmt: skip
        parser.add_argument(flag, choices=choices, default=choices[0], help=text)
    parser.add_argument("--before", default="", help="tree holding edgeauth/ for edge-before")
    parser.add_argument(
        "--role", choices=("driver", "origin", "raw-origin", "proxy"), default="driver"
    )
    parser.add_argument("--kind", choices=KINDS)
    parser.add_argument("--origin-port", type=int)
    parser.add_argument("--cpus", default="")
    parser.add_argument("--log-dir", default="")
    args = parser.parse_args()
    cpus = {int(c) for c in args.cpus.split(",") if c}
    if args.role == "origin":
        return run_origin(cpus)
    if args.role == "raw-origin":
        return run_raw_origin(cpus)
    if args.role == "proxy":
        return run_proxy(args.kind, args.origin_port, cpus, args.log_dir, args.gc_freeze == "on")

    available = sorted(os.sched_getaffinity(0))
    args.proxy_cpus = {available[0]}
    args.other_cpus = set(available[1:]) or {available[0]}
    if args.load == "auto":
        args.load = "wrk" if shutil.which("wrk") else "python"
    if args.load == "python":
        pin(args.other_cpus)
    kinds = [k for k in args.kinds.split(",") if k]
    if "edge-before" in kinds and not (Path(args.before) / "edgeauth").is_dir():
        raise SystemExit("edge-before needs --before DIR holding an edgeauth/ tree")
    STDERR_PATH.write_text("")
    args.log_dir = tempfile.mkdtemp(prefix="edgeauth-bench-")
    origin_cpus = args.proxy_cpus if args.origin_cpu == "same" else args.other_cpus
    origin, origin_port = spawn(
        "--role",
        "origin" if args.origin == "twisted" else "raw-origin",
        "--cpus",
        ",".join(map(str, origin_cpus)),
    )
    print(
        f"set-up: origin {args.origin} on the {args.origin_cpu} core as the proxy; "
        f"cpus: proxy {sorted(args.proxy_cpus)}, origin {sorted(origin_cpus)}, "
        f"load {sorted(args.other_cpus)}; "
        f"load: {args.load}, {args.connections} connections, {args.duration:g}s x "
        f"{args.repeats} (+{args.warmup:g}s warm-up); body 1 KiB; gc.freeze {args.gc_freeze}"
        + (f"; edge-before from {args.before}" if "edge-before" in kinds else "")
    )
    results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in kinds}
    try:
        for repeat in range(args.repeats):
            for kind in kinds:
                rps, cpu, errors = measure(args, kind, origin_port)
                results[kind].append((rps, cpu, errors))
                print(f"  run {repeat + 1} {kind:9} {rps:9.0f} req/s {cpu:7.1f} µs/req "
                      f"errors {errors}", flush=True)  # fmt: skip
    finally:
        origin.terminate()
        origin.wait()
        shutil.rmtree(args.log_dir, ignore_errors=True)
    print(f"{'proxy':10} {'median req/s':>13} {'proxy µs/req':>13}")
    medians = {}
    for kind in kinds:
        rps = statistics.median(r for r, _, _ in results[kind])
        cpu = statistics.median(c for _, c, _ in results[kind])
        medians[kind] = (rps, cpu)
        print(f"{kind:10} {rps:13.0f} {cpu:13.1f}")
    noise = STDERR_PATH.read_text(errors="replace")
    print(
        f"server tracebacks: {noise.count('Traceback')}, of which 'finish called after its "
        f"connection was lost' (the stock proxy, when the load stops): "
        f"{noise.count('Request.finish called on a request after its connection was lost')} "
        f"(see {STDERR_PATH})"
    )
    for label, num, den in (
        ("edge / stock (b)/(a)", "edge", "stock"),
        ("edge / agent (b)/(d)", "edge", "agent"),
        ("edge / edge-before", "edge", "edge-before"),
        ("edge-before / stock", "edge-before", "stock"),
        ("banned / bare-403 floor (e)/(f), goal >= 0.8x", "banned", "bare403"),
    ):
        if num in medians and den in medians:
            (n_rps, n_cpu), (d_rps, d_cpu) = medians[num], medians[den]
            print(
                f"ratio {label}: {n_rps / d_rps:.2f}x req/s, {n_cpu / d_cpu:.2f}x CPU per request"
            )


if __name__ == "__main__":
    main()
