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
import signal
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
import treq
from hypothesis import given, settings
from hypothesis import strategies as st
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
        # twistd's text lines, through edgeauth's cheaper observer of the same text.
        assert factory is logs.text_logger
        previous = signal.getsignal(signal.SIGUSR1)
        try:
            observer = factory()
        finally:
            signal.signal(signal.SIGUSR1, previous)
        Logger(namespace="edgeauth.test", observer=observer).info("hello {who}", who="text")
        written = (tmp_path / "out.log").read_text()
        assert written.endswith(" [edgeauth.test#info] hello text\n"), written
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


@pytest.mark.parametrize(
    ("twistd_args", "logger", "output"),
    [
        (["--nodaemon"], "text_logger", None),  # standard output
        (["--nodaemon", "--logfile", "-"], "text_logger", None),
        (["--nodaemon", "--logfile", "LOG"], "text_logger", "LOG"),
        (["--logfile", "LOG"], "text_logger", "LOG"),
        ([], "text_logger", "twistd.log"),  # a daemon without --logfile, as twistd
        (["--logfile", "-"], None, None),  # twistd refuses it itself
        (["--nodaemon", "--syslog"], None, None),  # twistd's syslog observer
        (["--nodaemon", "--logger", "edgeauth.logs.json_logger"], "json_logger", None),
    ],
)
def test_text_lines_go_where_twistd_would_write_them(
    tmp_path: Path, twistd_args: list[str], logger: str | None, output: str | None
) -> None:
    """The text observer is chosen only where twistd's own would write a file or stdout."""
    log_path = str(tmp_path / "out.log")
    args = [log_path if a == "LOG" else a for a in twistd_args]
    config = ServerOptions()
    config.parseOptions([*args, "edgeauth-master", "--config", _write_master_ini(tmp_path, None)])
    factory = config.get("logger")
    if logger is None:
        assert not factory
        return
    assert factory is getattr(logs, logger)
    if logger == "text_logger":
        assert logs._twistd_logfile == (log_path if output == "LOG" else output)


def test_text_logger_file_rotates_on_sigusr1_as_twistds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGUSR1 rotates the log file (in the reactor thread), unless a handler was already set."""
    from twisted.internet import reactor

    path = tmp_path / "twistd.log"
    monkeypatch.setattr(logs, "_twistd_logfile", str(path))
    monkeypatch.setattr(reactor, "callFromThread", lambda f, *a: f(*a))
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        observer = logs.text_logger()
        handler = signal.getsignal(signal.SIGUSR1)
        assert callable(handler)
        Logger(namespace="t", observer=observer).info("before")
        handler(signal.SIGUSR1, None)
        Logger(namespace="t", observer=observer).info("after")
        assert (tmp_path / "twistd.log.1").read_text().endswith(" [t#info] before\n")
        assert path.read_text().endswith(" [t#info] after\n")

        def mine(signum: int, frame: object) -> None:
            raise AssertionError("not called")

        signal.signal(signal.SIGUSR1, mine)
        logs.text_logger()
        assert signal.getsignal(signal.SIGUSR1) is mine, "an existing handler is kept"
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_text_observer_writes_what_twistds_writes(tmp_path: Path) -> None:
    """Line for line, the same text as twisted.logger.textFileLogObserver (twistd's default)."""
    from twisted.logger import LogLevel, textFileLogObserver

    ours, theirs = io.StringIO(), io.StringIO()
    observers = [logs.text_observer(ours), textFileLogObserver(theirs)]
    now = time.time()
    events: list[dict[str, Any]] = [
        {"log_format": "{a} and {b!r}", "a": 1, "b": "x", "log_time": now},
        {
            "log_format": "ip_banned {x}",
            "x": "{}",
            "log_time": now + 0.5,
            "log_level": LogLevel.info,
        },
        {"log_format": "two\nlines", "log_time": now + 1.9999999, "log_namespace": "n"},
        {"log_format": "no time"},
        {"log_format": "int time", "log_time": int(now), "log_system": "sys"},
        {"message": ("legacy",), "log_format": "{log_io}", "log_io": "io", "log_time": now + 7},
        {"log_format": "", "log_time": now},
        {"log_format": "failure", "log_failure": Failure(ValueError("boom")), "log_time": now},
    ]
    for event in events:
        for observer in observers:
            observer(dict(event))
    assert ours.getvalue() == theirs.getvalue()
    assert ours.getvalue().count("\n") > len(events)


@settings(max_examples=2000)
@given(
    st.lists(
        st.one_of(
            st.floats(min_value=-3e9, max_value=4e9, allow_nan=False),
            st.integers(0, 4_000_000_000).map(lambda s: s + 0.9999995),
            st.integers(0, 4_000_000_000).map(lambda s: s - 1e-7),
            st.integers(-10, 4_000_000_000),
            st.none(),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_timestamps_per_second_are_twisteds(times: list[float | None]) -> None:
    """The per-second timestamp text is Twisted's formatTime, whatever the order of calls."""
    from twisted.logger import formatTime, timeFormatRFC3339

    timestamps = logs._SecondTimestamps()
    for when in times:
        assert timestamps(when) == formatTime(when, timeFormatRFC3339), when


@pytest.mark.parametrize("zone", ["America/New_York", "Australia/Lord_Howe", "UTC"])
def test_timestamps_across_time_zone_changes(monkeypatch: pytest.MonkeyPatch, zone: str) -> None:
    """Around daylight saving changes (Lord Howe moves by 30 minutes) the text stays Twisted's."""
    from twisted.logger import formatTime, timeFormatRFC3339

    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        timestamps = logs._SecondTimestamps()
        # 2026-03-08 and 2026-11-01 (New York), 2026-04-05 and 2026-10-04 (Lord Howe)
        for change in (1772953200, 1793512800, 1775314800, 1791041400):
            for offset in [*range(-3 * 3600, 3 * 3600, 599), -1, 0, 1]:
                for fraction in (0.0, 0.25, 0.999):
                    when = change + offset + fraction
                    assert timestamps(when) == formatTime(when, timeFormatRFC3339), when
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


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
            master = await start_master(tmp_path, access_log="twistd")
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
