"""The state tables (bans, allows, revocations) in SQL, shared by the master log and the edge.

These ``*_txn`` functions run inside an adbapi interaction (never on the reactor thread). They are
the SQL twin of :meth:`edgeauth.replay.State.apply`; a property test checks the two agree.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

from edgeauth.events import (
    CacheInvalidated,
    Event,
    IpAllowed,
    IpBanned,
    IpUnallowed,
    IpUnbanned,
    SubjectRevoked,
    TokenRevoked,
    UnknownEvent,
)

STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS bans (
    ip TEXT PRIMARY KEY, reason TEXT NOT NULL, expires_at REAL, source TEXT NOT NULL,
    seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS allows (
    ip TEXT PRIMARY KEY, reason TEXT NOT NULL, expires_at REAL, source TEXT NOT NULL,
    seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti TEXT PRIMARY KEY, expires_at REAL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS revoked_subjects (
    sub TEXT PRIMARY KEY, before REAL NOT NULL, seq INTEGER NOT NULL);
"""

ENTRY_COLUMNS = "ip, reason, expires_at, source, seq"
TABLE_KEYS = {"bans": "ip", "allows": "ip", "revoked_tokens": "jti", "revoked_subjects": "sub"}
TABLE_COLUMNS = {
    "bans": ENTRY_COLUMNS,
    "allows": ENTRY_COLUMNS,
    "revoked_tokens": "jti, expires_at",
    "revoked_subjects": "sub, before",
}
TABLE_LIVE = {
    "bans": "(expires_at IS NULL OR expires_at > :now)",
    "allows": "(expires_at IS NULL OR expires_at > :now)",
    "revoked_tokens": "(expires_at IS NULL OR expires_at > :now)",
    "revoked_subjects": "1",
}


def apply_state_txn(txn: sqlite3.Cursor, event: Event | UnknownEvent) -> None:
    """Update the state tables for one event (idempotent, like ``replay.State.apply``)."""
    if isinstance(event, IpBanned | IpAllowed):
        table = "bans" if isinstance(event, IpBanned) else "allows"
        txn.execute(
            f"INSERT OR REPLACE INTO {table} ({ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
            (event.ip, event.reason, event.expires_at, event.source, event.seq),
        )
    elif isinstance(event, IpUnbanned):
        txn.execute("DELETE FROM bans WHERE ip = ?", (event.ip,))
    elif isinstance(event, IpUnallowed):
        txn.execute("DELETE FROM allows WHERE ip = ?", (event.ip,))
    elif isinstance(event, TokenRevoked):
        txn.execute(
            "INSERT INTO revoked_tokens (jti, expires_at, seq) VALUES (?, ?, ?) "
            "ON CONFLICT (jti) DO UPDATE SET seq = excluded.seq, expires_at = CASE "
            "WHEN expires_at IS NULL OR excluded.expires_at IS NULL THEN NULL "
            "ELSE max(expires_at, excluded.expires_at) END",
            (event.jti, event.expires_at, event.seq),
        )
    elif isinstance(event, SubjectRevoked):
        txn.execute(
            "INSERT INTO revoked_subjects (sub, before, seq) VALUES (?, ?, ?) "
            "ON CONFLICT (sub) DO UPDATE SET seq = excluded.seq, "
            "before = max(before, excluded.before)",
            (event.sub, event.before, event.seq),
        )
    else:
        assert isinstance(event, CacheInvalidated | UnknownEvent)


def rows_txn(txn: sqlite3.Cursor, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    """Run a query and return its rows as dicts keyed by column name."""
    cursor = txn.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def read_state_txn(txn: sqlite3.Cursor, now: float | None) -> dict[str, list[dict[str, Any]]]:
    """Read every state table, sorted by key; with ``now``, expired entries are left out."""
    out: dict[str, list[dict[str, Any]]] = {}
    for table, columns in TABLE_COLUMNS.items():
        where = TABLE_LIVE[table] if now is not None else "1"
        out[table] = rows_txn(
            txn,
            f"SELECT {columns} FROM {table} WHERE {where} ORDER BY {TABLE_KEYS[table]}",
            {"now": now},
        )
    return out


def replace_state_txn(
    txn: sqlite3.Cursor, state: Mapping[str, Iterable[Mapping[str, Any]]]
) -> None:
    """Replace every state table with the rows of a snapshot (``seq`` defaults to 0)."""
    for table in TABLE_COLUMNS:
        txn.execute(f"DELETE FROM {table}")
    for row in state.get("bans", ()):
        _insert_entry(txn, "bans", row)
    for row in state.get("allows", ()):
        _insert_entry(txn, "allows", row)
    txn.executemany(
        "INSERT OR REPLACE INTO revoked_tokens (jti, expires_at, seq) VALUES (?, ?, ?)",
        [(r["jti"], r.get("expires_at"), r.get("seq", 0)) for r in state.get("revoked_tokens", ())],
    )
    txn.executemany(
        "INSERT OR REPLACE INTO revoked_subjects (sub, before, seq) VALUES (?, ?, ?)",
        [(r["sub"], r["before"], r.get("seq", 0)) for r in state.get("revoked_subjects", ())],
    )


def _insert_entry(txn: sqlite3.Cursor, table: str, row: Mapping[str, Any]) -> None:
    txn.execute(
        f"INSERT OR REPLACE INTO {table} ({ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
        (
            row["ip"],
            row.get("reason", ""),
            row.get("expires_at"),
            row.get("source", ""),
            row.get("seq", 0),
        ),
    )


def delete_expired_txn(txn: sqlite3.Cursor, now: float) -> None:
    """Remove entries whose expiry has passed."""
    for table in ("bans", "allows", "revoked_tokens"):
        txn.execute(f"DELETE FROM {table} WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
