"""One exchange with the origin: the request, its call and the connection protocol.

ARCHITECTURE.md decision 5. Each origin connection runs one exchange at a time through a small
client protocol that writes the request itself and parses the response with
:class:`httptools.HttpResponseParser` (Agent costs about 2.5x the CPU); the connections are
pooled by :class:`edgeauth.edge.origin_pool.OriginPool`, request bodies are sent by
:mod:`edgeauth.edge.origin_body`. What Agent's ``HTTP11ClientProtocol`` gave for free is
handled here:

- HEAD responses carry no body whatever their ``Content-Length``; 1xx interim responses are
  skipped; a ``101 Switching Protocols`` fails the exchange (upgrades are not proxied);
- ``Content-Length``, chunked and read-until-close bodies, delivered as they arrive;
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

import socket
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Protocol

import attrs
from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.internet import protocol, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeauth.edge.origin_body import _CHUNK, BodyStream, _BodyProducer
from edgeauth.edge.origin_errors import BadGatewayError, OriginError, OriginTimeoutError

if TYPE_CHECKING:
    from edgeauth.edge.origin_pool import OriginPool

__all__ = [
    "CallRelay",
    "IDEMPOTENT_METHODS",
    "OriginCall",
    "OriginRequest",
    "ResponseHandler",
]

_log = Logger()

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
"""Methods that may be sent twice (RFC 9110 section 9.2.2)."""

_MAX_HEAD = 65536  # bytes of status lines and headers per response, interim ones included


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


class CallRelay:
    """Pause and resume an :class:`OriginCall` for a client-side consumer (a mixin).

    The proxy's exchange and the cache's fetch register themselves as push producers on the
    client request that receives the origin's response: a full client socket pauses reading
    from the origin. A pause that comes before the call exists is kept in ``paused`` and applied
    by the subclass once it starts the call.
    """

    __slots__ = ("call", "paused")

    call: OriginCall | None
    paused: bool

    def pauseProducing(self) -> None:
        """The client's socket is full: stop reading from the origin."""
        self.paused = True
        if self.call is not None:
            self.call.pauseProducing()

    def resumeProducing(self) -> None:
        """The client's socket drained: read from the origin again."""
        self.paused = False
        if self.call is not None:
            self.call.resumeProducing()


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
