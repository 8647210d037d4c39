"""Tests for the refused-request path: ``RequestGuard`` (checks, gate hook, metrics), write_json.

The gate hook is what ``EdgeService`` gives its proxy: the gate's refusal goes out as the gate
built it (encoded body, its headers), every check is counted by result and every ban refusal by
the ban's source, and ``write_json`` writes the same response whatever route its headers take.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, generate_latest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from edgeauth.edge import answers
from edgeauth.edge import guard as guard_module
from edgeauth.edge.clientip import TrustedProxies
from edgeauth.edge.gate import Gate
from edgeauth.edge.guard import NOT_SYNCED, RequestGuard
from edgeauth.edge.index import EdgeIndexes
from edgeauth.edge.metrics import EdgeMetrics, LabelCounts
from edgeauth.events import IpBanned

NOW = 1_763_850_000.0
BANNED_HEADERS = ((b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store"))


def make_request(
    peer: str = "198.51.100.7", headers: Mapping[bytes, list[bytes]] | None = None
) -> Request:
    """A ``Request`` on a real ``HTTPChannel`` whose transport is a ``StringTransport``."""
    site = Site(Resource())
    wrapper = site.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
    wrapper.makeConnection(transport)
    channel = wrapper._channel  # the HTTP/1.1 channel inside Twisted's protocol switcher
    request = Request(channel)
    request.method = b"GET"
    request.uri = request.path = b"/items"
    request.clientproto = b"HTTP/1.1"
    for name, values in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, values)
    channel.requests.append(request)
    request.test_transport = transport  # type: ignore[attr-defined]  # channel drops it on finish
    return request


def written(request: Request) -> bytes:
    transport = request.test_transport  # type: ignore[attr-defined]
    assert isinstance(transport, StringTransport)
    return transport.value()


class Harness:
    """A guard over a real gate and indexes, with its own metrics and clock."""

    def __init__(self, trusted: Iterable[str] = (), synced: bool = True, fail_mode: str = "open"):
        self.indexes = EdgeIndexes()
        self.gate = Gate(self.indexes, None, (), None, (), 600.0, "edge-a", lambda event: None)
        self.metrics = EdgeMetrics()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.state = SimpleNamespace(synced=synced, indexes=self.indexes)
        self.guard = RequestGuard(
            self.gate,
            TrustedProxies(list(trusted)),
            self.state,  # type: ignore[arg-type]
            self.metrics,
            self.clock,
            fail_mode=fail_mode,
        )

    def ban(self, ip: str, seq: int, source: str = "master") -> None:
        self.indexes.apply(IpBanned(seq=seq, timestamp=NOW, source=source, ip=ip))

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def test_gate_hook_passes_the_gates_refusal_through_and_counts_it() -> None:
    """Body and headers are the gate's own; checks by result, refusals by ban source."""
    h = Harness()
    h.ban("198.51.100.0/24", seq=42, source="operator:alice")
    request = make_request()
    refusal = h.guard.gate_hook(request)
    assert refusal is not None
    assert refusal.status == 403
    assert refusal.body == b'{"error":"ip_banned","ref":42}'
    assert refusal.headers == BANNED_HEADERS
    gate_refusal = h.gate.check("198.51.100.7", b"GET", b"/items", None, NOW)
    assert gate_refusal is refusal  # the gate's own answer, passed through as it is
    for _ in range(2):
        h.guard.gate_hook(make_request())
    assert h.sample("edgeauth_edge_checks_total", result="ip_banned") == 3
    assert h.sample("edgeauth_edge_refusals_total", source="operator:alice") == 3
    assert h.sample("edgeauth_edge_checks_total", result="allowed") == 0


def test_gate_hook_allows_and_counts() -> None:
    h = Harness()
    h.ban("203.0.113.0/24", seq=1)
    assert h.guard.gate_hook(make_request()) is None
    assert h.guard.gate_hook(make_request()) is None
    assert h.sample("edgeauth_edge_checks_total", result="allowed") == 2
    assert h.sample("edgeauth_edge_checks_total", result="ip_banned") == 0


