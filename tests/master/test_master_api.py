"""The operator API of PROTOCOL.md §3 on a real master over real HTTP (127.0.0.1, port 0)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import pytest
import pytest_twisted
from support import (
    EDGE_TOKEN,
    OPERATOR_TOKEN,
    READER_TOKEN,
    Client,
    Reply,
    RunningMaster,
    SSEReader,
    auth,
    data_events,
    start_master,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from edgeauth.wire.offsets import format_offset

JSON = {"Content-Type": "application/json"}
STREAM = "/v1/stream/events"


def off(seq: int) -> str:
    return format_offset(seq)


def assert_json_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """Check a documented JSON error answer (never HTML) and return its body."""
    assert reply.code == status, (reply.code, reply.body[:300])
    assert (reply.header("Content-Type") or "").startswith("application/json"), reply.headers
    assert b"<html" not in reply.body.lower() and b"traceback" not in reply.body.lower()
    doc = reply.json()
    assert isinstance(doc, dict)
    assert doc["error"] == code, doc
    assert isinstance(doc["detail"], str) and doc["detail"]
    return doc


@attrs.define
class Fixture:
    """A running master with a client, torn down by the test."""

    master: RunningMaster
    client: Client

    async def close(self) -> None:
        await self.client.close()
        await self.master.stop()


async def started(tmp_path: Path, **keys: Any) -> Fixture:
    master = await start_master(tmp_path, **keys)
    return Fixture(master, Client(master.url))


async def state_of(client: Client) -> tuple[str | None, str | None, dict[str, Any]]:
    """Return (tail from HEAD, log id, snapshot without taken_at)."""
    head = await client.request("HEAD", STREAM)
    assert head.code == 200
    snap = await client.get("/v1/snapshot")
    assert snap.code == 200
    doc = snap.json()
    doc.pop("taken_at")
    return head.header("Stream-Next-Offset"), snap.header("Edgeauth-Log-Id"), doc


# --- every write route ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_write_route_answers_201_with_event_and_offset(tmp_path: Path) -> None:
    """Each write of §3 answers 201 {"event", "offset"}, seqs grow by one, the stream agrees."""
    fx = await started(tmp_path)
    try:
        client = fx.client
        before = reactor.seconds()
        writes: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
            (
                "/ban/ip",
                {"ip": "::ffff:192.0.2.7", "reason": "abuse"},
                {"type": "ip_banned", "ip": "192.0.2.7/32", "reason": "abuse", "expires_at": None},
            ),
            (
                "/ban/ip",
                {"ip": "2001:db8::/48", "reason": "scan", "ttl": 600},
                {"type": "ip_banned", "ip": "2001:db8::/48", "reason": "scan"},
            ),
            ("/unban/ip", {"ip": "192.0.2.7"}, {"type": "ip_unbanned", "ip": "192.0.2.7/32"}),
            (
                "/allow/ip",
                {"ip": "198.51.100.0/24", "reason": "office", "ttl": 60},
                {"type": "ip_allowed", "ip": "198.51.100.0/24", "reason": "office"},
            ),
            (
                "/unallow/ip",
                {"ip": "198.51.100.0/24"},
                {"type": "ip_unallowed", "ip": "198.51.100.0/24"},
            ),
            (
                "/revoke/token",
                {"jti": "tok-1", "expires_at": 4e9, "reason": "leaked"},
                {"type": "token_revoked", "jti": "tok-1", "expires_at": 4e9, "reason": "leaked"},
            ),
            ("/revoke/subject", {"sub": "alice"}, {"type": "subject_revoked", "sub": "alice"}),
            (
                "/revoke/subject",
                {"sub": "bob", "before": 1700000000.5},
                {"type": "subject_revoked", "sub": "bob", "before": 1700000000.5},
            ),
            (
                "/invalidate",
                {"tags": ["t1"], "prefixes": ["example.com/a"], "soft": True},
                {
                    "type": "cache_invalidated",
                    "tags": ["t1"],
                    "keys": [],
                    "prefixes": ["example.com/a"],
                    "all": False,
                    "soft": True,
                },
            ),
            ("/invalidate", {"all": True}, {"type": "cache_invalidated", "all": True}),
        ]
        events = []
        for seq, (path, body, expected) in enumerate(writes, start=1):
            reply = await client.post(path, body)
            assert reply.code == 201, (path, reply.body)
            assert reply.header("Content-Type") == "application/json"
            doc = reply.json()
            assert set(doc) == {"event", "offset"}
            event = doc["event"]
            assert doc["offset"] == off(seq)
            assert event["seq"] == seq
            assert event["source"] == "operator:ops"
            assert before - 1 <= event["timestamp"] <= reactor.seconds() + 1
            assert {k: event[k] for k in expected} == expected, event
            events.append(event)
        scan, allow, alice = events[1], events[3], events[6]
        assert scan["expires_at"] == pytest.approx(scan["timestamp"] + 600, abs=0.002)
        assert allow["expires_at"] == pytest.approx(allow["timestamp"] + 60, abs=0.002)
        assert alice["before"] == alice["timestamp"]
        stream = await client.get(f"{STREAM}?offset=-1")
        assert stream.code == 200
        assert stream.json() == events
        assert stream.header("Stream-Next-Offset") == off(len(events))
    finally:
        await fx.close()


@pytest_twisted.ensureDeferred
async def test_unban_and_unallow_of_missing_entries_are_404(tmp_path: Path) -> None:
    """Unbanning a missing entry is 404 not_banned, unallowing one 404 not_allowed; no event."""
    fx = await started(tmp_path)
    try:
        client = fx.client
        assert (await client.post("/ban/ip", {"ip": "192.0.2.0/24"})).code == 201
        assert (await client.post("/allow/ip", {"ip": "192.0.2.0/24"})).code == 201
        assert_json_error(await client.post("/unban/ip", {"ip": "192.0.2.7"}), 404, "not_banned")
        assert_json_error(await client.post("/unallow/ip", {"ip": "192.0.2.7"}), 404, "not_allowed")
        assert (await client.post("/unban/ip", {"ip": "192.0.2.0/24"})).code == 201
        assert_json_error(await client.post("/unban/ip", {"ip": "192.0.2.0/24"}), 404, "not_banned")
        allows = (await client.get("/allows")).json()["allows"]
        assert [a["ip"] for a in allows] == ["192.0.2.0/24"], "unban never lifts an allow"
        tail, _, _ = await state_of(client)
        assert tail == off(3)
    finally:
        await fx.close()


@pytest_twisted.ensureDeferred
async def test_seed_compatible_forms(tmp_path: Path) -> None:
    """The Node sketch's POST /ban/ip {ip, reason} and POST /invalidate {tags, keys} work."""
    fx = await started(tmp_path)
    try:
        ban = await fx.client.post("/ban/ip", {"ip": "203.0.113.7", "reason": "abuse"})
        assert ban.code == 201
        assert ban.json()["event"]["ip"] == "203.0.113.7/32"
        assert ban.json()["event"]["reason"] == "abuse"
        assert ban.json()["event"]["expires_at"] is None
        inv = await fx.client.post("/invalidate", {"tags": ["product-42"], "keys": ["h/p"]})
        assert inv.code == 201
        event = inv.json()["event"]
        assert (event["tags"], event["keys"], event["all"]) == (["product-42"], ["h/p"], False)
        snap = (await fx.client.get("/v1/snapshot")).json()
        assert [b["ip"] for b in snap["bans"]] == ["203.0.113.7/32"]
    finally:
        await fx.close()


