"""Test helpers: a real master on 127.0.0.1 port 0, HTTP clients and an SSE reader.

Everything here talks real HTTP over loopback sockets; nothing of our network path is mocked.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer, provider

from edgeauth.config import Settings, load_settings
from edgeauth.master.service import MasterService
from edgeauth.wire.sse import SSEComment, SSEEvent, SSEParser, SSERetry

OPERATOR_TOKEN = "operator-token-for-tests"
EDGE_TOKEN = "edge-token-for-tests"
READER_TOKEN = "reader-token-for-tests"
TEST_ENV = {
    "EDGEAUTH_OPERATOR_TOKEN": OPERATOR_TOKEN,
    "EDGEAUTH_EDGE_TOKEN": EDGE_TOKEN,
    "EDGEAUTH_READER_TOKEN": READER_TOKEN,
}


def write_master_ini(tmp_path: Path, **master: Any) -> Path:
    """Write an ini file for a test master (port 0, database in ``tmp_path``)."""
    values = {
        "listen": "tcp:0:interface=127.0.0.1",
        "database": str(tmp_path / "master.sqlite3"),
        **master,
    }
    lines = ["[master]", *(f"{k} = {v}" for k, v in values.items())]
    lines += [
        "[tokens]",
        "ops = operator env:EDGEAUTH_OPERATOR_TOKEN",
        "edges = edge env:EDGEAUTH_EDGE_TOKEN",
        "viewer = reader env:EDGEAUTH_READER_TOKEN",
    ]
    path = tmp_path / "master.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


def master_settings(tmp_path: Path, **master: Any) -> Settings:
    """Return validated settings for a test master."""
    return load_settings(str(write_master_ini(tmp_path, **master)), environ=TEST_ENV)


@attrs.define
class RunningMaster:
    """A master service started in this process, listening on 127.0.0.1."""

    service: MasterService

    @property
    def url(self) -> str:
        """Base URL of the master."""
        assert self.service.port is not None
        return f"http://127.0.0.1:{self.service.port.getHost().port}"

    @property
    def port(self) -> int:
        """The bound TCP port."""
        assert self.service.port is not None
        return int(self.service.port.getHost().port)

    async def stop(self) -> None:
        """Stop the master (listener, streams, database)."""
        await self.service.stopService()


async def start_master(tmp_path: Path, **master: Any) -> RunningMaster:
    """Start a master with the given ``[master]`` keys and wait until it listens."""
    service = MasterService(master_settings(tmp_path, **master), reactor)
    service.startService()
    await service.ready
    return RunningMaster(service)


def auth(token: str | None = OPERATOR_TOKEN) -> dict[str, str]:
    """Return an Authorization header for ``token`` (none when None)."""
    return {} if token is None else {"Authorization": f"Bearer {token}"}


@attrs.define
class Reply:
    """A fully read HTTP answer."""

    code: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        """Decode the body as JSON."""
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        """Return one response header as text."""
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode() if values else None


class Client:
    """A treq client on a test-owned keep-alive pool."""

    def __init__(self, base_url: str) -> None:
        """Talk to ``base_url``."""
        self.base_url = base_url
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent(reactor, pool=self.pool)
        self.http = treq.client.HTTPClient(self.agent)

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = OPERATOR_TOKEN,
        body: bytes | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Send one request and read the whole answer."""
        all_headers = {**auth(token), **(headers or {})}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        response = await self.http.request(
            method, self.base_url + path, data=body, headers=all_headers
        )
        content = await treq.content(response)
        return Reply(response.code, response.headers, content)

    async def post(self, path: str, json_body: Any, token: str | None = OPERATOR_TOKEN) -> Reply:
        """POST a JSON body."""
        return await self.request("POST", path, json_body=json_body, token=token)

    async def get(self, path: str, token: str | None = OPERATOR_TOKEN, **kw: Any) -> Reply:
        """GET a path."""
        return await self.request("GET", path, token=token, **kw)

    async def close(self) -> None:
        """Close the pooled connections."""
        await self.pool.closeCachedConnections()


SSEItem = SSEEvent | SSEComment | SSERetry


class _SSEProtocol(Protocol):
    def __init__(self, reader: SSEReader) -> None:
        self.reader = reader

    def dataReceived(self, data: bytes) -> None:
        self.reader.raw += data
        self.reader.items.extend(self.reader.parser.feed(data))
        self.reader.check()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reader.ended = True
        self.reader.items.extend(self.reader.parser.feed_eof())
        self.reader.check()


