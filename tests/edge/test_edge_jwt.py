"""Tests for edgeauth.edge.jwt: JWT verification for protected paths (PROTOCOL.md §6 "JWT")."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import ECKey, Key, OctKey, OKPKey, RSAKey

from edgeauth.config import GateSettings
from edgeauth.edge.jwt import Claims, InvalidToken, JWKSError, JWTVerifier

SECRET = "a-test-secret-that-is-long-enough-1234"
NOW = 1_763_850_000.0


def hs_token(claims: dict[str, Any], secret: str = SECRET, **header: Any) -> str:
    return jwt.encode({"alg": "HS256", **header}, claims, OctKey.import_key(secret))


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature)]
    )


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {
        "rsa": RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}),
        "rsa2": RSAKey.generate_key(2048, parameters={"kid": "rsa-2"}),
        "ec": ECKey.generate_key("P-256", parameters={"kid": "ec-1"}),
        "ed": OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"}),
    }


@pytest.fixture
def jwks_path(tmp_path: Path, keys: dict[str, Key]) -> str:
    path = tmp_path / "jwks.json"
    public = [keys[name].as_dict(private=False) for name in ("rsa", "ec", "ed")]
    path.write_text(json.dumps({"keys": public}))
    return str(path)


def hs_verifier(**kwargs: Any) -> JWTVerifier:
    options: dict[str, Any] = {"leeway": 30.0, **kwargs}
    return JWTVerifier(["HS256"], SECRET, None, **options)


GOOD = {"sub": "alice", "jti": "t-1", "iat": NOW - 10, "exp": NOW + 300}


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({**GOOD, "exp": NOW - 31}, "expired"),
        ({**GOOD, "exp": NOW - 30}, "expired"),
        ({**GOOD, "nbf": NOW + 31}, "not yet valid"),
        ({**GOOD, "iat": NOW + 31}, "issued in the future"),
        ({**GOOD, "exp": "tomorrow"}, "exp is not a number"),
        ({**GOOD, "exp": True}, "exp is not a number"),
        ({**GOOD, "iat": 10**400}, "iat is not a number"),
        ({**GOOD, "sub": 42}, "invalid_claim: Claim 'sub' must be a StringOrURI value"),
        ({**GOOD, "jti": ["x"]}, "invalid_claim: Claim 'jti' must be a string"),
    ],
)
def test_hs256_claims_refused(claims: dict[str, Any], reason: str) -> None:
    """Time claims beyond the leeway and ill-typed claims are refused with a reason."""
    with pytest.raises(InvalidToken) as info:
        hs_verifier().verify(hs_token(claims), NOW)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "claims",
    [
        GOOD,
        {**GOOD, "exp": NOW - 29},  # expired, but within the leeway
        {**GOOD, "nbf": NOW + 29, "iat": NOW + 29},  # clock skew the other way
        {"sub": "alice"},  # no time claims at all
        {},
    ],
)
def test_hs256_accepted(claims: dict[str, Any]) -> None:
    """A well-signed HS256 token within the leeway is accepted."""
    got = hs_verifier().verify(hs_token(claims), NOW)
    assert got.sub == claims.get("sub")
    assert got.raw == claims


def test_claims_values() -> None:
    """The verified claims come back typed, with every raw claim read-only."""
    got = hs_verifier().verify(hs_token({**GOOD, "iat": int(NOW), "role": "x"}), NOW)
    assert got == Claims(sub="alice", jti="t-1", iat=NOW, exp=NOW + 300, raw={})
    assert isinstance(got.iat, float)
    assert got.raw["role"] == "x"
    with pytest.raises(TypeError):
        got.raw["role"] = "y"  # type: ignore[index]


def test_now_is_the_argument_not_the_clock() -> None:
    """Expiry is judged against ``now``, whatever the real time."""
    token = hs_token({"exp": 1000.0})
    assert hs_verifier(leeway=0).verify(token, 999.5).exp == 1000.0
    with pytest.raises(InvalidToken, match="expired"):
        hs_verifier(leeway=0).verify(token, 1000.0)


def test_wrong_secret() -> None:
    """A token signed with another secret has a bad signature."""
    token = hs_token(GOOD, secret="another-secret-of-sufficient-length-99")
    with pytest.raises(InvalidToken, match="bad signature"):
        hs_verifier().verify(token, NOW)


def test_tampered_payload() -> None:
    """Changing the payload of a signed token breaks the signature."""
    header, _, signature = hs_token(GOOD).split(".")
    forged = unsigned({"alg": "HS256"}, {**GOOD, "sub": "root"}).split(".")[1]
    with pytest.raises(InvalidToken, match="bad signature"):
        hs_verifier().verify(f"{header}.{forged}.{signature}", NOW)


@pytest.mark.parametrize(
    ("kwargs", "claims", "ok"),
    [
        ({"issuer": "https://idp"}, {"iss": "https://idp"}, True),
        ({"issuer": "https://idp"}, {"iss": "https://evil"}, False),
        ({"issuer": "https://idp"}, {}, False),
        ({"audience": "edge"}, {"aud": "edge"}, True),
        ({"audience": "edge"}, {"aud": ["other", "edge"]}, True),
        ({"audience": "edge"}, {"aud": "other"}, False),
        ({"audience": "edge"}, {"aud": ["other"]}, False),
        ({"audience": "edge"}, {}, False),
        ({}, {"iss": "anyone", "aud": "anything"}, True),
    ],
)
def test_issuer_and_audience(kwargs: dict[str, Any], claims: dict[str, Any], ok: bool) -> None:
    """``iss`` and ``aud`` must match when configured, and are free when not."""
    verifier = hs_verifier(**kwargs)
    if ok:
        verifier.verify(hs_token(claims), NOW)
    else:
        with pytest.raises(InvalidToken, match="claim"):
            verifier.verify(hs_token(claims), NOW)


@pytest.mark.parametrize(
    "header",
    [{"alg": "none"}, {"alg": "None"}, {"alg": "HS512"}, {"alg": "RS256"}, {"alg": ""}],
)
def test_algorithm_not_allowed(header: dict[str, Any]) -> None:
    """``alg: none`` and algorithms not configured are refused before any key is used."""
    for signature in (b"", b"sig"):
        with pytest.raises(InvalidToken):
            hs_verifier().verify(unsigned(header, GOOD, signature), NOW)
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        hs_verifier().verify(unsigned(header, GOOD, b"sig"), NOW)


def test_hs256_refused_when_only_rs256_allowed(jwks_path: str) -> None:
    """An HS256 token is refused by a verifier that allows only RS256, even with the secret."""
    verifier = JWTVerifier(["RS256"], SECRET, jwks_path)
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        verifier.verify(hs_token(GOOD), NOW)


def test_rs256_public_key_as_hmac_secret_refused(jwks_path: str, keys: dict[str, Key]) -> None:
    """An HS256 token naming an RSA kid is refused: the alg does not fit the key type."""
    rsa = keys["rsa"]
    assert isinstance(rsa, RSAKey)
    public_pem = rsa.as_pem(private=False)
    signing_input = unsigned({"alg": "HS256", "kid": "rsa-1"}, GOOD).rsplit(".", 1)[0]
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    verifier = JWTVerifier(["HS256", "RS256"], SECRET, jwks_path)
    with pytest.raises(InvalidToken, match="key type does not match"):
        verifier.verify(token, NOW)


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
@pytest.mark.parametrize(("name", "alg"), [("rsa", "RS256"), ("ec", "ES256"), ("ed", "EdDSA")])
def test_jwks_by_kid(jwks_path: str, keys: dict[str, Key], name: str, alg: str) -> None:
    """RS256, ES256 and EdDSA tokens verify with the JWKS key their ``kid`` names."""
    key = keys[name]
    token = jwt.encode({"alg": alg, "kid": key.kid}, GOOD, key, [alg])
    verifier = JWTVerifier(["RS256", "ES256", "EdDSA"], None, jwks_path, leeway=30)
    assert verifier.verify(token, NOW).jti == "t-1"


def test_jwks_unknown_kid(jwks_path: str, keys: dict[str, Key]) -> None:
    """A kid not in the JWKS is refused, even if the signature is good."""
    token = jwt.encode({"alg": "RS256", "kid": "rsa-2"}, GOOD, keys["rsa2"], ["RS256"])
    verifier = JWTVerifier(["RS256"], None, jwks_path)
    with pytest.raises(InvalidToken, match="unknown kid"):
        verifier.verify(token, NOW)


def test_jwks_key_of_other_type(jwks_path: str, keys: dict[str, Key]) -> None:
    """An RS256 header naming the EC key's kid is refused."""
    token = jwt.encode({"alg": "RS256", "kid": "rsa-1"}, GOOD, keys["rsa"], ["RS256"])
    header, payload, signature = token.split(".")
    swapped = unsigned({"alg": "RS256", "kid": "ec-1"}, {}).split(".")[0]
    verifier = JWTVerifier(["RS256", "ES256"], None, jwks_path)
    with pytest.raises(InvalidToken, match="key type does not match"):
        verifier.verify(f"{swapped}.{payload}.{signature}", NOW)


