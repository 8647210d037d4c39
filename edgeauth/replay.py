"""Reference semantics of the event log: replay events into plain state, with no I/O.

The master's state tables and the edge's indexes must both equal what this pure function computes
(a property test checks the master's snapshot against it). Applying an event twice has the same
effect as applying it once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from edgeauth.events import (
    Event,
    IpAllowed,
    IpBanned,
    IpUnallowed,
    IpUnbanned,
    SubjectRevoked,
    TokenRevoked,
    UnknownEvent,
)


@attrs.frozen(kw_only=True)
class Entry:
    """One ban or allow entry, keyed by its normalised network."""

    ip: str
    reason: str
    expires_at: float | None
    source: str
    seq: int

    def live(self, now: float) -> bool:
        """Return whether the entry is in force at ``now``."""
        return self.expires_at is None or self.expires_at > now


def later_expiry(a: float | None, b: float | None) -> float | None:
    """Return the later of two expiries, where None means never."""
    if a is None or b is None:
        return None
    return max(a, b)


@attrs.define
class State:
    """The whole enforced state: bans, allows and revocations."""

    bans: dict[str, Entry] = attrs.Factory(dict)
    allows: dict[str, Entry] = attrs.Factory(dict)
    revoked_tokens: dict[str, float | None] = attrs.Factory(dict)
    revoked_subjects: dict[str, float] = attrs.Factory(dict)

    def apply(self, event: Event | UnknownEvent) -> None:
        """Apply one event (idempotent; unknown and cache events change nothing here)."""
        if isinstance(event, IpBanned | IpAllowed):
            table = self.bans if isinstance(event, IpBanned) else self.allows
            table[event.ip] = Entry(
                ip=event.ip,
                reason=event.reason,
                expires_at=event.expires_at,
                source=event.source,
                seq=event.seq,
            )
        elif isinstance(event, IpUnbanned):
            self.bans.pop(event.ip, None)
        elif isinstance(event, IpUnallowed):
            self.allows.pop(event.ip, None)
        elif isinstance(event, TokenRevoked):
            if event.jti in self.revoked_tokens:
                old = self.revoked_tokens[event.jti]
                self.revoked_tokens[event.jti] = later_expiry(old, event.expires_at)
            else:
                self.revoked_tokens[event.jti] = event.expires_at
        elif isinstance(event, SubjectRevoked):
            old_before = self.revoked_subjects.get(event.sub)
            self.revoked_subjects[event.sub] = (
                event.before if old_before is None else max(old_before, event.before)
            )

    def view(self, now: float) -> dict[str, list[dict[str, Any]]]:
        """Return the state in force at ``now`` in the snapshot's shape, sorted, expired omitted."""

        def entries(table: dict[str, Entry]) -> list[dict[str, Any]]:
            return [attrs.asdict(e) for _, e in sorted(table.items()) if e.live(now)]

        return {
            "bans": entries(self.bans),
            "allows": entries(self.allows),
            "revoked_tokens": [
                {"jti": jti, "expires_at": exp}
                for jti, exp in sorted(self.revoked_tokens.items())
                if exp is None or exp > now
            ],
            "revoked_subjects": [
                {"sub": sub, "before": before}
                for sub, before in sorted(self.revoked_subjects.items())
            ],
        }


def replay(events: Iterable[Event | UnknownEvent]) -> State:
    """Return the state after applying ``events`` in order to an empty state."""
    state = State()
    for event in events:
        state.apply(event)
    return state
