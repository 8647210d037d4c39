"""``twistd edgeauth-master``: options and the service that runs log, fan-out and listener.

Start-up is ordered: the log is opened (and retention applied) before the listener opens, so no
request ever meets a half-open store; stop runs in reverse: the listener closes, live streams end,
pending commits finish, then the database closes.
"""

from __future__ import annotations

import gc
import inspect
import sqlite3
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from edgeauth import logs, tls
from edgeauth.accesslog import AccessLogSite, make_access_log
from edgeauth.config import COMMAND_LINE, ConfigError, Settings, database_error, load_settings
from edgeauth.master.api import MasterRoot, OperatorAPI
from edgeauth.master.auth import RefusalLog, SessionStore, TokenAuthority
from edgeauth.master.fanout import Fanout
from edgeauth.master.log import IEventLog, SqliteEventLog
from edgeauth.master.metrics import MasterMetrics
from edgeauth.master.stream import (
    EventStreamResource,
    SeedEventsResource,
    SnapshotResource,
    StreamContext,
)
from edgeauth.master.ui import PATHS as UI_PATHS
from edgeauth.master.ui import Dashboard
from edgeauth.master.writes import write_resources
from edgeauth.services import AsyncStartService, exit_status_one, run_twistd
from edgeauth.sites import ClosingSite

log = Logger()

COMPACT_EVERY = 60.0
WRITABLE_CHECK_EVERY = 15.0
"""Seconds between the write checks behind ``edgeauth_master_log_writable``."""
WRITABLE_CHECK_TIMEOUT = 5.0

# The API takes JSON only, so Twisted need not parse form bodies: that parse runs on every POST
# with a body (email.message on Content-Type) and cost about a fifth of a ban's reactor time.
# Twisted older than the switch (setup.cfg allows 24.7) keeps parsing; nothing reads form args.
_SITE_OPTIONS: dict[str, Any] = (
    {"parsePOSTFormSubmission": False}
    if "parsePOSTFormSubmission" in inspect.signature(Site.__init__).parameters
    else {}
)


GC_YOUNG_THRESHOLD = 10_000
"""Allocations (net of frees) between two collections of the youngest generation (Python: 700)."""


def tune_garbage_collector() -> None:
    """Keep Python's cyclic garbage collector from scanning the master's long-lived objects.

    Called once the master listens, in the twistd process only (:func:`makeService`; not in
    tests, which start many masters in one process). Measured with 64 clients: about a tenth of
    the reactor's CPU per ban went to collections, mostly of the oldest generation, which walks
    every object of the process (modules, Klein, the in-memory tail of the log) although almost
    nothing of a request outlives it or forms cycles. The start-up heap is collected once, then
    frozen (:func:`gc.freeze`: left out of every later collection), and the youngest generation
    is collected every :data:`GC_YOUNG_THRESHOLD` allocations instead of 700, so the older ones
    come ten and a hundred times less often too. Cyclic garbage is still collected, later.
    """
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


class Options(usage.Options):
    """Command line of ``twistd edgeauth-master`` (PROTOCOL.md §8)."""

    optParameters = [
        ["config", "c", None, "The ini file (etc/edgeauth.ini)."],
        ["listen", None, None, "Listener endpoint, overrides [master] listen."],
        ["database", None, None, "SQLite path (or DSN), overrides [master] database."],
    ]
    optFlags = [
        ["json-logs", None, "Log JSON lines (as [logging] format = json)."],
    ]

    def postOptions(self) -> None:
        """Load and validate the configuration now, so bad settings stop start-up."""
        overrides = {
            ("master", key): self[key] for key in ("listen", "database") if self[key] is not None
        }
        try:
            self["settings"] = load_settings(self["config"], overrides, role="master")
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None
        log_format = "json" if self["json-logs"] else self["settings"].logging.format
        logs.select_for_twistd(self, log_format)


