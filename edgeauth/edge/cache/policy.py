"""The edge cache's rules: keys, variants, what to store, for how long, and what may be served.

Everything here is a pure function of header pairs and of times passed in (ARCHITECTURE.md
decision 7); the RFC 9111 parsing itself lives in :mod:`edgeauth.wire.cachecontrol`.

Keys (PROTOCOL.md §6): ``host + path + query``, e.g. ``shop.example/products/1?page=2``. The host
is the request's ``Host``, lowercased, without a default ``:80``. The target is the request target
as sent, with percent-encoding normalised (RFC 3986 §6.2.2): hex digits uppercased, escapes of
unreserved characters decoded, and characters that may not appear in a target (space, quotes,
non-ASCII...) escaped. So ``/a%2Fb`` stays distinct from ``/a/b`` and an operator's key
``/a b`` names the request target ``/a%20b``. The query is kept as sent (not sorted).

Selectors (the ``keys`` and ``prefixes`` of a ``cache_invalidated`` event) are either host-qualified
(``shop.example/products``, also ``http://shop.example/products``) or start with ``/``: such a
selector names that path and query on every host. A key matches one target exactly (``/`` is only
the root page); a prefix matches every key that starts with it as a string (so the prefix ``/``
matches everything). Tags match whole tags only.

Variants: a stored response with ``Vary`` is filed under the key plus the request's values of the
listed fields, normalised (repeated lines joined, whitespace around commas dropped, lowercased for
the ``Accept*`` fields, whose values are case-insensitive); an absent field differs from an
empty one.

Timing: the freshness lifetime the origin grants (``s-maxage``, ``max-age``, ``Expires``,
heuristics) goes through the TTL pipeline (PROTOCOL.md §7) unless the response says ``no-cache``;
the corrected initial age (``Age``, ``Date``, transit time) is subtracted, so a response that
arrives already stale is stored stale, never fresh. ``must-revalidate``, ``proxy-revalidate`` and
``s-maxage`` (which implies ``proxy-revalidate`` for a shared cache) forbid serving stale, so they
switch off ``stale-while-revalidate``, ``stale-if-error`` and stale serving after a soft purge.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import attrs
from twisted.web.http_headers import Headers

from edgeauth.wire.cachecontrol import (
    current_age,
    freshness_lifetime,
    is_storable,
    parse_cache_control,
    parse_http_date,
    parse_vary,
    request_directives,
    request_wants_revalidation,
)

__all__ = [
    "NO_RULES",
    "RequestRules",
    "Selector",
    "Timing",
    "group_headers",
    "header_pairs",
    "merge_not_modified",
    "not_modified",
    "parse_selector",
    "parse_tags",
    "request_key",
    "request_rules",
    "split_key",
    "storable",
    "timing",
    "values",
    "variant_key",
    "vary_names",
]

Pairs = Sequence[tuple[bytes, bytes]]

_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_KEEP: Final = _UNRESERVED | frozenset(b"!$&'()*+,;=:@/?")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_PLAIN: Final = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@/?]*\Z")
_CASELESS: Final = frozenset({b"accept", b"accept-charset", b"accept-encoding", b"accept-language"})
_NOT_MERGED: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"content-range", b"connection"}
)


# -- keys ---------------------------------------------------------------------------------------


def normalise_target(raw: bytes) -> str:
    """Return ``raw`` (a request target) with normalised percent-encoding (module docstring)."""
    if _PLAIN.match(raw):
        return raw.decode("ascii")
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == 0x25 and i + 2 < n and raw[i + 1] in _HEX and raw[i + 2] in _HEX:
            value = int(raw[i + 1 : i + 3], 16)
            out += bytes((value,)) if value in _UNRESERVED else b"%%%02X" % value
            i += 3
            continue
        out += bytes((c,)) if c in _KEEP else b"%%%02X" % c
        i += 1
    if not out.startswith(b"/"):
        out[:0] = b"/"
    return out.decode("ascii")


def normalise_host(host: bytes) -> str:
    """Lowercase ``host`` and drop a default ``:80`` (and a trailing dot)."""
    host = host.strip().lower()
    if host.endswith(b":80"):
        host = host[:-3]
    return host.rstrip(b".").decode("latin-1")


def request_key(host: bytes, uri: bytes) -> str:
    """Return the cache key of a request for ``uri`` with ``Host: host``."""
    if not uri.startswith(b"/"):
        # absolute-form (RFC 9112 §3.2.2): the authority in the target wins.
        scheme, sep, rest = uri.partition(b"://")
        if sep:
            authority, slash, path = rest.partition(b"/")
            host, uri = authority, slash + path
        if not uri.startswith(b"/"):
            uri = b"/" + uri
    return normalise_host(host) + normalise_target(uri)


def split_key(key: str) -> tuple[str, str]:
    """Split a key into its host and its target."""
    slash = key.find("/")
    return key[:slash], key[slash:]


def parse_selector(text: str) -> tuple[str | None, str]:
    """Parse an operator's key, prefix or URL into ``(host or None, target)``.

    ``/path?query`` has no host (it applies on every host); ``host/path`` and
    ``scheme://host/path`` have one; a bare ``host`` means its root ``/``.
    """
    if text.startswith("/"):
        return None, normalise_target(text.partition("#")[0].encode("utf-8"))
    _, sep, rest = text.partition("://")
    if not sep:
        rest = text
    host, slash, path = rest.partition("/")
    host = host.rpartition("@")[2]  # no userinfo in a key
    path = path.partition("#")[0]
    target = normalise_target((slash + path).encode("utf-8")) if slash else "/"
    return normalise_host(host.encode("utf-8")), target


# -- selectors ---------------------------------------------------------------------------------


@attrs.frozen
class Selector:
    """What one invalidation matches: whole tags, exact keys, key prefixes, or everything.

    Attributes:
        tags: whole tags.
        keys: ``(host or None, target)``: that target on that host (on any host for None).
        prefixes: ``(host or None, target prefix)``.
        all: everything.
    """

    tags: frozenset[str] = frozenset()
    keys: tuple[tuple[str | None, str], ...] = ()
    prefixes: tuple[tuple[str | None, str], ...] = ()
    all: bool = False

    @classmethod
    def parse(
        cls, tags: Iterable[str], keys: Iterable[str], prefixes: Iterable[str], everything: bool
    ) -> Selector:
        """Build a selector from the lists of a ``cache_invalidated`` event."""
        return cls(
            frozenset(t.strip() for t in tags if t.strip()),
            tuple(parse_selector(k) for k in keys),
            tuple(parse_selector(p) for p in prefixes),
            everything,
        )

    def matches(self, key: str, tags: Iterable[str]) -> bool:
        """Whether the entry filed under ``key`` and carrying ``tags`` is selected."""
        if self.all or not self.tags.isdisjoint(tags):
            return True
        host, target = split_key(key)
        for want_host, want in self.keys:
            if target == want and want_host in (None, host):
                return True
        for want_host, want in self.prefixes:
            if want_host is None:
                if target.startswith(want):
                    return True
            elif key.startswith(want_host + want):
                return True
        return False


# -- headers -------------------------------------------------------------------------------------


def values(headers: Pairs, name: bytes) -> list[bytes]:
    """The values of field ``name`` (lowercase) in ``headers``."""
    return [v for k, v in headers if k.lower() == name]


def header_pairs(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Flatten a Twisted ``Headers`` into ``(lowercase name, value)`` pairs."""
    return [(name.lower(), v) for name, vs in headers.getAllRawHeaders() for v in vs]


