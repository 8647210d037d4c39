"""Bad configuration stops ``twistd edgeauth-master`` / ``edgeauth-edge`` with one clear line.

Each case runs the installed ``twistd`` (``make install`` first) on an ini that is wrong in one
way: an unknown key, a bad endpoint string, a missing secret file, an unusable database path. The
process must exit non-zero, without a traceback, printing exactly one line that names the file,
the section and the key (``FILE: [SECTION] KEY: why``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TWISTD = ROOT / ".venv" / "bin" / "twistd"
TOKEN = "ops-config-test-token"


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["EDGEAUTH_OPERATOR_TOKEN"] = TOKEN
    env["EDGEAUTH_EDGE_TOKEN"] = TOKEN + "-edge"
    return env


def master_ini(tmp_path: Path, **keys: str) -> Path:
    master = {
        "listen": "tcp:0:interface=127.0.0.1",
        "database": str(tmp_path / "master.sqlite3"),
        **{k: v for k, v in keys.items() if not k.startswith("token_")},
    }
    ops = keys.get("token_ops", "operator env:EDGEAUTH_OPERATOR_TOKEN")
    lines = ["[master]", *(f"{k} = {v}" for k, v in master.items())]
    lines += ["[tokens]", f"ops = {ops}", "edges = edge env:EDGEAUTH_EDGE_TOKEN"]
    path = tmp_path / "master.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


def edge_ini(tmp_path: Path, **keys: str) -> Path:
    edge = {
        "id": "edge-t",
        "listen": "tcp:0:interface=127.0.0.1",
        "admin_listen": "tcp:0:interface=127.0.0.1",
        "masters": "http://127.0.0.1:9",
        "token": "env:EDGEAUTH_EDGE_TOKEN",
        "database": str(tmp_path / "edge.sqlite3"),
        **keys,
    }
    path = tmp_path / "edge.ini"
    path.write_text("\n".join(["[edge]", *(f"{k} = {v}" for k, v in edge.items())]) + "\n")
    return path


def not_a_directory(tmp_path: Path) -> str:
    """A database path below a regular file: its directory can be neither used nor created."""
    (tmp_path / "plain-file").write_text("")
    return str(tmp_path / "plain-file" / "state.sqlite3")


def a_directory(tmp_path: Path) -> str:
    """A database path that is a directory: SQLite cannot open it."""
    (tmp_path / "a-dir").mkdir()
    return str(tmp_path / "a-dir")


CASES = [
    # role, keys, section, key, why
    ("master", {"bogus": "1"}, "master", "bogus", "unknown key"),
    ("master", {"listen": "tcpx:4000"}, "master", "listen", "not a valid Twisted endpoint"),
    ("master", {"token_ops": "operator file:{tmp}/missing.token"}, "tokens", "ops",
     "cannot read secret file"),
    ("master", {"database": not_a_directory}, "master", "database", "is not a directory"),
    ("master", {"database": a_directory}, "master", "database", "cannot open"),
    ("edge", {"bogus": "1"}, "edge", "bogus", "unknown key"),
    ("edge", {"admin_listen": "tcp:notaport"}, "edge", "admin_listen",
     "not a valid Twisted endpoint"),
    ("edge", {"token": "file:{tmp}/missing.token"}, "edge", "token", "cannot read secret file"),
    ("edge", {"database": not_a_directory}, "edge", "database", "is not a directory"),
    ("edge", {"database": a_directory}, "edge", "database", "cannot open"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("role", "keys", "section", "key", "why"),
    CASES,
    ids=[f"{c[0]}-{c[3]}-{c[4].split()[-1]}" for c in CASES],
)
def test_bad_configuration_stops_startup_with_one_line(
    tmp_path: Path, role: str, keys: dict[str, object], section: str, key: str, why: str
) -> None:
    assert TWISTD.exists(), "run make install first"
    values = {
        k: v(tmp_path) if callable(v) else str(v).replace("{tmp}", str(tmp_path))
        for k, v in keys.items()
    }
    ini = (master_ini if role == "master" else edge_ini)(tmp_path, **values)
    run = subprocess.run(
        [str(TWISTD), "--nodaemon", "--pidfile=", f"edgeauth-{role}", "--config", str(ini)],
        cwd=tmp_path,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    output = (run.stdout + run.stderr).decode("utf-8", "replace")
    assert run.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if f"[{section}] {key}:" in line]
    assert len(lines) == 1, output
    assert f"{ini}: [{section}] {key}: " in lines[0], lines[0]
    assert why in lines[0], lines[0]
    assert TOKEN not in output, "a secret must never be printed"
    if key != "database":  # nothing is opened before the configuration is valid
        assert not (tmp_path / f"{role}.sqlite3").exists()
        assert not (tmp_path / "master.sqlite3").exists()


def test_database_given_on_the_command_line_is_named_so(tmp_path: Path) -> None:
    """``--database`` overrides the ini, so the error names ``<command line>``, not the file."""
    ini = edge_ini(tmp_path)
    bad = not_a_directory(tmp_path)
    run = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "edgeauth-edge", "--config", str(ini), "--database", bad],
        cwd=tmp_path,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    output = (run.stdout + run.stderr).decode("utf-8", "replace")
    assert run.returncode == 1, output
    lines = [line for line in output.splitlines() if "[edge] database:" in line]
    assert len(lines) == 1, output
    assert "<command line>: [edge] database: cannot open" in lines[0], lines[0]
    assert "Traceback" not in output
