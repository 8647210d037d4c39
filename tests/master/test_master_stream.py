"""The event stream of PROTOCOL.md §4 and the snapshot of §5, on a real master over real HTTP."""

from __future__ import annotations

import gc
import gzip
import json
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from support import (
    EDGE_TOKEN,
    OPERATOR_TOKEN,
    READER_TOKEN,
    STREAM,
    Client,
    RawStream,
    Reply,
    SSEReader,
    assert_no_errors_logged,
    auth,
    captured_log,
    connect_raw,
    counter,
    data_events,
    gauge,
    open_live_sse,
    post_bans,
    sse_request,
    start_master,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.web.http_headers import Headers

from edgeauth.wire.offsets import current_cursor, format_offset
from edgeauth.wire.sse import SSEComment, SSERetry

CATCH_UP_CACHE = "max-age=60, stale-while-revalidate=300"


# --- helpers -------------------------------------------------------------------------------------


def off(seq: int) -> str:
    return format_offset(seq)


async def raw_get(
    client: Client, path: str, headers: dict[str, str] | None = None, method: bytes = b"GET"
) -> Reply:
    """Send a request through the bare Agent, so the URL bytes go out exactly as given."""
    all_headers = {**auth(), **(headers or {})}
    response = await client.agent.request(
        method,
        (client.base_url + path).encode("ascii"),
        Headers({k: [v] for k, v in all_headers.items()}),
    )
    body = await treq.content(response)
    return Reply(response.code, response.headers, body)


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``condition`` on the reactor every 10 ms; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


async def scrape(client: Client, name: str, **labels: str) -> float:
    """Read one sample from ``GET /metrics`` (operator token)."""
    reply = await client.get("/metrics")
    assert reply.code == 200
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                return float(s.value)
    raise AssertionError(f"{name} {labels} is not in /metrics")


def controls(reader: SSEReader) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in reader.events if e.event == "control"]


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.code == status, (reply.code, reply.body)
    assert reply.header("Content-Type") == "application/json"
    doc = reply.json()
    assert doc["error"] == code
    assert isinstance(doc["detail"], str) and doc["detail"]
    return dict(doc)


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


