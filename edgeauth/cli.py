"""``edgeauthctl``: the operators' command line for an edgeauth master and its edges.

The command line is a contract (PROTOCOL.md §8); scripts such as a fail2ban action rely on it::

    edgeauthctl --master URL [--token-file F | env EDGEAUTH_TOKEN] ban IP [--reason R] [--ttl S]
                unban IP | allow IP [--reason R] [--ttl S] | unallow IP
                revoke-token JTI [--expires-at T] | revoke-subject SUB [--before T]
                invalidate [--tag T ...] [--key K ...] [--prefix P ...] [--all] [--soft]
                bans | allows | revocations | fleet | status | tail [--offset O]
                explain --edge ADMIN_URL (IP | --url URL)

Exit codes: 0 done; 1 the server refused (its ``error: detail`` goes to stderr); 2 bad usage;
3 the server could not be reached (connection refused, timeout, DNS). Unbanning or unallowing an
entry that does not exist exits 0 with a note on stderr, so that unbanning an entry that has
already expired (as fail2ban does) is not an error.

Design: this module speaks plain synchronous HTTP with the standard library (:mod:`http.client`)
and deliberately does not use Twisted. A command makes one request (a few when paging, one long
one for ``tail``) and exits, so a reactor would buy nothing: blocking I/O is simpler to read,
starts faster (no reactor or TLS stack to import), and behaves like any other Unix tool in scripts
(exit codes, pipes, Ctrl-C). It imports only the sans-io parts of the package
(:mod:`edgeauth.events`, :mod:`edgeauth.wire`) to parse what the master streams.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import shlex
import socket
import ssl
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn, TextIO
from urllib.parse import urlencode, urlsplit

from edgeauth import __version__
from edgeauth.events import (
    CacheInvalidated,
    Event,
    EventError,
    IpAllowed,
    IpBanned,
    IpUnallowed,
    IpUnbanned,
    SubjectRevoked,
    TokenRevoked,
    UnknownEvent,
    decode_events,
    event_type,
)
from edgeauth.wire.offsets import format_offset
from edgeauth.wire.sse import SSEEvent, SSEParseError, SSEParser

__all__ = ["EXIT_OK", "EXIT_REFUSED", "EXIT_UNREACHABLE", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
"""The command did what was asked (or, for unban/unallow, the entry was already absent)."""
EXIT_REFUSED = 1
"""The server answered with an error (or with something that is not a valid answer)."""
EXIT_USAGE = 2
"""The command line is wrong (argparse's own exit code)."""
EXIT_UNREACHABLE = 3
"""No answer: connection refused, timeout, DNS failure, connection dropped."""

DEFAULT_MASTER = "http://127.0.0.1:4000"
DEFAULT_TIMEOUT = 10.0
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000
TAIL_IDLE_TIMEOUT = 45.0
"""Seconds without a byte before ``tail`` reconnects (the master pings every 15 s of silence)."""
TAIL_BACKOFF_CAP = 10.0
USER_AGENT = f"edgeauthctl/{__version__}"
PROG = "edgeauthctl"

_DURATION = re.compile(r"\A([0-9]+(?:\.[0-9]+)?)([smhd]?)\Z")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_OFFSET = re.compile(r"\A(?:now|-1|[0-9]{1,16})\Z")


# --- errors --------------------------------------------------------------------------------


class CLIError(Exception):
    """A failure that ends the command with :attr:`exit_code`."""

    exit_code = EXIT_REFUSED


class ServerRefusedError(CLIError):
    """The server answered with an error status, or with an answer that cannot be used.

    Attributes:
        status: The HTTP status (0 when the answer was not usable at all).
        code: The protocol's error code, e.g. ``unauthorized``.
        detail: The server's explanation for humans.
        doc: The decoded JSON body of the answer, when it was JSON.
    """

    exit_code = EXIT_REFUSED

    def __init__(self, status: int, code: str, detail: str, doc: Any = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.doc = doc


class UnreachableError(CLIError):
    """No answer from the server: connection refused, timeout, DNS, dropped connection."""

    exit_code = EXIT_UNREACHABLE


# --- HTTP ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A base URL (``http`` or ``https``, optionally with a path prefix) to send requests to.

    Attributes:
        scheme: ``http`` or ``https``.
        host: Host name or address (IPv6 without brackets).
        port: TCP port.
        prefix: Path prefix without a trailing slash (``""`` for none), for masters behind a
            reverse proxy at a sub-path.
    """

    scheme: str
    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Parse a base URL such as ``http://127.0.0.1:4000``.

        Raises:
            ValueError: Not an http(s) URL with a host, or it carries a query or credentials.
        """
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        if not parts.hostname:
            raise ValueError(f"{url!r} has no host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("put no credentials in the URL; use --token-file or EDGEAUTH_TOKEN")
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r} must not carry a query or fragment")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{url!r} has an invalid port") from None
        default = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, port or default, parts.path.rstrip("/"))

    def url(self, path: str) -> str:
        """The full URL of ``path`` (for messages)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}{path}"

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        """A new, not yet connected HTTP(S) connection with ``timeout`` on every socket call."""
        if self.scheme == "https":
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


def _unreachable(endpoint: Endpoint, path: str, exc: BaseException, sent: bool) -> UnreachableError:
    """Describe a transport failure in one line (never with request headers)."""
    where = endpoint.url(path.split("?", 1)[0])
    if isinstance(exc, TimeoutError | socket.timeout):
        why = "timed out"
    elif isinstance(exc, socket.gaierror):
        why = f"cannot resolve {endpoint.host}: {exc.strerror or exc}"
    elif isinstance(exc, ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(exc, ssl.SSLError):
        why = f"TLS failure: {exc.reason or exc}"
    elif isinstance(exc, http.client.HTTPException | ConnectionError):
        why = f"no valid HTTP answer ({type(exc).__name__})"
    else:
        why = str(exc) or type(exc).__name__
    message = f"cannot reach {where}: {why}"
    if sent:
        message += " (the request was sent: it may or may not have been applied)"
    return UnreachableError(message)


def _error_from(status: int, reason: str, raw: bytes, doc: Any) -> ServerRefusedError:
    """Turn an error answer into :class:`ServerRefusedError` (JSON ``{"error", "detail"}``)."""
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        detail = doc.get("detail")
        if not isinstance(detail, str):
            detail = f"HTTP {status} {reason}".strip()
        return ServerRefusedError(status, doc["error"], detail, doc)
    snippet = raw[:200].decode("utf-8", "replace").strip()
    detail = f"HTTP {status} {reason}".strip() + (f": {snippet}" if snippet else "")
    return ServerRefusedError(status, f"http_{status}", detail, doc)


@dataclass
class Context:
    """What every command needs: where to send requests, credentials and output settings.

    Attributes:
        master: The master's base URL.
        token: The bearer token for the master, or None (never printed).
        timeout: Seconds for connecting and for each socket read.
        json_output: Print the server's JSON instead of human-readable text.
        out: Where results go (stdout).
        err: Where notes and errors go (stderr).
        clock: The current Unix time (for relative expiries).
    """

    master: Endpoint
    token: str | None
    timeout: float
    json_output: bool
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    clock: Callable[[], float] = time.time

    def headers(self, *, auth: bool = True, accept: str = "application/json") -> dict[str, str]:
        """Request headers; ``Authorization`` only for the master (``auth``) and when known."""
        headers = {"Accept": accept, "User-Agent": USER_AGENT}
        if auth and self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        endpoint: Endpoint | None = None,
    ) -> Any:
        """Send one request and return the decoded JSON answer.

        Args:
            method: ``GET`` or ``POST``.
            path: Path and query, starting with ``/``.
            body: A JSON object to send, if any.
            endpoint: Another server (an edge's admin listener, which gets no token); default the
                master.

        Raises:
            ServerRefusedError: The answer is an error status or not JSON.
            UnreachableError: No answer.
        """
        target = endpoint or self.master
        headers = self.headers(auth=endpoint is None)
        data: bytes | None = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = target.connection(self.timeout)
        sent = False
        try:
            conn.request(method, target.prefix + path, body=data, headers=headers)
            sent = method != "GET"
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise _unreachable(target, path, exc, sent) from None
        finally:
            conn.close()
        try:
            doc: Any = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not 200 <= response.status < 300:
            raise _error_from(response.status, response.reason, raw, doc)
        if doc is None:
            raise ServerRefusedError(
                response.status, "invalid_answer", f"{target.url(path)} did not answer JSON"
            )
        return doc

    def print(self, text: str = "") -> None:
        """Write one line of results."""
        print(text, file=self.out)

    def note(self, text: str) -> None:
        """Write one line to stderr."""
        print(f"{PROG}: {text}", file=self.err)

    def print_json(self, doc: Any) -> None:
        """Write a JSON document (indented) to stdout."""
        self.print(json.dumps(doc, indent=2, ensure_ascii=False))


# --- formatting ----------------------------------------------------------------------------


def clean(text: object) -> str:
    """Make a value safe to print: control characters (ANSI escapes, newlines) are escaped."""
    value = "-" if text is None else str(text)
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in value)


def format_duration(seconds: float) -> str:
    """Format a span as its two most significant units: ``9m59s``, ``1h``, ``2d3h``, ``0s``."""
    left = max(0, math.floor(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, left = divmod(left, size)
        if count or parts:
            parts.append(f"{count}{unit}")
        if len(parts) == 2:
            break
    while len(parts) > 1 and parts[-1].startswith("0"):
        parts.pop()
    return "".join(parts) or "0s"


def format_expiry(expires_at: object, now: float) -> str:
    """``never``, ``in 9m59s`` or ``expired 3s ago`` for an ``expires_at`` value."""
    if expires_at is None:
        return "never"
    if not isinstance(expires_at, int | float):
        return clean(expires_at)
    delta = float(expires_at) - now
    if delta > 0:
        return f"in {format_duration(delta)}"
    return f"expired {format_duration(-delta)} ago"


def format_ago(when: object, now: float) -> str:
    """``3m12s ago`` for a past Unix time, ``-`` for none."""
    if not isinstance(when, int | float) or isinstance(when, bool):
        return "-" if when is None else clean(when)
    return f"{format_duration(now - float(when))} ago"


def format_time(when: object) -> str:
    """An absolute Unix time as ISO 8601 UTC (``2025-11-22T10:00:00Z``)."""
    if not isinstance(when, int | float) or isinstance(when, bool):
        return "never" if when is None else clean(when)
    try:
        stamp = datetime.fromtimestamp(float(when), UTC)
    except (OverflowError, OSError, ValueError):
        return clean(when)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Align ``rows`` under ``headers`` in columns two spaces apart (the last one unpadded)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _offset_seq(offset: object) -> str:
    """An offset such as ``0000000000000042`` as the seq it follows (``42``)."""
    if isinstance(offset, str) and offset.isdigit():
        return str(int(offset))
    return clean(offset)


def _kv(value: str) -> str:
    """Quote a ``key=value`` value for one line of ``tail`` output when it needs it."""
    value = clean(value)
    return shlex.quote(value) if value else "''"


def describe_event(event: Event | UnknownEvent, raw: Mapping[str, Any]) -> str:
    """One line for ``tail``: ``seq type key-fields source``."""
    fields: list[str] = []
    if isinstance(event, IpBanned | IpAllowed):
        fields.append(event.ip)
        if event.reason:
            fields.append(f"reason={_kv(event.reason)}")
        fields.append(f"expires={format_time(event.expires_at)}")
    elif isinstance(event, IpUnbanned | IpUnallowed):
        fields.append(event.ip)
    elif isinstance(event, TokenRevoked):
        fields.append(f"jti={_kv(event.jti)}")
        if event.reason:
            fields.append(f"reason={_kv(event.reason)}")
        fields.append(f"expires={format_time(event.expires_at)}")
    elif isinstance(event, SubjectRevoked):
        fields.append(f"sub={_kv(event.sub)}")
        fields.append(f"before={format_time(event.before)}")
    elif isinstance(event, CacheInvalidated):
        fields.extend(_selectors(event.tags, event.keys, event.prefixes, event.all, event.soft))
    else:
        for key, value in raw.items():
            if key not in ("seq", "type", "timestamp", "source"):
                text = value if isinstance(value, str) else json.dumps(value)
                fields.append(f"{clean(key)}={_kv(text)}")
    source = raw.get("source", event.source)
    return " ".join([str(event.seq), clean(event_type(event)), *fields, clean(source or "-")])


def _selectors(
    tags: Sequence[str], keys: Sequence[str], prefixes: Sequence[str], all_: bool, soft: bool
) -> list[str]:
    parts = [
        f"{name}={_kv(','.join(values))}"
        for name, values in (("tags", tags), ("keys", keys), ("prefixes", prefixes))
        if values
    ]
    if all_:
        parts.append("all")
    if soft:
        parts.append("soft")
    return parts


def render_mapping(doc: Mapping[str, Any], indent: str = "") -> list[str]:
    """``key: value`` lines for a JSON object; nested objects and lists are indented."""
    if not doc:
        return []
    width = max(len(str(k)) for k in doc) + 1
    lines: list[str] = []
    for key, value in doc.items():
        label = f"{clean(key)}:".ljust(width)
        if isinstance(value, Mapping):
            lines.append(f"{indent}{clean(key)}:" + ("" if value else " {}"))
            lines.extend(render_mapping(value, indent + "  "))
        elif isinstance(value, list) and any(isinstance(v, Mapping | list) for v in value):
            lines.append(f"{indent}{clean(key)}:")
            for item in value:
                if isinstance(item, Mapping):
                    sub = render_mapping(item, indent + "    ")
                    if sub:
                        sub[0] = f"{indent}  - " + sub[0][len(indent) + 4 :]
                    lines.extend(sub)
                else:
                    lines.append(f"{indent}  - {clean(json.dumps(item))}")
        elif isinstance(value, list):
            lines.append(f"{indent}{label} {', '.join(clean(v) for v in value) or '-'}")
        elif isinstance(value, bool):
            lines.append(f"{indent}{label} {'yes' if value else 'no'}")
        else:
            lines.append(f"{indent}{label} {clean(value)}")
    return lines


# --- argument types ------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """An argparse type: seconds, with an optional unit: ``600``, ``10m``, ``2h``, ``7d``."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 600, 10m, 2h or 7d")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not seconds > 0:
        raise argparse.ArgumentTypeError("a duration must be more than 0 seconds")
    return seconds


