"""The edge's enforced state: memory indexes first, the SQLite store written behind.

Events and snapshots are applied to the memory indexes at once and each change is queued, with
the offset it reflects, to the SQLite store. Checks read :attr:`EdgeState.indexes` only; nothing
here waits for the disk. Once an edge has synced, only applied events change what it enforces
(last known good).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from edgeauth.edge.index import EdgeIndexes
from edgeauth.edge.store import EdgeStore
from edgeauth.events import (
    CacheInvalidated,
    Event,
    EventError,
    IpBanned,
    UnknownEvent,
    event_type,
    normalize_ip,
)
from edgeauth.replay import Entry

log = Logger()


class SnapshotError(ValueError):
    """A snapshot document is malformed; the current state is kept."""


def _float_or_none(value: object, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SnapshotError(f"{what} must be a number or null")
    return float(value)


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise SnapshotError(f"{what} must be a string")
    return value


def _seq(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SnapshotError("seq must be a non-negative integer")
    return value


def parse_snapshot_tables(doc: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Validate the state part of a snapshot (PROTOCOL.md §5) and return normalised tables.

    Raises:
        SnapshotError: anything missing or of the wrong type.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for table in ("bans", "allows"):
        rows = doc.get(table, [])
        if not isinstance(rows, list):
            raise SnapshotError(f"{table} must be a list")
        parsed = []
        for row in rows:
            if not isinstance(row, Mapping):
                raise SnapshotError(f"{table} entries must be objects")
            try:
                ip = normalize_ip(row.get("ip"))
            except EventError as exc:
                raise SnapshotError(exc.detail) from None
            parsed.append(
                {
                    "ip": ip,
                    "reason": _text(row.get("reason", ""), "reason"),
                    "expires_at": _float_or_none(row.get("expires_at"), "expires_at"),
                    "source": _text(row.get("source", ""), "source"),
                    "seq": _seq(row.get("seq", 0)),
                }
            )
        out[table] = parsed
    tokens = doc.get("revoked_tokens", [])
    subjects = doc.get("revoked_subjects", [])
    if not isinstance(tokens, list) or not isinstance(subjects, list):
        raise SnapshotError("revoked_tokens and revoked_subjects must be lists")
    out["revoked_tokens"] = []
    for row in tokens:
        if not isinstance(row, Mapping):
            raise SnapshotError("revoked_tokens entries must be objects")
        out["revoked_tokens"].append(
            {
                "jti": _text(row.get("jti"), "jti"),
                "expires_at": _float_or_none(row.get("expires_at"), "expires_at"),
            }
        )
    out["revoked_subjects"] = []
    for row in subjects:
        if not isinstance(row, Mapping):
            raise SnapshotError("revoked_subjects entries must be objects")
        before = _float_or_none(row.get("before"), "before")
        if before is None:
            raise SnapshotError("before must be a number")
        out["revoked_subjects"].append({"sub": _text(row.get("sub"), "sub"), "before": before})
    return out


def _entry(row: Mapping[str, Any]) -> Entry:
    return Entry(
        ip=row["ip"],
        reason=row["reason"],
        expires_at=row["expires_at"],
        source=row["source"],
        seq=row["seq"],
    )


class EdgeState:
    """Memory indexes plus write-behind persistence, and what the edge knows of its sync."""

    def __init__(self, store: EdgeStore, clock: IReactorTime, edge_id: str) -> None:
        """Keep state for the edge ``edge_id``; call :meth:`load` before serving."""
        self.store = store
        self.clock = clock
        self.edge_id = edge_id
        self.indexes = EdgeIndexes()
        self.log_id: str | None = None
        self.offset = 0
        self.synced = False
        self.last_applied_at: float | None = None
        self.applied: dict[str, int] = {}
        self._unknown_types: set[str] = set()
        self.cache_listeners: list[Callable[[CacheInvalidated], None]] = []
        self.reset_listeners: list[Callable[[], None]] = []
        self.apply_listeners: list[Callable[[Sequence[Event | UnknownEvent]], None]] = []

    @property
    def local_source(self) -> str:
        """The ``source`` of bans this edge decided itself."""
        return f"edge:{self.edge_id}"

    async def load(self) -> None:
        """Read the SQLite file into the indexes (before any listener opens)."""
        stored = await self.store.open()
        self.indexes.replace_from_snapshot(
            bans=stored.bans,
            allows=stored.allows,
            revoked_tokens=stored.revoked_tokens,
            revoked_subjects=stored.revoked_subjects,
        )
        self.log_id = stored.log_id
        self.offset = stored.offset
        self.synced = stored.log_id is not None
        log.info(
            "edge state loaded: log {log_id} offset {offset}, {bans} bans, {allows} allows",
            log_id=self.log_id,
            offset=self.offset,
            bans=len(self.indexes.bans),
            allows=len(self.indexes.allows),
        )

    def apply(self, events: Sequence[Event | UnknownEvent], next_offset: int) -> None:
        """Apply events newer than the current offset, then move the offset to ``next_offset``.

        Raises:
            ValueError: the events do not continue the current offset (a gap).
        """
        assert self.log_id is not None, "apply needs a log id (bootstrap first)"
        fresh = [e for e in events if e.seq > self.offset]
        if fresh and fresh[0].seq != self.offset + 1:
            raise ValueError(f"gap in the stream: at {self.offset}, got seq {fresh[0].seq}")
        for previous, event in zip(fresh, fresh[1:], strict=False):
            if event.seq != previous.seq + 1:
                raise ValueError(f"gap in the stream between {previous.seq} and {event.seq}")
        for event in fresh:
            name = event_type(event)
            if isinstance(event, UnknownEvent):
                if name not in self._unknown_types:
                    self._unknown_types.add(name)
                    log.warn("skipping events of unknown type {type}", type=name)
                continue
            self.indexes.apply(event)
            self.applied[name] = self.applied.get(name, 0) + 1
            if isinstance(event, CacheInvalidated):
                for listener in self.cache_listeners:
                    listener(event)
            log.info(
                "applied {type} seq {seq} from {source}",
                type=name,
                seq=event.seq,
                source=event.source,
                edge=self.edge_id,
            )
        new_offset = max(next_offset, fresh[-1].seq if fresh else self.offset)
        moved = new_offset > self.offset
        self.offset = max(self.offset, new_offset)
        self.synced = True
        self.last_applied_at = self.clock.seconds()
        if moved:
            self.store.write_events(fresh, self.offset, self.log_id)
        for apply_listener in self.apply_listeners:
            apply_listener(fresh)

    def apply_snapshot(self, doc: Mapping[str, Any], log_id: str, offset: int) -> None:
        """Replace the whole state with a snapshot, keeping this edge's own local bans.

        Raises:
            SnapshotError: the document is malformed (nothing changes then).
        """
        tables = parse_snapshot_tables(doc)
        now = self.clock.seconds()
        local = [
            e
            for e in self.indexes.bans
            if e.source == self.local_source and e.seq == 0 and e.live(now)
        ]
        bans = {row["ip"]: _entry(row) for row in tables["bans"]}
        for entry in local:
            bans.setdefault(entry.ip, entry)
        self.indexes.replace_from_snapshot(
            bans=list(bans.values()),
            allows=[_entry(r) for r in tables["allows"]],
            revoked_tokens=[(r["jti"], r["expires_at"]) for r in tables["revoked_tokens"]],
            revoked_subjects=[(r["sub"], r["before"]) for r in tables["revoked_subjects"]],
        )
        tables["bans"] = [
            {
                "ip": e.ip,
                "reason": e.reason,
                "expires_at": e.expires_at,
                "source": e.source,
                "seq": e.seq,
            }
            for e in bans.values()
        ]
        self.log_id = log_id
        self.offset = offset
        self.synced = True
        self.last_applied_at = now
        self.store.write_snapshot(tables, offset, log_id)
        log.info(
            "applied snapshot of log {log_id} at offset {offset}: {bans} bans",
            log_id=log_id,
            offset=offset,
            bans=len(bans),
        )
        for listener in self.reset_listeners:
            listener()

    def add_local_ban(self, event: IpBanned) -> Entry:
        """Enforce and persist a ban this edge decided (failure pattern); it survives restarts."""
        entry = Entry(
            ip=event.ip,
            reason=event.reason,
            expires_at=event.expires_at,
            source=event.source or self.local_source,
            seq=0,
        )
        existing = self.indexes.bans.get(entry.ip)
        if existing is not None and existing.live(self.clock.seconds()) and existing.seq > 0:
            return existing
        self.indexes.bans.put(entry)
        self.store.write_entry("bans", entry)
        log.info(
            "local ban of {ip} ({reason}) by {source}",
            ip=entry.ip,
            reason=entry.reason,
            source=entry.source,
            edge=self.edge_id,
        )
        return entry

    def sweep(self) -> int:
        """Drop expired entries from memory and from the file; return how many went."""
        now = self.clock.seconds()
        removed = len(self.indexes.bans.sweep(now)) + len(self.indexes.allows.sweep(now))
        removed += self.indexes.revocations.sweep(now)
        if removed:
            self.store.sweep(now)
        return removed

    def counts(self) -> dict[str, int]:
        """Sizes of the enforced state."""
        revocations = self.indexes.revocations.counts()
        return {
            "bans": len(self.indexes.bans),
            "allows": len(self.indexes.allows),
            "revoked_tokens": revocations.tokens,
            "revoked_subjects": revocations.subjects,
        }
