# Code to write and read Server-Sent Events (text/event-stream).
#
# Spec: WHATWG HTML, section 9.2 "Server-sent events", subsections "Parsing an
# event stream" and "Interpreting an event stream"
# (https://html.spec.whatwg.org/multipage/server-sent-events.html).
#
# Strategy: the parser is sans-io in the h11 sense. Bytes go in through feed(),
# parsed items come out as a list; feed_eof() marks the end of the stream. The
# only exception it raises is SSEParseError, whatever the input.
#
# - Bytes are kept in one bytearray. Each feed() searches for CR or LF only in
#   the bytes it has not searched yet (self._scan_pos), so scanning is O(n)
#   over the whole stream however the input is chunked. Complete lines are cut
#   off the front of the buffer once per feed().
# - CRLF, CR and LF all end a line. A CR that is the last byte we have ends
#   the line at once; we then remember (self._skip_lf) to drop an LF if it is
#   the next byte to arrive, so "\r" + "\n" in two chunks is one line break.
# - The spec decodes the whole stream as UTF-8 (with replacement) before
#   splitting it into lines. CR, LF and ":" are ASCII and never occur inside a
#   multi-byte UTF-8 sequence, so splitting the bytes first and decoding each
#   piece gives the same text; Python's "replace" error handler substitutes
#   U+FFFD per maximal subpart, as the WHATWG UTF-8 decoder does.
# - The UTF-8 decoder strips one BOM at the very start of the stream only. We
#   hold back up to three leading bytes until we know whether they are one.
# - Buffers are bounded: a line longer than max_line_size, or the data of one
#   event growing past max_event_size (UTF-8 bytes, counting the LF the spec
#   appends per data line), raises SSEParseError.
# - At end of stream the spec discards pending data: an incomplete line and an
#   event without its closing blank line are never dispatched.
#
# The encoder writes whole frames, each closed by a blank line, and refuses
# input that would change meaning on the wire (CR or LF in an event name or id,
# NUL in an id).
"""Encode and incrementally parse Server-Sent Events, without any I/O."""

from __future__ import annotations

import re
from typing import TypeAlias

import attrs

__all__ = [
    "SSEComment",
    "SSEEvent",
    "SSEItem",
    "SSEParseError",
    "SSEParser",
    "SSERetry",
    "encode_comment",
    "encode_event",
    "encode_retry",
]

_BOM = b"\xef\xbb\xbf"
_CR = 0x0D
_LF = 0x0A
_LINE_END = re.compile(rb"[\r\n]")
_NEWLINE = re.compile(r"\r\n|\r|\n")
_DIGITS = re.compile(rb"[0-9]+")
# CPython refuses to convert longer digit strings to int by default
# (sys.get_int_max_str_digits); such a retry value is ignored, as browsers
# ignore one that overflows their integer type.
_MAX_RETRY_DIGITS = 640


@attrs.frozen
class SSEEvent:
    """One dispatched event.

    Attributes:
        event: The event type; ``"message"`` when the stream set none.
        data: The data lines of the event joined with LF.
        id: The last event ID in force when the event was dispatched, or
            ``None`` if the stream never set one.
    """

    event: str = attrs.field(default="message", validator=attrs.validators.instance_of(str))
    data: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    id: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str))
    )


@attrs.frozen
class SSEComment:
    """A comment line (one that starts with ``":"``), such as a keep-alive ping.

    Attributes:
        text: The line without its colon and without one leading space.
    """

    text: str = attrs.field(validator=attrs.validators.instance_of(str))


@attrs.frozen
class SSERetry:
    """A valid ``retry`` field: the server's reconnection time.

    Attributes:
        milliseconds: The reconnection time in milliseconds.
    """

    milliseconds: int = attrs.field(validator=attrs.validators.instance_of(int))


SSEItem: TypeAlias = SSEEvent | SSEComment | SSERetry
"""Anything the parser can return."""


class SSEParseError(Exception):
    """The event stream cannot be parsed: it is too large, or the parser is closed."""


