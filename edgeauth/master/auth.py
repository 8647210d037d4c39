"""Bearer tokens, client certificates, dashboard sessions and roles for the master (PROTOCOL.md §1).

A :class:`TokenAuthority` knows only the SHA-256 digests of the configured tokens. It hashes the
presented token and compares the digest with every configured one in constant time, so neither the
time taken nor any message reveals which token, if any, was close. Tokens are never logged or
echoed.

:meth:`TokenAuthority.check_request` also accepts, when no ``Authorization`` header is sent, a
client certificate verified by the TLS listener whose subject CN is mapped to a role
(``[master] tls_client_roles``), and, where the caller allows it (read-only pages of the
dashboard and its event stream), a dashboard session cookie from :class:`SessionStore`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from edgeauth.config import TokenEntry

ROLE_OPERATOR = "operator"
"""May do everything."""
ROLE_EDGE = "edge"
"""May read the stream and the snapshot, and report local bans when enabled."""
ROLE_READER = "reader"
"""May read the operator views."""

SESSION_COOKIE = b"edgeauth_session"
"""The name of the dashboard's session cookie."""
SESSION_TTL = 8 * 3600.0
"""Seconds a dashboard session lasts from its login."""
MAX_SESSIONS = 10_000
"""Sessions kept at once; the oldest go first beyond this."""

_BEARER = re.compile(rb"([A-Za-z]+) ([\x21-\x7e]+)\Z")


