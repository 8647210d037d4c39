"""The fleet dashboard ``/ui``: server-rendered HTML, a little JavaScript, no build step.

Who may see it: the ``reader`` and ``operator`` roles, as for ``GET /fleet``. A browser cannot send
a bearer header on a plain page load, so the token is given once to a login form (``POST
/ui/login``, never in a URL, never logged) and exchanged for a session: a random id in an
``HttpOnly; SameSite=Strict`` cookie (``Secure`` over TLS), mapped server side to the token's
principal until it expires (:class:`edgeauth.master.auth.SessionStore`). A client certificate
mapped to one of those roles works without logging in. The cookie is accepted only by the
dashboard's pages and by ``GET /events`` (which the page reads); writes never accept it.

The page lists the stream readers (``Fanout.fleet_view``: edges by their ``Edgeauth-Edge-Id``,
others by address) with address, offset, lag and last-seen, the counts of live bans, allows and
revocations, and the last 50 events. ``/ui/app.js`` follows ``/events`` with ``EventSource`` from
the tail the page was rendered at, so new events appear without a reload, and refreshes the fleet
and the counts from ``/ui/state``. Everything shown is escaped: ``html.escape`` on the server,
``textContent`` in the browser; the Content-Security-Policy allows no inline script or style.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from edgeauth.master.auth import (
    ROLE_OPERATOR,
    ROLE_READER,
    SESSION_COOKIE,
    AuthError,
    Principal,
    TokenAuthority,
)
from edgeauth.master.fanout import Fanout
from edgeauth.master.log import IEventLog
from edgeauth.wire.offsets import format_offset

log = Logger()

UI_ROLES = (ROLE_OPERATOR, ROLE_READER)
RECENT_EVENTS = 50
COUNT_CAP = 10_000
MAX_LOGIN_BODY = 4096
PATHS = (b"/ui", b"/ui/login", b"/ui/logout", b"/ui/state", b"/ui/app.js", b"/ui/app.css")
"""The paths :class:`Dashboard` serves (``MasterRoot`` dispatches them here)."""

_TABLES = ("bans", "allows", "revoked_tokens", "revoked_subjects")
_SECURITY_HEADERS = {
    b"cache-control": b"no-store",
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"same-origin",  # no-referrer would make form POSTs send Origin: null
    b"content-security-policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        b"img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}


def _e(value: object) -> str:
    """Escape any value for HTML text and attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(timestamp))


def event_subject(event: Mapping[str, Any]) -> str:
    """What an event is about: its address, jti, subject or cache selectors."""
    for key in ("ip", "jti", "sub"):
        if key in event:
            return str(event[key])
    if event.get("all"):
        return "all"
    parts = [
        f"{key}={','.join(str(v) for v in event[key])}"
        for key in ("tags", "keys", "prefixes")
        if event.get(key)
    ]
    return " ".join(parts)


def event_detail(event: Mapping[str, Any]) -> str:
    """Reason, expiry and flags of an event, for the events table."""
    parts = []
    if event.get("reason"):
        parts.append(str(event["reason"]))
    if "expires_at" in event:
        parts.append(f"expires {_when(event['expires_at'])}")
    if "before" in event:
        parts.append(f"before {_when(event['before'])}")
    if event.get("soft"):
        parts.append("soft")
    return "; ".join(parts)


