"""Tests for edgeauth.events: IP normal forms, request validation and the JSON codec."""

from __future__ import annotations

import ipaddress
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeauth import events
from edgeauth.events import (
    MAX_LIST,
    MAX_TEXT,
    MAX_TTL,
    CacheInvalidated,
    Event,
    EventError,
    IpAllowed,
    IpBanned,
    IpUnallowed,
    IpUnbanned,
    SubjectRevoked,
    TokenRevoked,
    UnknownEvent,
    decode_events,
    encode_event,
    encode_events,
    event_from_dict,
    event_from_request,
    event_to_dict,
    event_type,
    normalize_ip,
)

NOW = 1_763_850_000.0

# --- normalize_ip -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("203.0.113.7", "203.0.113.7/32"),
        ("203.0.113.7/32", "203.0.113.7/32"),
        ("203.0.113.0/24", "203.0.113.0/24"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:db8::1", "2001:db8::1/128"),
        ("2001:DB8:0:0::1", "2001:db8::1/128"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:db8:0:0:0:0:0:0/64", "2001:db8::/64"),
        ("::/0", "::/0"),
        ("::ffff:1.2.3.4", "1.2.3.4/32"),
        ("::FFFF:1.2.3.4/128", "1.2.3.4/32"),
        ("::ffff:102:304", "1.2.3.4/32"),
        ("::ffff:1.2.3.0/120", "1.2.3.0/24"),
        ("::ffff:0.0.0.0/96", "0.0.0.0/0"),
        ("203.0.113.0/255.255.255.0", "203.0.113.0/24"),
    ],
)
def test_normalize_ip_normal_forms(text: str, normal: str) -> None:
    """Addresses become /32 or /128, mapped IPv6 becomes IPv4, networks keep their prefix."""
    assert normalize_ip(text) == normal
    assert normalize_ip(normal) == normal


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("1.2.3.4/24", "host bits set"),
        ("2001:db8::1/64", "host bits set"),
        ("::ffff:1.2.3.4/120", "host bits set"),
        ("300.1.1.1", "not an address"),
        ("1.2.3", "not an address"),
        ("1.2.3.4/33", "not an address"),
        ("2001:db8::/129", "not an address"),
        ("01.2.3.4", "not an address"),
        ("::ffff:zz", "not an address"),
        ("localhost", "not an address"),
        (" 1.2.3.4", "not an address"),
        ("1.2.3.4 ", "not an address"),
        ("1.2.3.4/", "not an address"),
        ("1.2.3.4/-1", "not an address"),
    ],
)
def test_normalize_ip_rejects_bad_text(text: str, why: str) -> None:
    """Host bits, out-of-range octets and garbage are invalid_ip with a reason."""
    with pytest.raises(EventError) as info:
        normalize_ip(text)
    assert info.value.code == "invalid_ip"
    assert why in info.value.detail


@pytest.mark.parametrize(
    "value",
    ["", "fe80::1%eth0", "fe80::1%1", "fe80::%eth0/64", "1" * 65, "1.2.3.4" + " " * 60],
)
def test_normalize_ip_rejects_empty_zone_ids_and_long_text(value: str) -> None:
    """Empty text, IPv6 zone ids and over-long text are invalid_ip."""
    with pytest.raises(EventError) as info:
        normalize_ip(value)
    assert info.value.code == "invalid_ip"


@pytest.mark.parametrize(
    "value", [None, 5, 16909060, 1.5, True, b"1.2.3.4", ["1.2.3.4"], {"ip": "1.2.3.4"}]
)
def test_normalize_ip_rejects_non_strings(value: object) -> None:
    """Only strings are addresses: ints, bytes, lists and None are invalid_ip."""
    with pytest.raises(EventError) as info:
        normalize_ip(value, field="net")
    assert info.value.code == "invalid_ip"
    assert "net" in info.value.detail


