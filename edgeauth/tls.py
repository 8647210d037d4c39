"""TLS for both roles: certificate files, the master's mTLS listener, the edge's HTTPS policy.

Plain ``ssl:`` listeners need nothing from here: ``serverFromString`` builds them (master and
edge ``listen``, edge ``admin_listen``). Twisted's ``ssl:`` endpoint cannot ask clients for a
certificate, so a master with ``[master] tls_client_ca`` gets its listener from
:func:`server_endpoint`: the same ``ssl:`` description, plus ``CertificateOptions`` that verify
client certificates against that CA file (and, with ``tls_client_required``, refuse the handshake
without one). Which role a verified certificate has is decided in :mod:`edgeauth.master.auth`.

An edge talking to ``https://`` masters uses :class:`MasterTLSPolicy`: the master's certificate
is checked against ``[edge] tls_ca`` (not the system store) and its host name or IP address
against the URL, both by Twisted's ``optionsForClientTLS`` (``service_identity``); the edge
presents ``tls_cert`` when it is set.
"""

from __future__ import annotations

import re
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    DiffieHellmanParameters,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.filepath import FilePath
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from edgeauth.config import EdgeSettings, MasterSettings

__all__ = [
    "MasterTLSPolicy",
    "TLSFileError",
    "client_policy",
    "load_cas",
    "load_private",
    "parse_ssl_description",
    "peer_common_name",
    "server_endpoint",
]

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.S)
_SSL_KEYS = frozenset(
    {"port", "interface", "backlog", "privateKey", "certKey", "extraCertChain", "dhParameters"}
)


class TLSFileError(ValueError):
    """A certificate or key file cannot be used; ``str()`` says why, never the key material."""


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as exc:
        raise TLSFileError(f"cannot read {path!r}: {exc.strerror}") from None


def _certificates(path: str, data: bytes) -> list[Certificate]:
    found = _PEM_CERT.findall(data)
    if not found:
        raise TLSFileError(f"{path!r} holds no PEM certificate")
    try:
        return [Certificate.loadPEM(pem) for pem in found]
    except crypto.Error:
        raise TLSFileError(f"{path!r} holds a PEM certificate that cannot be parsed") from None


def load_cas(path: str) -> list[Certificate]:
    """Read every PEM certificate of a CA file (at least one).

    Raises:
        TLSFileError: the file is unreadable or holds no parseable certificate.
    """
    return _certificates(path, _read(path))


def load_private(cert_path: str, key_path: str | None = None) -> PrivateCertificate:
    """Read a certificate and its private key (from ``key_path``, else from ``cert_path``).

    Certificates after the first one in ``cert_path`` are its chain; see :func:`load_chain`.

    Raises:
        TLSFileError: a file is unreadable, or the key is missing or does not match.
    """
    cert_data = _read(cert_path)
    _certificates(cert_path, cert_data)
    first = _PEM_CERT.findall(cert_data)[0]
    key_data = _read(key_path) if key_path is not None else cert_data
    where = key_path if key_path is not None else cert_path
    if b"PRIVATE KEY-----" not in key_data:
        raise TLSFileError(f"{where!r} holds no PEM private key")
    try:
        private: PrivateCertificate = PrivateCertificate.loadPEM(first + b"\n" + key_data)
    except VerifyError:
        why = f"the private key in {where!r} does not match the certificate {cert_path!r}"
        raise TLSFileError(why) from None
    except (crypto.Error, SSL.Error, ValueError):
        raise TLSFileError(f"{where!r} holds no usable PEM private key") from None
    return private


def load_chain(cert_path: str) -> list[Certificate]:
    """Return the certificates after the first one in ``cert_path`` (its chain)."""
    return _certificates(cert_path, _read(cert_path))[1:]


def parse_ssl_description(description: str) -> dict[str, str]:
    """Split an ``ssl:`` server endpoint string into its parameters as ``serverFromString`` does.

    A backslash escapes the next character (an IPv6 ``interface``); the first bare item is the
    port.

    Raises:
        ValueError: not an ``ssl:`` description, or an unknown parameter.
    """
    items: list[str] = []
    current: list[str] = []
    escaped = False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    if items[0] != "ssl":
        raise ValueError(f"client certificates need an ssl: listener, not {description!r}")
    params: dict[str, str] = {}
    for item in items[1:]:
        key, eq, value = item.partition("=")
        if not eq:
            key, value = "port", item
        if key not in _SSL_KEYS or key in params:
            raise ValueError(f"unsupported or repeated ssl: parameter {key!r} with tls_client_ca")
        params[key] = value
    if "port" not in params:
        raise ValueError("the ssl: listener needs a port")
    return params


