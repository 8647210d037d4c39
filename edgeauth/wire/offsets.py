# Code to format and parse stream offsets and long-poll cursors.
#
# Spec: PROTOCOL.md section 4 ("Offsets", 4.1 and 4.2).
#
# Strategy: offsets and cursors arrive in query strings and end up in cache
# keys, ETags and SQL, so parsing is strict and done with anchored regexes on
# ASCII digits only ([0-9] with \A...\Z, never str.isdigit() or int(), which
# accept Unicode digits, signs, underscores and surrounding whitespace).
# Anything that is not exactly one of the documented forms is an error that
# carries the protocol's error code, so the HTTP layer can answer 400 with it.
#
# The cursor rule is a pure function of the time and the client's cursor; the
# clock and the random jitter are passed in, so it is testable without a
# reactor.
"""Stream offsets, ETags and long-poll cursors of the wire protocol (PROTOCOL.md §4)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Final

__all__ = [
    "CURSOR_EPOCH",
    "CURSOR_INTERVAL",
    "OFFSET_DIGITS",
    "START",
    "TAIL",
    "CursorError",
    "OffsetError",
    "current_cursor",
    "etag_for_chunk",
    "format_offset",
    "next_cursor",
    "parse_cursor",
    "parse_offset",
]

OFFSET_DIGITS: Final = 16
"""The number of digits in a formatted offset."""

START: Final = -1
"""What :func:`parse_offset` returns for ``"-1"``: the start of the retained log."""

TAIL: Final = -2
"""What :func:`parse_offset` returns for ``"now"``: the current tail."""

CURSOR_EPOCH: Final = 1728432000
"""2024-10-09T00:00:00Z as Unix time: where cursor interval 0 begins."""

CURSOR_INTERVAL: Final = 20
"""The length of one cursor interval, in seconds."""

_MAX_SEQ: Final = 10**OFFSET_DIGITS - 1
_OFFSET_RE: Final = re.compile(r"\A[0-9]{16}\Z")
_CURSOR_RE: Final = re.compile(r"\A[0-9]{1,19}\Z")
_MAX_ECHO: Final = 40  # how much of a bad value an error detail quotes


class OffsetError(ValueError):
    """A request's offset is not one of the forms of PROTOCOL.md §4.

    Attributes:
        code: The protocol error code, ``"invalid_offset"``.
        detail: A message for humans.
    """

    code: str = "invalid_offset"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class CursorError(ValueError):
    """A request's long-poll cursor is not a decimal interval number.

    Attributes:
        code: The protocol error code, ``"invalid_cursor"``.
        detail: A message for humans.
    """

    code: str = "invalid_cursor"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def format_offset(seq: int) -> str:
    """Format the position after event ``seq``.

    Args:
        seq: An event sequence number, 0 to 10**16 - 1.

    Returns:
        ``seq`` as 16 zero-padded decimal digits, e.g. ``"0000000000000042"``.

    Raises:
        ValueError: ``seq`` is negative or has more than 16 digits.
    """
    if not 0 <= seq <= _MAX_SEQ:
        raise ValueError(f"offset out of range: {seq}")
    return f"{seq:0{OFFSET_DIGITS}d}"


def parse_offset(text: str) -> int:
    """Parse an offset from a request.

    Args:
        text: The offset as the client sent it.

    Returns:
        The sequence number for 16 ASCII digits, :data:`START` for ``"-1"``,
        or :data:`TAIL` for ``"now"``.

    Raises:
        OffsetError: ``text`` is anything else.
    """
    if _OFFSET_RE.match(text):
        return int(text)
    if text == "-1":
        return START
    if text == "now":
        return TAIL
    raise OffsetError(
        f"offset must be {OFFSET_DIGITS} ASCII digits, '-1' or 'now', got {text[:_MAX_ECHO]!r}"
    )


def etag_for_chunk(start: int, next_: int) -> str:
    """Build the ETag of a catch-up response (PROTOCOL.md §4.1).

    The chunk (start, next_] never changes, so the tag names it exactly.
    :data:`START` and :data:`TAIL` must be resolved to positions first.

    Args:
        start: The position the read started after.
        next_: The position after the last event returned.

    Returns:
        The quoted tag, e.g. ``'"events:0000000000000000:0000000000000042"'``.

    Raises:
        ValueError: A position is out of range.
    """
    return f'"events:{format_offset(start)}:{format_offset(next_)}"'


def current_cursor(now: float) -> int:
    """Return the number of the 20-second interval containing ``now``.

    Args:
        now: Unix time in seconds.

    Returns:
        ``floor((now - CURSOR_EPOCH) / CURSOR_INTERVAL)``.
    """
    # Floor division, not floor(x / 20): the quotient x / 20 is rounded to a
    # float first and could land on the next integer just below a boundary.
    return math.floor((now - CURSOR_EPOCH) // CURSOR_INTERVAL)


def parse_cursor(text: str) -> int:
    """Parse a long-poll cursor from a request.

    Args:
        text: The cursor as the client sent it.

    Returns:
        The interval number.

    Raises:
        CursorError: ``text`` is not 1 to 19 ASCII digits.
    """
    if _CURSOR_RE.match(text):
        return int(text)
    raise CursorError(f"cursor must be 1 to 19 ASCII digits, got {text[:_MAX_ECHO]!r}")


def next_cursor(client_cursor: int | None, now: float, jitter: Callable[[int, int], int]) -> int:
    """Choose the ``Stream-Cursor`` of a long-poll answer (PROTOCOL.md §4.2).

    Normally this is the current interval. If the client's cursor is not
    older than that, the answer gets a larger cursor, 1 to 3 intervals
    ahead, so that the client's next request differs from this one and a
    cache can never serve the same long-poll answer in a loop.

    Args:
        client_cursor: The request's ``cursor``, or ``None`` if it had none.
        now: Unix time in seconds.
        jitter: Returns a random integer in a closed range, like
            ``random.Random().randint``; called as ``jitter(1, 3)``.

    Returns:
        The cursor to send.

    Raises:
        ValueError: ``jitter`` returned a value outside 1 to 3.
    """
    current = current_cursor(now)
    if client_cursor is None or client_cursor < current:
        return current
    step = jitter(1, 3)
    if not 1 <= step <= 3:
        raise ValueError(f"jitter(1, 3) returned {step}")
    return client_cursor + step
