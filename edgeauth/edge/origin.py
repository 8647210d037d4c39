"""The edge's origin client: pooled HTTP/1.1 keep-alive connections parsed with httptools.

ARCHITECTURE.md decision 5. :class:`OriginPool` keeps persistent connections to one origin and runs
one exchange at a time on each through a small client protocol that writes the request itself and
parses the response with :class:`httptools.HttpResponseParser` (Agent costs about 2.5x the CPU).

What Agent's ``HTTP11ClientProtocol`` and ``HTTPConnectionPool`` gave for free is handled here:

- a connection closed by the origin while idle leaves the pool at once; a request whose pooled
  connection closes before any response byte is retried once on a fresh connection when that is
  safe (idempotent method, replayable body), else it fails with :class:`BadGatewayError`;
- connect, idle and response timeouts (:class:`OriginUnreachableError` when a connection cannot
  be made, :class:`OriginTimeoutError` when the origin stalls);
- at most ``max_connections`` connections; later requests wait in a FIFO queue;
- HEAD responses carry no body whatever their ``Content-Length``; 1xx interim responses are
  skipped; a ``101 Switching Protocols`` fails the exchange (upgrades are not proxied);
- ``Content-Length``, chunked and read-until-close bodies, delivered as they arrive;
- request bodies streamed from a file-like object, paced by the origin socket;
- a connection goes back to the pool only after the whole response was read and the origin
  allows keep-alive.

An :class:`OriginCall` is also an ``IPushProducer``: the proxy registers it on the client request,
so a slow client pauses reading from the origin.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Sequence
from typing import IO, ClassVar, Protocol

import attrs
from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone, TimeoutError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IPullProducer,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "IDEMPOTENT_METHODS",
    "BadGatewayError",
    "OriginCall",
    "OriginError",
    "OriginPool",
    "OriginRequest",
    "OriginTimeoutError",
    "OriginUnreachableError",
    "ResponseHandler",
]

_log = Logger()

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
"""Methods that may be sent twice (RFC 9110 section 9.2.2)."""

_CHUNK = 65536
_DEFAULT_PORTS = {"http": 80, "https": 443}


class OriginError(Exception):
    """The origin did not give a complete response; ``kind`` and ``status`` say how to answer."""

    kind: ClassVar[str] = "bad_gateway"
    status: ClassVar[int] = 502

    @property
    def detail(self) -> str:
        """A human-readable reason."""
        return str(self.args[0]) if self.args else self.kind


class OriginUnreachableError(OriginError):
    """No connection to the origin could be made (refused, failed or timed out)."""

    kind = "origin_unreachable"


class OriginTimeoutError(OriginError):
    """The origin made no progress for ``response_timeout`` seconds."""

    kind = "origin_timeout"
    status = 504


class BadGatewayError(OriginError):
    """The origin closed the connection early or sent something that is not HTTP/1.1."""


@attrs.frozen(kw_only=True)
class OriginRequest:
    """One request to send to the origin.

    Attributes:
        method: the request method.
        target: the request target (path and query).
        headers: the headers to send, in order, repeats kept; no framing headers
            (``Content-Length``/``Transfer-Encoding``), those follow from the fields below.
        body: the body to stream, read from its current position; None for no body.
        content_length: sent as ``Content-Length`` when not None (``0`` with no body is
            allowed); a body without a length is sent chunked.
    """

    method: bytes
    target: bytes
    headers: Sequence[tuple[bytes, bytes]]
    body: IO[bytes] | None = None
    content_length: int | None = None

    @property
    def retryable(self) -> bool:
        """Whether sending this request twice is safe: idempotent, body replayable."""
        return self.method in IDEMPOTENT_METHODS and (self.body is None or self.body.seekable())


class ResponseHandler(Protocol):
    """What an :class:`OriginCall` reports to; exactly one of finished/failed ends it."""

    def response_started(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """The final response head arrived (names are lower-cased, hop-by-hop ones included)."""

    def response_body(self, data: bytes) -> None:
        """A piece of the (de-chunked) response body arrived."""

    def response_finished(self) -> None:
        """The response is complete."""

    def response_failed(self, error: OriginError) -> None:
        """The exchange failed, before or after ``response_started``."""


_QUEUED, _CONNECTING, _ACTIVE, _DONE = range(4)


@implementer(IPushProducer)
class OriginCall:
    """One request to the origin, from the queue to the end of its response.

    It is an ``IPushProducer`` for the client side: pausing it stops reading from the origin,
    stopping it cancels the call.
    """

    def __init__(self, pool: OriginPool, request: OriginRequest, handler: ResponseHandler) -> None:
        self.request = request
        self.handler = handler
        self._pool = pool
        self._proto: _OriginProtocol | None = None
        self._state = _QUEUED
        self._paused = False
        self._retried = False
        self._body_start = request.body.tell() if request.body is not None else 0
        self._last_activity = pool.clock.seconds()
        self._timer: IDelayedCall | None = pool.clock.callLater(
            pool.response_timeout, self._check_timeout
        )

    @property
    def done(self) -> bool:
        """Whether the call has ended (finished, failed or cancelled)."""
        return self._state == _DONE

    def pauseProducing(self) -> None:
        """Stop reading from the origin until :meth:`resumeProducing`."""
        if not self._paused:
            self._paused = True
            if self._proto is not None:
                self._proto.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        """Read from the origin again."""
        if self._paused:
            self._paused = False
            self._last_activity = self._pool.clock.seconds()
            if self._proto is not None:
                self._proto.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        """Cancel the call (the consumer went away)."""
        self.cancel()

    def cancel(self) -> None:
        """Abandon the call: its connection, if any, is aborted, never pooled; no more reports."""
        if self._state == _DONE:
            return
        self._end()
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.abandon()

    def _touch(self) -> None:
        self._last_activity = self._pool.clock.seconds()

    def _end(self) -> None:
        self._state = _DONE
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _check_timeout(self) -> None:
        self._timer = None
        if self._state == _DONE:
            return
        timeout = self._pool.response_timeout
        remaining = self._last_activity + timeout - self._pool.clock.seconds()
        if remaining > 0:
            self._timer = self._pool.clock.callLater(remaining, self._check_timeout)
            return
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.abandon()
        self._fail(OriginTimeoutError(f"no progress from the origin for {timeout:g}s"))

    def _fail(self, error: OriginError) -> None:
        if self._state == _DONE:
            return
        self._end()
        try:
            self.handler.response_failed(error)
        except Exception:
            _log.failure("response handler failed")

    def _finish(self) -> None:
        self._end()
        try:
            self.handler.response_finished()
        except Exception:
            _log.failure("response handler failed")


class _StopParsingError(Exception):
    """Raised inside a parser callback to stop parsing."""


_IDLE, _HEAD, _BODY, _COMPLETE = range(4)


class _OriginProtocol(protocol.Protocol):
    """One origin connection: writes requests, parses responses with httptools."""

    def __init__(self, pool: OriginPool) -> None:
        self.pool = pool
        self.call: OriginCall | None = None
        self.parser: HttpResponseParser | None = None
        self.state = _IDLE
        self.reused = False
        self.got_bytes = False
        self.idle_since = 0.0
        self.in_idle = False
        self.head_request = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.keep_alive = False
        self.until_close = False
        self.garbage = False
        self.failure: str | None = None
        self.upload: _BodyProducer | None = None
        self.lost = False

    # -- requests ---------------------------------------------------------------------------

    def start(self, call: OriginCall) -> None:
        """Send ``call``'s request on this (idle) connection."""
        self.call = call
        call._proto = self
        call._state = _ACTIVE
        self.parser = HttpResponseParser(self)
        self.state = _HEAD
        self.got_bytes = self.garbage = self.until_close = False
        self.failure = None
        self.headers = []
        self.reason = b""
        request = call.request
        self.head_request = request.method == b"HEAD"
        transport = self.transport
        assert transport is not None
        if call._paused:
            transport.pauseProducing()  # type: ignore[attr-defined]
        parts = [request.method, b" ", request.target, b" HTTP/1.1\r\n"]
        for name, value in request.headers:
            parts += (name, b": ", value, b"\r\n")
        body = request.body
        length = request.content_length
        if length is not None:
            parts.append(b"Content-Length: %d\r\n\r\n" % length)
        elif body is not None:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            parts.append(b"\r\n")
        if body is not None and length is not None and length <= _CHUNK:
            try:
                body.seek(call._body_start)
                data = body.read(length)
            except (OSError, ValueError) as exc:
                self.fail(BadGatewayError(f"request body unreadable: {exc}"))
                return
            if len(data) != length:
                self.fail(BadGatewayError("request body shorter than its Content-Length"))
                return
            parts.append(data)
            body = None
        transport.write(b"".join(parts))
        if body is not None:
            self.upload = _BodyProducer(self, body, call._body_start, length)
            transport.registerProducer(self.upload, False)  # type: ignore[attr-defined]

    def abandon(self) -> None:
        """Drop the current exchange: abort the connection, report nothing."""
        self.call = None
        self._stop_upload()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def fail(self, error: OriginError) -> None:
        """End the current exchange with ``error`` and abort the connection."""
        call = self.call
        self.abandon()
        if call is not None:
            call._proto = None
            call._fail(error)

    def close_idle(self) -> None:
        """Close this idle connection politely."""
        self.pool._forget_idle(self)
        if self.transport is not None:
            self.transport.loseConnection()

    def _stop_upload(self) -> None:
        upload, self.upload = self.upload, None
        if upload is not None:
            upload.stopped = True
            if self.transport is not None and not self.lost:
                self.transport.unregisterProducer()  # type: ignore[attr-defined]

    # -- bytes from the origin ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: D102
        call = self.call
        if call is None:
            # Nothing was asked: an origin talking out of turn cannot be trusted with the next one.
            self.pool._forget_idle(self)
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self.got_bytes = True
        call._last_activity = self.pool.clock.seconds()
        assert self.parser is not None
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            if self.call is call and self.state != _COMPLETE:
                self.fail(BadGatewayError("origin switched protocols; upgrades are not proxied"))
                return
            self.garbage = True
        except HttpParserError as exc:
            if self.call is not call:
                return
            if self.state != _COMPLETE:
                self.fail(
                    BadGatewayError(self.failure or f"invalid response from the origin: {exc}")
                )
                return
            self.garbage = True
        if self.state == _COMPLETE and self.call is call:
            self._complete(call)

    def on_message_begin(self) -> None:  # noqa: D102
        if self.state == _COMPLETE:
            self.garbage = True
            raise _StopParsingError
        self.headers = []
        self.reason = b""

    def on_status(self, status: bytes) -> None:  # noqa: D102
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:  # noqa: D102
        if self.state == _HEAD:  # trailers (after the body) are dropped
            self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:  # noqa: D102
        if self.parser is None or self.call is None:
            raise _StopParsingError
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                self.failure = "origin switched protocols; upgrades are not proxied"
                raise _StopParsingError
            return  # 1xx interim response: skipped
        if self.head_request:
            self.state = _COMPLETE
            self.keep_alive = self._head_keep_alive()
        else:
            self.state = _BODY
            self.keep_alive = self.parser.should_keep_alive()
            if not self.keep_alive and status not in (204, 304):
                names = {name for name, _ in self.headers}
                self.until_close = (
                    b"content-length" not in names and b"transfer-encoding" not in names
                )
        self.call.handler.response_started(status, self.reason, self.headers)

    def on_body(self, body: bytes) -> None:  # noqa: D102
        if self.state != _BODY or self.call is None:
            self.garbage = True
            raise _StopParsingError
        self.call.handler.response_body(body)

    def on_message_complete(self) -> None:  # noqa: D102
        if self.state == _BODY:
            self.state = _COMPLETE

    def _head_keep_alive(self) -> bool:
        assert self.parser is not None
        tokens: set[bytes] = set()
        for name, value in self.headers:
            if name == b"connection":
                tokens.update(t.strip().lower() for t in value.split(b","))
        if self.parser.get_http_version() == "1.1":
            return b"close" not in tokens
        return b"keep-alive" in tokens

    def _complete(self, call: OriginCall) -> None:
        reusable = self.keep_alive and not self.garbage and self.upload is None
        self._stop_upload()
        if self.garbage:
            self.transport.abortConnection()  # type: ignore[union-attr]
        self.call = None
        self.parser = None
        call._proto = None
        self.state = _IDLE
        self.reused = True
        if call._paused:
            self.transport.resumeProducing()  # type: ignore[union-attr]
        self.pool._release(self, reusable)
        call._finish()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: D102
        self.lost = True
        call, self.call = self.call, None
        self.upload = None
        if call is None:
            self.pool._lost(self, None)
            return
        call._proto = None
        if not self.got_bytes and self.reused and not call._retried and call.request.retryable:
            # The origin closed a pooled connection as we reused it: try once more, afresh.
            call._retried = True
            self.pool._lost(self, call)
            return
        self.pool._lost(self, None)
        if self.state == _BODY and self.until_close and reason.check(ConnectionDone):
            call._finish()
        elif not self.got_bytes:
            call._fail(BadGatewayError("origin closed the connection without responding"))
        else:
            call._fail(BadGatewayError("origin closed the connection before the response ended"))


