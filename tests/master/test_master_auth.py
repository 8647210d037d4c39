"""Tests for edgeauth.master.auth: bearer parsing, constant-time lookup and role checks."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from edgeauth.config import TokenEntry, load_settings
from edgeauth.master.auth import (
    ROLE_EDGE,
    ROLE_OPERATOR,
    ROLE_READER,
    AuthError,
    Principal,
    TokenAuthority,
)

TOKENS = {"alice": "op-Token-123", "edge-a": "edge-Token-456", "dash": "reader-Token-789"}
DIGEST_ONLY = "digest-Only-Token"


@pytest.fixture
def authority() -> TokenAuthority:
    env = {"OP": TOKENS["alice"], "EDGE": TOKENS["edge-a"], "READER": TOKENS["dash"]}
    digest = hashlib.sha256(DIGEST_ONLY.encode()).hexdigest()
    overrides = {
        ("tokens", "alice"): "operator env:OP",
        ("tokens", "edge-a"): "edge env:EDGE",
        ("tokens", "dash"): "reader env:READER",
        ("tokens", "ci"): f"reader sha256:{digest}",
    }
    return TokenAuthority(load_settings(None, overrides, environ=env).tokens)


@pytest.mark.parametrize(
    ("name", "role"), [("alice", ROLE_OPERATOR), ("edge-a", ROLE_EDGE), ("dash", ROLE_READER)]
)
def test_good_token_of_each_role(authority: TokenAuthority, name: str, role: str) -> None:
    """A configured token, as bytes or str, authenticates as its name and role."""
    header = f"Bearer {TOKENS[name]}"
    assert authority.authenticate(header.encode()) == Principal(name, role)
    assert authority.authenticate(header) == Principal(name, role)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_scheme_is_case_insensitive(authority: TokenAuthority, scheme: str) -> None:
    """The Bearer scheme name is matched case-insensitively."""
    assert authority.authenticate(f"{scheme} {TOKENS['alice']}").name == "alice"


def test_sha256_configured_token(authority: TokenAuthority) -> None:
    """A token configured as sha256:HEX authenticates with the plain token."""
    assert authority.authenticate(f"Bearer {DIGEST_ONLY}") == Principal("ci", ROLE_READER)


def test_wrong_token_is_401_without_echo(authority: TokenAuthority) -> None:
    """An unknown token gives 401 unauthorized and the detail does not echo it."""
    with pytest.raises(AuthError) as info:
        authority.authenticate(b"Bearer not-a-Configured-token")
    assert (info.value.status, info.value.code) == (401, "unauthorized")
    assert "not-a-Configured-token" not in info.value.detail
    assert "not-a-Configured-token" not in str(info.value)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(None, id="missing"),
        pytest.param(b"", id="empty"),
        pytest.param(b"Basic YWxpY2U6cHc=", id="basic"),
        pytest.param(b"Bearer", id="bearer-alone"),
        pytest.param(b"Bearer ", id="bearer-space"),
        pytest.param(b"Bearer  op-Token-123", id="two-spaces"),
        pytest.param(b"Bearer op-Token-123 ", id="trailing-space"),
        pytest.param(b" Bearer op-Token-123", id="leading-space"),
        pytest.param(b"Bearer op-Token-123 extra", id="two-tokens"),
        pytest.param(b"Bearer\top-Token-123", id="tab"),
        pytest.param(b"Token op-Token-123", id="other-scheme"),
        pytest.param("Bearer op-Token-123\u00e9", id="non-ascii"),
        pytest.param(b"Bearer op-Token-123\xff", id="non-ascii-bytes"),
    ],
)
def test_malformed_headers_are_401(authority: TokenAuthority, header: bytes | str | None) -> None:
    """Anything but exactly 'Bearer <token>' gives 401 unauthorized without echoing the token."""
    with pytest.raises(AuthError) as info:
        authority.authenticate(header)
    assert (info.value.status, info.value.code) == (401, "unauthorized")
    assert "op-Token-123" not in info.value.detail


def test_role_not_allowed_is_403(authority: TokenAuthority) -> None:
    """A valid token whose role is not allowed gives 403 forbidden."""
    with pytest.raises(AuthError) as info:
        authority.check(f"Bearer {TOKENS['dash']}", {ROLE_OPERATOR})
    assert (info.value.status, info.value.code) == (403, "forbidden")
    assert TOKENS["dash"] not in info.value.detail


def test_check_returns_the_allowed_principal(authority: TokenAuthority) -> None:
    """check() returns the principal when its role is allowed."""
    principal = authority.check(f"Bearer {TOKENS['edge-a']}", [ROLE_OPERATOR, ROLE_EDGE])
    assert principal == Principal("edge-a", ROLE_EDGE)


def test_check_authenticates_before_authorizing(authority: TokenAuthority) -> None:
    """check() with a bad token is 401 even when no role would be allowed."""
    with pytest.raises(AuthError) as info:
        authority.check(b"Bearer nope", ())
    assert info.value.status == 401


def test_authorize_accepts_allowed_role(authority: TokenAuthority) -> None:
    """authorize() returns quietly for an allowed role."""
    authority.authorize(Principal("dash", ROLE_READER), (ROLE_READER, ROLE_OPERATOR))


def test_no_tokens_configured_refuses_everything() -> None:
    """An authority without tokens refuses every header with 401."""
    with pytest.raises(AuthError) as info:
        TokenAuthority([]).authenticate(b"Bearer anything")
    assert info.value.status == 401


def test_every_digest_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """A match on the first entry still compares against every configured digest."""
    entries = [
        TokenEntry(name=f"t{i}", role=ROLE_READER, digest=hashlib.sha256(b"tok%d" % i).digest())
        for i in range(3)
    ]
    calls: list[bytes] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)  # auth looks it up on each call
    assert TokenAuthority(entries).authenticate(b"Bearer tok0").name == "t0"
    assert calls == [entry.digest for entry in entries]