def _both_paths(text: str) -> tuple[object, object]:
    """normalize_ip (fast path first) and the ipaddress reference: a result or the error."""
    out: list[object] = []
    for convert in (normalize_ip, lambda t: events._ipaddress_normal_form(t, "ip")):
        try:
            out.append(convert(text))
        except EventError as exc:
            out.append((exc.code, exc.detail))
    return out[0], out[1]


def _address_texts() -> st.SearchStrategy[str]:
    """Addresses and networks in canonical and other spellings, valid or not."""
    v4 = st.ip_addresses(v=4).map(str)
    v6 = st.ip_addresses(v=6).flatmap(
        lambda a: st.sampled_from(
            [
                str(a),
                a.exploded,
                a.exploded.upper(),
                str(a).upper(),
                f"::ffff:{a.packed[-4:].hex()}",
            ]
        )
    )
    mapped = st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}")
    special = st.sampled_from(["::", "::1", "::2:3", "::ffff:0:0", "0.0.0.0", "::0.0.0.1", "1::"])
    address = st.one_of(v4, v6, mapped, special)
    prefix = st.one_of(
        st.integers(0, 129).map(str),
        st.integers(0, 33).map(lambda p: f"0{p}"),
        st.sampled_from(["", "-1", "255.255.255.0", " 8", "8 ", "\u0668", "+8"]),
    )
    network = st.tuples(address, prefix).map(lambda pair: f"{pair[0]}/{pair[1]}")
    masked = st.one_of(
        st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
        st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
    ).map(lambda pair: str(ipaddress.ip_network(f"{pair[0]}/{pair[1]}", strict=False)))
    junk = st.text(alphabet="0123456789abcdefABCDEF:./%\u0661 \x00", max_size=45)
    return st.one_of(address, network, masked, junk)


@settings(max_examples=3000)
@given(_address_texts())
def test_normalize_ip_fast_path_matches_ipaddress(text: str) -> None:
    """The inet_pton fast path gives exactly what the ipaddress path gives, errors included."""
    if not text or len(text) > 64 or "%" in text:
        return  # refused before either path
    fast, reference = _both_paths(text)
    assert fast == reference


@settings(max_examples=3000)
@given(_address_texts())
def test_parse_normal_form_parses_exactly_the_normal_forms(text: str) -> None:
    """Parsed only when ``text`` is its own normal form; then the parts are ipaddress's."""
    parsed = events.parse_normal_form(text)
    try:
        normal = normalize_ip(text)
    except EventError:
        normal = None
    if parsed is None:
        assert normal != text or "/" not in text or _dotted_ipv6(text)
        return
    assert normal == text
    net = ipaddress.ip_network(text)
    assert parsed == (net.version, net.prefixlen, int(net.network_address))


def _dotted_ipv6(text: str) -> bool:
    """An IPv6 normal form with a dotted tail (``::0.0.0.1``): left to the ipaddress path."""
    address = text.partition("/")[0]
    return ":" in address and "." in address


