"""One master, two edges and one origin over real loopback HTTP: bans reach the whole fleet.

Clients that must look like different hosts bind their sockets to other 127.x.y.z addresses (or
to ``::1`` for IPv6), so the edges see real peer addresses; nothing of the network path is mocked.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support import (
    BoundClient,
    Client,
    EdgeFleet,
    Origin,
    Reply,
    RunningEdge,
    RunningMaster,
    start_edge,
    start_master,
    wait_until,
)
from twisted.internet import reactor, tcp

PROPAGATION_BUDGET = 1.0
"""Seconds from the master's 201 to enforcement on every edge (issue 5 acceptance)."""
RECONNECT_TIMEOUT = 20.0
"""An edge in backoff (full jitter, growing) may need a few seconds to come back."""


STATE_COUNTS = ("bans", "allows", "revoked_tokens", "revoked_subjects")


def state_counts(status: dict[str, Any]) -> dict[str, int]:
    """The ban and revocation counts of an edge's ``/status`` (its cache counts aside)."""
    counts = status["counts"]
    assert set(STATE_COUNTS) <= set(counts), counts
    return {key: counts[key] for key in STATE_COUNTS}


class Fleet(EdgeFleet):
    """A master, an origin and edges, plus the clients a test opened; all closed by the stack."""

    def __init__(self, tmp_path: Path, stack: AsyncExitStack) -> None:
        super().__init__(tmp_path, stack)
        self.origin = Origin()
        self.sections: dict[str, dict[str, Any]] = {}

    async def start(self, edges: dict[str, dict[str, Any]]) -> Fleet:
        """Start the master, the origin and the named edges (``name -> start_edge sections``)."""
        await self.start_master()
        await self.origin.start()
        self.stack.push_async_callback(self.origin.stop)
        self.stack.push_async_callback(self.stop_edges)
        for name, sections in edges.items():
            await self.start_edge(name, **sections)
        return self

    async def start_master(self, **keys: Any) -> RunningMaster:
        """Start (or restart) the master; a restart keeps the port the edges know."""
        if hasattr(self, "master"):
            keys.setdefault("listen", f"tcp:{self.port}:interface=127.0.0.1")
        self.master = await start_master(self.tmp_path, **keys)
        self.port = self.master.port
        self.ops = self.client(self.master.url)
        self.stack.push_async_callback(self._stop_master, self.master)
        return self.master

    async def _stop_master(self, master: RunningMaster) -> None:
        if master.service.running:
            await master.stop()

    async def stop_master(self) -> None:
        """Stop the master; ``MasterService.stop`` closes every connection it was serving."""
        await self.ops.close()
        port = self.master.service.port
        await self.master.stop()
        leftover = [
            s
            for s in set(reactor.getReaders()) | set(reactor.getWriters())
            if isinstance(s, tcp.Server) and s.server is port and s.connected
        ]
        assert not leftover, "a stopped master must not keep serving open connections"

    async def start_edge(self, name: str, synced: bool = True, **sections: Any) -> RunningEdge:
        """Start (or restart, with the same sections) the edge ``name``; its file is kept."""
        sections = self.sections.setdefault(name, sections)
        masters = f"http://127.0.0.1:{self.port}"
        edge = await start_edge(
            self.tmp_path, name, masters, self.origin.url, synced=synced, **sections
        )
        self.edges[name] = edge
        return edge

    async def tail(self) -> str:
        """The master's tail offset (``HEAD /v1/stream/events``)."""
        reply = await self.ops.request("HEAD", "/v1/stream/events")
        assert reply.code == 200, reply.code
        tail = reply.header("stream-next-offset")
        assert tail is not None
        return tail

    async def snapshot(self) -> dict[str, Any]:
        """The master's ``/v1/snapshot``."""
        reply = await self.ops.get("/v1/snapshot")
        assert reply.code == 200, reply.body
        doc: dict[str, Any] = reply.json()
        return doc

    async def status(self, edge: RunningEdge) -> dict[str, Any]:
        """The edge's admin ``/status``."""
        admin = Client(edge.admin_url)
        try:
            reply = await admin.get("/status", token=None)
        finally:
            await admin.close()
        assert reply.code == 200, reply.body
        doc: dict[str, Any] = reply.json()
        return doc

    async def explain(self, edge: RunningEdge, ip: str) -> dict[str, Any]:
        """The edge's admin ``/explain?ip=``."""
        admin = Client(edge.admin_url)
        try:
            reply = await admin.get(f"/explain?ip={ip}", token=None)
        finally:
            await admin.close()
        assert reply.code == 200, reply.body
        doc: dict[str, Any] = reply.json()
        return doc

    async def synced_to_tail(self) -> bool:
        """Whether every running edge's offset is the master's tail."""
        tail = await self.tail()
        for edge in self.edges.values():
            if (await self.status(edge))["offset"] != tail:
                return False
        return True


