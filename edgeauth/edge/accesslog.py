"""The edge's access log: off, buffered and written off the reactor thread, or sampled.

The modes and their classes are the role-independent ones of :mod:`edgeauth.accesslog` (the
master uses them too), re-exported here under their old names. :class:`EdgeSite` is the edge's
``Site``: it logs through an :class:`AccessLog` and makes
:class:`edgeauth.edge.proxy.EdgeRequest` its request factory, so large uploads stream to the
origin.
"""

from __future__ import annotations

import functools
from typing import Any

from edgeauth import accesslog as _shared
from edgeauth.accesslog import (
    ACCESS_LOG_MODES,
    AccessLog,
    AccessLogSite,
    Formatter,
    NoAccessLog,
    SampledAccessLog,
    _append,
)
from edgeauth.edge.proxy import EdgeRequest

__all__ = [
    "ACCESS_LOG_MODES",
    "AccessLog",
    "BufferedAccessLog",
    "EdgeSite",
    "Formatter",
    "NoAccessLog",
    "SampledAccessLog",
    "make_access_log",
]


class BufferedAccessLog(_shared.BufferedAccessLog):
    """:class:`edgeauth.accesslog.BufferedAccessLog`, appending through this module's ``_append``.

    Same arguments and behaviour; only the file append is looked up here, so that it can be
    replaced in this module (the edge's tests do).
    """

    @staticmethod
    def _append_file(path: str, text: str) -> None:
        _append(path, text)


make_access_log = functools.partial(_shared.make_access_log, buffered_class=BufferedAccessLog)
"""Build the access log for a mode (:func:`edgeauth.accesslog.make_access_log`)."""


class EdgeSite(AccessLogSite):
    """The edge's ``Site``: logs through an :class:`AccessLog`, streams request bodies.

    Args:
        resource: the root resource.
        reactor: the reactor (connection timeouts, log timestamps).
        access_log: where finished requests go; :class:`NoAccessLog` by default.
        **kwargs: passed to ``Site`` (e.g. ``timeout``). ``requestFactory`` defaults to
            :class:`edgeauth.edge.proxy.EdgeRequest` (large and chunked bodies stream to the
            origin), and form bodies are never parsed into ``request.args``
            (``parsePOSTFormSubmission=False``): the proxy forwards them as they are.
    """

    def __init__(self, resource: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parsePOSTFormSubmission", False)
        kwargs.setdefault("requestFactory", EdgeRequest)
        super().__init__(resource, **kwargs)
