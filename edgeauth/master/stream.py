"""Stream resources of the master: catch-up, long-poll, live SSE, HEAD, ``/events``, snapshot.

These are plain ``twisted.web`` resources rather than Klein routes: they are the hot path (every
edge reads here), streaming needs ``NOT_DONE_YET``, and a bare resource costs about half of a Klein
route. Every answer carries ``Edgeauth-Log-Id``; errors are JSON ``{"error", "detail"}``.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable, Collection, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from edgeauth.master.answers import HTTPError, authenticate, finish_with, write_error
from edgeauth.master.auth import ROLE_EDGE, ROLE_OPERATOR, ROLE_READER, TokenAuthority
from edgeauth.master.fanout import Fanout, Subscriber, control_frame, seed_frames, stream_frames
from edgeauth.master.log import IEventLog, LogRecord
from edgeauth.master.metrics import MasterMetrics
from edgeauth.wire.offsets import (
    START,
    TAIL,
    CursorError,
    OffsetError,
    current_cursor,
    etag_for_chunk,
    format_offset,
    next_cursor,
    parse_cursor,
    parse_offset,
)
from edgeauth.wire.sse import encode_comment, encode_event, encode_retry

log = Logger()

STREAM_ROLES = (ROLE_OPERATOR, ROLE_EDGE, ROLE_READER)
MAX_CHUNK_BYTES = 1 << 20
SEED_RETRY_MS = 2000


def arg(request: Request, name: bytes) -> str | None:
    """Return one query argument as text (the first if repeated), or None."""
    values = (request.args or {}).get(name)
    if not values:
        return None
    try:
        return str(values[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPError(400, "invalid_parameter", f"{name.decode()} is not UTF-8") from None


def client_address(request: Request) -> str:
    """Return the peer address of a request as text."""
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    return str(host) if host is not None else str(peer)


class StreamContext:
    """What every stream resource shares: the log, fan-out, auth, metrics and settings."""

    def __init__(
        self,
        event_log: IEventLog,
        fanout: Fanout,
        authority: TokenAuthority,
        metrics: MasterMetrics,
        reactor: IReactorTime,
        *,
        max_batch: int = 1000,
        long_poll_timeout: float = 20.0,
        stream_cache: str = "private",
        rng: random.Random | None = None,
    ) -> None:
        """Keep the shared collaborators and settings of the stream resources."""
        self.log = event_log
        self.fanout = fanout
        self.authority = authority
        self.metrics = metrics
        self.reactor = reactor
        self.max_batch = max_batch
        self.long_poll_timeout = long_poll_timeout
        self.cache_visibility = stream_cache
        self.rng = rng or random.Random()

    def authenticate(
        self,
        request: Request,
        roles: Collection[str] = STREAM_ROLES,
        *,
        allow_session: bool = False,
    ) -> None:
        """Raise HTTPError 401/403 unless the request carries a token of one of ``roles``.

        A mapped client certificate counts as a token; with ``allow_session`` (``/events``, which
        the dashboard reads) so does a dashboard session cookie.
        """
        authenticate(self.authority, request, roles, allow_session=allow_session)

    def resolve(self, text: str | None) -> int:
        """Turn an offset parameter into a seq position, checking retention and the tail."""
        try:
            offset = parse_offset("-1" if text is None else text)
        except OffsetError as exc:
            raise HTTPError(400, exc.code, exc.detail) from None
        earliest_position: int = self.log.earliest - 1
        if offset == START:
            return earliest_position
        if offset == TAIL:
            tail: int = self.log.tail
            return tail
        if offset > self.log.tail:
            raise HTTPError(
                400,
                "offset_out_of_range",
                f"offset {format_offset(offset)} is past the tail {format_offset(self.log.tail)}",
            )
        if offset < earliest_position:
            raise HTTPError(
                410,
                "offset_expired",
                "that offset is older than the retained log; re-bootstrap from /v1/snapshot",
                earliest=format_offset(earliest_position),
            )
        return offset

    def read(self, after: int) -> Deferred[list[LogRecord]]:
        """Read the next chunk of events after ``after``."""
        return self.log.read(after, self.max_batch, MAX_CHUNK_BYTES)

    def common_headers(self, request: Request) -> None:
        """Set the headers every stream answer carries."""
        request.setHeader(b"edgeauth-log-id", self.log.log_id.encode())

    def count(self, mode: str, status: int) -> None:
        """Count one stream request by mode and final status."""
        self.metrics.stream_requests.labels(mode=mode, status=str(status)).inc()


def _safely(
    ctx: StreamContext,
    mode: str | Callable[[], str],
    request: Request,
    handler: Callable[[], bytes | int],
) -> bytes | int:
    """Run a render handler, turning HTTPError into a JSON error answer counted under ``mode``.

    ``mode`` may be a callable when the handler decides it (``live=`` of the stream).
    """
    ctx.common_headers(request)
    try:
        return handler()
    except HTTPError as exc:
        ctx.count(mode if isinstance(mode, str) else mode(), exc.status)
        return write_error(request, exc)


class EventStreamResource(Resource):
    """``/v1/stream/events``: catch-up reads, long-poll, live SSE and HEAD (PROTOCOL.md §4)."""

    isLeaf = True

    def __init__(self, ctx: StreamContext) -> None:
        """Serve the stream from ``ctx``."""
        super().__init__()
        self.ctx = ctx

    def render_HEAD(self, request: Request) -> bytes:
        """Answer the tail offset with no body."""

        def handle() -> bytes:
            self.ctx.authenticate(request)
            request.setHeader(b"stream-next-offset", format_offset(self.ctx.log.tail).encode())
            request.setHeader(b"cache-control", b"no-store")
            self.ctx.count("head", 200)
            return b""

        result = _safely(self.ctx, "head", request, handle)
        assert isinstance(result, bytes)
        return b""

    def render_GET(self, request: Request) -> bytes | int:
        """Dispatch on ``live``: absent (catch-up), ``long-poll`` or ``sse``."""
        mode = "catch_up"

        def handle() -> bytes | int:
            nonlocal mode
            live = arg(request, b"live")
            if live is not None and live not in ("long-poll", "sse"):
                raise HTTPError(400, "invalid_parameter", "live must be long-poll or sse")
            mode = {None: "catch_up", "long-poll": "long_poll", "sse": "sse"}[live]
            self.ctx.authenticate(request)
            position = self.ctx.resolve(arg(request, b"offset"))
            if live == "sse":
                return self._sse(request, position)
            cursor_text = arg(request, b"cursor")
            if live == "long-poll":
                try:
                    client_cursor = None if cursor_text is None else parse_cursor(cursor_text)
                except CursorError as exc:
                    raise HTTPError(400, exc.code, str(exc)) from None
                return self._long_poll(request, position, client_cursor)
            return self._catch_up(request, position, mode)

        return _safely(self.ctx, lambda: mode, request, handle)

    def _not_allowed(self, request: Request) -> bytes:
        self.ctx.common_headers(request)
        request.setHeader(b"allow", b"GET, HEAD")
        return write_error(
            request,
            HTTPError(405, "method_not_allowed", "the stream is read-only; use the operator API"),
        )

    render_POST = render_PUT = render_DELETE = render_PATCH = _not_allowed

    def _member(self, request: Request, mode: str, position: int) -> Any:
        raw_id = request.getHeader(b"edgeauth-edge-id")
        edge_id = raw_id[:128].decode("utf-8", "replace") if raw_id else None
        return self.ctx.fanout.member(edge_id, client_address(request), mode, position)

    def _chunk_headers(self, request: Request, position: int, records: Sequence[LogRecord]) -> str:
        next_seq = records[-1].seq if records else position
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"stream-next-offset", format_offset(next_seq).encode())
        if next_seq >= self.ctx.log.tail:
            request.setHeader(b"stream-up-to-date", b"true")
        return etag_for_chunk(position, next_seq)

    def _write_chunk(
        self, request: Request, position: int, records: Sequence[LogRecord], mode: str
    ) -> bytes:
        etag = self._chunk_headers(request, position, records)
        request.setHeader(b"etag", etag.encode())
        visibility = self.ctx.cache_visibility
        request.setHeader(
            b"cache-control", f"{visibility}, max-age=60, stale-while-revalidate=300".encode()
        )
        if_none_match = request.getHeader(b"if-none-match")
        tags = [t.strip() for t in (if_none_match or b"").decode("latin-1").split(",")]
        if etag in tags or "*" in tags:
            request.setResponseCode(304)
            self.ctx.count(mode, 304)
            return b""
        body = ("[" + ",".join(r.json for r in records) + "]").encode()
        self.ctx.count(mode, 200)
        self.ctx.metrics.bytes_sent.labels(mode=mode).inc(len(body))
        return body

    def _catch_up(self, request: Request, position: int, mode: str) -> int:
        self._member(request, "catch_up", position)
        d = self.ctx.read(position)

        def send(records: list[LogRecord]) -> None:
            finish_with(request, self._write_chunk(request, position, records, mode))

        d.addCallback(send)
        d.addErrback(self._internal_error, request, mode)
        return NOT_DONE_YET

    def _internal_error(self, failure: Failure, request: Request, mode: str) -> None:
        log.failure("stream read failed", failure)
        self.ctx.count(mode, 503)
        if request.finished or request._disconnected:
            return
        body = write_error(request, HTTPError(503, "unavailable", "the event log is unavailable"))
        finish_with(request, body)

    def _long_poll(self, request: Request, position: int, client_cursor: int | None) -> int:
        now = self.ctx.reactor.seconds()
        cursor = next_cursor(client_cursor, now, self.ctx.rng.randint)
        request.setHeader(b"stream-cursor", str(cursor).encode())
        member = self._member(request, "long_poll", position)
        if position < self.ctx.log.tail:
            return self._catch_up(request, position, "long_poll")
        waiting = self.ctx.fanout.wait(self.ctx.long_poll_timeout, member)
        request.notifyFinish().addErrback(lambda _: waiting.cancel())

        def woke(has_events: bool) -> None:
            if request.finished or request._disconnected:
                return
            if has_events:
                self._catch_up(request, position, "long_poll")
                return
            request.setResponseCode(204)
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"stream-next-offset", format_offset(position).encode())
            request.setHeader(b"stream-up-to-date", b"true")
            self.ctx.count("long_poll", 204)
            request.finish()

        waiting.addCallback(woke)
        waiting.addErrback(lambda f: f.trap(CancelledError))
        return NOT_DONE_YET

    def _sse(self, request: Request, position: int) -> int:
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        self.ctx.count("sse", 200)
        member = self._member(request, "sse", position)
        sub = self.ctx.fanout.subscribe(request, "sse", position, member, cycle=True)
        sub.write(encode_comment("edgeauth stream"))
        log_ = self.ctx.log

        def encode(records: Sequence[LogRecord]) -> bytes:
            return stream_frames(records, self._cursor(), records[-1].seq >= log_.tail)

        _catch_up_then_live(self.ctx, sub, encode)
        return NOT_DONE_YET

    def _cursor(self) -> int:
        return current_cursor(self.ctx.reactor.seconds())


def _catch_up_then_live(
    ctx: StreamContext, sub: Subscriber, encode: Callable[[Sequence[LogRecord]], bytes]
) -> None:
    """Send events after ``sub.position`` in batches, then let the fan-out feed it live."""

    def step(_: object = None) -> None:
        if sub.closed:
            return
        if sub.position >= ctx.log.tail:
            sub.live = True
            if sub.kind == "sse":
                cursor = current_cursor(ctx.reactor.seconds())
                sub.write(control_frame(sub.position, cursor, True))
            return
        d = ctx.read(sub.position)

        def got(records: list[LogRecord]) -> None:
            if records and not sub.closed:
                sub.advance(records, encode(records))
            step()

        d.addCallback(got)
        d.addErrback(failed)

    def failed(failure: Failure) -> None:
        log.failure("catch-up read for a live subscriber failed", failure)
        transport = sub.request.channel.transport if sub.request.channel else None
        if not sub.closed and transport is not None:
            transport.loseConnection()

    step()


class SeedEventsResource(Resource):
    """``/events``: the seed-compatible SSE stream with ``Last-Event-ID`` replay (§4.4)."""

    isLeaf = True

    def __init__(self, ctx: StreamContext) -> None:
        """Serve the seed stream from ``ctx``."""
        super().__init__()
        self.ctx = ctx

    def render_GET(self, request: Request) -> bytes | int:
        """Replay every retained event after ``Last-Event-ID``, then go live."""

        def handle() -> bytes | int:
            self.ctx.authenticate(request, allow_session=True)
            header = request.getHeader(b"last-event-id")
            text = header.decode("utf-8", "replace") if header else arg(request, b"last_event_id")
            last: int | None = None
            if text:
                if not text.isascii() or not text.isdigit() or len(text) > 16:
                    raise HTTPError(400, "invalid_offset", "Last-Event-ID must be an event seq")
                last = int(text)
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"x-accel-buffering", b"no")
            self.ctx.count("events", 200)
            tail = int(self.ctx.log.tail)
            earliest = int(self.ctx.log.earliest)
            if last is not None and (last < earliest - 1 or last > tail):
                frame = encode_event(json.dumps({"earliest": earliest}), event="reset")
                return encode_retry(SEED_RETRY_MS) + frame
            position = tail if last is None else last
            member = self.ctx.fanout.member(None, client_address(request), "events_sse", position)
            sub = self.ctx.fanout.subscribe(request, "events_sse", position, member, cycle=False)
            sub.write(encode_retry(SEED_RETRY_MS))
            _catch_up_then_live(self.ctx, sub, seed_frames)
            return NOT_DONE_YET

        return _safely(self.ctx, "events", request, handle)


class SnapshotResource(Resource):
    """``/v1/snapshot``: the consistent state at an offset, gzip when asked (§5)."""

    isLeaf = True

    def __init__(self, ctx: StreamContext) -> None:
        """Serve snapshots from ``ctx``."""
        super().__init__()
        self.ctx = ctx

    def render_GET(self, request: Request) -> bytes | int:
        """Read the state in one transaction, encode it off the reactor thread, send it."""

        def handle() -> int:
            self.ctx.authenticate(request)
            now = self.ctx.reactor.seconds()
            accept = (request.getHeader(b"accept-encoding") or b"").lower()
            use_gzip = b"gzip" in accept and b"gzip;q=0" not in accept.replace(b" ", b"")
            d = self.ctx.log.snapshot(now)
            reactor = self.ctx.reactor
            assert IReactorThreads.providedBy(reactor)

            def encode(state: dict[str, Any]) -> Deferred[bytes]:
                doc = {
                    "log_id": self.ctx.log.log_id,
                    "offset": format_offset(state["tail"]),
                    "taken_at": round(now, 3),
                    "bans": state["bans"],
                    "allows": state["allows"],
                    "revoked_tokens": state["revoked_tokens"],
                    "revoked_subjects": state["revoked_subjects"],
                }

                def work() -> bytes:
                    raw = json.dumps(doc, separators=(",", ":")).encode()
                    return gzip.compress(raw, compresslevel=5) if use_gzip else raw

                result: Deferred[bytes] = deferToThreadPool(
                    reactor,
                    reactor.getThreadPool(),
                    work,  # type: ignore[arg-type]
                )
                return result

            def send(body: bytes) -> None:
                request.setHeader(b"content-type", b"application/json")
                request.setHeader(b"vary", b"Accept-Encoding")
                request.setHeader(
                    b"cache-control", f"{self.ctx.cache_visibility}, max-age=10".encode()
                )
                if use_gzip:
                    request.setHeader(b"content-encoding", b"gzip")
                request.setHeader(b"content-length", str(len(body)).encode())
                self.ctx.count("snapshot", 200)
                finish_with(request, body)

            encoded: Deferred[bytes] = d.addCallback(encode)
            encoded.addCallback(send).addErrback(self._failed, request)
            return NOT_DONE_YET

        return _safely(self.ctx, "snapshot", request, handle)

    def _failed(self, failure: Failure, request: Request) -> None:
        log.failure("snapshot failed", failure)
        self.ctx.count("snapshot", 503)
        if not (request.finished or request._disconnected):
            body = write_error(
                request, HTTPError(503, "unavailable", "the event log is unavailable")
            )
            finish_with(request, body)