# --- 4.1 catch-up --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_catch_up_from_start_returns_everything(tmp_path: Path) -> None:
    """offset=-1 returns every event with the offset, up-to-date, ETag, cache and log-id headers."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    try:
        posted = await post_bans(client, 4)
        reply = await client.get(f"{STREAM}?offset=-1")
        assert reply.code == 200
        assert reply.header("Content-Type") == "application/json"
        assert reply.json() == posted
        assert reply.header("Stream-Next-Offset") == off(4)
        assert reply.header("Stream-Up-To-Date") == "true"
        assert reply.header("ETag") == f'"events:{off(0)}:{off(4)}"'
        assert reply.header("Cache-Control") == f"private, {CATCH_UP_CACHE}"
        assert reply.header("Edgeauth-Log-Id") == master.service.log.log_id
        assert master.service.log.log_id

        middle = await client.get(f"{STREAM}?offset={off(2)}")
        assert [e["seq"] for e in middle.json()] == [3, 4]
        assert middle.header("ETag") == f'"events:{off(2)}:{off(4)}"'
    finally:
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_public_cache_control_when_configured(tmp_path: Path) -> None:
    """stream_cache=public makes catch-up chunks publicly cacheable."""
    master = await start_master(tmp_path, stream_cache="public")
    client = Client(master.url)
    try:
        await post_bans(client, 1)
        reply = await client.get(f"{STREAM}?offset=-1")
        assert reply.code == 200
        assert reply.header("Cache-Control") == f"public, {CATCH_UP_CACHE}"
    finally:
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_catch_up_in_batches_follows_next_offset_without_gaps(tmp_path: Path) -> None:
    """With max_batch=3, 10 events come in chunks 3/3/3/1; only the last one is up to date."""
    master = await start_master(tmp_path, max_batch=3)
    client = Client(master.url)
    try:
        posted = await post_bans(client, 10)
        offset = "-1"
        seen: list[dict[str, Any]] = []
        sizes = []
        while True:
            reply = await client.get(f"{STREAM}?offset={offset}")
            assert reply.code == 200
            chunk = reply.json()
            sizes.append(len(chunk))
            start = 0 if offset == "-1" else int(offset)
            assert [e["seq"] for e in chunk] == list(range(start + 1, start + 1 + len(chunk)))
            seen.extend(chunk)
            next_offset = reply.header("Stream-Next-Offset")
            assert next_offset == off(chunk[-1]["seq"])
            assert reply.header("ETag") == f'"events:{off(start)}:{next_offset}"'
            if reply.header("Stream-Up-To-Date") == "true":
                break
            assert len(sizes) < 10, "never reached the tail"
            offset = next_offset
        assert sizes == [3, 3, 3, 1]
        assert seen == posted

        at_tail = await client.get(f"{STREAM}?offset={off(10)}")
        assert at_tail.code == 200
        assert at_tail.json() == []
        assert at_tail.header("Stream-Next-Offset") == off(10)
        assert at_tail.header("Stream-Up-To-Date") == "true"
    finally:
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_if_none_match_gives_304_without_body(tmp_path: Path) -> None:
    """Repeating a chunk request with its ETag in If-None-Match gives 304 and no body."""
    master = await start_master(tmp_path, max_batch=2)
    client = Client(master.url)
    try:
        await post_bans(client, 3)
        first = await client.get(f"{STREAM}?offset={off(0)}")
        etag = first.header("ETag")
        assert etag == f'"events:{off(0)}:{off(2)}"'
        again = await client.get(f"{STREAM}?offset={off(0)}", headers={"If-None-Match": etag})
        assert again.code == 304
        assert again.body == b""
        assert again.header("ETag") == etag
        other = await client.get(
            f"{STREAM}?offset={off(0)}", headers={"If-None-Match": '"events:x:y"'}
        )
        assert other.code == 200
        assert [e["seq"] for e in other.json()] == [1, 2]
    finally:
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_offset_now_is_empty_at_tail(tmp_path: Path) -> None:
    """offset=now answers an empty array at the tail, up to date."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    try:
        await post_bans(client, 3)
        reply = await client.get(f"{STREAM}?offset=now")
        assert reply.code == 200
        assert reply.json() == []
        assert reply.header("Stream-Next-Offset") == off(3)
        assert reply.header("Stream-Up-To-Date") == "true"
        assert reply.header("ETag") == f'"events:{off(3)}:{off(3)}"'
    finally:
        await client.close()
        await master.stop()


# --- offsets -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_invalid_offsets_are_400(tmp_path: Path) -> None:
    """Anything but 16 digits, -1 or now is 400 invalid_offset, as JSON, with the log id."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    try:
        await post_bans(client, 2)
        for bad in ["abc", "-2", "1" * 17, "../", "%2e%2e%2f", "", "+000000000000001", "1"]:
            for live in ("", "&live=long-poll", "&live=sse"):
                reply = await raw_get(client, f"{STREAM}?offset={bad}{live}")
                assert_error(reply, 400, "invalid_offset")
                assert reply.header("Edgeauth-Log-Id") == master.service.log.log_id
                assert reply.header("Cache-Control") == "no-store"
    finally:
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_offset_past_tail_is_400(tmp_path: Path) -> None:
    """An offset beyond the tail is 400 offset_out_of_range."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    try:
        await post_bans(client, 2)
        assert (await client.get(f"{STREAM}?offset={off(2)}")).code == 200
        for mode in ("", "&live=long-poll", "&live=sse"):
            reply = await client.get(f"{STREAM}?offset={off(3)}{mode}")
            assert_error(reply, 400, "offset_out_of_range")
    finally:
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_offset_before_retention_is_410(tmp_path: Path) -> None:
    """With retention_events=5 after 10 events, an older offset is 410 offset_expired."""
    master = await start_master(tmp_path, retention_events=5)
    client = Client(master.url)
    try:
        await post_bans(client, 10)
        await master.service._compact()
        assert master.service.log.earliest == 6
        for mode in ("", "&live=long-poll", "&live=sse"):
            reply = await client.get(f"{STREAM}?offset={off(4)}{mode}")
            doc = assert_error(reply, 410, "offset_expired")
            assert doc["earliest"] == off(5)
        oldest = await client.get(f"{STREAM}?offset={off(5)}")
        assert [e["seq"] for e in oldest.json()] == [6, 7, 8, 9, 10]
        start = await client.get(f"{STREAM}?offset=-1")
        assert [e["seq"] for e in start.json()] == [6, 7, 8, 9, 10]
        assert start.header("ETag") == f'"events:{off(5)}:{off(10)}"'
    finally:
        await client.close()
        await master.stop()


