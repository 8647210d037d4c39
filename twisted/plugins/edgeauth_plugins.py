"""twistd plugins ``edgeauth-master`` and ``edgeauth-edge``.

This file lives in the ``twisted.plugins`` namespace package (there is deliberately no
``__init__.py`` beside it). It must stay cheap to import: twistd imports every plugin module to
list them, so the real service modules are imported only when a plugin is chosen.
"""

from twisted.application.service import ServiceMaker

edgeauth_master = ServiceMaker(
    "edgeauth master",
    "edgeauth.master.service",
    "edgeauth master: durable event log, operator API and event stream",
    "edgeauth-master",
)

edgeauth_edge = ServiceMaker(
    "edgeauth edge",
    "edgeauth.edge.service",
    "edgeauth edge: stream subscriber, local state, auth gate and reverse proxy",
    "edgeauth-edge",
)
