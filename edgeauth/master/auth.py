"""Bearer tokens and roles for the master's API (PROTOCOL.md §1).

A :class:`TokenAuthority` knows only the SHA-256 digests of the configured tokens. It hashes the
presented token and compares the digest with every configured one in constant time, so neither the
time taken nor any message reveals which token, if any, was close. Tokens are never logged or
echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Collection, Sequence

import attrs

from edgeauth.config import TokenEntry

ROLE_OPERATOR = "operator"
"""May do everything."""
ROLE_EDGE = "edge"
"""May read the stream and the snapshot, and report local bans when enabled."""
ROLE_READER = "reader"
"""May read the operator views."""

_BEARER = re.compile(rb"([A-Za-z]+) ([\x21-\x7e]+)\Z")


@attrs.frozen
class Principal:
    """Who made a request, as established by :meth:`TokenAuthority.authenticate`.

    Attributes:
        name: the token's name in ``[tokens]``.
        role: the token's role: ``operator``, ``edge`` or ``reader``.
    """

    name: str
    role: str


class AuthError(Exception):
    """A request is not authenticated (401) or not allowed (403).

    Attributes:
        status: 401 or 403.
        code: the error code of the JSON body, ``unauthorized`` or ``forbidden``.
        detail: a sentence for humans; never contains the presented token.
    """

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


def _unauthorized(detail: str) -> AuthError:
    return AuthError(401, "unauthorized", detail)


class TokenAuthority:
    """Checks ``Authorization: Bearer <token>`` headers against the configured tokens."""

    def __init__(self, tokens: Sequence[TokenEntry]) -> None:
        """Keep the digests of ``tokens`` (normally ``Settings.tokens``)."""
        self._tokens = tuple(tokens)

    def authenticate(self, authorization: bytes | str | None) -> Principal:
        """Return the principal whose token the header carries.

        Args:
            authorization: the ``Authorization`` header value, or None if absent.

        Returns:
            The name and role of the matching token.

        Raises:
            AuthError: 401 ``unauthorized`` if the header is missing, is not exactly
                ``Bearer <token>``, or carries no configured token.
        """
        if authorization is None:
            raise _unauthorized("an Authorization: Bearer <token> header is required")
        if isinstance(authorization, str):
            authorization = authorization.encode("utf-8")
        match = _BEARER.match(authorization)
        if match is None or match.group(1).lower() != b"bearer":
            raise _unauthorized("the Authorization header must be 'Bearer <token>'")
        digest = hashlib.sha256(match.group(2)).digest()
        found: TokenEntry | None = None
        for entry in self._tokens:  # every entry, always: no early exit on a match
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        if found is None:
            raise _unauthorized("the token is not valid")
        return Principal(found.name, found.role)

    def authorize(self, principal: Principal, allowed_roles: Collection[str]) -> None:
        """Refuse a principal whose role is not among ``allowed_roles``.

        Raises:
            AuthError: 403 ``forbidden``.
        """
        if principal.role not in allowed_roles:
            roles = ", ".join(sorted(allowed_roles))
            detail = f"token {principal.name!r} has role {principal.role!r}; this needs {roles}"
            raise AuthError(403, "forbidden", detail)

    def check(self, authorization: bytes | str | None, allowed_roles: Collection[str]) -> Principal:
        """Authenticate the header, then authorize its principal for ``allowed_roles``.

        Args:
            authorization: the ``Authorization`` header value, or None if absent.
            allowed_roles: the roles that may make this request.

        Returns:
            The authenticated and authorized principal.

        Raises:
            AuthError: 401 or 403, as :meth:`authenticate` and :meth:`authorize`.
        """
        principal = self.authenticate(authorization)
        self.authorize(principal, allowed_roles)
        return principal
