"""Tests for edgeauth.wire.cachecontrol: caching fields, storability and freshness."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeauth.wire.cachecontrol import (
    HEURISTIC_STATUSES,
    MAX_DELTA_SECONDS,
    MAX_HEURISTIC_LIFETIME,
    CacheControl,
    Headers,
    age_value,
    current_age,
    format_http_date,
    freshness_lifetime,
    is_storable,
    parse_cache_control,
    parse_http_date,
    parse_vary,
    request_directives,
    request_wants_revalidation,
)

# Sun, 06 Nov 1994 08:49:37 GMT, the RFC's example date.
T0 = 784111777.0
T0_IMF = b"Sun, 06 Nov 1994 08:49:37 GMT"
NOW = T0 + 1000.0


def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


def d(t: float) -> str:
    return format_http_date(t).decode("ascii")


# -- Cache-Control ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], {}),
        ([b""], {}),
        ([b"max-age=60"], {"max_age": 60}),
        ([b"MAX-AGE=60, Public"], {"max_age": 60, "public": True}),
        ([b' max-age="60" ,\tno-store '], {"max_age": 60, "no_store": True}),
        ([b"max-age=60", b"s-maxage=30"], {"max_age": 60, "s_maxage": 30}),
        ([b",, ,max-age=60,,"], {"max_age": 60}),
        ([b'ext="a, no-store, b", max-age=5'], {"max_age": 5}),
        ([b'ext="q\\"uo\\\\te, public", private'], {"private": True}),
        ([b"foo, bar=baz, max-age=7"], {"max_age": 7}),
        ([b'no-cache="Set-Cookie"'], {"no_cache": True, "no_cache_fields": ("set-cookie",)}),
        (
            [b'no-cache="Set-Cookie, X-Foo", no-cache'],
            {"no_cache": True, "no_cache_fields": ("set-cookie", "x-foo")},
        ),
        ([b"private=Set-Cookie"], {"private": True, "private_fields": ("set-cookie",)}),
        (
            [b'max-age="6\\0", no-cache="Set\\-Cookie"'],
            {"max_age": 60, "no_cache": True, "no_cache_fields": ("set-cookie",)},
        ),
        ([b"max-age=abc"], {"invalid_freshness": True}),
        ([b"max-age=-1"], {"invalid_freshness": True}),
        ([b"max-age=1.5"], {"invalid_freshness": True}),
        ([b"max-age"], {"invalid_freshness": True}),
        ([b"max-age = 60"], {"invalid_freshness": True}),
        ([b"s-maxage=x, max-age=60"], {"invalid_freshness": True, "max_age": 60}),
        ([b"max-age=60, max-age=60"], {"max_age": 60}),
        ([b"max-age=60", b"max-age=120"], {"invalid_freshness": True}),
        ([b"max-age=abc, max-age=60"], {"invalid_freshness": True}),
        ([b"max-age=99999999999999999999999"], {"max_age": MAX_DELTA_SECONDS}),
        ([b"max-age=" + b"9" * 5000], {"max_age": MAX_DELTA_SECONDS}),
        ([b"max-age=000060"], {"max_age": 60}),
        (
            [b"stale-while-revalidate=30, stale-if-error=600"],
            {"stale_while_revalidate": 30, "stale_if_error": 600},
        ),
        ([b"stale-if-error=x, stale-while-revalidate=1, stale-while-revalidate=2"], {}),
        ([b"no-store=1, must-revalidate junk"], {"no_store": True, "must_revalidate": True}),
        ([b'private="Set-Cookie, no-store'], {"private": True, "no_store": True}),
        ([b'x="open', b"no-store"], {"no_store": True}),
        ([b"public=yes, immutable=1, only-if-cached=2"], {}),
        ([b"no-storex, publicity, max-agent=5"], {}),
        ([b"proxy-revalidate, immutable"], {"proxy_revalidate": True, "immutable": True}),
        ([b"max-stale"], {"max_stale": math.inf}),
        ([b"max-stale, max-stale=5, min-fresh=3, min-fresh=9"], {"max_stale": 5.0, "min_fresh": 9}),
        ([b"max-stale=abc, min-fresh=x"], {}),
        ([b"only-if-cached"], {"only_if_cached": True}),
        ([b"=5, \x00no-store, \xff\xfe"], {}),
    ],
)
def test_parse_cache_control(values: list[bytes], expected: dict[str, Any]) -> None:
    """Each Cache-Control table row parses to exactly the expected directives."""
    assert parse_cache_control(values) == CacheControl(**expected)


def test_request_directives_reads_only_cache_control() -> None:
    """request_directives collects every Cache-Control line, whatever the name's case."""
    headers = h(
        ("cache-control", "max-stale=10"), ("Pragma", "no-cache"), ("CACHE-CONTROL", "no-store")
    )
    assert request_directives(headers) == CacheControl(max_stale=10.0, no_store=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], False),
        ([("Cache-Control", "no-cache")], True),
        ([("Cache-Control", "max-age=0")], True),
        ([("Cache-Control", "max-age=abc")], True),
        ([("Cache-Control", "max-age=60")], False),
        ([("Pragma", "no-cache")], True),
        ([("Pragma", "No-Cache, foo")], True),
        ([("Pragma", "foo")], False),
        ([("Pragma", "no-cache"), ("Cache-Control", "max-age=60")], False),
    ],
)
def test_request_wants_revalidation(headers: list[tuple[str, str]], expected: bool) -> None:
    """no-cache, max-age=0 and a Pragma without Cache-Control ask for revalidation."""
    assert request_wants_revalidation(h(*headers)) is expected