# --- 4.2 long-poll -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_long_poll_times_out_with_204(tmp_path: Path) -> None:
    """At the tail a long-poll waits long_poll_timeout, then 204 with no-store and a cursor."""
    master = await start_master(tmp_path, long_poll_timeout=0.3)
    client = Client(master.url)
    try:
        await post_bans(client, 2)
        started = reactor.seconds()
        cursor_before = current_cursor(started)
        reply = await client.get(f"{STREAM}?offset={off(2)}&live=long-poll")
        elapsed = reactor.seconds() - started
        assert reply.code == 204
        assert reply.body == b""
        assert elapsed >= 0.29
        assert reply.header("Cache-Control") == "no-store"
        assert reply.header("Stream-Next-Offset") == off(2)
        assert reply.header("Stream-Up-To-Date") == "true"
        assert reply.header("Edgeauth-Log-Id") == master.service.log.log_id
        cursor = int(reply.header("Stream-Cursor") or "")
        assert cursor_before <= cursor <= current_cursor(reactor.seconds())
        assert gauge(master, "long_poll") == 0
        assert master.service.fanout.waiters == set()
    finally:
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_long_poll_answers_at_once_when_behind(tmp_path: Path) -> None:
    """With events after X a long-poll answers 200 at once, as a catch-up, plus Stream-Cursor."""
    master = await start_master(tmp_path, long_poll_timeout=30)
    client = Client(master.url)
    try:
        posted = await post_bans(client, 3)
        pending = Deferred.fromCoroutine(client.get(f"{STREAM}?offset={off(1)}&live=long-poll"))
        reply = await pending.addTimeout(3, reactor)
        assert reply.code == 200
        assert reply.json() == posted[1:]
        assert reply.header("Stream-Next-Offset") == off(3)
        assert reply.header("Stream-Up-To-Date") == "true"
        assert reply.header("Stream-Cursor") is not None
        assert reply.header("ETag") == f'"events:{off(1)}:{off(3)}"'
        assert reply.header("Cache-Control") == f"private, {CATCH_UP_CACHE}"
    finally:
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_long_poll_cursor_rule(tmp_path: Path) -> None:
    """A cursor not older than now gets a strictly larger one (1-3 ahead); an old one gets now."""
    master = await start_master(tmp_path, long_poll_timeout=30)
    client = Client(master.url)
    try:
        await post_bans(client, 1)

        async def cursor_for(query: str) -> tuple[int, int, int]:
            before = current_cursor(reactor.seconds())
            reply = await client.get(f"{STREAM}?offset={off(0)}&live=long-poll{query}")
            assert reply.code == 200
            after = current_cursor(reactor.seconds())
            return before, int(reply.header("Stream-Cursor") or ""), after

        before, got, after = await cursor_for("")
        assert before <= got <= after

        before, got, after = await cursor_for(f"&cursor={before - 7}")
        assert before <= got <= after

        ahead = []
        for _ in range(20):
            before, got, after = await cursor_for(f"&cursor={before}")
            assert before < got <= before + 3
            ahead.append(got - before)
        assert len(set(ahead)) > 1  # a random step, not a constant

        future = current_cursor(reactor.seconds()) + 50
        _, got, _ = await cursor_for(f"&cursor={future}")
        assert future < got <= future + 3
    finally:
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_long_poll_invalid_cursor_is_400(tmp_path: Path) -> None:
    """A cursor that is not 1-19 ASCII digits is 400 invalid_cursor."""
    master = await start_master(tmp_path, long_poll_timeout=0.3)
    client = Client(master.url)
    try:
        for bad in ["abc", "-1", "1" * 20, "1.5", "%20"]:
            reply = await raw_get(client, f"{STREAM}?offset=now&live=long-poll&cursor={bad}")
            assert_error(reply, 400, "invalid_cursor")
        assert gauge(master, "long_poll") == 0
    finally:
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_errors_are_counted_under_the_mode_asked_for(tmp_path: Path) -> None:
    """Refused stream requests are counted in stream_requests_total under their live= mode."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    try:
        assert (await client.get(f"{STREAM}?offset=now&live=long-poll&cursor=x")).code == 400
        for _ in range(2):
            assert (await client.get(f"{STREAM}?offset=zz&live=sse")).code == 400
        assert (await client.get(f"{STREAM}?offset=zz")).code == 400
        name = "edgeauth_master_stream_requests_total"
        assert await scrape(client, name, mode="long_poll", status="400") == 1
        assert await scrape(client, name, mode="sse", status="400") == 2
        assert await scrape(client, name, mode="catch_up", status="400") == 1
    finally:
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_long_poll_client_gone_is_forgotten(tmp_path: Path) -> None:
    """A long-poll whose client disconnects is removed from the waiters at once."""
    master = await start_master(tmp_path, long_poll_timeout=30)
    raw: RawStream | None = None
    try:
        raw = await connect_raw(
            master, RawStream(sse_request(EDGE_TOKEN, "offset=now&live=long-poll"))
        )
        await wait_until(lambda: gauge(master, "long_poll") == 1, "the long-poll to wait")
        raw.transport.abortConnection()
        await wait_until(lambda: gauge(master, "long_poll") == 0, "the waiter to be forgotten")
        assert master.service.fanout.waiters == set()
    finally:
        if raw is not None and raw.transport is not None:
            raw.transport.abortConnection()
        await master.stop()


# --- HEAD and writes -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_head_gives_tail_without_body(tmp_path: Path) -> None:
    """HEAD answers 200 with Stream-Next-Offset at the tail, no-store and no body."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    try:
        empty = await client.request("HEAD", STREAM)
        assert empty.code == 200
        assert empty.header("Stream-Next-Offset") == off(0)
        await post_bans(client, 3)
        reply = await client.request("HEAD", STREAM)
        assert reply.code == 200
        assert reply.body == b""
        assert reply.header("Stream-Next-Offset") == off(3)
        assert reply.header("Cache-Control") == "no-store"
        assert reply.header("Edgeauth-Log-Id") == master.service.log.log_id
    finally:
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_writes_to_the_stream_are_405(tmp_path: Path) -> None:
    """POST, PUT, DELETE and PATCH on the stream path are 405 JSON; nothing is appended."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    try:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            reply = await client.request(
                method, STREAM, json_body={"ip": "192.0.2.1", "reason": "x"}
            )
            assert_error(reply, 405, "method_not_allowed")
            assert reply.header("Allow") == "GET, HEAD"
        assert master.service.log.tail == 0
    finally:
        await client.close()
        await master.stop()


# --- 4.3 live SSE --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sse_headers_and_no_compression(tmp_path: Path) -> None:
    """SSE is text/event-stream, no-store and never compressed, even when gzip is accepted."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    reader: SSEReader | None = None
    try:
        reader = await SSEReader.open(
            client.agent,
            f"{master.url}{STREAM}?offset=now&live=sse",
            {**auth(EDGE_TOKEN), "Accept-Encoding": "gzip"},
        )
        assert reader.response is not None
        headers = reader.response.headers
        assert reader.response.code == 200
        assert headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
        assert headers.getRawHeaders(b"cache-control") == [b"no-store"]
        assert not headers.hasHeader(b"content-encoding")
        assert headers.getRawHeaders(b"edgeauth-log-id") == [master.service.log.log_id.encode()]
        await reader.wait_for(lambda r: len(r.events) >= 1)
        assert reader.raw.startswith(b":")
        assert controls(reader)[0] == {
            "streamNextOffset": off(0),
            "streamCursor": controls(reader)[0]["streamCursor"],
            "upToDate": True,
        }
        await post_bans(client, 1)
        await reader.wait_for(lambda r: len(data_events(r)) == 1)
        assert not reader.ended
    finally:
        if reader is not None:
            reader.close()
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_sse_catch_up_then_live_in_order(tmp_path: Path) -> None:
    """SSE from an old offset replays in batches then goes live: data then control per commit."""
    master = await start_master(tmp_path, max_batch=2)
    client = Client(master.url)
    reader: SSEReader | None = None
    try:
        posted = await post_bans(client, 5)
        reader = await SSEReader.open(
            client.agent, f"{master.url}{STREAM}?offset={off(1)}&live=sse", auth(EDGE_TOKEN)
        )
        await reader.wait_for(lambda r: len(data_events(r)) == 4)
        posted += await post_bans(client, 2, first=6)
        await reader.wait_for(lambda r: len(data_events(r)) == 6)
        assert data_events(reader) == posted[1:]

        names = [e.event for e in reader.events]
        for index, event in enumerate(reader.events):
            if event.event != "data":
                continue
            assert names[index + 1] == "control"
            last = json.loads(event.data)[-1]["seq"]
            assert json.loads(reader.events[index + 1].data)["streamNextOffset"] == off(last)
        catch_up_offsets = [c["streamNextOffset"] for c in controls(reader)]
        # batches (1,3], (3,5], the lone control at the tail, then one per live commit
        assert catch_up_offsets == [off(3), off(5), off(5), off(6), off(7)]
        assert controls(reader)[-1]["upToDate"] is True
        assert controls(reader)[2]["upToDate"] is True
        cursor = current_cursor(reactor.seconds())
        assert all(abs(int(c["streamCursor"]) - cursor) <= 1 for c in controls(reader))
        assert not reader.ended
    finally:
        if reader is not None:
            reader.close()
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_sse_pings_during_silence(tmp_path: Path) -> None:
    """With ping_interval=0.2 a quiet SSE stream receives ``: ping`` comments."""
    master = await start_master(tmp_path, ping_interval=0.2)
    client = Client(master.url)
    reader: SSEReader | None = None
    try:
        started = reactor.seconds()
        reader = await open_live_sse(client)
        await reader.wait_for(lambda r: r.items.count(SSEComment("ping")) >= 2, timeout=3)
        assert reactor.seconds() - started >= 0.39  # two full intervals of silence
        assert not reader.ended
    finally:
        if reader is not None:
            reader.close()
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_sse_cycling_ends_the_response_and_connection(tmp_path: Path) -> None:
    """sse_cycle=0.5 ends the response, closes the connection and counts it in /metrics."""
    master = await start_master(tmp_path, sse_cycle=0.5, ping_interval=30)
    client = Client(master.url)
    reader: SSEReader | None = None
    raw: RawStream | None = None
    try:
        with captured_log() as logged:
            before = await scrape(client, "edgeauth_master_sse_cycled_total")
            assert before == 0
            started = reactor.seconds()
            reader = await open_live_sse(client)
            raw = await connect_raw(master, RawStream(sse_request(EDGE_TOKEN)))
            await reader.wait_for(lambda r: r.ended, timeout=3)
            assert reader.ended
            assert reactor.seconds() - started >= 0.44  # 0.5 s - 10 % jitter
            # the server closes the connection itself, after a complete chunked body
            await raw.lost.addTimeout(3, reactor)
            assert bytes(raw.received).endswith(b"0\r\n\r\n")
            await wait_until(lambda: gauge(master) == 0, "cycled subscribers to leave")
            after = await scrape(client, "edgeauth_master_sse_cycled_total")
            assert after == before + 2
        assert_no_errors_logged(logged)
    finally:
        if reader is not None:
            reader.close()
        if raw is not None and raw.transport is not None:
            raw.transport.abortConnection()
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_quiet_sse_survives_http_idle_timeout(tmp_path: Path) -> None:
    """With http_timeout=0.3 and no pings, an SSE stream quiet for 0.8 s still gets a ban."""
    master = await start_master(tmp_path, http_timeout=0.3, ping_interval=30)
    client = Client(master.url)
    reader: SSEReader | None = None
    try:
        # the idle timeout is really in force: a connection that sends nothing is closed
        idle = await connect_raw(master, RawStream(b""))
        await idle.lost.addTimeout(3, reactor)

        reader = await open_live_sse(client)
        await reader.wait_for(lambda r: len(controls(r)) == 1)
        received = len(reader.raw)
        await deferLater(reactor, 0.8, lambda: None)
        assert not reader.ended
        assert len(reader.raw) == received  # really quiet: no ping, nothing
        ban = await client.post("/ban/ip", {"ip": "203.0.113.9", "reason": "late"})
        assert ban.code == 201
        await reader.wait_for(lambda r: len(data_events(r)) == 1)
        assert data_events(reader)[0]["ip"] == "203.0.113.9/32"
        assert not reader.ended
    finally:
        if reader is not None:
            reader.close()
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_slow_consumer_is_disconnected(tmp_path: Path) -> None:
    """A reader that never drains is dropped past max_subscriber_buffer; others get everything."""
    master = await start_master(
        tmp_path, max_subscriber_buffer=65536, max_body=300_000, ping_interval=30
    )
    client = Client(master.url)
    reader: SSEReader | None = None
    slow: RawStream | None = None
    try:
        reader = await open_live_sse(client)
        await reader.wait_for(lambda r: len(controls(r)) == 1)
        slow = await connect_raw(master, RawStream(sse_request(EDGE_TOKEN), read=False))
        await wait_until(
            lambda: (
                len(master.service.fanout.subscribers) == 2
                and all(s.live for s in master.service.fanout.subscribers)
            ),
            "both subscribers to be live",
        )
        assert gauge(master) == 2

        keys = [f"/k/{i:04d}/" + "x" * 990 for i in range(250)]  # about 250 KB per event
        posted = 0
        sent_bytes = 0
        while counter(master, "edgeauth_master_slow_consumers_disconnected_total") < 1:
            assert sent_bytes < 40_000_000, "the slow reader was never disconnected"
            reply = await client.post("/invalidate", {"keys": keys, "tags": [f"t{posted}"]})
            assert reply.code == 201, reply.body
            posted += 1
            sent_bytes += 250_000
        # its chunks went through the fan-out's direct send until its socket filled up
        assert master.service.fanout.partial_sends >= 1
        # a few more after the drop: the master carries on as usual
        for _ in range(3):
            reply = await client.post("/invalidate", {"keys": keys, "tags": [f"t{posted}"]})
            assert reply.code == 201
            posted += 1

        await reader.wait_for(lambda r: len(data_events(r)) == posted, timeout=10)
        assert [e["tags"] for e in data_events(reader)] == [[f"t{i}"] for i in range(posted)]
        assert [e["seq"] for e in data_events(reader)] == list(range(1, posted + 1))
        assert not reader.ended

        await wait_until(lambda: gauge(master) == 1, "the slow subscriber to be gone")
        assert len(master.service.fanout.subscribers) == 1
        assert await scrape(client, "edgeauth_master_slow_consumers_disconnected_total") >= 1
        reader.close()
        await wait_until(lambda: gauge(master) == 0, "the subscriber gauge to reach 0")
    finally:
        if reader is not None:
            reader.close()
        if slow is not None and slow.transport is not None:
            slow.transport.abortConnection()
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_thousand_abrupt_drops_leave_nothing_behind(tmp_path: Path) -> None:
    """1,000 SSE readers dropped at once are all unsubscribed, with no error and no leak."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    streams: list[RawStream] = []
    reader: SSEReader | None = None
    request = sse_request(EDGE_TOKEN)
    try:
        with captured_log() as logged:
            gc.collect()
            rss_before = rss_kib()
            for _ in range(20):  # 50 at a time stays inside the listen backlog
                batch = [RawStream(request) for _ in range(50)]
                for stream in batch:
                    stream.keep = False
                await gatherResults([Deferred.fromCoroutine(connect_raw(master, s)) for s in batch])
                await gatherResults([s.first_data for s in batch]).addTimeout(10, reactor)
                streams.extend(batch)
            await wait_until(lambda: gauge(master) == 1000, "1,000 subscribers", timeout=10)
            assert len(master.service.fanout.subscribers) == 1000
            server_requests = [weakref.ref(s.request) for s in master.service.fanout.subscribers]

            for stream in streams:
                stream.transport.abortConnection()
            await wait_until(lambda: gauge(master) == 0, "the gauge to reach 0", timeout=10)
            await wait_until(
                lambda: len(master.service.fanout.subscribers) == 0, "subscribers to be gone"
            )
            assert all(s.lost.called for s in streams)
            assert all(m.connections == 0 for m in master.service.fanout.fleet.values())
            streams.clear()
            gc.collect()
            leaked = sum(1 for ref in server_requests if ref() is not None)
            assert leaked == 0, f"{leaked} server-side requests are still referenced"
            growth_mib = (rss_kib() - rss_before) / 1024
            assert growth_mib < 40, f"RSS grew by {growth_mib:.1f} MiB"
            assert master.service.metrics.registry.get_sample_value(
                "edgeauth_master_slow_consumers_disconnected_total"
            ) in (None, 0.0)

            reader = await open_live_sse(client)
            await reader.wait_for(lambda r: len(controls(r)) == 1)
            ban = await client.post("/ban/ip", {"ip": "192.0.2.77", "reason": "after drops"})
            assert ban.code == 201
            await reader.wait_for(lambda r: len(data_events(r)) == 1)
            assert data_events(reader)[0]["seq"] == ban.json()["event"]["seq"]
        assert_no_errors_logged(logged)
    finally:
        for stream in streams:
            if stream.transport is not None:
                stream.transport.abortConnection()
        if reader is not None:
            reader.close()
        await client.close()
        await master.stop()


# --- 4.4 /events ---------------------------------------------------------------------------------


async def _seed_replay(tmp_path: Path, use_header: bool) -> None:
    master = await start_master(tmp_path, ping_interval=30)
    client = Client(master.url)
    reader: SSEReader | None = None
    try:
        posted = await post_bans(client, 10)
        if use_header:
            url, headers = f"{master.url}/events", {**auth(EDGE_TOKEN), "Last-Event-ID": "3"}
        else:
            url, headers = f"{master.url}/events?last_event_id=3", auth(EDGE_TOKEN)
        reader = await SSEReader.open(client.agent, url, headers)
        assert reader.response is not None and reader.response.code == 200
        assert reader.response.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
        await reader.wait_for(lambda r: len(r.events) == 7)
        assert reader.items[0] == SSERetry(2000)
        assert [(e.id, e.event) for e in reader.events] == [
            (str(seq), "ip_banned") for seq in range(4, 11)
        ]
        assert [json.loads(e.data) for e in reader.events] == posted[3:]

        live = await client.post("/revoke/token", {"jti": "tok-11", "reason": "leak"})
        assert live.code == 201
        await reader.wait_for(lambda r: len(r.events) == 8)
        last = reader.events[-1]
        assert (last.id, last.event) == ("11", "token_revoked")
        assert json.loads(last.data) == live.json()["event"]
        assert not reader.ended
    finally:
        if reader is not None:
            reader.close()
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_events_replays_after_last_event_id_header(tmp_path: Path) -> None:
    """``Last-Event-ID: 3`` replays seq 4..10 (after ``retry: 2000``), then event 11 live."""
    await _seed_replay(tmp_path, use_header=True)


@pytest_twisted.ensureDeferred
async def test_events_replays_after_last_event_id_query(tmp_path: Path) -> None:
    """``?last_event_id=3`` behaves exactly like the header."""
    await _seed_replay(tmp_path, use_header=False)


@pytest_twisted.ensureDeferred
async def test_events_reset_when_older_than_retention(tmp_path: Path) -> None:
    """With retention_events=5, ``Last-Event-ID: 1`` gets ``event: reset`` and the stream ends."""
    master = await start_master(tmp_path, retention_events=5)
    client = Client(master.url)
    reader: SSEReader | None = None
    edge: SSEReader | None = None
    try:
        await post_bans(client, 10)
        await master.service._compact()
        reader = await SSEReader.open(
            client.agent, f"{master.url}/events", {**auth(EDGE_TOKEN), "Last-Event-ID": "1"}
        )
        await reader.wait_for(lambda r: r.ended, timeout=3)
        assert reader.ended
        assert reader.items[0] == SSERetry(2000)
        assert [e.event for e in reader.events] == ["reset"]
        assert json.loads(reader.events[0].data) == {"earliest": master.service.log.earliest}
        assert master.service.log.earliest == 6
        assert gauge(master, "events_sse") == 0

        # the oldest position still retained replays normally
        edge = await SSEReader.open(
            client.agent, f"{master.url}/events", {**auth(EDGE_TOKEN), "Last-Event-ID": "5"}
        )
        await edge.wait_for(lambda r: len(r.events) == 5)
        assert [e.id for e in edge.events] == ["6", "7", "8", "9", "10"]
        assert not edge.ended
    finally:
        for r in (reader, edge):
            if r is not None:
                r.close()
        await client.close()
        await master.stop()


# --- 5 snapshot ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_snapshot_gzip_matches_plain(tmp_path: Path) -> None:
    """The gzip snapshot decodes to the plain one; log id and offset match the log."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    try:
        await post_bans(client, 3)
        await client.post("/revoke/token", {"jti": "abc"})
        await client.post("/revoke/subject", {"sub": "user-1", "before": 1700000000})
        await client.post("/allow/ip", {"ip": "10.0.0.0/8", "reason": "office"})
        # the bare Agent: treq's client would ask for gzip and decode it behind our back
        plain = await raw_get(client, "/v1/snapshot")
        packed = await raw_get(client, "/v1/snapshot", {"Accept-Encoding": "gzip"})
        assert plain.code == packed.code == 200
        assert plain.header("Content-Encoding") is None
        assert packed.header("Content-Encoding") == "gzip"
        assert packed.body[:2] == b"\x1f\x8b"
        doc = plain.json()
        unpacked = json.loads(gzip.decompress(packed.body))
        assert isinstance(doc.pop("taken_at"), float | int)
        assert isinstance(unpacked.pop("taken_at"), float | int)
        assert unpacked == doc
        log_id = master.service.log.log_id
        assert doc["log_id"] == log_id
        assert plain.header("Edgeauth-Log-Id") == packed.header("Edgeauth-Log-Id") == log_id
        assert doc["offset"] == off(master.service.log.tail) == off(6)
        assert [b["ip"] for b in doc["bans"]] == [f"198.51.100.{i}/32" for i in (1, 2, 3)]
        assert [a["ip"] for a in doc["allows"]] == ["10.0.0.0/8"]
        assert [t["jti"] for t in doc["revoked_tokens"]] == ["abc"]
        assert [s["sub"] for s in doc["revoked_subjects"]] == ["user-1"]
    finally:
        await client.close()
        await master.stop()