def server_endpoint(reactor: Any, master: MasterSettings) -> IStreamServerEndpoint:
    """Return the master's listener: ``serverFromString``, or an mTLS ``SSL4ServerEndpoint``.

    With ``tls_client_ca`` the ``ssl:`` description's key, certificate, chain and DH parameters
    are used as Twisted would, and clients are asked for a certificate that must chain to that
    CA file; an invalid certificate always fails the handshake, a missing one only when
    ``tls_client_required``.
    """
    if master.tls_client_ca is None:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, master.listen)
        return endpoint
    params = parse_ssl_description(master.listen)
    key_path = params.get("privateKey", "server.pem")
    private = load_private(params.get("certKey", key_path), key_path)
    chain = load_cas(params["extraCertChain"]) if "extraCertChain" in params else []
    dh = params.get("dhParameters")
    options = CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        extraCertChain=[c.original for c in chain] or None,
        dhParameters=DiffieHellmanParameters.fromFile(FilePath(dh)) if dh else None,
        verify=True,
        caCerts=[c.original for c in load_cas(master.tls_client_ca)],
        requireCertificate=master.tls_client_required,
    )
    return SSL4ServerEndpoint(
        reactor,
        int(params["port"]),
        options,
        backlog=int(params.get("backlog", "50")),
        interface=params.get("interface", ""),
    )


def peer_common_name(transport: object) -> str | None:
    """Return the subject CN of the verified client certificate on ``transport``, if any.

    Only a TLS transport whose handshake verified the certificate (the listener of
    :func:`server_endpoint`) has one; ``""`` means a certificate without a CN.
    """
    if not isinstance(transport, TLSMemoryBIOProtocol):
        return None
    try:
        cert = transport.getPeerCertificate()
    except Exception:  # the handshake is not complete (no request can be here then)
        return None
    if cert is None:
        return None
    from cryptography.x509.oid import NameOID

    # pyOpenSSL's X509 (what Twisted returns today) or already a cryptography certificate.
    subject = (cert.to_cryptography() if hasattr(cert, "to_cryptography") else cert).subject
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


@implementer(IPolicyForHTTPS)
class MasterTLSPolicy:
    """How an edge connects to ``https://`` masters: which CAs, which client certificate.

    The host name (or IP address) of the master URL is checked against the certificate by
    ``optionsForClientTLS`` with ``service_identity``; SNI is sent for names, not addresses.
    """

    def __init__(
        self,
        trust: Any = None,
        client: PrivateCertificate | None = None,
        chain: list[Certificate] | None = None,
    ) -> None:
        """Trust ``trust`` (the system store when None); present ``client`` (and ``chain``).

        ``trust`` is an ``IOpenSSLTrustRoot`` (``trustRootFromCertificates``), an interface
        that ``twisted.internet.ssl`` does not export.
        """
        self.trust = trust
        self.client = client
        self.chain = list(chain or [])

    def creatorForNetloc(  # noqa: N802 - Twisted's interface name
        self, hostname: bytes, port: int
    ) -> IOpenSSLClientConnectionCreator:
        """Return the TLS connection creator for one master."""
        extra: dict[str, Any] = {}
        if self.chain:
            extra["extraCertChain"] = [c.original for c in self.chain]
        creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self.trust if self.trust is not None else platformTrust(),
            clientCertificate=self.client,
            extraCertificateOptions=extra,
        )
        return creator


def client_policy(edge: EdgeSettings) -> MasterTLSPolicy | None:
    """Return the edge's policy for ``https://`` masters, or None for Twisted's default.

    Raises:
        TLSFileError: a configured file cannot be used (also checked when the ini is loaded).
    """
    if edge.tls_ca is None and edge.tls_cert is None:
        return None
    trust: Any = None
    if edge.tls_ca is not None:
        trust = trustRootFromCertificates(load_cas(edge.tls_ca))
    client = chain = None
    if edge.tls_cert is not None:
        client = load_private(edge.tls_cert, edge.tls_key)
        chain = load_chain(edge.tls_cert)
    return MasterTLSPolicy(trust, client, chain)