async def fleet(
    tmp_path: Path, stack: AsyncExitStack, edges: dict[str, dict[str, Any]] | None = None
) -> Fleet:
    """Start a master, an origin and two edges (``edge-a``, ``edge-b``) unless told otherwise."""
    return await Fleet(tmp_path, stack).start(edges or {"edge-a": {}, "edge-b": {}})


async def codes(clients: Iterable[Client], path: str, **kw: Any) -> list[Reply]:
    """One GET of ``path`` by each client, without Authorization."""
    return [await client.get(path, token=None, **kw) for client in clients]


async def until_codes(
    clients: list[Client], path: str, code: int, what: str, timeout: float = 5.0, **kw: Any
) -> list[Reply]:
    """Poll until every client gets ``code`` for ``path``; return those replies."""

    async def check() -> list[Reply] | None:
        replies = await codes(clients, path, **kw)
        return replies if all(r.code == code for r in replies) else None

    replies: list[Reply] = await wait_until(check, what, timeout)
    return replies


def assert_banned(reply: Reply, seq: int) -> None:
    """A refusal as PROTOCOL.md §6 says: 403 ip_banned with the ban's seq, not cacheable."""
    assert reply.code == 403, (reply.code, reply.body)
    assert reply.json() == {"error": "ip_banned", "ref": seq}
    assert reply.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert reply.headers.getRawHeaders(b"cache-control") == [b"no-store"]


def assert_proxied(reply: Reply, path: str) -> None:
    """The origin's own answer came back."""
    assert reply.code == 200, (reply.code, reply.body)
    assert reply.body == b"origin says hello " + path.encode()