def parse_timestamp(text: str) -> float:
    """An argparse type: Unix seconds, or ISO 8601 (a time without an offset is UTC)."""
    value = text.strip()
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(number) or number < 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a Unix time")
        return number
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither Unix seconds nor an ISO 8601 time (2025-11-22T10:00:00Z)"
        ) from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def parse_stream_offset(text: str) -> str:
    """An argparse type: ``now``, ``-1`` (start of the retained log), or an event seq/offset."""
    value = text.strip()
    if not _OFFSET.match(value):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an offset: give now, -1, or the seq to start after"
        )
    if value in ("now", "-1"):
        return value
    return format_offset(int(value))


def positive_float(text: str) -> float:
    """An argparse type: a number of seconds greater than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def page_size(text: str) -> int:
    """An argparse type: entries per request when listing, 1..10000."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_PAGE_SIZE}")
    return int(text)


# --- writes --------------------------------------------------------------------------------


def _post(ctx: Context, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
    doc = ctx.request("POST", path, body)
    if not isinstance(doc, dict) or not isinstance(doc.get("event"), dict):
        raise ServerRefusedError(0, "invalid_answer", f"{path} answered without an event")
    return doc


def _confirm(ctx: Context, doc: dict[str, Any], text: str) -> int:
    if ctx.json_output:
        ctx.print_json(doc)
    else:
        ctx.print(f"{text} (seq {clean(doc['event'].get('seq'))})")
    return EXIT_OK


def _ip_entry(ctx: Context, path: str, verb: str, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"ip": args.ip, "reason": args.reason}
    if args.ttl is not None:
        body["ttl"] = args.ttl
    doc = _post(ctx, path, body)
    return _confirm(ctx, doc, f"{verb} {clean(doc['event'].get('ip'))}")


def _remove_ip_entry(
    ctx: Context, path: str, verb: str, absent: str, args: argparse.Namespace
) -> int:
    try:
        doc = _post(ctx, path, {"ip": args.ip})
    except ServerRefusedError as exc:
        if exc.status != 404 or exc.code != absent:
            raise
        ctx.note(f"note: {clean(exc.detail)} (already absent, nothing to do)")
        if ctx.json_output and exc.doc is not None:
            ctx.print_json(exc.doc)
        return EXIT_OK
    return _confirm(ctx, doc, f"{verb} {clean(doc['event'].get('ip'))}")


def cmd_ban(ctx: Context, args: argparse.Namespace) -> int:
    """``ban IP [--reason R] [--ttl S]``."""
    return _ip_entry(ctx, "/ban/ip", "banned", args)


def cmd_unban(ctx: Context, args: argparse.Namespace) -> int:
    """``unban IP`` (a missing entry is a note, not an error)."""
    return _remove_ip_entry(ctx, "/unban/ip", "unbanned", "not_banned", args)


def cmd_allow(ctx: Context, args: argparse.Namespace) -> int:
    """``allow IP [--reason R] [--ttl S]``."""
    return _ip_entry(ctx, "/allow/ip", "allowed", args)


def cmd_unallow(ctx: Context, args: argparse.Namespace) -> int:
    """``unallow IP`` (a missing entry is a note, not an error)."""
    return _remove_ip_entry(ctx, "/unallow/ip", "unallowed", "not_allowed", args)


def cmd_revoke_token(ctx: Context, args: argparse.Namespace) -> int:
    """``revoke-token JTI [--expires-at T] [--reason R]``."""
    body: dict[str, Any] = {"jti": args.jti}
    if args.expires_at is not None:
        body["expires_at"] = args.expires_at
    if args.reason:
        body["reason"] = args.reason
    doc = _post(ctx, "/revoke/token", body)
    return _confirm(ctx, doc, f"revoked token {clean(doc['event'].get('jti'))}")


def cmd_revoke_subject(ctx: Context, args: argparse.Namespace) -> int:
    """``revoke-subject SUB [--before T]`` (default: tokens issued before now)."""
    body: dict[str, Any] = {"sub": args.sub}
    if args.before is not None:
        body["before"] = args.before
    doc = _post(ctx, "/revoke/subject", body)
    event = doc["event"]
    text = f"revoked subject {clean(event.get('sub'))}: tokens issued before "
    return _confirm(ctx, doc, text + format_time(event.get("before")))


def cmd_invalidate(ctx: Context, args: argparse.Namespace) -> int:
    """``invalidate [--tag T ...] [--key K ...] [--prefix P ...] [--all] [--soft]``."""
    body: dict[str, Any] = {}
    for name, values in (("tags", args.tags), ("keys", args.keys), ("prefixes", args.prefixes)):
        if values:
            body[name] = values
    if args.all:
        body["all"] = True
    if args.soft:
        body["soft"] = True
    doc = _post(ctx, "/invalidate", body)
    event = doc["event"]
    summary = _selectors(
        event.get("tags") or [],
        event.get("keys") or [],
        event.get("prefixes") or [],
        bool(event.get("all")),
        bool(event.get("soft")),
    )
    return _confirm(ctx, doc, " ".join(["invalidated", *summary]))


# --- reads ---------------------------------------------------------------------------------


def list_all(
    ctx: Context,
    path: str,
    key: str,
    key_field: str,
    size: int,
    query: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Read every entry of a paged list, following ``next`` (or the last key) with ``after=``.

    Raises:
        ServerRefusedError: An answer is an error or has no list under ``key``.
    """
    rows: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params = {**(query or {}), "limit": str(size)}
        if after is not None:
            params["after"] = after
        doc = ctx.request("GET", f"{path}?{urlencode(params)}")
        page = doc.get(key) if isinstance(doc, dict) else None
        if not isinstance(page, list):
            raise ServerRefusedError(0, "invalid_answer", f"{path} answered without {key!r}")
        rows.extend(row for row in page if isinstance(row, dict))
        if not page:
            return rows
        if "next" in doc:
            following = doc["next"]
        else:
            last = page[-1]
            following = last.get(key_field) if isinstance(last, dict) else None
        if not isinstance(following, str) or following == after:
            return rows
        after = following


def _entry_rows(entries: Sequence[Mapping[str, Any]], now: float) -> list[list[str]]:
    return [
        [
            clean(e.get("ip")),
            clean(e.get("seq")),
            clean(e.get("source") or "-"),
            clean(e.get("reason") or "-"),
            format_expiry(e.get("expires_at"), now),
        ]
        for e in entries
    ]


def _list_entries(ctx: Context, args: argparse.Namespace, table: str) -> int:
    query = {"ip": args.ip} if args.ip is not None else None
    rows = list_all(ctx, f"/{table}", table, "ip", args.page_size, query)
    if ctx.json_output:
        ctx.print_json({table: rows, "next": None})
        return EXIT_OK
    if not rows:
        what = "bans" if table == "bans" else "allow entries"
        ctx.print(f"no {what}" + (f" cover {clean(args.ip)}" if args.ip else ""))
        return EXIT_OK
    headers = ("IP", "SEQ", "SOURCE", "REASON", "EXPIRES")
    for line in format_table(headers, _entry_rows(rows, ctx.clock())):
        ctx.print(line)
    return EXIT_OK


def cmd_bans(ctx: Context, args: argparse.Namespace) -> int:
    """``bans [--ip A]``: every live ban entry, or those covering one address."""
    return _list_entries(ctx, args, "bans")


def cmd_allows(ctx: Context, args: argparse.Namespace) -> int:
    """``allows [--ip A]``: every live allow entry, or those covering one address."""
    return _list_entries(ctx, args, "allows")


def cmd_revocations(ctx: Context, args: argparse.Namespace) -> int:
    """``revocations``: revoked tokens and subjects."""
    tokens = list_all(ctx, "/revocations", "revoked_tokens", "jti", args.page_size)
    subjects = list_all(ctx, "/revocations", "revoked_subjects", "sub", args.page_size)
    if ctx.json_output:
        ctx.print_json({"revoked_tokens": tokens, "revoked_subjects": subjects})
        return EXIT_OK
    now = ctx.clock()
    if tokens:
        rows = [[clean(t.get("jti")), format_expiry(t.get("expires_at"), now)] for t in tokens]
        for line in format_table(("JTI", "FORGOTTEN"), rows):
            ctx.print(line)
    else:
        ctx.print("no revoked tokens")
    ctx.print()
    if subjects:
        rows = [
            [clean(s.get("sub")), format_time(s.get("before")), format_ago(s.get("before"), now)]
            for s in subjects
        ]
        for line in format_table(("SUBJECT", "TOKENS ISSUED BEFORE", "AGE"), rows):
            ctx.print(line)
    else:
        ctx.print("no revoked subjects")
    return EXIT_OK


def read_object(ctx: Context, path: str, endpoint: Endpoint | None = None) -> dict[str, Any] | None:
    """GET ``path``: with ``--json`` print the answer and return None, else return the object.

    Raises:
        ServerRefusedError: without ``--json``, the answer is not a JSON object.
    """
    doc = ctx.request("GET", path, endpoint=endpoint)
    if ctx.json_output:
        ctx.print_json(doc)
        return None
    if not isinstance(doc, dict):
        where = path.partition("?")[0]
        raise ServerRefusedError(0, "invalid_answer", f"{where} did not answer a JSON object")
    return doc


def cmd_fleet(ctx: Context, args: argparse.Namespace) -> int:
    """``fleet``: the stream readers the master knows, with their lag."""
    doc = read_object(ctx, "/fleet")
    if doc is None:
        return EXIT_OK
    ctx.print(f"log {clean(doc.get('log_id'))}, tail {_offset_seq(doc.get('tail'))}")
    members = [m for m in doc.get("subscribers") or [] if isinstance(m, dict)]
    if not members:
        ctx.print("no stream readers")
        return EXIT_OK
    now = ctx.clock()
    rows = [
        [
            clean(m.get("edge_id") or "-"),
            clean(m.get("address")),
            clean(m.get("mode")),
            "yes" if m.get("connected") else "no",
            format_ago(m.get("connected_since"), now),
            format_ago(m.get("last_seen"), now),
            _offset_seq(m.get("offset")),
            clean(m.get("lag")),
        ]
        for m in members
    ]
    headers = ("EDGE", "ADDRESS", "MODE", "CONNECTED", "SINCE", "LAST SEEN", "OFFSET", "LAG")
    for line in format_table(headers, rows):
        ctx.print(line)
    return EXIT_OK


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    """``status``: the master's log id, tail, earliest retained offset, subscribers."""
    doc = read_object(ctx, "/status")
    if doc is None:
        return EXIT_OK
    for line in render_mapping({"master": ctx.master.url(""), **doc}):
        ctx.print(line)
    return EXIT_OK


# --- tail ----------------------------------------------------------------------------------


@dataclass
class _TailState:
    offset: str
    connected_once: bool = False


def _follow(ctx: Context, state: _TailState) -> None:
    """Read one SSE connection until the server ends it, printing events as they come.

    Raises:
        ServerRefusedError: The master refused the request, or sent an unusable stream.
        UnreachableError: Connecting or reading failed.
    """
    path = f"/v1/stream/events?{urlencode({'offset': state.offset, 'live': 'sse'})}"
    conn = ctx.master.connection(ctx.timeout)
    try:
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(max(ctx.timeout, TAIL_IDLE_TIMEOUT))
            headers = ctx.headers(accept="text/event-stream")
            headers["Edgeauth-Edge-Id"] = f"{PROG}@{socket.gethostname()}"[:128]
            conn.request("GET", ctx.master.prefix + path, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise _unreachable(ctx.master, path, exc, False) from None
        if response.status != 200:
            raw = response.read()
            try:
                doc = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                doc = None
            raise _error_from(response.status, response.reason, raw, doc)
        state.connected_once = True
        parser = SSEParser()
        while True:
            try:
                chunk = response.read1(65536)
            except (OSError, http.client.HTTPException) as exc:
                raise _unreachable(ctx.master, path, exc, False) from None
            if not chunk:
                return
            try:
                items = parser.feed(chunk)
            except SSEParseError as exc:
                raise ServerRefusedError(0, "invalid_stream", str(exc)) from None
            for item in items:
                if isinstance(item, SSEEvent):
                    _handle_frame(ctx, state, item)
    finally:
        conn.close()


def _handle_frame(ctx: Context, state: _TailState, frame: SSEEvent) -> None:
    if frame.event == "data":
        try:
            events = decode_events(frame.data)
            raw = json.loads(frame.data)
        except EventError as exc:
            raise ServerRefusedError(0, "invalid_stream", exc.detail) from None
        for event, doc in zip(events, raw, strict=True):
            if state.offset not in ("now", "-1") and event.seq <= int(state.offset):
                continue  # already printed before a reconnect
            if ctx.json_output:
                ctx.out.write(json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n")
            else:
                ctx.out.write(describe_event(event, doc) + "\n")
            state.offset = format_offset(event.seq)
        ctx.out.flush()
    elif frame.event == "control":
        try:
            control = json.loads(frame.data)
        except ValueError:
            raise ServerRefusedError(0, "invalid_stream", "a control frame is not JSON") from None
        following = control.get("streamNextOffset") if isinstance(control, dict) else None
        if isinstance(following, str) and following.isdigit() and len(following) == 16:
            state.offset = following


def cmd_tail(ctx: Context, args: argparse.Namespace) -> int:
    """``tail [--offset O]``: print events as the master commits them, until Ctrl-C.

    When the master ends the stream (it cycles SSE connections about every minute) this
    reconnects at once from the last offset, so no event is missed or printed twice. Once
    connected, a dropped connection or a 5xx answer (a master restarting behind a proxy) is
    retried with backoff; the first connection failing, or any refusal, ends the command.
    """
    state = _TailState(args.offset)
    failures = 0
    try:
        while True:
            try:
                _follow(ctx, state)
                failures = 0  # the server cycled the connection: reconnect at once
                continue
            except UnreachableError as exc:
                if not state.connected_once:
                    raise
                problem = str(exc)
            except ServerRefusedError as exc:
                if not (state.connected_once and exc.status >= 500):
                    raise
                problem = f"{exc.code}: {clean(exc.detail)}"
            delay = min(TAIL_BACKOFF_CAP, 0.5 * 2**failures)
            failures += 1
            ctx.note(f"{problem}; reconnecting from offset {state.offset} in {delay:.1f}s")
            time.sleep(delay)
    except KeyboardInterrupt:
        ctx.out.flush()
        return EXIT_OK


# --- explain -------------------------------------------------------------------------------


def cmd_explain(ctx: Context, args: argparse.Namespace) -> int:
    """``explain --edge ADMIN_URL (IP | --url URL)``: ask an edge why it treats a client so."""
    edge: Endpoint = args.edge
    query = {"ip": args.ip} if args.ip is not None else {"url": args.url}
    doc = read_object(ctx, f"/explain?{urlencode(query)}", endpoint=edge)
    if doc is None:
        return EXIT_OK
    if args.ip is not None:
        _explain_ip(ctx, doc)
    else:
        _explain_url(ctx, doc)
    return EXIT_OK


def _explain_ip(ctx: Context, doc: Mapping[str, Any]) -> None:
    verdict = clean(doc.get("verdict"))
    ref = doc.get("ref")
    line = f"{clean(doc.get('ip'))}: {verdict}"
    if ref is not None:
        line += f" (ref {clean(ref)})"
    ctx.print(line)
    entries = [
        {**e, "kind": e.get("kind", kind)}
        for kind in ("allow", "ban")
        for e in doc.get(f"{kind}s") or []
        if isinstance(e, dict)
    ]
    if not entries:
        ctx.print("no matching allow or ban entries")
        return
    now = ctx.clock()
    rows = [
        [clean(e["kind"]), *row] for e, row in zip(entries, _entry_rows(entries, now), strict=True)
    ]
    for text in format_table(("KIND", "NETWORK", "SEQ", "SOURCE", "REASON", "EXPIRES"), rows):
        ctx.print(text)


def _explain_url(ctx: Context, doc: Mapping[str, Any]) -> None:
    ctx.print(f"url: {clean(doc.get('url'))}")
    entry = doc.get("cache")
    if entry is None:
        ctx.print("cache: no entry for this URL")
        return
    if not isinstance(entry, Mapping):
        ctx.print(f"cache: {clean(entry)}")
        return
    ctx.print("cache:")
    for line in render_mapping(entry, "  "):
        ctx.print(line)


# --- command line --------------------------------------------------------------------------

DESCRIPTION = "Operate an edgeauth master (bans, allows, revocations, cache) and explain edges."

EPILOG = """\
environment:
  EDGEAUTH_MASTER   the master URL when --master is not given (default %(master)s)
  EDGEAUTH_TOKEN    the operator (or reader) token when --token-file is not given

exit status:
  0  done; also for unban/unallow of an entry that does not exist (a note goes to stderr,
     "already absent"), so that unbanning an entry that has already expired, as fail2ban
     does, is not an error
  1  the server refused: its "error: detail" is printed on stderr
  2  bad usage
  3  the server could not be reached (connection refused, timeout, DNS); a write that timed
     out after being sent may or may not have been applied

Times (--expires-at, --before) are Unix seconds or ISO 8601 (UTC unless an offset is given).
Durations (--ttl) are seconds, or a number with s, m, h or d.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Add the global options; in subcommands they default to SUPPRESS so both places work."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("global options")
    group.add_argument(
        "--master",
        metavar="URL",
        default=default(None),
        help=f"the master's base URL (default: $EDGEAUTH_MASTER, else {DEFAULT_MASTER})",
    )
    group.add_argument(
        "--token-file",
        metavar="F",
        default=default(None),
        help="read the bearer token from F (surrounding whitespace is ignored); "
        "default: $EDGEAUTH_TOKEN",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the server's JSON instead of text (tail: one event per line)",
    )
    group.add_argument(
        "--timeout",
        type=positive_float,
        metavar="SECONDS",
        default=default(DEFAULT_TIMEOUT),
        help=f"connect and read timeout (default {DEFAULT_TIMEOUT:g})",
    )


def _edge_url(text: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``edgeauthctl`` (PROTOCOL.md §8)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG % {"master": DEFAULT_MASTER},
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, handler: Callable[[Context, argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=text, description=text, formatter_class=_Formatter, epilog=None
        )
        sub.set_defaults(handler=handler, subparser=sub)
        _global_options(sub, defaults=False)
        return sub

    for name, handler, text in (
        ("ban", cmd_ban, "ban an address or network (an existing entry is replaced)"),
        ("allow", cmd_allow, "allow an address or network (an allow entry beats every ban)"),
    ):
        sub = command(name, handler, text)
        sub.add_argument("ip", metavar="IP", help="address or CIDR network")
        sub.add_argument("--reason", metavar="R", default="", help="why (shown to operators)")
        sub.add_argument(
            "--ttl", metavar="S", type=parse_duration, help="expire after S seconds (or 10m, 2h)"
        )
    for name, handler, text in (
        (
            "unban",
            cmd_unban,
            "remove the ban entry of exactly this network; exits 0 with a note on stderr when "
            "there is none (already absent, e.g. expired)",
        ),
        (
            "unallow",
            cmd_unallow,
            "remove the allow entry of exactly this network; exits 0 with a note on stderr when "
            "there is none (already absent, e.g. expired)",
        ),
    ):
        sub = command(name, handler, text)
        sub.add_argument("ip", metavar="IP", help="address or CIDR network, as banned/allowed")

    sub = command("revoke-token", cmd_revoke_token, "revoke one JWT by its jti")
    sub.add_argument("jti", metavar="JTI")
    sub.add_argument(
        "--expires-at",
        metavar="T",
        type=parse_timestamp,
        help="the token's own exp: the revocation may be forgotten after it",
    )
    sub.add_argument("--reason", metavar="R", default="", help="why (shown to operators)")

    sub = command(
        "revoke-subject", cmd_revoke_subject, "revoke every JWT of a subject issued before a time"
    )
    sub.add_argument("sub", metavar="SUB")
    sub.add_argument(
        "--before", metavar="T", type=parse_timestamp, help="issued before T (default: now)"
    )

    sub = command(
        "invalidate",
        cmd_invalidate,
        "drop (or, with --soft, mark stale) cached responses; give at least one selector",
    )
    sub.add_argument("--tag", dest="tags", metavar="T", action="append", help="a cache tag")
    sub.add_argument("--key", dest="keys", metavar="K", action="append", help="host+path+query")
    sub.add_argument("--prefix", dest="prefixes", metavar="P", action="append", help="a key prefix")
    sub.add_argument("--all", action="store_true", help="every cached response")
    sub.add_argument("--soft", action="store_true", help="mark stale instead of dropping")

    for name, handler, text in (
        ("bans", cmd_bans, "list live ban entries"),
        ("allows", cmd_allows, "list live allow entries"),
    ):
        sub = command(name, handler, text)
        sub.add_argument("--ip", metavar="A", help="only the entries that cover address A")
        sub.add_argument(
            "--page-size",
            type=page_size,
            default=DEFAULT_PAGE_SIZE,
            metavar="N",
            help=f"entries per request while paging (default {DEFAULT_PAGE_SIZE})",
        )
    sub = command("revocations", cmd_revocations, "list revoked tokens and subjects")
    sub.add_argument(
        "--page-size",
        type=page_size,
        default=DEFAULT_PAGE_SIZE,
        metavar="N",
        help=f"entries per request while paging (default {DEFAULT_PAGE_SIZE})",
    )
    command("fleet", cmd_fleet, "list the edges (stream readers) and their lag")
    command("status", cmd_status, "show the master's log id, tail, earliest offset, subscribers")
    sub = command(
        "tail",
        cmd_tail,
        "print events live as the master commits them, one line each; reconnects from the last "
        "offset when the master cycles the stream or the connection drops; Ctrl-C stops it with "
        "exit status 0",
    )
    sub.add_argument(
        "--offset",
        metavar="O",
        type=parse_stream_offset,
        default="now",
        help="start after this seq/offset; -1 for the whole retained log (default: now)",
    )

    sub = command(
        "explain",
        cmd_explain,
        "ask an edge's admin listener which entries decide about a client IP, or what it has "
        "cached for a URL (the admin listener takes no token)",
    )
    sub.add_argument(
        "--edge", metavar="ADMIN_URL", type=_edge_url, required=True, help="the admin listener"
    )
    sub.add_argument("ip", metavar="IP", nargs="?", help="a client address")
    sub.add_argument("--url", metavar="URL", help="a cached URL (host + path + query)")
    return parser


def _fail(parser: argparse.ArgumentParser, args: argparse.Namespace, message: str) -> NoReturn:
    """Exit with status 2, showing the subcommand's usage."""
    sub = getattr(args, "subparser", None)
    (sub if isinstance(sub, argparse.ArgumentParser) else parser).error(message)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks argparse cannot express; each exits 2."""
    if args.command == "invalidate" and not (args.tags or args.keys or args.prefixes or args.all):
        _fail(parser, args, "give at least one of --tag, --key, --prefix or --all")
    if args.command == "explain" and (args.ip is None) == (args.url is None):
        _fail(parser, args, "give either an IP or --url URL (exactly one)")


def _read_token(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            parser.error(f"cannot read token file {args.token_file}: {why}")
        if not token:
            parser.error(f"token file {args.token_file} is empty")
        origin = f"token file {args.token_file}"
    else:
        env = os.environ.get("EDGEAUTH_TOKEN", "").strip()
        if not env:
            return None
        token, origin = env, "EDGEAUTH_TOKEN"
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        parser.error(f"the token from {origin} contains spaces or control characters")
    return token


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``edgeauthctl`` and return its exit status (argparse exits 2 on bad usage).

    Args:
        argv: The arguments without the program name; default ``sys.argv[1:]``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    master_url = args.master or os.environ.get("EDGEAUTH_MASTER") or DEFAULT_MASTER
    try:
        master = Endpoint.parse(master_url)
    except ValueError as exc:
        parser.error(f"--master: {exc}")
    token = _read_token(parser, args)
    ctx = Context(master, token, args.timeout, args.json)
    try:
        result: int = args.handler(ctx, args)
        return result
    except ServerRefusedError as exc:
        ctx.note(f"{clean(exc.code)}: {clean(exc.detail)}")
        if exc.status == 401 and token is None:
            ctx.note("no token was given: use --token-file F or set EDGEAUTH_TOKEN")
        return EXIT_REFUSED
    except UnreachableError as exc:
        ctx.note(str(exc))
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``edgeauthctl bans | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
