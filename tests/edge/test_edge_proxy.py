"""Tests for edgeauth.edge.proxy, forwarding and accesslog: the reverse proxy over real sockets.

Every test runs a real origin (a twisted.web ``Site``, or a raw ``Protocol`` server for edge cases)
and a real edge on ``tcp:0:interface=127.0.0.1``, with treq on a test-owned pool or raw sockets
as the client. Nothing on the network path is mocked.
"""

from __future__ import annotations

import inspect
import json
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from edgeauth.edge import accesslog
from edgeauth.edge.accesslog import (
    BufferedAccessLog,
    EdgeSite,
    NoAccessLog,
    SampledAccessLog,
    make_access_log,
)
from edgeauth.edge.answers import Refusal, write_json
from edgeauth.edge.forwarding import forwarded_node, origin_request_headers
from edgeauth.edge.origin_errors import OriginError
from edgeauth.edge.origin_pool import OriginPool
from edgeauth.edge.proxy import BodySink, EdgeProxyResource, EdgeRequest

LOCAL = "127.0.0.1"


@attrs.define
class Reply:
    """A fully read HTTP answer."""

    code: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode() if values else None


# -- harness ----------------------------------------------------------------------------------


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` every few milliseconds; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not met in time")
        await deferLater(reactor, 0.005)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds)


class CountingFactory(WrappingFactory):
    """Wraps a server factory and counts the connections it accepted."""

    def __init__(self, wrapped: Factory) -> None:
        super().__init__(wrapped)
        self.accepted = 0
        self.most_open = 0

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.accepted += 1
        self.most_open = max(self.most_open, len(self.protocols))

    @property
    def open(self) -> int:
        return len(self.protocols)


@implementer(IPushProducer)
class BigBody:
    """Writes ``total`` bytes as fast as the origin's client lets it; records pauses."""

    def __init__(self, request: Request, total: int) -> None:
        self.request = request
        self.remaining = total
        self.sent = 0
        self.paused = False
        self.pauses = 0
        request.setHeader(b"Content-Length", b"%d" % total)
        request.registerProducer(self, True)
        reactor.callLater(0, self._produce)

    def _produce(self) -> None:
        chunk = b"x" * 65536
        while not self.paused and self.remaining > 0:
            piece = chunk[: min(len(chunk), self.remaining)]
            self.remaining -= len(piece)
            self.sent += len(piece)
            self.request.write(piece)
        if self.remaining == 0 and not self.paused:
            self.request.unregisterProducer()
            self.request.finish()
            self.remaining = -1

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        reactor.callLater(0, self._produce)

    def stopProducing(self) -> None:
        self.paused = True


class OriginApp(Resource):
    """The test origin: a handful of behaviours chosen by path."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes]] = []
        self.release = Deferred[None]()
        self.lost: list[Failure] = []
        self.big: BigBody | None = None
        self.active = 0
        self.most_active = 0

    def render(self, request: Request) -> Any:
        path = request.path
        assert request.method is not None and path is not None
        self.seen.append((request.method, path))
        if path == b"/echo":
            assert request.content is not None
            body = request.content.read()
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps(
                {
                    "method": request.method.decode(),
                    "uri": request.uri.decode(),
                    "headers": [
                        [name.decode(), value.decode()]
                        for name, values in request.requestHeaders.getAllRawHeaders()
                        for value in values
                    ],
                    "body": body.decode("latin-1"),
                    "length": len(body),
                }
            ).encode()
        if path.startswith(b"/status/"):
            request.setResponseCode(int(path.rsplit(b"/", 1)[1]))
            return b"status body"
        if path == b"/sized":
            request.setHeader(b"Content-Type", b"text/plain")
            return b"0123456789" * 10
        if path == b"/slow":
            self.active += 1
            self.most_active = max(self.most_active, self.active)

            def done() -> None:
                self.active -= 1
                request.write(b"slow done")
                request.finish()

            reactor.callLater(0.05, done)
            return NOT_DONE_YET
        if path == b"/never":
            return NOT_DONE_YET
        if path == b"/stream":
            request.write(b"chunk-one;")
            request.write(b"chunk-two")
            request.finish()
            return NOT_DONE_YET
        if path == b"/chunks":
            request.write(b"first;")

            def more(_: None) -> None:
                request.write(b"second")
                request.finish()

            self.release.addCallback(more)
            return NOT_DONE_YET
        if path == b"/hang":
            request.notifyFinish().addErrback(self.lost.append)
            request.write(b"partial")
            return NOT_DONE_YET
        if path == b"/big":
            self.big = BigBody(request, 64 * 1024 * 1024)
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"no such path"


class RawOriginProtocol(Protocol):
    """Reads whole requests (Content-Length bodies) and hands them to the server's script."""

    def __init__(self, server: RawOrigin) -> None:
        self.server = server
        self.buffer = b""
        self.count = 0

    def connectionMade(self) -> None:
        self.server.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.connected and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            request = self.buffer[: end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.count += 1
            self.server.requests.append(request)
            self.server.script(self, request, self.count)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = False
        self.server.closed += 1

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


Script = Callable[[RawOriginProtocol, bytes, int], None]


class RawOrigin(Factory):
    """A hand-written origin for what a well-behaved server never does."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections: list[RawOriginProtocol] = []
        self.closed = 0

    def buildProtocol(self, addr: Any) -> RawOriginProtocol:
        return RawOriginProtocol(self)


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@implementer(IAgentEndpointFactory)
class _BoundEndpoints:
    def __init__(self, bind: str) -> None:
        self.bind = bind

    def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(reactor, uri.host.decode(), uri.port, bindAddress=(self.bind, 0))


class HTTPClient:
    """treq on a test-owned keep-alive pool, optionally bound to a source address."""

    def __init__(self, base_url: str, bind: str | None = None) -> None:
        self.base_url = base_url
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        if bind is None:
            agent = Agent(reactor, pool=self.pool)
        else:
            agent = Agent.usingEndpointFactory(reactor, _BoundEndpoints(bind), pool=self.pool)
        self.http = treq.client.HTTPClient(agent)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, list[str]] | None = None,
    ) -> Reply:
        response = await self.http.request(
            method, self.base_url + path, data=body, headers=Headers(headers or {})
        )
        content = await treq.content(response)
        return Reply(response.code, response.headers, content)

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


class RawClient(Protocol):
    """A raw HTTP client: sends bytes, collects bytes, can stop reading or abort."""

    def __init__(self) -> None:
        self.data = b""
        self.received = 0
        self.keep = True
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.keep:
            self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True


class Net:
    """Listeners, edges and clients of one test, all closed at the end."""

    def __init__(self) -> None:
        self._cleanups: list[Callable[[], Awaitable[object] | object]] = []
        self.errors: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if event.get("log_failure") is not None or (
            level is not None and level.name in {"error", "critical"}
        ):
            self.errors.append(event)

    async def listen(self, factory: Any, interface: str = LOCAL) -> IListeningPort:
        kind = "tcp6" if ":" in interface else "tcp"
        escaped = interface.replace(":", "\\:")
        endpoint = serverFromString(reactor, f"{kind}:0:interface={escaped}")
        port: IListeningPort = await endpoint.listen(factory)
        self._cleanups.append(port.stopListening)
        return port

    async def origin(self, app: Resource | None = None) -> tuple[OriginApp, CountingFactory, int]:
        app = app if app is not None else OriginApp()
        counting = CountingFactory(Site(app))
        port = await self.listen(counting)
        assert isinstance(app, OriginApp)
        return app, counting, port.getHost().port

    async def raw_origin(self, script: Script) -> tuple[RawOrigin, int]:
        origin = RawOrigin(script)
        port = await self.listen(origin)
        return origin, port.getHost().port

    async def edge(
        self, origin_port: int, interface: str = LOCAL, site_kw: Any = None, **kw: Any
    ) -> tuple[EdgeProxyResource, str]:
        pool_kw = {
            k: kw.pop(k)
            for k in list(kw)
            if k
            in {
                "max_connections",
                "max_idle",
                "response_timeout",
                "idle_timeout",
                "connect_timeout",
            }
        }
        pool = OriginPool(reactor, "http", LOCAL, origin_port, **pool_kw)
        resource = EdgeProxyResource(LOCAL, origin_port, b"", reactor, pool=pool, **kw)
        site_kw = {"requestFactory": EdgeRequest, **(site_kw or {})}
        site = EdgeSite(resource, reactor=reactor, **site_kw)
        port = await self.listen(site, interface)
        self._cleanups.append(pool.close)
        host = f"[{interface}]" if ":" in interface else interface
        return resource, f"http://{host}:{port.getHost().port}"

    def client(self, base_url: str, bind: str | None = None) -> HTTPClient:
        client = HTTPClient(base_url, bind)
        self._cleanups.append(client.close)
        return client

    async def raw_client(self, url: str) -> RawClient:
        port = int(url.rsplit(":", 1)[1])
        client = RawClient()
        await TCP4ClientEndpoint(reactor, LOCAL, port).connect(Factory.forProtocol(lambda: client))
        self._cleanups.append(lambda: client.transport and client.transport.abortConnection())
        return client

    async def close(self) -> None:
        for cleanup in reversed(self._cleanups):
            result = cleanup()
            if isinstance(result, Deferred) or inspect.iscoroutine(result):
                await result
        globalLogPublisher.removeObserver(self._observe)
        assert self.errors == [], "errors were logged"


@pytest_twisted.async_yield_fixture
async def net() -> Any:
    harness = Net()
    yield harness
    await harness.close()


def header_values(echo: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in echo["headers"] if n.lower() == name.lower()]


# -- pass-through -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_get_post_head_pass_through(net: Net) -> None:
    """GET, POST and HEAD reach the origin with method, path, query and body; answers come back."""
    _, _, origin_port = await net.origin()
    _, url = await net.edge(origin_port)
    client = net.client(url)

    got = await client.request("GET", "/echo?q=1&r=%20")
    assert got.code == 200
    echo = got.json()
    assert (echo["method"], echo["uri"], echo["body"]) == ("GET", "/echo?q=1&r=%20", "")
    assert got.header("Via") == "1.1 edgeauth"

    posted = await client.request("POST", "/echo", body=b"a=1&b=2")
    echo = posted.json()
    assert (posted.code, echo["method"], echo["body"]) == (200, "POST", "a=1&b=2")
    assert header_values(echo, "Content-Length") == ["7"]

    teapot = await client.request("GET", "/status/418")
    assert (teapot.code, teapot.body) == (418, b"status body")

    full = await client.request("GET", "/sized")
    head = await client.request("HEAD", "/sized")
    assert head.code == 200 and head.body == b""
    assert head.header("Content-Length") == "100" and len(full.body) == 100
    assert head.header("Content-Type") == "text/plain"


@pytest.mark.parametrize("factory", [EdgeRequest, Request])
@pytest_twisted.ensureDeferred
async def test_large_request_body_reaches_the_origin(net: Net, factory: type[Request]) -> None:
    """A 3 MiB upload arrives byte for byte, streamed (EdgeRequest) or spooled (plain Request)."""
    _, _, origin_port = await net.origin()
    _, url = await net.edge(origin_port, site_kw={"requestFactory": factory})
    body = bytes(range(256)) * (3 * 4096)
    got = await net.client(url).request("PUT", "/echo", body=body)
    assert got.code == 200
    assert got.json()["length"] == len(body)
    assert got.json()["body"].encode("latin-1") == body
    assert header_values(got.json(), "Content-Length") == [str(len(body))]


@pytest_twisted.ensureDeferred
async def test_keep_alive_reuses_one_origin_connection(net: Net) -> None:
    """Many sequential requests through the edge use one origin connection."""
    _, counting, origin_port = await net.origin()
    _, url = await net.edge(origin_port)
    client = net.client(url)
    for i in range(25):
        got = await client.request("GET", f"/echo?i={i}")
        assert got.code == 200
    assert counting.accepted == 1


@pytest_twisted.ensureDeferred
async def test_client_connection_is_kept_alive(net: Net) -> None:
    """Sized and chunked answers alike leave the client's connection open for the next request."""
    _, _, origin_port = await net.origin()
    _, url = await net.edge(origin_port)
    client = await net.raw_client(url)
    assert client.transport is not None
    for path, end in [(b"/sized", b"0123456789"), (b"/stream", b"0\r\n\r\n"), (b"/echo", b"}")]:
        client.data = b""
        client.transport.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
        await wait_until(lambda end=end: client.data.endswith(end))  # type: ignore[misc]
        assert client.data.startswith(b"HTTP/1.1 200 OK")
        if path == b"/stream":
            assert b"chunk-one;" in client.data and b"chunk-two" in client.data
    assert not client.closed


@pytest_twisted.ensureDeferred
async def test_concurrency_is_bounded_by_max_connections(net: Net) -> None:
    """With max_connections=2, ten concurrent slow requests never open a third connection."""
    app, counting, origin_port = await net.origin()
    resource, url = await net.edge(origin_port, max_connections=2)
    clients = [net.client(url) for _ in range(10)]

    async def one(client: HTTPClient) -> Reply:
        return await client.request("GET", "/slow")

    pending = [Deferred.fromCoroutine(one(c)) for c in clients]
    await wait_until(lambda: resource.pool.queued >= 1)
    replies = [await d for d in pending]
    assert [r.body for r in replies] == [b"slow done"] * 10
    assert counting.most_open <= 2 and app.most_active == 2
    assert len(app.seen) == 10


# -- stale connections and retries ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_idle_connection_closed_by_origin_is_discarded(net: Net) -> None:
    """An origin that closes an idle keep-alive connection costs the next request nothing."""

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        proto.send(ok())
        reactor.callLater(0.01, proto.close)

    origin, origin_port = await net.raw_origin(script)
    resource, url = await net.edge(origin_port)
    client = net.client(url)
    assert (await client.request("GET", "/a")).body == b"ok"
    await wait_until(lambda: origin.closed == 1 and resource.pool.open_connections == 0)
    assert (await client.request("GET", "/b")).body == b"ok"
    assert len(origin.connections) == 2


@pytest_twisted.ensureDeferred
async def test_stale_pooled_connection_is_retried_once_for_get(net: Net) -> None:
    """A GET on a pooled connection the origin closes without answering is retried once."""

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        if n == 1:
            proto.send(ok(b"first"))
        else:
            proto.close()  # as if the origin had timed the idle connection out just now

    origin, origin_port = await net.raw_origin(script)
    _, url = await net.edge(origin_port)
    client = net.client(url)
    assert (await client.request("GET", "/one")).body == b"first"
    got = await client.request("GET", "/two")
    assert (got.code, got.body) == (200, b"first")
    assert [r.split(b" ")[1] for r in origin.requests] == [b"/one", b"/two", b"/two"]
    assert len(origin.connections) == 2


@pytest_twisted.ensureDeferred
async def test_non_idempotent_post_is_not_retried(net: Net) -> None:
    """A POST the origin drops without answering is not sent twice: 502 bad_gateway."""

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        if n == 1:
            proto.send(ok())
        else:
            proto.close()

    origin, origin_port = await net.raw_origin(script)
    _, url = await net.edge(origin_port)
    client = net.client(url)
    assert (await client.request("GET", "/warm")).code == 200
    got = await client.request("POST", "/pay", body=b"amount=1")
    assert got.code == 502
    assert got.json()["error"] == "bad_gateway"
    assert got.header("Cache-Control") == "no-store"
    assert sum(r.startswith(b"POST") for r in origin.requests) == 1


@pytest_twisted.ensureDeferred
async def test_connect_refused_is_502_origin_unreachable(net: Net) -> None:
    """An origin port nobody listens on gives 502 origin_unreachable."""
    probe = socket.socket()
    probe.bind((LOCAL, 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    _, url = await net.edge(closed_port)
    got = await net.client(url).request("GET", "/x")
    assert got.code == 502
    assert got.json()["error"] == "origin_unreachable"
    assert got.header("Cache-Control") == "no-store"
    assert got.header("Content-Type") == "application/json"


@pytest_twisted.ensureDeferred
async def test_response_timeout_is_504_origin_timeout(net: Net) -> None:
    """An origin that never answers gives 504 origin_timeout after response_timeout."""
    _, _, origin_port = await net.origin()
    resource, url = await net.edge(origin_port, response_timeout=0.2)
    got = await net.client(url).request("GET", "/never")
    assert got.code == 504
    assert got.json()["error"] == "origin_timeout"
    await wait_until(lambda: resource.pool.open_connections == 0)


# -- streaming and backpressure ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_chunked_response_is_streamed(net: Net) -> None:
    """The first chunk reaches the client while the origin has not finished the response."""
    app, _, origin_port = await net.origin()
    _, url = await net.edge(origin_port)
    client = await net.raw_client(url)
    assert client.transport is not None
    client.transport.write(b"GET /chunks HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_until(lambda: b"first;" in client.data)
    assert b"second" not in client.data
    head = client.data.split(b"\r\n\r\n", 1)[0].lower()
    assert b"transfer-encoding: chunked" in head
    app.release.callback(None)
    await wait_until(lambda: client.data.endswith(b"0\r\n\r\n"))
    assert b"second" in client.data


@pytest_twisted.ensureDeferred
async def test_slow_client_pauses_the_origin(net: Net) -> None:
    """A client that stops reading makes the edge stop reading the origin (no unbounded buffer)."""
    app, _, origin_port = await net.origin()
    requests: list[Request] = []
    _, url = await net.edge(origin_port, gate=lambda request: requests.append(request))
    client = await net.raw_client(url)
    client.keep = False
    assert client.transport is not None
    client.transport.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_until(lambda: client.received > 0)
    client.transport.pauseProducing()
    await wait_until(lambda: app.big is not None and app.big.paused)
    big = app.big
    assert big is not None
    # Kernel socket buffers (autotuned) absorb some megabytes first; then the origin stays paused.
    sent = -1
    while big.sent != sent:
        sent = big.sent
        await sleep(0.15)
    assert big.paused and big.remaining > 0
    assert sent < 40 * 1024 * 1024, "the edge read far more than the client took"
    # What the edge holds for the client in user space stays near one transport buffer.
    to_client: Any = requests[0].transport
    assert len(to_client.dataBuffer) + to_client._tempDataLen < 1024 * 1024
    client.transport.resumeProducing()
    await wait_until(lambda: app.big is not None and app.big.remaining == -1, timeout=20)
    await wait_until(lambda: client.received >= 64 * 1024 * 1024, timeout=20)


@pytest_twisted.ensureDeferred
async def test_client_disconnect_aborts_origin_request(net: Net) -> None:
    """A client leaving mid-response aborts the origin connection; it is never pooled."""
    app, _, origin_port = await net.origin()
    resource, url = await net.edge(origin_port)
    client = await net.raw_client(url)
    assert client.transport is not None
    client.transport.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_until(lambda: b"partial" in client.data)
    client.transport.abortConnection()
    await wait_until(lambda: len(app.lost) == 1)
    await wait_until(lambda: resource.pool.open_connections == 0)
    assert resource.pool.idle_connections == 0


@pytest_twisted.ensureDeferred
async def test_origin_failing_mid_body_aborts_the_client(net: Net) -> None:
    """A body cut short by the origin is never passed off as complete: the client sees a failure."""

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        proto.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        proto.close()

    _, origin_port = await net.raw_origin(script)
    _, url = await net.edge(origin_port)
    with pytest.raises(ResponseFailed):
        await net.client(url).request("GET", "/cut")


@pytest_twisted.ensureDeferred
async def test_read_until_close_body_is_relayed(net: Net) -> None:
    """A body delimited by the origin closing its connection arrives whole (chunked onwards)."""

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        proto.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil ")
        reactor.callLater(0.01, proto.send, b"close")
        reactor.callLater(0.02, proto.close)

    _, origin_port = await net.raw_origin(script)
    _, url = await net.edge(origin_port)
    client = net.client(url)
    for _ in range(2):
        got = await client.request("GET", "/eof")
        assert (got.code, got.body) == (200, b"until close")


# -- streamed uploads ---------------------------------------------------------------------------


class UploadOriginProtocol(Protocol):
    """Counts an upload as it arrives (Content-Length or chunked), then answers with its size."""

    def __init__(self, server: UploadOrigin) -> None:
        self.server = server
        self.data = bytearray()
        self.head = b""
        self.received = 0

    def connectionMade(self) -> None:
        self.server.protocols.append(self)

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.head:
            self.data += data
            end = self.data.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = bytes(self.data[: end + 4])
            data = bytes(self.data[end + 4 :])
            self.data = bytearray()
            if self.server.answer_early is not None:
                self.transport.write(self.server.answer_early)
                self.transport.loseConnection()
                return
            if self.server.stall:
                self.transport.pauseProducing()
        self.received += len(data)
        head = self.head.lower()
        if b"transfer-encoding: chunked" in head:
            self.data += data
            if not self.data.endswith(b"0\r\n\r\n"):
                return
            size = len(dechunk(bytes(self.data)))
        else:
            size = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            if self.received < size:
                return
        self.transport.write(ok(str(size).encode()))
        self.data = bytearray()
        self.head = b""
        self.received = 0

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.server.lost += 1


class UploadOrigin(Factory):
    def __init__(self, *, stall: bool = False, answer_early: bytes | None = None) -> None:
        self.stall = stall
        self.answer_early = answer_early
        self.protocols: list[UploadOriginProtocol] = []
        self.lost = 0

    def buildProtocol(self, addr: Any) -> UploadOriginProtocol:
        return UploadOriginProtocol(self)


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += body[:size]
        body = body[size + 2 :]


@implementer(IPushProducer)
class Uploader:
    """Writes ``total`` body bytes on a raw client connection as fast as it is allowed to."""

    def __init__(self, client: RawClient, total: int, chunked: bool = False) -> None:
        self.transport: Any = client.transport
        self.remaining = total
        self.sent = 0
        self.paused = False
        self.chunked = chunked
        self.transport.registerProducer(self, True)
        reactor.callLater(0, self._produce)

    def _produce(self) -> None:
        piece = b"u" * 65536
        while not self.paused and self.remaining > 0:
            data = piece[: min(len(piece), self.remaining)]
            self.remaining -= len(data)
            self.sent += len(data)
            if self.chunked:
                data = b"%x\r\n%s\r\n" % (len(data), data)
            self.transport.write(data)
        if self.remaining == 0 and not self.paused:
            if self.chunked:
                self.transport.write(b"0\r\n\r\n")
            self.transport.unregisterProducer()
            self.remaining = -1

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        reactor.callLater(0, self._produce)

    def stopProducing(self) -> None:
        self.paused = True


@pytest.mark.parametrize("chunked", [False, True])
@pytest_twisted.ensureDeferred
async def test_upload_reaches_the_origin_before_the_client_has_sent_it_all(
    net: Net, chunked: bool
) -> None:
    """A large body is forwarded as it arrives, Content-Length or chunked, not spooled first."""
    origin = UploadOrigin()
    port = (await net.listen(origin)).getHost().port
    _, url = await net.edge(port)
    client = await net.raw_client(url)
    assert client.transport is not None
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 400000"
    client.transport.write(b"POST /up HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % framing)
    first = b"a" * 200000
    client.transport.write(b"%x\r\n%s\r\n" % (len(first), first) if chunked else first)
    await wait_until(lambda: bool(origin.protocols) and origin.protocols[0].received >= 200000)
    head = origin.protocols[0].head.lower()
    assert (b"transfer-encoding: chunked" in head) == chunked
    assert (b"content-length: 400000" in head) == (not chunked)
    assert client.data == b""
    rest = b"b" * 200000
    client.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest) if chunked else rest)
    await wait_until(lambda: client.data.endswith(b"400000"))
    assert client.data.startswith(b"HTTP/1.1 200 OK")


@pytest_twisted.ensureDeferred
async def test_slow_origin_pauses_reading_the_client(net: Net) -> None:
    """An origin that stops reading an upload makes the edge stop reading the client."""
    origin = UploadOrigin(stall=True)
    port = (await net.listen(origin)).getHost().port
    requests: list[Request] = []
    _, url = await net.edge(port, gate=lambda request: requests.append(request))
    client = await net.raw_client(url)
    assert client.transport is not None
    total = 64 * 1024 * 1024
    client.transport.write(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total)
    uploader = Uploader(client, total)
    await wait_until(lambda: bool(origin.protocols) and uploader.paused)
    sent = -1
    while uploader.sent != sent:
        sent = uploader.sent
        await sleep(0.15)
    assert uploader.paused and sent < 40 * 1024 * 1024, "the edge read far more than it sent"
    request = requests[0]
    assert isinstance(request, EdgeRequest) and request.body_stream is not None
    assert request.content is not None and request.content.tell() == 0, "nothing was spooled"
    origin_side = origin.protocols[0].transport
    assert origin_side is not None
    origin_side.resumeProducing()  # type: ignore[attr-defined]
    await wait_until(lambda: client.data.endswith(str(total).encode()), timeout=20)
    assert uploader.remaining == -1


@pytest_twisted.ensureDeferred
async def test_origin_answering_an_upload_early_keeps_the_client_connection_sane(net: Net) -> None:
    """An origin answering 413 mid-upload: the client gets it and its connection stays usable.

    The rest of the body is read and dropped before the request is finished.
    """
    origin = UploadOrigin(answer_early=b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig")
    port = (await net.listen(origin)).getHost().port
    _, url = await net.edge(port)
    client = await net.raw_client(url)
    assert client.transport is not None
    body = b"z" * 300000
    client.transport.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n")
    client.transport.write(body[:100000])
    await wait_until(lambda: client.data.endswith(b"big"))
    assert client.data.startswith(b"HTTP/1.1 413 Too Large")
    client.transport.write(body[100000:])
    client.data = b""
    client.transport.write(b"POST /again HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    await wait_until(lambda: client.data.endswith(b"big"))
    assert client.data.startswith(b"HTTP/1.1 413 Too Large")
    assert not client.closed


@pytest.fixture
def hanging_port() -> Iterator[int]:
    """A port whose accept queue is full, so connecting to it hangs until the timeout."""
    server = socket.socket()
    server.bind((LOCAL, 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = [socket.socket() for _ in range(4)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex((LOCAL, port))
    yield port
    for filler in fillers:
        filler.close()
    server.close()


@pytest_twisted.ensureDeferred
async def test_upload_held_while_connecting_is_released_when_the_call_fails(
    net: Net, hanging_port: int
) -> None:
    """A streamed body waiting for a connection pauses the client; a failed call lets it go.

    The edge holds 64 KiB while connecting; when the connect times out, the rest of the body is
    read and dropped, the client gets 502 and its connection serves the next request.
    """
    _, url = await net.edge(hanging_port, connect_timeout=0.3)
    client = await net.raw_client(url)
    assert client.transport is not None
    total = 8 * 1024 * 1024
    client.transport.write(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total)
    uploader = Uploader(client, total)
    await wait_until(lambda: uploader.paused)
    sent = -1
    while uploader.sent != sent:
        sent = uploader.sent
        await sleep(0.05)
    assert uploader.remaining > 0, "the client was paused before it could send everything"
    await wait_until(lambda: b"origin_unreachable" in client.data and uploader.remaining == -1)
    assert client.data.startswith(b"HTTP/1.1 502 ")
    client.data = b""
    client.transport.write(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_until(lambda: b"origin_unreachable" in client.data)
    assert not client.closed


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_upload_aborts_the_origin_request(net: Net) -> None:
    """A client that disconnects halfway through a streamed upload takes the origin call along."""
    origin = UploadOrigin()
    port = (await net.listen(origin)).getHost().port
    resource, url = await net.edge(port)
    client = await net.raw_client(url)
    assert client.transport is not None
    client.transport.write(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
    client.transport.write(b"q" * 100000)
    await wait_until(lambda: bool(origin.protocols) and origin.protocols[0].received == 100000)
    client.transport.abortConnection()  # type: ignore[attr-defined]
    await wait_until(lambda: origin.lost == 1 and resource.pool.open_connections == 0)


@pytest_twisted.ensureDeferred
async def test_gate_is_asked_once_for_a_streamed_upload(net: Net) -> None:
    """A gate refusal at header time keeps the upload from the origin and is answered once."""
    origin = UploadOrigin()
    port = (await net.listen(origin)).getHost().port
    asked: list[bytes] = []

    def gate(request: Request) -> Refusal | None:
        asked.append(request.uri)
        return Refusal(403, {"error": "ip_banned", "ref": 1})

    _, url = await net.edge(port, gate=gate)
    got = await net.client(url).request("PUT", "/up", body=b"w" * 200000)
    assert (got.code, got.json()["error"]) == (403, "ip_banned")
    assert asked == [b"/up"] and origin.protocols == []


# -- headers ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_stripped_and_repeated_headers_kept(net: Net) -> None:
    """Hop-by-hop headers go neither way; repeated headers (two Set-Cookie) stay as they were."""

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        proto.send(
            b"HTTP/1.1 200 OK\r\n"
            b"Connection: X-Origin-Secret, keep-alive\r\n"
            b"X-Origin-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\n"
            b"Trailer: X-T\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\n"
            b"Set-Cookie: a=1; Path=/\r\nSet-Cookie: b=2\r\nX-Kept: yes\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
        )

    origin, origin_port = await net.raw_origin(script)
    _, url = await net.edge(origin_port)
    got = await net.client(url).request(
        "GET",
        "/h",
        headers={
            "Connection": ["X-Client-Secret"],
            "X-Client-Secret": ["1"],
            "Keep-Alive": ["timeout=9"],
            "TE": ["trailers"],
            "Proxy-Authorization": ["Basic eA=="],
            "Proxy-Connection": ["keep-alive"],
            "X-Repeat": ["one", "two"],
        },
    )
    assert (got.code, got.body) == (200, b"hello")
    assert got.headers.getRawHeaders(b"Set-Cookie") == [b"a=1; Path=/", b"b=2"]
    assert got.header("X-Kept") == "yes"
    for name in ("X-Origin-Secret", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
        assert got.header(name) is None, name
    assert got.header("Proxy-Connection") is None and got.header("X-T") is None
    sent = origin.requests[0].lower().decode("latin-1")
    for name in ("x-client-secret", "keep-alive", "te:", "proxy-authorization", "proxy-conn"):
        assert name not in sent, name
    assert sent.count("\r\nconnection:") == 0
    assert "\r\nx-repeat: one\r\n" in sent and "\r\nx-repeat: two\r\n" in sent


@pytest_twisted.ensureDeferred
async def test_forwarding_headers_for_an_untrusted_peer(net: Net) -> None:
    """From an untrusted peer, X-Forwarded-For/Forwarded/-Proto are replaced, Via appended."""
    _, _, origin_port = await net.origin()
    _, url = await net.edge(origin_port, is_trusted=lambda ip: ip == LOCAL)
    client = net.client(url, bind="127.0.0.2")
    got = await client.request(
        "GET",
        "/echo",
        headers={
            "X-Forwarded-For": ["203.0.113.9"],
            "Forwarded": ["for=198.51.100.1"],
            "X-Forwarded-Proto": ["https"],
            "Via": ["1.0 upstream"],
        },
    )
    echo = got.json()
    edge_host = url.removeprefix("http://")
    assert header_values(echo, "X-Forwarded-For") == ["127.0.0.2"]
    assert header_values(echo, "Forwarded") == [f'for=127.0.0.2;proto=http;host="{edge_host}"']
    assert header_values(echo, "X-Forwarded-Proto") == ["http"]
    assert header_values(echo, "Via") == ["1.0 upstream, 1.1 edgeauth"]
    assert header_values(echo, "Host") == [f"127.0.0.1:{origin_port}"]


@pytest_twisted.ensureDeferred
async def test_forwarding_headers_for_a_trusted_peer(net: Net) -> None:
    """From a trusted proxy, the chain is kept and the peer appended."""
    _, _, origin_port = await net.origin()
    _, url = await net.edge(origin_port, is_trusted=lambda ip: ip == LOCAL, preserve_host=True)
    got = await net.client(url).request(
        "GET",
        "/echo",
        headers={
            "X-Forwarded-For": ["203.0.113.9, 10.0.0.1"],
            "Forwarded": ['for="[2001:db8::7]";proto=https'],
            "X-Forwarded-Proto": ["https"],
        },
    )
    echo = got.json()
    edge_host = url.removeprefix("http://")
    assert header_values(echo, "X-Forwarded-For") == ["203.0.113.9, 10.0.0.1, 127.0.0.1"]
    assert header_values(echo, "Forwarded") == [
        f'for="[2001:db8::7]";proto=https, for=127.0.0.1;proto=http;host="{edge_host}"'
    ]
    assert header_values(echo, "X-Forwarded-Proto") == ["https"]
    assert header_values(echo, "Host") == [edge_host]


@pytest_twisted.ensureDeferred
async def test_forwarded_quotes_and_brackets_ipv6_peers(net: Net) -> None:
    """An IPv6 client appears as for="[::1]" in Forwarded and bare in X-Forwarded-For."""
    _, _, origin_port = await net.origin()
    _, url = await net.edge(origin_port, interface="::1")
    port = int(url.rsplit(":", 1)[1])
    client = RawClient()
    await TCP6ClientEndpoint(reactor, "::1", port).connect(Factory.forProtocol(lambda: client))
    assert client.transport is not None
    client.transport.write(b"GET /echo HTTP/1.1\r\nHost: edge.example\r\nConnection: close\r\n\r\n")
    await wait_until(lambda: client.closed)
    echo = json.loads(client.data.split(b"\r\n\r\n", 1)[1])
    assert header_values(echo, "Forwarded") == ['for="[::1]";proto=http;host=edge.example']
    assert header_values(echo, "X-Forwarded-For") == ["::1"]


def test_forwarded_node_and_header_builder() -> None:
    """forwarded_node brackets IPv6, and the builder ignores forwarding headers from strangers."""
    assert forwarded_node("192.0.2.1") == b"192.0.2.1"
    assert forwarded_node("2001:db8::1") == b'"[2001:db8::1]"'
    assert forwarded_node(None) == b"unknown"
    calls: list[str] = []
    headers = Headers({b"X-Forwarded-For": [b"1.2.3.4"], b"Host": [b"a b"]})
    out, framed = origin_request_headers(
        headers,
        peer="192.0.2.1",
        is_trusted=lambda ip: calls.append(ip) is not None,
        proto=b"https",
        host=b"origin:81",
    )
    assert calls == ["192.0.2.1"] and not framed
    assert out[0] == (b"Host", b"origin:81")
    assert (b"X-Forwarded-For", b"192.0.2.1") in out
    assert (b"Forwarded", b'for=192.0.2.1;proto=https;host="a b"') in out
    calls.clear()
    origin_request_headers(
        Headers(),
        peer="192.0.2.1",
        is_trusted=lambda ip: calls.append(ip) is None,
        proto=b"http",
        host=None,
    )
    assert calls == [], "is_trusted is asked only when forwarding headers came in"


def _reference_origin_request_headers(
    headers: Headers,
    *,
    peer: str | None,
    is_trusted: Callable[[str], bool],
    proto: bytes,
    host: bytes | None,
    via: bytes = b"1.1 edgeauth",
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """origin_request_headers as first written (a chain of tests per header): the reference."""
    from edgeauth.edge.forwarding import HOP_BY_HOP, _forwarded_value

    def tokens(values: Any) -> set[bytes]:
        return {t.strip().lower() for v in values for t in v.split(b",")} - {b""}

    connection = headers.getRawHeaders(b"connection")
    listed: Any = tokens(connection) if connection else ()
    out: list[tuple[bytes, bytes]] = [(b"Host", host)] if host is not None else []
    xff: list[bytes] = []
    forwarded: list[bytes] = []
    vias: list[bytes] = []
    xfp: list[bytes] = []
    client_host: bytes | None = None
    framed = False
    for name, values in headers.getAllRawHeaders():
        key = name.lower()
        if key in HOP_BY_HOP or key in listed:
            if key == b"transfer-encoding":
                framed = True
            continue
        if key == b"host":
            client_host = values[0]
            if host is None:
                out.insert(0, (b"Host", values[0]))
        elif key == b"content-length":
            framed = True
        elif key == b"x-forwarded-for":
            xff += values
        elif key == b"forwarded":
            forwarded += values
        elif key == b"via":
            vias += values
        elif key == b"x-forwarded-proto":
            xfp += values
        elif key != b"expect":
            for value in values:
                out.append((name, value))
    trusted = peer is not None and bool(xff or forwarded or xfp) and is_trusted(peer)
    peer_bytes = peer.encode("ascii") if peer is not None else None
    if trusted and xff:
        chain = b", ".join(xff)
        out.append((b"X-Forwarded-For", chain + b", " + peer_bytes if peer_bytes else chain))
    elif peer_bytes is not None:
        out.append((b"X-Forwarded-For", peer_bytes))
    element = b"for=" + forwarded_node(peer) + b";proto=" + proto
    if client_host is not None:
        element += b";host=" + _forwarded_value(client_host)
    if trusted and forwarded:
        element = b", ".join(forwarded) + b", " + element
    out.append((b"Forwarded", element))
    out.append((b"X-Forwarded-Proto", b", ".join(xfp) if trusted and xfp else proto))
    out.append((b"Via", b", ".join([*vias, via])))
    return out, framed


_SPECIAL_NAMES = [
    b"Host", b"host", b"Content-Length", b"Transfer-Encoding", b"X-Forwarded-For",
    b"Forwarded", b"Via", b"X-Forwarded-Proto", b"Expect", b"Connection", b"Keep-Alive",
    b"TE", b"Trailer", b"Upgrade", b"Proxy-Authorization", b"Proxy-Connection",
    b"Accept", b"Cookie", b"X-Custom", b"User-Agent",
]  # fmt: skip
_header_names = st.one_of(
    st.sampled_from(_SPECIAL_NAMES),
    st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,12}\Z"),
)
_header_values = st.binary(max_size=24).map(
    lambda v: v.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
)
_connection_values = st.lists(
    st.sampled_from([b"keep-alive", b"close", b"X-Custom", b"host", b"Content-Length", b"te",
                     b"transfer-encoding", b"Via", b"cookie", b" ", b"upgrade"]),
    max_size=4,
).map(b", ".join)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    pairs=st.lists(
        st.one_of(
            st.tuples(_header_names, _header_values),
            st.tuples(st.just(b"Connection"), _connection_values),
        ),
        max_size=12,
    ),
    peer=st.sampled_from([None, "192.0.2.1", "127.0.0.1", "2001:db8::1", "::1"]),
    trusted=st.booleans(),
    proto=st.sampled_from([b"http", b"https"]),
    host=st.sampled_from([None, b"origin:81", b"o"]),
    via=st.sampled_from([b"1.1 edgeauth", b"1.1 edge-b"]),
)
def test_origin_request_headers_matches_the_reference(
    pairs: list[tuple[bytes, bytes]],
    peer: str | None,
    trusted: bool,
    proto: bytes,
    host: bytes | None,
    via: bytes,
) -> None:
    """The one-lookup-per-header builder gives what the chain of tests gave, for any headers."""
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    asked: list[list[str]] = [[], []]
    got, want = (
        build(
            headers,
            peer=peer,
            is_trusted=lambda ip, seen=seen: seen.append(ip) is None and trusted,
            proto=proto,
            host=host,
            via=via,
        )
        for build, seen in zip(
            (origin_request_headers, _reference_origin_request_headers), asked, strict=True
        )
    )
    assert got == want
    assert asked[0] == asked[1]


@pytest_twisted.ensureDeferred
async def test_a_proxied_request_is_freed_without_the_garbage_collector(net: Net) -> None:
    """Request, exchange and origin call form no reference cycle once the response is sent."""
    import gc
    import weakref

    refs: list[weakref.ref[Request]] = []

    class Tracked(EdgeRequest):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            refs.append(weakref.ref(self))

    _, _, origin_port = await net.origin()
    _, url = await net.edge(origin_port, site_kw={"requestFactory": Tracked})
    client = net.client(url)
    assert (await client.request("GET", "/sized")).code == 200
    gc.collect()
    gc.disable()
    try:
        refs.clear()
        for _ in range(3):
            assert (await client.request("GET", "/sized?x=1")).code == 200
        await deferLater(reactor, 0.05)
        assert len(refs) == 3
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()


# -- interim responses, HEAD, upgrades -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_interim_1xx_responses_are_skipped(net: Net) -> None:
    """100 Continue and 103 Early Hints from the origin never reach the client."""

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        proto.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        proto.send(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        proto.send(ok(b"final", b"X-Final: 1\r\n"))

    origin, origin_port = await net.raw_origin(script)
    _, url = await net.edge(origin_port)
    client = net.client(url)
    for _ in range(2):
        got = await client.request("POST", "/upload", body=b"data")
        assert (got.code, got.body, got.header("X-Final")) == (200, b"final", "1")
        assert got.header("Link") is None
    assert len(origin.connections) == 1


@pytest_twisted.ensureDeferred
async def test_head_response_with_content_length_has_no_body(net: Net) -> None:
    """A HEAD answer with Content-Length: 1000 ends at its head; the connection is reused."""

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        if request.startswith(b"HEAD"):
            proto.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nX-Head: 1\r\n\r\n")
        else:
            proto.send(ok(b"body"))

    origin, origin_port = await net.raw_origin(script)
    _, url = await net.edge(origin_port)
    client = net.client(url)
    head = await client.request("HEAD", "/r")
    assert (head.code, head.body, head.header("Content-Length")) == (200, b"", "1000")
    assert head.header("X-Head") == "1"
    got = await client.request("GET", "/r")
    assert got.body == b"body"
    assert len(origin.connections) == 1


@pytest_twisted.ensureDeferred
async def test_upgrade_requests_are_refused_with_501(net: Net) -> None:
    """A WebSocket upgrade is answered 501 upgrade_not_supported; the origin never sees it."""
    app, _, origin_port = await net.origin()
    _, url = await net.edge(origin_port)
    client = net.client(url)
    got = await client.request(
        "GET", "/echo", headers={"Connection": ["Upgrade"], "Upgrade": ["websocket"]}
    )
    assert got.code == 501 and got.json()["error"] == "upgrade_not_supported"
    assert app.seen == []
    h2c = await client.request(
        "GET", "/echo", headers={"Connection": ["Upgrade"], "Upgrade": ["h2c"]}
    )
    assert h2c.code == 200 and header_values(h2c.json(), "Upgrade") == []


@pytest_twisted.ensureDeferred
async def test_origin_switching_protocols_is_bad_gateway(net: Net) -> None:
    """An origin answering 101 anyway gets a 502: upgrades are not tunnelled."""

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        proto.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")

    _, origin_port = await net.raw_origin(script)
    _, url = await net.edge(origin_port)
    got = await net.client(url).request("GET", "/ws")
    assert (got.code, got.json()["error"]) == (502, "bad_gateway")


# -- seams --------------------------------------------------------------------------------------


class FakeCache:
    """Serves /cached itself, keeps copies of bodies, and has a stale answer for errors."""

    def __init__(self) -> None:
        self.stored: dict[bytes, bytes] = {}
        self.errors: list[str] = []

    def lookup(self, request: Request) -> bool:
        if request.path == b"/cached":
            request.setHeader(b"X-Cache", b"HIT")
            request.write(b"from cache")
            request.finish()
            return True
        return False

    def observe(self, request: Request, status: int, headers: Headers) -> BodySink | None:
        cache = self

        class Sink:
            def __init__(self) -> None:
                self.parts: list[bytes] = []

            def write(self, data: bytes) -> None:
                self.parts.append(data)

            def finish(self) -> None:
                cache.stored[request.uri] = b"".join(self.parts)

            def abort(self) -> None:
                self.parts = []

        return Sink() if status == 200 else None

    def serve_on_error(self, request: Request, error: OriginError) -> bool:
        self.errors.append(error.kind)
        if request.path == b"/stale":
            write_json(request, 200, {"stale": True})
            return True
        return False


@pytest_twisted.ensureDeferred
async def test_gate_refusal_cache_seam_and_status_hook(net: Net) -> None:
    """A gate refusal keeps the request from the origin; the cache seam and on_response see all."""
    app, _, origin_port = await net.origin()
    statuses: list[int] = []
    cache = FakeCache()

    def gate(request: Request) -> Refusal | None:
        if request.getHeader(b"x-banned"):
            return Refusal(403, {"error": "ip_banned", "ref": 7}, ((b"X-Ref", b"7"),))
        if request.getHeader(b"x-token"):
            challenges = ((b"WWW-Authenticate", b"Bearer"), (b"WWW-Authenticate", b"Basic"))
            problem = ((b"Content-Type", b"application/problem+json"),)
            return Refusal(401, {"error": "invalid_token"}, challenges + problem)
        return None

    _, url = await net.edge(
        origin_port, gate=gate, cache=cache, on_response=lambda r, s: statuses.append(s)
    )
    client = net.client(url)
    refused = await client.request("GET", "/echo", headers={"X-Banned": ["1"]})
    assert (refused.code, refused.json()) == (403, {"error": "ip_banned", "ref": 7})
    assert refused.header("Cache-Control") == "no-store" and refused.header("X-Ref") == "7"
    unauthorized = await client.request("GET", "/echo", headers={"X-Token": ["bad"]})
    assert unauthorized.code == 401
    assert unauthorized.headers.getRawHeaders(b"WWW-Authenticate") == [b"Bearer", b"Basic"]
    assert unauthorized.headers.getRawHeaders(b"Content-Type") == [b"application/problem+json"]
    assert app.seen == []
    hit = await client.request("GET", "/cached")
    assert (hit.body, hit.header("X-Cache")) == (b"from cache", "HIT")
    assert app.seen == []
    miss = await client.request("GET", "/sized")
    assert cache.stored[b"/sized"] == miss.body
    assert (await client.request("GET", "/status/503")).code == 503
    assert statuses == [200, 503]


@pytest_twisted.ensureDeferred
async def test_cache_can_answer_for_an_unreachable_origin(net: Net) -> None:
    """serve_on_error lets the cache answer instead of the 502 (stale-if-error)."""
    probe = socket.socket()
    probe.bind((LOCAL, 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    cache = FakeCache()
    _, url = await net.edge(closed_port, cache=cache)
    client = net.client(url)
    assert (await client.request("GET", "/stale")).json() == {"stale": True}
    assert (await client.request("GET", "/other")).code == 502
    assert cache.errors == ["origin_unreachable", "origin_unreachable"]


# -- robustness ---------------------------------------------------------------------------------


class _Fuzz:
    """The shared edge for the property test (hypothesis runs many examples per test call)."""

    reply = b""
    split = 0


@pytest_twisted.ensureDeferred
async def test_arbitrary_origin_bytes_never_break_the_edge(net: Net) -> None:
    """Arbitrary origin bytes give an answer or an aborted connection, never a crash.

    Nothing is logged as an error, and the edge serves the next request.
    """

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        if request.startswith(b"GET /good"):
            proto.send(ok(b"good"))
            return
        first, rest = _Fuzz.reply[: _Fuzz.split], _Fuzz.reply[_Fuzz.split :]
        proto.send(first)
        if rest:
            reactor.callLater(0.001, proto.send, rest)
        reactor.callLater(0.002, proto.close)

    _, origin_port = await net.raw_origin(script)
    _, url = await net.edge(origin_port, response_timeout=2.0)
    client = net.client(url)
    errors: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    prefixes = [
        b"",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.0 204 No Content\r\n",
    ]

    @settings(max_examples=60, deadline=None)
    @given(
        prefix=st.sampled_from(prefixes),
        tail=st.binary(max_size=200),
        split=st.integers(min_value=0, max_value=300),
    )
    def check(prefix: bytes, tail: bytes, split: int) -> None:
        _Fuzz.reply = prefix + tail
        _Fuzz.split = split
        outcome = blockingCallFromThread(reactor, lambda: Deferred.fromCoroutine(one_round()))
        outcomes.append(outcome)

    async def one_round() -> str:
        try:
            got = await client.request("GET", "/fuzz")
        except ResponseFailed:
            outcome = "aborted"
        else:
            assert got.code < 600
            outcome = str(got.code)
            if got.code in (502, 504):
                outcome = got.json()["error"]
        good = await client.request("GET", "/good")
        assert (good.code, good.body) == (200, b"good")
        return outcome

    outcomes: list[str] = []
    globalLogPublisher.addObserver(observe)
    try:
        # hypothesis drives the examples from a thread; each one runs on the reactor.
        await deferToThread(check)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert errors == []
    assert len(outcomes) >= 60
    assert {"aborted", "bad_gateway", "200"} <= set(outcomes)


# -- access log ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_access_log_off_writes_nothing(net: Net, tmp_path: Path) -> None:
    """Mode off: requests are served and no log line is produced anywhere."""
    log = make_access_log("off", reactor)
    assert isinstance(log, NoAccessLog)
    _, _, origin_port = await net.origin()
    _, url = await net.edge(origin_port, site_kw={"access_log": log})
    assert (await net.client(url).request("GET", "/sized")).code == 200
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        make_access_log("verbose", reactor, str(tmp_path / "x"))
    with pytest.raises(ValueError):
        make_access_log("buffered", reactor)


@pytest_twisted.ensureDeferred
async def test_buffered_access_log_flushes_by_count_in_a_thread(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mode buffered: N lines trigger one write, done in a pool thread, never on the reactor."""
    path = tmp_path / "access.log"
    threads: list[int] = []
    writers: list[int] = []
    append = accesslog._append

    def recording_append(where: str, text: str) -> None:
        writers.append(threading.get_ident())
        append(where, text)

    monkeypatch.setattr(accesslog, "_append", recording_append)
    log = BufferedAccessLog(
        reactor,
        str(path),
        flush_interval=60.0,
        flush_lines=3,
        formatter=lambda ts, req: threads.append(threading.get_ident()) or f"{ts} {req.uri!r}",
    )
    _, _, origin_port = await net.origin()
    _, url = await net.edge(origin_port, site_kw={"access_log": log})
    client = net.client(url)
    for i in range(3):
        await client.request("GET", f"/sized?i={i}")
    await wait_until(lambda: log.written == 3)
    lines = path.read_text().splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == [f"b'/sized?i={i}'" for i in range(3)]
    assert set(threads) == {threading.get_ident()}, "lines are formatted on the reactor thread"
    assert len(writers) == 1 and threading.get_ident() not in writers, "one write, in a thread"
    await client.request("GET", "/sized?i=3")
    await sleep(0.05)
    assert len(path.read_text().splitlines()) == 3, "the fourth line waits for the timer"
    await log.flush()
    assert len(path.read_text().splitlines()) == 4


@pytest_twisted.ensureDeferred
async def test_buffered_access_log_flushes_every_interval(net: Net, tmp_path: Path) -> None:
    """Mode buffered: a LoopingCall writes what is buffered every flush_interval seconds."""
    path = tmp_path / "access.log"
    log = make_access_log("buffered", reactor, str(path), flush_interval=0.05, flush_lines=1000)
    _, _, origin_port = await net.origin()
    _, url = await net.edge(origin_port, site_kw={"access_log": log})
    await net.client(url).request("GET", "/sized", headers={"User-Agent": ["probe/1"]})
    await wait_until(lambda: path.exists() and path.read_text() != "")
    (line,) = path.read_text().splitlines()
    assert line.startswith('"127.0.0.1" - - [')
    assert '"GET /sized HTTP/1.1" 200 100 "-" "probe/1"' in line


@pytest_twisted.ensureDeferred
async def test_sampled_access_log_keeps_one_in_n(net: Net, tmp_path: Path) -> None:
    """Mode sampled: one request in N is logged (the 1st, N+1th, ...)."""
    path = tmp_path / "access.log"
    log = make_access_log("sampled", reactor, str(path), sample_every=4, flush_lines=1000)
    assert isinstance(log, SampledAccessLog)
    _, _, origin_port = await net.origin()
    _, url = await net.edge(origin_port, site_kw={"access_log": log})
    client = net.client(url)
    for i in range(9):
        await client.request("GET", f"/sized?i={i}")
    await log.inner.flush()  # type: ignore[attr-defined]
    uris = [line.split('"GET ')[1].split(" ")[0] for line in path.read_text().splitlines()]
    assert uris == ["/sized?i=0", "/sized?i=4", "/sized?i=8"]


def test_buffered_access_log_drops_rather_than_grows() -> None:
    """With the disk stuck behind max_batches, new lines are dropped and counted, not queued."""
    from twisted.python.threadpool import ThreadPool

    class StuckPool(ThreadPool):
        def callInThreadWithCallback(self, *a: Any, **kw: Any) -> None:
            pass  # the disk never answers

    log = BufferedAccessLog(
        reactor,
        "/nonexistent/never-written",
        threadpool=StuckPool(),
        flush_lines=2,
        max_batches=2,
        formatter=lambda ts, req: "line",
    )
    for _ in range(10):
        log.log(None)  # type: ignore[arg-type]
    assert log.dropped == 6 and log.written == 0


# -- the origin path: a leaf resource instead of one child per path segment --------------------


class _WalkedProxy(EdgeProxyResource):
    """The proxy as it was before it became a leaf: the site walks one child per segment."""

    isLeaf = False


def _resource_and_postpath(root: Resource, uri_path: bytes) -> tuple[Resource, list[bytes]]:
    """What twisted.web's site finds for ``uri_path`` under ``root``, and the postpath left."""
    from urllib.parse import unquote_to_bytes

    from twisted.web.resource import getChildForRequest
    from twisted.web.test.requesthelper import DummyRequest

    # as twisted.web.server.Request.process splits and unquotes the path
    request = DummyRequest([unquote_to_bytes(p) for p in uri_path[1:].split(b"/")])
    return getChildForRequest(root, request), request.postpath


def _old_and_new_origin_paths(base: bytes, uri_path: bytes, mount: bytes | None) -> list[bytes]:
    """The origin path the walked children build and the one ``origin_path`` builds."""
    from twisted.web.test.requesthelper import DummyRequest

    paths = []
    for cls in (_WalkedProxy, EdgeProxyResource):
        proxy = cls(LOCAL, 80, base, reactor, pool=OriginPool(reactor, "http", LOCAL, 80))
        root: Resource = proxy
        if mount is not None:
            root = Resource()
            root.putChild(mount, proxy)
        found, postpath = _resource_and_postpath(root, uri_path)
        assert isinstance(found, EdgeProxyResource)
        if cls is _WalkedProxy:
            assert postpath == []
            paths.append(found.path)
        else:
            assert found is proxy
            paths.append(proxy.origin_path(DummyRequest(postpath)))
    return paths


_path_segments = st.lists(
    st.one_of(
        st.just(b""),  # "//" and a trailing "/"
        st.binary(max_size=6).map(lambda b: b.replace(b"/", b"").replace(b"?", b"")),
        st.sampled_from([b"%2F", b"%2f", b"a%2Fb", b"%25", b"%", b"%zz", b"%00", b"%C3%A9", b"~"]),
    ),
    min_size=1,
    max_size=6,
).map(lambda segments: b"/" + b"/".join(segments))


@settings(max_examples=500, deadline=None)
@given(uri_path=_path_segments, base=st.sampled_from([b"", b"/base"]))
def test_origin_path_is_the_path_the_children_built(uri_path: bytes, base: bytes) -> None:
    """For any request path the leaf builds the origin path the chain of getChild calls built."""
    old, new = _old_and_new_origin_paths(base, uri_path, None)
    assert new == old


@pytest.mark.parametrize("uri_path", [b"/app", b"/app/", b"/app//x/", b"/app/a%2Fb"])
@pytest.mark.parametrize("base", [b"", b"/base"])
def test_origin_path_when_mounted_with_put_child(uri_path: bytes, base: bytes) -> None:
    """Mounted under another resource; ``/app`` leaves an empty postpath: ``self.path`` alone."""
    old, new = _old_and_new_origin_paths(base, uri_path, b"app")
    assert new == old
    if uri_path == b"/app":
        assert new == base


@pytest_twisted.ensureDeferred
async def test_escaped_slashes_and_empty_segments_reach_the_origin_unchanged(net: Net) -> None:
    """``/a%2Fb//c/?q=1`` is sent to the origin as the children sent it: the same target."""
    origin, origin_port = await net.raw_origin(lambda proto, request, n: proto.send(ok()))
    _, url = await net.edge(origin_port)
    client = await net.raw_client(url)
    assert client.transport is not None
    client.transport.write(b"GET /a%2Fb//c/?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_until(lambda: client.data.endswith(b"ok"))
    assert client.data.startswith(b"HTTP/1.1 200 OK")
    (request,) = origin.requests
    assert request.split(b"\r\n", 1)[0] == b"GET /a%2Fb//c/?q=1 HTTP/1.1"