@settings(max_examples=1000)
@given(st.ip_addresses())
def test_normalize_ip_fast_path_takes_canonical_addresses(address: object) -> None:
    """Canonical addresses (not IPv4-mapped) are answered by the fast path itself."""
    text = str(address)
    normal = events._fast_normal_form(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        assert normal is None
    elif normal is not None:  # an IPv6 form with a dotted tail, e.g. ::2:3, is left to ipaddress
        assert normal == events._ipaddress_normal_form(text, "ip")
    if isinstance(address, ipaddress.IPv4Address):
        assert normal == f"{text}/32"


# --- event_from_request -----------------------------------------------------------------------


def _request(kind: str, body: object, source: str = "operator:ops") -> Event:
    return event_from_request(kind, body, now=NOW + 0.0004, source=source)


def _refused(kind: str, body: object, code: str, source: str = "operator:ops") -> EventError:
    with pytest.raises(EventError) as info:
        _request(kind, body, source)
    assert info.value.code == code
    return info.value


@pytest.mark.parametrize("kind", ["ban", "allow"])
def test_ban_and_allow_requests(kind: str) -> None:
    """A ban/allow request gives the normalised ip, reason, ttl-based expiry and source."""
    cls = IpBanned if kind == "ban" else IpAllowed
    event = _request(kind, {"ip": "::ffff:198.51.100.7", "reason": "abuse", "ttl": 60})
    assert event == cls(
        seq=0,
        timestamp=NOW,
        source="operator:ops",
        ip="198.51.100.7/32",
        reason="abuse",
        expires_at=NOW + 60,
    )
    permanent = _request(kind, {"ip": "2001:db8::/48"})
    assert isinstance(permanent, cls)
    assert (permanent.ip, permanent.reason, permanent.expires_at) == ("2001:db8::/48", "", None)
    explicit_null = _request(kind, {"ip": "192.0.2.0/24", "ttl": None})
    assert isinstance(explicit_null, cls)
    assert explicit_null.expires_at is None


def test_ttl_is_rounded_to_milliseconds() -> None:
    """expires_at is now + ttl rounded to millisecond precision."""
    event = event_from_request(
        "ban", {"ip": "192.0.2.1", "ttl": 0.0015}, now=100.0001, source="operator:ops"
    )
    assert isinstance(event, IpBanned)
    assert event.expires_at == 100.002
    assert event.timestamp == 100.0


def test_ttl_limits() -> None:
    """A ttl must be > 0 and at most MAX_TTL; MAX_TTL itself is accepted."""
    ok = _request("ban", {"ip": "192.0.2.1", "ttl": MAX_TTL})
    assert isinstance(ok, IpBanned)
    assert ok.expires_at == round(NOW + 0.0004 + MAX_TTL, 3)
    for ttl in (0, 0.0, -1, MAX_TTL + 1):
        _refused("ban", {"ip": "192.0.2.1", "ttl": ttl}, "invalid_field")


def test_edge_claimed_source_is_kept_operator_claim_ignored() -> None:
    """An edge's edge:* source claim is kept; operators' and non-edge claims are ignored."""
    body = {"ip": "192.0.2.1", "source": "edge:edge-b"}
    assert _request("ban", body, source="edge:edges").source == "edge:edge-b"
    assert _request("ban", body, source="operator:ops").source == "operator:ops"
    forged = {"ip": "192.0.2.1", "source": "operator:root"}
    assert _request("ban", forged, source="edge:edges").source == "edge:edges"
    _refused("ban", {"ip": "192.0.2.1", "source": ""}, "invalid_field", source="edge:edges")
    _refused("ban", {"ip": "192.0.2.1", "source": 7}, "invalid_field", source="edge:edges")


def test_unban_and_unallow_requests() -> None:
    """Unban/unallow requests carry only the normalised ip."""
    assert _request("unban", {"ip": "192.0.2.0/24"}) == IpUnbanned(
        timestamp=NOW, source="operator:ops", ip="192.0.2.0/24"
    )
    assert _request("unallow", {"ip": "::ffff:192.0.2.9"}) == IpUnallowed(
        timestamp=NOW, source="operator:ops", ip="192.0.2.9/32"
    )


def test_revoke_token_request() -> None:
    """A token revocation keeps jti, optional expires_at and reason."""
    event = _request("revoke_token", {"jti": "j-1", "expires_at": NOW + 5, "reason": "leak"})
    assert event == TokenRevoked(
        timestamp=NOW, source="operator:ops", jti="j-1", expires_at=NOW + 5, reason="leak"
    )
    bare = _request("revoke_token", {"jti": "j-2"})
    assert isinstance(bare, TokenRevoked)
    assert (bare.expires_at, bare.reason) == (None, "")


def test_revoke_subject_request_defaults_before_to_now() -> None:
    """A subject revocation's before defaults to the request time."""
    assert _request("revoke_subject", {"sub": "alice"}) == SubjectRevoked(
        timestamp=NOW, source="operator:ops", sub="alice", before=NOW
    )
    explicit = _request("revoke_subject", {"sub": "bob", "before": 12})
    assert isinstance(explicit, SubjectRevoked)
    assert explicit.before == 12.0


def test_invalidate_request() -> None:
    """An invalidation keeps its selectors as tuples plus the all and soft flags."""
    event = _request(
        "invalidate",
        {"tags": ["a", "b"], "keys": ["h/p?q"], "prefixes": ["h/x"], "all": True, "soft": True},
    )
    assert event == CacheInvalidated(
        timestamp=NOW,
        source="operator:ops",
        tags=("a", "b"),
        keys=("h/p?q",),
        prefixes=("h/x",),
        all=True,
        soft=True,
    )
    only_all = _request("invalidate", {"all": True})
    assert isinstance(only_all, CacheInvalidated)
    assert only_all.all and not only_all.soft


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("ban", {"ip": "192.0.2.1", "reson": "typo"}),
        ("ban", {"ip": "192.0.2.1", "expires_at": 5}),
        ("unban", {"ip": "192.0.2.1", "reason": "x"}),
        ("allow", {"ip": "192.0.2.1", "tll": 5}),
        ("unallow", {"ip": "192.0.2.1", "source": "edge:x"}),
        ("revoke_token", {"jti": "j", "ttl": 5}),
        ("revoke_subject", {"sub": "s", "reason": "x"}),
        ("invalidate", {"tags": ["a"], "tag": ["a"]}),
    ],
)
def test_unknown_fields_are_refused(kind: str, body: dict[str, Any]) -> None:
    """Any field a request kind does not know is unknown_field, naming it."""
    error = _refused(kind, body, "unknown_field")
    assert repr(next(k for k in body if k not in ("ip", "jti", "sub", "tags"))) in error.detail


