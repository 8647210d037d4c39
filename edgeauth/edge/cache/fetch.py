"""One origin GET made by the cache: a fill, a revalidation or a background refresh.

A :class:`Fetch` is the :class:`edgeauth.edge.origin.ResponseHandler` of one origin call. It may
have a *leader* (the client whose miss started it), to whom the response streams as it arrives,
exactly as the proxy would relay it (hop-by-hop fields dropped, ``Via`` appended, the origin paused
while the client's socket is full, ``X-Cache: MISS``); and it keeps a copy of the body, up to
``max_object_bytes``, when the response is storable. At the end the copy becomes an entry and the
requests that waited for this fill (:class:`edgeauth.edge.cache.collapse.Collapser`) are answered
from it. What cannot be stored is not shared: the waiters are handed back at once, to ask the
origin themselves.

With a stale entry at hand the request is conditional (``If-None-Match`` / ``If-Modified-Since``
from the entry's validators): a 304 refreshes the entry's headers and times and everyone is
answered from it. A 5xx, or no response at all, lets an entry that allows ``stale-if-error`` answer
instead. A fill whose leader leaves goes on if its copy is still wanted (storable, or waiters),
otherwise it is cancelled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import attrs
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from edgeauth.edge.cache.collapse import Fill
from edgeauth.edge.cache.policy import header_pairs, storable
from edgeauth.edge.cache.respond import MISS, alive
from edgeauth.edge.forwarding import HOP_BY_HOP, origin_request_headers
from edgeauth.edge.origin import CallRelay, OriginCall, OriginRequest
from edgeauth.edge.origin_errors import OriginError
from edgeauth.wire.cachecontrol import format_http_date

if TYPE_CHECKING:
    from edgeauth.edge.cache.response_cache import EdgeCache
    from edgeauth.edge.cache.store import Entry

__all__ = ["Fetch", "RequestContext"]

_CONDITIONAL: Final = frozenset(
    {b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range"}
)
_STALE_ON: Final = frozenset({500, 502, 503, 504})
"""Origin statuses that let a ``stale-if-error`` entry answer instead (RFC 5861 §4)."""


@attrs.frozen(kw_only=True)
class RequestContext:
    """What a fetch needs of the client request that caused it (it may be long gone)."""

    uri: bytes
    path: bytes
    headers: Headers
    peer: str | None
    secure: bool
    client_ip: str


@implementer(IPushProducer)
class Fetch(CallRelay):
    """One origin GET of the cache (module docstring)."""

    def __init__(
        self,
        cache: EdgeCache,
        *,
        key: str,
        fill_id: str,
        context: RequestContext,
        leader: Request | None,
        stale: Entry | None,
        registered: bool,
        seq: int,
    ) -> None:
        self.cache = cache
        self.key = key
        self.fill_id = fill_id
        self.context = context
        self.leader = leader
        self.stale = stale
        self.registered = registered
        self.seq = seq
        self.release: Callable[[], None] | None = None
        self.fill: Fill[Request] | None = None
        self.call: OriginCall | None = None
        self.request_time = 0.0
        self.paused = False
        self.ended = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] | None = None
        self.size = 0
        self.not_modified = False
        self.started = False
        self.head_sent = False

    # -- start ---------------------------------------------------------------------------------

    def origin_request(self) -> OriginRequest:
        """The GET to send: the client's headers as the proxy forwards them, our validators."""
        cache = self.cache
        ctx = self.context
        pairs, _ = origin_request_headers(
            ctx.headers,
            peer=ctx.peer,
            is_trusted=cache.is_trusted,
            proto=b"https" if ctx.secure else b"http",
            host=cache.origin_host,
            via=cache.via,
        )
        pairs = [(n, v) for n, v in pairs if n.lower() not in _CONDITIONAL]
        stale = self.stale
        if stale is not None:
            if stale.etag is not None:
                pairs.append((b"If-None-Match", stale.etag))
            if stale.last_modified is not None:
                pairs.append((b"If-Modified-Since", stale.last_modified))
        return OriginRequest(method=b"GET", target=cache.base_path + ctx.uri, headers=pairs)

    def start(self) -> None:
        """Register (collapsed fills), then send the request to the origin."""
        cache = self.cache
        cache.fetch_started(self)
        if self.registered:
            self.fill = cache.collapser.begin(self.fill_id)
        leader = self.leader
        if leader is not None:
            leader.registerProducer(self, True)
            leader.notifyFinish().addErrback(self._leader_lost)
        self.request_time = cache.clock.seconds()
        self.call = cache.pool.request(self.origin_request(), self)
        if self.paused and self.call is not None:
            self.call.pauseProducing()

    # -- the leader: IPushProducer (pause and resume: CallRelay) ----------------------------------

    def stopProducing(self) -> None:
        """The leader went away."""
        self._leader_lost(None)

    def _leader_lost(self, reason: Failure | None) -> None:
        if self.leader is None:
            return
        self.leader = None
        if self.paused:
            self.resumeProducing()
        if not self.ended and not self._wanted():
            self.cancel()

    def _wanted(self) -> bool:
        """Whether the response is still worth reading without the leader."""
        return self.parts is not None or self.not_modified or (self.registered and not self.started)

    def _leader(self) -> Request | None:
        leader = self.leader
        if leader is not None and not alive(leader):
            self.leader = None
            return None
        return leader

    # -- ResponseHandler -----------------------------------------------------------------------

    def response_started(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """Decide: refresh from a 304, serve stale for a 5xx, or relay and maybe copy."""
        cache = self.cache
        now = cache.clock.seconds()
        self.started = True
        self.status, self.reason = status, reason
        self.headers = kept = _kept_headers(headers, cache.via, now)
        if status == 304 and self.stale is not None:
            self.not_modified = True
            return
        if status in _STALE_ON and cache.stale_for_error(self, now) is not None:
            self._cancel_call()
            self._end_with_error(None)
            return
        store = cache.enabled and storable(
            status, header_pairs(self.context.headers), kept, cache.max_object_bytes
        )
        if store:
            self.parts = []
        else:
            if self.stale is not None:
                cache.drop_entry(self.stale)
            if self.registered:
                if status < 500:  # a passing origin error must not switch collapsing off
                    cache.mark_uncacheable(self.fill_id)
                self._hand_back_waiters()
        leader = self._leader()
        if leader is not None:
            leader.setResponseCode(status, reason or None)
            leader.responseHeaders = cache.client_headers(kept, MISS)
            leader.defaultContentType = None
            leader.write(b"")
            self.head_sent = True
        elif not store:
            self.cancel()

    def response_body(self, data: bytes) -> None:
        """Relay a piece to the leader, keep a copy while it still fits."""
        leader = self._leader()
        if leader is not None:
            leader.write(data)
        parts = self.parts
        if parts is not None:
            self.size += len(data)
            if self.size > self.cache.max_object_bytes:
                self.parts = None
                self.cache.mark_uncacheable(self.fill_id)
                self._hand_back_waiters()
                if self.stale is not None:
                    self.cache.drop_entry(self.stale)
            else:
                parts.append(data)
        if self.leader is None and self.parts is None and not self.not_modified:
            self.cancel()

    def response_finished(self) -> None:
        """Finish the leader; store the copy (or the refreshed entry) and answer the waiters."""
        cache = self.cache
        leader = self._leader()
        entry: Entry | None = None
        hard_seq: int | None = None
        if self.not_modified:
            assert self.stale is not None
            entry, hard_seq = cache.store_refreshed(self, self.stale, self.headers)
            if leader is not None:
                leader.unregisterProducer()
                cache.answer(leader, entry, MISS, self)
                self.leader = None
        else:
            if self.parts is not None:
                entry, hard_seq = cache.store_fetched(self, b"".join(self.parts))
                self.parts = None
            if leader is not None:
                leader.unregisterProducer()
                leader.finish()
                self.leader = None
        waiters = self._end()
        for request, joined in waiters:
            if entry is None or (hard_seq is not None and joined >= hard_seq):
                cache.redispatch(request)
            else:
                cache.answer(request, entry, MISS, self)

    def response_failed(self, error: OriginError) -> None:
        """Answer the leader and the waiters with a stale entry if allowed, else the error."""
        self._end_with_error(error)

    # -- endings -------------------------------------------------------------------------------

    def _end_with_error(self, error: OriginError | None) -> None:
        cache = self.cache
        leader = self._leader()
        self.leader = None
        self.parts = None
        if leader is not None:
            leader.unregisterProducer()
            if self.head_sent:
                # The status line is out: only a broken connection tells the client.
                leader.channel.transport.abortConnection()  # type: ignore[union-attr]
            else:
                cache.answer_error(leader, error, self)
        for request, _ in self._end():
            cache.answer_error(request, error, self)

    def _hand_back_waiters(self) -> None:
        if self.fill is not None:
            for request, _ in self.cache.collapser.release(self.fill):
                self.cache.redispatch(request, shared=False)

    def _cancel_call(self) -> None:
        call, self.call = self.call, None
        if call is not None:
            call.cancel()

    def cancel(self) -> None:
        """Stop reading: nobody wants the rest."""
        self._cancel_call()
        leader = self._leader()
        self.leader = None
        if leader is not None:
            leader.unregisterProducer()
            if self.head_sent:
                leader.channel.transport.abortConnection()  # type: ignore[union-attr]
        for request, _ in self._end():
            self.cache.redispatch(request, shared=False)

    def _end(self) -> list[tuple[Request, int]]:
        if self.ended:
            return []
        self.ended = True
        waiters = self.cache.collapser.finish(self.fill) if self.fill is not None else []
        self.cache.fetch_ended(self)
        release, self.release = self.release, None
        if release is not None:
            release()
        return waiters


def _kept_headers(
    headers: list[tuple[bytes, bytes]], via: bytes, now: float
) -> list[tuple[bytes, bytes]]:
    """The origin's headers as the proxy relays them: hop-by-hop gone, ``Via``, ``Date`` added."""
    listed: frozenset[bytes] = frozenset()
    for name, _ in headers:
        if name == b"connection":
            listed = frozenset(
                t.strip().lower() for n, v in headers if n == b"connection" for t in v.split(b",")
            )
            break
    kept: list[tuple[bytes, bytes]] = []
    vias: list[bytes] = []
    has_date = False
    for name, value in headers:
        if name in HOP_BY_HOP or name in listed:
            continue
        if name == b"via":
            vias.append(value)
            continue
        if name == b"date":
            has_date = True
        kept.append((name, value))
    vias.append(via)
    kept.append((b"via", b", ".join(vias)))
    if not has_date:
        kept.append((b"date", format_http_date(now)))
    return kept
