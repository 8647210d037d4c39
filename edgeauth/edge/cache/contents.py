"""What the cache holds: entries in memory and on disk, and the invalidations fetches may miss.

:class:`CacheContents` owns the :class:`edgeauth.edge.cache.store.CacheStore` (memory) and the
:class:`edgeauth.edge.cache.persist.CachePersister` (the SQLite rows), and keeps them in step: every
put, eviction, refresh and invalidation reaches both, invalidations in the same reactor turn. It
also builds entries from origin responses (TTL pipeline, tags, the headers clients get) and from
stored rows.

Invalidations that happen while an origin response is on its way are kept in a short log, by
sequence number: when the response arrives, :meth:`CacheContents.keep` checks it against those that
came after its request was sent. A hard one that matches means it is not stored; a soft one means
it is stored already stale (``soft``), never as fresh. The log holds only what running fetches may
need (it is emptied whenever none runs).

At start (:meth:`CacheContents.load`) rows are read *unverified* (used only after a successful
revalidation) until :meth:`CacheContents.confirm`, which the edge calls once the first catch-up
with the master is applied; rows written under another log id than the state's are dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from edgeauth.config import CacheSettings
from edgeauth.edge.cache.persist import CachePersister, StoredRow
from edgeauth.edge.cache.policy import (
    Selector,
    Timing,
    group_headers,
    parse_selector,
    parse_tags,
    timing,
    values,
)
from edgeauth.edge.cache.store import CacheStore, Entry, Invalidation
from edgeauth.edge.metrics import EdgeMetrics
from edgeauth.edge.ttl import TTLContext, TTLPipeline, resolve_ttl

__all__ = ["CacheContents"]

log = Logger()

_NOT_SERVED: Final = frozenset({b"age", b"x-cache", b"content-length", b"transfer-encoding"})
_MAX_UNCACHEABLE: Final = 10000
_MAX_LOG: Final = 4096


@attrs.frozen
class _Invalidated:
    seq: int
    selector: Selector
    soft: bool
    at: float


class CacheContents:
    """The cache's entries in memory and on disk, kept in step (module docstring).

    Args:
        clock: the time source.
        settings: the ``[cache]`` section.
        ttl: the TTL pipeline.
        run_interaction: the edge store's ``run_interaction`` (persistence), or None.
        log_id: the state's current log id.
        metrics: the edge's metrics, or None.
        uncacheable_for: how long a key whose response could not be stored skips collapsing.
    """

    def __init__(
        self,
        clock: IReactorTime,
        settings: CacheSettings,
        ttl: TTLPipeline,
        *,
        run_interaction: Callable[..., Any] | None,
        log_id: Callable[[], str | None],
        metrics: EdgeMetrics | None,
        uncacheable_for: float,
    ) -> None:
        self.clock = clock
        self.ttl = ttl
        self.tag_header = settings.tag_header.lower().encode("ascii")
        self.strip_tag_header = settings.strip_tag_header
        self.uncacheable_for = uncacheable_for
        self.store = CacheStore(settings.max_entries, settings.max_bytes)
        self.persister = (
            None if run_interaction is None else CachePersister(run_interaction, clock, log_id)
        )
        self.metrics = metrics
        self.confirmed = True
        self.seq = 0
        self._drop = _NOT_SERVED | ({self.tag_header} if self.strip_tag_header else set())
        self._log: list[_Invalidated] = []
        self._log_floor = 0
        self._uncacheable: OrderedDict[str, float] = OrderedDict()

    # -- building entries ------------------------------------------------------------------------

    def build(
        self,
        *,
        key: str,
        variant: str,
        vary: tuple[bytes, ...],
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        request_time: float,
        client_ip: str,
        path: bytes,
    ) -> Entry:
        """An entry for a response received now, its lifetime through the TTL pipeline."""
        now = self.clock.seconds()

        def pipeline(granted: float) -> float:
            ctx = TTLContext(
                client_ip=client_ip, method=b"GET", path=path, response_headers=headers, now=now
            )
            return resolve_ttl(ctx, granted, self.ttl)

        when = timing(headers, request_time, now, pipeline)
        return self._make(key, variant, vary, status, reason, headers, body, when, now)

    def _make(
        self,
        key: str,
        variant: str,
        vary: tuple[bytes, ...],
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        when: Timing,
        stored_at: float,
        *,
        soft: bool = False,
        verified: bool = True,
        tags: tuple[str, ...] | None = None,
    ) -> Entry:
        etags = values(headers, b"etag")
        modified = values(headers, b"last-modified")
        return Entry(
            key=key,
            variant=variant,
            vary=vary,
            status=status,
            reason=reason,
            headers=tuple(headers),
            serve_headers=group_headers(headers, self._drop),
            body=body,
            tags=parse_tags(values(headers, self.tag_header)) if tags is None else tags,
            request_time=when.request_time,
            response_time=when.response_time,
            initial_age=when.initial_age,
            ttl=when.ttl,
            fresh_until=when.fresh_until,
            stale_until=when.stale_until,
            error_until=when.error_until,
            must_revalidate=when.must_revalidate,
            no_cache=when.no_cache,
            etag=etags[0] if etags else None,
            last_modified=modified[0] if modified else None,
            stored_at=stored_at,
            soft=soft,
            verified=verified,
        )

    def _from_row(self, row: StoredRow) -> Entry:
        meta = row.meta
        when = Timing(
            request_time=meta["request_time"],
            response_time=meta["response_time"],
            initial_age=meta["initial_age"],
            ttl=meta["ttl"],
            fresh_until=row.fresh_until,
            stale_until=meta["stale_until"],
            error_until=meta["error_until"],
            must_revalidate=meta["must_revalidate"],
            no_cache=meta["no_cache"],
        )
        return self._make(
            row.key,
            row.variant,
            tuple(n.encode("latin-1") for n in meta["vary"]),
            meta["status"],
            meta["reason"].encode("latin-1"),
            [(n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["headers"]],
            row.body,
            when,
            row.stored_at,
            soft=row.soft,
            verified=False,
            tags=tuple(meta["tags"]),
        )

    # -- storing -----------------------------------------------------------------------------

    def keep(self, started: int, entry: Entry) -> int | None:
        """Store ``entry``, fetched by a request sent at invalidation seq ``started``.

        Returns:
            The seq of a hard invalidation that matched it since (it is not stored then), or
            None. A soft one stores it stale.
        """
        hard: int | None = None
        soft_at: float | None = None
        if started < self._log_floor:
            hard = self._log_floor  # too old to know what it missed: do not store
        for inv in self._log:
            if inv.seq > started and inv.selector.matches(entry.key, entry.tags):
                if inv.soft:
                    soft_at = inv.at if soft_at is None else min(soft_at, inv.at)
                else:
                    hard = inv.seq if hard is None else max(hard, inv.seq)
        if hard is not None:
            return hard
        if soft_at is not None:
            entry.fresh_until = min(entry.fresh_until, soft_at)
            entry.soft = True
        self.put(entry)
        return None

    def put(self, entry: Entry) -> None:
        """Store ``entry`` in memory and queue its row (and the removal of what it displaced)."""
        evicted = self.store.evictions
        removed = self.store.put(entry)
        if self.metrics is not None and self.store.evictions != evicted:
            self.metrics.cache_evictions.inc(self.store.evictions - evicted)
        if removed == [entry]:
            return
        persister = self.persister
        if persister is None:
            return
        same_row = False
        for old in removed:
            if old.key == entry.key and old.variant == entry.variant and old.body is entry.body:
                same_row = True  # a 304 refresh: rewrite the times and headers, not the body
            else:
                persister.delete(old)
        if same_row:
            persister.update(entry)
        else:
            persister.put(entry)

    def drop(self, entry: Entry) -> None:
        """Remove an entry the origin no longer lets us store."""
        if self.store.remove(entry) and self.persister is not None:
            self.persister.delete(entry)

    def mark_uncacheable(self, fill_id: str) -> None:
        """Let requests for ``fill_id`` skip collapsing for a while (it was not storable)."""
        marks = self._uncacheable
        marks[fill_id] = self.clock.seconds() + self.uncacheable_for
        marks.move_to_end(fill_id)
        while len(marks) > _MAX_UNCACHEABLE:
            marks.popitem(last=False)

    def is_uncacheable(self, fill_id: str, now: float) -> bool:
        """Whether ``fill_id`` was recently found not storable."""
        until = self._uncacheable.get(fill_id)
        if until is None:
            return False
        if until > now:
            return True
        del self._uncacheable[fill_id]
        return False

    # -- invalidation ---------------------------------------------------------------------------

    def invalidate(
        self, selector: Selector, *, soft: bool, fetching: bool, local: bool = False
    ) -> Invalidation:
        """Drop or soften every variant of every selected key, and submit that to disk now.

        Args:
            selector: what to invalidate.
            soft: mark stale instead of dropping.
            fetching: whether origin fetches are running (the invalidation is then logged for
                :meth:`keep`).
            local: this edge's own decision (an unsafe request), not counted as an event.
        """
        now = self.clock.seconds()
        self.seq += 1
        if fetching:
            self._log.append(_Invalidated(self.seq, selector, soft, now))
        result = self.store.invalidate(selector, soft=soft, now=now)
        persister = self.persister
        if persister is not None:
            if selector.all and not soft:
                persister.clear()
            elif selector.all:
                persister.soften_all(now)
            else:
                for entry in result.removed:
                    persister.delete(entry)
                for entry in result.softened:
                    persister.soften(entry)
                persister.flush()
        if self.metrics is not None and not local:
            kind = "soft" if soft else "hard"
            self.metrics.cache_invalidations.labels(kind=kind).inc()
            self.metrics.cache_invalidated_entries.labels(kind=kind).inc(
                len(result.removed) + len(result.softened)
            )
        return result

    def trim_log(self, oldest_running: int | None) -> None:
        """Forget invalidations no running fetch can miss (``None``: no fetch runs)."""
        if oldest_running is None:
            self._log.clear()
            self._log_floor = self.seq
        elif len(self._log) > _MAX_LOG:
            self._log = [inv for inv in self._log if inv.seq > oldest_running]
            if len(self._log) > _MAX_LOG:
                self._log_floor = self._log[len(self._log) // 2].seq
                self._log = [inv for inv in self._log if inv.seq > self._log_floor]

    def forget_uncacheable(self) -> None:
        """Forget which keys were found not storable (after a snapshot bootstrap)."""
        self._uncacheable.clear()

    def confirm(self) -> None:
        """The first catch-up is applied: entries read at start may be used as they are."""
        if self.confirmed:
            return
        self.confirmed = True
        for entry in self.store:
            entry.verified = True

    # -- start and stop -----------------------------------------------------------------------

    async def load(self, log_id: str | None) -> int:
        """Read the stored entries (unverified until :meth:`confirm`); return how many."""
        persister = self.persister
        if persister is None:
            return 0
        loaded = await persister.load(self.clock.seconds())
        if loaded.rows and loaded.log_id != log_id:
            await persister.drop_all(log_id)
            log.info("dropped {n} cached entries of another log", n=len(loaded.rows))
            return 0
        for row in loaded.rows:
            for old in self.store.put(self._from_row(row)):
                persister.delete(old)
        count = len(self.store)
        self.confirmed = count == 0
        log.info(
            "response cache loaded: {n} entries ({expired} expired ones deleted)",
            n=count,
            expired=loaded.expired,
        )
        return count

    async def close(self) -> None:
        """Write what is queued."""
        if self.persister is not None:
            await self.persister.close()

    # -- views ----------------------------------------------------------------------------------

    def explain_url(self, url: str) -> dict[str, Any] | None:
        """The stored variants of ``url`` (host/path, scheme://host/path, or /path on any host)."""
        host, target = parse_selector(url)
        store = self.store
        keys = [host + target] if host is not None else store.keys_for_target(target)
        keys = [k for k in keys if store.variants(k)]
        if not keys:
            return None
        now = self.clock.seconds()
        variants = sorted(store.variants(keys[0]), key=lambda e: -e.stored_at)
        first = variants[0]
        return {
            "key": keys[0],
            "state": first.state(now),
            "age": round(first.age(now), 3),
            "ttl": round(first.ttl, 3),
            "expires_in": round(first.fresh_until - now, 3),
            "tags": sorted({t for e in variants for t in e.tags}),
            "variants": [_variant_doc(e, now) for e in variants],
            "other_keys": keys[1:],
        }


def _variant_doc(entry: Entry, now: float) -> dict[str, Any]:
    return {
        "variant": entry.variant,
        "vary": [n.decode("latin-1") for n in entry.vary],
        "status": entry.status,
        "state": entry.state(now),
        "age": round(entry.age(now), 3),
        "ttl": round(entry.ttl, 3),
        "expires_in": round(entry.fresh_until - now, 3),
        "stale_for": round(max(0.0, entry.stale_until - max(now, entry.fresh_until)), 3),
        "soft_purged": entry.soft,
        "tags": list(entry.tags),
        "bytes": len(entry.body),
    }
