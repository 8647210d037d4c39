"""Verify the JWTs that ``[gate] protect`` paths require (PROTOCOL.md §6 "JWT").

A token is a JWS compact serialization signed with the configured HS key or with a key of the JWKS
file (found by ``kid``). Its header is read here first, so that ``alg: none``, an algorithm not in
``jwt_algorithms`` and a key whose type does not fit the algorithm are refused before any
cryptography; the signature and payload are then checked by :mod:`joserfc` with a registry that
allows that one algorithm. ``exp``, ``nbf`` and ``iat`` are checked here against the ``now``
argument (joserfc's ``JWTClaimsRegistry`` takes ``now`` and ``leeway`` as whole seconds only, and
would read the clock when not given one), ``iss``/``aud`` and the types of ``sub``/``jti`` by that
registry. Any malformed input ends as :class:`InvalidToken`, never as another exception.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs
from joserfc import jwt as jose_jwt
from joserfc.errors import InvalidKeyTypeError, JoseError
from joserfc.jwk import JWKRegistry, Key, OctKey
from joserfc.jws import JWSRegistry

from edgeauth.config import GateSettings

__all__ = ["Claims", "InvalidToken", "JWKSError", "JWTVerifier"]

MAX_TOKEN_LENGTH = 16384
"""Longer tokens are refused before any parsing."""

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*\Z")
_TIME_CLAIMS = ("exp", "nbf", "iat")


class InvalidToken(Exception):  # noqa: N818 - the name the gate and its callers use
    """A token was refused; ``reason`` says why, for logs (never sent to the client).

    Attributes:
        reason: a short phrase such as ``"expired"`` or ``"bad signature"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JWKSError(ValueError):
    """The JWKS file cannot be read or holds no usable signing key."""


@attrs.frozen(kw_only=True)
class Claims:
    """The claims of a verified token that the gate uses, and all of them in ``raw``.

    Attributes:
        sub: the ``sub`` claim, if any.
        jti: the ``jti`` claim, if any.
        iat: the ``iat`` claim, if any.
        exp: the ``exp`` claim, if any.
        raw: every claim, read-only.
    """

    sub: str | None
    jti: str | None
    iat: float | None
    exp: float | None
    raw: Mapping[str, Any] = attrs.field(eq=False, repr=False)


def _b64_json(segment: str) -> Any:
    """Decode a base64url (unpadded) JSON segment, or raise InvalidToken."""
    if not _SEGMENT.match(segment):
        raise InvalidToken("malformed token")
    try:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        raise InvalidToken("malformed token") from None