@attrs.frozen
class Principal:
    """Who made a request, as established by :meth:`TokenAuthority.authenticate`.

    Attributes:
        name: the token's name in ``[tokens]``, or ``CN=<common name>`` for a client certificate.
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


class RefusalLog:
    """Logs refused requests (401/403) of the operator API and the stream, without flooding.

    With the access log off (the master's default) these lines are the only trace of a wrong or
    missing token. Up to ``burst`` lines are written per second of ``clock``; the refusals past
    that are counted and reported in one line when the next second's first refusal comes. A line
    names the method, the path without its query, the peer address, the status and the error
    code: never a header, a token or a cookie.
    """

    def __init__(self, clock: IReactorTime, burst: int = 10) -> None:
        """Log through ``clock``'s seconds, at most ``burst`` lines a second."""
        self.clock = clock
        self.burst = burst
        self._second = -1
        self._logged = 0
        self._left_out = 0
        self._log = Logger(namespace="edgeauth.master.auth")

    def refused(self, method: bytes, path: bytes, peer: str, status: int, code: str) -> None:
        """Record one refusal."""
        second = int(self.clock.seconds())
        if second != self._second:
            if self._left_out:
                self._log.warn(
                    "{count} more refused requests not logged (more than {burst} a second)",
                    count=self._left_out,
                    burst=self.burst,
                )
            self._second, self._logged, self._left_out = second, 0, 0
        if self._logged >= self.burst:
            self._left_out += 1
            return
        self._logged += 1
        self._log.warn(
            "refused {method} {path} from {peer}: {status} {code}",
            method=method.decode("latin-1"),
            path=path.split(b"?", 1)[0].decode("latin-1")[:200],
            peer=peer,
            status=status,
            code=code,
        )


class SessionStore:
    """Dashboard sessions: random ids mapped, server side, to a principal until they expire.

    Only the SHA-256 digest of a session id is kept, so lookups reveal nothing through timing and
    a memory dump holds no usable cookie.
    """

    def __init__(
        self, clock: IReactorTime, ttl: float = SESSION_TTL, max_sessions: int = MAX_SESSIONS
    ) -> None:
        """Keep sessions for ``ttl`` seconds of ``clock``, at most ``max_sessions`` at once."""
        self.clock = clock
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._sessions: dict[bytes, tuple[Principal, float]] = {}

    @staticmethod
    def _key(session_id: bytes | str) -> bytes:
        raw = session_id.encode("utf-8") if isinstance(session_id, str) else session_id
        return hashlib.sha256(raw).digest()

    def create(self, principal: Principal) -> str:
        """Open a session for ``principal`` and return its id (the cookie value)."""
        now = self.clock.seconds()
        for key, (_, expires) in list(self._sessions.items()):
            if expires <= now:
                del self._sessions[key]
        while len(self._sessions) >= self.max_sessions:
            del self._sessions[next(iter(self._sessions))]  # dicts keep insertion order
        session_id = secrets.token_urlsafe(32)
        self._sessions[self._key(session_id)] = (principal, now + self.ttl)
        return session_id

    def get(self, session_id: bytes | str) -> Principal | None:
        """Return the principal of a live session, or None (unknown or expired)."""
        key = self._key(session_id)
        found = self._sessions.get(key)
        if found is None:
            return None
        principal, expires = found
        if expires <= self.clock.seconds():
            del self._sessions[key]
            return None
        return principal

    def drop(self, session_id: bytes | str) -> None:
        """End a session (logout)."""
        self._sessions.pop(self._key(session_id), None)

    def __len__(self) -> int:
        return len(self._sessions)


class TokenAuthority:
    """Checks ``Authorization: Bearer <token>`` headers against the configured tokens.

    With ``client_roles`` a request without the header may be authorised by its verified client
    certificate; with ``sessions`` by a dashboard session cookie (:meth:`check_request`).
    """

    def __init__(
        self,
        tokens: Sequence[TokenEntry],
        *,
        client_roles: Sequence[tuple[str, str]] = (),
        sessions: SessionStore | None = None,
        refusals: RefusalLog | None = None,
    ) -> None:
        """Keep the digests of ``tokens`` (normally ``Settings.tokens``).

        Args:
            tokens: the configured tokens.
            client_roles: ``(common name, role)`` pairs (``[master] tls_client_roles``).
            sessions: the dashboard sessions, if the dashboard is served.
            refusals: where refused requests are logged, if anywhere (reported by
                :func:`edgeauth.master.answers.authenticate`).
        """
        # Principals are immutable: one per token, built once (attrs' frozen __init__ costs
        # about as much as the hash of the presented token).
        self._principals = tuple(
            (entry.digest, Principal(entry.name, entry.role)) for entry in tokens
        )
        self.client_roles: Mapping[str, str] = dict(client_roles)
        self.sessions = sessions
        self.refusals = refusals

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
        found: Principal | None = None
        for known, principal in self._principals:  # every entry, always: no early exit on a match
            if hmac.compare_digest(digest, known):
                found = principal
        if found is None:
            raise _unauthorized("the token is not valid")
        return found

    def authorize(self, principal: Principal, allowed_roles: Collection[str]) -> None:
        """Refuse a principal whose role is not among ``allowed_roles``.

        Raises:
            AuthError: 403 ``forbidden``.
        """
        if principal.role not in allowed_roles:
            roles = ", ".join(sorted(allowed_roles))
            what = "certificate" if principal.name.startswith("CN=") else "token"
            detail = f"{what} {principal.name!r} has role {principal.role!r}; this needs {roles}"
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

    def check_request(
        self, request: Any, allowed_roles: Collection[str], *, allow_session: bool = False
    ) -> Principal:
        """Authenticate and authorize one HTTP request.

        In order: the ``Authorization`` header when present (a bad one is never overridden by
        other credentials); else, when ``allow_session``, a live session cookie; else a client
        certificate verified by the TLS listener whose CN is in ``client_roles``.

        Raises:
            AuthError: 401 without usable credentials, 403 when the principal's role is not
                allowed or a verified certificate's CN has no role.
        """
        header = request.getHeader(b"authorization")
        if header is not None:
            return self.check(header, allowed_roles)
        if allow_session and self.sessions is not None:
            cookie = request.getCookie(SESSION_COOKIE)
            if cookie:
                principal = self.sessions.get(cookie)
                if principal is not None:
                    self.authorize(principal, allowed_roles)
                    return principal
        common_name = self.certificate_name(request)
        if common_name is not None:
            role = self.client_roles.get(common_name)
            if role is None:
                detail = f"the client certificate CN={common_name} has no role (tls_client_roles)"
                raise AuthError(403, "forbidden", detail)
            principal = Principal(f"CN={common_name}", role)
            self.authorize(principal, allowed_roles)
            return principal
        return self.check(None, allowed_roles)

    def certificate_name(self, request: Any) -> str | None:
        """Return the CN of the request's verified client certificate, if it has one."""
        if not self.client_roles:
            return None
        from edgeauth.tls import peer_common_name

        channel = getattr(request, "channel", None)
        return peer_common_name(getattr(channel, "transport", None))
