"""An edge as operators run it (``twistd -n edgeauth-edge``), killed with SIGKILL mid-stream.

The master and the origin run in this process; the edge is a real child process, so SIGKILL
really loses whatever it had not written to its SQLite file. Run
``.venv/bin/pip install --no-deps --force-reinstall .`` first so that ``twistd`` has this code.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from support import (
    EDGE_TOKEN,
    Client,
    Origin,
    RunningMaster,
    start_master,
    wait_until,
    write_edge_ini,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

ROOT = Path(__file__).resolve().parents[2]
TWISTD = str(ROOT / ".venv" / "bin" / "twistd")
EVENTS = 500
SAMPLE = 50
WRITERS = 16
LISTENING = re.compile(
    r"edgeauth edge (\S+) proxying IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\)"
    r" to \S+; admin on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\)"
)
LOADED = re.compile(r"edge state loaded: log (\S+) offset (\d+)")


STATE_COUNTS = ("bans", "allows", "revoked_tokens", "revoked_subjects")


def state_counts(status: dict[str, Any]) -> dict[str, int]:
    """The ban and revocation counts of an edge's ``/status`` (its cache counts aside)."""
    counts = status["counts"]
    assert set(STATE_COUNTS) <= set(counts), counts
    return {key: counts[key] for key in STATE_COUNTS}


class EdgeProcess(ProcessProtocol):
    """One ``twistd -n edgeauth-edge`` child: its output, ports and exit."""

    def __init__(self, ini: Path, cwd: Path) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.port = 0
        self.admin_port = 0
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["EDGEAUTH_EDGE_TOKEN"] = EDGE_TOKEN
        args = [TWISTD, "-n", "--pidfile=", "edgeauth-edge", "--config", str(ini)]
        self.process = reactor.spawnProcess(self, TWISTD, args, env=env, path=str(cwd))

    def outReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self.output += data

    errReceived = outReceived  # noqa: N815 - Twisted's name

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted's name
        self.reason = reason
        self.ended.callback(None)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    async def listening(self, timeout: float = 20.0) -> None:
        """Wait for the edge's "proxying ... admin on ..." line; learn both ports."""

        def found() -> re.Match[str] | None:
            if self.ended.called:
                raise AssertionError(f"the edge exited early:\n{self.text}")
            return LISTENING.search(self.text)

        match = await wait_until(found, f"the edge to listen; output:\n{self.text}", timeout)
        self.port, self.admin_port = int(match.group(2)), int(match.group(3))

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def kill(self) -> None:
        """SIGKILL the child (by its pid, through its transport) and wait until it is reaped."""
        if not self.ended.called:
            self.process.signalProcess("KILL")
            await self.ended
        assert self.reason is not None and self.reason.check(ProcessDone, ProcessTerminated)


