"""Refused requests are logged (the master's access log is off by default), without flooding."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from support import (
    EDGE_TOKEN,
    READER_TOKEN,
    Client,
    captured_log,
    start_master,
)
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent

from edgeauth.master.auth import RefusalLog


def lines(events: list[LogEvent]) -> list[str]:
    """The text of the events logged by the refusal log."""
    return [formatEvent(e) for e in events if e.get("log_namespace") == "edgeauth.master.auth"]


def test_refusals_past_the_burst_are_counted_then_reported() -> None:
    """At most ``burst`` lines a second; the rest are summed up in the next second's first line."""
    clock = Clock()
    clock.advance(1000.2)
    refusals = RefusalLog(clock, burst=3)
    with captured_log() as events:
        for _ in range(7):
            refusals.refused(b"POST", b"/ban/ip?x=1", "192.0.2.1", 401, "unauthorized")
        assert lines(events) == ["refused POST /ban/ip from 192.0.2.1: 401 unauthorized"] * 3
        clock.advance(0.5)  # same second: still quiet
        refusals.refused(b"GET", b"/bans", "192.0.2.1", 403, "forbidden")
        assert len(lines(events)) == 3
        clock.advance(1.0)
        refusals.refused(b"GET", b"/bans", "192.0.2.2", 403, "forbidden")
        assert lines(events)[3:] == [
            "5 more refused requests not logged (more than 3 a second)",
            "refused GET /bans from 192.0.2.2: 403 forbidden",
        ]
        clock.advance(1.0)
        refusals.refused(b"GET", b"/bans", "192.0.2.3", 401, "unauthorized")
        assert lines(events)[5:] == ["refused GET /bans from 192.0.2.3: 401 unauthorized"]


@pytest_twisted.ensureDeferred
async def test_a_wrong_token_is_logged_without_the_token(tmp_path: Path) -> None:
    """401 and 403 of the API and the stream leave one line each; no token text is logged."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    try:
        with captured_log() as events:
            wrong = "not-a-configured-token-1234"
            reply = await client.post("/ban/ip", {"ip": "192.0.2.1"}, token=wrong)
            assert reply.code == 401
            reply = await client.post("/ban/ip", {"ip": "192.0.2.1"}, token=READER_TOKEN)
            assert reply.code == 403
            reply = await client.get("/v1/stream/events?offset=-1", token=None)
            assert reply.code == 401
            reply = await client.get("/bans?limit=5", token=EDGE_TOKEN)  # not a read role
            assert reply.code == 403
            assert (await client.get("/bans", token=READER_TOKEN)).code == 200
            assert lines(events) == [
                "refused POST /ban/ip from 127.0.0.1: 401 unauthorized",
                "refused POST /ban/ip from 127.0.0.1: 403 forbidden",
                "refused GET /v1/stream/events from 127.0.0.1: 401 unauthorized",
                "refused GET /bans from 127.0.0.1: 403 forbidden",
            ]
            text = "\n".join(formatEvent(e) + repr(e) for e in events)
            for secret in (wrong, READER_TOKEN, EDGE_TOKEN):
                assert secret not in text
    finally:
        await client.close()
        await master.stop()
