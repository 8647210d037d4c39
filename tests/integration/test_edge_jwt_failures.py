"""JWT checks and the failure pattern on real edges in front of a real origin.

One master, two (or three) edges protecting ``/api/*`` with HS256 (a secret from the environment)
and RS256 (a JWKS file holding an RSA key generated for this run), one origin. Clients that must
look like other hosts bind their sockets to other 127.x.y.z addresses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest_twisted
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey
from support import (
    Client,
    EdgeFleet,
    Origin,
    Reply,
    RunningEdge,
    start_edge_env,
    start_master,
    wait_until,
)

HS_SECRET = "hs256-secret-for-the-edge-jwt-tests-0123456789"
AUDIENCE = "edgeauth-tests"
RSA_KID = "rsa-test-1"
BUDGET = 1.0
"""Seconds from the master's 201 to enforcement on every edge."""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def tamper(token: str) -> str:
    """The token with one bit of its signature flipped."""
    signed, signature = token.rsplit(".", 1)
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[0] ^= 1
    return f"{signed}.{b64(bytes(raw))}"


class Keys:
    """The keys of this run: the HS secret and a fresh RSA key, published as a JWKS file."""

    def __init__(self, directory: Path) -> None:
        self.rsa = RSAKey.generate_key(2048, parameters={"kid": RSA_KID}, private=True)
        self.hs = OctKey.import_key(HS_SECRET)
        self.jwks = directory / "jwks.json"
        self.jwks.write_text(json.dumps({"keys": [self.rsa.as_dict(private=False)]}))

    def claims(self, **claims: Any) -> dict[str, Any]:
        """Claims valid now for this audience, updated with ``claims``."""
        now = int(time.time())
        base = {"sub": "alice", "aud": AUDIENCE, "iat": now - 10, "exp": now + 600}
        base["jti"] = f"jti-{time.monotonic_ns()}"
        return {**base, **claims}

    def hs256(self, **claims: Any) -> str:
        return jwt.encode({"alg": "HS256"}, self.claims(**claims), self.hs)

    def rs256(self, **claims: Any) -> str:
        return jwt.encode({"alg": "RS256", "kid": RSA_KID}, self.claims(**claims), self.rsa)

    @staticmethod
    def hand_made(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
        """A compact JWS built by hand (HMAC-SHA256 with ``key``, or an empty-ish signature)."""
        head = b64(json.dumps(header).encode())
        body = b64(json.dumps(claims).encode())
        signing_input = f"{head}.{body}".encode()
        if key is None:
            return f"{head}.{body}.{b64(b'not-a-signature')}"
        return f"{head}.{body}.{b64(hmac.new(key, signing_input, hashlib.sha256).digest())}"

    def confused(self, **header: Any) -> str:
        """HS256 "signed" with the RSA public key's PEM, the classic key-confusion attack."""
        pem = self.rsa.as_pem(private=False)
        return self.hand_made({"alg": "HS256", "typ": "JWT", **header}, self.claims(), pem)


def gate_sections(keys: Keys) -> dict[str, dict[str, Any]]:
    return {
        "gate": {
            "protect": "/api/*",
            "jwt_algorithms": "HS256, RS256",
            "jwt_secret": "env:EDGEAUTH_JWT_SECRET",
            "jwks_file": str(keys.jwks),
            "audience": AUDIENCE,
        }
    }


class Bench(EdgeFleet):
    """A master, an origin and edges with the JWT gate; everything is closed by the stack."""

    def __init__(self, tmp_path: Path, stack: AsyncExitStack) -> None:
        super().__init__(tmp_path, stack)
        self.keys = Keys(tmp_path)
        self.origin = Origin()

    async def start(self, *names: str, **failures: Any) -> Bench:
        self.master = await start_master(self.tmp_path)
        self.stack.push_async_callback(self.master.stop)
        await self.origin.start()
        self.stack.push_async_callback(self.origin.stop)
        self.stack.push_async_callback(self.stop_edges)
        self.ops = self.client(self.master.url)
        for name in names:
            await self.start_edge(name, failures)
        return self

    async def start_edge(self, name: str, failures: dict[str, Any]) -> RunningEdge:
        edge = await start_edge_env(
            self.tmp_path,
            name,
            self.master.url,
            self.origin.url,
            environ={"EDGEAUTH_JWT_SECRET": HS_SECRET},
            failures=failures,
            **gate_sections(self.keys),
        )
        self.edges[name] = edge
        return edge

    async def admin(self, edge: RunningEdge, path: str) -> dict[str, Any]:
        client = Client(edge.admin_url)
        try:
            reply = await client.get(path, token=None)
        finally:
            await client.close()
        assert reply.code == 200, reply.body
        doc: dict[str, Any] = reply.json()
        return doc

    async def synced_to_tail(self) -> bool:
        reply = await self.ops.request("HEAD", "/v1/stream/events")
        tail = reply.header("stream-next-offset")
        for edge in self.edges.values():
            if edge.service.running and (await self.admin(edge, "/status"))["offset"] != tail:
                return False
        return True


def assert_invalid(reply: Reply, what: str) -> None:
    assert reply.code == 401, (what, reply.code, reply.body)
    assert reply.json() == {"error": "invalid_token"}, what
    assert reply.headers.getRawHeaders(b"www-authenticate") == [b'Bearer error="invalid_token"']
    assert reply.headers.getRawHeaders(b"content-type") == [b"application/json"], what
    assert reply.headers.getRawHeaders(b"cache-control") == [b"no-store"], what


def assert_revoked(reply: Reply) -> None:
    assert reply.code == 401, (reply.code, reply.body)
    assert reply.json() == {"error": "token_revoked"}


def assert_proxied(reply: Reply, path: str) -> None:
    assert reply.code == 200, (reply.code, reply.body)
    assert reply.body == b"origin says hello " + path.encode()


async def until_everywhere(
    clients: list[Client], path: str, token: str, code: int, what: str
) -> tuple[list[Reply], float]:
    """Poll until every client gets ``code``; return the replies and the seconds it took."""
    started = time.monotonic()

    async def check() -> list[Reply] | None:
        replies = [await c.get(path, token=token) for c in clients]
        return replies if all(r.code == code for r in replies) else None

    replies: list[Reply] = await wait_until(check, what, 5.0)
    return replies, time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_jwt_verification_and_revocation_on_every_edge(tmp_path: Path) -> None:
    """Valid HS256/RS256 pass; bad tokens get invalid_token; revocations reach both edges in 1 s."""
    async with AsyncExitStack() as stack:
        # Failures are not what this test is about: a threshold no test reaches.
        bench = await Bench(tmp_path, stack).start("edge-a", "edge-b", threshold=1000)
        keys = bench.keys
        users = [bench.client(edge.url) for edge in bench.edges.values()]
        now = int(time.time())

        for token in (keys.hs256(), keys.rs256()):
            for user in users:
                assert_proxied(await user.get("/api/x", token=token), "/api/x")
        for user in users:  # unprotected paths need no token
            assert_proxied(await user.get("/public", token=None), "/public")

        seen = len(bench.origin.requests)
        bad = {
            "missing": None,
            "expired": keys.hs256(exp=now - 120, iat=now - 600),
            "expired RS256": keys.rs256(exp=now - 120, iat=now - 600),
            "wrong signature": tamper(keys.hs256()),
            "wrong signature RS256": tamper(keys.rs256()),
            "signed with another secret": jwt.encode(
                {"alg": "HS256"}, keys.claims(), OctKey.import_key("another-secret-" * 3)
            ),
            "wrong aud": keys.rs256(aud="someone-else"),
            "alg none, empty signature": keys.hand_made(
                {"alg": "none", "typ": "JWT"}, keys.claims(), None
            ).rsplit(".", 1)[0]
            + ".",
            "alg none, with a signature": keys.hand_made(
                {"alg": "none", "typ": "JWT"}, keys.claims(), None
            ),
            "HS256 with the RSA public key PEM": keys.confused(),
            "HS256 with the RSA public key PEM and its kid": keys.confused(kid=RSA_KID),
        }
        for what, token in bad.items():
            for user in users:
                assert_invalid(await user.get("/api/x", token=token), what)
        assert len(bench.origin.requests) == seen  # nothing refused reached the origin

        # Revoked by jti, on both edges within a second of the 201.
        victim = keys.rs256(jti="jti-revoked", sub="carol")
        bystander = keys.rs256(jti="jti-kept", sub="carol")
        for user in users:
            assert_proxied(await user.get("/api/v", token=victim), "/api/v")
        await bench.post("/revoke/token", {"jti": "jti-revoked", "expires_at": now + 600})
        replies, elapsed = await until_everywhere(users, "/api/v", victim, 401, "jti revocation")
        assert elapsed <= BUDGET, elapsed
        for reply in replies:
            assert_revoked(reply)
        for user in users:
            assert_proxied(await user.get("/api/v", token=bystander), "/api/v")

        # Revoked by subject: tokens issued before the revocation go, later ones pass.
        old = keys.hs256(sub="bob", iat=now - 60)
        for user in users:
            assert_proxied(await user.get("/api/s", token=old), "/api/s")
        event = await bench.post("/revoke/subject", {"sub": "bob"})
        replies, elapsed = await until_everywhere(users, "/api/s", old, 401, "subject revocation")
        assert elapsed <= BUDGET, elapsed
        for reply in replies:
            assert_revoked(reply)
        later = keys.hs256(sub="bob", iat=int(event["before"]) + 2)
        other = keys.hs256(sub="dave", iat=now - 60)
        for user in users:
            assert_proxied(await user.get("/api/s", token=later), "/api/s")
            assert_proxied(await user.get("/api/s", token=other), "/api/s")


@pytest_twisted.ensureDeferred
async def test_failure_pattern_bans_locally_and_shares_when_told(tmp_path: Path) -> None:
    """5th failure bans on that edge only, survives restart; share_local_bans spreads it."""
    failures = {"threshold": 5, "window": 60, "ban_for": 600, "count_statuses": 401}
    async with AsyncExitStack() as stack:
        bench = await Bench(tmp_path, stack).start(
            "edge-a", "edge-b", share_local_bans="false", **failures
        )
        a, b = bench.edges["edge-a"], bench.edges["edge-b"]
        bad = tamper(bench.keys.hs256())
        attacker_a = bench.client(a.url, "127.0.0.5")
        attacker_b = bench.client(b.url, "127.0.0.5")
        bystander = bench.client(a.url, "127.0.0.1")

        for number in range(1, 5):
            assert_invalid(await attacker_a.get("/api/x", token=bad), f"failure {number}")
            assert_proxied(await attacker_a.get("/public", token=None), "/public")
        assert a.service.metrics.local_bans._value.get() == 0
        assert_invalid(await attacker_a.get("/api/x", token=bad), "failure 5")
        assert a.service.metrics.local_bans._value.get() == 1
        banned = await attacker_a.get("/public", token=None)
        assert banned.code == 403, banned.body
        assert banned.json()["error"] == "ip_banned"
        assert_proxied(await bystander.get("/public", token=None), "/public")
        explained = await bench.admin(a, "/explain?ip=127.0.0.5")
        assert explained["verdict"] == "refused"
        [entry] = explained["bans"]
        assert (entry["ip"], entry["source"]) == ("127.0.0.5/32", "edge:edge-a")
        assert 590 <= entry["expires_in"] <= 600

        # edge-b does not share: the master never hears of it and edge-b serves the client.
        assert (await bench.ops.get("/bans?ip=127.0.0.5")).json()["bans"] == []
        await wait_until(bench.synced_to_tail, "edge-b at the master's tail")
        assert_proxied(await attacker_b.get("/public", token=None), "/public")
        assert (await bench.admin(b, "/explain?ip=127.0.0.5"))["verdict"] == "served"

        # The local ban is in edge-a's file: it survives a restart.
        await a.stop()
        a = await bench.start_edge("edge-a", {"share_local_bans": "false", **failures})
        again = await bench.client(a.url, "127.0.0.5").get("/public", token=None)
        assert again.code == 403 and again.json()["error"] == "ip_banned", again.body
        [entry] = (await bench.admin(a, "/explain?ip=127.0.0.5"))["bans"]
        assert entry["source"] == "edge:edge-a"

        # edge-c shares its local bans: the master broadcasts them to edge-a and edge-b.
        c = await bench.start_edge("edge-c", {"share_local_bans": "true", **failures})
        attacker_c = bench.client(c.url, "127.0.0.6")
        for number in range(1, 6):
            assert_invalid(await attacker_c.get("/api/x", token=bad), f"failure {number} on c")
        assert c.service.metrics.local_bans._value.get() == 1
        elsewhere = [bench.client(edge.url, "127.0.0.6") for edge in (a, b, c)]

        async def banned_everywhere() -> bool:
            replies = [await client.get("/public", token=None) for client in elsewhere]
            return all(r.code == 403 for r in replies)

        await wait_until(banned_everywhere, "edge-c's shared ban on every edge", 5.0)
        [shared] = (await bench.ops.get("/bans?ip=127.0.0.6")).json()["bans"]
        assert (shared["ip"], shared["source"]) == ("127.0.0.6/32", "edge:edge-c")
        for edge in (a, b):
            [entry] = (await bench.admin(edge, "/explain?ip=127.0.0.6"))["bans"]
            assert (entry["source"], entry["seq"]) == ("edge:edge-c", shared["seq"])
            refused = await bench.client(edge.url, "127.0.0.6").get("/public", token=None)
            assert refused.json() == {"error": "ip_banned", "ref": shared["seq"]}
        assert_proxied(await bench.client(b.url, "127.0.0.1").get("/public", token=None), "/public")
