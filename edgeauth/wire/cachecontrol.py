# Code to read the HTTP caching fields and to apply the storage and freshness
# rules of a shared cache.
#
# Spec: RFC 9111 (HTTP Caching) sections 3 and 3.5 (storing, Authorization),
# 4.1 (Vary), 4.2.1-4.2.3 (freshness lifetime, heuristics, age), 5.1 (Age),
# 5.2 (Cache-Control), 5.3 (Expires), 5.4 (Pragma); RFC 9110 sections 5.6.1
# (lists), 5.6.2-5.6.4 (token, quoted-string) and 5.6.7 (dates).
#
# Strategy: everything is a pure function of header pairs and, where time
# matters, a `now` passed in; nothing reads the clock and nothing raises on
# what a peer sends. Where the input is broken, we pick the reading that
# caches less, because a wrong miss costs an origin request and a wrong hit
# leaks one user's response to another:
# - Lists are split on commas outside quoted strings. Each field line is split
#   on its own (same result as joining well-formed lines), so an unterminated
#   quote cannot swallow the directives of the next line; within a line, an
#   unterminated quote falls back to splitting the rest on every comma, so it
#   cannot hide a later `no-store` either.
# - A malformed element whose name is a restrictive directive (no-store,
#   no-cache, private, must-revalidate, proxy-revalidate) still counts; a
#   malformed permissive one (public, immutable, only-if-cached) is dropped;
#   unknown directives are ignored (RFC 9111 §5.2.3).
# - max-age / s-maxage that are not delta-seconds, or repeated with different
#   values, set `invalid_freshness`: the response is stale (§4.2.1, §1.2.2).
#   Qualified no-cache / private are treated as unqualified, as the note in
#   §5.2.2.4 says caches often do and §5.2.2.7 permits.
# - Delta-seconds past 2**31 are clamped to 2**31 (§1.2.2); longer digit runs
#   are never handed to int().
# - Dates are parsed strictly (case-sensitive names, GMT only). A bad Expires
#   means already expired (§5.3), a bad Last-Modified gives no heuristic
#   lifetime, and a bad Date is replaced by the time of receipt.
# - A Vary member that is not a token is treated like "*": a field we cannot
#   name cannot be matched (§4.1).
# must-understand needs no code: we honour no-store, which senders pair with
# it, and store no status code whose caching rules we do not implement.
"""Parse Cache-Control, Vary, Age and HTTP dates; decide storability and freshness (RFC 9111)."""

from __future__ import annotations

import calendar
import math
import re
import time
from collections.abc import Sequence
from typing import Final

import attrs
from attrs.validators import instance_of, optional

__all__ = [
    "HEURISTIC_STATUSES",
    "MAX_DELTA_SECONDS",
    "MAX_HEURISTIC_LIFETIME",
    "CacheControl",
    "Headers",
    "age_value",
    "current_age",
    "format_http_date",
    "freshness_lifetime",
    "is_storable",
    "parse_cache_control",
    "parse_http_date",
    "parse_vary",
    "request_directives",
    "request_wants_revalidation",
]

Headers = Sequence[tuple[bytes, bytes]]
"""Raw header pairs as received: names in any case, a name possibly repeated."""

MAX_DELTA_SECONDS: Final = 2**31
"""The value larger delta-seconds are clamped to (RFC 9111 §1.2.2)."""

MAX_HEURISTIC_LIFETIME: Final = 86400.0
"""The cap on a heuristic freshness lifetime, in seconds (one day)."""

HEURISTIC_STATUSES: Final = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
"""Status codes that are heuristically cacheable (RFC 9110 §15.1)."""

