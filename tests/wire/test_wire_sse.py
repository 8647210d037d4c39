"""Tests for edgeauth.wire.sse: the event stream encoder and parser."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeauth.wire.sse import (
    SSEComment,
    SSEEvent,
    SSEItem,
    SSEParseError,
    SSEParser,
    SSERetry,
    encode_comment,
    encode_event,
    encode_retry,
)

BOM = b"\xef\xbb\xbf"


def parse_chunks(chunks: Sequence[bytes], parser: SSEParser | None = None) -> list[SSEItem]:
    """Feed every chunk, then EOF, and return all items."""
    parser = parser or SSEParser()
    items: list[SSEItem] = []
    for chunk in chunks:
        items.extend(parser.feed(chunk))
    items.extend(parser.feed_eof())
    return items


def parse(data: bytes) -> list[SSEItem]:
    """Parse a whole stream fed at once."""
    return parse_chunks([data])


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """Cut ``data`` at the given positions."""
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def outcome(chunks: Sequence[bytes], **limits: int) -> list[SSEItem] | str:
    """Parse chunks; return the items, or "error" if the parser raised SSEParseError."""
    try:
        return parse_chunks(chunks, SSEParser(**limits))
    except SSEParseError:
        return "error"


# -- spec examples (WHATWG HTML, "Interpreting an event stream" and "Authoring notes") --

SPEC_EXAMPLES: list[tuple[bytes, list[SSEItem]]] = [
    (b"data: YHOO\ndata: +2\ndata: 10\n\n", [SSEEvent(data="YHOO\n+2\n10")]),
    (
        b": test stream\n\ndata: first event\nid: 1\n\n"
        b"data:second event\nid\n\ndata:  third event\n\n",
        [
            SSEComment("test stream"),
            SSEEvent(data="first event", id="1"),
            SSEEvent(data="second event", id=""),
            SSEEvent(data=" third event", id=""),
        ],
    ),
    (b"data\n\ndata\ndata\n\ndata:", [SSEEvent(data=""), SSEEvent(data="\n")]),
    (b"data:test\n\ndata: test\n\n", [SSEEvent(data="test"), SSEEvent(data="test")]),
    (
        b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n",
        [
            SSEEvent(event="add", data="73857293"),
            SSEEvent(event="remove", data="2153"),
            SSEEvent(event="add", data="113411"),
        ],
    ),
]


@pytest.mark.parametrize(("stream", "expected"), SPEC_EXAMPLES)
def test_spec_examples(stream: bytes, expected: list[SSEItem]) -> None:
    """The examples of the WHATWG spec parse to the events it describes."""
    assert parse(stream) == expected


SPLIT_SAMPLES = [
    *(stream for stream, _ in SPEC_EXAMPLES),
    BOM + b"data: a\r\ndata: b\r\n\r\n",
    b"id: 7\rretry: 1500\revent: x\rdata: \xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\r\r",
    b":ping\r\n\r\ndata: a\r\n\r\nid: a\x00b\ndata: b\n\n",
]


@pytest.mark.parametrize("stream", SPLIT_SAMPLES)
def test_split_anywhere(stream: bytes) -> None:
    """Whole, byte by byte and every 2-way split give the same items (h11 test_io style)."""
    expected = parse(stream)
    assert expected
    assert parse_chunks([stream[i : i + 1] for i in range(len(stream))]) == expected
    for i in range(len(stream) + 1):
        assert parse_chunks([stream[:i], stream[i:]]) == expected, i


# -- line endings ---------------------------------------------------------------------


def test_cr_then_lf_in_next_chunk_is_one_line_break() -> None:
    """A CR ending one chunk and an LF starting the next make a single line break."""
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n\r") == [SSEEvent(data="a\nb")]
    assert parser.feed(b"\n") == []


def test_lone_cr_ends_line_without_waiting_for_more() -> None:
    """A CR followed by another byte is a line break by itself."""
    assert parse(b"data: a\rdata: b\r\r") == [SSEEvent(data="a\nb")]


def test_cr_cr_is_two_line_breaks() -> None:
    """Two CRs end a line and then an empty line, dispatching the event."""
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\r") == [SSEEvent(data="a")]


# -- fields ---------------------------------------------------------------------------


def test_one_leading_space_is_stripped() -> None:
    """Only the first space after the colon is removed from a value."""
    assert parse(b"event:  e\ndata:  x \n\n") == [SSEEvent(event=" e", data=" x ")]


def test_field_without_colon_has_empty_value() -> None:
    """A line without a colon is a field name with an empty value."""
    assert parse(b"event\ndata\n\n") == [SSEEvent(event="message", data="")]


def test_unknown_fields_are_ignored() -> None:
    """Fields other than event, data, id and retry do nothing."""
    assert parse(b"foo: bar\nData: no\ndata: yes\n dat: no\n\n") == [SSEEvent(data="yes")]


def test_empty_data_buffer_resets_event_type_without_dispatch() -> None:
    """A blank line with no data fires nothing but forgets the event type."""
    assert parse(b"event: foo\n\ndata: x\n\n") == [SSEEvent(event="message", data="x")]


def test_event_type_applies_to_one_event() -> None:
    """The event type is reset after each dispatch."""
    assert parse(b"event: foo\ndata: 1\n\ndata: 2\n\n") == [
        SSEEvent(event="foo", data="1"),
        SSEEvent(data="2"),
    ]


def test_empty_event_type_means_message() -> None:
    """An empty event field gives the default type "message"."""
    assert parse(b"event:\ndata: 1\n\n") == [SSEEvent(data="1")]


def test_comments() -> None:
    """A comment line gives its text without the colon and one leading space."""
    assert parse(b":\n: ping\n:  two\n:no-space\n") == [
        SSEComment(""),
        SSEComment("ping"),
        SSEComment(" two"),
        SSEComment("no-space"),
    ]


def test_incomplete_event_is_discarded_at_eof() -> None:
    """An event without its closing blank line is never dispatched."""
    assert parse(b"data: a\n") == []
    assert parse(b"data: a\n\ndata: b") == [SSEEvent(data="a")]


def test_invalid_utf8_is_replaced() -> None:
    """Invalid UTF-8 decodes with U+FFFD, as the spec's UTF-8 decode does."""
    assert parse(b"data: \xff\xe2\x82\nevent: \xc0\xaf\n\n") == [
        SSEEvent(event="\ufffd\ufffd", data="\ufffd\ufffd")
    ]


