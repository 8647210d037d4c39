"""The shared vocabulary: the seven event types of PROTOCOL.md §2, their validation and JSON codec.

Master and edges both speak in these values. An event is a frozen attrs object; ``seq`` and
``timestamp`` are 0 until the master's log assigns them. Addresses and networks are normalised
here, once, with :mod:`ipaddress` (the hot path on the edge uses integer forms instead).
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
from collections.abc import Mapping
from typing import Any, ClassVar, TypeAlias

import attrs

MAX_TEXT = 1024
MAX_LIST = 1000


class EventError(ValueError):
    """An event, or a request that would make one, is invalid.

    Attributes:
        code: the machine-readable error code (``invalid_ip``, ``invalid_field``, ...).
        detail: a sentence for humans.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def normalize_ip(text: object, field: str = "ip") -> str:
    """Return the normal form of an address or network, as stored and echoed back.

    A bare address is a /32 or /128; an IPv4-mapped IPv6 address or network is its IPv4 form; a
    network with host bits set is refused.

    Raises:
        EventError: ``invalid_ip`` for anything that is not an address or a network.
    """
    if not isinstance(text, str) or not text or len(text) > 64 or "%" in text:
        raise EventError("invalid_ip", f"{field} must be an IPv4/IPv6 address or CIDR network")
    fast = _fast_normal_form(text)
    if fast is not None:
        return fast
    return _ipaddress_normal_form(text, field)


