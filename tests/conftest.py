"""Shared test configuration: a deterministic hypothesis profile, as Twisted's tests use."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "edgeauth",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("edgeauth")
