"""Tests for the check path of edgeauth.edge.index: bucket filter, bans first, check_client.

Each is compared with a naive scan of every entry with ipaddress.
"""

from __future__ import annotations

import ipaddress
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeauth.edge.index import EdgeIndexes, NetworkIndex, parse_client_ip
from edgeauth.replay import Entry

NOW = 1_000.0
EXPIRIES = [None, 500.0, 2_000.0]  # 500: expired at NOW


def entry(ip: str, *, expires_at: float | None = None, seq: int = 1) -> Entry:
    return Entry(ip=ip, reason="", expires_at=expires_at, source="operator:test", seq=seq)


def network(version: int, value: int, plen: int) -> str:
    """The network of length ``plen`` holding the address, in normal form."""
    host_bits = (32 if version == 4 else 128) - plen
    masked = value >> host_bits << host_bits
    if version == 4:
        return str(ipaddress.IPv4Network((masked, plen)))
    return str(ipaddress.IPv6Network((masked, plen)))


def text(version: int, value: int) -> str:
    if version == 4:
        return socket.inet_ntoa(value.to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


def covering(entries: dict[str, Entry], version: int, value: int, now: float) -> list[Entry]:
    """Every live entry covering the address, the most specific first (the reference)."""
    address = ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)
    found = [
        e
        for e in entries.values()
        if e.live(now)
        and ipaddress.ip_network(e.ip).version == version
        and address in ipaddress.ip_network(e.ip)
    ]
    return sorted(found, key=lambda e: -ipaddress.ip_network(e.ip).prefixlen)


def naive_check(
    bans: dict[str, Entry], allows: dict[str, Entry], version: int, value: int, now: float
) -> Entry | None:
    """PROTOCOL.md §6: a live allow beats every ban; else the most specific live ban."""
    if covering(allows, version, value, now):
        return None
    found = covering(bans, version, value, now)
    return found[0] if found else None


def assert_filter_sound(index: NetworkIndex) -> None:
    """Every entry of a filtered level has its bit set in its bucket (no bit is missing)."""
    for family in index._families.values():
        for plen, bit in family.slots.items():
            for key in family.tables[plen]:
                assert family.buckets[(key >> family.shift) & 0xFFFF] & bit
        assert len(family.slots) <= 8


# Addresses drawn near a few bases so that networks, probes and buckets collide: bucket
# boundaries (IPv4 /16, IPv6 bits 17-32) are crossed by the low-order variations and by the
# choice of base.
V4_BASES = [0x0A000000, 0x0A00FFFF, 0x0A010000, 0xC0A80000, 0xFFFFFFFF, 0x00000000]
V6_BASES = [
    0x2001_0DB8 << 96,
    (0x2001_0DB9 << 96) - 1,
    0x2001_0DB9 << 96,
    0x2A00_0000 << 96,
    (1 << 128) - 1,
    0,
]


@st.composite
def v4_values(draw: st.DrawFn) -> int:
    base = draw(st.sampled_from(V4_BASES))
    shift = draw(st.sampled_from([0, 0, 4, 8, 12, 16, 20]))
    delta = draw(st.integers(-3, 3)) << shift
    return (base + delta) % (1 << 32)


@st.composite
def v6_values(draw: st.DrawFn) -> int:
    base = draw(st.sampled_from(V6_BASES))
    shift = draw(st.sampled_from([0, 0, 32, 64, 80, 96, 100, 112]))
    delta = draw(st.integers(-3, 3)) << shift
    return (base + delta) % (1 << 128)


V4_PLENS = [0, 8, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 28, 31, 32]  # > 8 filtered levels
V6_PLENS = [0, 16, 31, 32, 33, 40, 48, 56, 60, 64, 96, 112, 127, 128]


