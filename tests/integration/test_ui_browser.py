"""The dashboard in headless Chromium: sign in, two live edges, a ban appearing without reload.

A real master, origin and two real edges run in this process on 127.0.0.1; Chromium (Debian's
``chromium``) is started by ``reactor.spawnProcess`` and driven over the Chrome DevTools Protocol
with Twisted's own websocket client (``twisted.web.websocket``, which needs ``wsproto``). The
test is skipped only when no Chromium can be found.

With ``EDGEAUTH_DASHBOARD_SCREENSHOT=PATH`` set, the screenshot is also saved there (this is how
``docs/dashboard.png`` is made); it is always saved under the test's ``tmp_path``.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support import (
    READER_TOKEN,
    Client,
    Origin,
    start_edge,
    start_master,
    wait_until,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

CHROMIUM = next(
    (
        found
        for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
        if (found := shutil.which(name))
    ),
    None,
)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (apt install chromium)")

DEVTOOLS = re.compile(rb"DevTools listening on (ws://\S+)")
STEP_TIMEOUT = 20.0


class Chromium(ProcessProtocol):
    """A headless Chromium child; ``devtools`` fires with its browser websocket URL."""

    def __init__(self) -> None:
        self.devtools: Deferred[str] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.stderr = b""

    def errReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self.stderr += data
        found = DEVTOOLS.search(self.stderr)
        if found and not self.devtools.called:
            self.devtools.callback(found.group(1).decode())

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted's name
        if not self.devtools.called:
            self.devtools.errback(reason)
        self.ended.callback(None)

    @classmethod
    async def launch(cls, user_data: Path) -> tuple[Chromium, Any]:
        protocol = cls()
        assert CHROMIUM is not None
        args = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={user_data}",
            "--remote-debugging-port=0",
            "--window-size=1280,860",
            "about:blank",
        ]
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        transport = reactor.spawnProcess(protocol, CHROMIUM, args, env=env)
        protocol.devtools.addTimeout(STEP_TIMEOUT, reactor)
        return protocol, transport

    async def stop(self, transport: Any) -> None:
        if not self.ended.called:
            try:
                transport.signalProcess("TERM")
            except Exception:  # it ended in the meantime
                pass
            self.ended.addTimeout(STEP_TIMEOUT, reactor)
            try:
                await self.ended
            except Exception:
                transport.signalProcess("KILL")


class DevTools:
    """A CDP session over one websocket: ``call`` a method, wait for an event."""

    def __init__(self) -> None:
        self.transport: Any = None  # a twisted.web.websocket.WebSocketTransport
        self.ids = itertools.count(1)
        self.pending: dict[int, Deferred[dict[str, Any]]] = {}
        self.waiters: list[tuple[str, Callable[[dict[str, Any]], bool], Deferred[dict[str, Any]]]]
        self.waiters = []

    # WebSocketProtocol
    def negotiationStarted(self, transport: Any) -> None:  # noqa: N802
        self.transport = transport

    def negotiationFinished(self) -> None:  # noqa: N802
        pass

    def pongReceived(self, payload: bytes) -> None:  # noqa: N802
        pass

    def bytesMessageReceived(self, data: bytes | bytearray) -> None:  # noqa: N802
        self.textMessageReceived(bytes(data).decode())

    def textMessageReceived(self, message: str) -> None:  # noqa: N802
        doc = json.loads(message)
        if "id" in doc:
            d = self.pending.pop(doc["id"], None)
            if d is None:
                return
            if "error" in doc:
                d.errback(AssertionError(f"CDP error: {doc['error']}"))
            else:
                d.callback(doc.get("result", {}))
            return
        for item in list(self.waiters):
            method, condition, d = item
            if doc.get("method") == method and condition(doc.get("params", {})):
                self.waiters.remove(item)
                d.callback(doc.get("params", {}))

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        for d in list(self.pending.values()):
            d.errback(reason)
        self.pending.clear()

    # client side
    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.transport is not None
        call_id = next(self.ids)
        d: Deferred[dict[str, Any]] = Deferred()
        self.pending[call_id] = d
        self.transport.sendTextMessage(
            json.dumps({"id": call_id, "method": method, "params": params})
        )
        d.addTimeout(STEP_TIMEOUT, reactor)
        return await d

    def expect(
        self, method: str, condition: Callable[[dict[str, Any]], bool] = lambda _: True
    ) -> Deferred[dict[str, Any]]:
        """Return a Deferred for the next ``method`` event (register before causing it)."""
        d: Deferred[dict[str, Any]] = Deferred()
        self.waiters.append((method, condition, d))
        d.addTimeout(STEP_TIMEOUT, reactor)
        return d

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw {result['exceptionDetails']}")
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        loaded = self.expect("Page.loadEventFired")
        await self.call("Page.navigate", url=url)
        await loaded

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class _Factory:
    def __init__(self) -> None:
        self.protocol = DevTools()

    def buildProtocol(self, url: str) -> DevTools:  # noqa: N802
        return self.protocol


async def open_page(browser_ws: str) -> DevTools:
    """Attach to the browser's first page target (``/json/list``) over its own websocket."""
    http_base = browser_ws.replace("ws://", "http://").split("/devtools/")[0]
    client = Client(http_base)
    try:
        targets = (await client.get("/json/list", token=None)).json()
    finally:
        await client.close()
    # Twisted's websocket client needs wsproto (setup.cfg test extras): a missing one fails here.
    from twisted.web.websocket import WebSocketClientEndpoint

    page = next(t for t in targets if t["type"] == "page")
    factory = _Factory()
    endpoint = WebSocketClientEndpoint.new(reactor, page["webSocketDebuggerUrl"])
    await endpoint.connect(factory)
    devtools = factory.protocol
    await devtools.call("Page.enable")
    await devtools.call("Runtime.enable")
    return devtools