def test_nul_in_data_and_event_is_kept() -> None:
    """NUL is only special in id fields."""
    assert parse(b"event: a\x00b\ndata: c\x00d\n\n") == [SSEEvent(event="a\x00b", data="c\x00d")]


# -- id -------------------------------------------------------------------------------


def test_id_persists_across_events() -> None:
    """The last event ID stays in force for later events without an id field."""
    parser = SSEParser()
    assert parser.last_event_id == ""
    items = parser.feed(b"data: a\n\nid: 1\ndata: b\n\ndata: c\n\n")
    assert items == [SSEEvent(data="a"), SSEEvent(data="b", id="1"), SSEEvent(data="c", id="1")]
    assert parser.last_event_id == "1"


def test_id_with_nul_is_ignored() -> None:
    """An id value containing NUL leaves the last event ID unchanged."""
    parser = SSEParser()
    assert parser.feed(b"id: 1\n\nid: a\x00b\ndata: x\n\n") == [SSEEvent(data="x", id="1")]
    assert parser.last_event_id == "1"


def test_id_is_committed_by_blank_line_even_without_data() -> None:
    """A block with only an id sets the last event ID."""
    parser = SSEParser()
    assert parser.feed(b"id: 5\n\n") == []
    assert parser.last_event_id == "5"


