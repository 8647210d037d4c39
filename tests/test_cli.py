"""``edgeauthctl`` run as a subprocess against a real master (and a real edge admin listener)."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest_twisted
from support import EDGE_TOKEN, OPERATOR_TOKEN, READER_TOKEN, Client, RunningMaster, start_master
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.web.server import Site

from edgeauth.edge.admin import AdminResource
from edgeauth.edge.metrics import EdgeMetrics
from edgeauth.edge.state import EdgeState
from edgeauth.edge.store import EdgeStore
from edgeauth.edge.subscriber import Subscriber

ROOT = Path(__file__).resolve().parents[1]
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "SYSTEMROOT", "COVERAGE_PROCESS_START")


def cli_env(master: str, token: str | None = OPERATOR_TOKEN, **extra: str) -> dict[str, str]:
    """The environment of a CLI child: the repository on PYTHONPATH, master URL and token."""
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.update(PYTHONPATH=str(ROOT), EDGEAUTH_MASTER=master, **extra)
    if token is not None:
        env["EDGEAUTH_TOKEN"] = token
    return env


@attrs.frozen
class Run:
    """The outcome of one CLI run."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """Decode stdout as JSON."""
        return json.loads(self.out)


async def ctl(env: dict[str, str], *args: str) -> Run:
    """Run ``python -m edgeauth.cli ARGS`` without blocking the reactor."""
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "edgeauth.cli", *args], env=env, path=str(ROOT), reactor=reactor
    )
    return Run(code, out.decode(), err.decode())


async def ctl_all(env: dict[str, str], *commands: list[str]) -> list[Run]:
    """Run several CLI commands concurrently (for independent checks)."""
    runs: list[Run] = await gatherResults([Deferred.fromCoroutine(ctl(env, *c)) for c in commands])
    return runs


def closed_port() -> int:
    """A local TCP port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` every 50 ms until it holds; fail after ``timeout``."""
    waited = 0.0
    while not condition():
        assert waited < timeout, "condition not reached in time"
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


class Collector(ProcessProtocol):
    """Collects a long-running child's output and its exit status."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))

    @property
    def lines(self) -> list[str]:
        return self.out.decode().splitlines()


def spawn_ctl(env: dict[str, str], *args: str) -> tuple[Collector, Any]:
    """Start a long-running CLI child (``tail``); return its collector and process transport."""
    collector = Collector()
    argv = [sys.executable, "-m", "edgeauth.cli", *args]
    process = reactor.spawnProcess(collector, sys.executable, argv, env=env, path=str(ROOT))
    return collector, process


async def stop_child(collector: Collector, process: Any) -> int | None:
    """Send SIGINT (Ctrl-C) and wait for the exit status."""
    if not collector.ended.called:
        process.signalProcess("INT")
    ended = collector.ended
    ended.addTimeout(10, reactor)
    code: int | None = await ended
    return code


def kill_child(collector: Collector | None, process: Any) -> None:
    """Kill a CLI child that is still running (clean-up of a test that failed before its end)."""
    if collector is not None and process is not None and not collector.ended.called:
        process.signalProcess("KILL")


@asynccontextmanager
async def cli_master(tmp_path: Path) -> AsyncIterator[tuple[RunningMaster, dict[str, str]]]:
    """A master and the environment of CLI children talking to it; the master stops on exit."""
    running = await start_master(tmp_path)
    try:
        yield running, cli_env(running.url)
    finally:
        await running.stop()


async def tail_of(master: RunningMaster) -> int:
    """The master's tail seq."""
    client = Client(master.url)
    try:
        return int((await client.get("/status")).json()["tail"])
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_ip_entries_write_list_and_remove(tmp_path: Path) -> None:
    """ban/allow print one-line confirmations, list as tables, and unban/unallow twice exit 0."""
    async with cli_master(tmp_path) as (master, env):
        ban = await ctl(env, "ban", "203.0.113.7", "--reason", "brute force", "--ttl", "600")
        assert (ban.code, ban.out, ban.err) == (0, "banned 203.0.113.7/32 (seq 1)\n", "")
        assert (await ctl(env, "ban", "198.51.100.0/24")).out == "banned 198.51.100.0/24 (seq 2)\n"
        allow = await ctl(env, "allow", "198.51.100.9", "--reason", "monitoring", "--ttl", "2h")
        assert allow.out == "allowed 198.51.100.9/32 (seq 3)\n"

        bans, allows = await ctl_all(env, ["bans"], ["allows"])
        assert bans.code == 0
        header, *rows = bans.out.splitlines()
        assert header.split() == ["IP", "SEQ", "SOURCE", "REASON", "EXPIRES"]
        assert [r.split()[0] for r in rows] == ["198.51.100.0/24", "203.0.113.7/32"]
        assert rows[0].split()[1:] == ["2", "operator:ops", "-", "never"]
        assert re.search(r"1\s+operator:ops\s+brute force\s+in (9m5\ds|10m)$", rows[1])
        assert header.index("SEQ") == rows[0].index(" 2 ") + 1, "columns are aligned"
        assert re.search(
            r"^198\.51\.100\.9/32\s+3\s+operator:ops\s+monitoring\s+in 1h59m",
            allows.out.splitlines()[1],
        )

        unban = await ctl(env, "unban", "203.0.113.7")
        assert (unban.code, unban.out) == (0, "unbanned 203.0.113.7/32 (seq 4)\n")
        again, missing_allow = await ctl_all(
            env, ["unban", "203.0.113.7"], ["unallow", "192.0.2.1"]
        )
        assert (again.code, again.out) == (0, "")
        assert "already absent" in again.err and "203.0.113.7/32" in again.err
        assert (missing_allow.code, missing_allow.out) == (0, "")
        assert "already absent" in missing_allow.err
        unallow = await ctl(env, "unallow", "198.51.100.9/32")
        assert (unallow.code, unallow.out) == (0, "unallowed 198.51.100.9/32 (seq 5)\n")
        empty = await ctl(env, "allows")
        assert (empty.code, empty.out) == (0, "no allow entries\n")
        assert await tail_of(master) == 5


@pytest_twisted.ensureDeferred
async def test_listing_follows_paging_and_filters_by_ip(tmp_path: Path) -> None:
    """bans/allows/revocations follow ``next`` with small pages; ``--ip`` lists covering entries."""
    async with cli_master(tmp_path) as (master, env):
        for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4", "198.51.100.0/24"):
            assert (await ctl(env, "ban", ip)).code == 0
        for ip in ("203.0.113.1", "203.0.113.2", "203.0.113.3"):
            assert (await ctl(env, "allow", ip)).code == 0
        for jti in ("t-1", "t-2"):
            assert (await ctl(env, "revoke-token", jti)).code == 0
        for sub in ("alice", "bob"):
            assert (await ctl(env, "revoke-subject", sub)).code == 0
        bans, covering, allows, revocations, as_json = await ctl_all(
            env,
            ["bans", "--page-size", "2"],
            ["bans", "--ip", "198.51.100.9", "--page-size", "1"],
            ["allows", "--page-size", "1"],
            ["revocations", "--page-size", "1"],
            ["--json", "bans", "--page-size", "3"],
        )
        assert [line.split()[0] for line in bans.out.splitlines()[1:]] == [
            "192.0.2.1/32",
            "192.0.2.2/32",
            "192.0.2.3/32",
            "192.0.2.4/32",
            "198.51.100.0/24",
        ]
        assert [line.split()[0] for line in covering.out.splitlines()[1:]] == ["198.51.100.0/24"]
        assert len(allows.out.splitlines()) == 4
        lines = revocations.out.splitlines()
        assert [line.split()[0] for line in lines if line] == [
            "JTI",
            "t-1",
            "t-2",
            "SUBJECT",
            "alice",
            "bob",
        ]
        assert len(as_json.json()["bans"]) == 5
        none = await ctl(env, "bans", "--ip", "10.1.2.3")
        assert (none.code, none.out) == (0, "no bans cover 10.1.2.3\n")


@pytest_twisted.ensureDeferred
async def test_revocations_and_invalidations(tmp_path: Path) -> None:
    """revoke-token, revoke-subject and invalidate confirm in one line; revocations lists them."""
    async with cli_master(tmp_path) as (master, env):
        token = await ctl(
            env, "revoke-token", "jti-1", "--expires-at", "4102444800", "--reason", "leaked"
        )
        assert (token.code, token.out) == (0, "revoked token jti-1 (seq 1)\n")
        subject = await ctl(env, "revoke-subject", "alice", "--before", "2025-11-22T10:00:00Z")
        assert subject.out == (
            "revoked subject alice: tokens issued before 2025-11-22T10:00:00Z (seq 2)\n"
        )
        purge = await ctl(env, "invalidate", "--tag", "user:1", "--tag", "home", "--soft")
        assert purge.out == "invalidated tags=user:1,home soft (seq 3)\n"
        everything = await ctl(env, "invalidate", "--all", "--key", "example.com/a?b=1")
        assert everything.out == "invalidated keys='example.com/a?b=1' all (seq 4)\n"
        listing = await ctl(env, "revocations")
        assert listing.code == 0
        text = listing.out
        assert re.search(r"^jti-1\s+in \d+d", text, re.M)
        assert re.search(r"^alice\s+2025-11-22T10:00:00Z\s+\S+ ago$", text, re.M)
        doc = (await ctl(env, "--json", "revocations")).json()
        assert doc["revoked_tokens"] == [{"jti": "jti-1", "expires_at": 4102444800}]
        assert doc["revoked_subjects"][0]["sub"] == "alice"


@pytest_twisted.ensureDeferred
async def test_json_output_and_status(tmp_path: Path) -> None:
    """``--json`` prints the server's JSON (before or after the command); status is key: value."""
    async with cli_master(tmp_path) as (master, env):
        ban = await ctl(env, "--json", "ban", "2001:db8::1", "--reason", "scan")
        doc = ban.json()
        assert doc["event"]["ip"] == "2001:db8::1/128"
        assert doc["event"]["type"] == "ip_banned"
        assert doc["offset"] == "0000000000000001"
        after = (await ctl(env, "allow", "192.0.2.1", "--json")).json()
        assert after["event"]["type"] == "ip_allowed"
        bans, status_json, fleet, missing, status = await ctl_all(
            env,
            ["--json", "bans"],
            ["--json", "status"],
            ["--json", "fleet"],
            ["--json", "unban", "192.0.2.200"],
            ["status"],
        )
        assert [b["ip"] for b in bans.json()["bans"]] == ["2001:db8::1/128"]
        assert status_json.json()["tail"] == "0000000000000002"
        assert fleet.json()["subscribers"] == []
        assert missing.code == 0 and missing.json()["error"] == "not_banned"
        fields = dict(line.split(":", 1) for line in status.out.splitlines())
        assert fields["tail"].strip() == "0000000000000002"
        assert fields["log_id"].strip() == status_json.json()["log_id"]
        assert fields["master"].strip() == master.url


@pytest_twisted.ensureDeferred
async def test_errors_have_distinct_exit_codes(tmp_path: Path) -> None:
    """Refused is 1 with the server's error, usage is 2, unreachable is 3; the token never shows."""
    master = await start_master(tmp_path)
    env = cli_env(master.url)
    wrong = cli_env(master.url, token="wrong-token-value")
    token_file = tmp_path / "token"
    token_file.write_text(f"  {OPERATOR_TOKEN}\n\n")
    silent = socket.socket()  # accepts connections (kernel backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        bad_token, reader, no_token, unreachable, invalid_ip, from_file, slow = await gatherResults(
            [
                Deferred.fromCoroutine(ctl(wrong, "ban", "203.0.113.9")),
                Deferred.fromCoroutine(ctl(cli_env(master.url, READER_TOKEN), "ban", "192.0.2.9")),
                Deferred.fromCoroutine(ctl(cli_env(master.url, token=None), "bans")),
                Deferred.fromCoroutine(
                    ctl(env, "--master", f"http://127.0.0.1:{closed_port()}", "status")
                ),
                Deferred.fromCoroutine(ctl(env, "ban", "10.0.0.1/8")),
                Deferred.fromCoroutine(
                    ctl(cli_env(master.url, token="wrong"), "--token-file", str(token_file), "bans")
                ),
                Deferred.fromCoroutine(
                    ctl(env, "--master", silent_url, "--timeout", "0.5", "unban", "192.0.2.1")
                ),
            ]
        )
        assert bad_token.code == 1 and bad_token.out == ""
        assert re.search(r"unauthorized: \S", bad_token.err)
        assert "wrong-token-value" not in bad_token.err
        assert reader.code == 1 and "forbidden: " in reader.err
        assert no_token.code == 1 and "EDGEAUTH_TOKEN" in no_token.err
        assert unreachable.code == 3 and "connection refused" in unreachable.err
        assert invalid_ip.code == 1 and "invalid_ip: " in invalid_ip.err
        assert (from_file.code, from_file.out) == (0, "no bans\n")
        assert slow.code == 3 and "timed out" in slow.err and "may or may not" in slow.err

        usage = await ctl_all(
            env,
            [],
            ["ban"],
            ["ban", "192.0.2.1", "--ttl", "soon"],
            ["invalidate", "--soft"],
            ["tail", "--offset", "yesterday"],
            ["--master", "ftp://example.com", "status"],
            ["--token-file", str(tmp_path / "absent"), "status"],
            ["revoke-subject", "alice", "--before", "last week"],
            ["explain", "192.0.2.1"],
            ["explain", "--edge", "http://127.0.0.1:1", "192.0.2.1", "--url", "x"],
            ["frobnicate"],
        )
        assert [u.code for u in usage] == [2] * len(usage), [u.err for u in usage]
        assert all("usage:" in u.err for u in usage)
        assert "at least one of --tag, --key, --prefix or --all" in usage[3].err
        assert "cannot read token file" in usage[6].err
        assert await tail_of(master) == 0, "no usage error reached the master"
    finally:
        silent.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_tail_follows_the_stream_across_cycles_until_ctrl_c(tmp_path: Path) -> None:
    """``tail`` prints each live event once, reconnects when cycled, exits 0 on SIGINT."""
    master = await start_master(tmp_path, sse_cycle=1.5)
    client = Client(master.url)
    collector, process = spawn_ctl(cli_env(master.url), "tail")
    try:

        async def cycled() -> float:
            text = (await client.get("/metrics")).body.decode()
            match = re.search(r"^edgeauth_master_sse_cycled_total (\S+)$", text, re.M)
            return float(match.group(1)) if match else 0.0

        for _ in range(200):
            fleet = (await client.get("/fleet")).json()["subscribers"]
            if any(m["mode"] == "sse" and m["connected"] for m in fleet):
                break
            await deferLater(reactor, 0.05, lambda: None)
        else:
            raise AssertionError(f"tail never connected: {collector.err!r}")
        assert fleet[0]["edge_id"].startswith("edgeauthctl@")
        first = await client.post("/ban/ip", {"ip": "203.0.113.7", "reason": "brute force"})
        assert first.code == 201
        await until(lambda: len(collector.lines) >= 1)
        before = await cycled()
        for _ in range(100):
            if await cycled() > before:
                break
            await deferLater(reactor, 0.05, lambda: None)
        else:
            raise AssertionError("the master never cycled the stream")
        second = await client.post("/revoke/subject", {"sub": "alice", "before": 1763850000})
        assert second.code == 201
        await until(lambda: len(collector.lines) >= 2)
        await deferLater(reactor, 0.3, lambda: None)  # nothing printed twice
        assert collector.lines == [
            "1 ip_banned 203.0.113.7/32 reason='brute force' expires=never operator:ops",
            "2 subject_revoked sub=alice before=2025-11-22T22:20:00Z operator:ops",
        ]
        assert await stop_child(collector, process) == 0
        assert b"reconnecting" not in collector.err, collector.err
    finally:
        kill_child(collector, process)
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_tail_json_from_an_offset_survives_a_master_restart(tmp_path: Path) -> None:
    """``tail --json --offset N`` replays after N, then resumes from its offset after a restart."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    env = cli_env(master.url)
    collector, process = None, None
    try:
        for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            assert (await client.post("/ban/ip", {"ip": ip})).code == 201
        collector, process = spawn_ctl(env, "--json", "tail", "--offset", "1")
        await until(lambda: len(collector.lines) >= 2)
        assert (await client.post("/invalidate", {"tags": ["t"]})).code == 201
        await until(lambda: len(collector.lines) >= 3)

        port = master.port
        await client.close()
        await master.stop()
        master = await start_master(tmp_path, listen=f"tcp:{port}:interface=127.0.0.1")
        client = Client(master.url)
        assert (await client.post("/unban/ip", {"ip": "192.0.2.1"})).code == 201
        await until(lambda: len(collector.lines) >= 4)
        events = [json.loads(line) for line in collector.lines]
        assert [e["seq"] for e in events] == [2, 3, 4, 5]
        assert events[0]["ip"] == "192.0.2.2/32"
        assert events[2]["type"] == "cache_invalidated" and events[2]["tags"] == ["t"]
        assert events[3]["type"] == "ip_unbanned"
        assert b"reconnecting from offset 0000000000000004" in collector.err
        assert await stop_child(collector, process) == 0

        refused = await ctl(cli_env(master.url, token="nope"), "tail")
        assert refused.code == 1 and "unauthorized: " in refused.err
        gone = await ctl(env, "--master", f"http://127.0.0.1:{closed_port()}", "tail")
        assert gone.code == 3
    finally:
        kill_child(collector, process)
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_explain_against_a_real_edge_admin_listener(tmp_path: Path) -> None:
    """``explain --edge`` shows the verdict and the matching entries of a synced edge."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    env = cli_env(master.url)
    store = EdgeStore(str(tmp_path / "e.sqlite3"), reactor)
    state = EdgeState(store, reactor, "e1")
    await state.load()
    metrics = EdgeMetrics()
    sub = Subscriber(reactor, state, [master.url], EDGE_TOKEN, "e1", metrics)
    sub.start()
    port = None
    try:
        await sub.first_sync
        site = Site(AdminResource(state, sub, metrics, reactor, max_lag=30))
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
        admin = f"http://127.0.0.1:{port.getHost().port}"
        ban = await ctl(env, "ban", "198.51.100.7", "--reason", "credential stuffing")
        net = await ctl(env, "ban", "198.51.100.0/24", "--reason", "abuse", "--ttl", "600")
        assert (ban.code, net.code) == (0, 0)
        await until(lambda: state.offset >= 2)

        refused, served, url, as_json, fleet = await ctl_all(
            env,
            ["explain", "--edge", admin, "198.51.100.7"],
            ["explain", "--edge", admin, "192.0.2.55"],
            ["explain", "--edge", admin, "--url", "example.com/a?b=1"],
            ["--json", "explain", "--edge", admin, "198.51.100.7"],
            ["fleet"],
        )
        lines = refused.out.splitlines()
        assert refused.code == 0
        assert re.match(r"198\.51\.100\.7: refused \(ref [12]\)$", lines[0])
        assert lines[1].split() == ["KIND", "NETWORK", "SEQ", "SOURCE", "REASON", "EXPIRES"]
        rows = sorted(lines[2:])
        assert re.match(r"ban\s+198\.51\.100\.0/24\s+2\s+operator:ops\s+abuse\s+in", rows[0])
        assert re.match(
            r"ban\s+198\.51\.100\.7/32\s+1\s+operator:ops\s+credential stuffing\s+never$", rows[1]
        )
        assert served.out == "192.0.2.55: served\nno matching allow or ban entries\n"
        assert url.out == "url: example.com/a?b=1\ncache: no entry for this URL\n"
        doc = as_json.json()
        assert doc["verdict"] == "refused" and {b["seq"] for b in doc["bans"]} == {1, 2}
        assert fleet.code == 0 and re.search(r"^e1\s+127\.0\.0\.1\s+sse\s+yes", fleet.out, re.M)

        bad_ip, closed = await ctl_all(
            env,
            ["explain", "--edge", admin, "not-an-ip"],
            ["explain", "--edge", f"http://127.0.0.1:{closed_port()}", "192.0.2.1"],
        )
        assert bad_ip.code == 1 and "invalid_ip: " in bad_ip.err
        assert closed.code == 3
    finally:
        if port is not None:
            await port.stopListening()
        await sub.stop()
        await store.close()
        await client.close()
        await master.stop()
