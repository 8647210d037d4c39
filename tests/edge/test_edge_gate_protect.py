"""Tests for Gate.is_protected and the inlined copy in Gate.check: the literal-glob fast path.

Globs that are a literal prefix plus one trailing ``*``, or a literal path, are tested with
``str.startswith`` and a set probe instead of the regex; every answer must be the regex's.
"""

from __future__ import annotations

import fnmatch
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeauth.edge.gate import Gate, _normal_path
from edgeauth.edge.index import EdgeIndexes
from edgeauth.edge.jwt import JWTVerifier

NOW = 1_763_850_000.0
SECRET = "test-hs256-secret-0123456789abcdef0123456789"
_ODD = re.compile(r"%|\\|;|//|/\.")


def reference_protected(globs: list[str], path: bytes) -> bool:
    """The regex implementation (before the fast path): raw path, then its normal form."""
    if not globs:
        return False
    match = re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in globs)).match
    path = path.split(b"?", 1)[0].split(b"#", 1)[0]
    text = path.decode("latin-1")
    if match(text) is not None:
        return True
    return _ODD.search(text) is not None and match(_normal_path(text)) is not None


def gate(globs: list[str]) -> Gate:
    verifier = JWTVerifier(["HS256"], SECRET, None) if globs else None
    return Gate(EdgeIndexes(), verifier, globs, None, (), 60.0, "test", lambda event: None)


PATH_TOKENS = [
    b"/", b"/", b"a", b"b", b"api", b"admin", b".", b"..", b"%2e", b"%2E", b"%2f", b"%61",
    b"%", b"%%", b";", b";x=1", b"\\", b"?", b"#", b"*", b"[", b"\xe9", b"%C3%A9",
    b"%E2%82%AC", b"\n", b"//", b"/./", b"/../",
]  # fmt: skip
GLOB_TOKENS = ["/", "a", "b", "api", "admin", ".", "..", ";", "\\", "%", "%61", "é", "€", "\n"]
WILDCARDS = ["*", "?", "[ab]", "[!a]", "**"]

paths = st.lists(st.sampled_from(PATH_TOKENS), max_size=12).map(b"".join)


@st.composite
def globs(draw: st.DrawFn) -> str:
    body = draw(st.lists(st.sampled_from(GLOB_TOKENS), max_size=5))
    if draw(st.integers(0, 4)) == 0:  # sometimes a wildcard inside: the regex path
        body.insert(draw(st.integers(0, len(body))), draw(st.sampled_from(WILDCARDS)))
    return "".join(body) + draw(st.sampled_from(["*", "*", ""]))


@settings(max_examples=500, deadline=None)
@given(st.lists(globs(), max_size=4), st.lists(paths, min_size=1, max_size=8))
def test_protected_equals_the_regex(protect: list[str], requests: list[bytes]) -> None:
    """is_protected and Gate.check's decision equal the regex implementation for any path."""
    g = gate(protect)
    for path in requests:
        expected = reference_protected(protect, path)
        assert g.is_protected(path) is expected
        refusal = g.check("192.0.2.1", b"GET", path, None, NOW)
        assert (refusal is not None) is expected
        if refusal is not None:
            assert refusal.status == 401


def test_literal_globs_use_the_fast_path() -> None:
    """Literal prefixes and paths are recognised; any other wildcard keeps the regex for all."""
    g = gate(["/api/*", "/admin", "/x\\y*"])
    assert g._prefixes == ("/api/", "/x\\y")
    assert g._exact == frozenset({"/admin"})
    assert gate(["/api/*"])._exact is None
    for other in (["/api/*", "/a?c"], ["/api/**"], ["/a*/b*"], ["/[ab]/*"]):
        assert gate(other)._prefixes is None
    assert gate([])._prefixes is None


def test_fast_path_examples() -> None:
    """The cases the fast path must not get wrong (odd paths fall back to the normal form)."""
    g = gate(["/api/*", "/admin"])
    cases = {
        b"/api/items": True,
        b"/api/": True,
        b"/api": False,
        b"/api?x=/api/": False,
        b"/admin": True,
        b"/admin/": False,
        b"/admin?x": True,
        b"/admin#frag": True,
        b"/%61pi/x": True,
        b"//api/x": True,
        b"/public/../api/x": True,
        b"/./admin": True,
        b"/admin;jsessionid=1": True,
        b"/api\\x": True,
        b"/static/app.js": False,
        b"/static/%2e%2e/admin": True,
        b"/\xe9/api/x": False,
    }
    for path, protected in cases.items():
        assert g.is_protected(path) is protected, path
        assert reference_protected(["/api/*", "/admin"], path) is protected, path
        assert (g.check("192.0.2.1", b"GET", path, None, NOW) is not None) is protected, path