def test_jwks_curve_does_not_fit_algorithm(jwks_path: str, keys: dict[str, Key]) -> None:
    """An ES384 header naming the P-256 key is refused (the curve does not fit)."""
    token = jwt.encode({"alg": "ES256", "kid": "ec-1"}, GOOD, keys["ec"], ["ES256"])
    _, payload, signature = token.split(".")
    header = unsigned({"alg": "ES384", "kid": "ec-1"}, {}).split(".")[0]
    verifier = JWTVerifier(["ES256", "ES384"], None, jwks_path)
    assert verifier.verify(token, NOW).sub == "alice"
    with pytest.raises(InvalidToken):
        verifier.verify(f"{header}.{payload}.{signature}", NOW)


def test_jwks_signed_by_other_key(jwks_path: str, keys: dict[str, Key]) -> None:
    """A token signed by another RSA key but naming a known kid has a bad signature."""
    token = jwt.encode({"alg": "RS256", "kid": "rsa-1"}, GOOD, keys["rsa2"], ["RS256"])
    verifier = JWTVerifier(["RS256"], None, jwks_path)
    with pytest.raises(InvalidToken, match="bad signature"):
        verifier.verify(token, NOW)


def test_jwks_without_kid_uses_the_only_fitting_key(jwks_path: str, keys: dict[str, Key]) -> None:
    """A token without kid verifies when the JWKS has exactly one key of the algorithm's type."""
    token = jwt.encode({"alg": "ES256"}, GOOD, keys["ec"], ["ES256"])
    verifier = JWTVerifier(["ES256"], None, jwks_path)
    assert verifier.verify(token, NOW).sub == "alice"


