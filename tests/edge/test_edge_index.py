"""Tests for edgeauth.edge.index: client address parsing, ban/allow lookups and revocations."""

from __future__ import annotations

import ipaddress

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeauth.edge.index import EdgeIndexes, NetworkIndex, RevocationIndex, parse_client_ip
from edgeauth.events import (
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
    normalize_ip,
)
from edgeauth.replay import Entry, State, replay

NOW = 1_000.0


def entry(ip: str, *, expires_at: float | None = None, seq: int = 1, reason: str = "") -> Entry:
    return Entry(ip=ip, reason=reason, expires_at=expires_at, source="operator:test", seq=seq)


def addr(text: str) -> tuple[int, int]:
    parsed = parse_client_ip(text)
    assert parsed is not None
    return parsed


def check(indexes: EdgeIndexes, client: str, now: float = NOW) -> Entry | None:
    return indexes.check_ip(*addr(client), now)


def banned(*entries: Entry) -> EdgeIndexes:
    indexes = EdgeIndexes()
    for e in entries:
        indexes.bans.put(e)
    return indexes


# -- parse_client_ip --------------------------------------------------------------------------


def test_parse_ipv4() -> None:
    """An IPv4 address parses to (4, its integer)."""
    assert parse_client_ip("203.0.113.7") == (4, 0xCB007107)
    assert parse_client_ip("0.0.0.0") == (4, 0)


def test_parse_ipv6() -> None:
    """An IPv6 address parses to (6, its integer), in any spelling."""
    expected = (6, int(ipaddress.IPv6Address("2001:db8::1")))
    assert parse_client_ip("2001:db8::1") == expected
    assert parse_client_ip("2001:0DB8:0:0:0:0:0:1") == expected


def test_parse_mapped_ipv4() -> None:
    """An IPv4-mapped IPv6 address parses as the IPv4 address."""
    assert parse_client_ip("::ffff:1.2.3.4") == (4, 0x01020304)
    assert parse_client_ip("::ffff:102:304") == (4, 0x01020304)


@pytest.mark.parametrize(
    "text",
    ["", "garbage", "1.2.3", "1.2.3.4/32", "01.2.3.4", " 1.2.3.4", "[::1]", "fe80::1%eth0", "a\0b"],
)
def test_parse_garbage(text: str) -> None:
    """Anything that is not a bare address parses to None."""
    assert parse_client_ip(text) is None


# -- NetworkIndex -----------------------------------------------------------------------------


def test_exact_ipv4_match() -> None:
    """A /32 matches exactly its address."""
    idx = NetworkIndex([entry("203.0.113.7/32")])
    assert idx.match(*addr("203.0.113.7"), NOW) == entry("203.0.113.7/32")
    assert idx.match(*addr("203.0.113.8"), NOW) is None
    assert idx.match(*addr("::ffff:203.0.113.7"), NOW) is not None


def test_exact_ipv6_match() -> None:
    """A /128 matches exactly its address."""
    idx = NetworkIndex([entry("2001:db8::7/128")])
    assert idx.match(*addr("2001:db8::7"), NOW) is not None
    assert idx.match(*addr("2001:db8::8"), NOW) is None


def test_network_matches() -> None:
    """/24, /64 and /0 networks match every address inside them and nothing outside."""
    idx = NetworkIndex([entry("203.0.113.0/24"), entry("2001:db8:1:2::/64")])
    assert idx.match(*addr("203.0.113.0"), NOW) is not None
    assert idx.match(*addr("203.0.113.255"), NOW) is not None
    assert idx.match(*addr("203.0.114.0"), NOW) is None
    assert idx.match(*addr("2001:db8:1:2:ffff::1"), NOW) is not None
    assert idx.match(*addr("2001:db8:1:3::1"), NOW) is None
    everything = NetworkIndex([entry("0.0.0.0/0"), entry("::/0")])
    for client in ("1.2.3.4", "255.255.255.255", "::1", "2001:db8::1", "::ffff:9.9.9.9"):
        assert everything.match(*addr(client), NOW) is not None