class SSEReader:
    """Reads an SSE response into parsed items; tests wait for conditions on them."""

    def __init__(self) -> None:
        self.parser = SSEParser()
        self.items: list[SSEItem] = []
        self.raw = b""
        self.ended = False
        self.response: IResponse | None = None
        self._waits: list[tuple[Callable[[SSEReader], bool], Deferred[None]]] = []
        self._protocol = _SSEProtocol(self)

    @classmethod
    async def open(
        cls, agent: Agent, url: str, headers: Mapping[str, str] | None = None
    ) -> SSEReader:
        """GET ``url`` and start reading its event stream."""
        reader = cls()
        raw_headers = Headers({k: [v] for k, v in (headers or {}).items()})
        response = await agent.request(b"GET", url.encode(), raw_headers)
        reader.response = response
        response.deliverBody(reader._protocol)
        return reader

    @property
    def events(self) -> list[SSEEvent]:
        """The dispatched events so far."""
        return [i for i in self.items if isinstance(i, SSEEvent)]

    def check(self) -> None:
        """Fire the waits whose condition now holds."""
        for item in list(self._waits):
            condition, d = item
            if self.ended or condition(self):
                self._waits.remove(item)
                d.callback(None)

    async def wait_for(self, condition: Callable[[SSEReader], bool], timeout: float = 5) -> None:
        """Wait until ``condition(self)`` holds (or the stream ends); fail after ``timeout``."""
        if condition(self) or self.ended:
            return
        d: Deferred[None] = Deferred()
        self._waits.append((condition, d))
        d.addTimeout(timeout, reactor)
        await d

    def close(self) -> None:
        """Drop the connection abruptly."""
        transport = getattr(self._protocol, "transport", None)
        if transport is not None:
            transport.stopProducing()


def data_events(reader: SSEReader) -> list[dict[str, Any]]:
    """All events carried by ``event: data`` frames so far, flattened."""
    out: list[dict[str, Any]] = []
    for event in reader.events:
        if event.event == "data":
            out.extend(json.loads(event.data))
    return out


# --- edges and origins ------------------------------------------------------------------------


def write_edge_ini(tmp_path: Path, name: str, masters: str, origin: str, **sections: Any) -> Path:
    """Write an ini file for a test edge (ports 0, database in ``tmp_path``).

    ``sections`` maps a section name to a dict of extra keys, e.g. ``edge={"fail_mode": "closed"}``
    or ``failures={"threshold": 3}``.
    """
    edge = {
        "id": name,
        "listen": "tcp:0:interface=127.0.0.1",
        "admin_listen": "tcp:0:interface=127.0.0.1",
        "origin": origin,
        "masters": masters,
        "token": "env:EDGEAUTH_EDGE_TOKEN",
        "database": str(tmp_path / f"{name}.sqlite3"),
        "ping_interval": 15,
        **sections.pop("edge", {}),
    }
    lines = ["[edge]", *(f"{k} = {v}" for k, v in edge.items())]
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {v}" for k, v in values.items())
    path = tmp_path / f"{name}.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


@attrs.define
class RunningEdge:
    """An edge service started in this process."""

    service: Any

    @property
    def url(self) -> str:
        """Base URL of the proxy listener."""
        return f"http://127.0.0.1:{self.service.port.getHost().port}"

    @property
    def admin_url(self) -> str:
        """Base URL of the admin listener."""
        return f"http://127.0.0.1:{self.service.admin_port.getHost().port}"

    async def stop(self) -> None:
        """Stop the edge (listeners, subscriber, origin pool, database)."""
        await self.service.stopService()


async def start_edge(
    tmp_path: Path, name: str, masters: str, origin: str, *, synced: bool = True, **sections: Any
) -> RunningEdge:
    """Start an edge in this process; with ``synced``, wait for its first sync too."""
    from edgeauth.edge.service import EdgeService

    path = write_edge_ini(tmp_path, name, masters, origin, **sections)
    settings = load_settings(str(path), environ=TEST_ENV, role="edge")
    service = EdgeService(settings, reactor)
    service.startService()
    await service.ready
    if synced:
        d = service.subscriber.first_sync
        waiter: Deferred[None] = Deferred()
        d.addBoth(lambda r: (waiter.callback(None), r)[1])
        waiter.addTimeout(10, reactor)
        await waiter
    return RunningEdge(service)


