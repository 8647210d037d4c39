"""edgeauth.edge.cache.store: LRU bounds, indexes and invalidation, with times passed in."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from edgeauth.edge.cache.policy import NO_RULES, Selector, parse_selector
from edgeauth.edge.cache.store import CacheStore, Entry, SortedStrings


def entry(
    key: str,
    *,
    variant: str = "",
    vary: tuple[bytes, ...] = (),
    tags: tuple[str, ...] = (),
    body: bytes = b"x",
    fresh_until: float = 100.0,
    stale_until: float | None = None,
    error_until: float | None = None,
    must_revalidate: bool = False,
    size: int = 0,
) -> Entry:
    """An entry received at t=0."""
    return Entry(
        key=key,
        variant=variant,
        vary=vary,
        status=200,
        reason=b"OK",
        headers=(),
        serve_headers=(),
        body=body,
        tags=tags,
        request_time=0.0,
        response_time=0.0,
        initial_age=0.0,
        ttl=fresh_until,
        fresh_until=fresh_until,
        stale_until=fresh_until if stale_until is None else stale_until,
        error_until=fresh_until if error_until is None else error_until,
        must_revalidate=must_revalidate,
        no_cache=False,
        etag=None,
        last_modified=None,
        stored_at=0.0,
        size=size,
    )


def selector(**kw: Any) -> Selector:
    """A selector from event-style lists."""
    return Selector.parse(kw.get("tags", ()), kw.get("keys", ()), kw.get("prefixes", ()), False)


def test_lru_by_entries_keeps_the_recently_used() -> None:
    """max_entries evicts the least recently used; a lookup counts as a use."""
    store = CacheStore(max_entries=3, max_bytes=10**9)
    a, b, c, d = (entry(f"h/{n}") for n in "abcd")
    for e in (a, b, c):
        assert store.put(e) == []
    store.touch(a)
    assert store.put(d) == [b]
    assert {e.key for e in store} == {"h/a", "h/c", "h/d"}
    assert store.evictions == 1
    store.check()


def test_lru_by_bytes() -> None:
    """max_bytes counts every entry's size; an entry larger than everything is refused."""
    store = CacheStore(max_entries=100, max_bytes=1000)
    small = [entry(f"h/{n}", size=300) for n in range(3)]
    for e in small:
        store.put(e)
    assert store.put(entry("h/big", size=400)) == [small[0]]
    assert store.bytes == 1000
    huge = entry("h/huge", size=1001)
    assert store.put(huge) == [huge]
    store.check()


def test_variants_and_a_changed_vary() -> None:
    """Variants live side by side; a response with another Vary replaces all of them."""
    store = CacheStore(10, 10**6)
    vary = (b"accept-language",)
    en = entry("h/p", variant="accept-language=en", vary=vary)
    fr = entry("h/p", variant="accept-language=fr", vary=vary)
    store.put(en)
    store.put(fr)
    found, variant = store.lookup("h/p", Headers({b"accept-language": [b"fr"]}))
    assert (found, variant) == (fr, "accept-language=fr")
    plain = entry("h/p")
    assert sorted(e.variant for e in store.put(plain)) == [
        "accept-language=en",
        "accept-language=fr",
    ]
    assert store.variants("h/p") == [plain]
    store.check()


def test_invalidation_by_tag_key_prefix_and_hosts() -> None:
    """Tags are whole; host-less keys/prefixes apply on every host; host ones on theirs."""
    store = CacheStore(100, 10**6)
    keys = ["a.example/p/1", "b.example/p/1", "a.example/p/2", "a.example/q", "a.example/"]
    for n, key in enumerate(keys):
        store.put(entry(key, tags=("ab",) if n == 0 else ("a",)))

    def keys_of(sel: Selector) -> set[str]:
        return store.matching_keys(sel)

    assert keys_of(selector(tags=["a"])) == set(keys[1:])
    assert keys_of(selector(tags=["ab"])) == {keys[0]}
    assert keys_of(selector(keys=["/p/1"])) == {keys[0], keys[1]}
    assert keys_of(selector(keys=["b.example/p/1"])) == {keys[1]}
    assert keys_of(selector(keys=["/"])) == {"a.example/"}
    assert keys_of(selector(prefixes=["/p/"])) == {keys[0], keys[1], keys[2]}
    assert keys_of(selector(prefixes=["a.example/p"])) == {keys[0], keys[2]}
    assert keys_of(selector(prefixes=["/"])) == set(keys)
    result = store.invalidate(selector(prefixes=["/p"]), soft=False, now=1.0)
    assert sorted(e.key for e in result.removed) == sorted(keys[:3])
    assert sorted(e.key for e in store) == ["a.example/", "a.example/q"]
    store.check()