def test_families_do_not_mix() -> None:
    """An IPv4 entry never matches an IPv6 client with the same low bits, and vice versa."""
    idx = NetworkIndex([entry("0.0.0.1/32")])
    assert idx.match(*addr("::1"), NOW) is None
    idx6 = NetworkIndex([entry("::/0")])
    assert idx6.match(*addr("1.2.3.4"), NOW) is None


def test_most_specific_wins() -> None:
    """The most specific covering entry wins; matches() lists all, the most specific first."""
    idx = NetworkIndex(
        [entry("10.0.0.0/8", seq=1), entry("10.1.2.3/32", seq=3), entry("10.1.0.0/16", seq=2)]
    )
    hit = idx.match(*addr("10.1.2.3"), NOW)
    assert hit is not None and hit.seq == 3
    assert [e.seq for e in idx.matches(*addr("10.1.2.3"), NOW)] == [3, 2, 1]
    assert [e.seq for e in idx.matches(*addr("10.1.9.9"), NOW)] == [2, 1]
    assert idx.prefix_lengths == {4: [32, 16, 8], 6: []}


def test_put_replaces_same_network() -> None:
    """Banning a network again replaces its entry instead of adding one."""
    idx = NetworkIndex([entry("10.0.0.0/8", reason="a", seq=1)])
    idx.put(entry("10.0.0.0/8", reason="b", seq=2, expires_at=5.0))
    assert len(idx) == 1
    assert idx.get("10.0.0.0/8") == entry("10.0.0.0/8", reason="b", seq=2, expires_at=5.0)


def test_put_normalises() -> None:
    """An entry's ip is stored under its normal form; get and remove normalise too."""
    idx = NetworkIndex([entry("2001:DB8::/64"), entry("1.2.3.4"), entry("::ffff:5.6.7.0/120")])
    assert sorted(e.ip for e in idx) == ["1.2.3.4/32", "2001:db8::/64", "5.6.7.0/24"]
    assert idx.get("2001:db8:0::/64") is not None
    assert idx.remove("1.2.3.4") is not None
    assert len(idx) == 2


def test_put_refuses_garbage() -> None:
    """An entry whose ip is not an address or a network is refused; get/remove answer None."""
    idx = NetworkIndex()
    with pytest.raises(EventError):
        idx.put(entry("10.0.0.1/8"))
    assert idx.get("nonsense") is None
    assert idx.remove("nonsense") is None


def test_remove_exact_only() -> None:
    """Removing drops only the exact network; a covering network keeps matching."""
    idx = NetworkIndex([entry("10.0.0.0/8", seq=1), entry("10.1.2.3/32", seq=2)])
    assert idx.remove("10.0.0.0/16") is None
    removed = idx.remove("10.1.2.3/32")
    assert removed is not None and removed.seq == 2
    hit = idx.match(*addr("10.1.2.3"), NOW)
    assert hit is not None and hit.seq == 1
    assert idx.prefix_lengths[4] == [8]
    assert idx.remove("10.1.2.3/32") is None


def test_expiry_at_check_time() -> None:
    """An entry is live while now < expires_at and expired from now == expires_at on."""
    idx = NetworkIndex([entry("10.0.0.0/8", seq=1), entry("10.1.2.3/32", seq=2, expires_at=NOW)])
    before = idx.match(*addr("10.1.2.3"), NOW - 0.001)
    assert before is not None and before.seq == 2
    at = idx.match(*addr("10.1.2.3"), NOW)
    assert at is not None and at.seq == 1
    assert [e.seq for e in idx.matches(*addr("10.1.2.3"), NOW)] == [1]
    assert len(idx) == 2


