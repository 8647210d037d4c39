"""The in-memory indexes an edge answers every ban, allow and revocation check from.

A check must cost about a microsecond, so the lookup path uses no :mod:`ipaddress` objects: the
client address is parsed once with :func:`socket.inet_pton` into an integer, and each family keeps
one dict per prefix length in use (``masked address -> entry``), tried from the most specific
length down; a per-family bucket filter (see :class:`_Family`) skips the network lengths that hold
nothing in the address's bucket, and the allows are looked at only when a live ban was found.
Entries past their expiry are ignored at check time and removed by :meth:`NetworkIndex.sweep`. The
semantics are exactly those of :meth:`edgeauth.replay.State.apply`; nothing here does I/O or reads a
clock: time is always an argument.
"""

from __future__ import annotations

import heapq
import ipaddress
import socket
from collections.abc import Iterable, Iterator

import attrs

from edgeauth.events import (
    Event,
    EventError,
    IpAllowed,
    IpBanned,
    IpUnallowed,
    IpUnbanned,
    SubjectRevoked,
    TokenRevoked,
    UnknownEvent,
    normalize_ip,
    parse_normal_form,
)
from edgeauth.replay import Entry, State, later_expiry

__all__ = [
    "EdgeIndexes",
    "NetworkIndex",
    "RevocationCounts",
    "RevocationIndex",
    "parse_client_ip",
]

