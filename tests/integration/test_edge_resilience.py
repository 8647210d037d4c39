"""A misbehaving master never changes what an edge enforces; the edge reconnects and converges.

Every test runs a real master, a real origin and a whole in-process edge (proxy and admin
listeners) on 127.0.0.1, port 0. Between the edge and the master sits a small real server
written here:

- :class:`Shim`, an HTTP server that forwards every request to the real master and relays the
  answer (the SSE stream frame by frame) until it is told to misbehave: garbage on the live
  stream, half an SSE frame then silence, a stall (requests accepted, never answered), 500 to
  everything, a 15 s snapshot under another log id, or 401 for the edge's token;
- :class:`Choppy`, a TCP forwarder that hands the master's bytes to the edge 7 at a time and
  closes each connection after a seeded random number of them.

"Never corrupted" is checked on every change the edge makes: a listener on the edge state
records the edge's view at each offset it reaches, and :class:`Mirror` holds the master's
snapshot at every offset the tests create; each recorded view must equal the master's at the
same offset. Nothing sleeps: tests wait for conditions with deadlines.
"""

from __future__ import annotations

import gzip
import inspect
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from support import EDGE_TOKEN, TEST_ENV, Client, Origin, RunningEdge, start_master, write_edge_ini
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from edgeauth.config import load_settings
from edgeauth.edge import subscriber as subscriber_module
from edgeauth.edge.index import parse_client_ip
from edgeauth.edge.service import EdgeService
from edgeauth.edge.state import EdgeState

MASTER_KW = {"ping_interval": 0.1}
RECONNECTS = (
    "edgeauth_edge_stream_reconnects_total"  # the edges below watch for silence of 0.6 s to 1 s
)
TICK = 0.02


# --- waiting, clients, metrics ------------------------------------------------------------------


