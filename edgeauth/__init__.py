"""edgeauth: fleet-wide bans, token revocations and cache invalidations for edge proxies."""

__all__ = ["__version__"]

__version__ = "0.1.0"
