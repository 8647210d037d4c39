"""The edge's reconnecting stream client: snapshot bootstrap, catch-up reads, then live SSE.

One loop per edge. It bootstraps from ``/v1/snapshot`` when it has no state, when the master's
``Edgeauth-Log-Id`` differs from the stored one, or on 410; otherwise it catches up from its stored
offset and then follows the live stream (SSE, or long-poll by configuration). It reconnects on any
error, at once when the server cycles the connection, and when no byte arrives for twice the ping
interval (idle watchdog); failures back off exponentially with full jitter and rotate through the
configured masters. A periodic ``HEAD`` learns the master's tail, so readiness can tell an edge that
stopped applying from one that merely has nothing to apply.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse

from edgeauth.edge.metrics import EdgeMetrics
from edgeauth.edge.state import EdgeState, SnapshotError
from edgeauth.events import EventError, IpBanned, decode_events, event_type
from edgeauth.wire.offsets import OffsetError, format_offset, parse_offset
from edgeauth.wire.sse import SSEEvent, SSEParseError, SSEParser

log = Logger()

HEALTHY_AFTER = 60.0
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
REQUEST_TIMEOUT = 30.0
SNAPSHOT_TIMEOUT = 300.0


def backoff_delay(
    attempt: int, rng: random.Random, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(cap, base * (2 ** min(attempt, 32))))


class MasterRefusedError(Exception):
    """The master answered 401/403 to this edge's token."""


class StreamProtocolError(Exception):
    """The master sent something this edge cannot parse or that breaks the protocol."""


class IdleTimeoutError(StreamProtocolError):
    """No byte arrived for two ping intervals (the idle watchdog)."""


class ResyncNeededError(Exception):
    """The stored offset means nothing on this master (410 or another log id)."""


@attrs.define
class SyncStatus:
    """What readiness and ``/status`` need to know about the stream."""

    connected: bool = False
    master: str | None = None
    last_error: str | None = None
    refused: bool = False
    protocol_error: str | None = None
    announced_tail: int | None = None
    announced_at: float | None = None
    behind_since: float | None = None
    reconnects: int = 0
    last_contact: float | None = None


class _SSEBody(Protocol):
    """Feeds an SSE response body to the parser and resets the idle watchdog on every byte."""

    def __init__(self, on_bytes: Callable[[bytes], None]) -> None:
        self.on_bytes = on_bytes
        self.finished: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        try:
            self.on_bytes(data)
        except Exception as exc:
            self.abort()
            if not self.finished.called:
                self.finished.errback(exc)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.finished.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)

    def abort(self) -> None:
        """Drop the connection (the watchdog or a parse error)."""
        transport = self.transport
        if transport is not None:
            transport.stopProducing()  # type: ignore[attr-defined]


