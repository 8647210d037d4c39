"""The edge's reverse proxy resource: gate, cache seam, then the origin over pooled connections.

ARCHITECTURE.md decision 5: :class:`EdgeProxyResource` keeps the shape of Twisted's
``ReverseProxyResource`` (``host``, ``port``, ``path``, ``getChild``) but sends origin
requests through :class:`edgeauth.edge.origin_pool.OriginPool` instead of one HTTP/1.0
connection per request.

Per request, :meth:`EdgeProxyResource.render`:

1. refuses upgrades (an ``Upgrade`` other than ``h2c``, or ``CONNECT``) with 501
   ``upgrade_not_supported``: tunnelling is not implemented, and passing an upgrade on as a
   plain request would be wrong (an ``h2c`` offer is optional and is simply not taken up);
2. asks the ``gate`` hook; its answer (:class:`edgeauth.edge.answers.Answer`) is written and
   the origin never sees the request;
3. offers the request to the ``cache`` seam (:class:`ResponseCache`);
4. forwards it with the headers :func:`edgeauth.edge.forwarding.origin_request_headers` builds
   (which ones are dropped, rebuilt and added is told there); hop-by-hop headers are stripped
   from the response too and ``Via`` appended.

The response streams back as it arrives. The origin call is registered as a push producer on the
client request, so a slow client pauses reading from the origin. Request bodies go to the origin
as a stream too: with :class:`EdgeRequest` as the site's request factory, a large or chunked body
is forwarded while it arrives and a slow origin pauses reading the client; a short body (or any
body without :class:`EdgeRequest`) is read whole by Twisted first and then sent from its spool,
paced by the origin socket, and stays replayable for a retry. A client that goes away cancels the
origin call (the connection is aborted, never pooled). Errors become JSON 502/504 with
``Cache-Control: no-store`` (:func:`edgeauth.edge.answers.write_json`) while no byte of the
response was sent; after that, the client connection is aborted so a truncated body never looks
complete.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import IO, Any, ClassVar, Protocol
from urllib.parse import quote, unquote_to_bytes

import attrs
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString, parse_qs
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.server import version as server_version
from typing_extensions import override
from zope.interface import implementer

from edgeauth.edge.answers import Answer, write_json
from edgeauth.edge.forwarding import (
    HOP_BY_HOP,
    VIA,
    header_tokens,
    origin_request_headers,
    peer_ip,
    trust_nobody,
)
from edgeauth.edge.origin import CallRelay, OriginCall, OriginRequest
from edgeauth.edge.origin_body import BodyStream
from edgeauth.edge.origin_errors import OriginError
from edgeauth.edge.origin_pool import OriginPool

with warnings.catch_warnings():
    # twisted.web.proxy imports the deprecated HTTPClient for the stock ProxyClient we replace.
    warnings.simplefilter("ignore", DeprecationWarning)
    from twisted.web.proxy import ReverseProxyResource

__all__ = [
    "BodySink",
    "EdgeProxyResource",
    "EdgeRequest",
    "Gate",
    "OnResponse",
    "ResponseCache",
]

_log = Logger()

_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


Gate = Callable[[Request], "Answer | None"]
"""Called before proxying; an :class:`~edgeauth.edge.answers.Answer` returned is written and the
origin never sees the request.