# --- state views ---------------------------------------------------------------------------------


async def page_through(client: Client, path: str, key: str, limit: int) -> list[list[str]]:
    """Follow ``next`` through every page of a list view; return the keys page by page."""
    pages: list[list[str]] = []
    after: str | None = None
    while True:
        query = f"?limit={limit}" + ("" if after is None else f"&after={quote(after, safe='')}")
        reply = await client.get(path + query, token=READER_TOKEN)
        assert reply.code == 200, reply.body
        doc = reply.json()
        rows = doc[key]
        if not rows:
            assert doc["next"] is None
            return pages
        pages.append([r["ip"] for r in rows])
        assert doc["next"] == rows[-1]["ip"]
        after = doc["next"]
        assert len(pages) < 20


@pytest_twisted.ensureDeferred
async def test_bans_allows_and_revocations_page_with_limit_and_after(tmp_path: Path) -> None:
    """GET /bans, /allows and /revocations page by key with limit and after."""
    fx = await started(tmp_path)
    try:
        client = fx.client
        nets = ["10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32", "198.51.100.7/32", "9.9.9.9/32"]
        for i, net in enumerate(nets):
            assert (await client.post("/ban/ip", {"ip": net, "reason": f"b{i}"})).code == 201
        for net in nets[:3]:
            assert (await client.post("/allow/ip", {"ip": net, "reason": "ok"})).code == 201
        for jti in ("j3", "j1", "j2"):
            assert (await client.post("/revoke/token", {"jti": jti})).code == 201
        for sub in ("s2", "s1"):
            assert (await client.post("/revoke/subject", {"sub": sub, "before": 5})).code == 201
        ban_pages = await page_through(client, "/bans", "bans", 2)
        assert [len(p) for p in ban_pages] == [2, 2, 1]
        assert sum(ban_pages, []) == sorted(nets)
        allow_pages = await page_through(client, "/allows", "allows", 2)
        assert sum(allow_pages, []) == sorted(nets[:3])
        full = (await client.get("/bans")).json()["bans"]
        assert full[0] == {
            "ip": "10.0.0.0/8",
            "reason": "b0",
            "expires_at": None,
            "source": "operator:ops",
            "seq": 1,
        }
        revs = await client.get("/revocations?limit=2", token=READER_TOKEN)
        assert revs.code == 200
        doc = revs.json()
        assert doc["revoked_tokens"] == [
            {"jti": "j1", "expires_at": None},
            {"jti": "j2", "expires_at": None},
        ]
        assert doc["revoked_subjects"] == [
            {"sub": "s1", "before": 5.0},
            {"sub": "s2", "before": 5.0},
        ]
        rest = (await client.get("/revocations?limit=2&after=j2")).json()
        assert rest["revoked_tokens"] == [{"jti": "j3", "expires_at": None}]
        for bad in ("limit=0", "limit=abc", "limit=10001", "limit=-1"):
            assert_json_error(await client.get(f"/bans?{bad}"), 400, "invalid_parameter")
    finally:
        await fx.close()


