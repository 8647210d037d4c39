"""Decide whether a request may reach the origin: bans, JWTs, revocations, the failure pattern.

PROTOCOL.md §6: a banned client gets 403 ``ip_banned`` (an allow entry beats every ban); on the
paths ``[gate] protect`` lists, a missing or invalid JWT gets 401 ``invalid_token`` and a revoked
one 401 ``token_revoked``. Every 401 of the gate, and every origin status listed in
``[failures] count_statuses``, is a failure; ``threshold`` of them within ``window`` seconds ban
the client (its IPv6 prefix) locally, through a callback. The gate is sans-io: no reactor, no
clock (``now`` is an argument), no storage; the caller applies and stores the local ban.
"""

from __future__ import annotations

import fnmatch
import re
import urllib.parse
from collections.abc import Callable, Collection, Sequence
from typing import Any

import attrs

from edgeauth.config import Settings
from edgeauth.edge.clientip import format_ip
from edgeauth.edge.failures import FailureWindow
from edgeauth.edge.index import EdgeIndexes, parse_client_ip
from edgeauth.edge.jwt import InvalidToken, JWTVerifier
from edgeauth.events import EventError, IpBanned
from edgeauth.replay import Entry

__all__ = ["Gate", "Refusal"]

_JSON = (b"Content-Type", b"application/json")
_NO_STORE = (b"Cache-Control", b"no-store")
_BEARER_INVALID = (b"WWW-Authenticate", b'Bearer error="invalid_token"')
_UNAUTHORIZED_HEADERS = (_JSON, _NO_STORE, _BEARER_INVALID)
_BANNED_HEADERS = (_JSON, _NO_STORE)
_INVALID_BODY = b'{"error":"invalid_token"}'
_REVOKED_BODY = b'{"error":"token_revoked"}'


@attrs.frozen(kw_only=True)
class Refusal:
    """The response the edge sends instead of forwarding the request.

    Attributes:
        status: 401 or 403.
        body: the JSON body.
        headers: ``(name, value)`` pairs to send (content type included).
        reason: why, for logs and metrics (never sent to the client).
        ban: the ban entry that refused the client (403 only); its ``seq`` is the body's ``ref``.
    """

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    reason: str
    ban: Entry | None = None


def _normal_path(path: str) -> str:
    """Return the path an origin may end up serving: decoded, with dot and empty segments gone."""
    decoded = urllib.parse.unquote(path).replace("\\", "/")
    segments: list[str] = []
    for segment in decoded.split("/"):
        segment = segment.split(";", 1)[0]
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    trailing = "/" if decoded.endswith(("/", "/.", "/..")) and segments else ""
    return "/" + "/".join(segments) + trailing


def _literal_globs(globs: Sequence[str]) -> tuple[tuple[str, ...], frozenset[str] | None] | None:
    """Split globs into literal prefixes (``/api/*``) and literal paths (``/admin``), if all are.

    A glob with no wildcard character (``*``, ``?``, ``[``) matches exactly itself, and one whose
    only wildcard is a single trailing ``*`` matches every text that starts with the rest (the
    ``*`` of :mod:`fnmatch` crosses ``/`` and matches anything, newlines included): such globs
    can be tested with ``str.startswith`` and a set probe, which cost a fraction of a regex match.

    Returns:
        ``(prefixes, exact)`` (``exact`` None when there is no literal path), or None when a
        glob is of another kind: then every path goes through the regex.
    """
    prefixes: list[str] = []
    exact: set[str] = set()
    for glob in globs:
        is_prefix = glob.endswith("*")
        literal = glob[:-1] if is_prefix else glob
        if "*" in literal or "?" in literal or "[" in literal:
            return None
        if is_prefix:
            prefixes.append(literal)
        else:
            exact.add(literal)
    return tuple(prefixes), frozenset(exact) if exact else None


def _is_odd(text: str) -> bool:
    """Whether a path may mean something else once an origin decodes it.

    It holds ``%``, a backslash, ``;``, ``//`` or ``/.`` (five substring tests are about twice
    as fast as one regex search with these alternatives).
    """
    return "%" in text or "\\" in text or ";" in text or "//" in text or "/." in text