def _numeric(claims: Mapping[str, Any], name: str) -> float | None:
    """Return a NumericDate claim as a float, None if absent; refuse anything else."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"{name} is not a number")
    try:
        number = float(value)
    except OverflowError:
        raise InvalidToken(f"{name} is not a number") from None
    if not math.isfinite(number):
        raise InvalidToken(f"{name} is not a number")
    return number


def load_jwks(path: str) -> dict[str, Key]:
    """Read a JWKS file into ``kid -> key`` (a key without ``kid`` is named by its thumbprint).

    Keys of a type joserfc does not know and keys whose ``use`` is not ``sig`` are skipped.

    Raises:
        JWKSError: the file cannot be read, is not a JWKS, has a broken key or a duplicate
            ``kid``, or holds no usable key.
    """
    try:
        with open(path, "rb") as stream:
            data = json.loads(stream.read())
    except (OSError, ValueError) as exc:
        raise JWKSError(f"cannot read JWKS file {path!r}: {exc}") from None
    items = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise JWKSError(f"JWKS file {path!r} has no 'keys' list")
    keys: dict[str, Key] = {}
    for number, item in enumerate(items):
        if not isinstance(item, dict):
            raise JWKSError(f"JWKS file {path!r}: key #{number} is not an object")
        if item.get("use", "sig") != "sig":
            continue
        try:
            key = JWKRegistry.import_key(item)
        except InvalidKeyTypeError:
            continue  # RFC 7517 §5: ignore keys of a type not understood
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise JWKSError(f"JWKS file {path!r}: key #{number} is invalid: {exc}") from None
        key.ensure_kid()
        kid = key.kid
        if not isinstance(kid, str) or kid in keys:
            raise JWKSError(f"JWKS file {path!r}: key #{number} has a duplicate or bad kid")
        keys[kid] = key
    if not keys:
        raise JWKSError(f"JWKS file {path!r} holds no signing key")
    return keys


class JWTVerifier:
    """Verify JWTs against the configured algorithms, keys, issuer, audience and leeway.

    Args:
        algorithms: the accepted ``alg`` values (``none`` is never accepted).
        hs_secret: the key of HS* algorithms, if any.
        jwks_path: a JWKS file with the keys of the other algorithms (and HS keys by ``kid``),
            read now and again by :meth:`reload`.
        issuer: the required ``iss``, if any.
        audience: the required ``aud`` (or one of its values), if any.
        leeway: seconds of clock skew allowed for ``exp``, ``nbf`` and ``iat``.
        required: claims a token must carry (e.g. ``("exp",)``); PROTOCOL.md §6 requires none.

    Raises:
        ValueError: an unknown algorithm or ``none``, a negative leeway, or no key at all.
        JWKSError: the JWKS file is unusable.
    """

    def __init__(
        self,
        algorithms: Collection[str],
        hs_secret: str | None,
        jwks_path: str | None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway: float = 0.0,
        *,
        required: Sequence[str] = (),
    ) -> None:
        known = JWSRegistry.algorithms
        for alg in algorithms:
            if alg == "none" or alg not in known:
                raise ValueError(f"JWT algorithm {alg!r} is not supported")
        if not algorithms:
            raise ValueError("at least one JWT algorithm is needed")
        if not leeway >= 0:
            raise ValueError("leeway must not be negative")
        if hs_secret is None and jwks_path is None:
            raise ValueError("a JWT secret or a JWKS file is needed")
        self.algorithms = frozenset(algorithms)
        self.issuer, self.audience, self.leeway = issuer, audience, float(leeway)
        self.required = tuple(required)
        self.jwks_path = jwks_path
        self._key_types = {alg: known[alg].key_type for alg in self.algorithms}
        self._registries = {
            alg: JWSRegistry(algorithms=[alg], strict_check_header=False) for alg in self.algorithms
        }
        self._hs_key = OctKey.import_key(hs_secret) if hs_secret else None
        self._keys: dict[str, Key] = {} if jwks_path is None else load_jwks(jwks_path)
        options: dict[str, Any] = {}
        if issuer is not None:
            options["iss"] = {"essential": True, "value": issuer}
        if audience is not None:
            options["aud"] = {"essential": True, "value": audience}
        self._claims_registry = jose_jwt.JWTClaimsRegistry(now=0, **options)

    @classmethod
    def from_settings(cls, settings: GateSettings) -> JWTVerifier:
        """Build a verifier from ``[gate]``.

        Raises:
            ValueError: no secret and no JWKS file are configured.
            JWKSError: the JWKS file is unusable.
        """
        return cls(
            settings.jwt_algorithms,
            settings.jwt_secret,
            settings.jwks_file,
            issuer=settings.issuer,
            audience=settings.audience,
            leeway=settings.leeway,
        )

    def reload(self) -> int:
        """Read the JWKS file again; on any error the keys in use stay.

        Returns:
            How many keys are now loaded.

        Raises:
            JWKSError: the file is unusable (the old keys are kept).
        """
        if self.jwks_path is not None:
            self._keys = load_jwks(self.jwks_path)
        return len(self._keys)

    @property
    def kids(self) -> frozenset[str]:
        """The ``kid`` of every key loaded from the JWKS file."""
        return frozenset(self._keys)

    def _key_for(self, header: Mapping[str, Any], alg: str) -> Key:
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("malformed token")
        kty = self._key_types[alg]
        key: Key | None
        if kid is not None and kid in self._keys:
            key = self._keys[kid]
        elif kty == "oct" and self._hs_key is not None:
            key = self._hs_key
        elif kid is not None:
            raise InvalidToken("unknown kid")
        else:
            fitting = [k for k in self._keys.values() if k.key_type == kty]
            if len(fitting) != 1:
                raise InvalidToken("no kid and no single key for the algorithm")
            key = fitting[0]
        if key.key_type != kty:
            raise InvalidToken("key type does not match the algorithm")
        return key

    def verify(self, token: str, now: float) -> Claims:
        """Verify a token and return its claims.

        Args:
            token: the compact JWS (the part after ``Bearer``).
            now: the current Unix time.

        Raises:
            InvalidToken: the token is malformed, uses an algorithm that is not allowed, has no
                usable key or a bad signature, is expired, not yet valid or issued in the future
                (beyond ``leeway``), or has the wrong ``iss``/``aud``; ``reason`` says which.
        """
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise InvalidToken("malformed token")
        parts = token.split(".")
        if len(parts) != 3 or not all(parts):
            raise InvalidToken("malformed token")
        header = _b64_json(parts[0])
        if not isinstance(header, dict) or not isinstance(header.get("alg"), str):
            raise InvalidToken("malformed token")
        alg = header["alg"]
        if alg not in self.algorithms:  # "none" is never in it
            raise InvalidToken("algorithm not allowed")
        if header.get("b64", True) is not True:
            raise InvalidToken("unencoded payload not allowed")
        key = self._key_for(header, alg)
        try:
            decoded = jose_jwt.decode(token, key, registry=self._registries[alg])
        except JoseError as exc:
            raise InvalidToken(exc.error.replace("_", " ") or "invalid token") from None
        except Exception:  # whatever else a library raises on garbage must not become a 500
            raise InvalidToken("malformed token") from None
        return self._check_claims(decoded.claims, now)

    def _check_claims(self, claims: dict[str, Any], now: float) -> Claims:
        for name in self.required:
            if claims.get(name) is None:
                raise InvalidToken(f"missing {name}")
        exp, nbf, iat = (_numeric(claims, name) for name in _TIME_CLAIMS)
        leeway = self.leeway
        if exp is not None and exp <= now - leeway:
            raise InvalidToken("expired")
        if nbf is not None and nbf > now + leeway:
            raise InvalidToken("not yet valid")
        if iat is not None and iat > now + leeway:
            raise InvalidToken("issued in the future")
        try:
            self._claims_registry.validate(
                {k: v for k, v in claims.items() if k not in _TIME_CLAIMS}
            )
        except JoseError as exc:
            raise InvalidToken(f"{exc.error}: {exc.description}") from None
        return Claims(
            sub=claims.get("sub"),
            jti=claims.get("jti"),
            iat=iat,
            exp=exp,
            raw=MappingProxyType(claims),
        )
