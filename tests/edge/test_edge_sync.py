"""End-to-end sync of an in-process edge (EdgeState + Subscriber) with real masters over HTTP.

Masters are real ``MasterService`` instances on 127.0.0.1 port 0. The misbehaving masters of the
readiness tests are small real ``twisted.web`` servers that serve answers copied from a real master
and then misbehave on the live stream.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support import EDGE_TOKEN, Client, RunningMaster, start_master
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall, deferLater
from twisted.protocols import portforward
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from edgeauth.edge.admin import AdminResource
from edgeauth.edge.index import parse_client_ip
from edgeauth.edge.metrics import EdgeMetrics
from edgeauth.edge.state import EdgeState
from edgeauth.edge.store import EdgeStore
from edgeauth.edge.subscriber import Subscriber
from edgeauth.wire.offsets import format_offset

EDGE_ID = "edge-t"


# --- helpers -------------------------------------------------------------------------------


async def until(cond: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    """Wait on the reactor until ``cond()`` is true; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not cond():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


class QuickRandom(random.Random):
    """Backoff waits of 2 % of the full-jitter bound (at most 0.6 s), so tests reconnect fast."""

    def __init__(self) -> None:
        super().__init__(0)
        self.bounds: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        self.bounds.append(b)
        return a + (b - a) * 0.02