def test_gate_hook_reuses_the_last_answer_only_while_it_is_the_same() -> None:
    """Same ban, same (immutable) answer (the gate keeps it); another ban gets its own answer."""
    h = Harness()
    h.ban("198.51.100.0/24", seq=1, source="master")
    h.ban("192.0.2.0/24", seq=2, source="edge-b")
    first = h.guard.gate_hook(make_request("198.51.100.7"))
    again = h.guard.gate_hook(make_request("198.51.100.9"))
    other = h.guard.gate_hook(make_request("192.0.2.1"))
    assert first is again
    assert other is not None and other.body == b'{"error":"ip_banned","ref":2}'
    back = h.guard.gate_hook(make_request("198.51.100.7"))
    assert back is not None and back.body == b'{"error":"ip_banned","ref":1}'
    assert h.sample("edgeauth_edge_refusals_total", source="master") == 3
    assert h.sample("edgeauth_edge_refusals_total", source="edge-b") == 1


def test_not_synced_fail_closed_is_counted() -> None:
    h = Harness(synced=False, fail_mode="closed")
    assert h.guard.check(make_request()) is NOT_SYNCED
    refusal = h.guard.gate_hook(make_request())
    assert refusal is not None and refusal.status == 503
    assert refusal.body == NOT_SYNCED.body and refusal.headers == NOT_SYNCED.headers
    assert h.sample("edgeauth_edge_checks_total", result="not_synced") == 2


def test_label_counts_expose_what_a_prometheus_counter_exposes() -> None:
    """Same text as ``Counter`` with the same name, help and label, in first-seen order."""
    counts_registry = CollectorRegistry(auto_describe=True)
    counter_registry = CollectorRegistry(auto_describe=True)
    counts = LabelCounts("edgeauth_test_checks", "Checks by result", "result", counts_registry)
    counter = Counter(
        "edgeauth_test_checks", "Checks by result", ["result"], registry=counter_registry
    )
    assert generate_latest(counts_registry) == generate_latest(counter_registry)
    for value, amount in [("allowed", 1.0), ("ip_banned", 1.0), ("allowed", 2.5), ('q"\\x', 1.0)]:
        counts.inc(value, amount)
        counter.labels(result=value).inc(amount)
    assert generate_latest(counts_registry) == generate_latest(counter_registry)
    assert counts.counts == {"allowed": 3.5, "ip_banned": 1.0, 'q"\\x': 1.0}
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        LabelCounts("edgeauth_test_checks", "again", "result", counts_registry)


def test_every_ban_source_is_counted() -> None:
    h = Harness()
    for i in range(5):
        h.ban(f"10.0.{i}.0/24", seq=i + 1, source=f"edge-{i}")
    for _ in range(3):
        for i in range(5):
            assert h.guard.gate_hook(make_request(f"10.0.{i}.1")) is not None
    for i in range(5):
        assert h.sample("edgeauth_edge_refusals_total", source=f"edge-{i}") == 3
    assert h.sample("edgeauth_edge_checks_total", result="ip_banned") == 15
    text = h.metrics.render().decode()
    assert 'edgeauth_edge_refusals_total{source="edge-4"} 3.0' in text
    assert "# TYPE edgeauth_edge_checks_total counter" in text


def test_on_response_counts_status_classes() -> None:
    h = Harness()
    request = make_request()
    h.guard.client_ip(request)
    for status in (200, 204, 503, 200):
        h.guard.on_response(request, status)
    assert h.sample("edgeauth_edge_origin_responses_total", status="2xx") == 3
    assert h.sample("edgeauth_edge_origin_responses_total", status="5xx") == 1


def test_forwarding_headers_ignored_without_trusted_proxies() -> None:
    h = Harness()
    h.ban("203.0.113.9/32", seq=1)
    headers = {b"X-Forwarded-For": [b"203.0.113.9"], b"Forwarded": [b"for=203.0.113.9"]}
    request = make_request("198.51.100.7", headers)
    assert h.guard.client_ip(request) == "198.51.100.7"
    assert h.guard.gate_hook(make_request("198.51.100.7", headers)) is None