_HEURISTIC_FRACTION: Final = 0.1
_DELTA_DIGITS: Final = len(str(MAX_DELTA_SECONDS))
_TOKEN: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_OWS: Final = " \t"
_TOKEN_RE: Final = re.compile(_TOKEN, re.ASCII)
_DIGITS_RE: Final = re.compile(r"[0-9]+", re.ASCII)
_ELEMENT_RE: Final = re.compile(
    rf'({_TOKEN})(?:=(?:({_TOKEN})|"((?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]'
    r'|\\[\t \x21-\x7e\x80-\xff])*)"))?',
    re.ASCII,
)
_UNESCAPE_RE: Final = re.compile(r"\\(.)", re.DOTALL)

_DELTA_NAMES: Final = frozenset(
    {"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error", "max-stale", "min-fresh"}
)
_RESTRICTIVE: Final = frozenset(
    {"no-store", "no-cache", "private", "must-revalidate", "proxy-revalidate"}
)
_PERMISSIVE: Final = frozenset({"public", "immutable", "only-if-cached"})
_BOOL: Final = instance_of(bool)
_SECONDS: Final = optional(instance_of(int))
_NAMES: Final = instance_of(tuple)


@attrs.frozen(kw_only=True)
class CacheControl:
    """The directives of one message's Cache-Control fields (RFC 9111 §5.2).

    Integer fields are delta-seconds, ``None`` when absent or unusable.

    Attributes:
        max_age: ``max-age``, in a response or a request.
        s_maxage: ``s-maxage`` (response).
        no_store: ``no-store`` (response or request).
        no_cache: ``no-cache``, qualified or not (response or request).
        no_cache_fields: The lowercased field names of a qualified ``no-cache``.
        private: ``private``, qualified or not (response).
        private_fields: The lowercased field names of a qualified ``private``.
        public: ``public`` (response).
        must_revalidate: ``must-revalidate`` (response).
        proxy_revalidate: ``proxy-revalidate`` (response).
        stale_while_revalidate: ``stale-while-revalidate`` (RFC 5861); ``None``
            also when invalid or repeated with different values.
        stale_if_error: ``stale-if-error`` (RFC 5861), ``None`` as above.
        immutable: ``immutable`` (RFC 8246, response).
        invalid_freshness: ``max-age`` or ``s-maxage`` was present but not
            delta-seconds, or repeated with different values; the message is to
            be treated as if it carried ``max-age=0``.
        max_stale: ``max-stale`` (request); ``math.inf`` when given without a
            value; the smallest valid value when repeated.
        min_fresh: ``min-fresh`` (request); the largest valid value when repeated.
        only_if_cached: ``only-if-cached`` (request).
    """

    max_age: int | None = attrs.field(default=None, validator=_SECONDS)
    s_maxage: int | None = attrs.field(default=None, validator=_SECONDS)
    no_store: bool = attrs.field(default=False, validator=_BOOL)
    no_cache: bool = attrs.field(default=False, validator=_BOOL)
    no_cache_fields: tuple[str, ...] = attrs.field(default=(), validator=_NAMES)
    private: bool = attrs.field(default=False, validator=_BOOL)
    private_fields: tuple[str, ...] = attrs.field(default=(), validator=_NAMES)
    public: bool = attrs.field(default=False, validator=_BOOL)
    must_revalidate: bool = attrs.field(default=False, validator=_BOOL)
    proxy_revalidate: bool = attrs.field(default=False, validator=_BOOL)
    stale_while_revalidate: int | None = attrs.field(default=None, validator=_SECONDS)
    stale_if_error: int | None = attrs.field(default=None, validator=_SECONDS)
    immutable: bool = attrs.field(default=False, validator=_BOOL)
    invalid_freshness: bool = attrs.field(default=False, validator=_BOOL)
    max_stale: float | None = attrs.field(default=None, validator=optional(instance_of(float)))
    min_fresh: int | None = attrs.field(default=None, validator=_SECONDS)
    only_if_cached: bool = attrs.field(default=False, validator=_BOOL)


# -- lists and directives ----------------------------------------------------------------