def group_headers(
    headers: Pairs, drop: Iterable[bytes] = ()
) -> tuple[tuple[bytes, list[bytes]], ...]:
    """Group ``headers`` by name, in order of first appearance, leaving out ``drop``."""
    dropped = frozenset(drop)
    grouped: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        if name not in dropped:
            grouped.setdefault(name, []).append(value)
    return tuple(grouped.items())


def parse_tags(raw: Sequence[bytes]) -> tuple[str, ...]:
    """Split the tag header's values on commas; whitespace trimmed, empty tags and repeats gone."""
    tags = (t.strip() for value in raw for t in value.decode("utf-8", "replace").split(","))
    return tuple(dict.fromkeys(t for t in tags if t))


def variant_key(vary: Sequence[bytes], headers: Headers) -> str:
    """Return the variant of a request under a response's ``vary`` field names (lowercase)."""
    if not vary:
        return ""
    parts = []
    for name in vary:
        raw = headers.getRawHeaders(name)
        if raw is None:
            parts.append(name)
            continue
        items = (item.strip(b" \t") for value in raw for item in value.split(b","))
        joined = b",".join(item for item in items if item)
        if name in _CASELESS:
            joined = joined.lower()
        parts.append(name + b"=" + joined)
    return b"\n".join(parts).decode("latin-1")


# -- what to store, for how long -------------------------------------------------------------------


def storable(
    status: int, request_headers: Pairs, response_headers: Pairs, max_object_bytes: int
) -> bool:
    """Whether a response to a GET may be stored (RFC 9111 §3, §3.5, and our Set-Cookie rule).

    A ``Content-Length`` above ``max_object_bytes`` is refused here; a body without one is
    checked as it arrives.
    """
    if not is_storable(b"GET", status, request_headers, response_headers):
        return False
    for length in values(response_headers, b"content-length"):
        if not length.strip().isdigit() or int(length) > max_object_bytes:
            return False
    return True


