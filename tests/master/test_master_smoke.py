"""End-to-end checks of the master's main paths over real HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest_twisted
from support import Client, SSEReader, auth, data_events, start_master


@pytest_twisted.ensureDeferred
async def test_ban_wakes_long_poll_and_sse(tmp_path: Path) -> None:
    """A ban posted while a long-poll and an SSE reader wait at the tail reaches both."""
    master = await start_master(tmp_path)
    client = Client(master.url)
    poller = Client(master.url)
    try:
        first = await client.post("/ban/ip", {"ip": "192.0.2.1", "reason": "warm-up"})
        assert first.code == 201
        tail = first.json()["offset"]
        sse = await SSEReader.open(
            client.agent, f"{master.url}/v1/stream/events?offset={tail}&live=sse", auth()
        )
        waiting = poller.get(f"/v1/stream/events?offset={tail}&live=long-poll")
        ban = await client.post("/ban/ip", {"ip": "198.51.100.7", "reason": "abuse"})
        assert ban.code == 201
        answer = await waiting
        assert answer.code == 200
        assert [e["ip"] for e in answer.json()] == ["198.51.100.7/32"]
        assert answer.header("Stream-Next-Offset") == ban.json()["offset"]
        assert answer.header("Stream-Cursor") is not None
        await sse.wait_for(lambda r: len(data_events(r)) >= 1)
        named = [e.event for e in sse.events]
        assert named[-2:] == ["data", "control"]
        control = json.loads(sse.events[-1].data)
        assert control["streamNextOffset"] == ban.json()["offset"]
        assert control["upToDate"] is True
        assert data_events(sse)[0]["seq"] == ban.json()["event"]["seq"]
        sse.close()
    finally:
        await client.close()
        await poller.close()
        await master.stop()