def _split_list(line: str) -> list[str]:
    """Split one field line into its non-empty list members (RFC 9110 §5.6.1)."""
    items: list[str] = []
    start = 0
    quote_at = -1  # where the open quoted string starts, -1 when outside one
    i = 0
    n = len(line)
    while i < n:
        c = line[i]
        if quote_at >= 0:
            if c == "\\":
                i += 1
            elif c == '"':
                quote_at = -1
        elif c == '"':
            quote_at = i
        elif c == ",":
            items.append(line[start:i])
            start = i + 1
        i += 1
    if quote_at >= 0:
        # Unterminated: there is no unescaped quote after quote_at, so
        # splitting the rest on every comma is a single linear pass.
        items.extend(line[start:].split(","))
    else:
        items.append(line[start:])
    return [item for item in (raw.strip(_OWS) for raw in items) if item]


def _directives(values: Sequence[bytes]) -> list[tuple[str, str | None, bool]]:
    """Return ``(lowercased name, argument, well_formed)`` for each list member."""
    out: list[tuple[str, str | None, bool]] = []
    for value in values:
        for item in _split_list(value.decode("latin-1")):
            m = _ELEMENT_RE.fullmatch(item)
            if m is not None:
                name, token, quoted = m.groups()
                if quoted is not None:
                    arg: str | None = _UNESCAPE_RE.sub(r"\1", quoted)
                else:
                    arg = token
                out.append((name.lower(), arg, True))
                continue
            head = _TOKEN_RE.match(item)
            if head is not None:
                out.append((head.group().lower(), None, False))
    return out


def _delta(text: str | None) -> int | None:
    """Parse delta-seconds (RFC 9111 §1.2.2), clamped; ``None`` if it is not one."""
    if text is None or _DIGITS_RE.fullmatch(text) is None:
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > _DELTA_DIGITS:
        return MAX_DELTA_SECONDS
    return min(int(digits), MAX_DELTA_SECONDS)


def _field_names(text: str) -> tuple[str, ...]:
    names = (item.lower() for item in _split_list(text) if _TOKEN_RE.fullmatch(item))
    return tuple(dict.fromkeys(names))


def parse_cache_control(values: Sequence[bytes]) -> CacheControl:
    """Parse the values of all Cache-Control field lines of one message.

    Never raises: malformed members are skipped, except that a malformed
    restrictive directive still counts and a malformed ``max-age`` or
    ``s-maxage`` sets ``invalid_freshness`` (see the module comment).

    Args:
        values: The raw field values, in the order they were received.

    Returns:
        The directives found.
    """
    flags: set[str] = set()
    fields: dict[str, dict[str, None]] = {"no-cache": {}, "private": {}}
    deltas: dict[str, list[int | None]] = {}
    for name, arg, ok in _directives(values):
        if name in _DELTA_NAMES:
            parsed = _delta(arg) if ok else None
            if name == "max-stale" and ok and arg is None:
                parsed = -1  # "any staleness"; real values are never negative
            deltas.setdefault(name, []).append(parsed)
        elif name in _RESTRICTIVE:
            flags.add(name)
            if ok and arg is not None and name in fields:
                fields[name].update(dict.fromkeys(_field_names(arg)))
        elif name in _PERMISSIVE and ok and arg is None:
            flags.add(name)

    invalid = False
    exact: dict[str, int | None] = {}
    for name in ("max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"):
        seen = deltas.get(name)
        if seen and (None in seen or len(set(seen)) > 1):
            invalid = invalid or name in ("max-age", "s-maxage")
        elif seen:
            exact[name] = seen[0]
    stale = [v for v in deltas.get("max-stale", ()) if v is not None]
    fresh = [v for v in deltas.get("min-fresh", ()) if v is not None]
    return CacheControl(
        max_age=exact.get("max-age"),
        s_maxage=exact.get("s-maxage"),
        no_store="no-store" in flags,
        no_cache="no-cache" in flags,
        no_cache_fields=tuple(fields["no-cache"]),
        private="private" in flags,
        private_fields=tuple(fields["private"]),
        public="public" in flags,
        must_revalidate="must-revalidate" in flags,
        proxy_revalidate="proxy-revalidate" in flags,
        stale_while_revalidate=exact.get("stale-while-revalidate"),
        stale_if_error=exact.get("stale-if-error"),
        immutable="immutable" in flags,
        invalid_freshness=invalid,
        max_stale=float(min(v if v >= 0 else math.inf for v in stale)) if stale else None,
        min_fresh=max(fresh) if fresh else None,
        only_if_cached="only-if-cached" in flags,
    )


