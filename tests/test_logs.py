"""Logging: the JSON-lines observer, its selection through twistd, and what the logs hold.

The last test runs a master, an origin and two JWT-gated edges in this process, sends every kind
of write, JWT-protected requests (good, revoked, forged), bad tokens and a dashboard sign-in, and
captures everything logged in both formats plus the edges' access logs: each write is logged once
by the master with its source and once by each edge that applies it, and no token, JWT, JWT secret
or session id appears anywhere.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
import treq
from joserfc import jwt
from joserfc.jwk import OctKey
from support import (
    EDGE_TOKEN,
    OPERATOR_TOKEN,
    READER_TOKEN,
    BoundClient,
    Client,
    Origin,
    Reply,
    RunningEdge,
    start_edge_env,
    start_master,
    wait_until,
)
from twisted.logger import FileLogObserver, Logger, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.scripts._twistd_unix import ServerOptions
from twisted.web.http_headers import Headers

from edgeauth import logs

# --- the JSON line format ------------------------------------------------------------------------


@contextmanager
def captured() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Capture every log event of the process as text and as JSON lines."""
    text, lines = io.StringIO(), io.StringIO()
    observers = [logs.text_observer(text), logs.json_observer(lines)]
    for observer in observers:
        globalLogPublisher.addObserver(observer)
    try:
        yield text, lines
    finally:
        for observer in observers:
            globalLogPublisher.removeObserver(observer)


def parsed(lines: io.StringIO, namespace: str | None = None) -> list[dict[str, Any]]:
    """Every captured JSON line (each must be one JSON object), of ``namespace`` if given."""
    out = []
    for line in lines.getvalue().splitlines():
        doc = json.loads(line)
        assert isinstance(doc, dict), line
        if namespace is None or doc["namespace"] == namespace:
            out.append(doc)
    return out


def test_json_line_has_time_level_namespace_message_and_plain_fields() -> None:
    with captured() as (text, lines):
        Logger(namespace="edgeauth.test").warn(
            "{what} by {source} (seq {seq})",
            what="ip_banned",
            source="operator:ops",
            seq=7,
            raw=b"bytes \xff",
            obj=Path("/x"),
        )
    [doc] = parsed(lines, "edgeauth.test")
    assert doc["level"] == "warn"
    assert doc["namespace"] == "edgeauth.test"
    assert doc["message"] == "ip_banned by operator:ops (seq 7)"
    assert doc["source"] == "operator:ops" and doc["seq"] == 7 and doc["what"] == "ip_banned"
    assert doc["raw"] == "bytes \ufffd" and doc["obj"] == "/x"
    assert abs(doc["time"] - time.time()) < 60
    assert "ip_banned by operator:ops (seq 7)" in text.getvalue()
    assert "[edgeauth.test#warn]" in text.getvalue()
    assert all(line.startswith("{") for line in lines.getvalue().splitlines())


def test_json_line_of_a_failure_and_of_a_legacy_message() -> None:
    with captured() as (_, lines):
        try:
            raise ValueError("boom")
        except ValueError:
            Logger(namespace="edgeauth.test").failure("it failed in {where}", Failure(), where="x")
        legacy_log.msg("legacy line", system="HTTP")
    [failure] = parsed(lines, "edgeauth.test")
    [legacy] = [d for d in parsed(lines) if d["message"] == "legacy line"]
    assert failure["level"] == "critical" and failure["message"] == "it failed in x"
    assert "ValueError: boom" in failure["failure"]
    assert legacy["message"] == "legacy line" and legacy["system"] == "HTTP"
    assert legacy["level"] == "info"


def test_json_logger_is_a_twistd_observer_factory() -> None:
    assert isinstance(logs.json_logger(), FileLogObserver)


def _write_master_ini(tmp_path: Path, fmt: str | None) -> str:
    lines = ["[master]", f"database = {tmp_path / 'm.sqlite3'}"]
    if fmt is not None:
        lines += ["[logging]", f"format = {fmt}"]
    path = tmp_path / "logs.ini"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(
    ("plugin", "args", "fmt", "json_lines"),
    [
        ("edgeauth-master", [], None, False),
        ("edgeauth-master", ["--json-logs"], None, True),
        ("edgeauth-master", [], "json", True),
        ("edgeauth-master", [], "text", False),
        ("edgeauth-edge", ["--json-logs"], None, True),
        ("edgeauth-edge", [], "json", True),
    ],
)
def test_twistd_options_select_the_json_observer(
    tmp_path: Path, plugin: str, args: list[str], fmt: str | None, json_lines: bool
) -> None:
    """``--json-logs`` or ``[logging] format = json`` give twistd a JSON observer factory."""
    config = ServerOptions()
    config.parseOptions(
        ["--nodaemon", "--logfile", str(tmp_path / "out.log"), plugin, "--config"]
        + [_write_master_ini(tmp_path, fmt), *args]
    )
    factory = config.get("logger")
    if not json_lines:
        assert factory is None
        return
    assert factory is logs.json_logger
    observer = factory()
    assert isinstance(observer, FileLogObserver)
    Logger(namespace="edgeauth.test", observer=observer).info("hello {who}", who="json")
    written = (tmp_path / "out.log").read_text()
    assert json.loads(written)["message"] == "hello json"