class Origin:
    """A real twisted.web origin on 127.0.0.1 that records what it receives."""

    def __init__(self) -> None:
        from twisted.web.resource import Resource

        self.requests: list[tuple[bytes, bytes, Headers]] = []
        self.connections = 0
        origin = self

        class Echo(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                origin.requests.append((request.method, request.uri, request.requestHeaders))
                request.setHeader(b"content-type", b"text/plain")
                return b"origin says hello " + request.uri

        self.resource = Echo()
        self.port: Any = None

    async def start(self) -> None:
        """Listen on an ephemeral port."""
        from twisted.internet.endpoints import serverFromString
        from twisted.web.server import Site

        origin = self

        class CountingSite(Site):
            def buildProtocol(self, addr: Any) -> Any:
                origin.connections += 1
                return super().buildProtocol(addr)

        site = CountingSite(self.resource)
        self.port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)

    @property
    def url(self) -> str:
        """Base URL of the origin."""
        return f"http://127.0.0.1:{self.port.getHost().port}"

    async def stop(self) -> None:
        """Stop listening."""
        await self.port.stopListening()


# --- clients bound to a source address, edges with extra environment, waiting ------------------


class _CountingEndpoint:
    """A client endpoint that counts its connection attempts in ``owner.connects``."""

    def __init__(self, endpoint: Any, owner: BoundEndpointFactory) -> None:
        self.endpoint = endpoint
        self.owner = owner

    def connect(self, protocol_factory: Any) -> Deferred[Any]:
        """Open one connection (and count it)."""
        self.owner.connects += 1
        d: Deferred[Any] = self.endpoint.connect(protocol_factory)
        return d


@implementer(IAgentEndpointFactory)
class BoundEndpointFactory:
    """An ``IAgentEndpointFactory`` whose TCP connections leave from ``bind_host``."""

    def __init__(self, bind_host: str) -> None:
        """Bind every client socket to ``bind_host`` (an IPv4 or IPv6 address), any port."""
        self.bind_host = bind_host
        self.connects = 0

    def endpointForURI(self, uri: Any) -> _CountingEndpoint:  # noqa: N802 - Twisted's name
        """Return a TCP endpoint to ``uri`` bound to ``bind_host``."""
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

        host = uri.host.decode("ascii")
        cls = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        endpoint = cls(reactor, host, uri.port, timeout=10, bindAddress=(self.bind_host, 0))
        return _CountingEndpoint(endpoint, self)


