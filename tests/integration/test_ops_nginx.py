"""``etc/nginx/edgeauth-master-cache.conf``: a real nginx in front of a real master.

The shipped file is used as is, except for its listen port, upstream address and cache directory.
Catch-up chunks are cached per token (a second identical read is a HIT, the master is not asked),
a request without or with another token never gets the cached chunk, and SSE passes through
unbuffered. Skipped only when nginx is not installed (``.ci/run`` installs ``nginx-light``).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_ops_backup import TOKEN, Master, free_port

from edgeauth.demo import request

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "etc" / "nginx" / "edgeauth-master-cache.conf"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None
)

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


def nginx_conf(tmp_path: Path, port: int, master_port: int) -> Path:
    """The shipped file, pointed at the test master, inside a minimal nginx.conf."""
    text = CONF.read_text()
    for old, new in (
        ("/var/cache/nginx/edgeauth", str(tmp_path / "cache")),
        ("server 127.0.0.1:4000;", f"server 127.0.0.1:{master_port};"),
        ("listen 4080;", f"listen 127.0.0.1:{port};"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "edgeauth.conf").write_text(text)
    main = tmp_path / "nginx.conf"
    temp = tmp_path / "temp"
    main.write_text(
        f"daemon off;\nmaster_process off;\npid {tmp_path / 'nginx.pid'};\n"
        f"error_log {tmp_path / 'error.log'} info;\nevents {{}}\n"
        "http {\n  access_log off;\n"
        f"  client_body_temp_path {temp}/body;\n  proxy_temp_path {temp}/proxy;\n"
        f"  fastcgi_temp_path {temp}/fastcgi;\n  uwsgi_temp_path {temp}/uwsgi;\n"
        f"  scgi_temp_path {temp}/scgi;\n"
        f"  include {tmp_path / 'edgeauth.conf'};\n}}\n"
    )
    temp.mkdir()
    return main


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[tuple[Master, int]]:
    """A master (stream_cache = public) and nginx in front of it; both stopped by PID."""
    assert NGINX is not None
    master = Master(tmp_path, tmp_path / "master.sqlite3", "stream_cache = public\n")
    port = free_port()
    conf = nginx_conf(tmp_path, port, master.port)
    check = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "error.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not listen"
                time.sleep(0.05)  # bounded polling of a subprocess
        yield master, port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        master.stop()


def test_catch_up_chunks_are_cached_per_token(tier: tuple[Master, int]) -> None:
    master, port = tier
    master.ban("198.51.100.1")
    path = "/v1/stream/events?offset=-1"
    first = request("GET", port, path, token=TOKEN)
    second = request("GET", port, path, token=TOKEN)
    assert first[0] == second[0] == 200, first
    assert first[1]["x-edgeauth-cache"] == "MISS"
    assert second[1]["x-edgeauth-cache"] == "HIT"
    assert first[2] == second[2] and b"198.51.100.1/32" in first[2]
    assert first[1]["cache-control"].startswith("public")

    for token in (None, "not-the-token"):
        status, headers, body = request("GET", port, path, token=token)
        assert status == 401, body
        assert b"198.51.100.1" not in body
        assert headers["x-edgeauth-cache"] != "HIT"


def test_sse_passes_through_unbuffered(tier: tuple[Master, int]) -> None:
    master, port = tier
    master.ban("198.51.100.2")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(
            b"GET /v1/stream/events?offset=-1&live=sse HTTP/1.1\r\nHost: t\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
        )
        received = b""
        while b"event: control" not in received:  # arrives while the stream stays open
            chunk = conn.recv(65536)
            assert chunk, received
            received += chunk
    assert b"text/event-stream" in received
    assert b"198.51.100.2/32" in received
    assert b"X-Edgeauth-Cache" not in received or b"X-Edgeauth-Cache: HIT" not in received
