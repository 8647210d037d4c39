"""Tests for edgeauth.master.log: the SQL against the replay model, and the real SQLite log."""

from __future__ import annotations

import ipaddress
import json
import random
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from zope.interface.verify import verifyObject

from edgeauth.events import (
    CacheInvalidated,
    Event,
    EventError,
    IpUnallowed,
    IpUnbanned,
    SubjectRevoked,
    TokenRevoked,
    UnknownEvent,
    encode_event,
    event_from_dict,
    event_from_request,
)
from edgeauth.master import log as eventlog
from edgeauth.master.log import IEventLog, LogRecord, RefusedError, SqliteEventLog
from edgeauth.replay import State, replay

NOW = 1_763_850_000.0

# Raw spellings as operators send them: several spell the same network, several networks cover
# the same addresses, so bans, unbans, allows and unallows collide often.
IP_POOL = (
    "192.0.2.7",
    "::ffff:192.0.2.7",
    "192.0.2.7/32",
    "192.0.2.8",
    "192.0.2.0/24",
    "::ffff:192.0.2.0/120",
    "192.0.0.0/16",
    "0.0.0.0/0",
    "2001:db8::1",
    "2001:db8::1/128",
    "2001:db8::/64",
    "2001:db8::/32",
)
# Request times relative to NOW and ttls: many combinations expire before, at or after NOW.
REQUEST_AGES = (-300.0, -100.0, -20.0, -5.0, 0.0)
TTLS = (None, None, 5.0, 20.0, 50.0, 100.0, 1000.0)
NAMES = ("a", "b", "c")
TOKEN_EXPIRIES = (None, NOW - 10, NOW, NOW + 10, NOW + 100)
BEFORES = (NOW - 50, NOW - 10, NOW + 10)
KINDS = (
    "ban",
    "ban",
    "unban",
    "unban",
    "allow",
    "unallow",
    "revoke_token",
    "revoke_subject",
    "invalidate",
)


def make_draft(kind: str, ip: str, age: float, ttl: float | None, name: str, aux: int) -> Event:
    """Build one draft through the operator request path, as the API does."""
    when = NOW + age
    source = f"operator:{name}"
    body: dict[str, Any]
    if kind in ("ban", "allow"):
        body = {"ip": ip, "reason": f"r{aux}"}
        if ttl is not None:
            body["ttl"] = ttl
    elif kind in ("unban", "unallow"):
        body = {"ip": ip}
    elif kind == "revoke_token":
        body = {"jti": name, "expires_at": TOKEN_EXPIRIES[aux % len(TOKEN_EXPIRIES)]}
    elif kind == "revoke_subject":
        body = {"sub": name, "before": BEFORES[aux % len(BEFORES)]}
    else:
        body = {"tags": [name], "soft": aux % 2 == 0}
    return event_from_request(kind, body, now=when, source=source)


draft_strategy = st.builds(
    make_draft,
    st.sampled_from(KINDS),
    st.sampled_from(IP_POOL),
    st.sampled_from(REQUEST_AGES),
    st.sampled_from(TTLS),
    st.sampled_from(NAMES),
    st.integers(0, 29),
)


def random_drafts(rng: random.Random) -> Iterator[Event]:
    """Yield drafts forever, chosen by ``rng`` from the same pools as the strategy."""
    while True:
        yield make_draft(
            rng.choice(KINDS),
            rng.choice(IP_POOL),
            rng.choice(REQUEST_AGES),
            rng.choice(TTLS),
            rng.choice(NAMES),
            rng.randrange(30),
        )


def memory_db() -> tuple[sqlite3.Connection, sqlite3.Cursor, str, int, int]:
    """Open an in-memory database with the log's schema."""
    conn = sqlite3.connect(":memory:")
    cursor = conn.cursor()
    log_id, tail, earliest = eventlog._init_txn(cursor)
    return conn, cursor, log_id, tail, earliest


def expected_refusal(state: State, draft: Event) -> str | None:
    """Return the refusal code replay predicts for a draft (None when it commits)."""
    if isinstance(draft, IpUnbanned | IpUnallowed):
        table = state.bans if isinstance(draft, IpUnbanned) else state.allows
        entry = table.get(draft.ip)
        if entry is None or not entry.live(draft.timestamp):
            return "not_banned" if isinstance(draft, IpUnbanned) else "not_allowed"
    return None