def test_jwks_reload(tmp_path: Path, jwks_path: str, keys: dict[str, Key]) -> None:
    """reload() picks up a new JWKS; a broken file keeps the keys in use."""
    verifier = JWTVerifier(["RS256"], None, jwks_path)
    token = jwt.encode({"alg": "RS256", "kid": "rsa-2"}, GOOD, keys["rsa2"], ["RS256"])
    with pytest.raises(InvalidToken):
        verifier.verify(token, NOW)
    Path(jwks_path).write_text(json.dumps({"keys": [keys["rsa2"].as_dict(private=False)]}))
    assert verifier.reload() == 1
    assert verifier.verify(token, NOW).sub == "alice"
    Path(jwks_path).write_text("{not json")
    with pytest.raises(JWKSError):
        verifier.reload()
    assert verifier.kids == {"rsa-2"}
    assert verifier.verify(token, NOW).sub == "alice"


@pytest.mark.parametrize(
    "content",
    [
        "",
        "[]",
        '{"keys": {}}',
        '{"keys": [1]}',
        '{"keys": []}',
        '{"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB"}]}',
        '{"keys": [{"kty": "PQ-unknown"}]}',
    ],
)
def test_bad_jwks_file(tmp_path: Path, content: str) -> None:
    """An unusable JWKS file is refused at construction with JWKSError."""
    path = tmp_path / "jwks.json"
    path.write_text(content)
    with pytest.raises(JWKSError):
        JWTVerifier(["RS256"], None, str(path))