# Bound once: module attribute lookups are a measurable part of a ~1 us check.
_inet_pton = socket.inet_pton
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_from_bytes = int.from_bytes  # big-endian by default since 3.11; passing "big" costs ~50 ns
_BITS = {4: 32, 6: 128}
_MASKS = {
    version: tuple(((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1) for plen in range(bits + 1))
    for version, bits in _BITS.items()
}
# The bucket filter of _Family: an address's bucket is 16 bits of it, ``(addr >> shift) & 0xFFFF``:
# the first 16 bits of an IPv4 address, bits 17-32 of an IPv6 one (the first 16 are nearly the
# same for every global address). Every network at least that long (/16, /32) lies in one bucket.
_BUCKET_SHIFT = {4: 16, 6: 96}
_BUCKET_MIN_PLEN = {4: 16, 6: 32}
_BUCKET_LEVELS = 8  # filtered levels per family: one bit each in a bytearray
_NO_BUCKETS = bytes(65536)  # shared by every family with no filtered level


def parse_client_ip(text: str) -> tuple[int, int] | None:
    """Parse a client address (no prefix length) into its family and integer value.

    An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, as a dual-stack listener reports it) is
    returned as the IPv4 address, so that it matches IPv4 entries.

    Args:
        text: the address as the transport or a trusted ``X-Forwarded-For`` gives it.

    Returns:
        ``(4, value)`` or ``(6, value)``, or None when ``text`` is not an address.
    """
    try:
        if ":" in text:
            value = _from_bytes(_inet_pton(_AF_INET6, text))
            if value >> 32 == 0xFFFF:  # ::ffff:0:0/96, IPv4-mapped
                return 4, value & 0xFFFFFFFF
            return 6, value
        return 4, _from_bytes(_inet_pton(_AF_INET, text))
    except (OSError, ValueError, TypeError):
        return None


def _parse_network(text: str) -> tuple[str, int, int, int]:
    """Return ``(normal form, version, prefix length, network int)`` of an address or network.

    Text already in normal form (all that events and snapshots carry) is parsed by
    :func:`edgeauth.events.parse_normal_form`; anything else goes through
    :func:`edgeauth.events.normalize_ip`.

    Raises:
        EventError: ``invalid_ip`` when ``text`` is neither an address nor a network.
    """
    parsed = parse_normal_form(text)
    if parsed is not None:
        return text, parsed[0], parsed[1], parsed[2]
    key = normalize_ip(text)
    net = ipaddress.ip_network(key)
    return key, net.version, net.prefixlen, int(net.network_address)


class _Family:
    """The tables of one address family: prefix length -> masked address -> entry.

    Most addresses are covered by no network, yet a check must probe every prefix length in use.
    So that it probes fewer, each family keeps a bucket filter: for up to eight prefix lengths
    in use that are networks at least as long as the bucket bits (IPv4 /16 to /31, IPv6 /32 to
    /127; the most specific first), one bit per bucket says "this level may hold an entry in
    this bucket". :attr:`combos` maps a bucket's bits to the levels to probe there: the filtered
    levels whose bit is set and every other level (full-length addresses, shorter networks),
    in the same most-specific-first order, so a walk over them finds exactly what a walk over
    every level finds. A bit is set on :meth:`mark` and cleared only by :meth:`rebuild` (when
    the levels change, or after more removals than the filtered levels held plus 1,024), so it
    may be stale (one probe too many), never missing. The memory is per family (64 KiB and the
    256 combos), not per entry; a rebuild walks the network entries only (~10 ms for 100,000).
    """

    __slots__ = (
        "buckets",
        "combos",
        "filtered",
        "levels",
        "masks",
        "min_plen",
        "shift",
        "slots",
        "stale",
        "tables",
        "width",
    )

    def __init__(self, version: int) -> None:
        self.masks = _MASKS[version]
        self.width = _BITS[version]
        self.shift = _BUCKET_SHIFT[version]
        self.min_plen = _BUCKET_MIN_PLEN[version]
        self.tables: dict[int, dict[int, Entry]] = {}
        self.levels: tuple[tuple[int, dict[int, Entry]], ...] = ()
        """``(mask, table)`` for each prefix length in use, the most specific first.

        A level is probed with ``(addr & mask) in table`` (a ``CONTAINS_OP``, no method call:
        cheaper than ``table.get`` in CPython 3.11 when, as for almost every request, nothing
        is found).
        """
        self.slots: dict[int, int] = {}
        """Prefix length -> its bit in :attr:`buckets`, for the filtered levels."""
        self.buckets: bytes | bytearray = _NO_BUCKETS
        """Bucket -> the bits of the filtered levels that may hold an entry in it."""
        self.combos: tuple[tuple[tuple[int, dict[int, Entry]], ...], ...] = ((),) * 256
        """Bits of a bucket -> the levels to probe, as :attr:`levels` (a subset of it)."""
        self.stale = 0
        """Entries removed from filtered levels since the last :meth:`rebuild`."""
        self.filtered = 0
        """Entries the filtered levels held at the last :meth:`rebuild`."""

    def relevel(self) -> None:
        """Recompute the levels, the filtered levels and the filter (the prefix lengths changed)."""
        masks, tables = self.masks, self.tables
        plens = sorted(tables, reverse=True)
        self.levels = tuple((masks[p], tables[p]) for p in plens)
        filtered = [p for p in plens if self.min_plen <= p < self.width][:_BUCKET_LEVELS]
        slots = self.slots = {p: 1 << i for i, p in enumerate(filtered)}
        self.combos = tuple(
            tuple((masks[p], tables[p]) for p in plens if p not in slots or bits & slots[p])
            for bits in range(256)
        )
        self.rebuild()

    def rebuild(self) -> None:
        """Recompute :attr:`buckets` from the filtered levels' tables (no stale bit left)."""
        shift, count = self.shift, 0
        buckets = bytearray(65536) if self.slots else _NO_BUCKETS
        for plen, bit in self.slots.items():
            assert isinstance(buckets, bytearray)
            table = self.tables[plen]
            count += len(table)
            for key in table:
                buckets[(key >> shift) & 0xFFFF] |= bit
        self.buckets, self.stale, self.filtered = buckets, 0, count

    def mark(self, plen: int, value: int) -> None:
        """Note an entry put at ``plen`` (its table already holds it)."""
        bit = self.slots.get(plen)
        if bit is not None:
            buckets = self.buckets
            assert isinstance(buckets, bytearray)  # a filtered level has a bytearray
            buckets[(value >> self.shift) & 0xFFFF] |= bit

    def unmark(self, plen: int) -> None:
        """Note an entry removed at ``plen``; rebuild the filter once enough bits may be stale."""
        if plen in self.slots:
            self.stale += 1
            if self.stale > self.filtered + 1024:
                self.rebuild()


class NetworkIndex:
    """Ban or allow entries keyed by normalised network, answering "which entries cover A?".

    At most one entry per network (PROTOCOL.md §2): :meth:`put` replaces the entry of the same
    network. An entry with ``expires_at`` not after ``now`` is ignored by :meth:`match` and
    :meth:`matches`, and removed by :meth:`sweep`.

    Args:
        entries: entries to start with, put in order.

    Raises:
        EventError: ``invalid_ip`` for an entry whose ``ip`` is not an address or network.
    """

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._families = {4: _Family(4), 6: _Family(6)}
        self._count = 0
        self._expiries: list[tuple[float, str]] = []
        self._put_all(entries)

    def _put_all(self, entries: Iterable[Entry]) -> None:
        """:meth:`put` each entry in order, with the per-entry bookkeeping done once at the end.

        The same result as a loop of :meth:`put` (a later entry of the same network replaces an
        earlier one); the expiry heap is built with one ``heapify`` and the levels once. This is
        how a warm start loads a million entries in about a second.
        """
        families = self._families
        expiries = self._expiries
        count = self._count
        touched: set[_Family] = set()
        try:
            for entry in entries:
                ip = entry.ip
                key, version, plen, value = _parse_network(ip)
                if key != ip:
                    entry = attrs.evolve(entry, ip=key)
                family = families[version]
                tables = family.tables
                table = tables.get(plen)
                if table is None:
                    table = tables[plen] = {}
                    touched.add(family)
                if value not in table:
                    count += 1
                table[value] = entry
                if entry.expires_at is not None:
                    expiries.append((entry.expires_at, key))
        finally:
            if self._count:  # not the case from __init__; then only new levels need a relevel
                touched.update(families.values())
            self._count = count
            for family in touched:
                family.relevel()  # which rebuilds the filter from the tables: no mark() needed
            if len(expiries) > 2 * count + 1024:
                expiries[:] = [(e.expires_at, e.ip) for e in self if e.expires_at is not None]
            heapq.heapify(expiries)

    @property
    def prefix_lengths(self) -> dict[int, list[int]]:
        """The prefix lengths in use per family (4, 6), most specific first."""
        return {v: sorted(f.tables, reverse=True) for v, f in self._families.items()}

    def put(self, entry: Entry) -> None:
        """Store ``entry``, replacing any entry of the same network.

        An ``entry.ip`` not in normal form is stored under (and rewritten to) its normal form.

        Raises:
            EventError: ``invalid_ip`` when ``entry.ip`` is not an address or network.
        """
        key, version, plen, value = _parse_network(entry.ip)
        if key != entry.ip:
            entry = attrs.evolve(entry, ip=key)
        family = self._families[version]
        table = family.tables.get(plen)
        if table is None:
            table = family.tables[plen] = {}
            family.relevel()
        if table.get(value) is None:
            self._count += 1
        table[value] = entry
        family.mark(plen, value)
        if entry.expires_at is not None:
            heapq.heappush(self._expiries, (entry.expires_at, key))
            if len(self._expiries) > 2 * self._count + 1024:
                self._expiries = [(e.expires_at, e.ip) for e in self if e.expires_at is not None]
                heapq.heapify(self._expiries)

    def _locate(self, ip: str) -> tuple[_Family, int, int] | None:
        try:
            _, version, plen, value = _parse_network(ip)
        except EventError:
            return None
        return self._families[version], plen, value

    def get(self, ip: str) -> Entry | None:
        """Return the entry of exactly the network ``ip`` (expired or not), or None."""
        where = self._locate(ip)
        if where is None:
            return None
        family, plen, value = where
        table = family.tables.get(plen)
        return None if table is None else table.get(value)

    def remove(self, ip: str) -> Entry | None:
        """Remove and return the entry of exactly the network ``ip``; covering entries stay."""
        where = self._locate(ip)
        if where is None:
            return None
        family, plen, value = where
        table = family.tables.get(plen)
        if table is None:
            return None
        entry = table.pop(value, None)
        if entry is not None:
            self._count -= 1
            if not table:
                del family.tables[plen]
                family.relevel()
            else:
                family.unmark(plen)
        return entry

    def match(self, version: int, addr: int, now: float) -> Entry | None:
        """Return the most specific live entry covering an address, or None.

        Args:
            version: 4 or 6, as :func:`parse_client_ip` returns it.
            addr: the address as an integer.
            now: the current Unix time; entries with ``expires_at <= now`` are ignored.

        Raises:
            KeyError: ``version`` is neither 4 nor 6.
        """
        family = self._families[version]
        for mask, table in family.combos[family.buckets[(addr >> family.shift) & 0xFFFF]]:
            if (addr & mask) in table:
                entry = table[addr & mask]
                expires_at = entry.expires_at
                if expires_at is None or expires_at > now:
                    return entry
        return None

    def matches(self, version: int, addr: int, now: float) -> list[Entry]:
        """Return every live entry covering an address, the most specific first (for /explain)."""
        found = []
        for mask, table in self._families[version].levels:
            entry = table.get(addr & mask)
            if entry is not None and entry.live(now):
                found.append(entry)
        return found

    def sweep(self, now: float) -> list[Entry]:
        """Remove and return the entries expired at ``now`` (``expires_at <= now``)."""
        expired: list[Entry] = []
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            entry = self.get(key)
            if entry is not None and entry.expires_at is not None and entry.expires_at <= now:
                self.remove(key)
                expired.append(entry)
        return expired

    def replace(self, entries: Iterable[Entry]) -> None:
        """Replace every entry with ``entries`` at once (the old ones stay if one is invalid).

        Raises:
            EventError: ``invalid_ip`` for an entry whose ``ip`` is not an address or network.
        """
        self._take(NetworkIndex(entries))

    def _take(self, other: NetworkIndex) -> None:
        self._families, self._count, self._expiries = other._families, other._count, other._expiries

    def clear(self) -> None:
        """Remove every entry."""
        self.replace(())

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Entry]:
        """Iterate over every entry (expired ones included), IPv4 first, most specific first."""
        for family in self._families.values():
            for _, table in family.levels:
                yield from table.values()