async def until(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``cond`` (sync or async) on the reactor until truthy; fail after ``timeout`` s."""
    deadline = reactor.seconds() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last {value!r})")
        await deferLater(reactor, TICK, lambda: None)


class QuickRandom(random.Random):
    """Backoff waits of 2 % of the full-jitter bound (at most 0.6 s), so tests reconnect fast."""

    def __init__(self) -> None:
        super().__init__(0)

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * 0.02


@implementer(IAgentEndpointFactory)
class _BoundEndpoints:
    def __init__(self, host: str) -> None:
        self.host = host

    def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:  # noqa: N802 - Twisted's name
        return TCP4ClientEndpoint(
            reactor, uri.host.decode(), uri.port, timeout=5, bindAddress=(self.host, 0)
        )


class Visitor:
    """A client of the edge's proxy whose connections leave from ``host`` (a 127.x address)."""

    def __init__(self, base_url: str, host: str) -> None:
        self.base_url = base_url
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent.usingEndpointFactory(reactor, _BoundEndpoints(host), pool=self.pool)

    async def get(self, path: str = "/page") -> tuple[int, Any]:
        d = self.agent.request(b"GET", (self.base_url + path).encode())
        d.addTimeout(5, reactor)
        response = await d
        body = await treq.content(response)
        types = response.headers.getRawHeaders(b"content-type", [])
        if any(t.startswith(b"application/json") for t in types):
            return response.code, json.loads(body)
        return response.code, body


class Admin:
    """A client of the edge's admin listener."""

    def __init__(self, edge: RunningEdge) -> None:
        self.client = Client(edge.admin_url)

    async def get(self, path: str) -> tuple[int, Any]:
        reply = await self.client.get(path, token=None)
        return reply.code, reply.json()

    async def readyz(self) -> tuple[int, str | None]:
        code, doc = await self.get("/readyz")
        return code, doc.get("reason")

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        reply = await self.client.get("/metrics", token=None)
        assert reply.code == 200
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(reply.body.decode()):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    async def metric(self, name: str, **labels: str) -> float:
        values = await self.metrics()
        return values.get((name, tuple(sorted(labels.items()))), 0.0)

    async def close(self) -> None:
        await self.client.close()


def normalised(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The state part of a snapshot (or ``State.view``), each table sorted by key."""
    keys = {"bans": "ip", "allows": "ip", "revoked_tokens": "jti", "revoked_subjects": "sub"}
    return {t: sorted(doc.get(t, []), key=lambda r, k=k: r[k]) for t, k in keys.items()}


def edge_view(state: EdgeState) -> dict[str, list[dict[str, Any]]]:
    return normalised(state.indexes.to_state().view(reactor.seconds()))


class Mirror:
    """The master's state at every offset the test creates, and the edge's at every change."""

    def __init__(self, master_url: str) -> None:
        self.client = Client(master_url)
        self.views: dict[int, dict[str, list[dict[str, Any]]]] = {}
        self.seen: list[tuple[int, dict[str, list[dict[str, Any]]]]] = []
        self.applied_at: dict[int, float] = {}

    async def snapshot(self) -> dict[str, Any]:
        reply = await self.client.get("/v1/snapshot", token=EDGE_TOKEN)
        assert reply.code == 200, reply.body
        doc: dict[str, Any] = reply.json()
        self.views[int(doc["offset"])] = normalised(doc)
        return doc

    async def write(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = await self.client.post(path, body)
        assert reply.code == 201, reply.body
        event: dict[str, Any] = reply.json()["event"]
        doc = await self.snapshot()
        assert int(doc["offset"]) == event["seq"], "someone else wrote to the master"
        return event

    async def ban(self, ip: str, reason: str = "test") -> dict[str, Any]:
        return await self.write("/ban/ip", {"ip": ip, "reason": reason})

    def watch(self, state: EdgeState) -> None:
        def changed(events: Any = ()) -> None:
            self.seen.append((state.offset, edge_view(state)))
            for event in events:
                self.applied_at.setdefault(event.seq, reactor.seconds())

        state.apply_listeners.append(changed)
        state.reset_listeners.append(changed)

    def check(self) -> None:
        """Every state the edge went through is the master's state at the same offset."""
        assert self.seen, "the edge never changed state"
        for offset, view in self.seen:
            assert offset in self.views, f"edge at offset {offset}, never a master offset"
            assert view == self.views[offset], f"edge state at offset {offset} is corrupted"

    async def close(self) -> None:
        await self.client.close()


class Failures:
    """Collects failures logged by edgeauth code (a crashed loop, a failing hook)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self)

    def __call__(self, event: dict[str, Any]) -> None:
        namespace = str(event.get("log_namespace", ""))
        if "log_failure" in event and namespace.startswith("edgeauth"):
            self.events.append(event)

    def check(self) -> None:
        assert not self.events, [
            (e.get("log_namespace"), e.get("log_format"), e["log_failure"].getErrorMessage())
            for e in self.events
        ]

    def close(self) -> None:
        globalLogPublisher.removeObserver(self)


# --- the misbehaving HTTP master ------------------------------------------------------------------

_NOT_COPIED = {
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"content-length",
    b"te",
    b"upgrade",
    b"host",
    b"date",
    b"server",
}


def _kind(request: Request) -> str:
    if request.method == b"HEAD":
        return "head"
    if request.path == b"/v1/snapshot":
        return "snapshot"
    if request.path == b"/v1/stream/events":
        return "sse" if (request.args or {}).get(b"live") == [b"sse"] else "catch_up"
    return "other"


class _Exchange:
    """One request from the edge, and whether the edge is still there to be answered."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.kind = _kind(request)
        self.body = request.content.read() if request.content is not None else b""
        self.gone = False
        request.notifyFinish().addBoth(self._ended)

    def _ended(self, _: object) -> None:
        self.gone = True

    def write(self, data: bytes) -> None:
        if not self.gone:
            self.request.write(data)

    def finish(self) -> None:
        if not self.gone:
            self.gone = True
            self.request.finish()

    def abort(self) -> None:
        """Drop the edge's connection abruptly."""
        if not self.gone:
            self.gone = True
            channel = self.request.channel
            if channel is not None and channel.transport is not None:
                channel.transport.abortConnection()


class _Relay(Protocol):
    """Relays the real master's SSE body to the edge one whole frame at a time."""

    def __init__(self, shim: Shim, ex: _Exchange) -> None:
        self.shim = shim
        self.ex = ex
        self.partial = bytearray()
        self.held: list[bytes] = []
        self.silenced = False
        self.upstream_done = False
        ex.request.notifyFinish().addBoth(lambda _: self.stop())

    def connectionMade(self) -> None:
        self.shim.relays.add(self)
        self.ex.write(b"")  # the head goes out now

    def dataReceived(self, data: bytes) -> None:
        self.partial += data
        while (end := self.partial.find(b"\n\n")) >= 0:
            frame = bytes(self.partial[: end + 2])
            del self.partial[: end + 2]
            self.frame(frame)

    def frame(self, frame: bytes) -> None:
        if self.silenced or self.ex.gone:
            return
        mode = self.shim.mode
        if mode == "stall":
            self.held.append(frame)
        elif mode == "half_frame" and frame.startswith(b"event: data\n"):
            self.ex.write(frame[: len(frame) // 2])
            self.silenced = True
            self.shim.half_frames.append(reactor.seconds())
        else:
            self.ex.write(frame)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.shim.relays.discard(self)
        self.upstream_done = True
        if not self.held and not self.silenced:
            self.ex.finish()  # the master ended the stream (SSE cycling): so does the shim

    def stop(self) -> None:
        """The edge went away: drop the upstream stream too."""
        self.shim.relays.discard(self)
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def recover(self) -> None:
        if self.silenced:
            self.ex.abort()  # the edge holds half a frame; a restarted master drops it
            return
        held, self.held = self.held, []
        for frame in held:
            self.ex.write(frame)
        if self.upstream_done:
            self.ex.finish()


class _SlowBody:
    """Writes a response body a few bytes at a time so that it takes ``seconds`` in all."""

    STEP = 0.05

    def __init__(self, ex: _Exchange, content: bytes, seconds: float) -> None:
        self.ex = ex
        self.content = content
        self.sent = 0
        self.started = reactor.seconds()
        self.per_tick = max(1, int(len(content) * self.STEP / seconds))
        ex.request.setHeader(b"content-length", b"%d" % len(content))
        ex.write(b"")
        self.loop = LoopingCall(self.tick)
        self.loop.clock = reactor
        self.loop.start(self.STEP, now=False)

    @property
    def done(self) -> bool:
        return self.sent >= len(self.content) or self.ex.gone

    def tick(self, size: int | None = None) -> None:
        if self.ex.gone:
            self.stop()
            return
        size = self.per_tick if size is None else size
        piece = self.content[self.sent : self.sent + size]
        self.sent += len(piece)
        self.ex.write(piece)
        if self.sent >= len(self.content):
            self.stop()
            self.ex.finish()

    def hurry(self) -> None:
        if not self.done:
            self.tick(len(self.content))
        self.stop()

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()


def garbage_frames(kind: str, tail: int, template: dict[str, Any]) -> bytes:
    """What a broken master writes on its live stream (``tail``: the edge is at this offset)."""
    if kind == "bad_json":
        return b"event: data\ndata: {not json\n\n"
    if kind == "bad_events":
        return b'event: data\ndata: [{"seq": "seven", "type": "ip_banned", "ip": 5}]\n\n'
    if kind == "bad_control":
        return b'event: control\ndata: {"streamNextOffset": "soon"}\n\n'
    if kind == "endless_line":
        return b"data: " + b"x" * (1 << 20) + b"x"
    forged = dict(template, ip="127.0.0.9/32", reason="forged")
    if kind == "gap":
        forged["seq"] = tail + 5
    elif kind == "forged_replay":
        forged["seq"] = tail  # already applied: a replay must change nothing, whatever it says
    else:
        raise ValueError(kind)
    return b"event: data\ndata: " + json.dumps([forged]).encode() + b"\n\n"


_VOCABULARY = [
    b"event: data\n",
    b"event: control\n",
    b"data: ",
    b"\n",
    b"\n\n",
    b"\r\n",
    b": ping\n\n",
    b"id: 7\n",
    b"retry: 5\n",
    b'{"seq": ',
    b"[",
]


def random_garbage(seed: int) -> Iterator[bytes]:
    """An endless, reproducible stream of SSE-ish noise: field names, line ends, random bytes."""
    rng = random.Random(seed)
    while True:
        piece = bytearray()
        while len(piece) < 256:
            if rng.random() < 0.5:
                piece += rng.choice(_VOCABULARY)
            else:
                piece += rng.randbytes(rng.randint(1, 40))
        yield bytes(piece)


class _GarbageStream:
    """A live stream that answers with garbage after a valid head."""

    def __init__(self, shim: Shim, ex: _Exchange) -> None:
        self.shim = shim
        self.ex = ex
        self.loop: LoopingCall | None = None
        shim.garbage_streams.add(self)
        ex.request.notifyFinish().addBoth(lambda _: self.stop())
        kind = shim.garbage_kind
        if kind == "random":
            self.loop = LoopingCall(lambda: ex.write(next(shim.noise)))
            self.loop.clock = reactor
            self.loop.start(TICK)
        else:
            ex.write(garbage_frames(kind, shim.tail(), shim.template))

    def stop(self) -> None:
        self.shim.garbage_streams.discard(self)
        if self.loop is not None and self.loop.running:
            self.loop.stop()

    def end(self) -> None:
        self.stop()
        self.ex.finish()


class _TrackingSite(Site):
    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.displayTracebacks = False
        self.live: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        live = self.live
        lost = proto.connectionLost

        def connection_lost(reason: Any = None) -> None:
            live.discard(proto)
            lost(reason)

        proto.connectionLost = connection_lost
        live.add(proto)
        return proto


class Shim(Resource):
    """A real HTTP server in front of the real master; it forwards, or misbehaves on demand.

    ``mode``: ``pass`` (forward), ``garbage`` (live streams get :attr:`garbage_kind` garbage),
    ``half_frame`` (the next ``data`` frame of each live stream is cut in half, then silence),
    ``stall`` (requests are accepted and held unanswered, live streams fall silent; HEAD still
    answers, announcing the master's real tail), ``error500``, ``refuse`` (401 to the edge's
    token). ``fake_log_id`` makes every answer claim another log; ``snapshot_seconds`` makes
    snapshots trickle out over that long. :meth:`recover` makes it a faithful proxy again.
    """

    isLeaf = True

    def __init__(
        self, upstream: str, log_id: str, tail: Callable[[], int], template: dict[str, Any]
    ) -> None:
        super().__init__()
        self.upstream = upstream
        self.log_id = log_id
        self.tail = tail
        self.template = template
        self.mode = "pass"
        self.garbage_kind = "bad_json"
        self.head_passes = False  # with error500: HEAD still answers (the tail stays known)
        self.fake_log_id: str | None = None
        self.snapshot_seconds = 0.0
        self.noise = random_garbage(20240601)
        self.hits: list[tuple[str, str]] = []
        self.relays: set[_Relay] = set()
        self.held: list[_Exchange] = []
        self.slow: list[_SlowBody] = []
        self.half_frames: list[float] = []
        self.garbage_streams: set[_GarbageStream] = set()
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent(reactor, pool=self.pool, connectTimeout=5)
        self.site = _TrackingSite(self)
        self.port: IListeningPort | None = None

    async def listen(self) -> Shim:
        self.port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.site)
        return self

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def count(self, kind: str, mode: str | None = None) -> int:
        return sum(1 for k, m in self.hits if k == kind and (mode is None or m == mode))

    # -- answering ---------------------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        ex = _Exchange(request)
        mode = self.mode
        self.hits.append((ex.kind, mode))
        if mode == "refuse":
            request.setHeader(b"www-authenticate", b'Bearer error="invalid_token"')
            return _json(request, 401, {"error": "invalid_token", "detail": "token refused"})
        if mode == "error500" and not (ex.kind == "head" and self.head_passes):
            return _json(request, 500, {"error": "internal", "detail": "the master is broken"})
        if mode == "stall" and ex.kind != "head":
            self.held.append(ex)
            return NOT_DONE_YET
        if mode == "garbage" and ex.kind == "sse":
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"edgeauth-log-id", self.log_id.encode())
            ex.write(b": edgeauth stream\n\n")
            _GarbageStream(self, ex)
            return NOT_DONE_YET
        self.forward(ex)
        return NOT_DONE_YET

    def forward(self, ex: _Exchange) -> None:
        request = ex.request
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _NOT_COPIED:
                headers.setRawHeaders(name, values)
        url = (self.upstream + request.uri.decode()).encode()
        d = self.agent.request(request.method, url, headers)
        d.addCallback(self._answer, ex)
        d.addErrback(lambda f: ex.abort())

    def _answer(self, response: Any, ex: _Exchange) -> None:
        request = ex.request
        if ex.gone:
            response.deliverBody(_Drop())
            return
        request.setResponseCode(response.code)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in _NOT_COPIED:
                request.responseHeaders.setRawHeaders(name, values)
        if self.fake_log_id is not None and response.headers.hasHeader(b"edgeauth-log-id"):
            request.setHeader(b"edgeauth-log-id", self.fake_log_id.encode())
        if ex.kind == "sse" and response.code == 200:
            response.deliverBody(_Relay(self, ex))
            return
        treq.content(response).addCallbacks(
            lambda body: self._body(ex, response, body), lambda f: ex.abort()
        )

    def _body(self, ex: _Exchange, response: Any, content: bytes) -> None:
        if ex.gone:
            return
        code = response.code
        if ex.kind == "snapshot" and code == 200 and self.fake_log_id is not None:
            gzipped = response.headers.getRawHeaders(b"content-encoding") == [b"gzip"]
            doc = json.loads(gzip.decompress(content) if gzipped else content)
            doc["log_id"] = self.fake_log_id
            content = json.dumps(doc).encode()
            if gzipped:
                content = gzip.compress(content)
        if ex.kind == "snapshot" and code == 200 and self.snapshot_seconds:
            self.slow.append(_SlowBody(ex, content, self.snapshot_seconds))
            return
        ex.request.setHeader(b"content-length", b"%d" % len(content))
        ex.write(content)
        ex.finish()

    # -- control -----------------------------------------------------------------------------

    def misbehave(self, mode: str) -> None:
        self.mode = mode
        if mode == "garbage":
            for relay in list(self.relays):  # an open live stream turns to garbage at once
                relay.silenced = True
                relay.stop()
                _GarbageStream(self, relay.ex)

    def cut(self) -> None:
        """Drop every live stream (as a restarting master would), so the edge reconnects."""
        for relay in list(self.relays):
            relay.ex.abort()
            relay.stop()

    def recover(self) -> None:
        """Become a faithful proxy again: answer what was held, hurry slow bodies."""
        self.mode = "pass"
        self.fake_log_id = None
        self.snapshot_seconds = 0.0
        self.head_passes = False
        for slow in self.slow:
            slow.hurry()
        for stream in list(self.garbage_streams):
            stream.end()
        for relay in list(self.relays):
            relay.recover()
        held, self.held = self.held, []
        for ex in held:
            if not ex.gone:
                self.forward(ex)

    async def close(self) -> None:
        for slow in self.slow:
            slow.stop()
        for stream in list(self.garbage_streams):
            stream.stop()
        for relay in list(self.relays):
            relay.stop()
        if self.port is not None:
            await self.port.stopListening()
        for proto in list(self.site.live):
            channel = getattr(proto, "_channel", proto)
            if getattr(channel, "transport", None) is not None:
                channel.transport.abortConnection()
        await self.pool.closeCachedConnections()


class _Drop(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def _json(request: Request, code: int, doc: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(doc).encode()


# --- the TCP forwarder that closes every few bytes --------------------------------------------


class _ChoppyUp(Protocol):
    def __init__(self, down: _ChoppyDown) -> None:
        self.down = down

    def dataReceived(self, data: bytes) -> None:
        self.down.from_master(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.down.master_closed()


class _ChoppyDown(Protocol):
    """The edge's side: the master's bytes go out 7 at a time, one write per reactor turn."""

    def __init__(self, factory: Choppy) -> None:
        self.choppy = factory
        self.up: _ChoppyUp | None = None
        self.budget = factory.next_budget()
        self.sent = 0
        self.out = bytearray()
        self.draining = False
        self.closed = False
        self.upstream_closed = False

    def connectionMade(self) -> None:
        self.choppy.live.add(self)
        self.transport.pauseProducing()  # type: ignore[union-attr]
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.choppy.master_port, timeout=5)
        connectProtocol(endpoint, _ChoppyUp(self)).addCallbacks(self._connected, self._failed)

    def _connected(self, up: _ChoppyUp) -> None:
        self.up = up
        if self.closed:
            up.transport.abortConnection()  # type: ignore[union-attr]
        else:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _failed(self, failure: Failure) -> None:
        self.cut()

    def dataReceived(self, data: bytes) -> None:
        if self.up is not None:
            self.up.transport.write(data)  # type: ignore[union-attr]

    def from_master(self, data: bytes) -> None:
        if self.closed:
            return
        if self.budget is None and not self.out:
            self.transport.write(data)  # type: ignore[union-attr]
            return
        self.out += data
        if not self.draining:
            self.draining = True
            reactor.callLater(0, self._drain)

    def _drain(self) -> None:
        self.draining = False
        if self.closed:
            return
        piece = bytes(self.out[:7])
        del self.out[:7]
        self.transport.write(piece)  # type: ignore[union-attr]
        self.sent += len(piece)
        if self.budget is not None and self.sent >= self.budget:
            self.choppy.cuts += 1
            self.cut()
        elif self.out:
            self.draining = True
            reactor.callLater(0, self._drain)
        elif self.upstream_closed:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def master_closed(self) -> None:
        self.upstream_closed = True
        if not self.out and not self.closed:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def cut(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if self.up is not None and self.up.transport is not None:
            self.up.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        self.choppy.live.discard(self)
        if self.up is not None and self.up.transport is not None:
            self.up.transport.loseConnection()


class Choppy(Factory):
    """A TCP forwarder to the master that, with ``chop``, closes every few bytes.

    Each connection the edge opens gets the master's bytes in 7-byte writes and is closed after
    a seeded random number of them.
    """

    def __init__(self, master_port: int, seed: int) -> None:
        self.master_port = master_port
        self.rng = random.Random(seed)
        self.chop = True
        self.cuts = 0
        self.live: set[_ChoppyDown] = set()
        self.port: IListeningPort | None = None

    def next_budget(self) -> int | None:
        if not self.chop:
            return None
        if self.rng.random() < 0.5:
            return 7 * self.rng.randint(1, 10)  # a few bytes: often not even a status line
        return 7 * self.rng.randint(10, 1000)

    def buildProtocol(self, addr: Any) -> _ChoppyDown:
        return _ChoppyDown(self)

    async def listen(self) -> Choppy:
        self.port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self)
        return self

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"http://127.0.0.1:{self.port.getHost().port}"

    async def close(self) -> None:
        if self.port is not None:
            await self.port.stopListening()
        for down in list(self.live):
            down.cut()


# --- the whole setup ----------------------------------------------------------------------------


class World:
    """A real master with some state, a real origin, a front (Shim or Choppy) and an edge."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.failures = Failures()
        self.master: Any = None
        self.origin: Origin | None = None
        self.front: Shim | Choppy | None = None
        self.edge: RunningEdge | None = None
        self.mirror: Mirror | None = None
        self.admin: Admin | None = None
        self.pre: dict[str, dict[str, Any]] = {}
        self.visitors: list[Visitor] = []

    @property
    def shim(self) -> Shim:
        assert isinstance(self.front, Shim)
        return self.front

    @property
    def state(self) -> EdgeState:
        assert self.edge is not None
        state: EdgeState = self.edge.service.state
        return state

    @property
    def tail(self) -> int:
        return int(self.master.service.log.tail)

    async def start(self, front: str = "shim", *, sync_timeout: float = 10.0, **edge: Any) -> World:
        self.master = await start_master(self.tmp_path, **MASTER_KW)
        self.mirror = Mirror(self.master.url)
        await self.mirror.snapshot()  # offset 0
        self.origin = Origin()
        await self.origin.start()
        self.pre = {
            "host": await self.mirror.ban("127.0.0.2", reason="pre"),
            "net16": await self.mirror.ban("10.9.0.0/16", reason="pre"),
            "allow": await self.mirror.write("/allow/ip", {"ip": "10.9.0.7", "reason": "pre"}),
            "net64": await self.mirror.ban("2001:db8::/64", reason="pre"),
        }
        if front == "shim":
            log_id = self.master.service.log.log_id
            shim = Shim(self.master.url, log_id, lambda: self.tail, self.pre["host"])
            self.front = await shim.listen()
        else:
            self.front = await Choppy(self.master.port, seed=7).listen()
        path = write_edge_ini(self.tmp_path, "edge-r", self.front.url, self.origin.url, edge=edge)
        service = EdgeService(load_settings(str(path), environ=TEST_ENV, role="edge"), reactor)
        service.subscriber.rng = QuickRandom()
        service.subscriber.tail_probe_interval = 0.1
        self.mirror.watch(service.state)
        self.edge = RunningEdge(service)
        service.startService()
        await service.ready
        await until(lambda: service.subscriber.first_sync.called, sync_timeout, "first sync")
        self.admin = Admin(self.edge)
        return self

    def visitor(self, host: str) -> Visitor:
        assert self.edge is not None
        visitor = Visitor(self.edge.url, host)
        self.visitors.append(visitor)
        return visitor

    def refuses(self, ip: str) -> int | None:
        parsed = parse_client_ip(ip)
        assert parsed is not None
        entry = self.state.indexes.check_ip(*parsed, reactor.seconds())
        return None if entry is None else entry.seq

    async def enforcing(self) -> None:
        """The pre-sync state is enforced, through the proxy and in the indexes; no crash."""
        assert self.admin is not None
        code, doc = await self.visitor("127.0.0.2").get("/banned")
        assert (code, doc["error"], doc["ref"]) == (403, "ip_banned", self.pre["host"]["seq"])
        code, body = await self.visitor("127.0.0.1").get("/free")
        assert (code, body) == (200, b"origin says hello /free")
        assert self.refuses("10.9.200.1") == self.pre["net16"]["seq"]
        assert self.refuses("::ffff:10.9.3.4") == self.pre["net16"]["seq"]
        assert self.refuses("10.9.0.7") is None
        assert self.refuses("2001:db8::77") == self.pre["net64"]["seq"]
        assert await self.admin.get("/healthz") == (200, {"status": "ok"})

    async def converged(self) -> bool:
        assert self.mirror is not None
        if self.state.offset != self.tail or self.state.log_id != self.master.service.log.log_id:
            return False
        doc = await self.mirror.snapshot()
        return edge_view(self.state) == normalised(doc)

    async def stop(self) -> None:
        for visitor in self.visitors:
            await visitor.pool.closeCachedConnections()
        if self.admin is not None:
            await self.admin.close()
        if self.edge is not None:
            await self.edge.stop()
        if self.front is not None:
            await self.front.close()
        if self.mirror is not None:
            await self.mirror.close()
        if self.origin is not None:
            await self.origin.stop()
        if self.master is not None:
            await self.master.stop()
        self.failures.close()


async def converge(w: World, timeout: float = 8.0) -> None:
    """The edge ends up with exactly the master's snapshot, and says it is ready."""
    assert w.admin is not None and w.mirror is not None
    await until(w.converged, timeout, "the edge to converge on the master's snapshot")
    await until(lambda: w.state.offset == w.tail, 1.0)
    live = await w.mirror.ban("127.0.0.4", reason="after recovery")
    await until(lambda: w.refuses("127.0.0.4") == live["seq"], 3.0, "a live ban")
    code, doc = await w.visitor("127.0.0.4").get("/late")
    assert (code, doc["ref"]) == (403, live["seq"])
    await until(lambda: scraped(w, "edgeauth_edge_ready", 1.0), 3.0, "the ready gauge")
    assert await w.admin.readyz() == (200, None)
    assert await until(w.converged, 3.0)
    w.mirror.check()
    w.failures.check()


async def scraped(w: World, name: str, value: float) -> bool:
    """Whether a scrape of /metrics alone (no /readyz call) shows ``name`` at ``value``."""
    assert w.admin is not None
    return await w.admin.metric(name) == value


async def at_least(w: World, name: str, value: float, **labels: str) -> bool:
    assert w.admin is not None
    return await w.admin.metric(name, **labels) >= value


# --- 1. misbehaving live streams --------------------------------------------------------------

GARBAGE = ["bad_json", "bad_events", "bad_control", "gap", "endless_line", "random"]


@pytest.mark.parametrize("kind", [*GARBAGE, "forged_replay"])
@pytest_twisted.ensureDeferred
async def test_garbage_on_the_live_stream(tmp_path: Path, kind: str) -> None:
    """Garbage after a valid first sync: 503 unparseable_stream, state intact, then converges.

    Catch-up reads stay valid, so events posted meanwhile are still applied (by offset) while
    every live stream is garbage; nothing the garbage says (a forged ban of 127.0.0.9, a seq far
    ahead) is ever applied. A forged replay of an applied seq parses, changes nothing and keeps
    the stream up: the edge then notices it falls behind the tail the master announces.
    """
    w = await World(tmp_path).start(max_lag=0.5)
    try:
        assert w.admin is not None and w.mirror is not None
        await w.enforcing()
        assert await w.admin.readyz() == (200, None)
        w.shim.garbage_kind = kind
        w.shim.misbehave("garbage")
        if kind in GARBAGE:
            await until(lambda: scraped(w, "edgeauth_edge_ready", 0.0), 5.0, "the ready gauge")
            assert await w.admin.readyz() == (503, "unparseable_stream")
        during = await w.mirror.ban("127.0.0.3", reason="posted while garbage flows")
        if kind in GARBAGE:
            # Each reconnect catches up by offset (valid), then meets garbage again.
            await until(lambda: w.refuses("127.0.0.3") == during["seq"], 5.0, "catch-up")
            await until(lambda: w.shim.count("sse", "garbage") >= 3, 5.0, "live attempts")
            assert await w.admin.readyz() == (503, "unparseable_stream")
            assert await at_least(w, RECONNECTS, 2, reason="protocol")
        else:
            await until(lambda: scraped(w, "edgeauth_edge_ready", 0.0), 5.0, "the ready gauge")
            assert await w.admin.readyz() == (503, "lagging")
            assert w.refuses("127.0.0.3") is None
        await w.enforcing()
        assert w.refuses("127.0.0.9") is None
        code, _ = await w.visitor("127.0.0.9").get("/forged")
        assert code == 200
        w.shim.recover()
        await converge(w)
        assert w.refuses("127.0.0.9") is None
    finally:
        await w.stop()


@pytest_twisted.ensureDeferred
async def test_stall_mid_frame_trips_the_idle_watchdog(tmp_path: Path) -> None:
    """Half an SSE frame then silence: the idle watchdog (2 x ping 0.3 s) reconnects.

    The half frame is never applied; the event arrives whole by catch-up after the reconnect.
    """
    w = await World(tmp_path).start(ping_interval=0.3)
    try:
        assert w.mirror is not None and w.admin is not None
        registry = w.edge.service.metrics.registry  # type: ignore[union-attr]

        def idle() -> float:
            name = "edgeauth_edge_stream_reconnects_total"
            return registry.get_sample_value(name, {"reason": "idle"}) or 0.0

        w.shim.misbehave("half_frame")
        for ip in ("127.0.0.3", "127.0.0.5"):
            halves, idle_before = len(w.shim.half_frames), idle()
            event = await w.mirror.ban(ip, reason="cut in half")
            await until(lambda n=halves: len(w.shim.half_frames) > n, 3.0, "the half frame")
            assert await w.admin.get("/healthz") == (200, {"status": "ok"})
            seq = event["seq"]
            await until(lambda ip=ip, seq=seq: w.refuses(ip) == seq, 5.0, "the event, whole")
            assert idle() > idle_before
            waited = w.mirror.applied_at[event["seq"]] - w.shim.half_frames[halves]
            assert waited >= 0.5, waited  # not before the watchdog (0.6 s) gave up on the stream
        await w.enforcing()
        w.shim.recover()
        await converge(w)
    finally:
        await w.stop()


@pytest_twisted.ensureDeferred
async def test_master_closing_every_few_bytes(tmp_path: Path) -> None:
    """A master link that closes every few bytes, from the first one: the edge still converges.

    Every connection gets the master's bytes 7 at a time and is closed after a seeded random
    budget; the edge bootstraps, follows and converges all the same.
    """
    w = await World(tmp_path).start("choppy", sync_timeout=20.0, ping_interval=0.5)
    try:
        assert w.mirror is not None and w.admin is not None
        choppy = w.front
        assert isinstance(choppy, Choppy)
        await w.enforcing()
        for i in range(12):
            await w.mirror.ban(f"192.0.2.{i}", reason="through a choppy link")
            if i % 3 == 0:
                await w.mirror.write("/unban/ip", {"ip": f"192.0.2.{i}"})
        await until(w.converged, 30.0, "convergence through the choppy link")
        assert choppy.cuts >= 10
        reconnects = w.edge.service.subscriber.status.reconnects  # type: ignore[union-attr]
        assert reconnects >= 5
        await w.enforcing()
        w.mirror.check()
        choppy.chop = False
        for down in list(choppy.live):
            down.cut()
        await converge(w)
    finally:
        await w.stop()


# --- 2. last known good -------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["stall", "error500", "slow_snapshot", "refuse"])
@pytest_twisted.ensureDeferred
async def test_last_known_good(tmp_path: Path, case: str) -> None:
    """After the first sync, nothing the master does changes what the edge enforces.

    /readyz and the metrics say what is wrong; when the master recovers the edge converges.
    """
    w = await World(tmp_path).start(max_lag=0.5, ping_interval=0.5)
    try:
        assert w.admin is not None and w.mirror is not None and w.edge is not None
        await w.enforcing()
        assert await w.admin.metric("edgeauth_edge_ready") == 1.0  # a scrape alone is current
        assert await w.admin.readyz() == (200, None)
        before, offset, log_id = edge_view(w.state), w.state.offset, w.state.log_id
        snapshots = await w.admin.metric("edgeauth_edge_snapshots_applied_total")
        shim = w.shim
        if case == "stall":
            shim.misbehave("stall")
        elif case == "error500":
            shim.misbehave("error500")
            shim.cut()
        elif case == "refuse":
            shim.misbehave("refuse")
            shim.cut()
        else:
            shim.fake_log_id = "f" * 32  # "the master's database was reset": re-bootstrap
            shim.snapshot_seconds = 15.0
            shim.cut()
        during = await w.mirror.ban("127.0.0.3", reason="posted while the master misbehaves")

        if case == "stall":
            await until(lambda: scraped(w, "edgeauth_edge_ready", 0.0), 5.0, "the ready gauge")
            assert await w.admin.readyz() == (503, "lagging")
            assert await w.admin.metric("edgeauth_edge_lag_events") >= 1
            assert await w.admin.metric("edgeauth_edge_lag_seconds") > 0.5
            await until(lambda: shim.held, 3.0, "a request held by the stalled master")
            await until(lambda: w.admin.metric(RECONNECTS, reason="idle"), 3.0, "idle watchdog")
            assert await w.admin.metric("edgeauth_edge_stream_connected") == 0.0
        elif case == "error500":
            await until(lambda: at_least(w, RECONNECTS, 2, reason="protocol"), 5.0, "500s")
            assert await w.admin.metric("edgeauth_edge_stream_connected") == 0.0
            code, status = await w.admin.get("/status")
            assert status["connected"] is False and "500" in status["last_error"]
            # HEAD answers 500 too: the edge cannot know it is behind, and a master outage
            # alone keeps it ready (PROTOCOL.md §6) ...
            assert await w.admin.readyz() == (200, None)
            # ... but once the master announces a tail the edge does not reach: lagging.
            assert await w.admin.metric("edgeauth_edge_ready") == 1.0
            shim.head_passes = True
            await until(lambda: scraped(w, "edgeauth_edge_ready", 0.0), 5.0, "the ready gauge")
            assert await w.admin.readyz() == (503, "lagging")
        elif case == "refuse":
            await until(lambda: scraped(w, "edgeauth_edge_ready", 0.0), 5.0, "the ready gauge")
            assert await w.admin.readyz() == (503, "master_refused")
            await until(lambda: w.admin.metric(RECONNECTS, reason="refused"), 5.0, "refusals")
        else:
            await until(lambda: shim.slow and shim.slow[0].sent > 0, 5.0, "the slow snapshot")
            slow = shim.slow[0]
            await until(lambda: reactor.seconds() - slow.started > 1.5, 3.0)
            assert not slow.done and slow.sent < len(slow.content) / 2  # still in flight
            assert subscriber_module.SNAPSHOT_TIMEOUT > 15.0  # a 15 s snapshot is waited for
            # Re-bootstrapping is not an error: ready, on the old state.
            assert await w.admin.metric("edgeauth_edge_ready") == 1.0
            assert await w.admin.readyz() == (200, None)
            assert await w.admin.metric("edgeauth_edge_snapshots_applied_total") == snapshots
            assert w.state.log_id == log_id

        # Last known good: exactly what was enforced before, through the proxy too.
        assert edge_view(w.state) == before
        assert (w.state.offset, w.state.log_id) == (offset, log_id)
        await w.enforcing()
        assert w.refuses("127.0.0.3") is None
        code, _ = await w.visitor("127.0.0.3").get("/not-yet")
        assert code == 200

        shim.recover()
        await converge(w)
        assert w.refuses("127.0.0.3") == during["seq"]
        if case == "slow_snapshot":
            # The slow snapshot (other log) and then the real log's: two more bootstraps.
            assert await w.admin.metric("edgeauth_edge_snapshots_applied_total") == snapshots + 2
    finally:
        await w.stop()
