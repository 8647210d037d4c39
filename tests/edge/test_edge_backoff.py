"""Tests of the subscriber's reconnect policy: full-jitter backoff and master rotation."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support import EDGE_TOKEN
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.web.client import Agent

from edgeauth.edge.metrics import EdgeMetrics
from edgeauth.edge.state import EdgeState
from edgeauth.edge.store import EdgeStore
from edgeauth.edge.subscriber import BACKOFF_BASE, BACKOFF_CAP, Subscriber, backoff_delay

REFUSED_A = "http://127.0.0.1:1"
REFUSED_B = "http://127.0.0.2:1"


class RecordingRandom(random.Random):
    """A seeded RNG that remembers every ``uniform`` bound it was asked for."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.bounds: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.bounds.append((a, b))
        return super().uniform(a, b)


class TopRandom(random.Random):
    """An RNG whose ``uniform`` always answers the upper bound (the longest wait allowed)."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def until(cond: Any, timeout: float = 5.0, what: str = "condition") -> None:
    """Wait, on the real reactor, until ``cond()`` holds; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not cond():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


@pytest.mark.parametrize("attempt", range(0, 40))
def test_delay_within_full_jitter_bounds(attempt: int) -> None:
    """Every delay lies in [0, min(cap, base * 2**attempt)]."""
    rng = random.Random(attempt)
    bound = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
    delays = [backoff_delay(attempt, rng) for _ in range(500)]
    assert all(0.0 <= d <= bound for d in delays)
    # Full jitter spreads over the whole interval, not just near its top.
    assert min(delays) < bound * 0.1
    assert max(delays) > bound * 0.9


def test_bound_doubles_then_caps_at_30_seconds() -> None:
    """The upper bound doubles per attempt from 0.5 s and stops at 30 s, even for huge attempts."""
    top = TopRandom()
    bounds = [backoff_delay(n, top) for n in range(10)]
    assert bounds == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert BACKOFF_CAP == 30.0
    assert backoff_delay(10_000, top) == 30.0
    assert backoff_delay(10_000, random.Random(1)) <= 30.0


def test_custom_base_and_cap() -> None:
    """``base`` and ``cap`` are honoured."""
    top = TopRandom()
    assert backoff_delay(0, top, base=2.0, cap=5.0) == 2.0
    assert backoff_delay(1, top, base=2.0, cap=5.0) == 4.0
    assert backoff_delay(2, top, base=2.0, cap=5.0) == 5.0


def test_delays_come_from_the_injected_rng() -> None:
    """The same seed gives the same delays; another seed gives others; the RNG sees the bound."""
    first = [backoff_delay(n, random.Random(42)) for n in range(12)]
    again = [backoff_delay(n, random.Random(42)) for n in range(12)]
    other = [backoff_delay(n, random.Random(43)) for n in range(12)]
    assert first == again
    assert first != other
    rng = RecordingRandom(7)
    backoff_delay(3, rng)
    assert rng.bounds == [(0.0, 4.0)]


def test_jitter_is_roughly_uniform() -> None:
    """With a seeded RNG the delays of one attempt average about half the bound."""
    rng = random.Random(2024)
    delays = [backoff_delay(4, rng) for _ in range(4000)]
    mean = sum(delays) / len(delays)
    assert 3.8 < mean < 4.2  # bound 8 s; the mean of U[0, 8] is 4
    below_half = sum(1 for d in delays if d < 4.0) / len(delays)
    assert 0.45 < below_half < 0.55


async def _start_loop(
    tmp_path: Path, clock: Clock, rng: random.Random, masters: list[str]
) -> tuple[Subscriber, EdgeStore]:
    store = EdgeStore(str(tmp_path / "edge.sqlite3"), reactor)
    state = EdgeState(store, clock, "edge-t")
    await state.load()
    sub = Subscriber(
        clock,
        state,
        masters,
        EDGE_TOKEN,
        "edge-t",
        EdgeMetrics(),
        tail_probe_interval=1e9,
        rng=rng,
        # Real connections on the real reactor; every wait of the loop is on ``clock``.
        agent=Agent(reactor, connectTimeout=5),
    )
    sub.start()
    return sub, store


def _pending_backoff(clock: Clock) -> float:
    """Return the delay of the one backoff wait pending on ``clock``."""
    now = clock.seconds()
    # The tail probe waits 1e9 s and a bootstrap request times out after 300 s: a backoff is
    # the only call due within the 30 s cap.
    due = [c.getTime() - now for c in clock.getDelayedCalls() if c.getTime() - now <= BACKOFF_CAP]
    assert len(due) == 1, f"expected one backoff wait, found {due}"
    return due[0]


@pytest_twisted.ensureDeferred
async def test_loop_backs_off_longer_each_failure_and_rotates(tmp_path: Path) -> None:
    """Against refused masters the loop waits 0.5, 1, 2 ... 30 s (cap) and alternates masters."""
    clock = Clock()
    clock.advance(1_000_000)
    sub, store = await _start_loop(tmp_path, clock, TopRandom(), [REFUSED_A, REFUSED_B])
    delays: list[float] = []
    tried: list[str | None] = []
    try:
        for attempt in range(8):
            await until(lambda n=attempt: sub.status.reconnects == n + 1, what="a failure")
            tried.append(sub.status.master)
            delay = _pending_backoff(clock)
            delays.append(delay)
            # Nothing is tried again before the wait is over.
            clock.advance(delay * 0.99)
            await deferLater(reactor, 0.05, lambda: None)
            assert sub.status.reconnects == attempt + 1
            clock.advance(delay * 0.01 + 1e-6)
        assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
        assert tried == [REFUSED_A, REFUSED_B] * 4
        assert sub.metrics.reconnects.labels(reason="error")._value.get() == 8
        assert not sub.first_sync.called
        assert not sub.state.synced
    finally:
        await sub.stop()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_loop_delays_are_reproducible_with_a_seed(tmp_path: Path) -> None:
    """The loop's waits are exactly ``backoff_delay(n, Random(seed))`` for n = 0, 1, 2 ..."""
    seed = 1234
    expected_rng = random.Random(seed)
    expected = [backoff_delay(n, expected_rng) for n in range(4)]
    clock = Clock()
    rng = RecordingRandom(seed)
    sub, store = await _start_loop(tmp_path, clock, rng, [REFUSED_A])
    delays: list[float] = []
    try:
        for attempt in range(4):
            await until(lambda n=attempt: sub.status.reconnects == n + 1, what="a failure")
            delay = _pending_backoff(clock)
            delays.append(delay)
            clock.advance(delay + 1e-6)
        assert delays == pytest.approx(expected)
        assert rng.bounds[:4] == [(0.0, 0.5 * 2**n) for n in range(4)]
    finally:
        await sub.stop()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_stop_during_backoff_ends_loop(tmp_path: Path) -> None:
    """``stop()`` during a backoff wait ends the loop without waiting for the delay."""
    clock = Clock()
    sub, store = await _start_loop(tmp_path, clock, TopRandom(), [REFUSED_A])
    try:
        await until(lambda: sub.status.reconnects == 1, what="a failure")
        assert _pending_backoff(clock) == 0.5
        done: Deferred[None] = Deferred.fromCoroutine(sub.stop())
        await until(lambda: done.called, timeout=2.0, what="stop")
        assert [c for c in clock.getDelayedCalls() if c.active()] == []
    finally:
        await store.close()
