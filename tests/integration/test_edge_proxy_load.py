"""The edge's proxy under load: backpressure for a slow client, and a POST after an idle close.

A real master, a whole in-process edge and a real twisted.web origin, all on 127.0.0.1. The edge
runs in this process, so its memory is this process's ``VmRSS``.

- A 50 MB origin body, generated 64 KiB at a time by a push producer (never whole in memory),
  read by a raw TCP client that lets at most 128 KiB in every 10 ms (it pauses and resumes its
  transport): the edge must pause the origin rather than buffer, so RSS stays flat.
- The origin closes (or drops on arrival) the idle keep-alive connection the edge pooled; a POST
  sent then must succeed or get a 502 JSON answer within 5 s, never hang.
"""

from __future__ import annotations

import gc
import hashlib
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support import Client, Reply, RunningEdge, start_edge, start_master
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

BIG = 50 * 1024 * 1024
CHUNK = 64 * 1024
STEP = 128 * 1024  # bytes the slow client lets in per tick
TICK = 0.01
MB = 1024 * 1024


def rss() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def until(cond: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = reactor.seconds() + timeout
    while not cond():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


# --- the origin -------------------------------------------------------------------------------


@implementer(IPushProducer)
class BodyGenerator:
    """Writes ``size`` bytes, one 64 KiB chunk per reactor turn while not paused."""

    def __init__(self, request: Request, size: int) -> None:
        self.request = request
        self.size = size
        self.produced = 0
        self.paused = False
        self.stopped = False
        self.pauses = 0
        self.digest = hashlib.blake2b()
        self.pending: IDelayedCall | None = None
        request.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if self.pending is None and not self.paused and not self.stopped:
            self.pending = reactor.callLater(0, self._write)

    def _write(self) -> None:
        self.pending = None
        if self.paused or self.stopped:
            return
        size = min(CHUNK, self.size - self.produced)
        chunk = bytes([(self.produced // CHUNK * 7) % 256]) * size
        self.digest.update(chunk)
        self.produced += size
        self.request.write(chunk)
        if self.produced >= self.size:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()
            return
        self._schedule()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.stopped = True
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None


class DoomableChannel(HTTPChannel):
    """An origin connection that, once ``doomed``, drops at the next bytes it receives.

    That is the origin closing the idle connection just as the edge reuses it.
    """

    doomed = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.site.channels.discard(self)  # type: ignore[attr-defined]
        self.site.closed += 1  # type: ignore[attr-defined]
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self.doomed:
            self.site.dropped += 1  # type: ignore[attr-defined]
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        super().dataReceived(data)


class OriginSite(Site):
    protocol = DoomableChannel

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.channels: set[DoomableChannel] = set()
        self.closed = 0
        self.dropped = 0


class LoadOrigin(Resource):
    """``/big/N``: N generated bytes; anything else: a short answer; records what it received."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.generators: list[BodyGenerator] = []
        self.received: list[tuple[bytes, bytes, int]] = []
        self.site = OriginSite(self)
        self.port: IListeningPort | None = None

    def render(self, request: Request) -> bytes | int:
        body = request.content.read() if request.content is not None else b""
        self.received.append((request.method, request.path, len(body)))
        if request.path.startswith(b"/big/"):
            size = int(request.path.split(b"/")[2])
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", b"%d" % size)
            self.generators.append(BodyGenerator(request, size))
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain")
        return b"%s %s %d" % (request.method, request.path, len(body))

    async def start(self) -> LoadOrigin:
        where = "tcp:0:interface=127.0.0.1"
        self.port = await serverFromString(reactor, where).listen(self.site)
        return self

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"http://127.0.0.1:{self.port.getHost().port}"

    async def stop(self) -> None:
        for generator in self.generators:
            generator.stopProducing()
        if self.port is not None:
            await self.port.stopListening()
        for channel in list(self.site.channels):
            channel.transport.abortConnection()  # type: ignore[union-attr]


# --- the slow client --------------------------------------------------------------------------


class SlowReader(Protocol):
    """GETs a URL over raw TCP and lets at most ``STEP`` bytes in per :meth:`tick`."""

    def __init__(self, path: bytes) -> None:
        self.path = path
        self.head = b""
        self.status: bytes | None = None
        self.length: int | None = None
        self.body = 0
        self.digest = hashlib.blake2b()
        self.allowance = STEP
        self.paused = False
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        # A small receive buffer: the kernel must not soak up what the edge should hold back.
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.transport.write(  # type: ignore[union-attr]
            b"GET " + self.path + b" HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        self.allowance -= len(data)
        if self.status is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            self.status = lines[0]
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.length = int(value)
        self.body += len(data)
        self.digest.update(data)
        if self.allowance <= 0 and not self.paused:
            self.paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def tick(self) -> None:
        self.allowance = STEP
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.done.called:
            self.done.callback(None)


# --- fixtures -----------------------------------------------------------------------------------


class Rig:
    def __init__(self) -> None:
        self.master: Any = None
        self.origin = LoadOrigin()
        self.edge: RunningEdge | None = None
        self.client: Client | None = None

    async def start(self, tmp_path: Path) -> Rig:
        self.master = await start_master(tmp_path)
        await self.origin.start()
        self.edge = await start_edge(tmp_path, "edge-l", self.master.url, self.origin.url)
        self.client = Client(self.edge.url)
        return self

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.edge is not None:
            await self.edge.stop()
        await self.origin.stop()
        if self.master is not None:
            await self.master.stop()

    async def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 5.0
    ) -> Reply:
        """One request through the edge; fails (never hangs) after ``timeout`` seconds."""
        assert self.client is not None
        headers = {"Content-Type": "application/octet-stream"} if body is not None else None
        d = Deferred.fromCoroutine(
            self.client.request(method, path, token=None, body=body, headers=headers)
        )
        d.addTimeout(timeout, reactor)
        reply: Reply = await d
        return reply

    async def slow_get(self, size: int) -> tuple[SlowReader, BodyGenerator, int, int]:
        """Read ``/big/size`` slowly; return the reader, the generator, peak RSS, peak lag."""
        assert self.edge is not None
        reader = SlowReader(b"/big/%d" % size)
        port = self.edge.service.port.getHost().port
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), reader)
        peak_rss = rss()
        peak_in_flight = 0
        generators = len(self.origin.generators)

        def sample() -> None:
            nonlocal peak_rss, peak_in_flight
            peak_rss = max(peak_rss, rss())
            if len(self.origin.generators) > generators:
                produced = self.origin.generators[generators].produced
                peak_in_flight = max(peak_in_flight, produced - reader.body)
            reader.tick()

        ticker = LoopingCall(sample)
        ticker.clock = reactor
        ticker.start(TICK, now=False)
        try:
            reader.done.addTimeout(60, reactor)
            await reader.done
        finally:
            ticker.stop()
        return reader, self.origin.generators[generators], peak_rss, peak_in_flight


@pytest_twisted.ensureDeferred
async def test_slow_client_50mb_keeps_rss_flat(tmp_path: Path) -> None:
    """50 MB read at ~12.8 MB/s: the edge pauses the origin; RSS grows by less than 20 MB."""
    rig = await Rig().start(tmp_path)
    try:
        # Warm up the path (pools, buffers, allocator arenas) with a 2 MB body, read the same way.
        warm, _, _, _ = await rig.slow_get(2 * MB)
        assert warm.body == 2 * MB
        gc.collect()
        baseline = rss()
        started = reactor.seconds()
        reader, generator, peak, in_flight = await rig.slow_get(BIG)
        took = reactor.seconds() - started
        assert reader.status == b"HTTP/1.1 200 OK"
        assert reader.length == BIG and reader.body == BIG
        assert reader.digest.digest() == generator.digest.digest()
        assert generator.produced == BIG
        # It really was read slowly: at most STEP plus one 64 KiB read get in per 10 ms tick.
        assert took > BIG / ((STEP + 64 * 1024) / TICK) * 0.9, took
        grew, ahead = (peak - baseline) / MB, in_flight / MB
        print(f"50 MB in {took:.2f}s; RSS +{grew:.1f} MB; origin ahead by {ahead:.1f} MB at most")
        assert generator.pauses > 0  # the origin was told to wait
        # At no time was the origin much further ahead than the client (socket buffers only).
        assert in_flight < 16 * MB, in_flight / MB
        assert peak - baseline < 20 * MB, (peak - baseline) / MB
        after = await rig.request("GET", "/after")
        assert after.body == b"GET /after 0"
    finally:
        await rig.stop()


@pytest.mark.parametrize("size", [13, 300 * 1024], ids=["small-body", "300k-body"])
@pytest.mark.parametrize("how", ["closed", "closed-and-noticed", "dropped-on-arrival"])
@pytest_twisted.ensureDeferred
async def test_post_after_origin_closed_the_pooled_connection(
    tmp_path: Path, how: str, size: int
) -> None:
    """The origin ends the idle pooled connection; a POST then gets 200 or 502 JSON within 5 s."""
    rig = await Rig().start(tmp_path)
    try:
        assert rig.edge is not None
        pool = rig.edge.service.origin_pool
        warm = await rig.request("GET", "/warm")
        assert warm.code == 200
        await until(lambda: pool.idle_connections == 1, 2.0, "a pooled idle connection")
        assert len(rig.origin.site.channels) == 1
        body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        if how == "dropped-on-arrival":
            for channel in rig.origin.site.channels:
                channel.doomed = True
        else:
            closed = rig.origin.site.closed
            for channel in list(rig.origin.site.channels):
                channel.transport.loseConnection()  # type: ignore[union-attr]
            if how == "closed-and-noticed":
                await until(lambda: rig.origin.site.closed > closed, 2.0, "the close")
                await until(lambda: pool.idle_connections == 0, 2.0, "the edge to notice")
        posts = sum(1 for method, _, _ in rig.origin.received if method == b"POST")
        reply = await rig.request("POST", "/submit", body)  # never hangs: fails after 5 s
        print(f"{how} {size}: {reply.code} {reply.body[:80]!r}")
        seen = [r for r in rig.origin.received if r[0] == b"POST"][posts:]
        if reply.code == 200:
            assert reply.body == b"POST /submit %d" % size
            assert seen == [(b"POST", b"/submit", size)]  # once, whole
        else:
            assert reply.code == 502, (reply.code, reply.body)
            assert reply.header("Content-Type") == "application/json"
            doc = reply.json()
            assert doc["error"] in ("bad_gateway", "origin_unreachable"), doc
            assert seen == []
        if how == "closed-and-noticed":
            assert reply.code == 200  # a discarded connection is never used
        if how == "dropped-on-arrival":
            assert rig.origin.site.dropped == 1
        # The edge is fine afterwards.
        again = await rig.request("GET", "/again")
        assert (again.code, again.body) == (200, b"GET /again 0")
    finally:
        await rig.stop()
