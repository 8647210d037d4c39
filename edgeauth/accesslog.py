"""Access logs of a ``Site``: off, buffered and written off the reactor thread, or sampled.

Twisted's ``Site`` formats and writes one line per request through the legacy log system (the
twistd log), about 34 µs a request: a fifth or more of what an edge spends proxying one, and a
fifth of what the master spends on a ban. :class:`AccessLogSite` replaces ``Site.log`` with an
:class:`AccessLog`:

- ``off`` (:class:`NoAccessLog`): nothing at all;
- ``buffered`` (:class:`BufferedAccessLog`): Combined Log Format lines collected in a list and
  appended to a file every ``flush_interval`` seconds or every ``flush_lines`` lines, the write
  done in a thread pool (``deferToThreadPool``), one batch at a time and in order, so the reactor
  never blocks on the disk; a stalled disk costs dropped lines (counted), never memory without
  bound;
- ``sampled`` (:class:`SampledAccessLog`): one request in ``every`` goes to the buffered log.

The file is opened for each batch, so a log rotated by moving it needs no signal. Nothing here
depends on the role: the edge (:mod:`edgeauth.edge.accesslog`) and the master use it alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web import http
from twisted.web.http import combinedLogFormatter, datetimeToLogString
from typing_extensions import override

from edgeauth.sites import ClosingSite

__all__ = [
    "ACCESS_LOG_MODES",
    "AccessLog",
    "BufferedAccessLog",
    "AccessLogSite",
    "NoAccessLog",
    "SampledAccessLog",
    "make_access_log",
]

_log = Logger()

ACCESS_LOG_MODES = ("off", "buffered", "sampled")
"""The values of the access log ``mode`` option."""

Formatter = Callable[[str, http.Request], str]
"""``formatter(timestamp, request) -> line``, as Twisted's ``IAccessLogFormatter``."""


class AccessLog(Protocol):
    """Where :class:`EdgeSite` sends each finished request."""

    def log(self, request: http.Request) -> None:
        """Record ``request``; must be cheap and must not block."""

    def start(self) -> None:
        """Begin periodic work (the site started listening)."""

    def stop(self) -> Deferred[None]:
        """Stop periodic work and write what is buffered; fires when written."""


class NoAccessLog:
    """The ``off`` mode: requests are not logged."""

    def log(self, request: http.Request) -> None:
        """Do nothing."""

    def start(self) -> None:
        """Do nothing."""

    def stop(self) -> Deferred[None]:
        """Do nothing."""
        return succeed(None)