@pytest_twisted.ensureDeferred
async def test_bans_by_ip_lists_every_covering_entry(tmp_path: Path) -> None:
    """GET /bans?ip=A lists the /32, /24 and /16 covering A, not a /24 beside it."""
    fx = await started(tmp_path)
    try:
        client = fx.client
        for net in ("192.0.2.7", "192.0.2.0/24", "192.0.0.0/16", "192.0.3.0/24", "10.0.0.0/8"):
            assert (await client.post("/ban/ip", {"ip": net})).code == 201
        assert (await client.post("/allow/ip", {"ip": "192.0.2.0/25"})).code == 201
        expected = ["192.0.0.0/16", "192.0.2.0/24", "192.0.2.7/32"]
        for spelling in ("192.0.2.7", "::ffff:192.0.2.7", "192.0.2.7/32"):
            reply = await client.get(f"/bans?ip={quote(spelling)}", token=READER_TOKEN)
            assert reply.code == 200
            assert [b["ip"] for b in reply.json()["bans"]] == expected
        other = await client.get("/bans?ip=192.0.3.1")
        assert [b["ip"] for b in other.json()["bans"]] == ["192.0.0.0/16", "192.0.3.0/24"]
        none = await client.get("/bans?ip=2001:db8::1")
        assert none.json()["bans"] == []
        allows = await client.get("/allows?ip=192.0.2.7")
        assert [a["ip"] for a in allows.json()["allows"]] == ["192.0.2.0/25"]
        assert (await client.get("/allows?ip=192.0.2.200")).json()["allows"] == []
        for bad in ("192.0.2.0/24", "1.2.3.4/24", "garbage", "300.1.1.1"):
            assert_json_error(await client.get(f"/bans?ip={quote(bad)}"), 400, "invalid_ip")
    finally:
        await fx.close()


