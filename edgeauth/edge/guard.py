"""Connects the sans-io :class:`~edgeauth.edge.gate.Gate` to twisted.web requests.

For each request the proxy is about to forward: resolve the client IP (believing
``X-Forwarded-For``/``Forwarded`` only from ``trusted_proxies``), apply ``fail_mode`` before the
first sync, ask the gate, count the decision, and turn local bans from the failure pattern into
enforced, persisted (and optionally shared) bans.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from edgeauth.edge.clientip import TrustedProxies, client_ip
from edgeauth.edge.gate import Gate, Refusal
from edgeauth.edge.metrics import EdgeMetrics
from edgeauth.edge.state import EdgeState
from edgeauth.events import IpBanned

NOT_SYNCED = Refusal(
    status=503,
    body=json.dumps(
        {"error": "not_ready", "detail": "this edge has not synced with a master yet"}
    ).encode(),
    headers=((b"content-type", b"application/json"), (b"cache-control", b"no-store")),
    reason="not_synced",
    ban=None,
)

CLIENT_IP_ATTRIBUTE = "edgeauth_client_ip"


class RequestGuard:
    """Decides whether a request may reach the origin."""

    def __init__(
        self,
        gate: Gate,
        trusted: TrustedProxies,
        state: EdgeState,
        metrics: EdgeMetrics,
        clock: IReactorTime,
        *,
        fail_mode: str = "open",
        share_ban: Callable[[IpBanned], None] | None = None,
    ) -> None:
        """Guard requests with ``gate``; ``share_ban`` reports local bans to the master."""
        self.gate = gate
        self.trusted = trusted
        self.state = state
        self.metrics = metrics
        self.clock = clock
        self.fail_mode = fail_mode
        self.share_ban = share_ban

    def client_ip(self, request: IRequest) -> str:
        """Return (and remember on the request) the client address of ``request``."""
        cached = getattr(request, CLIENT_IP_ATTRIBUTE, None)
        if cached is not None:
            return str(cached)
        peer = request.getClientAddress()
        host = str(getattr(peer, "host", "") or "")
        trusted = self.trusted
        if trusted.cidrs:
            headers = request.requestHeaders
            ip = client_ip(
                host,
                headers.getRawHeaders(b"x-forwarded-for") or (),
                headers.getRawHeaders(b"forwarded") or (),
                trusted,
            )
        else:
            # Without trusted proxies the forwarding headers are never believed: not read.
            ip = client_ip(host, (), (), trusted)
        setattr(request, CLIENT_IP_ATTRIBUTE, ip)
        return ip

    def check(self, request: IRequest) -> Refusal | None:
        """Return the refusal to send instead of proxying, or None to proxy."""
        if not self.state.synced and self.fail_mode == "closed":
            self.metrics.checks.inc("not_synced")
            return NOT_SYNCED
        ip = self.client_ip(request)
        refusal = self.gate.check(
            ip,
            request.method,
            request.uri,
            request.getHeader(b"authorization"),
            self.clock.seconds(),
        )
        metrics = self.metrics
        if refusal is None:
            metrics.checks.inc("allowed")
            return None
        metrics.checks.inc(refusal.reason)
        if refusal.ban is not None:
            metrics.refusals.inc(refusal.ban.source)
        return refusal

    def gate_hook(self, request: Request) -> Refusal | None:
        """The proxy's gate hook (``EdgeProxyResource(gate=...)``): :meth:`check`.

        The gate's refusal is an :class:`edgeauth.edge.answers.Answer` as it is: its body is
        already encoded JSON and its headers name ``Content-Type`` and ``Cache-Control`` (so
        :func:`edgeauth.edge.answers.write_json` does not set them again), and the gate reuses
        it while the same ban entry refuses.
        """
        return self.check(request)

    def on_response(self, request: IRequest, status: int) -> None:
        """Feed an origin status to the failure pattern."""
        self.metrics.origin_responses.inc(f"{status // 100}xx")
        ip = getattr(request, CLIENT_IP_ATTRIBUTE, None)
        if ip is not None:
            self.gate.record_origin_status(str(ip), status, self.clock.seconds())

    def local_ban(self, event: IpBanned) -> None:
        """Enforce, persist and (if configured) share a ban decided by this edge."""
        self.state.add_local_ban(event)
        self.metrics.local_bans.inc()
        if self.share_ban is not None:
            self.share_ban(event)
