"""Overlapping bans and allows, end to end, against a tiny reference model.

A real master and one whole in-process edge (proxy in front of a real origin). Seeded random
sequences of ban, unban, allow, unallow and short-lived (0.2 s) bans and allows over overlapping
IPv4, IPv6 and IPv4-mapped addresses and networks go to the master's operator API. The model
replays the events the master acknowledged with :mod:`ipaddress` only: a client is allowed if a
live allow entry covers it, else refused if a live ban covers it (the most specific ban is the
``ref``). Once the edge has applied the master's tail, its verdicts must equal the model's for
random client addresses, at once and after every short entry has expired; a handful of 127.x
addresses, which tests can bind, are also checked through HTTP.
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from support import EDGE_TOKEN, Client, Origin, RunningEdge, start_edge, start_master
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from edgeauth.edge.index import parse_client_ip

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

POOL = [
    # IPv4, nested: /32s inside a /25 inside a /24 inside a /16, plus IPv4-mapped spellings.
    "10.1.2.3",
    "10.1.2.4",
    "10.1.2.200",
    "10.1.2.128/25",
    "10.1.2.0/24",
    "10.1.0.0/16",
    "10.1.3.7",
    "::ffff:10.1.2.3",
    "::ffff:10.1.2.0/120",
    # The same shape on addresses the tests can bind, to check through HTTP.
    "127.77.2.3",
    "127.77.2.4",
    "127.77.2.200",
    "127.77.2.0/24",
    "127.77.0.0/16",
    "127.77.3.9",
    "::ffff:127.77.2.3",
    # IPv6.
    "2001:db8::1",
    "2001:db8::2",
    "2001:db8::/64",
    "2001:db8::/48",
    "2001:db8:0:1::1",
    "2001:db8:0:1::/64",
]
BOUND = ["127.77.2.3", "127.77.2.4", "127.77.2.200", "127.77.2.9", "127.77.3.9", "127.78.0.1"]
SHORT_TTL = 0.2
SEEDS = [1, 2, 3, 4, 5]
OPERATIONS = 60
CLIENTS = 200


async def until(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> None:
    """Wait on the reactor until ``cond()`` is true; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not cond():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


# --- the reference model --------------------------------------------------------------------------


