"""Issue 6 acceptance, invalidation edge cases and RFC 9111 details, on real edges and origin."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest_twisted
from support import wait_until
from test_edge_cache_fixtures import (
    HOST,
    Answer,
    CacheClient,
    CacheFleet,
    cacheable,
    revalidating,
    x_cache,
)
from twisted.internet.defer import Deferred
from twisted.web.server import Request


async def started(tmp_path: Path, stack: AsyncExitStack, **sections: object) -> CacheFleet:
    """A master, the scripted origin and one edge, ``edge-a``."""
    fleet = CacheFleet(tmp_path, stack)
    await fleet.start(["edge-a"], **sections)
    return fleet


async def primed(user: CacheClient, *paths: str, headers: dict[str, str] | None = None) -> None:
    """GET each path twice: MISS, then HIT."""
    for path in paths:
        assert x_cache(await user.fetch(path, headers)) == "MISS", path
        assert x_cache(await user.fetch(path, headers)) == "HIT", path


@pytest_twisted.ensureDeferred
async def test_soft_purge_twice_never_extends_life(tmp_path: Path) -> None:
    """A second soft purge (or one of an already soft-purged entry) moves no deadline later."""
    async with AsyncExitStack() as stack:
        fleet = await started(tmp_path, stack)
        fleet.origin.route("/twice", cacheable(b"t", cache_control="max-age=600", tags="x"))
        user = fleet.user("edge-a")
        await primed(user, "/twice")
        (entry,) = fleet.cache("edge-a").store.variants(f"{HOST}/twice")
        stale_until = entry.stale_until
        await fleet.invalidate(tags=["x"], soft=True)
        first = (entry.fresh_until, entry.stale_until, entry.error_until)
        assert entry.soft and entry.fresh_until < stale_until
        assert entry.stale_until == stale_until, "soft purge must not move the stale deadline"
        explained = await fleet.explain("edge-a", "/twice")
        assert explained["state"] == "soft-purged"
        await fleet.invalidate(tags=["x"], soft=True)
        await fleet.invalidate(keys=["/twice"], soft=True)
        assert (entry.fresh_until, entry.stale_until, entry.error_until) == first
        again = await fleet.explain("edge-a", "/twice")
        assert again["expires_in"] <= explained["expires_in"]
        assert again["variants"][0]["stale_for"] <= explained["variants"][0]["stale_for"]


@pytest_twisted.ensureDeferred
async def test_hard_purge_after_soft_leaves_no_stale_copy(tmp_path: Path) -> None:
    """After soft then hard, nothing stale is served and the refresh in flight is not stored."""
    async with AsyncExitStack() as stack:
        fleet = await started(tmp_path, stack)
        origin = fleet.origin
        origin.route("/hs", cacheable(b"old", tags="hs", etag='"old"'))
        user = fleet.user("edge-a")
        await primed(user, "/hs")
        origin.held.add(b"/hs")
        origin.route("/hs", cacheable(b"pre-purge", tags="hs", etag='"pp"'))
        await fleet.invalidate(tags=["hs"], soft=True)
        stale = await user.fetch("/hs")
        assert (stale.body, x_cache(stale)) == (b"old", "STALE")
        await wait_until(lambda: len(origin.waiting) == 1, "the refresh held at the origin")
        await fleet.invalidate(tags=["hs"])
        assert fleet.cache("edge-a").store.variants(f"{HOST}/hs") == []
        origin.held.discard(b"/hs")  # new requests are answered; the refresh stays held
        origin.route("/hs", cacheable(b"new", tags="hs", etag='"new"'))
        miss = await user.fetch("/hs")
        assert (miss.body, x_cache(miss)) == (b"new", "MISS")
        hit = await user.fetch("/hs")
        assert (hit.body, x_cache(hit)) == (b"new", "HIT")
        assert origin.release("/hs") == 1
        await wait_until(lambda: not fleet.cache("edge-a")._fetches, "the refresh to end")
        after = await user.fetch("/hs")
        assert (after.body, x_cache(after)) == (b"new", "HIT"), "the pre-purge refresh was stored"


@pytest_twisted.ensureDeferred
async def test_soft_purged_entry_is_never_stored_fresh_from_a_stale_source(tmp_path: Path) -> None:
    """A refresh that was in flight when a second soft purge came is stored stale, not fresh."""
    async with AsyncExitStack() as stack:
        fleet = await started(tmp_path, stack)
        origin = fleet.origin
        origin.route("/s", revalidating(cacheable(b"v1", tags="s", etag='"v1"')))
        user = fleet.user("edge-a")
        await primed(user, "/s")
        origin.held.add(b"/s")
        await fleet.invalidate(tags=["s"], soft=True)
        assert x_cache(await user.fetch("/s")) == "STALE"
        await wait_until(lambda: len(origin.waiting) == 1, "the refresh held at the origin")
        await fleet.invalidate(tags=["s"], soft=True)
        origin.release("/s")
        await wait_until(lambda: not fleet.cache("edge-a")._fetches, "the refresh to end")
        assert len(origin.seen("/s")) == 2
        assert (await fleet.explain("edge-a", "/s"))["state"] == "soft-purged"
        again = await user.fetch("/s")
        assert (again.body, x_cache(again)) == (b"v1", "STALE")
        await wait_until(lambda: len(origin.seen("/s")) == 3, "a second refresh")
        await wait_until(lambda: not fleet.cache("edge-a")._fetches, "it to end")
        final = await user.fetch("/s")
        assert (final.body, x_cache(final)) == (b"v1", "HIT")
        # A response that is already stale when it arrives (Age past max-age) is never a HIT.
        origin.route("/aged", cacheable(b"a", cache_control="max-age=60", extra=[("Age", "120")]))
        assert x_cache(await user.fetch("/aged")) == "MISS"
        assert x_cache(await user.fetch("/aged")) == "MISS"
        assert len(origin.seen("/aged")) == 2


@pytest_twisted.ensureDeferred
async def test_every_vary_variant_goes_with_its_key(tmp_path: Path) -> None:
    """Variants are stored apart, and an invalidation by key or by tag drops all of them."""
    async with AsyncExitStack() as stack:
        fleet = await started(tmp_path, stack)

        def by_language(request: Request) -> Answer:
            language = (request.getHeader(b"accept-language") or b"none").decode()
            return cacheable(language.encode(), tags="page", extra=[("Vary", "Accept-Language")])

        fleet.origin.route("/page", by_language)
        user = fleet.user("edge-a")
        languages = ["en", "fr", "de"]
        for language in languages:
            await primed(user, "/page", headers={"Accept-Language": language})
            hit = await user.fetch("/page", {"Accept-Language": language})
            assert hit.body == language.encode()
        assert len(fleet.cache("edge-a").store.variants(f"{HOST}/page")) == 3
        for selector in ({"keys": ["/page"]}, {"tags": ["page"]}, {"prefixes": ["/pa"]}):
            await fleet.invalidate(**selector)
            for language in languages:
                miss = await user.fetch("/page", {"Accept-Language": language})
                assert (miss.body, x_cache(miss)) == (language.encode(), "MISS"), selector
        fleet.cache("edge-a").store.check()


@pytest_twisted.ensureDeferred
async def test_tags_match_whole_tags_only(tmp_path: Path) -> None:
    """Tag ``a`` never touches ``ab``, ``a-b`` or ``ba``."""
    async with AsyncExitStack() as stack:
        fleet = await started(tmp_path, stack)
        tags = {"/a": "a", "/ab": "ab", "/a-b": "a-b", "/ba": "ba, x", "/both": "ab, a"}
        for path, tag in tags.items():
            fleet.origin.route(path, cacheable(path.encode(), tags=tag))
        user = fleet.user("edge-a")
        await primed(user, *tags)
        await fleet.invalidate(tags=["a"])
        got = {path: x_cache(await user.fetch(path)) for path in tags}
        assert got == {"/a": "MISS", "/ab": "HIT", "/a-b": "HIT", "/ba": "HIT", "/both": "MISS"}


@pytest_twisted.ensureDeferred
async def test_keys_with_escapes_spaces_and_commas(tmp_path: Path) -> None:
    """``%2F`` is not ``/``, a key with a space names ``%20``, commas are plain characters."""
    async with AsyncExitStack() as stack:
        fleet = await started(tmp_path, stack)
        paths = ["/x%2Fy", "/x/y", "/sp%20ace", "/sp", "/com,ma", "/com%2Cma", "/q?a=1,2"]
        for path in paths:
            fleet.origin.route(path.partition("?")[0], cacheable(path.encode()))
        user = fleet.user("edge-a")
        await primed(user, *paths)
        await fleet.invalidate(keys=["/x%2fy", "/sp ace", "/com,ma", "shop.example/q?a=1,2"])
        got = {path: x_cache(await user.fetch(path)) for path in paths}
        assert got == {
            "/x%2Fy": "MISS",
            "/x/y": "HIT",
            "/sp%20ace": "MISS",
            "/sp": "HIT",
            "/com,ma": "MISS",
            "/com%2Cma": "HIT",
            "/q?a=1,2": "MISS",
        }


@pytest_twisted.ensureDeferred
async def test_key_slash_is_the_root_page_and_prefix_slash_is_everything(tmp_path: Path) -> None:
    """``keys: ["/"]`` drops the root page only; ``prefixes: ["/"]`` drops every entry."""
    async with AsyncExitStack() as stack:
        fleet = await started(tmp_path, stack)
        paths = ["/", "/x", "/?q=1"]
        for path in paths:
            fleet.origin.route(path.partition("?")[0], cacheable(path.encode()))
        user = fleet.user("edge-a")
        await primed(user, *paths)
        await fleet.invalidate(keys=["/"])
        got = {path: x_cache(await user.fetch(path)) for path in paths}
        assert got == {"/": "MISS", "/x": "HIT", "/?q=1": "HIT"}
        await fleet.invalidate(prefixes=["/"])
        assert {path: x_cache(await user.fetch(path)) for path in paths} == dict.fromkeys(
            paths, "MISS"
        )


@pytest_twisted.ensureDeferred
async def test_tag_index_consistent_through_eviction_and_restart(tmp_path: Path) -> None:
    """Evicted entries leave the tag index; after a restart the index is rebuilt from the file."""
    async with AsyncExitStack() as stack:
        fleet = await started(tmp_path, stack, cache={"max_entries": 3})
        for n in range(6):
            fleet.origin.route(f"/t{n}", cacheable(b"t%d" % n, tags=f"t, g{n % 2}, t{n}"))
        user = fleet.user("edge-a")
        for n in range(6):
            assert x_cache(await user.fetch(f"/t{n}")) == "MISS"
        store = fleet.cache("edge-a").store
        store.check()
        assert sorted(e.key for e in store) == [f"{HOST}/t{n}" for n in (3, 4, 5)]
        await fleet.invalidate(tags=["g1"])  # /t1 (evicted), /t3 and /t5
        store.check()
        assert [e.key for e in store] == [f"{HOST}/t4"]
        assert x_cache(await user.fetch("/t0")) == "MISS"
        await fleet.edges["edge-a"].stop()
        await fleet.start_edge("edge-a")
        user = fleet.user("edge-a")
        store = fleet.cache("edge-a").store
        store.check()
        assert sorted(e.key for e in store) == [f"{HOST}/t0", f"{HOST}/t4"]
        assert x_cache(await user.fetch("/t4")) == "HIT"
        await fleet.invalidate(tags=["t0"])
        store.check()
        assert [e.key for e in store] == [f"{HOST}/t4"]
        assert x_cache(await user.fetch("/t0")) == "MISS"
        assert x_cache(await user.fetch("/t4")) == "HIT"


@pytest_twisted.ensureDeferred
async def test_head_no_cache_conditionals_and_swr(tmp_path: Path) -> None:
    """HEAD from the GET entry; client no-cache revalidates; If-None-Match gets 304; swr."""
    async with AsyncExitStack() as stack:
        fleet = await started(tmp_path, stack)
        origin = fleet.origin
        origin.route("/r", revalidating(cacheable(b"body", etag='"e1"')))
        user = fleet.user("edge-a")
        head_miss = await user.head("/r")
        assert (head_miss.code, x_cache(head_miss)) == (200, "MISS")
        await primed(user, "/r")
        head = await user.head("/r")
        assert (head.code, head.body, x_cache(head), head.header("Content-Length")) == (
            200,
            b"",
            "HIT",
            "4",
        )
        seen = len(origin.seen("/r"))
        revalidated = await user.fetch("/r", {"Cache-Control": "no-cache"})
        assert (revalidated.body, x_cache(revalidated)) == (b"body", "MISS")
        assert len(origin.seen("/r")) == seen + 1
        assert origin.seen("/r")[-1].header("If-None-Match") == '"e1"'
        not_modified = await user.fetch("/r", {"If-None-Match": '"e1"'})
        assert (not_modified.code, not_modified.body, x_cache(not_modified)) == (304, b"", "HIT")
        origin.route(
            "/swr", cacheable(b"s1", cache_control="max-age=0, stale-while-revalidate=600")
        )
        assert x_cache(await user.fetch("/swr")) == "MISS"
        origin.held.add(b"/swr")
        stale = await user.fetch("/swr")
        assert (stale.body, x_cache(stale)) == (b"s1", "STALE")
        await wait_until(lambda: len(origin.waiting) == 1, "one background refresh")


@pytest_twisted.ensureDeferred
async def test_unsafe_requests_bypass_and_drop_their_uri(tmp_path: Path) -> None:
    """A POST is BYPASS and, when it succeeds, drops the stored response of its URI."""
    async with AsyncExitStack() as stack:
        fleet = await started(tmp_path, stack)
        fleet.origin.route("/cart", cacheable(b"cart"))
        user = fleet.user("edge-a")
        await primed(user, "/cart")
        posted = await user.request("POST", "/cart", token=None, body=b"x", headers={"Host": HOST})
        assert x_cache(posted) == "BYPASS"
        assert x_cache(await user.fetch("/cart")) == "MISS"


@pytest_twisted.ensureDeferred
async def test_bodies_over_max_object_bytes_pass_uncached(tmp_path: Path) -> None:
    """A body larger than max_object_bytes is relayed whole and never stored."""
    async with AsyncExitStack() as stack:
        fleet = await started(tmp_path, stack, cache={"max_object_bytes": 1000})
        fleet.origin.route("/big", cacheable(b"b" * 5000))
        fleet.origin.route("/small", cacheable(b"s" * 500))
        user = fleet.user("edge-a")
        for _ in range(2):
            big = await user.fetch("/big")
            assert (big.body, x_cache(big)) == (b"b" * 5000, "MISS")
        await primed(user, "/small")
        assert len(fleet.origin.seen("/big")) == 2


@pytest_twisted.ensureDeferred
async def test_waiters_after_a_hard_purge_do_not_get_the_pre_purge_fill(tmp_path: Path) -> None:
    """A request that comes after a hard purge starts its own fill instead of waiting."""
    async with AsyncExitStack() as stack:
        fleet = await started(tmp_path, stack)
        origin = fleet.origin
        origin.route("/w", cacheable(b"before", tags="w"))
        origin.held.add(b"/w")
        user = fleet.user("edge-a")
        first = Deferred.fromCoroutine(user.fetch("/w"))
        await wait_until(lambda: len(origin.waiting) == 1, "the first fill at the origin")
        await fleet.invalidate(keys=["/w"])
        origin.route("/w", cacheable(b"after", tags="w"))
        origin.held.clear()
        second = await user.fetch("/w")
        assert (second.body, x_cache(second)) == (b"after", "MISS")
        origin.release()
        assert (await first).body == b"before"
        assert (await user.fetch("/w")).body == b"after"
