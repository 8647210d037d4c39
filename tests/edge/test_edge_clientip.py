"""Tests for edgeauth.edge.clientip: which address is the client (PROTOCOL.md §6 "Client IP")."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeauth.edge.clientip import TrustedProxies, client_ip
from edgeauth.events import EventError

TRUSTED = TrustedProxies(["10.0.0.0/8", "2001:db8:ffff::/48", "192.0.2.9"])


@pytest.mark.parametrize(
    ("peer", "xff", "forwarded", "expected"),
    [
        # an untrusted peer: forwarding headers are ignored
        ("203.0.113.5", [b"198.51.100.1"], [], "203.0.113.5"),
        ("203.0.113.5", [], [b"for=198.51.100.1"], "203.0.113.5"),
        # a trusted peer with no headers is the client
        ("10.1.2.3", [], [], "10.1.2.3"),
        # a trusted chain: the right-most untrusted address
        ("10.0.0.1", [b"198.51.100.1, 203.0.113.9, 10.0.0.2"], [], "203.0.113.9"),
        ("10.0.0.1", [b"198.51.100.1", b"203.0.113.9,10.0.0.2"], [], "203.0.113.9"),
        ("10.0.0.1", [b"198.51.100.1, 192.0.2.9, 10.0.0.2"], [], "198.51.100.1"),
        # all trusted: the left-most
        ("10.0.0.1", [b"10.9.9.9, 192.0.2.9, 10.0.0.2"], [], "10.9.9.9"),
        # garbage stops the walk: the last good address, else the peer
        ("10.0.0.1", [b"198.51.100.1, nonsense, 10.0.0.2"], [], "10.0.0.2"),
        ("10.0.0.1", [b"198.51.100.1, nonsense"], [], "10.0.0.1"),
        ("10.0.0.1", [b"198.51.100.1, 1.2.3.4.5"], [], "10.0.0.1"),
        # ports and brackets in XFF, IPv6 normalised
        ("10.0.0.1", [b"198.51.100.1:4711"], [], "198.51.100.1"),
        ("10.0.0.1", [b"[2001:DB8::0:1]:443"], [], "2001:db8::1"),
        ("10.0.0.1", [b"2001:db8:0::1"], [], "2001:db8::1"),
        ("10.0.0.1", [b"::ffff:198.51.100.1"], [], "198.51.100.1"),
        # empty items are skipped
        ("10.0.0.1", [b"198.51.100.1,, ", b""], [], "198.51.100.1"),
        # IPv6 trusted proxies
        ("2001:db8:ffff::1", [b"2001:db8:1::7, 2001:db8:ffff:1::2"], [], "2001:db8:1::7"),
        # an IPv4-mapped peer is trusted through an IPv4 network, and normalised
        ("::ffff:10.0.0.1", [b"198.51.100.1"], [], "198.51.100.1"),
        ("::ffff:203.0.113.5", [b"198.51.100.1"], [], "203.0.113.5"),
        ("::ffff:10.0.0.1", [], [], "10.0.0.1"),
        # a peer that is not an address is returned as is
        ("unix-socket", [b"198.51.100.1"], [], "unix-socket"),
    ],
)
def test_x_forwarded_for(
    peer: str, xff: list[bytes], forwarded: list[bytes], expected: str
) -> None:
    """X-Forwarded-For is believed only from trusted peers, walked from the right."""
    assert client_ip(peer, xff, forwarded, TRUSTED) == expected


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        ([b"for=198.51.100.1"], "198.51.100.1"),
        ([b"For=198.51.100.1;proto=https;by=10.0.0.1"], "198.51.100.1"),
        ([b'for="198.51.100.1:4711"'], "198.51.100.1"),
        ([b'for="[2001:db8:cafe::17]:4711"'], "2001:db8:cafe::17"),
        ([b'for="[2001:db8:cafe::17]"'], "2001:db8:cafe::17"),
        ([b"for=198.51.100.1, for=203.0.113.9"], "203.0.113.9"),
        ([b"for=198.51.100.1", b"for=203.0.113.9;by=_proxy"], "203.0.113.9"),
        ([b"for=198.51.100.1, for=10.0.0.2"], "198.51.100.1"),
        # quoted commas and semicolons do not split elements
        ([b'for=198.51.100.1;host="a,b;c", for=10.0.0.2'], "198.51.100.1"),
        # unknown and obfuscated identifiers are skipped
        ([b"for=198.51.100.1, for=unknown"], "198.51.100.1"),
        ([b"for=198.51.100.1, for=_hidden, for=10.0.0.2"], "198.51.100.1"),
        ([b'for=198.51.100.1, for="_gw.1:_p"'], "198.51.100.1"),
        ([b'for="[2001:db8::5]:_port"'], "2001:db8::5"),
        ([b"for=unknown"], "10.0.0.1"),
        # elements without for= are ignored
        ([b"proto=https, for=198.51.100.1, by=10.0.0.3"], "198.51.100.1"),
        # garbage stops the walk
        ([b"for=198.51.100.1, for=nonsense, for=10.0.0.2"], "10.0.0.2"),
        ([b'for="198.51.100.1'], "10.0.0.1"),
        ([b"for=[2001:db8::1]x"], "10.0.0.1"),
        ([b"for=198.51.100.1, garbage-without-equals"], "10.0.0.1"),
        ([b'for="[198.51.100.1]"'], "10.0.0.1"),
        ([b"for=198.51.100.1, for=", b"for=10.0.0.2"], "10.0.0.2"),
        ([b'for=198.51.100.1, for=""'], "10.0.0.1"),
    ],
)
def test_forwarded(forwarded: list[bytes], expected: str) -> None:
    """RFC 7239 Forwarded is read when there is no X-Forwarded-For."""
    assert client_ip("10.0.0.1", [], forwarded, TRUSTED) == expected


def test_x_forwarded_for_wins_over_forwarded() -> None:
    """With both headers, X-Forwarded-For is the chain and Forwarded is ignored."""
    got = client_ip("10.0.0.1", [b"198.51.100.1"], [b"for=203.0.113.9"], TRUSTED)
    assert got == "198.51.100.1"


def test_blank_x_forwarded_for_falls_back_to_forwarded() -> None:
    """An X-Forwarded-For with no items counts as absent."""
    got = client_ip("10.0.0.1", [b" , "], [b"for=203.0.113.9"], TRUSTED)
    assert got == "203.0.113.9"


def test_no_trusted_proxies_is_the_peer() -> None:
    """With no trusted proxies only the peer counts, normalised."""
    assert client_ip("::ffff:198.51.100.1", [b"203.0.113.9"], [], TrustedProxies([])) == (
        "198.51.100.1"
    )


@pytest.mark.parametrize(
    ("ip", "trusted"),
    [
        ("10.255.0.1", True),
        ("11.0.0.1", False),
        ("::ffff:10.0.0.1", True),
        ("192.0.2.9", True),
        ("192.0.2.10", False),
        ("2001:db8:ffff:12::1", True),
        ("2001:db8:fffe::1", False),
        ("garbage", False),
        ("", False),
    ],
)
def test_is_trusted(ip: str, trusted: bool) -> None:
    """Trust is a prefix match on integers; IPv4-mapped addresses match IPv4 networks."""
    assert TRUSTED.is_trusted(ip) is trusted


def test_trusted_mapped_network_counts_as_ipv4() -> None:
    """A trusted network written IPv4-mapped trusts the IPv4 addresses."""
    proxies = TrustedProxies(["::ffff:10.0.0.0/104"])
    assert proxies.cidrs == ("10.0.0.0/8",)
    assert proxies.is_trusted("10.1.1.1")


def test_bad_trusted_network_refused() -> None:
    """A trusted proxy entry that is not a network, or has host bits, is refused."""
    with pytest.raises(EventError):
        TrustedProxies(["10.0.0.1/8"])
    with pytest.raises(EventError):
        TrustedProxies(["proxy.example"])


_HEADER_BYTES = st.binary(max_size=80) | st.lists(
    st.sampled_from([b"10.0.0.2", b"198.51.100.1", b'"', b"[", b"]", b":", b",", b";", b"=", b" "])
    | st.sampled_from([b"for", b"For", b"_x", b"unknown", b"\\", b"::1", b"\xff", b"\x00"]),
    max_size=20,
).map(b"".join)


@given(
    peer=st.sampled_from(["10.0.0.1", "::ffff:10.0.0.1", "203.0.113.5", "x"]),
    xff=st.lists(_HEADER_BYTES, max_size=3),
    forwarded=st.lists(_HEADER_BYTES, max_size=3),
)
def test_arbitrary_headers_never_raise(peer: str, xff: list[bytes], forwarded: list[bytes]) -> None:
    """Any header bytes give an address: the peer or one parsed from the chain."""
    got = client_ip(peer, xff, forwarded, TRUSTED)
    assert isinstance(got, str)
    if peer == "x":
        assert got == "x"
    else:
        assert TrustedProxies([got]).cidrs  # a valid address in normal form
        if peer == "203.0.113.5":
            assert got == peer