async def timed(action: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
    """Run ``action`` and return its result and the seconds it took."""
    started = time.monotonic()
    result = await action()
    return result, time.monotonic() - started


async def ban_and_measure(
    f: Fleet, ip: str, victims: list[Client], path: str
) -> tuple[int, list[Reply]]:
    """Ban ``ip``; wait until every victim is refused; check that took at most the budget."""
    event = await f.post("/ban/ip", {"ip": ip, "reason": "fleet test"})
    replies, elapsed = await timed(
        lambda: until_codes(victims, path, 403, f"{ip} refused by every edge", timeout=5.0)
    )
    assert elapsed <= PROPAGATION_BUDGET, f"ban of {ip} took {elapsed:.3f} s to reach every edge"
    for reply in replies:
        assert_banned(reply, event["seq"])
    return int(event["seq"]), replies


def has_ipv6_loopback() -> bool:
    """Whether this machine can listen on ``::1``."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest_twisted.ensureDeferred
async def test_ban_one_address_on_every_edge(tmp_path: Path) -> None:
    """A banned address gets 403 ip_banned on both edges within 1 s; others pass; unban lifts it."""
    async with AsyncExitStack() as stack:
        f = await fleet(tmp_path, stack)
        edges = list(f.edges.values())
        banned = [f.client(e.url, "127.0.0.2") for e in edges]
        others = [f.client(e.url, "127.0.0.1") for e in edges]
        for reply in await codes(banned + others, "/before"):
            assert_proxied(reply, "/before")
        peers = {
            headers.getRawHeaders(b"x-forwarded-for")[0] for _, _, headers in f.origin.requests
        }
        assert peers == {b"127.0.0.1", b"127.0.0.2"}  # the bound addresses really are the peers

        seq, _ = await ban_and_measure(f, "127.0.0.2", banned, "/during")
        seen = len(f.origin.requests)
        for reply in await codes(banned, "/during"):
            assert_banned(reply, seq)
        assert len(f.origin.requests) == seen  # the origin never sees a refused request
        for reply in await codes(others, "/other"):
            assert_proxied(reply, "/other")
        assert len(f.origin.requests) == seen + len(others)

        await f.post("/unban/ip", {"ip": "127.0.0.2"})
        for reply in await until_codes(banned, "/after", 200, "unban on every edge"):
            assert_proxied(reply, "/after")


@pytest_twisted.ensureDeferred
async def test_ban_a_network_on_every_edge(tmp_path: Path) -> None:
    """A banned /24 refuses an address inside it on both edges, not one outside; unban lifts it."""
    async with AsyncExitStack() as stack:
        f = await fleet(tmp_path, stack)
        edges = list(f.edges.values())
        inside = [f.client(e.url, "127.0.3.9") for e in edges]
        edge_of_net = [f.client(e.url, "127.0.3.255") for e in edges]
        outside = [f.client(e.url, "127.0.4.1") for e in edges]
        for reply in await codes(inside + outside, "/before"):
            assert_proxied(reply, "/before")

        seq, _ = await ban_and_measure(f, "127.0.3.0/24", inside, "/during")
        for reply in await codes(edge_of_net, "/during"):
            assert_banned(reply, seq)
        for reply in await codes(outside, "/outside"):
            assert_proxied(reply, "/outside")
        for edge in edges:
            explained = await f.explain(edge, "127.0.3.9")
            assert explained["verdict"] == "refused"
            assert [(b["ip"], b["seq"]) for b in explained["bans"]] == [("127.0.3.0/24", seq)]

        await f.post("/unban/ip", {"ip": "127.0.3.0/24"})
        for reply in await until_codes(inside, "/after", 200, "unban of the /24 on every edge"):
            assert_proxied(reply, "/after")


@pytest_twisted.ensureDeferred
async def test_ban_an_ipv6_network_on_every_edge(tmp_path: Path) -> None:
    """Edges on ::1: a ban of the neighbouring /64 spares ::1, a ban of ::/64 refuses it."""
    if not has_ipv6_loopback():
        pytest.skip("this machine cannot bind ::1")
    async with AsyncExitStack() as stack:
        v6 = {"edge": {"listen": r"tcp6:0:interface=\:\:1"}}
        f = await fleet(tmp_path, stack, {"edge-a": v6, "edge-b": v6})
        edges = list(f.edges.values())
        for edge in edges:
            assert edge.service.port.getHost().host == "::1"
        urls = [f"http://[::1]:{e.service.port.getHost().port}" for e in edges]
        clients = [f.client(url, "::1") for url in urls]
        for reply in await codes(clients, "/before"):
            assert_proxied(reply, "/before")

        # The /64 right after ::/64 does not cover ::1: the edges apply it and still serve ::1.
        neighbour = await f.post("/ban/ip", {"ip": "0:0:0:1::/64", "reason": "neighbour"})
        assert neighbour["ip"] == "0:0:0:1::/64"
        await wait_until(f.synced_to_tail, "the edges to apply the neighbouring /64")
        for reply in await codes(clients, "/neighbour"):
            assert_proxied(reply, "/neighbour")
        for edge in edges:
            assert (await f.explain(edge, "0:0:0:1::1"))["ref"] == neighbour["seq"]

        seq, _ = await ban_and_measure(f, "::/64", clients, "/during")
        for edge in edges:
            assert (await f.explain(edge, "::1"))["ref"] == seq
            assert (await f.explain(edge, "::ffff:ffff:ffff:ffff"))["ref"] == seq  # the last
            # An IPv4-mapped address is its IPv4 address, never inside an IPv6 ban.
            assert (await f.explain(edge, "::ffff:127.0.0.1"))["verdict"] == "served"

        await f.post("/unban/ip", {"ip": "::/64"})
        for reply in await until_codes(clients, "/after", 200, "unban of ::/64 on every edge"):
            assert_proxied(reply, "/after")
        for edge in edges:  # unbanning one network leaves the other in force
            assert (await f.explain(edge, "0:0:0:1::1"))["ref"] == neighbour["seq"]


@pytest_twisted.ensureDeferred
async def test_forwarded_headers_only_from_trusted_proxies(tmp_path: Path) -> None:
    """A banned client cannot escape with X-Forwarded-For; a trusted proxy's XFF is believed."""
    async with AsyncExitStack() as stack:
        trusting = {"edge": {"trusted_proxies": "127.0.0.1/32"}}
        f = await fleet(tmp_path, stack, {"edge-a": {}, "edge-b": trusting})
        plain, proxied = f.edges["edge-a"], f.edges["edge-b"]
        banned = [f.client(e.url, "127.0.0.2") for e in (plain, proxied)]
        seq, _ = await ban_and_measure(f, "127.0.0.2", banned, "/x")

        # The banned peer is untrusted on both edges: whatever it claims, it stays banned.
        for forged in (
            {"X-Forwarded-For": "198.51.100.1"},
            {"X-Forwarded-For": "198.51.100.1, 127.0.0.1"},
            {"Forwarded": "for=198.51.100.1"},
        ):
            for reply in await codes(banned, "/forged", headers=forged):
                assert_banned(reply, seq)

        # 127.0.0.1 is a trusted proxy of edge-b only: the client is the right-most address
        # of the chain that is not trusted.
        via_proxy = f.client(proxied.url, "127.0.0.1")
        for chain in ("127.0.0.2", "198.51.100.1, 127.0.0.2", "127.0.0.1, 127.0.0.2, 127.0.0.1"):
            assert_banned(
                await via_proxy.get("/p", token=None, headers={"X-Forwarded-For": chain}), seq
            )
        assert_banned(
            await via_proxy.get("/p", token=None, headers={"Forwarded": 'for="127.0.0.2"'}), seq
        )
        for chain in ("198.51.100.1", "127.0.0.2, 198.51.100.1"):
            reply = await via_proxy.get("/p", token=None, headers={"X-Forwarded-For": chain})
            assert_proxied(reply, "/p")
        # edge-a trusts nobody: the same header from 127.0.0.1 is ignored, the peer is served.
        direct = f.client(plain.url, "127.0.0.1")
        assert_proxied(
            await direct.get("/p", token=None, headers={"X-Forwarded-For": "127.0.0.2"}), "/p"
        )


@pytest_twisted.ensureDeferred
async def test_edges_restart_without_master_then_catch_up(tmp_path: Path) -> None:
    """Edges restarted with the master down enforce from SQLite, then catch up with no snapshot."""
    async with AsyncExitStack() as stack:
        f = await fleet(tmp_path, stack)
        names = list(f.edges)
        ban = await f.post("/ban/ip", {"ip": "127.0.0.2", "reason": "before outage"})
        net = await f.post("/ban/ip", {"ip": "127.0.3.0/24", "reason": "before outage"})
        await f.post("/allow/ip", {"ip": "127.0.3.9", "reason": "inside the net"})
        await f.post("/revoke/token", {"jti": "jti-1", "expires_at": time.time() + 3600})
        await wait_until(f.synced_to_tail, "the edges to apply the first events")
        tail = await f.tail()
        log_id = (await f.snapshot())["log_id"]
        counts = state_counts(await f.status(f.edges["edge-a"]))
        assert counts == {"bans": 2, "allows": 1, "revoked_tokens": 1, "revoked_subjects": 0}

        await f.stop_master()
        for name in names:
            await f.edges[name].stop()
            edge = await f.start_edge(name, synced=False)
            status = await f.status(edge)
            assert (status["log_id"], status["offset"], state_counts(status)) == (
                log_id,
                tail,
                counts,
            )
            # Enforced at once, from the file: no master to ask.
            assert_banned(await f.client(edge.url, "127.0.0.2").get("/x", token=None), ban["seq"])
            assert_banned(await f.client(edge.url, "127.0.3.7").get("/x", token=None), net["seq"])
            assert_proxied(await f.client(edge.url, "127.0.3.9").get("/x", token=None), "/x")
            assert_proxied(await f.client(edge.url, "127.0.0.1").get("/x", token=None), "/x")
        edges = list(f.edges.values())

        master = await f.start_master()
        assert (await f.snapshot())["log_id"] == log_id  # same file, same log
        assert master.port == f.port
        posted = [
            await f.post("/unban/ip", {"ip": "127.0.0.2"}),
            await f.post("/ban/ip", {"ip": "127.0.0.7", "reason": "during outage"}),
            await f.post("/unallow/ip", {"ip": "127.0.3.9"}),
            await f.post("/revoke/subject", {"sub": "alice"}),
        ]
        new_tail = await f.tail()
        assert new_tail == f"{posted[-1]['seq']:016d}"
        await wait_until(f.synced_to_tail, "the restarted edges to catch up", RECONNECT_TIMEOUT)
        snapshot = await f.snapshot()
        for edge in edges:
            status = await f.status(edge)
            assert status["log_id"] == log_id
            assert state_counts(status) == {
                "bans": len(snapshot["bans"]),
                "allows": len(snapshot["allows"]),
                "revoked_tokens": len(snapshot["revoked_tokens"]),
                "revoked_subjects": len(snapshot["revoked_subjects"]),
            }
            assert state_counts(status) == {
                "bans": 2,
                "allows": 0,
                "revoked_tokens": 1,
                "revoked_subjects": 1,
            }
            assert edge.service.metrics.snapshots._value.get() == 0  # caught up, no bootstrap
            assert sum(status["applied_by_type"].values()) == len(posted)
        unbanned = [f.client(e.url, "127.0.0.2") for e in edges]
        for reply in await until_codes(unbanned, "/after", 200, "the unban to apply"):
            assert_proxied(reply, "/after")
        refused = await codes([f.client(e.url, "127.0.0.7") for e in edges], "/after")
        for reply in refused:
            assert_banned(reply, posted[1]["seq"])
        for reply in await codes([f.client(e.url, "127.0.3.9") for e in edges], "/after"):
            assert_banned(reply, net["seq"])  # the allow is gone, the /24 ban is back in force


@pytest_twisted.ensureDeferred
async def test_master_database_reset_makes_edges_rebootstrap(tmp_path: Path) -> None:
    """A master with a new log id: the edges re-bootstrap from its snapshot; old bans are gone."""
    async with AsyncExitStack() as stack:
        f = await fleet(tmp_path, stack)
        edges = list(f.edges.values())
        old = await f.post("/ban/ip", {"ip": "127.0.0.2", "reason": "old log"})
        await f.post("/ban/ip", {"ip": "127.0.3.0/24", "reason": "old log"})
        await f.post("/revoke/token", {"jti": "old-jti"})
        await f.post("/ban/ip", {"ip": "127.0.0.3", "reason": "old log"})
        await wait_until(f.synced_to_tail, "the edges to apply the old log")
        old_log = (await f.snapshot())["log_id"]
        for edge in edges:
            assert edge.service.metrics.snapshots._value.get() == 1
        assert_banned(await f.client(edges[0].url, "127.0.0.2").get("/x", token=None), old["seq"])

        await f.stop_master()
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"master.sqlite3{suffix}").unlink(missing_ok=True)
        await f.start_master()
        new = await f.post("/ban/ip", {"ip": "127.0.0.8", "reason": "new log"})
        assert new["seq"] == 1
        snapshot = await f.snapshot()
        assert snapshot["log_id"] != old_log

        async def rebootstrapped() -> bool:
            for edge in edges:
                status = await f.status(edge)
                if edge.service.metrics.snapshots._value.get() < 2:
                    return False
                if (status["log_id"], status["offset"]) != (snapshot["log_id"], snapshot["offset"]):
                    return False
            return True

        try:
            await wait_until(rebootstrapped, "the edges to re-bootstrap", RECONNECT_TIMEOUT)
        except AssertionError:
            for edge in edges:
                print(await f.status(edge))
            raise
        for edge in edges:
            assert edge.service.metrics.snapshots._value.get() == 2
            status = await f.status(edge)
            assert state_counts(status) == {
                "bans": 1,
                "allows": 0,
                "revoked_tokens": 0,
                "revoked_subjects": 0,
            }
            assert_proxied(await f.client(edge.url, "127.0.0.2").get("/x", token=None), "/x")
            assert_proxied(await f.client(edge.url, "127.0.3.9").get("/x", token=None), "/x")
            assert_proxied(await f.client(edge.url, "127.0.0.3").get("/x", token=None), "/x")
            assert_banned(await f.client(edge.url, "127.0.0.8").get("/x", token=None), new["seq"])
            explained = await f.explain(edge, "127.0.0.8")
            assert [(b["ip"], b["seq"], b["reason"]) for b in explained["bans"]] == [
                ("127.0.0.8/32", 1, "new log")
            ]


