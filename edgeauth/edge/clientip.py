"""Find the client address of a request: the TCP peer, or what trusted proxies say it is.

PROTOCOL.md §6 "Client IP": ``X-Forwarded-For`` and ``Forwarded`` (RFC 7239) are believed only when
the TCP peer is in ``[edge] trusted_proxies``; the client is then the right-most address of the
chain that is not itself a trusted proxy. Everything here is pure: no I/O, no :mod:`ipaddress` on
the per-request path (addresses become integers with :func:`edgeauth.edge.index.parse_client_ip`
and are matched against per-prefix-length sets of masked integers), and arbitrary header bytes
never raise.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator, Sequence
from typing import Final, Literal

from edgeauth.edge.index import parse_client_ip
from edgeauth.events import normalize_ip

__all__ = ["TrustedProxies", "client_ip", "format_ip"]

_BITS = {4: 32, 6: 128}


def format_ip(version: int, addr: int) -> str:
    """Return the normal text of an address as :func:`parse_client_ip` returns it."""
    if version == 4:
        return socket.inet_ntoa(addr.to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, addr.to_bytes(16, "big"))


class TrustedProxies:
    """The networks whose forwarding headers are believed.

    Args:
        cidrs: addresses or networks (normal form or not; an IPv4-mapped IPv6 network counts as
            its IPv4 network, so an IPv4-mapped peer is matched against IPv4 entries).

    Raises:
        EventError: ``invalid_ip`` for an entry that is not an address or network (host bits
            set included).
    """

    def __init__(self, cidrs: Sequence[str]) -> None:
        tables: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
        normal = []
        for cidr in cidrs:
            net = ipaddress.ip_network(normalize_ip(cidr, "trusted_proxies"))
            normal.append(str(net))
            tables[net.version].setdefault(net.prefixlen, set()).add(int(net.network_address))
        self.cidrs: tuple[str, ...] = tuple(normal)
        """The networks in normal form, in the order given."""
        self._levels: dict[int, tuple[tuple[int, frozenset[int]], ...]] = {
            version: tuple(
                (_mask(version, plen), frozenset(values))
                for plen, values in sorted(by_plen.items(), reverse=True)
            )
            for version, by_plen in tables.items()
        }

    def __bool__(self) -> bool:
        return bool(self.cidrs)

    def __repr__(self) -> str:
        return f"TrustedProxies({list(self.cidrs)!r})"

    def contains(self, version: int, addr: int) -> bool:
        """Return whether a parsed address (``(version, int)``) is in a trusted network."""
        for mask, values in self._levels[version]:
            if addr & mask in values:
                return True
        return False

    def is_trusted(self, ip: str) -> bool:
        """Return whether the address ``ip`` is a trusted proxy (garbage is not)."""
        parsed = parse_client_ip(ip)
        return parsed is not None and self.contains(*parsed)


def _mask(version: int, plen: int) -> int:
    bits = _BITS[version]
    return ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)


_SKIP: Final = "skip"
"""A chain entry that names no address but is not garbage (``unknown``, ``_hidden``)."""


def _parse_node(text: str) -> tuple[int, int] | None:
    """Parse one hop: an address, ``[v6]``, ``[v6]:port`` or ``v4:port``, or None if garbage."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        rest = text[end + 1 :]
        if rest and not (rest[0] == ":" and _is_port(rest[1:])):
            return None
        parsed = parse_client_ip(text[1:end])
        return parsed if parsed is not None and ":" in text[1:end] else None
    if text.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has at least two colons
        host, _, port = text.partition(":")
        if not _is_port(port):
            return None
        parsed = parse_client_ip(host)
        return parsed if parsed is not None and parsed[0] == 4 else None
    return parse_client_ip(text)


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit()


def _xff_nodes(values: Sequence[bytes]) -> list[str]:
    """Return the hops of every ``X-Forwarded-For`` line, left to right (empty items dropped)."""
    nodes = []
    for value in values:
        for item in value.decode("latin-1").split(","):
            item = item.strip(" \t")
            if item:
                nodes.append(item)
    return nodes


def _split_outside_quotes(text: str, separator: str) -> Iterator[str]:
    """Split on ``separator`` where it is not inside a quoted-string (backslash escapes kept)."""
    start, quoted, escaped = 0, False, False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            yield text[start:i]
            start = i + 1
    yield text[start:]


