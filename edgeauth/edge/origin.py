"""The edge's origin client: pooled HTTP/1.1 keep-alive connections parsed with httptools.

ARCHITECTURE.md decision 5. :class:`OriginPool` keeps persistent connections to one origin and runs
one exchange at a time on each through a small client protocol that writes the request itself and
parses the response with :class:`httptools.HttpResponseParser` (Agent costs about 2.5x the CPU).

What Agent's ``HTTP11ClientProtocol`` and ``HTTPConnectionPool`` gave for free is handled here:

- a connection closed by the origin while idle leaves the pool at once; a request whose pooled
  connection closes before any response byte is retried once on a fresh connection when that is
  safe (idempotent method, replayable body), else it fails with :class:`BadGatewayError`;
- connect, idle and response timeouts (:class:`OriginUnreachableError` when a connection cannot
  be made, :class:`OriginTimeoutError` when the origin stalls); the response timeouts of all
  calls are checked by one timer per pool, not a ``DelayedCall`` per request;
- at most ``max_connections`` connections; later requests wait in a FIFO queue;
- HEAD responses carry no body whatever their ``Content-Length``; 1xx interim responses are
  skipped; a ``101 Switching Protocols`` fails the exchange (upgrades are not proxied);
- ``Content-Length``, chunked and read-until-close bodies, delivered as they arrive;
- request bodies streamed to the origin, ``Content-Length`` or chunked: from a file-like object
  (a spooled body, replayable), paced by the origin socket, or from a :class:`BodyStream` fed
  while the client is still sending, whose source is paused when the origin does not keep up;
- a connection goes back to the pool only after the whole response was read and the origin
  allows keep-alive; it keeps its parser for the next response.

Per request, the cost is kept to what Twisted itself needs: on a plain TCP connection the request
is written straight to the socket while the transport's buffer is known to be empty (no
``epoll_ctl`` pair and no extra reactor turn per request), and an ended call drops its handler so
that the client request, its handler and the call are freed by reference counting rather than
by the garbage collector.

An :class:`OriginCall` is also an ``IPushProducer``: the proxy registers it on the client request,
so a slow client pauses reading from the origin.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import IO, ClassVar, Protocol

import attrs
from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.internet import protocol, tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IPullProducer,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "IDEMPOTENT_METHODS",
    "BadGatewayError",
    "BodyStream",
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
_MAX_HEAD = 65536  # bytes of status lines and headers per response, interim ones included
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
        body: None for no body; a file-like object read from its current position (replayable
            if seekable); or a :class:`BodyStream` still being written (never replayable).
        content_length: sent as ``Content-Length`` when not None (``0`` with no body is
            allowed); a body without a length is sent chunked.
    """

    method: bytes
    target: bytes
    headers: Sequence[tuple[bytes, bytes]]
    body: IO[bytes] | BodyStream | None = None
    content_length: int | None = None

    @property
    def retryable(self) -> bool:
        """Whether sending this request twice is safe: idempotent, body replayable."""
        body = self.body
        return self.method in IDEMPOTENT_METHODS and (
            body is None or (not isinstance(body, BodyStream) and body.seekable())
        )


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


