"""Tests for edgeauth.edge.gate: bans, JWTs, revocations and the failure pattern (PROTOCOL §6)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from edgeauth.config import EdgeSettings, FailureSettings, GateSettings, Settings
from edgeauth.edge.failures import FailureWindow
from edgeauth.edge.gate import Gate, Refusal
from edgeauth.edge.index import EdgeIndexes
from edgeauth.edge.jwt import JWTVerifier
from edgeauth.events import (
    EventError,
    IpAllowed,
    IpBanned,
    IpUnbanned,
    SubjectRevoked,
    TokenRevoked,
)

SECRET = "a-test-secret-that-is-long-enough-1234"
NOW = 1_763_850_000.0
INVALID = {"error": "invalid_token"}
REVOKED = {"error": "token_revoked"}
BEARER = (b"WWW-Authenticate", b'Bearer error="invalid_token"')


def bearer(claims: dict[str, Any] | None = None) -> bytes:
    claims = {"sub": "alice", "jti": "t-1", "iat": NOW - 60, "exp": NOW + 600, **(claims or {})}
    token = jwt.encode({"alg": "HS256"}, claims, OctKey.import_key(SECRET))
    return b"Bearer " + token.encode()


class Harness:
    """A gate over fresh indexes, keeping the local bans it reports."""

    def __init__(self, threshold: int = 3, count_statuses: tuple[int, ...] = (401,)) -> None:
        self.indexes = EdgeIndexes()
        self.local_bans: list[IpBanned] = []
        self.gate = Gate(
            self.indexes,
            JWTVerifier(["HS256"], SECRET, None, leeway=30),
            ["/api/*", "/admin"],
            FailureWindow(threshold=threshold, window=60.0, ipv6_prefix=64),
            count_statuses,
            600.0,
            "edge-a",
            self.local_bans.append,
        )

    def ban(self, ip: str, seq: int, expires_at: float | None = None) -> None:
        self.indexes.apply(IpBanned(seq=seq, ip=ip, source="operator:alice", expires_at=expires_at))

    def allow(self, ip: str, seq: int) -> None:
        self.indexes.apply(IpAllowed(seq=seq, ip=ip, source="operator:alice"))

    def check(
        self,
        ip: str = "198.51.100.7",
        path: bytes = b"/api/items",
        authorization: bytes | None = None,
        now: float = NOW,
    ) -> Refusal | None:
        return self.gate.check(ip, b"GET", path, authorization, now)


@pytest.fixture
def harness() -> Harness:
    return Harness()


def body(refusal: Refusal | None) -> Any:
    assert refusal is not None
    return json.loads(refusal.body)


def test_banned_client_gets_403_with_ref(harness: Harness) -> None:
    """A banned client gets 403 ip_banned with the ban's seq as ref and no-store."""
    harness.ban("198.51.100.0/24", seq=42)
    refusal = harness.check(path=b"/public", authorization=None)
    assert refusal is not None
    assert refusal.status == 403
    assert refusal.body == b'{"error":"ip_banned","ref":42}'
    assert (b"Cache-Control", b"no-store") in refusal.headers
    assert (b"Content-Type", b"application/json") in refusal.headers
    assert refusal.ban is not None and refusal.ban.ip == "198.51.100.0/24"
    assert harness.local_bans == []


def test_refusal_is_reused_while_the_same_ban_entry_refuses(harness: Harness) -> None:
    """One ban entry, one 403: reused across clients; a re-ban or another entry builds anew."""
    harness.ban("198.51.100.0/24", seq=42)
    first = harness.check(ip="198.51.100.7", path=b"/public")
    assert first is not None and first.body == b'{"error":"ip_banned","ref":42}'
    assert harness.check(ip="198.51.100.8", path=b"/public") is first
    assert harness.check(ip="198.51.100.7", path=b"/api/items") is first

    harness.ban("203.0.113.0/24", seq=43)  # another entry in between: its own answer
    assert body(harness.check(ip="203.0.113.1", path=b"/public")) == {
        "error": "ip_banned",
        "ref": 43,
    }
    again = harness.check(ip="198.51.100.7", path=b"/public")
    assert again is not None and body(again)["ref"] == 42 and again.ban is first.ban

    harness.ban("198.51.100.0/24", seq=50)  # the network banned again: a new entry, a new seq
    rebanned = harness.check(ip="198.51.100.9", path=b"/public")
    assert rebanned is not None and rebanned is not first
    assert rebanned.ban is not first.ban and rebanned.ban is not None
    assert rebanned.ban.seq == 50
    assert rebanned.body == b'{"error":"ip_banned","ref":50}'
    assert (rebanned.status, rebanned.headers, rebanned.reason) == (
        first.status,
        first.headers,
        first.reason,
    )
    assert harness.check(ip="198.51.100.7", path=b"/public") is rebanned

    harness.indexes.apply(IpUnbanned(seq=51, ip="198.51.100.0/24", source="operator:alice"))
    assert harness.check(ip="198.51.100.7", path=b"/public") is None
    assert harness.check(ip="198.51.100.9", path=b"/public") is None


