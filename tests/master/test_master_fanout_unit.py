"""Unit tests of the master's fan-out: pings, cycling, long-poll waiters and slow consumers.

Time is a ``twisted.internet.task.Clock``; the log is a tiny in-memory stand-in and requests are
fakes that record what is written, as ``twisted.web.http.Request`` would receive it.
"""

from __future__ import annotations

import json
import math
import random

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeauth.events import IpBanned, encode_event
from edgeauth.master.fanout import PING, Fanout, FleetMember, Subscriber
from edgeauth.master.log import Listener, LogRecord
from edgeauth.master.metrics import MasterMetrics
from edgeauth.wire.offsets import format_offset
from edgeauth.wire.sse import SSEComment, SSEEvent, SSEParser


class MemoryLog:
    """The part of ``IEventLog`` the fan-out uses: tail, earliest, log_id and listeners."""

    log_id = "unit-log"

    def __init__(self) -> None:
        self.tail = 0
        self.earliest = 1
        self.listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def commit(self, count: int = 1, reason: str = "unit") -> list[LogRecord]:
        """Commit ``count`` ban events in one group and tell the listeners."""
        records = []
        for _ in range(count):
            self.tail += 1
            event = IpBanned(seq=self.tail, ip=f"192.0.2.{self.tail % 250}/32", reason=reason)
            records.append(LogRecord(self.tail, encode_event(event), event))
        for listener in list(self.listeners):
            listener(records)
        return records


@implementer(ITCPTransport)
class FakeTransport:
    """Records how the fan-out ends a connection."""

    def __init__(self) -> None:
        self.aborted = False
        self.lost = False

    def abortConnection(self) -> None:
        self.aborted = True

    def loseConnection(self) -> None:
        self.lost = True


class FakeChannel:
    def __init__(self) -> None:
        self.transport = FakeTransport()


class FakeRequest:
    """Records writes; like ``twisted.web.http.Request`` it drops ``channel`` once finished."""

    def __init__(self) -> None:
        self.channel = FakeChannel()
        self.transport = self.channel.transport
        self.written: list[bytes] = []
        self.finished = False
        self.producer: Subscriber | None = None
        self._notifications: list[Deferred[None]] = []

    def write(self, data: bytes) -> None:
        assert not self.finished, "write after finish"
        self.written.append(data)

    def registerProducer(self, producer: Subscriber, streaming: bool) -> None:
        assert streaming and self.producer is None
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._notifications.append(d)
        return d

    def finish(self) -> None:
        assert not self.finished, "finish called twice"
        self.finished = True
        del self.channel  # twisted.web.http.Request._cleanup does exactly this
        notifications, self._notifications = self._notifications, []
        for d in notifications:
            d.callback(None)

    def connection_lost(self) -> None:
        """The peer went away, as ``Request.connectionLost`` reports it."""
        notifications, self._notifications = self._notifications, []
        for d in notifications:
            d.errback(Failure(ConnectionLost()))

    @property
    def data(self) -> bytes:
        return b"".join(self.written)

    def items(self) -> list[object]:
        return SSEParser().feed(self.data)


def make_fanout(
    *,
    ping_interval: float = 10.0,
    sse_cycle: float = 100.0,
    max_buffer: int = 1 << 20,
    seed: int = 7,
) -> tuple[Fanout, MemoryLog, Clock, MasterMetrics]:
    log = MemoryLog()
    clock = Clock()
    metrics = MasterMetrics()
    fanout = Fanout(
        log,  # type: ignore[arg-type]
        clock,
        metrics,
        ping_interval=ping_interval,
        sse_cycle=sse_cycle,
        max_buffer=max_buffer,
        rng=random.Random(seed),
    )
    return fanout, log, clock, metrics


def live_subscriber(
    fanout: Fanout, *, kind: str = "sse", cycle: bool = False, name: str = "edge-1"
) -> tuple[Subscriber, FakeRequest, FleetMember]:
    request = FakeRequest()
    member = fanout.member(name, "192.0.2.200", kind, fanout.log.tail)
    sub = fanout.subscribe(request, kind, fanout.log.tail, member, cycle=cycle)  # type: ignore[arg-type]
    sub.live = True
    return sub, request, member


