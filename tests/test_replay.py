"""Tests for edgeauth.replay: the reference semantics every state store must match."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

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
from edgeauth.replay import Entry, State, later_expiry, replay

NET = "192.0.2.0/24"
HOST = "192.0.2.7/32"


def _ban(seq: int, ip: str = NET, reason: str = "", expires_at: float | None = None) -> IpBanned:
    return IpBanned(
        seq=seq,
        timestamp=float(seq),
        source="operator:ops",
        ip=ip,
        reason=reason,
        expires_at=expires_at,
    )


def test_empty_replay() -> None:
    """No events give an empty state and an empty view."""
    assert replay([]).view(0.0) == {
        "bans": [],
        "allows": [],
        "revoked_tokens": [],
        "revoked_subjects": [],
    }


def test_reban_replaces_reason_source_expiry_and_seq() -> None:
    """Banning a banned network replaces its one entry with the newer reason, expiry and seq."""
    second = IpBanned(seq=2, timestamp=2, source="edge:b", ip=NET, reason="new", expires_at=50.0)
    state = replay([_ban(1, reason="old"), second])
    assert state.bans == {NET: Entry(ip=NET, reason="new", expires_at=50.0, source="edge:b", seq=2)}
    permanent_again = replay([second, _ban(3, reason="forever")])
    assert permanent_again.bans[NET].expires_at is None
    assert permanent_again.bans[NET].seq == 3


def test_unban_removes_exact_entry_only() -> None:
    """Unbanning one network leaves covering and covered entries in place."""
    state = replay(
        [
            _ban(1, NET),
            _ban(2, HOST),
            _ban(3, "192.0.0.0/16"),
            IpUnbanned(seq=4, timestamp=4, ip=NET),
        ]
    )
    assert sorted(state.bans) == ["192.0.0.0/16", HOST]


def test_unban_of_missing_entry_changes_nothing() -> None:
    """An unban of a network with no entry is a no-op."""
    state = replay([_ban(1, HOST), IpUnbanned(seq=2, timestamp=2, ip=NET)])
    assert list(state.bans) == [HOST]


def test_allows_are_separate_from_bans() -> None:
    """Allow entries live in their own table: unban never lifts an allow and vice versa."""
    events: list[Event] = [
        _ban(1, NET, reason="b"),
        IpAllowed(seq=2, timestamp=2, ip=NET, reason="a", source="operator:ops"),
        IpUnbanned(seq=3, timestamp=3, ip=NET),
    ]
    state = replay(events)
    assert state.bans == {}
    assert state.allows == {
        NET: Entry(ip=NET, reason="a", expires_at=None, source="operator:ops", seq=2)
    }
    state.apply(_ban(4, NET))
    state.apply(IpUnallowed(seq=5, timestamp=5, ip=NET))
    assert list(state.bans) == [NET]
    assert state.allows == {}


def test_token_revoked_twice_keeps_later_expiry() -> None:
    """A second revocation of a jti keeps the later expiry, in either order."""
    a = TokenRevoked(seq=1, timestamp=1, jti="j", expires_at=100.0)
    b = TokenRevoked(seq=2, timestamp=2, jti="j", expires_at=50.0)
    assert replay([a, b]).revoked_tokens == {"j": 100.0}
    assert replay([b, a]).revoked_tokens == {"j": 100.0}


def test_token_revoked_without_expiry_wins() -> None:
    """A revocation with no expiry (None) is never shortened by one with an expiry."""
    forever = TokenRevoked(seq=1, timestamp=1, jti="j", expires_at=None)
    timed = TokenRevoked(seq=2, timestamp=2, jti="j", expires_at=500.0)
    assert replay([forever, timed]).revoked_tokens == {"j": None}
    assert replay([timed, forever]).revoked_tokens == {"j": None}


def test_later_expiry() -> None:
    """later_expiry is the max, with None meaning never (so None wins)."""
    assert later_expiry(1.0, 2.0) == 2.0
    assert later_expiry(3.0, 2.0) == 3.0
    assert later_expiry(None, 2.0) is None
    assert later_expiry(2.0, None) is None
    assert later_expiry(None, None) is None


def test_subject_revocation_keeps_max_before() -> None:
    """A subject's before only moves forward."""
    events = [
        SubjectRevoked(seq=1, timestamp=1, sub="alice", before=100.0),
        SubjectRevoked(seq=2, timestamp=2, sub="alice", before=40.0),
        SubjectRevoked(seq=3, timestamp=3, sub="bob", before=10.0),
    ]
    assert replay(events).revoked_subjects == {"alice": 100.0, "bob": 10.0}
    events.append(SubjectRevoked(seq=4, timestamp=4, sub="alice", before=150.0))
    assert replay(events).revoked_subjects["alice"] == 150.0


def test_cache_and_unknown_events_change_no_state() -> None:
    """Cache invalidations and unknown event types leave the state untouched."""
    state = replay(
        [
            _ban(1, HOST),
            CacheInvalidated(seq=2, timestamp=2, all=True),
            UnknownEvent(seq=3, timestamp=3, type="ip_quarantined", body={"ip": HOST}),
        ]
    )
    assert state == replay([_ban(1, HOST)])