def test_ban_comes_before_the_token(harness: Harness) -> None:
    """A banned client with a valid token on a protected path still gets 403."""
    harness.ban("198.51.100.7", seq=5)
    assert body(harness.check(authorization=bearer())) == {"error": "ip_banned", "ref": 5}


def test_ipv4_mapped_client_matches_ipv4_ban(harness: Harness) -> None:
    """An IPv4-mapped client address is refused by an IPv4 ban."""
    harness.ban("198.51.100.7", seq=3)
    assert body(harness.check(ip="::ffff:198.51.100.7", path=b"/"))["ref"] == 3


def test_expired_ban_does_not_refuse(harness: Harness) -> None:
    """A ban past its expiry refuses nothing."""
    harness.ban("198.51.100.7", seq=3, expires_at=NOW)
    assert harness.check(path=b"/", now=NOW - 1) is not None
    assert harness.check(path=b"/", now=NOW) is None


def test_allow_beats_ban(harness: Harness) -> None:
    """An allow entry covering the client beats every ban, even a more specific one."""
    harness.ban("198.51.100.7", seq=1)
    harness.ban("198.51.100.0/24", seq=2)
    harness.allow("198.51.0.0/16", seq=3)
    assert harness.check(path=b"/") is None


def test_unparsable_client_is_not_banned(harness: Harness) -> None:
    """A client that is not an address (a UNIX socket) is never banned, but is still gated."""
    harness.ban("0.0.0.0/0", seq=1)
    assert harness.check(ip="unix", path=b"/") is None
    assert body(harness.check(ip="unix")) == INVALID
    assert harness.local_bans == []


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        (None, INVALID),
        (b"", INVALID),
        (b"Basic dXNlcjpwYXNz", INVALID),
        (b"Bearer", INVALID),
        (b"Bearer not-a-jwt", INVALID),
        (b"Bearer \xff\xfe", INVALID),
        (bearer({"exp": NOW - 31}), INVALID),
        (bearer()[:-2] + b"xx", INVALID),
        (bearer(), None),
        (b"bearer " + bearer()[7:], None),
        (b"  Bearer   " + bearer()[7:] + b" ", None),
    ],
)
def test_protected_path_tokens(
    harness: Harness, authorization: bytes | None, expected: dict[str, str] | None
) -> None:
    """Protected paths need a valid bearer JWT; else 401 invalid_token with WWW-Authenticate."""
    refusal = harness.check(authorization=authorization)
    if expected is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.status == 401
        assert body(refusal) == expected
        assert BEARER in refusal.headers
        assert refusal.reason.startswith("invalid_token")
        assert refusal.ban is None


def test_revoked_jti(harness: Harness) -> None:
    """A token whose jti is revoked gets 401 token_revoked until the revocation expires."""
    harness.indexes.apply(TokenRevoked(seq=1, jti="t-1", expires_at=NOW + 600))
    refusal = harness.check(authorization=bearer())
    assert refusal is not None and refusal.status == 401
    assert body(refusal) == REVOKED
    assert BEARER in refusal.headers
    assert harness.check(authorization=bearer({"jti": "t-2"})) is None


def test_revoked_subject(harness: Harness) -> None:
    """Tokens of a revoked subject issued before ``before`` are refused; newer ones pass."""
    harness.indexes.apply(SubjectRevoked(seq=1, sub="alice", before=NOW - 30))
    assert body(harness.check(authorization=bearer({"iat": NOW - 60}))) == REVOKED
    assert harness.check(authorization=bearer({"iat": NOW - 10})) is None
    assert harness.check(authorization=bearer({"sub": "bob", "iat": NOW - 60})) is None


