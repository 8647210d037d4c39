"""Issue 6 acceptance: the edge cache with a real master, two real edges and a real origin."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import pytest_twisted
from support import wait_until
from test_edge_cache_fixtures import HOST, Answer, CacheClient, CacheFleet, cacheable, x_cache
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.server import Request

EDGES = ("edge-a", "edge-b")
TAGGED = ["/products/1", "/products/2", "/catalog?page=2"]
UNTAGGED = ["/about", "/products-old"]


async def prime(fleet: CacheFleet) -> None:
    """Every path is a MISS, then a HIT with an Age, on both edges."""
    for path in TAGGED:
        fleet.origin.route(path.partition("?")[0], cacheable(path.encode(), tags="products, all"))
    for path in UNTAGGED:
        fleet.origin.route(path, cacheable(path.encode(), tags="site"))
    for name in EDGES:
        user = fleet.user(name)
        for path in TAGGED + UNTAGGED:
            first = await user.fetch(path)
            assert (first.code, first.body, x_cache(first)) == (200, path.encode(), "MISS")
            assert first.header("X-Cache-Tags") is None, "tags are stripped from clients"
            second = await user.fetch(path)
            assert (second.code, second.body, x_cache(second)) == (200, path.encode(), "HIT")
            age = second.header("Age")
            assert age is not None and int(age) >= 0


async def states(fleet: CacheFleet, paths: list[str]) -> dict[tuple[str, str], str | None]:
    """The X-Cache of one GET of each path on each edge."""
    out = {}
    for name in EDGES:
        user = fleet.user(name)
        for path in paths:
            out[name, path] = x_cache(await user.fetch(path))
    return out


@pytest_twisted.ensureDeferred
async def test_miss_then_hit_then_tag_invalidation_on_both_edges(tmp_path: Path) -> None:
    """After a tag invalidation both edges MISS every tagged entry (within 1 s); others HIT."""
    async with AsyncExitStack() as stack:
        fleet = CacheFleet(tmp_path, stack)
        await fleet.start(EDGES)
        await prime(fleet)
        origin_before = len(fleet.origin.requests)
        await fleet.invalidate(tags=["products"])
        after = await states(fleet, TAGGED + UNTAGGED)
        assert after == {
            (name, path): "MISS" if path in TAGGED else "HIT"
            for name in EDGES
            for path in TAGGED + UNTAGGED
        }
        assert len(fleet.origin.requests) == origin_before + len(TAGGED) * len(EDGES)


@pytest.mark.parametrize(
    ("selector", "missed"),
    [
        (
            {"keys": ["/products/1", "shop.example/catalog?page=2"]},
            {"/products/1", "/catalog?page=2"},
        ),
        ({"prefixes": ["/products/"]}, {"/products/1", "/products/2"}),
        ({"prefixes": ["shop.example/products"]}, {"/products/1", "/products/2", "/products-old"}),
        ({"all": True}, set(TAGGED + UNTAGGED)),
    ],
)
@pytest_twisted.ensureDeferred
async def test_keys_prefixes_and_all_on_both_edges(
    tmp_path: Path, selector: dict[str, object], missed: set[str]
) -> None:
    """keys, prefixes (host-less and host-qualified) and all: exactly the selected entries MISS."""
    async with AsyncExitStack() as stack:
        fleet = CacheFleet(tmp_path, stack)
        await fleet.start(EDGES)
        await prime(fleet)
        await fleet.invalidate(**selector)
        after = await states(fleet, TAGGED + UNTAGGED)
        assert after == {
            (name, path): "MISS" if path in missed else "HIT"
            for name in EDGES
            for path in TAGGED + UNTAGGED
        }


@pytest_twisted.ensureDeferred
async def test_soft_invalidation_serves_stale_and_refreshes_once(tmp_path: Path) -> None:
    """Soft: STALE at once (the origin holds the refresh), exactly one refresh, then HIT v2."""
    async with AsyncExitStack() as stack:
        fleet = CacheFleet(tmp_path, stack)
        await fleet.start(EDGES)
        origin = fleet.origin
        origin.route("/news", cacheable(b"v1", tags="news", etag='"v1"'))
        for name in EDGES:
            user = fleet.user(name)
            assert x_cache(await user.fetch("/news")) == "MISS"
            assert x_cache(await user.fetch("/news")) == "HIT"
        origin.route("/news", cacheable(b"v2", tags="news", etag='"v2"'))
        origin.held.add(b"/news")
        before = len(origin.requests)
        await fleet.invalidate(tags=["news"], soft=True)
        for name in EDGES:
            user = fleet.user(name)
            replies = [await user.fetch("/news") for _ in range(5)]
            assert [(r.code, r.body, x_cache(r)) for r in replies] == [(200, b"v1", "STALE")] * 5
        await wait_until(lambda: len(origin.waiting) == 2, "one held refresh per edge")
        refreshes = origin.requests[before:]
        assert [(r.uri, r.header("If-None-Match")) for r in refreshes] == [(b"/news", '"v1"')] * 2
        origin.release("/news")
        for name in EDGES:
            user = fleet.user(name)

            async def hit(user: CacheClient = user) -> bool:
                return x_cache(await user.fetch("/news")) == "HIT"

            await wait_until(hit, f"a HIT on {name} after the refresh")
            reply = await user.fetch("/news")
            assert (reply.body, x_cache(reply)) == (b"v2", "HIT")
        assert len(origin.requests) == before + 2, "exactly one refresh per edge"


@pytest_twisted.ensureDeferred
async def test_100_concurrent_misses_make_one_origin_request(tmp_path: Path) -> None:
    """100 concurrent requests for a cold key: the origin sees 1 request, all 100 get the body."""
    async with AsyncExitStack() as stack:
        fleet = CacheFleet(tmp_path, stack)
        await fleet.start(["edge-a"])
        origin = fleet.origin
        body = b"cold body " * 100
        origin.route("/cold", cacheable(body))
        origin.held.add(b"/cold")
        user = fleet.user("edge-a")
        replies = [Deferred.fromCoroutine(user.fetch("/cold")) for _ in range(100)]
        collapser = fleet.cache("edge-a").collapser
        await wait_until(
            lambda: len(origin.waiting) == 1 and collapser.waiting(f"{HOST}/cold\x00") == 99,
            "one origin request and 99 waiters",
        )
        origin.release("/cold")
        answers = await gatherResults(replies)
        assert [(a.code, a.body) for a in answers] == [(200, body)] * 100
        assert len(origin.seen("/cold")) == 1
        assert sorted(x_cache(a) or "" for a in answers) == ["MISS"] * 100


def _personal(kind: str) -> Callable[[Request], Answer]:
    """An origin answer made for the caller: its body names the caller's credentials."""

    def answer(request: Request) -> Answer:
        who = (request.getHeader(b"x-user") or b"?").decode()
        cc = {
            "no-store": "no-store",
            "private": "private, max-age=600",
            "cookie": "max-age=600",
            "cookie-public": "public, max-age=600",
            "vary-star": "max-age=600",
            "auth": "max-age=600",
            "auth-public": "public, max-age=600",
            "auth-s-maxage": "s-maxage=600",
        }[kind]
        headers = [(b"Cache-Control", cc.encode())]
        if kind.startswith("cookie"):
            headers.append((b"Set-Cookie", f"session={who}".encode()))
        if kind == "vary-star":
            headers.append((b"Vary", b"*"))
        return Answer(200, headers, f"{kind} for {who}".encode())

    return answer