@implementer(IPullProducer)
class _BodyProducer:
    """Streams a request body to the origin, one chunk each time its socket drains."""

    def __init__(self, proto: _OriginProtocol, body: IO[bytes], start: int, length: int | None):
        self.proto = proto
        self.body = body
        self.remaining = length
        self.stopped = False
        self.started = False
        self.start = start

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        proto = self.proto
        transport = proto.transport
        assert transport is not None
        try:
            if not self.started:
                self.started = True
                self.body.seek(self.start)
            want = _CHUNK if self.remaining is None else min(_CHUNK, self.remaining)
            data = self.body.read(want)
        except (OSError, ValueError) as exc:
            proto.fail(BadGatewayError(f"request body unreadable: {exc}"))
            return
        if proto.call is not None:
            proto.call._touch()
        if self.remaining is None:
            if data:
                transport.write(b"%x\r\n%s\r\n" % (len(data), data))
                return
            transport.write(b"0\r\n\r\n")
        else:
            if not data:
                proto.fail(BadGatewayError("request body shorter than its Content-Length"))
                return
            self.remaining -= len(data)
            transport.write(data)
            if self.remaining:
                return
        proto._stop_upload()

    def stopProducing(self) -> None:
        self.stopped = True


class _OriginFactory(protocol.Factory):
    noisy = False

    def __init__(self, pool: OriginPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: IAddress | None) -> _OriginProtocol:
        return _OriginProtocol(self.pool)