@pytest.mark.parametrize(
    ("path", "protected"),
    [
        (b"/api/items", True),
        (b"/api/a/b?x=1", True),
        (b"/admin", True),
        (b"/admin?x", True),
        (b"/admin/", False),
        (b"/public", False),
        (b"/API/items", False),
        (b"/", False),
        (b"", False),
        (b"/public?next=/api/x", False),
        # encodings an origin may undo do not slip past the globs
        (b"/%61pi/items", True),
        (b"//api/items", True),
        (b"/public/../api/items", True),
        (b"/./admin", True),
        (b"/admin;jsessionid=1", True),
        (b"/api\\items", True),
        (b"/%2e%2e/admin", True),
    ],
)
def test_protected_paths(harness: Harness, path: bytes, protected: bool) -> None:
    """Paths are matched with the protect globs without their query, decoded too."""
    assert harness.gate.is_protected(path) is protected
    refusal = harness.check(path=path)
    assert (refusal is not None) is protected


def test_nothing_protected_needs_no_verifier() -> None:
    """With no protect globs no path needs a token and no verifier is needed."""
    gate = Gate(EdgeIndexes(), None, [], None, (), 600.0, "e", lambda event: None)
    assert gate.check("198.51.100.7", b"POST", b"/api/x", None, NOW) is None


def test_protect_without_verifier_refused() -> None:
    """Protect globs without a verifier are a configuration error."""
    with pytest.raises(ValueError):
        Gate(EdgeIndexes(), None, ["/x"], None, (), 600.0, "e", lambda event: None)


def test_threshold_401s_trigger_exactly_one_local_ban(harness: Harness) -> None:
    """The threshold-th gate 401 in the window bans the /32 once, with the right expiry."""
    assert harness.check(now=NOW) is not None
    assert harness.check(now=NOW + 10) is not None
    assert harness.local_bans == []
    assert harness.check(now=NOW + 20) is not None
    assert harness.local_bans == [
        IpBanned(
            seq=0,
            timestamp=NOW + 20,
            source="edge:edge-a",
            ip="198.51.100.7/32",
            reason="failure pattern: 3 failures in 60 s",
            expires_at=NOW + 20 + 600,
        )
    ]
    assert harness.check(now=NOW + 21) is not None  # the count started again
    assert len(harness.local_bans) == 1


def test_local_ban_applied_by_the_callback_refuses(harness: Harness) -> None:
    """Once the caller applies the local ban, the client gets 403 until it expires."""

    def apply(event: IpBanned) -> None:
        harness.indexes.apply(event)

    harness.gate.on_local_ban = apply
    for t in range(3):
        harness.check(now=NOW + t)
    refusal = harness.check(path=b"/", now=NOW + 3)
    assert refusal is not None and refusal.status == 403
    assert refusal.ban is not None and refusal.ban.source == "edge:edge-a"
    assert harness.check(path=b"/", now=NOW + 2 + 600) is None


def test_spread_out_401s_do_not_ban(harness: Harness) -> None:
    """401s further apart than the window never reach the threshold."""
    for t in range(10):
        harness.check(now=NOW + t * 40)
    assert harness.local_bans == []


def test_valid_tokens_and_unprotected_paths_are_not_failures(harness: Harness) -> None:
    """Only refusals count: accepted requests never feed the failure window."""
    for t in range(10):
        harness.check(now=NOW + t, authorization=bearer())
        harness.check(now=NOW + t, path=b"/public")
    assert harness.local_bans == []


def test_ipv6_clients_grouped_by_prefix(harness: Harness) -> None:
    """IPv6 failures add up per /64, and the /64 is banned."""
    harness.check(ip="2001:db8:1:2::1", now=NOW)
    harness.check(ip="2001:db8:1:2:aaaa::1", now=NOW + 1)
    harness.check(ip="2001:db8:1:3::1", now=NOW + 2)  # another /64
    assert harness.local_bans == []
    harness.check(ip="2001:db8:1:2:ffff:ffff:ffff:ffff", now=NOW + 3)
    assert [event.ip for event in harness.local_bans] == ["2001:db8:1:2::/64"]


def test_allowed_clients_are_not_counted(harness: Harness) -> None:
    """A client covered by an allow entry never gets a local ban."""
    harness.allow("198.51.100.0/24", seq=1)
    for t in range(10):
        assert harness.check(now=NOW + t) is not None
    assert harness.local_bans == []