def parse_vary(values: Sequence[bytes]) -> tuple[str, ...] | None:
    """Parse the values of all Vary field lines (RFC 9110 §12.5.5).

    Args:
        values: The raw field values.

    Returns:
        The lowercased field names, without repeats, in order of first
        appearance (empty when there is no Vary); ``None`` for ``Vary: *``, and
        also when a member is not a field name, since such a member cannot be
        matched either.
    """
    names: dict[str, None] = {}
    for value in values:
        for item in _split_list(value.decode("latin-1")):
            if item == "*" or _TOKEN_RE.fullmatch(item) is None:
                return None
            names[item.lower()] = None
    return tuple(names)


def age_value(values: Sequence[bytes]) -> int:
    """Parse the Age field (RFC 9111 §5.1).

    A list-valued Age counts by its first member; anything that is not
    delta-seconds is ignored.

    Args:
        values: The raw field values.

    Returns:
        The age in seconds, clamped to ``MAX_DELTA_SECONDS``; 0 when absent or
        invalid.
    """
    if not values:
        return 0
    first = values[0].decode("latin-1").split(",", 1)[0].strip(_OWS)
    return _delta(first) or 0


# -- dates ----------------------------------------------------------------------------------

_DAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_LONG_DAYS: Final = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS: Final = tuple("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split())
_MON: Final = "|".join(_MONTHS)
_TIME: Final = "([0-9]{2}):([0-9]{2}):([0-9]{2})"
_IMF_RE: Final = re.compile(
    rf"(?:{'|'.join(_DAYS)}), ([0-9]{{2}}) ({_MON}) ([0-9]{{4}}) {_TIME} GMT", re.ASCII
)
_RFC850_RE: Final = re.compile(
    rf"(?:{'|'.join(_LONG_DAYS)}), ([0-9]{{2}})-({_MON})-([0-9]{{2}}) {_TIME} GMT", re.ASCII
)
_ASCTIME_RE: Final = re.compile(
    rf"(?:{'|'.join(_DAYS)}) ({_MON}) ([0-9]{{2}}| [0-9]) {_TIME} ([0-9]{{4}})", re.ASCII
)


def _two_digit_year(yy: int, now: float | None) -> int:
    """Expand an RFC 850 year (RFC 9110 §5.6.7)."""
    if now is not None and math.isfinite(now):
        try:
            this_year = time.gmtime(now).tm_year
        except (OverflowError, OSError, ValueError):
            pass
        else:
            year = this_year - this_year % 100 + yy
            return year - 100 if year > this_year + 50 else year
    return 2000 + yy if yy < 70 else 1900 + yy


def parse_http_date(value: bytes, *, now: float | None = None) -> float | None:
    """Parse an HTTP-date (RFC 9110 §5.6.7) in any of its three formats.

    Accepts IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``), the obsolete
    RFC 850 form (``Sunday, 06-Nov-94 08:49:37 GMT``) and asctime
    (``Sun Nov  6 08:49:37 1994``), with surrounding whitespace. Names are
    case-sensitive as the grammar says; the weekday is not checked against the
    date.

    Args:
        value: The raw field value.
        now: The current Unix time, used to expand the two-digit year of the
            RFC 850 form as the RFC requires; without it, 00-69 mean 2000-2069.

    Returns:
        The Unix time, or ``None`` if the value is not a valid HTTP-date.
    """
    text = value.decode("latin-1").strip(_OWS)
    if m := _IMF_RE.fullmatch(text):
        day, mon, year, hh, mm, ss = m.groups()
        y = int(year)
    elif m := _RFC850_RE.fullmatch(text):
        day, mon, year, hh, mm, ss = m.groups()
        y = _two_digit_year(int(year), now)
    elif m := _ASCTIME_RE.fullmatch(text):
        mon, day, hh, mm, ss, year = m.groups()
        y = int(year)
    else:
        return None
    month = _MONTHS.index(mon) + 1
    d, h, mi, s = int(day), int(hh), int(mm), int(ss)
    if y < 1 or not 1 <= d <= calendar.monthrange(y, month)[1]:
        return None
    if h > 23 or mi > 59 or s > 60:  # 60: a leap second
        return None
    return float(calendar.timegm((y, month, d, h, mi, s, 0, 0, 0)))


def format_http_date(t: float) -> bytes:
    """Format a Unix time as an IMF-fixdate, dropping fractions of a second.

    Args:
        t: The Unix time.

    Returns:
        For example ``b"Sun, 06 Nov 1994 08:49:37 GMT"``.

    Raises:
        ValueError: If ``t`` is not finite or falls outside the years 1-9999.
    """
    if not math.isfinite(t):
        raise ValueError(f"not a finite time: {t!r}")
    try:
        tm = time.gmtime(math.floor(t))
    except (OverflowError, OSError, ValueError) as e:
        raise ValueError(f"time out of range: {t!r}") from e
    if not 1 <= tm.tm_year <= 9999:
        raise ValueError(f"time out of range: {t!r}")
    return (
        f"{_DAYS[tm.tm_wday]}, {tm.tm_mday:02d} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year:04d} "
        f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} GMT"
    ).encode("ascii")