@pytest_twisted.ensureDeferred
async def test_reban_replaces_the_one_entry(tmp_path: Path) -> None:
    """Re-banning a network leaves one entry, with the new reason, in /bans and the snapshot."""
    fx = await started(tmp_path)
    try:
        client = fx.client
        first = await client.post("/ban/ip", {"ip": "192.0.2.0/24", "reason": "first"})
        second = await client.post(
            "/ban/ip", {"ip": "::ffff:192.0.2.0/120", "reason": "second", "ttl": 3600}
        )
        assert (first.code, second.code) == (201, 201)
        new = second.json()["event"]
        bans = (await client.get("/bans")).json()["bans"]
        assert bans == [
            {
                "ip": "192.0.2.0/24",
                "reason": "second",
                "expires_at": new["expires_at"],
                "source": "operator:ops",
                "seq": 2,
            }
        ]
        snap = (await client.get("/v1/snapshot")).json()
        assert snap["bans"] == bans
        assert snap["offset"] == off(2)
        third = await client.post("/ban/ip", {"ip": "192.0.2.0/24", "reason": "third"})
        assert third.code == 201
        bans = (await client.get("/bans")).json()["bans"]
        assert [(b["reason"], b["expires_at"], b["seq"]) for b in bans] == [("third", None, 3)]
    finally:
        await fx.close()


@pytest_twisted.ensureDeferred
async def test_allows_are_listed(tmp_path: Path) -> None:
    """Allow entries appear in /allows and the snapshot, never in /bans."""
    fx = await started(tmp_path)
    try:
        client = fx.client
        reply = await client.post("/allow/ip", {"ip": "2001:db8::/64", "reason": "ci"})
        assert reply.code == 201
        allows = (await client.get("/allows", token=READER_TOKEN)).json()
        assert allows["allows"] == [
            {
                "ip": "2001:db8::/64",
                "reason": "ci",
                "expires_at": None,
                "source": "operator:ops",
                "seq": 1,
            }
        ]
        assert allows["next"] == "2001:db8::/64"
        assert (await client.get("/bans")).json()["bans"] == []
        assert (await client.get("/v1/snapshot")).json()["allows"] == allows["allows"]
    finally:
        await fx.close()


# --- bad input -----------------------------------------------------------------------------------


@attrs.define
class Baseline:
    """A master seeded with some state, and that state as first read."""

    fx: Fixture
    tail: str | None
    log_id: str | None
    snapshot: dict[str, Any]


@pytest_twisted.async_yield_fixture(scope="module")
async def seeded(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Baseline]:
    """One master for the whole bad-input table, seeded with a ban, allow and revocations."""
    fx = await started(tmp_path_factory.mktemp("bad-input"))
    client = fx.client
    for path, body in [
        ("/ban/ip", {"ip": "192.0.2.0/24", "reason": "seed"}),
        ("/ban/ip", {"ip": "198.51.100.7", "reason": "seed"}),
        ("/allow/ip", {"ip": "192.0.2.1", "reason": "seed"}),
        ("/revoke/token", {"jti": "seed"}),
        ("/revoke/subject", {"sub": "seed", "before": 10}),
    ]:
        assert (await client.post(path, body)).code == 201
    tail, log_id, snapshot = await state_of(client)
    assert tail == off(5)
    yield Baseline(fx, tail, log_id, snapshot)
    await fx.close()


def body_of(value: Any) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


HUGE = b'{"ip": "192.0.2.9", "reason": "' + b"x" * 70_000 + b'"}'