class Model:
    """Feeds drafts through ``_append_txn`` and checks each outcome against ``replay``."""

    def __init__(self) -> None:
        self.conn, self.cursor, self.log_id, tail, _ = memory_db()
        assert tail == 0
        self.state = State()
        self.committed: list[Event] = []
        self.refused = 0

    def append(self, batch: Sequence[Event]) -> None:
        """Append one batch in one transaction and check every result."""
        results = eventlog._append_txn(self.cursor, batch)
        self.conn.commit()
        assert len(results) == len(batch)
        for draft, result in zip(batch, results, strict=True):
            code = expected_refusal(self.state, draft)
            if code is not None:
                assert isinstance(result, RefusedError), f"{draft} should be refused"
                assert (result.code, result.status) == (code, 404)
                self.refused += 1
                continue
            assert isinstance(result, LogRecord), f"{draft} was refused: {result}"
            expected = attrs.evolve(draft, seq=len(self.committed) + 1)
            assert result.seq == expected.seq
            assert result.event == expected
            assert result.json == encode_event(expected)
            self.committed.append(expected)
            self.state.apply(expected)

    def check_snapshot(self, now: float) -> None:
        """The snapshot at ``now`` equals the replayed view, with the tail."""
        snapshot = eventlog._snapshot_txn(self.cursor, now)
        assert snapshot == {"tail": len(self.committed), **replay(self.committed).view(now)}

    def stored_events(self) -> list[Event]:
        """Decode every event row of the database."""
        rows = eventlog._read_txn(self.cursor, 0, 1_000_000)
        assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1))
        decoded = [event_from_dict(json.loads(body)) for _, body in rows]
        known = [e for e in decoded if not isinstance(e, UnknownEvent)]
        assert len(known) == len(decoded)
        return known


