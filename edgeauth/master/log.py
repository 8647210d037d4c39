"""The master's durable event log: ``IEventLog`` and its SQLite implementation.

One SQLite file in WAL mode with ``synchronous=FULL`` (every commit fsyncs the WAL), reached
through adbapi with exactly one connection, so every statement runs in that pool's thread and
never on the reactor. An append writes the event row and the state row (bans, allows,
revocations) in one transaction. Appends that arrive while a transaction is in flight are
group-committed together in the next one (started as soon as the one in flight commits, so that
its fsync overlaps the answers to the previous group), and each caller's Deferred fires only
after the commit, so an acknowledged event is never lost. The most recent events are also kept
in memory, already encoded, so live readers and catch-up reads near the tail never touch the
database.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from edgeauth.events import (
    Event,
    EventError,
    IpUnallowed,
    IpUnbanned,
    UnknownEvent,
    encode_event,
    event_from_dict,
)
from edgeauth.state_sql import (
    STATE_SCHEMA,
    TABLE_COLUMNS,
    TABLE_KEYS,
    TABLE_LIVE,
    apply_state_txn,
    delete_expired_txn,
    read_state_txn,
    rows_txn,
)

log = Logger()


class RefusedError(EventError):
    """The log refused an append because of the current state (e.g. unbanning a missing entry).

    Attributes:
        status: the HTTP status that fits (404 for a missing entry).
    """

    def __init__(self, code: str, detail: str, status: int) -> None:
        super().__init__(code, detail)
        self.status = status


@attrs.frozen
class LogRecord:
    """A committed event with its JSON text, as stored and as sent to readers."""

    seq: int
    json: str
    event: Event


Listener = Callable[[Sequence[LogRecord]], None]


class IEventLog(Interface):
    """An append-only, durable, ordered log of events plus the state they produce."""

    log_id = Attribute("Random id fixed when the log was created (str).")
    tail = Attribute("Seq of the last committed event, 0 when none (int).")
    earliest = Attribute("Seq of the oldest retained event; tail + 1 when none is retained.")

    def open() -> Deferred[None]:
        """Create or open the store and load the tail into memory."""

    def close() -> Deferred[None]:
        """Wait for pending appends and close the store."""

    def append(event: Event) -> Deferred[Event]:
        """Durably append one event; fires with it (seq assigned) after the commit."""

    def append_record(event: Event) -> Deferred[LogRecord]:
        """As ``append``, but fires with the committed :class:`LogRecord` (event and JSON text)."""

    def read(after: int, limit: int, max_bytes: int) -> Deferred[list[LogRecord]]:
        """Return committed events with seq > after, at most ``limit`` / ``max_bytes``."""

    def snapshot(now: float) -> Deferred[dict[str, Any]]:
        """Return the consistent state after ``tail`` (expired entries left out)."""

    def entries(
        table: str, now: float, ip: str | None, after: str | None, limit: int
    ) -> Deferred[list[dict[str, Any]]]:
        """List live entries of ``bans``/``allows``/``revoked_tokens``/``revoked_subjects``."""

    def compact(now: float) -> Deferred[int]:
        """Apply retention; fires with the number of events removed."""

    def check_writable() -> Deferred[None]:
        """Fire when the store accepts a write transaction, errback otherwise."""

    def add_listener(listener: Listener) -> None:
        """Call ``listener`` with the records of every commit, in order."""


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, type TEXT NOT NULL, timestamp REAL NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_time ON events (timestamp);
"""


def _event_of(record: LogRecord) -> Event:
    return record.event


