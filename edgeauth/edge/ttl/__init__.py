"""The TTL pipeline of PROTOCOL.md §7: ``resolve_ttl(ctx, base_ttl)``.

A rule is a pure callable ``rule(ctx, ttl) -> ttl``; the configured rules run in order and the
result is clamped to ``[0, max_ttl]``. Time comes from ``ctx.now`` only (no clock inside a rule).
A new rule is one module and one name in the ini file: a bare name ``foo`` is looked up as
``edgeauth.edge.ttl.foo`` first and then as a top-level module ``foo``; a dotted name is imported
as written. The module provides ``make_rule(params) -> ITTLRule``, where ``params`` are the raw
keys of its ``[ttl.<name>]`` section.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from types import ModuleType

import attrs
from zope.interface import Attribute, Interface, implementer

__all__ = ["ITTLRule", "TTLContext", "TTLPipeline", "TTLRuleError", "load_rule", "resolve_ttl"]


@attrs.frozen(kw_only=True)
class TTLContext:
    """What a rule may look at: the request, the origin response headers and the time."""

    client_ip: str
    method: bytes
    path: bytes
    response_headers: Sequence[tuple[bytes, bytes]] = ()
    now: float


class ITTLRule(Interface):
    """One step of the TTL pipeline."""

    name = Attribute("The rule's name, as listed in [ttl] rules.")

    def __call__(ctx: TTLContext, ttl: float) -> float:  # noqa: N805 (zope interface)
        """Return the TTL after this rule (it may be out of range; the pipeline clamps)."""


class TTLRuleError(ValueError):
    """A rule cannot be found or its parameters are invalid."""


def _rule_module(name: str) -> ModuleType:
    candidates = [name] if "." in name else [f"{__name__}.{name}", name]
    for candidate in candidates:
        try:
            return importlib.import_module(candidate)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not candidate.startswith(exc.name):
                raise  # the rule module exists but one of its own imports is missing
    raise TTLRuleError(f"no TTL rule module named {name!r}")


def load_rule(name: str, params: Mapping[str, str]) -> ITTLRule:
    """Import the rule ``name`` and build it from its ini parameters.

    Raises:
        TTLRuleError: no such module, no ``make_rule`` in it, or bad parameters.
    """
    module = _rule_module(name)
    make = getattr(module, "make_rule", None)
    if make is None:
        raise TTLRuleError(f"TTL rule module {module.__name__} has no make_rule(params)")
    try:
        rule = make(params)
    except (ValueError, KeyError, TypeError) as exc:
        raise TTLRuleError(f"[ttl.{name}]: {exc}") from None
    if not ITTLRule.providedBy(rule):
        raise TTLRuleError(f"make_rule of {module.__name__} did not return an ITTLRule")
    result: ITTLRule = rule
    return result


@implementer(ITTLRule)
@attrs.frozen
class TTLPipeline:
    """The configured rules in order, and the upper clamp."""

    rules: tuple[ITTLRule, ...]
    max_ttl: float
    name: str = "pipeline"

    @classmethod
    def from_settings(
        cls, names: Sequence[str], params: Mapping[str, Mapping[str, str]], max_ttl: float
    ) -> TTLPipeline:
        """Load every rule named in ``[ttl] rules``."""
        return cls(tuple(load_rule(n, params.get(n, {})) for n in names), max_ttl)

    def __call__(self, ctx: TTLContext, ttl: float) -> float:
        """Run every rule, then clamp to ``[0, max_ttl]``."""
        for rule in self.rules:
            ttl = rule(ctx, ttl)
        return min(max(ttl, 0.0), self.max_ttl)


def resolve_ttl(ctx: TTLContext, base_ttl: float, pipeline: TTLPipeline) -> float:
    """Return the TTL to store a response for, given the TTL the origin granted."""
    return pipeline(ctx, base_ttl)