def test_sweep() -> None:
    """Sweeping removes and returns exactly the entries expired at now."""
    idx = NetworkIndex(
        [
            entry("10.0.0.1/32", expires_at=10.0),
            entry("10.0.0.2/32", expires_at=20.0),
            entry("2001:db8::/64", expires_at=10.0),
            entry("10.0.0.3/32"),
        ]
    )
    idx.put(entry("10.0.0.2/32", expires_at=5.0))  # re-ban with an earlier expiry
    idx.put(entry("10.0.0.1/32", expires_at=30.0))  # re-ban with a later expiry
    assert idx.sweep(4.0) == []
    assert sorted(e.ip for e in idx.sweep(10.0)) == ["10.0.0.2/32", "2001:db8::/64"]
    assert sorted(e.ip for e in idx) == ["10.0.0.1/32", "10.0.0.3/32"]
    assert idx.prefix_lengths == {4: [32], 6: []}
    assert [e.ip for e in idx.sweep(30.0)] == ["10.0.0.1/32"]
    assert idx.sweep(1e12) == []
    assert len(idx) == 1


def test_sweep_heap_stays_bounded() -> None:
    """Re-banning one network many times does not grow the expiry heap without bound."""
    idx = NetworkIndex()
    for i in range(5000):
        idx.put(entry("10.0.0.1/32", expires_at=float(i)))
    assert len(idx._expiries) <= 2 * len(idx) + 1024
    assert [e.expires_at for e in idx.sweep(1e9)] == [4999.0]


def test_clear_and_replace() -> None:
    """Clearing empties the index; replace() swaps in a new set of entries at once."""
    idx = NetworkIndex([entry("10.0.0.0/8")])
    idx.replace([entry("2001:db8::/32"), entry("2001:db8::/32", seq=9)])
    assert [(e.ip, e.seq) for e in idx] == [("2001:db8::/32", 9)]
    with pytest.raises(EventError):
        idx.replace([entry("bad")])
    assert len(idx) == 1
    idx.clear()
    assert len(idx) == 0 and list(idx) == []
    assert idx.match(*addr("2001:db8::1"), NOW) is None


@given(st.integers(0, 2**128 - 1), st.integers(0, 128), st.booleans())
def test_fast_network_parse_agrees_with_normalize_ip(value: int, plen: int, v4: bool) -> None:
    """Keys parsed on the fast path equal normalize_ip's normal form, for any network."""
    if v4:
        net: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.IPv4Network(
            (value >> 96, plen % 33), strict=False
        )
    else:
        net = ipaddress.IPv6Network((value, plen), strict=False)
    idx = NetworkIndex([entry(str(net))])
    (stored,) = list(idx)
    assert stored.ip == normalize_ip(str(net))


# -- EdgeIndexes.check_ip ---------------------------------------------------------------------


def test_allow_beats_ban_inside_banned_network() -> None:
    """An allow entry covering the client beats every ban, even a more specific one."""
    indexes = banned(entry("203.0.113.0/24", seq=1), entry("203.0.113.7/32", seq=2))
    indexes.allows.put(entry("203.0.113.0/28", seq=3))
    assert check(indexes, "203.0.113.7") is None
    hit = check(indexes, "203.0.113.200")
    assert hit is not None and hit.seq == 1


def test_expired_allow_does_not_protect() -> None:
    """An allow entry past its expiry no longer overrides bans."""
    indexes = banned(entry("203.0.113.0/24", seq=1))
    indexes.allows.put(entry("203.0.113.7/32", seq=2, expires_at=NOW))
    assert check(indexes, "203.0.113.7", NOW - 1) is None
    assert check(indexes, "203.0.113.7", NOW) is not None


def test_check_mapped_client() -> None:
    """A dual-stack peer ::ffff:a.b.c.d is refused by an IPv4 ban."""
    indexes = banned(entry("198.51.100.0/24", seq=4))
    hit = check(indexes, "::ffff:198.51.100.9")
    assert hit is not None and hit.seq == 4