# (id, method, path, body, headers, token, status, code)
BAD_REQUESTS: list[tuple[str, str, str, Any, dict[str, str], str | None, int, str]] = [
    ("malformed-json", "POST", "/ban/ip", b'{"ip": ', JSON, OPERATOR_TOKEN, 400, "invalid_json"),
    ("empty-body", "POST", "/ban/ip", b"", JSON, OPERATOR_TOKEN, 400, "invalid_json"),
    ("not-utf8", "POST", "/ban/ip", b'{"ip": "\xff"}', JSON, OPERATOR_TOKEN, 400, "invalid_json"),
    ("deep-nesting", "POST", "/ban/ip", b"[" * 60_000, JSON, OPERATOR_TOKEN, 400, "invalid_json"),
    ("array-body", "POST", "/ban/ip", ["192.0.2.9"], JSON, OPERATOR_TOKEN, 400, "invalid_field"),
    ("string-body", "POST", "/invalidate", "all", JSON, OPERATOR_TOKEN, 400, "invalid_field"),
    ("null-body", "POST", "/revoke/token", None, JSON, OPERATOR_TOKEN, 400, "invalid_field"),
    ("ip-int", "POST", "/ban/ip", {"ip": 5}, JSON, OPERATOR_TOKEN, 400, "invalid_ip"),
    (
        "ttl-string",
        "POST",
        "/ban/ip",
        {"ip": "192.0.2.9", "ttl": "x"},
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_field",
    ),
    (
        "ttl-bool",
        "POST",
        "/ban/ip",
        {"ip": "192.0.2.9", "ttl": True},
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_field",
    ),
    (
        "ttl-zero",
        "POST",
        "/allow/ip",
        {"ip": "192.0.2.9", "ttl": 0},
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_field",
    ),
    (
        "ttl-huge-int",
        "POST",
        "/ban/ip",
        b'{"ip": "192.0.2.9", "ttl": 1' + b"0" * 400 + b"}",
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_field",
    ),
    (
        "ttl-1e400",
        "POST",
        "/ban/ip",
        b'{"ip": "192.0.2.9", "ttl": 1e400}',
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_field",
    ),
    (
        "ttl-nan",
        "POST",
        "/ban/ip",
        b'{"ip": "192.0.2.9", "ttl": NaN}',
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_json",
    ),
    (
        "before-infinity",
        "POST",
        "/revoke/subject",
        b'{"sub": "x", "before": -Infinity}',
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_json",
    ),
    (
        "reason-list",
        "POST",
        "/ban/ip",
        {"ip": "192.0.2.9", "reason": []},
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_field",
    ),
    (
        "reason-lone-surrogate",
        "POST",
        "/ban/ip",
        b'{"ip": "192.0.2.9", "reason": "x\\ud800"}',
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_field",
    ),
    (
        "jti-lone-surrogate",
        "POST",
        "/revoke/token",
        b'{"jti": "\\udfff"}',
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_field",
    ),
    (
        "tags-string",
        "POST",
        "/invalidate",
        {"tags": "a"},
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_field",
    ),
    ("tags-ints", "POST", "/invalidate", {"tags": [1]}, JSON, OPERATOR_TOKEN, 400, "invalid_field"),
    (
        "all-string",
        "POST",
        "/invalidate",
        {"all": "yes"},
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_field",
    ),
    (
        "no-selector",
        "POST",
        "/invalidate",
        {"soft": True},
        JSON,
        OPERATOR_TOKEN,
        400,
        "missing_field",
    ),
    ("no-ip", "POST", "/ban/ip", {"reason": "x"}, JSON, OPERATOR_TOKEN, 400, "missing_field"),
    ("no-jti", "POST", "/revoke/token", {}, JSON, OPERATOR_TOKEN, 400, "missing_field"),
    (
        "expires-at-string",
        "POST",
        "/revoke/token",
        {"jti": "x", "expires_at": "soon"},
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_field",
    ),
    (
        "before-negative",
        "POST",
        "/revoke/subject",
        {"sub": "x", "before": -1},
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_field",
    ),
    ("too-large", "POST", "/ban/ip", HUGE, JSON, OPERATOR_TOKEN, 413, "body_too_large"),
    (
        "text-plain",
        "POST",
        "/ban/ip",
        {"ip": "192.0.2.9"},
        {"Content-Type": "text/plain"},
        OPERATOR_TOKEN,
        415,
        "unsupported_media_type",
    ),
    (
        "form-encoded",
        "POST",
        "/unban/ip",
        b"ip=192.0.2.0%2F24",
        {"Content-Type": "application/x-www-form-urlencoded"},
        OPERATOR_TOKEN,
        415,
        "unsupported_media_type",
    ),
    (
        "host-bits",
        "POST",
        "/ban/ip",
        {"ip": "1.2.3.4/24"},
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_ip",
    ),
    ("octet-300", "POST", "/ban/ip", {"ip": "300.1.1.1"}, JSON, OPERATOR_TOKEN, 400, "invalid_ip"),
    (
        "mapped-zz",
        "POST",
        "/allow/ip",
        {"ip": "::ffff:zz"},
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_ip",
    ),
    ("zone-id", "POST", "/ban/ip", {"ip": "fe80::1%eth0"}, JSON, OPERATOR_TOKEN, 400, "invalid_ip"),
    (
        "unban-host-bits",
        "POST",
        "/unban/ip",
        {"ip": "192.0.2.1/24"},
        JSON,
        OPERATOR_TOKEN,
        400,
        "invalid_ip",
    ),
    (
        "unknown-field",
        "POST",
        "/ban/ip",
        {"ip": "192.0.2.9", "reson": "typo"},
        JSON,
        OPERATOR_TOKEN,
        400,
        "unknown_field",
    ),
    (
        "unknown-field-unban",
        "POST",
        "/unban/ip",
        {"ip": "192.0.2.0/24", "reason": "x"},
        JSON,
        OPERATOR_TOKEN,
        400,
        "unknown_field",
    ),
    (
        "unknown-field-invalidate",
        "POST",
        "/invalidate",
        {"tags": ["a"], "tag": ["a"]},
        JSON,
        OPERATOR_TOKEN,
        400,
        "unknown_field",
    ),
    (
        "unban-missing",
        "POST",
        "/unban/ip",
        {"ip": "192.0.2.9"},
        JSON,
        OPERATOR_TOKEN,
        404,
        "not_banned",
    ),
    (
        "unallow-missing",
        "POST",
        "/unallow/ip",
        {"ip": "192.0.2.0/24"},
        JSON,
        OPERATOR_TOKEN,
        404,
        "not_allowed",
    ),
    ("offset-abc", "GET", f"{STREAM}?offset=abc", None, {}, OPERATOR_TOKEN, 400, "invalid_offset"),
    ("offset-minus-2", "GET", f"{STREAM}?offset=-2", None, {}, EDGE_TOKEN, 400, "invalid_offset"),
    (
        "offset-17-digits",
        "GET",
        f"{STREAM}?offset=00000000000000001",
        None,
        {},
        EDGE_TOKEN,
        400,
        "invalid_offset",
    ),
    (
        "offset-dotdot",
        "GET",
        f"{STREAM}?offset=../",
        None,
        {},
        EDGE_TOKEN,
        400,
        "invalid_offset",
    ),
    (
        "offset-long-poll",
        "GET",
        f"{STREAM}?offset=%2B1&live=long-poll",
        None,
        {},
        EDGE_TOKEN,
        400,
        "invalid_offset",
    ),
    (
        "offset-sse",
        "GET",
        f"{STREAM}?offset=1e3&live=sse",
        None,
        {},
        EDGE_TOKEN,
        400,
        "invalid_offset",
    ),
    ("no-token", "POST", "/ban/ip", {"ip": "192.0.2.9"}, JSON, None, 401, "unauthorized"),
    (
        "wrong-token",
        "POST",
        "/ban/ip",
        {"ip": "192.0.2.9"},
        JSON,
        "not-a-configured-token",
        401,
        "unauthorized",
    ),
    ("no-token-read", "GET", "/bans", None, {}, None, 401, "unauthorized"),
    ("no-token-stream", "GET", f"{STREAM}?offset=-1", None, {}, None, 401, "unauthorized"),
    ("no-token-metrics", "GET", "/metrics", None, {}, None, 401, "unauthorized"),
    ("reader-writes", "POST", "/ban/ip", {"ip": "192.0.2.9"}, JSON, READER_TOKEN, 403, "forbidden"),
    (
        "reader-invalidates",
        "POST",
        "/invalidate",
        {"all": True},
        JSON,
        READER_TOKEN,
        403,
        "forbidden",
    ),
    (
        "edge-unbans",
        "POST",
        "/unban/ip",
        {"ip": "192.0.2.0/24"},
        JSON,
        EDGE_TOKEN,
        403,
        "forbidden",
    ),
    ("edge-allows", "POST", "/allow/ip", {"ip": "192.0.2.9"}, JSON, EDGE_TOKEN, 403, "forbidden"),
    ("edge-reads-bans", "GET", "/bans", None, {}, EDGE_TOKEN, 403, "forbidden"),
    (
        "stream-post",
        "POST",
        STREAM,
        {"ip": "192.0.2.9"},
        JSON,
        OPERATOR_TOKEN,
        405,
        "method_not_allowed",
    ),
    ("wrong-method", "GET", "/ban/ip", None, {}, OPERATOR_TOKEN, 405, "method_not_allowed"),
    ("unknown-route", "GET", "/no/such/route", None, {}, OPERATOR_TOKEN, 404, "not_found"),
    (
        "unknown-route-post",
        "POST",
        "/ban/ips",
        {"ip": "1.2.3.4"},
        JSON,
        OPERATOR_TOKEN,
        404,
        "not_found",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "token", "status", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
@pytest_twisted.ensureDeferred
async def test_bad_requests_get_json_errors_and_change_nothing(
    seeded: Baseline,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str],
    token: str | None,
    status: int,
    code: str,
) -> None:
    """Each bad request gets its documented JSON error status and leaves the log as it was."""
    client = seeded.fx.client
    data = None if method == "GET" else body_of(body)
    reply = await client.request(method, path, token=token, body=data, headers=headers)
    assert_json_error(reply, status, code)
    assert reply.header("Cache-Control") == "no-store"
    if status == 401:
        assert (reply.header("WWW-Authenticate") or "").startswith("Bearer")
    if status == 405:
        assert reply.header("Allow"), "405 names the allowed methods"
    if token is not None:
        assert token.encode() not in reply.body, "a presented token is never echoed"
    assert await state_of(client) == (seeded.tail, seeded.log_id, seeded.snapshot)


@implementer(IBodyProducer)
class ChunkedBody:
    """A body of unknown length, so the client sends it chunked (no Content-Length)."""

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes) -> None:
        self.data = data

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_chunked_huge_body_is_413(seeded: Baseline) -> None:
    """A body over max_body sent chunked (no Content-Length) is 413 too, and changes nothing."""
    client = seeded.fx.client
    response = await client.http.request(
        "POST",
        client.base_url + "/ban/ip",
        data=ChunkedBody(HUGE),
        headers={**auth(), **JSON},
    )
    content = await response.content()
    reply = Reply(response.code, response.headers, content)
    assert_json_error(reply, 413, "body_too_large")
    assert await state_of(client) == (seeded.tail, seeded.log_id, seeded.snapshot)