@pytest.mark.parametrize(
    ("kind", "body", "code"),
    [
        ("ban", {"ip": 5}, "invalid_ip"),
        ("ban", {"ip": "1.2.3.4/24"}, "invalid_ip"),
        ("ban", {"ip": "192.0.2.1", "ttl": "60"}, "invalid_field"),
        ("ban", {"ip": "192.0.2.1", "ttl": True}, "invalid_field"),
        ("ban", {"ip": "192.0.2.1", "ttl": False}, "invalid_field"),
        ("ban", {"ip": "192.0.2.1", "ttl": math.nan}, "invalid_field"),
        ("ban", {"ip": "192.0.2.1", "ttl": math.inf}, "invalid_field"),
        ("ban", {"ip": "192.0.2.1", "ttl": 10**400}, "invalid_field"),
        ("ban", {"ip": "192.0.2.1", "ttl": [60]}, "invalid_field"),
        ("ban", {"ip": "192.0.2.1", "reason": []}, "invalid_field"),
        ("ban", {"ip": "192.0.2.1", "reason": None}, "invalid_field"),
        ("ban", {"ip": "192.0.2.1", "reason": "x" * (MAX_TEXT + 1)}, "invalid_field"),
        ("ban", {"ip": "192.0.2.1", "reason": "bad \ud800 surrogate"}, "invalid_field"),
        ("allow", {"ip": "192.0.2.1", "ttl": -5}, "invalid_field"),
        ("unban", {"ip": ["192.0.2.1"]}, "invalid_ip"),
        ("revoke_token", {"jti": ""}, "invalid_field"),
        ("revoke_token", {"jti": 5}, "invalid_field"),
        ("revoke_token", {"jti": "j", "expires_at": "soon"}, "invalid_field"),
        ("revoke_token", {"jti": "j", "expires_at": math.nan}, "invalid_field"),
        ("revoke_token", {"jti": "j", "expires_at": -math.inf}, "invalid_field"),
        ("revoke_token", {"jti": "j", "expires_at": True}, "invalid_field"),
        ("revoke_subject", {"sub": ""}, "invalid_field"),
        ("revoke_subject", {"sub": "s", "before": "now"}, "invalid_field"),
        ("revoke_subject", {"sub": "s", "before": math.inf}, "invalid_field"),
        ("revoke_subject", {"sub": "s", "before": -1}, "invalid_field"),
        ("invalidate", {"tags": "a"}, "invalid_field"),
        ("invalidate", {"tags": [1]}, "invalid_field"),
        ("invalidate", {"tags": [""]}, "invalid_field"),
        ("invalidate", {"keys": ["k"] * (MAX_LIST + 1)}, "invalid_field"),
        ("invalidate", {"all": "yes"}, "invalid_field"),
        ("invalidate", {"all": 1}, "invalid_field"),
        ("invalidate", {"tags": ["a"], "soft": None}, "invalid_field"),
    ],
)
def test_wrong_types_and_values_are_refused(kind: str, body: dict[str, Any], code: str) -> None:
    """Wrong types (bool for ttl, NaN, inf, huge ints, lists for text) are refused."""
    _refused(kind, body, code)


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("ban", {"reason": "x"}),
        ("allow", {}),
        ("unban", {}),
        ("unallow", {}),
        ("revoke_token", {"reason": "x"}),
        ("revoke_subject", {"before": 5}),
        ("invalidate", {}),
        ("invalidate", {"soft": True}),
        ("invalidate", {"all": False, "tags": [], "keys": [], "prefixes": []}),
    ],
)
def test_missing_fields_are_refused(kind: str, body: dict[str, Any]) -> None:
    """A missing required field, or an invalidation with no selector, is missing_field."""
    _refused(kind, body, "missing_field")


