"""edgeauth.edge.cache.policy: keys, selectors, variants, storability and timing (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from edgeauth.edge.cache.policy import (
    NO_RULES,
    Selector,
    merge_not_modified,
    normalise_target,
    not_modified,
    parse_selector,
    parse_tags,
    request_key,
    request_rules,
    storable,
    timing,
    variant_key,
)

H = list[tuple[bytes, bytes]]


def same(ttl: float) -> float:
    return ttl


@pytest.mark.parametrize(
    ("host", "uri", "key"),
    [
        (b"Shop.Example", b"/a?b=1", "shop.example/a?b=1"),
        (b"shop.example:80", b"/", "shop.example/"),
        (b"shop.example:8080", b"/", "shop.example:8080/"),
        (b"h", b"/x%2fy", "h/x%2Fy"),
        (b"h", b"/x%2Fy", "h/x%2Fy"),
        (b"h", b"/%41%7e", "h/A~"),
        (b"h", b"/a b", "h/a%20b"),
        (b"h", b"/caf\xc3\xa9", "h/caf%C3%A9"),
        (b"h", b"/com,ma;x=1", "h/com,ma;x=1"),
        (b"h", b"/100%", "h/100%25"),
        (b"ignored", b"http://Other.Example/p?q", "other.example/p?q"),
        (b"", b"/p", "/p"),
    ],
)
def test_request_key(host: bytes, uri: bytes, key: str) -> None:
    """Keys are lowercased host + target with normalised percent-encoding."""
    assert request_key(host, uri) == key


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("/", (None, "/")),
        ("/a b", (None, "/a%20b")),
        ("/x%2fy", (None, "/x%2Fy")),
        ("/p#frag", (None, "/p")),
        ("Shop.Example/p?q=1", ("shop.example", "/p?q=1")),
        ("https://shop.example/p", ("shop.example", "/p")),
        ("shop.example", ("shop.example", "/")),
        ("http://user@shop.example:80/x", ("shop.example", "/x")),
    ],
)
def test_parse_selector(text: str, parsed: tuple[str | None, str]) -> None:
    """Operator keys: ``/path`` (any host), ``host/path``, URLs, a bare host."""
    assert parse_selector(text) == parsed


@given(st.binary(max_size=40))
def test_normalised_targets_are_stable(raw: bytes) -> None:
    """Normalising twice changes nothing, and the result is plain ASCII starting with /."""
    once = normalise_target(b"/" + raw)
    assert normalise_target(once.encode()) == once
    assert once.isascii() and once.startswith("/")
    assert " " not in once


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_an_operator_key_names_the_request_a_client_sends_for_it(path: str) -> None:
    """The key typed as text matches the request a browser sends (UTF-8, percent-encoded)."""
    from urllib.parse import quote

    path = "/" + path.replace("#", "")
    sent = quote(path, safe="/?&=;,:@!$'()*+").encode("ascii")
    assert parse_selector(path) == (None, request_key(b"", sent))


@pytest.mark.parametrize(
    ("selector", "key", "tags", "hit"),
    [
        (Selector(tags=frozenset({"a"})), "h/x", ("ab", "ba"), False),
        (Selector(tags=frozenset({"a"})), "h/x", ("ab", "a"), True),
        (Selector(keys=((None, "/"),)), "h/", (), True),
        (Selector(keys=((None, "/"),)), "h/x", (), False),
        (Selector(keys=(("h", "/x"),)), "g/x", (), False),
        (Selector(prefixes=((None, "/"),)), "h/anything", (), True),
        (Selector(prefixes=((None, "/pro"),)), "h/products", (), True),
        (Selector(prefixes=(("h", "/pro"),)), "g/products", (), False),
        (Selector(all=True), "h/x", (), True),
    ],
)
def test_selector_matches(selector: Selector, key: str, tags: tuple[str, ...], hit: bool) -> None:
    """Whole tags, exact keys (``/`` is the root only), string prefixes, all."""
    assert selector.matches(key, tags) is hit


def test_parse_tags() -> None:
    """Comma-separated, trimmed, no empties, no repeats, across repeated header lines."""
    assert parse_tags([b" a, b ,,a", b"c"]) == ("a", "b", "c")


def test_variant_key() -> None:
    """Absent differs from empty; list spacing is normalised; Accept* values are caseless."""
    vary = (b"accept-language", b"x-flag")
    one = Headers({b"Accept-Language": [b"EN, fr"], b"X-Flag": [b""]})
    two = Headers({b"accept-language": [b"en,fr"], b"x-flag": [b""]})
    three = Headers({b"accept-language": [b"en,fr"]})
    assert variant_key(vary, one) == variant_key(vary, two)
    assert variant_key(vary, two) != variant_key(vary, three)
    assert variant_key((), one) == ""


CC = b"cache-control"


@pytest.mark.parametrize(
    ("request_headers", "response_headers", "ok"),
    [
        ([], [(CC, b"max-age=60")], True),
        ([], [(CC, b"no-store, max-age=60")], False),
        ([], [(CC, b"private, max-age=60")], False),
        ([], [(CC, b'private="x", max-age=60')], False),
        ([], [(CC, b"max-age=60"), (b"vary", b"*")], False),
        ([], [(CC, b"max-age=60"), (b"set-cookie", b"a=1")], False),
        ([], [(CC, b"public, max-age=60"), (b"set-cookie", b"a=1")], True),
        ([], [(CC, b"s-maxage=60"), (b"set-cookie", b"a=1")], True),
        ([(b"authorization", b"Bearer x")], [(CC, b"max-age=60")], False),
        ([(b"authorization", b"Bearer x")], [(CC, b"public, max-age=60")], True),
        ([(b"authorization", b"Bearer x")], [(CC, b"s-maxage=60")], True),
        ([(b"authorization", b"Bearer x")], [(CC, b"must-revalidate, max-age=60")], True),
        ([(CC, b"no-store")], [(CC, b"max-age=60")], False),
        ([], [(CC, b"max-age=60"), (b"content-length", b"101")], False),
        ([], [(CC, b"max-age=60"), (b"content-length", b"100")], True),
        ([], [], False),
    ],
)
def test_storable(request_headers: H, response_headers: H, ok: bool) -> None:
    """RFC 9111 §3 and §3.5, Set-Cookie only when shared explicitly, the object size cap."""
    assert storable(200, request_headers, response_headers, 100) is ok


@pytest.mark.parametrize(
    ("headers", "fresh", "stale", "error", "must"),
    [
        ([(CC, b"max-age=100")], 1100.0, 1100.0, 1100.0, False),
        ([(CC, b"max-age=100"), (b"age", b"30")], 1070.0, 1070.0, 1070.0, False),
        ([(CC, b"max-age=100"), (b"age", b"300")], 800.0, 800.0, 800.0, False),
        (
            [(CC, b"max-age=100, stale-while-revalidate=50, stale-if-error=500")],
            1100.0,
            1150.0,
            1600.0,
            False,
        ),
        ([(CC, b"max-age=100, must-revalidate, stale-if-error=500")], 1100.0, 1100.0, 1100.0, True),
        (
            [(CC, b"s-maxage=20, max-age=100, stale-while-revalidate=9")],
            1020.0,
            1020.0,
            1020.0,
            True,
        ),
        ([(CC, b"no-cache, max-age=100")], 1000.0, 1000.0, 1000.0, True),
        (
            [
                (b"date", b"Thu, 01 Jan 1970 00:16:40 GMT"),
                (b"expires", b"Thu, 01 Jan 1970 00:18:20 GMT"),
            ],
            1100.0,
            1100.0,
            1100.0,
            False,
        ),
    ],
)
def test_timing(headers: H, fresh: float, stale: float, error: float, must: bool) -> None:
    """Freshness minus the initial age; swr/sie windows; must-revalidate & co forbid stale."""
    t = timing(headers, 1000.0, 1000.0, same)
    assert (t.fresh_until, t.stale_until, t.error_until, t.must_revalidate) == (
        fresh,
        stale,
        error,
        must,
    )


def test_timing_goes_through_the_pipeline_but_never_for_no_cache() -> None:
    """The granted lifetime is what the TTL pipeline gets; no-cache stays 0."""
    seen: list[float] = []

    def triple(ttl: float) -> float:
        seen.append(ttl)
        return ttl * 3

    assert timing([(CC, b"max-age=10")], 0.0, 0.0, triple).fresh_until == 30.0
    assert timing([(CC, b"no-cache, max-age=10")], 0.0, 0.0, triple).ttl == 0.0
    assert seen == [10.0]


def test_merge_not_modified() -> None:
    """A 304's fields replace the stored ones, except framing; the stored Age goes."""
    stored: H = [(b"etag", b'"1"'), (CC, b"max-age=1"), (b"content-length", b"5"), (b"age", b"9")]
    fresh: H = [(CC, b"max-age=60"), (b"content-length", b"0"), (b"date", b"x")]
    merged = merge_not_modified(stored, fresh)
    assert merged == [
        (b"etag", b'"1"'),
        (b"content-length", b"5"),
        (CC, b"max-age=60"),
        (b"date", b"x"),
    ]


