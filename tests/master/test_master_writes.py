"""The write routes as plain twisted.web resources, and the master's access log modes.

The answers of the writes are covered by test_master_api.py (every route, every bad input); here
is what the move from Klein could have changed: other methods, path forms, framing, unexpected
errors, a client that leaves before the commit; then ``[master] access_log``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from support import (
    Client,
    assert_no_errors_logged,
    captured_log,
    master_settings,
    start_master,
    wait_until,
)
from test_events import any_event
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import formatEvent

from edgeauth.config import ConfigError
from edgeauth.events import (
    Event,
    encode_event,
    event_to_dict,
)
from edgeauth.master import writes
from edgeauth.master.answers import json_answer
from edgeauth.master.log import LogRecord
from edgeauth.master.writes import WRITES

BAN = {"ip": "192.0.2.1", "reason": "writes test"}
ACCESS_LINE = '"POST /ban/ip HTTP/1.1" 201'
TOKEN = "operator-token-for-tests"


def appended(master: Any, kind: str = "ip_banned") -> float:
    value = master.service.metrics.registry.get_sample_value(
        "edgeauth_master_events_appended_total", {"type": kind}
    )
    return float(value or 0.0)


def messages(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) or "" for e in events]


class OnePost(Protocol):
    """Sends one request and keeps what comes back."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


def raw_request(
    method: str, path: str, body: bytes | None = None, token: str | None = TOKEN
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


async def exchange(master: Any, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one raw request; return status, headers (lower-case names) and the raw body."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", master.port)
    protocol = await connectProtocol(endpoint, OnePost(request))
    await protocol.lost.addTimeout(5, reactor)
    head, _, body = protocol.received.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}
    return int(status.split()[1]), headers, body