def ban(ip: str, seq: int, expires_at: float | None = None, reason: str = "") -> IpBanned:
    return IpBanned(seq=seq, ip=ip, expires_at=expires_at, reason=reason, source="operator:t")


def test_unban_leaves_covering_ban() -> None:
    """Unbanning an address leaves a ban of a network covering it in force."""
    indexes = EdgeIndexes()
    for event in (ban("10.0.0.0/8", 1), ban("10.1.2.3/32", 2), IpUnbanned(seq=3, ip="10.1.2.3/32")):
        indexes.apply(event)
    hit = check(indexes, "10.1.2.3")
    assert hit is not None and hit.seq == 1


def test_reban_replaces() -> None:
    """A second ban of a network replaces its reason, expiry and seq."""
    indexes = EdgeIndexes()
    assert indexes.apply(ban("10.1.2.3/32", 1, expires_at=NOW + 5, reason="first"))
    assert indexes.apply(ban("10.1.2.3/32", 2, reason="second"))
    hit = check(indexes, "10.1.2.3", NOW + 10)
    assert hit is not None and (hit.seq, hit.reason, hit.expires_at) == (2, "second", None)
    assert len(indexes.bans) == 1


def test_apply_reports_changes() -> None:
    """Applying says whether enforced state changed; cache and unknown events change nothing."""
    indexes = EdgeIndexes()
    assert indexes.apply(ban("10.0.0.0/8", 1))
    assert not indexes.apply(ban("10.0.0.0/8", 1))
    assert not indexes.apply(IpUnbanned(seq=2, ip="10.1.0.0/16"))
    assert indexes.apply(IpAllowed(seq=3, ip="10.1.0.0/16"))
    assert indexes.apply(IpUnallowed(seq=4, ip="10.1.0.0/16"))
    assert not indexes.apply(IpUnallowed(seq=4, ip="10.1.0.0/16"))
    assert indexes.apply(TokenRevoked(seq=5, jti="j", expires_at=10.0))
    assert not indexes.apply(TokenRevoked(seq=6, jti="j", expires_at=9.0))
    assert indexes.apply(SubjectRevoked(seq=7, sub="s", before=5.0))
    assert not indexes.apply(SubjectRevoked(seq=8, sub="s", before=4.0))
    before = indexes.to_state()
    assert not indexes.apply(CacheInvalidated(seq=9, all=True))
    assert not indexes.apply(UnknownEvent(seq=10, type="future_thing"))
    assert indexes.to_state() == before


def test_load_and_replace_from_snapshot() -> None:
    """Loading a replay.State replaces everything; to_state() gives it back."""
    indexes = EdgeIndexes()
    indexes.apply(ban("192.0.2.0/24", 1))
    indexes.apply(TokenRevoked(seq=2, jti="old"))
    state = replay(
        [
            ban("10.0.0.0/8", 5),
            IpAllowed(seq=6, ip="10.0.0.1/32"),
            TokenRevoked(seq=7, jti="j", expires_at=50.0),
            SubjectRevoked(seq=8, sub="s", before=9.0),
        ]
    )
    indexes.load(state)
    assert indexes.to_state() == state
    assert check(indexes, "192.0.2.1") is None
    assert check(indexes, "10.0.0.1") is None
    assert check(indexes, "10.0.0.2") is not None
    assert indexes.revocations.counts().tokens == 1
    with pytest.raises(EventError):
        indexes.replace_from_snapshot(
            bans=[entry("bad")], allows=[], revoked_tokens=[], revoked_subjects=[]
        )
    assert indexes.to_state() == state
    indexes.clear()
    assert indexes.to_state() == State()


# -- RevocationIndex --------------------------------------------------------------------------


def test_token_revocation_and_expiry() -> None:
    """A revoked jti is refused until its expires_at (exclusive); None means forever."""
    rev = RevocationIndex()
    rev.revoke_token("a", NOW)
    rev.revoke_token("b", None)
    assert rev.is_revoked("a", None, None, NOW - 1)
    assert not rev.is_revoked("a", None, None, NOW)
    assert rev.is_revoked("b", None, None, 1e12)
    assert not rev.is_revoked("c", None, None, NOW)
    assert not rev.is_revoked(None, None, None, NOW)


