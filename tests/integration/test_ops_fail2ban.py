"""Debian's fail2ban with ``etc/fail2ban/action.d/edgeauth.conf`` feeds a real fleet.

A real ``fail2ban-server`` (started in the foreground by ``fail2ban-client -f``, with a config
directory, socket, pid file and log of its own under ``tmp_path``) watches a test log with the
``polling`` backend. A matching line makes it run the action, which calls the installed
``edgeauthctl`` against a real master (a subprocess, like the three edges and the origin: the demo's
fleet on free ports). The client bound to 127.0.0.2 then gets 403 from every edge. Run
``make install`` first. Skipped only when fail2ban is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeauth.demo import EDGE_IDS, Fleet, free_ports, request

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
ACTION = ROOT / "etc" / "fail2ban" / "action.d" / "edgeauth.conf"
CLIENT = "127.0.0.2"
IPV6_OFFENDER = "2001:db8:1:2::7"
IPV6_NEIGHBOUR = "2001:db8:1:2:ffff::1"  # same /64
DEADLINE = 30.0

FAIL2BAN_CLIENT = shutil.which("fail2ban-client")
pytestmark = pytest.mark.skipif(
    FAIL2BAN_CLIENT is None or shutil.which("fail2ban-server") is None,
    reason="fail2ban is not installed (.ci/run installs Debian's fail2ban)",
)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A master, three edges and the demo origin as subprocesses on free ports."""
    fleet = Fleet.prepare(tmp_path / "var", tmp_path / "var", free_ports())
    try:
        fleet.start(timeout=60)
        yield fleet
    finally:
        fleet.stop()


def write_config(tmp_path: Path, fleet: Fleet) -> tuple[Path, Path, Path]:
    """A fail2ban config dir with one jail using the edgeauth action; (conf, socket, log)."""
    conf = tmp_path / "fail2ban"
    (conf / "action.d").mkdir(parents=True)
    (conf / "filter.d").mkdir()
    shutil.copy(ACTION, conf / "action.d" / "edgeauth.conf")
    sock, log, app_log = tmp_path / "f2b.sock", tmp_path / "fail2ban.log", tmp_path / "app.log"
    app_log.write_text("")
    (conf / "fail2ban.conf").write_text(
        "[Definition]\n"
        "loglevel = DEBUG\n"
        f"logtarget = {log}\n"
        f"socket = {sock}\n"
        f"pidfile = {tmp_path / 'f2b.pid'}\n"
        "dbfile = :memory:\n"
    )
    (conf / "filter.d" / "edgeauth-test.conf").write_text(
        "[Definition]\n"
        "failregex = ^auth failure from <HOST>$\n"
        "ignoreregex =\n"
        "datepattern = {NONE}\n"
    )
    edgeauthctl = BIN / "edgeauthctl"
    python = BIN / "python" if (BIN / "python").exists() else Path(sys.executable)
    master = f"http://127.0.0.1:{fleet.ports.master}"
    (conf / "jail.conf").write_text(
        "[DEFAULT]\n"
        "backend = polling\n"
        "ignoreself = false\n"
        "ignoreip =\n"
        "[edgeauth-test]\n"
        "enabled = true\n"
        "filter = edgeauth-test\n"
        f"logpath = {app_log}\n"
        "maxretry = 1\n"
        "findtime = 600\n"
        "bantime = 600\n"
        f'action = edgeauth[master="{master}", token_file="{fleet.var / "operator.token"}", '
        f'edgeauthctl="{edgeauthctl}", python="{python}"]\n'
    )
    return conf, sock, log