class SSEParser:
    """Incremental event stream parser: bytes in, events out.

    Feed it bytes as they arrive, in any chunking; it returns the items that
    became complete. Call :meth:`feed_eof` when the stream ends.

    Args:
        max_line_size: The longest line accepted, in bytes, without its line
            terminator.
        max_event_size: The most data one event may accumulate, in UTF-8
            bytes including one LF per ``data`` line.
    """

    def __init__(self, max_line_size: int = 1 << 20, max_event_size: int = 8 << 20) -> None:
        if max_line_size < 1 or max_event_size < 1:
            raise ValueError("max_line_size and max_event_size must be positive")
        self._max_line_size = max_line_size
        self._max_event_size = max_event_size
        self._buf = bytearray()
        self._scan_pos = 0  # bytes of self._buf already searched for CR/LF
        self._bom_checked = False
        self._skip_lf = False
        self._closed = False
        self._failed = False
        # The spec's buffers: data, event type and last event ID.
        self._data: list[str] = []
        self._data_size = 0
        self._event_type = ""
        self._id_buffer: str | None = None
        # The "last event ID string", committed at each dispatch.
        self._last_event_id: str | None = None

    @property
    def last_event_id(self) -> str:
        """The last event ID string (``""`` until one is dispatched).

        This is what a reconnecting client sends as ``Last-Event-ID``.
        """
        return self._last_event_id or ""

    def feed(self, data: bytes) -> list[SSEItem]:
        """Parse more of the stream.

        Args:
            data: The next bytes of the stream; may be empty.

        Returns:
            The events, comments and retry values completed by ``data``, in
            stream order.

        Raises:
            SSEParseError: A line or an event is too large, a previous call
                failed, or :meth:`feed_eof` was already called.
        """
        if self._closed:
            raise SSEParseError("data received after end of stream")
        if self._failed:
            raise SSEParseError("parser failed earlier and cannot continue")
        if not data:
            return []
        self._buf += data
        if not self._bom_checked:
            if len(self._buf) < len(_BOM) and _BOM.startswith(self._buf):
                return []  # might still be a BOM split across chunks
            if self._buf.startswith(_BOM):
                del self._buf[: len(_BOM)]
            self._bom_checked = True
        try:
            return self._extract_lines()
        except SSEParseError:
            self._failed = True
            raise

    def feed_eof(self) -> list[SSEItem]:
        """Mark the end of the stream.

        Per the spec, an incomplete line and an event without its closing
        blank line are discarded. Calling this again does nothing.

        Returns:
            Always an empty list: nothing completes at end of stream. The list
            is returned so callers can treat this like :meth:`feed`.
        """
        self._closed = True
        self._buf.clear()
        self._scan_pos = 0
        self._data.clear()
        self._data_size = 0
        self._event_type = ""
        return []

    def _extract_lines(self) -> list[SSEItem]:
        buf = self._buf
        items: list[SSEItem] = []
        start = 0
        if self._skip_lf:
            # The previous chunk ended in CR; an LF now completes that CRLF.
            self._skip_lf = False
            if buf[0] == _LF:
                start = 1
        scan = max(self._scan_pos, start)
        end = len(buf)
        while True:
            match = _LINE_END.search(buf, scan)
            if match is None:
                if end - start > self._max_line_size:
                    raise SSEParseError(f"line longer than {self._max_line_size} bytes")
                break
            pos = match.start()
            if pos - start > self._max_line_size:
                raise SSEParseError(f"line longer than {self._max_line_size} bytes")
            line = bytes(buf[start:pos])
            if buf[pos] == _CR:
                if pos + 1 == end:
                    self._skip_lf = True
                    scan = pos + 1
                elif buf[pos + 1] == _LF:
                    scan = pos + 2
                else:
                    scan = pos + 1
            else:
                scan = pos + 1
            start = scan
            item = self._process_line(line)
            if item is not None:
                items.append(item)
        del buf[:start]
        self._scan_pos = end - start
        return items

    def _process_line(self, line: bytes) -> SSEItem | None:
        if not line:
            return self._dispatch()
        if line[0] == 0x3A:  # ":"
            text = line[1:]
            if text.startswith(b" "):
                text = text[1:]
            return SSEComment(text.decode("utf-8", "replace"))
        field, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            self._data_size += len(value) + 1
            if self._data_size > self._max_event_size:
                raise SSEParseError(f"event data larger than {self._max_event_size} bytes")
            self._data.append(value.decode("utf-8", "replace"))
        elif field == b"event":
            self._event_type = value.decode("utf-8", "replace")
        elif field == b"id":
            if b"\x00" not in value:
                self._id_buffer = value.decode("utf-8", "replace")
        elif field == b"retry":
            if _DIGITS.fullmatch(value):
                digits = value.lstrip(b"0") or b"0"
                if len(digits) <= _MAX_RETRY_DIGITS:
                    return SSERetry(int(digits))
        # Any other field is ignored.
        return None

    def _dispatch(self) -> SSEEvent | None:
        self._last_event_id = self._id_buffer
        event_type = self._event_type or "message"
        self._event_type = ""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data.clear()
        self._data_size = 0
        return SSEEvent(event=event_type, data=data, id=self._last_event_id)


def encode_event(data: str, event: str | None = None, id: str | None = None) -> bytes:
    """Encode one event as a frame.

    Args:
        data: The event data. CRLF, CR and LF split it into several ``data``
            lines; a parser gives it back with each of them as LF.
        event: The event type; ``None`` leaves it out (the type is then
            ``"message"``).
        id: The event ID; ``None`` leaves it out. ``""`` resets the ID.

    Returns:
        The frame in UTF-8: ``id``, ``event``, one ``data`` line per line of
        ``data`` (at least one), and a blank line.

    Raises:
        ValueError: ``event`` or ``id`` contains CR or LF, or ``id`` contains
            NUL, or a string cannot be encoded as UTF-8.
    """
    lines: list[str] = []
    if id is not None:
        if "\r" in id or "\n" in id or "\x00" in id:
            raise ValueError("an SSE id must not contain CR, LF or NUL")
        lines.append(f"id: {id}")
    if event is not None:
        if "\r" in event or "\n" in event:
            raise ValueError("an SSE event type must not contain CR or LF")
        lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in _NEWLINE.split(data))
    lines.append("\n")
    return "\n".join(lines).encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    """Encode a comment frame, e.g. a keep-alive ``": ping"``.

    Args:
        text: The comment; each of its lines becomes one comment line.

    Returns:
        The frame in UTF-8, closed by a blank line.

    Raises:
        ValueError: ``text`` cannot be encoded as UTF-8.
    """
    lines = [f": {line}" if line else ":" for line in _NEWLINE.split(text)]
    lines.append("\n")
    return "\n".join(lines).encode("utf-8")


def encode_retry(milliseconds: int) -> bytes:
    """Encode a frame that sets the client's reconnection time.

    Args:
        milliseconds: The reconnection time; not negative.

    Returns:
        The frame, closed by a blank line.

    Raises:
        ValueError: ``milliseconds`` is negative.
    """
    if milliseconds < 0:
        raise ValueError("the reconnection time must not be negative")
    return b"retry: %d\n\n" % milliseconds