def _append(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8", newline="\n") as f:
        f.write(text)


class BufferedAccessLog:
    """Combined Log Format lines, buffered and appended to ``path`` by a thread.

    Args:
        reactor: provides ``IReactorTime`` and ``IReactorFromThreads`` (and ``IReactorThreads``
            when ``threadpool`` is not given).
        path: the log file, opened in append mode for each batch.
        threadpool: where writes run; the reactor's thread pool by default.
        flush_interval: seconds between periodic writes.
        flush_lines: a write starts as soon as this many lines are buffered.
        max_batches: batches allowed to wait for the disk; lines beyond are dropped and counted.
        formatter: turns ``(timestamp, request)`` into a line (Twisted's combined format).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        path: str,
        *,
        threadpool: ThreadPool | None = None,
        flush_interval: float = 1.0,
        flush_lines: int = 1000,
        max_batches: int = 64,
        formatter: Formatter = combinedLogFormatter,
    ) -> None:
        if flush_interval <= 0 or flush_lines < 1 or max_batches < 1:
            raise ValueError("flush_interval, flush_lines and max_batches must be positive")
        if threadpool is None:
            assert IReactorThreads.providedBy(reactor)
            threadpool = reactor.getThreadPool()  # type: ignore[attr-defined]
        self._reactor = reactor
        self._threadpool = threadpool
        self.path = path
        self.flush_interval = flush_interval
        self.flush_lines = flush_lines
        self.max_batches = max_batches
        self._formatter = formatter
        self._lines: list[str] = []
        self._lock = DeferredLock()
        self._batches = 0
        self._second = -1
        self._timestamp = ""
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self.written = 0
        """Lines written so far."""
        self.dropped = 0
        """Lines lost: the disk was too slow (``max_batches``) or a write failed."""

    def log(self, request: http.Request) -> None:
        """Format ``request`` now and buffer the line."""
        second = int(self._reactor.seconds())
        if second != self._second:
            self._second = second
            self._timestamp = datetimeToLogString(second)
        self._lines.append(self._formatter(self._timestamp, request) + "\n")
        if len(self._lines) >= self.flush_lines:
            self.flush()

    def flush(self) -> Deferred[None]:
        """Hand the buffered lines to the thread pool.

        Returns:
            A Deferred that fires once these lines and every earlier batch are written (or
            dropped); it never fails.
        """
        lines, self._lines = self._lines, []
        if not lines or self._batches >= self.max_batches:
            self.dropped += len(lines)
            return self._lock.run(succeed, None)
        self._batches += 1
        d: Deferred[Any] = self._lock.run(self._write, "".join(lines))
        d.addBoth(self._written, len(lines))
        return d

    def _write(self, text: str) -> Deferred[None]:
        assert IReactorFromThreads.providedBy(self._reactor)
        return deferToThreadPool(
            self._reactor, self._threadpool, self._append_file, self.path, text
        )

    @staticmethod
    def _append_file(path: str, text: str) -> None:
        """Append ``text`` to the file ``path`` (runs in a pool thread)."""
        _append(path, text)

    def _written(self, result: object, count: int) -> None:
        self._batches -= 1
        if isinstance(result, Failure):
            self.dropped += count
            _log.failure("cannot write the access log {path}", result, path=self.path)
        else:
            self.written += count

    def _tick(self) -> None:
        if self._lines:
            self.flush()

    def start(self) -> None:
        """Start the periodic flush."""
        if not self._loop.running:
            self._loop.start(self.flush_interval, now=False)

    def stop(self) -> Deferred[None]:
        """Stop the periodic flush and write what is left."""
        if self._loop.running:
            self._loop.stop()
        return self.flush()


class SampledAccessLog:
    """The ``sampled`` mode: one request in ``every`` is passed on to ``inner``.

    The first request is logged, then every ``every``-th after it (deterministic, no RNG).
    """

    def __init__(self, inner: AccessLog, every: int) -> None:
        if every < 1:
            raise ValueError("every must be >= 1")
        self.inner = inner
        self.every = every
        self._skip = 0

    def log(self, request: http.Request) -> None:
        """Pass ``request`` on if its turn has come."""
        if self._skip:
            self._skip -= 1
            return
        self._skip = self.every - 1
        self.inner.log(request)

    def start(self) -> None:
        """Start ``inner``."""
        self.inner.start()

    def stop(self) -> Deferred[None]:
        """Stop ``inner``."""
        return self.inner.stop()


def make_access_log(
    mode: str,
    reactor: IReactorTime,
    path: str | None = None,
    *,
    sample_every: int = 100,
    flush_interval: float = 1.0,
    flush_lines: int = 1000,
    threadpool: ThreadPool | None = None,
    buffered_class: type[BufferedAccessLog] | None = None,
) -> AccessLog:
    """Build the access log for ``mode`` (one of :data:`ACCESS_LOG_MODES`).

    ``buffered_class`` replaces :class:`BufferedAccessLog` (a subclass).

    Raises:
        ValueError: an unknown mode, or ``buffered``/``sampled`` without ``path``.
    """
    if mode == "off":
        return NoAccessLog()
    if mode not in ACCESS_LOG_MODES:
        raise ValueError(f"access log mode must be one of {ACCESS_LOG_MODES}, not {mode!r}")
    if not path:
        raise ValueError(f"access log mode {mode!r} needs a path")
    buffered = (buffered_class or BufferedAccessLog)(
        reactor,
        path,
        threadpool=threadpool,
        flush_interval=flush_interval,
        flush_lines=flush_lines,
    )
    return buffered if mode == "buffered" else SampledAccessLog(buffered, sample_every)


class AccessLogSite(ClosingSite):
    """A :class:`edgeauth.sites.ClosingSite` that logs through an :class:`AccessLog`.

    Args:
        resource: the root resource.
        reactor: the reactor (connection timeouts, log timestamps).
        access_log: where finished requests go; :class:`NoAccessLog` by default.
        **kwargs: passed to ``Site`` (e.g. ``timeout``).
    """

    def __init__(
        self,
        resource: Any,
        *,
        reactor: IReactorTime,
        access_log: AccessLog | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, reactor=reactor, **kwargs)
        self.access_log: AccessLog = access_log if access_log is not None else NoAccessLog()

    @override
    def log(self, request: http.Request) -> None:
        """Send ``request`` to the access log."""
        self.access_log.log(request)

    @override
    def startFactory(self) -> None:
        """Start the access log (Twisted's log file and its date timer are not used)."""
        self.access_log.start()

    @override
    def stopFactory(self) -> None:
        """Stop the access log; its last batch is written in the background."""
        super().stopFactory()
        self.access_log.stop()