# -- dates ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        T0_IMF,
        b"Sunday, 06-Nov-94 08:49:37 GMT",
        b"Sun Nov  6 08:49:37 1994",
        b"Sun Nov 06 08:49:37 1994",
        b"  " + T0_IMF + b"\t",
    ],
)
def test_parse_http_date_formats(value: bytes) -> None:
    """IMF-fixdate, RFC 850 and asctime all give the same instant."""
    assert parse_http_date(value) == T0


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"0",
        b"-1",
        b"784111777",
        b"Sun, 06 Nov 1994 08:49:37 UTC",
        b"sun, 06 nov 1994 08:49:37 GMT",
        b"Sun, 6 Nov 1994 08:49:37 GMT",
        b"Sun, 31 Feb 1994 08:49:37 GMT",
        b"Sun, 06 Nov 1994 24:00:00 GMT",
        b"Sun, 06 Nov 1994 08:60:00 GMT",
        b"Sun, 06 Nov 1994 08:49 GMT",
        b"Sun, 06 Nov 0000 08:49:37 GMT",
        b"Sun, 06 Nov 1994 08:49:37 GMT junk",
        b"Sundae, 06-Nov-94 08:49:37 GMT",
        "Sun, \u0660\u0666 Nov 1994 08:49:37 GMT".encode(),
        b"\xff\xfe\x00",
    ],
)
def test_parse_http_date_garbage(value: bytes) -> None:
    """Anything that is not one of the three formats gives None."""
    assert parse_http_date(value) is None


def test_parse_http_date_leap_second() -> None:
    """A leap second (:60) is accepted."""
    assert parse_http_date(b"Sat, 31 Dec 2016 23:59:60 GMT") == 1483228800.0


def test_rfc850_two_digit_year() -> None:
    """Two-digit years more than 50 years ahead of now fall back a century."""
    in_2030 = parse_http_date(b"Thursday, 01-Jan-70 00:00:00 GMT", now=1893456000.0)
    assert in_2030 == parse_http_date(b"Thu, 01 Jan 2070 00:00:00 GMT")
    in_2000 = parse_http_date(b"Thursday, 01-Jan-81 00:00:00 GMT", now=946684800.0)
    assert in_2000 == parse_http_date(b"Thu, 01 Jan 1981 00:00:00 GMT")
    assert parse_http_date(b"Thursday, 01-Jan-70 00:00:00 GMT") == 0.0


def test_format_http_date() -> None:
    """format_http_date writes IMF-fixdate and drops fractions of a second."""
    assert format_http_date(T0 + 0.9) == T0_IMF
    assert format_http_date(0) == b"Thu, 01 Jan 1970 00:00:00 GMT"


@pytest.mark.parametrize("t", [math.inf, -math.inf, math.nan, 1e20, -1e20])
def test_format_http_date_out_of_range(t: float) -> None:
    """Times that are not finite or outside the years 1-9999 are refused."""
    with pytest.raises(ValueError):
        format_http_date(t)


@given(st.integers(min_value=-62135596800, max_value=253402300799))
def test_http_date_round_trip(t: int) -> None:
    """Formatting a whole-second time and parsing it back gives the same time."""
    assert parse_http_date(format_http_date(t)) == t