class BoundClient(Client):
    """A :class:`Client` whose connections come from ``bind_host`` (e.g. ``127.0.0.2``)."""

    def __init__(self, base_url: str, bind_host: str) -> None:
        """Talk to ``base_url`` from ``bind_host``; ``.endpoints.connects`` counts connections."""
        super().__init__(base_url)
        self.endpoints = BoundEndpointFactory(bind_host)
        self.agent = Agent.usingEndpointFactory(reactor, self.endpoints, pool=self.pool)
        self.http = treq.client.HTTPClient(self.agent)

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = OPERATOR_TOKEN,
        body: bytes | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Send one request with the bare Agent (treq's URL handling breaks on ``[::1]``)."""
        from io import BytesIO

        from twisted.web.client import FileBodyProducer

        all_headers = {**auth(token), **(headers or {})}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        raw = Headers({k.encode(): [v.encode()] for k, v in all_headers.items()})
        producer = None if body is None else FileBodyProducer(BytesIO(body))
        url = (self.base_url + path).encode("ascii")
        response = await self.agent.request(method.encode("ascii"), url, raw, producer)
        content = await treq.content(response)
        return Reply(response.code, response.headers, content)


class EdgeFleet:
    """A master with its operator client (``ops``), edges by name, and a test's clients.

    What the integration fleets share; everything is closed by the exit stack ``stack``.
    """

    def __init__(self, tmp_path: Path, stack: AsyncExitStack) -> None:
        self.tmp_path = tmp_path
        self.stack = stack
        self.edges: dict[str, RunningEdge] = {}
        self.master: RunningMaster
        self.ops: Client

    async def stop_edges(self) -> None:
        """Stop every running edge."""
        for edge in self.edges.values():
            if edge.service.running:
                await edge.stop()

    def client(self, base_url: str, bind_host: str | None = None) -> Client:
        """Return a client (from ``bind_host`` if given) closed at the end of the test."""
        client = Client(base_url) if bind_host is None else BoundClient(base_url, bind_host)
        self.stack.push_async_callback(client.close)
        return client

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send one operator write and return its event (it must be acknowledged with 201)."""
        reply = await self.ops.post(path, body)
        assert reply.code == 201, (path, body, reply.code, reply.body)
        event: dict[str, Any] = reply.json()["event"]
        return event


async def start_edge_env(
    tmp_path: Path,
    name: str,
    masters: str,
    origin: str,
    *,
    environ: Mapping[str, str],
    synced: bool = True,
    **sections: Any,
) -> RunningEdge:
    """Like :func:`start_edge`, with ``environ`` added to :data:`TEST_ENV` (e.g. a JWT secret)."""
    from edgeauth.edge.service import EdgeService

    path = write_edge_ini(tmp_path, name, masters, origin, **sections)
    settings = load_settings(str(path), environ={**TEST_ENV, **environ}, role="edge")
    service = EdgeService(settings, reactor)
    service.startService()
    await service.ready
    if synced:
        waiter: Deferred[None] = Deferred()
        service.subscriber.first_sync.addBoth(lambda r: (waiter.callback(None), r)[1])
        waiter.addTimeout(10, reactor)
        await waiter
    return RunningEdge(service)


async def wait_until(
    condition: Callable[[], Any], what: str, timeout: float = 5.0, interval: float = 0.02
) -> Any:
    """Poll ``condition`` (sync or async) until it returns something truthy; return that.

    Fails the test with ``what`` when ``timeout`` seconds pass first. Polls every ``interval``
    seconds with ``deferLater``: no sleeping.
    """
    import inspect
    import time

    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = condition()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        await deferLater(reactor, interval, lambda: None)


# --- raw stream clients, log capture and master metrics (shared by the master stream tests) ----

STREAM = "/v1/stream/events"


async def open_live_sse(client: Client) -> SSEReader:
    """Open ``GET /v1/stream/events?offset=now&live=sse`` with the edge token through ``client``."""
    return await SSEReader.open(
        client.agent, f"{client.base_url}{STREAM}?offset=now&live=sse", auth(EDGE_TOKEN)
    )


async def post_bans(client: Client, count: int, first: int = 1) -> list[dict[str, Any]]:
    """Post ``count`` bans one after the other; return their events."""
    events = []
    for i in range(first, first + count):
        reply = await client.post("/ban/ip", {"ip": f"198.51.100.{i}", "reason": f"r{i}"})
        assert reply.code == 201, reply.body
        events.append(reply.json()["event"])
    return events


def gauge(master: RunningMaster, kind: str = "sse") -> float:
    """The master's subscriber gauge for ``kind`` (``sse`` or ``poll``)."""
    value = master.service.metrics.registry.get_sample_value(
        "edgeauth_master_subscribers", {"kind": kind}
    )
    assert value is not None
    return float(value)


def counter(master: RunningMaster, name: str) -> float:
    """One unlabelled sample of the master's registry, 0 when it was never set."""
    value = master.service.metrics.registry.get_sample_value(name)
    return 0.0 if value is None else float(value)


@contextmanager
def captured_log() -> Iterator[list[LogEvent]]:
    """Collect every Twisted log event emitted inside the block."""
    events: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)


def assert_no_errors_logged(events: list[LogEvent]) -> None:
    """No failure, unhandled error or finish-after-disconnect warning was logged."""
    for event in events:
        text = formatEvent(event) or ""
        assert "log_failure" not in event, (text, event.get("log_failure"))
        assert "Unhandled Error" not in text, text
        lowered = text.lower()
        if "finish" in lowered:
            assert "connection lost" not in lowered, text
            assert "connection was lost" not in lowered, text
            assert "after the request" not in lowered, text


def sse_request(token: str, query: str = "offset=now&live=sse") -> bytes:
    """A raw HTTP/1.1 GET of the event stream with ``token``, as a bare TCP client sends it."""
    return (
        f"GET {STREAM}?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()


class RawStream(Protocol):
    """A bare TCP client that sends one GET and counts what comes back (or reads nothing)."""

    def __init__(self, request: bytes, read: bool = True) -> None:
        self.request = request
        self.read = read
        self.received = bytearray()
        self.first_data: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.keep = read  # the 1,000-connection test keeps no bytes, only a count
        self.count = 0

    def connectionMade(self) -> None:
        self.transport.write(self.request)
        if not self.read:
            self.transport.pauseProducing()  # never read: the kernel buffers fill up

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.keep:
            self.received += data
        if not self.first_data.called:
            self.first_data.callback(None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.lost.called:
            self.lost.callback(None)


RawStreamT = TypeVar("RawStreamT", bound=RawStream)


async def connect_raw(master: RunningMaster, protocol: RawStreamT) -> RawStreamT:
    """Connect ``protocol`` to ``master`` over plain TCP on loopback; return it once connected."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", master.port)
    await connectProtocol(endpoint, protocol)
    return protocol