def test_id_is_not_committed_without_blank_line() -> None:
    """An id in an unfinished block is not yet the last event ID."""
    parser = SSEParser()
    assert parser.feed(b"id: 5\n") == []
    assert parser.last_event_id == ""
    assert parser.feed_eof() == []
    assert parser.last_event_id == ""


def test_empty_id_resets_last_event_id() -> None:
    """An id field with no value sets the last event ID to the empty string."""
    parser = SSEParser()
    assert parser.feed(b"id: 1\n\nid\ndata: x\n\n") == [SSEEvent(data="x", id="")]
    assert parser.last_event_id == ""


# -- retry ----------------------------------------------------------------------------


def test_retry_valid() -> None:
    """A retry field of ASCII digits gives an SSERetry."""
    assert parse(b"retry: 2000\n") == [SSERetry(2000)]
    assert parse(b"retry:0\n") == [SSERetry(0)]


@pytest.mark.parametrize(
    "value",
    [b"20x0", b"", b"-1", b"+1", b" 1", b"1 ", b"1.5", "２".encode(), "١".encode()],
)
def test_retry_invalid_is_ignored(value: bytes) -> None:
    """A retry value that is not only ASCII digits is ignored."""
    assert parse(b"retry: " + value + b"\ndata: x\n\n") == [SSEEvent(data="x")]


def test_retry_too_long_for_int_is_ignored() -> None:
    """A retry value with thousands of digits is ignored rather than crashing."""
    assert parse(b"retry: " + b"9" * 5000 + b"\n") == []
    assert parse(b"retry: " + b"0" * 5000 + b"7\n") == [SSERetry(7)]


# -- BOM ------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 4])
def test_bom_at_start_is_stripped(cut: int) -> None:
    """A UTF-8 BOM at the start of the stream is dropped, even when split across chunks."""
    stream = BOM + b"data: x\n\n"
    assert parse_chunks([stream[:cut], stream[cut:]]) == [SSEEvent(data="x")]
    assert parse_chunks([stream[i : i + 1] for i in range(len(stream))]) == [SSEEvent(data="x")]


def test_only_one_bom_is_stripped() -> None:
    """A second BOM is part of the first line's field name, which is then unknown."""
    assert parse(BOM + BOM + b"data: x\n\ndata: y\n\n") == [SSEEvent(data="y")]


def test_bom_later_in_stream_is_not_stripped() -> None:
    """A BOM after the first byte is an ordinary character."""
    assert parse(b"data: a\n" + BOM + b"data: b\n\n") == [SSEEvent(data="a")]
    assert parse(b"data: " + BOM + b"\n\n") == [SSEEvent(data="\ufeff")]


def test_partial_bom_is_data() -> None:
    """Bytes that start like a BOM but are not one are decoded normally."""
    parser = SSEParser()
    assert parser.feed(b"\xef\xbb") == []
    assert parser.feed(b"\n:c\n") == [SSEComment("c")]
    assert parse(b"\xef") == []


# -- limits and state -----------------------------------------------------------------


def test_max_line_size() -> None:
    """A line longer than max_line_size raises, complete or not; one at the limit passes."""
    assert SSEParser(max_line_size=10).feed(b"data: 1234\n\n") == [SSEEvent(data="1234")]
    with pytest.raises(SSEParseError):
        SSEParser(max_line_size=10).feed(b"data: 12345\n\n")
    parser = SSEParser(max_line_size=10)
    assert parser.feed(b"data: 1234") == []
    with pytest.raises(SSEParseError):
        parser.feed(b"5")


def test_max_event_size() -> None:
    """Data accumulated past max_event_size raises."""
    parser = SSEParser(max_event_size=8)
    assert parser.feed(b"data: abc\ndata: def\n\n") == [SSEEvent(data="abc\ndef")]
    with pytest.raises(SSEParseError):
        parser.feed(b"data: abc\ndata: defg\n")