# -- Vary and Age ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], ()),
        ([b""], ()),
        ([b"Accept-Encoding"], ("accept-encoding",)),
        ([b"Accept-Encoding, User-Agent"], ("accept-encoding", "user-agent")),
        ([b"accept-encoding", b"ACCEPT-ENCODING, Origin"], ("accept-encoding", "origin")),
        ([b" , Accept ,"], ("accept",)),
        ([b"*"], None),
        ([b"Accept", b" * "], None),
        ([b"Accept Encoding"], None),
        ([b'"Accept"'], None),
    ],
)
def test_parse_vary(values: list[bytes], expected: tuple[str, ...] | None) -> None:
    """Vary gives lowercased unique names; *, or a member that is no name, gives None."""
    assert parse_vary(values) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], 0),
        ([b"5"], 5),
        ([b" 7 "], 7),
        ([b"5, 6"], 5),
        ([b"5", b"9"], 5),
        ([b"abc"], 0),
        ([b"-1"], 0),
        ([b""], 0),
        ([b"1e3"], 0),
        ([b"99999999999999999999"], MAX_DELTA_SECONDS),
    ],
)
def test_age_value(values: list[bytes], expected: int) -> None:
    """Age uses the first member of the first line; anything else invalid is 0."""
    assert age_value(values) == expected


# -- storability ------------------------------------------------------------------------------

AUTH = ("Authorization", "Bearer x")
COOKIE = ("Set-Cookie", "sid=1")
ETAG = ("ETag", '"v1"')
LAST_MODIFIED = ("Last-Modified", d(T0 - 3600))


@pytest.mark.parametrize(
    ("method", "status", "req", "resp", "expected"),
    [
        (b"GET", 200, [], [("Cache-Control", "max-age=60")], True),
        (b"GET", 200, [], [("Cache-Control", "max-age=60, no-store")], False),
        (b"GET", 200, [], [("Cache-Control", "NO-STORE")], False),
        (b"GET", 200, [("Cache-Control", "no-store")], [("Cache-Control", "max-age=60")], False),
        (b"GET", 200, [], [("Cache-Control", "private, max-age=60")], False),
        (b"GET", 200, [], [("Cache-Control", 'private="Set-Cookie", max-age=60')], False),
        (b"GET", 200, [], [("Cache-Control", "max-age=60"), ("Vary", "*")], False),
        (b"GET", 200, [], [("Cache-Control", "max-age=60"), ("Vary", "Accept, *")], False),
        (b"GET", 200, [], [("Cache-Control", "max-age=60"), ("Vary", "Accept-Encoding")], True),
        (b"GET", 200, [], [("Cache-Control", "max-age=60"), COOKIE], False),
        (b"GET", 200, [], [("Cache-Control", "public, max-age=60"), COOKIE], True),
        (b"GET", 200, [], [("Cache-Control", "s-maxage=60"), COOKIE], True),
        (b"GET", 200, [AUTH], [("Cache-Control", "max-age=60")], False),
        (b"GET", 200, [AUTH], [("Cache-Control", "public, max-age=60")], True),
        (b"GET", 200, [AUTH], [("Cache-Control", "s-maxage=60")], True),
        (b"GET", 200, [AUTH], [("Cache-Control", "must-revalidate, max-age=60")], True),
        (b"GET", 200, [("authorization", "")], [("Cache-Control", "max-age=60")], False),
        (b"POST", 200, [], [("Cache-Control", "max-age=60")], False),
        (b"HEAD", 200, [], [("Cache-Control", "max-age=60")], False),
        (b"get", 200, [], [("Cache-Control", "max-age=60")], False),
        (b"GET", 206, [], [("Cache-Control", "max-age=60")], False),
        (b"GET", 304, [], [("Cache-Control", "max-age=60")], False),
        (b"GET", 100, [], [("Cache-Control", "max-age=60")], False),
        (b"GET", 500, [], [LAST_MODIFIED, ETAG], False),
        (b"GET", 500, [], [("Cache-Control", "public"), LAST_MODIFIED], False),
        (b"GET", 500, [], [("Cache-Control", "max-age=5")], True),
        (b"GET", 302, [], [("Expires", d(T0))], True),
        (b"GET", 302, [], [LAST_MODIFIED], False),
        (b"GET", 200, [], [("Cache-Control", "max-age=abc")], True),
        (b"GET", 200, [], [LAST_MODIFIED], True),
        (b"GET", 404, [], [ETAG], True),
        (b"GET", 200, [], [], False),
        (b"GET", 200, [], [("Cache-Control", "public")], False),
        (b"GET", 200, [], [("Cache-Control", "no-cache, max-age=60")], False),
        (b"GET", 200, [], [("Cache-Control", "no-cache, max-age=60"), ETAG], True),
    ],
)
def test_is_storable(
    method: bytes,
    status: int,
    req: list[tuple[str, str]],
    resp: list[tuple[str, str]],
    expected: bool,
) -> None:
    """Each storability table row gets the shared-cache decision it documents."""
    assert is_storable(method, status, h(*req), h(*resp)) is expected


