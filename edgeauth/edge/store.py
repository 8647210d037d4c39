"""The edge's SQLite file: bans, allows, revocations and the offset they reflect.

Writes are queued by :class:`edgeauth.edge.state.EdgeState` and written behind, off the reactor
thread, through an adbapi pool of exactly one connection. Everything queued while a transaction is
in flight goes into the next one, so the stored offset always matches the stored state: after a
crash the edge reloads the file and replays from that offset (events are idempotent).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from edgeauth.events import Event, UnknownEvent
from edgeauth.replay import Entry
from edgeauth.state_sql import (
    ENTRY_COLUMNS,
    STATE_SCHEMA,
    apply_state_txn,
    delete_expired_txn,
    replace_state_txn,
)

log = Logger()

SCHEMA = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"


@attrs.frozen
class StoredState:
    """What the file held at start: the log id and offset, and the state tables.

    The rows come in the file's order (by rowid: each key is unique), already as the objects
    the memory indexes hold, so that a file of a million bans is not first turned into a
    million dicts.
    """

    log_id: str | None
    offset: int
    bans: list[Entry]
    allows: list[Entry]
    revoked_tokens: list[tuple[str, float | None]]
    revoked_subjects: list[tuple[str, float]]


@attrs.frozen
class _Events:
    events: Sequence[Event | UnknownEvent]
    offset: int
    log_id: str


@attrs.frozen
class _Snapshot:
    tables: Mapping[str, Iterable[Mapping[str, Any]]]
    offset: int
    log_id: str


@attrs.frozen
class _Entry:
    table: str
    entry: Entry


@attrs.frozen
class _Sweep:
    now: float


_Op = _Events | _Snapshot | _Entry | _Sweep


def _open_connection(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    # An edge re-reads what it lost from the master, so NORMAL (no fsync per commit) is enough.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")


def _set_meta(txn: sqlite3.Cursor, key: str, value: str) -> None:
    txn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


_SHARED_TEXTS = 4096
"""At most this many distinct ``reason``/``source`` texts are shared between entries on load."""


def _read_entries(txn: sqlite3.Cursor, table: str) -> list[Entry]:
    """Read the ban or allow rows as entries, one row at a time (no list of every row first).

    Reasons and sources repeat (a few sources, a few reasons per tool): equal texts share one
    string object, which saves about 120 bytes an entry.
    """
    shared: dict[str, str] = {}
    out: list[Entry] = []
    append = out.append
    for ip, reason, expires_at, source, seq in txn.execute(f"SELECT {ENTRY_COLUMNS} FROM {table}"):
        known = shared.get(reason)
        if known is None:
            if len(shared) < _SHARED_TEXTS:
                shared[reason] = reason
        else:
            reason = known
        known = shared.get(source)
        if known is None:
            if len(shared) < _SHARED_TEXTS:
                shared[source] = source
        else:
            source = known
        append(Entry(ip=ip, reason=reason, expires_at=expires_at, source=source, seq=seq))
    return out


def _load_txn(txn: sqlite3.Cursor) -> StoredState:
    txn.executescript(SCHEMA + STATE_SCHEMA)
    meta = dict(txn.execute("SELECT key, value FROM meta").fetchall())
    return StoredState(
        meta.get("log_id"),
        int(meta.get("offset", "0")),
        bans=_read_entries(txn, "bans"),
        allows=_read_entries(txn, "allows"),
        revoked_tokens=txn.execute("SELECT jti, expires_at FROM revoked_tokens").fetchall(),
        revoked_subjects=txn.execute("SELECT sub, before FROM revoked_subjects").fetchall(),
    )


def _write_txn(txn: sqlite3.Cursor, ops: Sequence[_Op]) -> None:
    for op in ops:
        if isinstance(op, _Events):
            for event in op.events:
                apply_state_txn(txn, event)
            _set_meta(txn, "offset", str(op.offset))
            _set_meta(txn, "log_id", op.log_id)
        elif isinstance(op, _Snapshot):
            replace_state_txn(txn, op.tables)
            _set_meta(txn, "offset", str(op.offset))
            _set_meta(txn, "log_id", op.log_id)
        elif isinstance(op, _Entry):
            e = op.entry
            txn.execute(
                f"INSERT OR REPLACE INTO {op.table} ({ENTRY_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (e.ip, e.reason, e.expires_at, e.source, e.seq),
            )
        else:
            delete_expired_txn(txn, op.now)


class EdgeStore:
    """Write-behind persistence of the edge's enforced state."""

    def __init__(self, path: str, reactor: Any) -> None:
        """Prepare the store; nothing touches the disk before :meth:`open`."""
        self.path = path
        self._reactor = reactor
        self._pool: adbapi.ConnectionPool | None = None
        self._queue: list[_Op] = []
        self._writing: Deferred[None] | None = None
        self._idle_waiters: list[Deferred[None]] = []
        self.failures = 0

    def open(self) -> Deferred[StoredState]:
        """Open (creating if needed) the file and read what it holds."""
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            database=self.path,
            cp_min=1,
            cp_max=1,
            check_same_thread=False,
            cp_openfun=_open_connection,
            cp_reactor=self._reactor,
        )
        self._pool.start()
        d: Deferred[StoredState] = self._pool.runInteraction(_load_txn)
        return d

    def write_events(
        self, events: Sequence[Event | UnknownEvent], offset: int, log_id: str
    ) -> None:
        """Queue applied events together with the offset after them."""
        self._enqueue(_Events(tuple(events), offset, log_id))

    def write_snapshot(
        self, tables: Mapping[str, Iterable[Mapping[str, Any]]], offset: int, log_id: str
    ) -> None:
        """Queue a whole-state replacement (in one transaction with its offset)."""
        self._enqueue(_Snapshot(tables, offset, log_id))

    def write_entry(self, table: str, entry: Entry) -> None:
        """Queue one ban or allow entry (local bans)."""
        self._enqueue(_Entry(table, entry))

    def sweep(self, now: float) -> None:
        """Queue the removal of expired entries."""
        self._enqueue(_Sweep(now))

    def _enqueue(self, op: _Op) -> None:
        self._queue.append(op)
        if self._writing is None and self._pool is not None:
            self._flush()

    def _flush(self) -> None:
        assert self._pool is not None
        ops, self._queue = self._queue, []
        done: Deferred[None] = Deferred()
        self._writing = done
        d: Deferred[None] = self._pool.runInteraction(_write_txn, ops)

        def failed(failure: Any) -> None:
            # The memory state is still right; the next write carries a newer offset, and a
            # restart replays from the last offset that did commit.
            self.failures += 1
            log.failure("edge store write failed ({n} operations)", failure, n=len(ops))

        def next_batch(_: object) -> None:
            self._writing = None
            done.callback(None)
            if self._queue and self._pool is not None:
                self._flush()
            elif not self._queue:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    waiter.callback(None)

        d.addErrback(failed).addBoth(next_batch)

    def run_interaction(self, func: Any, *args: Any) -> Deferred[Any]:
        """Run ``func(txn, *args)`` in the store's one connection (other write-behind users).

        The response cache keeps its entries in the same file through this, so the file still
        has exactly one connection.
        """
        if self._pool is None:
            raise RuntimeError("the edge store is not open")
        d: Deferred[Any] = self._pool.runInteraction(func, *args)
        return d

    def flushed(self) -> Deferred[None]:
        """Fire once everything queued so far is written."""
        if self._writing is None and not self._queue:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    async def close(self) -> None:
        """Write what is queued, then close the file."""
        await self.flushed()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
