"""Fan-out of committed events to live readers: SSE subscribers and waiting long-polls.

Every commit is encoded once per frame kind, and for HTTP/1.1 readers once more as a chunk of the
chunked response body; the same bytes object is then written to every live subscriber (nothing
copied per reader), so the cost of an event grows with the number of sockets, not with JSON work.
A plain-TCP reader whose Twisted write buffers are empty gets that chunk with one ``send`` on its
socket, at once (see :func:`_send_chunk`); only an unsent remainder, or a chunk for a reader that
is TLS or already has data queued, goes through ``transport.write``. The clock is read and the
Prometheus byte counter incremented once per commit, not per reader. Subscribers that do not
drain their socket are disconnected (they catch up by offset when they come back).

One timer serves every subscriber (a ``LoopingCall`` running every ``min(1 s, ping_interval / 4,
sse_cycle / 20)`` while any subscriber is connected): it writes a ``: ping`` comment to those
silent for ``ping_interval`` and cycles the SSE connections whose deadline (``sse_cycle`` ±10 %
jitter, drawn per subscriber) has passed. A ping or a cycle may thus come up to one tick late;
in exchange no reader holds timers of its own (it held two ``DelayedCall`` objects, ~0.7 KiB).
The fleet view (``GET /fleet``) is kept here too.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet import abstract, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
    ITransport,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from edgeauth.master.log import IEventLog, LogRecord
from edgeauth.master.metrics import MasterMetrics
from edgeauth.wire.offsets import current_cursor, format_offset
from edgeauth.wire.sse import encode_comment, encode_event

log = Logger()

PING = encode_comment("ping")
FLEET_FORGET_AFTER = 300.0
MAX_TICK = 1.0
"""Longest period of the shared ping and cycle timer, seconds."""

# --- sending a chunk at once -------------------------------------------------------------------
#
# ``transport.write`` only queues: it appends to the transport's buffer and calls
# ``startWriting`` (an ``epoll_ctl``); the bytes leave in the next reactor turn (``send``, then
# ``stopWriting``, a second ``epoll_ctl``). With N readers no reader gets a commit before the loop
# over all N has finished, and each costs two system calls more than the ``send`` itself. When
# nothing is queued for a reader, the fan-out therefore calls ``send`` on its socket right away and
# queues only what the kernel did not take through ``transport.write`` (order kept; Twisted's
# backpressure and thus the slow-consumer detection work on the queued part as before).
#
# This needs to know that the transport's buffers are empty, and ITransport has no public way to
# ask: it reads attributes of Twisted's FileDescriptor that are private (``dataBuffer``,
# ``offset``, ``_tempDataBuffer``, ``_aborting``, ``_writeDisconnecting``). They are looked for
# once, here; if a Twisted release lacks any of them, every chunk goes through
# ``transport.write``. Only an exact ``tcp.Server`` qualifies (never a subclass, never a TLS
# transport: ``TLSMemoryBIOProtocol`` forwards unknown attributes to the TCP transport beneath it,
# so duck typing would write plaintext into a TLS stream), and not after ``startTLS`` (``TLS``).
_CLASS_ATTRIBUTES = (
    "connected",
    "disconnecting",
    "dataBuffer",
    "offset",
    "_aborting",
    "_writeDisconnecting",
    "TLS",
    "getHandle",
    "write",
)


class _NoReactor:
    """A stand-in reactor for the probe below (``FileDescriptor`` only stores it)."""


def _direct_send_transport() -> type | None:
    """Return the transport class the direct send applies to, or None if it cannot be used."""
    server = tcp.Server
    if not issubclass(server, abstract.FileDescriptor):
        return None
    if not all(hasattr(server, name) for name in _CLASS_ATTRIBUTES):
        return None
    try:
        probe = abstract.FileDescriptor(reactor=_NoReactor())  # type: ignore[arg-type]
    except Exception:  # a future signature: do without the direct send
        return None
    if getattr(probe, "_tempDataBuffer", None) != []:
        return None
    return server


DIRECT_SEND_TRANSPORT: type | None = _direct_send_transport()
"""``tcp.Server`` when chunks may be sent at once on such transports, else None (feature check)."""


def _send_chunk(fanout: Fanout, transport: ITransport, chunk: bytes) -> None:
    """Write ``chunk`` to a reader: at once on its socket when nothing is queued, else queue it.

    On a plain ``tcp.Server`` with empty buffers that is neither closing nor aborted, ``chunk`` is
    passed to ``socket.send``; whatever the kernel did not take (all of it on ``EAGAIN``) is
    queued with ``transport.write``. Any other ``OSError`` (a reset, a broken pipe) queues the
    whole chunk as well: Twisted meets the error on its own ``send`` and closes the connection as
    usual. Anything else (TLS, data already queued) goes through ``transport.write`` unchanged.
    """
    t: Any = transport
    plain_tcp = type(transport) is DIRECT_SEND_TRANSPORT
    if (
        not plain_tcp
        or not t.connected
        or t.disconnecting
        or t._aborting
        or t._writeDisconnecting
        or t.TLS
        or t._tempDataBuffer
        or t.offset != len(t.dataBuffer)
    ):
        fanout.queued_sends += 1
        transport.write(chunk)
        return
    try:
        sent = t.getHandle().send(chunk)
    except BlockingIOError:  # EAGAIN / EWOULDBLOCK: the socket buffer is full
        sent = 0
    except OSError:
        fanout.queued_sends += 1
        transport.write(chunk)
        return
    if sent == len(chunk):
        fanout.direct_sends += 1
        return
    fanout.partial_sends += 1
    transport.write(chunk[sent:])


def stream_frames(records: Sequence[LogRecord], cursor: int, up_to_date: bool = True) -> bytes:
    """Encode events for ``/v1/stream/events?live=sse``: a data frame, then a control frame.

    ``up_to_date`` is False for catch-up batches that do not reach the tail yet.
    """
    data = "[" + ",".join(r.json for r in records) + "]"
    return encode_event(data, event="data") + control_frame(records[-1].seq, cursor, up_to_date)


def control_frame(offset: int, cursor: int, up_to_date: bool) -> bytes:
    """Encode a lone control frame (sent after catch-up batches and on connect)."""
    control = json.dumps(
        {
            "streamNextOffset": format_offset(offset),
            "streamCursor": str(cursor),
            "upToDate": up_to_date,
        },
        separators=(",", ":"),
    )
    return encode_event(control, event="control")


def seed_frames(records: Sequence[LogRecord]) -> bytes:
    """Encode events for the seed-compatible ``/events`` stream: one frame per event."""
    return b"".join(encode_event(r.json, event=r.event.TYPE, id=str(r.seq)) for r in records)


@attrs.define(eq=False)
class FleetMember:
    """What the master knows of one reader (by ``Edgeauth-Edge-Id``, else by address)."""

    edge_id: str
    address: str
    mode: str
    connected_since: float
    last_seen: float
    offset: int
    connections: int = 0


@implementer(IPushProducer)
@attrs.define(eq=False)  # slots: one of these lives as long as each SSE connection
class Subscriber:
    """One live SSE reader. It is its request's push producer, to see socket backpressure.

    Attributes:
        cycle_at: when the shared timer ends this connection (``inf``: never).
        transport: the connection's transport once the response is known to be HTTP/1.1
            chunked; the fan-out then writes pre-framed chunks to it directly.
    """

    fanout: Fanout
    request: Request
    kind: str
    position: int
    member: FleetMember
    live: bool = False
    closed: bool = False
    paused: bool = False
    pending: int = 0
    last_write: float = 0.0
    cycle_at: float = math.inf
    transport: ITransport | None = None

    def pauseProducing(self) -> None:
        """The socket buffer is full: count what is written until it drains."""
        self.paused = True

    def resumeProducing(self) -> None:
        """The socket buffer drained."""
        self.paused = False
        self.pending = 0

    def stopProducing(self) -> None:
        """The connection is going away; cleanup happens through ``notifyFinish``."""

    def write(self, data: bytes) -> None:
        """Write bytes unless closed; disconnect the reader if it stopped draining."""
        if self.send(data, None, self.fanout.clock.seconds()):
            self.fanout.metrics.bytes_sent.labels(mode=self.kind).inc(len(data))

    def send(self, data: bytes, chunk: bytes | None, now: float) -> bool:
        """Write ``data`` without counting it; return False if it was not written.

        ``chunk`` is ``data`` framed as one HTTP/1.1 chunk (the fan-out frames each commit once
        for all readers); it is written straight to the transport when the response is chunked.
        A reader that stopped draining is disconnected instead once ``max_buffer`` is exceeded.
        """
        if self.closed:
            return False
        if self.paused:
            self.pending += len(data)
            if self.pending > self.fanout.max_buffer:
                self._drop()
                return False
        self.last_write = now
        request = self.request
        transport = self.transport
        if transport is not None and chunk is not None:
            # What Request.write does for a chunked response, minus its per-write framing and
            # the copy that joining the framing with the data costs, sent at once if it can be.
            _send_chunk(self.fanout, transport, chunk)
            request.sentLength += len(data)
            return True
        request.write(data)
        if transport is None and getattr(request, "chunked", False) and request.channel:
            self.transport = request.channel.transport
        return True

    def _drop(self) -> None:
        self.fanout.metrics.slow_consumers.inc()
        log.info(
            "disconnecting slow stream reader {edge} ({address})",
            edge=self.member.edge_id,
            address=self.member.address,
        )
        self.closed = True
        transport = self.request.channel.transport
        if ITCPTransport.providedBy(transport):
            transport.abortConnection()
        elif transport is not None:
            transport.loseConnection()

    def advance(self, records: Sequence[LogRecord], frames: bytes) -> None:
        """Send one commit already encoded for this subscriber's kind."""
        now = self.fanout.clock.seconds()
        self.position = records[-1].seq
        self.member.offset = self.position
        self.member.last_seen = now
        if self.send(frames, None, now):
            self.fanout.metrics.bytes_sent.labels(mode=self.kind).inc(len(frames))