@attrs.frozen
class RevocationCounts:
    """How many revocations an edge holds, for ``/status`` and metrics."""

    tokens: int
    subjects: int


class RevocationIndex:
    """Revoked JWT ids (``jti -> expires_at``) and subjects (``sub -> before``)."""

    def __init__(self) -> None:
        self._tokens: dict[str, float | None] = {}
        self._subjects: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []

    def revoke_token(self, jti: str, expires_at: float | None) -> bool:
        """Revoke ``jti`` until ``expires_at`` (None: forever); the later expiry wins.

        Returns:
            Whether the stored entry changed.
        """
        if jti in self._tokens:
            old = self._tokens[jti]
            new = later_expiry(old, expires_at)
            if new == old:
                return False
        else:
            new = expires_at
        self._tokens[jti] = new
        if new is not None:
            heapq.heappush(self._expiries, (new, jti))
            if len(self._expiries) > 2 * len(self._tokens) + 1024:
                self._expiries = [(e, j) for j, e in self._tokens.items() if e is not None]
                heapq.heapify(self._expiries)
        return True

    def revoke_subject(self, sub: str, before: float) -> bool:
        """Revoke tokens of ``sub`` issued before ``before``; the largest ``before`` wins.

        Returns:
            Whether the stored entry changed.
        """
        old = self._subjects.get(sub)
        if old is not None and old >= before:
            return False
        self._subjects[sub] = before
        return True

    def is_revoked(self, jti: str | None, sub: str | None, iat: float | None, now: float) -> bool:
        """Return whether a verified token is revoked (PROTOCOL.md §2).

        Args:
            jti: the token's ``jti`` claim, if any.
            sub: the token's ``sub`` claim, if any.
            iat: the token's ``iat`` claim; a token without one counts as issued before any
                subject revocation.
            now: the current Unix time; a ``jti`` entry with ``expires_at <= now`` is ignored.
        """
        if jti is not None and jti in self._tokens:
            expires_at = self._tokens[jti]
            if expires_at is None or expires_at > now:
                return True
        if sub is not None:
            before = self._subjects.get(sub)
            if before is not None and (iat is None or iat < before):
                return True
        return False

    def sweep(self, now: float) -> int:
        """Drop the token entries expired at ``now`` and return how many were dropped."""
        dropped = 0
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, jti = heapq.heappop(heap)
            expires_at = self._tokens.get(jti)
            if expires_at is not None and expires_at <= now:
                del self._tokens[jti]
                dropped += 1
        return dropped

    def counts(self) -> RevocationCounts:
        """Return how many token and subject entries are held (expired tokens included)."""
        return RevocationCounts(tokens=len(self._tokens), subjects=len(self._subjects))

    def tokens(self) -> Iterator[tuple[str, float | None]]:
        """Iterate over ``(jti, expires_at)`` of every revoked token, for persistence."""
        return iter(list(self._tokens.items()))

    def subjects(self) -> Iterator[tuple[str, float]]:
        """Iterate over ``(sub, before)`` of every revoked subject, for persistence."""
        return iter(list(self._subjects.items()))

    def token_expiry(self, jti: str) -> tuple[bool, float | None]:
        """Return ``(revoked, expires_at)`` for one ``jti``, expired entries included."""
        return jti in self._tokens, self._tokens.get(jti)

    def subject_before(self, sub: str) -> float | None:
        """Return the ``before`` of a revoked subject, or None."""
        return self._subjects.get(sub)

    def replace(
        self, tokens: Iterable[tuple[str, float | None]], subjects: Iterable[tuple[str, float]]
    ) -> None:
        """Replace every entry at once; duplicates merge as if revoked in turn."""
        fresh = RevocationIndex()
        known = fresh._tokens
        for jti, expires_at in tokens:
            if jti in known:
                fresh.revoke_token(jti, expires_at)
            else:
                known[jti] = expires_at
        # One heapify instead of a push per token (the pushes of duplicates are rebuilt too).
        fresh._expiries = [(e, j) for j, e in known.items() if e is not None]
        heapq.heapify(fresh._expiries)
        for sub, before in subjects:
            fresh.revoke_subject(sub, before)
        self._take(fresh)

    def _take(self, other: RevocationIndex) -> None:
        self._tokens, self._subjects = other._tokens, other._subjects
        self._expiries = other._expiries

    def clear(self) -> None:
        """Remove every entry."""
        self.replace((), ())