@pytest_twisted.ensureDeferred
async def test_other_methods_get_405_json_with_allow_post(tmp_path: Path) -> None:
    """GET, HEAD, PUT, DELETE, OPTIONS, PATCH on a write path: 405, Allow: POST, JSON body."""
    master = await start_master(tmp_path)
    try:
        for path in WRITES:
            for method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"):
                status, headers, body = await exchange(master, raw_request(method, path.decode()))
                assert status == 405, (method, path)
                assert headers["allow"] == "POST"
                assert headers["content-type"] == "application/json"
                assert headers["cache-control"] == "no-store"
                assert headers["content-length"] == "65"
                expected = b'{"error":"method_not_allowed","detail":"method not allowed here"}'
                assert body == (b"" if method == "HEAD" else expected)
        assert master.service.log.tail == 0
    finally:
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_path_forms_match_as_klein_matched_them(tmp_path: Path) -> None:
    """Runs of slashes are merged and a query is ignored; a trailing slash is another route."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    try:
        assert (await client.post("//ban/ip", BAN)).code == 201
        assert (await client.post("/ban//ip?x=1", BAN)).code == 201
        reply = await client.post("/ban/ip/", BAN)
        assert reply.code == 404 and reply.json()["error"] == "not_found"
        assert master.service.log.tail == 2
    finally:
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_error_answers_carry_their_length(tmp_path: Path) -> None:
    """Error answers of the writes are sent with Content-Length, not chunked."""
    master = await start_master(tmp_path)
    try:
        body = b'{"ip": "203.0.113.1"}'
        status, headers, answer = await exchange(master, raw_request("POST", "/ban/ip", body, None))
        assert status == 401 and headers["www-authenticate"] == 'Bearer realm="edgeauth"'
        assert headers["content-length"] == str(len(answer)) and "transfer-encoding" not in headers
        status, headers, answer = await exchange(master, raw_request("POST", "/unban/ip", body))
        assert status == 404 and b'"not_banned"' in answer
        assert headers["content-length"] == str(len(answer)) and "transfer-encoding" not in headers
        status, headers, answer = await exchange(master, raw_request("POST", "/ban/ip", body))
        assert status == 201 and headers["content-length"] == str(len(answer))
    finally:
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_unexpected_errors_are_json_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception the code did not foresee answers JSON 500 and is logged; nothing appended."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("unforeseen")

    master = await start_master(tmp_path)
    client = Client(master.url)
    try:
        monkeypatch.setattr(writes, "event_from_request", broken)
        with captured_log() as logged:
            reply = await client.post("/ban/ip", BAN)
        assert reply.code == 500
        assert reply.json() == {"error": "internal_error", "detail": "unexpected error"}
        assert b"unforeseen" not in reply.body
        failures = [e for e in logged if "log_failure" in e]
        assert len(failures) == 1 and "unexpected error in" in messages(failures)[0]
        assert master.service.log.tail == 0
    finally:
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_client_gone_before_the_commit_still_gets_its_audit_line(tmp_path: Path) -> None:
    """A write whose client left before the commit is committed, counted and logged once."""
    master = await start_master(tmp_path)
    event_log = master.service.log
    real_append = event_log.append_record  # what the write resources call
    held: list[tuple[Deferred[LogRecord], Deferred[LogRecord]]] = []

    def append(event: Event) -> Deferred[LogRecord]:
        answer: Deferred[LogRecord] = Deferred()
        held.append((real_append(event), answer))
        return answer

    event_log.append_record = append  # type: ignore[method-assign]
    request = raw_request("POST", "/ban/ip", b'{"ip": "192.0.2.77", "reason": "gone"}')
    try:
        with captured_log() as logged:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", master.port)
            client = await connectProtocol(endpoint, OnePost(request))
            await wait_until(lambda: bool(held), "the write to reach the log")
            client.transport.abortConnection()
            await deferLater(reactor, 0.1, lambda: None)  # the master sees the disconnect
            for committed, answer in held:
                committed.chainDeferred(answer)
            await wait_until(lambda: appended(master) == 1, "the append to be counted")
            await deferLater(reactor, 0.05, lambda: None)
        audit = [m for m in messages(logged) if m.startswith("ip_banned ip=192.0.2.77/32")]
        assert audit == ["ip_banned ip=192.0.2.77/32 by operator:ops (seq 1)"]
        assert client.received == b""
        assert event_log.tail == 1
        assert_no_errors_logged(logged)
    finally:
        await master.stop()


# --- the 201 answer and the audit line's summary, built without a second encoding -------------


def _summary_of_dict(doc: dict[str, Any]) -> str:
    """The summary as it was built before: from the event's JSON object."""
    for key in ("ip", "jti", "sub"):
        if key in doc:
            return f"{key}={doc[key]}"
    return ",".join(
        f"{key}={doc[key]}" for key in ("tags", "keys", "prefixes", "all") if doc.get(key)
    )


class _Answer:
    """Collects what json_answer sets on a request."""

    def __init__(self) -> None:
        self.code = 0
        self.headers: dict[bytes, bytes] = {}

    def setResponseCode(self, code: int) -> None:  # noqa: N802 - the IRequest name
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:  # noqa: N802 - the IRequest name
        self.headers[name] = value


@settings(max_examples=500)
@given(any_event)
def test_answer_and_summary_match_those_built_from_the_json_object(event: Event) -> None:
    """201 body, headers and audit summary are those the event's JSON object gave before."""
    record = LogRecord(event.seq, encode_event(event), event)
    doc = event_to_dict(event)
    before, after = _Answer(), _Answer()
    expected = json_answer(before, 201, {"event": doc, "offset": f"{event.seq:016d}"})
    assert writes.encoded_json_answer(after, 201, writes._answer_body(record)) == expected
    assert (after.code, after.headers) == (before.code, before.headers)
    assert writes._summary(event) == _summary_of_dict(doc)