def test_origin_statuses_counted() -> None:
    """Origin statuses in count_statuses are failures, mixed with gate 401s; others are not."""
    harness = Harness(count_statuses=(401, 403))
    gate = harness.gate
    assert gate.record_origin_status("198.51.100.7", 200, NOW) is None
    assert gate.record_origin_status("198.51.100.7", 404, NOW) is None
    assert gate.record_origin_status("198.51.100.7", 403, NOW + 1) is None
    assert harness.check(now=NOW + 2) is not None  # a gate 401
    event = gate.record_origin_status("198.51.100.7", 401, NOW + 3)
    assert event is not None and event.ip == "198.51.100.7/32"
    assert harness.local_bans == [event]
    assert event.expires_at == NOW + 3 + 600


def test_gate_401s_count_even_if_not_listed() -> None:
    """Gate 401s are failures even when count_statuses does not list 401."""
    harness = Harness(threshold=2, count_statuses=(429,))
    assert harness.gate.record_origin_status("198.51.100.7", 401, NOW) is None
    harness.check(now=NOW)
    harness.check(now=NOW + 1)
    assert [event.ip for event in harness.local_bans] == ["198.51.100.7/32"]


def test_no_failure_window_never_bans() -> None:
    """Without a failure window the gate refuses but never bans."""
    bans: list[IpBanned] = []
    gate = Gate(
        EdgeIndexes(),
        JWTVerifier(["HS256"], SECRET, None),
        ["/*"],
        None,
        (401,),
        600.0,
        "e",
        bans.append,
    )
    for t in range(10):
        assert gate.check("198.51.100.7", b"GET", b"/x", None, NOW + t) is not None
        assert gate.record_origin_status("198.51.100.7", 401, NOW + t) is None
    assert bans == []


def test_explain_ip(harness: Harness) -> None:
    """explain_ip lists the live allow and ban entries covering an address."""
    harness.ban("198.51.100.7", seq=1)
    harness.ban("198.51.100.0/24", seq=2, expires_at=NOW + 60)
    harness.ban("198.51.0.0/16", seq=3, expires_at=NOW - 1)
    harness.ban("203.0.113.0/24", seq=4)
    got = harness.gate.explain_ip("::ffff:198.51.100.7", NOW)
    assert got["ip"] == "198.51.100.7"
    assert got["refused"] is True and got["ref"] == 1
    assert [(e["ip"], e["seq"], e["expires_at"]) for e in got["bans"]] == [
        ("198.51.100.7/32", 1, None),
        ("198.51.100.0/24", 2, NOW + 60),
    ]
    assert got["allows"] == []
    harness.allow("198.51.100.0/25", seq=5)
    got = harness.gate.explain_ip("198.51.100.7", NOW)
    assert got["refused"] is False and got["ref"] is None
    assert got["allows"] == [
        {
            "ip": "198.51.100.0/25",
            "reason": "",
            "expires_at": None,
            "source": "operator:alice",
            "seq": 5,
        }
    ]
    assert len(got["bans"]) == 2
    json.dumps(got)


def test_explain_ip_garbage(harness: Harness) -> None:
    """explain_ip refuses what is not an address, networks included."""
    for bad in ("nonsense", "198.51.100.0/24", ""):
        with pytest.raises(EventError) as info:
            harness.gate.explain_ip(bad, NOW)
        assert info.value.code == "invalid_ip"


def test_from_settings() -> None:
    """from_settings wires [edge] id, [gate] and [failures] into a gate."""
    bans: list[IpBanned] = []
    settings = Settings(
        edge=EdgeSettings(id="edge-z"),
        gate=GateSettings(protect=("/p/*",), jwt_secret=SECRET),
        failures=FailureSettings(threshold=2, window=10.0, ban_for=30.0, count_statuses=(418,)),
    )
    gate = Gate.from_settings(EdgeIndexes(), settings, bans.append)
    assert gate.check("198.51.100.7", b"GET", b"/open", None, NOW) is None
    assert gate.check("198.51.100.7", b"GET", b"/p/x", bearer(), NOW) is None
    gate.record_origin_status("198.51.100.7", 418, NOW)
    assert gate.check("198.51.100.7", b"GET", b"/p/x", None, NOW + 1) is not None
    assert [(b.source, b.expires_at, b.reason) for b in bans] == [
        ("edge:edge-z", NOW + 31, "failure pattern: 2 failures in 10 s")
    ]


def test_from_settings_without_protect_has_no_verifier() -> None:
    """With no protected paths no JWT secret is needed."""
    gate = Gate.from_settings(EdgeIndexes(), Settings(), lambda event: None)
    assert gate.verifier is None
