"""Write-behind of cache entries into the edge's SQLite file, and reading them back at start.

Rows are written through :meth:`edgeauth.edge.store.EdgeStore.run_interaction`, on the file's one
adbapi connection (a pool of one thread runs transactions in the order they were submitted). Puts
are batched for ``delay`` seconds; each row is serialised from the live entry when its batch is
submitted, so a row always holds the entry's latest state (a later soft purge or 304 refresh
included) and a later batch never carries older state than an earlier one.

Ordering with the state's offset: an invalidation's deletes and updates are submitted at once,
from the state's cache listener, which :meth:`EdgeState.apply` calls before it queues the offset
of the same event. Since transactions run in submission order, the file never holds an offset
past an invalidation whose effect on the cache it lacks, so a crash cannot bring back an
invalidated entry. A snapshot bootstrap clears the table and records the new log id in
``cache_meta``; at start, rows written under another log id than the state's are dropped.

At start, rows whose ``keep_until`` (the last moment they could be served without the origin:
fresh, stale-while-revalidate or stale-if-error) has passed are deleted, never loaded.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from edgeauth.edge.cache.store import Entry

__all__ = ["CACHE_SCHEMA", "CachePersister", "LoadedCache", "StoredRow", "load_cache_txn"]

log = Logger()

CACHE_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS cache_entries (
    key TEXT NOT NULL,
    variant TEXT NOT NULL,
    stored_at REAL NOT NULL,
    fresh_until REAL NOT NULL,
    keep_until REAL NOT NULL,
    soft INTEGER NOT NULL,
    meta TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (key, variant)
);
CREATE INDEX IF NOT EXISTS cache_entries_keep ON cache_entries (keep_until);
CREATE TABLE IF NOT EXISTS cache_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_DELETE, _SOFTEN, _UPDATE, _PUT = range(4)


@attrs.frozen
class StoredRow:
    """One stored entry as read back: the columns, with ``meta`` decoded."""

    key: str
    variant: str
    stored_at: float
    fresh_until: float
    soft: bool
    meta: dict[str, Any]
    body: bytes


@attrs.frozen
class LoadedCache:
    """What the file held at start: the log id the rows belong to, and the usable rows."""

    log_id: str | None
    rows: list[StoredRow]
    expired: int


def _latin1(data: bytes) -> str:
    return data.decode("latin-1")


def entry_meta(entry: Entry) -> str:
    """Serialise what an entry's columns do not hold."""
    return json.dumps(
        {
            "status": entry.status,
            "reason": _latin1(entry.reason),
            "headers": [[_latin1(n), _latin1(v)] for n, v in entry.headers],
            "vary": [_latin1(n) for n in entry.vary],
            "tags": list(entry.tags),
            "request_time": entry.request_time,
            "response_time": entry.response_time,
            "initial_age": entry.initial_age,
            "ttl": entry.ttl,
            "stale_until": entry.stale_until,
            "error_until": entry.error_until,
            "must_revalidate": entry.must_revalidate,
            "no_cache": entry.no_cache,
        },
        separators=(",", ":"),
    )


def _keep_until(entry: Entry) -> float:
    return max(entry.fresh_until, entry.stale_until, entry.error_until)


def ensure_schema_txn(txn: sqlite3.Cursor) -> None:
    """Create the cache tables if needed (inside the current transaction)."""
    for statement in CACHE_SCHEMA.split(";"):
        if statement.strip():
            txn.execute(statement)


def load_cache_txn(txn: sqlite3.Cursor, now: float) -> LoadedCache:
    """Create the tables if needed, delete rows past use, and read the rest (oldest first)."""
    ensure_schema_txn(txn)
    meta = dict(txn.execute("SELECT name, value FROM cache_meta").fetchall())
    expired = txn.execute("DELETE FROM cache_entries WHERE keep_until <= ?", (now,)).rowcount
    rows = [
        StoredRow(key, variant, stored_at, fresh_until, bool(soft), json.loads(meta_text), body)
        for key, variant, stored_at, fresh_until, soft, meta_text, body in txn.execute(
            "SELECT key, variant, stored_at, fresh_until, soft, meta, body FROM cache_entries "
            "ORDER BY stored_at"
        )
    ]
    return LoadedCache(meta.get("log_id"), rows, max(expired, 0))


def write_cache_txn(txn: sqlite3.Cursor, ops: Sequence[tuple[Any, ...]]) -> None:
    """Apply serialised operations in order (consecutive ones of a kind in one ``executemany``)."""
    statements = {
        "put": "INSERT OR REPLACE INTO cache_entries "
        "(key, variant, stored_at, fresh_until, keep_until, soft, meta, body) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        "update": "UPDATE cache_entries SET fresh_until = ?, keep_until = ?, soft = ?, meta = ? "
        "WHERE key = ? AND variant = ?",
        "soften": "UPDATE cache_entries SET fresh_until = MIN(fresh_until, ?), soft = 1 "
        "WHERE key = ? AND variant = ?",
        "delete": "DELETE FROM cache_entries WHERE key = ? AND variant = ?",
        "clear": "DELETE FROM cache_entries",
        "soften_all": "UPDATE cache_entries SET fresh_until = MIN(fresh_until, ?), soft = 1",
        "log_id": "INSERT OR REPLACE INTO cache_meta (name, value) VALUES ('log_id', ?)",
    }
    ensure_schema_txn(txn)
    i = 0
    while i < len(ops):
        kind = ops[i][0]
        j = i
        while j < len(ops) and ops[j][0] == kind:
            j += 1
        txn.executemany(statements[kind], [op[1:] for op in ops[i:j]])
        i = j


