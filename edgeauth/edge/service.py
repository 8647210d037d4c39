"""``twistd edgeauth-edge``: options and the service that runs state, subscriber, proxy and admin.

Start-up order matters: the SQLite file is loaded into memory before any listener opens, so a
restarted edge enforces what it knew at once, even with every master down; then the subscriber
starts, then the admin and proxy listeners. Stop runs in reverse.
"""

from __future__ import annotations

import gc
import sqlite3
from typing import Any
from urllib.parse import urlsplit

from twisted.application import service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from edgeauth import logs, tls
from edgeauth.config import COMMAND_LINE, ConfigError, Settings, database_error, load_settings
from edgeauth.edge.accesslog import EdgeSite, make_access_log
from edgeauth.edge.admin import AdminResource
from edgeauth.edge.cache import EdgeCache
from edgeauth.edge.clientip import TrustedProxies
from edgeauth.edge.gate import Gate
from edgeauth.edge.guard import RequestGuard
from edgeauth.edge.metrics import EdgeMetrics
from edgeauth.edge.origin_pool import OriginPool
from edgeauth.edge.proxy import EdgeProxyResource
from edgeauth.edge.state import EdgeState
from edgeauth.edge.store import EdgeStore
from edgeauth.edge.subscriber import Subscriber
from edgeauth.edge.ttl import TTLPipeline
from edgeauth.events import IpBanned
from edgeauth.services import AsyncStartService, exit_status_one, run_twistd
from edgeauth.sites import ClosingSite

log = Logger()

SWEEP_EVERY = 30.0

_OVERRIDES = {
    "id": "id",
    "listen": "listen",
    "admin-listen": "admin_listen",
    "database": "database",
    "origin": "origin",
    "masters": "masters",
}


class Options(usage.Options):
    """Command line of ``twistd edgeauth-edge`` (PROTOCOL.md §8)."""

    optParameters = [
        ["config", "c", None, "The ini file (etc/edgeauth.ini)."],
        ["id", None, None, "This edge's name, overrides [edge] id."],
        ["listen", None, None, "Proxy listener endpoint, overrides [edge] listen."],
        ["admin-listen", None, None, "Admin listener endpoint, overrides [edge] admin_listen."],
        ["database", None, None, "SQLite file, overrides [edge] database."],
        ["origin", None, None, "Origin base URL, overrides [edge] origin."],
        ["masters", None, None, "Comma-separated master URLs, overrides [edge] masters."],
    ]
    optFlags = [
        ["json-logs", None, "Log JSON lines (as [logging] format = json)."],
    ]

    def postOptions(self) -> None:
        """Load and validate the configuration now, so bad settings stop start-up."""
        overrides = {
            ("edge", key): self[option]
            for option, key in _OVERRIDES.items()
            if self[option] is not None
        }
        try:
            self["settings"] = load_settings(self["config"], overrides, role="edge")
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None
        log_format = "json" if self["json-logs"] else self["settings"].logging.format
        logs.select_for_twistd(self, log_format)


def _origin_parts(url: str) -> tuple[str, str, int, bytes]:
    parts = urlsplit(url)
    scheme = parts.scheme
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, host, port, parts.path.rstrip("/").encode()