@pytest_twisted.ensureDeferred
async def test_body_at_max_body_is_accepted(tmp_path: Path) -> None:
    """A body of exactly max_body bytes is still accepted (the limit is inclusive)."""
    fx = await started(tmp_path, max_body=200)
    try:
        prefix = b'{"ip": "192.0.2.9", "reason": "'
        body = prefix + b"x" * (200 - len(prefix) - 2) + b'"}'
        assert len(body) == 200
        reply = await fx.client.request("POST", "/ban/ip", body=body, headers=JSON)
        assert reply.code == 201, reply.body
        assert_json_error(
            await fx.client.request("POST", "/ban/ip", body=body[:-2] + b'x"}', headers=JSON),
            413,
            "body_too_large",
        )
    finally:
        await fx.close()


# --- health, metrics, fleet ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_health_and_readiness_need_no_token(tmp_path: Path) -> None:
    """GET /healthz and /readyz answer 200 JSON without any Authorization header."""
    fx = await started(tmp_path)
    try:
        health = await fx.client.get("/healthz", token=None)
        assert health.code == 200
        assert health.json() == {"status": "ok"}
        ready = await fx.client.get("/readyz", token=None)
        assert ready.code == 200
        assert ready.json() == {"status": "ready", "tail": off(0)}
        assert (await fx.client.request("HEAD", "/healthz", token=None)).code == 200
    finally:
        await fx.close()


