"""A ban posted to the master is enforced by an edge in front of a real origin."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from support import Client, Origin, start_edge, start_master


@pytest_twisted.ensureDeferred
async def test_ban_then_unban_through_an_edge(tmp_path: Path) -> None:
    """A banned client gets 403 ip_banned from the edge; after unban it reaches the origin."""
    master = await start_master(tmp_path)
    origin = Origin()
    await origin.start()
    edge = await start_edge(tmp_path, "edge-a", master.url, origin.url)
    ops = Client(master.url)
    user = Client(edge.url)
    try:
        first = await user.get("/hello", token=None)
        assert first.code == 200
        assert first.body == b"origin says hello /hello"
        await ops.post("/ban/ip", {"ip": "127.0.0.1", "reason": "test"})
        for _ in range(100):
            answer = await user.get("/hello", token=None)
            if answer.code == 403:
                break
        assert answer.code == 403
        assert answer.json()["error"] == "ip_banned"
        seen = len(origin.requests)
        await ops.post("/unban/ip", {"ip": "127.0.0.1"})
        for _ in range(100):
            answer = await user.get("/again", token=None)
            if answer.code == 200:
                break
        assert answer.code == 200
        assert len(origin.requests) == seen + 1
    finally:
        await ops.close()
        await user.close()
        await edge.stop()
        await origin.stop()
        await master.stop()