@pytest_twisted.ensureDeferred
async def test_private_responses_are_never_served_to_another_client(tmp_path: Path) -> None:
    """no-store, private, Set-Cookie, Vary: * and Authorization answers reach only their client.

    The positive controls (explicitly public or s-maxage) show that sharing does happen when the
    origin allows it, so the negative cases could fail.
    """
    async with AsyncExitStack() as stack:
        fleet = CacheFleet(tmp_path, stack)
        await fleet.start(["edge-a"])
        origin = fleet.origin
        kinds = ["no-store", "private", "cookie", "vary-star", "auth"]
        shared = ["cookie-public", "auth-public", "auth-s-maxage"]
        for kind in kinds + shared:
            origin.route(f"/{kind}", _personal(kind))
        alice, bob = fleet.user("edge-a"), fleet.user("edge-a")
        creds = {"alice": {"X-User": "alice"}, "bob": {"X-User": "bob"}}
        for kind in kinds + shared:
            if kind.startswith("auth"):
                creds["alice"]["Authorization"] = "Bearer alice"
                creds["bob"]["Authorization"] = "Bearer bob"
            else:
                creds["alice"].pop("Authorization", None)
                creds["bob"].pop("Authorization", None)
            a = await alice.fetch(f"/{kind}", headers=creds["alice"])
            b = await bob.fetch(f"/{kind}", headers=creds["bob"])
            assert a.body == f"{kind} for alice".encode()
            if kind in shared:
                assert (b.body, x_cache(b)) == (a.body, "HIT"), kind
            else:
                assert b.body == f"{kind} for bob".encode(), kind
                assert x_cache(b) == "MISS", kind
                assert len(origin.seen(f"/{kind}")) == 2, kind

        # Concurrently: bob waits for alice's fill of a cold key, which turns out private.
        origin.route("/private-cold", _personal("private"))
        origin.held.add(b"/private-cold")
        first = Deferred.fromCoroutine(alice.fetch("/private-cold", headers={"X-User": "alice"}))
        await wait_until(lambda: len(origin.waiting) == 1, "alice's fill at the origin")
        second = Deferred.fromCoroutine(bob.fetch("/private-cold", headers={"X-User": "bob"}))
        collapser = fleet.cache("edge-a").collapser
        await wait_until(
            lambda: collapser.waiting(f"{HOST}/private-cold\x00") == 1, "bob waiting for it"
        )
        origin.release("/private-cold")
        a, b = await first, await second
        assert (a.body, b.body) == (b"private for alice", b"private for bob")
        assert len(origin.seen("/private-cold")) == 2


