"""edgeauth.edge.cache.collapse: collapsed fills with bounded waits, the refresh limiter."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.task import Clock

from edgeauth.edge.cache.collapse import Collapser, RefreshLimiter


def collapser(clock: Clock, max_wait: float = 10.0) -> tuple[Collapser[str], list[str]]:
    timed_out: list[str] = []
    return Collapser(clock, max_wait, timed_out.append), timed_out


def test_waiters_get_the_fill_or_time_out() -> None:
    """Joiners wait for the running fill; after max_wait they are handed to on_timeout."""
    clock = Clock()
    c, timed_out = collapser(clock)
    assert not c.join("k", "early")
    fill = c.begin("k")
    with pytest.raises(ValueError):
        c.begin("k")
    assert c.join("k", "a", 1)
    clock.advance(5)
    assert c.join("k", "b", 2)
    assert c.waiting("k") == 2 and c.busy("k")
    clock.advance(5)
    assert timed_out == ["a"]
    assert c.finish(fill) == [("b", 2)]
    assert not c.busy("k")
    clock.advance(100)
    assert timed_out == ["a"], "finished waiters have no timer left"
    assert clock.getDelayedCalls() == []


def test_leave_release_and_detach() -> None:
    """A gone client leaves; release hands waiters back; detach frees the id for a new fill."""
    clock = Clock()
    c, timed_out = collapser(clock)
    old = c.begin("k")
    for item in ("a", "b", "c"):
        c.join("k", item)
    c.leave("k", "b")
    assert c.release(old) == [("a", 0), ("c", 0)]
    c.join("k", "d")
    c.detach("k")
    assert not c.busy("k") and not c.join("k", "e")
    new = c.begin("k")
    c.join("k", "f")
    assert c.finish(old) == [("d", 0)], "the old fill keeps the waiters it had"
    assert c.busy("k"), "finishing the detached fill leaves the new one alone"
    assert c.finish(new) == [("f", 0)]
    clock.advance(100)
    assert timed_out == [] and clock.getDelayedCalls() == []


class Refreshes:
    """Starts that record themselves and end when the test says."""

    def __init__(self) -> None:
        self.running: dict[str, Callable[[], None]] = {}
        self.started: list[str] = []

    def start(
        self, name: str, *, nothing_to_do: bool = False
    ) -> Callable[[Callable[[], None]], bool]:
        def run(release: Callable[[], None]) -> bool:
            if nothing_to_do:
                return False
            self.started.append(name)
            self.running[name] = release
            return True

        return run

    def end(self, name: str) -> None:
        self.running.pop(name)()


def test_refresh_limiter_runs_at_most_limit_in_fifo_order() -> None:
    """At most ``limit`` run; the rest start in order as slots free; one place per id."""
    limiter = RefreshLimiter(limit=2, max_queue=3)
    r = Refreshes()
    for name in "abcde":
        assert limiter.submit(name, r.start(name))
    assert not limiter.submit("c", r.start("c")), "already queued"
    assert not limiter.submit("a", r.start("a")), "already running"
    assert not limiter.submit("f", r.start("f")), "queue full"
    assert (r.started, limiter.running, limiter.queued, limiter.dropped) == (["a", "b"], 2, 3, 1)
    r.end("b")
    r.end("a")
    assert r.started == ["a", "b", "c", "d"]
    r.end("c")
    r.end("d")
    r.end("e")
    assert (limiter.running, limiter.queued, limiter.peak) == (0, 0, 2)


def test_refresh_limiter_skips_what_no_longer_needs_refreshing() -> None:
    """A start that finds nothing to do frees its slot at once, without deep recursion."""
    limiter = RefreshLimiter(limit=1, max_queue=100000)
    r = Refreshes()
    limiter.submit("first", r.start("first"))
    for n in range(20000):
        limiter.submit(f"skip{n}", r.start(f"skip{n}", nothing_to_do=True))
    limiter.submit("last", r.start("last"))
    r.end("first")
    assert r.started == ["first", "last"]
    assert (limiter.running, limiter.queued) == (1, 0)
    r.end("last")
    assert limiter.running == 0


def test_release_twice_frees_one_slot() -> None:
    """A release called twice (error paths) does not free a second slot."""
    limiter = RefreshLimiter(limit=1, max_queue=10)
    r = Refreshes()
    limiter.submit("a", r.start("a"))
    limiter.submit("b", r.start("b"))
    release = r.running["a"]
    release()
    release()
    assert limiter.running == 1 and r.started == ["a", "b"]