@st.composite
def networks(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return network(4, draw(v4_values()), draw(st.sampled_from(V4_PLENS)))
    return network(6, draw(v6_values()), draw(st.sampled_from(V6_PLENS)))


@st.composite
def probes(draw: st.DrawFn) -> tuple[int, int]:
    if draw(st.booleans()):
        return 4, draw(v4_values())
    return 6, draw(v6_values())


operations = st.lists(
    st.tuples(
        st.sampled_from(["ban", "unban", "allow", "unallow"]),
        networks(),
        st.sampled_from(EXPIRIES),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(operations, st.lists(probes(), min_size=1, max_size=20))
def test_check_agrees_with_naive_scan(
    ops: list[tuple[str, str, float | None]], clients: list[tuple[int, int]]
) -> None:
    """check_ip, check_client and match equal a naive scan after any puts and removals.

    The networks are spread over bucket boundaries, with more filtered prefix lengths than the
    filter holds (the surplus is always probed).
    """
    indexes = EdgeIndexes()
    bans: dict[str, Entry] = {}
    allows: dict[str, Entry] = {}
    for seq, (op, net, expires_at) in enumerate(ops, start=1):
        index, table = (indexes.bans, bans) if op in ("ban", "unban") else (indexes.allows, allows)
        if op in ("ban", "allow"):
            e = entry(net, expires_at=expires_at, seq=seq)
            index.put(e)
            table[net] = e
        else:
            index.remove(net)
            table.pop(net, None)
    for index in (indexes.bans, indexes.allows):
        assert_filter_sound(index)
    clients = clients + [parse_client_ip(e.ip.split("/")[0]) or (4, 0) for e in bans.values()]
    for version, value in clients:
        for now in (NOW, 0.0):
            expected = naive_check(bans, allows, version, value, now)
            assert indexes.check_ip(version, value, now) == expected
            assert indexes.check_client(text(version, value), now) == expected
            live_bans = covering(bans, version, value, now)
            assert indexes.bans.match(version, value, now) == (live_bans[0] if live_bans else None)
            assert indexes.bans.matches(version, value, now) == live_bans


@settings(max_examples=100, deadline=None)
@given(st.lists(networks(), max_size=40), st.lists(probes(), min_size=1, max_size=10))
def test_built_index_equals_put_index(nets: list[str], clients: list[tuple[int, int]]) -> None:
    """NetworkIndex(entries) (the warm start) builds the same filter answers as put by put."""
    entries = [entry(net, seq=i) for i, net in enumerate(nets)]
    built = NetworkIndex(entries)
    put = NetworkIndex()
    for e in entries:
        put.put(e)
    assert_filter_sound(built)
    assert_filter_sound(put)
    for version, value in clients:
        assert built.match(version, value, NOW) == put.match(version, value, NOW)
        assert built.matches(version, value, NOW) == put.matches(version, value, NOW)


def test_allow_is_probed_only_for_a_live_ban() -> None:
    """The bans are walked first; the allows decide only when a live ban covers the client."""
    indexes = EdgeIndexes()
    indexes.allows.put(entry("10.1.2.0/24"))
    assert indexes.check_client("10.1.2.3", NOW) is None  # allowed, not banned
    indexes.bans.put(entry("10.1.2.3/32", expires_at=500.0, seq=2))  # expired ban
    assert indexes.check_client("10.1.2.3", NOW) is None
    indexes.bans.put(entry("10.1.0.0/16", seq=3))
    assert indexes.check_client("10.1.2.3", NOW) is None  # the allow beats the live ban
    assert indexes.check_client("10.1.3.3", NOW) == entry("10.1.0.0/16", seq=3)
    indexes.allows.put(entry("10.1.2.0/24", expires_at=500.0, seq=4))  # the allow expired
    assert indexes.check_client("10.1.2.3", NOW) == entry("10.1.0.0/16", seq=3)
    # An expired ban more specific than a live one: the live one refuses.
    indexes.bans.put(entry("10.1.2.0/24", expires_at=500.0, seq=5))
    assert indexes.check_client("10.1.2.3", NOW) == entry("10.1.0.0/16", seq=3)


def test_check_client_garbage_and_mapped() -> None:
    """Text that is not an address is never banned; an IPv4-mapped IPv6 address is IPv4."""
    indexes = EdgeIndexes()
    indexes.bans.put(entry("0.0.0.0/0"))
    indexes.bans.put(entry("::/0", seq=2))
    for garbage in ("", "unix:/run/x.sock", "1.2.3", "1.2.3.4/32", "::g", "1.2.3.4 ", "\x00"):
        assert indexes.check_client(garbage, NOW) is None
    assert indexes.check_client("::ffff:192.0.2.1", NOW) == entry("0.0.0.0/0")
    assert indexes.check_client("2001:db8::1", NOW) == entry("::/0", seq=2)


@settings(max_examples=200)
@given(st.one_of(st.text(max_size=45), st.sampled_from(["::ffff:10.0.0.1", "10.0.0.1", "::1"])))
def test_check_client_equals_parse_then_check_ip(client: str) -> None:
    """check_client(text) is check_ip(*parse_client_ip(text)) for any text."""
    indexes = EdgeIndexes()
    indexes.bans.put(entry("0.0.0.0/0"))
    indexes.bans.put(entry("::/0", seq=2))
    parsed = parse_client_ip(client)
    expected = None if parsed is None else indexes.check_ip(*parsed, NOW)
    assert indexes.check_client(client, NOW) == expected


def test_filter_rebuilds_after_many_removals() -> None:
    """Removals leave stale bits (never missing ones) until enough of them trigger a rebuild.

    The rebuild clears them; a level that empties is dropped from the walk at once.
    """
    index = NetworkIndex([entry("10.0.0.0/24"), entry("192.0.2.0/24")])
    family = index._families[4]
    bit = family.slots[24]
    for i in range(1_100):
        net = f"192.{i % 200 + 1}.0.0/24"
        index.put(entry(net))
        index.remove(net)
        assert_filter_sound(index)
    # 1,100 removals > 1,024 + the 2 entries held at the last rebuild: rebuilt on the way.
    assert family.stale == 1_100 - (1_024 + 3)
    # The 1,027th removal (192.27.0.0/24) rebuilt the filter.
    assert family.buckets[0xC032] & bit  # 192.50.0.0/24, removed after the rebuild: stale
    assert not family.buckets[0xC005] & bit  # 192.5.0.0/24, removed before it: cleared
    assert index.match(4, 0xC0320001, NOW) is None  # a stale bit costs a probe, finds nothing
    family.rebuild()
    assert family.stale == 0
    assert not family.buckets[0xC032] & bit
    assert family.buckets[0xC000] & bit  # 192.0.2.0/24 is still there
    assert index.match(4, 0xC0000201, NOW) == entry("192.0.2.0/24")
    index.remove("192.0.2.0/24")
    index.remove("10.0.0.0/24")
    assert index.prefix_lengths[4] == []
    assert family.slots == {}
    assert index.match(4, 0x0A000001, NOW) is None


def test_more_than_eight_filtered_levels() -> None:
    """Prefix lengths beyond the eight the filter holds are probed for every address."""
    plens = list(range(16, 32))
    index = NetworkIndex(entry(f"10.1.0.0/{plen}", seq=plen) for plen in plens)
    family = index._families[4]
    assert sorted(family.slots) == plens[-8:]  # the most specific eight
    for plen in plens:
        index.remove(f"10.1.0.0/{plen}")
        remaining = [p for p in plens if p > plen]
        expected = entry(f"10.1.0.0/{remaining[-1]}", seq=remaining[-1]) if remaining else None
        assert index.match(4, 0x0A010000, NOW) == expected
        assert_filter_sound(index)


@settings(max_examples=300)
@given(
    st.one_of(
        st.integers(0, (1 << 128) - 1),
        st.integers(0, (1 << 32) - 1).map(lambda v: (0xFFFF << 32) | v),  # ::ffff:a.b.c.d
        st.integers(0, (1 << 48) - 1),  # ::/80, around the mapped prefix
    ),
    st.booleans(),
)
def test_parse_ipv6_text_agrees_with_ipaddress(value: int, dotted: bool) -> None:
    """Any IPv6 text, mapped ones in hex or dotted form, parses as ipaddress reads it."""
    address = ipaddress.IPv6Address(value)
    client = str(address)
    if dotted and address.ipv4_mapped is not None:
        client = f"::ffff:{address.ipv4_mapped}"
    expected = address.ipv4_mapped or address
    assert parse_client_ip(client) == (expected.version, int(expected))
    assert parse_client_ip(client.upper()) == (expected.version, int(expected))
    indexes = EdgeIndexes()
    indexes.bans.put(entry(f"{expected}/{expected.max_prefixlen}"))
    assert indexes.check_client(client, NOW) == entry(f"{expected}/{expected.max_prefixlen}")
