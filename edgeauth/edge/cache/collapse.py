"""One origin request per key: collapsed fills with bounded waits, and the refresh limiter.

Both classes are sans-io bookkeeping; the origin requests themselves are made by
:mod:`edgeauth.edge.cache.fetch`, which calls in here. Time comes from an injected ``IReactorTime``.

- :class:`Collapser`: while a fill for a fill id (key + variant) is running, other requests for it
  wait for its result instead of asking the origin too. Each wait is bounded: after ``max_wait``
  seconds the waiter is handed to ``on_timeout`` (the cache then sends it to the origin itself).
  A fill hands its waiters back early when its response turns out not storable (they go to the
  origin themselves) and at its end.
- :class:`RefreshLimiter`: at most ``limit`` background refreshes run at once; more wait in a FIFO
  queue (one place per id, so a refresh is never queued twice) of at most ``max_queue`` ids. A mass
  soft purge followed by a burst of requests thus reaches the origin ``limit`` requests at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Collapser", "Fill", "RefreshLimiter", "StartRefresh"]

W = TypeVar("W")


class _Waiter(Generic[W]):
    __slots__ = ("item", "seq", "timer")

    def __init__(self, item: W, seq: int, timer: IDelayedCall | None) -> None:
        self.item = item
        self.seq = seq
        self.timer = timer


class Fill(Generic[W]):
    """One running fill: the handle its owner keeps (it outlives a :meth:`Collapser.detach`)."""

    __slots__ = ("fill_id", "waiters", "registered")

    def __init__(self, fill_id: str) -> None:
        self.fill_id = fill_id
        self.waiters: list[_Waiter[W]] = []
        self.registered = True


class Collapser(Generic[W]):
    """Running fills by id, and the requests waiting for each (module docstring)."""

    def __init__(
        self, clock: IReactorTime, max_wait: float, on_timeout: Callable[[W], None]
    ) -> None:
        """Time waits with ``clock``; hand a waiter that waited ``max_wait`` s to ``on_timeout``."""
        self.clock = clock
        self.max_wait = max_wait
        self.on_timeout = on_timeout
        self._fills: dict[str, Fill[W]] = {}
        self.collapsed = 0

    def __len__(self) -> int:
        return len(self._fills)

    def busy(self, fill_id: str) -> bool:
        """Whether a fill for ``fill_id`` is running (and takes waiters)."""
        return fill_id in self._fills

    def waiting(self, fill_id: str) -> int:
        """How many requests wait for the fill of ``fill_id``."""
        fill = self._fills.get(fill_id)
        return 0 if fill is None else len(fill.waiters)

    def begin(self, fill_id: str) -> Fill[W]:
        """Record that a fill for ``fill_id`` starts (there must be none running)."""
        if fill_id in self._fills:
            raise ValueError(f"a fill for {fill_id!r} is already running")
        fill: Fill[W] = Fill(fill_id)
        self._fills[fill_id] = fill
        return fill

    def join(self, fill_id: str, item: W, seq: int = 0) -> bool:
        """Make ``item`` wait for the running fill of ``fill_id``.

        Args:
            fill_id: the fill to wait for.
            item: the waiter (a request).
            seq: a number the fill's owner compares with its own (the cache passes its
                invalidation counter, to tell waiters that came after an invalidation).

        Returns:
            False if no fill for ``fill_id`` is running (nothing was recorded).
        """
        fill = self._fills.get(fill_id)
        if fill is None:
            return False
        waiter = _Waiter(item, seq, None)
        waiter.timer = self.clock.callLater(self.max_wait, self._expire, fill, waiter)
        fill.waiters.append(waiter)
        self.collapsed += 1
        return True

    def leave(self, fill_id: str, item: W) -> None:
        """Forget ``item`` (its client went away)."""
        fill = self._fills.get(fill_id)
        if fill is None:
            return
        for waiter in fill.waiters:
            if waiter.item is item:
                fill.waiters.remove(waiter)
                self._cancel(waiter)
                return

    def detach(self, fill_id: str) -> None:
        """Let later requests for ``fill_id`` start a new fill (the running one was purged).

        The running fill keeps the waiters it has; its owner still ends it with :meth:`finish`.
        """
        fill = self._fills.pop(fill_id, None)
        if fill is not None:
            fill.registered = False

    def release(self, fill: Fill[W]) -> list[tuple[W, int]]:
        """Hand back the current waiters (``(item, seq)``); the fill goes on without them."""
        waiters, fill.waiters = fill.waiters, []
        return self._hand_back(waiters)

    def finish(self, fill: Fill[W]) -> list[tuple[W, int]]:
        """End ``fill``; return its waiters (``(item, seq)``)."""
        if fill.registered:
            fill.registered = False
            del self._fills[fill.fill_id]
        return self.release(fill)

    def _hand_back(self, waiters: list[_Waiter[W]]) -> list[tuple[W, int]]:
        for waiter in waiters:
            self._cancel(waiter)
        return [(w.item, w.seq) for w in waiters]

    @staticmethod
    def _cancel(waiter: _Waiter[W]) -> None:
        timer, waiter.timer = waiter.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _expire(self, fill: Fill[W], waiter: _Waiter[W]) -> None:
        waiter.timer = None
        if waiter in fill.waiters:
            fill.waiters.remove(waiter)
            self.on_timeout(waiter.item)


StartRefresh = Callable[[Callable[[], None]], bool]
"""Starts one refresh and returns True, calling the given ``release`` when it ends; or returns
False when, by now, there is nothing to refresh."""


class RefreshLimiter:
    """At most ``limit`` refreshes at once; the rest queue, one place per id (module docstring)."""

    def __init__(self, limit: int, max_queue: int) -> None:
        """Run ``limit`` refreshes at once and queue at most ``max_queue`` more."""
        self.limit = limit
        self.max_queue = max_queue
        self.running = 0
        self.peak = 0
        self.dropped = 0
        self._active: set[str] = set()
        self._queue: OrderedDict[str, StartRefresh] = OrderedDict()
        self._draining = False

    @property
    def queued(self) -> int:
        """Refreshes waiting for a slot."""
        return len(self._queue)

    def pending(self, refresh_id: str) -> bool:
        """Whether a refresh for ``refresh_id`` is running or queued."""
        return refresh_id in self._active or refresh_id in self._queue

    def submit(self, refresh_id: str, start: StartRefresh) -> bool:
        """Run ``start`` now if a slot is free, else queue it.

        Returns:
            False if the refresh was not taken: one for ``refresh_id`` is already running or
            queued, or the queue is full.
        """
        if self.pending(refresh_id):
            return False
        if self.running < self.limit:
            self._start(refresh_id, start)
            return True
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            return False
        self._queue[refresh_id] = start
        return True

    def clear(self) -> None:
        """Drop the queued refreshes (running ones go on)."""
        self._queue.clear()

    def _start(self, refresh_id: str, start: StartRefresh) -> None:
        self.running += 1
        self._active.add(refresh_id)
        self.peak = max(self.peak, self.running)
        done = False

        def release() -> None:
            nonlocal done
            if done:
                return
            done = True
            self.running -= 1
            self._active.discard(refresh_id)
            self._drain()

        try:
            started = start(release)
        except Exception:
            release()
            raise
        if not started:
            release()

    def _drain(self) -> None:
        if self._draining:
            return  # the loop below is already running further up the stack
        self._draining = True
        try:
            while self._queue and self.running < self.limit:
                refresh_id, start = self._queue.popitem(last=False)
                self._start(refresh_id, start)
        finally:
            self._draining = False