@pytest.mark.parametrize("body", [None, [], ["ip"], "ip", 5, True])
def test_request_body_must_be_an_object(body: object) -> None:
    """A body that is not a JSON object is invalid_field."""
    _refused("ban", body, "invalid_field")


def test_unknown_request_kind_is_a_programming_error() -> None:
    """An unknown request kind is a KeyError/ValueError, not an EventError."""
    with pytest.raises((KeyError, ValueError)) as info:
        _request("delete_everything", {})
    assert not isinstance(info.value, EventError)


# --- the JSON codec ---------------------------------------------------------------------------


def _network(pair: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]) -> str:
    address, prefix = pair
    return normalize_ip(str(ipaddress.ip_network(f"{address}/{prefix}", strict=False)))


ips = st.one_of(
    st.ip_addresses(v=4).map(lambda a: f"{a}/32"),
    st.ip_addresses(v=6).map(lambda a: normalize_ip(str(a))),
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(_network),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)).map(_network),
)
texts = st.text(max_size=40)
names = st.text(min_size=1, max_size=40)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)
expiries = st.none() | times
envelope = {
    "seq": st.integers(1, 2**53),
    "timestamp": times,
    "source": texts,
}
text_lists = st.lists(names, max_size=5).map(tuple)

any_event: st.SearchStrategy[Event] = st.one_of(
    st.builds(IpBanned, ip=ips, reason=texts, expires_at=expiries, **envelope),
    st.builds(IpUnbanned, ip=ips, **envelope),
    st.builds(IpAllowed, ip=ips, reason=texts, expires_at=expiries, **envelope),
    st.builds(IpUnallowed, ip=ips, **envelope),
    st.builds(TokenRevoked, jti=names, expires_at=expiries, reason=texts, **envelope),
    st.builds(SubjectRevoked, sub=names, before=times, **envelope),
    st.builds(
        CacheInvalidated,
        tags=text_lists,
        keys=text_lists,
        prefixes=text_lists,
        all=st.booleans(),
        soft=st.booleans(),
        **envelope,
    ),
)


@given(any_event)
def test_event_json_round_trip(event: Event) -> None:
    """event_from_dict(event_to_dict(e)) == e, also through the compact JSON text."""
    as_dict = event_to_dict(event)
    assert as_dict["type"] == event.TYPE == event_type(event)
    assert list(as_dict)[:3] == ["seq", "type", "timestamp"]
    assert event_from_dict(as_dict) == event
    assert event_from_dict(json.loads(encode_event(event))) == event


@given(st.lists(any_event, max_size=8))
def test_event_array_round_trip(events: list[Event]) -> None:
    """decode_events(encode_events(es)) == es, from bytes and from text."""
    data = encode_events(events)
    assert decode_events(data) == events
    assert decode_events(data.decode()) == events


