"""The edge cache's entries in memory: variants per key, LRU bounds, and the invalidation indexes.

:class:`CacheStore` is sans-io: it never reads a clock (times are passed in) and never writes to
disk (it returns what it removed, and the caller persists that).

- Entries are filed by key, then by variant (:mod:`edgeauth.edge.cache.policy`). All variants of a
  key share the key's ``Vary`` names; storing a response whose ``Vary`` differs replaces the others.
- One LRU order over all variants bounds both ``max_entries`` and ``max_bytes``; a lookup that
  serves an entry moves it to the young end, a put evicts from the old end.
- Invalidation indexes, each kept in step on every put, removal and eviction, so an invalidation
  costs in proportion to what it matches and a lookup never scans anything:
  ``tag → entries`` (whole tags), ``host + target`` and ``target + NUL + host`` in two sorted
  lists (host-qualified and host-less keys and prefixes). Every variant of a matched key goes.
- A hard invalidation removes entries; a soft one sets ``fresh_until`` to ``min(fresh_until,
  now)`` and marks them ``soft``. It never moves ``stale_until`` or ``error_until``, so purging
  twice, or purging an entry that is already stale, never lengthens the time it may be served.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Iterator

import attrs
from twisted.web.http_headers import Headers

from edgeauth.edge.cache.policy import RequestRules, Selector, variant_key

__all__ = ["CacheStore", "Entry", "Invalidation", "SortedStrings"]

ENTRY_OVERHEAD = 512
"""Bytes charged per entry on top of its body and headers (objects, index slots)."""


@attrs.define(eq=False, kw_only=True)
class Entry:
    """One stored response (one variant of one key).

    The times are those of :class:`edgeauth.edge.cache.policy.Timing`; ``soft`` is set by a soft
    purge; ``verified`` is false for an entry read from disk at start until the first catch-up
    with the master is done (until then it is used only after a successful revalidation).
    """

    key: str
    variant: str
    vary: tuple[bytes, ...]
    status: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    serve_headers: tuple[tuple[bytes, list[bytes]], ...]
    body: bytes
    tags: tuple[str, ...]
    request_time: float
    response_time: float
    initial_age: float
    ttl: float
    fresh_until: float
    stale_until: float
    error_until: float
    must_revalidate: bool
    no_cache: bool
    etag: bytes | None
    last_modified: bytes | None
    stored_at: float
    soft: bool = False
    verified: bool = True
    size: int = 0
    header_template: dict[bytes, list[bytes]] | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.size:
            headers = sum(len(n) + len(v) for n, v in self.headers)
            self.size = len(self.body) + headers + ENTRY_OVERHEAD

    def age(self, now: float) -> float:
        """The current age (RFC 9111 §4.2.3)."""
        return self.initial_age + max(0.0, now - self.response_time)

    def fresh_for(self, now: float, rules: RequestRules) -> bool:
        """Whether it may answer a request with ``rules`` without the origin, as fresh."""
        if not self.verified or now >= self.fresh_until:
            return False
        if rules.max_age is not None and self.age(now) > rules.max_age:
            return False
        return rules.min_fresh is None or self.fresh_until - now >= rules.min_fresh

    def stale_servable(self, now: float) -> bool:
        """Whether it may be served stale while one refresh runs."""
        return self.verified and not self.must_revalidate and now < self.stale_until

    def usable_on_error(self, now: float) -> bool:
        """Whether it may be served when the origin fails (``stale-if-error``)."""
        return (
            self.verified
            and not self.must_revalidate
            and now < max(self.error_until, self.stale_until)
        )

    def state(self, now: float) -> str:
        """One of fresh, stale, soft-purged, expired, unverified (see the class docstring)."""
        if not self.verified:
            return "unverified"
        if now < self.fresh_until:
            return "fresh"
        if self.soft:
            return "soft-purged"
        return "stale" if self.stale_servable(now) else "expired"


@attrs.frozen
class Invalidation:
    """What one invalidation did: entries removed, entries softened, keys matched.

    For ``all`` (``everything``), ``keys`` is left empty: every key matched.
    """

    removed: list[Entry]
    softened: list[Entry]
    keys: set[str]
    everything: bool = False


class SortedStrings:
    """A sorted multiset-free list of strings in chunks: O(log n) add/discard, prefix scans."""

    _LOAD = 512

    def __init__(self) -> None:
        self._lists: list[list[str]] = []
        self._maxes: list[str] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def add(self, value: str) -> None:
        """Insert ``value`` (the caller never adds one twice)."""
        self._len += 1
        maxes = self._maxes
        if not maxes:
            self._lists.append([value])
            maxes.append(value)
            return
        i = bisect_left(maxes, value)
        if i == len(maxes):
            i -= 1
            chunk = self._lists[i]
            chunk.append(value)
            maxes[i] = value
        else:
            chunk = self._lists[i]
            insort(chunk, value)
        if len(chunk) > 2 * self._LOAD:
            half = self._LOAD
            self._lists[i : i + 1] = [chunk[:half], chunk[half:]]
            maxes[i : i + 1] = [chunk[half - 1], chunk[-1]]

    def discard(self, value: str) -> None:
        """Remove ``value`` if present."""
        i = bisect_left(self._maxes, value)
        if i == len(self._maxes):
            return
        chunk = self._lists[i]
        j = bisect_left(chunk, value)
        if j == len(chunk) or chunk[j] != value:
            return
        del chunk[j]
        self._len -= 1
        if not chunk:
            del self._lists[i]
            del self._maxes[i]
        elif j == len(chunk):
            self._maxes[i] = chunk[-1]

    def starting_with(self, prefix: str) -> list[str]:
        """Every value that starts with ``prefix``, in order."""
        out: list[str] = []
        lists = self._lists
        i = bisect_left(self._maxes, prefix)
        if i == len(lists):
            return out
        j = bisect_left(lists[i], prefix)
        while i < len(lists):
            chunk = lists[i]
            while j < len(chunk):
                value = chunk[j]
                if not value.startswith(prefix):
                    return out
                out.append(value)
                j += 1
            i, j = i + 1, 0
        return out

    def __iter__(self) -> Iterator[str]:
        for chunk in self._lists:
            yield from chunk


class _Group:
    """The variants of one key."""

    __slots__ = ("vary", "variants")

    def __init__(self, vary: tuple[bytes, ...]) -> None:
        self.vary = vary
        self.variants: dict[str, Entry] = {}


class CacheStore:
    """Entries in memory with LRU bounds and tag/key/prefix indexes (module docstring)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        """Hold at most ``max_entries`` entries and ``max_bytes`` bytes (see ``Entry.size``)."""
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._groups: dict[str, _Group] = {}
        self._lru: OrderedDict[Entry, None] = OrderedDict()
        self._tags: dict[str, set[Entry]] = {}
        self._by_key = SortedStrings()
        self._by_target = SortedStrings()

    def __len__(self) -> int:
        return len(self._lru)

    def __iter__(self) -> Iterator[Entry]:
        """Entries from least to most recently used."""
        return iter(list(self._lru))

    @property
    def key_count(self) -> int:
        """How many keys have at least one variant."""
        return len(self._groups)

    # -- lookups ---------------------------------------------------------------------------------

    def lookup(self, key: str, headers: Headers) -> tuple[Entry | None, str]:
        """The variant of ``key`` that a request with ``headers`` selects, and its variant key."""
        group = self._groups.get(key)
        if group is None:
            return None, ""
        if not group.vary:
            return group.variants.get(""), ""
        variant = variant_key(group.vary, headers)
        return group.variants.get(variant), variant

    def get(self, key: str, variant: str) -> Entry | None:
        """The entry stored for ``key`` and ``variant``."""
        group = self._groups.get(key)
        return None if group is None else group.variants.get(variant)

    def variants(self, key: str) -> list[Entry]:
        """Every stored variant of ``key``."""
        group = self._groups.get(key)
        return [] if group is None else list(group.variants.values())

    def keys_for_target(self, target: str) -> list[str]:
        """The keys of ``target`` on every host."""
        return [self._from_target(s) for s in self._by_target.starting_with(target + "\x00")]

    def touch(self, entry: Entry) -> None:
        """Mark ``entry`` as just used."""
        self._lru.move_to_end(entry)

    # -- changes ---------------------------------------------------------------------------------

    def put(self, entry: Entry) -> list[Entry]:
        """Store ``entry``; return the entries that left (replaced, other Vary, evicted)."""
        removed: list[Entry] = []
        if entry.size > self.max_bytes:
            return [entry]
        group = self._groups.get(entry.key)
        if group is not None:
            if group.vary != entry.vary:
                olds = list(group.variants.values())
            else:
                same = group.variants.get(entry.variant)
                olds = [] if same is None else [same]
            for old in olds:
                self._remove(old)
                removed.append(old)
            group = self._groups.get(entry.key)
        if group is None:
            group = self._groups[entry.key] = _Group(entry.vary)
            self._by_key.add(entry.key)
            self._by_target.add(self._target_of(entry.key))
        group.variants[entry.variant] = entry
        self._lru[entry] = None
        self.bytes += entry.size
        for tag in entry.tags:
            self._tags.setdefault(tag, set()).add(entry)
        lru = self._lru
        while len(lru) > self.max_entries or self.bytes > self.max_bytes:
            victim = next(iter(lru))
            if victim is entry:
                break
            self._remove(victim)
            self.evictions += 1
            removed.append(victim)
        return removed

    def remove(self, entry: Entry) -> bool:
        """Remove ``entry`` if it is still stored; return whether it was."""
        group = self._groups.get(entry.key)
        if group is None or group.variants.get(entry.variant) is not entry:
            return False
        self._remove(entry)
        return True

    def _remove(self, entry: Entry) -> None:
        group = self._groups[entry.key]
        del group.variants[entry.variant]
        del self._lru[entry]
        self.bytes -= entry.size
        for tag in entry.tags:
            holders = self._tags[tag]
            holders.discard(entry)
            if not holders:
                del self._tags[tag]
        if not group.variants:
            del self._groups[entry.key]
            self._by_key.discard(entry.key)
            self._by_target.discard(self._target_of(entry.key))

    def clear(self) -> list[Entry]:
        """Remove everything; return what was stored."""
        gone = list(self._lru)
        self._groups.clear()
        self._lru.clear()
        self._tags.clear()
        self._by_key = SortedStrings()
        self._by_target = SortedStrings()
        self.bytes = 0
        return gone

    # -- invalidation -----------------------------------------------------------------------------

    def matching_keys(self, selector: Selector) -> set[str]:
        """The keys an invalidation selects (every variant of each goes with it)."""
        if selector.all:
            return set(self._groups)
        keys: set[str] = set()
        for tag in selector.tags:
            keys.update(entry.key for entry in self._tags.get(tag, ()))
        for host, target in selector.keys:
            if host is None:
                keys.update(self.keys_for_target(target))
            elif host + target in self._groups:
                keys.add(host + target)
        for host, target in selector.prefixes:
            if host is None:
                keys.update(self._from_target(s) for s in self._by_target.starting_with(target))
            else:
                keys.update(self._by_key.starting_with(host + target))
        return keys

    def invalidate(self, selector: Selector, *, soft: bool, now: float) -> Invalidation:
        """Drop (hard) or mark stale (soft) every variant of every selected key."""
        if selector.all:
            if not soft:
                return Invalidation(self.clear(), [], set(), everything=True)
            for entry in self._lru:
                if entry.fresh_until > now:
                    entry.fresh_until = now
                entry.soft = True
            return Invalidation([], list(self._lru), set(), everything=True)
        keys = self.matching_keys(selector)
        removed: list[Entry] = []
        softened: list[Entry] = []
        for key in keys:
            for entry in list(self._groups[key].variants.values()):
                if soft:
                    entry.fresh_until = min(entry.fresh_until, now)
                    entry.soft = True
                    softened.append(entry)
                else:
                    self._remove(entry)
                    removed.append(entry)
        return Invalidation(removed, softened, keys)

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _target_of(key: str) -> str:
        slash = key.find("/")
        return key[slash:] + "\x00" + key[:slash]

    @staticmethod
    def _from_target(indexed: str) -> str:
        target, _, host = indexed.partition("\x00")
        return host + target

    def check(self) -> None:
        """Raise AssertionError unless every index agrees with the entries (for tests)."""
        entries = set(self._lru)
        grouped = {e for g in self._groups.values() for e in g.variants.values()}
        assert entries == grouped, "LRU and groups disagree"
        tagged = {e for holders in self._tags.values() for e in holders}
        assert tagged == {e for e in entries if e.tags}, "tag index disagrees"
        for tag, holders in self._tags.items():
            assert holders and all(tag in e.tags for e in holders), f"tag {tag!r} is stale"
        assert sorted(self._groups) == list(self._by_key), "key index disagrees"
        assert sorted(self._target_of(k) for k in self._groups) == list(self._by_target)
        assert self.bytes == sum(e.size for e in entries), "byte count disagrees"
        assert len(entries) <= self.max_entries and self.bytes <= self.max_bytes
