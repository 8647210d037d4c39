"""Read the ini file of PROTOCOL.md §8 into frozen, validated settings.

Each section is an attrs class whose fields are the section's keys; a field's ``metadata["parse"]``
turns the raw ini text into the field's value or says why it cannot. Unknown sections and keys are
errors (a typo must not silently do nothing), and every error names the file, section and key on one
line. Secrets (``env:NAME``, ``file:PATH``, ``sha256:HEX``) are resolved here and never appear in an
error message or a ``repr``.

Paths in the file (databases, secret files, ``jwks_file``) are kept exactly as given: relative paths
are relative to the working directory of the process, not to the ini file.
"""

from __future__ import annotations

import configparser
import hashlib
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import attrs

TOKEN_ROLES = ("operator", "edge", "reader")
"""The roles a master token may have (PROTOCOL.md §1)."""

COMMAND_LINE = "<command line>"
"""The ``file`` that :class:`ConfigError` names for a bad value given in ``overrides``."""

JWT_ALGORITHMS = frozenset(
    "HS256 HS384 HS512 RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 ES512 EdDSA".split()
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_RULE = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*\Z")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+\Z")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}\Z")
_BOOLS = dict.fromkeys(("true", "yes", "on", "1"), True)
_BOOLS.update(dict.fromkeys(("false", "no", "off", "0"), False))


class ConfigError(Exception):
    """The configuration is invalid; ``str()`` is one line naming where and why.

    Attributes:
        file: the ini file (or ``"<command line>"`` for an override), if known.
        section: the section, if the error is inside one.
        key: the key, if the error is about one value.
        why: what is wrong, for humans; never contains a secret.
    """

    def __init__(
        self,
        why: str,
        *,
        file: str | None = None,
        section: str | None = None,
        key: str | None = None,
    ) -> None:
        self.file, self.section, self.key = file, section, key
        self.why = " ".join(why.split())  # one line, whatever a library's message looked like
        where = " ".join(p for p in (section and f"[{section}]", key) if p)
        super().__init__(": ".join([p for p in (file, where) if p] + [self.why]))


class _BadValueError(Exception):
    """A raw value is invalid; the loader adds file, section and key."""


# --- parsers: raw text -> value, or _BadValueError(why) ------------------------------------------

_Parse = Callable[[str], Any]


def _number(
    kind: type[float], low: float, high: float | None = None, *, strict: bool = False
) -> _Parse:
    what = "a whole number" if kind is int else "a number"
    bound = f"{'>' if strict else '>='} {low:g}" if high is None else f"from {low:g} to {high:g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan  # fails every check below
        too_low = value <= low if strict else value < low
        if too_low or not math.isfinite(value) or (high is not None and value > high):
            raise _BadValueError(f"must be {what} {bound}, got {text!r}")
        return value

    return parse


_POSITIVE = _number(float, 0, strict=True)
_NON_NEGATIVE = _number(float, 0)


def _bool(text: str) -> bool:
    try:
        return _BOOLS[text.lower()]
    except KeyError:
        raise _BadValueError(f"must be true/false, yes/no, on/off or 1/0, got {text!r}") from None


def _choice(*options: str) -> _Parse:
    def parse(text: str) -> str:
        if text not in options:
            raise _BadValueError(f"must be one of {', '.join(options)}, got {text!r}")
        return text

    return parse


def _text(pattern: re.Pattern[str] | None = None, what: str = "a non-empty value") -> _Parse:
    def parse(text: str) -> str:
        if not text or (pattern is not None and not pattern.match(text)):
            raise _BadValueError(f"must be {what}, got {text!r}")
        return text

    return parse


_ALGORITHM = _choice(*sorted(JWT_ALGORITHMS))
_GLOB = _text(re.compile("/"), "a path glob starting with '/'")


def _optional(text: str) -> str | None:
    return text or None


