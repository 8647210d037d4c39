"""The dashboard ``/ui`` over real HTTP: sign-in, session cookie, escaping, what the cookie opens.

The browser test (headless Chromium) is ``test_ui_browser.py``; this file checks the server's
side of the contract with a plain HTTP client on 127.0.0.1.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from io import BytesIO
from pathlib import Path
from urllib.parse import urlencode

import pytest_twisted
import treq
from support import (
    EDGE_TOKEN,
    OPERATOR_TOKEN,
    READER_TOKEN,
    Client,
    Reply,
    RunningMaster,
    SSEReader,
    start_master,
)
from twisted.internet.task import Clock
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers

from edgeauth.config import TokenEntry
from edgeauth.master.auth import Principal, SessionStore, TokenAuthority


class Browserish:
    """Plain HTTP requests as a browser makes them: forms, explicit cookies, no redirects.

    It uses the bare ``Agent``: treq would keep cookies in a jar and follow redirects.
    """

    def __init__(self, master: RunningMaster) -> None:
        self.base = master.url
        self.client = Client(master.url)

    async def send(
        self,
        method: str,
        path: str,
        *,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        all_headers = dict(headers or {})
        producer = None
        if form is not None:
            producer = FileBodyProducer(BytesIO(urlencode(form).encode()))
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        raw = Headers({k.encode(): [v.encode()] for k, v in all_headers.items()})
        url = (self.base + path).encode("ascii")
        response = await self.client.agent.request(method.encode(), url, raw, producer)
        return Reply(response.code, response.headers, await treq.content(response))

    async def sign_in(self, token: str) -> str:
        """Sign in with ``token``; return the ``Cookie`` header value of the session."""
        reply = await self.send("POST", "/ui/login", form={"token": token})
        assert reply.code == 303, reply.body
        assert reply.header("location") == "/ui"
        cookie = reply.header("set-cookie")
        assert cookie is not None
        return cookie.split(";")[0]

    async def close(self) -> None:
        await self.client.close()


@asynccontextmanager
async def dashboard(tmp_path: Path) -> AsyncIterator[tuple[RunningMaster, Browserish, Client]]:
    async with AsyncExitStack() as stack:
        master = await start_master(tmp_path)
        stack.push_async_callback(master.stop)
        browser = Browserish(master)
        stack.push_async_callback(browser.close)
        ops = Client(master.url)
        stack.push_async_callback(ops.close)
        yield master, browser, ops


@pytest_twisted.ensureDeferred
async def test_sign_in_sets_a_strict_http_only_session_cookie(tmp_path: Path) -> None:
    async with dashboard(tmp_path) as (master, browser, _):
        unauthenticated = await browser.send("GET", "/ui")
        assert unauthenticated.code == 303 and unauthenticated.header("location") == "/ui/login"
        form = await browser.send("GET", "/ui/login")
        assert form.code == 200 and b'action="/ui/login"' in form.body
        assert b'type="password"' in form.body
        policy = form.header("content-security-policy") or ""
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert form.header("x-frame-options") == "DENY"

        reply = await browser.send("POST", "/ui/login", form={"token": READER_TOKEN})
        assert reply.code == 303 and reply.header("location") == "/ui"
        cookie = reply.header("set-cookie") or ""
        attributes = [part.strip() for part in cookie.split(";")]
        name, value = attributes[0].split("=", 1)
        assert name == "edgeauth_session" and len(value) >= 32
        assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attributes), cookie
        assert any(a.startswith("Max-Age=") and int(a[8:]) > 0 for a in attributes), cookie
        assert READER_TOKEN not in cookie and "Secure" not in attributes  # plain HTTP here

        page = await browser.send("GET", "/ui", headers={"Cookie": attributes[0]})
        assert page.code == 200, page.body
        assert page.header("content-type") == "text/html; charset=utf-8"
        assert page.header("cache-control") == "no-store"
        assert b"reader:viewer" in page.body and READER_TOKEN.encode() not in page.body
        assert len(master.service.fanout.fleet_view()) == 0


@pytest_twisted.ensureDeferred
async def test_sign_in_refusals(tmp_path: Path) -> None:
    async with dashboard(tmp_path) as (_, browser, _ops):
        wrong = await browser.send("POST", "/ui/login", form={"token": "nope-not-a-token"})
        assert wrong.code == 401 and wrong.header("set-cookie") is None
        assert b"that token is not valid" in wrong.body and b"nope-not-a-token" not in wrong.body
        edge = await browser.send("POST", "/ui/login", form={"token": EDGE_TOKEN})
        assert edge.code == 403 and edge.header("set-cookie") is None
        empty = await browser.send("POST", "/ui/login", form={"token": ""})
        assert empty.code == 400
        as_json = await browser.send(
            "POST",
            "/ui/login",
            headers={"Content-Type": "application/json"},
        )
        assert as_json.code == 415
        cross = await browser.send(
            "POST",
            "/ui/login",
            form={"token": READER_TOKEN},
            headers={"Origin": "http://evil.example"},
        )
        assert cross.code == 403 and cross.header("set-cookie") is None
        # A token in the URL is never taken.
        in_url = await browser.send("GET", f"/ui?token={READER_TOKEN}")
        assert in_url.code == 303 and in_url.header("location") == "/ui/login"
        assert (await browser.send("DELETE", "/ui")).code == 405
        assert (await browser.send("GET", "/ui/nope")).code == 404


@pytest_twisted.ensureDeferred
async def test_the_cookie_opens_the_dashboard_and_events_only(tmp_path: Path) -> None:
    """A session reads /ui, /ui/state and /events; the API and every write ignore it."""
    async with dashboard(tmp_path) as (master, browser, ops):
        cookie = await browser.sign_in(OPERATOR_TOKEN)  # even an operator's session
        headers = {"Cookie": cookie}
        state = await browser.send("GET", "/ui/state", headers=headers)
        assert state.code == 200 and state.json()["counts"]["bans"] == 0
        assert (await browser.send("GET", "/bans", headers=headers)).code == 401
        assert (await browser.send("GET", "/fleet", headers=headers)).code == 401
        ban = await browser.send(
            "POST",
            "/ban/ip",
            headers={**headers, "Content-Type": "application/json"},
        )
        assert ban.code == 401
        assert (await browser.send("GET", "/v1/snapshot", headers=headers)).code == 401

        reader = await SSEReader.open(
            ops.agent, master.url + "/events?last_event_id=0", headers=headers
        )
        try:
            assert reader.response is not None and reader.response.code == 200
            posted = await ops.post("/ban/ip", {"ip": "192.0.2.77", "reason": "cookie stream"})
            assert posted.code == 201
            await reader.wait_for(lambda r: any(e.event == "ip_banned" for e in r.events))
            [event] = [e for e in reader.events if e.event == "ip_banned"]
            assert json.loads(event.data)["ip"] == "192.0.2.77/32"
        finally:
            reader.close()
        no_cookie = await browser.send("GET", "/events")
        assert no_cookie.code == 401

        out = await browser.send("POST", "/ui/logout", headers=headers)
        assert out.code == 303 and out.header("location") == "/ui/login"
        assert "Max-Age=0" in (out.header("set-cookie") or "")
        assert (await browser.send("GET", "/ui/state", headers=headers)).code == 401
        assert (await browser.send("GET", "/ui", headers=headers)).code == 303


@pytest_twisted.ensureDeferred
async def test_everything_shown_is_escaped(tmp_path: Path) -> None:
    async with dashboard(tmp_path) as (master, browser, ops):
        evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
        posted = await ops.post("/ban/ip", {"ip": "192.0.2.1", "reason": evil})
        assert posted.code == 201
        reader = await SSEReader.open(
            ops.agent,
            master.url + "/v1/stream/events?offset=now&live=sse",
            headers={"Edgeauth-Edge-Id": '"><b>edge</b>', "Authorization": f"Bearer {EDGE_TOKEN}"},
        )
        try:
            await reader.wait_for(lambda r: any(e.event == "control" for e in r.events))
            cookie = await browser.sign_in(READER_TOKEN)
            page = await browser.send("GET", "/ui", headers={"Cookie": cookie})
        finally:
            reader.close()
        body = page.body.decode()
        assert "<script>alert" not in body and "<img src=x" not in body and "<b>edge" not in body
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in body
        assert "&quot;&gt;&lt;b&gt;edge&lt;/b&gt;" in body
        assert body.count("<script") == 1  # the page's own app.js, nothing inline
        script = await browser.send("GET", "/ui/app.js")
        assert script.code == 200 and script.header("content-type") == (
            "text/javascript; charset=utf-8"
        )
        assert b"innerHTML" not in script.body and b"textContent" in script.body


def test_sessions_expire_and_are_kept_as_digests() -> None:
    clock = Clock()
    store = SessionStore(clock, ttl=60, max_sessions=2)
    authority = TokenAuthority(
        [TokenEntry(name="viewer", role="reader", digest=b"\0" * 32)], sessions=store
    )
    first = store.create(Principal("viewer", "reader"))
    assert store.get(first) == Principal("viewer", "reader")
    assert first.encode() not in b"".join(store._sessions)  # only digests are kept
    clock.advance(61)
    assert store.get(first) is None and len(store) == 0
    ids = [store.create(Principal(f"p{i}", "reader")) for i in range(3)]
    assert store.get(ids[0]) is None and store.get(ids[2]) is not None  # oldest dropped
    store.drop(ids[2])
    assert store.get(ids[2]) is None
    assert authority.sessions is store
