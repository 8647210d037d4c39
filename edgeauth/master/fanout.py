"""Fan-out of committed events to live readers: SSE subscribers and waiting long-polls.

Every commit is encoded once per frame kind and the same bytes are written to every live
subscriber, so the cost of an event grows with the number of sockets, not with JSON work.
Subscribers that do not drain their socket are disconnected (they catch up by offset when they
come back), SSE connections are cycled after ``sse_cycle`` with jitter, and a ``: ping`` comment
goes out after ``ping_interval`` of silence. The fleet view (``GET /fleet``) is kept here too.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
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
@attrs.define(eq=False)
class Subscriber:
    """One live SSE reader. It is its request's push producer, to see socket backpressure."""

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
    ping_call: IDelayedCall | None = None
    cycle_call: IDelayedCall | None = None

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
        if self.closed:
            return
        if self.paused:
            self.pending += len(data)
            if self.pending > self.fanout.max_buffer:
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
                return
        self.last_write = self.fanout.clock.seconds()
        self.fanout.metrics.bytes_sent.labels(mode=self.kind).inc(len(data))
        self.request.write(data)

    def advance(self, records: Sequence[LogRecord], frames: bytes) -> None:
        """Send one commit already encoded for this subscriber's kind."""
        self.position = records[-1].seq
        self.member.offset = self.position
        self.member.last_seen = self.fanout.clock.seconds()
        self.write(frames)


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
        """Register an SSE reader at ``position``; it receives commits once :meth:`go_live`."""
        sub = Subscriber(self, request, kind, position, member)
        sub.last_write = self.clock.seconds()
        request.registerProducer(sub, True)
        self.subscribers.add(sub)
        member.connections += 1
        self.metrics.subscribers.labels(kind=kind).inc()
        sub.ping_call = self.clock.callLater(self.ping_interval, self._ping, sub)
        if cycle:
            delay = self.sse_cycle * self.rng.uniform(0.9, 1.1)
            sub.cycle_call = self.clock.callLater(delay, self._cycle, sub)
        request.notifyFinish().addBoth(lambda _: self._unsubscribe(sub))
        return sub

    def _unsubscribe(self, sub: Subscriber) -> None:
        if sub not in self.subscribers:
            return
        sub.closed = True
        self.subscribers.discard(sub)
        sub.member.connections -= 1
        sub.member.last_seen = self.clock.seconds()
        self.metrics.subscribers.labels(kind=sub.kind).dec()
        for call in (sub.ping_call, sub.cycle_call):
            if call is not None and call.active():
                call.cancel()

    def _ping(self, sub: Subscriber) -> None:
        if sub.closed:
            return
        silent_for = self.clock.seconds() - sub.last_write
        if silent_for >= self.ping_interval - 0.001:
            sub.write(PING)
            silent_for = 0.0
        if not sub.closed:
            sub.ping_call = self.clock.callLater(self.ping_interval - silent_for, self._ping, sub)

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

    def _encode(self, kind: str, records: Sequence[LogRecord]) -> bytes:
        if kind == "sse":
            return stream_frames(records, current_cursor(self.clock.seconds()))
        return seed_frames(records)

    def _committed(self, records: Sequence[LogRecord]) -> None:
        self.metrics.log_tail.set(records[-1].seq)
        self.metrics.commit_group_size.observe(len(records))
        frames: dict[str, bytes] = {}
        for sub in list(self.subscribers):
            if not sub.live or sub.closed:
                continue
            if sub.position >= records[-1].seq:
                continue
            if sub.position + 1 != records[0].seq:
                # A live subscriber is always at the tail; this guards against a gap anyway.
                newer = [r for r in records if r.seq > sub.position]
                sub.advance(newer, self._encode(sub.kind, newer))
                continue
            frame = frames.get(sub.kind)
            if frame is None:
                frame = frames[sub.kind] = self._encode(sub.kind, records)
            sub.advance(records, frame)
        for waiter in list(self.waiters):
            self._release(waiter, True)

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
