"""The master as operators run it: ``twistd -n edgeauth-master`` in a subprocess, over real HTTP."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
OPERATOR_TOKEN = "operator-token-for-process-tests"
EDGE_TOKEN = "edge-token-for-process-tests"
START_TIMEOUT = 20.0
LISTENING = re.compile(
    r"edgeauth master listening on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\), "
    r"log (\w+) at seq (\d+)"
)
BANS = 200
IN_FLIGHT = 24
KILL_AFTER = 100
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def child_env(**extra: str) -> dict[str, str]:
    """Return the environment of a child: ours without PYTHONPATH, plus the test tokens."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(EDGEAUTH_OPERATOR_TOKEN=OPERATOR_TOKEN, EDGEAUTH_EDGE_TOKEN=EDGE_TOKEN, **extra)
    return env


def write_ini(directory: Path, name: str = "master.ini", **master: str) -> Path:
    """Write a master ini file (port 0 on 127.0.0.1, database in ``directory``)."""
    values = {
        "listen": "tcp:0:interface=127.0.0.1",
        "database": str(directory / "master.sqlite3"),
        **master,
    }
    lines = ["[master]", *(f"{key} = {value}" for key, value in values.items())]
    lines += [
        "[tokens]",
        "ops = operator env:EDGEAUTH_OPERATOR_TOKEN",
        "edges = edge env:EDGEAUTH_EDGE_TOKEN",
    ]
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    return path