def sample(metrics: MasterMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, name
    return float(value)


def pings(request: FakeRequest) -> int:
    return sum(1 for item in request.items() if item == SSEComment("ping"))


def data_seqs(request: FakeRequest) -> list[int]:
    return data_seqs_of(request.data)


def data_seqs_of(frames: bytes) -> list[int]:
    out: list[int] = []
    for item in SSEParser().feed(frames):
        if isinstance(item, SSEEvent) and item.event == "data":
            out.extend(e["seq"] for e in json.loads(item.data))
    return out


# --- pings ---------------------------------------------------------------------------------------


def test_ping_only_after_a_full_interval_of_silence() -> None:
    """A ``: ping`` goes out exactly when ping_interval has passed with nothing written."""
    fanout, log, clock, _ = make_fanout(ping_interval=10.0)
    _, request, _ = live_subscriber(fanout)
    clock.advance(9.9)
    assert pings(request) == 0
    clock.advance(0.1)
    assert pings(request) == 1
    assert request.written[-1] == PING
    # A commit at t=15 restarts the silence: no ping at t=20, the next one at t=25.
    clock.advance(5)
    log.commit()
    clock.advance(5)
    assert pings(request) == 1
    clock.advance(4.9)
    assert pings(request) == 1
    clock.advance(0.1)
    assert pings(request) == 2


def test_no_ping_while_events_keep_flowing() -> None:
    """A subscriber written to more often than ping_interval never gets a ping."""
    fanout, log, clock, _ = make_fanout(ping_interval=10.0)
    _, request, _ = live_subscriber(fanout)
    for _ in range(20):
        clock.advance(6)
        log.commit()
    assert pings(request) == 0
    assert data_seqs(request) == list(range(1, 21))
    clock.advance(10)
    assert pings(request) == 1


def test_ping_stops_after_unsubscribe() -> None:
    """A subscriber whose connection is lost gets no more pings and no timers are left behind."""
    fanout, _, clock, metrics = make_fanout(ping_interval=10.0)
    _, request, member = live_subscriber(fanout, cycle=True)
    assert sample(metrics, "edgeauth_master_subscribers", kind="sse") == 1
    request.connection_lost()
    assert clock.getDelayedCalls() == []
    assert fanout.subscribers == set()
    assert member.connections == 0
    assert sample(metrics, "edgeauth_master_subscribers", kind="sse") == 0
    clock.advance(100)
    assert request.written == []


# --- cycling -------------------------------------------------------------------------------------


def test_cycle_delay_has_jitter_within_ten_percent() -> None:
    """Each SSE connection is cycled after sse_cycle ±10 %, spread out, from the injected rng."""
    fanout, _, clock, metrics = make_fanout(sse_cycle=100.0, seed=1234)
    subs = [live_subscriber(fanout, cycle=True, name=f"edge-{i}") for i in range(200)]
    delays = [sub.cycle_at - clock.seconds() for sub, _, _ in subs]
    assert all(90.0 <= d <= 110.0 for d in delays)
    assert min(delays) < 93.0 and max(delays) > 107.0  # really spread, not a constant
    assert len(set(delays)) > 150

    again, _, _, _ = make_fanout(sse_cycle=100.0, seed=1234)
    same = []
    for i in range(200):
        sub, _, _ = live_subscriber(again, cycle=True, name=f"edge-{i}")
        same.append(sub.cycle_at)
    assert same == delays  # the jitter comes from the injected random.Random

    clock.advance(min(delays) - 0.001)
    assert not any(request.finished for _, request, _ in subs)
    clock.advance(max(delays) - min(delays) + 0.002)
    assert all(request.finished for _, request, _ in subs)
    assert all(request.transport.lost for _, request, _ in subs)
    assert all(request.producer is None for _, request, _ in subs)
    assert fanout.subscribers == set()
    assert sample(metrics, "edgeauth_master_sse_cycled_total") == 200
    assert sample(metrics, "edgeauth_master_subscribers", kind="sse") == 0
    assert clock.getDelayedCalls() == []


def test_cycle_happens_at_an_event_boundary() -> None:
    """A cycled stream ends after whole frames: the last commit's control frame is complete."""
    fanout, log, clock, _ = make_fanout(sse_cycle=10.0, ping_interval=1000.0)
    sub, request, _ = live_subscriber(fanout, cycle=True)
    log.commit(3)
    clock.advance(sub.cycle_at - clock.seconds())
    assert request.finished
    assert request.data.endswith(b"\n\n")
    parser = SSEParser()
    items = parser.feed(request.data)
    assert parser.feed_eof() == []
    control = [i for i in items if isinstance(i, SSEEvent) and i.event == "control"]
    assert json.loads(control[-1].data)["streamNextOffset"] == format_offset(3)
    log.commit()  # nothing more is written after the cycle
    assert data_seqs(request) == [1, 2, 3]


def test_seed_stream_is_not_cycled() -> None:
    """``/events`` subscribers (cycle=False) have no cycle deadline."""
    fanout, _, clock, _ = make_fanout(sse_cycle=10.0)
    sub, request, _ = live_subscriber(fanout, kind="events_sse", cycle=False)
    assert sub.cycle_at == math.inf
    clock.advance(1000)
    assert not request.finished


# --- commits -------------------------------------------------------------------------------------


def test_commit_reaches_live_subscribers_only() -> None:
    """Live subscribers get each commit once, in order; one still catching up gets nothing."""
    fanout, log, _, _ = make_fanout()
    _, first, _ = live_subscriber(fanout, name="a")
    _, second, _ = live_subscriber(fanout, name="b")
    catching_up, third, _ = live_subscriber(fanout, name="c")
    catching_up.live = False
    log.commit(2)
    log.commit(1)
    assert data_seqs(first) == [1, 2, 3]
    assert first.written == second.written
    assert data_seqs(third) == []
    controls = [
        json.loads(i.data)
        for i in first.items()
        if isinstance(i, SSEEvent) and i.event == "control"
    ]
    assert [c["streamNextOffset"] for c in controls] == [format_offset(2), format_offset(3)]
    assert all(c["upToDate"] is True for c in controls)


def test_seed_subscriber_gets_one_frame_per_event() -> None:
    """An ``/events`` subscriber gets ``id``/``event``/``data`` frames, one per event."""
    fanout, log, _, _ = make_fanout()
    _, request, member = live_subscriber(fanout, kind="events_sse")
    records = log.commit(2)
    events = [i for i in request.items() if isinstance(i, SSEEvent)]
    assert [(e.id, e.event) for e in events] == [("1", "ip_banned"), ("2", "ip_banned")]
    assert [json.loads(e.data) for e in events] == [json.loads(r.json) for r in records]
    assert member.offset == 2


# --- long-poll -----------------------------------------------------------------------------------


def test_waiter_fires_true_on_commit() -> None:
    """A long-poll waiter fires True at the next commit and is forgotten."""
    fanout, log, clock, metrics = make_fanout()
    member = fanout.member("poller", "192.0.2.1", "long_poll", 0)
    results: list[bool] = []
    fanout.wait(5.0, member).addCallback(results.append)
    assert sample(metrics, "edgeauth_master_subscribers", kind="long_poll") == 1
    assert member.connections == 1
    clock.advance(1)
    log.commit()
    assert results == [True]
    assert fanout.waiters == set()
    assert member.connections == 0
    assert sample(metrics, "edgeauth_master_subscribers", kind="long_poll") == 0
    assert clock.getDelayedCalls() == []


def test_waiter_fires_false_on_timeout() -> None:
    """Without a commit, a waiter fires False after exactly its timeout."""
    fanout, log, clock, metrics = make_fanout()
    member = fanout.member("poller", "192.0.2.1", "long_poll", 0)
    results: list[bool] = []
    fanout.wait(5.0, member).addCallback(results.append)
    clock.advance(4.99)
    assert results == []
    clock.advance(0.01)
    assert results == [False]
    assert fanout.waiters == set()
    assert sample(metrics, "edgeauth_master_subscribers", kind="long_poll") == 0
    log.commit()  # a later commit does not fire it again
    assert results == [False]


def test_cancel_removes_the_waiter() -> None:
    """Cancelling a waiter (client gone) forgets it and its timeout at once."""
    fanout, log, clock, metrics = make_fanout()
    member = fanout.member("poller", "192.0.2.1", "long_poll", 0)
    d = fanout.wait(5.0, member)
    failures: list[Failure] = []
    d.addErrback(failures.append)
    d.cancel()
    assert len(failures) == 1 and failures[0].check(CancelledError)
    assert fanout.waiters == set()
    assert member.connections == 0
    assert clock.getDelayedCalls() == []
    assert sample(metrics, "edgeauth_master_subscribers", kind="long_poll") == 0
    log.commit()
    clock.advance(10)
    assert len(failures) == 1


# --- slow consumers ------------------------------------------------------------------------------


def test_slow_consumer_is_aborted_beyond_max_buffer() -> None:
    """A paused subscriber is aborted once more than max_buffer bytes are pending."""
    fanout, log, _, metrics = make_fanout(max_buffer=1000)
    sub, request, member = live_subscriber(fanout)
    sub.pauseProducing()
    log.commit()  # one commit is a few hundred bytes: still under the limit
    written = len(request.data)
    assert 0 < written <= 1000
    assert not request.transport.aborted
    while not request.transport.aborted:
        assert len(request.data) <= 1000, "wrote more than max_buffer while paused"
        log.commit()
    assert sub.closed
    assert sample(metrics, "edgeauth_master_slow_consumers_disconnected_total") == 1
    before = request.data
    log.commit(3)
    assert request.data == before  # nothing more after the abort
    request.connection_lost()
    assert fanout.subscribers == set()
    assert member.connections == 0
    assert sample(metrics, "edgeauth_master_subscribers", kind="sse") == 0


def test_draining_resets_the_slow_consumer_budget() -> None:
    """Bytes pending before resumeProducing do not count against the next pause."""
    fanout, log, _, metrics = make_fanout(max_buffer=1000)
    sub, request, _ = live_subscriber(fanout)
    for _ in range(5):
        sub.pauseProducing()
        log.commit()  # under 1000 bytes each time
        sub.resumeProducing()
    assert not request.transport.aborted
    assert data_seqs(request) == [1, 2, 3, 4, 5]
    for _ in range(20):  # not paused: any amount may be written
        log.commit()
    assert not request.transport.aborted
    assert sample(metrics, "edgeauth_master_slow_consumers_disconnected_total") == 0


def test_slow_consumer_does_not_hold_back_others() -> None:
    """Other subscribers keep receiving every commit while one is aborted for being slow."""
    fanout, log, _, _ = make_fanout(max_buffer=500)
    slow, slow_request, _ = live_subscriber(fanout, name="slow")
    _, fast_request, _ = live_subscriber(fanout, name="fast")
    slow.pauseProducing()
    for _ in range(10):
        log.commit()
    assert slow_request.transport.aborted
    assert data_seqs(fast_request) == list(range(1, 11))


def test_close_all_finishes_every_stream_and_waiter() -> None:
    """Service stop ends every SSE response and releases every long-poll with False."""
    fanout, _, clock, metrics = make_fanout()
    requests = [live_subscriber(fanout, name=f"e{i}", cycle=True)[1] for i in range(3)]
    member = fanout.member("poller", "192.0.2.1", "long_poll", 0)
    results: list[bool] = []
    fanout.wait(5.0, member).addCallback(results.append)
    fanout.close_all()
    assert all(r.finished and r.producer is None for r in requests)
    assert results == [False]
    assert fanout.subscribers == set() and fanout.waiters == set()
    assert clock.getDelayedCalls() == []
    for kind in ("sse", "long_poll"):
        assert sample(metrics, "edgeauth_master_subscribers", kind=kind) == 0


def test_fleet_view_reports_lag() -> None:
    """The fleet entry of a live subscriber follows its offset; lag is tail minus offset."""
    fanout, log, clock, _ = make_fanout()
    sub, _, _ = live_subscriber(fanout, name="edge-x")
    log.commit(2)
    clock.advance(3)
    sub.live = False  # stops following; the tail moves on
    log.commit(3)
    (view,) = fanout.fleet_view()
    assert view["edge_id"] == "edge-x"
    assert view["connected"] is True
    assert view["offset"] == format_offset(2)
    assert view["lag"] == 3


# --- the shared timer and the per-commit work ----------------------------------------------------


def test_one_timer_serves_every_subscriber() -> None:
    """Pings and cycles of all subscribers run from one periodic call, gone with the last one."""
    fanout, _, clock, _ = make_fanout(ping_interval=10.0, sse_cycle=100.0)
    assert fanout.tick == 1.0  # min(1 s, ping_interval / 4, sse_cycle / 20)
    assert clock.getDelayedCalls() == []
    requests = [live_subscriber(fanout, name=f"e{i}", cycle=True)[1] for i in range(50)]
    assert len(clock.getDelayedCalls()) == 1
    for request in requests[:-1]:
        request.connection_lost()
    assert len(clock.getDelayedCalls()) == 1
    requests[-1].connection_lost()
    assert clock.getDelayedCalls() == []
    live_subscriber(fanout, name="again")
    assert len(clock.getDelayedCalls()) == 1


def test_tick_is_fine_enough_for_short_intervals() -> None:
    """The timer runs at a quarter of ping_interval and a twentieth of sse_cycle when shorter."""
    assert make_fanout(ping_interval=0.2)[0].tick == 0.05
    assert make_fanout(ping_interval=30.0, sse_cycle=0.5)[0].tick == 0.025


def test_ping_is_at_most_one_tick_late() -> None:
    """A subscriber that joined between ticks is pinged at the first tick after its interval."""
    fanout, _, clock, _ = make_fanout(ping_interval=10.0)
    live_subscriber(fanout, name="first")  # starts the timer: ticks at 1, 2, 3 ...
    clock.advance(0.5)
    _, request, _ = live_subscriber(fanout, name="second")
    clock.advance(9.9)  # t = 10.4: silent for 9.9 s
    assert pings(request) == 0
    clock.advance(0.6)  # t = 11.0: the first tick after 10.5
    assert pings(request) == 1


def test_commit_bytes_are_counted_once_per_kind() -> None:
    """bytes_sent grows by what every reader was sent, counted per kind in one step."""
    fanout, log, _, metrics = make_fanout()
    sse = [live_subscriber(fanout, name=f"s{i}")[1] for i in range(3)]
    seed = [live_subscriber(fanout, kind="events_sse", name=f"e{i}")[1] for i in range(2)]
    slow, _, _ = live_subscriber(fanout, name="slow")
    slow.closed = True  # e.g. dropped for not draining: not written to, not counted
    log.commit(2)
    log.commit(1)
    assert sample(metrics, "edgeauth_master_stream_bytes_sent_total", mode="sse") == sum(
        len(r.data) for r in sse
    )
    assert sample(metrics, "edgeauth_master_stream_bytes_sent_total", mode="events_sse") == sum(
        len(r.data) for r in seed
    )


class ChunkedTransport(FakeTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.writes.append(b"".join(data))


class ChunkedRequest(FakeRequest):
    """Like ``twisted.web.http.Request`` on HTTP/1.1 without Content-Length: chunked writes."""

    def __init__(self) -> None:
        super().__init__()
        self.transport = self.channel.transport = ChunkedTransport()
        self.chunked = False
        self.sentLength = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.chunked = True
        self.sentLength += len(data)
        self.transport.writeSequence([b"%x" % len(data), b"\r\n", data, b"\r\n"])


def test_chunked_readers_share_one_framed_chunk() -> None:
    """HTTP/1.1 readers get each commit as the same pre-framed chunk object, one write each."""
    fanout, log, _, _ = make_fanout()
    readers = []
    for i in range(3):
        request = ChunkedRequest()
        member = fanout.member(f"c{i}", "192.0.2.200", "sse", fanout.log.tail)
        sub = fanout.subscribe(request, "sse", fanout.log.tail, member, cycle=False)  # type: ignore[arg-type]
        sub.write(b": hello\n\n")  # the first write goes through Request.write (headers)
        sub.live = True
        readers.append((sub, request))
    log.commit(2)
    chunks = [request.transport.writes[-1] for _, request in readers]
    assert all(chunk is chunks[0] for chunk in chunks), "one bytes object for every reader"
    for sub, request in readers:
        assert len(request.transport.writes) == 2  # the hello, then one write for the commit
        assert sub.transport is request.transport
        # The bytes on the wire are what Request.write would have sent for the same frames.
        size, _, rest = chunks[0].partition(b"\r\n")
        assert rest.endswith(b"\r\n") and int(size, 16) == len(rest) - 2
        assert data_seqs_of(rest[:-2]) == [1, 2]
        assert request.sentLength == len(b": hello\n\n") + len(rest) - 2
