"""A TTL rule that lives in a test module, to show that a new rule needs no other code."""

from __future__ import annotations

from collections.abc import Mapping

from zope.interface import implementer

from edgeauth.edge.ttl import ITTLRule, TTLContext


@implementer(ITTLRule)
class Multiply:
    """Multiply every TTL by ``by``."""

    name = "ttl_rule_double"

    def __init__(self, by: float) -> None:
        self.by = by

    def __call__(self, ctx: TTLContext, ttl: float) -> float:
        return ttl * self.by


def make_rule(params: Mapping[str, str]) -> Multiply:
    return Multiply(float(params.get("by", "2")))
