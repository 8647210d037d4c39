"""Tests for edgeauth.edge.origin_pool and .origin: the pool and its httptools client protocol.

The pool is driven directly (no edge in front) against real origins on 127.0.0.1: a twisted.web
``Site`` or a raw ``Protocol`` server that misbehaves on purpose.
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from edgeauth.edge.origin import OriginRequest
from edgeauth.edge.origin_errors import (
    BadGatewayError,
    OriginError,
    OriginTimeoutError,
    OriginUnreachableError,
)
from edgeauth.edge.origin_pool import OriginPool

LOCAL = "127.0.0.1"


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` every few milliseconds; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not met in time")
        await deferLater(reactor, 0.005)


class Collector:
    """A ResponseHandler that keeps everything it hears."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.error: OriginError | None = None
        self.ended: Deferred[str] = Deferred()

    def response_started(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        assert self.status is None, "one final response only"
        self.status = status
        self.headers = headers

    def response_body(self, data: bytes) -> None:
        self.body += data

    def response_finished(self) -> None:
        self.ended.callback("finished")

    def response_failed(self, error: OriginError) -> None:
        self.error = error
        self.ended.callback("failed")


def get(target: bytes = b"/", method: bytes = b"GET", **kw: Any) -> OriginRequest:
    return OriginRequest(method=method, target=target, headers=[(b"Host", b"origin")], **kw)


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
        while self.connected:
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
            request, self.buffer = (
                self.buffer[: end + 4 + length],
                self.buffer[end + 4 + length :],
            )
            self.count += 1
            self.server.requests.append(request)
            self.server.script(self, request, self.count)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = False
        self.server.closed += 1

    def send(self, data: bytes) -> None:
        if self.connected and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class RawOrigin(Factory):
    def __init__(self, script: Callable[[RawOriginProtocol, bytes, int], None]) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections: list[RawOriginProtocol] = []
        self.closed = 0

    def buildProtocol(self, addr: Any) -> RawOriginProtocol:
        return RawOriginProtocol(self)


def ok(body: bytes = b"ok") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class App(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.order: list[bytes] = []

    def render(self, request: Request) -> Any:
        assert request.content is not None and request.uri is not None
        self.order.append(request.uri)
        if request.path == b"/slow":
            reactor.callLater(0.03, lambda: (request.write(b"slow"), request.finish()))
            return NOT_DONE_YET
        if request.path == b"/never":
            return NOT_DONE_YET
        body = request.content.read()
        headers = {
            k.decode(): [x.decode() for x in v]
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        return json.dumps({"length": len(body), "headers": headers, "ok": body == BODY}).encode()


BODY = bytes(range(256)) * 800  # 200 kB


class Harness:
    def __init__(self) -> None:
        self.ports: list[IListeningPort] = []
        self.pools: list[OriginPool] = []

    async def listen(self, factory: Any) -> int:
        port = await serverFromString(reactor, f"tcp:0:interface={LOCAL}").listen(factory)
        self.ports.append(port)
        return int(port.getHost().port)

    async def app(self) -> tuple[App, int]:
        app = App()
        return app, await self.listen(Site(app))

    def pool(self, port: int, **kw: Any) -> OriginPool:
        pool = OriginPool(reactor, "http", LOCAL, port, **kw)
        self.pools.append(pool)
        return pool

    async def replaying(self, replies: list[bytes]) -> tuple[RawOrigin, OriginPool]:
        """A raw origin that answers its n-th request with ``replies[n - 1]``, and a pool to it."""
        origin = RawOrigin(lambda proto, request, n: proto.send(replies[n - 1]))
        return origin, self.pool(await self.listen(origin))

    async def close(self) -> None:
        for pool in self.pools:
            await pool.close()
        for port in self.ports:
            await port.stopListening()


@pytest_twisted.async_yield_fixture
async def h() -> Any:
    harness = Harness()
    yield harness
    await harness.close()


async def fetch(pool: OriginPool, request: OriginRequest | None = None) -> Collector:
    collector = Collector()
    pool.request(request or get(), collector)
    await collector.ended
    return collector


@pytest_twisted.ensureDeferred
async def test_body_without_length_is_sent_chunked(h: Harness) -> None:
    """A body of unknown length goes out chunked and arrives whole."""
    _, port = await h.app()
    pool = h.pool(port)
    got = await fetch(pool, get(b"/echo", b"POST", body=io.BytesIO(BODY)))
    echo = json.loads(got.body)
    assert echo["ok"] and echo["length"] == len(BODY)
    assert echo["headers"]["Transfer-Encoding"] == ["chunked"]
    sized = await fetch(
        pool, get(b"/echo", b"POST", body=io.BytesIO(BODY), content_length=len(BODY))
    )
    assert json.loads(sized.body)["ok"]


@pytest_twisted.ensureDeferred
async def test_retried_request_replays_its_body(h: Harness) -> None:
    """A PUT whose pooled connection dies unanswered is resent, body included, on a new one."""

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        if len(proto.server.connections) == 1 and n == 2:
            proto.close()
        else:
            proto.send(ok(request.split(b"\r\n\r\n", 1)[1]))

    origin = RawOrigin(script)
    pool = h.pool(await h.listen(origin))
    assert (await fetch(pool)).body == b""
    got = await fetch(pool, get(b"/p", b"PUT", body=io.BytesIO(b"payload"), content_length=7))
    assert (got.status, got.body) == (200, b"payload")
    assert len(origin.connections) == 2


@pytest_twisted.ensureDeferred
async def test_retry_happens_only_once(h: Harness) -> None:
    """If the fresh connection of the retry also closes unanswered, the call fails: 502."""

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        if len(proto.server.requests) == 1:
            proto.send(ok())
        else:
            proto.close()

    origin = RawOrigin(script)
    pool = h.pool(await h.listen(origin))
    await fetch(pool)
    got = await fetch(pool)
    assert isinstance(got.error, BadGatewayError) and got.error.status == 502
    assert "without responding" in got.error.detail
    assert len(origin.requests) == 3


@pytest_twisted.ensureDeferred
async def test_idle_connections_time_out(h: Harness) -> None:
    """A pooled connection unused for idle_timeout seconds is closed."""
    origin = RawOrigin(lambda proto, request, n: proto.send(ok()))
    pool = h.pool(await h.listen(origin), idle_timeout=0.1)
    await fetch(pool)
    assert (pool.open_connections, pool.idle_connections) == (1, 1)
    await wait_until(lambda: origin.closed == 1)
    assert (pool.open_connections, pool.idle_connections) == (0, 0)


@pytest_twisted.ensureDeferred
async def test_max_idle_bounds_the_connections_kept(h: Harness) -> None:
    """After a burst on four connections, only max_idle of them stay open."""
    _, port = await h.app()
    pool = h.pool(port, max_connections=4, max_idle=1)
    collectors = [Collector() for _ in range(4)]
    for c in collectors:
        pool.request(get(b"/slow"), c)
    assert pool.open_connections == 4
    for c in collectors:
        await c.ended
    await wait_until(lambda: pool.open_connections == 1)
    assert pool.idle_connections == 1


@pytest_twisted.ensureDeferred
async def test_waiting_requests_are_served_in_order(h: Harness) -> None:
    """Requests beyond max_connections wait in a FIFO queue; a cancelled one is skipped."""
    app, port = await h.app()
    pool = h.pool(port, max_connections=1)
    collectors = [Collector() for _ in range(6)]
    calls = [pool.request(get(b"/slow?%d" % i), c) for i, c in enumerate(collectors)]
    assert pool.queued == 5
    calls[3].cancel()
    for i, c in enumerate(collectors):
        if i != 3:
            await c.ended
    assert app.order == [b"/slow?0", b"/slow?1", b"/slow?2", b"/slow?4", b"/slow?5"]
    assert collectors[3].status is None and not collectors[3].ended.called


@pytest_twisted.ensureDeferred
async def test_bytes_from_an_idle_connection_drop_it(h: Harness) -> None:
    """An origin that talks while nothing was asked loses its pooled connection."""

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        proto.send(ok())
        reactor.callLater(0.01, proto.send, b"HTTP/1.1 200 OK\r\n")

    origin = RawOrigin(script)
    pool = h.pool(await h.listen(origin))
    await fetch(pool)
    await wait_until(lambda: origin.closed == 1)
    assert pool.open_connections == 0
    assert (await fetch(pool)).status == 200


@pytest_twisted.ensureDeferred
async def test_extra_bytes_after_a_response_prevent_reuse(h: Harness) -> None:
    """Bytes past the end of a response make the connection untrustworthy: not pooled."""
    origin = RawOrigin(lambda proto, request, n: proto.send(ok() + b"HTTP/1.1 200 OK\r\n\r\n"))
    pool = h.pool(await h.listen(origin))
    assert (await fetch(pool)).body == b"ok"
    assert (await fetch(pool)).body == b"ok"
    assert len(origin.connections) == 2


@pytest_twisted.ensureDeferred
async def test_no_body_responses_keep_the_connection(h: Harness) -> None:
    """HEAD without length, 304 and 204 with a Content-Length: no body, connection reused."""
    replies = [
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        ok(b"last"),
    ]
    origin, pool = await h.replaying(replies)
    head = await fetch(pool, get(method=b"HEAD"))
    assert (head.status, head.body, head.headers) == (200, b"", [(b"x-a", b"1")])
    assert [(await fetch(pool)).status for _ in range(2)] == [304, 204]
    assert (await fetch(pool)).body == b"last"
    assert len(origin.connections) == 1


@pytest_twisted.ensureDeferred
async def test_steady_slow_origin_does_not_time_out(h: Harness) -> None:
    """The response timeout counts silence, not total time: a trickling body completes."""

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        proto.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(10):
            reactor.callLater(0.1 * (i + 1), proto.send, b"1\r\nx\r\n")
        reactor.callLater(1.05, proto.send, b"0\r\n\r\n")

    pool = h.pool(await h.listen(RawOrigin(script)), response_timeout=0.4)
    got = await fetch(pool)
    assert (got.error, got.body) == (None, b"x" * 10)


@pytest_twisted.ensureDeferred
async def test_origin_stalling_mid_body_times_out(h: Harness) -> None:
    """A body that stops flowing fails the call after response_timeout, connection aborted."""

    def script(proto: RawOriginProtocol, request: bytes, n: int) -> None:
        proto.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    origin = RawOrigin(script)
    pool = h.pool(await h.listen(origin), response_timeout=0.1)
    got = await fetch(pool)
    assert (got.status, got.body) == (200, b"abc")
    assert isinstance(got.error, OriginTimeoutError) and got.error.status == 504
    await wait_until(lambda: origin.closed == 1 and pool.open_connections == 0)


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A listening socket whose accept queue is full, so new connections hang."""
    server = socket.socket()
    server.bind((LOCAL, 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((LOCAL, port))
        fillers.append(s)
    yield port
    for s in fillers:
        s.close()
    server.close()


@pytest_twisted.ensureDeferred
async def test_connect_timeout_is_unreachable(h: Harness, full_backlog: int) -> None:
    """A connection that cannot be set up within connect_timeout fails as origin_unreachable."""
    pool = h.pool(full_backlog, connect_timeout=0.2, response_timeout=5)
    got = await fetch(pool)
    assert isinstance(got.error, OriginUnreachableError)
    assert got.error.kind == "origin_unreachable" and "timed out" in got.error.detail.lower()


@pytest_twisted.ensureDeferred
async def test_close_fails_running_and_queued_calls(h: Harness) -> None:
    """close() fails what runs and what waits, closes every connection, then fires."""
    _, port = await h.app()
    pool = h.pool(port, max_connections=1)
    running, waiting = Collector(), Collector()
    pool.request(get(b"/never"), running)
    pool.request(get(b"/never"), waiting)
    await wait_until(lambda: pool.open_connections == 1 and pool.queued == 1)
    await deferLater(reactor, 0.02)
    await pool.close()
    assert isinstance(running.error, OriginUnreachableError)
    assert isinstance(waiting.error, OriginUnreachableError)
    assert pool.open_connections == 0
    late = Collector()
    pool.request(get(), late)
    assert isinstance(late.error, OriginUnreachableError)


def test_pool_arguments_are_checked() -> None:
    """Bad schemes and bounds are refused; Host names the origin as a client would."""
    with pytest.raises(ValueError):
        OriginPool(reactor, "ftp", LOCAL, 21)
    with pytest.raises(ValueError):
        OriginPool(reactor, "http", LOCAL, 80, max_connections=0)
    assert OriginPool(reactor, "http", "example.com", 80).authority == b"example.com"
    assert OriginPool(reactor, "https", "example.com", 8443).authority == b"example.com:8443"
    assert OriginPool(reactor, "http", "::1", 8080).authority == b"[::1]:8080"


@pytest_twisted.ensureDeferred
async def test_oversized_or_endless_response_heads_are_refused(h: Harness) -> None:
    """Heads (interim ones included) are bounded: 70 kB of headers or endless 1xx give 502."""
    replies = [
        b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n" * 20000,
    ]
    origin = RawOrigin(lambda proto, request, n: proto.send(replies[len(origin.requests) - 1]))
    pool = h.pool(await h.listen(origin))
    for _ in replies:
        got = await fetch(pool)
        assert isinstance(got.error, BadGatewayError) and "over 65536 bytes" in got.error.detail
        assert got.status is None


@pytest_twisted.ensureDeferred
async def test_a_failing_handler_is_reported_not_blamed_on_the_origin(h: Harness) -> None:
    """An exception in the handler fails the call with a clear detail and is logged."""
    from twisted.logger import globalLogPublisher

    origin = RawOrigin(lambda proto, request, n: proto.send(ok()))
    pool = h.pool(await h.listen(origin))
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)

    class Broken(Collector):
        def response_started(
            self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
        ) -> None:
            raise RuntimeError("boom")

    broken = Broken()
    try:
        pool.request(get(), broken)
        await broken.ended
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert isinstance(broken.error, BadGatewayError)
    assert broken.error.detail == "the edge failed to relay the response"
    assert any(e.get("log_failure") is not None for e in logged)


# -- one timer for every call's response timeout -------------------------------------------------


def test_one_timer_checks_the_response_timeout_of_every_call() -> None:
    """Calls waiting on a connection share one DelayedCall; each times out after its own silence."""
    from twisted.internet.testing import MemoryReactorClock

    clock = MemoryReactorClock()  # connections are never made: the calls stay connecting
    pool = OriginPool(clock, "http", LOCAL, 80, response_timeout=10.0)
    first, second, third = Collector(), Collector(), Collector()
    a = pool.request(get(), first)
    clock.advance(4.0)
    b = pool.request(get(), second)
    c = pool.request(get(), third)
    assert len(clock.getDelayedCalls()) == 1
    c.cancel()
    clock.advance(5.9)  # t = 9.9
    assert first.error is None
    b.pauseProducing()
    b.resumeProducing()  # progress at t = 9.9: b's deadline moves to 19.9
    clock.advance(0.2)  # t = 10.1 (the slack is at most response_timeout / 10)
    assert isinstance(first.error, OriginTimeoutError) and first.error.status == 504
    assert a.done and not b.done and second.error is None and third.error is None
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(9.7)  # t = 19.8
    assert second.error is None
    clock.advance(1.2)  # t = 21.0
    assert isinstance(second.error, OriginTimeoutError)
    assert third.error is None  # cancelled: no report
    assert clock.getDelayedCalls() == []  # nothing left to watch, no timer


def test_closing_the_pool_stops_the_timer_once_no_call_is_left() -> None:
    """Queued calls fail at once; a call still connecting keeps its timeout."""
    from twisted.internet.testing import MemoryReactorClock

    clock = MemoryReactorClock()
    pool = OriginPool(clock, "http", LOCAL, 80, max_connections=1, response_timeout=10.0)
    connecting, queued = Collector(), Collector()
    pool.request(get(), connecting)
    pool.request(get(), queued)
    pool.close()
    assert isinstance(queued.error, OriginUnreachableError)
    assert connecting.error is None and len(clock.getDelayedCalls()) == 1
    clock.advance(11.0)
    assert isinstance(connecting.error, OriginTimeoutError)
    assert clock.getDelayedCalls() == []

    idle = OriginPool(clock, "http", LOCAL, 80, response_timeout=10.0)
    idle.request(get(), Collector()).cancel()
    idle.close()
    assert clock.getDelayedCalls() == []


def test_a_handler_starting_a_call_while_calls_time_out_keeps_the_timer_right() -> None:
    """A call made from a timed-out call's handler is watched, by one timer, at its deadline."""
    from twisted.internet.testing import MemoryReactorClock

    clock = MemoryReactorClock()
    pool = OriginPool(clock, "http", LOCAL, 80, response_timeout=10.0)
    again = Collector()

    class Retrying(Collector):
        def response_failed(self, error: OriginError) -> None:
            super().response_failed(error)
            pool.request(get(), again)

    pool.request(get(), Retrying())
    clock.advance(4.0)
    waiting = Collector()
    pool.request(get(), waiting)  # deadline 14
    clock.advance(6.0)  # t = 10: the first times out, its handler asks again (deadline 20)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(4.5)  # t = 14.5
    assert isinstance(waiting.error, OriginTimeoutError) and again.error is None
    clock.advance(6.0)  # t = 20.5
    assert isinstance(again.error, OriginTimeoutError)


# -- the calls do not keep their handlers alive -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_ended_call_lets_go_of_its_handler(h: Harness) -> None:
    """After the last report, the call no longer refers to its handler: no reference cycle."""
    import gc
    import weakref

    origin = RawOrigin(lambda proto, request, n: proto.send(ok()))
    pool = h.pool(await h.listen(origin))
    ended: Deferred[None] = Deferred()

    class Handler:
        """Holds its call, as the proxy's and the cache's handlers do."""

        call: Any = None

        def response_started(self, *args: Any) -> None:
            pass

        def response_body(self, data: bytes) -> None:
            pass

        def response_finished(self) -> None:
            reactor.callLater(0, ended.callback, None)

        def response_failed(self, error: OriginError) -> None:
            raise AssertionError(error)

    handler = Handler()
    handler.call = call = pool.request(get(), handler)
    await ended
    assert call.done and call.handler is not handler
    call.handler.response_body(b"ignored")  # the ended handler hears nothing
    gone = weakref.ref(handler)
    gc.disable()
    try:
        del handler
        assert gone() is None  # freed by reference counting alone
    finally:
        gc.enable()


# -- requests written straight to the socket ----------------------------------------------------


class PausedOriginProtocol(RawOriginProtocol):
    """Does not read for 0.2 s after connecting, so a large request fills the socket buffers."""

    def connectionMade(self) -> None:
        super().connectionMade()
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        reactor.callLater(0.2, self.transport.resumeProducing)  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_a_request_the_socket_cannot_take_at_once_goes_out_whole_and_in_order(
    h: Harness,
) -> None:
    """A partial send leaves the rest to the transport; later requests follow it, in order."""
    from edgeauth.edge.origin import _OriginProtocol

    class Origin(RawOrigin):
        def buildProtocol(self, addr: Any) -> RawOriginProtocol:
            return PausedOriginProtocol(self)

    origin = Origin(lambda proto, request, n: proto.send(ok(b"%d" % len(request))))
    pool = h.pool(await h.listen(origin))
    small = await fetch(pool)
    assert small.status == 200
    (proto,) = pool._idle
    assert isinstance(proto, _OriginProtocol) and proto.direct is not None
    big = b"v" * (16 * 1024 * 1024)
    request = OriginRequest(
        method=b"GET", target=b"/big", headers=[(b"Host", b"o"), (b"X-Big", big)]
    )
    got = await fetch(pool, request)
    assert proto.direct is None  # from now on everything goes through the transport
    after = await fetch(pool, get(b"/after"))
    assert len(origin.connections) == 1
    assert origin.requests[1] == b"GET /big HTTP/1.1\r\nHost: o\r\nX-Big: " + big + b"\r\n\r\n"
    assert origin.requests[2] == b"GET /after HTTP/1.1\r\nHost: origin\r\n\r\n"
    assert (got.body, after.status) == (b"%d" % len(origin.requests[1]), 200)


def test_only_a_plain_tcp_transport_is_written_to_directly() -> None:
    """A TLS (or any other) transport hides the socket its bytes must go through."""
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from edgeauth.edge.origin import _OriginProtocol

    pool = OriginPool(MemoryReactorClock(), "http", LOCAL, 80)
    proto = _OriginProtocol(pool)
    proto.makeConnection(StringTransport())
    assert proto.direct is None
    proto._send(b"GET / HTTP/1.1\r\n\r\n")
    assert proto.transport.value() == b"GET / HTTP/1.1\r\n\r\n"  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_uploads_go_through_the_transport_after_the_head(h: Harness) -> None:
    """A body streamed by a producer turns direct writes off for the rest of the connection."""
    _, port = await h.app()
    pool = h.pool(port)
    got = await fetch(pool, get(b"/echo", b"POST", body=io.BytesIO(BODY), content_length=len(BODY)))
    assert json.loads(got.body)["ok"]
    (proto,) = pool._idle
    assert proto.direct is None
    assert json.loads((await fetch(pool, get(b"/echo"))).body)["length"] == 0


# -- one parser per connection ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_one_connection_parses_a_mix_of_responses_in_turn(h: Harness) -> None:
    """Lengths, chunks with trailers, 1xx, HEAD, 204 and 304 follow each other on one connection."""
    replies = [
        ok(b"one"),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"three"),
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",  # HEAD: no body follows
        ok(b"four"),
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 4\r\n\r\nfive",
        ok(b"six"),
    ]
    origin, pool = await h.replaying(replies)
    got = []
    for n in range(len(replies)):
        result = await fetch(pool, get(method=b"HEAD" if n == 3 else b"GET"))
        assert result.error is None
        got.append((result.status, result.body))
    assert got == [
        (200, b"one"),
        (200, b"two"),
        (200, b"three"),
        (200, b""),
        (200, b"four"),
        (204, b""),
        (304, b""),
        (200, b"five"),
        (200, b"six"),
    ]
    assert len(origin.connections) == 1


@pytest_twisted.ensureDeferred
async def test_a_tls_origin_is_never_written_to_beneath_its_tls_layer(h: Harness) -> None:
    """Over TLS the requests go through the TLS transport: the origin reads them decrypted."""
    from pathlib import Path

    import twisted.test
    from twisted.internet import ssl
    from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
    from twisted.protocols.tls import TLSMemoryBIOFactory

    pem = (Path(twisted.test.__file__).parent / "server.pem").read_bytes()
    certificate = ssl.PrivateCertificate.loadPEM(pem)
    origin = RawOrigin(lambda proto, request, n: proto.send(ok(b"secret %d" % n)))
    port = await serverFromString(reactor, f"tcp:0:interface={LOCAL}").listen(
        TLSMemoryBIOFactory(certificate.options(), False, origin)
    )
    h.ports.append(port)
    pool = h.pool(port.getHost().port)
    # The test certificate is self-signed: connect without verifying it (the pool's own
    # endpoint would verify the origin's name against the system's trust store).
    pool._endpoint = wrapClientTLS(
        ssl.CertificateOptions(), TCP4ClientEndpoint(reactor, LOCAL, port.getHost().port)
    )
    assert [(await fetch(pool)).body for _ in range(3)] == [b"secret 1", b"secret 2", b"secret 3"]
    (proto,) = pool._idle
    assert proto.direct is None
    assert len(origin.connections) == 1
