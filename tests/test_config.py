"""Tests for edgeauth.config: defaults, the example file, overrides, validation errors, secrets."""

from __future__ import annotations

import configparser
import hashlib
from pathlib import Path
from types import MappingProxyType

import attrs
import pytest

from edgeauth.config import (
    COMMAND_LINE,
    ConfigError,
    EdgeSettings,
    MasterSettings,
    Settings,
    TTLSettings,
    load_settings,
    resolve_secret,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "edgeauth.ini"
OPERATOR_SECRET = "op-Secret-0123456789abcdef"
EDGE_SECRET = "edge-Secret-0123456789abcdef"
READER_SECRET = "reader-Secret-0123456789abcdef"
DEMO_ENV = {
    "EDGEAUTH_OPERATOR_TOKEN": OPERATOR_SECRET,
    "EDGEAUTH_EDGE_TOKEN": EDGE_SECRET,
    "EDGEAUTH_READER_TOKEN": READER_SECRET,
}
HEX = "ab" * 32


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "edgeauth.ini"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_without_a_file() -> None:
    """path=None gives the §8 defaults, no tokens and no secrets."""
    settings = load_settings(None, environ={})
    assert settings == Settings()
    assert settings.path is None
    assert settings.tokens == ()
    assert settings.master.listen == "tcp:4000:interface=127.0.0.1"
    assert settings.master.sse_cycle == 60
    assert settings.master.stream_cache == "private"
    assert settings.master.max_body == 65536
    assert settings.edge.masters == ("http://127.0.0.1:4000",)
    assert settings.edge.token is None
    assert settings.edge.trusted_proxies == ()
    assert settings.edge.fail_mode == "open"
    assert settings.edge.stream_mode == "sse"
    assert settings.gate.jwt_algorithms == ("HS256",)
    assert settings.gate.jwt_secret is None
    assert settings.failures.count_statuses == (401,)
    assert settings.failures.share_local_bans is False
    assert settings.cache.max_object_bytes == 8 * 1024 * 1024
    assert settings.ttl.rules == ("by_frequency", "by_time")
    assert dict(settings.ttl.params) == {}


def test_example_file_loads_with_the_demo_environment() -> None:
    """etc/edgeauth.ini loads, has tokens of all three roles and otherwise equals the defaults."""
    settings = load_settings(str(EXAMPLE), environ=DEMO_ENV)
    defaults = Settings()
    assert [(t.name, t.role) for t in settings.tokens] == [
        ("ops", "operator"),
        ("edges", "edge"),
        ("dashboard", "reader"),
    ]
    assert settings.tokens[0].digest == hashlib.sha256(OPERATOR_SECRET.encode()).digest()
    assert settings.edge == attrs.evolve(defaults.edge, token=EDGE_SECRET)
    assert settings.master == defaults.master
    assert settings.gate == defaults.gate
    assert settings.failures == defaults.failures
    assert settings.cache == defaults.cache
    assert settings.ttl == defaults.ttl


def test_example_file_documents_every_key() -> None:
    """Every configurable key of every section appears in etc/edgeauth.ini."""
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    parser.read(EXAMPLE, encoding="utf-8")
    for section, cls in [("master", MasterSettings), ("edge", EdgeSettings), ("ttl", TTLSettings)]:
        keys = {f.name for f in attrs.fields(cls) if f.metadata}
        assert keys == set(parser[section]), section
    for section in ("gate", "failures", "cache"):
        keys = {f.name for f in attrs.fields(type(getattr(Settings(), section))) if f.metadata}
        assert keys == set(parser[section]), section


def test_overrides_replace_file_values_and_are_validated(tmp_path: Path) -> None:
    """Overrides win over the file and go through the same parsing."""
    path = write(tmp_path, "[master]\nlisten = tcp:4000\nmax_batch = 10\n")
    overrides = {("master", "listen"): "tcp:0:interface=127.0.0.1", ("edge", "id"): "edge-b"}
    settings = load_settings(path, overrides, environ={})
    assert settings.master.listen == "tcp:0:interface=127.0.0.1"
    assert settings.master.max_batch == 10
    assert settings.edge.id == "edge-b"
    with pytest.raises(ConfigError) as info:
        load_settings(path, {("master", "listen"): "tcp:notaport"}, environ={})
    assert (info.value.file, info.value.section, info.value.key) == (
        COMMAND_LINE,
        "master",
        "listen",
    )


def test_overrides_without_a_file() -> None:
    """Overrides apply on top of the defaults when there is no file."""
    settings = load_settings(None, {("edge", "masters"): "http://a:1, https://b/x"}, environ={})
    assert settings.edge.masters == ("http://a:1", "https://b/x")


def test_override_in_unknown_section_is_an_error() -> None:
    """An override naming an unknown section is refused like a file section."""
    with pytest.raises(ConfigError, match=r"^<command line>: \[mastr\]: unknown section"):
        load_settings(None, {("mastr", "listen"): "tcp:0"}, environ={})


def test_environ_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without environ, env: secrets come from os.environ."""
    monkeypatch.setenv("EDGEAUTH_TEST_EDGE_TOKEN", EDGE_SECRET)
    settings = load_settings(None, {("edge", "token"): "env:EDGEAUTH_TEST_EDGE_TOKEN"})
    assert settings.edge.token == EDGE_SECRET


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("Yes", True), ("on", True), ("1", True)]
    + [("false", False), ("NO", False), ("off", False), ("0", False)],
)
def test_booleans(text: str, value: bool) -> None:
    """Booleans accept true/false, yes/no, on/off and 1/0 in any case."""
    settings = load_settings(None, {("failures", "share_local_bans"): text}, environ={})
    assert settings.failures.share_local_bans is value


def test_trusted_proxies_are_normalised() -> None:
    """Bare addresses become /32 or /128 and IPv4-mapped networks become IPv4."""
    raw = "10.0.0.1, ::ffff:192.0.2.0/120, 2001:db8::/32, 2001:db8::1"
    settings = load_settings(None, {("edge", "trusted_proxies"): raw}, environ={})
    assert settings.edge.trusted_proxies == (
        "10.0.0.1/32",
        "192.0.2.0/24",
        "2001:db8::/32",
        "2001:db8::1/128",
    )


def test_empty_values_mean_empty_or_none(tmp_path: Path) -> None:
    """Empty list keys give (), empty optional keys give None, even with a trailing comment."""
    path = write(tmp_path, "[edge]\ntrusted_proxies =   ; none\ntoken =\n[gate]\nissuer =\n")
    settings = load_settings(path, environ={})
    assert settings.edge.trusted_proxies == ()
    assert settings.edge.token is None
    assert settings.gate.issuer is None


def test_continuation_lines_in_lists(tmp_path: Path) -> None:
    """A comma-separated list may continue on indented lines."""
    path = write(tmp_path, "[edge]\nmasters = http://a:4000,\n  http://b:4000\n")
    assert load_settings(path, environ={}).edge.masters == ("http://a:4000", "http://b:4000")


def test_endpoint_strings_are_only_parsed_not_listened() -> None:
    """Unix and TCP endpoints are accepted without binding anything."""
    overrides = {("master", "listen"): "unix:/nonexistent/dir/master.sock"}
    assert load_settings(None, overrides, environ={}).master.listen.startswith("unix:")


def test_ttl_rule_sections_become_params(tmp_path: Path) -> None:
    """[ttl.<rule>] keys are kept raw, by rule name, in an immutable mapping."""
    path = write(tmp_path, "[ttl]\nrules = by_time\n[ttl.by_time]\ntimezone = UTC\npeak = 9-17\n")
    ttl = load_settings(path, environ={}).ttl
    assert ttl.rules == ("by_time",)
    assert dict(ttl.params["by_time"]) == {"timezone": "UTC", "peak": "9-17"}
    assert isinstance(ttl.params, MappingProxyType)
    assert hash(load_settings(path, environ={})) == hash(load_settings(path, environ={}))


def test_secret_files_are_read_and_stripped(tmp_path: Path) -> None:
    """file: secrets lose their trailing newline; the edge token and JWT secret resolve alike."""
    (tmp_path / "edge.token").write_text(EDGE_SECRET + "\n", encoding="utf-8")
    (tmp_path / "jwt.key").write_text("jwt secret with spaces\n\n", encoding="utf-8")
    path = write(
        tmp_path,
        f"[edge]\ntoken = file:{tmp_path}/edge.token\n"
        f"[gate]\nprotect = /api/*\njwt_secret = file:{tmp_path}/jwt.key\n",
    )
    settings = load_settings(path, environ={})
    assert settings.edge.token == EDGE_SECRET
    assert settings.gate.jwt_secret == "jwt secret with spaces"
    assert settings.gate.protect == ("/api/*",)


def test_sha256_tokens_keep_the_digest(tmp_path: Path) -> None:
    """A sha256: token is stored as the given digest."""
    path = write(tmp_path, f"[tokens]\nci = reader sha256:{HEX.upper()}\n")
    (entry,) = load_settings(path, environ={}).tokens
    assert (entry.name, entry.role, entry.digest) == ("ci", "reader", bytes.fromhex(HEX))


def test_resolve_secret_forms(tmp_path: Path) -> None:
    """resolve_secret reads env: and file: secrets and decodes sha256: only when allowed."""
    (tmp_path / "s").write_text("from-file\n", encoding="utf-8")
    assert resolve_secret("env:S", allow_digest=False, environ={"S": "x"}) == "x"
    assert resolve_secret(f"file:{tmp_path}/s", allow_digest=False, environ={}) == "from-file"
    assert resolve_secret(f"sha256:{HEX}", allow_digest=True, environ={}) == bytes.fromhex(HEX)
    with pytest.raises(ConfigError, match="literal secrets are not allowed"):
        resolve_secret(f"sha256:{HEX}", allow_digest=False, environ={})


def test_secrets_never_appear_in_repr(tmp_path: Path) -> None:
    """The repr of the settings shows no token, token digest or JWT secret."""
    (tmp_path / "jwt.key").write_text("jwt-SECRET-value\n", encoding="utf-8")
    env = {**DEMO_ENV, "JWT": "jwt-SECRET-value"}
    settings = load_settings(str(EXAMPLE), {("gate", "jwt_secret"): "env:JWT"}, environ=env)
    text = repr(settings)
    for secret in [*DEMO_ENV.values(), "jwt-SECRET-value"]:
        assert secret not in text
    for entry in settings.tokens:
        assert entry.digest.hex() not in text and repr(entry.digest) not in text


BAD_CASES = [
    # (id, ini text, section, key, words the one-line message must contain)
    ("unknown key", "[master]\nlisten_port = 4000\n", "master", "listen_port", "unknown key"),
    ("unknown section", "[mastr]\nlisten = tcp:1\n", "mastr", None, "unknown section"),
    ("DEFAULT section", "[DEFAULT]\nlisten = tcp:1\n", "DEFAULT", None, "unknown section"),
    ("bad int", "[master]\nmax_batch = ten\n", "master", "max_batch", "got 'ten'"),
    ("int too small", "[master]\nmax_batch = 0\n", "master", "max_batch", ">= 1"),
    ("bad float", "[master]\nsse_cycle = abc\n", "master", "sse_cycle", "number > 0, got 'abc'"),
    ("float not finite", "[edge]\nmax_lag = inf\n", "edge", "max_lag", "got 'inf'"),
    ("int out of range", "[failures]\nipv6_prefix = 129\n", "failures", "ipv6_prefix", "128"),
    ("bad status", "[failures]\ncount_statuses = 401, 42\n", "failures", "count_statuses", "42"),
    ("bad bool", "[cache]\nenabled = maybe\n", "cache", "enabled", "got 'maybe'"),
    ("bad enum", "[edge]\nfail_mode = half\n", "edge", "fail_mode", "open, closed"),
    ("bad stream_mode", "[edge]\nstream_mode = ws\n", "edge", "stream_mode", "long-poll"),
    ("bad endpoint", "[edge]\nlisten = tcp:notaport\n", "edge", "listen", "tcp:notaport"),
    ("unknown endpoint", "[master]\nlisten = quic:1\n", "master", "listen", "endpoint"),
    ("port range", "[edge]\nadmin_listen = tcp:70000\n", "edge", "admin_listen", "65535"),
    ("bad URL scheme", "[edge]\norigin = ftp://x\n", "edge", "origin", "http or https"),
    ("URL without host", "[edge]\norigin = http://\n", "edge", "origin", "no host"),
    ("URL with query", "[edge]\nmasters = http://a?x=1\n", "edge", "masters", "query"),
    ("URL fragment", "[edge]\norigin = http://a/#f\n", "edge", "origin", "fragment"),
    ("URL userinfo", "[edge]\nmasters = http://u:p@a\n", "edge", "masters", "user info"),
    ("URL bad port", "[edge]\norigin = http://a:99999\n", "edge", "origin", "URL"),
    ("no masters", "[edge]\nmasters =\n", "edge", "masters", "at least one"),
    ("empty list item", "[edge]\nmasters = http://a,,http://b\n", "edge", "masters", "empty"),
    (
        "CIDR host bits",
        "[edge]\ntrusted_proxies = 10.0.0.1/8\n",
        "edge",
        "trusted_proxies",
        "host bits",
    ),
    ("not a CIDR", "[edge]\ntrusted_proxies = proxy1\n", "edge", "trusted_proxies", "proxy1"),
    ("bad edge id", "[edge]\nid = edge a\n", "edge", "id", "letters"),
    ("empty database", "[master]\ndatabase =\n", "master", "database", "non-empty"),
    ("bad algorithm", "[gate]\njwt_algorithms = none\n", "gate", "jwt_algorithms", "HS256"),
    ("bad glob", "[gate]\nprotect = api/*\n", "gate", "protect", "'/'"),
    ("bad header", "[cache]\ntag_header = X Tags\n", "cache", "tag_header", "header"),
    ("object > cache", "[cache]\nmax_bytes = 10\n", "cache", "max_object_bytes", "max_bytes"),
    ("HS without secret", "[gate]\nprotect = /a\n", "gate", "jwt_secret", "required"),
    (
        "RS without JWKS",
        "[gate]\nprotect = /a\njwt_algorithms = RS256\n",
        "gate",
        "jwks_file",
        "required",
    ),
    (
        "unlisted ttl rule",
        "[ttl]\nrules = by_time\n[ttl.by_frequncy]\nfactor = 2\n",
        "ttl.by_frequncy",
        None,
        "not listed",
    ),
    ("bad ttl rule", "[ttl]\nrules = by-time\n", "ttl", "rules", "rule name"),
    (
        "missing env var",
        "[tokens]\nops = operator env:NO_SUCH_VAR\n",
        "tokens",
        "ops",
        "'NO_SUCH_VAR' is not set",
    ),
    ("empty env var", "[tokens]\nops = operator env:EMPTY\n", "tokens", "ops", "empty"),
    (
        "missing secret file",
        "[tokens]\nops = operator file:/nonexistent/ops.token\n",
        "tokens",
        "ops",
        "/nonexistent/ops.token",
    ),
    (
        "bad role",
        "[tokens]\nops = admin env:EDGEAUTH_OPERATOR_TOKEN\n",
        "tokens",
        "ops",
        "operator, edge, reader",
    ),
    ("no secret", "[tokens]\nops = operator\n", "tokens", "ops", "<role> <secret>"),
    (
        "bare secret literal",
        "[tokens]\nops = operator hunter2-Sekrit\n",
        "tokens",
        "ops",
        "env:NAME, file:PATH or sha256:HEX",
    ),
    (
        "bad sha256 length",
        "[tokens]\nops = operator sha256:abcd\n",
        "tokens",
        "ops",
        "64 hex digits",
    ),
    (
        "duplicate token",
        "[tokens]\na = operator env:EDGEAUTH_OPERATOR_TOKEN\n"
        "b = reader env:EDGEAUTH_OPERATOR_TOKEN\n",
        "tokens",
        "b",
        "same token as 'a'",
    ),
    ("token with spaces", "[tokens]\nops = operator env:SPACED\n", "tokens", "ops", "printable"),
    ("sha256 edge token", f"[edge]\ntoken = sha256:{HEX}\n", "edge", "token", "env:NAME"),
    ("literal edge token", "[edge]\ntoken = hunter2-Sekrit\n", "edge", "token", "literal"),
    ("missing edge token", "[edge]\ntoken = env:NO_SUCH_VAR\n", "edge", "token", "not set"),
    (
        "literal jwt secret",
        "[gate]\njwt_secret = hunter2-Sekrit\n",
        "gate",
        "jwt_secret",
        "literal",
    ),
    (
        "duplicate key",
        "[master]\nlisten = tcp:1\nlisten = tcp:2\n",
        "master",
        "listen",
        "duplicate",
    ),
]


@pytest.mark.parametrize(
    ("text", "section", "key", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_CASES],
)
def test_errors_name_file_section_and_key(
    tmp_path: Path, text: str, section: str, key: str | None, words: str
) -> None:
    """Each invalid input gives one ConfigError line naming file, section and key."""
    path = write(tmp_path, text)
    env = {**DEMO_ENV, "EMPTY": "", "SPACED": "has space"}
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=env)
    err = info.value
    assert (err.file, err.section, err.key) == (path, section, key)
    message = str(err)
    where = f"[{section}] {key}" if key is not None else f"[{section}]"
    assert message.startswith(f"{path}: {where}: "), message
    assert "\n" not in message
    assert words in message
    for secret in ["hunter2", "has space", *DEMO_ENV.values()]:
        assert secret not in message


def test_config_error_is_one_line_without_location() -> None:
    """A ConfigError flattens multi-line reasons and omits missing location parts."""
    err = ConfigError("first\nsecond", file="x.ini")
    assert str(err) == "x.ini: first second"
    assert str(ConfigError("bad", file="x.ini", section="master", key="listen")) == (
        "x.ini: [master] listen: bad"
    )


def test_unreadable_or_malformed_file(tmp_path: Path) -> None:
    """A missing file or a line outside any section is a ConfigError naming the file."""
    missing = str(tmp_path / "missing.ini")
    with pytest.raises(ConfigError, match=r"missing\.ini: cannot read"):
        load_settings(missing, environ={})
    path = write(tmp_path, "listen = tcp:1\n")
    with pytest.raises(ConfigError, match="before any"):
        load_settings(path, environ={})
    path = write(tmp_path, "[master]\nthis line has no equals sign\n")
    with pytest.raises(ConfigError, match="line"):
        load_settings(path, environ={})


def test_empty_secret_file(tmp_path: Path) -> None:
    """An empty secret file is refused, naming the file, section and key."""
    (tmp_path / "empty.token").write_text("\n", encoding="utf-8")
    path = write(tmp_path, f"[tokens]\nops = operator file:{tmp_path}/empty.token\n")
    with pytest.raises(ConfigError, match=r"\[tokens\] ops: secret file .* is empty"):
        load_settings(path, environ={})


def test_master_role_needs_only_master_secrets(tmp_path: Path) -> None:
    """With role="master", the edge's token and JWT secret variables need not exist."""
    ini = tmp_path / "both.ini"
    ini.write_text(
        "[tokens]\nops = operator env:OPS\n[edge]\ntoken = env:EDGE_ONLY\n"
        "[gate]\nprotect = /api/*\njwt_secret = env:JWT_ONLY\n"
    )
    settings = load_settings(str(ini), environ={"OPS": "x" * 20}, role="master")
    assert [t.name for t in settings.tokens] == ["ops"]
    assert settings.edge.token is None
    with pytest.raises(ConfigError, match="EDGE_ONLY|JWT_ONLY"):
        load_settings(str(ini), environ={"OPS": "x" * 20})


def test_edge_role_needs_only_edge_secrets(tmp_path: Path) -> None:
    """With role="edge", [tokens] variables need not exist but their form is still checked."""
    ini = tmp_path / "both.ini"
    ini.write_text("[tokens]\nops = operator env:OPS_ONLY\n[edge]\ntoken = env:EDGE\n")
    settings = load_settings(str(ini), environ={"EDGE": "e" * 20}, role="edge")
    assert settings.tokens == ()
    assert settings.edge.token == "e" * 20
    ini.write_text("[tokens]\nops = operator plaintext\n[edge]\ntoken = env:EDGE\n")
    with pytest.raises(ConfigError, match=r"\[tokens\] ops"):
        load_settings(str(ini), environ={"EDGE": "e" * 20}, role="edge")