def test_error_is_sticky() -> None:
    """After an SSEParseError every later feed raises too."""
    parser = SSEParser(max_line_size=4)
    with pytest.raises(SSEParseError):
        parser.feed(b"data: x\n")
    with pytest.raises(SSEParseError):
        parser.feed(b"\n")


def test_feed_after_eof_raises() -> None:
    """Feeding after feed_eof raises SSEParseError; feed_eof itself may repeat."""
    parser = SSEParser()
    assert parser.feed_eof() == []
    assert parser.feed_eof() == []
    with pytest.raises(SSEParseError):
        parser.feed(b"data: x\n\n")
    with pytest.raises(SSEParseError):
        parser.feed(b"")


def test_bad_limits_rejected() -> None:
    """Limits must be positive."""
    with pytest.raises(ValueError):
        SSEParser(max_line_size=0)
    with pytest.raises(ValueError):
        SSEParser(max_event_size=0)


def test_long_line_in_small_chunks() -> None:
    """A long line fed in many small chunks parses (the scan resumes where it stopped)."""
    line = b"data: " + b"x" * 200_000
    chunks = [line[i : i + 97] for i in range(0, len(line), 97)]
    assert parse_chunks([*chunks, b"\n\n"]) == [SSEEvent(data="x" * 200_000)]


# -- encoder --------------------------------------------------------------------------


def test_encode_event_splits_all_newline_kinds() -> None:
    """CRLF, CR and LF in data each start a new data line."""
    assert encode_event("a\r\nb\rc\nd") == b"data: a\ndata: b\ndata: c\ndata: d\n\n"


def test_encode_event_fields() -> None:
    """The id and event lines come before the data, and the frame ends with a blank line."""
    assert encode_event("x", event="e", id="1") == b"id: 1\nevent: e\ndata: x\n\n"
    assert encode_event("é") == "data: é\n\n".encode()


def test_encode_event_empty_data() -> None:
    """Empty data still gives one data line, so the event is dispatched."""
    assert encode_event("") == b"data: \n\n"
    assert parse(encode_event("")) == [SSEEvent(data="")]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"event": "a\nb"},
        {"event": "a\rb"},
        {"id": "1\n"},
        {"id": "\r1"},
        {"id": "1\x002"},
    ],
)
def test_encode_event_rejects_unsafe_fields(kwargs: dict[str, str]) -> None:
    """CR or LF in event or id, and NUL in id, are refused."""
    with pytest.raises(ValueError):
        encode_event("x", **kwargs)


def test_encode_comment() -> None:
    """Comments become one comment line per line of text, then a blank line."""
    assert encode_comment("ping") == b": ping\n\n"
    assert encode_comment() == b":\n\n"
    assert encode_comment("a\r\nb\n") == b": a\n: b\n:\n\n"
    assert parse(encode_comment("a\r\n b")) == [SSEComment("a"), SSEComment(" b")]


def test_encode_retry() -> None:
    """Retry frames carry the milliseconds; negative values are refused."""
    assert encode_retry(2000) == b"retry: 2000\n\n"
    assert parse(encode_retry(2000)) == [SSERetry(2000)]
    with pytest.raises(ValueError):
        encode_retry(-1)


# -- properties -----------------------------------------------------------------------

NEWLINE = re.compile(r"\r\n|\r|\n")
text_with_newlines = st.lists(
    st.characters() | st.sampled_from(["\r", "\n", "\r\n"]), max_size=30
).map("".join)
events = st.builds(
    lambda data, event, id_: ("event", data, event, id_),
    text_with_newlines,
    st.none() | st.text(st.characters(exclude_characters="\r\n")),
    st.none() | st.text(st.characters(exclude_characters="\r\n\x00")),
)
comments = st.builds(lambda text: ("comment", text), text_with_newlines)
retries = st.builds(lambda ms: ("retry", ms), st.integers(0, 10**12))
frames = st.lists(events | comments | retries, max_size=8)


