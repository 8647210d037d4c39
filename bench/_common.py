"""Pieces the bench scripts share: free ports, and a server subprocess found by its printed port.

The scripts run as ``python bench/NAME.py``, which puts this folder first on ``sys.path``; they
import this module as ``_common``.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

LISTENING = re.compile(r"edgeauth master listening on IPv4Address\(.*?port=(\d+)\)")
"""The master's log line naming its listening port."""


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (bound together so that they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def server(argv: list[str], log_path: Path, env: dict[str, str]) -> Iterator[tuple[int, int]]:
    """Run a server subprocess; yield (pid, port); stop it by PID on the way out.

    The port is read from its output: the master's "listening" line, or a first line that is
    only the port (the baselines print it so).
    """
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        port = 0
        while time.monotonic() < deadline and port == 0:
            text = log_path.read_text(errors="replace")
            found = LISTENING.search(text) or re.match(r"(\d+)\n", text)
            if found:
                port = int(found.group(1))
            elif proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}:\n{text}")
            else:
                time.sleep(0.05)
        if not port:
            raise SystemExit(f"server did not start:\n{log_path.read_text()}")
        yield proc.pid, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
