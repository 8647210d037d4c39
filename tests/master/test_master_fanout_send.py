"""The fan-out's direct send (``fanout._send_chunk``) on a real master over real sockets.

A plain-TCP reader whose Twisted buffers are empty gets each commit with one ``send`` on its
socket; a partial send or ``EAGAIN`` queues the rest through ``transport.write``; TLS readers
never take that path; a reader gone with a reset costs nothing; a closing transport is left to
Twisted. (That a slow reader is still dropped after its direct sends filled its socket is
checked by test_slow_consumer_is_disconnected in test_master_stream.py.) Where the kernel must
fill up, the master's send buffer for that reader is shrunk to a few kilobytes and the reader
stops reading.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import (
    EDGE_TOKEN,
    Client,
    RawStream,
    RunningMaster,
    SSEReader,
    assert_no_errors_logged,
    captured_log,
    connect_raw,
    counter,
    data_events,
    gauge,
    open_live_sse,
    post_bans,
    sse_request,
    start_master,
    wait_until,
)
from twisted.internet import reactor, tcp
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.web.client import Agent

from edgeauth import tls
from edgeauth.master.fanout import DIRECT_SEND_TRANSPORT, Fanout, Subscriber
from edgeauth.wire.sse import SSEEvent, SSEParser

SMALL_BUFFER = 4096


def test_direct_send_is_available_on_this_twisted() -> None:
    """The feature check found every attribute it needs: the tests below exercise the fast path."""
    assert DIRECT_SEND_TRANSPORT is tcp.Server


class SlowReader(RawStream):
    """A raw SSE client that can stop and resume reading, and decodes what it received."""

    def body(self) -> bytes:
        """The response body, chunked transfer coding removed; every chunk must be complete."""
        head, sep, rest = bytes(self.received).partition(b"\r\n\r\n")
        assert sep, "no complete response head"
        assert b"transfer-encoding: chunked" in head.lower(), head
        body = bytearray()
        while rest:
            size_line, sep, rest = rest.partition(b"\r\n")
            assert sep, f"incomplete chunk size line {size_line!r}"
            size = int(size_line, 16)
            assert size > 0, "the stream ended"
            assert len(rest) >= size + 2, "an incomplete chunk"
            assert rest[size : size + 2] == b"\r\n", "a chunk without its CRLF"
            body += rest[:size]
            rest = rest[size + 2 :]
        return bytes(body)

    def events(self) -> list[SSEEvent]:
        """Every SSE event of the body; the body must end at a frame boundary."""
        body = self.body()
        assert body.endswith(b"\n\n"), "the body ends inside a frame"
        return [i for i in SSEParser().feed(body) if isinstance(i, SSEEvent)]

    def data_frames(self) -> int:
        """How many data frames arrived so far (0 while the bytes end inside a chunk)."""
        try:
            return sum(1 for e in self.events() if e.event == "data")
        except AssertionError:
            return 0


async def live_subscriber(master: RunningMaster, known: set[Subscriber]) -> Subscriber:
    """Wait for one new live subscriber besides ``known`` and return it."""
    fanout = master.service.fanout

    def new() -> list[Subscriber]:
        return [s for s in fanout.subscribers if s not in known and s.live and s.transport]

    await wait_until(lambda: len(new()) == 1, "the new subscriber to be live")
    return new()[0]


def shrink_send_buffer(sub: Subscriber) -> None:
    """Make the server side of ``sub`` hold only a few kilobytes in the kernel."""
    transport: Any = sub.transport
    assert type(transport) is tcp.Server
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)


def counts(fanout: Fanout) -> tuple[int, int, int]:
    return fanout.direct_sends, fanout.partial_sends, fanout.queued_sends


async def post_invalidations(client: Client, count: int, first: int = 0) -> None:
    """Post ``count`` invalidations of about 8 KB each, tagged ``t<first>`` onwards."""
    for i in range(first, first + count):
        keys = [f"/k/{i:04d}/{j:02d}/" + "x" * 380 for j in range(20)]
        reply = await client.post("/invalidate", {"keys": keys, "tags": [f"t{i}"]})
        assert reply.code == 201, reply.body


@pytest_twisted.ensureDeferred
async def test_reader_that_stops_reading_gets_every_frame_whole_and_in_order(
    tmp_path: Path,
) -> None:
    """Frames sent at once, in part and queued behind a full socket arrive whole and in order."""
    master = await start_master(
        tmp_path, max_subscriber_buffer=64 << 20, max_body=100_000, ping_interval=30
    )
    client = Client(master.url)
    reader: SlowReader | None = None
    try:
        with captured_log() as logged:
            fanout = master.service.fanout
            reader = await connect_raw(master, SlowReader(sse_request(EDGE_TOKEN)))
            sub = await live_subscriber(master, set())

            await post_invalidations(client, 3)  # the socket has room: sent whole, at once
            await wait_until(lambda: reader is not None and reader.data_frames() == 3, "3 frames")
            assert counts(fanout) == (3, 0, 0)

            shrink_send_buffer(sub)
            reader.transport.pauseProducing()  # stop reading: both kernel buffers fill up
            await post_invalidations(client, 60, first=3)
            direct, partial, queued = counts(fanout)
            assert partial >= 1, "no send was ever partial or refused"
            assert queued >= 1, "nothing was ever queued behind a full socket"
            assert direct + partial + queued == 63
            assert not sub.closed
            assert len(reader.received) < 63 * 8000

            reader.transport.resumeProducing()
            await wait_until(
                lambda: reader is not None and reader.data_frames() == 63,
                "the backlog to drain",
                timeout=10,
            )
            assert not sub.paused and sub.pending == 0  # Twisted resumed its producer
            await post_invalidations(client, 5, first=63)  # drained: at once again
            assert counts(fanout) == (direct + 5, partial, queued)
            await wait_until(
                lambda: reader is not None and reader.data_frames() == 68,
                "all 68 data frames",
                timeout=10,
            )
            events = reader.events()
            data = [json.loads(e.data) for e in events if e.event == "data"]
            assert [batch[0]["seq"] for batch in data] == list(range(1, 69))
            assert [batch[0]["tags"] for batch in data] == [[f"t{i}"] for i in range(68)]
            assert all(len(batch[0]["keys"]) == 20 for batch in data)
            assert [e.event for e in events] == ["control"] + ["data", "control"] * 68
            # request.sentLength counts body bytes as Request.write would (no chunk framing)
            assert sub.request.sentLength == len(reader.body())
        assert_no_errors_logged(logged)
    finally:
        if reader is not None and reader.transport is not None:
            reader.transport.abortConnection()
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_reader_gone_with_a_reset_costs_nothing(tmp_path: Path) -> None:
    """A send on a socket the peer reset falls back to transport.write; Twisted closes it."""
    master = await start_master(tmp_path, ping_interval=30)
    client = Client(master.url)
    reader: SSEReader | None = None
    gone: SlowReader | None = None
    try:
        with captured_log() as logged:
            fanout = master.service.fanout
            reader = await open_live_sse(client)
            first = await live_subscriber(master, set())
            gone = await connect_raw(master, SlowReader(sse_request(EDGE_TOKEN)))
            sub = await live_subscriber(master, {first})
            # The master must not notice the reset by reading: only the fan-out's send meets it.
            assert sub.transport is not None
            sub.transport.pauseProducing()
            gone.transport.abortConnection()  # SO_LINGER 0: the close sends a RST
            await gone.lost.addTimeout(5, reactor)
            assert sub in fanout.subscribers and not sub.closed

            before = counts(fanout)
            posted = await post_bans(client, 2)
            await reader.wait_for(lambda r: len(data_events(r)) == 2)
            assert data_events(reader) == posted
            await wait_until(lambda: sub not in fanout.subscribers, "the reset reader to leave")
            await wait_until(lambda: gauge(master) == 1, "the gauge to count one reader")
            direct, partial, queued = counts(fanout)
            assert queued == before[2] + 1  # the reset reader's send failed: queued, not raised
            assert direct == before[0] + 2  # the other reader, both bans at once
            assert partial == before[1]
            assert counter(master, "edgeauth_master_slow_consumers_disconnected_total") == 0
        assert_no_errors_logged(logged)
    finally:
        if reader is not None:
            reader.close()
        await client.close()
        await master.stop()


# --- TLS ---------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 and its key; return their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fanout test master")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "master.crt", directory / "master.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest_twisted.ensureDeferred
async def test_tls_reader_gets_tls_frames_and_never_the_direct_send(tmp_path: Path) -> None:
    """Over an ssl: listener every chunk goes through the TLS transport and decrypts in order."""
    cert_path, key_path = self_signed(tmp_path)
    listen = f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
    master = await start_master(tmp_path, listen=listen, ping_interval=30)
    url = f"https://127.0.0.1:{master.port}"
    client = Client(url)
    trust = trustRootFromCertificates([Certificate.loadPEM(cert_path.read_bytes())])
    client.agent = Agent(reactor, contextFactory=tls.MasterTLSPolicy(trust, None), pool=client.pool)
    client.http = treq.client.HTTPClient(client.agent)
    reader: SSEReader | None = None
    try:
        fanout = master.service.fanout
        reader = await open_live_sse(client)
        sub = await live_subscriber(master, set())
        # the TLS transport forwards unknown attributes to the TCP transport beneath it
        assert type(sub.transport) is not tcp.Server
        assert isinstance(getattr(sub.transport, "transport", None), tcp.Server)

        posted = await post_bans(client, 5)
        await reader.wait_for(lambda r: len(data_events(r)) == 5)
        assert data_events(reader) == posted
        assert [e.event for e in reader.events] == ["control"] + ["data", "control"] * 5
        assert counts(fanout) == (0, 0, 5)
        assert not reader.ended
    finally:
        if reader is not None:
            reader.close()
        await client.close()
        await master.stop()


@pytest_twisted.ensureDeferred
async def test_closing_transports_are_left_to_twisted(tmp_path: Path) -> None:
    """Once loseConnection or abortConnection was called, chunks go through transport.write."""
    master = await start_master(tmp_path, ping_interval=30)
    readers: list[SlowReader] = []
    try:
        fanout = master.service.fanout
        data = b": after close\n\n"
        chunk = b"%x\r\n%b\r\n" % (len(data), data)
        for close in ("loseConnection", "abortConnection"):
            reader = await connect_raw(master, SlowReader(sse_request(EDGE_TOKEN)))
            readers.append(reader)
            sub = await live_subscriber(master, set())
            received = len(reader.received)
            before = counts(fanout)
            getattr(sub.transport, close)()
            assert sub.send(data, chunk, 0.0)
            assert counts(fanout) == (before[0], before[1], before[2] + 1), close
            await reader.lost.addTimeout(5, reactor)
            if close == "loseConnection":  # Twisted flushes what was written before closing
                assert bytes(reader.received[received:]) == chunk
            else:  # and drops it on an abort
                assert len(reader.received) == received
            await wait_until(lambda: not fanout.subscribers, f"the reader to leave ({close})")
    finally:
        for reader in readers:
            if reader.transport is not None:
                reader.transport.abortConnection()
        await master.stop()