class MasterProcess:
    """One ``twistd -n edgeauth-master`` child, its log file and its port."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.port = 0
        self.log_id = ""
        self.start_seq = -1

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self) -> None:
        """Wait for the "listening" log line, then until ``/healthz`` answers 200."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = LISTENING.search(self.output)
            if found:
                self.port, self.log_id = int(found.group(1)), found.group(2)
                self.start_seq = int(found.group(3))
                break
            if self.proc.poll() is not None:
                pytest.fail(f"master exited with {self.proc.returncode}:\n{self.output}")
            time.sleep(0.05)
        else:
            pytest.fail(f"master did not say where it listens:\n{self.output}")
        while time.monotonic() < deadline:
            try:
                status, _, _ = self.request("GET", "/healthz", token=None)
            except OSError:
                status = 0
            if status == 200:
                return
            time.sleep(0.05)
        pytest.fail(f"/healthz never answered 200:\n{self.output}")

    def connection(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(
        self, method: str, path: str, body: Any = None, token: str | None = OPERATOR_TOKEN
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request on a fresh connection; return status, headers and body."""
        conn = self.connection()
        try:
            return send(conn, method, path, body, token)
        finally:
            conn.close()

    def stop(self) -> None:
        """Kill the child by its PID if it still runs, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def send(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = OPERATOR_TOKEN,
) -> tuple[int, dict[str, str], bytes]:
    """Send one request on ``conn`` (kept alive) and read the whole answer."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    content = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, content


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Start masters with ``spawn(ini)``; every one still running is killed at teardown."""
    started: list[MasterProcess] = []

    def start(ini: Path, *args: str, wait: bool = True) -> MasterProcess:
        log_path = tmp_path / f"twistd-{len(started)}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "edgeauth-master", "--config", str(ini), *args],
                cwd=tmp_path,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        master = MasterProcess(proc, log_path)
        started.append(master)
        if wait:
            master.wait_listening()
        return master

    yield start
    for master in started:
        master.stop()


def read_whole_log(master: MasterProcess) -> tuple[list[dict[str, Any]], str]:
    """Read every retained event from offset -1, following ``Stream-Next-Offset``."""
    events: list[dict[str, Any]] = []
    offset = "-1"
    conn = master.connection()
    try:
        for _ in range(1000):
            status, headers, body = send(conn, "GET", f"/v1/stream/events?offset={offset}")
            assert status == 200, body
            events.extend(json.loads(body))
            offset = headers["stream-next-offset"]
            if headers.get("stream-up-to-date") == "true":
                return events, headers["edgeauth-log-id"]
        pytest.fail("the stream never said it was up to date")
    finally:
        conn.close()


def test_twistd_finds_plugins_from_site_packages(tmp_path: Path) -> None:
    """``twistd --help`` run outside the repo lists both plugins of the installed package."""
    help_run = subprocess.run(
        [TWISTD, "--help"], cwd=tmp_path, env=child_env(), capture_output=True, timeout=30
    )
    assert help_run.returncode == 0, help_run.stderr
    listed = help_run.stdout.decode()
    assert re.search(r"^\s+edgeauth-master\s", listed, re.MULTILINE), listed
    assert re.search(r"^\s+edgeauth-edge\s", listed, re.MULTILINE), listed
    where = subprocess.run(
        [str(BIN / "python"), "-c", "import edgeauth; print(edgeauth.__file__)"],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        timeout=30,
        check=True,
    )
    location = Path(where.stdout.decode().strip()).resolve()
    assert "site-packages" in location.parts, location
    assert not location.is_relative_to(ROOT / "edgeauth"), location


def test_acknowledged_bans_survive_sigkill(tmp_path: Path, spawn: Any) -> None:
    """Bans acknowledged before a SIGKILL mid-load are all in the log after restart, in order."""
    ini = write_ini(tmp_path)
    master = spawn(ini)
    ips = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(BANS)]
    acked: dict[str, int] = {}
    lock = threading.Lock()
    enough = threading.Event()
    local = threading.local()

    def ban(ip: str) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = master.connection(timeout=10)
        try:
            status, _, body = send(conn, "POST", "/ban/ip", {"ip": ip, "reason": "sigkill test"})
        except (OSError, http.client.HTTPException):
            conn.close()
            local.conn = None
            return
        assert status == 201, body
        event = json.loads(body)["event"]
        with lock:
            acked[event["ip"]] = event["seq"]
            if len(acked) >= KILL_AFTER:
                enough.set()

    with ThreadPoolExecutor(max_workers=IN_FLIGHT) as pool:
        futures = [pool.submit(ban, ip) for ip in ips]
        assert enough.wait(START_TIMEOUT), "the master never acknowledged enough bans"
        os.kill(master.proc.pid, signal.SIGKILL)
        with lock:
            acked_at_kill = len(acked)
        for future in futures:
            future.result(timeout=30)
    master.proc.wait(timeout=10)
    assert master.proc.returncode == -signal.SIGKILL
    assert acked_at_kill < BANS, "every ban was acknowledged before the kill; nothing in flight"
    assert len(acked) < BANS, "the kill cut no request short"

    restarted = spawn(ini)
    assert restarted.log_id == master.log_id
    events, log_id = read_whole_log(restarted)
    assert log_id == master.log_id
    seqs = [event["seq"] for event in events]
    assert seqs == list(range(1, len(events) + 1)), "seqs must be 1..N, contiguous and in order"
    assert restarted.start_seq == len(events)
    by_ip = {event["ip"]: event["seq"] for event in events}
    assert len(by_ip) == len(events), "every logged ban is a distinct request"
    assert set(by_ip) <= {f"{ip}/32" for ip in ips}
    for ip, seq in acked.items():
        assert by_ip.get(ip) == seq, f"acknowledged ban {ip} (seq {seq}) lost or renumbered"
    assert all(event["type"] == "ip_banned" for event in events)

    status, _, body = restarted.request("GET", "/v1/snapshot")
    assert status == 200, body
    snapshot = json.loads(body)
    assert snapshot["log_id"] == master.log_id
    assert snapshot["offset"] == f"{len(events):016d}"
    in_snapshot = {entry["ip"]: entry["seq"] for entry in snapshot["bans"]}
    for ip, seq in acked.items():
        assert in_snapshot.get(ip) == seq, f"acknowledged ban {ip} missing from the snapshot"


def test_form_posts_get_json_errors(tmp_path: Path, spawn: Any) -> None:
    """Form bodies are not parsed by twisted.web: a broken multipart POST gets JSON 415, not 400."""
    master = spawn(write_ini(tmp_path))
    conn = master.connection()
    try:
        for content_type in FORM_TYPES:
            conn.putrequest("POST", "/ban/ip")
            conn.putheader("Authorization", f"Bearer {OPERATOR_TOKEN}")
            conn.putheader("Content-Type", content_type)
            conn.putheader("Content-Length", "9")
            conn.endheaders(b"--x\r\njunk")
            response = conn.getresponse()
            body = response.read()
            assert response.status == 415, body
            assert response.getheader("Content-Type") == "application/json"
            assert json.loads(body)["error"] == "unsupported_media_type"
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("master_keys", "env_drop", "section", "key", "why"),
    [
        ({"bogus": "1"}, None, "master", "bogus", "unknown key"),
        ({"listen": "tcpx:4000"}, None, "master", "listen", "not a valid Twisted endpoint"),
        ({"listen": "tcp:70000"}, None, "master", "listen", "port must be from 0 to 65535"),
        ({}, "EDGEAUTH_EDGE_TOKEN", "tokens", "edges", "is not set"),
    ],
)
def test_bad_configuration_stops_startup(
    tmp_path: Path,
    master_keys: dict[str, str],
    env_drop: str | None,
    section: str,
    key: str,
    why: str,
) -> None:
    """A bad ini stops twistd with one line naming file, section and key, and a non-zero exit."""
    ini = write_ini(tmp_path, **master_keys)
    env = {k: v for k, v in child_env().items() if k != env_drop}
    run = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "edgeauth-master", "--config", str(ini)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=30,
    )
    output = (run.stdout + run.stderr).decode()
    assert run.returncode != 0, output
    lines = [line for line in output.splitlines() if f"[{section}] {key}:" in line]
    assert len(lines) == 1, output
    assert f"{ini}: [{section}] {key}: " in lines[0] and why in lines[0], lines[0]
    assert "Traceback" not in output
    assert not (tmp_path / "master.sqlite3").exists(), "nothing may be opened on bad settings"


