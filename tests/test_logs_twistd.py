"""The log formats as operators get them: ``twistd -n edgeauth-master`` in a subprocess.

JSON lines are selected by ``--json-logs``, by ``[logging] format = json`` or by twistd's own
``--logger edgeauth.logs.json_logger``; text lines are the default. The child runs this working
tree (``PYTHONPATH``); its standard output is read by a thread into a queue, and every wait is a
bounded ``Queue.get`` (no sleeping).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TWISTD = str(Path(sys.executable).parent / "twistd")
OPERATOR_TOKEN = "operator-token-for-the-log-format-tests"
TIMEOUT = 20.0
PORT = re.compile(r"edgeauth master listening on IPv4Address\(.*port=(\d+)\)")


class Child:
    """A twistd child whose output lines arrive in a queue."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(PYTHONPATH=str(ROOT), EDGEAUTH_OPERATOR_TOKEN=OPERATOR_TOKEN)
        self.proc = subprocess.Popen(
            [TWISTD, *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._queue.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, condition: Callable[[str], bool], what: str) -> str:
        """Return the first new line for which ``condition`` holds; fail after ``TIMEOUT``."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"timed out waiting for {what}:\n" + "\n".join(self.lines))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"twistd ended before {what}:\n" + "\n".join(self.lines))
            self.lines.append(line)
            if condition(line):
                return line

    def stop(self) -> int:
        """SIGTERM, then read what is left; return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=TIMEOUT)
        while True:
            line = self._queue.get(timeout=TIMEOUT)
            if line is None:
                return status
            self.lines.append(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def start(*args: str) -> Child:
        child = Child(list(args), tmp_path)
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()


def write_ini(tmp_path: Path, log_format: str | None = None) -> str:
    lines = [
        "[master]",
        "listen = tcp:0:interface=127.0.0.1",
        f"database = {tmp_path / 'master.sqlite3'}",
        "access_log = twistd",  # the access line in the process log is checked too
        "[tokens]",
        "ops = operator env:EDGEAUTH_OPERATOR_TOKEN",
    ]
    if log_format is not None:
        lines += ["[logging]", f"format = {log_format}"]
    path = tmp_path / "master.ini"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def post_ban(port: int, token: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        body = json.dumps({"ip": "203.0.113.50", "reason": "log formats"})
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request("POST", "/ban/ip", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def as_json(line: str) -> dict[str, Any]:
    doc = json.loads(line)
    assert isinstance(doc, dict), line
    return doc


@pytest.mark.parametrize(
    "how",
    ["--json-logs", "ini", "--logger"],
)
def test_json_lines_from_twistd(tmp_path: Path, spawn: Callable[..., Child], how: str) -> None:
    """Every output line is a JSON object; the ban is logged once, with its source, no token."""
    ini = write_ini(tmp_path, "json" if how == "ini" else None)
    args = ["-n", "--pidfile=", "edgeauth-master", "--config", ini]
    if how == "--json-logs":
        args.append("--json-logs")
    elif how == "--logger":
        args = ["--logger", "edgeauth.logs.json_logger", *args]
    child = spawn(*args)
    listening = as_json(child.wait_for(lambda line: "edgeauth master listening" in line, "listen"))
    assert listening["namespace"] == "edgeauth.master.service"
    assert listening["level"] == "info"
    assert listening["tail"] == 0 and len(listening["log_id"]) > 8, listening
    found = PORT.search(listening["message"])
    assert found, listening
    port = int(found.group(1))

    assert post_ban(port, "a-wrong-token-for-the-log-test") == 401
    assert post_ban(port, OPERATOR_TOKEN) == 201
    access = '"POST /ban/ip HTTP/1.1" 201'
    child.wait_for(lambda line: access in as_json(line)["message"], "the access log line")
    assert child.stop() == -signal.SIGTERM  # twistd ends by the signal that stopped it

    docs = [as_json(line) for line in child.lines]  # every line: one JSON object
    bans = [d for d in docs if d.get("type") == "ip_banned"]
    assert len(bans) == 1, bans
    assert bans[0]["source"] == "operator:ops" and bans[0]["seq"] == 1
    assert bans[0]["message"] == "ip_banned ip=203.0.113.50/32 by operator:ops (seq 1)"
    assert any(d["message"] == "Server Shut Down." for d in docs)
    output = "\n".join(child.lines)
    assert OPERATOR_TOKEN not in output and "a-wrong-token-for-the-log-test" not in output


def test_text_lines_by_default(tmp_path: Path, spawn: Callable[..., Child]) -> None:
    child = spawn("-n", "--pidfile=", "edgeauth-master", "--config", write_ini(tmp_path))
    line = child.wait_for(lambda line: "edgeauth master listening" in line, "listen")
    assert "[edgeauth.master.service#info] edgeauth master listening on" in line
    found = PORT.search(line)
    assert found, line
    assert post_ban(int(found.group(1)), OPERATOR_TOKEN) == 201
    child.wait_for(lambda line: "by operator:ops (seq 1)" in line, "the ban line")
    assert child.stop() == -signal.SIGTERM  # twistd ends by the signal that stopped it
    for line in child.lines:
        assert not line.startswith("{"), line
    assert OPERATOR_TOKEN not in "\n".join(child.lines)
