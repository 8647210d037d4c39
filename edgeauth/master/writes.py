"""The seven write routes of the operator API (PROTOCOL.md §3) as plain ``twisted.web`` resources.

``POST /ban/ip``, ``/unban/ip``, ``/allow/ip``, ``/unallow/ip``, ``/revoke/token``,
``/revoke/subject`` and ``/invalidate``: each body is validated by :mod:`edgeauth.events`, appended
to the log, logged once (the audit line: type, subject, source, seq) and answered 201
``{"event", "offset"}`` only after the commit. Every other method gets 405 with ``Allow: POST``;
every error is JSON ``{"error", "detail"}`` (:mod:`edgeauth.master.answers`).

Why these are not Klein routes, although ARCHITECTURE.md describes the operator API as Klein and
the read views stay Klein (:mod:`edgeauth.master.api`): measured cost. Writes are the master's hot
path (edges report bans, operators script them), and with 64 keep-alive clients the reactor
thread was saturated at ~1,750 bans/s, ~20 % of it in Klein (werkzeug routing, the endpoint and
error-handler machinery, the coroutine wrapping). The same ``POST /ban/ip`` served by a bare
resource took ~25 % less CPU per ban (docs/benchmarks.md, "Master"). :class:`MasterRoot
<edgeauth.master.api.MasterRoot>` dispatches these paths by exact match before Klein sees the
request, as it does for the stream resources.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from edgeauth.events import (
    Event,
    EventError,
    IpAllowed,
    IpBanned,
    IpUnallowed,
    IpUnbanned,
    SubjectRevoked,
    TokenRevoked,
    event_from_request,
)
from edgeauth.master.answers import (
    HTTPError,
    authenticate,
    encoded_json_answer,
    finish_with,
    json_answer,
    write_error,
)
from edgeauth.master.auth import ROLE_EDGE, ROLE_OPERATOR, TokenAuthority
from edgeauth.master.log import IEventLog, LogRecord, RefusedError
from edgeauth.master.metrics import MasterMetrics
from edgeauth.wire.offsets import format_offset

# The audit line keeps the namespace it had when the writes were Klein routes, so that log
# filters (and tests) that select ``edgeauth.master.api`` still find it.
log = Logger(namespace="edgeauth.master.api")

WRITE_ROLES = (ROLE_OPERATOR,)
BAN_ROLES = (ROLE_OPERATOR, ROLE_EDGE)

WRITES: Mapping[bytes, tuple[str, Collection[str]]] = {
    b"/ban/ip": ("ban", BAN_ROLES),
    b"/unban/ip": ("unban", WRITE_ROLES),
    b"/allow/ip": ("allow", WRITE_ROLES),
    b"/unallow/ip": ("unallow", WRITE_ROLES),
    b"/revoke/token": ("revoke_token", WRITE_ROLES),
    b"/revoke/subject": ("revoke_subject", WRITE_ROLES),
    b"/invalidate": ("invalidate", WRITE_ROLES),
}
"""Path → (``event_from_request`` kind, roles allowed to write it)."""

_SLASHES = re.compile(rb"//+")
_NOT_ALLOWED = {"error": "method_not_allowed", "detail": "method not allowed here"}
_INTERNAL = {"error": "internal_error", "detail": "unexpected error"}


def write_path(path: bytes) -> bytes:
    """Return the write route ``path`` names, with runs of slashes merged (as Klein matched)."""
    return _SLASHES.sub(b"/", path) if b"//" in path else path


class WriteResource(Resource):
    """One write route: authenticate, validate, append, answer 201 after the commit."""

    isLeaf = True

    def __init__(
        self,
        kind: str,
        roles: Collection[str],
        event_log: IEventLog,
        authority: TokenAuthority,
        metrics: MasterMetrics,
        clock: IReactorTime,
        *,
        max_body: int = 65536,
    ) -> None:
        """Append events of ``kind`` (as ``event_from_request`` names it) written by ``roles``."""
        super().__init__()
        self.kind = kind
        self.roles = roles
        self.log = event_log
        self.authority = authority
        self.metrics = metrics
        self.clock = clock
        self.max_body = max_body
        self._appended: dict[str, Any] = {}  # event type -> its events_appended counter

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        """Answer ``POST``; every other method gets 405 (HEAD without a body)."""
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            body = json_answer(request, 405, _NOT_ALLOWED)
            # twisted.web would drop the body of a HEAD answer but also log a warning about it.
            return b"" if request.method == b"HEAD" else body
        try:
            principal = authenticate(self.authority, request, self.roles)
            doc = self._body(request)
            now = self.clock.seconds()
            source = f"{principal.role}:{principal.name}"
            try:
                draft = event_from_request(self.kind, doc, now=now, source=source)
            except EventError as exc:
                raise HTTPError(400, exc.code, exc.detail) from None
        except HTTPError as exc:
            return write_error(request, exc)
        except Exception:
            log.failure("unexpected error in {path}", path=request.path)
            return json_answer(request, 500, _INTERNAL)
        try:
            appended: Deferred[LogRecord] = self.log.append_record(draft)
        except Exception:
            appended = Deferred()
            appended.errback()
        appended.addCallbacks(
            self._committed,
            self._failed,
            callbackArgs=(request, now),
            errbackArgs=(request,),
        )
        appended.addErrback(self._unexpected, request)
        return NOT_DONE_YET

    def _body(self, request: Request) -> object:
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
            # json.loads(raw, parse_constant=...) exactly, without building a decoder each time.
            return _DECODER.decode(raw.decode(_encoding_of(raw), "surrogatepass"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # Recursion: deep nesting
            raise HTTPError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None

    def _committed(self, record: LogRecord, request: Request, started: float) -> None:
        metrics = self.metrics
        metrics.append_seconds.observe(max(0.0, self.clock.seconds() - started))
        event = record.event
        kind = event.TYPE
        counter = self._appended.get(kind)
        if counter is None:
            counter = self._appended[kind] = metrics.events_appended.labels(type=kind)
        counter.inc()
        summary = _summary(event)
        # The audit line: "{type} {summary} by {source} (seq {seq})" with those four fields for
        # structured (JSON) logs. The text is formatted here, once: formatting it through the
        # log format costs the observer about as much again (~10 µs a write).
        log.info(
            "{log_text}",
            log_text=f"{kind} {summary} by {event.source} (seq {record.seq})",
            type=kind,
            summary=summary,
            source=event.source,
            seq=record.seq,
        )
        finish_with(request, encoded_json_answer(request, 201, _answer_body(record)))

    def _failed(self, failure: Failure, request: Request) -> None:
        exc = failure.value
        if isinstance(exc, RefusedError):
            self.metrics.append_refused.labels(code=exc.code).inc()
            error = HTTPError(exc.status, exc.code, exc.detail)
        else:
            log.failure("append failed", failure)
            error = HTTPError(503, "log_unavailable", "the event log could not commit")
        body = write_error(request, error)
        request.setHeader(b"content-length", b"%d" % len(body))
        finish_with(request, body)

    def _unexpected(self, failure: Failure, request: Request) -> None:
        log.failure("unexpected error in {path}", failure, path=request.path)
        if not request.startedWriting:
            finish_with(request, json_answer(request, 500, _INTERNAL))


def write_resources(
    event_log: IEventLog,
    authority: TokenAuthority,
    metrics: MasterMetrics,
    clock: IReactorTime,
    *,
    max_body: int = 65536,
) -> dict[bytes, WriteResource]:
    """Return the write resources by path, for :class:`edgeauth.master.api.MasterRoot`."""
    return {
        path: WriteResource(kind, roles, event_log, authority, metrics, clock, max_body=max_body)
        for path, (kind, roles) in WRITES.items()
    }


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _encoding_of(raw: bytes) -> str:
    """``json.detect_encoding(raw)``, answered at once for the usual body: "{" then no NUL."""
    if raw[:1] == b"{" and raw[1:2] != b"\x00":
        return "utf-8"  # no BOM starts with "{", and only a NUL second byte means UTF-16/32
    return json.detect_encoding(raw)


def _answer_body(record: LogRecord) -> bytes:
    """``{"event": <the event>, "offset": <its offset>}`` in compact JSON.

    The event's text is the record's (``encode_event``: the same compact separators, ASCII
    escapes and key order as ``json_answer``), so it is not encoded a second time here.
    """
    return b'{"event":%s,"offset":"%s"}' % (
        record.json.encode(),
        format_offset(record.seq).encode(),
    )


def _summary(event: Event) -> str:
    """The audit line's ``summary``: the entry's key, or an invalidation's selectors."""
    if isinstance(event, IpBanned | IpUnbanned | IpAllowed | IpUnallowed):
        return f"ip={event.ip}"
    if isinstance(event, TokenRevoked):
        return f"jti={event.jti}"
    if isinstance(event, SubjectRevoked):
        return f"sub={event.sub}"
    # As the event's JSON object shows them: lists (not tuples), and only those that are set.
    selectors = (
        ("tags", list(event.tags)),
        ("keys", list(event.keys)),
        ("prefixes", list(event.prefixes)),
        ("all", event.all),
    )
    return ",".join(f"{key}={value}" for key, value in selectors if value)


__all__ = ["WRITES", "WriteResource", "write_path", "write_resources"]
