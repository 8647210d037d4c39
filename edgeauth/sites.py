"""A ``twisted.web`` ``Site`` that can close every connection it serves (master and edge).

``stopListening`` only stops accepting: keep-alive and streaming connections already open would
go on being served by a service that is stopping. :meth:`ClosingSite.close_connections` ends them.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet.interfaces import ITCPTransport
from twisted.web.server import Site


class ClosingSite(Site):
    """A ``Site`` that remembers its connections so that a stopping service can close them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Accept the arguments of ``Site``."""
        super().__init__(*args, **kwargs)
        self._channels: weakref.WeakSet[Any] = weakref.WeakSet()

    def buildProtocol(self, addr: Any) -> Any:
        """Build an ``HTTPChannel`` and remember it."""
        channel = super().buildProtocol(addr)
        if channel is not None:
            self._channels.add(channel)
        return channel

    def close_connections(self) -> None:
        """Abort every connection still open (responses in progress are cut)."""
        for wrapper in list(self._channels):
            # Site.buildProtocol returns a wrapper that picks HTTP/1.1 or HTTP/2; the channel
            # that owns the transport is inside it.
            channel = getattr(wrapper, "_channel", wrapper)
            transport = getattr(channel, "transport", None)
            if transport is None:
                continue
            if ITCPTransport.providedBy(transport):
                transport.abortConnection()
            else:
                transport.loseConnection()