With :class:`EdgeRequest`, it is called as soon as the headers are in for a streamed upload: it
must not read ``request.content``.
"""

OnResponse = Callable[[Request, int], None]
"""Called with each origin status (not for the edge's own 5xx), e.g. to count failures."""


class BodySink(Protocol):
    """Receives a copy of one origin response body (the cache's way to store it)."""

    def write(self, data: bytes) -> None:
        """A piece of the body, as sent to the client."""

    def finish(self) -> None:
        """The body is complete and the client has it."""

    def abort(self) -> None:
        """The response failed or the client left: discard what was written."""


class ResponseCache(Protocol):
    """The cache seam (PROTOCOL.md section 6, "Cache"); no cache logic lives in this module."""

    def lookup(self, request: Request) -> bool:
        """Serve ``request`` from the cache if possible.

        Returns:
            True if the cache has taken the request (it will write and finish it, possibly later,
            e.g. after a collapsed origin request); False to proxy it.
        """

    def observe(self, request: Request, status: int, headers: Headers) -> BodySink | None:
        """See the head of an origin response about to be sent to the client.

        Returns:
            A sink for a copy of the body, or None not to store it.
        """

    def serve_on_error(self, request: Request, error: OriginError) -> bool:
        """Offer a stale entry instead of the 502/504 for ``error`` (``stale-if-error``).

        Returns:
            True if the cache wrote (or will write and finish) the response.
        """


@attrs.define(kw_only=True)
class _ProxyConfig:
    pool: OriginPool
    is_trusted: Callable[[str], bool]
    gate: Gate | None
    cache: ResponseCache | None
    on_response: OnResponse | None
    host: bytes | None
    via: bytes


class EdgeProxyResource(ReverseProxyResource):
    """A ``ReverseProxyResource`` whose origin requests use pooled keep-alive connections.

    Args:
        host: the origin's host.
        port: the origin's port.
        path: the base path on the origin (no trailing slash), as for ``ReverseProxyResource``.
        reactor: an ``IReactorTime`` that also provides ``IReactorTCP``.
        pool: the origin connection pool; by default a new :class:`OriginPool` for
            ``scheme://host:port``.
        scheme: ``"http"`` or ``"https"`` (used when ``pool`` is not given).
        is_trusted: ``is_trusted(peer_ip)``: whether the TCP peer is a trusted proxy whose
            ``X-Forwarded-For``/``Forwarded``/``X-Forwarded-Proto`` are kept (the gate owns the
            list).
        gate: called before proxying; see :data:`Gate`.
        cache: the cache seam; see :class:`ResponseCache`.
        on_response: called with every origin status; see :data:`OnResponse`.
        preserve_host: send the client's ``Host`` instead of the origin's ``host:port``.
        via: this hop's ``Via`` entry, added to requests and responses.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: bytes,
        reactor: IReactorTime,
        *,
        pool: OriginPool | None = None,
        scheme: str = "http",
        is_trusted: Callable[[str], bool] = trust_nobody,
        gate: Gate | None = None,
        cache: ResponseCache | None = None,
        on_response: OnResponse | None = None,
        preserve_host: bool = False,
        via: bytes = VIA,
    ) -> None:
        super().__init__(host, port, path, reactor)
        if pool is None:
            pool = OriginPool(reactor, scheme, host, port)
        self._config = _ProxyConfig(
            pool=pool,
            is_trusted=is_trusted,
            gate=gate,
            cache=cache,
            on_response=on_response,
            host=None if preserve_host else pool.authority,
            via=via,
        )

    @property
    def pool(self) -> OriginPool:
        """The origin connection pool (shared with every child)."""
        return self._config.pool

    isLeaf = True
    """The site does not walk one child per path segment (each a copy of this resource): the
    origin path is built from ``request.postpath`` at once, as the children would have built it."""

    def origin_path(self, request: Request) -> bytes:
        """Return the origin path for ``request``: ``self.path``, then each remaining segment.

        The same path the chain of :meth:`getChild` calls would give (each segment quoted
        again, ``/`` included), without building a resource per segment.
        """
        base: bytes = self.path
        postpath: list[bytes] = request.postpath or []
        if not postpath:  # mounted as a child and addressed without a trailing slash
            return base
        if len(postpath) == 1 and not postpath[0]:  # "/", the commonest target
            return base + b"/"
        return base + b"".join(
            b"/" + quote(segment, safe="").encode("ascii") if segment else b"/"
            for segment in postpath
        )

    @override
    def getChild(self, path: bytes, request: Request) -> EdgeProxyResource:
        """Return a proxy resource for ``self.path + "/" + path`` sharing this configuration."""
        child = object.__new__(type(self))
        child.__dict__.update(self.__dict__)
        child.children = {}
        child.path = self.path + b"/" + (quote(path, safe="").encode("ascii") if path else b"")
        return child

    @override
    def render(self, request: Request) -> Any:
        """Gate, cache, then forward ``request`` to the origin; the response comes later."""
        config = self._config
        method = request.method
        if method == b"CONNECT" or request.requestHeaders.hasHeader(b"upgrade"):
            offered = header_tokens(request.requestHeaders.getRawHeaders(b"upgrade", []))
            if method == b"CONNECT" or offered - {b"h2c"}:
                write_json(
                    request,
                    501,
                    {
                        "error": "upgrade_not_supported",
                        "detail": "the edge does not tunnel upgraded or CONNECT connections",
                    },
                )
                return NOT_DONE_YET
        refusal = getattr(request, "edge_refusal", None)
        if refusal is None and config.gate is not None:
            refusal = config.gate(request)
        if refusal is not None:
            write_json(request, refusal.status, refusal.body, refusal.headers)
            return NOT_DONE_YET
        if config.cache is not None and config.cache.lookup(request):
            return NOT_DONE_YET
        _ProxyExchange(config, request, self.origin_path(request)).start()
        return NOT_DONE_YET

    def stream_request(self, request: EdgeRequest, length: int | None) -> BodyStream | None:
        """Start proxying ``request`` before its body is in (called by :class:`EdgeRequest`).

        Returns:
            The stream to write the body to, or None to take the usual path once the body is in
            (upgrades, GET/HEAD when a cache is configured, gate refusals, which are kept on the
            request so that the gate is asked once).
        """
        config = self._config
        if request.method == b"CONNECT" or request.requestHeaders.hasHeader(b"upgrade"):
            return None
        if config.cache is not None and request.method in (b"GET", b"HEAD"):
            return None
        if config.gate is not None:
            refusal = config.gate(request)
            if refusal is not None:
                request.edge_refusal = refusal
                return None

        def pause() -> None:
            if request.channel is not None and request.channel.transport is not None:
                request.channel.transport.pauseProducing()  # type: ignore[attr-defined]

        def resume() -> None:
            if request.channel is not None and request.channel.transport is not None:
                request.channel.transport.resumeProducing()  # type: ignore[attr-defined]

        stream = BodyStream(pause, resume)
        _ProxyExchange(config, request, self.origin_path(request)).start(stream, length)
        return stream


class EdgeRequest(Request):
    """A ``Request`` whose large or chunked body streams to the origin while it arrives.

    Twisted renders a resource only once the whole request body is in (spooled to a temporary
    file past 100 kB). For a body of unknown length or longer than ``stream_threshold``, this
    request looks its resource up as soon as the headers are in; an :class:`EdgeProxyResource`
    that takes it (:meth:`EdgeProxyResource.stream_request`) starts the origin request at once
    and the body follows piece by piece, so a slow origin pauses reading the client. Everything
    else, and short bodies (kept replayable, so they can be retried), takes Twisted's usual path.

    Use it as the site's ``requestFactory``. The early lookup reads the request line that
    ``HTTPChannel`` keeps until the body is complete (``_command``, ``_path``, ``_version``);
    where those are missing (HTTP/2), the usual path is taken.
    """

    stream_threshold: ClassVar[int] = 65536
    edge_refusal: Answer | None = None
    body_stream: BodyStream | None = None
    _body_complete = False
    _finish_pending = False

    @override
    def gotLength(self, length: int | None) -> None:
        """Set up the body spool, or stream the body if the resource takes it."""
        super().gotLength(length)
        if length is not None and length <= self.stream_threshold:
            return
        channel = self.channel
        command = getattr(channel, "_command", None)
        uri = getattr(channel, "_path", None)
        version = getattr(channel, "_version", None)
        site = getattr(channel, "site", None)
        if not (
            isinstance(command, bytes) and isinstance(uri, bytes) and isinstance(version, bytes)
        ):
            return
        if site is None:
            return
        self.method, self.uri, self.clientproto = command, uri, version
        self.path, _, query = uri.partition(b"?")
        self.args = parse_qs(query, 1) if query else {}
        self.prepath = []
        self.postpath = [unquote_to_bytes(p) for p in self.path[1:].split(b"/")]
        try:
            resource = site.getResourceFor(self)
        except Exception:
            return
        if isinstance(resource, EdgeProxyResource):
            self.setHeader(b"Server", server_version)
            self.setHeader(b"Date", datetimeToString())
            self.body_stream = resource.stream_request(self, length)

    @override
    def handleContentChunk(self, data: bytes) -> None:
        """Pass a piece of the body on to the stream, or spool it."""
        if self.body_stream is not None:
            self.body_stream.write(data)
        else:
            super().handleContentChunk(data)

    @override
    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """The body is complete: end the stream, or render as usual."""
        stream = self.body_stream
        if stream is None:
            super().requestReceived(command, path, version)
            return
        self._body_complete = True
        stream.finish()
        if self._finish_pending:
            super().finish()

    @override
    def finish(self) -> None:
        """Finish, once the channel has read the whole body (an early answer waits for it)."""
        if self.body_stream is not None and not self._body_complete:
            self._finish_pending = True
            return
        super().finish()


@implementer(IPushProducer)
class _ProxyExchange(CallRelay):
    """Relays one origin response to one client request (the origin call's handler)."""

    __slots__ = ("config", "request", "target", "gone", "sink")  # and CallRelay's

    def __init__(self, config: _ProxyConfig, request: Request, path: bytes) -> None:
        self.config = config
        self.request = request
        _, _, query = request.uri.partition(b"?")
        path = path or b"/"
        self.target = path + b"?" + query if query else path
        self.call: OriginCall | None = None
        self.gone = False
        self.sink: BodySink | None = None
        self.paused = False

    def start(self, stream: BodyStream | None = None, stream_length: int | None = None) -> None:
        request = self.request
        config = self.config
        headers, framed = origin_request_headers(
            request.requestHeaders,
            peer=peer_ip(request),
            is_trusted=config.is_trusted,
            proto=b"https" if request.isSecure() else b"http",
            host=config.host,
            via=config.via,
        )
        body: IO[bytes] | BodyStream | None = None
        length = None
        content = request.content
        if stream is not None:
            body, length = stream, stream_length
        elif content is not None:
            content.seek(0, 2)
            length = content.tell()
            content.seek(0)
            if length:
                body = content
        if not length and body is None and not framed and request.method not in _BODY_METHODS:
            length = None
        origin_request = OriginRequest(
            method=request.method,
            target=self.target,
            headers=headers,
            body=body,
            content_length=length,
        )
        request.registerProducer(self, True)
        request.notifyFinish().addErrback(self._client_lost)
        self.call = config.pool.request(origin_request, self)
        if self.paused:
            self.call.pauseProducing()

    # -- IPushProducer, registered on the client request (pause and resume: CallRelay) ---------

    def stopProducing(self) -> None:
        self._client_lost(None)

    def _client_lost(self, reason: Failure | None) -> None:
        if self.gone:
            return
        self.gone = True
        if self.call is not None:
            self.call.cancel()
        if self.sink is not None:
            self.sink.abort()
            self.sink = None

    def _alive(self) -> bool:
        return not self.gone and self.request.channel is not None

    # -- ResponseHandler ---------------------------------------------------------------------------

    def response_started(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        request = self.request
        if self.gone or request.channel is None:
            return
        listed: Iterable[bytes] = ()
        for name, _ in headers:
            if name == b"connection":
                listed = header_tokens(v for n, v in headers if n == b"connection")
                break
        response = Headers()
        add = response.addRawHeader
        hop_by_hop = HOP_BY_HOP
        vias: list[bytes] = []
        has_date = False
        for name, value in headers:
            if name in hop_by_hop or name in listed:
                continue
            if name == b"via":
                vias.append(value)
                continue
            if name == b"date":
                has_date = True
            add(name, value)
        via = self.config.via
        response.setRawHeaders(b"Via", [b", ".join([*vias, via]) if vias else via])
        if not has_date:
            date = request.responseHeaders.getRawHeaders(b"date")
            if date:
                response.setRawHeaders(b"Date", date)
        request.setResponseCode(status, reason or None)
        request.responseHeaders = response
        request.defaultContentType = None
        config = self.config
        if config.cache is not None:
            # Before the head goes out, so the cache can label it (X-Cache) and strip its tags.
            self.sink = config.cache.observe(request, status, response)
        request.write(b"")  # the head goes out now, even if the body is slow to come
        if config.on_response is not None:
            try:
                config.on_response(request, status)
            except Exception:
                _log.failure("on_response hook failed")

    def response_body(self, data: bytes) -> None:
        if self._alive():
            self.request.write(data)
            if self.sink is not None:
                self.sink.write(data)

    def response_finished(self) -> None:
        if not self._alive():
            return
        request = self.request
        request.unregisterProducer()
        request.finish()
        if self.sink is not None:
            self.sink.finish()
            self.sink = None

    def response_failed(self, error: OriginError) -> None:
        if not self._alive():
            return
        request = self.request
        request.unregisterProducer()
        if self.sink is not None:
            self.sink.abort()
            self.sink = None
        if request.startedWriting:
            # The status line is out: only a broken connection tells the client it is incomplete.
            self.gone = True
            request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return
        cache = self.config.cache
        if cache is not None and cache.serve_on_error(request, error):
            return
        write_json(request, error.status, {"error": error.kind, "detail": error.detail})