# -- storing, freshness, age -----------------------------------------------------------------


def _values(headers: Headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def _first_date(headers: Headers, name: bytes, now: float | None) -> float | None:
    values = _values(headers, name)
    return parse_http_date(values[0], now=now) if values else None


def request_directives(request_headers: Headers) -> CacheControl:
    """Parse the Cache-Control fields of a request (RFC 9111 §5.2.1).

    Args:
        request_headers: The request's header pairs.

    Returns:
        The request's directives.
    """
    return parse_cache_control(_values(request_headers, b"cache-control"))


def request_wants_revalidation(request_headers: Headers) -> bool:
    """Tell whether a request asks that no stored response be used unvalidated.

    True for ``no-cache``, ``max-age=0`` (or a ``max-age`` that is invalid,
    read as 0), and for ``Pragma: no-cache`` when the request has no
    Cache-Control field (RFC 9111 §5.4).

    Args:
        request_headers: The request's header pairs.

    Returns:
        Whether the cache must revalidate (or refetch) before answering.
    """
    cache_control = _values(request_headers, b"cache-control")
    if not cache_control:
        pragma = _directives(_values(request_headers, b"pragma"))
        return any(name == "no-cache" for name, _, _ in pragma)
    cc = parse_cache_control(cache_control)
    return cc.no_cache or cc.max_age == 0 or cc.invalid_freshness


def is_storable(
    method: bytes, status: int, request_headers: Headers, response_headers: Headers
) -> bool:
    """Tell whether a shared cache may, and should, store a response (RFC 9111 §3, §3.5).

    Stored are only responses to GET (a HEAD is answered from the GET entry)
    whose status is final, neither 206 nor 304 (we do not combine partial
    content), with neither ``no-store`` (in the response or the request) nor
    ``private`` (qualified or not), and whose Vary is not ``*``. A request with
    Authorization needs ``public``, ``s-maxage`` or ``must-revalidate`` in the
    response.

    Our policy beyond the RFC: a response with Set-Cookie is stored only when
    ``public`` or ``s-maxage`` says it may be shared, since the cookie would
    otherwise go to every client. Statuses that are not heuristically
    cacheable need explicit freshness (max-age, s-maxage or Expires, valid or
    not); ``public`` alone is not enough for them. A heuristically cacheable
    response without explicit freshness is stored only if it has a validator
    (Last-Modified, from which the heuristic lifetime comes, or ETag): with
    lifetime 0 and nothing to revalidate with, an entry is never usable. For
    the same reason a ``no-cache`` response without a validator is not stored.

    Args:
        method: The request method, e.g. ``b"GET"``.
        status: The response status code.
        request_headers: The request's header pairs.
        response_headers: The response's header pairs.

    Returns:
        Whether to store the response.
    """
    if method != b"GET" or not 200 <= status <= 599 or status in (206, 304):
        return False
    cc = parse_cache_control(_values(response_headers, b"cache-control"))
    if cc.no_store or cc.private or request_directives(request_headers).no_store:
        return False
    if parse_vary(_values(response_headers, b"vary")) is None:
        return False
    shared = cc.public or cc.s_maxage is not None
    if _values(request_headers, b"authorization") and not (shared or cc.must_revalidate):
        return False
    if _values(response_headers, b"set-cookie") and not shared:
        return False
    validator = bool(
        _values(response_headers, b"etag") or _values(response_headers, b"last-modified")
    )
    if cc.no_cache and not validator:
        return False
    explicit = (
        cc.max_age is not None
        or cc.s_maxage is not None
        or cc.invalid_freshness
        or bool(_values(response_headers, b"expires"))
    )
    if explicit:
        return True
    return status in HEURISTIC_STATUSES and validator


def freshness_lifetime(
    response_headers: Headers, now: float, *, status: int | None = None
) -> float:
    """Compute a response's freshness lifetime for a shared cache (RFC 9111 §4.2.1, §4.2.2).

    The first that applies: ``s-maxage``; ``max-age``; Expires minus Date
    (0 if Expires is invalid or repeated with different values); a heuristic
    of 10% of Date minus Last-Modified, capped at one day (0 without
    Last-Modified). Invalid ``max-age`` / ``s-maxage`` give 0. A missing or
    invalid Date counts as ``now``.

    Args:
        response_headers: The response's header pairs.
        now: The current Unix time (the time of receipt for a new response).
        status: The status code; when given and not heuristically cacheable,
            no heuristic lifetime is used. Leave it out for a response that
            :func:`is_storable` accepted, which already checked this.

    Returns:
        The lifetime in seconds, never negative.
    """
    cc = parse_cache_control(_values(response_headers, b"cache-control"))
    if cc.invalid_freshness:
        return 0.0
    if cc.s_maxage is not None:
        return float(cc.s_maxage)
    if cc.max_age is not None:
        return float(cc.max_age)
    date = _first_date(response_headers, b"date", now)
    if date is None:
        date = now
    expires = _values(response_headers, b"expires")
    if expires:
        if len({value.strip(b" \t") for value in expires}) > 1:
            return 0.0
        expiry = parse_http_date(expires[0], now=now)
        return 0.0 if expiry is None else max(0.0, expiry - date)
    if status is not None and status not in HEURISTIC_STATUSES:
        return 0.0
    modified = _first_date(response_headers, b"last-modified", now)
    if modified is None:
        return 0.0
    return min(MAX_HEURISTIC_LIFETIME, max(0.0, (date - modified) * _HEURISTIC_FRACTION))


def current_age(
    response_headers: Headers, response_time: float, request_time: float, now: float
) -> float:
    """Compute a stored response's current age (RFC 9111 §4.2.3).

    Negative intervals (a clock that went back) count as 0.

    Args:
        response_headers: The stored response's header pairs.
        response_time: When the response was received.
        request_time: When the request that caused it was sent.
        now: The current Unix time.

    Returns:
        The age in seconds.
    """
    date = _first_date(response_headers, b"date", now)
    apparent_age = 0.0 if date is None else max(0.0, response_time - date)
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = age_value(_values(response_headers, b"age")) + response_delay
    corrected_initial_age = max(apparent_age, corrected_age_value)
    resident_time = max(0.0, now - response_time)
    return corrected_initial_age + resident_time