class EdgeService(AsyncStartService):
    """Owns the state, the subscriber, the origin pool and the two listeners of one edge."""

    role = "edge"

    CATCH_UP_WAIT = 5.0
    """Longest a restarted edge with cached entries waits for its first catch-up before it
    opens the proxy listener (it opens anyway after that; see ``_wait_for_catch_up``)."""

    def __init__(self, settings: Settings, reactor: Any) -> None:
        """Prepare the edge; nothing opens before :meth:`startService`."""
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        edge = settings.edge
        self.metrics = EdgeMetrics()
        self.store = EdgeStore(edge.database, reactor)
        self.state = EdgeState(self.store, reactor, edge.id)
        self.subscriber = Subscriber(
            reactor,
            self.state,
            edge.masters,
            edge.token,
            edge.id,
            self.metrics,
            mode=edge.stream_mode,
            ping_interval=edge.ping_interval,
            tls_policy=tls.client_policy(edge),
        )
        scheme, host, port, path = _origin_parts(edge.origin)
        self.origin_pool = OriginPool(
            reactor,
            scheme,
            host,
            port,
            max_connections=edge.origin_max_connections,
            connect_timeout=edge.origin_connect_timeout,
            response_timeout=edge.origin_response_timeout,
        )
        self.trusted = TrustedProxies(edge.trusted_proxies)
        share = self._share_ban if settings.failures.share_local_bans else None
        self.gate = Gate.from_settings(self.state.indexes, settings, self._local_ban)
        self.guard = RequestGuard(
            self.gate,
            self.trusted,
            self.state,
            self.metrics,
            reactor,
            fail_mode=edge.fail_mode,
            share_ban=share,
        )
        self.cache = self._build_cache(settings, path)
        self.proxy = EdgeProxyResource(
            host,
            port,
            path,
            reactor,
            pool=self.origin_pool,
            is_trusted=self.trusted.is_trusted,
            gate=self.guard.gate_hook,  # the gate's refusals pass through as they are
            cache=self.cache,
            on_response=self.guard.on_response,
        )
        self.port: IListeningPort | None = None
        self.admin_port: IListeningPort | None = None
        self._sweeper: LoopingCall | None = None
        self._site: EdgeSite | None = None
        self._admin_site: ClosingSite | None = None
        self.database_source: str | None = settings.path
        """The ini file (or ``<command line>``) that set ``[edge] database``, for errors."""

    def _build_cache(self, settings: Settings, path: bytes) -> EdgeCache | None:
        """The response cache (PROTOCOL.md §6), hooked to invalidations and bootstraps."""
        if not settings.cache.enabled:
            return None
        ttl = settings.ttl
        cache = EdgeCache(
            self.reactor,
            self.origin_pool,
            settings.cache,
            TTLPipeline.from_settings(ttl.rules, ttl.params, ttl.max_ttl),
            run_interaction=self.store.run_interaction,
            log_id=lambda: self.state.log_id,
            base_path=path,
            origin_host=self.origin_pool.authority,
            is_trusted=self.trusted.is_trusted,
            client_ip=self.guard.client_ip,
            metrics=self.metrics,
        )
        self.state.cache_listeners.append(cache.invalidate_event)
        self.state.reset_listeners.append(cache.reset)
        return cache

    def _confirm_cache(self, result: object) -> object:
        if self.cache is not None:
            self.cache.confirm()
        return result

    async def _wait_for_catch_up(self) -> None:
        """Hold the proxy listener until the first catch-up, when cached entries were loaded.

        Entries read from the file may have been invalidated while the edge was down; they are
        used unverified only after a revalidation (see :mod:`edgeauth.edge.cache`), so waiting
        for the catch-up (bounded by ``CATCH_UP_WAIT``: a master outage must not keep the edge
        down) is what lets a restarted edge serve HITs at once.
        """
        cache = self.cache
        if cache is None or cache.confirmed:
            return
        waiter: Deferred[None] = Deferred()

        def synced(result: object) -> object:
            if not waiter.called:
                waiter.callback(None)
            return result

        self.subscriber.first_sync.addBoth(synced)
        waiter.addTimeout(self.CATCH_UP_WAIT, self.reactor)
        try:
            await waiter
        except Exception:
            log.warn(
                "no catch-up with the master within {s}s: cached entries stay unverified "
                "(revalidated with the origin before use) until it comes",
                s=self.CATCH_UP_WAIT,
            )

    def _local_ban(self, event: IpBanned) -> None:
        self.guard.local_ban(event)

    def _share_ban(self, event: IpBanned) -> None:
        self.subscriber.report_ban(event)

    def build_site(self) -> EdgeSite:
        """Return the proxy's HTTP site with the configured access log."""
        edge = self.settings.edge
        access_log = make_access_log(
            edge.access_log,
            self.reactor,
            edge.access_log_path,
            sample_every=edge.access_log_sample,
        )
        return EdgeSite(
            self.proxy, reactor=self.reactor, access_log=access_log, timeout=edge.http_timeout
        )

    def build_admin_site(self) -> ClosingSite:
        """Return the admin listener's site."""
        cache = self.cache
        admin = AdminResource(
            self.state,
            self.subscriber,
            self.metrics,
            self.reactor,
            max_lag=self.settings.edge.max_lag,
            explain_url=None if cache is None else cache.explain_url,
            cache_entries=None if cache is None else cache.entry_count,
        )
        site = ClosingSite(admin, reactor=self.reactor)
        site.displayTracebacks = False
        return site

    async def start(self) -> None:
        """Load the file, start the subscriber, then open the admin and proxy listeners."""
        edge = self.settings.edge
        try:
            await self.state.load()
        except (OSError, sqlite3.Error) as exc:
            where = self.database_source
            raise database_error(exc, edge.database, file=where, section="edge") from None
        # A million loaded entries would make every full collection scan them (200+ ms pauses);
        # they live as long as the process, so move them out of the collector's sight.
        gc.freeze()
        if self.cache is not None:
            await self.cache.load(self.state.log_id)
            self.subscriber.first_sync.addCallback(self._confirm_cache)
        self.subscriber.start()
        self._sweeper = LoopingCall(self.state.sweep)
        self._sweeper.clock = self.reactor
        self._sweeper.start(SWEEP_EVERY, now=True).addErrback(
            lambda f: log.failure("sweep loop stopped", f)
        )
        self._admin_site = self.build_admin_site()
        self.admin_port = await serverFromString(self.reactor, edge.admin_listen).listen(
            self._admin_site
        )
        await self._wait_for_catch_up()
        self._site = self.build_site()
        self.port = await serverFromString(self.reactor, edge.listen).listen(self._site)
        log.info(
            "edgeauth edge {id} proxying {address} to {origin}; admin on {admin}",
            id=edge.id,
            address=self.port.getHost(),
            origin=edge.origin,
            admin=self.admin_port.getHost(),
        )

    async def stop(self) -> None:
        """Close listeners, stop the subscriber, close the origin pool and the file."""
        await self.wait_started()
        for attr in ("port", "admin_port"):
            port = getattr(self, attr)
            if port is not None:
                await maybeDeferred(port.stopListening)
                setattr(self, attr, None)
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self._site is not None:
            self._site.close_connections()
        if self._admin_site is not None:
            self._admin_site.close_connections()
        await self.subscriber.stop()
        await self.origin_pool.close()
        if self.cache is not None:
            await self.cache.close()
        await self.store.close()


def makeService(options: Options) -> service.IService:
    """Build the edge service for twistd."""
    from twisted.internet import reactor

    settings: Settings = options["settings"]
    svc = EdgeService(settings, reactor)
    if options["database"] is not None:
        svc.database_source = COMMAND_LINE
    svc.setName("edgeauth-edge")
    svc.ready.addErrback(exit_status_one)
    return svc


def main() -> None:  # pragma: no cover - convenience for `python -m ...`
    """Run in the foreground (same as ``twistd -n edgeauth-edge``)."""
    run_twistd("edgeauth-edge")