@pytest.mark.parametrize("status", sorted(HEURISTIC_STATUSES))
def test_heuristic_statuses_store_with_validator(status: int) -> None:
    """Every heuristically cacheable status is stored with only a validator."""
    assert is_storable(b"GET", status, [], h(LAST_MODIFIED))


# -- freshness and age ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (
            [
                ("Cache-Control", "s-maxage=10, max-age=20"),
                ("Expires", d(T0 + 30)),
                ("Date", d(T0)),
            ],
            10.0,
        ),
        ([("Cache-Control", "max-age=20"), ("Expires", d(T0 + 30)), ("Date", d(T0))], 20.0),
        ([("Cache-Control", "max-age=0"), ("Expires", d(T0 + 30))], 0.0),
        ([("Expires", d(T0 + 30)), ("Date", d(T0))], 30.0),
        ([("Expires", d(NOW + 30))], 30.0),
        ([("Expires", d(T0 + 30)), ("Date", "garbage")], 0.0),
        ([("Expires", d(T0 - 30)), ("Date", d(T0))], 0.0),
        ([("Expires", "0"), ("Date", d(T0)), LAST_MODIFIED], 0.0),
        ([("Expires", d(T0 + 30)), ("Expires", d(T0 + 60)), ("Date", d(T0))], 0.0),
        ([("Expires", d(T0 + 30)), ("Expires", d(T0 + 30)), ("Date", d(T0))], 30.0),
        ([("Cache-Control", "max-age=abc, s-maxage=10"), ("Expires", d(T0 + 30))], 0.0),
        ([("Cache-Control", "max-age=5"), ("Cache-Control", "max-age=6")], 0.0),
        ([("Date", d(T0)), ("Last-Modified", d(T0 - 1000))], 100.0),
        ([("Last-Modified", d(NOW - 1000))], 100.0),
        ([("Date", d(T0)), ("Last-Modified", d(T0 - 30 * 86400))], MAX_HEURISTIC_LIFETIME),
        ([("Date", d(T0)), ("Last-Modified", d(T0 + 1000))], 0.0),
        ([("Date", d(T0)), ("Last-Modified", "yesterday")], 0.0),
        ([("Date", d(T0))], 0.0),
        ([("Cache-Control", "public")], 0.0),
    ],
)
def test_freshness_lifetime(response: list[tuple[str, str]], expected: float) -> None:
    """s-maxage beats max-age beats Expires - Date beats the heuristic; invalid is 0."""
    assert freshness_lifetime(h(*response), NOW) == expected


def test_freshness_heuristic_depends_on_status() -> None:
    """With a status given, only heuristically cacheable ones get a heuristic lifetime."""
    headers = h(("Date", d(T0)), ("Last-Modified", d(T0 - 1000)))
    assert freshness_lifetime(headers, NOW, status=200) == 100.0
    assert freshness_lifetime(headers, NOW, status=500) == 0.0
    explicit = h(("Cache-Control", "max-age=9"))
    assert freshness_lifetime(explicit, NOW, status=500) == 9.0


def test_current_age_apparent_age() -> None:
    """The age is the larger of the apparent and corrected Age, plus the resident time."""
    headers = h(("Date", d(T0 - 10)), ("Age", "5"))
    assert current_age(headers, response_time=T0, request_time=T0 - 2, now=T0 + 100) == 110.0


def test_current_age_from_age_field() -> None:
    """An Age field larger than the apparent age wins, corrected by the response delay."""
    headers = h(("Date", d(T0)), ("Age", "50"))
    assert current_age(headers, response_time=T0, request_time=T0 - 2, now=T0 + 100) == 152.0


def test_current_age_without_date_and_with_skew() -> None:
    """No Date means apparent age 0; intervals that run backwards count as 0."""
    assert current_age([], response_time=T0, request_time=T0 - 3, now=T0 + 7) == 10.0
    headers = h(("Date", d(T0 + 500)))
    assert current_age(headers, response_time=T0, request_time=T0 + 1, now=T0 - 5) == 0.0


# -- properties -------------------------------------------------------------------------------

_HEADER_NAMES = st.sampled_from(
    [b"cache-control", b"Expires", b"DATE", b"Last-Modified", b"Age", b"Vary", b"Pragma",
     b"Set-Cookie", b"Authorization", b"ETag", b"X-Other"]
)  # fmt: skip
_HEADERS = st.lists(st.tuples(_HEADER_NAMES, st.binary(max_size=60)), max_size=8)