@pytest_twisted.ensureDeferred
async def test_metrics_need_a_token_and_show_the_master_series(tmp_path: Path) -> None:
    """GET /metrics needs a reader/operator token and exposes appends, latency, subscribers."""
    fx = await started(tmp_path)
    try:
        client = fx.client
        assert (await client.post("/ban/ip", {"ip": "192.0.2.1"})).code == 201
        assert (await client.post("/ban/ip", {"ip": "192.0.2.2"})).code == 201
        assert (await client.post("/unban/ip", {"ip": "192.0.2.3"})).code == 404
        assert (await client.request("HEAD", STREAM)).code == 200
        assert_json_error(await client.get("/metrics", token=None), 401, "unauthorized")
        assert_json_error(await client.get("/metrics", token=EDGE_TOKEN), 403, "forbidden")
        reply = await client.get("/metrics", token=READER_TOKEN)
        assert reply.code == 200
        assert (reply.header("Content-Type") or "").startswith("text/plain")
        text = reply.body.decode()
        lines = text.splitlines()
        assert 'edgeauth_master_events_appended_total{type="ip_banned"} 2.0' in lines
        assert "edgeauth_master_append_seconds_count 2.0" in lines
        assert any(line.startswith("edgeauth_master_append_seconds_bucket{") for line in lines)
        assert 'edgeauth_master_subscribers{kind="sse"} 0.0' in lines
        assert 'edgeauth_master_stream_requests_total{mode="head",status="200"} 1.0' in lines
        assert 'edgeauth_master_append_refused_total{code="not_banned"} 1.0' in lines
        assert "edgeauth_master_log_tail_seq 2.0" in lines
    finally:
        await fx.close()


