"""The master's operator API (Klein): writes, state views, fleet, health and metrics.

Every write is validated by :mod:`edgeauth.events`, appended to the log and answered 201 only
after the commit. Every error is JSON ``{"error", "detail"}`` with a fitting status; never HTML.
The stream resources of :mod:`edgeauth.master.stream` are mounted beside this app by
:class:`MasterRoot`, which dispatches by path before Klein sees the request.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from edgeauth.events import EventError, event_from_request, event_to_dict, event_type
from edgeauth.master.auth import (
    ROLE_EDGE,
    ROLE_OPERATOR,
    ROLE_READER,
    AuthError,
    Principal,
    TokenAuthority,
)
from edgeauth.master.fanout import Fanout
from edgeauth.master.log import IEventLog, RefusedError
from edgeauth.master.metrics import MasterMetrics
from edgeauth.master.stream import HTTPError, error_body
from edgeauth.wire.offsets import format_offset

log = Logger()

READ_ROLES = (ROLE_OPERATOR, ROLE_READER)
WRITE_ROLES = (ROLE_OPERATOR,)
BAN_ROLES = (ROLE_OPERATOR, ROLE_EDGE)
MAX_PAGE = 10_000
READY_TIMEOUT = 5.0

_WRITES: Mapping[str, tuple[str, Collection[str]]] = {
    "/ban/ip": ("ban", BAN_ROLES),
    "/unban/ip": ("unban", WRITE_ROLES),
    "/allow/ip": ("allow", WRITE_ROLES),
    "/unallow/ip": ("unallow", WRITE_ROLES),
    "/revoke/token": ("revoke_token", WRITE_ROLES),
    "/revoke/subject": ("revoke_subject", WRITE_ROLES),
    "/invalidate": ("invalidate", WRITE_ROLES),
}


def _json(request: IRequest, status: int, doc: Any) -> bytes:
    body = json.dumps(doc, separators=(",", ":")).encode()
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    # A known length spares HTTP/1.1 chunking (about a tenth of a ban's CPU, bench/master_append).
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


class OperatorAPI:
    """Routes of PROTOCOL.md §3 except the stream and snapshot."""

    app = Klein()

    def __init__(
        self,
        event_log: IEventLog,
        fanout: Fanout,
        authority: TokenAuthority,
        metrics: MasterMetrics,
        clock: IReactorTime,
        *,
        max_body: int = 65536,
    ) -> None:
        """Serve the operator API over ``event_log``."""
        self.log = event_log
        self.fanout = fanout
        self.authority = authority
        self.metrics = metrics
        self.clock = clock
        self.max_body = max_body

    # --- helpers ---------------------------------------------------------------------------

    def _auth(self, request: IRequest, roles: Collection[str]) -> Principal:
        try:
            return self.authority.check_request(request, roles)
        except AuthError as exc:
            raise HTTPError(exc.status, exc.code, exc.detail) from None

    def _body(self, request: IRequest) -> object:
        content_type = (request.getHeader(b"content-type") or b"application/json").lower()
        if content_type.split(b";")[0].strip() != b"application/json":
            raise HTTPError(415, "unsupported_media_type", "send the body as application/json")
        declared = request.getHeader(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise HTTPError(413, "body_too_large", f"bodies are limited to {self.max_body} bytes")
        content = request.content
        raw = content.read(self.max_body + 1) if content is not None else b""
        if len(raw) > self.max_body:
            raise HTTPError(413, "body_too_large", f"bodies are limited to {self.max_body} bytes")
        try:
            return json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # Recursion: deep nesting
            raise HTTPError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None

    @staticmethod
    def _page(request: IRequest) -> tuple[int, str | None]:
        args: dict[bytes, list[bytes]] = getattr(request, "args", None) or {}
        limit_raw = args.get(b"limit", [b"1000"])[0]
        if not limit_raw.isdigit() or not 1 <= int(limit_raw) <= MAX_PAGE:
            raise HTTPError(400, "invalid_parameter", f"limit must be 1..{MAX_PAGE}")
        after = args.get(b"after", [None])[0]
        return int(limit_raw), after.decode("utf-8", "replace") if after is not None else None

    # --- writes ----------------------------------------------------------------------------

    async def _write(self, request: IRequest, path: str) -> bytes:
        kind, roles = _WRITES[path]
        principal = self._auth(request, roles)
        body = self._body(request)
        now = self.clock.seconds()
        try:
            draft = event_from_request(
                kind, body, now=now, source=f"{principal.role}:{principal.name}"
            )
        except EventError as exc:
            raise HTTPError(400, exc.code, exc.detail) from None
        try:
            event = await self.log.append(draft)
        except RefusedError as exc:
            self.metrics.append_refused.labels(code=exc.code).inc()
            raise HTTPError(exc.status, exc.code, exc.detail) from None
        except Exception:
            log.failure("append failed")
            raise HTTPError(503, "log_unavailable", "the event log could not commit") from None
        self.metrics.append_seconds.observe(max(0.0, self.clock.seconds() - now))
        self.metrics.events_appended.labels(type=event_type(event)).inc()
        log.info(
            "{type} {summary} by {source} (seq {seq})",
            type=event_type(event),
            summary=_summary(event_to_dict(event)),
            source=event.source,
            seq=event.seq,
        )
        return _json(
            request, 201, {"event": event_to_dict(event), "offset": format_offset(event.seq)}
        )

    @app.route("/ban/ip", methods=["POST"])
    async def ban(self, request: IRequest) -> bytes:
        """Ban an address or network."""
        return await self._write(request, "/ban/ip")

    @app.route("/unban/ip", methods=["POST"])
    async def unban(self, request: IRequest) -> bytes:
        """Remove the ban entry of exactly one network."""
        return await self._write(request, "/unban/ip")

    @app.route("/allow/ip", methods=["POST"])
    async def allow(self, request: IRequest) -> bytes:
        """Allow an address or network (beats every ban)."""
        return await self._write(request, "/allow/ip")

    @app.route("/unallow/ip", methods=["POST"])
    async def unallow(self, request: IRequest) -> bytes:
        """Remove the allow entry of exactly one network."""
        return await self._write(request, "/unallow/ip")

    @app.route("/revoke/token", methods=["POST"])
    async def revoke_token(self, request: IRequest) -> bytes:
        """Revoke one JWT by its ``jti``."""
        return await self._write(request, "/revoke/token")

    @app.route("/revoke/subject", methods=["POST"])
    async def revoke_subject(self, request: IRequest) -> bytes:
        """Revoke every JWT of a subject issued before a time."""
        return await self._write(request, "/revoke/subject")

    @app.route("/invalidate", methods=["POST"])
    async def invalidate(self, request: IRequest) -> bytes:
        """Invalidate cached responses by tags, keys, prefixes or all."""
        return await self._write(request, "/invalidate")

    # --- reads -----------------------------------------------------------------------------

    async def _entries(self, request: IRequest, table: str) -> list[dict[str, Any]]:
        limit, after = self._page(request)
        args: dict[bytes, list[bytes]] = getattr(request, "args", None) or {}
        ip: str | None = None
        if b"ip" in args:
            from edgeauth.events import normalize_ip

            try:
                net = normalize_ip(args[b"ip"][0].decode("utf-8", "replace"))
            except EventError as exc:
                raise HTTPError(400, exc.code, exc.detail) from None
            if not (net.endswith("/32") or net.endswith("/128")):
                raise HTTPError(400, "invalid_ip", "ip= must be a single address")
            ip = net
        rows: list[dict[str, Any]] = await self.log.entries(
            table, self.clock.seconds(), ip, after, limit
        )
        return rows

    @app.route("/bans", methods=["GET"])
    async def bans(self, request: IRequest) -> bytes:
        """List live ban entries (paged), or those covering ``?ip=``."""
        self._auth(request, READ_ROLES)
        rows = await self._entries(request, "bans")
        return _json(request, 200, {"bans": rows, "next": rows[-1]["ip"] if rows else None})

    @app.route("/allows", methods=["GET"])
    async def allows(self, request: IRequest) -> bytes:
        """List live allow entries (paged), or those covering ``?ip=``."""
        self._auth(request, READ_ROLES)
        rows = await self._entries(request, "allows")
        return _json(request, 200, {"allows": rows, "next": rows[-1]["ip"] if rows else None})

    @app.route("/revocations", methods=["GET"])
    async def revocations(self, request: IRequest) -> bytes:
        """List revoked tokens and subjects (each paged by key)."""
        self._auth(request, READ_ROLES)
        limit, after = self._page(request)
        now = self.clock.seconds()
        tokens = await self.log.entries("revoked_tokens", now, None, after, limit)
        subjects = await self.log.entries("revoked_subjects", now, None, after, limit)
        return _json(request, 200, {"revoked_tokens": tokens, "revoked_subjects": subjects})

    @app.route("/fleet", methods=["GET"])
    def fleet(self, request: IRequest) -> bytes:
        """List stream readers: edge id, address, since, offset last sent, lag."""
        self._auth(request, READ_ROLES)
        tail = self.log.tail
        return _json(
            request,
            200,
            {
                "tail": format_offset(tail),
                "log_id": self.log.log_id,
                "subscribers": self.fanout.fleet_view(),
            },
        )

    @app.route("/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        """Summarise the log: id, tail, earliest, connected subscribers."""
        self._auth(request, READ_ROLES)
        return _json(
            request,
            200,
            {
                "role": "master",
                "log_id": self.log.log_id,
                "tail": format_offset(self.log.tail),
                "earliest": format_offset(max(0, self.log.earliest - 1)),
                "subscribers": len(self.fanout.subscribers) + len(self.fanout.waiters),
            },
        )

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: IRequest) -> bytes:
        """Answer 200 while the process runs (no auth)."""
        return _json(request, 200, {"status": "ok"})

    @app.route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self, request: IRequest) -> bytes:
        """Answer 200 when the log store accepts a write transaction, else 503 (no auth)."""
        check: Deferred[None] = self.log.check_writable()
        check.addTimeout(READY_TIMEOUT, self.clock)  # type: ignore[arg-type]
        try:
            await check
        except Exception as exc:
            self.metrics.log_writable.set(0)
            return _json(
                request, 503, {"error": "not_ready", "detail": f"log store not writable: {exc}"}
            )
        self.metrics.log_writable.set(1)
        return _json(request, 200, {"status": "ready", "tail": format_offset(self.log.tail)})

    @app.route("/metrics", methods=["GET"])
    def metrics_page(self, request: IRequest) -> bytes:
        """Serve Prometheus metrics (reader or operator token)."""
        self._auth(request, READ_ROLES)
        self.metrics.log_tail.set(self.log.tail)
        self.metrics.log_earliest.set(self.log.earliest)
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.metrics.render()

    # --- errors ----------------------------------------------------------------------------

    @app.handle_errors(HTTPError)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        exc = failure.value
        assert isinstance(exc, HTTPError)
        request.setResponseCode(exc.status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        if exc.status == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="edgeauth"')
        return error_body(exc.code, exc.detail, **exc.extra)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return _json(request, 404, {"error": "not_found", "detail": "no such route"})

    @app.handle_errors(MethodNotAllowed)
    def _not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        exc = failure.value
        allowed = getattr(exc, "valid_methods", None) or []
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode())
        return _json(
            request, 405, {"error": "method_not_allowed", "detail": "method not allowed here"}
        )

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        """Answer any other exception with a JSON 500 (never an HTML page); registered last."""
        log.failure("unexpected error in {path}", failure, path=getattr(request, "path", b""))
        return _json(request, 500, {"error": "internal_error", "detail": "unexpected error"})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _summary(doc: dict[str, Any]) -> str:
    for key in ("ip", "jti", "sub"):
        if key in doc:
            return f"{key}={doc[key]}"
    return ",".join(
        f"{key}={doc[key]}" for key in ("tags", "keys", "prefixes", "all") if doc.get(key)
    )


class MasterRoot(Resource):
    """The site root: stream resources by exact path, everything else to the Klein app."""

    isLeaf = True

    def __init__(self, api: IResource, streams: Mapping[bytes, IResource]) -> None:
        """Dispatch ``streams`` paths to their resources and the rest to ``api``."""
        super().__init__()
        self.api = api
        self.streams = dict(streams)

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        """Render the resource that owns this path."""
        target = self.streams.get(request.path.rstrip(b"/") or b"/", self.api)
        result: bytes | int = target.render(request)
        return result


__all__ = ["MasterRoot", "OperatorAPI"]
