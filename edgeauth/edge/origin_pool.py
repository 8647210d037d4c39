"""The edge's origin client: pooled HTTP/1.1 keep-alive connections parsed with httptools.

ARCHITECTURE.md decision 5. :class:`OriginPool` keeps persistent connections to one origin and runs
one exchange at a time on each (the request, call and connection protocol are in
:mod:`edgeauth.edge.origin`, request bodies in :mod:`edgeauth.edge.origin_body`, the errors in
:mod:`edgeauth.edge.origin_errors`). What Agent's ``HTTPConnectionPool`` gave for free is handled
here:

- a connection closed by the origin while idle leaves the pool at once; a request whose pooled
  connection closes before any response byte is retried once on a fresh connection when that is
  safe (idempotent method, replayable body), else it fails with :class:`BadGatewayError`;
- connect, idle and response timeouts (:class:`OriginUnreachableError` when a connection cannot
  be made, :class:`OriginTimeoutError` when the origin stalls); the response timeouts of all
  calls are checked by one timer per pool, not a ``DelayedCall`` per request;
- at most ``max_connections`` connections; later requests wait in a FIFO queue.
"""

from __future__ import annotations

import ipaddress
from collections import deque

from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure

from edgeauth.edge.origin import (
    _CONNECTING,
    _QUEUED,
    OriginCall,
    OriginRequest,
    ResponseHandler,
    _OriginProtocol,
)
from edgeauth.edge.origin_errors import OriginUnreachableError

