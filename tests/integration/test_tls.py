"""TLS and mTLS between edges and the master, with a throwaway CA made at test time.

Everything listens on 127.0.0.1 port 0 and talks real TLS (pyOpenSSL through Twisted); the
certificates come from :class:`Pki`, built with ``cryptography`` in ``tmp_path`` for each test.
Nothing of the network path is mocked.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import (
    EDGE_TOKEN,
    OPERATOR_TOKEN,
    Client,
    Origin,
    RunningEdge,
    RunningMaster,
    start_edge,
    start_master,
    wait_until,
)
from twisted.internet import reactor
from twisted.internet.ssl import trustRootFromCertificates
from twisted.web.client import Agent

from edgeauth import tls
from edgeauth.config import ConfigError, load_settings

# --- a throwaway PKI -----------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@attrs.define
class Issued:
    """A certificate and its key, written as PEM files."""

    cert: Path
    key: Path


class CA:
    """A self-signed CA that issues server and client certificates into ``directory``."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} test CA"))
            .issuer_name(_name(f"{name} test CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / f"{name}-ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        cn: str,
        *,
        ips: tuple[str, ...] = (),
        dns: tuple[str, ...] = (),
        client: bool = False,
    ) -> Issued:
        """Issue a leaf certificate: a server one (SANs) or, with ``client``, a client one."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
        names += [x509.DNSName(d) for d in dns]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        stem = f"{self.name}-{cn}-{'client' if client else 'server'}"
        issued = Issued(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return issued


@attrs.define
class Pki:
    """The test CA, a rogue CA and the certificates the tests use."""

    ca: CA
    rogue: CA
    master: Issued
    master_wrong_ip: Issued
    master_by_rogue: Issued
    edge_server: Issued
    edge_a: Issued
    ops: Issued
    stranger: Issued
    edge_a_by_rogue: Issued


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    ca, rogue = CA(directory, "test"), CA(directory, "rogue")
    return Pki(
        ca=ca,
        rogue=rogue,
        master=ca.issue("master", ips=("127.0.0.1",), dns=("localhost",)),
        master_wrong_ip=ca.issue("elsewhere", ips=("127.0.0.2",)),
        master_by_rogue=rogue.issue("master", ips=("127.0.0.1",)),
        edge_server=ca.issue("edge", ips=("127.0.0.1",)),
        edge_a=ca.issue("edge-a", client=True),
        ops=ca.issue("ops", client=True),
        stranger=ca.issue("stranger", client=True),
        edge_a_by_rogue=rogue.issue("edge-a", client=True),
    )


def ssl_listen(issued: Issued) -> str:
    """An ``ssl:`` endpoint string on 127.0.0.1, port 0, for ``issued``."""
    return f"ssl:0:interface=127.0.0.1:privateKey={issued.key}:certKey={issued.cert}"


# --- clients and helpers -----------------------------------------------------------------------


def tls_client(base_url: str, pki: Pki, cert: Issued | None = None) -> Client:
    """A :class:`Client` that trusts the test CA only and presents ``cert`` if given."""
    client = Client(base_url)
    private = tls.load_private(str(cert.cert), str(cert.key)) if cert is not None else None
    trust = trustRootFromCertificates(tls.load_cas(str(pki.ca.path)))
    policy = tls.MasterTLSPolicy(trust, private)
    client.agent = Agent(reactor, contextFactory=policy, pool=client.pool)
    client.http = treq.client.HTTPClient(client.agent)
    return client


def https_url(master: RunningMaster) -> str:
    return f"https://127.0.0.1:{master.port}"


@asynccontextmanager
async def running(tmp_path: Path, **master: Any) -> AsyncIterator[tuple[AsyncExitStack, Any]]:
    """A master (``[master]`` keys), an origin and an exit stack closing what a test opens."""
    async with AsyncExitStack() as stack:
        origin = Origin()
        await origin.start()
        stack.push_async_callback(origin.stop)
        running_master = await start_master(tmp_path, **master)
        stack.push_async_callback(running_master.stop)
        yield stack, (running_master, origin)


async def edge(
    stack: AsyncExitStack,
    tmp_path: Path,
    name: str,
    master: RunningMaster,
    origin: Origin,
    *,
    synced: bool,
    **keys: Any,
) -> RunningEdge:
    """Start an edge following ``master`` over https with ``[edge]`` ``keys``."""
    started = await start_edge(
        tmp_path, name, https_url(master), origin.url, synced=synced, edge=keys
    )
    stack.push_async_callback(started.stop)
    return started


async def cert_edge(
    stack: AsyncExitStack,
    tmp_path: Path,
    master: RunningMaster,
    origin: Origin,
    pki: Pki,
    issued: Issued,
    *,
    synced: bool,
) -> RunningEdge:
    """Start ``edge-a`` with no token: the client certificate ``issued`` is its only credential."""
    return await edge(
        stack,
        tmp_path,
        "edge-a",
        master,
        origin,
        synced=synced,
        token="",
        tls_ca=pki.ca.path,
        tls_cert=issued.cert,
        tls_key=issued.key,
    )


def stacked_client(
    stack: AsyncExitStack, base_url: str, pki: Pki, cert: Issued | None = None
) -> Client:
    """A :func:`tls_client` that ``stack`` closes."""
    client = tls_client(base_url, pki, cert)
    stack.push_async_callback(client.close)
    return client


async def admin_get(edge: RunningEdge, path: str) -> tuple[int, Any]:
    admin = Client(edge.admin_url)
    try:
        reply = await admin.get(path, token=None)
    finally:
        await admin.close()
    return reply.code, reply.json()


async def refused_and_not_ready(edge: RunningEdge, what: str) -> dict[str, Any]:
    """Wait until the edge failed to reach the master; it must never sync and must be unready."""
    subscriber = edge.service.subscriber
    await wait_until(lambda: subscriber.status.last_error, f"{what}: a failed attempt", 10)
    assert not edge.service.state.synced, what
    assert not subscriber.first_sync.called, what
    code, doc = await admin_get(edge, "/readyz")
    assert code == 503, (what, doc)
    assert doc["reason"] == "not_synced", (what, doc)
    status: dict[str, Any] = doc
    return status


def fleet_ids(master: RunningMaster) -> set[str]:
    return {m["edge_id"] for m in master.service.fanout.fleet_view() if m["connected"]}


# --- plain TLS -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_master_and_edge_listen_on_ssl_endpoints(tmp_path: Path, pki: Pki) -> None:
    """An ssl: master and an ssl: edge: the edge verifies the master by the test CA and syncs."""
    async with running(tmp_path, listen=ssl_listen(pki.master)) as (stack, (master, origin)):
        ops = stacked_client(stack, https_url(master), pki)
        assert (await ops.get("/healthz", token=None)).code == 200
        started = await edge(
            stack,
            tmp_path,
            "edge-a",
            master,
            origin,
            synced=True,
            listen=ssl_listen(pki.edge_server),
            tls_ca=pki.ca.path,
        )
        assert (await admin_get(started, "/readyz"))[0] == 200
        proxy_url = f"https://127.0.0.1:{started.service.port.getHost().port}"
        visitor = stacked_client(stack, proxy_url, pki)
        reply = await visitor.get("/hello", token=None)
        assert reply.code == 200 and reply.body == b"origin says hello /hello", reply.body

        ban = await ops.post("/ban/ip", {"ip": "127.0.0.1", "reason": "tls test"})
        assert ban.code == 201, ban.body
        seq = ban.json()["event"]["seq"]

        async def refused() -> bool:
            answer = await visitor.get("/hello", token=None)
            return answer.code == 403 and answer.json().get("ref") == seq

        await wait_until(refused, "the ban to reach the ssl: edge")
        assert fleet_ids(master) == {"edge-a"}


@pytest.mark.parametrize(
    ("certificate", "why"),
    [
        ("master_by_rogue", "signed by a CA the edge does not trust"),
        ("master_wrong_ip", "issued for 127.0.0.2, not the 127.0.0.1 of the URL"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_edge_refuses_a_master_it_cannot_verify(
    tmp_path: Path, pki: Pki, certificate: str, why: str
) -> None:
    """service_identity and the tls_ca file decide: a wrong master certificate is never used."""
    listen = ssl_listen(getattr(pki, certificate))
    async with running(tmp_path, listen=listen) as (stack, (master, origin)):
        started = await edge(
            stack, tmp_path, "edge-a", master, origin, synced=False, tls_ca=pki.ca.path
        )
        await refused_and_not_ready(started, why)
        assert fleet_ids(master) == set(), why


@pytest_twisted.ensureDeferred
async def test_tls_ca_replaces_the_system_store(tmp_path: Path, pki: Pki) -> None:
    """Without tls_ca the system store is used, which does not know the test CA: refused."""
    async with running(tmp_path, listen=ssl_listen(pki.master)) as (stack, (master, origin)):
        started = await edge(stack, tmp_path, "edge-a", master, origin, synced=False)
        await refused_and_not_ready(started, "a private CA without tls_ca")


# --- mTLS --------------------------------------------------------------------------------------

MTLS_ROLES = "CN=edge-a:edge, CN=edge-b:edge, CN=ops:operator"


def mtls_master(pki: Pki, required: bool) -> dict[str, Any]:
    return {
        "listen": ssl_listen(pki.master),
        "tls_client_ca": pki.ca.path,
        "tls_client_required": "true" if required else "false",
        "tls_client_roles": MTLS_ROLES,
    }


@pytest_twisted.ensureDeferred
async def test_mtls_edge_with_the_right_certificate_syncs_without_a_token(
    tmp_path: Path, pki: Pki
) -> None:
    """A mapped client certificate is the edge's credential; writes by the ops certificate."""
    async with running(tmp_path, **mtls_master(pki, required=True)) as (stack, (master, origin)):
        started = await cert_edge(stack, tmp_path, master, origin, pki, pki.edge_a, synced=True)
        assert started.service.settings.edge.token is None
        assert (await admin_get(started, "/readyz"))[0] == 200

        ops = stacked_client(stack, https_url(master), pki, pki.ops)
        ban = await ops.post("/ban/ip", {"ip": "203.0.113.7", "reason": "mtls"}, token=None)
        assert ban.code == 201, ban.body
        event = ban.json()["event"]
        assert event["source"] == "operator:CN=ops"

        def applied() -> bool:
            return bool(started.service.state.offset >= event["seq"])

        await wait_until(applied, "the edge to apply the ban over mTLS")
        code, explained = await admin_get(started, "/explain?ip=203.0.113.7")
        assert code == 200 and "203.0.113.7/32" in str(explained), explained
        assert fleet_ids(master) == {"edge-a"}

        # The edge's certificate has the edge role: it may read, never unban.
        as_edge = stacked_client(stack, https_url(master), pki, pki.edge_a)
        assert (await as_edge.get("/v1/snapshot", token=None)).code == 200
        refused = await as_edge.post("/unban/ip", {"ip": "203.0.113.7"}, token=None)
        assert refused.code == 403 and refused.json()["error"] == "forbidden", refused.body
        # A bearer token, when sent, is what counts, even over a mapped certificate.
        bad = await as_edge.get("/v1/snapshot", token="not-a-configured-token")
        assert bad.code == 401, bad.body


@pytest.mark.parametrize(
    ("cert", "why"),
    [
        (None, "no client certificate"),
        ("edge_a_by_rogue", "a client certificate from another CA"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_mtls_required_refuses_the_handshake(
    tmp_path: Path, pki: Pki, cert: str | None, why: str
) -> None:
    """With tls_client_required, no (or a foreign) certificate never gets an HTTP answer."""
    async with running(tmp_path, **mtls_master(pki, required=True)) as (stack, (master, origin)):
        keys: dict[str, Any] = {"tls_ca": pki.ca.path}
        if cert is not None:
            issued: Issued = getattr(pki, cert)
            keys.update(tls_cert=issued.cert, tls_key=issued.key)
        # Even with the right edge token: the TLS layer refuses before any token is read.
        started = await edge(stack, tmp_path, "edge-a", master, origin, synced=False, **keys)
        await refused_and_not_ready(started, why)
        assert fleet_ids(master) == set(), why

        direct = stacked_client(stack, https_url(master), pki, getattr(pki, cert) if cert else None)
        with pytest.raises(Exception) as info:  # noqa: B017 - TLS errors come in several types
            await direct.get("/v1/snapshot", token=EDGE_TOKEN)
        assert "SSL" in repr(info.value) or "ssl" in repr(info.value), info.value


@pytest_twisted.ensureDeferred
async def test_mtls_certificate_without_a_role_is_forbidden(tmp_path: Path, pki: Pki) -> None:
    """A certificate of the right CA whose CN has no role gets 403; the edge is not ready."""
    async with running(tmp_path, **mtls_master(pki, required=True)) as (stack, (master, origin)):
        started = await cert_edge(stack, tmp_path, master, origin, pki, pki.stranger, synced=False)
        await refused_and_not_ready(started, "an unmapped certificate")
        assert "403" in str(started.service.subscriber.status.last_error)

        stranger = stacked_client(stack, https_url(master), pki, pki.stranger)
        reply = await stranger.get("/v1/snapshot", token=None)
        assert reply.code == 403 and "CN=stranger" in reply.json()["detail"], reply.body


@pytest_twisted.ensureDeferred
async def test_mtls_optional_keeps_tokens_working(tmp_path: Path, pki: Pki) -> None:
    """tls_client_required = false: token clients without certificates work, others get 401."""
    async with running(tmp_path, **mtls_master(pki, required=False)) as (stack, (master, origin)):
        anonymous = stacked_client(stack, https_url(master), pki)
        assert (await anonymous.get("/bans", token=None)).code == 401
        assert (await anonymous.get("/bans", token=OPERATOR_TOKEN)).code == 200

        token_edge = await edge(
            stack, tmp_path, "edge-b", master, origin, synced=True, tls_ca=pki.ca.path
        )
        by_cert = await cert_edge(stack, tmp_path, master, origin, pki, pki.edge_a, synced=True)
        for started in (token_edge, by_cert):
            assert (await admin_get(started, "/readyz"))[0] == 200
        await wait_until(lambda: fleet_ids(master) == {"edge-a", "edge-b"}, "both edges listed")

        foreign = stacked_client(stack, https_url(master), pki, pki.edge_a_by_rogue)
        with pytest.raises(Exception):  # noqa: B017 - an invalid certificate fails the handshake
            await foreign.get("/bans", token=OPERATOR_TOKEN)


# --- configuration ---------------------------------------------------------------------------


def _ini(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tls.ini"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("section", "key", "text", "why"),
    [
        (
            "master",
            "tls_client_roles",
            "[master]\ntls_client_roles = CN=a:edge\n",
            "needs tls_client_ca",
        ),
        (
            "master",
            "tls_client_required",
            "[master]\ntls_client_required = true\n",
            "needs tls_client_ca",
        ),
        (
            "master",
            "tls_client_ca",
            "[master]\nlisten = tcp:0\ntls_client_ca = {ca}\n",
            "needs an ssl: listener",
        ),
        (
            "master",
            "tls_client_roles",
            "[master]\nlisten = {ssl}\ntls_client_ca = {ca}\ntls_client_roles = CN=a:root\n",
            "the role must be one of",
        ),
        (
            "master",
            "tls_client_roles",
            "[master]\nlisten = {ssl}\ntls_client_ca = {ca}\ntls_client_roles = O=x:edge\n",
            "expected 'CN=<common name>:<role>'",
        ),
        (
            "master",
            "tls_client_ca",
            "[master]\nlisten = {ssl}\ntls_client_ca = {missing}\n",
            "cannot read",
        ),
        ("edge", "tls_ca", "[edge]\ntls_ca = {key}\n", "holds no PEM certificate"),
        ("edge", "tls_cert", "[edge]\ntls_cert = {cert}\n", "holds no PEM private key"),
        (
            "edge",
            "tls_cert",
            "[edge]\ntls_cert = {cert}\ntls_key = {other_key}\n",
            "does not match",
        ),
        ("edge", "tls_key", "[edge]\ntls_key = {key}\n", "needs tls_cert"),
    ],
)
def test_bad_tls_configuration_names_file_section_and_key(
    tmp_path: Path, pki: Pki, section: str, key: str, text: str, why: str
) -> None:
    values = {
        "ca": pki.ca.path,
        "ssl": ssl_listen(pki.master),
        "missing": tmp_path / "missing.pem",
        "key": pki.edge_a.key,
        "cert": pki.edge_a.cert,
        "other_key": pki.ops.key,
    }
    path = _ini(tmp_path, text.format(**values))
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    error = info.value
    assert (error.file, error.section, error.key) == (path, section, key), str(error)
    assert why in error.why, str(error)
    assert "\n" not in str(error) and "PRIVATE" not in str(error)


def test_certificate_files_of_the_other_role_are_not_read(tmp_path: Path, pki: Pki) -> None:
    """One ini for both roles: a master does not need the edge's key files, nor the reverse."""
    missing = tmp_path / "not-on-this-host.pem"
    path = _ini(
        tmp_path,
        f"[master]\nlisten = {ssl_listen(pki.master)}\ntls_client_ca = {pki.ca.path}\n"
        f"[edge]\ntls_ca = {missing}\ntls_cert = {missing}\n",
    )
    assert load_settings(path, environ={}, role="master").master.tls_client_ca == str(pki.ca.path)
    with pytest.raises(ConfigError, match=r"\[edge\] tls_ca"):
        load_settings(path, environ={}, role="edge")


def test_ssl_description_parsing() -> None:
    parse: Callable[[str], dict[str, str]] = tls.parse_ssl_description
    assert parse("ssl:4443:interface=\\:\\:1:privateKey=/k.pem") == {
        "port": "4443",
        "interface": "::1",
        "privateKey": "/k.pem",
    }
    assert parse("ssl:port=1:backlog=5")["backlog"] == "5"
    for bad in ("tcp:1", "ssl:1:sslmethod=TLSv1_METHOD", "ssl:interface=x", "ssl:1:port=2"):
        with pytest.raises(ValueError):
            parse(bad)