class EdgeRig:
    """The edge's sync side, built in-process: EdgeStore, EdgeState and Subscriber."""

    def __init__(
        self,
        tmp_path: Path,
        masters: list[str],
        *,
        token: str | None = EDGE_TOKEN,
        mode: str = "sse",
        ping_interval: float = 15.0,
        tail_probe_interval: float = 5.0,
        rng: random.Random | None = None,
        filename: str = "edge.sqlite3",
    ) -> None:
        self.path = str(tmp_path / filename)
        self.masters = masters
        self.token = token
        self.mode = mode
        self.ping_interval = ping_interval
        self.tail_probe_interval = tail_probe_interval
        self.rng = rng
        self.metrics = EdgeMetrics()
        self.store: EdgeStore | None = None
        self.state: EdgeState | None = None
        self.sub: Subscriber | None = None

    async def load(self) -> EdgeState:
        """Open the file and load the state (no network)."""
        self.store = EdgeStore(self.path, reactor)
        self.state = EdgeState(self.store, reactor, EDGE_ID)
        await self.state.load()
        return self.state

    async def start(self, *, sync: bool = True, timeout: float = 10.0) -> Subscriber:
        """Load (if needed), start the subscriber and, with ``sync``, wait for the first sync."""
        if self.state is None:
            await self.load()
        assert self.state is not None
        self.sub = Subscriber(
            reactor,
            self.state,
            self.masters,
            self.token,
            EDGE_ID,
            self.metrics,
            mode=self.mode,
            ping_interval=self.ping_interval,
            tail_probe_interval=self.tail_probe_interval,
            rng=self.rng,
        )
        self.sub.start()
        if sync:
            sub = self.sub
            await until(lambda: sub.first_sync.called, timeout, "first sync")
        return self.sub

    async def __aenter__(self) -> EdgeRig:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self.sub is not None:
            await self.sub.stop()
            self.sub = None
        if self.store is not None:
            await self.store.close()
            self.store = None

    def refuses(self, ip: str) -> int | None:
        """The seq of the ban refusing ``ip`` now, or None when it is served."""
        assert self.state is not None
        parsed = parse_client_ip(ip)
        assert parsed is not None, ip
        entry = self.state.indexes.check_ip(*parsed, reactor.seconds())
        return None if entry is None else entry.seq

    def view(self) -> dict[str, list[dict[str, Any]]]:
        assert self.state is not None
        return normalised(self.state.indexes.to_state().view(reactor.seconds()))

    def snapshots(self) -> float:
        return float(self.metrics.snapshots._value.get())

    def reconnects(self, reason: str) -> float:
        return float(self.metrics.reconnects.labels(reason=reason)._value.get())

    def reconnects_by_reason(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for family in self.metrics.reconnects.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.value:
                    out[sample.labels["reason"]] = sample.value
        return out


def subdir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def normalised(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The state part of a snapshot (or ``State.view``), each table sorted by key."""
    keys = {"bans": "ip", "allows": "ip", "revoked_tokens": "jti", "revoked_subjects": "sub"}
    return {t: sorted(doc.get(t, []), key=lambda r, k=k: r[k]) for t, k in keys.items()}


async def master_snapshot(master: RunningMaster) -> dict[str, Any]:
    client = Client(master.url)
    try:
        reply = await client.get("/v1/snapshot", token=EDGE_TOKEN)
        assert reply.code == 200, reply.body
        doc: dict[str, Any] = reply.json()
        return doc
    finally:
        await client.close()


async def master_view(master: RunningMaster) -> dict[str, list[dict[str, Any]]]:
    return normalised(await master_snapshot(master))


def tail(master: RunningMaster) -> int:
    return int(master.service.log.tail)


def master_requests(master: RunningMaster, mode: str, status: int) -> float:
    counter = master.service.metrics.stream_requests.labels(mode=mode, status=str(status))
    return float(counter._value.get())


class Ops:
    """The operator's client of one master."""

    def __init__(self, master: RunningMaster) -> None:
        self.client = Client(master.url)

    async def write(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = await self.client.post(path, body)
        assert reply.code == 201, reply.body
        event: dict[str, Any] = reply.json()["event"]
        return event

    async def ban(self, ip: str, **kw: Any) -> dict[str, Any]:
        return await self.write("/ban/ip", {"ip": ip, **kw})

    async def close(self) -> None:
        await self.client.close()


@asynccontextmanager
async def master_and_ops(path: Path, **master: Any) -> AsyncIterator[tuple[RunningMaster, Ops]]:
    """A master started in ``path`` and the operator's client of it; both closed on the way out."""
    master_ = await start_master(path, **master)
    ops = Ops(master_)
    try:
        yield master_, ops
    finally:
        await ops.close()
        await master_.stop()


async def listen(resource: Resource) -> IListeningPort:
    site = Site(resource)
    port: IListeningPort = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
    return port


def url_of(port: IListeningPort) -> str:
    return f"http://127.0.0.1:{port.getHost().port}"


class _Forwarded(portforward.ProxyServer):
    def connectionMade(self) -> None:
        self.factory.live.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.live.discard(self)
        super().connectionLost(reason)


class Link(portforward.ProxyFactory):
    """A real TCP forwarder between the edge and a master, to cut the network between them.

    (Stopping a MasterService in-process leaves its keep-alive connections served, so an outage
    is made here: the edge's connections are aborted and new ones refused.)
    """

    protocol = _Forwarded

    def __init__(self, master: RunningMaster) -> None:
        super().__init__("127.0.0.1", master.port)
        self.live: set[_Forwarded] = set()
        self.listening: IListeningPort | None = None
        self.number = 0

    async def up(self) -> Link:
        where = f"tcp:{self.number}:interface=127.0.0.1"
        self.listening = await serverFromString(reactor, where).listen(self)
        self.number = self.listening.getHost().port
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.number}"

    def cut(self) -> None:
        """Abort every forwarded connection (the edge sees its connections reset)."""
        for proto in list(self.live):
            proto.transport.abortConnection()

    async def down(self) -> None:
        """An outage: refuse new connections and abort the open ones."""
        if self.listening is not None:
            await self.listening.stopListening()
            self.listening = None
        self.cut()


async def post_state(ops: Ops) -> dict[str, dict[str, Any]]:
    """Write a little of everything; return the events by name."""
    now = reactor.seconds()
    events = {
        "host": await ops.ban("198.51.100.7", reason="abuse"),
        "net24": await ops.ban("203.0.113.0/24", reason="scanner", ttl=3600),
        "net64": await ops.ban("2001:db8:1:2::/64", reason="v6 scanner"),
        "gone": await ops.ban("192.0.2.99", reason="short-lived"),
        "allow": await ops.write("/allow/ip", {"ip": "203.0.113.5", "reason": "partner"}),
        "jti": await ops.write("/revoke/token", {"jti": "jti-1", "expires_at": now + 3600}),
        "sub": await ops.write("/revoke/subject", {"sub": "alice"}),
        "inval": await ops.write("/invalidate", {"tags": ["t1"]}),
    }
    events["unban"] = await ops.write("/unban/ip", {"ip": "192.0.2.99"})
    return events


# --- 1, 2: bootstrap, then live -----------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "master_kw", "live_mode"),
    [
        pytest.param("sse", {}, "sse", id="sse"),
        pytest.param("long-poll", {"long_poll_timeout": 0.5}, "long_poll", id="long-poll"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bootstrap_then_live(
    tmp_path: Path, mode: str, master_kw: dict[str, Any], live_mode: str
) -> None:
    """State posted before start is there after first sync; live bans/unbans arrive within 1 s."""
    async with (
        master_and_ops(tmp_path, **master_kw) as (master, ops),
        EdgeRig(tmp_path, [master.url], mode=mode) as edge,
    ):
        posted = await post_state(ops)
        sub = await edge.start()
        assert edge.snapshots() == 1
        assert edge.view() == await master_view(master)
        assert edge.state is not None and edge.state.offset == tail(master)
        assert edge.state.log_id == master.service.log.log_id
        assert edge.refuses("198.51.100.7") == posted["host"]["seq"]
        assert edge.refuses("192.0.2.99") is None  # banned, then unbanned, before the snapshot

        if mode == "long-poll":
            # Let at least one long-poll time out empty (204) before the live ban.
            await until(lambda: master_requests(master, "long_poll", 204) >= 1, 3.0, "a 204")

        live = await ops.ban("192.0.2.50", reason="live")
        started = reactor.seconds()
        await until(lambda: edge.refuses("192.0.2.50") == live["seq"], 1.0, "the live ban")
        assert reactor.seconds() - started < 1.0
        await ops.write("/unban/ip", {"ip": "192.0.2.50"})
        await until(lambda: edge.refuses("192.0.2.50") is None, 1.0, "the live unban")

        # Networks match the addresses inside them; the allow inside the /24 beats the ban.
        assert edge.refuses("203.0.113.77") == posted["net24"]["seq"]
        assert edge.refuses("203.0.113.0") == posted["net24"]["seq"]
        assert edge.refuses("203.0.113.255") == posted["net24"]["seq"]
        assert edge.refuses("::ffff:203.0.113.77") == posted["net24"]["seq"]
        assert edge.refuses("203.0.113.5") is None
        assert edge.refuses("203.0.114.1") is None
        assert edge.refuses("2001:db8:1:2::abcd") == posted["net64"]["seq"]
        assert edge.refuses("2001:db8:1:2:ffff:ffff:ffff:ffff") == posted["net64"]["seq"]
        assert edge.refuses("2001:db8:1:3::1") is None
        assert edge.state.indexes.revocations.is_revoked("jti-1", None, None, reactor.seconds())

        # Everything came over the live stream of the chosen mode: no reconnect, no new snapshot.
        await until(lambda: edge.state is not None and edge.state.offset == tail(master))
        assert edge.view() == await master_view(master)
        assert edge.snapshots() == 1
        assert sub.status.reconnects == 0
        assert master_requests(master, live_mode, 200) >= 1
        other = "sse" if live_mode == "long_poll" else "long_poll"
        assert master_requests(master, other, 200) == 0


# --- 3: last known good and catch-up from the stored offset --------------------------------


@pytest_twisted.ensureDeferred
async def test_restart_loads_file_then_catches_up_from_offset(tmp_path: Path) -> None:
    """A restarted edge enforces its file before any network, then catches up without a snapshot."""
    master = await start_master(tmp_path)
    old_url = master.url
    ops = Ops(master)
    edge = EdgeRig(tmp_path, [old_url])
    try:
        first = await ops.ban("198.51.100.7", reason="before")
        await edge.start()
        live = await ops.ban("203.0.113.0/24", reason="live")
        await until(lambda: edge.refuses("203.0.113.9") == live["seq"], 2.0, "live ban")
        offset, log_id = edge.state.offset, edge.state.log_id  # type: ignore[union-attr]
        await edge.stop()
    finally:
        await ops.close()
        await master.stop()

    # No master at all: the file alone is enforced (last known good).
    edge = EdgeRig(tmp_path, [old_url])
    state = await edge.load()
    try:
        assert (state.log_id, state.offset, state.synced) == (log_id, offset, True)
        assert edge.refuses("198.51.100.7") == first["seq"]
        assert edge.refuses("203.0.113.9") == live["seq"]

        # The same master database, on a new port.
        master = await start_master(tmp_path)
        ops = Ops(master)
        assert master.service.log.log_id == log_id
        more = [await ops.ban(f"192.0.2.{i}", reason="while away") for i in range(1, 4)]
        await ops.write("/unban/ip", {"ip": "198.51.100.7"})
        edge.masters = [master.url]
        await edge.start()
        await until(lambda: state.offset == tail(master), 3.0, "catch-up")
        assert edge.snapshots() == 0
        assert master_requests(master, "snapshot", 200) == 0
        assert master_requests(master, "catch_up", 200) >= 1
        assert edge.view() == await master_view(master)
        assert [edge.refuses(f"192.0.2.{i}") for i in range(1, 4)] == [e["seq"] for e in more]
        assert edge.refuses("198.51.100.7") is None
    finally:
        await edge.stop()
        await ops.close()
        await master.stop()


# --- 4: another log id ---------------------------------------------------------------------


@pytest.mark.parametrize("new_events", [2, 12], ids=["new-log-shorter", "new-log-longer"])
@pytest_twisted.ensureDeferred
async def test_new_log_id_rebootstraps(tmp_path: Path, new_events: int) -> None:
    """Pointed at a master with another log, the edge re-bootstraps and mirrors the new master."""
    async with (
        master_and_ops(subdir(tmp_path, "a")) as (old_master, ops),
        EdgeRig(tmp_path, [old_master.url]) as edge,
    ):
        for i in range(6):
            await ops.ban(f"198.51.100.{i}", reason="old log")
        await edge.start()
        old_offset = edge.state.offset  # type: ignore[union-attr]
        assert old_offset == 6

    async with (
        master_and_ops(subdir(tmp_path, "b")) as (new_master, ops),
        EdgeRig(tmp_path, [new_master.url], rng=QuickRandom()) as edge,
    ):
        assert new_master.service.log.log_id != old_master.service.log.log_id
        for i in range(new_events):
            await ops.ban(f"192.0.2.{i}", reason="new log")
        state = await edge.load()
        assert state.offset == old_offset
        await edge.start()
        new_id = new_master.service.log.log_id
        await until(
            lambda: state.log_id == new_id and state.offset == tail(new_master), 5.0, "rebootstrap"
        )
        assert edge.snapshots() == 1
        assert edge.view() == await master_view(new_master)
        assert edge.refuses("198.51.100.1") is None
        assert edge.refuses("192.0.2.1") is not None


# --- 5: 410 ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_expired_offset_rebootstraps(tmp_path: Path) -> None:
    """Once retention removed the edge's offset, catch-up gets 410 and the edge re-bootstraps."""
    async with master_and_ops(tmp_path, retention_events=5) as (master, ops):
        async with EdgeRig(tmp_path, [master.url], rng=QuickRandom()) as edge:
            for i in range(3):
                await ops.ban(f"198.51.100.{i}", reason="early")
            await edge.start()
            assert edge.state is not None and edge.state.offset == 3

        await ops.write("/unban/ip", {"ip": "198.51.100.0"})
        for i in range(9):
            await ops.ban(f"192.0.2.{i}", reason="late")
        await master.service._compact()
        assert master.service.log.earliest > 4

        async with EdgeRig(tmp_path, [master.url], rng=QuickRandom()) as edge:
            state = await edge.load()
            assert state.offset == 3
            assert edge.refuses("198.51.100.0") is not None  # the file, before any network
            await edge.start()
            await until(lambda: state.offset == tail(master), 5.0, "rebootstrap")
            assert master_requests(master, "catch_up", 410) >= 1
            assert edge.snapshots() == 1
            assert edge.view() == await master_view(master)
            assert edge.refuses("198.51.100.0") is None
            assert edge.refuses("198.51.100.1") is not None
            assert edge.refuses("192.0.2.8") is not None


# --- 6: failover -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_failover_to_second_master(tmp_path: Path) -> None:
    """With the first master refusing connections the edge syncs from the second."""
    async with (
        master_and_ops(tmp_path) as (master, ops),
        EdgeRig(tmp_path, ["http://127.0.0.1:1", master.url]) as edge,
    ):
        banned = await ops.ban("198.51.100.7")
        sub = await edge.start()
        assert sub.status.master == master.url
        assert edge.reconnects("error") >= 1
        assert edge.refuses("198.51.100.7") == banned["seq"]
        live = await ops.ban("198.51.100.8")
        await until(lambda: edge.refuses("198.51.100.8") == live["seq"], 1.0, "live ban")


# --- 7: idle watchdog ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_idle_watchdog_reconnects(tmp_path: Path) -> None:
    """With no byte for two ping intervals the edge reconnects (reason idle) and stays in sync."""
    async with (
        master_and_ops(tmp_path, ping_interval=30) as (master, ops),
        EdgeRig(tmp_path, [master.url], ping_interval=0.2) as edge,
    ):
        sub = await edge.start()
        await until(lambda: edge.reconnects("idle") >= 1, 3.0, "an idle reconnect")
        live = await ops.ban("198.51.100.9", reason="after idle")
        await until(lambda: edge.refuses("198.51.100.9") == live["seq"], 5.0, "ban after idle")
        # Each reconnect is counted once, under one reason.
        by_reason = edge.reconnects_by_reason()
        assert sum(by_reason.values()) == sub.status.reconnects, by_reason
        assert set(by_reason) == {"idle"}, by_reason


# --- 8: SSE cycling --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sse_cycling_misses_nothing(tmp_path: Path) -> None:
    """A master cycling SSE every 0.5 s: the edge reconnects at once and gets all 20 bans once."""
    rng = QuickRandom()
    applied: list[int] = []
    async with (
        master_and_ops(tmp_path, sse_cycle=0.5) as (master, ops),
        EdgeRig(tmp_path, [master.url], rng=rng) as edge,
    ):
        await ops.ban("198.51.100.1")
        state = await edge.load()
        state.apply_listeners.append(lambda events: applied.extend(e.seq for e in events))
        await edge.start()
        start_offset = state.offset
        seqs = []
        for i in range(20):
            seqs.append((await ops.ban(f"192.0.2.{i}", reason="cycling"))["seq"])
            await deferLater(reactor, 0.1, lambda: None)  # pace the bans across cycles
        await until(lambda: state.offset == seqs[-1], 3.0, "all 20 bans")
        assert applied == list(range(start_offset + 1, seqs[-1] + 1))
        assert all(edge.refuses(f"192.0.2.{i}") == seqs[i] for i in range(20))
        assert edge.reconnects("server_closed") >= 3
        assert set(edge.reconnects_by_reason()) == {"server_closed"}
        assert master.service.metrics.sse_cycled._value.get() >= 3
        # "At once": no backoff wait was drawn for a server cycle.
        assert rng.bounds == []
        assert edge.snapshots() == 1


# --- 9: readiness and the admin listener ---------------------------------------------------


class Admin:
    """The edge's real admin listener, and a client for it."""

    def __init__(self, edge: EdgeRig, max_lag: float) -> None:
        assert edge.state is not None and edge.sub is not None
        self.resource = AdminResource(edge.state, edge.sub, edge.metrics, reactor, max_lag=max_lag)
        self.port: IListeningPort | None = None
        self.client: Client | None = None

    async def start(self) -> Admin:
        self.port = await listen(self.resource)
        self.client = Client(url_of(self.port))
        return self

    async def get(self, path: str) -> tuple[int, Any]:
        assert self.client is not None
        reply = await self.client.get(path, token=None)
        return reply.code, reply.json()

    async def readyz(self) -> tuple[int, str | None]:
        code, doc = await self.get("/readyz")
        return code, doc.get("reason")

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.port is not None:
            await self.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_ready_status_explain_and_outage(tmp_path: Path) -> None:
    """Synced edge: /readyz 200, /status and /explain right; a master outage keeps it ready."""
    master = await start_master(tmp_path)
    ops = Ops(master)
    link = await Link(master).up()
    edge = EdgeRig(tmp_path, [link.url], tail_probe_interval=0.1, rng=QuickRandom())
    admin: Admin | None = None
    try:
        posted = await post_state(ops)
        sub = await edge.start()
        admin = await Admin(edge, max_lag=0.5).start()
        assert sub.readiness(0.5) == (True, "ok")
        assert await admin.readyz() == (200, None)
        assert await admin.get("/healthz") == (200, {"status": "ok"})

        code, status = await admin.get("/status")
        assert code == 200
        assert status["log_id"] == master.service.log.log_id
        assert status["offset"] == format_offset(tail(master))
        assert status["synced"] is True and status["ready"] is True
        assert status["connected"] is True and status["master"] == link.url
        assert status["counts"] == {
            "bans": 3,
            "allows": 1,
            "revoked_tokens": 1,
            "revoked_subjects": 1,
        }
        await until(lambda: sub.status.announced_tail == tail(master), 2.0, "a tail probe")
        code, status = await admin.get("/status")
        assert status["lag_events"] == 0 and status["master_tail"] == format_offset(tail(master))

        net24 = posted["net24"]
        code, explain = await admin.get("/explain?ip=203.0.113.77")
        assert code == 200
        assert explain["verdict"] == "refused" and explain["ref"] == net24["seq"]
        assert explain["allows"] == []
        (entry,) = explain["bans"]
        assert entry["ip"] == "203.0.113.0/24" and entry["kind"] == "ban"
        assert entry["seq"] == net24["seq"]
        assert entry["source"] == net24["source"] and entry["source"].startswith("operator:")
        assert entry["reason"] == "scanner"
        assert entry["expires_at"] == net24["expires_at"] and entry["expires_at"] is not None
        code, explain = await admin.get("/explain?ip=203.0.113.5")
        assert explain["verdict"] == "served" and explain["ref"] is None
        assert [a["ip"] for a in explain["allows"]] == ["203.0.113.5/32"]
        assert [b["seq"] for b in explain["bans"]] == [net24["seq"]]
        code, explain = await admin.get("/explain?ip=2001:db8:1:2::1")
        assert explain["ref"] == posted["net64"]["seq"]
        code, explain = await admin.get("/explain?ip=192.0.2.1")
        assert (explain["verdict"], explain["bans"], explain["allows"]) == ("served", [], [])
        assert (await admin.get("/explain?ip=not-an-ip"))[0] == 400

        # The master goes away: the edge notices, stays ready and keeps enforcing.
        await link.down()
        during = await ops.ban("192.0.2.77", reason="during the outage")
        await until(
            lambda: not sub.status.connected and sub.status.last_error is not None,
            5.0,
            "the edge to notice the outage",
        )
        await until(lambda: edge.reconnects("error") >= 2, 5.0, "failed reconnects")
        assert sub.readiness(0.5) == (True, "ok")
        assert await admin.readyz() == (200, None)
        assert edge.refuses("203.0.113.77") == net24["seq"]
        code, explain = await admin.get("/explain?ip=198.51.100.7")
        assert explain["ref"] == posted["host"]["seq"]
        code, status = await admin.get("/status")
        assert status["connected"] is False and status["ready"] is True
        assert edge.refuses("192.0.2.77") is None

        # Back: the edge catches up what it missed.
        await link.up()
        await until(lambda: edge.refuses("192.0.2.77") == during["seq"], 5.0, "catch-up")
        assert edge.snapshots() == 1
        assert await admin.readyz() == (200, None)
    finally:
        await link.down()
        if admin is not None:
            await admin.stop()
        await edge.stop()
        await ops.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_wrong_token_never_synced(tmp_path: Path) -> None:
    """An edge whose token the master refuses never syncs: /readyz 503 not_synced."""
    master = await start_master(tmp_path)
    edge = EdgeRig(tmp_path, [master.url], token="not-the-edge-token", rng=QuickRandom())
    admin: Admin | None = None
    try:
        sub = await edge.start(sync=False)
        admin = await Admin(edge, max_lag=5).start()
        await until(lambda: edge.reconnects("refused") >= 2, 5.0, "refusals")
        assert sub.status.refused
        assert not sub.first_sync.called
        ready, reason = sub.readiness(5)
        assert not ready and reason.startswith("not_synced")
        assert await admin.readyz() == (503, "not_synced")
        code, status = await admin.get("/status")
        assert status["synced"] is False and status["log_id"] is None
        assert "refused" in status["last_error"]
    finally:
        if admin is not None:
            await admin.stop()
        await edge.stop()
        await master.stop()


def _rotate_token(sub: Subscriber, token: str) -> None:
    sub.headers.setRawHeaders(b"Authorization", [f"Bearer {token}".encode()])


@pytest_twisted.ensureDeferred
async def test_token_refused_on_reconnect_after_sync(tmp_path: Path) -> None:
    """Synced, then refused on reconnect: 503 master_refused, still enforcing; recovers after."""
    master = await start_master(tmp_path)
    ops = Ops(master)
    link = await Link(master).up()
    # No tail probe: the stream loop itself must notice the refusal.
    edge = EdgeRig(tmp_path, [link.url], tail_probe_interval=3600, rng=QuickRandom())
    admin: Admin | None = None
    try:
        banned = await ops.ban("198.51.100.7")
        sub = await edge.start()
        admin = await Admin(edge, max_lag=5).start()
        assert await admin.readyz() == (200, None)
        _rotate_token(sub, "rotated-away")
        link.cut()  # the edge must reconnect, now with a token the master refuses
        await until(lambda: sub.status.refused, 5.0, "the refusal")
        assert edge.reconnects("refused") >= 1
        ready, reason = sub.readiness(5)
        assert not ready and reason.startswith("master_refused")
        assert await admin.readyz() == (503, "master_refused")
        assert edge.refuses("198.51.100.7") == banned["seq"]  # last known good

        _rotate_token(sub, EDGE_TOKEN)
        await until(lambda: sub.readiness(5) == (True, "ok"), 5.0, "recovery")
        assert await admin.readyz() == (200, None)
        live = await ops.ban("198.51.100.8")
        await until(lambda: edge.refuses("198.51.100.8") == live["seq"], 2.0, "live ban")
    finally:
        await link.down()
        if admin is not None:
            await admin.stop()
        await edge.stop()
        await ops.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_token_refused_by_tail_probe_while_stream_stays_up(tmp_path: Path) -> None:
    """The tail probe's 401 makes the edge not ready even while its stream stays connected."""
    async with (
        master_and_ops(tmp_path) as (master, ops),
        EdgeRig(tmp_path, [master.url], tail_probe_interval=0.1) as edge,
    ):
        admin: Admin | None = None
        try:
            banned = await ops.ban("198.51.100.7")
            sub = await edge.start()
            admin = await Admin(edge, max_lag=5).start()
            _rotate_token(sub, "rotated-away")
            await until(lambda: sub.status.refused, 2.0, "the probe's refusal")
            assert sub.status.connected and sub.status.reconnects == 0
            assert await admin.readyz() == (503, "master_refused")
            assert edge.refuses("198.51.100.7") == banned["seq"]
            # The old stream still delivers; the edge still applies (and enforces) what it gets.
            live = await ops.ban("198.51.100.8")
            await until(lambda: edge.refuses("198.51.100.8") == live["seq"], 1.0, "live ban")
            _rotate_token(sub, EDGE_TOKEN)
            await until(lambda: not sub.status.refused, 2.0, "the probe's acceptance")
            assert await admin.readyz() == (200, None)
        finally:
            if admin is not None:
                await admin.stop()


class CopiedAnswers:
    """A real master's snapshot and catch-up answers, to be served again by a fake master."""

    def __init__(self, log_id: str, offset: str, snapshot: bytes, catch_up: bytes) -> None:
        self.log_id = log_id
        self.offset = offset
        self.snapshot = snapshot
        self.catch_up = catch_up
        self.catch_up_headers: dict[bytes, bytes] = {}

    @classmethod
    async def take(cls, tmp_path: Path) -> tuple[CopiedAnswers, dict[str, Any]]:
        master = await start_master(tmp_path)
        ops = Ops(master)
        client = Client(master.url)
        try:
            banned = await ops.ban("198.51.100.7", reason="copied")
            snap = await client.get("/v1/snapshot", token=EDGE_TOKEN)
            offset = snap.json()["offset"]
            catch = await client.get(f"/v1/stream/events?offset={offset}", token=EDGE_TOKEN)
            assert catch.code == 200 and catch.header("Stream-Up-To-Date") == "true"
            log_id = snap.header("Edgeauth-Log-Id")
            assert log_id is not None
            answers = cls(log_id, offset, snap.body, catch.body)
            for name in ("Content-Type", "Stream-Next-Offset", "Stream-Up-To-Date", "ETag"):
                value = catch.header(name)
                assert value is not None, name
                answers.catch_up_headers[name.encode()] = value.encode()
            return answers, banned
        finally:
            await client.close()
            await ops.close()
            await master.stop()


class FakeMaster(Resource):
    """A real HTTP server: snapshot, catch-up and HEAD as the master answered, then a bad live SSE.

    ``garbage`` sends an unparseable data frame and keeps the connection open; ``stalled`` sends
    only pings while HEAD announces a tail far ahead.
    """

    isLeaf = True

    def __init__(self, answers: CopiedAnswers, behaviour: str, ahead: int = 100) -> None:
        super().__init__()
        self.answers = answers
        self.behaviour = behaviour
        self.ahead = ahead
        self.sse_requests: list[tuple[bool, str]] = []
        self.open_streams: list[Request] = []
        self.on_sse: Callable[[], tuple[bool, str]] | None = None
        self._pingers: list[LoopingCall] = []

    def _log_id(self, request: Request) -> None:
        request.setHeader(b"edgeauth-log-id", self.answers.log_id.encode())

    def render_HEAD(self, request: Request) -> bytes:
        self._log_id(request)
        tail = int(self.answers.offset) + (self.ahead if self.behaviour == "stalled" else 0)
        request.setHeader(b"stream-next-offset", format_offset(tail).encode())
        request.setHeader(b"cache-control", b"no-store")
        return b""

    def render_GET(self, request: Request) -> bytes | int:
        self._log_id(request)
        if request.path == b"/v1/snapshot":
            request.setHeader(b"content-type", b"application/json")
            return self.answers.snapshot
        args = request.args or {}
        offset = args.get(b"offset", [b""])[0].decode()
        if request.path != b"/v1/stream/events" or offset != self.answers.offset:
            request.setResponseCode(400)
            return b'{"error":"unexpected"}'
        if b"live" not in args:
            for name, value in self.answers.catch_up_headers.items():
                request.setHeader(name, value)
            return self.answers.catch_up
        assert args[b"live"] == [b"sse"]
        if self.on_sse is not None:
            # Readiness as the edge reports it at the very moment it opens a live stream.
            self.sse_requests.append(self.on_sse())
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        request.write(b": edgeauth stream\n\n")
        if self.behaviour == "garbage":
            request.write(b"event: data\ndata: {not json\n\n")
        else:
            pinger = LoopingCall(request.write, b": ping\n\n")
            pinger.clock = reactor
            self._pingers.append(pinger)
            pinger.start(0.05, now=False)
            request.notifyFinish().addBoth(lambda _: pinger.running and pinger.stop())
        self.open_streams.append(request)
        return NOT_DONE_YET

    def close(self) -> None:
        for pinger in self._pingers:
            if pinger.running:
                pinger.stop()
        for request in self.open_streams:
            if not request.finished and not request._disconnected:
                request.finish()


@pytest_twisted.ensureDeferred
async def test_garbage_stream_not_ready(tmp_path: Path) -> None:
    """A master streaming unparseable frames: 503 unparseable_stream, and it stays red."""
    answers, banned = await CopiedAnswers.take(subdir(tmp_path, "real"))
    fake = FakeMaster(answers, "garbage")
    port = await listen(fake)
    edge = EdgeRig(tmp_path, [url_of(port)], tail_probe_interval=0.1, rng=QuickRandom())
    admin: Admin | None = None
    try:
        sub = await edge.start()
        fake.on_sse = lambda: sub.readiness(5)
        admin = await Admin(edge, max_lag=5).start()
        assert edge.refuses("198.51.100.7") == banned["seq"]
        await until(
            lambda: sub.readiness(5)[1].startswith("unparseable_stream"), 3.0, "unparseable"
        )
        assert await admin.readyz() == (503, "unparseable_stream")
        code, doc = await admin.get("/readyz")
        assert "not JSON" in doc["detail"]
        # The edge keeps coming back (the server never closed anything) and never turns green
        # in between: not even when it reopens the stream after a good catch-up.
        await until(lambda: len(fake.sse_requests) >= 4, 5.0, "several reconnects")
        assert all(not ready for ready, _ in fake.sse_requests[1:]), fake.sse_requests
        assert await admin.readyz() == (503, "unparseable_stream")
        assert edge.refuses("198.51.100.7") == banned["seq"]  # last known good
        assert edge.state is not None and edge.state.offset == int(answers.offset)
    finally:
        fake.close()
        if admin is not None:
            await admin.stop()
        await edge.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_stalled_stream_lagging(tmp_path: Path) -> None:
    """HEAD announces a tail far ahead while SSE only pings: after max_lag, 503 lagging."""
    answers, banned = await CopiedAnswers.take(subdir(tmp_path, "real"))
    fake = FakeMaster(answers, "stalled", ahead=100)
    port = await listen(fake)
    edge = EdgeRig(tmp_path, [url_of(port)], ping_interval=1.0, tail_probe_interval=0.1)
    admin: Admin | None = None
    try:
        sub = await edge.start()
        admin = await Admin(edge, max_lag=0.5).start()
        assert sub.readiness(0.5) == (True, "ok")
        await until(lambda: sub.status.behind_since is not None, 2.0, "the announced tail")
        # Behind, but for less than max_lag: still ready.
        assert sub.readiness(0.5) == (True, "ok")
        await until(lambda: sub.readiness(0.5)[1].startswith("lagging"), 2.0, "lagging")
        assert await admin.readyz() == (503, "lagging")
        code, status = await admin.get("/status")
        assert status["lag_events"] == 100
        assert status["lag_seconds"] > 0.5
        assert status["connected"] is True
        assert sub.status.reconnects == 0  # the connection stayed up all along
        assert edge.refuses("198.51.100.7") == banned["seq"]
    finally:
        fake.close()
        if admin is not None:
            await admin.stop()
        await edge.stop()
        await port.stopListening()
