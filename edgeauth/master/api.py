"""The master's operator API (Klein): state views, fleet, health and metrics; the site root.

The write routes (``POST /ban/ip`` and the six others) are plain ``twisted.web`` resources in
:mod:`edgeauth.master.writes` (measured: Klein cost about a quarter of a ban's CPU); the stream
resources of :mod:`edgeauth.master.stream` are plain resources too. :class:`MasterRoot`
dispatches both by exact path before Klein sees the request. Every error is JSON
``{"error", "detail"}`` with a fitting status; never HTML.
"""

from __future__ import annotations

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

from edgeauth.events import EventError, normalize_ip
from edgeauth.master.answers import HTTPError, authenticate, json_answer, write_error
from edgeauth.master.auth import ROLE_OPERATOR, ROLE_READER, Principal, TokenAuthority
from edgeauth.master.fanout import Fanout
from edgeauth.master.log import IEventLog
from edgeauth.master.metrics import MasterMetrics
from edgeauth.master.writes import write_path
from edgeauth.wire.offsets import format_offset

log = Logger()

READ_ROLES = (ROLE_OPERATOR, ROLE_READER)
MAX_PAGE = 10_000
READY_TIMEOUT = 5.0


class OperatorAPI:
    """Routes of PROTOCOL.md §3 except the writes, the stream and the snapshot."""

    app = Klein()

    def __init__(
        self,
        event_log: IEventLog,
        fanout: Fanout,
        authority: TokenAuthority,
        metrics: MasterMetrics,
        clock: IReactorTime,
    ) -> None:
        """Serve the operator API over ``event_log``."""
        self.log = event_log
        self.fanout = fanout
        self.authority = authority
        self.metrics = metrics
        self.clock = clock

    # --- helpers ---------------------------------------------------------------------------

    def _auth(self, request: IRequest, roles: Collection[str]) -> Principal:
        return authenticate(self.authority, request, roles)

    @staticmethod
    def _page(request: IRequest) -> tuple[int, str | None]:
        args: dict[bytes, list[bytes]] = getattr(request, "args", None) or {}
        limit_raw = args.get(b"limit", [b"1000"])[0]
        if not limit_raw.isdigit() or not 1 <= int(limit_raw) <= MAX_PAGE:
            raise HTTPError(400, "invalid_parameter", f"limit must be 1..{MAX_PAGE}")
        after = args.get(b"after", [None])[0]
        return int(limit_raw), after.decode("utf-8", "replace") if after is not None else None

    # --- reads -----------------------------------------------------------------------------

    async def _entries(self, request: IRequest, table: str) -> list[dict[str, Any]]:
        limit, after = self._page(request)
        args: dict[bytes, list[bytes]] = getattr(request, "args", None) or {}
        ip: str | None = None
        if b"ip" in args:
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
        return json_answer(request, 200, {"bans": rows, "next": rows[-1]["ip"] if rows else None})

    @app.route("/allows", methods=["GET"])
    async def allows(self, request: IRequest) -> bytes:
        """List live allow entries (paged), or those covering ``?ip=``."""
        self._auth(request, READ_ROLES)
        rows = await self._entries(request, "allows")
        return json_answer(request, 200, {"allows": rows, "next": rows[-1]["ip"] if rows else None})

    @app.route("/revocations", methods=["GET"])
    async def revocations(self, request: IRequest) -> bytes:
        """List revoked tokens and subjects (each paged by key)."""
        self._auth(request, READ_ROLES)
        limit, after = self._page(request)
        now = self.clock.seconds()
        tokens = await self.log.entries("revoked_tokens", now, None, after, limit)
        subjects = await self.log.entries("revoked_subjects", now, None, after, limit)
        return json_answer(request, 200, {"revoked_tokens": tokens, "revoked_subjects": subjects})

    @app.route("/fleet", methods=["GET"])
    def fleet(self, request: IRequest) -> bytes:
        """List stream readers: edge id, address, since, offset last sent, lag."""
        self._auth(request, READ_ROLES)
        tail = self.log.tail
        return json_answer(
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
        return json_answer(
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
        return json_answer(request, 200, {"status": "ok"})

    @app.route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self, request: IRequest) -> bytes:
        """Answer 200 when the log store accepts a write transaction, else 503 (no auth)."""
        check: Deferred[None] = self.log.check_writable()
        check.addTimeout(READY_TIMEOUT, self.clock)  # type: ignore[arg-type]
        try:
            await check
        except Exception as exc:
            self.metrics.log_writable.set(0)
            return json_answer(
                request, 503, {"error": "not_ready", "detail": f"log store not writable: {exc}"}
            )
        self.metrics.log_writable.set(1)
        return json_answer(request, 200, {"status": "ready", "tail": format_offset(self.log.tail)})

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
        return write_error(request, exc)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return json_answer(request, 404, {"error": "not_found", "detail": "no such route"})

    @app.handle_errors(MethodNotAllowed)
    def _not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        exc = failure.value
        allowed = getattr(exc, "valid_methods", None) or []
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode())
        return json_answer(
            request, 405, {"error": "method_not_allowed", "detail": "method not allowed here"}
        )

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        """Answer any other exception with a JSON 500 (never an HTML page); registered last."""
        log.failure("unexpected error in {path}", failure, path=getattr(request, "path", b""))
        return json_answer(request, 500, {"error": "internal_error", "detail": "unexpected error"})


class MasterRoot(Resource):
    """The site root: writes and streams by exact path, everything else to the Klein app."""

    isLeaf = True

    def __init__(
        self,
        api: IResource,
        streams: Mapping[bytes, IResource],
        writes: Mapping[bytes, IResource] | None = None,
    ) -> None:
        """Dispatch ``writes`` and ``streams`` paths to their resources and the rest to ``api``.

        A write path matches exactly (with runs of slashes merged, as Klein matched it); a stream
        path also with a trailing slash.
        """
        super().__init__()
        self.api = api
        self.streams = dict(streams)
        self.writes = dict(writes or {})

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        """Render the resource that owns this path."""
        path = request.path
        target = self.writes.get(write_path(path))
        if target is None:
            target = self.streams.get(path.rstrip(b"/") or b"/", self.api)
        result: bytes | int = target.render(request)
        return result


__all__ = ["MasterRoot", "OperatorAPI"]