def delete_log_txn(txn: sqlite3.Cursor, log_id: str | None) -> None:
    """Drop every row and record the log id the (now empty) table belongs to."""
    ensure_schema_txn(txn)
    txn.execute("DELETE FROM cache_entries")
    if log_id is None:
        txn.execute("DELETE FROM cache_meta WHERE name = 'log_id'")
    else:
        txn.execute(
            "INSERT OR REPLACE INTO cache_meta (name, value) VALUES ('log_id', ?)", (log_id,)
        )


class CachePersister:
    """Queues entry changes and writes them behind (module docstring)."""

    def __init__(
        self,
        run: Callable[..., Deferred[Any]],
        clock: IReactorTime,
        log_id: Callable[[], str | None],
        *,
        delay: float = 0.05,
        max_pending_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        """Write through ``run(txn_function, *args)``; stamp rows with ``log_id()``."""
        self._run = run
        self._clock = clock
        self._log_id = log_id
        self._written_log_id: str | None = None
        self.delay = delay
        self.max_pending_bytes = max_pending_bytes
        self._pending: dict[tuple[str, str], tuple[int, Entry]] = {}
        self._pending_bytes = 0
        self._timer: IDelayedCall | None = None
        self._in_flight = 0
        self._idle: list[Deferred[None]] = []
        self.failures = 0
        self.closed = False

    # -- recording ---------------------------------------------------------------------------------

    def put(self, entry: Entry) -> None:
        """Queue a whole entry (new or replacing its row)."""
        self._record(entry, _PUT)
        self._pending_bytes += len(entry.body)
        if self._pending_bytes >= self.max_pending_bytes:
            self.flush()

    def update(self, entry: Entry) -> None:
        """Queue new headers and times of a stored entry (after a 304)."""
        self._record(entry, _UPDATE)

    def soften(self, entry: Entry) -> None:
        """Queue a soft purge of an entry."""
        self._record(entry, _SOFTEN)

    def delete(self, entry: Entry) -> None:
        """Queue the removal of an entry's row."""
        self._record(entry, _DELETE)

    def _record(self, entry: Entry, kind: int) -> None:
        if self.closed:
            return
        row = (entry.key, entry.variant)
        existing = self._pending.get(row)
        if existing is not None and kind != _DELETE:
            old_kind, old_entry = existing
            if old_kind == _DELETE or old_entry is not entry:
                kind = _PUT
            else:
                kind = max(kind, old_kind)
        self._pending[row] = (kind, entry)
        if self._timer is None:
            self._timer = self._clock.callLater(self.delay, self.flush)

    def clear(self) -> None:
        """Drop every row now (a hard ``all`` or a snapshot bootstrap), with the current log id."""
        self._pending.clear()
        self._pending_bytes = 0
        if self.closed:
            return
        log_id = self._log_id()
        self._written_log_id = log_id
        self._submit(delete_log_txn, log_id)

    def soften_all(self, now: float) -> None:
        """Mark every row soft-purged now (after writing what is queued)."""
        self.flush(extra=[("soften_all", now)])

    # -- writing -----------------------------------------------------------------------------------

    def flush(self, extra: Sequence[tuple[Any, ...]] = ()) -> None:
        """Submit everything queued now (then ``extra`` operations), in one transaction."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self.closed:
            return
        ops: list[tuple[Any, ...]] = []
        log_id = self._log_id()
        if log_id != self._written_log_id and log_id is not None:
            ops.append(("log_id", log_id))
            self._written_log_id = log_id
        pending, self._pending = self._pending, {}
        self._pending_bytes = 0
        for (key, variant), (kind, entry) in pending.items():
            if kind == _PUT:
                ops.append(
                    ("put", key, variant, entry.stored_at, entry.fresh_until, _keep_until(entry),
                     int(entry.soft), entry_meta(entry), entry.body)
                )  # fmt: skip
            elif kind == _UPDATE:
                ops.append(
                    ("update", entry.fresh_until, _keep_until(entry), int(entry.soft),
                     entry_meta(entry), key, variant)
                )  # fmt: skip
            elif kind == _SOFTEN:
                ops.append(("soften", entry.fresh_until, key, variant))
            else:
                ops.append(("delete", key, variant))
        ops.extend(extra)
        if ops:
            self._submit(write_cache_txn, ops)

    def _submit(self, func: Callable[..., Any], *args: Any) -> None:
        self._in_flight += 1
        try:
            d = self._run(func, *args)
        except Exception:
            self._in_flight -= 1
            self.failures += 1
            log.failure("cache write could not be submitted")
            return

        def failed(failure: Any) -> None:
            # Memory stays right; a restart may then serve what memory had dropped only if the
            # state's offset did not commit either (it is behind us in the same queue).
            self.failures += 1
            log.failure("cache write failed", failure)

        def done(_: object) -> None:
            self._in_flight -= 1
            if self._in_flight == 0:
                waiters, self._idle = self._idle, []
                for waiter in waiters:
                    waiter.callback(None)

        d.addErrback(failed).addBoth(done)

    def load(self, now: float) -> Deferred[LoadedCache]:
        """Read the stored rows (deleting those past use)."""
        d: Deferred[LoadedCache] = self._run(load_cache_txn, now)
        return d

    def drop_all(self, log_id: str | None) -> Deferred[None]:
        """Delete every row now and stamp the table with ``log_id``."""
        self._written_log_id = log_id
        d: Deferred[None] = self._run(delete_log_txn, log_id)
        return d

    def flushed(self) -> Deferred[None]:
        """Fire once everything queued so far is committed."""
        if self._pending:
            self.flush()
        if self._in_flight == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    async def close(self) -> None:
        """Write what is queued, wait for it, then accept nothing more."""
        await self.flushed()
        self.closed = True