def test_token_later_expiry_wins() -> None:
    """Revoking a jti again keeps the later expiry, and None beats any time."""
    rev = RevocationIndex()
    rev.revoke_token("a", 10.0)
    rev.revoke_token("a", 5.0)
    assert rev.token_expiry("a") == (True, 10.0)
    rev.revoke_token("a", None)
    rev.revoke_token("a", 20.0)
    assert rev.token_expiry("a") == (True, None)
    assert rev.token_expiry("zz") == (False, None)


def test_subject_revocation() -> None:
    """A subject revocation refuses tokens with iat < before, and tokens without iat."""
    rev = RevocationIndex()
    rev.revoke_subject("alice", 100.0)
    rev.revoke_subject("alice", 50.0)
    assert rev.subject_before("alice") == 100.0
    assert rev.is_revoked(None, "alice", 99.9, NOW)
    assert not rev.is_revoked(None, "alice", 100.0, NOW)
    assert rev.is_revoked(None, "alice", None, NOW)
    assert not rev.is_revoked(None, "bob", None, NOW)
    assert rev.is_revoked("unrelated", "alice", 1.0, NOW)


def test_revocation_sweep_and_counts() -> None:
    """Sweeping drops token entries expired at now; subjects are kept."""
    rev = RevocationIndex()
    rev.revoke_token("a", 10.0)
    rev.revoke_token("b", 20.0)
    rev.revoke_token("c", None)
    rev.revoke_token("a", 30.0)
    rev.revoke_subject("s", 1.0)
    assert rev.sweep(9.0) == 0
    assert rev.sweep(20.0) == 1
    assert sorted(rev.tokens()) == [("a", 30.0), ("c", None)]
    assert list(rev.subjects()) == [("s", 1.0)]
    assert rev.counts().tokens == 2 and rev.counts().subjects == 1
    rev.clear()
    assert rev.counts().tokens == 0 and rev.counts().subjects == 0


# -- property: EdgeIndexes equals the reference semantics ---------------------------------------

V4_NETS = [
    "10.0.0.1/32",
    "10.0.0.2/32",
    "10.0.1.5/32",
    "10.0.0.0/31",
    "10.0.0.0/24",
    "10.0.0.0/16",
    "0.0.0.0/0",
]
V6_NETS = [
    "2001:db8::1/128",
    "2001:db8::/127",
    "2001:db8::/64",
    "2001:db8::/32",
    "2001:db8:0:1::1/128",
    "::/0",
]
NETS = V4_NETS + V6_NETS
PROBES = [
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.3",
    "10.0.1.5",
    "10.1.2.3",
    "192.0.2.1",
    "::ffff:10.0.0.1",
    "2001:db8::",
    "2001:db8::1",
    "2001:db8::2",
    "2001:db8:0:1::1",
    "2001:db9::1",
    "::1",
]
EXPIRIES = [None, 5.0, 10.0, 20.0]
TIMES = [0.0, 5.0, 9.99, 10.0, 15.0, 25.0]
JTIS = ["j1", "j2", "j3"]
SUBS = ["s1", "s2"]

nets = st.sampled_from(NETS)
expiries = st.sampled_from(EXPIRIES)
reasons = st.sampled_from(["", "abuse"])
event_bodies = st.one_of(
    st.builds(IpBanned, ip=nets, reason=reasons, expires_at=expiries),
    st.builds(IpUnbanned, ip=nets),
    st.builds(IpAllowed, ip=nets, reason=reasons, expires_at=expiries),
    st.builds(IpUnallowed, ip=nets),
    st.builds(TokenRevoked, jti=st.sampled_from(JTIS), expires_at=expiries),
    st.builds(SubjectRevoked, sub=st.sampled_from(SUBS), before=st.sampled_from([1.0, 8.0, 12.0])),
    st.builds(CacheInvalidated, tags=st.just(("t",))),
)


