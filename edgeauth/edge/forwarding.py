"""Request headers for the origin: what the edge forwards, drops and adds on the way in.

:func:`origin_request_headers` builds the origin request's headers from the client's: hop-by-hop
headers (:data:`HOP_BY_HOP` and those the ``Connection`` header lists) and framing headers
dropped, repeated headers kept, ``Host`` set to the origin (unless the proxy preserves the
client's), ``X-Forwarded-For``/``Forwarded``/``X-Forwarded-Proto`` rebuilt (incoming values kept
only when the peer is a trusted proxy, see :func:`trust_nobody` for the default) and ``Via``
appended. The response side (hop-by-hop headers stripped, ``Via`` appended) is done inline by
the proxy's exchange in :mod:`edgeauth.edge.proxy`, with :data:`HOP_BY_HOP` and
:func:`header_tokens` from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence, Set

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web.http_headers import Headers
from twisted.web.server import Request

__all__ = [
    "HOP_BY_HOP",
    "VIA",
    "forwarded_node",
    "header_tokens",
    "origin_request_headers",
    "peer_ip",
    "trust_nobody",
]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""Headers that concern one connection only (RFC 9110 section 7.6.1), never forwarded."""

VIA = b"1.1 edgeauth"
"""This hop's default ``Via`` entry, added to requests and responses."""


def trust_nobody(peer_ip: str) -> bool:
    """The default ``is_trusted``: no peer is a trusted proxy."""
    return False


def forwarded_node(ip: str | None) -> bytes:
    """Return an RFC 7239 node for ``ip``: bare IPv4, quoted and bracketed IPv6, ``unknown``."""
    if ip is None:
        return b"unknown"
    if ":" in ip:
        return b'"[' + ip.encode("ascii") + b']"'
    return ip.encode("ascii")


_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _forwarded_value(value: bytes) -> bytes:
    """Return ``value`` as an RFC 7239 token if it is one, else as a quoted string."""
    if value and not value.translate(None, _TCHAR):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


_IP_ADDRESS_TYPES = (IPv4Address, IPv6Address)


def peer_ip(request: Request) -> str | None:
    """Return the TCP peer's IP address (an IPv4-mapped IPv6 one as IPv4), None if not an IP."""
    address = request.getClientAddress()
    if isinstance(address, _IP_ADDRESS_TYPES):
        host = address.host
        if host.startswith("::ffff:") and "." in host:
            return host[7:]
        return host
    return None


def header_tokens(values: Iterable[bytes]) -> set[bytes]:
    """Return the lower-cased tokens of comma-separated header ``values`` (empty ones left out)."""
    return {t.strip().lower() for v in values for t in v.split(b",")} - {b""}


# One-value Connection headers (keep-alive, close, ...) repeat: their token sets are kept.
_CONNECTION_TOKENS: dict[bytes, frozenset[bytes]] = {}
_CONNECTION_TOKENS_MAX = 256


def _connection_tokens(values: Sequence[bytes]) -> Set[bytes]:
    if len(values) != 1:
        return header_tokens(values)
    value = values[0]
    tokens = _CONNECTION_TOKENS.get(value)
    if tokens is None:
        tokens = frozenset(header_tokens(values))
        if len(_CONNECTION_TOKENS) < _CONNECTION_TOKENS_MAX:
            _CONNECTION_TOKENS[value] = tokens
    return tokens


# What origin_request_headers does with each request header, by lower-cased name (one lookup per
# header instead of a chain of comparisons); any other name is passed on.
_PASS, _DROP, _FRAMING, _HOST, _LENGTH, _XFF, _FORWARDED, _VIA_IN, _XFP = range(9)
_REQUEST_HEADER_KINDS = {
    **dict.fromkeys(HOP_BY_HOP, _DROP),
    b"transfer-encoding": _FRAMING,
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"x-forwarded-for": _XFF,
    b"forwarded": _FORWARDED,
    b"via": _VIA_IN,
    b"x-forwarded-proto": _XFP,
    b"expect": _DROP,  # Twisted answers 100-continue itself
}

# peer address -> (its bytes, its RFC 7239 node); peers are few and repeat (keep-alive).
_PEER_FORMS: dict[str, tuple[bytes, bytes]] = {}
_PEER_FORMS_MAX = 4096


def _peer_forms(peer: str) -> tuple[bytes, bytes]:
    forms = _PEER_FORMS.get(peer)
    if forms is None:
        forms = (peer.encode("ascii"), forwarded_node(peer))
        if len(_PEER_FORMS) >= _PEER_FORMS_MAX:
            _PEER_FORMS.clear()
        _PEER_FORMS[peer] = forms
    return forms


def origin_request_headers(
    headers: Headers,
    *,
    peer: str | None,
    is_trusted: Callable[[str], bool],
    proto: bytes,
    host: bytes | None,
    via: bytes = VIA,
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Build the headers sent to the origin for a client request's ``headers``.

    Args:
        headers: the client's request headers.
        peer: the TCP peer's address (None if not an IP peer).
        is_trusted: whether a peer address is a trusted proxy (consulted only when the request
            carries forwarding headers).
        proto: ``b"http"`` or ``b"https"``, how the client reached the edge.
        host: the ``Host`` to send, or None to keep the client's.
        via: this hop's ``Via`` entry.

    Returns:
        The headers in order (repeats kept, hop-by-hop and framing headers dropped), and whether
        the client request declared a body (``Content-Length`` or ``Transfer-Encoding``).
    """
    connection = headers.getRawHeaders(b"connection")
    listed = _connection_tokens(connection) if connection else None
    out: list[tuple[bytes, bytes]] = [(b"Host", host)] if host is not None else []
    xff: list[bytes] = []
    forwarded: list[bytes] = []
    vias: list[bytes] = []
    xfp: list[bytes] = []
    client_host: bytes | None = None
    framed = False
    kinds = _REQUEST_HEADER_KINDS
    for name, values in headers.getAllRawHeaders():
        key = name.lower()
        kind = kinds.get(key, _PASS)
        if listed is not None and key in listed:
            if kind == _FRAMING:
                framed = True
            continue
        if kind == _PASS:
            for value in values:
                out.append((name, value))
        elif kind == _HOST:
            client_host = values[0]
            if host is None:
                out.insert(0, (b"Host", client_host))
        elif kind == _FRAMING or kind == _LENGTH:
            framed = True
        elif kind == _XFF:
            xff += values
        elif kind == _FORWARDED:
            forwarded += values
        elif kind == _VIA_IN:
            vias += values
        elif kind == _XFP:
            xfp += values
        # else _DROP
    if peer is None:
        peer_bytes, node = None, b"unknown"
    else:
        peer_bytes, node = _peer_forms(peer)
    trusted = peer is not None and bool(xff or forwarded or xfp) and is_trusted(peer)
    if trusted and xff:
        chain = b", ".join(xff)
        out.append((b"X-Forwarded-For", chain + b", " + peer_bytes if peer_bytes else chain))
    elif peer_bytes is not None:
        out.append((b"X-Forwarded-For", peer_bytes))
    element = b"for=" + node + b";proto=" + proto
    if client_host is not None:
        element += b";host=" + _forwarded_value(client_host)
    if trusted and forwarded:
        element = b", ".join(forwarded) + b", " + element
    out.append((b"Forwarded", element))
    out.append((b"X-Forwarded-Proto", b", ".join(xfp) if trusted and xfp else proto))
    out.append((b"Via", b", ".join([*vias, via]) if vias else via))
    return out, framed