@pytest_twisted.ensureDeferred
async def test_keep_alive_to_client_and_origin(tmp_path: Path) -> None:
    """1,000 sequential requests on one client connection use at most 4 origin connections."""
    async with AsyncExitStack() as stack:
        f = await fleet(tmp_path, stack, {"edge-a": {}})
        edge = f.edges["edge-a"]
        client = f.client(edge.url, "127.0.0.1")
        assert isinstance(client, BoundClient)
        client.pool.maxPersistentPerHost = 1
        before = f.origin.connections
        for number in range(1000):
            path = f"/k/{number}"
            reply = await client.get(path, token=None)
            assert_proxied(reply, path)
        assert client.endpoints.connects == 1  # one client connection carried all of them
        assert len(f.origin.requests) == 1000
        assert f.origin.connections - before <= 4, f.origin.connections - before


@pytest_twisted.ensureDeferred
async def test_allow_inside_a_banned_network(tmp_path: Path) -> None:
    """An allowed address inside a banned /24 is served on both edges; its neighbours are not."""
    async with AsyncExitStack() as stack:
        f = await fleet(tmp_path, stack)
        edges = list(f.edges.values())
        allowed = [f.client(e.url, "127.0.3.9") for e in edges]
        neighbours = [f.client(e.url, host) for e in edges for host in ("127.0.3.8", "127.0.3.10")]
        seq, _ = await ban_and_measure(f, "127.0.3.0/24", allowed + neighbours, "/x")
        allow = await f.post("/allow/ip", {"ip": "127.0.3.9", "reason": "the one good host"})
        for reply in await until_codes(allowed, "/in", 200, "the allow on every edge"):
            assert_proxied(reply, "/in")
        for reply in await codes(neighbours, "/in"):
            assert_banned(reply, seq)
        for edge in edges:
            explained = await f.explain(edge, "127.0.3.9")
            assert explained["verdict"] == "served"
            assert [(a["ip"], a["seq"]) for a in explained["allows"]] == [
                ("127.0.3.9/32", allow["seq"])
            ]
            assert [(b["ip"], b["seq"]) for b in explained["bans"]] == [("127.0.3.0/24", seq)]

        await f.post("/unallow/ip", {"ip": "127.0.3.9"})
        for reply in await until_codes(allowed, "/out", 403, "the unallow on every edge"):
            assert_banned(reply, seq)