def _ipaddress_normal_form(text: str, field: str) -> str:
    """The reference path of :func:`normalize_ip`, through :mod:`ipaddress`."""
    try:
        net: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        why = "host bits set" if "host bits" in str(exc) else "not an address or network"
        raise EventError("invalid_ip", f"{field} {text!r}: {why}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            net = ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return str(net)


_PREFIXES: Mapping[int, Mapping[str, tuple[int, int]]] = {
    socket.AF_INET: {str(p): (p, (1 << (32 - p)) - 1) for p in range(33)},
    socket.AF_INET6: {str(p): (p, (1 << (128 - p)) - 1) for p in range(129)},
}
"""Prefix text in its canonical decimal form -> (prefix length, host mask), per family."""


def parse_normal_form(text: str) -> tuple[int, int, int] | None:
    """Return ``(version, prefix length, network as int)`` if ``text`` is a network in normal form.

    Normal form is what :func:`normalize_ip` returns (and what events and snapshots carry): the
    address as ``socket.inet_ntop`` prints it (IPv4 dotted quad without leading zeros, IPv6
    compressed lower case without an embedded IPv4 part, so never IPv4-mapped), ``/`` and a
    decimal prefix length without leading zeros, no host bits set. Anything else gives None:
    the caller takes the :mod:`ipaddress` path (``ipaddress.ip_network`` costs ~10 µs a call).
    """
    address, slash, prefix = text.partition("/")
    if not slash:
        return None
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    if family == socket.AF_INET6 and "." in address:
        return None  # embedded IPv4 forms print differently
    try:
        packed = socket.inet_pton(family, address)
        if socket.inet_ntop(family, packed) != address:
            return None  # not canonical (upper case, zeros, ...): ipaddress normalises it
    except (OSError, ValueError):  # ValueError: NUL or non-ASCII text
        return None
    found = _PREFIXES[family].get(prefix)
    if found is None:
        return None  # a netmask, leading zeros or out of range
    value = int.from_bytes(packed, "big")
    if value & found[1]:
        return None  # host bits set
    return (6 if family == socket.AF_INET6 else 4), found[0], value


def _fast_normal_form(text: str) -> str | None:
    """Return the normal form of ``text`` if it is already one, else None.

    An address stands for its /32 or /128. None sends ``text`` down the :mod:`ipaddress` path:
    results and errors are identical (tests/test_events.py checks both paths against each other
    with hypothesis).
    """
    if "/" not in text:
        text += "/128" if ":" in text else "/32"
    return text if parse_normal_form(text) is not None else None


def _text(value: object, field: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise EventError("invalid_field", f"{field} must be a string")
    if len(value) > MAX_TEXT:
        raise EventError("invalid_field", f"{field} is longer than {MAX_TEXT} characters")
    if not allow_empty and not value:
        raise EventError("invalid_field", f"{field} must not be empty")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise EventError("invalid_field", f"{field} is not valid Unicode text") from None
    return value


def _number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EventError("invalid_field", f"{field} must be a finite number")
    try:
        number = float(value)  # an int beyond float range raises OverflowError
    except OverflowError:
        raise EventError("invalid_field", f"{field} must be a finite number") from None
    if not math.isfinite(number):
        raise EventError("invalid_field", f"{field} must be a finite number")
    if number < 0:
        raise EventError("invalid_field", f"{field} must not be negative")
    return number


def _optional_number(value: object, field: str) -> float | None:
    return None if value is None else _number(value, field)


def _text_list(value: object, field: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise EventError("invalid_field", f"{field} must be a list of strings")
    if len(value) > MAX_LIST:
        raise EventError("invalid_field", f"{field} has more than {MAX_LIST} items")
    return tuple(_text(item, f"{field}[]", allow_empty=False) for item in value)


def _flag(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise EventError("invalid_field", f"{field} must be true or false")
    return value


@attrs.frozen(kw_only=True)
class _Envelope:
    seq: int = 0
    timestamp: float = 0.0
    source: str = ""


@attrs.frozen(kw_only=True)
class IpBanned(_Envelope):
    """A client address or network is banned until ``expires_at`` (None: never)."""

    TYPE: ClassVar[str] = "ip_banned"
    ip: str
    reason: str = ""
    expires_at: float | None = None


@attrs.frozen(kw_only=True)
class IpUnbanned(_Envelope):
    """The ban entry of exactly ``ip`` is removed."""

    TYPE: ClassVar[str] = "ip_unbanned"
    ip: str


@attrs.frozen(kw_only=True)
class IpAllowed(_Envelope):
    """A client address or network is never refused as banned (an allow beats every ban)."""

    TYPE: ClassVar[str] = "ip_allowed"
    ip: str
    reason: str = ""
    expires_at: float | None = None


@attrs.frozen(kw_only=True)
class IpUnallowed(_Envelope):
    """The allow entry of exactly ``ip`` is removed."""

    TYPE: ClassVar[str] = "ip_unallowed"
    ip: str


@attrs.frozen(kw_only=True)
class TokenRevoked(_Envelope):
    """JWTs with this ``jti`` are refused; the entry may be forgotten after ``expires_at``."""

    TYPE: ClassVar[str] = "token_revoked"
    jti: str
    expires_at: float | None = None
    reason: str = ""


@attrs.frozen(kw_only=True)
class SubjectRevoked(_Envelope):
    """JWTs with this ``sub`` issued before ``before`` are refused."""

    TYPE: ClassVar[str] = "subject_revoked"
    sub: str
    before: float


@attrs.frozen(kw_only=True)
class CacheInvalidated(_Envelope):
    """Cached responses matching any selector are dropped (or marked stale when ``soft``)."""

    TYPE: ClassVar[str] = "cache_invalidated"
    tags: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    all: bool = False
    soft: bool = False


@attrs.frozen(kw_only=True)
class UnknownEvent(_Envelope):
    """An event of a type this version does not know: edges skip it (after logging it once)."""

    type: str
    body: Mapping[str, Any] = attrs.field(factory=dict, eq=False)


Event: TypeAlias = (
    IpBanned
    | IpUnbanned
    | IpAllowed
    | IpUnallowed
    | TokenRevoked
    | SubjectRevoked
    | CacheInvalidated
)
EVENT_TYPES: Mapping[str, type[Event]] = {
    cls.TYPE: cls
    for cls in (
        IpBanned,
        IpUnbanned,
        IpAllowed,
        IpUnallowed,
        TokenRevoked,
        SubjectRevoked,
        CacheInvalidated,
    )
}


def event_type(event: Event | UnknownEvent) -> str:
    """Return the wire name of an event's type."""
    return event.type if isinstance(event, UnknownEvent) else event.TYPE


def event_to_dict(event: Event) -> dict[str, Any]:
    """Return the JSON object of an event: the envelope first, then its fields."""
    out: dict[str, Any] = {"seq": event.seq, "type": event.TYPE, "timestamp": event.timestamp}
    for field in attrs.fields(type(event)):
        if field.name in ("seq", "timestamp"):
            continue
        value = getattr(event, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def encode_event(event: Event) -> str:
    """Return the compact JSON text of one event."""
    return json.dumps(event_to_dict(event), separators=(",", ":"), allow_nan=False)


def encode_events(events: list[Event]) -> bytes:
    """Return the compact JSON array of several events, as UTF-8."""
    return ("[" + ",".join(encode_event(e) for e in events) + "]").encode()


_FIELD_PARSERS: Mapping[str, Any] = {
    "ip": normalize_ip,
    "reason": _text,
    "source": _text,
    "expires_at": _optional_number,
    "jti": lambda v, f: _text(v, f, allow_empty=False),
    "sub": lambda v, f: _text(v, f, allow_empty=False),
    "before": _number,
    "tags": _text_list,
    "keys": _text_list,
    "prefixes": _text_list,
    "all": _flag,
    "soft": _flag,
}


def event_from_dict(obj: object) -> Event | UnknownEvent:
    """Decode one event received from the stream or read from the log.

    Fields this version does not know are ignored, so a newer master may add some; unknown types
    become :class:`UnknownEvent`.

    Raises:
        EventError: the object is not a valid event.
    """
    if not isinstance(obj, Mapping):
        raise EventError("invalid_event", "an event must be a JSON object")
    seq = obj.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise EventError("invalid_event", "seq must be a positive integer")
    type_name = obj.get("type")
    if not isinstance(type_name, str):
        raise EventError("invalid_event", "type must be a string")
    timestamp = _number(obj.get("timestamp"), "timestamp")
    cls = EVENT_TYPES.get(type_name)
    if cls is None:
        return UnknownEvent(seq=seq, timestamp=timestamp, type=type_name, body=dict(obj))
    kwargs: dict[str, Any] = {"seq": seq, "timestamp": timestamp}
    for field in attrs.fields(cls):
        name = field.name
        if name in ("seq", "timestamp"):
            continue
        if name not in obj:
            if field.default is attrs.NOTHING:
                raise EventError("invalid_event", f"{type_name} needs {name}")
            continue
        kwargs[name] = _FIELD_PARSERS[name](obj[name], name)
    return cls(**kwargs)


def decode_events(data: bytes | str) -> list[Event | UnknownEvent]:
    """Decode a JSON array of events (a catch-up body or an SSE ``data`` frame).

    Raises:
        EventError: the text is not a JSON array of valid events.
    """
    try:
        items = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # Recursion: deep nesting
        raise EventError("invalid_event", f"not JSON: {exc}") from None
    if not isinstance(items, list):
        raise EventError("invalid_event", "expected a JSON array of events")
    return [event_from_dict(item) for item in items]


# --- operator requests -> events -------------------------------------------------------------

MAX_TTL = 10 * 365 * 86400.0

_REQUEST_FIELDS: Mapping[str, frozenset[str]] = {
    "ban": frozenset({"ip", "reason", "ttl", "source"}),
    "unban": frozenset({"ip"}),
    "allow": frozenset({"ip", "reason", "ttl", "source"}),
    "unallow": frozenset({"ip"}),
    "revoke_token": frozenset({"jti", "expires_at", "reason"}),
    "revoke_subject": frozenset({"sub", "before"}),
    "invalidate": frozenset({"tags", "keys", "prefixes", "all", "soft"}),
}


def _check_fields(kind: str, body: object) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise EventError("invalid_field", "the body must be a JSON object")
    allowed = _REQUEST_FIELDS[kind]
    for name in body:
        if name not in allowed:
            raise EventError(
                "unknown_field", f"unknown field {name!r}; expected some of {sorted(allowed)}"
            )
    return body


def _require(body: Mapping[str, Any], name: str) -> Any:
    if name not in body:
        raise EventError("missing_field", f"{name} is required")
    return body[name]


def _expiry(body: Mapping[str, Any], now: float) -> float | None:
    ttl = body.get("ttl")
    if ttl is None:
        return None
    seconds = _number(ttl, "ttl")
    if not 0 < seconds <= MAX_TTL:
        raise EventError("invalid_field", f"ttl must be > 0 and at most {MAX_TTL:.0f} seconds")
    return round(now + seconds, 3)


def event_from_request(kind: str, body: object, *, now: float, source: str) -> Event:
    """Validate an operator API request body and build the event it asks for.

    Args:
        kind: one of ``ban``, ``unban``, ``allow``, ``unallow``, ``revoke_token``,
            ``revoke_subject``, ``invalidate``.
        body: the decoded JSON body.
        now: the current Unix time (for ``ttl`` and the default ``before``).
        source: who asks, e.g. ``operator:alice``; a ``source`` field in a ban body from an edge
            (``edge:<id>``) is kept when it starts with ``edge:``.

    Raises:
        EventError: unknown fields, wrong types, missing fields, bad IPs.
    """
    fields = _check_fields(kind, body)
    stamp = round(now, 3)
    if kind in ("ban", "allow"):
        ip = normalize_ip(_require(fields, "ip"))
        reason = _text(fields.get("reason", ""), "reason")
        expires_at = _expiry(fields, now)
        claimed = fields.get("source")
        if claimed is not None:
            claimed = _text(claimed, "source", allow_empty=False)
            if source.startswith("edge") and claimed.startswith("edge:"):
                source = claimed
        cls = IpBanned if kind == "ban" else IpAllowed
        return cls(timestamp=stamp, source=source, ip=ip, reason=reason, expires_at=expires_at)
    if kind == "unban":
        return IpUnbanned(timestamp=stamp, source=source, ip=normalize_ip(_require(fields, "ip")))
    if kind == "unallow":
        return IpUnallowed(timestamp=stamp, source=source, ip=normalize_ip(_require(fields, "ip")))
    if kind == "revoke_token":
        return TokenRevoked(
            timestamp=stamp,
            source=source,
            jti=_text(_require(fields, "jti"), "jti", allow_empty=False),
            expires_at=_optional_number(fields.get("expires_at"), "expires_at"),
            reason=_text(fields.get("reason", ""), "reason"),
        )
    if kind == "revoke_subject":
        before = fields.get("before")
        return SubjectRevoked(
            timestamp=stamp,
            source=source,
            sub=_text(_require(fields, "sub"), "sub", allow_empty=False),
            before=stamp if before is None else _number(before, "before"),
        )
    if kind == "invalidate":
        event = CacheInvalidated(
            timestamp=stamp,
            source=source,
            tags=_text_list(fields.get("tags", []), "tags"),
            keys=_text_list(fields.get("keys", []), "keys"),
            prefixes=_text_list(fields.get("prefixes", []), "prefixes"),
            all=_flag(fields.get("all", False), "all"),
            soft=_flag(fields.get("soft", False), "soft"),
        )
        if not (event.tags or event.keys or event.prefixes or event.all):
            raise EventError("missing_field", "give at least one of tags, keys, prefixes, all")
        return event
    raise ValueError(f"unknown request kind {kind!r}")