@pytest.mark.parametrize("problem", ["port_taken", "database_path"])
def test_start_failure_exits_non_zero(tmp_path: Path, problem: str) -> None:
    """A listener or database that cannot open ends twistd at once: one error line, status 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if problem == "port_taken":
            ini = write_ini(tmp_path, listen=f"tcp:{port}:interface=127.0.0.1")
            expected = f"127.0.0.1:{port}: [Errno 98] Address already in use"
        else:  # a directory that cannot be created; this used to leave the process hanging
            (tmp_path / "file").write_text("")
            ini = write_ini(tmp_path, database=str(tmp_path / "file" / "master.sqlite3"))
            expected = str(tmp_path / "file")
        run = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "edgeauth-master", "--config", str(ini)],
            cwd=tmp_path,
            env=child_env(),
            capture_output=True,
            timeout=30,
        )
    output = (run.stdout + run.stderr).decode()
    assert run.returncode == 1, output
    failed = [line for line in output.splitlines() if "edgeauth master failed to start" in line]
    assert len(failed) == 1 and expected in failed[0], output
    assert "Traceback" not in output
    assert "Server Shut Down." in output


def test_sigterm_shuts_down_cleanly(tmp_path: Path, spawn: Any) -> None:
    """SIGTERM with a live SSE reader stops the master in seconds; the database reopens intact."""
    ini = write_ini(tmp_path)
    master = spawn(ini)
    status, _, body = master.request("POST", "/ban/ip", {"ip": "203.0.113.9", "reason": "x"})
    assert status == 201, body
    with socket.create_connection(("127.0.0.1", master.port), timeout=10) as reader:
        reader.sendall(
            b"GET /v1/stream/events?offset=-1&live=sse HTTP/1.1\r\nHost: t\r\n"
            b"Authorization: Bearer " + OPERATOR_TOKEN.encode() + b"\r\n\r\n"
        )
        received = b""
        while b"event: control" not in received:
            chunk = reader.recv(65536)
            assert chunk, "the SSE stream ended early"
            received += chunk
        started = time.monotonic()
        master.proc.send_signal(signal.SIGTERM)
        master.proc.wait(timeout=10)
        elapsed = time.monotonic() - started
        while chunk := reader.recv(65536):  # the master closed the stream: EOF, not a hang
            pass
    # twistd re-raises the signal after an orderly shutdown, so the status is -SIGTERM, which
    # supervisors (systemd, s6) count as a clean stop; 0 is accepted too.
    assert master.proc.returncode in (0, -signal.SIGTERM), master.output
    assert elapsed < 5.0
    assert "Server Shut Down." in master.output
    assert "Traceback" not in master.output
    database = tmp_path / "master.sqlite3"
    assert not Path(f"{database}-wal").exists(), "the last connection closed and checkpointed"
    with closing(sqlite3.connect(database)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    reopened = spawn(ini)
    assert reopened.log_id == master.log_id and reopened.start_seq == 1
    events, _ = read_whole_log(reopened)
    assert [(e["seq"], e["ip"]) for e in events] == [(1, "203.0.113.9/32")]
