"""The backup and restore procedure of docs/operations.md, on a running master (twistd subprocess).

A backup taken with the ``sqlite3`` CLI (``.backup`` and ``VACUUM INTO``) while the master runs and
writes holds every acknowledged event up to that moment and passes ``integrity_check``; restoring
it with a new log id gives a master that serves exactly the backed-up state under a new
``Edgeauth-Log-Id`` (so edges re-bootstrap). Run ``make install`` first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from edgeauth.demo import request

ROOT = Path(__file__).resolve().parents[2]
TWISTD = ROOT / ".venv" / "bin" / "twistd"
SQLITE3 = shutil.which("sqlite3")
TOKEN = "ops-backup-test-operator-token"
NEW_LOG_ID = "UPDATE meta SET value = lower(hex(randomblob(8))) WHERE key = 'log_id'"

pytestmark = pytest.mark.skipif(SQLITE3 is None, reason="the sqlite3 CLI is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Master:
    """``twistd -n edgeauth-master`` on a free port, stopped by its PID."""

    def __init__(self, tmp_path: Path, database: Path, extra: str = "") -> None:
        self.port = free_port()
        ini = tmp_path / "master.ini"
        ini.write_text(
            f"[master]\nlisten = tcp:{self.port}:interface=127.0.0.1\ndatabase = {database}\n"
            f"{extra}[tokens]\nops = operator env:EDGEAUTH_OPERATOR_TOKEN\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["EDGEAUTH_OPERATOR_TOKEN"] = TOKEN
        self.log = (tmp_path / f"master-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "edgeauth-master", "--config", str(ini)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, "the master exited while starting"
            try:
                if request("GET", self.port, "/readyz", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the master did not become ready"
            time.sleep(0.05)  # bounded polling of a subprocess

    def ban(self, ip: str) -> None:
        status, _, body = request("POST", self.port, "/ban/ip", body={"ip": ip}, token=TOKEN)
        assert status == 201, body

    def status(self) -> dict[str, object]:
        status, _, body = request("GET", self.port, "/status", token=TOKEN)
        assert status == 200, body
        doc: dict[str, object] = json.loads(body)
        return doc

    def bans(self) -> list[str]:
        status, _, body = request("GET", self.port, "/bans", token=TOKEN)
        assert status == 200, body
        return sorted(entry["ip"] for entry in json.loads(body)["bans"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def masters() -> Iterator[list[Master]]:
    started: list[Master] = []
    yield started
    for master in started:
        master.stop()


def sqlite(database: Path, command: str) -> str:
    assert SQLITE3 is not None
    run = subprocess.run(
        [SQLITE3, str(database), command], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_backup_while_running_and_restore_with_a_new_log_id(
    tmp_path: Path, masters: list[Master]
) -> None:
    assert TWISTD.exists(), "run make install first"
    database = tmp_path / "state" / "master.sqlite3"
    master = Master(tmp_path, database)
    masters.append(master)
    for i in range(1, 6):
        master.ban(f"198.51.100.{i}")

    backup, vacuumed = tmp_path / "backup.sqlite3", tmp_path / "vacuumed.sqlite3"
    sqlite(database, f".backup '{backup}'")
    sqlite(database, f"VACUUM INTO '{vacuumed}'")
    master.ban("203.0.113.99")  # after the backup: lost by a restore, as documented
    old_log_id = master.status()["log_id"]

    for copy in (backup, vacuumed):
        assert sqlite(copy, "PRAGMA integrity_check") == "ok"
        with closing(sqlite3.connect(copy)) as conn:
            assert conn.execute("SELECT count(*) FROM events").fetchone() == (5,)

    master.stop()
    shutil.copy(backup, database)
    for suffix in ("-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    sqlite(database, NEW_LOG_ID)

    restored = Master(tmp_path, database)
    masters.append(restored)
    status = restored.status()
    assert status["tail"] == "0000000000000005"
    assert status["log_id"] != old_log_id
    assert restored.bans() == [f"198.51.100.{i}/32" for i in range(1, 6)]
    status_code, headers, _ = request("GET", restored.port, "/v1/snapshot", token=TOKEN)
    assert status_code == 200
    assert headers["edgeauth-log-id"] == status["log_id"]
