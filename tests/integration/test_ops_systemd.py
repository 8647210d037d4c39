"""The systemd units in ``etc/systemd/`` pass ``systemd-analyze verify`` and say what they must.

``verify`` checks that ``ExecStart``'s binary exists, so it runs on copies whose
``/opt/edgeauth/bin/twistd`` points at this venv's ``twistd`` (everything else unchanged). It
reports unknown or malformed directives only as warnings with exit status 0, so the test also
requires it to print nothing about the units. Skipped only when ``systemd-analyze`` is missing
(``.ci/run`` installs systemd).
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "etc" / "systemd"
TWISTD = ROOT / ".venv" / "bin" / "twistd"
INSTALLED_TWISTD = "/opt/edgeauth/bin/twistd"
ANALYZE = shutil.which("systemd-analyze")

HARDENING = {
    "User": "edgeauth",
    "Restart": "on-failure",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "StateDirectory": "edgeauth",
    "ReadWritePaths": "/var/lib/edgeauth",
    "LimitNOFILE": "65536",
}


def read_unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Both units (the edge template as instance edge-a) verify cleanly."""
    assert ANALYZE is not None
    assert TWISTD.exists(), "run make install first"
    for unit in ("edgeauth-master.service", "edgeauth-edge@.service"):
        text = (UNITS / unit).read_text()
        assert INSTALLED_TWISTD in text
        (tmp_path / unit).write_text(text.replace(INSTALLED_TWISTD, str(TWISTD)))
    targets = [tmp_path / "edgeauth-master.service", tmp_path / "edgeauth-edge@edge-a.service"]
    run = subprocess.run(
        [ANALYZE, "verify", "--man=no", *map(str, targets)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    about_ours = [line for line in output.splitlines() if "edgeauth" in line]
    assert about_ours == [], output


@pytest.mark.parametrize("unit", ["edgeauth-master.service", "edgeauth-edge@.service"])
def test_units_run_twistd_in_the_foreground_hardened(unit: str) -> None:
    """Run ``twistd --nodaemon --pidfile=`` with the ini of PROTOCOL.md §8, hardened."""
    service = read_unit(unit)["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == value, (unit, key)
    start = service["ExecStart"].split()
    assert start[:3] == [INSTALLED_TWISTD, "--nodaemon", "--pidfile="]
    assert start[4:6] == ["--config", "/etc/edgeauth/edgeauth.ini"]
    assert "ExecReload" not in service, "twistd cannot reload: restart is documented instead"
    assert service["EnvironmentFile"].startswith("-/etc/edgeauth/")


def test_edge_template_is_per_edge_id() -> None:
    """The instance name is the edge id, with its own state file and environment file."""
    service = read_unit("edgeauth-edge@.service")["Service"]
    start = service["ExecStart"].split()
    assert start[3] == "edgeauth-edge"
    assert start[start.index("--id") + 1] == "%i"
    assert start[start.index("--database") + 1] == "/var/lib/edgeauth/%i.sqlite3"
    assert service["EnvironmentFile"] == "-/etc/edgeauth/%i.env"
    master = read_unit("edgeauth-master.service")["Service"]
    assert master["ExecStart"].split()[3] == "edgeauth-master"
    assert master["EnvironmentFile"] == "-/etc/edgeauth/master.env"