def test_explicit_logger_option_wins(tmp_path: Path) -> None:
    config = ServerOptions()
    config.parseOptions(
        ["--nodaemon", "--logger", "edgeauth.logs.json_logger", "edgeauth-master", "--config"]
        + [_write_master_ini(tmp_path, "text")]
    )
    assert config["logger"] is logs.json_logger


def test_unknown_log_format_is_a_config_error(tmp_path: Path) -> None:
    from edgeauth.config import ConfigError, load_settings

    path = _write_master_ini(tmp_path, "xml")
    with pytest.raises(ConfigError, match=r"\[logging\] format: must be one of text, json"):
        load_settings(path, environ={})


# --- what a running fleet logs --------------------------------------------------------------------

HS_SECRET = "hs256-secret-only-the-edges-know-0123456789"
WRONG_TOKEN = "an-operator-token-that-is-not-configured"


def _jwt(**claims: Any) -> str:
    now = int(time.time())
    base = {"sub": "alice", "iat": now - 10, "exp": now + 600, "jti": f"j-{time.monotonic_ns()}"}
    return jwt.encode({"alg": "HS256"}, {**base, **claims}, OctKey.import_key(HS_SECRET))


def _forged(token: str) -> str:
    head, body, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[0] ^= 1
    return f"{head}.{body}.{base64.urlsafe_b64encode(bytes(raw)).rstrip(b'=').decode()}"


async def sign_in(master_url: str, token: str) -> Reply:
    """POST the dashboard's sign-in form as a browser does (the redirect is not followed)."""
    client = Client(master_url)
    try:
        response = await client.http.post(
            master_url + "/ui/login",
            data=urlencode({"token": token}).encode(),
            headers=Headers({b"Content-Type": [b"application/x-www-form-urlencoded"]}),
            allow_redirects=False,
        )
        return Reply(response.code, response.headers, await treq.content(response))
    finally:
        await client.close()


async def _start_edge(tmp_path: Path, name: str, master_url: str, origin: Origin) -> RunningEdge:
    return await start_edge_env(
        tmp_path,
        name,
        master_url,
        origin.url,
        environ={"EDGEAUTH_JWT_SECRET": HS_SECRET},
        edge={
            "access_log": "buffered",
            "access_log_path": str(tmp_path / f"{name}-access.log"),
        },
        gate={"protect": "/private/*", "jwt_secret": "env:EDGEAUTH_JWT_SECRET"},
        failures={"threshold": 2},
    )