class EdgeIndexes:
    """Everything an edge enforces: bans, allows and revocations, fed by events or a snapshot."""

    def __init__(self) -> None:
        self.bans = NetworkIndex()
        self.allows = NetworkIndex()
        self.revocations = RevocationIndex()

    def apply(self, event: Event | UnknownEvent) -> bool:
        """Apply one event exactly as :meth:`edgeauth.replay.State.apply` does (idempotent).

        Returns:
            Whether the enforced state changed; cache and unknown events change nothing here.
        """
        if isinstance(event, IpBanned | IpAllowed):
            index = self.bans if isinstance(event, IpBanned) else self.allows
            entry = Entry(
                ip=event.ip,
                reason=event.reason,
                expires_at=event.expires_at,
                source=event.source,
                seq=event.seq,
            )
            if index.get(event.ip) == entry:
                return False
            index.put(entry)
            return True
        if isinstance(event, IpUnbanned):
            return self.bans.remove(event.ip) is not None
        if isinstance(event, IpUnallowed):
            return self.allows.remove(event.ip) is not None
        if isinstance(event, TokenRevoked):
            return self.revocations.revoke_token(event.jti, event.expires_at)
        if isinstance(event, SubjectRevoked):
            return self.revocations.revoke_subject(event.sub, event.before)
        return False

    def check_ip(self, version: int, addr: int, now: float) -> Entry | None:
        """Return the ban that refuses a client, or None (an allow covering it beats every ban).

        Args:
            version: 4 or 6, as :func:`parse_client_ip` returns it.
            addr: the client address as an integer.
            now: the current Unix time.

        Returns:
            The most specific live ban covering the address (its ``seq`` is the 403's ``ref``).
        """
        # The bans first: with no live ban the answer is None whatever the allows say, so a
        # client that is not banned (almost every request) pays no allow probe at all.
        family = self.bans._families[version]
        for mask, table in family.combos[family.buckets[(addr >> family.shift) & 0xFFFF]]:
            if (addr & mask) in table:
                entry = table[addr & mask]
                expires_at = entry.expires_at
                if expires_at is None or expires_at > now:
                    allows = self.allows
                    if allows._count:
                        # NetworkIndex.match of the allows, inlined.
                        afamily = allows._families[version]
                        bits = afamily.buckets[(addr >> afamily.shift) & 0xFFFF]
                        for amask, atable in afamily.combos[bits]:
                            if (addr & amask) in atable:
                                expires_at = atable[addr & amask].expires_at
                                if expires_at is None or expires_at > now:
                                    return None
                    return entry
        return None

    def check_client(self, client_ip: str, now: float) -> Entry | None:
        """:meth:`check_ip` of an address given as text (one call on the per-request path).

        The same as ``check_ip(*parse_client_ip(client_ip), now)``, with the parsing inlined.

        Args:
            client_ip: the client address (no prefix length); one that is not an address is
                never banned.
            now: the current Unix time.

        Returns:
            The most specific live ban covering the address, unless a live allow covers it.
        """
        try:
            if ":" in client_ip:
                addr = _from_bytes(_inet_pton(_AF_INET6, client_ip))
                if addr >> 32 == 0xFFFF:  # ::ffff:0:0/96, IPv4-mapped
                    version, addr = 4, addr & 0xFFFFFFFF
                else:
                    version = 6
            else:
                version, addr = 4, _from_bytes(_inet_pton(_AF_INET, client_ip))
        except (OSError, ValueError, TypeError):
            return None
        return self.check_ip(version, addr, now)

    def replace_from_snapshot(
        self,
        *,
        bans: Iterable[Entry],
        allows: Iterable[Entry],
        revoked_tokens: Iterable[tuple[str, float | None]],
        revoked_subjects: Iterable[tuple[str, float]],
    ) -> None:
        """Replace the whole state (PROTOCOL.md §5); if an entry is invalid nothing changes.

        Raises:
            EventError: ``invalid_ip`` for an entry whose ``ip`` is not an address or network.
        """
        new_bans, new_allows = NetworkIndex(bans), NetworkIndex(allows)
        new_revocations = RevocationIndex()
        new_revocations.replace(revoked_tokens, revoked_subjects)
        self.bans._take(new_bans)
        self.allows._take(new_allows)
        self.revocations._take(new_revocations)

    def load(self, state: State) -> None:
        """Replace the whole state with a :class:`edgeauth.replay.State`."""
        self.replace_from_snapshot(
            bans=state.bans.values(),
            allows=state.allows.values(),
            revoked_tokens=state.revoked_tokens.items(),
            revoked_subjects=state.revoked_subjects.items(),
        )

    def to_state(self) -> State:
        """Return the state held, as a :class:`edgeauth.replay.State` (for tests and checks)."""
        return State(
            bans={e.ip: e for e in self.bans},
            allows={e.ip: e for e in self.allows},
            revoked_tokens=dict(self.revocations.tokens()),
            revoked_subjects=dict(self.revocations.subjects()),
        )

    def clear(self) -> None:
        """Forget everything."""
        self.bans.clear()
        self.allows.clear()
        self.revocations.clear()