def _endpoint(text: str) -> str:
    """Check a server endpoint string by building (not listening on) the endpoint."""
    from twisted.internet.endpoints import serverFromString

    try:
        endpoint = serverFromString(object(), text)  # type: ignore[no-untyped-call]
    except Exception as exc:  # plugin parsers may raise anything
        raise _BadValueError(f"not a valid Twisted endpoint ({exc}), got {text!r}") from None
    port = getattr(endpoint, "_port", None)  # serverFromString does not range-check TCP ports
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise _BadValueError(f"port must be from 0 to 65535, got {text!r}")
    return text


def _url(text: str) -> str:
    def bad(why: str) -> _BadValueError:
        return _BadValueError(f"must be an http(s) URL ({why}), got {text!r}")

    if not text or any(c.isspace() for c in text):
        raise bad("empty or with spaces")
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise bad(str(exc)) from None
    if parts.scheme not in ("http", "https"):
        raise bad("scheme must be http or https")
    if not parts.hostname:
        raise bad("no host")
    if parts.username is not None or parts.password is not None:
        raise bad("no user info allowed")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise bad("no query or fragment allowed")
    return text


def _comma_list(item: _Parse, *, at_least_one: bool = False) -> _Parse:
    def parse(text: str) -> tuple[Any, ...]:
        raw = [part.strip() for part in text.split(",")] if text.strip() else []
        if any(not part for part in raw):
            raise _BadValueError(f"empty item in comma-separated list {text!r}")
        if at_least_one and not raw:
            raise _BadValueError("needs at least one comma-separated item")
        return tuple(item(part) for part in raw)

    return parse