@attrs.frozen(kw_only=True)
class Timing:
    """When a stored response was received and until when it may be used without the origin.

    Attributes:
        request_time: when the request that fetched it was sent.
        response_time: when the response arrived.
        initial_age: its corrected initial age at ``response_time`` (RFC 9111 §4.2.3).
        ttl: the freshness lifetime after the TTL pipeline.
        fresh_until: the end of freshness (``response_time - initial_age + ttl``).
        stale_until: until when it may be served stale while one refresh runs
            (``stale-while-revalidate``, and after a soft purge); ``fresh_until`` without it.
        error_until: until when it may be served stale when the origin fails (``stale-if-error``).
        must_revalidate: stale serving is forbidden.
        no_cache: every use needs a successful revalidation.
    """

    request_time: float
    response_time: float
    initial_age: float
    ttl: float
    fresh_until: float
    stale_until: float
    error_until: float
    must_revalidate: bool
    no_cache: bool


def timing(
    headers: Pairs,
    request_time: float,
    response_time: float,
    pipeline: Callable[[float], float],
) -> Timing:
    """Compute a response's :class:`Timing`; ``pipeline`` maps the granted lifetime to a TTL."""
    cc = parse_cache_control(values(headers, b"cache-control"))
    age = current_age(headers, response_time, request_time, response_time)
    ttl = 0.0 if cc.no_cache else max(0.0, pipeline(freshness_lifetime(headers, response_time)))
    fresh_until = response_time - age + ttl
    must = cc.must_revalidate or cc.proxy_revalidate or cc.s_maxage is not None or cc.no_cache
    swr = 0 if must or cc.stale_while_revalidate is None else cc.stale_while_revalidate
    sie = 0 if must or cc.stale_if_error is None else cc.stale_if_error
    return Timing(
        request_time=request_time,
        response_time=response_time,
        initial_age=age,
        ttl=ttl,
        fresh_until=fresh_until,
        stale_until=fresh_until + swr,
        error_until=fresh_until + sie,
        must_revalidate=must,
        no_cache=cc.no_cache,
    )


def merge_not_modified(stored: Pairs, fresh: Pairs) -> list[tuple[bytes, bytes]]:
    """Update stored headers with those of a 304 (RFC 9111 §3.2, §4.3.4).

    Every field the 304 carries replaces the stored field of that name, except the framing fields.
    The stored ``Age`` goes: the age now starts from the 304 (and its own ``Age``, if any).
    """
    replaced = {name for name, _ in fresh if name not in _NOT_MERGED} | {b"age"}
    merged = [(n, v) for n, v in stored if n not in replaced]
    merged += [(n, v) for n, v in fresh if n in replaced]
    return merged


# -- what may answer a request -------------------------------------------------------------


@attrs.frozen
class RequestRules:
    """What a request's Cache-Control / Pragma ask of the cache (RFC 9111 §5.2.1).

    Attributes:
        revalidate: ``no-cache``, ``max-age=0`` or ``Pragma: no-cache``: ask the origin.
        max_age: the oldest stored response the client accepts.
        min_fresh: the freshness the client wants left.
        no_store: store nothing of this exchange.
        only_if_cached: answer from the cache or with 504.
    """

    revalidate: bool = False
    max_age: int | None = None
    min_fresh: int | None = None
    no_store: bool = False
    only_if_cached: bool = False


NO_RULES: Final = RequestRules()


def request_rules(headers: Headers) -> RequestRules:
    """Read a request's caching directives (:data:`NO_RULES` when it has none)."""
    cache_control = headers.getRawHeaders(b"cache-control")
    if cache_control is None and not headers.hasHeader(b"pragma"):
        return NO_RULES
    pairs = [(b"cache-control", v) for v in cache_control or ()]
    pairs += [(b"pragma", v) for v in headers.getRawHeaders(b"pragma", ())]
    cc = request_directives(pairs)
    return RequestRules(
        revalidate=request_wants_revalidation(pairs),
        max_age=cc.max_age,
        min_fresh=cc.min_fresh,
        no_store=cc.no_store,
        only_if_cached=cc.only_if_cached,
    )


def _entity_tags(raw: Sequence[bytes]) -> list[bytes]:
    tags = []
    for value in raw:
        for item in value.split(b","):
            item = item.strip()
            if item:
                tags.append(item[2:] if item.startswith(b"W/") else item)
    return tags


def not_modified(headers: Headers, etag: bytes | None, last_modified: bytes | None) -> bool:
    """Whether a client's conditional GET is answered by 304 (RFC 9110 §13.1.2, §13.1.3).

    ``If-None-Match`` uses the weak comparison and, when present, decides alone.
    """
    inm = headers.getRawHeaders(b"if-none-match")
    if inm is not None:
        if etag is None:
            return False
        tags = _entity_tags(inm)
        plain = etag[2:] if etag.startswith(b"W/") else etag
        return b"*" in tags or plain in tags
    ims = headers.getRawHeaders(b"if-modified-since")
    if ims is None or last_modified is None:
        return False
    since = parse_http_date(ims[0])
    modified = parse_http_date(last_modified)
    return since is not None and modified is not None and modified <= since


def vary_names(headers: Pairs) -> tuple[bytes, ...] | None:
    """The lowercase field names of a response's ``Vary`` (None for ``Vary: *``)."""
    names = parse_vary(values(headers, b"vary"))
    return None if names is None else tuple(n.encode("latin-1") for n in names)