def encode_and_expect(specs: list[tuple[object, ...]]) -> tuple[bytes, list[SSEItem]]:
    """Encode frame specs and compute what a parser must give back for them."""
    stream = b""
    expected: list[SSEItem] = []
    last_id: str | None = None
    for spec in specs:
        if spec[0] == "event":
            _, data, event, id_ = spec
            assert isinstance(data, str)
            assert event is None or isinstance(event, str)
            assert id_ is None or isinstance(id_, str)
            stream += encode_event(data, event=event, id=id_)
            if id_ is not None:
                last_id = id_
            expected.append(SSEEvent(event or "message", NEWLINE.sub("\n", data), last_id))
        elif spec[0] == "comment":
            text = spec[1]
            assert isinstance(text, str)
            stream += encode_comment(text)
            expected.extend(SSEComment(line) for line in NEWLINE.split(text))
        else:
            ms = spec[1]
            assert isinstance(ms, int)
            stream += encode_retry(ms)
            expected.append(SSERetry(ms))
    return stream, expected


@given(frames, st.lists(st.integers(0, 10_000), max_size=12))
def test_roundtrip_any_chunking(specs: list[tuple[object, ...]], cuts: list[int]) -> None:
    """parse(encode(frames)) gives the frames back, however the bytes are chunked."""
    stream, expected = encode_and_expect(specs)
    chunks = split_at(stream, [min(c, len(stream)) for c in cuts])
    assert parse_chunks(chunks) == expected


sse_tokens = st.sampled_from(
    [b"data", b"event", b"id", b"retry", b":", b" ", b"\r", b"\n", b"\r\n", b"1", b"x", b"\x00"]
    + [BOM, b"\xef", b"\xff", b"\xc3", b"\xa9"]
)
sse_bytes = st.binary() | st.lists(sse_tokens, max_size=60).map(b"".join)


@given(
    sse_bytes,
    st.lists(st.integers(0, 1000), max_size=8),
    st.integers(1, 16),
    st.integers(1, 32),
)
def test_arbitrary_bytes_parse_or_raise_sse_parse_error(
    stream: bytes, cuts: list[int], max_line_size: int, max_event_size: int
) -> None:
    """Any bytes in any chunks either parse or raise only SSEParseError, the same way."""
    chunks = split_at(stream, [min(c, len(stream)) for c in cuts])
    limits = {"max_line_size": max_line_size, "max_event_size": max_event_size}
    whole = outcome([stream], **limits)
    assert outcome(chunks, **limits) == whole
    assert outcome(chunks) == outcome([stream])
    if whole != "error":
        assert all(isinstance(item, SSEEvent | SSEComment | SSERetry) for item in whole)


line_texts = st.lists(
    st.sampled_from(["", "data", "data: x", "data:y", ":c", "event: e", "id: 1", "retry: 5"])
    | st.text(st.characters(exclude_characters="\r\n"), max_size=5),
    max_size=20,
)


@given(line_texts, st.data())
def test_crlf_cr_lf_are_equivalent(lines: list[str], data: st.DataObject) -> None:
    """The same lines ended by LF, CR, CRLF (even split CR|LF) or a safe mix parse the same."""
    by_lf = parse("".join(line + "\n" for line in lines).encode())
    assert parse("".join(line + "\r" for line in lines).encode()) == by_lf
    by_crlf = "".join(line + "\r\n" for line in lines).encode()
    assert parse(by_crlf) == by_lf
    assert parse_chunks([by_crlf[i : i + 1] for i in range(len(by_crlf))]) == by_lf
    mixed = ""
    previous = ""
    for line in lines:
        # CR then an empty line ended by LF would read as one CRLF: avoid that pair.
        choices = ["\r", "\r\n"] if previous == "\r" and not line else ["\n", "\r", "\r\n"]
        previous = data.draw(st.sampled_from(choices))
        mixed += line + previous
    assert parse(mixed.encode()) == by_lf