class Gate:
    """The per-request checks of an edge, answered from memory.

    Args:
        indexes: the bans, allows and revocations in force.
        verifier: verifies JWTs; needed when ``protect`` is not empty.
        protect: path globs (:mod:`fnmatch`, case-sensitive, ``*`` crosses ``/``) that need a
            JWT, matched against the request path without its query.
        failures: counts failures; None turns the failure pattern off.
        count_statuses: origin statuses that count as failures (gate 401s always count).
        ban_for: seconds a local ban lasts.
        edge_id: this edge's name; local bans have source ``edge:<edge_id>``.
        on_local_ban: called with each local ban (``seq`` 0) as it is decided; it should apply
            it to ``indexes`` at once, store it and, if configured, report it to the master.

    Raises:
        ValueError: ``protect`` is not empty but there is no verifier, or ``ban_for`` is not
            positive.
    """

    def __init__(
        self,
        indexes: EdgeIndexes,
        verifier: JWTVerifier | None,
        protect: Sequence[str],
        failures: FailureWindow | None,
        count_statuses: Collection[int],
        ban_for: float,
        edge_id: str,
        on_local_ban: Callable[[IpBanned], None],
    ) -> None:
        if protect and verifier is None:
            raise ValueError("protected paths need a JWT verifier")
        if not ban_for > 0:
            raise ValueError("ban_for must be positive")
        self.indexes = indexes
        self.verifier = verifier
        self.protect = tuple(protect)
        self.failures = failures
        self.count_statuses = frozenset(count_statuses)
        self.ban_for = float(ban_for)
        self.source = f"edge:{edge_id}"
        self.on_local_ban = on_local_ban
        self._last_refusal: Refusal | None = None
        """The last 403 built, reused while its ban entry (``Refusal.ban``) refuses again."""
        pattern = "|".join(f"(?:{fnmatch.translate(glob)})" for glob in self.protect)
        self._protected = re.compile(pattern).match if self.protect else None
        literal = _literal_globs(self.protect) if self.protect else None
        self._prefixes: tuple[str, ...] | None = None
        """The globs as literal prefixes when every glob is one or a literal path, else None."""
        self._exact: frozenset[str] | None = None
        """The globs that are literal paths (with :attr:`_prefixes` only; None when none)."""
        if literal is not None:
            self._prefixes, self._exact = literal

    @classmethod
    def from_settings(
        cls,
        indexes: EdgeIndexes,
        settings: Settings,
        on_local_ban: Callable[[IpBanned], None],
    ) -> Gate:
        """Build a gate from ``[edge] id``, ``[gate]`` and ``[failures]``.

        Raises:
            ValueError: paths are protected but no JWT key is configured.
            JWKSError: the JWKS file is unusable.
        """
        gate, fail = settings.gate, settings.failures
        return cls(
            indexes,
            JWTVerifier.from_settings(gate) if gate.protect else None,
            gate.protect,
            FailureWindow(fail.threshold, fail.window, fail.ipv6_prefix),
            fail.count_statuses,
            fail.ban_for,
            settings.edge.id,
            on_local_ban,
        )

    def is_protected(self, path: bytes) -> bool:
        """Return whether a request path (a query is ignored) needs a JWT.

        The raw path and, when it holds ``%``, a backslash, ``;``, ``//`` or ``/.``, its decoded,
        dot-segment-free form are both matched, so that an encoding the origin undoes cannot
        slip past a glob.
        """
        if self._protected is None:
            return False
        if 63 in path or 35 in path:  # b"?", b"#": most paths have neither
            path = path.split(b"?", 1)[0].split(b"#", 1)[0]
        return self._text_protected(path.decode("latin-1"))

    def _text_protected(self, text: str) -> bool:
        """:meth:`is_protected` of a path without its query, decoded as latin-1."""
        match = self._protected
        assert match is not None  # the callers make sure
        prefixes, exact = self._prefixes, self._exact
        if prefixes is not None:
            # Every glob is a literal prefix + "*" or a literal path: the regex's answer on the
            # raw path without entering the regex engine.
            if text.startswith(prefixes) or (exact is not None and text in exact):
                return True
        elif match(text) is not None:
            return True
        return _is_odd(text) and match(_normal_path(text)) is not None

    def check(
        self,
        client_ip: str,
        method: bytes,
        path: bytes,
        authorization: bytes | None,
        now: float,
    ) -> Refusal | None:
        """Return the refusal for a request, or None to forward it to the origin.

        Args:
            client_ip: the client address (:func:`edgeauth.edge.clientip.client_ip`); one that
                is not an address is never banned.
            method: the request method; every method is checked alike (PROTOCOL.md §6 names no
                exemption).
            path: the request target's path (a query is ignored).
            authorization: the ``Authorization`` header, if any.
            now: the current Unix time.

        Returns:
            403 ``ip_banned`` for a banned client; on a protected path 401 ``invalid_token`` or
            ``token_revoked``; else None. A 401 counts as a failure and may call
            ``on_local_ban``.
        """
        ban = self.indexes.check_client(client_ip, now)
        if ban is not None:
            # A banned client usually comes back many times: its refusal (immutable) is reused
            # while the same entry refuses it.
            last = self._last_refusal
            if last is not None and last.ban is ban:
                return last
            body = b'{"error":"ip_banned","ref":%d}' % ban.seq
            refusal = Refusal(
                status=403, body=body, headers=_BANNED_HEADERS, reason="ip_banned", ban=ban
            )
            self._last_refusal = refusal
            return refusal
        match = self._protected
        if match is None:
            return None
        # is_protected, inlined for the common case (one call less on every request).
        if 63 in path or 35 in path:  # b"?", b"#": most paths have neither
            path = path.split(b"?", 1)[0].split(b"#", 1)[0]
        text = path.decode("latin-1")
        prefixes, exact = self._prefixes, self._exact
        if prefixes is None:
            if not self._text_protected(text):
                return None
        elif not text.startswith(prefixes) and (exact is None or text not in exact):
            # No glob matches the path as it is: protected only if it is odd (_is_odd,
            # inlined) and its normal form matches.
            if not ("%" in text or "\\" in text or ";" in text or "//" in text or "/." in text):
                return None
            if match(_normal_path(text)) is None:
                return None
        unauthorized = self._check_token(authorization, now)
        if unauthorized is not None:
            self._failure(client_ip, parse_client_ip(client_ip), now)
        return unauthorized

    def _check_token(self, authorization: bytes | None, now: float) -> Refusal | None:
        assert self.verifier is not None  # the constructor makes sure
        if authorization is None:
            return _unauthorized(_INVALID_BODY, "invalid_token: missing token")
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return _unauthorized(_INVALID_BODY, "invalid_token: not a bearer token")
        try:
            claims = self.verifier.verify(token.strip().decode("ascii"), now)
        except UnicodeDecodeError:
            return _unauthorized(_INVALID_BODY, "invalid_token: malformed token")
        except InvalidToken as exc:
            return _unauthorized(_INVALID_BODY, f"invalid_token: {exc.reason}")
        if self.indexes.revocations.is_revoked(claims.jti, claims.sub, claims.iat, now):
            return _unauthorized(_REVOKED_BODY, "token_revoked")
        return None

    def record_origin_status(self, client_ip: str, status: int, now: float) -> IpBanned | None:
        """Count an origin response status as a failure if ``count_statuses`` lists it.

        Returns:
            The local ban this failure triggered (already passed to ``on_local_ban``), or None.
        """
        if status not in self.count_statuses:
            return None
        return self._failure(client_ip, parse_client_ip(client_ip), now)

    def _failure(
        self, client_ip: str, parsed: tuple[int, int] | None, now: float
    ) -> IpBanned | None:
        failures = self.failures
        if failures is None or parsed is None:
            return None
        if len(self.indexes.allows) and self.indexes.allows.match(parsed[0], parsed[1], now):
            return None  # an allowed client is never refused as banned, so never counted
        network = failures.record(client_ip, now)
        if network is None:
            return None
        event = IpBanned(
            timestamp=round(now, 3),
            source=self.source,
            ip=network,
            reason=f"failure pattern: {failures.threshold} failures in {failures.window:g} s",
            expires_at=round(now + self.ban_for, 3),
        )
        self.on_local_ban(event)
        return event

    def explain_ip(self, client_ip: str, now: float) -> dict[str, Any]:
        """Explain how a client address is treated (for the admin ``/explain?ip=``).

        Returns:
            ``{"ip", "refused", "ref", "allows", "bans"}``: the normalised address, whether it
            is refused as banned, the ``seq`` of the refusing ban (else None), and every live
            allow and ban entry covering it (``ip``, ``reason``, ``expires_at``, ``source``,
            ``seq``), the most specific first.

        Raises:
            EventError: ``invalid_ip`` when ``client_ip`` is not an address.
        """
        parsed = parse_client_ip(client_ip)
        if parsed is None:
            raise EventError("invalid_ip", f"{client_ip[:64]!r} is not an IPv4 or IPv6 address")
        ban = self.indexes.check_ip(parsed[0], parsed[1], now)
        return {
            "ip": format_ip(*parsed),
            "refused": ban is not None,
            "ref": None if ban is None else ban.seq,
            "allows": [attrs.asdict(e) for e in self.indexes.allows.matches(*parsed, now)],
            "bans": [attrs.asdict(e) for e in self.indexes.bans.matches(*parsed, now)],
        }


def _unauthorized(body: bytes, reason: str) -> Refusal:
    return Refusal(status=401, body=body, headers=_UNAUTHORIZED_HEADERS, reason=reason)