@st.composite
def event_logs(draw: st.DrawFn) -> list[Event]:
    bodies = draw(st.lists(event_bodies, max_size=40))
    return [
        type(body)(**{**_fields(body), "seq": seq, "source": "operator:p"})
        for seq, body in enumerate(bodies, start=1)
    ]


def _fields(event: Event) -> dict[str, object]:
    return attrs.asdict(event, recurse=False)


def naive_check(state: State, client: str, now: float) -> Entry | None:
    """The reference answer: scan every live entry with ipaddress, allow first."""
    address = ipaddress.ip_address(client)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped

    def covering(table: dict[str, Entry]) -> list[Entry]:
        found = []
        for e in table.values():
            net = ipaddress.ip_network(e.ip)
            if e.live(now) and net.version == address.version and address in net:
                found.append(e)
        return sorted(found, key=lambda e: -ipaddress.ip_network(e.ip).prefixlen)

    if covering(state.allows):
        return None
    bans = covering(state.bans)
    return bans[0] if bans else None


def naive_revoked(state: State, jti: str, sub: str, iat: float | None, now: float) -> bool:
    """The reference revocation rule of PROTOCOL.md §2."""
    if jti in state.revoked_tokens:
        exp = state.revoked_tokens[jti]
        if exp is None or exp > now:
            return True
    before = state.revoked_subjects.get(sub)
    return before is not None and (iat is None or iat < before)


def assert_agrees(indexes: EdgeIndexes, reference: State) -> None:
    assert indexes.to_state() == reference
    for client in PROBES:
        version, value = addr(client)
        for now in TIMES:
            assert indexes.check_ip(version, value, now) == naive_check(reference, client, now)
    for jti in JTIS:
        for sub in SUBS:
            for iat in (None, 0.0, 8.0, 11.0):
                for now in TIMES:
                    expected = naive_revoked(reference, jti, sub, iat, now)
                    assert indexes.revocations.is_revoked(jti, sub, iat, now) == expected


@settings(max_examples=150)
@given(event_logs())
def test_indexes_match_reference_replay(events: list[Event]) -> None:
    """After any event sequence, checks and state equal a naive scan of replay(events)."""
    indexes = EdgeIndexes()
    for event in events:
        before = indexes.to_state()
        changed = indexes.apply(event)
        assert changed == (indexes.to_state() != before)
    reference = replay(events)
    assert_agrees(indexes, reference)
    for event in events:
        indexes.apply(event)
    assert_agrees(indexes, reference)
    loaded = EdgeIndexes()
    loaded.load(reference)
    assert_agrees(loaded, reference)


@settings(max_examples=50)
@given(event_logs(), st.sampled_from(TIMES))
def test_sweep_matches_reference(events: list[Event], now: float) -> None:
    """Sweeping at now changes no answer at or after now and leaves only live entries."""
    indexes = EdgeIndexes()
    for event in events:
        indexes.apply(event)
    reference = replay(events)
    swept = indexes.bans.sweep(now) + indexes.allows.sweep(now)
    indexes.revocations.sweep(now)
    assert all(not e.live(now) for e in swept)
    assert all(e.live(now) for e in [*indexes.bans, *indexes.allows])
    for client in PROBES:
        version, value = addr(client)
        for later in (t for t in TIMES if t >= now):
            assert indexes.check_ip(version, value, later) == naive_check(reference, client, later)


def test_parse_client_ip_agrees_with_ipaddress() -> None:
    """parse_client_ip agrees with ipaddress on every probe address."""
    for client in PROBES:
        address = ipaddress.ip_address(client)
        mapped = getattr(address, "ipv4_mapped", None)
        expected = mapped or address
        assert addr(client) == (expected.version, int(expected))
