"""Helpers of the edge cache integration tests (no tests here).

A scripted origin, a fleet (master, origin, edges), a fast keep-alive client. Everything is
real: a master, edges and an origin on 127.0.0.1 port 0, HTTP over loopback.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import attrs
from httptools import HttpResponseParser
from support import (
    Client,
    EdgeFleet,
    Reply,
    RunningEdge,
    start_edge,
    start_master,
    wait_until,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

HOST = "shop.example"
NO_TTL_RULES = {"rules": ""}
"""``[ttl]`` with no rules: the TTL the origin grants is kept as it is."""


@attrs.define
class Answer:
    """What the scripted origin answers for one path."""

    status: int = 200
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)
    body: bytes = b""


def cacheable(
    body: bytes,
    *,
    cache_control: str = "public, max-age=3600",
    tags: str | None = None,
    etag: str | None = None,
    extra: Sequence[tuple[str, str]] = (),
    status: int = 200,
) -> Answer:
    """An answer with the given Cache-Control (and tags, ETag, extra headers)."""
    headers = [(b"Content-Type", b"text/plain"), (b"Cache-Control", cache_control.encode())]
    if tags is not None:
        headers.append((b"X-Cache-Tags", tags.encode()))
    if etag is not None:
        headers.append((b"ETag", etag.encode()))
    headers += [(k.encode(), v.encode()) for k, v in extra]
    return Answer(status, headers, body)


def revalidating(answer: Answer) -> Script:
    """``answer``, or a 304 with its validator and Cache-Control when If-None-Match matches."""
    etag = next(v for k, v in answer.headers if k.lower() == b"etag")

    def script(request: Request) -> Answer:
        if request.getHeader(b"if-none-match") == etag:
            keep = (b"etag", b"cache-control", b"x-cache-tags")
            return Answer(304, [(k, v) for k, v in answer.headers if k.lower() in keep])
        return answer

    return script


@attrs.define
class Seen:
    """One request the origin received."""

    method: bytes
    uri: bytes
    headers: dict[bytes, list[bytes]]

    def header(self, name: str) -> str | None:
        """One request header as text."""
        values = self.headers.get(name.lower().encode())
        return values[0].decode() if values else None


Script = Callable[[Request], Answer]


class ScriptedOrigin:
    """A twisted.web origin answering per path from a script; it can hold and count requests."""

    def __init__(self) -> None:
        self.routes: dict[bytes, Answer | Script] = {}
        self.default: Answer | Script | None = None
        self.requests: list[Seen] = []
        self.in_flight = 0
        self.peak = 0
        self.held: set[bytes] = set()
        self.waiting: list[tuple[Request, Deferred[None]]] = []
        self.delay = 0.0
        self.port: Any = None
        self.protocols: set[Any] = set()
        origin = self

        class Scripted(Resource):
            isLeaf = True

            def render(self, request: Request) -> Any:
                return origin._render(request)

        class TrackingSite(Site):
            def buildProtocol(self, addr: Any) -> Any:
                proto = super().buildProtocol(addr)
                origin.protocols.add(proto)
                return proto

        self.site = TrackingSite(Scripted())

    def route(self, path: str, answer: Answer | Script) -> None:
        """Answer ``path`` (without the query) with ``answer``."""
        self.routes[path.encode()] = answer

    def seen(self, path: str) -> list[Seen]:
        """The requests for ``path`` (path and query as sent)."""
        return [s for s in self.requests if s.uri == path.encode()]

    def _render(self, request: Request) -> Any:
        self.requests.append(
            Seen(
                request.method,
                request.uri,
                {k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()},
            )
        )
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        route = self.routes.get(request.path, self.default)
        if route is None:
            answer = Answer(404, [(b"Content-Type", b"text/plain")], b"no route")
        elif isinstance(route, Answer):
            answer = route
        else:
            answer = route(request)
        done: Deferred[None] = Deferred()
        if request.path in self.held:
            self.waiting.append((request, done))
        elif self.delay:
            reactor.callLater(self.delay, done.callback, None)
        else:
            done.callback(None)
        done.addCallback(lambda _: self._answer(request, answer))
        return NOT_DONE_YET

    def release(self, path: str | None = None) -> int:
        """Answer the held requests (for ``path``, or all); stop holding that path."""
        if path is not None:
            self.held.discard(path.encode())
        else:
            self.held.clear()
        keep, go = [], []
        for request, d in self.waiting:
            (go if path is None or request.path == path.encode() else keep).append((request, d))
        self.waiting = keep
        for _, d in go:
            d.callback(None)
        return len(go)

    def _answer(self, request: Request, answer: Answer) -> None:
        """Send ``answer`` (chosen when the request arrived)."""
        self.in_flight -= 1
        if request.channel is None:
            return
        request.setResponseCode(answer.status)
        for name, value in answer.headers:
            request.responseHeaders.addRawHeader(name, value)
        request.setHeader(b"Content-Length", b"%d" % len(answer.body))
        if len(answer.body) > 1 << 20:
            _Chunks(request, answer.body).start()
        else:
            request.write(answer.body)
            request.finish()

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 (an ephemeral port unless given)."""
        endpoint = serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1")
        self.port = await endpoint.listen(self.site)

    @property
    def port_number(self) -> int:
        """The bound port."""
        return int(self.port.getHost().port)

    @property
    def url(self) -> str:
        """Base URL of the origin."""
        return f"http://127.0.0.1:{self.port_number}"

    async def stop(self) -> None:
        """Stop listening and drop every connection, as a dead origin would."""
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
        for proto in list(self.protocols):
            transport = getattr(proto, "transport", None)
            if transport is not None:
                transport.abortConnection()
        self.protocols.clear()


