"""The start/stop pattern both daemons share: an asynchronous start under twistd.

twistd calls ``startService`` synchronously, but opening a database and listening are
asynchronous. :class:`AsyncStartService` runs the subclass's ``start()`` coroutine, exposes
``ready`` (fires when listening, errbacks on failure), turns an operating problem (port taken,
unusable database path, bad configuration) into one log line and a stopped reactor, and makes
twistd exit with status 1 in that case.
"""

from __future__ import annotations

import atexit
import os
import sqlite3
import sys
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeauth.config import ConfigError

log = Logger()

OPERATING_ERRORS = (ConfigError, CannotListenError, OSError, sqlite3.Error)


class AsyncStartService(service.Service):
    """A service whose ``start()`` and ``stop()`` are coroutines; subclasses define both."""

    role = "service"
    reactor: Any

    def __init__(self) -> None:
        """Prepare ``ready`` and the start bookkeeping."""
        self.ready: Deferred[None] = Deferred()
        self._starting: Deferred[None] | None = None

    async def start(self) -> None:
        """Open what the service needs, then listen (subclasses)."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Close in reverse order of :meth:`start` (subclasses)."""
        raise NotImplementedError

    def startService(self) -> None:
        """Start asynchronously; a failure to start stops the process with a clear message."""
        super().startService()
        d = Deferred.fromCoroutine(self.start())
        self._starting = d

        def started(_: object) -> None:
            self.ready.callback(None)

        def failed(failure: Failure) -> None:
            if failure.check(*OPERATING_ERRORS):
                # An operating problem (port taken, unusable database path): one line says it.
                why = failure.getErrorMessage()
                log.critical("edgeauth {role} failed to start: {why}", role=self.role, why=why)
            else:
                log.failure("edgeauth {role} failed to start", failure, role=self.role)
            self.ready.errback(failure)
            if IReactorCore.providedBy(self.reactor):
                # The failure may come before the reactor runs (twistd starts services first).
                self.reactor.callWhenRunning(self.reactor.stop)

        d.addCallbacks(started, failed)

    async def wait_started(self) -> None:
        """Wait for a start in progress to end, however it ends (before stopping)."""
        starting = self._starting
        if starting is not None and not starting.called:
            try:
                await starting
            except Exception:
                pass

    def stopService(self) -> Deferred[None]:
        """Stop in reverse order of start."""
        super().stopService()
        return Deferred.fromCoroutine(self.stop())


def exit_status_one(_: object) -> None:
    """Make twistd end with status 1 after its orderly shutdown (twistd has no exit-status API)."""

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        os._exit(1)

    atexit.register(leave)


def run_twistd(plugin: str) -> None:  # pragma: no cover - convenience for `python -m ...`
    """Run a plugin in the foreground, like ``twistd -n PLUGIN ARGS``."""
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "-n", plugin, *sys.argv[1:]]
    run()
