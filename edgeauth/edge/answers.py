"""The edge's own answers: JSON bodies it writes instead of an origin response.

:class:`Refusal` is what the proxy's gate hook returns instead of letting a request through;
:func:`write_json` writes it, the proxy's upgrade refusal (501) and its origin errors (502/504),
and the cache's own errors: a JSON body with ``Content-Type: application/json`` and
``Cache-Control: no-store`` unless the given headers name them. The few header tuples refusals
pass again and again have their handling worked out once and kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import attrs
from twisted.web.server import Request

__all__ = ["Answer", "Refusal", "write_json"]


class Answer(Protocol):
    """What the proxy writes for a gate hook's refusal.

    A :class:`Refusal`, or any object with these three fields: the gate's own
    ``edgeauth.edge.gate.Refusal`` passes as it is.
    """

    @property
    def status(self) -> int:
        """The HTTP status."""

    @property
    def body(self) -> Mapping[str, Any] | bytes:
        """The JSON body, or its encoded bytes."""

    @property
    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Extra response headers."""


@attrs.frozen
class Refusal:
    """An answer the gate gives instead of proxying.

    Attributes:
        status: the HTTP status, e.g. 403.
        body: the JSON body, e.g. ``{"error": "ip_banned", "ref": 42}``, or its encoded bytes.
        headers: extra response headers, e.g. ``WWW-Authenticate``.
    """

    status: int
    body: Mapping[str, Any] | bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


def write_json(
    request: Request,
    status: int,
    body: Mapping[str, Any] | bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer ``request`` with a JSON body (a mapping, or JSON already encoded) and finish it.

    ``Content-Type: application/json`` and ``Cache-Control: no-store`` are set unless ``headers``
    names them; ``headers`` are added as given (repeats kept).
    """
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    request.setResponseCode(status)
    response = request.responseHeaders
    extra = headers if isinstance(headers, tuple) else tuple(headers)
    set_type, set_cache, added = _json_header_plan(extra) if extra else _NO_EXTRA_HEADERS
    if set_type:
        response.setRawHeaders(b"Content-Type", _JSON_TYPE)
    if set_cache:
        response.setRawHeaders(b"Cache-Control", _NO_STORE)
    for name, value in added:
        response.addRawHeader(name, value)
    response.setRawHeaders(b"Content-Length", [b"%d" % len(data)])
    request.write(data)
    request.finish()


_JSON_TYPE = (b"application/json",)
_NO_STORE = (b"no-store",)
_HeaderPlan = tuple[bool, bool, tuple[tuple[bytes, bytes], ...]]
_NO_EXTRA_HEADERS: _HeaderPlan = (True, True, ())
_HEADER_PLANS: dict[tuple[tuple[bytes, bytes], ...], _HeaderPlan] = {}
_MAX_HEADER_PLANS = 256


def _json_header_plan(extra: tuple[tuple[bytes, bytes], ...]) -> _HeaderPlan:
    """What :func:`write_json` does with ``extra``: set Content-Type? Cache-Control? add what?

    Refusals pass the same few header tuples again and again, so their plans are kept (up to
    ``_MAX_HEADER_PLANS`` of them; others, and unhashable ones, are worked out each time).
    """
    try:
        plan = _HEADER_PLANS.get(extra)
    except TypeError:  # e.g. [name, value] lists
        plan, cacheable = None, False
    else:
        cacheable = len(_HEADER_PLANS) < _MAX_HEADER_PLANS
    if plan is None:
        named = {name.lower() for name, _ in extra}
        plan = (
            b"content-type" not in named,
            b"cache-control" not in named,
            tuple((name, value) for name, value in extra if name.lower() != b"content-length"),
        )
        if cacheable:
            _HEADER_PLANS[extra] = plan
    return plan