@pytest_twisted.ensureDeferred
async def test_dashboard_in_headless_chromium(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        master = await start_master(tmp_path)
        stack.push_async_callback(master.stop)
        origin = Origin()
        await origin.start()
        stack.push_async_callback(origin.stop)
        ops = Client(master.url)
        stack.push_async_callback(ops.close)
        for body in (
            {"ip": "198.51.100.23", "reason": "credential stuffing", "ttl": 3600},
            {"ip": "2001:db8:bad::/48", "reason": "scanner network"},
        ):
            assert (await ops.post("/ban/ip", body)).code == 201
        assert (
            await ops.post("/allow/ip", {"ip": "192.0.2.10", "reason": "monitoring"})
        ).code == 201
        assert (
            await ops.post("/revoke/token", {"jti": "7f3c-leaked", "reason": "leaked"})
        ).code == 201
        assert (await ops.post("/invalidate", {"tags": ["product-42"], "soft": True})).code == 201
        for name in ("edge-a", "edge-b"):
            edge = await start_edge(tmp_path, name, master.url, origin.url)
            stack.push_async_callback(edge.stop)

        chromium, process = await Chromium.launch(tmp_path / "chromium-profile")
        stack.push_async_callback(chromium.stop, process)
        browser_ws = await chromium.devtools
        page = await open_page(browser_ws)
        stack.callback(page.close)

        # Sign in through the real form; the browser follows the 303 to /ui with its cookie.
        await page.navigate(master.url + "/ui")
        assert await page.evaluate("location.pathname") == "/ui/login"
        loaded = page.expect("Page.loadEventFired")
        await page.evaluate(
            f"document.getElementById('token').value = {json.dumps(READER_TOKEN)};"
            "document.querySelector('form').submit(); true"
        )
        await loaded
        assert await page.evaluate("location.href") == master.url + "/ui", await page.evaluate(
            "document.body.innerText"
        )
        assert await page.evaluate("document.cookie") == ""  # HttpOnly: not readable by scripts
        assert READER_TOKEN not in await page.evaluate("document.documentElement.outerHTML")

        async def edges_shown() -> Any:
            rows = await page.evaluate(
                "[...document.querySelectorAll('#edges-body tr:not(.empty)')]"
                ".map(tr => [...tr.cells].map(td => td.textContent))"
            )
            names = sorted(r[0] for r in rows)
            return (
                rows if names == ["edge-a", "edge-b"] and all(r[3] == "yes" for r in rows) else None
            )

        rows = await wait_until(edges_shown, "two connected edges on the page", STEP_TIMEOUT)
        tail = f"{5:016d}"
        for row in rows:
            assert row[1] == "127.0.0.1" and row[4] == tail and row[5] == "0", row
        await wait_until(
            lambda: page.evaluate("document.getElementById('live').textContent === 'live'"),
            "the EventSource to be open",
            STEP_TIMEOUT,
        )
        assert await page.evaluate("document.getElementById('count-bans').textContent") == "2"

        # A ban posted now appears without a reload (the marker survives).
        await page.evaluate("window.__noReload = 'still here'; true")
        posted = await ops.post("/ban/ip", {"ip": "203.0.113.66", "reason": "posted during test"})
        assert posted.code == 201
        seq = posted.json()["event"]["seq"]

        async def ban_row() -> Any:
            selector = f'#events-body tr[data-seq="{seq}"]'
            return await page.evaluate(
                f"(() => {{ const tr = document.querySelector({json.dumps(selector)});"
                " return tr && [...tr.cells].map(td => td.textContent); })()"
            )

        row = await wait_until(ban_row, "the new ban in the events table", STEP_TIMEOUT)
        assert row[2] == "ip_banned" and row[3] == "203.0.113.66/32", row
        assert row[4] == "operator:ops" and row[5].startswith("posted during test"), row
        assert await page.evaluate("window.__noReload") == "still here"
        first_row = await page.evaluate("document.querySelector('#events-body tr').dataset.seq")
        assert first_row == str(seq)
        await wait_until(
            lambda: page.evaluate("document.getElementById('count-bans').textContent === '3'"),
            "the ban count to follow",
            STEP_TIMEOUT,
        )

        shot = await page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        png = base64.b64decode(shot["data"])
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
        (tmp_path / "dashboard.png").write_bytes(png)
        target = os.environ.get("EDGEAUTH_DASHBOARD_SCREENSHOT")
        if target:
            Path(target).write_bytes(png)
