"""The edge's response cache (PROTOCOL.md §6 "Cache"): RFC 9111 shared cache, invalidated by events.

Modules: :mod:`~edgeauth.edge.cache.policy` (keys, what to store, for how long),
:mod:`~edgeauth.edge.cache.store` (entries, LRU, tag/key/prefix indexes),
:mod:`~edgeauth.edge.cache.collapse` (one origin request per key, the refresh limiter),
:mod:`~edgeauth.edge.cache.contents` (memory and disk kept in step, invalidations in flight),
:mod:`~edgeauth.edge.cache.fetch` (origin requests of the cache),
:mod:`~edgeauth.edge.cache.respond` (writing stored responses),
:mod:`~edgeauth.edge.cache.persist` (write-behind to the edge's SQLite file) and
:mod:`~edgeauth.edge.cache.response_cache` (:class:`EdgeCache`, the proxy's cache seam).
"""

from edgeauth.edge.cache.response_cache import EdgeCache

__all__ = ["EdgeCache"]