__all__ = ["OriginPool"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


class _OriginFactory(protocol.Factory):
    noisy = False

    def __init__(self, pool: OriginPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: IAddress | None) -> _OriginProtocol:
        return _OriginProtocol(self.pool)


def _authority(scheme: str, host: str, port: int) -> bytes:
    name = f"[{host}]" if ":" in host else host
    if port == _DEFAULT_PORTS[scheme]:
        return name.encode("idna")
    return f"{name}:{port}".encode("idna")


class OriginPool:
    """Persistent HTTP/1.1 connections to one origin, with timeouts and a bounded size.

    Args:
        reactor: provides ``IReactorTime`` and ``IReactorTCP`` (and ``IReactorSSL`` for https).
        scheme: ``"http"`` or ``"https"``.
        host: the origin's host name or address.
        port: the origin's port.
        max_connections: the most connections open at once; later requests wait in FIFO order.
        max_idle: the most idle connections kept for reuse; None (the default) keeps up to
            ``max_connections``: a smaller bound makes a pool under steady concurrent load close
            connections after each burst of responses and open new ones for the next burst.
        connect_timeout: seconds allowed to connect (then :class:`OriginUnreachableError`).
        idle_timeout: seconds an idle connection is kept before it is closed.
        response_timeout: seconds without progress (queueing, waiting for the response head,
            between body reads while the client keeps up) before :class:`OriginTimeoutError`;
            one timer per pool checks every call, so a call times out up to
            ``min(response_timeout / 10, 0.5)`` seconds after its deadline.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        scheme: str,
        host: str,
        port: int,
        *,
        max_connections: int = 64,
        max_idle: int | None = None,
        connect_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        response_timeout: float = 30.0,
    ) -> None:
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"unsupported origin scheme {scheme!r}")
        if max_idle is None:
            max_idle = max_connections
        if max_connections < 1 or max_idle < 0:
            raise ValueError("max_connections must be >= 1 and max_idle >= 0")
        self.clock = reactor
        self.scheme = scheme
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.response_timeout = response_timeout
        self.authority = _authority(scheme, host, port)
        """``host[:port]`` as a ``Host`` header names the origin."""
        self._endpoint = self._make_endpoint(reactor)
        self._factory = _OriginFactory(self)
        self._idle: list[_OriginProtocol] = []
        self._waiting: deque[OriginCall] = deque()
        self._connected: set[_OriginProtocol] = set()
        self._open = 0
        self._sweep: IDelayedCall | None = None
        # Calls not yet ended, checked for response_timeout by one shared timer (a DelayedCall
        # per call, scheduled and cancelled for every request, cost more than the rest of the
        # call's bookkeeping): it fires at the nearest deadline, at most once per
        # _timeout_slack seconds, so a call times out up to that much late.
        self._watched: dict[OriginCall, None] = {}
        self._timeout_timer: IDelayedCall | None = None
        self._timeout_slack = min(response_timeout / 10, 0.5)
        self._closed = False
        self._close_waiters: list[Deferred[None]] = []

    def _make_endpoint(self, reactor: IReactorTime) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint
        try:
            version = ipaddress.ip_address(self.host).version
        except ValueError:
            endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=self.connect_timeout)
        else:
            tcp = TCP4ClientEndpoint if version == 4 else TCP6ClientEndpoint
            endpoint = tcp(reactor, self.host, self.port, timeout=self.connect_timeout)
        if self.scheme == "https":
            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return endpoint

    @property
    def open_connections(self) -> int:
        """Connections open or being opened."""
        return self._open

    @property
    def idle_connections(self) -> int:
        """Connections waiting in the pool for the next request."""
        return len(self._idle)

    @property
    def queued(self) -> int:
        """Requests waiting for a connection."""
        return sum(1 for call in self._waiting if not call.done)

    def request(self, request: OriginRequest, handler: ResponseHandler) -> OriginCall:
        """Send ``request`` on a pooled connection; ``handler`` hears about the response.

        Nothing is reported synchronously unless the pool is closed.

        Returns:
            The call, to pause, resume or cancel it.
        """
        call = OriginCall(self, request, handler)
        if self._closed:
            call._fail(OriginUnreachableError("the origin pool is closed"))
        else:
            self._dispatch(call)
        return call

    def close(self) -> Deferred[None]:
        """Fail queued calls, abort running ones and close every connection.

        Returns:
            A Deferred that fires once every connection is closed.
        """
        self._closed = True
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        while self._waiting:
            self._waiting.popleft()._fail(OriginUnreachableError("the origin pool is closed"))
        for proto in list(self._connected):
            if proto.call is not None:
                proto.fail(OriginUnreachableError("the origin pool is closed"))
            elif proto.transport is not None:
                proto.transport.abortConnection()  # type: ignore[attr-defined]
        for proto in self._idle:
            proto.in_idle = False
        self._idle.clear()
        # Calls still connecting keep their response timeout (their connection is aborted).
        if not self._watched and self._timeout_timer is not None:
            if self._timeout_timer.active():
                self._timeout_timer.cancel()
            self._timeout_timer = None
        if self._open == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        return d

    # -- internals ---------------------------------------------------------------------------

    def _watch(self, call: OriginCall) -> None:
        self._watched[call] = None
        if self._timeout_timer is None:
            # Every timer scheduled since was due within response_timeout of being set, so the
            # one already pending fires before this call's deadline.
            self._timeout_timer = self.clock.callLater(self.response_timeout, self._check_timeouts)

    def _check_timeouts(self) -> None:
        self._timeout_timer = None
        now = self.clock.seconds()
        timeout = self.response_timeout
        nearest = timeout
        expired = []
        for call in self._watched:
            remaining = call._last_activity + timeout - now
            if remaining <= 0:
                expired.append(call)
            elif remaining < nearest:
                nearest = remaining
        for call in expired:
            call._time_out()  # reports to its handler, which may start new calls
        if self._timeout_timer is not None:  # scheduled by a new call, maybe too late
            self._timeout_timer.cancel()
            self._timeout_timer = None
        if self._watched:
            self._timeout_timer = self.clock.callLater(
                max(nearest, self._timeout_slack), self._check_timeouts
            )

    def _dispatch(self, call: OriginCall, *, front: bool = False) -> None:
        idle = self._idle
        if idle:
            now = self.clock.seconds()
            while idle:
                proto = idle.pop()
                proto.in_idle = False
                if now - proto.idle_since < self.idle_timeout and not proto.lost:
                    proto.start(call)
                    return
                proto.close_idle()
        if self._open < self.max_connections:
            self._connect(call)
        elif front:
            call._state = _QUEUED
            self._waiting.appendleft(call)
        else:
            call._state = _QUEUED
            self._waiting.append(call)

    def _connect(self, call: OriginCall) -> None:
        self._open += 1
        call._state = _CONNECTING
        d = self._endpoint.connect(self._factory)
        d.addCallbacks(
            self._on_connected, self._on_connect_failed, callbackArgs=(call,), errbackArgs=(call,)
        )

    def _on_connected(self, proto: _OriginProtocol, call: OriginCall) -> None:
        self._connected.add(proto)
        if self._closed:
            proto.transport.abortConnection()  # type: ignore[union-attr]
        elif call.done:
            self._release(proto, True)
        else:
            proto.start(call)

    def _on_connect_failed(self, failure: Failure, call: OriginCall) -> None:
        self._open -= 1
        where = f"{self.host}:{self.port}"
        if failure.check(ConnectTimeoutError):
            detail = f"connecting to {where} timed out after {self.connect_timeout:g}s"
        else:
            detail = f"cannot connect to {where}: {failure.getErrorMessage()}"
        call._fail(OriginUnreachableError(detail))
        self._check_closed()
        self._drain()

    def _release(self, proto: _OriginProtocol, reusable: bool) -> None:
        if reusable and not self._closed and not proto.lost:
            waiting = self._waiting
            while waiting:
                call = waiting.popleft()
                if not call.done:
                    proto.start(call)
                    return
            if len(self._idle) < self.max_idle:
                proto.idle_since = self.clock.seconds()
                proto.in_idle = True
                self._idle.append(proto)
                if self._sweep is None:
                    self._sweep = self.clock.callLater(self.idle_timeout, self._sweep_idle)
                return
        if proto.transport is not None:
            proto.transport.loseConnection()

    def _forget_idle(self, proto: _OriginProtocol) -> None:
        if proto.in_idle:
            proto.in_idle = False
            self._idle.remove(proto)

    def _sweep_idle(self) -> None:
        self._sweep = None
        now = self.clock.seconds()
        idle = self._idle
        # The list is ordered by idle_since: connections are appended and reused from the end.
        while idle and now - idle[0].idle_since >= self.idle_timeout - 0.001:
            idle[0].close_idle()
        if idle:
            delay = max(idle[0].idle_since + self.idle_timeout - now, 0.01)
            self._sweep = self.clock.callLater(delay, self._sweep_idle)

    def _lost(self, proto: _OriginProtocol, retry: OriginCall | None) -> None:
        self._open -= 1
        self._connected.discard(proto)
        self._forget_idle(proto)
        if retry is not None:
            self._retry(retry)
        self._check_closed()
        self._drain()

    def _retry(self, call: OriginCall) -> None:
        if self._closed:
            call._fail(OriginUnreachableError("the origin pool is closed"))
        elif self._open < self.max_connections:
            self._connect(call)  # a fresh connection: other pooled ones may be stale too
        else:
            call._state = _QUEUED
            self._waiting.appendleft(call)

    def _drain(self) -> None:
        waiting = self._waiting
        while waiting and (self._idle or self._open < self.max_connections):
            call = waiting.popleft()
            if not call.done:
                self._dispatch(call, front=True)

    def _check_closed(self) -> None:
        if self._closed and self._open == 0:
            waiters, self._close_waiters = self._close_waiters, []
            for d in waiters:
                d.callback(None)