def client(conf: Path, sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``fail2ban-client`` against the test server."""
    assert FAIL2BAN_CLIENT is not None
    return subprocess.run(
        [FAIL2BAN_CLIENT, "-c", str(conf), "-s", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def statuses(fleet: Fleet) -> list[int]:
    """What every edge answers the client at 127.0.0.2."""
    return [request("GET", port, "/products/1", source=CLIENT)[0] for port in fleet.ports.edges]


def explain(fleet: Fleet, ip: str) -> dict[str, object]:
    """edge-a's /explain for ``ip``."""
    status, _, body = request("GET", fleet.ports.admins[0], f"/explain?ip={ip}")
    assert status == 200, body
    doc: dict[str, object] = json.loads(body)
    return doc


def wait_for(condition: object, what: str, log: Path) -> None:
    """Poll ``condition()`` until true, for at most DEADLINE seconds (fail2ban polls each 1 s)."""
    assert callable(condition)
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            text = log.read_text(errors="replace") if log.exists() else "(no fail2ban log)"
            pytest.fail(f"timed out waiting for {what}; fail2ban log:\n{text[-4000:]}")
        time.sleep(0.05)  # bounded polling of a subprocess, deadline above


@pytest.fixture
def fail2ban(tmp_path: Path, fleet: Fleet) -> Iterator[tuple[Path, Path, Path]]:
    """A running fail2ban server for ``fleet``; stopped (by its PID if need be) at the end."""
    assert FAIL2BAN_CLIENT is not None
    conf, sock, log = write_config(tmp_path, fleet)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(
        [FAIL2BAN_CLIENT, "-c", str(conf), "-s", str(sock), "-x", "-f", "start"],
        stdin=subprocess.DEVNULL,
        stdout=(tmp_path / "fail2ban.out").open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:

        def jail_up() -> bool:
            if server.poll() is not None:
                out = (tmp_path / "fail2ban.out").read_text(errors="replace")
                pytest.fail(f"fail2ban exited with {server.returncode}:\n{out}")
            return client(conf, sock, "status", "edgeauth-test").returncode == 0

        wait_for(jail_up, "the fail2ban jail to start", log)
        yield conf, sock, log
    finally:
        if server.poll() is None:
            client(conf, sock, "stop")
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.send_signal(signal.SIGKILL)
                server.wait()


def test_a_matching_log_line_ends_in_403_on_every_edge(
    tmp_path: Path, fleet: Fleet, fail2ban: tuple[Path, Path, Path]
) -> None:
    """fail2ban → action → edgeauthctl ban → master → every edge refuses 127.0.0.2."""
    conf, sock, log = fail2ban
    assert statuses(fleet) == [200] * len(EDGE_IDS)
    app_log = tmp_path / "app.log"
    with app_log.open("a") as stream:
        stream.write(f"auth failure from {CLIENT}\n")

    wait_for(lambda: statuses(fleet) == [403] * len(EDGE_IDS), "403 on every edge", log)
    (ban,) = explain(fleet, CLIENT)["bans"]  # type: ignore[misc]
    assert ban["ip"] == f"{CLIENT}/32"
    assert ban["reason"] == "fail2ban edgeauth-test"
    assert ban["source"] == "operator:ops"
    assert 590 < ban["expires_in"] <= 600, ban  # the jail's bantime became --ttl

    # IPv6 offenders are banned by their /64 (ipv6_prefix = 64 by default).
    with app_log.open("a") as stream:
        stream.write(f"auth failure from {IPV6_OFFENDER}\n")
    wait_for(
        lambda: explain(fleet, IPV6_NEIGHBOUR)["verdict"] == "refused",
        "the /64 of the IPv6 offender to be banned",
        log,
    )
    (ban6,) = explain(fleet, IPV6_NEIGHBOUR)["bans"]  # type: ignore[misc]
    assert ban6["ip"] == "2001:db8:1:2::/64"

    # fail2ban's unban lifts the ban on every edge.
    done = client(conf, sock, "unban", CLIENT)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for(lambda: statuses(fleet) == [200] * len(EDGE_IDS), "200 again on every edge", log)

    # An entry that already expired (here: removed at the master) unbans with exit status 0.
    token = (fleet.var / "operator.token").read_text().strip()
    status, _, body = request(
        "POST", fleet.ports.master, "/unban/ip", body={"ip": "2001:db8:1:2::/64"}, token=token
    )
    assert status == 201, body
    done = client(conf, sock, "unban", IPV6_OFFENDER)
    assert done.returncode == 0, done.stdout + done.stderr

    def absent_noted() -> re.Match[str] | None:
        return re.search(
            r"(\w+) -- stderr: '.*no ban entry for 2001:db8:1:2::/64 \(already absent",
            log.read_text(errors="replace"),
        )

    wait_for(absent_noted, "the IPv6 unban action to run", log)
    text = log.read_text(errors="replace")
    noted = absent_noted()
    assert noted is not None
    assert f"{noted.group(1)} -- returned successfully 0" in text, text[-3000:]
    # Errors of the action's commands (the jail-status polls while starting may log others).
    failures = [
        line
        for line in text.splitlines()
        if (" ERROR " in line and ("fail2ban.utils" in line or "fail2ban.actions" in line))
        or ("-- returned " in line and "successfully" not in line)
    ]
    assert failures == [], "\n".join(failures)
    assert explain(fleet, IPV6_NEIGHBOUR)["verdict"] == "served"