def normal(text: str) -> Network:
    """PROTOCOL.md §1 normalisation with ipaddress: IPv4-mapped addresses/networks are IPv4."""
    net = ipaddress.ip_network(text, strict=True)
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def client_address(text: str) -> Address:
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@attrs.define
class Entry:
    seq: int
    expires_at: float | None

    def live(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


@attrs.define
class Model:
    """Replays acknowledged events; answers "refused by which ban" for a client address."""

    bans: dict[Network, Entry] = attrs.Factory(dict)
    allows: dict[Network, Entry] = attrs.Factory(dict)

    def apply(self, event: dict[str, Any]) -> None:
        net = normal(event["ip"])
        assert str(net) == event["ip"], "the master's normal form differs from ipaddress'"
        kind = event["type"]
        table = self.bans if kind in ("ip_banned", "ip_unbanned") else self.allows
        if kind in ("ip_banned", "ip_allowed"):
            table[net] = Entry(event["seq"], event["expires_at"])
        else:
            del table[net]

    def refused_by(self, text: str, now: float) -> int | None:
        addr = client_address(text)

        def covering(table: dict[Network, Entry]) -> list[tuple[int, int]]:
            return [
                (net.prefixlen, entry.seq)
                for net, entry in table.items()
                if net.version == addr.version and addr in net and entry.live(now)
            ]

        if covering(self.allows):
            return None
        bans = covering(self.bans)
        return max(bans)[1] if bans else None

    def view(self, now: float) -> dict[str, dict[str, tuple[int, float | None]]]:
        return {
            name: {str(n): (e.seq, e.expires_at) for n, e in table.items() if e.live(now)}
            for name, table in (("bans", self.bans), ("allows", self.allows))
        }

    def latest_expiry(self) -> float:
        expiries = [
            e.expires_at for t in (self.bans, self.allows) for e in t.values() if e.expires_at
        ]
        return max(expiries, default=0.0)


# --- clients ------------------------------------------------------------------------------------


@implementer(IAgentEndpointFactory)
class _BoundEndpoints:
    def __init__(self, host: str) -> None:
        self.host = host

    def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:  # noqa: N802 - Twisted's name
        return TCP4ClientEndpoint(
            reactor, uri.host.decode(), uri.port, timeout=5, bindAddress=(self.host, 0)
        )


async def visit(edge: RunningEdge, host: str, path: str = "/page") -> tuple[int, Any]:
    """GET ``path`` through the edge's proxy from a socket bound to ``host``."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent.usingEndpointFactory(reactor, _BoundEndpoints(host), pool=pool)
    d = agent.request(b"GET", (edge.url + path).encode())
    d.addTimeout(5, reactor)
    response = await d
    body = await treq.content(response)
    types = response.headers.getRawHeaders(b"content-type", [])
    if any(t.startswith(b"application/json") for t in types):
        return response.code, json.loads(body)
    return response.code, body


class Rig:
    """Master, origin, edge, an operator client and the model of what was acknowledged."""

    def __init__(self) -> None:
        self.master: Any = None
        self.origin = Origin()
        self.edge: RunningEdge | None = None
        self.ops: Client | None = None
        self.model = Model()

    async def start(self, tmp_path: Path) -> Rig:
        self.master = await start_master(tmp_path)
        self.ops = Client(self.master.url)
        await self.origin.start()
        self.edge = await start_edge(tmp_path, "edge-m", self.master.url, self.origin.url)
        return self

    async def stop(self) -> None:
        if self.ops is not None:
            await self.ops.close()
        if self.edge is not None:
            await self.edge.stop()
        if self.origin.port is not None:
            await self.origin.stop()
        if self.master is not None:
            await self.master.stop()

    async def send(self, action: str, ip: str, ttl: float | None = None) -> dict[str, Any] | None:
        """POST one operator action; apply its event to the model; None when refused (404)."""
        assert self.ops is not None
        body: dict[str, Any] = {"ip": ip}
        if action in ("ban", "allow"):
            body["reason"] = f"model {action}"
            if ttl is not None:
                body["ttl"] = ttl
        before = reactor.seconds()
        reply = await self.ops.post(f"/{action}/ip", body)
        table = self.model.bans if action in ("ban", "unban") else self.model.allows
        existing = table.get(normal(ip))
        if reply.code == 404:
            # Only when the model has no entry live when the master looked (at or before now).
            assert action in ("unban", "unallow"), reply.body
            assert existing is None or not existing.live(reactor.seconds()), (action, ip)
            return None
        assert reply.code == 201, reply.body
        event: dict[str, Any] = reply.json()["event"]
        if action in ("unban", "unallow"):
            assert existing is not None and existing.live(before), (action, ip)
        self.model.apply(event)
        return event

    @property
    def state(self) -> Any:
        assert self.edge is not None
        return self.edge.service.state

    async def synced(self) -> None:
        tail = self.master.service.log.tail
        await until(lambda: self.state.offset == tail, 5.0, f"the edge to apply up to {tail}")

    def edge_refused_by(self, text: str, now: float) -> int | None:
        parsed = parse_client_ip(text)
        assert parsed is not None, text
        entry = self.state.indexes.check_ip(*parsed, now)
        return None if entry is None else int(entry.seq)

    async def master_view(self) -> dict[str, dict[str, tuple[int, float | None]]]:
        assert self.ops is not None
        reply = await self.ops.get("/v1/snapshot", token=EDGE_TOKEN)
        doc = reply.json()
        return {
            name: {row["ip"]: (row["seq"], row["expires_at"]) for row in doc[name]}
            for name in ("bans", "allows")
        }

    def edge_view(self, now: float) -> dict[str, dict[str, tuple[int, float | None]]]:
        view = self.state.indexes.to_state().view(now)
        return {
            name: {row["ip"]: (row["seq"], row["expires_at"]) for row in view[name]}
            for name in ("bans", "allows")
        }


def random_client(rng: random.Random) -> str:
    """A client address, mostly where the pool's entries overlap."""
    r = rng.random()
    if r < 0.30:
        return f"10.1.2.{rng.randint(0, 255)}"
    if r < 0.38:
        return f"10.1.{rng.randint(0, 4)}.{rng.randint(0, 255)}"
    if r < 0.46:
        return f"::ffff:10.1.2.{rng.randint(0, 255)}"
    if r < 0.58:
        return f"127.77.{rng.choice([2, 2, 2, 3, 9])}.{rng.randint(0, 255)}"
    if r < 0.62:
        return f"10.{rng.randint(2, 200)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}"
    subnet = rng.choice([0, 0, 1, 2, 0xFFFF])
    host = rng.choice([1, 2, rng.getrandbits(16), rng.getrandbits(64)])
    prefix = rng.choice([0x20010DB8, 0x20010DB8, 0x20010DB9])
    return str(ipaddress.IPv6Address((prefix << 96) | (subnet << 64) | host))


ACTIONS = ["ban", "unban", "allow", "unallow", "ban_ttl", "allow_ttl"]
WEIGHTS = [30, 20, 14, 12, 16, 8]


async def run_sequence(rig: Rig, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(OPERATIONS):
        action = rng.choices(ACTIONS, WEIGHTS)[0]
        if action in ("unban", "unallow") and rng.random() < 0.75:
            table = rig.model.bans if action == "unban" else rig.model.allows
            present = [text for text in POOL if normal(text) in table]
            target = rng.choice(present or POOL)
        else:
            target = rng.choice(POOL)
        if action.endswith("_ttl"):
            await rig.send(action[:-4], target, ttl=SHORT_TTL)
        else:
            await rig.send(action, target)


@pytest_twisted.ensureDeferred
async def test_random_sequences_match_the_model(tmp_path: Path) -> None:
    """5 seeds x 60 operations; 200 random clients each, at once and after expiry; HTTP too."""
    rig = await Rig().start(tmp_path)
    try:
        compared = refused = 0
        for seed in SEEDS:
            await run_sequence(rig, seed)
            await rig.synced()
            rng = random.Random(1000 + seed)
            clients = [random_client(rng) for _ in range(CLIENTS)]
            now = reactor.seconds()
            for at in (now, now + SHORT_TTL + 0.05, now + 3600):
                for text in clients:
                    expected = rig.model.refused_by(text, at)
                    assert rig.edge_refused_by(text, at) == expected, (seed, text, at - now)
                    compared += 1
                    refused += expected is not None
            # Wait past every short entry: then the three views must be the same tables.
            latest = rig.model.latest_expiry()
            await until(lambda latest=latest: reactor.seconds() > latest + 0.01, 2.0)
            now = reactor.seconds()
            assert rig.model.view(now) == await rig.master_view() == rig.edge_view(now)
            for host in BOUND:
                expected = rig.model.refused_by(host, reactor.seconds())
                code, doc = await visit(rig.edge, host)  # type: ignore[arg-type]
                if expected is None:
                    assert code == 200, (seed, host, doc)
                else:
                    assert (code, doc["error"], doc["ref"]) == (403, "ip_banned", expected), host
        # The sequences did exercise both verdicts (and not one trivially).
        assert 0.1 < refused / compared < 0.9, (refused, compared)
    finally:
        await rig.stop()


@pytest_twisted.ensureDeferred
async def test_unbanning_an_address_never_lifts_a_covering_network(tmp_path: Path) -> None:
    """Unbanning (or expiring) an exact entry leaves every covering network in force."""
    rig = await Rig().start(tmp_path)
    try:
        net24 = await rig.send("ban", "127.77.5.0/24")
        host = await rig.send("ban", "127.77.5.5")
        net16 = await rig.send("ban", "10.1.0.0/16")
        mapped = await rig.send("ban", "::ffff:10.1.2.3")
        net64 = await rig.send("ban", "2001:db8::/64")
        host6 = await rig.send("ban", "2001:db8::1")
        assert net24 and host and net16 and mapped and net64 and host6
        assert mapped["ip"] == "10.1.2.3/32"
        await rig.synced()
        now = reactor.seconds()
        assert rig.edge_refused_by("127.77.5.5", now) == host["seq"]  # the most specific
        assert rig.edge_refused_by("::ffff:10.1.2.3", now) == mapped["seq"]
        assert rig.edge_refused_by("2001:db8::1", now) == host6["seq"]

        await rig.send("unban", "127.77.5.5")
        await rig.send("unban", "::ffff:10.1.2.3")  # the mapped spelling names the v4 entry
        await rig.send("unban", "2001:db8::1")
        await rig.synced()
        now = reactor.seconds()
        assert rig.edge_refused_by("127.77.5.5", now) == net24["seq"]
        assert rig.edge_refused_by("10.1.2.3", now) == net16["seq"]
        assert rig.edge_refused_by("::ffff:10.1.2.3", now) == net16["seq"]
        assert rig.edge_refused_by("2001:db8::1", now) == net64["seq"]
        code, doc = await visit(rig.edge, "127.77.5.5")  # type: ignore[arg-type]
        assert (code, doc["error"], doc["ref"]) == (403, "ip_banned", net24["seq"])

        # An exact entry that expires inside a banned network: the network still refuses.
        short = await rig.send("ban", "127.77.5.6", ttl=1.0)
        lone = await rig.send("ban", "127.77.6.6", ttl=1.0)
        assert short and lone
        await rig.synced()
        code, doc = await visit(rig.edge, "127.77.5.6")  # type: ignore[arg-type]
        assert (code, doc["ref"]) == (403, short["seq"])
        code, doc = await visit(rig.edge, "127.77.6.6")  # type: ignore[arg-type]
        assert (code, doc["ref"]) == (403, lone["seq"])
        assert lone["expires_at"] is not None
        await until(lambda: reactor.seconds() > lone["expires_at"], 3.0, "the expiry")
        code, doc = await visit(rig.edge, "127.77.5.6")  # type: ignore[arg-type]
        assert (code, doc["ref"]) == (403, net24["seq"])
        code, body = await visit(rig.edge, "127.77.6.6")  # type: ignore[arg-type]
        assert (code, body) == (200, b"origin says hello /page")
    finally:
        await rig.stop()


@pytest.mark.parametrize(
    ("network", "allowed", "neighbours"),
    [
        pytest.param("127.77.8.0/24", "127.77.8.7", ["127.77.8.6", "127.77.8.8"], id="v4"),
        pytest.param(
            "::ffff:127.77.9.0/120", "::ffff:127.77.9.7", ["127.77.9.6", "127.77.9.8"], id="mapped"
        ),
        pytest.param("2001:db8::/64", "2001:db8::7", ["2001:db8::6", "2001:db8::8"], id="v6"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_an_allow_inside_a_banned_network_lets_exactly_that_address_through(
    tmp_path: Path, network: str, allowed: str, neighbours: list[str]
) -> None:
    """Allow one address inside a banned network: it alone is served; unallow refuses it again."""
    rig = await Rig().start(tmp_path)
    try:
        ban = await rig.send("ban", network)
        allow = await rig.send("allow", allowed)
        assert ban and allow
        await rig.synced()
        now = reactor.seconds()
        net = normal(network)
        hosts = (
            [str(a) for a in net]
            if net.version == 4
            else [neighbours[0], str(client_address(allowed)), neighbours[1]]
        )
        served = [h for h in hosts if rig.edge_refused_by(h, now) is None]
        assert served == [str(client_address(allowed))]
        for text in neighbours:
            assert rig.edge_refused_by(text, now) == ban["seq"]
        if net.version == 4:
            code, body = await visit(rig.edge, str(client_address(allowed)))  # type: ignore[arg-type]
            assert (code, body) == (200, b"origin says hello /page")
            for text in neighbours:
                code, doc = await visit(rig.edge, text)  # type: ignore[arg-type]
                assert (code, doc["error"], doc["ref"]) == (403, "ip_banned", ban["seq"])
        await rig.send("unallow", allowed)
        await rig.synced()
        assert rig.edge_refused_by(allowed, reactor.seconds()) == ban["seq"]
        if net.version == 4:
            code, doc = await visit(rig.edge, str(client_address(allowed)))  # type: ignore[arg-type]
            assert (code, doc["ref"]) == (403, ban["seq"])
    finally:
        await rig.stop()