@pytest_twisted.ensureDeferred
async def test_every_write_logged_once_with_its_source_and_no_secret_in_any_log(
    tmp_path: Path,
) -> None:
    good, revoked = _jwt(), _jwt(sub="bob")
    forged = _forged(_jwt())
    jwts = [good, revoked, forged]
    with captured() as (text, lines):
        async with AsyncExitStack() as stack:
            master = await start_master(tmp_path)
            stack.push_async_callback(master.stop)
            origin = Origin()
            await origin.start()
            stack.push_async_callback(origin.stop)
            edges = {}
            for name in ("edge-a", "edge-b"):
                edges[name] = await _start_edge(tmp_path, name, master.url, origin)
                stack.push_async_callback(edges[name].stop)
            ops = Client(master.url)
            stack.push_async_callback(ops.close)
            visitor = Client(edges["edge-a"].url)
            stack.push_async_callback(visitor.close)

            # Refused writes: a token that is not configured, a reader token.
            assert (await ops.post("/ban/ip", {"ip": "192.0.2.1"}, token=WRONG_TOKEN)).code == 401
            assert (await ops.post("/ban/ip", {"ip": "192.0.2.1"}, token=READER_TOKEN)).code == 403

            # The protected path with a good JWT, before anything is revoked.
            reply = await visitor.get("/private/a", token=good)
            assert reply.code == 200, reply.body

            revoked_jti = jwt.decode(revoked, OctKey.import_key(HS_SECRET)).claims["jti"]
            writes = [
                ("/ban/ip", {"ip": "203.0.113.9", "reason": "logs test"}),
                ("/unban/ip", {"ip": "203.0.113.9"}),
                ("/allow/ip", {"ip": "198.51.100.0/24", "reason": "partner"}),
                ("/unallow/ip", {"ip": "198.51.100.0/24"}),
                ("/revoke/token", {"jti": revoked_jti, "reason": "leaked"}),
                ("/revoke/subject", {"sub": "mallory"}),
                ("/invalidate", {"tags": ["t1"], "soft": True}),
            ]
            events = []
            for path, body in writes:
                reply = await ops.post(path, body)
                assert reply.code == 201, (path, reply.body)
                events.append(reply.json()["event"])
            tail: int = events[-1]["seq"]

            def applied_everywhere() -> bool:
                return all(e.service.state.offset >= tail for e in edges.values())

            await wait_until(applied_everywhere, "the edges to apply every write")

            assert (await visitor.get("/private/b", token=revoked)).json()["error"] == (
                "token_revoked"
            )
            assert (await visitor.get("/private/c", token=forged)).code == 401
            # Two failures from one address: a local ban on edge-a (failures threshold 2).
            other = BoundClient(edges["edge-a"].url, "127.0.0.3")
            stack.push_async_callback(other.close)
            for token in (forged, "not.a.jwt"):
                assert (await other.get("/private/d", token=token)).code == 401
            jwts.append("not.a.jwt")
            assert (await other.get("/public", token=None)).code == 403

            # The dashboard: a refused sign-in, a sign-in, the page and its event stream.
            refused = await sign_in(master.url, WRONG_TOKEN)
            assert refused.code == 401
            signed_in = await sign_in(master.url, READER_TOKEN)
            assert signed_in.code == 303, signed_in.body
            cookie = (signed_in.header("set-cookie") or "").split(";")[0]
            session = cookie.split("=", 1)[1]
            page = await ops.get("/ui", token=None, headers={"Cookie": cookie})
            assert page.code == 200 and b"edge-a" in page.body

            access_logs = [tmp_path / f"{name}-access.log" for name in edges]

            def access_logged() -> bool:
                path = access_logs[0]
                return path.exists() and "/private/d" in path.read_text()

            await wait_until(access_logged, "edge-a's access log to be written", timeout=10)

    text_log, json_log = text.getvalue(), lines.getvalue()
    access_text = "".join(p.read_text() for p in access_logs if p.exists())
    # The master's HTTP access log goes to the process log: it was captured too.
    assert '"POST /ban/ip HTTP/1.1" 201' in text_log
    assert '"GET /private/a HTTP/1.1" 200' in access_text

    secrets = [OPERATOR_TOKEN, EDGE_TOKEN, READER_TOKEN, WRONG_TOKEN, HS_SECRET, session]
    for token in jwts:
        secrets.append(token)
        secrets.extend(part for part in token.split(".") if len(part) > 8)
    for secret in secrets:
        for where, content in (("text", text_log), ("json", json_log), ("access", access_text)):
            assert secret not in content, f"a secret ({secret[:6]}...) is in the {where} log"

    docs = parsed(lines)
    for event in events:
        seq, kind = event["seq"], event["type"]
        on_master = [
            d for d in docs if d["namespace"] == "edgeauth.master.api" and d.get("seq") == seq
        ]
        assert len(on_master) == 1, (kind, on_master)
        assert on_master[0]["type"] == kind and on_master[0]["source"] == "operator:ops"
        assert on_master[0]["message"].endswith(f"by operator:ops (seq {seq})")
        assert text_log.count(f"by operator:ops (seq {seq})") == 1
        for name in edges:
            applied = [
                d
                for d in docs
                if d["namespace"] == "edgeauth.edge.state"
                and d.get("seq") == seq
                and d.get("edge") == name
            ]
            assert len(applied) == 1, (kind, name, applied)
            assert applied[0]["message"] == f"applied {kind} seq {seq} from operator:ops"
        assert text_log.count(f"applied {kind} seq {seq} from operator:ops") == len(edges)

    local = [d for d in docs if d["message"].startswith("local ban of 127.0.0.3/32")]
    assert len(local) == 1, local
    assert local[0]["source"] == "edge:edge-a" and local[0]["edge"] == "edge-a"
    signs = [d for d in docs if d["message"].startswith("dashboard sign-in")]
    assert [d["message"].split(" from ")[0] for d in signs] == [
        "dashboard sign-in refused",
        "dashboard sign-in by reader:viewer",
    ]
