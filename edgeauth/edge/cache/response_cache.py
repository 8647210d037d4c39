"""The edge's response cache: the :class:`edgeauth.edge.proxy.ResponseCache` the proxy consults.

Per GET or HEAD (PROTOCOL.md §6, "Cache"), :meth:`EdgeCache.lookup`:

1. leaves other methods, ``Range`` requests and requests with ``Cache-Control: no-store`` to the
   proxy (``X-Cache: BYPASS``; a successful unsafe request also drops the stored responses of its
   URI on this edge, RFC 9111 §4.4);
2. serves a fresh entry (``HIT``; a HEAD is answered from the GET entry), or a stale one that may
   be served while one background refresh runs (``STALE``: ``stale-while-revalidate``, or a soft
   purge), unless the client asks for revalidation (``no-cache``, ``max-age=0``);
3. otherwise fetches from the origin itself (:mod:`edgeauth.edge.cache.fetch`): conditionally when
   it holds a stale entry, collapsed so that concurrent misses of one key and variant make one
   origin request (:mod:`edgeauth.edge.cache.collapse`). A HEAD miss, and a key whose last
   response could not be stored (remembered for ``uncacheable_for`` seconds, so that such keys do
   not queue behind one another), go to the proxy (``MISS``).

``X-Cache`` labels: ``HIT`` served from the cache without asking the origin; ``STALE`` a stale
entry served (while refreshing, or because the origin failed and ``stale-if-error`` allows it);
``MISS`` the origin was asked (a fill, a revalidation, or a request that waited for another's);
``BYPASS`` the cache did not take part.

Invalidations (:meth:`invalidate_event`, from the state's ``cache_listeners``) act on the store at
once and are persisted in the same reactor turn (see :mod:`edgeauth.edge.cache.persist` for the
ordering this guarantees); responses in flight are checked against them when they arrive
(:mod:`edgeauth.edge.cache.contents`), and a hard one also lets new requests start a new fill
instead of waiting for one sent before it. After a snapshot bootstrap (:meth:`reset`) everything is
dropped.

At start (:meth:`load`) entries are read *unverified*: until the first catch-up with the master is
applied (:meth:`confirm`), they are used only after a successful revalidation with the origin, so
an invalidation posted while the edge was down never yields a stale HIT. The edge service also
holds its proxy listener back, for a bounded time, until that catch-up, so that a restarted edge
serves HITs at once when the master is reachable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from edgeauth.config import CacheSettings
from edgeauth.edge.answers import write_json
from edgeauth.edge.cache.collapse import Collapser, RefreshLimiter
from edgeauth.edge.cache.contents import CacheContents
from edgeauth.edge.cache.fetch import Fetch, RequestContext
from edgeauth.edge.cache.policy import (
    NO_RULES,
    Selector,
    group_headers,
    merge_not_modified,
    request_key,
    request_rules,
    split_key,
    variant_key,
    vary_names,
)
from edgeauth.edge.cache.respond import BYPASS, HIT, MISS, STALE, X_CACHE, alive, serve_entry
from edgeauth.edge.cache.store import Entry
from edgeauth.edge.forwarding import trust_nobody
from edgeauth.edge.metrics import EdgeMetrics
from edgeauth.edge.origin_errors import OriginError, OriginUnreachableError
from edgeauth.edge.origin_pool import OriginPool
from edgeauth.edge.proxy import BodySink
from edgeauth.edge.ttl import TTLPipeline
from edgeauth.events import CacheInvalidated

__all__ = ["EdgeCache"]

log = Logger()

_LABEL: Final = "_edgeauth_cache_label"
_GET: Final = b"GET"
_HEAD: Final = b"HEAD"
_UNSAFE: Final = frozenset({b"POST", b"PUT", b"DELETE", b"PATCH"})


def _peer(request: Request) -> str | None:
    address = request.getClientAddress()
    if isinstance(address, IPv4Address | IPv6Address):
        host = address.host
        return host[7:] if host.startswith("::ffff:") and "." in host else host
    return None


class EdgeCache:
    """An RFC 9111 shared cache in front of one origin (module docstring).

    Args:
        reactor: the clock (and what the origin pool runs on).
        pool: the origin pool the proxy uses.
        settings: the ``[cache]`` section.
        ttl: the TTL pipeline the granted lifetime goes through.
        run_interaction: the edge store's ``run_interaction`` (persistence), or None.
        log_id: the state's current log id (rows are stamped with it).
        base_path: the origin URL's path, prefixed to every target.
        origin_host: the ``Host`` sent to the origin (None: the client's).
        is_trusted: whether a peer is a trusted proxy (forwarding headers).
        client_ip: the client address of a request (for the TTL rules).
        metrics: the edge's metrics, or None.
        via: this hop's ``Via`` entry.
        max_wait: the longest a request waits for another's fill (default: the origin pool's
            response timeout).
        uncacheable_for: how long a key whose response could not be stored skips collapsing.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        pool: OriginPool,
        settings: CacheSettings,
        ttl: TTLPipeline,
        *,
        run_interaction: Callable[..., Any] | None = None,
        log_id: Callable[[], str | None] = lambda: None,
        base_path: bytes = b"",
        origin_host: bytes | None = None,
        is_trusted: Callable[[str], bool] = trust_nobody,
        client_ip: Callable[[Request], str] | None = None,
        metrics: EdgeMetrics | None = None,
        via: bytes = b"1.1 edgeauth",
        max_wait: float | None = None,
        uncacheable_for: float = 10.0,
    ) -> None:
        self.clock = reactor
        self.pool = pool
        self.enabled = settings.enabled
        self.max_object_bytes = settings.max_object_bytes
        self.tag_header = settings.tag_header.lower().encode("ascii")
        self.strip_tag_header = settings.strip_tag_header
        self.base_path = base_path.rstrip(b"/")
        self.origin_host = origin_host
        self.is_trusted = is_trusted
        self.via = via
        self._client_ip = client_ip
        self.contents = CacheContents(
            reactor,
            settings,
            ttl,
            run_interaction=run_interaction,
            log_id=log_id,
            metrics=metrics,
            uncacheable_for=uncacheable_for,
        )
        self.store = self.contents.store
        self.persister = self.contents.persister
        self.collapser: Collapser[Request] = Collapser(
            reactor,
            pool.response_timeout if max_wait is None else max_wait,
            self._wait_expired,
        )
        self.refreshes = RefreshLimiter(settings.max_refreshes, max_queue=settings.max_entries)
        self._fetches: set[Fetch] = set()
        self.closing = False
        self.counts = dict.fromkeys(("hit", "miss", "stale", "bypass"), 0)
        if metrics is not None:
            metrics.bind_cache(
                entries=lambda: len(self.store),
                size=lambda: self.store.bytes,
                refreshing=lambda: self.refreshes.running,
                queued=lambda: self.refreshes.queued,
                filling=lambda: len(self.collapser),
            )
        labels = metrics.cache_requests.labels if metrics is not None else None
        self._count = {
            name: (labels(result=name).inc if labels is not None else _nothing)
            for name in self.counts
        }

    # -- the proxy's seam -----------------------------------------------------------------------

    def lookup(self, request: Request) -> bool:
        """Serve ``request`` from the cache, or fetch it; False leaves it to the proxy."""
        return self._route(request, to_proxy=True, collapse=True)

    def _route(self, request: Request, *, to_proxy: bool, collapse: bool) -> bool:
        method = request.method
        headers = request.requestHeaders
        if (method != _GET and method != _HEAD) or headers.hasHeader(b"range"):
            return self._bypass(request, BYPASS)
        host = headers.getRawHeaders(b"host")
        key = request_key(host[0] if host else b"", request.uri)
        now = self.clock.seconds()
        rules = request_rules(headers)
        entry, variant = self.store.lookup(key, headers)
        if entry is not None and not rules.revalidate:
            if entry.fresh_for(now, rules):
                self.store.touch(entry)
                self._tally("hit")
                serve_entry(request, entry, HIT, now)
                return True
            if rules.max_age is None and rules.min_fresh is None and entry.stale_servable(now):
                self.store.touch(entry)
                self._tally("stale")
                serve_entry(request, entry, STALE, now)
                self._refresh(entry, request)
                return True
        if rules.only_if_cached:
            self._tally("miss")
            write_json(request, 504, {"error": "not_cached", "detail": "only-if-cached"})
            return True
        fill_id = key + "\x00" + variant
        if rules.no_store:
            return self._bypass(request, BYPASS) if to_proxy else self._pass(request, fill_id)
        if method == _HEAD or not self.enabled or self.contents.is_uncacheable(fill_id, now):
            return self._bypass(request, MISS) if to_proxy else self._pass(request, fill_id)
        if rules.revalidate or not collapse:
            return self._pass(request, fill_id, entry)
        self._tally("miss")
        if self.collapser.join(fill_id, request, self.contents.seq):
            request.notifyFinish().addErrback(lambda _: self.collapser.leave(fill_id, request))
            return True
        return self._start_fetch(request, key, fill_id, entry, registered=True)

    def _bypass(self, request: Request, label: bytes) -> bool:
        setattr(request, _LABEL, label)
        return False

    def _pass(self, request: Request, fill_id: str, entry: Entry | None = None) -> bool:
        """Fetch for ``request`` alone (it may store the response, but shares no wait)."""
        self._tally("miss")
        key = fill_id.partition("\x00")[0]
        return self._start_fetch(request, key, fill_id, entry, registered=False)

    def _start_fetch(
        self, request: Request, key: str, fill_id: str, entry: Entry | None, *, registered: bool
    ) -> bool:
        """Fetch from the origin for ``request`` (its leader); ``registered``: others may join."""
        Fetch(
            self,
            key=key,
            fill_id=fill_id,
            context=self._context(request),
            leader=request,
            stale=entry,
            registered=registered,
            seq=self.contents.seq,
        ).start()
        return True

    def observe(self, request: Request, status: int, headers: Headers) -> BodySink | None:
        """Label a proxied response, strip its tags, and drop what an unsafe request changed."""
        label = getattr(request, _LABEL, None)
        if label is None:
            label = MISS if request.method in (_GET, _HEAD) else BYPASS
        headers.setRawHeaders(X_CACHE, [label])
        if self.strip_tag_header:
            headers.removeHeader(self.tag_header)
        self._tally("bypass" if label == BYPASS else "miss")
        if request.method in _UNSAFE and 200 <= status < 400:
            host = request.requestHeaders.getRawHeaders(b"host")
            key = request_key(host[0] if host else b"", request.uri)
            self.invalidate(Selector(keys=(split_key(key),)), soft=False, local=True)
        return None

    def serve_on_error(self, request: Request, error: OriginError) -> bool:
        """Answer a proxied GET/HEAD with a stale entry that allows ``stale-if-error``."""
        if request.method not in (_GET, _HEAD):
            return False
        host = request.requestHeaders.getRawHeaders(b"host")
        key = request_key(host[0] if host else b"", request.uri)
        entry, _ = self.store.lookup(key, request.requestHeaders)
        now = self.clock.seconds()
        if entry is None or not entry.usable_on_error(now):
            return False
        self._tally("stale")
        serve_entry(request, entry, STALE, now)
        return True

    # -- what fetches call -------------------------------------------------------------------

    def fetch_started(self, fetch: Fetch) -> None:
        """Track a running fetch (for invalidations that come while it runs)."""
        self._fetches.add(fetch)

    def fetch_ended(self, fetch: Fetch) -> None:
        """Forget a fetch; trim the invalidation log once nobody needs its old part."""
        fetches = self._fetches
        fetches.discard(fetch)
        self.contents.trim_log(min(f.seq for f in fetches) if fetches else None)

    def client_headers(self, headers: list[tuple[bytes, bytes]], label: bytes) -> Headers:
        """The response headers a client gets for a relayed origin response."""
        out = Headers()
        for name, vs in group_headers(headers, (self.tag_header,) if self.strip_tag_header else ()):
            out.setRawHeaders(name, vs)
        out.setRawHeaders(X_CACHE, [label])
        return out

    def store_fetched(self, fetch: Fetch, body: bytes) -> tuple[Entry, int | None]:
        """Build the entry of a complete storable response and store it unless invalidated.

        Returns:
            The entry, and the seq of a hard invalidation that matched it while it was being
            fetched (it is not stored then) or None.
        """
        headers = fetch.headers
        vary = vary_names(headers) or ()
        entry = self.contents.build(
            key=fetch.key,
            variant=variant_key(vary, fetch.context.headers),
            vary=vary,
            status=fetch.status,
            reason=fetch.reason,
            headers=headers,
            body=body,
            request_time=fetch.request_time,
            client_ip=fetch.context.client_ip,
            path=fetch.context.path,
        )
        return entry, self.contents.keep(fetch.seq, entry)

    def store_refreshed(
        self, fetch: Fetch, stale: Entry, headers: list[tuple[bytes, bytes]]
    ) -> tuple[Entry, int | None]:
        """Refresh ``stale`` from a 304 (RFC 9111 §4.3.4); store it unless invalidated."""
        entry = self.contents.build(
            key=stale.key,
            variant=stale.variant,
            vary=stale.vary,
            status=stale.status,
            reason=stale.reason,
            headers=merge_not_modified(stale.headers, headers),
            body=stale.body,
            request_time=fetch.request_time,
            client_ip=fetch.context.client_ip,
            path=fetch.context.path,
        )
        return entry, self.contents.keep(fetch.seq, entry)

    def _put(self, entry: Entry) -> None:
        self.contents.put(entry)

    def drop_entry(self, entry: Entry) -> None:
        """Remove an entry the origin no longer lets us store."""
        self.contents.drop(entry)

    def mark_uncacheable(self, fill_id: str) -> None:
        """Let requests for ``fill_id`` skip collapsing for a while (it was not storable)."""
        self.contents.mark_uncacheable(fill_id)

    def answer(self, request: Request, entry: Entry, label: bytes, fetch: Fetch) -> None:
        """Serve a request that waited for ``fetch`` from ``entry`` (if its variant matches)."""
        if not alive(request):
            return
        if entry.vary and variant_key(entry.vary, request.requestHeaders) != entry.variant:
            self.redispatch(request)
            return
        serve_entry(request, entry, label, self.clock.seconds())

    def stale_for_error(self, fetch: Fetch, now: float) -> Entry | None:
        """A stored entry that may answer ``fetch``'s requests now that the origin failed."""
        stale = fetch.stale
        if stale is not None and self.store.get(stale.key, stale.variant) is stale:
            return stale if stale.usable_on_error(now) else None
        entry, _ = self.store.lookup(fetch.key, fetch.context.headers)
        return entry if entry is not None and entry.usable_on_error(now) else None

    def answer_error(self, request: Request, error: OriginError | None, fetch: Fetch) -> None:
        """Serve a stale entry if ``stale-if-error`` allows, else the JSON error."""
        if not alive(request):
            return
        now = self.clock.seconds()
        entry = self.stale_for_error(fetch, now)
        if entry is not None:
            self._tally("stale")
            serve_entry(request, entry, STALE, now)
            return
        if error is None:
            error = OriginUnreachableError("the origin failed")
        write_json(request, error.status, {"error": error.kind, "detail": error.detail})

    def redispatch(self, request: Request, *, shared: bool = True) -> None:
        """Route a request that waited for a fill again (no proxy any more: the cache fetches)."""
        if not alive(request):
            return
        if self.closing:
            error = OriginUnreachableError("the edge is stopping")
            write_json(request, error.status, {"error": error.kind, "detail": error.detail})
            return
        self._route(request, to_proxy=False, collapse=shared)

    def _wait_expired(self, request: Request) -> None:
        self.redispatch(request, shared=False)

    # -- refreshes ------------------------------------------------------------------------------

    def _refresh(self, entry: Entry, request: Request) -> None:
        fill_id = entry.key + "\x00" + entry.variant
        if self.collapser.busy(fill_id) or self.refreshes.pending(fill_id) or self.closing:
            return
        context = self._context(request, copy=True)
        key, variant = entry.key, entry.variant

        def start(release: Callable[[], None]) -> bool:
            current = self.store.get(key, variant)
            now = self.clock.seconds()
            if (
                self.closing
                or current is None
                or current.fresh_for(now, NO_RULES)
                or self.collapser.busy(fill_id)
            ):
                return False
            fetch = Fetch(
                self,
                key=key,
                fill_id=fill_id,
                context=context,
                leader=None,
                stale=current,
                registered=True,
                seq=self.contents.seq,
            )
            fetch.release = release
            fetch.start()
            return True

        self.refreshes.submit(fill_id, start)

    # -- invalidation ---------------------------------------------------------------------------

    def invalidate_event(self, event: CacheInvalidated) -> None:
        """Apply one ``cache_invalidated`` event (a state cache listener)."""
        selector = Selector.parse(event.tags, event.keys, event.prefixes, event.all)
        affected = self.invalidate(selector, soft=event.soft)
        log.info(
            "applied cache_invalidated seq {seq} ({how}): {n} entries",
            seq=event.seq,
            how="soft" if event.soft else "hard",
            n=affected,
        )

    def invalidate(self, selector: Selector, *, soft: bool, local: bool = False) -> int:
        """Drop or soften every variant of every selected key now, and persist that now.

        Returns:
            How many entries were affected.
        """
        fetches = self._fetches
        result = self.contents.invalidate(selector, soft=soft, fetching=bool(fetches), local=local)
        if not soft:
            # Later requests must not wait for (and get) what was fetched before the purge.
            for fetch in fetches:
                if fetch.fill is not None and (
                    result.everything or fetch.key in result.keys or selector.matches(fetch.key, ())
                ):
                    self.collapser.detach(fetch.fill_id)
        return len(result.removed) + len(result.softened)

    def reset(self) -> None:
        """Drop everything: a snapshot bootstrap means invalidations may have been missed."""
        dropped = self.invalidate(Selector(all=True), soft=False, local=True)
        self.refreshes.clear()
        self.contents.forget_uncacheable()
        log.info("response cache cleared after a snapshot bootstrap ({n} entries)", n=dropped)

    @property
    def confirmed(self) -> bool:
        """Whether no entry read at start waits for the first catch-up."""
        return self.contents.confirmed

    def confirm(self) -> None:
        """The first catch-up is applied: entries read at start may be used as they are."""
        self.contents.confirm()

    # -- start and stop -----------------------------------------------------------------------

    async def load(self, log_id: str | None) -> int:
        """Read the stored entries (unverified until :meth:`confirm`); return how many."""
        return await self.contents.load(log_id)

    async def close(self) -> None:
        """Stop fetching and write what is queued."""
        self.closing = True
        self.refreshes.clear()
        for fetch in list(self._fetches):
            fetch.cancel()
        await self.contents.close()

    # -- views ------------------------------------------------------------------------------

    def entry_count(self) -> int:
        """How many entries (variants) are stored."""
        return len(self.store)

    def explain_url(self, url: str) -> dict[str, Any] | None:
        """The stored variants of ``url`` (host/path, scheme://host/path, or /path on any host)."""
        return self.contents.explain_url(url)

    # -- helpers ----------------------------------------------------------------------------

    def _tally(self, result: str) -> None:
        self.counts[result] += 1
        self._count[result]()

    def _context(self, request: Request, *, copy: bool = False) -> RequestContext:
        path = request.uri
        if not path.startswith(b"/"):
            _, _, rest = path.partition(b"://")
            path = b"/" + rest.partition(b"/")[2]
        return RequestContext(
            uri=path,
            path=request.path,
            headers=request.requestHeaders.copy() if copy else request.requestHeaders,
            peer=_peer(request),
            secure=request.isSecure(),
            client_ip=self._client_ip(request) if self._client_ip else (_peer(request) or ""),
        )


def _nothing() -> None:
    pass