@settings(max_examples=1000)
@given(st.one_of(st.binary(max_size=8), st.binary(max_size=7).map(lambda b: b"{" + b)))
def test_body_encoding_is_that_json_detects(raw: bytes) -> None:
    """The shortcut for bodies that open with "{" picks what json.detect_encoding picks."""
    assert writes._encoding_of(raw) == json.detect_encoding(raw)


# --- [master] access_log -------------------------------------------------------------------------


async def post_and_read(master: Any, count: int = 1) -> None:
    client = Client(master.url)
    try:
        for i in range(count):
            assert (await client.post("/ban/ip", {"ip": f"192.0.2.{i + 1}"})).code == 201
        assert (await client.get("/status")).code == 200
    finally:
        await client.close()


@pytest.mark.parametrize("configured", [{}, {"access_log": "off"}], ids=["default", "off"])
@pytest_twisted.ensureDeferred
async def test_access_log_off_keeps_the_audit_line(
    tmp_path: Path, configured: dict[str, str]
) -> None:
    """off, the default as on the edge: no access lines anywhere; each write's audit line stays."""
    assert master_settings(tmp_path, **configured).master.access_log == "off"
    master = await start_master(tmp_path, **configured)
    try:
        with captured_log() as logged:
            await post_and_read(master)
        lines = messages(logged)
        assert not any("HTTP/1.1" in m for m in lines), lines
        assert any(m == "ip_banned ip=192.0.2.1/32 by operator:ops (seq 1)" for m in lines), lines
    finally:
        await master.stop()
    assert sorted(p.name for p in tmp_path.iterdir() if "access" in p.name) == []


@pytest_twisted.ensureDeferred
async def test_access_log_twistd(tmp_path: Path) -> None:
    """access_log = twistd: each request is a line in the process log, as twisted.web writes it."""
    master = await start_master(tmp_path, access_log="twistd")
    try:
        with captured_log() as logged:
            await post_and_read(master)
        lines = messages(logged)
        assert any(ACCESS_LINE in m for m in lines), lines
        assert any('"GET /status HTTP/1.1" 200' in m for m in lines), lines
    finally:
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_access_log_buffered_writes_the_file_by_stop(tmp_path: Path) -> None:
    """access_log = buffered: Combined Log Format lines in the file, none in the process log."""
    path = tmp_path / "access.log"
    master = await start_master(tmp_path, access_log="buffered", access_log_path=str(path))
    try:
        with captured_log() as logged:
            await post_and_read(master, 3)
        assert not any("HTTP/1.1" in m for m in messages(logged))
    finally:
        await master.stop()  # writes the last batch before it returns
    lines = path.read_text().splitlines()
    assert len(lines) == 4, lines
    assert all(ACCESS_LINE in line for line in lines[:3])
    assert '"GET /status HTTP/1.1" 200' in lines[3]
    assert lines[0].startswith('"127.0.0.1" - - [')


@pytest_twisted.ensureDeferred
async def test_access_log_sampled_keeps_one_in_n(tmp_path: Path) -> None:
    """access_log = sampled: the first request, then one in access_log_sample."""
    path = tmp_path / "access.log"
    master = await start_master(
        tmp_path, access_log="sampled", access_log_path=str(path), access_log_sample=2
    )
    try:
        await post_and_read(master, 5)  # 6 requests: the 1st, 3rd and 5th are logged
    finally:
        await master.stop()
    assert len(path.read_text().splitlines()) == 3


@pytest.mark.parametrize("mode", ["buffered", "sampled"])
def test_access_log_needs_a_path(tmp_path: Path, mode: str) -> None:
    """Modes buffered and sampled without access_log_path: a ConfigError naming the key."""
    with pytest.raises(ConfigError) as raised:
        master_settings(tmp_path, access_log=mode)
    assert "[master] access_log_path" in str(raised.value)
    assert f"required when access_log = {mode}" in str(raised.value)


def test_access_log_rejects_unknown_modes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        master_settings(tmp_path, access_log="verbose")
    assert "twistd, off, buffered, sampled" in str(raised.value)