# --- auth ----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stream_endpoints_require_a_token(tmp_path: Path) -> None:
    """Without a token every stream endpoint is 401 JSON; edge, reader and operator may read."""
    master = await start_master(tmp_path, long_poll_timeout=0.2)
    client = Client(master.url)
    readers: list[SSEReader] = []
    try:
        await post_bans(client, 1)
        paths = [
            f"{STREAM}?offset=-1",
            f"{STREAM}?offset=-1&live=long-poll",
            f"{STREAM}?offset=now&live=sse",
            "/events",
            "/v1/snapshot",
        ]
        for path in paths:
            for token in (None, "not-a-token"):
                reply = await client.get(path, token=token)
                assert_error(reply, 401, "unauthorized")
                assert reply.header("WWW-Authenticate") is not None
        head = await client.request("HEAD", STREAM, token=None)
        assert head.code == 401
        assert head.header("Stream-Next-Offset") is None
        assert gauge(master) == 0 and gauge(master, "events_sse") == 0

        for token in (EDGE_TOKEN, READER_TOKEN, OPERATOR_TOKEN):
            for path in (f"{STREAM}?offset=-1", f"{STREAM}?offset=-1&live=long-poll"):
                reply = await client.get(path, token=token)
                assert reply.code == 200
                assert [e["seq"] for e in reply.json()] == [1]
            snapshot = await client.get("/v1/snapshot", token=token)
            assert snapshot.code == 200
            assert (await client.request("HEAD", STREAM, token=token)).code == 200
            for url in (f"{master.url}{STREAM}?offset=-1&live=sse", f"{master.url}/events"):
                reader = await SSEReader.open(client.agent, url, auth(token))
                readers.append(reader)
                assert reader.response is not None and reader.response.code == 200
    finally:
        for reader in readers:
            reader.close()
        await client.close()
        await master.stop()