@implementer(IPushProducer)
class _Chunks:
    """Writes a large origin body in 256 KiB pieces as the edge reads them."""

    def __init__(self, request: Request, body: bytes) -> None:
        self.request, self.body, self.offset, self.paused = request, body, 0, False

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.request.channel is not None:
            piece = self.body[self.offset : self.offset + (256 << 10)]
            self.offset += len(piece)
            if self.offset >= len(self.body):
                self.request.write(piece)
                self.request.unregisterProducer()
                self.request.finish()
                return
            self.request.write(piece)

    def stopProducing(self) -> None:
        self.paused = True


class CacheFleet(EdgeFleet):
    """A master, a scripted origin and edges with caches; everything closed by the exit stack."""

    def __init__(self, tmp_path: Path, stack: AsyncExitStack) -> None:
        super().__init__(tmp_path, stack)
        self.origin = ScriptedOrigin()
        self.sections: dict[str, dict[str, Any]] = {}

    async def start(self, names: Sequence[str] = ("edge-a", "edge-b"), **sections: Any) -> None:
        """Start the master, the origin and edges ``names`` with the given ini sections."""
        self.master = await start_master(self.tmp_path)
        self.master_url = self.master.url
        self.stack.push_async_callback(self._stop_master)
        self.ops = self.client(self.master.url)
        await self.origin.start()
        self.stack.push_async_callback(self.origin.stop)
        self.stack.push_async_callback(self.stop_edges)
        sections.setdefault("ttl", NO_TTL_RULES)
        for name in names:
            await self.start_edge(name, **sections)

    async def _stop_master(self) -> None:
        if self.master.service.running:
            await self.master.stop()

    async def start_edge(self, name: str, synced: bool = True, **sections: Any) -> RunningEdge:
        """Start (or restart with the same sections and file) the edge ``name``."""
        sections = self.sections.setdefault(name, sections)
        edge = await start_edge(
            self.tmp_path, name, self.master_url, self.origin.url, synced=synced, **sections
        )
        self.edges[name] = edge
        return edge

    def cache(self, name: str) -> Any:
        """The :class:`EdgeCache` of edge ``name``."""
        return self.edges[name].service.cache

    def user(self, name: str) -> CacheClient:
        """A client of edge ``name`` that sends ``Host: shop.example``."""
        client = CacheClient(self.edges[name].url)
        self.stack.push_async_callback(client.close)
        return client

    async def invalidate(self, **body: Any) -> int:
        """POST /invalidate; return the event's seq once every running edge applied it."""
        reply = await self.ops.post("/invalidate", body)
        assert reply.code == 201, reply.body
        seq: int = reply.json()["event"]["seq"]
        await self.applied(seq)
        return seq

    async def applied(self, seq: int, timeout: float = 1.0) -> None:
        """Wait (at most ``timeout`` s, the acceptance budget) until every edge applied ``seq``."""

        def done() -> bool:
            return all(
                e.service.state.offset >= seq for e in self.edges.values() if e.service.running
            )

        await wait_until(done, f"every edge to apply seq {seq}", timeout=timeout)

    async def explain(self, name: str, url: str) -> Any:
        """The edge's admin ``/explain?url=``."""
        admin = Client(self.edges[name].admin_url)
        try:
            reply = await admin.get(f"/explain?url={url}", token=None)
        finally:
            await admin.close()
        assert reply.code == 200, reply.body
        return reply.json()["cache"]


class CacheClient(Client):
    """A :class:`Client` of an edge that sends ``Host: shop.example`` and no Authorization."""

    async def fetch(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        """GET ``path`` through the edge."""
        return await self.request(
            "GET", path, token=None, headers={"Host": HOST, **(headers or {})}
        )

    async def head(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        """HEAD ``path`` through the edge."""
        return await self.request(
            "HEAD", path, token=None, headers={"Host": HOST, **(headers or {})}
        )


def x_cache(reply: Reply) -> str | None:
    """The reply's X-Cache."""
    return reply.header("X-Cache")


# -- a fast keep-alive client for thousands of requests ---------------------------------------


@attrs.define
class Raw:
    """One response read by :class:`BulkClient`."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes


class _BulkConnection(Protocol):
    def __init__(self) -> None:
        self.parser = HttpResponseParser(self)
        self.pending: deque[Deferred[Raw]] = deque()
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True
        while self.pending:
            self.pending.popleft().errback(Exception("connection lost"))

    def on_message_begin(self) -> None:
        self.headers, self.body = {}, []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        raw = Raw(self.parser.get_status_code(), self.headers, b"".join(self.body))
        self.pending.popleft().callback(raw)

    def get(self, path: str, host: str) -> Deferred[Raw]:
        d: Deferred[Raw] = Deferred()
        self.pending.append(d)
        assert self.transport is not None
        self.transport.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return d


class BulkClient:
    """``concurrency`` keep-alive connections, one request in flight on each (httptools)."""

    def __init__(self, port: int, concurrency: int = 20) -> None:
        self.port = port
        self.concurrency = concurrency

    async def get_all(
        self, paths: Sequence[str], host: str = HOST, check: Callable[[Raw], None] | None = None
    ) -> list[Raw]:
        """GET every path; return the responses in the order of ``paths``."""
        results: list[Raw | None] = [None] * len(paths)
        todo = deque(enumerate(paths))

        async def worker() -> None:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
            conn = await connectProtocol(endpoint, _BulkConnection())
            try:
                while todo:
                    i, path = todo.popleft()
                    raw = await conn.get(path, host)
                    if check is not None:
                        check(raw)
                    results[i] = raw
            finally:
                assert conn.transport is not None
                conn.transport.loseConnection()

        workers = [Deferred.fromCoroutine(worker()) for _ in range(self.concurrency)]
        await gatherResults(workers, consumeErrors=True)
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]
