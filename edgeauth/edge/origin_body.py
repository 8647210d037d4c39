"""Request bodies on their way to the origin, ``Content-Length`` or chunked.

A body is either a file-like object (a spooled body, replayable), streamed by a pull producer
one chunk each time the origin socket drains, or a :class:`BodyStream` fed while the client is
still sending, whose source is paused when the origin does not keep up. The connection protocol
of :mod:`edgeauth.edge.origin` sends the request head and hands the body to one of these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from twisted.internet.interfaces import IPullProducer, IPushProducer
from zope.interface import implementer

from edgeauth.edge.origin_errors import BadGatewayError

if TYPE_CHECKING:
    from edgeauth.edge.origin import _OriginProtocol

__all__ = ["BodyStream"]

_CHUNK = 65536
"""Bytes read from a request body at a time; smaller bodies go out with the request head."""


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