class _EndedHandler:
    """The handler of an ended call: hears nothing more, holds nothing."""

    def response_started(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """Ignored."""

    def response_body(self, data: bytes) -> None:
        """Ignored."""

    def response_finished(self) -> None:
        """Ignored."""

    def response_failed(self, error: OriginError) -> None:
        """Ignored."""


_ENDED = _EndedHandler()


@implementer(IPushProducer)
class OriginCall:
    """One request to the origin, from the queue to the end of its response.

    It is an ``IPushProducer`` for the client side: pausing it stops reading from the origin,
    stopping it cancels the call.

    Once the call has ended, ``handler`` is a handler that ignores everything: a handler
    usually keeps its call, and the call must not keep the handler (with its client request)
    in a reference cycle that only the garbage collector could free.
    """

    __slots__ = (
        "request",
        "handler",
        "_pool",
        "_proto",
        "_state",
        "_paused",
        "_retried",
        "_body_start",
        "_last_activity",
    )

    def __init__(self, pool: OriginPool, request: OriginRequest, handler: ResponseHandler) -> None:
        self.request = request
        self.handler: ResponseHandler = handler
        self._pool = pool
        self._proto: _OriginProtocol | None = None
        self._state = _QUEUED
        self._paused = False
        self._retried = False
        body = request.body
        self._body_start = (
            body.tell() if body is not None and not isinstance(body, BodyStream) else 0
        )
        self._last_activity = pool.clock.seconds()
        pool._watch(self)

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

    def _end(self) -> ResponseHandler:
        """Mark the call ended; return the handler to give the last report to."""
        self._state = _DONE
        self._pool._watched.pop(self, None)
        handler, self.handler = self.handler, _ENDED
        body = self.request.body
        if isinstance(body, BodyStream):
            body._detach()  # let the client finish sending, even if no connection ever took it
        return handler

    def _time_out(self) -> None:
        if self._state == _DONE:
            return
        timeout = self._pool.response_timeout
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.abandon()
        self._fail(OriginTimeoutError(f"no progress from the origin for {timeout:g}s"))

    def _fail(self, error: OriginError) -> None:
        if self._state == _DONE:
            return
        handler = self._end()
        try:
            handler.response_failed(error)
        except Exception:
            _log.failure("response handler failed")

    def _finish(self) -> None:
        handler = self._end()
        try:
            handler.response_finished()
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
        self.head_size = 0
        self.upload: _BodyProducer | BodyStream | None = None
        self.lost = False
        self.direct: socket.socket | None = None

    def connectionMade(self) -> None:  # noqa: D102
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        # Only a plain TCP transport: a TLS one hands out the TCP socket beneath it too.
        if type(transport) is tcp.Client:
            self.direct = transport.getHandle()

    def _send(self, data: bytes) -> None:
        """Write ``data`` to the origin, straight to the socket while that is safe.

        ``transport.write`` only buffers and asks the reactor to write on its next turn, which
        costs two ``epoll_ctl`` and a dispatch per request. As long as every byte written on
        this connection went out through :meth:`_send` in full, the transport's own buffer is
        empty and sending on the socket (``getHandle()``, non-blocking) keeps the order. Once
        anything goes through the transport (a partial send, a streamed or large body), every
        later write does too.
        """
        sock = self.direct
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0  # full (EAGAIN) or broken: the transport writes it, or sees the error
            if sent == len(data):
                return
            self.direct = None
            data = data[sent:]
        assert self.transport is not None
        self.transport.write(data)

    # -- requests ---------------------------------------------------------------------------

    def start(self, call: OriginCall) -> None:
        """Send ``call``'s request on this (idle) connection."""
        self.call = call
        call._proto = self
        call._state = _ACTIVE
        if self.parser is None:  # else the one that parsed the previous response, ready again
            self.parser = HttpResponseParser(self)
        self.state = _HEAD
        self.got_bytes = self.garbage = self.until_close = False
        self.failure = None
        self.head_size = 0
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
        if isinstance(body, BodyStream):
            self._send(b"".join(parts))
            self.direct = None  # the body goes through the transport, paced by it
            self.upload = body
            body._attach(self, chunked=length is None)
            return
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
        self._send(b"".join(parts))
        if body is not None:
            self.direct = None  # the body goes through the transport, paced by it
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
            if isinstance(upload, BodyStream):
                upload._detach()

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
            cause = exc.__context__
            if cause is not None and not isinstance(cause, _StopParsingError):
                _log.failure(
                    "relaying an origin response failed",
                    Failure(cause, type(cause), cause.__traceback__),
                )
                self.failure = "the edge failed to relay the response"
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
        self._count_head(len(status))

    def on_header(self, name: bytes, value: bytes) -> None:  # noqa: D102
        self.head_size += len(name) + len(value) + 4  # _count_head, inlined: once per header
        if self.head_size > _MAX_HEAD:
            self._count_head(0)
        if self.state == _HEAD:  # trailers (after the body) are dropped
            self.headers.append((name.lower(), value))

    def _count_head(self, size: int) -> None:
        self.head_size += size + 4
        if self.head_size > _MAX_HEAD:
            self.failure = f"origin response head (or trailers) over {_MAX_HEAD} bytes"
            raise _StopParsingError

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
        if not reusable or self.head_request:
            # A HEAD response leaves the parser waiting for a body that never comes; a
            # connection not reused must not keep its parser (the two refer to each other).
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
        self.parser = self.direct = None
        call, self.call = self.call, None
        self._stop_upload()
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


@implementer(IPushProducer)
class BodyStream:
    """A request body still arriving from the client, sent to the origin as it comes.

    The proxy calls :meth:`write` for each piece and :meth:`finish` at the end. Until an origin
    connection takes the request, up to ``high_water`` bytes are held; past that, and whenever
    the origin socket's buffer is full (this object is the push producer of that socket), the
    source is paused: a slow origin stops the edge reading the client. A request with a stream
    body is never retried. Once the call ends (answered, failed or cancelled) the source is
    resumed and later pieces are discarded, so the client can finish sending.

    Args:
        pause_source: stop reading the client.
        resume_source: read the client again.
        high_water: bytes held while no origin connection takes them.
    """

    def __init__(
        self,
        pause_source: Callable[[], None],
        resume_source: Callable[[], None],
        *,
        high_water: int = _CHUNK,
    ) -> None:
        self._pause_source = pause_source
        self._resume_source = resume_source
        self.high_water = high_water
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._proto: _OriginProtocol | None = None
        self._chunked = False
        self._source_paused = False
        self.finished = False
        """Whether :meth:`finish` was called."""
        self.closed = False
        """Whether the origin stopped taking the body (sent, or the call ended)."""
        self.stopped = False

    def write(self, data: bytes) -> None:
        """Send (or hold) the next piece of the body."""
        if self.closed or not data:
            return
        proto = self._proto
        if proto is None:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > self.high_water:
                self.pauseProducing()
            return
        self._send(proto, data)

    def finish(self) -> None:
        """The body is complete."""
        self.finished = True
        if self._proto is not None and not self.closed:
            self._end(self._proto)

    def _send(self, proto: _OriginProtocol, data: bytes) -> None:
        assert proto.transport is not None
        if self._chunked:
            proto.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            proto.transport.write(data)
        if proto.call is not None:
            proto.call._touch()

    def _attach(self, proto: _OriginProtocol, *, chunked: bool) -> None:
        if self.closed:
            return
        self._proto = proto
        self._chunked = chunked
        assert proto.transport is not None
        if self._source_paused:  # paused for the queue; the socket decides from now on
            self.resumeProducing()
        proto.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        pending, self._pending, self._pending_size = self._pending, [], 0
        for data in pending:
            self._send(proto, data)
        if self.finished:
            self._end(proto)

    def _end(self, proto: _OriginProtocol) -> None:
        if self._chunked:
            assert proto.transport is not None
            proto.transport.write(b"0\r\n\r\n")
        proto._stop_upload()

    def _detach(self) -> None:
        self._proto = None
        self.closed = True
        self._pending = []
        if self._source_paused:
            self._source_paused = False
            self._resume_source()

    def pauseProducing(self) -> None:
        """Stop reading the client (the origin is not taking more)."""
        if not self._source_paused and not self.closed:
            self._source_paused = True
            self._pause_source()

    def resumeProducing(self) -> None:
        """Read the client again."""
        if self._source_paused:
            self._source_paused = False
            if self._proto is not None and self._proto.call is not None:
                self._proto.call._touch()
            self._resume_source()

    def stopProducing(self) -> None:
        """The origin connection is gone."""
        self._detach()


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
        max_idle: the most idle connections kept for reuse; None (the default) keeps up to
            ``max_connections``: a smaller bound makes a pool under steady concurrent load close
            connections after each burst of responses and open new ones for the next burst.
        connect_timeout: seconds allowed to connect (then :class:`OriginUnreachableError`).
        idle_timeout: seconds an idle connection is kept before it is closed.
        response_timeout: seconds without progress (queueing, waiting for the response head,
            between body reads while the client keeps up) before :class:`OriginTimeoutError`;
            one timer per pool checks every call, so a call times out up to
            ``min(response_timeout / 10, 0.5)`` seconds after its deadline.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        scheme: str,
        host: str,
        port: int,
        *,
        max_connections: int = 64,
        max_idle: int | None = None,
        connect_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        response_timeout: float = 30.0,
    ) -> None:
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"unsupported origin scheme {scheme!r}")
        if max_idle is None:
            max_idle = max_connections
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
        # Calls not yet ended, checked for response_timeout by one shared timer (a DelayedCall
        # per call, scheduled and cancelled for every request, cost more than the rest of the
        # call's bookkeeping): it fires at the nearest deadline, at most once per
        # _timeout_slack seconds, so a call times out up to that much late.
        self._watched: dict[OriginCall, None] = {}
        self._timeout_timer: IDelayedCall | None = None
        self._timeout_slack = min(response_timeout / 10, 0.5)
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
        # Calls still connecting keep their response timeout (their connection is aborted).
        if not self._watched and self._timeout_timer is not None:
            if self._timeout_timer.active():
                self._timeout_timer.cancel()
            self._timeout_timer = None
        if self._open == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        return d

    # -- internals ---------------------------------------------------------------------------

    def _watch(self, call: OriginCall) -> None:
        self._watched[call] = None
        if self._timeout_timer is None:
            # Every timer scheduled since was due within response_timeout of being set, so the
            # one already pending fires before this call's deadline.
            self._timeout_timer = self.clock.callLater(self.response_timeout, self._check_timeouts)

    def _check_timeouts(self) -> None:
        self._timeout_timer = None
        now = self.clock.seconds()
        timeout = self.response_timeout
        nearest = timeout
        expired = []
        for call in self._watched:
            remaining = call._last_activity + timeout - now
            if remaining <= 0:
                expired.append(call)
            elif remaining < nearest:
                nearest = remaining
        for call in expired:
            call._time_out()  # reports to its handler, which may start new calls
        if self._timeout_timer is not None:  # scheduled by a new call, maybe too late
            self._timeout_timer.cancel()
            self._timeout_timer = None
        if self._watched:
            self._timeout_timer = self.clock.callLater(
                max(nearest, self._timeout_slack), self._check_timeouts
            )

    def _dispatch(self, call: OriginCall, *, front: bool = False) -> None:
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
        elif front:
            call._state = _QUEUED
            self._waiting.appendleft(call)
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
        if failure.check(ConnectTimeoutError):
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
                self._dispatch(call, front=True)

    def _check_closed(self) -> None:
        if self._closed and self._open == 0:
            waiters, self._close_waiters = self._close_waiters, []
            for d in waiters:
                d.callback(None)
