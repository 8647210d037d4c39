"""``python -m edgeauth.demo`` (``make run`` / ``make demo``) as a person runs it.

Every test starts the real supervisor as a subprocess on free ports (``--ports auto``) with its
files under ``tmp_path`` (``--var``), so a developer's ``make run`` is never disturbed; the master,
the three edges (``twistd`` of this venv: run ``make install`` first) and the demo origin are its
own subprocesses. After each test no process that mentions ``tmp_path`` may be left.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeauth.demo import HOST, request

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
PROPAGATION = re.compile(
    r"^propagation: ban 201 -> 403 on all 3 edges in (\d+\.\d) ms "
    r"\(edge-a \d+\.\d ms, edge-b \d+\.\d ms, edge-c \d+\.\d ms\)$",
    re.MULTILINE,
)
EDGE_LINE = re.compile(
    r"^  (edge-[abc]) +http://127\.0\.0\.1:(\d+) +admin http://127\.0\.0\.1:(\d+)$"
)


def demo(*args: str) -> list[str]:
    return [PYTHON, "-m", "edgeauth.demo", *args]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_tour_exits_0_with_the_measured_propagation(tmp_path: Path) -> None:
    """The tour bans, shows 403 on every edge, invalidates, and stops every process."""
    run = subprocess.run(
        demo("tour", "--ports", "auto", "--var", str(tmp_path)),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    match = PROPAGATION.search(run.stdout)
    assert match is not None, output
    assert float(match.group(1)) < 10_000
    assert "GET /products/42 from 127.0.0.2: edge-a 403, edge-b 403, edge-c 403" in run.stdout
    assert run.stdout.count("edge-a 200, edge-b 200, edge-c 200") == 2, output  # before and after
    assert "$ edgeauthctl invalidate --tag product-42" in run.stdout
    assert "every edge applied the invalidation" in run.stdout
    assert "tour finished: every process stopped" in run.stdout
    assert processes_mentioning(str(tmp_path)) == []
    for role in ("operator", "edge", "reader"):
        assert (tmp_path / f"{role}.token").stat().st_mode & 0o777 == 0o600


def read_until(proc: subprocess.Popen[bytes], marker: str, timeout: float) -> str:
    """Read the child's stdout until ``marker`` appears (bounded by ``timeout``)."""
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    data = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no {marker!r} within {timeout} s; output:\n{data.decode()}")
        if selector.select(left):
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                pytest.fail(f"the demo exited ({proc.wait()}) before {marker!r}:\n{data.decode()}")
            data += chunk
    return data.decode()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_run_serves_on_the_printed_ports_and_stops_cleanly(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    """``run`` prints the ports; they serve; Ctrl-C (SIGINT) or SIGTERM stops all, exit 0."""
    proc = subprocess.Popen(
        demo("run", "--ports", "auto", "--var", str(tmp_path)),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        started = time.monotonic()
        text = read_until(proc, "curl -s http://127.0.0.1:", timeout=60)
        assert time.monotonic() - started < 60
        assert "edgeauth demo is up" in text and "Try this" in text, text
        assert "EDGEAUTH_TOKEN=$(cat " in text, text
        edges = [m.groups() for m in map(EDGE_LINE.match, text.splitlines()) if m]
        assert [e[0] for e in edges] == ["edge-a", "edge-b", "edge-c"], text
        for _, port, admin in edges:
            status, headers, body = request("GET", int(port), "/products/1")
            assert status == 200, body
            assert b"Product 1" in body
            status, _, _ = request("GET", int(admin), "/readyz")
            assert status == 200
        proc.send_signal(stop_signal)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, text + rest.decode()
    assert "stopped: every process of the demo has exited" in rest.decode()
    assert processes_mentioning(str(tmp_path)) == []
    for _, port, _ in edges:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, int(port)), timeout=5).close()


def test_a_taken_port_is_named_and_nothing_starts(tmp_path: Path) -> None:
    """With the fixed ports, one taken port stops the demo at once with a message naming it."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            taken.bind((HOST, 5102))
        except OSError:
            pass  # already in use by something else: taken either way
        else:
            taken.listen()
        run = subprocess.run(
            demo("tour", "--var", str(tmp_path / "var")),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "5102 (edge-b admin)" in run.stderr
    assert "--ports auto" in run.stderr
    assert not (tmp_path / "var").exists()