def _authority(scheme: str, host: str, port: int) -> bytes:
    name = f"[{host}]" if ":" in host else host
    if port == _DEFAULT_PORTS[scheme]:
        return name.encode("idna")
    return f"{name}:{port}".encode("idna")


class OriginPool:
    """Persistent HTTP/1.1 connections to one origin, with timeouts and a bounded size.

    Args:
        reactor: provides ``IReactorTime`` and ``IReactorTCP`` (and ``IReactorSSL`` for https).
        scheme: ``"http"`` or ``"https"``.
        host: the origin's host name or address.
        port: the origin's port.
        max_connections: the most connections open at once; later requests wait in FIFO order.
        max_idle: the most idle connections kept for reuse.
        connect_timeout: seconds allowed to connect (then :class:`OriginUnreachableError`).
        idle_timeout: seconds an idle connection is kept before it is closed.
        response_timeout: seconds without progress (queueing, waiting for the response head,
            between body reads while the client keeps up) before :class:`OriginTimeoutError`.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        scheme: str,
        host: str,
        port: int,
        *,
        max_connections: int = 64,
        max_idle: int = 32,
        connect_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        response_timeout: float = 30.0,
    ) -> None:
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"unsupported origin scheme {scheme!r}")
        if max_connections < 1 or max_idle < 0:
            raise ValueError("max_connections must be >= 1 and max_idle >= 0")
        self.clock = reactor
        self.scheme = scheme
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.response_timeout = response_timeout
        self.authority = _authority(scheme, host, port)
        """``host[:port]`` as a ``Host`` header names the origin."""
        self._endpoint = self._make_endpoint(reactor)
        self._factory = _OriginFactory(self)
        self._idle: list[_OriginProtocol] = []
        self._waiting: deque[OriginCall] = deque()
        self._connected: set[_OriginProtocol] = set()
        self._open = 0
        self._sweep: IDelayedCall | None = None
        self._closed = False
        self._close_waiters: list[Deferred[None]] = []

    def _make_endpoint(self, reactor: IReactorTime) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint
        try:
            version = ipaddress.ip_address(self.host).version
        except ValueError:
            endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=self.connect_timeout)
        else:
            tcp = TCP4ClientEndpoint if version == 4 else TCP6ClientEndpoint
            endpoint = tcp(reactor, self.host, self.port, timeout=self.connect_timeout)
        if self.scheme == "https":
            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return endpoint

    @property
    def open_connections(self) -> int:
        """Connections open or being opened."""
        return self._open

    @property
    def idle_connections(self) -> int:
        """Connections waiting in the pool for the next request."""
        return len(self._idle)

    @property
    def queued(self) -> int:
        """Requests waiting for a connection."""
        return sum(1 for call in self._waiting if not call.done)

    def request(self, request: OriginRequest, handler: ResponseHandler) -> OriginCall:
        """Send ``request`` on a pooled connection; ``handler`` hears about the response.

        Nothing is reported synchronously unless the pool is closed.

        Returns:
            The call, to pause, resume or cancel it.
        """
        call = OriginCall(self, request, handler)
        if self._closed:
            call._fail(OriginUnreachableError("the origin pool is closed"))
        else:
            self._dispatch(call)
        return call

    def close(self) -> Deferred[None]:
        """Fail queued calls, abort running ones and close every connection.

        Returns:
            A Deferred that fires once every connection is closed.
        """
        self._closed = True
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        while self._waiting:
            self._waiting.popleft()._fail(OriginUnreachableError("the origin pool is closed"))
        for proto in list(self._connected):
            if proto.call is not None:
                proto.fail(OriginUnreachableError("the origin pool is closed"))
            elif proto.transport is not None:
                proto.transport.abortConnection()  # type: ignore[attr-defined]
        for proto in self._idle:
            proto.in_idle = False
        self._idle.clear()
        if self._open == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        return d

    # -- internals ---------------------------------------------------------------------------

    def _dispatch(self, call: OriginCall) -> None:
        idle = self._idle
        if idle:
            now = self.clock.seconds()
            while idle:
                proto = idle.pop()
                proto.in_idle = False
                if now - proto.idle_since < self.idle_timeout and not proto.lost:
                    proto.start(call)
                    return
                proto.close_idle()
        if self._open < self.max_connections:
            self._connect(call)
        else:
            call._state = _QUEUED
            self._waiting.append(call)

    def _connect(self, call: OriginCall) -> None:
        self._open += 1
        call._state = _CONNECTING
        d = self._endpoint.connect(self._factory)
        d.addCallbacks(
            self._on_connected, self._on_connect_failed, callbackArgs=(call,), errbackArgs=(call,)
        )

    def _on_connected(self, proto: _OriginProtocol, call: OriginCall) -> None:
        self._connected.add(proto)
        if self._closed:
            proto.transport.abortConnection()  # type: ignore[union-attr]
        elif call.done:
            self._release(proto, True)
        else:
            proto.start(call)

    def _on_connect_failed(self, failure: Failure, call: OriginCall) -> None:
        self._open -= 1
        where = f"{self.host}:{self.port}"
        if failure.check(TimeoutError):
            detail = f"connecting to {where} timed out after {self.connect_timeout:g}s"
        else:
            detail = f"cannot connect to {where}: {failure.getErrorMessage()}"
        call._fail(OriginUnreachableError(detail))
        self._check_closed()
        self._drain()

    def _release(self, proto: _OriginProtocol, reusable: bool) -> None:
        if reusable and not self._closed and not proto.lost:
            waiting = self._waiting
            while waiting:
                call = waiting.popleft()
                if not call.done:
                    proto.start(call)
                    return
            if len(self._idle) < self.max_idle:
                proto.idle_since = self.clock.seconds()
                proto.in_idle = True
                self._idle.append(proto)
                if self._sweep is None:
                    self._sweep = self.clock.callLater(self.idle_timeout, self._sweep_idle)
                return
        if proto.transport is not None:
            proto.transport.loseConnection()

    def _forget_idle(self, proto: _OriginProtocol) -> None:
        if proto.in_idle:
            proto.in_idle = False
            self._idle.remove(proto)

    def _sweep_idle(self) -> None:
        self._sweep = None
        now = self.clock.seconds()
        idle = self._idle
        # The list is ordered by idle_since: connections are appended and reused from the end.
        while idle and now - idle[0].idle_since >= self.idle_timeout - 0.001:
            idle[0].close_idle()
        if idle:
            delay = max(idle[0].idle_since + self.idle_timeout - now, 0.01)
            self._sweep = self.clock.callLater(delay, self._sweep_idle)

    def _lost(self, proto: _OriginProtocol, retry: OriginCall | None) -> None:
        self._open -= 1
        self._connected.discard(proto)
        self._forget_idle(proto)
        if retry is not None:
            self._retry(retry)
        self._check_closed()
        self._drain()

    def _retry(self, call: OriginCall) -> None:
        if self._closed:
            call._fail(OriginUnreachableError("the origin pool is closed"))
        elif self._open < self.max_connections:
            self._connect(call)  # a fresh connection: other pooled ones may be stale too
        else:
            call._state = _QUEUED
            self._waiting.appendleft(call)

    def _drain(self) -> None:
        waiting = self._waiting
        while waiting and (self._idle or self._open < self.max_connections):
            call = waiting.popleft()
            if not call.done:
                self._dispatch(call)

    def _check_closed(self) -> None:
        if self._closed and self._open == 0:
            waiters, self._close_waiters = self._close_waiters, []
            for d in waiters:
                d.callback(None)
