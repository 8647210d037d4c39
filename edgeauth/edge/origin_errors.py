"""How an exchange with the origin fails: the :class:`OriginError` hierarchy.

Each error carries the ``kind`` and the ``status`` the edge answers the client with:
:class:`OriginUnreachableError` (502) when no connection to the origin can be made,
:class:`OriginTimeoutError` (504) when the origin stalls, and :class:`BadGatewayError` (502) when
the origin closes early or does not speak HTTP/1.1.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BadGatewayError",
    "OriginError",
    "OriginTimeoutError",
    "OriginUnreachableError",
]


class OriginError(Exception):
    """The origin did not give a complete response; ``kind`` and ``status`` say how to answer."""

    kind: ClassVar[str] = "bad_gateway"
    status: ClassVar[int] = 502

    @property
    def detail(self) -> str:
        """A human-readable reason."""
        return str(self.args[0]) if self.args else self.kind


class OriginUnreachableError(OriginError):
    """No connection to the origin could be made (refused, failed or timed out)."""

    kind = "origin_unreachable"


class OriginTimeoutError(OriginError):
    """The origin made no progress for ``response_timeout`` seconds."""

    kind = "origin_timeout"
    status = 504


class BadGatewayError(OriginError):
    """The origin closed the connection early or sent something that is not HTTP/1.1."""
