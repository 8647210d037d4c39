"""Issue 6 acceptance, bounds: LRU limits, refresh stampedes, memory of large HITs."""

from __future__ import annotations

import gc
import hashlib
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest_twisted
from support import wait_until
from test_edge_cache_fixtures import (
    HOST,
    Answer,
    BulkClient,
    CacheFleet,
    Raw,
    cacheable,
    x_cache,
)
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.server import Request

MB = 1 << 20


def per_path(request: Request) -> Answer:
    """A cacheable answer naming its path, tagged ``all`` and ``g<n mod 7>``."""
    path = request.uri.decode()
    n = int(path.rsplit("/", 1)[1])
    return cacheable(path.encode(), tags=f"all, g{n % 7}", etag=f'"{n}"')


@pytest_twisted.ensureDeferred
async def test_lru_holds_max_entries_and_keeps_the_most_recently_used(tmp_path: Path) -> None:
    """1,000 keys through max_entries = 100: never more than 100; the recently used survive."""
    async with AsyncExitStack() as stack:
        fleet = CacheFleet(tmp_path, stack)
        await fleet.start(["edge-a"], cache={"max_entries": 100})
        fleet.origin.default = per_path
        cache = fleet.cache("edge-a")
        sizes: list[int] = []

        def bounded(raw: Raw) -> None:
            assert raw.status == 200
            sizes.append(len(cache.store))
            assert len(cache.store) <= 100

        paths = []
        for n in range(1, 1001):
            paths.append(f"/k/{n}")
            if n % 10 == 0:
                paths.append("/k/0")  # kept hot
        port = fleet.edges["edge-a"].service.port.getHost().port
        await BulkClient(port, concurrency=1).get_all(paths, check=bounded)
        assert max(sizes) == 100
        cache.store.check()
        survivors = {e.key for e in cache.store}
        expected = {f"{HOST}/k/{n}" for n in range(902, 1001)} | {f"{HOST}/k/0"}
        assert survivors == expected
        user = fleet.user("edge-a")
        assert x_cache(await user.fetch("/k/0")) == "HIT"
        assert x_cache(await user.fetch("/k/1000")) == "HIT"
        assert x_cache(await user.fetch("/k/500")) == "MISS"
        # The index still answers for exactly the survivors (and the one just fetched).
        await fleet.invalidate(tags=["g3"])
        cache.store.check()
        assert all(int(e.key.rsplit("/", 1)[1]) % 7 != 3 for e in cache.store)
        await fleet.edges["edge-a"].stop()
        await fleet.start_edge("edge-a")
        cache = fleet.cache("edge-a")
        cache.store.check()
        assert len(cache.store) <= 100
        assert f"{HOST}/k/0" in {e.key for e in cache.store}


@pytest_twisted.ensureDeferred
async def test_mass_soft_purge_never_stampedes_the_origin(tmp_path: Path) -> None:
    """Soft ``all`` over 5,000 entries, then 5,000 requests: <= max_refreshes refreshes at once."""
    async with AsyncExitStack() as stack:
        fleet = CacheFleet(tmp_path, stack)
        await fleet.start(["edge-a"], cache={"max_entries": 10000, "max_refreshes": 8})
        origin = fleet.origin
        origin.default = per_path
        cache = fleet.cache("edge-a")
        port = fleet.edges["edge-a"].service.port.getHost().port
        bulk = BulkClient(port, concurrency=50)
        paths = [f"/e/{n}" for n in range(5000)]
        filled = await bulk.get_all(paths)
        assert {r.headers[b"x-cache"] for r in filled} == {b"MISS"}
        assert len(cache.store) == 5000
        origin.delay = 0.005  # a slow origin: refreshes overlap unless something limits them
        origin.peak = 0
        before = len(origin.requests)
        await fleet.invalidate(all=True, soft=True)
        answers = await bulk.get_all(paths)
        assert {r.headers[b"x-cache"] for r in answers} == {b"STALE"}
        assert [r.body for r in answers] == [p.encode() for p in paths]
        await wait_until(
            lambda: cache.refreshes.running == 0 and cache.refreshes.queued == 0,
            "every refresh to end",
            timeout=60,
        )
        assert origin.peak == 8, "at most max_refreshes at once, and the limit was reached"
        assert len(origin.requests) - before == 5000, "each entry refreshed exactly once"
        again = await bulk.get_all(paths[:100])
        assert {r.headers[b"x-cache"] for r in again} == {b"HIT"}


def rss() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class SlowReader(Protocol):
    """Reads one response only as fast as the test allows (``allow``), hashing the body."""

    def __init__(self) -> None:
        self.received = 0
        self.budget = 256 << 10
        self.digest = hashlib.sha256()
        self.head = b""
        self.in_body = False
        self.lost = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(f"GET /big HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())

    def dataReceived(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            self.head, _, data = self.head.partition(b"\r\n\r\n")
            self.in_body = True
        self.received += len(data)
        self.digest.update(data)
        if self.received >= self.budget:
            assert self.transport is not None
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def allow(self, more: int) -> None:
        self.budget = self.received + more
        assert self.transport is not None
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True


@pytest_twisted.ensureDeferred
async def test_slow_reader_of_a_50_mb_hit_keeps_rss_flat(tmp_path: Path) -> None:
    """A client reading a 50 MB HIT 2 MB at a time never makes the edge hold a second copy."""
    async with AsyncExitStack() as stack:
        fleet = CacheFleet(tmp_path, stack)
        await fleet.start(["edge-a"], cache={"max_object_bytes": 60 * MB, "max_bytes": 128 * MB})
        block = hashlib.sha256(b"edgeauth").digest() * (MB // 32)
        body = block * 50
        fleet.origin.route("/big", cacheable(body))
        user = fleet.user("edge-a")
        first = await user.fetch("/big")
        assert (len(first.body), x_cache(first)) == (50 * MB, "MISS")
        del first
        cache: Any = fleet.cache("edge-a")
        assert len(cache.store) == 1
        await cache.persister.flushed()
        await user.close()
        gc.collect()
        baseline = rss()
        port = fleet.edges["edge-a"].service.port.getHost().port
        reader = SlowReader()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), reader)
        assert reader.transport is not None
        stack.callback(reader.transport.loseConnection)
        await wait_until(lambda: reader.head.startswith(b"HTTP/1.1 200"), "the response head")
        assert b"X-Cache: HIT" in reader.head
        peak = baseline
        while reader.received < len(body):
            reader.allow(2 * MB)
            await wait_until(
                lambda: reader.received >= min(reader.budget, len(body)) or reader.lost,
                "the next 2 MB",
            )
            assert not reader.lost
            peak = max(peak, rss())
        assert reader.received == len(body)
        assert reader.digest.digest() == hashlib.sha256(body).digest()
        assert peak - baseline < 16 * MB, f"RSS grew by {(peak - baseline) / MB:.1f} MB"
