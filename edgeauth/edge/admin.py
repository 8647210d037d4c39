"""The edge's admin listener: ``/healthz``, ``/readyz``, ``/status``, ``/explain``, ``/metrics``.

It listens on its own port (127.0.0.1 by default) and needs no token; keep it off public
interfaces. ``/readyz`` follows PROTOCOL.md §6: it goes red when the edge stops *applying* events
(token refused, unparseable stream, behind the announced tail for more than ``max_lag``), not only
when the connection drops; a master outage alone keeps it green (the edge enforces last known good).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

from edgeauth.edge.index import parse_client_ip
from edgeauth.edge.metrics import EdgeMetrics
from edgeauth.edge.state import EdgeState
from edgeauth.edge.subscriber import Subscriber
from edgeauth.replay import Entry
from edgeauth.wire.offsets import format_offset

ExplainURL = Callable[[str], dict[str, Any] | None]


def _json(request: Request, status: int, doc: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(doc, separators=(",", ":")).encode()


def _entry_doc(entry: Entry, kind: str, now: float) -> dict[str, Any]:
    return {
        "kind": kind,
        "ip": entry.ip,
        "seq": entry.seq,
        "source": entry.source,
        "reason": entry.reason,
        "expires_at": entry.expires_at,
        "expires_in": None if entry.expires_at is None else round(entry.expires_at - now, 3),
    }


class AdminResource(Resource):
    """Root of the admin listener; dispatches on the exact path."""

    isLeaf = True

    def __init__(
        self,
        state: EdgeState,
        subscriber: Subscriber,
        metrics: EdgeMetrics,
        clock: IReactorTime,
        *,
        max_lag: float,
        explain_url: ExplainURL | None = None,
        cache_entries: Callable[[], int] | None = None,
    ) -> None:
        """Serve admin views of ``state`` and ``subscriber``."""
        super().__init__()
        self.state = state
        self.subscriber = subscriber
        self.metrics = metrics
        self.clock = clock
        self.max_lag = max_lag
        self.explain_url = explain_url
        self.cache_entries = cache_entries

    def render_GET(self, request: Request) -> bytes:
        """Answer one admin view."""
        path = request.path.rstrip(b"/")
        if path == b"/healthz":
            return _json(request, 200, {"status": "ok"})
        if path == b"/readyz":
            ready, reason = self.subscriber.readiness(self.max_lag)
            self.metrics.ready.set(1 if ready else 0)
            if ready:
                return _json(request, 200, {"status": "ready"})
            code = reason.split(":", 1)[0]
            return _json(request, 503, {"error": "not_ready", "reason": code, "detail": reason})
        if path == b"/status":
            return _json(request, 200, self.status())
        if path == b"/explain":
            return self._explain(request)
        if path == b"/metrics":
            # Gauges that depend on the clock are set now, so that a scrape alone is current.
            ready, _ = self.subscriber.readiness(self.max_lag)
            self.metrics.ready.set(1 if ready else 0)
            since = self.subscriber.status.behind_since
            self.metrics.lag_seconds.set(0 if since is None else self.clock.seconds() - since)
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            return self.metrics.render()
        return _json(request, 404, {"error": "not_found", "detail": "no such admin view"})

    def status(self) -> dict[str, Any]:
        """The edge's sync and state summary."""
        now = self.clock.seconds()
        sync = self.subscriber.status
        tail = sync.announced_tail
        behind = 0 if tail is None else max(0, tail - self.state.offset)
        ready, reason = self.subscriber.readiness(self.max_lag)
        counts: dict[str, Any] = dict(self.state.counts())
        if self.cache_entries is not None:
            counts["cache_entries"] = self.cache_entries()
        last = self.state.last_applied_at
        return {
            "edge_id": self.state.edge_id,
            "log_id": self.state.log_id,
            "offset": format_offset(self.state.offset),
            "synced": self.state.synced,
            "ready": ready,
            "readiness": reason,
            "connected": sync.connected,
            "master": sync.master,
            "master_tail": None if tail is None else format_offset(tail),
            "lag_events": behind,
            "lag_seconds": 0 if sync.behind_since is None else round(now - sync.behind_since, 3),
            "last_applied_at": last,
            "seconds_since_applied": None if last is None else round(now - last, 3),
            "last_contact": sync.last_contact,
            "last_error": sync.last_error,
            "reconnects": sync.reconnects,
            "counts": counts,
            "applied_by_type": dict(self.state.applied),
        }

    def _explain(self, request: Request) -> bytes:
        args = request.args or {}
        if b"ip" in args:
            text = args[b"ip"][0].decode("utf-8", "replace")
            parsed = parse_client_ip(text)
            if parsed is None:
                return _json(
                    request, 400, {"error": "invalid_ip", "detail": "ip= must be one address"}
                )
            version, addr = parsed
            now = self.clock.seconds()
            indexes = self.state.indexes
            allows = [
                _entry_doc(e, "allow", now) for e in indexes.allows.matches(version, addr, now)
            ]
            bans = [_entry_doc(e, "ban", now) for e in indexes.bans.matches(version, addr, now)]
            refusing = indexes.check_ip(version, addr, now)
            verdict = "refused" if refusing is not None else "served"
            return _json(
                request,
                200,
                {
                    "ip": text,
                    "verdict": verdict,
                    "ref": refusing.seq if refusing is not None else None,
                    "allows": allows,
                    "bans": bans,
                },
            )
        if b"url" in args:
            url = args[b"url"][0].decode("utf-8", "replace")
            entry = self.explain_url(url) if self.explain_url is not None else None
            return _json(request, 200, {"url": url, "cache": entry})
        return _json(request, 400, {"error": "invalid_parameter", "detail": "give ip= or url="})