def test_missing_jwks_file(tmp_path: Path) -> None:
    """A JWKS path that does not exist is refused at construction."""
    with pytest.raises(JWKSError):
        JWTVerifier(["RS256"], None, str(tmp_path / "nope.json"))


@pytest.mark.parametrize(
    ("algorithms", "secret"),
    [(["none"], SECRET), (["XS256"], SECRET), ([], SECRET), (["HS256"], None)],
)
def test_bad_configuration(algorithms: list[str], secret: str | None) -> None:
    """Unknown algorithms, ``none``, no algorithm or no key at all are configuration errors."""
    with pytest.raises(ValueError):
        JWTVerifier(algorithms, secret, None)


def test_from_settings() -> None:
    """from_settings takes algorithms, secret, issuer, audience and leeway from [gate]."""
    settings = GateSettings(
        jwt_algorithms=("HS256",),
        jwt_secret=SECRET,
        issuer="https://idp",
        audience="edge",
        leeway=5.0,
    )
    verifier = JWTVerifier.from_settings(settings)
    assert (verifier.issuer, verifier.audience, verifier.leeway) == ("https://idp", "edge", 5.0)
    good = hs_token({**GOOD, "iss": "https://idp", "aud": "edge"})
    assert verifier.verify(good, NOW).sub == "alice"
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(hs_token({**GOOD, "iss": "https://idp", "aud": "edge"}), NOW + 306)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c.d.e",
        "...",
        "e30.e30.",
        "!!!.e30.c2ln",
        unsigned({"alg": "HS256"}, GOOD)[:-1] + "%",
        "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln",  # payload is not JSON
        unsigned({"alg": "HS256", "kid": 7}, GOOD, b"sig"),
        unsigned({"alg": "HS256", "b64": False, "crit": ["b64"]}, GOOD, b"sig"),
        unsigned({"alg": "HS256", "crit": ["exp"]}, GOOD, b"sig"),
        unsigned(["HS256"], GOOD, b"sig"),  # type: ignore[arg-type]
        "é.é.é",
        "x" * 20000,
    ],
)
def test_garbage(token: str) -> None:
    """Malformed tokens are refused with InvalidToken."""
    with pytest.raises(InvalidToken):
        hs_verifier().verify(token, NOW)


_TOKENISH = st.lists(
    st.sampled_from(["eyJhbGciOiJIUzI1NiJ9", "e30", ".", "=", "_", "-", "AAAA", "\x00", "é"])
    | st.text(max_size=8),
    max_size=12,
).map("".join)


@given(token=st.text(max_size=200) | _TOKENISH)
def test_arbitrary_strings_only_raise_invalid_token(token: str) -> None:
    """No string makes verify raise anything but InvalidToken."""
    with pytest.raises(InvalidToken):
        hs_verifier().verify(token, NOW)


@given(
    header=st.dictionaries(
        st.sampled_from(["alg", "kid", "typ", "crit", "b64", "jku", "x"]),
        st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.just("HS256"),
        max_size=4,
    ),
    claims=st.dictionaries(
        st.sampled_from(["exp", "nbf", "iat", "sub", "jti", "aud", "iss"]),
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
        max_size=5,
    ),
)
def test_arbitrary_headers_and_claims_never_crash(
    header: dict[str, Any], claims: dict[str, Any]
) -> None:
    """Odd header and claim values, properly signed or not, end as InvalidToken or Claims."""
    verifier = hs_verifier(issuer="i", audience="a")
    for token in (
        unsigned(header, claims, b"sig"),
        jwt.encode({"alg": "HS256"}, claims, OctKey.import_key(SECRET)),
    ):
        try:
            verifier.verify(token, NOW)
        except InvalidToken:
            pass