class Planner:
    """Hands out ``EVENTS`` operator writes: bans, unbans, allows, unallows and revocations.

    Addresses and networks of every kind (IPv4 and IPv6, hosts and networks) overlap on purpose:
    most allows sit inside banned networks. Several writers post at once; an unban or unallow
    only names an entry whose ban or allow was already acknowledged and that no other writer is
    removing, so every write gets 201.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        kinds = (
            ["ban4"] * 150
            + ["ban25"] * 40
            + ["ban6"] * 30
            + ["ban64"] * 30
            + ["unban"] * 80
            + ["allow"] * 60
            + ["unallow"] * 20
            + ["token"] * 45
            + ["subject"] * 45
        )
        assert len(kinds) == EVENTS
        rng.shuffle(kinds)
        self.kinds = kinds
        self.number = 0
        self.banned: list[str] = []
        self.allowed: list[str] = []
        self.networks: list[str] = []
        self.used: set[str] = set()

    def take(self) -> tuple[str, dict[str, Any], list[str] | None, str] | None:
        """The next write: path, body, and the list its entry joins once acknowledged."""
        if self.number == EVENTS:
            return None
        number, kind = self.number, self.kinds[self.number]
        self.number += 1
        if kind == "unban" and not self.banned:
            kind = "ban25"
        if kind == "unallow" and not self.allowed:
            kind = "allow"
        ttl = {"ttl": 3600} if number % 7 == 0 else {}
        reason = f"event {number}"
        if kind == "ban4":
            ip = f"10.0.{number // 250}.{number % 250 + 1}/32"
        elif kind == "ban25":
            ip = f"10.1.{number % 250}.{number // 250 * 128}/25"
        elif kind == "ban6":
            ip = f"2001:db8::{number:x}/128"
        elif kind == "ban64":
            ip = f"2001:db8:0:{number:x}::/64"
        if kind.startswith("ban"):
            if not ip.endswith(("/32", "/128")):
                self.networks.append(ip)
            return "/ban/ip", {"ip": ip, "reason": reason, **ttl}, self.banned, ip
        if kind == "unban":
            ip = self.banned.pop(self.rng.randrange(len(self.banned)))
            return "/unban/ip", {"ip": ip}, None, ip
        if kind == "allow":
            ip = f"10.2.{number % 250}.{number // 250 + 1}/32"
            if self.networks and self.rng.random() < 0.7:
                net = ipaddress.ip_network(self.rng.choice(self.networks))
                inner = str(ipaddress.ip_network(net.network_address + 9))
                ip = ip if inner in self.used else inner
            self.used.add(ip)  # one write per entry: no two writers race on it
            return "/allow/ip", {"ip": ip, "reason": reason, **ttl}, self.allowed, ip
        if kind == "unallow":
            ip = self.allowed.pop(self.rng.randrange(len(self.allowed)))
            return "/unallow/ip", {"ip": ip}, None, ip
        if kind == "token":
            body = {"jti": f"jti-{number}", "expires_at": time.time() + 3600}
            return "/revoke/token", body, None, ""
        return "/revoke/subject", {"sub": f"user-{number % 30}"}, None, ""


async def post_all(ops: Client, planner: Planner, writers: int) -> list[dict[str, Any]]:
    """Post every planned write with ``writers`` requests in flight; return the events."""
    posted: list[dict[str, Any]] = []

    async def writer() -> None:
        while (write := planner.take()) is not None:
            path, body, joins, ip = write
            reply = await ops.post(path, body)
            assert reply.code == 201, (path, body, reply.code, reply.body)
            posted.append(reply.json()["event"])
            if joins is not None and ip not in joins:
                joins.append(ip)

    await gatherResults([Deferred.fromCoroutine(writer()) for _ in range(writers)])
    return posted


async def admin_get(url: str, path: str) -> Any:
    """GET an admin view of the edge and decode it (None while the edge does not answer)."""
    client = Client(url)
    try:
        reply = await client.get(path, token=None)
    except Exception:
        return None
    finally:
        await client.close()
    assert reply.code == 200, (path, reply.code, reply.body)
    return reply.json()


async def master_tail(ops: Client) -> str:
    reply = await ops.request("HEAD", "/v1/stream/events")
    assert reply.code == 200
    tail = reply.header("stream-next-offset")
    assert tail is not None
    return tail


def inside(network: str) -> str:
    """An address inside ``network`` that is not its first (so host and net bans differ)."""
    net = ipaddress.ip_network(network)
    return str(net.network_address + (0 if net.num_addresses == 1 else 5))


@pytest_twisted.ensureDeferred
async def test_sigkill_after_500_events_then_restart_converges(tmp_path: Path) -> None:
    """An edge SIGKILLed right after 500 writes restarts with exactly the master's state."""
    master: RunningMaster = await start_master(tmp_path)
    origin = Origin()
    await origin.start()
    ops = Client(master.url)
    ini = write_edge_ini(tmp_path, "edge-p", master.url, origin.url)
    children: list[EdgeProcess] = []
    try:
        first = EdgeProcess(ini, tmp_path)
        children.append(first)
        await first.listening()

        async def synced(url: str) -> bool:
            status = await admin_get(url, "/status")
            return bool(status and status["synced"] and status["connected"])

        await wait_until(lambda: synced(first.admin_url), "the edge's first sync", 10)

        ops.pool.maxPersistentPerHost = WRITERS
        posted = await post_all(ops, Planner(random.Random(5)), WRITERS)
        await first.kill()  # right after the 500th acknowledgement
        assert len(posted) == EVENTS
        assert sorted(e["seq"] for e in posted) == list(range(1, EVENTS + 1))
        types = {e["type"] for e in posted}
        assert types >= {"ip_banned", "ip_unbanned", "ip_allowed", "ip_unallowed"}
        assert types >= {"token_revoked", "subject_revoked"}

        second = EdgeProcess(ini, tmp_path)
        children.append(second)
        await second.listening()
        loaded = LOADED.search(second.text)
        assert loaded is not None, second.text
        snapshot_doc = (await ops.get("/v1/snapshot")).json()
        assert loaded.group(1) == snapshot_doc["log_id"]  # it started from its file
        killed_at = int(loaded.group(2))
        tail = await master_tail(ops)
        assert tail == f"{EVENTS:016d}"

        async def caught_up() -> dict[str, Any] | None:
            status = await admin_get(second.admin_url, "/status")
            return status if status and status["offset"] == tail else None

        status = await wait_until(caught_up, "the restarted edge to reach the tail", 15)
        snapshot = (await ops.get("/v1/snapshot")).json()
        assert snapshot["offset"] == tail
        assert status["log_id"] == snapshot["log_id"]
        assert state_counts(status) == {
            "bans": len(snapshot["bans"]),
            "allows": len(snapshot["allows"]),
            "revoked_tokens": len(snapshot["revoked_tokens"]),
            "revoked_subjects": len(snapshot["revoked_subjects"]),
        }

        # The diff: every ban of the snapshot (hosts and networks, v4 and v6; at least SAMPLE) as
        # the edge explains it, the allows beside them, and entries the master removed.
        allows = {a["ip"]: a for a in snapshot["allows"]}
        allow_nets = [ipaddress.ip_network(ip) for ip in allows]
        sample = sorted(snapshot["bans"], key=lambda b: b["seq"])
        assert len(sample) >= SAMPLE
        kinds = {("/" + b["ip"].split("/")[1], ":" in b["ip"]) for b in sample}
        assert {("/32", False), ("/25", False), ("/128", True), ("/64", True)} <= kinds
        refused = 0
        for ban in sample:
            address = inside(ban["ip"])
            explained = await admin_get(second.admin_url, f"/explain?ip={address}")
            entries = {(b["ip"], b["seq"], b["reason"]) for b in explained["bans"]}
            assert (ban["ip"], ban["seq"], ban["reason"]) in entries, (ban, explained)
            covered = any(ipaddress.ip_address(address) in net for net in allow_nets)
            assert explained["verdict"] == ("served" if covered else "refused"), explained
            refused += explained["verdict"] == "refused"
        assert refused >= len(sample) // 2
        for ip, allow in list(allows.items())[:20]:
            explained = await admin_get(second.admin_url, f"/explain?ip={inside(ip)}")
            assert (ip, allow["seq"]) in {(a["ip"], a["seq"]) for a in explained["allows"]}
            assert explained["verdict"] == "served"
        live = {b["ip"] for b in snapshot["bans"]}
        gone = [e["ip"] for e in posted if e["type"] == "ip_unbanned" and e["ip"] not in live]
        assert len(gone) >= 20
        for ip in gone[:20]:
            explained = await admin_get(second.admin_url, f"/explain?ip={inside(ip)}")
            assert ip not in {b["ip"] for b in explained["bans"]}, explained
        print(f"edge killed at offset {killed_at} of {EVENTS}; restarted and caught up")
    finally:
        for child in children:
            await child.kill()
        await ops.close()
        await origin.stop()
        await master.stop()
