"""Tests of EdgeState over a real EdgeStore: apply order, replay, gaps, snapshots, persistence."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs

from edgeauth.edge.index import parse_client_ip
from edgeauth.edge.state import EdgeState, SnapshotError
from edgeauth.edge.store import EdgeStore
from edgeauth.events import (
    CacheInvalidated,
    Event,
    IpAllowed,
    IpBanned,
    IpUnbanned,
    SubjectRevoked,
    TokenRevoked,
    UnknownEvent,
)
from edgeauth.replay import State, replay
from edgeauth.state_sql import read_state_txn

T0 = 1_763_850_000.0
LOG_ID = "log-aaaa"
EDGE = "edge-t"


def ban(
    seq: int, ip: str, expires_at: float | None = None, source: str = "operator:ops"
) -> IpBanned:
    return IpBanned(
        seq=seq, timestamp=T0, source=source, ip=ip, reason=f"r{seq}", expires_at=expires_at
    )


def unban(seq: int, ip: str) -> IpUnbanned:
    return IpUnbanned(seq=seq, timestamp=T0, source="operator:ops", ip=ip)


def allow(seq: int, ip: str, expires_at: float | None = None) -> IpAllowed:
    return IpAllowed(
        seq=seq, timestamp=T0, source="operator:ops", ip=ip, reason="ok", expires_at=expires_at
    )


def revoke(seq: int, jti: str, expires_at: float | None = None) -> TokenRevoked:
    return TokenRevoked(
        seq=seq, timestamp=T0, source="operator:ops", jti=jti, expires_at=expires_at
    )


def revoke_sub(seq: int, sub: str, before: float) -> SubjectRevoked:
    return SubjectRevoked(seq=seq, timestamp=T0, source="operator:ops", sub=sub, before=before)


def refused_by(state: EdgeState, ip: str, now: float) -> int | None:
    parsed = parse_client_ip(ip)
    assert parsed is not None
    entry = state.indexes.check_ip(*parsed, now)
    return None if entry is None else entry.seq


class Rig:
    """An EdgeState on a real EdgeStore in ``tmp_path``, its time on a Clock."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "edge.sqlite3")
        self.clock = Clock()
        self.clock.advance(T0)
        self.store: EdgeStore | None = None
        self.state: EdgeState | None = None

    async def open(self) -> EdgeState:
        self.store = EdgeStore(self.path, reactor)
        self.state = EdgeState(self.store, self.clock, EDGE)
        await self.state.load()
        return self.state

    async def reopen(self) -> EdgeState:
        await self.close()
        return await self.open()

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()
            self.store = None

    def file(self) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]]]:
        """Read meta and tables straight from the file, in one read transaction."""
        conn = sqlite3.connect(self.path)
        try:
            conn.execute("BEGIN")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            tables = read_state_txn(conn.cursor(), None)
            conn.execute("COMMIT")
            return meta, tables
        finally:
            conn.close()


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def bootstrap(state: EdgeState, offset: int = 0, **tables: Any) -> None:
    doc = {"bans": [], "allows": [], "revoked_tokens": [], "revoked_subjects": [], **tables}
    state.apply_snapshot(doc, LOG_ID, offset)