@pytest_twisted.ensureDeferred
async def test_restart_serves_hits_and_applies_invalidations_missed_while_down(
    tmp_path: Path,
) -> None:
    """A restarted edge HITs its entries at once, except those invalidated while it was down."""
    async with AsyncExitStack() as stack:
        fleet = CacheFleet(tmp_path, stack)
        await fleet.start(EDGES)
        origin = fleet.origin
        origin.route("/p", cacheable(b"p1", tags="products"))
        origin.route("/u", cacheable(b"u1", tags="site"))
        user = fleet.user("edge-a")
        for path in ("/p", "/u"):
            assert x_cache(await user.fetch(path)) == "MISS"
            assert x_cache(await user.fetch(path)) == "HIT"
        await fleet.edges["edge-a"].stop()
        origin.route("/p", cacheable(b"p2", tags="products"))
        await fleet.invalidate(tags=["products"])
        before = len(origin.requests)
        edge = await fleet.start_edge("edge-a", synced=False)
        assert edge.service.cache.entry_count() == 1, "the invalidation was applied before serving"
        user = fleet.user("edge-a")
        u = await user.fetch("/u")
        assert (u.body, x_cache(u)) == (b"u1", "HIT")
        assert len(origin.requests) == before, "a HIT without asking the origin"
        p = await user.fetch("/p")
        assert (p.body, x_cache(p)) == (b"p2", "MISS")


@pytest_twisted.ensureDeferred
async def test_restart_with_the_master_down_never_serves_an_unverified_hit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no catch-up possible, loaded entries are revalidated before use (never a stale HIT)."""
    from edgeauth.edge.service import EdgeService

    monkeypatch.setattr(EdgeService, "CATCH_UP_WAIT", 0.2)
    async with AsyncExitStack() as stack:
        fleet = CacheFleet(tmp_path, stack)
        await fleet.start(["edge-a"])
        origin = fleet.origin
        origin.route("/p", cacheable(b"p1", tags="products", etag='"p1"'))
        user = fleet.user("edge-a")
        assert x_cache(await user.fetch("/p")) == "MISS"
        await fleet.edges["edge-a"].stop()
        await fleet.invalidate(tags=["products"])
        await fleet.master.stop()
        origin.route("/p", cacheable(b"p2", tags="products", etag='"p2"'))
        await fleet.start_edge("edge-a", synced=False)
        user = fleet.user("edge-a")
        p = await user.fetch("/p")
        assert (p.body, x_cache(p)) == (b"p2", "MISS")
        assert origin.seen("/p")[-1].header("If-None-Match") == '"p1"'
        again = await user.fetch("/p")
        assert (again.body, x_cache(again)) == (b"p2", "HIT")


@pytest_twisted.ensureDeferred
async def test_origin_down_serves_stale_if_error_else_502(tmp_path: Path) -> None:
    """With the origin gone: stale-if-error entries are served STALE, others get 502 JSON."""
    async with AsyncExitStack() as stack:
        fleet = CacheFleet(tmp_path, stack)
        await fleet.start(["edge-a"])
        origin = fleet.origin
        origin.route("/sie", cacheable(b"sie", cache_control="max-age=0, stale-if-error=600"))
        origin.route("/plain", cacheable(b"plain", cache_control="max-age=0"))
        origin.route("/sie500", cacheable(b"ok", cache_control="max-age=0, stale-if-error=600"))
        user = fleet.user("edge-a")
        for path in ("/sie", "/plain", "/sie500"):
            assert x_cache(await user.fetch(path)) == "MISS"
        origin.route("/sie500", Answer(500, [(b"Content-Type", b"text/plain")], b"boom"))
        failed = await user.fetch("/sie500")
        assert (failed.code, failed.body, x_cache(failed)) == (200, b"ok", "STALE")
        await origin.stop()
        stale = await user.fetch("/sie")
        assert (stale.code, stale.body, x_cache(stale)) == (200, b"sie", "STALE")
        plain = await user.fetch("/plain")
        assert plain.code == 502
        assert plain.header("Content-Type") == "application/json"
        assert plain.json()["error"] == "origin_unreachable"


@pytest_twisted.ensureDeferred
async def test_ttl_rule_listed_in_the_ini_sets_the_cache_ttl(tmp_path: Path) -> None:
    """A rule that lives in a test module, named in [ttl], changes how long entries stay fresh."""
    async with AsyncExitStack() as stack:
        fleet = CacheFleet(tmp_path, stack)
        await fleet.start(
            ["edge-a"], ttl={"rules": "ttl_rule_double"}, **{"ttl.ttl_rule_double": {"by": "3"}}
        )
        fleet.origin.route("/ttl", cacheable(b"t", cache_control="max-age=100"))
        user = fleet.user("edge-a")
        assert x_cache(await user.fetch("/ttl")) == "MISS"
        explained = await fleet.explain("edge-a", "/ttl")
        assert explained["ttl"] == 300
        assert explained["key"] == f"{HOST}/ttl"