def test_view_drops_expired_entries() -> None:
    """The view at now omits bans, allows and tokens whose expiry is <= now; subjects stay."""
    state = replay(
        [
            _ban(1, HOST, expires_at=100.0),
            _ban(2, NET, expires_at=None),
            IpAllowed(seq=3, timestamp=3, ip="198.51.100.0/24", expires_at=100.0),
            TokenRevoked(seq=4, timestamp=4, jti="old", expires_at=100.0),
            TokenRevoked(seq=5, timestamp=5, jti="new", expires_at=200.0),
            SubjectRevoked(seq=6, timestamp=6, sub="s", before=1.0),
        ]
    )
    early = state.view(99.999)
    assert [e["ip"] for e in early["bans"]] == [NET, HOST]
    assert [e["ip"] for e in early["allows"]] == ["198.51.100.0/24"]
    assert [t["jti"] for t in early["revoked_tokens"]] == ["new", "old"]
    at_expiry = state.view(100.0)
    assert at_expiry == {
        "bans": [{"ip": NET, "reason": "", "expires_at": None, "source": "operator:ops", "seq": 2}],
        "allows": [],
        "revoked_tokens": [{"jti": "new", "expires_at": 200.0}],
        "revoked_subjects": [{"sub": "s", "before": 1.0}],
    }
    assert HOST in state.bans, "the view filters; the state keeps the expired entry"


def test_view_is_sorted_by_key() -> None:
    """Entries come out sorted by their key, whatever the order of the events."""
    state = replay([_ban(1, "203.0.113.0/24"), _ban(2, "10.0.0.0/8"), _ban(3, "2001:db8::/32")])
    assert [e["ip"] for e in state.view(0)["bans"]] == sorted(
        ["203.0.113.0/24", "10.0.0.0/8", "2001:db8::/32"]
    )


# --- idempotence ------------------------------------------------------------------------------

_ips = st.sampled_from([NET, HOST, "192.0.0.0/16", "2001:db8::/48", "2001:db8::1/128"])
_expiry = st.none() | st.sampled_from([10.0, 20.0, 30.0])
_names = st.sampled_from(["a", "b", "c"])


@st.composite
def _events(draw: st.DrawFn) -> list[Event]:
    kinds = draw(
        st.lists(
            st.sampled_from(["ban", "unban", "allow", "unallow", "token", "subject", "cache"]),
            max_size=40,
        )
    )
    out: list[Event] = []
    for seq, kind in enumerate(kinds, start=1):
        t, source = float(seq), draw(_names)
        if kind in ("ban", "allow"):
            cls = IpBanned if kind == "ban" else IpAllowed
            ip, reason, expires_at = draw(_ips), draw(_names), draw(_expiry)
            out.append(
                cls(
                    seq=seq,
                    timestamp=t,
                    source=source,
                    ip=ip,
                    reason=reason,
                    expires_at=expires_at,
                )
            )
        elif kind in ("unban", "unallow"):
            uncls = IpUnbanned if kind == "unban" else IpUnallowed
            out.append(uncls(seq=seq, timestamp=t, source=source, ip=draw(_ips)))
        elif kind == "token":
            jti, expires_at = draw(_names), draw(_expiry)
            out.append(
                TokenRevoked(seq=seq, timestamp=t, source=source, jti=jti, expires_at=expires_at)
            )
        elif kind == "subject":
            sub, before = draw(_names), draw(st.sampled_from([1.0, 5.0, 9.0]))
            out.append(SubjectRevoked(seq=seq, timestamp=t, source=source, sub=sub, before=before))
        else:
            out.append(CacheInvalidated(seq=seq, timestamp=t, source=source, all=True))
    return out


@given(_events())
def test_applying_a_sequence_twice_equals_once(events: list[Event]) -> None:
    """Replaying a sequence and then the same sequence again gives the same state as once."""
    once = replay(events)
    assert replay(events + events) == once
    again = State()
    for event in events:
        again.apply(event)
        again.apply(event)
    assert again == once


@given(_events(), st.sampled_from([0.0, 15.0, 25.0, 35.0]))
def test_view_matches_a_brute_force_model(events: list[Event], now: float) -> None:
    """The view equals the last ban/allow per key, max before, later token expiry."""
    view = replay(events).view(now)
    bans: dict[str, IpBanned] = {}
    allows: dict[str, IpAllowed] = {}
    tokens: dict[str, list[float | None]] = {}
    subjects: dict[str, float] = {}
    for e in events:
        if isinstance(e, IpBanned):
            bans[e.ip] = e
        elif isinstance(e, IpUnbanned):
            bans.pop(e.ip, None)
        elif isinstance(e, IpAllowed):
            allows[e.ip] = e
        elif isinstance(e, IpUnallowed):
            allows.pop(e.ip, None)
        elif isinstance(e, TokenRevoked):
            tokens.setdefault(e.jti, []).append(e.expires_at)
        elif isinstance(e, SubjectRevoked):
            subjects[e.sub] = max(subjects.get(e.sub, e.before), e.before)

    def live(exp: float | None) -> bool:
        return exp is None or exp > now

    expected_tokens = {
        jti: None if None in exps else max(x for x in exps if x is not None)
        for jti, exps in tokens.items()
    }
    assert [(e["ip"], e["seq"]) for e in view["bans"]] == sorted(
        (ip, e.seq) for ip, e in bans.items() if live(e.expires_at)
    )
    assert [(e["ip"], e["seq"]) for e in view["allows"]] == sorted(
        (ip, e.seq) for ip, e in allows.items() if live(e.expires_at)
    )
    assert view["revoked_tokens"] == [
        {"jti": j, "expires_at": x} for j, x in sorted(expected_tokens.items()) if live(x)
    ]
    assert view["revoked_subjects"] == [
        {"sub": s, "before": b} for s, b in sorted(subjects.items())
    ]