def _unquote(value: str) -> str | None:
    """Return a token or the content of a quoted-string, or None if the quotes are broken."""
    if not value.startswith('"'):
        return None if '"' in value else value
    if len(value) < 2 or not value.endswith('"'):
        return None
    out, escaped = [], False
    for char in value[1:-1]:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return None
        else:
            out.append(char)
    return None if escaped else "".join(out)


def _forwarded_nodes(values: Sequence[bytes]) -> list[str | None]:
    """Return the ``for=`` value of each ``Forwarded`` element, left to right.

    An element without ``for=`` is left out; a broken element (bad quoting, a pair without
    ``=``) gives None, which stops the walk like any garbage.
    """
    nodes: list[str | None] = []
    for value in values:
        for element in _split_outside_quotes(value.decode("latin-1"), ","):
            element = element.strip(" \t")
            if not element:
                continue
            node: str | None = None
            has_for = False
            for pair in _split_outside_quotes(element, ";"):
                name, sep, raw = pair.strip(" \t").partition("=")
                if not sep:
                    node, has_for = None, True
                    break
                if name.lower() == "for":
                    node, has_for = _unquote(raw) or None, True
                    if node is None:
                        break
            if has_for:
                nodes.append(node)
    return nodes


def _hop(node: str | None) -> tuple[int, int] | Literal["skip"] | None:
    """Classify a ``Forwarded`` node: an address, :data:`_SKIP`, or None for garbage.

    RFC 7239 §6: ``node = nodename [":" node-port]`` where a nodename is an IPv4 address, a
    bracketed IPv6 address, ``unknown`` or an obfuscated identifier (``_`` then ALPHA / DIGIT /
    ``.`` / ``_`` / ``-``), and a port is digits or an obfuscated identifier.
    """
    if node is None:
        return None
    name, port = node, ""
    if node.startswith("["):
        end = node.find("]")
        if end > 0 and node[end + 1 : end + 2] == ":":
            name, port = node[: end + 1], node[end + 2 :]
    elif node.count(":") == 1:
        name, _, port = node.partition(":")
    if port and not (_is_port(port) or _is_obfuscated(port)):
        return None
    if name.lower() == "unknown" or _is_obfuscated(name):
        return _SKIP
    return _parse_node(name)


def _is_obfuscated(text: str) -> bool:
    return (
        len(text) > 1
        and text[0] == "_"
        and all(c.isascii() and (c.isalnum() or c in "._-") for c in text)
    )


def client_ip(
    peer: str,
    x_forwarded_for: Sequence[bytes],
    forwarded: Sequence[bytes],
    trusted: TrustedProxies,
) -> str:
    """Return the client address of a request, in normal text form.

    When the peer is a trusted proxy, the chain of ``X-Forwarded-For`` (every header line, in
    order) is walked from the right, or, when there is no ``X-Forwarded-For``, the ``for=``
    nodes of ``Forwarded``. The first address not in ``trusted`` is the client. If every address
    is trusted the left-most is. A garbage entry stops the walk: the last good address is the
    client, or the peer if there was none. ``Forwarded`` nodes ``unknown`` and obfuscated
    identifiers (``_hidden``) are skipped: trusted proxies use them to hide their own internal hops.

    Args:
        peer: the TCP peer's address, as the transport reports it (``::ffff:a.b.c.d`` counts as
            ``a.b.c.d``).
        x_forwarded_for: the raw values of every ``X-Forwarded-For`` header line, in order.
        forwarded: the raw values of every ``Forwarded`` header line, in order.
        trusted: the trusted proxies.

    Returns:
        The client address (IPv4-mapped IPv6 as IPv4, IPv6 compressed); ``peer`` unchanged if it is
        not an address at all (e.g. a UNIX socket).
    """
    if not trusted and ":" not in peer:
        # What the two returns below give for such a peer, without parsing it a first time
        # (the gate parses the client address anyway): an IPv4 peer, or not an address.
        return peer
    parsed = parse_client_ip(peer)
    if parsed is None:
        return peer
    if not trusted or not trusted.contains(*parsed):
        if parsed[0] == 4 and ":" not in peer:
            return peer  # inet_pton accepts only the canonical dotted quad
        return format_ip(*parsed)
    hops: Sequence[str | None] = _xff_nodes(x_forwarded_for)
    from_forwarded = not hops
    if from_forwarded:
        hops = _forwarded_nodes(forwarded)
    best = parsed
    for node in reversed(hops):
        hop = _hop(node) if from_forwarded else _parse_node(node or "")
        if hop == _SKIP:
            continue
        if hop is None:
            break
        best = hop
        if not trusted.contains(*best):
            break
    return format_ip(*best)
