"""edgeauth.edge.cache.persist and EdgeCache.load over a real EdgeStore (SQLite via adbapi)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest_twisted
from test_edge_cache_store import entry
from twisted.internet import reactor

from edgeauth.config import CacheSettings
from edgeauth.edge.cache import EdgeCache
from edgeauth.edge.cache.persist import CachePersister
from edgeauth.edge.cache.policy import Selector
from edgeauth.edge.origin_pool import OriginPool
from edgeauth.edge.state import EdgeState
from edgeauth.edge.store import EdgeStore
from edgeauth.edge.ttl import TTLPipeline
from edgeauth.events import CacheInvalidated

EMPTY_SNAPSHOT = {"bans": [], "allows": [], "revoked_tokens": [], "revoked_subjects": []}


async def opened(path: Path) -> EdgeStore:
    store = EdgeStore(str(path), reactor)
    await store.open()
    return store


def rows(path: Path) -> dict[str, tuple[float, int]]:
    """Map each stored key to (fresh_until, soft), read with a separate connection."""
    with sqlite3.connect(path) as db:
        found = db.execute("SELECT key, fresh_until, soft FROM cache_entries").fetchall()
    return {key: (fresh, soft) for key, fresh, soft in found}


def cache_for(store: EdgeStore, state: EdgeState | None = None) -> EdgeCache:
    """An EdgeCache on ``store`` (its origin pool is never used here)."""
    return EdgeCache(
        reactor,
        OriginPool(reactor, "http", "127.0.0.1", 9),
        CacheSettings(),
        TTLPipeline((), 86400.0),
        run_interaction=store.run_interaction,
        log_id=(lambda: state.log_id) if state is not None else (lambda: "log-1"),
    )


@pytest_twisted.ensureDeferred
async def test_rows_follow_the_entries(tmp_path: Path) -> None:
    """Puts, soft purges, updates and deletes are written behind; load reads them back."""
    now = time.time()
    store = await opened(tmp_path / "edge.sqlite3")
    persister = CachePersister(store.run_interaction, reactor, lambda: "log-1")
    assert (await persister.load(now)).rows == []
    a = entry("h/a", body=b"A" * 100000, fresh_until=now + 100)
    b = entry("h/b", tags=("t",), fresh_until=now + 100, stale_until=now + 200)
    c = entry("h/c", fresh_until=now + 100)
    gone = entry("h/gone", fresh_until=now - 1)
    for e in (a, b, c, gone):
        persister.put(e)
    b.fresh_until = now
    b.soft = True
    persister.soften(b)
    persister.delete(c)
    await persister.flushed()
    assert rows(tmp_path / "edge.sqlite3") == {
        "h/a": (now + 100, 0),
        "h/b": (now, 1),
        "h/gone": (now - 1, 0),
    }
    loaded = await persister.load(now)
    assert loaded.log_id == "log-1"
    assert loaded.expired == 1, "rows past use are deleted at load"
    by_key = {row.key: row for row in loaded.rows}
    assert sorted(by_key) == ["h/a", "h/b"]
    assert by_key["h/a"].body == a.body
    assert by_key["h/b"].soft and by_key["h/b"].meta["tags"] == ["t"]
    assert by_key["h/b"].meta["stale_until"] == now + 200
    persister.soften_all(now - 5)
    await persister.flushed()
    assert rows(tmp_path / "edge.sqlite3")["h/a"] == (now - 5, 1)
    persister.clear()
    await persister.flushed()
    assert rows(tmp_path / "edge.sqlite3") == {}
    await persister.close()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_an_invalidation_commits_before_the_offset_that_reflects_it(tmp_path: Path) -> None:
    """Once the state's offset past an invalidation is on disk, so is the cache's deletion."""
    path = tmp_path / "edge.sqlite3"
    store = EdgeStore(str(path), reactor)
    state = EdgeState(store, reactor, "edge-t")
    await state.load()
    cache = cache_for(store, state)
    state.cache_listeners.append(cache.invalidate_event)
    state.reset_listeners.append(cache.reset)
    state.apply_snapshot(EMPTY_SNAPSHOT, "log-1", 0)
    now = time.time()
    for n in range(3):
        cache._put(entry(f"h/{n}", tags=("t",) if n else (), fresh_until=now + 100))
    assert cache.persister is not None
    await cache.persister.flushed()
    await store.flushed()
    assert sorted(rows(path)) == ["h/0", "h/1", "h/2"]
    state.apply([CacheInvalidated(seq=1, tags=("t",))], 1)
    await store.flushed()  # only the state's write is awaited
    with sqlite3.connect(path) as db:
        offset = db.execute("SELECT value FROM meta WHERE key = 'offset'").fetchone()[0]
    assert offset == "1"
    assert sorted(rows(path)) == ["h/0"]
    await cache.close()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_load_reads_unverified_entries_of_the_same_log_only(tmp_path: Path) -> None:
    """Loaded entries wait for confirm(); rows of another log id are dropped."""
    path = tmp_path / "edge.sqlite3"
    now = time.time()
    store = await opened(path)
    cache = cache_for(store)
    cache._put(entry("h/x", tags=("t",), fresh_until=now + 100))
    await cache.close()
    await store.close()

    store = await opened(path)
    cache = cache_for(store)
    assert await cache.load("log-1") == 1
    (loaded,) = cache.store
    assert not loaded.verified and not cache.confirmed
    assert loaded.state(now) == "unverified"
    cache.confirm()
    assert loaded.verified and loaded.state(now) == "fresh"
    assert cache.invalidate(Selector(tags=frozenset({"t"})), soft=False) == 1
    cache._put(entry("h/y", fresh_until=now + 100))
    await cache.close()
    await store.close()

    store = await opened(path)
    cache = cache_for(store)
    assert await cache.load("another-log") == 0
    assert len(cache.store) == 0 and rows(path) == {}
    await cache.close()
    await store.close()