class Subscriber:
    """Keeps :class:`EdgeState` in step with the master's log."""

    def __init__(
        self,
        reactor: Any,
        state: EdgeState,
        masters: Sequence[str],
        token: str | None,
        edge_id: str,
        metrics: EdgeMetrics,
        *,
        mode: str = "sse",
        ping_interval: float = 15.0,
        tail_probe_interval: float = 5.0,
        rng: random.Random | None = None,
        agent: Agent | None = None,
        tls_policy: IPolicyForHTTPS | None = None,
    ) -> None:
        """Follow ``masters`` (tried in order with failover) for ``state``.

        ``tls_policy`` decides how ``https://`` masters are verified and which client
        certificate is presented (:func:`edgeauth.tls.client_policy`); Twisted's default policy
        (the system's trust store, no client certificate) when None.
        """
        if not masters:
            raise ValueError("at least one master URL is needed")
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.state = state
        self.masters = [m.rstrip("/") for m in masters]
        self.edge_id = edge_id
        self.metrics = metrics
        self.mode = mode
        self.ping_interval = ping_interval
        self.tail_probe_interval = tail_probe_interval
        self.rng = rng or random.Random()
        self.status = SyncStatus()
        self.headers = Headers({b"Edgeauth-Edge-Id": [edge_id.encode()]})
        if token:
            self.headers.setRawHeaders(b"Authorization", [f"Bearer {token}".encode()])
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        if agent is None:
            extra: dict[str, Any] = {} if tls_policy is None else {"contextFactory": tls_policy}
            agent = Agent(reactor, pool=self._pool, connectTimeout=10, **extra)
        self._agent = agent
        self.http = HTTPClient(self._agent)
        self._index = 0
        self._stopping = False
        self._loop: Deferred[None] | None = None
        self._current: Deferred[Any] | None = None
        self._body: _SSEBody | None = None
        self._watchdog: IDelayedCall | None = None
        self._went_live = False
        self._live_error = False
        self._probe: LoopingCall | None = None
        self.first_sync: Deferred[None] = Deferred()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start following the stream (and probing the master's tail)."""
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: log.failure("stream loop crashed", f))
        self._probe = LoopingCall(self._probe_tail)
        self._probe.clock = self.clock
        self._probe.start(self.tail_probe_interval, now=False).addErrback(
            lambda f: log.failure("tail probe stopped", f)
        )

    async def stop(self) -> None:
        """Stop the loop, drop the connection and close pooled connections."""
        self._stopping = True
        if self._probe is not None and self._probe.running:
            self._probe.stop()
        self._cancel_watchdog()
        if self._body is not None:
            self._body.abort()
        if self._current is not None:
            self._current.cancel()
        if self._loop is not None:
            try:
                await self._loop
            except CancelledError:
                pass
        await self._pool.closeCachedConnections()

    @property
    def master(self) -> str:
        """The master URL in use."""
        return self.masters[self._index % len(self.masters)]

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            started = self.clock.seconds()
            master = self.master
            self.status.master = master
            clean = False
            self._went_live = False
            try:
                await self._session(master)
                clean = True
            except CancelledError:
                if self._stopping:
                    break
                reason = "cancelled"
            except IdleTimeoutError as exc:
                reason = "idle"
                self._note_error(master, str(exc))
            except MasterRefusedError as exc:
                self.status.refused = True
                reason = "refused"
                self._note_error(master, f"master refused the edge token: {exc}")
            except (StreamProtocolError, ResyncNeededError) as exc:
                reason = "protocol"
                self._note_error(master, str(exc))
            except Exception as exc:
                reason = "error"
                self._note_error(master, f"{type(exc).__name__}: {exc}")
            finally:
                self.status.connected = False
                self.metrics.stream_connected.set(0)
                self._cancel_watchdog()
            if self._stopping:
                break
            lasted = self.clock.seconds() - started
            self.status.reconnects += 1
            if clean:
                self.metrics.reconnects.labels(reason="server_closed").inc()
            else:
                self.metrics.reconnects.labels(reason=reason).inc()
            if lasted >= HEALTHY_AFTER:
                attempt = 0
            if clean and (lasted >= 1.0 or self._went_live):
                # The server cycled a live stream (PROTOCOL.md 4.3): reconnect at once.
                continue
            if not clean:
                self._index += 1
            delay = backoff_delay(attempt, self.rng)
            attempt += 1
            try:
                self._current = deferLater(self.clock, delay, lambda: None)
                await self._current
            except CancelledError:
                break
            finally:
                self._current = None

    def _note_error(self, master: str, message: str) -> None:
        if message != self.status.last_error:
            log.warn("stream from {master}: {message}", master=master, message=message)
        self.status.last_error = message

    # --- HTTP helpers ----------------------------------------------------------------------

    async def _get(self, url: str, timeout: float, **kw: Any) -> IResponse:
        d = self.http.get(url, headers=self.headers, **kw)
        d.addTimeout(timeout, self.clock)
        self._current = d
        try:
            response: IResponse = await d
        finally:
            self._current = None
        self.status.last_contact = self.clock.seconds()
        if response.code in (401, 403):
            body = await treq.content(response)
            raise MasterRefusedError(f"{response.code} {body[:200]!r}")
        return response

    async def _body_bytes(self, response: IResponse, timeout: float) -> bytes:
        d = treq.content(response)
        d.addTimeout(timeout, self.clock)
        self._current = d
        try:
            body: bytes = await d
        finally:
            self._current = None
        return body

    def _log_id(self, response: IResponse) -> str:
        values = response.headers.getRawHeaders(b"edgeauth-log-id")
        if not values:
            raise StreamProtocolError("the master sent no Edgeauth-Log-Id")
        return str(values[0].decode("ascii", "replace"))

    def _check_log_id(self, response: IResponse) -> None:
        if self._log_id(response) != self.state.log_id:
            raise ResyncNeededError("the master's log id differs from the stored one")

    # --- session ---------------------------------------------------------------------------

    async def _session(self, master: str) -> None:
        if self.state.log_id is None:
            await self._bootstrap(master)
        try:
            await self._catch_up(master)
        except ResyncNeededError as exc:
            log.info("re-bootstrapping from {master}: {why}", master=master, why=str(exc))
            await self._bootstrap(master)
            await self._catch_up(master)
        self.status.refused = False
        if not self._live_error:
            self.status.protocol_error = None
        self.status.last_error = None
        if not self.first_sync.called:
            self.first_sync.callback(None)
        if self.mode == "long-poll":
            await self._long_poll(master)
        else:
            await self._sse(master)

    async def _bootstrap(self, master: str) -> None:
        response = await self._get(f"{master}/v1/snapshot", SNAPSHOT_TIMEOUT)
        if response.code != 200:
            await treq.content(response)
            raise StreamProtocolError(f"snapshot answered {response.code}")
        log_id = self._log_id(response)
        body = await self._body_bytes(response, SNAPSHOT_TIMEOUT)
        try:
            doc = json.loads(body)
            if not isinstance(doc, dict):
                raise SnapshotError("a snapshot is a JSON object")
            offset = parse_offset(str(doc.get("offset")))
            if offset < 0:
                raise SnapshotError("the snapshot offset must be a position")
            if doc.get("log_id") != log_id:
                raise SnapshotError("the snapshot's log_id differs from its header")
            self.state.apply_snapshot(doc, log_id, offset)
        except (ValueError, SnapshotError, OffsetError) as exc:
            self.status.protocol_error = f"bad snapshot: {exc}"
            raise StreamProtocolError(f"bad snapshot: {exc}") from None
        self.metrics.snapshots.inc()
        self._applied()

    async def _catch_up(self, master: str) -> None:
        while True:
            url = f"{master}/v1/stream/events?offset={format_offset(self.state.offset)}"
            response = await self._get(url, REQUEST_TIMEOUT)
            if response.headers.hasHeader(b"edgeauth-log-id") and (
                self._log_id(response) != self.state.log_id
            ):
                # Our offset means nothing on another log: it may even be past its tail (400).
                await treq.content(response)
                raise ResyncNeededError("the master's log id differs from the stored one")
            if response.code == 410:
                await treq.content(response)
                raise ResyncNeededError("the stored offset is older than the master's retention")
            if response.code != 200:
                body = await treq.content(response)
                raise StreamProtocolError(f"catch-up answered {response.code}: {body[:200]!r}")
            self._check_log_id(response)
            body = await self._body_bytes(response, REQUEST_TIMEOUT)
            next_offset = self._header_offset(response, b"stream-next-offset")
            self._apply_events(body, next_offset)
            up_to_date = response.headers.getRawHeaders(b"stream-up-to-date") == [b"true"]
            self._announce(next_offset if up_to_date else None)
            if up_to_date:
                return

    def _header_offset(self, response: IResponse, name: bytes) -> int:
        values = response.headers.getRawHeaders(name)
        try:
            offset = parse_offset(values[0].decode("ascii")) if values else -1
        except (OffsetError, UnicodeDecodeError):
            offset = -1
        if offset < 0:
            raise StreamProtocolError(f"bad or missing {name.decode()} header")
        return offset

    def _apply_events(self, body: bytes | str, next_offset: int) -> None:
        try:
            events = decode_events(body)
            self.state.apply(events, next_offset)
        except (EventError, ValueError) as exc:
            self.status.protocol_error = str(exc)
            raise StreamProtocolError(f"cannot apply the stream: {exc}") from None
        for event in events:
            self.metrics.applied_events.labels(type=event_type(event)).inc()
        self._applied()

    def _applied(self) -> None:
        if not self._live_error:
            self.status.protocol_error = None
        self.metrics.last_applied.set(self.state.last_applied_at or 0)
        self._update_lag()

    def _announce(self, tail: int | None) -> None:
        """Record the tail the master announced (None: not known from this answer)."""
        if tail is None:
            return
        now = self.clock.seconds()
        self.status.announced_tail = tail
        self.status.announced_at = now
        self._update_lag()

    def _update_lag(self) -> None:
        tail = self.status.announced_tail
        now = self.clock.seconds()
        behind = 0 if tail is None else max(0, tail - self.state.offset)
        if behind == 0:
            self.status.behind_since = None
        elif self.status.behind_since is None:
            self.status.behind_since = now
        self.metrics.lag_events.set(behind)
        since = self.status.behind_since
        self.metrics.lag_seconds.set(0 if since is None else now - since)

    # --- live modes ------------------------------------------------------------------------

    async def _sse(self, master: str) -> None:
        url = f"{master}/v1/stream/events?offset={format_offset(self.state.offset)}&live=sse"
        response = await self._get(url, REQUEST_TIMEOUT, unbuffered=True)
        if response.code != 200:
            body = await treq.content(response)
            if response.code == 410:
                raise ResyncNeededError("offset expired")
            raise StreamProtocolError(f"SSE answered {response.code}: {body[:200]!r}")
        self._check_log_id(response)
        parser = SSEParser()
        self.status.connected = True
        self.metrics.stream_connected.set(1)
        pending: list[SSEEvent] = []

        def on_bytes(data: bytes) -> None:
            self._arm_watchdog()
            try:
                try:
                    items = parser.feed(data)
                except SSEParseError as exc:
                    self.status.protocol_error = f"unparseable SSE: {exc}"
                    raise StreamProtocolError(str(exc)) from None
                for item in items:
                    if isinstance(item, SSEEvent):
                        pending.append(item)
                while pending:
                    self._sse_event(pending.pop(0))
                    self._live_ok()
            except StreamProtocolError:
                self._live_error = True
                raise

        body_protocol = _SSEBody(on_bytes)
        self._body = body_protocol
        self._arm_watchdog()
        response.deliverBody(body_protocol)
        try:
            await body_protocol.finished
        finally:
            self._body = None
            self._cancel_watchdog()

    def _sse_event(self, event: SSEEvent) -> None:
        if event.event == "data":
            try:
                events = decode_events(event.data)
            except EventError as exc:
                self.status.protocol_error = str(exc)
                raise StreamProtocolError(f"bad data frame: {exc}") from None
            last = max((e.seq for e in events), default=self.state.offset)
            try:
                self.state.apply(events, last)
            except ValueError as exc:
                self.status.protocol_error = str(exc)
                raise StreamProtocolError(str(exc)) from None
            for item in events:
                self.metrics.applied_events.labels(type=event_type(item)).inc()
            self._applied()
        elif event.event == "control":
            try:
                control = json.loads(event.data)
                offset = parse_offset(str(control["streamNextOffset"]))
            except (ValueError, KeyError, TypeError, OffsetError) as exc:
                self.status.protocol_error = f"bad control frame: {exc}"
                raise StreamProtocolError(f"bad control frame: {exc}") from None
            if offset < 0:
                self.status.protocol_error = "bad control frame offset"
                raise StreamProtocolError("bad control frame offset")
            self._went_live = True
            self._announce(offset)

    def _live_ok(self) -> None:
        """The live stream delivered something that parsed and applied."""
        self._live_error = False
        self.status.protocol_error = None

    def _arm_watchdog(self) -> None:
        timeout = 2 * self.ping_interval
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.reset(timeout)
        else:
            self._watchdog = self.clock.callLater(timeout, self._idle)

    def _cancel_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None

    def _idle(self) -> None:
        self._watchdog = None
        log.warn(
            "no byte from {master} for {n}s; reconnecting",
            master=self.master,
            n=2 * self.ping_interval,
        )
        if self._body is not None:
            body, self._body = self._body, None
            body.abort()
            if not body.finished.called:
                body.finished.errback(IdleTimeoutError("idle: no byte for 2 ping intervals"))

    async def _long_poll(self, master: str) -> None:
        cursor: str | None = None
        self.status.connected = True
        self.metrics.stream_connected.set(1)
        while not self._stopping:
            url = (
                f"{master}/v1/stream/events?offset={format_offset(self.state.offset)}"
                "&live=long-poll"
            )
            if cursor:
                url += f"&cursor={quote(cursor)}"
            response = await self._get(url, REQUEST_TIMEOUT + 30)
            if response.code == 410:
                await treq.content(response)
                raise ResyncNeededError("offset expired")
            if response.code not in (200, 204):
                body = await treq.content(response)
                raise StreamProtocolError(f"long-poll answered {response.code}: {body[:200]!r}")
            self._check_log_id(response)
            values = response.headers.getRawHeaders(b"stream-cursor")
            cursor = values[0].decode("ascii", "replace") if values else None
            body = await self._body_bytes(response, REQUEST_TIMEOUT)
            next_offset = self._header_offset(response, b"stream-next-offset")
            try:
                if response.code == 200:
                    self._apply_events(body, next_offset)
                else:
                    self.state.apply([], next_offset)
                    self._applied()
            except StreamProtocolError:
                self._live_error = True
                raise
            self._live_ok()
            self._announce(next_offset)

    # --- local bans ------------------------------------------------------------------------

    def report_ban(self, event: IpBanned) -> Deferred[bool]:
        """POST a ban this edge decided to the master (``share_local_bans``); fires with success.

        The ban is already enforced and persisted locally; a failure here is logged, not retried:
        the local ban stands on its own.
        """
        body: dict[str, Any] = {"ip": event.ip, "reason": event.reason, "source": event.source}
        if event.expires_at is not None:
            body["ttl"] = max(1.0, round(event.expires_at - self.clock.seconds(), 3))
        d = self.http.post(f"{self.master}/ban/ip", json=body, headers=self.headers)
        d.addTimeout(REQUEST_TIMEOUT, self.clock)

        def done(response: IResponse) -> Deferred[bool]:
            def logged(content: bytes) -> bool:
                if response.code == 201:
                    return True
                log.warn(
                    "the master refused the local ban of {ip}: {code} {body}",
                    ip=event.ip,
                    code=response.code,
                    body=content[:200],
                )
                return False

            result: Deferred[bool] = treq.content(response).addCallback(logged)
            return result

        def failed(failure: Failure) -> bool:
            log.warn(
                "could not report the local ban of {ip}: {f}",
                ip=event.ip,
                f=failure.getErrorMessage(),
            )
            return False

        reported: Deferred[bool] = d.addCallback(done)
        return reported.addErrback(failed)

    # --- tail probe ------------------------------------------------------------------------

    async def _probe_once(self) -> None:
        master = self.master
        d = self.http.head(f"{master}/v1/stream/events", headers=self.headers)
        d.addTimeout(REQUEST_TIMEOUT, self.clock)
        response: IResponse = await d
        await treq.content(response)
        if response.code in (401, 403):
            self.status.refused = True
            self._note_error(master, f"master refused the edge token ({response.code})")
            return
        if response.code != 200:
            return
        self.status.refused = False
        log_id = response.headers.getRawHeaders(b"edgeauth-log-id")
        if (
            log_id
            and self.state.log_id
            and log_id[0].decode("ascii", "replace") != self.state.log_id
        ):
            return
        values = response.headers.getRawHeaders(b"stream-next-offset")
        try:
            tail = parse_offset(values[0].decode("ascii")) if values else -1
        except (OffsetError, UnicodeDecodeError):
            return
        if tail >= 0:
            self.status.last_contact = self.clock.seconds()
            self._announce(tail)

    def _probe_tail(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._probe_once())
        d.addErrback(lambda _: None)
        return d

    # --- readiness -------------------------------------------------------------------------

    def readiness(self, max_lag: float) -> tuple[bool, str]:
        """Return (ready, reason) as PROTOCOL.md §6 defines ``/readyz``."""
        if not self.state.synced:
            return False, "not_synced: no snapshot or event applied yet"
        if self.status.refused:
            return False, "master_refused: the master refuses this edge's token"
        if self.status.protocol_error:
            return False, f"unparseable_stream: {self.status.protocol_error}"
        since = self.status.behind_since
        if since is not None and self.clock.seconds() - since > max_lag:
            tail = self.status.announced_tail or 0
            return False, (
                f"lagging: {tail - self.state.offset} events behind the master's tail for "
                f"{self.clock.seconds() - since:.0f}s"
            )
        return True, "ok"