class MasterService(AsyncStartService):
    """Owns the event log, the fan-out and the HTTP listener of one master."""

    role = "master"

    def __init__(self, settings: Settings, reactor: Any) -> None:
        """Prepare the master; nothing opens before :meth:`startService`."""
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.metrics = MasterMetrics()
        master = settings.master
        self.log: IEventLog = SqliteEventLog(
            master.database,
            reactor,
            retention_events=master.retention_events,
            retention_seconds=master.retention_days * 86400,
        )
        self.fanout = Fanout(
            self.log,
            reactor,
            self.metrics,
            ping_interval=master.ping_interval,
            sse_cycle=master.sse_cycle,
            max_buffer=master.max_subscriber_buffer,
        )
        self.port: IListeningPort | None = None
        self._compactor: LoopingCall | None = None
        self._write_checker: LoopingCall | None = None
        self._writable: bool | None = None
        self.database_source: str | None = settings.path
        """The ini file (or ``<command line>``) that set ``[master] database``, for errors."""
        self._site: ClosingSite | None = None
        self.tune_gc = False
        """Call :func:`tune_garbage_collector` once listening (set for twistd by makeService)."""

    def build_site(self) -> ClosingSite:
        """Return the HTTP site: stream resources plus the Klein operator API."""
        master = self.settings.master
        authority = TokenAuthority(
            self.settings.tokens,
            client_roles=master.tls_client_roles,
            sessions=SessionStore(self.reactor),
            refusals=RefusalLog(self.reactor),
        )
        ctx = StreamContext(
            self.log,
            self.fanout,
            authority,
            self.metrics,
            self.reactor,
            max_batch=master.max_batch,
            long_poll_timeout=master.long_poll_timeout,
            stream_cache=master.stream_cache,
        )
        api = OperatorAPI(self.log, self.fanout, authority, self.metrics, self.reactor)
        writes = write_resources(
            self.log, authority, self.metrics, self.reactor, max_body=master.max_body
        )
        dashboard = Dashboard(self.log, self.fanout, authority, self.reactor)
        root = MasterRoot(
            api.app.resource(),
            {
                b"/v1/stream/events": EventStreamResource(ctx),
                b"/events": SeedEventsResource(ctx),
                b"/v1/snapshot": SnapshotResource(ctx),
                **dict.fromkeys(UI_PATHS, dashboard),
            },
            writes,
        )
        site: ClosingSite
        if master.access_log == "twistd":
            # Twisted's own access log: a line per request through the process log.
            site = ClosingSite(
                root, timeout=master.http_timeout, reactor=self.reactor, **_SITE_OPTIONS
            )
        else:
            access_log = make_access_log(
                master.access_log,
                self.reactor,
                master.access_log_path,
                sample_every=master.access_log_sample,
            )
            site = AccessLogSite(
                root,
                reactor=self.reactor,
                access_log=access_log,
                timeout=master.http_timeout,
                **_SITE_OPTIONS,
            )
        site.displayTracebacks = False
        return site

    async def start(self) -> None:
        """Open the log, apply retention, then listen."""
        try:
            await self.log.open()
        except (OSError, sqlite3.Error) as exc:
            path = self.settings.master.database
            raise database_error(exc, path, file=self.database_source, section="master") from None
        self._write_checker = LoopingCall(self._check_writable)
        self._write_checker.clock = self.reactor
        self._write_checker.start(WRITABLE_CHECK_EVERY, now=True)
        await self._compact()
        self._compactor = LoopingCall(self._compact)
        self._compactor.clock = self.reactor
        self._compactor.start(COMPACT_EVERY, now=False).addErrback(
            lambda f: log.failure("compaction loop stopped", f)
        )
        endpoint = tls.server_endpoint(self.reactor, self.settings.master)
        self._site = self.build_site()
        self.port = await endpoint.listen(self._site)
        log.info(
            "edgeauth master listening on {address}, log {log_id} at seq {tail}",
            address=self.port.getHost(),
            log_id=self.log.log_id,
            tail=self.log.tail,
        )
        if self.tune_gc:
            tune_garbage_collector()

    async def _check_writable(self) -> None:
        """Set ``edgeauth_master_log_writable`` from one write transaction; log changes."""
        check: Deferred[None] = self.log.check_writable()
        check.addTimeout(WRITABLE_CHECK_TIMEOUT, self.reactor)
        try:
            await check
        except Exception as exc:
            self.metrics.log_writable.set(0)
            if self._writable is not False:
                log.error("the event log is not writable: {why}", why=str(exc) or repr(exc))
            self._writable = False
        else:
            self.metrics.log_writable.set(1)
            if self._writable is False:
                log.info("the event log is writable again")
            self._writable = True

    async def _compact(self) -> None:
        assert IReactorTime.providedBy(self.reactor)
        removed = await self.log.compact(self.reactor.seconds())
        if removed:
            log.info("retention removed {n} events", n=removed)
        self.metrics.log_earliest.set(self.log.earliest)
        self.metrics.log_tail.set(self.log.tail)

    async def stop(self) -> None:
        """Stop listening, end live streams, finish commits, close the database."""
        await self.wait_started()
        if self._compactor is not None and self._compactor.running:
            self._compactor.stop()
        if self._write_checker is not None and self._write_checker.running:
            self._write_checker.stop()
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
            self.port = None
        self.fanout.close_all()
        if self._site is not None:
            self._site.close_connections()
            if isinstance(self._site, AccessLogSite):
                await self._site.access_log.stop()  # the lines of the streams just ended too
        await self.log.close()


def makeService(options: Options) -> service.IService:
    """Build the master service for twistd."""
    from twisted.internet import reactor

    settings: Settings = options["settings"]
    svc = MasterService(settings, reactor)
    svc.tune_gc = True
    if options["database"] is not None:
        svc.database_source = COMMAND_LINE
    svc.setName("edgeauth-master")
    svc.ready.addErrback(exit_status_one)
    return svc


def main() -> None:  # pragma: no cover - convenience for `python -m ...`
    """Run in the foreground (same as ``twistd -n edgeauth-master``)."""
    run_twistd("edgeauth-master")