def _cidr(text: str) -> str:
    """Normalise like PROTOCOL.md §1: bare address → /32 or /128, IPv4-mapped → IPv4."""
    try:
        net: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.ip_network(text)
    except ValueError as exc:
        why = "host bits set" if "host bits" in str(exc) else "not an address or CIDR network"
        raise _BadValueError(f"{why}, got {text!r}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            net = ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return str(net)


def _client_role(text: str) -> tuple[str, str]:
    """Parse one ``CN=<common name>:<role>`` item of ``[master] tls_client_roles``."""
    subject, sep, role = text.rpartition(":")
    name, eq, value = subject.partition("=")
    if not sep or not eq or name.strip().upper() != "CN" or not value.strip():
        raise _BadValueError(f"expected 'CN=<common name>:<role>', got {text!r}")
    if role.strip() not in TOKEN_ROLES:
        raise _BadValueError(f"the role must be one of {', '.join(TOKEN_ROLES)}, got {text!r}")
    return value.strip(), role.strip()


def database_error(exc: BaseException, path: str, *, file: str | None, section: str) -> ConfigError:
    """Describe a database that cannot be opened as a :class:`ConfigError` on ``database``.

    The services call this when opening ``[master]``/``[edge] database`` fails at start-up, so an
    unusable path (a parent that is a file, a read-only or missing mount, a corrupt file) stops
    the process with the same one line as any other bad setting.

    Args:
        exc: what opening raised (``OSError`` or ``sqlite3.Error``).
        path: the configured database path.
        file: the ini file the path came from, or :data:`COMMAND_LINE`.
        section: ``master`` or ``edge``.
    """
    if isinstance(exc, NotADirectoryError | FileExistsError) and exc.filename:
        why = f"{exc.filename!r} is not a directory"
    elif isinstance(exc, OSError) and exc.strerror:
        why = exc.strerror + (f": {exc.filename!r}" if exc.filename else "")
    else:
        why = str(exc) or type(exc).__name__
    return ConfigError(f"cannot open {path!r}: {why}", file=file, section=section, key="database")


def _check_token(token: str) -> str:
    if not _TOKEN_CHARS.match(token):
        raise _BadValueError("the token must be printable ASCII without spaces")
    return token


def _field(default: Any, parse: _Parse, **kwargs: Any) -> Any:
    return attrs.field(default=default, metadata={"parse": parse}, **kwargs)


def _secret_field(check: Callable[[str], str] | None = None) -> Any:
    """A secret reference (``env:``/``file:``), resolved by the loader; empty means None."""
    return attrs.field(default=None, repr=False, metadata={"secret": check or (lambda s: s)})


# --- settings -------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class MasterSettings:
    """``[master]``: the master's listener, log, retention and stream tuning.

    Attributes:
        listen: the HTTP listener, a Twisted server endpoint string.
        database: an SQLite file path or a ``postgresql://`` DSN.
        retention_events: keep at most this many events in the log.
        retention_days: keep events at most this many days.
        max_batch: most events in one catch-up or long-poll response.
        long_poll_timeout: seconds a long-poll waits before answering empty.
        sse_cycle: seconds after which an SSE response is ended for the client to reconnect.
        stream_cache: ``Cache-Control`` visibility of stream responses, public or private.
        max_body: largest accepted request body in bytes (larger gets 413).
        ping_interval: seconds between SSE keep-alive comments.
        max_subscriber_buffer: bytes buffered for one slow subscriber before it is dropped.
        http_timeout: idle timeout of HTTP connections (``Site`` timeout) in seconds.
        tls_client_ca: PEM file of the CA certificates that client certificates must chain to;
            set, the ``ssl:`` listener asks clients for a certificate (mTLS).
        tls_client_required: whether the TLS handshake fails without a valid client certificate.
        tls_client_roles: ``(common name, role)`` pairs: a client whose verified certificate has
            that subject CN is authorised with that role without a bearer token.
        access_log: ``off`` (the default, as on the edge), ``twistd`` (one line per request in
            the process log, through twistd's observer: ~35 µs a request, a sixth of a ban's
            CPU), ``buffered`` (written in batches off the reactor thread) or ``sampled`` (one
            request in ``access_log_sample``, buffered).
            Whatever the mode, every write is also logged once in the process log (the audit
            line: type, subject, source, seq).
        access_log_path: the access log file (needed for ``buffered`` and ``sampled``).
        access_log_sample: with ``sampled``, log one request in this many.
    """

    listen: str = _field("tcp:4000:interface=127.0.0.1", _endpoint)
    database: str = _field("var/master.sqlite3", _text())
    retention_events: int = _field(1_000_000, _number(int, 1))
    retention_days: float = _field(7.0, _POSITIVE)
    max_batch: int = _field(1000, _number(int, 1))
    long_poll_timeout: float = _field(20.0, _POSITIVE)
    sse_cycle: float = _field(60.0, _POSITIVE)
    stream_cache: str = _field("private", _choice("public", "private"))
    max_body: int = _field(65536, _number(int, 1))
    ping_interval: float = _field(15.0, _POSITIVE)
    max_subscriber_buffer: int = _field(1_048_576, _number(int, 1))
    http_timeout: float = _field(60.0, _POSITIVE)
    tls_client_ca: str | None = _field(None, _optional)
    tls_client_required: bool = _field(False, _bool)
    tls_client_roles: tuple[tuple[str, str], ...] = _field((), _comma_list(_client_role))
    access_log: str = _field("off", _choice("twistd", "off", "buffered", "sampled"))
    access_log_path: str | None = _field(None, _optional)
    access_log_sample: int = _field(100, _number(int, 1))


@attrs.frozen(kw_only=True)
class TokenEntry:
    """One ``[tokens]`` line: a named token with a role, kept only as its SHA-256 digest.

    Attributes:
        name: the key of the line, lower-cased as configparser does (as in ``operator:alice``).
        role: ``operator``, ``edge`` or ``reader``.
        digest: SHA-256 of the token's UTF-8 bytes; the token itself is never kept.
    """

    name: str
    role: str = attrs.field(validator=attrs.validators.in_(TOKEN_ROLES))
    digest: bytes = attrs.field(repr=False, validator=attrs.validators.instance_of(bytes))


@attrs.frozen(kw_only=True)
class EdgeSettings:
    """``[edge]``: the edge's identity, listeners, origin, masters and sync behaviour.

    Attributes:
        id: the edge's name, used in ``edge:<id>`` sources and in the fleet view.
        listen: the proxy listener (endpoint string).
        admin_listen: the admin listener (endpoint string), 127.0.0.1 by default.
        origin: the origin's base URL.
        masters: master base URLs, tried in order with failover.
        token: the edge's bearer token for the master, resolved; never shown in ``repr``.
        database: the edge's SQLite file.
        trusted_proxies: normalised networks whose forwarding headers are believed.
        max_lag: seconds behind the master before ``/readyz`` fails.
        fail_mode: ``open`` (serve) or ``closed`` (503) before the first sync.
        stream_mode: ``sse`` or ``long-poll`` for the live stream.
        ping_interval: expected seconds between SSE pings (the idle watchdog uses twice this).
        access_log: ``off``, ``buffered`` (written in batches off the reactor thread) or
            ``sampled`` (one request in ``access_log_sample``, buffered).
        access_log_path: the access log file (needed unless ``access_log = off``).
        access_log_sample: with ``sampled``, log one request in this many.
        origin_max_connections: most connections open to the origin at once.
        origin_connect_timeout: seconds to connect to the origin (then 502).
        origin_response_timeout: seconds without progress from the origin (then 504).
        http_timeout: idle timeout of client connections (``Site`` timeout) in seconds.
        tls_ca: PEM file of the CA certificates trusted for ``https://`` masters, instead of
            the system's trust store.
        tls_cert: PEM file of the client certificate presented to ``https://`` masters (it may
            hold the private key and the chain too).
        tls_key: PEM file of that certificate's private key, if not in ``tls_cert``.
    """

    id: str = _field("edge-a", _text(_NAME, "letters, digits, '.', '_' or '-'"))
    listen: str = _field("tcp:5001:interface=127.0.0.1", _endpoint)
    admin_listen: str = _field("tcp:5101:interface=127.0.0.1", _endpoint)
    origin: str = _field("http://127.0.0.1:8080", _url)
    masters: tuple[str, ...] = _field(
        ("http://127.0.0.1:4000",), _comma_list(_url, at_least_one=True)
    )
    token: str | None = _secret_field(_check_token)
    database: str = _field("var/edge-a.sqlite3", _text())
    trusted_proxies: tuple[str, ...] = _field((), _comma_list(_cidr))
    max_lag: float = _field(30.0, _POSITIVE)
    fail_mode: str = _field("open", _choice("open", "closed"))
    stream_mode: str = _field("sse", _choice("sse", "long-poll"))
    ping_interval: float = _field(15.0, _POSITIVE)
    access_log: str = _field("off", _choice("off", "buffered", "sampled"))
    access_log_path: str | None = _field(None, _optional)
    access_log_sample: int = _field(100, _number(int, 1))
    origin_max_connections: int = _field(64, _number(int, 1))
    origin_connect_timeout: float = _field(5.0, _POSITIVE)
    origin_response_timeout: float = _field(30.0, _POSITIVE)
    http_timeout: float = _field(60.0, _POSITIVE)
    tls_ca: str | None = _field(None, _optional)
    tls_cert: str | None = _field(None, _optional)
    tls_key: str | None = _field(None, _optional)


@attrs.frozen(kw_only=True)
class GateSettings:
    """``[gate]``: which paths need a JWT and how JWTs are verified.

    Attributes:
        protect: path globs that require a JWT; empty means no path does.
        jwt_algorithms: accepted ``alg`` values (``none`` is never accepted).
        jwt_secret: the HS* key, resolved; never shown in ``repr``.
        jwks_file: path of a JWKS file for RS*/PS*/ES*/EdDSA.
        issuer: required ``iss``, if set.
        audience: required ``aud``, if set.
        leeway: seconds of clock skew allowed for ``exp``, ``nbf`` and ``iat``.
    """

    protect: tuple[str, ...] = _field((), _comma_list(_GLOB))
    jwt_algorithms: tuple[str, ...] = _field(("HS256",), _comma_list(_ALGORITHM, at_least_one=True))
    jwt_secret: str | None = _secret_field()
    jwks_file: str | None = _field(None, _optional)
    issuer: str | None = _field(None, _optional)
    audience: str | None = _field(None, _optional)
    leeway: float = _field(30.0, _NON_NEGATIVE)


@attrs.frozen(kw_only=True)
class FailureSettings:
    """``[failures]``: the failure pattern that bans a client locally.

    Attributes:
        threshold: failures within ``window`` that trigger a ban.
        window: the sliding window in seconds.
        ban_for: how long a local ban lasts, in seconds.
        count_statuses: origin statuses counted as failures (gate 401s always count).
        ipv6_prefix: IPv6 clients are counted and banned by this prefix length.
        share_local_bans: whether local bans are reported to the master.
    """

    threshold: int = _field(5, _number(int, 1))
    window: float = _field(60.0, _POSITIVE)
    ban_for: float = _field(600.0, _POSITIVE)
    count_statuses: tuple[int, ...] = _field((401,), _comma_list(_number(int, 100, 599)))
    ipv6_prefix: int = _field(64, _number(int, 1, 128))
    share_local_bans: bool = _field(False, _bool)


@attrs.frozen(kw_only=True)
class CacheSettings:
    """``[cache]``: the edge's response cache.

    Attributes:
        enabled: whether responses are cached at all.
        max_entries: most cached responses.
        max_bytes: most bytes of cached bodies in total.
        max_object_bytes: largest body that is cached.
        tag_header: the origin response header that carries cache tags.
        strip_tag_header: whether that header is removed before responding to clients.
        max_refreshes: background refreshes running at once.
    """

    enabled: bool = _field(True, _bool)
    max_entries: int = _field(10000, _number(int, 1))
    max_bytes: int = _field(268_435_456, _number(int, 1))
    max_object_bytes: int = _field(8 * 1024 * 1024, _number(int, 1))
    tag_header: str = _field("X-Cache-Tags", _text(_HEADER, "an HTTP header name"))
    strip_tag_header: bool = _field(True, _bool)
    max_refreshes: int = _field(8, _number(int, 1))


@attrs.frozen(kw_only=True)
class TTLSettings:
    """``[ttl]`` and ``[ttl.<rule>]``: the TTL pipeline of PROTOCOL.md §7.

    Attributes:
        rules: rule names, applied in this order.
        max_ttl: upper clamp of the resulting TTL, in seconds.
        params: the raw keys of each ``[ttl.<rule>]`` section, by rule name; each rule parses its
            own.
    """

    rules: tuple[str, ...] = _field(
        ("by_frequency", "by_time"), _comma_list(_text(_RULE, "a rule name like by_time"))
    )
    max_ttl: float = _field(86400.0, _NON_NEGATIVE)
    params: Mapping[str, Mapping[str, str]] = attrs.field(
        factory=lambda: MappingProxyType({}), hash=False
    )


@attrs.frozen(kw_only=True)
class LoggingSettings:
    """``[logging]``: the format of the process log (both roles).

    Attributes:
        format: ``text`` (twistd's lines) or ``json`` (one JSON object a line); the twistd
            option ``--json-logs`` selects ``json`` too.
    """

    format: str = _field("text", _choice("text", "json"))


@attrs.frozen(kw_only=True)
class Settings:
    """All settings of one ini file; each attribute but ``path`` is the section of its name.

    Attributes:
        path: the ini file read, or None for defaults only.
        tokens: ``[tokens]``, in file order.
    """

    path: str | None = None
    master: MasterSettings = attrs.field(factory=MasterSettings)
    tokens: tuple[TokenEntry, ...] = ()
    edge: EdgeSettings = attrs.field(factory=EdgeSettings)
    gate: GateSettings = attrs.field(factory=GateSettings)
    failures: FailureSettings = attrs.field(factory=FailureSettings)
    cache: CacheSettings = attrs.field(factory=CacheSettings)
    ttl: TTLSettings = attrs.field(factory=TTLSettings)
    logging: LoggingSettings = attrs.field(factory=LoggingSettings)


_SECTIONS: dict[str, type[Any]] = {
    name: type(getattr(Settings(), name))
    for name in ("master", "edge", "gate", "failures", "cache", "ttl", "logging")
}


# --- secrets --------------------------------------------------------------------------------------


def _resolve(spec: str, *, allow_digest: bool, environ: Mapping[str, str]) -> str | bytes:
    kind, sep, rest = spec.partition(":")
    forms = "env:NAME, file:PATH" + (" or sha256:HEX" if allow_digest else "")
    if not sep or kind not in ("env", "file", "sha256") or (kind == "sha256" and not allow_digest):
        raise _BadValueError(f"a secret must be given as {forms}; literal secrets are not allowed")
    if kind == "sha256":
        if not _HEX64.match(rest):
            raise _BadValueError(f"sha256: needs 64 hex digits, got {len(rest)} characters")
        return bytes.fromhex(rest)
    if kind == "env":
        if rest not in environ:
            raise _BadValueError(f"environment variable {rest!r} is not set")
        value = environ[rest]
        if not value:
            raise _BadValueError(f"environment variable {rest!r} is empty")
        return value
    try:
        with open(rest, encoding="utf-8") as stream:
            value = stream.read().rstrip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise _BadValueError(f"cannot read secret file {rest!r}: {why}") from None
    if not value:
        raise _BadValueError(f"secret file {rest!r} is empty")
    return value


def resolve_secret(
    spec: str, *, allow_digest: bool, environ: Mapping[str, str] | None = None
) -> str | bytes:
    """Resolve a secret reference without ever putting the secret in an error.

    Args:
        spec: ``env:NAME`` (the variable's value), ``file:PATH`` (the file's text without
            trailing whitespace) or, if ``allow_digest``, ``sha256:HEX``.
        allow_digest: whether ``sha256:HEX`` is accepted (only for tokens the master checks).
        environ: the environment to read; defaults to :data:`os.environ`.

    Returns:
        The secret as ``str``, or the 32-byte digest as ``bytes`` for ``sha256:``.

    Raises:
        ConfigError: the reference is malformed, or the variable or file is missing or empty.
    """
    env = os.environ if environ is None else environ
    try:
        return _resolve(spec, allow_digest=allow_digest, environ=env)
    except _BadValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_secret_form(spec: str, *, allow_digest: bool) -> None:
    """Check the form of a secret reference of the other role without reading the secret."""
    kind, sep, _ = spec.partition(":")
    kinds = ("env", "file", "sha256") if allow_digest else ("env", "file")
    if not sep or kind not in kinds:
        forms = "env:NAME, file:PATH" + (" or sha256:HEX" if allow_digest else "")
        raise _BadValueError(f"a secret must be given as {forms}; literal secrets are not allowed")


def _token_entry(name: str, value: str, environ: Mapping[str, str]) -> TokenEntry:
    parts = value.split(None, 1)
    if len(parts) != 2:
        raise _BadValueError("expected '<role> <secret>', e.g. 'operator env:OPS_TOKEN'")
    role, spec = parts
    if role not in TOKEN_ROLES:
        raise _BadValueError(f"the role must be one of {', '.join(TOKEN_ROLES)}")
    secret = _resolve(spec, allow_digest=True, environ=environ)
    if isinstance(secret, str):
        secret = hashlib.sha256(_check_token(secret).encode("utf-8")).digest()
    return TokenEntry(name=name, role=role, digest=secret)


# --- loading --------------------------------------------------------------------------------------

_Raw = dict[str, dict[str, tuple[str, str]]]  # section -> key -> (raw value, file it came from)
_T = TypeVar("_T", bound=attrs.AttrsInstance)


def _read_file(path: str, raw: _Raw) -> None:
    parser = configparser.ConfigParser(
        delimiters=("=",), inline_comment_prefixes=(";", "#"), interpolation=None, strict=True
    )
    try:
        with open(path, encoding="utf-8") as stream:
            parser.read_file(stream, source=path)
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration: {exc.strerror}", file=path) from None
    except UnicodeDecodeError:
        raise ConfigError("the configuration is not UTF-8 text", file=path) from None
    except configparser.DuplicateSectionError as exc:
        raise ConfigError("duplicate section", file=path, section=exc.section) from None
    except configparser.DuplicateOptionError as exc:
        raise ConfigError("duplicate key", file=path, section=exc.section, key=exc.option) from None
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(f"line {exc.lineno}: a key before any [section]", file=path) from None
    except configparser.ParsingError as exc:
        lines = ", ".join(str(lineno) for lineno, _ in exc.errors)
        raise ConfigError(f"cannot parse line(s) {lines}", file=path) from None
    if parser.defaults():
        raise ConfigError("unknown section", file=path, section=parser.default_section)
    for section in parser.sections():
        raw[section] = {key: (value, path) for key, value in parser.items(section, raw=True)}


def _build(
    cls: type[_T],
    section: str,
    values: Mapping[str, tuple[str, str]],
    environ: Mapping[str, str],
    resolve: bool = True,
    **extra: Any,
) -> _T:
    fields = attrs.fields_dict(cls)
    kwargs: dict[str, Any] = dict(extra)
    for key, (text, source) in values.items():
        field = fields.get(key)
        if field is None or not ({"parse", "secret"} & field.metadata.keys()):
            raise ConfigError("unknown key", file=source, section=section, key=key)
        try:
            if "parse" in field.metadata:
                kwargs[key] = field.metadata["parse"](text)
            elif text and not resolve:
                _check_secret_form(text, allow_digest=False)
                kwargs[key] = None
            elif text:
                secret = _resolve(text, allow_digest=False, environ=environ)
                kwargs[key] = field.metadata["secret"](secret)
            else:
                kwargs[key] = None
        except _BadValueError as exc:
            raise ConfigError(str(exc), file=source, section=section, key=key) from None
    return cls(**kwargs)


def _source(raw: _Raw, section: str, key: str | None, default: str | None) -> str | None:
    """The file a key (or, with key None, a section's first key) came from."""
    values = raw.get(section, {})
    found = values.get(key) if key is not None else next(iter(values.values()), None)
    return default if found is None else found[1]


def _fail(why: str, section: str, key: str, raw: _Raw, default_file: str | None) -> ConfigError:
    return ConfigError(why, file=_source(raw, section, key, default_file), section=section, key=key)


def load_settings(
    path: str | None,
    overrides: Mapping[tuple[str, str], str] | None = None,
    environ: Mapping[str, str] | None = None,
    role: str | None = None,
) -> Settings:
    """Read and validate the configuration.

    Args:
        path: the ini file; None gives the defaults of PROTOCOL.md §8 (plus overrides). Relative
            paths inside the file are relative to the process's working directory.
        overrides: raw values by ``(section, key)``, e.g. from twistd options such as ``--listen``;
            they replace the file's values and are validated the same way.
        environ: the environment for ``env:`` secrets; defaults to :data:`os.environ`.
        role: ``master`` or ``edge`` to resolve only that role's secrets (one ini file may serve
            both roles on hosts that hold only their own secrets); the other role's secret
            references are checked for form only. None resolves every secret.

    Returns:
        The settings, all frozen.

    Raises:
        ConfigError: anything invalid, naming the file, section and key on one line.
    """
    env = os.environ if environ is None else environ
    raw: _Raw = {}
    if path is not None:
        _read_file(path, raw)
    for (section, key), text in (overrides or {}).items():
        raw.setdefault(section, {})[key] = (text.strip(), COMMAND_LINE)

    params: dict[str, Mapping[str, str]] = {}
    for section, values in raw.items():
        source = _source(raw, section, None, path or COMMAND_LINE)
        if section.startswith("ttl."):
            if not _RULE.match(section[4:]):
                raise ConfigError("bad rule name in section", file=source, section=section)
            params[section[4:]] = MappingProxyType({k: v for k, (v, _) in values.items()})
        elif section not in _SECTIONS and section != "tokens":
            known = ", ".join([*_SECTIONS, "tokens", "ttl.<rule>"])
            raise ConfigError(f"unknown section (known: {known})", file=source, section=section)

    if role not in (None, "master", "edge"):
        raise ValueError(f"unknown role {role!r}")
    tokens = []
    seen: dict[bytes, str] = {}
    for name, (text, source) in raw.get("tokens", {}).items():
        try:
            if role == "edge":
                parts = text.split(None, 1)
                if len(parts) != 2 or parts[0] not in TOKEN_ROLES:
                    raise _BadValueError("expected '<role> <secret>', e.g. 'operator env:OPS'")
                _check_secret_form(parts[1], allow_digest=True)
                continue
            entry = _token_entry(name, text, env)
        except _BadValueError as exc:
            raise ConfigError(str(exc), file=source, section="tokens", key=name) from None
        if entry.digest in seen:
            why = f"the same token as {seen[entry.digest]!r}; give each name its own token"
            raise ConfigError(why, file=source, section="tokens", key=name)
        seen[entry.digest] = name
        tokens.append(entry)

    built = {
        section: _build(cls, section, raw.get(section, {}), env, resolve=role != "master")
        for section, cls in _SECTIONS.items()
        if section != "ttl"
    }
    ttl = _build(TTLSettings, "ttl", raw.get("ttl", {}), env, params=MappingProxyType(params))
    settings = Settings(path=path, tokens=tuple(tokens), ttl=ttl, **built)
    _cross_check(settings, raw)
    _check_tls_files(settings, raw, role)
    return settings


def _check_tls_files(settings: Settings, raw: _Raw, role: str | None) -> None:
    """Read the certificate files of the role being loaded (the other role's may be absent)."""
    from edgeauth import tls

    checks: list[tuple[str, str, str | None, Callable[[str], object]]] = []
    if role in (None, "master"):
        checks.append(("master", "tls_client_ca", settings.master.tls_client_ca, tls.load_cas))
    if role in (None, "edge"):
        edge = settings.edge
        checks.append(("edge", "tls_ca", edge.tls_ca, tls.load_cas))
        if edge.tls_cert is not None:
            key_path = edge.tls_key
            checks.append(
                ("edge", "tls_cert", edge.tls_cert, lambda p: tls.load_private(p, key_path))
            )
    for section, name, value, load in checks:
        if value is None:
            continue
        try:
            load(value)
        except tls.TLSFileError as exc:
            raise _fail(str(exc), section, name, raw, settings.path) from None


def _cross_check(settings: Settings, raw: _Raw) -> None:
    """Checks that involve more than one key."""
    master, edge = settings.master, settings.edge
    if master.tls_client_ca is None:
        for key, value in (
            ("tls_client_required", master.tls_client_required),
            ("tls_client_roles", master.tls_client_roles),
        ):
            if value:
                why = "needs tls_client_ca (the CA file of the client certificates)"
                raise _fail(why, "master", key, raw, settings.path)
    elif not master.listen.startswith("ssl:"):
        why = f"needs an ssl: listener to verify client certificates, listen is {master.listen!r}"
        raise _fail(why, "master", "tls_client_ca", raw, settings.path)
    if edge.tls_key is not None and edge.tls_cert is None:
        why = "needs tls_cert (the certificate of this key)"
        raise _fail(why, "edge", "tls_key", raw, settings.path)
    gate, cache = settings.gate, settings.cache
    if gate.protect:
        given = bool(raw.get("gate", {}).get("jwt_secret", ("", ""))[0])
        if any(a.startswith("HS") for a in gate.jwt_algorithms) and not given:
            why = "required (env:NAME or file:PATH) when protect is set and HS* is allowed"
            raise _fail(why, "gate", "jwt_secret", raw, settings.path)
        if any(not a.startswith("HS") for a in gate.jwt_algorithms) and gate.jwks_file is None:
            why = "required when protect is set and a public-key algorithm is used"
            raise _fail(why, "gate", "jwks_file", raw, settings.path)
    for section, role in (("master", master), ("edge", edge)):
        if role.access_log in ("buffered", "sampled") and not role.access_log_path:
            why = f"required when access_log = {role.access_log}"
            raise _fail(why, section, "access_log_path", raw, settings.path)
    if cache.max_object_bytes > cache.max_bytes:
        why = f"must not exceed max_bytes ({cache.max_bytes}), got {cache.max_object_bytes}"
        raise _fail(why, "cache", "max_object_bytes", raw, settings.path)
    for rule in settings.ttl.params:
        if rule not in settings.ttl.rules:
            why = f"rule {rule!r} is not listed in [ttl] rules (a typo?)"
            section = f"ttl.{rule}"
            raise ConfigError(why, file=_source(raw, section, None, settings.path), section=section)