def test_encoded_event_is_compact_and_ordered() -> None:
    """The wire form is compact JSON with the envelope first and lists for tuples."""
    event = CacheInvalidated(seq=3, timestamp=1.5, source="operator:a", tags=("x",))
    assert encode_event(event) == (
        '{"seq":3,"type":"cache_invalidated","timestamp":1.5,"source":"operator:a",'
        '"tags":["x"],"keys":[],"prefixes":[],"all":false,"soft":false}'
    )


def test_unknown_type_becomes_unknown_event() -> None:
    """An unknown type decodes to UnknownEvent keeping seq, timestamp, type and the body."""
    raw = {"seq": 9, "type": "ip_quarantined", "timestamp": 2, "ip": "x", "extra": [1]}
    event = event_from_dict(raw)
    assert isinstance(event, UnknownEvent)
    assert (event.seq, event.timestamp, event.type) == (9, 2.0, "ip_quarantined")
    assert event.body == raw
    assert event_type(event) == "ip_quarantined"
    assert decode_events(json.dumps([raw])) == [event]


def test_unknown_fields_of_known_types_are_ignored() -> None:
    """A newer master's extra fields are ignored when decoding a known type."""
    raw = {"seq": 1, "type": "ip_unbanned", "timestamp": 1, "ip": "10.0.0.0/8", "by": "x"}
    assert event_from_dict(raw) == IpUnbanned(seq=1, timestamp=1.0, ip="10.0.0.0/8")


_GOOD = {"seq": 1, "type": "ip_banned", "timestamp": 1.0, "ip": "192.0.2.1/32"}


@pytest.mark.parametrize(
    "obj",
    [
        [],
        "event",
        None,
        {**_GOOD, "seq": 0},
        {**_GOOD, "seq": -1},
        {**_GOOD, "seq": True},
        {**_GOOD, "seq": 1.0},
        {**_GOOD, "seq": "1"},
        {k: v for k, v in _GOOD.items() if k != "seq"},
        {**_GOOD, "type": 5},
        {k: v for k, v in _GOOD.items() if k != "type"},
        {**_GOOD, "timestamp": "now"},
        {**_GOOD, "timestamp": math.nan},
        {**_GOOD, "timestamp": 10**400},
        {k: v for k, v in _GOOD.items() if k != "timestamp"},
        {k: v for k, v in _GOOD.items() if k != "ip"},
        {**_GOOD, "ip": "1.2.3.4/24"},
        {**_GOOD, "expires_at": "never"},
        {"seq": 2, "type": "subject_revoked", "timestamp": 1.0, "sub": "s"},
        {"seq": 2, "type": "token_revoked", "timestamp": 1.0, "jti": ""},
        {"seq": 2, "type": "cache_invalidated", "timestamp": 1.0, "tags": "a"},
    ],
)
def test_event_from_dict_refuses_invalid_events(obj: object) -> None:
    """Non-objects, bad envelopes and bad or missing fields are invalid_event / field errors."""
    with pytest.raises(EventError) as info:
        event_from_dict(obj)
    assert info.value.code in ("invalid_event", "invalid_field", "invalid_ip")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[",
        b"\xff\xfe\xfa",
        b'{"seq": 1}',
        b"5",
        b"null",
        b'[{"seq": 1, "type": "ip_banned", "timestamp": NaN, "ip": "1.2.3.4"}]',
        b'[{"seq": 1, "type": "ip_banned", "timestamp": 1}]',
        b"[1]",
        b"[" * 100_000,
    ],
)
def test_decode_events_errors(data: bytes) -> None:
    """Garbage, non-arrays, deep nesting and invalid items are EventError invalid_event."""
    with pytest.raises(EventError) as info:
        decode_events(data)
    assert info.value.code in ("invalid_event", "invalid_field", "invalid_ip")


def test_decode_events_empty_array() -> None:
    """An empty array is no events."""
    assert decode_events(b"[]") == []
    assert decode_events("[ ]") == []