@given(st.lists(st.binary(max_size=200), max_size=4), st.binary(max_size=80))
def test_parsers_never_raise(values: list[bytes], value: bytes) -> None:
    """Arbitrary bytes never make any parser raise."""
    parse_cache_control(values)
    parse_vary(values)
    assert age_value(values) >= 0
    parse_http_date(value)
    parse_http_date(value, now=NOW)


@given(_HEADERS, _HEADERS, st.integers(min_value=-1000, max_value=1000))
def test_policy_never_raises(request: Headers, response: Headers, status: int) -> None:
    """Arbitrary header pairs never make the policy functions raise."""
    is_storable(b"GET", status, request, response)
    request_directives(request)
    request_wants_revalidation(request)
    assert freshness_lifetime(response, NOW) >= 0.0
    assert current_age(response, NOW, NOW - 1, NOW + 1) >= 0.0


_TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_KNOWN = {
    "max-age", "s-maxage", "no-store", "no-cache", "private", "public", "must-revalidate",
    "proxy-revalidate", "stale-while-revalidate", "stale-if-error", "immutable", "max-stale",
    "min-fresh", "only-if-cached", "must-understand", "no-transform",
}  # fmt: skip
_TOKENS = st.text(alphabet=_TCHARS, min_size=1, max_size=12)
_DELTAS = {
    "max-age": "max_age",
    "s-maxage": "s_maxage",
    "stale-while-revalidate": "stale_while_revalidate",
    "stale-if-error": "stale_if_error",
    "min-fresh": "min_fresh",
    "max-stale": "max_stale",
}
_FLAGS = {
    "no-store": "no_store",
    "public": "public",
    "must-revalidate": "must_revalidate",
    "proxy-revalidate": "proxy_revalidate",
    "immutable": "immutable",
    "only-if-cached": "only_if_cached",
}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def _directive_lists(draw: st.DrawFn) -> tuple[list[bytes], CacheControl]:
    """Draw a well-formed Cache-Control (as field lines) and what it must parse to."""
    elements: list[tuple[str, str]] = []  # (name, "" or "=argument")
    expected: dict[str, Any] = {}
    for name, attr in _DELTAS.items():
        if not draw(st.booleans()):
            continue
        if name == "max-stale" and draw(st.booleans()):
            elements.append((name, ""))
            expected[attr] = math.inf
            continue
        seconds = draw(st.integers(min_value=0, max_value=MAX_DELTA_SECONDS))
        value = str(seconds)
        elements.append((name, "=" + (_quote(value) if draw(st.booleans()) else value)))
        expected[attr] = float(seconds) if name == "max-stale" else seconds
    for name, attr in _FLAGS.items():
        if draw(st.booleans()):
            elements.append((name, ""))
            expected[attr] = True
    for name, attr in (("no-cache", "no_cache"), ("private", "private")):
        if not draw(st.booleans()):
            continue
        fields = draw(st.lists(_TOKENS, max_size=3, unique_by=str.lower))
        sep = draw(st.sampled_from([",", ", ", " ,\t"]))
        elements.append((name, "=" + _quote(sep.join(fields)) if fields else ""))
        expected[attr] = True
        expected[f"{attr}_fields"] = tuple(f.lower() for f in fields)
    for ext in draw(st.lists(_TOKENS.filter(lambda t: t.lower() not in _KNOWN), max_size=3)):
        arg = draw(
            st.none() | _TOKENS | st.text(st.characters(min_codepoint=32, max_codepoint=126))
        )
        if arg is None:
            elements.append((ext, ""))
        elif all(c in _TCHARS for c in arg) and arg and draw(st.booleans()):
            elements.append((ext, "=" + arg))
        else:
            elements.append((ext, "=" + _quote(arg)))
    ows = st.sampled_from(["", " ", "\t", " \t "])
    lines: list[bytes] = []
    line: list[str] = []
    for name, rest in draw(st.permutations(elements)):
        case = draw(st.sampled_from([str.lower, str.upper, str.title]))
        line.append(draw(ows) + case(name) + rest + draw(ows))
        if draw(st.integers(min_value=0, max_value=3)) == 0:
            lines.append(",".join(line).encode("latin-1"))
            line = []
    lines.append(",".join(line + [""] * draw(st.integers(0, 2))).encode("latin-1"))
    return lines, CacheControl(**expected)


@given(_directive_lists())
def test_generated_directive_lists_parse(case: tuple[list[bytes], CacheControl]) -> None:
    """A generated well-formed directive list parses to the generated values."""
    lines, expected = case
    assert parse_cache_control(lines) == expected
