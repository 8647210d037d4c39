"""Tests for edgeauth.wire.offsets: offsets, ETags and long-poll cursors."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeauth.wire.offsets import (
    CURSOR_EPOCH,
    CURSOR_INTERVAL,
    OFFSET_DIGITS,
    START,
    TAIL,
    CursorError,
    OffsetError,
    current_cursor,
    etag_for_chunk,
    format_offset,
    next_cursor,
    parse_cursor,
    parse_offset,
)

MAX_SEQ = 10**16 - 1
# A fixed "now" inside cursor interval 1000.
NOW = CURSOR_EPOCH + 1000 * CURSOR_INTERVAL + 7.5

# -- offsets --------------------------------------------------------------------------


def test_format_offset() -> None:
    """Offsets are 16 zero-padded decimal digits."""
    assert OFFSET_DIGITS == 16
    assert format_offset(0) == "0000000000000000"
    assert format_offset(42) == "0000000000000042"
    assert format_offset(MAX_SEQ) == "9999999999999999"


@pytest.mark.parametrize("seq", [-1, -2, MAX_SEQ + 1, 10**20])
def test_format_offset_out_of_range(seq: int) -> None:
    """Negative sequence numbers and ones with more than 16 digits are refused."""
    with pytest.raises(ValueError):
        format_offset(seq)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0000000000000000", 0),
        ("0000000000000042", 42),
        ("9999999999999999", MAX_SEQ),
        ("-1", START),
        ("now", TAIL),
    ],
)
def test_parse_offset_valid(text: str, expected: int) -> None:
    """16 ASCII digits, "-1" and "now" are the valid offsets."""
    assert parse_offset(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "-2",
        "0" * 17,
        "0" * 15,
        "../",
        "",
        "１２",
        "１" * 16,
        "٠" * 16,
        " 0000000000000001",
        "0000000000000001 ",
        "0000000000000001\n",
        "+000000000000001",
        "-000000000000001",
        "0x00000000000001",
        "0000_00000000001",
        "-01",
        "-1 ",
        "NOW",
        "Now",
        "now\n",
        "0000000000000001/../x",
    ],
)
def test_parse_offset_invalid(text: str) -> None:
    """Everything else is OffsetError with code invalid_offset."""
    with pytest.raises(OffsetError) as info:
        parse_offset(text)
    assert info.value.code == "invalid_offset"
    assert info.value.detail
    assert isinstance(info.value, ValueError)


def test_offset_error_detail_is_bounded() -> None:
    """The error detail quotes only the start of a huge bad offset."""
    with pytest.raises(OffsetError) as info:
        parse_offset("x" * 10_000)
    assert len(info.value.detail) < 200


@given(st.integers(0, MAX_SEQ))
def test_offset_roundtrip(seq: int) -> None:
    """parse_offset(format_offset(seq)) == seq for every valid seq."""
    text = format_offset(seq)
    assert len(text) == OFFSET_DIGITS
    assert parse_offset(text) == seq


@given(st.integers(0, MAX_SEQ), st.integers(0, MAX_SEQ))
def test_offsets_compare_as_strings(a: int, b: int) -> None:
    """String order of formatted offsets is numeric order."""
    assert (format_offset(a) < format_offset(b)) == (a < b)


def test_etag_for_chunk() -> None:
    """The ETag names the chunk (X, next] with formatted offsets, in double quotes."""
    assert etag_for_chunk(0, 42) == '"events:0000000000000000:0000000000000042"'
    assert etag_for_chunk(42, 42) == '"events:0000000000000042:0000000000000042"'


@pytest.mark.parametrize(("start", "next_"), [(START, 1), (TAIL, 1), (0, MAX_SEQ + 1)])
def test_etag_needs_resolved_positions(start: int, next_: int) -> None:
    """START, TAIL and out-of-range positions cannot name a chunk."""
    with pytest.raises(ValueError):
        etag_for_chunk(start, next_)


# -- cursors --------------------------------------------------------------------------


def test_cursor_epoch() -> None:
    """CURSOR_EPOCH is 2024-10-09T00:00:00Z and an interval is 20 s."""
    assert datetime(2024, 10, 9, tzinfo=UTC).timestamp() == CURSOR_EPOCH
    assert CURSOR_INTERVAL == 20


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (CURSOR_EPOCH, 0),
        (CURSOR_EPOCH + 19.999, 0),
        (CURSOR_EPOCH + 20, 1),
        (CURSOR_EPOCH + 39.99999, 1),
        (CURSOR_EPOCH + 40.0, 2),
        (NOW, 1000),
        (CURSOR_EPOCH - 0.5, -1),
    ],
)
def test_current_cursor(now: float, expected: int) -> None:
    """The cursor is floor((now - epoch) / 20)."""
    assert current_cursor(now) == expected


@pytest.mark.parametrize(("text", "expected"), [("0", 0), ("1000", 1000), ("9" * 19, 10**19 - 1)])
def test_parse_cursor_valid(text: str, expected: int) -> None:
    """A cursor is 1 to 19 ASCII digits."""
    assert parse_cursor(text) == expected


@pytest.mark.parametrize("text", ["", "9" * 20, "-1", "+1", " 1", "1 ", "1.0", "１", "1_000", "x"])
def test_parse_cursor_invalid(text: str) -> None:
    """Everything else is CursorError with code invalid_cursor."""
    with pytest.raises(CursorError) as info:
        parse_cursor(text)
    assert info.value.code == "invalid_cursor"
    assert info.value.detail
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("client", "step", "expected"),
    [
        (None, 2, 1000),
        (0, 2, 1000),
        (999, 2, 1000),
        (1000, 1, 1001),
        (1000, 3, 1003),
        (1005, 2, 1007),
    ],
)
def test_next_cursor_rule(client: int | None, step: int, expected: int) -> None:
    """Older or missing cursors get the current one; others get theirs plus 1-3 intervals."""
    calls: list[tuple[int, int]] = []

    def jitter(low: int, high: int) -> int:
        calls.append((low, high))
        return step

    assert next_cursor(client, NOW, jitter) == expected
    if client is not None and client >= 1000:
        assert calls == [(1, 3)]
    else:
        assert calls == []


def test_next_cursor_rejects_bad_jitter() -> None:
    """A jitter function returning outside 1..3 is a programming error."""
    with pytest.raises(ValueError):
        next_cursor(1000, NOW, lambda low, high: 0)


@given(st.none() | st.integers(0, 10**19), st.integers(0, 10**6))
def test_next_cursor_always_moves_on(client: int | None, seed: int) -> None:
    """The answer is never older than now, and always newer than a current or future client."""
    answer = next_cursor(client, NOW, random.Random(seed).randint)
    assert answer >= current_cursor(NOW)
    if client is not None and client >= current_cursor(NOW):
        assert client + 1 <= answer <= client + 3