class Dashboard(Resource):
    """Serves every path of :data:`PATHS`; mounted by exact path on the master's root."""

    isLeaf = True

    def __init__(
        self,
        event_log: IEventLog,
        fanout: Fanout,
        authority: TokenAuthority,
        clock: IReactorTime,
    ) -> None:
        """Show ``event_log`` and ``fanout``; sessions live in ``authority.sessions``."""
        super().__init__()
        if authority.sessions is None:
            raise ValueError("the dashboard needs an authority with a SessionStore")
        self.log = event_log
        self.fanout = fanout
        self.authority = authority
        self.sessions = authority.sessions
        self.clock = clock

    # --- dispatch ----------------------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        """Dispatch on path and method."""
        path = request.path.rstrip(b"/") or b"/"
        method = request.method
        if method == b"HEAD":
            method = b"GET"
        routes: dict[tuple[bytes, bytes], Callable[[Request], bytes | int]] = {
            (b"/ui", b"GET"): self._page,
            (b"/ui/login", b"GET"): self._login_form,
            (b"/ui/login", b"POST"): self._login,
            (b"/ui/logout", b"POST"): self._logout,
            (b"/ui/state", b"GET"): self._state,
            (b"/ui/app.js", b"GET"): lambda r: self._static(r, APP_JS, b"text/javascript"),
            (b"/ui/app.css", b"GET"): lambda r: self._static(r, APP_CSS, b"text/css"),
        }
        handler = routes.get((path, method))
        if handler is None:
            allowed = sorted(m.decode() for p, m in routes if p == path)
            if not allowed:
                return self._json(request, 404, {"error": "not_found", "detail": "no such page"})
            request.setHeader(b"allow", ", ".join(allowed).encode())
            return self._json(
                request, 405, {"error": "method_not_allowed", "detail": "method not allowed"}
            )
        return handler(request)

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _headers(request: Request, content_type: bytes) -> None:
        request.setHeader(b"content-type", content_type)
        for name, value in _SECURITY_HEADERS.items():
            request.setHeader(name, value)

    def _json(self, request: Request, status: int, doc: Any) -> bytes:
        request.setResponseCode(status)
        self._headers(request, b"application/json")
        return json.dumps(doc, separators=(",", ":")).encode()

    def _html(self, request: Request, status: int, body: str) -> bytes:
        request.setResponseCode(status)
        self._headers(request, b"text/html; charset=utf-8")
        return body.encode("utf-8")

    @staticmethod
    def _redirect(request: Request, location: bytes) -> bytes:
        request.setResponseCode(303)
        request.setHeader(b"location", location)
        request.setHeader(b"cache-control", b"no-store")
        return b""

    def _static(self, request: Request, body: bytes, content_type: bytes) -> bytes:
        self._headers(request, content_type + b"; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        return body

    def _principal(self, request: Request) -> Principal | None:
        try:
            return self.authority.check_request(request, UI_ROLES, allow_session=True)
        except AuthError:
            return None

    def _async(
        self, request: Request, work: Callable[[], Awaitable[bytes]], status_on_error: int = 503
    ) -> int:
        async def run() -> bytes:
            return await work()

        def send(body: bytes) -> None:
            if not (request.finished or request._disconnected):
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            log.failure("dashboard page failed", failure)
            send(
                self._json(
                    request,
                    status_on_error,
                    {"error": "unavailable", "detail": "the event log is unavailable"},
                )
            )

        Deferred.fromCoroutine(run()).addCallbacks(send, failed)
        return NOT_DONE_YET

    async def _counts(self) -> dict[str, int]:
        now = self.clock.seconds()
        counts = {}
        for table in _TABLES:
            rows = await self.log.entries(table, now, None, None, COUNT_CAP + 1)
            counts[table] = len(rows)
        return counts

    def _fleet(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        view = self.fanout.fleet_view()
        edges = [m for m in view if not str(m["edge_id"]).startswith("@")]
        others = [m for m in view if str(m["edge_id"]).startswith("@")]
        return edges, others

    async def _recent(self) -> list[dict[str, Any]]:
        tail = int(self.log.tail)
        after = max(int(self.log.earliest) - 1, tail - RECENT_EVENTS)
        records = await self.log.read(after, RECENT_EVENTS, 1 << 20)
        return [json.loads(r.json) for r in reversed(records)]

    # --- pages -------------------------------------------------------------------------------

    def _login_form(self, request: Request, status: int = 200, error: str | None = None) -> bytes:
        message = f'<p class="error" role="alert">{_e(error)}</p>' if error else ""
        body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgeauth · sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/ui/app.css"></head>
<body class="login"><main>
<h1>edgeauth fleet</h1>
{message}
<form method="post" action="/ui/login" autocomplete="off">
<label for="token">Reader or operator token</label>
<input id="token" name="token" type="password" required autofocus spellcheck="false">
<button type="submit">Sign in</button>
</form>
<p class="hint">The token is exchanged for a session cookie; it is never kept in the page.</p>
</main></body></html>
"""
        return self._html(request, status, body)

    def _same_origin(self, request: Request) -> bool:
        origin = request.getHeader(b"origin")
        if origin is None:
            return True
        host = request.getHeader(b"host")
        parts = urlsplit(origin.decode("latin-1"))
        return host is not None and parts.netloc == host.decode("latin-1")

    def _login(self, request: Request) -> bytes:
        address = _address(request)
        if not self._same_origin(request):
            return self._login_form(request, 403, "sign in from this master's own page")
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != b"application/x-www-form-urlencoded":
            return self._login_form(request, 415, "send the form as the page does")
        content = request.content
        raw = content.read(MAX_LOGIN_BODY + 1) if content is not None else b""
        if len(raw) > MAX_LOGIN_BODY:
            return self._login_form(request, 413, "the form is too large")
        fields = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        token = (fields.get("token") or [""])[0].strip()
        if not token:
            return self._login_form(request, 400, "enter a token")
        try:
            principal = self.authority.check(b"Bearer " + token.encode("utf-8"), UI_ROLES)
        except AuthError as exc:
            log.warn(
                "dashboard sign-in refused from {address}: {why}", address=address, why=exc.detail
            )
            why = "that token is not valid" if exc.status == 401 else "that token cannot read"
            return self._login_form(request, exc.status, why)
        session = self.sessions.create(principal)
        cookie = (
            f"{SESSION_COOKIE.decode()}={session}; Path=/; HttpOnly; SameSite=Strict; "
            f"Max-Age={int(self.sessions.ttl)}"
        )
        if request.isSecure():
            cookie += "; Secure"
        request.setHeader(b"set-cookie", cookie.encode("ascii"))
        log.info(
            "dashboard sign-in by {role}:{name} from {address}",
            role=principal.role,
            name=principal.name,
            address=address,
        )
        return self._redirect(request, b"/ui")

    def _logout(self, request: Request) -> bytes:
        if not self._same_origin(request):
            return self._login_form(request, 403, "sign out from this master's own page")
        cookie = request.getCookie(SESSION_COOKIE)
        if cookie:
            self.sessions.drop(cookie)
        expired = f"{SESSION_COOKIE.decode()}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
        request.setHeader(b"set-cookie", expired.encode("ascii"))
        return self._redirect(request, b"/ui/login")

    def _state(self, request: Request) -> bytes | int:
        principal = self._principal(request)
        if principal is None:
            return self._json(request, 401, {"error": "unauthorized", "detail": "sign in first"})

        async def work() -> bytes:
            counts = await self._counts()
            edges, others = self._fleet()
            doc = {
                "log_id": self.log.log_id,
                "tail": format_offset(int(self.log.tail)),
                "now": self.clock.seconds(),
                "counts": counts,
                "count_cap": COUNT_CAP,
                "edges": edges,
                "readers": others,
            }
            return self._json(request, 200, doc)

        return self._async(request, work)

    def _page(self, request: Request) -> bytes | int:
        principal = self._principal(request)
        if principal is None:
            return self._redirect(request, b"/ui/login")

        async def work() -> bytes:
            tail = int(self.log.tail)
            counts = await self._counts()
            events = await self._recent()
            edges, others = self._fleet()
            return self._html(
                request, 200, self._render(principal, tail, counts, events, edges, others)
            )

        return self._async(request, work)

    def _render(
        self,
        principal: Principal,
        tail: int,
        counts: Mapping[str, int],
        events: list[dict[str, Any]],
        edges: list[dict[str, Any]],
        others: list[dict[str, Any]],
    ) -> str:
        now = self.clock.seconds()

        def count(table: str) -> str:
            n = counts[table]
            text = f"{COUNT_CAP}+" if n > COUNT_CAP else str(n)
            return f'<dd id="count-{table}">{_e(text)}</dd>'

        def fleet_rows(members: list[dict[str, Any]], empty: str) -> str:
            if not members:
                return f'<tr class="empty"><td colspan="7">{_e(empty)}</td></tr>'
            return "\n".join(
                "<tr>"
                f"<td>{_e(m['edge_id'])}</td><td>{_e(m['address'])}</td><td>{_e(m['mode'])}</td>"
                f"<td>{'yes' if m['connected'] else 'no'}</td><td>{_e(m['offset'])}</td>"
                f"<td>{_e(m['lag'])}</td>"
                f"<td>{_e(_when(m['last_seen']))} ({_e(max(0, round(now - m['last_seen'])))}s ago)"
                "</td></tr>"
                for m in members
            )

        event_rows = (
            "\n".join(
                f'<tr data-seq="{_e(ev.get("seq"))}"><td>{_e(ev.get("seq"))}</td>'
                f"<td>{_e(_when(ev.get('timestamp')))}</td><td>{_e(ev.get('type'))}</td>"
                f"<td>{_e(event_subject(ev))}</td><td>{_e(ev.get('source', ''))}</td>"
                f"<td>{_e(event_detail(ev))}</td></tr>"
                for ev in events
            )
            or '<tr class="empty" id="events-empty"><td colspan="6">no events yet</td></tr>'
        )
        head = (
            "<tr><th>Edge</th><th>Address</th><th>Mode</th><th>Connected</th>"
            "<th>Offset</th><th>Lag (events)</th><th>Last seen</th></tr>"
        )
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgeauth fleet</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/ui/app.css"></head>
<body data-last-seq="{_e(tail)}">
<header><h1>edgeauth fleet</h1>
<p>log <code>{_e(self.log.log_id)}</code> · tail <code id="tail">{_e(format_offset(tail))}</code>
· <span id="live" class="pending">connecting</span></p>
<form method="post" action="/ui/logout"><span>{_e(principal.role)}:{_e(principal.name)}</span>
<button type="submit">Sign out</button></form></header>
<main>
<section><h2>State</h2><dl class="counts">
<div><dt>Bans</dt>{count("bans")}</div><div><dt>Allows</dt>{count("allows")}</div>
<div><dt>Revoked tokens</dt>{count("revoked_tokens")}</div>
<div><dt>Revoked subjects</dt>{count("revoked_subjects")}</div></dl></section>
<section><h2>Edges <span class="n" id="edges-count">{len(edges)}</span></h2>
<table id="edges"><thead>{head}</thead>
<tbody id="edges-body">{fleet_rows(edges, "no edge has connected")}</tbody></table></section>
<section><h2>Other stream readers <span class="n" id="readers-count">{len(others)}</span></h2>
<table id="readers"><thead>{head.replace("<th>Edge</th>", "<th>Reader</th>")}</thead>
<tbody id="readers-body">{fleet_rows(others, "none")}</tbody></table></section>
<section><h2>Last {RECENT_EVENTS} events</h2>
<table id="events"><thead><tr><th>Seq</th><th>Time</th><th>Type</th><th>Subject</th>
<th>Source</th><th>Detail</th></tr></thead>
<tbody id="events-body">{event_rows}</tbody></table></section>
</main>
<script src="/ui/app.js"></script>
</body></html>
"""


def _address(request: Request) -> str:
    peer = request.getClientAddress()
    return str(getattr(peer, "host", peer))


APP_JS = b"""\
"use strict";
// edgeauth dashboard: live events from /events (EventSource), fleet and counts from /ui/state.
// Everything is written with textContent: nothing from the server is parsed as HTML.
(() => {
  const MAX_EVENTS = 50;
  const TYPES = ["ip_banned", "ip_unbanned", "ip_allowed", "ip_unallowed", "token_revoked",
                 "subject_revoked", "cache_invalidated"];
  const $ = (id) => document.getElementById(id);
  const when = (t) => (t === null || t === undefined) ? "never"
    : new Date(t * 1000).toISOString().replace("T", " ").replace(/\\.\\d+Z$/, "Z");
  let lastSeq = Number(document.body.dataset.lastSeq || "0");

  function row(cells) {
    const tr = document.createElement("tr");
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = String(text);
      tr.appendChild(td);
    }
    return tr;
  }

  function subject(ev) {
    for (const key of ["ip", "jti", "sub"]) if (key in ev) return ev[key];
    if (ev.all) return "all";
    return ["tags", "keys", "prefixes"].filter((k) => ev[k] && ev[k].length)
      .map((k) => k + "=" + ev[k].join(",")).join(" ");
  }

  function detail(ev) {
    const parts = [];
    if (ev.reason) parts.push(ev.reason);
    if ("expires_at" in ev) parts.push("expires " + when(ev.expires_at));
    if ("before" in ev) parts.push("before " + when(ev.before));
    if (ev.soft) parts.push("soft");
    return parts.join("; ");
  }

  function addEvent(ev) {
    if (typeof ev.seq !== "number" || ev.seq <= lastSeq) return;
    lastSeq = ev.seq;
    const body = $("events-body");
    const empty = $("events-empty");
    if (empty) empty.remove();
    const tr = row([ev.seq, when(ev.timestamp), ev.type, subject(ev), ev.source || "",
                    detail(ev)]);
    tr.dataset.seq = String(ev.seq);
    tr.className = "new";
    body.insertBefore(tr, body.firstChild);
    while (body.children.length > MAX_EVENTS) body.removeChild(body.lastChild);
    $("tail").textContent = String(ev.seq).padStart(16, "0");
  }

  function fleetRows(tbody, members, now, empty) {
    const rows = members.map((m) => row([m.edge_id, m.address, m.mode, m.connected ? "yes" : "no",
      m.offset, m.lag, when(m.last_seen) + " (" + Math.max(0, Math.round(now - m.last_seen))
      + "s ago)"]));
    if (!rows.length) {
      const tr = row([empty]);
      tr.className = "empty";
      tr.firstChild.colSpan = 7;
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
  }

  function render(state) {
    for (const [table, n] of Object.entries(state.counts)) {
      const dd = $("count-" + table);
      if (dd) dd.textContent = n > state.count_cap ? state.count_cap + "+" : String(n);
    }
    fleetRows($("edges-body"), state.edges, state.now, "no edge has connected");
    fleetRows($("readers-body"), state.readers, state.now, "none");
    $("edges-count").textContent = String(state.edges.length);
    $("readers-count").textContent = String(state.readers.length);
  }

  async function refresh() {
    try {
      const response = await fetch("/ui/state", {credentials: "same-origin", cache: "no-store"});
      if (response.status === 401 || response.status === 403) {
        window.location.assign("/ui/login");
        return;
      }
      if (response.ok) render(await response.json());
    } catch (e) {
      // the master is unreachable; the live indicator already says so
    }
  }

  let pending = null;
  function soon() {
    if (pending === null) pending = setTimeout(() => { pending = null; refresh(); }, 200);
  }

  const live = $("live");
  const source = new EventSource("/events?last_event_id=" + encodeURIComponent(lastSeq));
  for (const type of TYPES) {
    source.addEventListener(type, (message) => { addEvent(JSON.parse(message.data)); soon(); });
  }
  source.addEventListener("reset", () => { source.close(); window.location.reload(); });
  source.onopen = () => { live.textContent = "live"; live.className = "ok"; };
  source.onerror = () => { live.textContent = "reconnecting"; live.className = "bad"; };
  setInterval(refresh, 2000);
  refresh();
})();
"""

APP_CSS = b"""\
:root { font-family: system-ui, sans-serif; color: #1d232a; background: #f6f7f9; }
body { margin: 0; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 1rem;
  padding: .8rem 1.5rem; background: #1d232a; color: #f6f7f9; }
header h1 { font-size: 1.2rem; margin: 0; }
header p { margin: 0; flex: 1; }
header form { margin: 0; display: flex; gap: .5rem; align-items: baseline; }
main { padding: 1rem 1.5rem; display: grid; gap: 1.2rem; }
section h2 { font-size: 1rem; margin: 0 0 .4rem; }
.n { background: #dde3ea; border-radius: .6rem; padding: 0 .5rem; font-weight: normal; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: .85rem; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #e3e7ec; }
th { background: #eef1f4; font-weight: 600; }
tr.empty td { color: #6b7785; font-style: italic; }
tr.new { animation: flash 2s ease-out; }
@keyframes flash { from { background: #fff3bf; } to { background: #fff; } }
dl.counts { display: flex; gap: 1rem; margin: 0; }
dl.counts div { background: #fff; padding: .5rem 1rem; border: 1px solid #e3e7ec; }
dt { font-size: .75rem; color: #6b7785; }
dd { margin: 0; font-size: 1.4rem; font-weight: 600; }
code { font-size: .85rem; }
#live.ok { color: #69db7c; } #live.bad { color: #ff8787; } #live.pending { color: #ffd43b; }
body.login main { max-width: 24rem; margin: 4rem auto; background: #fff; padding: 1.5rem;
  border: 1px solid #e3e7ec; }
body.login form { display: grid; gap: .5rem; }
.error { color: #c92a2a; }
.hint { color: #6b7785; font-size: .8rem; }
"""