def split(items: Sequence[Event], cuts: Sequence[int]) -> list[Sequence[Event]]:
    """Split ``items`` at the sorted, deduplicated ``cuts``."""
    bounds = [0, *sorted({c % (len(items) + 1) for c in cuts}), len(items)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


# Hypothesis favours short lists; drawing the length first spreads runs over 0..200 drafts.
draft_lists = st.integers(0, 200).flatmap(
    lambda n: st.lists(draft_strategy, min_size=n, max_size=n)
)


@settings(max_examples=60)
@given(draft_lists, st.lists(st.integers(0, 200), max_size=30))
def test_sql_state_equals_replay(drafts: list[Event], cuts: list[int]) -> None:
    """Any drafts in any batch split: refusals, seqs and snapshots match replay of the commits."""
    model = Model()
    for batch in split(drafts, cuts):
        model.append(batch)
    assert len(model.committed) + model.refused == len(drafts)
    for now in (NOW - 100, NOW - 20, NOW, NOW + 50, NOW + 2000):
        model.check_snapshot(now)
    assert model.stored_events() == model.committed


def test_thousand_mixed_events_snapshot_equals_replayed_state() -> None:
    """Acceptance: after 1,000 mixed events the snapshot equals the replayed state."""
    rng = random.Random(20241009)
    model = Model()
    drafts = random_drafts(rng)
    while len(model.committed) < 1000:
        want = min(rng.randint(1, 40), 1000 - len(model.committed))
        batch = [next(drafts) for _ in range(want)]
        model.append(batch)
    assert len(model.committed) == 1000
    kinds = {type(e).__name__ for e in model.committed}
    assert {"IpBanned", "IpUnbanned", "IpAllowed", "IpUnallowed"} <= kinds
    assert {"TokenRevoked", "SubjectRevoked", "CacheInvalidated"} <= kinds
    assert model.refused > 0, "the run must exercise refused unbans"
    expiries = [getattr(e, "expires_at", None) for e in model.committed]
    assert any(x is not None and x <= NOW for x in expiries), "the run must exercise expiries"
    snapshot = eventlog._snapshot_txn(model.cursor, NOW)
    from_db = replay(model.stored_events()).view(NOW)
    assert snapshot == {"tail": 1000, **from_db}
    assert snapshot == {"tail": 1000, **replay(model.committed).view(NOW)}
    assert snapshot["bans"] and snapshot["allows"] and snapshot["revoked_tokens"]


def test_unban_of_expired_entry_is_refused_and_keeps_the_row() -> None:
    """An unban after the entry expired is refused (404); the snapshot omits the entry."""
    model = Model()
    ban = event_from_request("ban", {"ip": "192.0.2.1", "ttl": 10}, now=NOW - 20, source="o:a")
    model.append([ban])
    unban = event_from_request("unban", {"ip": "192.0.2.1"}, now=NOW, source="o:a")
    results = eventlog._append_txn(model.cursor, [unban])
    assert isinstance(results[0], RefusedError)
    assert results[0].code == "not_banned"
    assert eventlog._snapshot_txn(model.cursor, NOW)["bans"] == []
    assert eventlog._snapshot_txn(model.cursor, NOW - 15)["bans"][0]["ip"] == "192.0.2.1/32"


def test_refusals_inside_a_batch_see_earlier_drafts_of_that_batch() -> None:
    """Within one transaction, an unban sees a ban earlier in the same batch, and only once."""
    model = Model()
    ban = make_draft("ban", "192.0.2.0/24", 0, None, "a", 1)
    unban = make_draft("unban", "::ffff:192.0.2.0/120", 0, None, "a", 1)
    model.append([unban, ban, unban, unban])
    assert [type(e).__name__ for e in model.committed] == ["IpBanned", "IpUnbanned"]
    assert model.refused == 2


def test_init_is_idempotent_and_keeps_log_id() -> None:
    """Running the schema set-up again keeps log_id, tail and earliest."""
    conn, cursor, log_id, tail, earliest = memory_db()
    assert (tail, earliest) == (0, 1)
    assert len(log_id) == 16 and int(log_id, 16) >= 0
    eventlog._append_txn(cursor, [make_draft("ban", "192.0.2.1", 0, None, "a", 0)])
    conn.commit()
    assert eventlog._init_txn(cursor) == (log_id, 1, 1)
    _, other, other_id, _, _ = memory_db()
    assert other_id != log_id


# --- compaction ---------------------------------------------------------------------------------


def _compaction_model() -> Model:
    model = Model()
    drafts = [
        make_draft("ban", "192.0.2.1", -100, 50.0, "a", 0),  # expired at NOW - 50
        make_draft("ban", "192.0.2.2", 0, None, "a", 0),
        make_draft("allow", "192.0.2.3", -100, 100.0, "a", 0),  # expires exactly at NOW
        make_draft("allow", "192.0.2.4", 0, 10.0, "a", 0),
        make_draft("revoke_token", "", 0, None, "a", 1),  # NOW - 10: expired
        make_draft("revoke_token", "", 0, None, "b", 3),  # NOW + 10
        make_draft("revoke_subject", "", 0, None, "s", 0),
        make_draft("invalidate", "", 0, None, "t", 0),
        make_draft("ban", "2001:db8::/64", 0, 1000.0, "a", 0),
        make_draft("ban", "192.0.2.0/24", 0, None, "a", 0),
    ]
    model.append(drafts)
    assert len(model.committed) == 10
    return model


def test_compact_keeps_newest_n_events_and_drops_expired_rows() -> None:
    """_compact_txn keeps the newest N events, drops expired state rows, keeps the tail."""
    model = _compaction_model()
    before = eventlog._snapshot_txn(model.cursor, NOW)
    removed, earliest = eventlog._compact_txn(model.cursor, 3, 0.0, NOW)
    model.conn.commit()
    assert (removed, earliest) == (7, 8)
    assert [seq for seq, _ in eventlog._read_txn(model.cursor, 0, 100)] == [8, 9, 10]
    assert eventlog._snapshot_txn(model.cursor, NOW) == before
    everything = eventlog._snapshot_txn(model.cursor, 0.0)
    assert [b["ip"] for b in everything["bans"]] == [
        "192.0.2.0/24",
        "192.0.2.2/32",
        "2001:db8::/64",
    ]
    assert [a["ip"] for a in everything["allows"]] == ["192.0.2.4/32"]
    assert [t["jti"] for t in everything["revoked_tokens"]] == ["b"]
    assert [s["sub"] for s in everything["revoked_subjects"]] == ["s"]
    assert eventlog._init_txn(model.cursor)[1:] == (10, 8)


def test_compact_by_age_and_to_empty() -> None:
    """Old events go even within the count, only as a prefix; an empty log keeps its tail."""
    model = _compaction_model()
    # seq 1 and seq 3 were requested at NOW - 100, seq 2 at NOW: only seq 1 may go, or the
    # retained log would have a hole that catch-up readers silently skip.
    removed, earliest = eventlog._compact_txn(model.cursor, 100, NOW - 50, NOW)
    assert (removed, earliest) == (1, 2)
    seqs = [seq for seq, _ in eventlog._read_txn(model.cursor, 0, 100)]
    assert seqs == list(range(2, 11))
    removed, earliest = eventlog._compact_txn(model.cursor, 100, NOW + 1, NOW)
    assert (removed, earliest) == (9, 11)
    assert eventlog._read_txn(model.cursor, 0, 100) == []
    model.conn.commit()
    results = eventlog._append_txn(model.cursor, [make_draft("ban", "192.0.2.9", 0, None, "a", 0)])
    assert isinstance(results[0], LogRecord) and results[0].seq == 11
    assert eventlog._compact_txn(model.cursor, 5, 0.0, NOW) == (0, 11)
    assert eventlog._compact_txn(model.cursor, 0, 0.0, NOW) == (1, 12)


# --- covering networks and entry listing --------------------------------------------------------


def test_covering_networks_v4() -> None:
    """Every prefix from /32 down to /0 that contains the address, most specific first."""
    nets = eventlog.covering_networks("192.0.2.7/32")
    assert len(nets) == 33
    assert nets[0] == "192.0.2.7/32" and nets[-1] == "0.0.0.0/0"
    assert {"192.0.2.0/24", "192.0.0.0/16", "192.0.2.6/31"} <= set(nets)
    assert "192.0.3.0/24" not in nets
    for net in nets:
        assert ipaddress.ip_address("192.0.2.7") in ipaddress.ip_network(net)


def test_covering_networks_v6() -> None:
    """An IPv6 address is covered by 129 networks, each in normal form."""
    nets = eventlog.covering_networks("2001:db8::1/128")
    assert len(nets) == 129
    assert nets[0] == "2001:db8::1/128" and nets[-1] == "::/0"
    assert "2001:db8::/64" in nets and "2001:db8::/32" in nets


@pytest.mark.parametrize("net", ["192.0.2.0/24", "2001:db8::/64"])
def test_covering_networks_refuses_networks(net: str) -> None:
    """Only single addresses are looked up."""
    with pytest.raises(EventError) as info:
        eventlog.covering_networks(net)
    assert info.value.code == "invalid_ip"


def test_entries_txn_lists_covering_live_entries_and_pages() -> None:
    """_entries_txn: ip= lists live covering entries; after/limit page by key."""
    model = Model()
    model.append(
        [
            make_draft("ban", ip, 0, None, "a", 0)
            for ip in ("192.0.2.7", "192.0.2.0/24", "192.0.0.0/16", "192.0.3.0/24", "10.0.0.0/8")
        ]
        + [make_draft("ban", "192.0.2.6/31", -100, 50.0, "a", 0)]  # expired
    )
    covering = eventlog._entries_txn(model.cursor, "bans", NOW, "192.0.2.7/32", None, 100)
    assert [r["ip"] for r in covering] == ["192.0.0.0/16", "192.0.2.0/24", "192.0.2.7/32"]
    assert set(covering[0]) == {"ip", "reason", "expires_at", "source", "seq"}
    page1 = eventlog._entries_txn(model.cursor, "bans", NOW, None, None, 2)
    page2 = eventlog._entries_txn(model.cursor, "bans", NOW, None, page1[-1]["ip"], 2)
    page3 = eventlog._entries_txn(model.cursor, "bans", NOW, None, page2[-1]["ip"], 2)
    listed = [r["ip"] for r in page1 + page2 + page3]
    assert listed == sorted(
        ["192.0.2.7/32", "192.0.2.0/24", "192.0.0.0/16", "192.0.3.0/24", "10.0.0.0/8"]
    )
    assert len(page3) == 1


# --- the real SqliteEventLog on the reactor ------------------------------------------------------


def ban_draft(i: int, **kw: Any) -> Event:
    """A ban draft for a distinct address, stamped now."""
    return event_from_request(
        "ban",
        {"ip": f"198.51.100.{i}", "reason": f"n{i}", **kw},
        now=reactor.seconds(),
        source="operator:t",
    )


class CountingLog(SqliteEventLog):
    """A log that records the size of every group commit it starts."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.batches: list[int] = []

    def _flush(self) -> None:
        self.batches.append(len(self._queue))
        super()._flush()


async def opened(path: Path, cls: Callable[..., SqliteEventLog] = SqliteEventLog, **kw: Any) -> Any:
    """Open a log on ``path`` with the real reactor."""
    event_log = cls(str(path), reactor, **kw)
    await event_log.open()
    return event_log


@pytest_twisted.ensureDeferred
async def test_log_provides_ieventlog(tmp_path: Path) -> None:
    """SqliteEventLog fully provides IEventLog, before and after open."""
    event_log = SqliteEventLog(str(tmp_path / "x" / "log.sqlite3"), reactor)
    assert verifyObject(IEventLog, event_log)
    await event_log.open()
    try:
        assert verifyObject(IEventLog, event_log)
        assert (tmp_path / "x" / "log.sqlite3").exists()
        await event_log.check_writable()
    finally:
        await event_log.close()


@pytest_twisted.ensureDeferred
async def test_reopen_keeps_log_id_tail_and_events(tmp_path: Path) -> None:
    """Open, append, close and reopen: log_id, tail, earliest and the events survive."""
    path = tmp_path / "log.sqlite3"
    first = await opened(path)
    assert (first.tail, first.earliest) == (0, 1)
    log_id = first.log_id
    events = [await first.append(ban_draft(i)) for i in range(1, 4)]
    assert [e.seq for e in events] == [1, 2, 3]
    assert first.tail == 3
    await first.close()
    second = await opened(path, memory_events=2)
    try:
        assert (second.log_id, second.tail, second.earliest) == (log_id, 3, 1)
        records = await second.read(0, 10)
        assert [r.event for r in records] == events
        assert [r.event for r in await second.read(1, 10)] == events[1:]
        more = await second.append(ban_draft(9))
        assert more.seq == 4
    finally:
        await second.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_appends_are_group_committed(tmp_path: Path) -> None:
    """50 appends in one reactor turn share few transactions and get seqs 1..50 in order."""
    event_log = await opened(tmp_path / "log.sqlite3", CountingLog)
    seen: list[LogRecord] = []
    event_log.add_listener(seen.extend)
    try:
        drafts = [ban_draft(i) for i in range(1, 51)]
        pending = [event_log.append(d) for d in drafts]
        results = await DeferredList(pending, fireOnOneErrback=True, consumeErrors=True)
        events = [event for _, event in results]
        assert [e.seq for e in events] == list(range(1, 51))
        assert [e.ip for e in events] == [d.ip for d in drafts]  # type: ignore[attr-defined]
        assert sum(event_log.batches) == 50
        assert len(event_log.batches) < 50
        assert len(event_log.batches) <= 2, event_log.batches
        assert event_log.tail == 50
    finally:
        await event_log.close()
    assert [r.seq for r in seen] == list(range(1, 51)), "listeners saw every commit in order"


@pytest_twisted.ensureDeferred
async def test_next_group_commit_starts_before_this_group_is_answered(tmp_path: Path) -> None:
    """Appends queued during a commit go to the database before the committed callers hear back.

    Each caller still fires only after its own commit, with its own record; close() waits for the
    group in flight and for the one being answered.
    """
    event_log = await opened(tmp_path / "log.sqlite3", CountingLog)
    seen: list[LogRecord] = []
    event_log.add_listener(seen.extend)
    when_answered: list[tuple[int, list[int], int]] = []

    def answered(record: LogRecord) -> LogRecord:
        when_answered.append((record.seq, list(event_log.batches), event_log.tail))
        return record

    try:
        first = event_log.append_record(ban_draft(1)).addCallback(answered)
        queued = [event_log.append_record(ban_draft(i)).addCallback(answered) for i in (2, 3)]
        assert event_log.batches == [1], "the first append starts a commit, the others wait"
        records = await DeferredList([first, *queued], fireOnOneErrback=True, consumeErrors=True)
        # When the first caller heard back, the second group (2 appends) was already started
        # and the first one was not yet in the tail of the second.
        assert when_answered[0] == (1, [1, 2], 1)
        assert [seq for seq, _, _ in when_answered] == [1, 2, 3]
        assert [r.seq for _, r in records] == [1, 2, 3]
        assert [r.event.seq for _, r in records] == [1, 2, 3]
        assert all(json.loads(r.json)["seq"] == r.seq for _, r in records)
        more = event_log.append_record(ban_draft(4))
        closing = event_log.close()
        assert (await more).seq == 4
        await closing
    finally:
        await event_log.close()
    assert [r.seq for r in seen] == [1, 2, 3, 4], "listeners saw every commit in order"


@pytest_twisted.ensureDeferred
async def test_append_fires_with_the_event_of_its_record(tmp_path: Path) -> None:
    """append() is append_record() without the JSON text: the committed event, seq assigned."""
    event_log = await opened(tmp_path / "log.sqlite3")
    try:
        event = await event_log.append(ban_draft(1))
        record = await event_log.append_record(ban_draft(2))
        assert event.seq == 1 and record.seq == 2 and record.event.seq == 2
        assert [r.json for r in await event_log.read(0, 10)][1] == record.json
    finally:
        await event_log.close()


@pytest_twisted.ensureDeferred
async def test_refused_unban_in_a_group_commit_takes_no_seq(tmp_path: Path) -> None:
    """In one group, a refused unban errbacks with not_banned while its neighbours commit."""
    event_log = await opened(tmp_path / "log.sqlite3", CountingLog)
    try:
        now = reactor.seconds()
        first = event_log.append(ban_draft(1))
        missing = event_log.append(
            event_from_request("unban", {"ip": "203.0.113.9"}, now=now, source="operator:t")
        )
        missing_allow = event_log.append(
            event_from_request("unallow", {"ip": "203.0.113.9"}, now=now, source="operator:t")
        )
        second = event_log.append(ban_draft(2))
        lift = event_log.append(
            event_from_request("unban", {"ip": "198.51.100.1"}, now=now, source="operator:t")
        )
        assert (await first).seq == 1
        with pytest.raises(RefusedError) as info:
            await missing
        assert (info.value.code, info.value.status) == ("not_banned", 404)
        with pytest.raises(RefusedError) as info:
            await missing_allow
        assert (info.value.code, info.value.status) == ("not_allowed", 404)
        assert (await second).seq == 2
        lifted = await lift
        assert isinstance(lifted, IpUnbanned) and lifted.seq == 3
        assert event_log.batches == [1, 4]
        snapshot = await event_log.snapshot(reactor.seconds())
        assert snapshot["tail"] == 3
        assert [b["ip"] for b in snapshot["bans"]] == ["198.51.100.2/32"]
    finally:
        await event_log.close()


@pytest_twisted.ensureDeferred
async def test_read_from_memory_and_database_agree(tmp_path: Path) -> None:
    """With memory_events=5, reads near the tail come from memory and agree with the database."""
    event_log = await opened(tmp_path / "log.sqlite3", memory_events=5)
    try:
        results = await DeferredList([event_log.append(ban_draft(i)) for i in range(1, 51)])
        records = [LogRecord(e.seq, encode_event(e), e) for _, e in results]
        assert [r.seq for r in records] == list(range(1, 51))
        for after in range(0, 51):
            for limit in (1, 3, 100):
                d = event_log.read(after, limit)
                from_memory = d.called
                got = await d
                assert from_memory == (after >= 45), (after, from_memory)
                assert got == records[after : after + limit], (after, limit)
        db_reads = list(await event_log.read(40, 10))
        memory_reads = list(await event_log.read(45, 10))
        assert [r.json for r in db_reads[5:]] == [r.json for r in memory_reads]
        one = await event_log.read(0, 100, max_bytes=1)
        assert [r.seq for r in one] == [1]
        size = len(records[0].json) + len(records[1].json) + 2
        assert [r.seq for r in await event_log.read(0, 100, max_bytes=size)] == [1, 2]
        assert [r.seq for r in await event_log.read(0, 100, max_bytes=size - 1)] == [1]
        size = len(records[46].json) + len(records[47].json) + 2
        assert [r.seq for r in await event_log.read(46, 100, max_bytes=size)] == [47, 48]
        assert [r.seq for r in await event_log.read(46, 100, max_bytes=size - 1)] == [47]
    finally:
        await event_log.close()


@pytest_twisted.ensureDeferred
async def test_close_waits_for_queued_appends(tmp_path: Path) -> None:
    """close() right after several appends lets every one commit and fire, then closes."""
    path = tmp_path / "log.sqlite3"
    event_log = await opened(path)
    pending = [event_log.append(ban_draft(i)) for i in range(1, 6)]
    await event_log.close()
    assert all(d.called for d in pending)
    results = await DeferredList(pending, consumeErrors=True)
    assert [(ok, getattr(e, "seq", e)) for ok, e in results] == [(True, i) for i in range(1, 6)]
    reopened = await opened(path)
    try:
        assert reopened.tail == 5
    finally:
        await reopened.close()


@pytest_twisted.ensureDeferred
async def test_snapshot_entries_and_compact_through_the_log(tmp_path: Path) -> None:
    """snapshot(), entries() and compact() of the real log agree with replay."""
    event_log = await opened(tmp_path / "log.sqlite3", retention_events=2, memory_events=10)
    try:
        now = reactor.seconds()
        drafts = [
            ban_draft(1),
            event_from_request("ban", {"ip": "198.51.100.0/24"}, now=now, source="operator:t"),
            event_from_request("allow", {"ip": "198.51.100.1"}, now=now, source="operator:t"),
            event_from_request(
                "revoke_token", {"jti": "j", "expires_at": now - 1}, now=now, source="operator:t"
            ),
            event_from_request("revoke_subject", {"sub": "s"}, now=now, source="operator:t"),
            event_from_request("invalidate", {"all": True}, now=now, source="operator:t"),
        ]
        committed = [await event_log.append(d) for d in drafts]
        assert isinstance(committed[3], TokenRevoked)
        assert isinstance(committed[4], SubjectRevoked)
        assert isinstance(committed[5], CacheInvalidated)
        snapshot = await event_log.snapshot(now)
        assert snapshot == {"tail": 6, **replay(committed).view(now)}
        assert snapshot["revoked_tokens"] == []
        covering = await event_log.entries("bans", now, "198.51.100.1/32", None, 10)
        assert [r["ip"] for r in covering] == ["198.51.100.0/24", "198.51.100.1/32"]
        with pytest.raises(ValueError):
            event_log.entries("events", now, None, None, 10)
        assert await event_log.compact(now) == 4
        assert event_log.earliest == 5
        assert [r.seq for r in await event_log.read(4, 10)] == [5, 6]
        assert await event_log.snapshot(now) == snapshot
    finally:
        await event_log.close()


@pytest_twisted.ensureDeferred
async def test_append_after_close_fails_at_once(tmp_path: Path) -> None:
    """An append to a closed log errbacks with RuntimeError; it never hangs."""
    event_log = await opened(tmp_path / "log.sqlite3")
    await event_log.close()
    for i in (1, 2):
        d = event_log.append(ban_draft(i))
        assert d.called
        with pytest.raises(RuntimeError):
            await d


def test_unopened_log_refuses_reads() -> None:
    """Using the log before open() is a clear RuntimeError, not a hang."""
    event_log = SqliteEventLog("unused.sqlite3", reactor)
    with pytest.raises(RuntimeError):
        event_log.snapshot(NOW)