@pytest.mark.parametrize(
    ("headers", "result"),
    [
        ({b"if-none-match": [b'"a", W/"b"']}, True),
        ({b"if-none-match": [b'"c"']}, False),
        ({b"if-none-match": [b"*"]}, True),
        ({b"if-modified-since": [b"Sun, 06 Nov 1994 08:49:37 GMT"]}, True),
        ({b"if-modified-since": [b"Sun, 06 Nov 1994 08:49:36 GMT"]}, False),
        (
            {b"if-none-match": [b'"c"'], b"if-modified-since": [b"Sun, 06 Nov 1994 08:49:37 GMT"]},
            False,
        ),
    ],
)
def test_not_modified(headers: dict[bytes, list[bytes]], result: bool) -> None:
    """Weak ETag comparison; If-Modified-Since only without If-None-Match."""
    assert not_modified(Headers(headers), b'W/"b"', b"Sun, 06 Nov 1994 08:49:37 GMT") is result


def test_request_rules() -> None:
    """No directives is NO_RULES; no-cache, Pragma, max-age=0 revalidate; limits are read."""
    assert request_rules(Headers()) is NO_RULES
    assert request_rules(Headers({b"pragma": [b"no-cache"]})).revalidate
    assert request_rules(Headers({CC: [b"max-age=0"]})).revalidate
    rules = request_rules(Headers({CC: [b"max-age=5, min-fresh=2, no-store, only-if-cached"]}))
    assert (rules.revalidate, rules.max_age, rules.min_fresh) == (False, 5, 2)
    assert rules.no_store and rules.only_if_cached
