"""Writing cached responses to clients: ``Age`` and ``X-Cache`` headers, bodies paced by the client.

A body larger than one chunk is written by a :class:`BodyProducer`, a push producer registered on
the request: it writes 64 KiB slices while the client's connection accepts them and stops when
Twisted pauses it, so a slow reader of a large entry costs a socket buffer, never a copy of the
body (the entry's bytes are shared by every reader).
"""

from __future__ import annotations

from typing import Final

from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from edgeauth.edge.cache.policy import not_modified
from edgeauth.edge.cache.store import Entry

__all__ = ["BYPASS", "CHUNK", "HIT", "MISS", "STALE", "BodyProducer", "alive", "serve_entry"]

HIT: Final = b"HIT"
MISS: Final = b"MISS"
STALE: Final = b"STALE"
BYPASS: Final = b"BYPASS"

CHUNK: Final = 65536
"""Bytes written at a time for large bodies."""

X_CACHE: Final = b"X-Cache"


def alive(request: Request) -> bool:
    """Whether ``request`` can still be answered (its client is connected, nothing finished)."""
    return request.channel is not None and not request.finished


def serve_entry(request: Request, entry: Entry, label: bytes, now: float) -> None:
    """Answer ``request`` from ``entry`` (a HEAD gets the headers only) and finish it.

    A conditional GET or HEAD whose validators match gets 304 (RFC 9110 §13.1).
    """
    if not alive(request):
        return
    headers = _headers_of(entry)
    set_raw = headers.setRawHeaders
    set_raw(b"Age", [b"%d" % entry.age(now)])
    set_raw(X_CACHE, [label])
    request_headers = request.requestHeaders
    if (
        entry.status == 200
        and (
            request_headers.hasHeader(b"if-none-match")
            or request_headers.hasHeader(b"if-modified-since")
        )
        and not_modified(request_headers, entry.etag, entry.last_modified)
    ):
        request.setResponseCode(304)
        headers.removeHeader(b"content-type")
        request.responseHeaders = headers
        request.defaultContentType = None
        request.write(b"")
        request.finish()
        return
    body = entry.body
    set_raw(b"Content-Length", [b"%d" % len(body)])
    request.setResponseCode(entry.status, entry.reason or None)
    request.responseHeaders = headers
    request.defaultContentType = None
    if len(body) <= CHUNK or request.method == b"HEAD":
        request.write(body)
        request.finish()
        return
    BodyProducer(request, body).start()


def _headers_of(entry: Entry) -> Headers:
    """A new ``Headers`` holding the entry's stored response headers.

    Validating and canonicalising ~10 names per HIT through ``setRawHeaders`` is a tenth of what
    a HIT costs, so it is done once per entry and later HITs copy the result. That copy uses
    ``Headers._rawHeaders`` (canonical name -> list of sanitised values, unchanged since
    Twisted 8); if it is ever missing, every HIT goes through ``setRawHeaders`` again.
    """
    template = entry.header_template
    if template is None:
        built = Headers()
        for name, values in entry.serve_headers:
            built.setRawHeaders(name, values)
        template = getattr(built, "_rawHeaders", None)
        if template is None:
            return built
        entry.header_template = template
    headers = Headers()
    headers._rawHeaders = {name: list(values) for name, values in template.items()}
    return headers


@implementer(IPushProducer)
class BodyProducer:
    """Writes one stored body to one client in chunks, as fast as the client reads."""

    __slots__ = ("request", "body", "offset", "paused", "done", "_pumping")

    def __init__(self, request: Request, body: bytes) -> None:
        self.request = request
        self.body = body
        self.offset = 0
        self.paused = False
        self.done = False
        self._pumping = False

    def start(self) -> None:
        """Register on the request and write until paused."""
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(self._lost)
        self._pump()

    def _lost(self, reason: Failure) -> None:
        self.done = True

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            request, body = self.request, self.body
            while not self.paused and not self.done:
                if not alive(request):
                    self.done = True
                    return
                end = self.offset + CHUNK
                chunk = body[self.offset : end]
                self.offset = end
                if end >= len(body):
                    self.done = True
                    request.write(chunk)
                    request.unregisterProducer()
                    request.finish()
                    return
                request.write(chunk)
        finally:
            self._pumping = False

    def pauseProducing(self) -> None:
        """The client's socket is full."""
        self.paused = True

    def resumeProducing(self) -> None:
        """The client's socket drained."""
        self.paused = False
        self._pump()

    def stopProducing(self) -> None:
        """The client went away."""
        self.done = True