def _open_connection(conn: sqlite3.Connection) -> None:
    """Set the pragmas of the one connection (adbapi ``cp_openfun``)."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")


def covering_networks(address: str) -> list[str]:
    """Return the normal forms of every network that contains ``address`` (itself included)."""
    net = ipaddress.ip_network(address, strict=True)
    if net.num_addresses != 1:
        raise EventError("invalid_ip", "ip= must be a single address")
    return [str(net.supernet(new_prefix=p)) for p in range(net.max_prefixlen, -1, -1)]


def _init_txn(txn: sqlite3.Cursor) -> tuple[str, int, int]:
    txn.executescript(SCHEMA + STATE_SCHEMA)
    row = txn.execute("SELECT value FROM meta WHERE key = 'log_id'").fetchone()
    if row is None:
        log_id = secrets.token_hex(8)
        txn.execute("INSERT INTO meta VALUES ('log_id', ?), ('tail', '0')", (log_id,))
        txn.connection.commit()
    else:
        log_id = row[0]
    tail = int(txn.execute("SELECT value FROM meta WHERE key = 'tail'").fetchone()[0])
    first = txn.execute("SELECT min(seq) FROM events").fetchone()[0]
    return log_id, tail, tail + 1 if first is None else int(first)


def _live_entry_exists(txn: sqlite3.Cursor, table: str, ip: str, now: float) -> bool:
    sql = f"SELECT 1 FROM {table} WHERE ip = ? AND (expires_at IS NULL OR expires_at > ?)"
    return txn.execute(sql, (ip, now)).fetchone() is not None


def _append_txn(txn: sqlite3.Cursor, drafts: Sequence[Event]) -> list[LogRecord | RefusedError]:
    """Append a group of events in one transaction; refused ones get no seq."""
    tail = int(txn.execute("SELECT value FROM meta WHERE key = 'tail'").fetchone()[0])
    results: list[LogRecord | RefusedError] = []
    for draft in drafts:
        if isinstance(draft, IpUnbanned | IpUnallowed):
            table, code = (
                ("bans", "not_banned")
                if isinstance(draft, IpUnbanned)
                else (
                    "allows",
                    "not_allowed",
                )
            )
            if not _live_entry_exists(txn, table, draft.ip, draft.timestamp):
                results.append(RefusedError(code, f"no {table[:-1]} entry for {draft.ip}", 404))
                continue
        tail += 1
        event = attrs.evolve(draft, seq=tail)
        body = encode_event(event)
        txn.execute(
            "INSERT INTO events (seq, type, timestamp, body) VALUES (?, ?, ?, ?)",
            (tail, event.TYPE, event.timestamp, body),
        )
        apply_state_txn(txn, event)
        results.append(LogRecord(tail, body, event))
    txn.execute("UPDATE meta SET value = ? WHERE key = 'tail'", (str(tail),))
    return results


def _read_txn(txn: sqlite3.Cursor, after: int, limit: int) -> list[tuple[int, str]]:
    rows = txn.execute(
        "SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
    ).fetchall()
    return [(int(seq), str(body)) for seq, body in rows]


def _snapshot_txn(txn: sqlite3.Cursor, now: float) -> dict[str, Any]:
    """Read the tail and every state table; one connection makes it consistent."""
    tail = int(txn.execute("SELECT value FROM meta WHERE key = 'tail'").fetchone()[0])
    out: dict[str, Any] = {"tail": tail}
    out.update(read_state_txn(txn, now))
    return out


def _entries_txn(
    txn: sqlite3.Cursor, table: str, now: float, ip: str | None, after: str | None, limit: int
) -> list[dict[str, Any]]:
    key = TABLE_KEYS[table]
    where = [TABLE_LIVE[table]]
    params: dict[str, Any] = {"now": now, "limit": limit}
    if ip is not None:
        nets = covering_networks(ip)
        where.append(f"ip IN ({','.join(f':n{i}' for i in range(len(nets)))})")
        params.update({f"n{i}": net for i, net in enumerate(nets)})
    if after is not None:
        where.append(f"{key} > :after")
        params["after"] = after
    sql = (
        f"SELECT {TABLE_COLUMNS[table]} FROM {table} WHERE {' AND '.join(where)} "
        f"ORDER BY {key} LIMIT :limit"
    )
    return rows_txn(txn, sql, params)


def _compact_txn(
    txn: sqlite3.Cursor, keep_events: int, cutoff: float, now: float
) -> tuple[int, int]:
    tail = int(txn.execute("SELECT value FROM meta WHERE key = 'tail'").fetchone()[0])
    # Only ever a prefix, so the retained log stays contiguous even if timestamps are not
    # monotonic in seq (a wall clock stepped back): the oldest events up to the first one
    # that is recent enough.
    removed = txn.execute(
        "DELETE FROM events WHERE seq <= ? OR seq < "
        "coalesce((SELECT min(seq) FROM events WHERE timestamp >= ?), ? + 1)",
        (tail - keep_events, cutoff, tail),
    ).rowcount
    delete_expired_txn(txn, now)
    first = txn.execute("SELECT min(seq) FROM events").fetchone()[0]
    return removed, tail + 1 if first is None else int(first)


def _writable_txn(txn: sqlite3.Cursor) -> None:
    txn.execute("UPDATE meta SET value = value WHERE key = 'log_id'")


@implementer(IEventLog)
class SqliteEventLog:
    """``IEventLog`` on one SQLite file (WAL, synchronous=FULL) through a one-connection pool."""

    def __init__(
        self,
        path: str,
        reactor: IReactorTime,
        *,
        retention_events: int = 1_000_000,
        retention_seconds: float = 7 * 86400,
        memory_events: int = 10_000,
    ) -> None:
        """Prepare the log; nothing touches the disk before :meth:`open`.

        Args:
            path: the SQLite file; its directory is created if missing.
            reactor: the reactor the pool reports back to (also gives threads).
            retention_events: at most this many events are kept.
            retention_seconds: events older than this are removed by :meth:`compact`.
            memory_events: how many of the newest events are also kept in memory.
        """
        self.path = path
        self._reactor = reactor
        self.retention_events = retention_events
        self.retention_seconds = retention_seconds
        self.log_id = ""
        self.tail = 0
        self.earliest = 1
        self._recent: collections.deque[LogRecord] = collections.deque(maxlen=memory_events)
        self._pool: adbapi.ConnectionPool | None = None
        self._queue: list[tuple[Event, Deferred[LogRecord]]] = []
        self._committing: Deferred[None] | None = None
        self._listeners: list[Listener] = []

    def open(self) -> Deferred[None]:
        """Create or open the database, fix ``log_id`` and load the tail."""
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        assert IReactorThreads.providedBy(self._reactor)
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
        d: Deferred[tuple[str, int, int]] = self._pool.runInteraction(_init_txn)
        d.addCallback(self._opened)
        return d.addCallback(lambda _: self._warm())

    def _opened(self, result: tuple[str, int, int]) -> None:
        self.log_id, self.tail, self.earliest = result

    def _warm(self) -> Deferred[None]:
        """Load the newest events into the in-memory window."""
        size = self._recent.maxlen or 0
        start = max(self.earliest - 1, self.tail - size)
        d = self._pool_run(_read_txn, start, size)

        def loaded(rows: list[tuple[int, str]]) -> None:
            self._recent.extend(self._records(rows))

        return d.addCallback(loaded)

    @staticmethod
    def _records(rows: Iterable[tuple[int, str]]) -> list[LogRecord]:
        out = []
        for seq, body in rows:
            event = event_from_dict(json.loads(body))
            assert not isinstance(event, UnknownEvent), "the log holds only known event types"
            out.append(LogRecord(seq, body, event))
        return out

    def _pool_run(self, func: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._pool is None:
            raise RuntimeError("the event log is not open")
        d: Deferred[Any] = self._pool.runInteraction(func, *args)
        return d

    def close(self) -> Deferred[None]:
        """Wait for the commit in flight and the queued appends, then close the pool."""
        pending = self._committing

        def shut(_: object = None) -> None:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

        if pending is None:
            shut()
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        waiter: Deferred[None] = Deferred()

        def after_commit(result: object) -> object:
            if self._committing is not None:  # queued appends went into another group commit
                self._committing.addBoth(after_commit)
                return result
            shut()
            waiter.callback(None)
            return result

        pending.addBoth(after_commit)
        return waiter

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` with the records of every commit, in order."""
        self._listeners.append(listener)

    def append(self, event: Event) -> Deferred[Event]:
        """Queue ``event``; it joins the next group commit. Fires after it is durable."""
        return self.append_record(event).addCallback(_event_of)

    def append_record(self, event: Event) -> Deferred[LogRecord]:
        """As :meth:`append`, but fires with the committed record (the event and its JSON text)."""
        d: Deferred[LogRecord] = Deferred()
        if self._pool is None:
            d.errback(RuntimeError("the event log is not open"))
            return d
        self._queue.append((event, d))
        if self._committing is None:
            self._flush()
        return d

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        done: Deferred[None] = Deferred()
        self._committing = done
        d = self._pool_run(_append_txn, [draft for draft, _ in batch])

        def next_batch() -> None:
            # The appends queued during this commit start their own at once, before this group's
            # callers are answered: that transaction and its fsync then run in the pool's thread
            # while the reactor answers this group (each caller still fires only after its own
            # commit, and the pool's one thread keeps the transactions in order). With nothing
            # queued, this group stays "in flight" until it is answered: close() waits for it,
            # and appends made by its callers queue and start when it is finished.
            if self._committing is done and self._queue:
                self._flush()

        def committed(results: list[LogRecord | RefusedError]) -> None:
            next_batch()
            records = [r for r in results if isinstance(r, LogRecord)]
            if records:
                self.tail = records[-1].seq
                self._recent.extend(records)
            for (_, waiter), result in zip(batch, results, strict=True):
                if isinstance(result, LogRecord):
                    waiter.callback(result)
                else:
                    waiter.errback(result)
            if records:
                for listener in list(self._listeners):
                    try:
                        listener(records)
                    except Exception:
                        log.failure("event log listener failed")

        def failed(failure: Any) -> None:
            next_batch()
            log.failure("append transaction failed; {n} writes refused", failure, n=len(batch))
            for _, waiter in batch:
                waiter.errback(failure)

        def finished(_: object) -> None:
            next_batch()  # appends made while this group was answered
            if self._committing is done:
                self._committing = None
            done.callback(None)

        d.addCallbacks(committed, failed).addBoth(finished)

    def read(self, after: int, limit: int, max_bytes: int = 1 << 20) -> Deferred[list[LogRecord]]:
        """Return events with seq > ``after`` (at least one if any), bounded by count and bytes."""
        recent = self._recent
        if recent and recent[0].seq <= after + 1 or after >= self.tail:
            d: Deferred[list[LogRecord]] = Deferred()
            d.callback(self._bounded(self._from_memory(after, limit), max_bytes))
            return d
        rows = self._pool_run(_read_txn, after, limit)
        return rows.addCallback(lambda r: self._bounded(self._records(r), max_bytes))

    def _from_memory(self, after: int, limit: int) -> list[LogRecord]:
        recent = self._recent
        if not recent or after >= self.tail:
            return []
        start = after + 1 - recent[0].seq
        out = []
        for index in range(start, min(start + limit, len(recent))):
            out.append(recent[index])
        return out

    @staticmethod
    def _bounded(records: list[LogRecord], max_bytes: int) -> list[LogRecord]:
        total = 0
        for index, record in enumerate(records):
            total += len(record.json) + 1
            if total > max_bytes and index > 0:
                return records[:index]
        return records

    def snapshot(self, now: float) -> Deferred[dict[str, Any]]:
        """Return the consistent live state (expired entries left out) and its offset."""
        return self._pool_run(_snapshot_txn, now)

    def entries(
        self, table: str, now: float, ip: str | None, after: str | None, limit: int
    ) -> Deferred[list[dict[str, Any]]]:
        """List live entries of one state table, keyset-paged by key, or those covering ``ip``."""
        if table not in TABLE_KEYS:
            raise ValueError(f"no table {table!r}")
        return self._pool_run(_entries_txn, table, now, ip, after, limit)

    def compact(self, now: float) -> Deferred[int]:
        """Remove events beyond retention (count and age) and expired state rows."""
        cutoff = now - self.retention_seconds
        d = self._pool_run(_compact_txn, self.retention_events, cutoff, now)

        def done(result: tuple[int, int]) -> int:
            removed, self.earliest = result
            while self._recent and self._recent[0].seq < self.earliest:
                self._recent.popleft()
            return removed

        return d.addCallback(done)

    def check_writable(self) -> Deferred[None]:
        """Fire when a write transaction commits (used by ``/readyz``)."""
        return self._pool_run(_writable_txn)