def stored_as_state(tables: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The file's tables in the shape of ``State.view`` (without the edge-only seq columns)."""
    return {
        "bans": sorted(tables["bans"], key=lambda r: r["ip"]),
        "allows": sorted(tables["allows"], key=lambda r: r["ip"]),
        "revoked_tokens": sorted(
            ({"jti": r["jti"], "expires_at": r["expires_at"]} for r in tables["revoked_tokens"]),
            key=lambda r: r["jti"],
        ),
        "revoked_subjects": sorted(
            ({"sub": r["sub"], "before": r["before"]} for r in tables["revoked_subjects"]),
            key=lambda r: r["sub"],
        ),
    }


def view(state: State) -> dict[str, Any]:
    # far in the past: nothing is left out as expired
    return state.view(0.0)


@pytest_twisted.ensureDeferred
async def test_apply_in_order(rig: Rig) -> None:
    """Events applied in order give the replay state, the offset, and a 403 ref of the ban seq."""
    state = await rig.open()
    try:
        bootstrap(state)
        events: list[Event] = [
            ban(1, "198.51.100.7/32"),
            ban(2, "203.0.113.0/24", expires_at=T0 + 60),
            allow(3, "203.0.113.5/32"),
            revoke(4, "jti-1", expires_at=T0 + 600),
            revoke_sub(5, "alice", before=T0),
            unban(6, "198.51.100.7/32"),
            ban(7, "2001:db8:1:2::/64"),
        ]
        state.apply(events, 7)
        assert state.offset == 7
        assert view(state.indexes.to_state()) == view(replay(events))
        assert refused_by(state, "198.51.100.7", T0) is None
        assert refused_by(state, "203.0.113.9", T0) == 2
        assert refused_by(state, "203.0.113.5", T0) is None  # the allow beats the /24
        assert refused_by(state, "203.0.113.9", T0 + 61) is None  # expired
        assert refused_by(state, "2001:db8:1:2::abcd", T0) == 7
        assert refused_by(state, "2001:db8:1:3::1", T0) is None
        assert state.indexes.revocations.is_revoked("jti-1", None, None, T0)
        assert state.indexes.revocations.is_revoked(None, "alice", T0 - 1, T0)
        assert state.applied == {
            "ip_banned": 3,
            "ip_allowed": 1,
            "token_revoked": 1,
            "subject_revoked": 1,
            "ip_unbanned": 1,
        }
        assert state.last_applied_at == T0
        await rig.store.flushed()  # type: ignore[union-attr]
        meta, tables = rig.file()
        assert meta == {"offset": "7", "log_id": LOG_ID}
        assert stored_as_state(tables) == view(replay(events))
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_next_offset_may_move_past_last_event(rig: Rig) -> None:
    """An empty answer with a larger next offset moves the offset (and stores it)."""
    state = await rig.open()
    try:
        bootstrap(state, offset=10)
        state.apply([], 10)
        assert state.offset == 10
        state.apply([ban(11, "192.0.2.1/32")], 11)
        await rig.store.flushed()  # type: ignore[union-attr]
        assert rig.file()[0]["offset"] == "11"
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_replay_of_applied_events_is_skipped(rig: Rig) -> None:
    """Events with seq <= offset are skipped: a replayed old ban does not undo a later unban."""
    state = await rig.open()
    try:
        bootstrap(state)
        first = [ban(1, "198.51.100.7/32"), unban(2, "198.51.100.7/32"), ban(3, "192.0.2.1/32")]
        state.apply(first, 3)
        before = view(state.indexes.to_state())
        counts = dict(state.applied)
        # The same chunk again, and a chunk that overlaps the offset.
        state.apply(first, 3)
        state.apply(first[:1], 1)
        assert state.offset == 3
        assert view(state.indexes.to_state()) == before
        assert refused_by(state, "198.51.100.7", T0) is None
        assert state.applied == counts
        state.apply([*first[1:], ban(4, "192.0.2.2/32")], 4)
        assert state.offset == 4
        assert refused_by(state, "198.51.100.7", T0) is None
        assert refused_by(state, "192.0.2.2", T0) == 4
        assert state.applied["ip_banned"] == counts["ip_banned"] + 1
        await rig.store.flushed()  # type: ignore[union-attr]
        _, tables = rig.file()
        assert [r["ip"] for r in tables["bans"]] == ["192.0.2.1/32", "192.0.2.2/32"]
    finally:
        await rig.close()


@pytest.mark.parametrize(
    "chunk",
    [
        pytest.param([4, 5], id="starts-after-offset+1"),
        pytest.param([3, 5], id="hole-inside-chunk"),
        pytest.param([3, 3], id="repeated-seq"),
        pytest.param([4, 3], id="out-of-order"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_gap_raises_and_changes_nothing(rig: Rig, chunk: Sequence[int]) -> None:
    """A chunk that does not continue the offset raises ValueError; memory and file are kept."""
    state = await rig.open()
    try:
        bootstrap(state)
        state.apply([ban(1, "192.0.2.1/32"), ban(2, "192.0.2.2/32")], 2)
        await rig.store.flushed()  # type: ignore[union-attr]
        before_memory = view(state.indexes.to_state())
        before_file = rig.file()
        counts = dict(state.applied)
        applied_at = state.last_applied_at
        rig.clock.advance(5)
        with pytest.raises(ValueError, match="gap"):
            state.apply([ban(seq, f"198.51.100.{seq}/32") for seq in chunk], max(chunk))
        assert state.offset == 2
        assert view(state.indexes.to_state()) == before_memory
        assert state.applied == counts
        assert state.last_applied_at == applied_at
        await rig.store.flushed()  # type: ignore[union-attr]
        assert rig.file() == before_file
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_unknown_event_type_skipped_and_logged_once(rig: Rig) -> None:
    """Unknown event types are skipped (the offset still moves) and logged once per type."""
    state = await rig.open()
    try:
        bootstrap(state)
        future = [
            UnknownEvent(seq=1, timestamp=T0, type="quota_set", body={"x": 1}),
            ban(2, "192.0.2.1/32"),
            UnknownEvent(seq=3, timestamp=T0, type="quota_set", body={"x": 2}),
            UnknownEvent(seq=4, timestamp=T0, type="other_thing", body={}),
        ]
        with capturedLogs() as captured:
            state.apply(future, 4)
            state.apply([UnknownEvent(seq=5, timestamp=T0, type="quota_set", body={})], 5)
        warned = [e.get("type") for e in captured if "unknown type" in str(e.get("log_format", ""))]
        assert sorted(warned) == ["other_thing", "quota_set"]
        assert state.offset == 5
        assert refused_by(state, "192.0.2.1", T0) == 2
        assert state.applied == {"ip_banned": 1}
        await rig.store.flushed()  # type: ignore[union-attr]
        meta, tables = rig.file()
        assert meta["offset"] == "5"
        assert [r["ip"] for r in tables["bans"]] == ["192.0.2.1/32"]
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_cache_events_reach_listeners_and_move_offset(rig: Rig) -> None:
    """A cache invalidation is handed to the cache listeners and changes no ban state."""
    state = await rig.open()
    try:
        bootstrap(state)
        seen: list[CacheInvalidated] = []
        state.cache_listeners.append(seen.append)
        inval = CacheInvalidated(seq=1, timestamp=T0, source="operator:ops", tags=("a",))
        state.apply([inval], 1)
        assert seen == [inval]
        assert state.offset == 1
        assert len(state.indexes.bans) == 0
        state.apply([inval], 1)  # replayed: not handed on twice
        assert seen == [inval]
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_snapshot_replaces_all_but_live_local_bans(rig: Rig) -> None:
    """A snapshot replaces bans, allows and revocations; only live seq-0 edge:<id> bans stay."""
    state = await rig.open()
    try:
        bootstrap(state)
        state.apply(
            [
                ban(1, "192.0.2.1/32"),
                allow(2, "192.0.2.2/32"),
                revoke(3, "old-jti"),
                revoke_sub(4, "old-sub", T0),
                # A local ban the master broadcast back (seq > 0): the master's word, not ours.
                ban(5, "192.0.2.5/32", source=f"edge:{EDGE}"),
            ],
            5,
        )
        mine = state.add_local_ban(
            IpBanned(ip="198.51.100.1/32", reason="failures", expires_at=T0 + 600)
        )
        assert mine.seq == 0 and mine.source == f"edge:{EDGE}"
        state.add_local_ban(IpBanned(ip="198.51.100.2/32", reason="failures", expires_at=T0 + 5))
        state.add_local_ban(
            IpBanned(ip="198.51.100.3/32", reason="other", expires_at=None, source="edge:other")
        )
        rig.clock.advance(10)  # the second local ban has expired
        resets: list[None] = []
        state.reset_listeners.append(lambda: resets.append(None))
        master_ban = {
            "ip": "203.0.113.0/24",
            "reason": "snap",
            "expires_at": None,
            "source": "operator:ops",
            "seq": 40,
        }
        state.apply_snapshot(
            {
                "bans": [master_ban],
                "allows": [],
                "revoked_tokens": [{"jti": "new-jti", "expires_at": None}],
                "revoked_subjects": [],
            },
            "log-bbbb",
            42,
        )
        assert resets == [None]
        assert (state.log_id, state.offset, state.synced) == ("log-bbbb", 42, True)
        now = rig.clock.seconds()
        bans = {e.ip: e for e in state.indexes.bans}
        assert set(bans) == {"203.0.113.0/24", "198.51.100.1/32"}
        assert bans["198.51.100.1/32"] == mine
        assert len(state.indexes.allows) == 0
        assert dict(state.indexes.revocations.tokens()) == {"new-jti": None}
        assert dict(state.indexes.revocations.subjects()) == {}
        assert refused_by(state, "192.0.2.1", now) is None
        assert refused_by(state, "192.0.2.5", now) is None
        assert refused_by(state, "198.51.100.1", now) == 0
        assert refused_by(state, "203.0.113.77", now) == 40
        await rig.store.flushed()  # type: ignore[union-attr]
        meta, tables = rig.file()
        assert meta == {"offset": "42", "log_id": "log-bbbb"}
        assert sorted(r["ip"] for r in tables["bans"]) == ["198.51.100.1/32", "203.0.113.0/24"]
        assert tables["allows"] == [] and tables["revoked_subjects"] == []
        assert [r["jti"] for r in tables["revoked_tokens"]] == ["new-jti"]
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_snapshot_ban_beats_local_ban_of_same_network(rig: Rig) -> None:
    """When the snapshot has an entry for the same network as a local ban, the master's wins."""
    state = await rig.open()
    try:
        bootstrap(state)
        state.add_local_ban(IpBanned(ip="198.51.100.1/32", reason="local", expires_at=T0 + 600))
        row = {"ip": "198.51.100.1/32", "reason": "m", "expires_at": None, "source": "o", "seq": 9}
        state.apply_snapshot({"bans": [row]}, LOG_ID, 9)
        assert refused_by(state, "198.51.100.1", T0) == 9
    finally:
        await rig.close()


@pytest.mark.parametrize(
    "doc",
    [
        {"bans": [{"ip": "not-an-ip"}]},
        {"bans": "nope"},
        {"allows": [{"ip": "192.0.2.1", "seq": -1}]},
        {"revoked_tokens": [{"jti": 5}]},
        {"revoked_subjects": [{"sub": "s"}]},
        {"bans": [{"ip": "192.0.2.1", "expires_at": float("nan")}]},
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_snapshot_changes_nothing(rig: Rig, doc: dict[str, Any]) -> None:
    """A malformed snapshot raises SnapshotError and leaves memory, offset and file as they were."""
    state = await rig.open()
    try:
        bootstrap(state)
        state.apply([ban(1, "192.0.2.9/32")], 1)
        await rig.store.flushed()  # type: ignore[union-attr]
        before = (view(state.indexes.to_state()), state.offset, state.log_id, rig.file())
        with pytest.raises(SnapshotError):
            state.apply_snapshot(doc, "log-other", 50)
        await rig.store.flushed()  # type: ignore[union-attr]
        assert (view(state.indexes.to_state()), state.offset, state.log_id, rig.file()) == before
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_local_ban_persisted_and_reloaded(rig: Rig) -> None:
    """A local ban survives a restart and refuses its client before any sync."""
    state = await rig.open()
    bootstrap(state, offset=3)
    state.add_local_ban(IpBanned(ip="2001:db8:9:9::/64", reason="failures", expires_at=T0 + 600))
    state = await rig.reopen()
    try:
        assert state.synced and state.offset == 3 and state.log_id == LOG_ID
        assert refused_by(state, "2001:db8:9:9::1", T0) == 0
        (entry,) = list(state.indexes.bans)
        assert (entry.source, entry.reason, entry.expires_at) == (
            f"edge:{EDGE}",
            "failures",
            T0 + 600,
        )
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_local_ban_never_replaces_a_live_master_ban(rig: Rig) -> None:
    """A local ban of a network the master already bans keeps the master's entry (and its ref)."""
    state = await rig.open()
    try:
        bootstrap(state)
        state.apply([ban(1, "198.51.100.1/32")], 1)
        kept = state.add_local_ban(IpBanned(ip="198.51.100.1/32", reason="local"))
        assert kept.seq == 1
        assert refused_by(state, "198.51.100.1", T0) == 1
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_sweep_removes_expired_from_memory_and_file(rig: Rig) -> None:
    """``sweep`` drops what has expired at the Clock's time, in memory and in the file."""
    state = await rig.open()
    try:
        bootstrap(state)
        state.apply(
            [
                ban(1, "192.0.2.1/32", expires_at=T0 + 10),
                ban(2, "192.0.2.2/32", expires_at=T0 + 100),
                ban(3, "192.0.2.3/32"),
                allow(4, "192.0.2.4/32", expires_at=T0 + 10),
                revoke(5, "jti-short", expires_at=T0 + 10),
                revoke(6, "jti-long", expires_at=None),
            ],
            6,
        )
        state.add_local_ban(IpBanned(ip="198.51.100.1/32", reason="l", expires_at=T0 + 10))
        assert state.sweep() == 0
        rig.clock.advance(10)  # expires_at == now counts as expired
        assert state.sweep() == 4
        assert sorted(e.ip for e in state.indexes.bans) == ["192.0.2.2/32", "192.0.2.3/32"]
        assert len(state.indexes.allows) == 0
        assert dict(state.indexes.revocations.tokens()) == {"jti-long": None}
        assert state.sweep() == 0
        await rig.store.flushed()  # type: ignore[union-attr]
        _, tables = rig.file()
        assert [r["ip"] for r in tables["bans"]] == ["192.0.2.2/32", "192.0.2.3/32"]
        assert tables["allows"] == []
        assert [r["jti"] for r in tables["revoked_tokens"]] == ["jti-long"]
        state = await rig.reopen()
        assert sorted(e.ip for e in state.indexes.bans) == ["192.0.2.2/32", "192.0.2.3/32"]
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_flushed_then_reopen_gives_same_state(rig: Rig) -> None:
    """After ``flushed()`` a new EdgeState on the file has the same log id, offset and state."""
    state = await rig.open()
    bootstrap(
        state,
        offset=100,
        bans=[{"ip": "10.0.0.0/8", "reason": "s", "expires_at": None, "source": "o", "seq": 90}],
        revoked_subjects=[{"sub": "bob", "before": T0 - 5}],
    )
    state.apply(
        [ban(101, "192.0.2.1/32", T0 + 3600), allow(102, "10.1.0.0/16"), revoke(103, "j")], 103
    )
    state.add_local_ban(IpBanned(ip="198.51.100.1/32", reason="l", expires_at=T0 + 600))
    expected = view(state.indexes.to_state())
    await rig.store.flushed()  # type: ignore[union-attr]
    state = await rig.reopen()
    try:
        assert (state.log_id, state.offset, state.synced) == (LOG_ID, 103, True)
        assert view(state.indexes.to_state()) == expected
        assert refused_by(state, "10.2.3.4", T0) == 90
        assert refused_by(state, "10.1.3.4", T0) is None
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_fresh_file_is_not_synced(rig: Rig) -> None:
    """A new file has no log id, offset 0 and is not synced."""
    state = await rig.open()
    try:
        assert (state.log_id, state.offset, state.synced) == (None, 0, False)
        assert len(state.indexes.bans) == 0
    finally:
        await rig.close()


def _workload(n: int) -> list[Event]:
    events: list[Event] = []
    for seq in range(1, n + 1):
        host = seq % 23
        ip = f"198.51.{seq % 3}.{host}/32"
        kind = seq % 7
        if kind in (0, 1, 2):
            events.append(ban(seq, ip, expires_at=None if seq % 2 else T0 + 10_000))
        elif kind == 3:
            events.append(unban(seq, ip))
        elif kind == 4:
            events.append(allow(seq, ip))
        elif kind == 5:
            events.append(revoke(seq, f"jti-{host}", expires_at=T0 + seq))
        else:
            events.append(revoke_sub(seq, f"sub-{host}", before=T0 + seq))
    return events


@pytest_twisted.ensureDeferred
async def test_file_is_consistent_at_every_commit(rig: Rig) -> None:
    """While writes go behind, every committed file state equals replay of events <= its offset."""
    events = _workload(600)
    state = await rig.open()
    observed: set[int] = set()
    try:
        bootstrap(state)
        await rig.store.flushed()  # type: ignore[union-attr]
        position = 0
        step = 1
        while position < len(events):
            chunk = events[position : position + step]
            position += len(chunk)
            state.apply(chunk, position)
            step = step % 9 + 1
            if position % 3 == 0:
                # Let the reactor run: the write-behind commits in its thread meanwhile.
                await deferLater(reactor, 0, lambda: None)
            # What a crash right now would leave: the last committed transaction.
            meta, tables = rig.file()
            offset = int(meta["offset"])
            observed.add(offset)
            assert stored_as_state(tables) == view(replay(events[:offset])), offset
        await rig.store.flushed()  # type: ignore[union-attr]
        meta, tables = rig.file()
        assert int(meta["offset"]) == len(events)
        assert stored_as_state(tables) == view(replay(events))
        # The writes really went behind: several intermediate offsets were seen committed.
        assert len(observed) > 3
    finally:
        await rig.close()


@pytest_twisted.ensureDeferred
async def test_reopen_after_many_applies_agrees_with_replay(rig: Rig) -> None:
    """Reopening after many small applies gives the state of exactly the events <= the offset."""
    events = _workload(400)
    state = await rig.open()
    bootstrap(state)
    for seq in range(1, len(events) + 1):
        state.apply(events[seq - 1 : seq], seq)
    await rig.close()
    state = await rig.open()
    try:
        assert state.offset == len(events)
        assert view(state.indexes.to_state()) == view(replay(events))
        # Replaying an overlapping tail after the restart (as catch-up does) changes nothing.
        state.apply(events[-50:], len(events))
        assert view(state.indexes.to_state()) == view(replay(events))
    finally:
        await rig.close()