@attrs.define(eq=False)
class Waiter:
    """One long-poll waiting at the tail."""

    deferred: Deferred[bool]
    member: FleetMember
    timeout: IDelayedCall | None = None


class Fanout:
    """Wakes long-polls and writes SSE frames on every commit of the log."""

    def __init__(
        self,
        event_log: IEventLog,
        clock: IReactorTime,
        metrics: MasterMetrics,
        *,
        ping_interval: float = 15.0,
        sse_cycle: float = 60.0,
        max_buffer: int = 1 << 20,
        rng: random.Random | None = None,
    ) -> None:
        """Subscribe to ``event_log`` commits.

        Args:
            event_log: the log whose commits are fanned out.
            clock: time source for pings, cycling and long-poll timeouts.
            metrics: where subscriber counts and bytes are recorded.
            ping_interval: seconds of silence before a ``: ping`` comment.
            sse_cycle: seconds before an SSE connection is closed (±10 % jitter).
            max_buffer: bytes a subscriber may leave undrained before it is disconnected.
            rng: randomness for jitter (injected for tests).
        """
        self.log = event_log
        self.clock = clock
        self.metrics = metrics
        self.ping_interval = ping_interval
        self.sse_cycle = sse_cycle
        self.max_buffer = max_buffer
        self.rng = rng or random.Random()
        self.subscribers: set[Subscriber] = set()
        self.waiters: set[Waiter] = set()
        self.fleet: dict[str, FleetMember] = {}
        self.tick = min(MAX_TICK, ping_interval / 4, sse_cycle / 20)
        """Seconds between runs of the shared ping and cycle timer."""
        self.direct_sends = 0
        """Chunks sent whole by one ``send`` on the reader's socket, at once."""
        self.partial_sends = 0
        """Chunks of which ``send`` took a part or nothing; the rest was queued."""
        self.queued_sends = 0
        """Chunks queued whole with ``transport.write`` (TLS, data already queued, or an error)."""
        self._timer = LoopingCall(self._tick)
        self._timer.clock = clock
        event_log.add_listener(self._committed)

    # --- fleet ---------------------------------------------------------------------------

    def member(self, edge_id: str | None, address: str, mode: str, offset: int) -> FleetMember:
        """Return (creating it if new) the fleet entry of a reader and mark it seen."""
        now = self.clock.seconds()
        key = edge_id or f"@{address}"
        member = self.fleet.get(key)
        if member is None:
            member = FleetMember(key, address, mode, now, now, offset)
            self.fleet[key] = member
        member.address, member.mode, member.last_seen = address, mode, now
        member.offset = max(member.offset, offset) if member.connections else offset
        return member

    def fleet_view(self) -> list[dict[str, Any]]:
        """Return the readers seen recently, with their lag behind the tail."""
        now = self.clock.seconds()
        for key, member in list(self.fleet.items()):
            if not member.connections and now - member.last_seen > FLEET_FORGET_AFTER:
                del self.fleet[key]
        tail = self.log.tail
        return [
            {
                "edge_id": m.edge_id,
                "address": m.address,
                "mode": m.mode,
                "connected": m.connections > 0,
                "connected_since": m.connected_since,
                "last_seen": m.last_seen,
                "offset": format_offset(m.offset),
                "lag": max(0, tail - m.offset),
            }
            for m in sorted(self.fleet.values(), key=lambda m: m.edge_id)
        ]

    # --- SSE -----------------------------------------------------------------------------

    def subscribe(
        self, request: Request, kind: str, position: int, member: FleetMember, cycle: bool
    ) -> Subscriber:
        """Register an SSE reader at ``position``; it receives commits once it is ``live``."""
        sub = Subscriber(self, request, kind, position, member)
        sub.last_write = now = self.clock.seconds()
        if cycle:
            sub.cycle_at = now + self.sse_cycle * self.rng.uniform(0.9, 1.1)
        request.registerProducer(sub, True)
        self.subscribers.add(sub)
        member.connections += 1
        self.metrics.subscribers.labels(kind=kind).inc()
        if not self._timer.running:
            self._timer.start(self.tick, now=False)
        request.notifyFinish().addBoth(self._finished, sub)
        return sub

    def _finished(self, _: object, sub: Subscriber) -> None:
        self._unsubscribe(sub)

    def _unsubscribe(self, sub: Subscriber) -> None:
        if sub not in self.subscribers:
            return
        sub.closed = True
        self.subscribers.discard(sub)
        sub.member.connections -= 1
        sub.member.last_seen = self.clock.seconds()
        self.metrics.subscribers.labels(kind=sub.kind).dec()
        if not self.subscribers and self._timer.running:
            self._timer.stop()

    def _tick(self) -> None:
        """Ping the subscribers silent for ``ping_interval``, cycle those past their deadline."""
        now = self.clock.seconds()
        silent_since = now - self.ping_interval + 0.001
        silent: list[Subscriber] = []
        due: list[Subscriber] = []
        for sub in self.subscribers:
            if sub.cycle_at <= now:
                due.append(sub)
            elif sub.last_write <= silent_since:
                silent.append(sub)
        for sub in silent:
            sub.write(PING)
        for sub in due:
            self._cycle(sub)

    def _cycle(self, sub: Subscriber) -> None:
        """Close an SSE connection at an event boundary (every frame is written whole)."""
        if sub.closed:
            return
        self.metrics.sse_cycled.inc()
        request = sub.request
        # Take the transport first: Request.finish() deletes request.channel.
        transport = request.channel.transport if request.channel is not None else None
        self._unsubscribe(sub)
        request.unregisterProducer()
        request.finish()
        if transport is not None:
            transport.loseConnection()

    def _encode(self, kind: str, records: Sequence[LogRecord], now: float) -> bytes:
        if kind == "sse":
            return stream_frames(records, current_cursor(now))
        return seed_frames(records)

    def _committed(self, records: Sequence[LogRecord]) -> None:
        last = records[-1].seq
        self.metrics.log_tail.set(last)
        self.metrics.commit_group_size.observe(len(records))
        if self.subscribers:
            self._fan_out(records, last)
        for waiter in list(self.waiters):
            self._release(waiter, True)

    def _fan_out(self, records: Sequence[LogRecord], last: int) -> None:
        """Write one commit to every live subscriber: encoded once per kind, one write each."""
        now = self.clock.seconds()
        first = records[0].seq
        encoded: dict[str, tuple[bytes, bytes]] = {}  # kind -> (frames, the same as a chunk)
        written: dict[str, int] = {}  # kind -> readers written to
        for sub in list(self.subscribers):
            position = sub.position
            if not sub.live or sub.closed or position >= last:
                continue
            kind = sub.kind
            if position + 1 != first:
                # A live subscriber is always at the tail; this guards against a gap anyway.
                newer = [r for r in records if r.seq > position]
                sub.advance(newer, self._encode(kind, newer, now))
                continue
            frames = encoded.get(kind)
            if frames is None:
                data = self._encode(kind, records, now)
                frames = encoded[kind] = (data, b"%x\r\n%b\r\n" % (len(data), data))
            sub.position = last
            member = sub.member
            member.offset = last
            member.last_seen = now
            if sub.send(frames[0], frames[1], now):
                written[kind] = written.get(kind, 0) + 1
        for kind, count in written.items():
            self.metrics.bytes_sent.labels(mode=kind).inc(count * len(encoded[kind][0]))

    # --- long-poll -----------------------------------------------------------------------

    def wait(self, timeout: float, member: FleetMember) -> Deferred[bool]:
        """Fire with True at the next commit, or False after ``timeout`` seconds."""

        def cancel(_: Deferred[bool]) -> None:
            self._forget(waiter)

        d: Deferred[bool] = Deferred(cancel)
        waiter = Waiter(d, member)
        waiter.timeout = self.clock.callLater(timeout, self._release, waiter, False)
        self.waiters.add(waiter)
        member.connections += 1
        self.metrics.subscribers.labels(kind="long_poll").inc()
        return d

    def _forget(self, waiter: Waiter) -> None:
        if waiter not in self.waiters:
            return
        if waiter.timeout is not None and waiter.timeout.active():
            waiter.timeout.cancel()
        waiter.member.connections -= 1
        waiter.member.last_seen = self.clock.seconds()
        self.metrics.subscribers.labels(kind="long_poll").dec()
        self.waiters.discard(waiter)

    def _release(self, waiter: Waiter, woke: bool) -> None:
        if waiter not in self.waiters:
            return
        self._forget(waiter)
        waiter.deferred.callback(woke)

    def close_all(self) -> None:
        """Close every live connection (service stop)."""
        for sub in list(self.subscribers):
            request = sub.request
            self._unsubscribe(sub)
            request.unregisterProducer()
            request.finish()
        for waiter in list(self.waiters):
            self._release(waiter, False)