@pytest_twisted.ensureDeferred
async def test_fleet_lists_a_connected_sse_subscriber(tmp_path: Path) -> None:
    """GET /fleet shows an SSE reader by its Edgeauth-Edge-Id, with its offset and lag."""
    fx = await started(tmp_path)
    client = fx.client
    sse: SSEReader | None = None
    try:
        for i in range(1, 4):
            assert (await client.post("/ban/ip", {"ip": f"192.0.2.{i}"})).code == 201
        sse = await SSEReader.open(
            client.agent,
            f"{fx.master.url}{STREAM}?offset={off(1)}&live=sse",
            {**auth(EDGE_TOKEN), "Edgeauth-Edge-Id": "edge-fleet-1"},
        )
        assert sse.response is not None and sse.response.code == 200
        await sse.wait_for(lambda r: len(data_events(r)) >= 2)
        await sse.wait_for(
            lambda r: any(
                e.event == "control" and json.loads(e.data)["streamNextOffset"] == off(3)
                for e in r.events
            )
        )
        catch_up = await client.get(
            f"{STREAM}?offset={off(1)}", token=EDGE_TOKEN, headers={"Edgeauth-Edge-Id": "edge-old"}
        )
        assert catch_up.code == 200
        fleet = await client.get("/fleet", token=READER_TOKEN)
        assert fleet.code == 200
        doc = fleet.json()
        assert doc["tail"] == off(3)
        snapshot = await client.get("/v1/snapshot")
        assert doc["log_id"] == snapshot.header("Edgeauth-Log-Id") != ""
        members = {m["edge_id"]: m for m in doc["subscribers"]}
        live = members["edge-fleet-1"]
        assert live["connected"] is True
        assert live["mode"] == "sse"
        assert live["address"] == "127.0.0.1"
        assert live["offset"] == off(3)
        assert live["lag"] == 0
        assert live["connected_since"] <= reactor.seconds()
        old = members["edge-old"]
        assert (old["offset"], old["lag"], old["connected"]) == (off(1), 2, False)
        ban = await client.post("/ban/ip", {"ip": "192.0.2.4"})
        assert ban.code == 201
        await sse.wait_for(lambda r: len(data_events(r)) >= 3)
        assert [e["seq"] for e in data_events(sse)] == [2, 3, 4]
        members = {m["edge_id"]: m for m in (await client.get("/fleet")).json()["subscribers"]}
        assert (members["edge-fleet-1"]["offset"], members["edge-fleet-1"]["lag"]) == (off(4), 0)
        assert members["edge-old"]["lag"] == 3
    finally:
        if sse is not None:
            sse.close()
        await fx.close()


# --- edge-reported bans --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_edge_source_claim_is_kept_operator_claim_ignored(tmp_path: Path) -> None:
    """An edge token's "source": "edge:edge-b" is kept; an operator's claimed source is ignored."""
    fx = await started(tmp_path)
    try:
        client = fx.client
        edge = await client.post(
            "/ban/ip",
            {"ip": "203.0.113.5", "reason": "failures", "ttl": 600, "source": "edge:edge-b"},
            token=EDGE_TOKEN,
        )
        assert edge.code == 201, edge.body
        assert edge.json()["event"]["source"] == "edge:edge-b"
        plain = await client.post("/ban/ip", {"ip": "203.0.113.6"}, token=EDGE_TOKEN)
        assert plain.json()["event"]["source"] == "edge:edges"
        operator = await client.post(
            "/ban/ip", {"ip": "203.0.113.7", "source": "edge:edge-b"}, token=OPERATOR_TOKEN
        )
        assert operator.code == 201
        assert operator.json()["event"]["source"] == "operator:ops"
        bans = {b["ip"]: b["source"] for b in (await client.get("/bans")).json()["bans"]}
        assert bans == {
            "203.0.113.5/32": "edge:edge-b",
            "203.0.113.6/32": "edge:edges",
            "203.0.113.7/32": "operator:ops",
        }
    finally:
        await fx.close()
