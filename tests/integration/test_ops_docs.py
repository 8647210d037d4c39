"""``docs/operations.md`` documents every ini key with the default that ``edgeauth/config.py`` has.

The tables of its "Configure" section are generated from the attrs fields of the settings classes
(their defaults and their docstrings' ``Attributes``); this test keeps them in step when a key is
added or a default changes, and checks that the documented units, alerts and action exist.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import pytest

from edgeauth import config

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"


def ini_text(value: Any) -> str:
    """A default as an operator writes it in the ini file."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return ", ".join(":".join(v) if isinstance(v, tuple) else ini_text(v) for v in value)
    return str(value)


def documented_keys() -> list[tuple[str, str, str]]:
    """(section, key, default text) of every configurable key, from the settings classes."""
    keys = []
    for section, cls in config._SECTIONS.items():
        for field in attrs.fields(cls):
            if not {"parse", "secret"} & field.metadata.keys():
                continue
            default = field.default
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                default = default.factory()
            keys.append((section, field.name, ini_text(default)))
    return keys


def doc_tables() -> dict[str, dict[str, str]]:
    """The default cell of each key, by section, from the doc's ``### [section]`` tables."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"^### \[([a-z_]+)\]", line)
        if heading:
            section = heading.group(1)
            tables.setdefault(section, {})
            continue
        if line.startswith("## "):  # the next chapter: no more key tables
            section = None
        row = re.match(r"^\| `([a-z_0-9]+)` \| (.*?) \| .+ \|$", line)
        if row and section is not None:
            tables[section][row.group(1)] = row.group(2)
    return tables


@pytest.mark.parametrize(("section", "key", "default"), documented_keys())
def test_every_key_is_documented_with_its_default(section: str, key: str, default: str) -> None:
    tables = doc_tables()
    assert section in tables, f"docs/operations.md has no ### [{section}] table"
    assert key in tables[section], f"[{section}] {key} is missing from docs/operations.md"
    expected = f"`{default}`" if default else "(empty)"
    assert tables[section][key] == expected, (section, key)


def test_no_documented_key_is_unknown() -> None:
    known = {(s, k) for s, k, _ in documented_keys()}
    for section, keys in doc_tables().items():
        if section == "tokens":
            continue
        for key in keys:
            assert (section, key) in known, (
                f"docs/operations.md documents unknown [{section}] {key}"
            )


def test_the_guide_covers_what_issue_7_asks() -> None:
    text = DOC.read_text()
    for heading in (
        "## Install",
        "## Configure",
        "## Run under systemd",
        "## TLS",
        "## Tokens and rotation",
        "## Backup and restore of the master database",
        "## Upgrading",
        "## Monitoring",
        "## Troubleshooting",
    ):
        assert f"\n{heading}\n" in text, heading
    for reason in ("not_synced", "master_refused", "unparseable_stream", "lagging"):
        assert f"| `{reason}` |" in text, reason
    for phrase in ("sha256:", "VACUUM INTO", ".backup", "WAL", "ssl:", "ExecReload"):
        assert phrase in text, phrase
    for path in (
        "etc/systemd/edgeauth-master.service",
        "etc/systemd/edgeauth-edge@.service",
        "etc/prometheus/edgeauth-alerts.yml",
        "etc/fail2ban/action.d/edgeauth.conf",
    ):
        assert path in text and (ROOT / path).exists(), path
    alerts = set(
        re.findall(r"- alert: (\w+)", (ROOT / "etc/prometheus/edgeauth-alerts.yml").read_text())
    )
    for alert in alerts:
        assert alert in text, f"the alert {alert} is not explained in docs/operations.md"