def test_soft_purge_never_extends_life() -> None:
    """Soft purges lower fresh_until only; stale serving ends at the original deadline."""
    store = CacheStore(10, 10**6)
    e = entry("h/s", tags=("t",), fresh_until=100.0, stale_until=150.0, error_until=400.0)
    store.put(e)
    store.invalidate(selector(tags=["t"]), soft=True, now=10.0)
    assert (e.fresh_until, e.stale_until, e.error_until, e.soft) == (10.0, 150.0, 400.0, True)
    store.invalidate(selector(tags=["t"]), soft=True, now=50.0)
    assert (e.fresh_until, e.stale_until, e.error_until) == (10.0, 150.0, 400.0)
    assert not e.fresh_for(20.0, NO_RULES)
    assert e.stale_servable(149.0) and not e.stale_servable(150.0)
    assert e.state(20.0) == "soft-purged" and e.state(200.0) == "soft-purged"
    late = entry("h/late", tags=("t",), fresh_until=100.0)
    store.put(late)
    store.invalidate(selector(tags=["t"]), soft=True, now=300.0)
    assert late.fresh_until == 100.0 and not late.stale_servable(300.0)
    strict = entry("h/strict", tags=("t",), fresh_until=100.0, must_revalidate=True)
    store.put(strict)
    store.invalidate(selector(tags=["t"]), soft=True, now=10.0)
    assert not strict.stale_servable(11.0)
    store.check()


def test_hard_after_soft_and_all() -> None:
    """A hard purge removes soft-purged entries; ``all`` hard clears every index."""
    store = CacheStore(10, 10**6)
    for n in range(4):
        store.put(entry(f"h/{n}", tags=("t",)))
    store.invalidate(selector(tags=["t"]), soft=True, now=1.0)
    gone = store.invalidate(selector(keys=["/1"]), soft=False, now=2.0)
    assert [e.key for e in gone.removed] == ["h/1"]
    assert store.get("h/1", "") is None
    store.invalidate(Selector(all=True), soft=False, now=3.0)
    assert len(store) == 0 and store.bytes == 0
    assert store.matching_keys(selector(tags=["t"], prefixes=["/"])) == set()
    store.check()


def test_unverified_entries_are_not_served_as_they_are() -> None:
    """An entry loaded at start is neither fresh nor stale-servable until verified."""
    e = entry("h/u", stale_until=200.0, error_until=300.0)
    e.verified = False
    assert not e.fresh_for(1.0, NO_RULES)
    assert not e.stale_servable(1.0) and not e.usable_on_error(1.0)
    assert e.state(1.0) == "unverified"


def test_request_max_age_and_min_fresh() -> None:
    """A client's max-age and min-fresh narrow what counts as fresh."""
    from edgeauth.edge.cache.policy import RequestRules

    e = entry("h/f", fresh_until=100.0)
    assert e.fresh_for(50.0, RequestRules(max_age=60))
    assert not e.fresh_for(50.0, RequestRules(max_age=40))
    assert not e.fresh_for(95.0, RequestRules(min_fresh=10))


ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "touch", "tag", "key", "prefix", "soft", "remove"]),
        st.integers(0, 30),
        st.integers(0, 5),
    ),
    max_size=120,
)


@given(ops)
def test_indexes_stay_consistent_under_any_sequence(sequence: list[tuple[str, int, int]]) -> None:
    """Whatever happens (puts, evictions, invalidations), every index agrees with the entries."""
    store = CacheStore(max_entries=8, max_bytes=8 * 600)
    for op, n, t in sequence:
        key = f"h{n % 3}/k{n}"
        if op == "put":
            store.put(entry(key, tags=(f"t{t}", f"t{(t + 1) % 6}"), size=500 + n))
        elif op == "touch":
            found = store.get(key, "")
            if found is not None:
                store.touch(found)
        elif op == "remove":
            found = store.get(key, "")
            if found is not None:
                assert store.remove(found)
        elif op == "soft":
            store.invalidate(selector(tags=[f"t{t}"]), soft=True, now=float(n))
        else:
            sel = {
                "tag": selector(tags=[f"t{t}"]),
                "key": selector(keys=[f"/k{n}"]),
                "prefix": selector(prefixes=[f"/k{t}"]),
            }[op]
            expected = {e.key for e in store if sel.matches(e.key, e.tags)}
            result = store.invalidate(sel, soft=False, now=0.0)
            assert result.keys == expected
            assert not any(sel.matches(e.key, e.tags) for e in store)
        store.check()


@given(st.lists(st.tuples(st.booleans(), st.text("ab/", max_size=5)), max_size=300))
def test_sorted_strings_against_a_model(sequence: list[tuple[bool, str]]) -> None:
    """SortedStrings behaves like a sorted set, prefix scans included."""
    SortedStrings._LOAD = 4  # small chunks, so splits and merges happen
    try:
        index = SortedStrings()
        model: set[str] = set()
        for add, value in sequence:
            if add and value not in model:
                index.add(value)
                model.add(value)
            elif not add:
                index.discard(value)
                model.discard(value)
            assert list(index) == sorted(model) and len(index) == len(model)
        for prefix in ("", "a", "ab", "/", "b/a"):
            assert index.starting_with(prefix) == sorted(v for v in model if v.startswith(prefix))
    finally:
        SortedStrings._LOAD = 512


def test_parse_selector_agrees_with_the_store() -> None:
    """The store's host-less key lookup uses the same target normalisation as requests."""
    store = CacheStore(10, 10**6)
    store.put(entry("h/a%20b"))
    assert parse_selector("/a b") == (None, "/a%20b")
    assert store.keys_for_target("/a%20b") == ["h/a%20b"]