@pytest.mark.parametrize(
    ("headers", "client"),
    [
        ({b"X-Forwarded-For": [b"203.0.113.9"]}, "203.0.113.9"),
        ({b"Forwarded": [b"for=203.0.113.9"]}, "203.0.113.9"),
        ({}, "198.51.100.7"),
    ],
)
def test_forwarding_headers_believed_from_trusted_proxies(
    headers: dict[bytes, list[bytes]], client: str
) -> None:
    h = Harness(trusted=["198.51.100.0/24"])
    h.ban("203.0.113.9/32", seq=5)
    request = make_request("198.51.100.7", headers)
    assert h.guard.client_ip(request) == client
    assert getattr(request, guard_module.CLIENT_IP_ATTRIBUTE) == client
    refusal = h.guard.gate_hook(make_request("198.51.100.7", headers))
    assert (refusal is not None) == (client == "203.0.113.9")


def test_gate_hook_answer_is_written_as_the_gate_built_it() -> None:
    """What the proxy sends for the hook's refusal: the gate's body and headers, once each."""
    h = Harness()
    h.ban("198.51.100.0/24", seq=7)
    request = make_request()
    refusal = h.guard.gate_hook(request)
    assert refusal is not None
    answers.write_json(request, refusal.status, refusal.body, refusal.headers)
    assert written(request) == (
        b"HTTP/1.1 403 Forbidden\r\n"
        b"Content-Type: application/json\r\n"
        b"Cache-Control: no-store\r\n"
        b"Content-Length: 29\r\n\r\n"
        b'{"error":"ip_banned","ref":7}'
    )


# -- write_json: the header plan against the plain rule ------------------------------------------


def reference_write_json(
    request: Request,
    status: int,
    body: Mapping[str, Any] | bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """``write_json`` as it was written before its header plans were kept (the plain rule)."""
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    request.setResponseCode(status)
    response = request.responseHeaders
    extra = list(headers)
    named = {name.lower() for name, _ in extra}
    if b"content-type" not in named:
        response.setRawHeaders(b"Content-Type", [b"application/json"])
    if b"cache-control" not in named:
        response.setRawHeaders(b"Cache-Control", [b"no-store"])
    for name, value in extra:
        if name.lower() != b"content-length":
            response.addRawHeader(name, value)
    response.setRawHeaders(b"Content-Length", [b"%d" % len(data)])
    request.write(data)
    request.finish()


header_names = st.sampled_from(
    [
        b"Content-Type",
        b"content-type",
        b"Cache-Control",
        b"CACHE-CONTROL",
        b"Content-Length",
        b"content-length",
        b"WWW-Authenticate",
        b"X-Ref",
        b"Server",
    ]
)
header_values = st.sampled_from([b"application/problem+json", b"private", b"7", b"a\r\nb", b""])
header_lists = st.lists(st.tuples(header_names, header_values), max_size=5)


@given(
    headers=header_lists,
    shape=st.sampled_from(["tuple", "list", "iterator", "lists"]),
    body=st.one_of(st.binary(max_size=40), st.dictionaries(st.text(max_size=4), st.integers())),
    status=st.sampled_from([401, 403, 501, 502, 503, 504]),
    method=st.sampled_from([b"GET", b"HEAD"]),
    repeat=st.integers(min_value=1, max_value=2),
)
def test_write_json_writes_what_the_plain_rule_writes(
    headers: list[tuple[bytes, bytes]],
    shape: str,
    body: bytes | dict[str, int],
    status: int,
    method: bytes,
    repeat: int,
) -> None:
    """Whatever the headers and however they are passed (and a second time, from the plan)."""

    def given_headers() -> Any:
        if shape == "tuple":
            return tuple(headers)
        if shape == "list":
            return list(headers)
        if shape == "iterator":
            return iter(headers)
        return [list(pair) for pair in headers]  # unhashable: never kept as a plan

    for _ in range(repeat):
        expected = make_request()
        expected.method = method
        reference_write_json(expected, status, body, given_headers())
        got = make_request()
        got.method = method
        answers.write_json(got, status, body, given_headers())
        assert written(got) == written(expected)
        assert list(got.responseHeaders.getAllRawHeaders()) == list(
            expected.responseHeaders.getAllRawHeaders()
        )


def test_write_json_keeps_a_bounded_number_of_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(answers, "_HEADER_PLANS", {})
    monkeypatch.setattr(answers, "_MAX_HEADER_PLANS", 3)
    for i in range(10):
        request = make_request()
        answers.write_json(request, 403, b"{}", ((b"X-Ref", b"%d" % i),))
        assert b"X-Ref: %d\r\n" % i in written(request)
    assert len(answers._HEADER_PLANS) == 3
