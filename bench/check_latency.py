"""Benchmark: the full per-request gate check of an edge, against a Redis GET and a set probe.

Run with ``.venv/bin/python bench/check_latency.py`` (needs the ``redis`` client in the venv and a
Redis server on 127.0.0.1:6379 for the baseline; without them the Redis rows are skipped).

The indexes are built directly in memory (no events, no SQLite): 1,000,000 banned addresses
(900,000 IPv4 /32, 100,000 IPv6 /128), 100,000 banned networks over several prefix lengths
(IPv4 /16 /20 /22 /24 /28, IPv6 /32 /48 /56 /64 /96), 1,000 allow entries (IPv4 /32 /24, IPv6
/64), 1,000,000 revoked jtis and 10,000 revoked subjects. Every figure is a call of
``Gate.check(client_ip, method, path, authorization, now)`` exactly as the request guard makes it:
it parses the client address text, looks up the ban prefix lengths in use (most specific first;
the index's bucket filter skips the network lengths with nothing in the address's bucket), the
allow entries when a ban was found and, on a protected path, verifies an HS256 JWT and looks up
its jti and subject. Probes are addresses that are *not* banned (no lookup finds anything: the
worst case) unless the row says otherwise.

Each figure is the median of 5 repeats of one pass over N probes (``-n``, 200,000; a tenth on
the JWT rows), in ns per check, including the ``for`` loop, which the baselines pay as well. The
repeats go round robin over the rows (repeat 1 of every row, then repeat 2, ...), so a burst of
noise from other work on the machine hits one repeat of several rows rather than every repeat of
one row; the "vs Redis" ratios are computed within each repeat, then their median is taken. The
"not banned" probes are 100,000 distinct random addresses (cold CPU caches: each check misses in
the million-entry table), the "warm cache" row cycles 1,000 of them (an edge's active clients).
The Redis baseline is one ``GET`` per probe (half hits) with redis-py over one loopback
connection to the local server (what a check against a shared store costs at the least); its
keys are written under ``edgeauth-bench:`` and deleted afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator

from joserfc import jwt as jose_jwt
from joserfc.jwk import OctKey

import edgeauth
from edgeauth.edge.gate import Gate
from edgeauth.edge.index import EdgeIndexes, parse_client_ip
from edgeauth.edge.jwt import JWTVerifier
from edgeauth.replay import Entry

REPEATS = 5
BANNED_IPS = 1_000_000
NETWORKS = 100_000
REVOKED_JTIS = 1_000_000
REVOKED_SUBJECTS = 10_000
ALLOWS = 1_000
SECRET = "bench-hs256-secret-0123456789abcdef0123456789"
GOAL_NS = 2000.0
GOAL_VS_REDIS = 40.0
REDIS_PREFIX = "edgeauth-bench:"
WARM_CLIENTS = 1_000

# (prefix length, how many) per family; 60,000 IPv4 and 40,000 IPv6 networks.
V4_NETWORKS = ((16, 2_000), (20, 8_000), (22, 10_000), (24, 30_000), (28, 10_000))
V6_NETWORKS = ((32, 1_000), (48, 9_000), (56, 10_000), (64, 15_000), (96, 5_000))
V4_ALLOWS = ((32, 500), (24, 300))
V6_ALLOWS = ((64, 200),)


def v4_text(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "big"))


def v6_text(value: int) -> str:
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


def text(version: int, value: int) -> str:
    return v4_text(value) if version == 4 else v6_text(value)


def v6_random(rng: random.Random) -> int:
    """A random global unicast address (2000::/3)."""
    return (0b001 << 125) | rng.getrandbits(125)


def network_key(version: int, value: int, plen: int) -> tuple[str, int]:
    bits = 32 if version == 4 else 128
    masked = value & (((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1))
    return f"{text(version, masked)}/{plen}", masked


def entry(ip: str, reason: str, expires_at: float | None, seq: int) -> Entry:
    return Entry(ip=ip, reason=reason, expires_at=expires_at, source="operator:bench", seq=seq)


class Built:
    """The indexes plus the probes and tokens the runs use."""

    def __init__(self, rng: random.Random, now: float) -> None:
        self.indexes = EdgeIndexes()
        bans, allows, revocations = (
            self.indexes.bans,
            self.indexes.allows,
            self.indexes.revocations,
        )
        started = time.perf_counter()
        seq = 0
        self.banned_v4: list[str] = []
        self.banned_v6: list[str] = []
        self.banned_nets: list[str] = []  # addresses inside banned IPv4/IPv6 networks
        while len(bans) < BANNED_IPS:
            seq += 1
            if seq % 10:
                value = rng.getrandbits(32)
                key, plen_key = v4_text(value), "/32"
                self.banned_v4.append(key)
            else:
                value = v6_random(rng)
                key, plen_key = v6_text(value), "/128"
                self.banned_v6.append(key)
            expires_at = now + 86400 if seq % 3 == 0 else None
            bans.put(entry(key + plen_key, "bench", expires_at, seq))
        for version, spec in ((4, V4_NETWORKS), (6, V6_NETWORKS)):
            for plen, count in spec:
                made = 0
                while made < count:
                    value = rng.getrandbits(32) if version == 4 else v6_random(rng)
                    key, masked = network_key(version, value, plen)
                    if bans.get(key) is not None:
                        continue
                    seq += 1
                    bans.put(entry(key, "bench", None, seq))
                    made += 1
                    if made % 50 == 0:
                        self.banned_nets.append(text(version, masked | 1))
        for version, spec in ((4, V4_ALLOWS), (6, V6_ALLOWS)):
            for plen, count in spec:
                for _ in range(count):
                    value = rng.getrandbits(32) if version == 4 else v6_random(rng)
                    key, _masked = network_key(version, value, plen)
                    seq += 1
                    allows.put(entry(key, "bench allow", None, seq))
        for i in range(REVOKED_JTIS):
            revocations.revoke_token(
                f"{rng.getrandbits(64):016x}-{i}", now + 86400 if i % 2 else None
            )
        for i in range(REVOKED_SUBJECTS):
            revocations.revoke_subject(f"user-{i}", now - 3600)
        self.build_s = time.perf_counter() - started
        self.now = now

        # Probes that no allow and no ban covers: each walks every prefix length in use.
        self.free_v4 = self._free(rng, 4)
        self.free_v6 = self._free(rng, 6)
        check = self.indexes.check_ip
        assert all(check(*parse_client_ip(t), now) is not None for t in self.banned_nets)  # type: ignore[misc]

        key = OctKey.import_key(SECRET)
        claims = {
            "sub": "user-42",  # revoked before iat: the subject lookup finds it, does not refuse
            "jti": "a-jti-that-is-not-revoked",
            "iat": int(now) - 10,
            "exp": int(now) + 3600,
        }
        token = jose_jwt.encode({"alg": "HS256"}, claims, key)
        self.authorization = b"Bearer " + token.encode()
        self.verifier = JWTVerifier(["HS256"], SECRET, None)
        self.gate = Gate(
            self.indexes,
            self.verifier,
            ["/api/*", "/admin/*"],
            None,
            (),
            60.0,
            "bench",
            lambda event: None,
        )

    def _free(self, rng: random.Random, version: int, count: int = 100_000) -> list[str]:
        out: list[str] = []
        check, allows, now = self.indexes.check_ip, self.indexes.allows, self.now
        while len(out) < count:
            value = rng.getrandbits(32) if version == 4 else v6_random(rng)
            if check(version, value, now) is None and allows.match(version, value, now) is None:
                out.append(text(version, value))
        return out


@contextlib.contextmanager
def redis_runner(probes: list[str]) -> Iterator[Callable[[], None] | str]:
    """Yield a run of one redis-py GET per probe (half hits), or why there is none."""
    try:
        import redis
    except ImportError:
        yield "redis client not installed (.venv/bin/pip install redis)"
        return
    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=5)
    keys = [REDIS_PREFIX + "ban:" + p for p in probes]
    try:
        client.ping()
    except redis.RedisError as exc:
        yield f"no Redis on 127.0.0.1:6379 ({exc})"
        return
    try:
        pipe = client.pipeline(transaction=False)
        for k in keys[::2]:  # half hits, half misses
            pipe.set(k, "1", ex=600)
        pipe.execute()
        get = client.get

        def run() -> None:
            for k in keys:
                get(k)

        run()  # warm the connection
        yield run
    finally:
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000, help="checks per repeat")
    parser.add_argument("--redis-n", type=int, default=5_000, help="Redis GETs per repeat")
    args = parser.parse_args()
    n = args.n

    print("edgeauth edge check latency benchmark", flush=True)
    print(f"  edgeauth from {os.path.dirname(edgeauth.__file__)}")
    print(
        f"  python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; medians of {REPEATS} repeats"
    )
    rng = random.Random(5)
    now = time.time()
    built = Built(rng, now)
    gate, indexes = built.gate, built.indexes
    prefixes = indexes.bans.prefix_lengths
    print(
        f"  built in {built.build_s:.1f} s: {len(indexes.bans):,} bans (prefix lengths v4 "
        f"{prefixes[4]}, v6 {prefixes[6]}), {len(indexes.allows):,} allows (v4 "
        f"{indexes.allows.prefix_lengths[4]}, v6 {indexes.allows.prefix_lengths[6]}), "
        f"{indexes.revocations.counts().tokens:,} revoked jtis, "
        f"{indexes.revocations.counts().subjects:,} revoked subjects",
        flush=True,
    )
    gc.collect()

    def cycle(items: list[str]) -> list[str]:
        return [items[i % len(items)] for i in range(n)]

    free_v4, free_v6 = cycle(built.free_v4), cycle(built.free_v6)
    free_mix = [free_v4[i] if i % 4 else free_v6[i] for i in range(n)]
    banned_mix = cycle(
        [
            x
            for trio in zip(built.banned_v4, built.banned_v6, built.banned_nets, strict=False)
            for x in trio
        ]
    )
    jwt_n = max(n // 10, 1000)
    jwt_probes = free_v4[:jwt_n]
    check, nowf, auth = gate.check, now, built.authorization
    unprotected, protected = b"/static/app.js", b"/api/items"

    # Sanity: the verdicts are what the rows claim.
    assert check(free_v4[0], b"GET", unprotected, None, nowf) is None
    assert check(free_v6[0], b"GET", unprotected, None, nowf) is None
    assert check(free_v4[0], b"GET", protected, auth, nowf) is None
    assert check(free_v4[0], b"GET", protected, None, nowf) is not None  # no token: 401
    assert all(check(ip, b"GET", unprotected, None, nowf) is not None for ip in banned_mix[:3000])

    def ip_check(probes: list[str]) -> Callable[[], None]:
        def run() -> None:
            for ip in probes:
                check(ip, b"GET", unprotected, None, nowf)

        return run

    def full_check() -> None:
        for ip in jwt_probes:
            check(ip, b"GET", protected, auth, nowf)

    token = auth[7:].decode()
    verify = built.verifier.verify

    def verify_only() -> None:
        for _ip in jwt_probes:
            verify(token, nowf)

    is_revoked = indexes.revocations.is_revoked

    def revocation_only() -> None:
        for _ip in jwt_probes:
            is_revoked("a-jti-that-is-not-revoked", "user-42", nowf - 10, nowf)

    banned_set = set(built.banned_v4) | set(built.banned_v6)
    contains = banned_set.__contains__

    def set_probe() -> None:
        for ip in free_mix:
            contains(ip)

    def empty() -> None:
        for _ip in free_mix:
            pass

    rows: list[tuple[str, Callable[[], None], int]] = [
        ("Gate.check, unprotected path, IPv4 not banned", ip_check(free_v4), n),
        ("Gate.check, unprotected path, IPv6 not banned", ip_check(free_v6), n),
        ("Gate.check, unprotected path, 3/4 IPv4 + 1/4 IPv6 not banned", ip_check(free_mix), n),
        ("Gate.check, unprotected path, banned (403 built), mixed", ip_check(banned_mix), n),
        (
            f"Gate.check, unprotected path, {WARM_CLIENTS:,} clients cycled (warm cache)",
            ip_check(cycle(free_mix[:WARM_CLIENTS])),
            n,
        ),
        ("Gate.check, protected path, valid HS256 JWT, IPv4 not banned", full_check, jwt_n),
        ("  of which JWTVerifier.verify alone", verify_only, jwt_n),
        ("  of which RevocationIndex.is_revoked (jti + subject) alone", revocation_only, jwt_n),
        ("baseline: str in set of 1,000,000 addresses", set_probe, n),
        ("baseline: empty for loop", empty, n),
    ]
    with redis_runner(free_mix[: args.redis_n]) as redis_run:
        if isinstance(redis_run, str):
            print(f"  baseline: Redis GET skipped: {redis_run}")
        else:
            rows.append(("baseline: Redis GET over loopback (redis-py)", redis_run, args.redis_n))
        # Round robin: repeat r of every row runs before repeat r + 1 of any, so that a burst
        # of noise from the neighbours lands on one repeat of several rows, not on one row.
        runs: dict[str, list[float]] = {label: [] for label, _run, _count in rows}
        # CPU time of this thread over the same runs: on a machine shared with other work it
        # moves less than the wall time (time spent descheduled is not in it).
        cpu_runs: dict[str, list[float]] = {label: [] for label, _run, _count in rows}
        gc.collect()
        for _repeat in range(REPEATS):
            for label, run, count in rows:
                start, cpu_start = time.perf_counter_ns(), time.thread_time_ns()
                run()
                runs[label].append((time.perf_counter_ns() - start) / count)
                cpu_runs[label].append((time.thread_time_ns() - cpu_start) / count)
    print()
    med = {label: statistics.median(values) for label, values in runs.items()}
    cpu_med = {label: statistics.median(values) for label, values in cpu_runs.items()}
    for label, values in runs.items():
        print(
            f"  {label:<64} {med[label]:>9,.0f} ns  (runs {', '.join(f'{r:,.0f}' for r in values)})"
            f"  cpu {cpu_med[label]:,.0f} ns"
        )
    redis_label = "baseline: Redis GET over loopback (redis-py)"
    redis_values = runs.get(redis_label)

    def vs_redis(label: str) -> float:
        """Median over the repeats of (Redis GET / this row) within the same repeat."""
        assert redis_values is not None
        return statistics.median(r / x for r, x in zip(redis_values, runs[label], strict=True))

    labels = [label for label, _run, _count in rows]
    ip_v4, ip_v6, ip_mix, ip_ban, ip_hot, full, ver, rev, set_ns, loop_ns = (
        med[label] for label in labels[:10]
    )
    worst = labels[0] if ip_v4 >= ip_v6 else labels[1]
    worst_ip = med[worst]
    print()
    print("| check | median ns | Redis GET / this (same repeat) | this / set probe |")
    print("|---|---:|---:|---:|")
    for label in labels:
        ratio = f"{vs_redis(label):,.1f}x" if redis_values else "n/a"
        print(f"| {label.strip()} | {med[label]:,.0f} | {ratio} | {med[label] / set_ns:.1f}x |")
    print()
    other = labels[1] if worst == labels[0] else labels[0]
    print(
        f"IP check CPU time (thread): worst family by wall time {cpu_med[worst]:,.0f} ns, the "
        f"other family {cpu_med[other]:,.0f} ns, banned {cpu_med[labels[3]]:,.0f} ns"
    )
    print(
        f"IP check (unprotected path, worst family) {worst_ip:,.0f} ns; without the loop "
        f"{worst_ip - loop_ns:,.0f} ns; full JWT path {full:,.0f} ns, of which HMAC verify "
        f"{ver:,.0f} ns; gate work besides verify {full - ver:,.0f} ns; revocation lookups "
        f"{rev:,.0f} ns"
    )
    verdict = "meets" if worst_ip <= GOAL_NS else "misses"
    print(
        f"goal IP check median <= {GOAL_NS:,.0f} ns: {verdict} ({worst_ip:,.0f} ns, mixed "
        f"{ip_mix:,.0f} ns, banned {ip_ban:,.0f} ns; warm cache {ip_hot:,.0f} ns)"
    )
    if redis_values:
        ratio = vs_redis(worst)
        verdict = "meets" if ratio >= GOAL_VS_REDIS else "misses"
        print(
            f"goal >= {GOAL_VS_REDIS:g}x faster than a Redis GET: {verdict} ({ratio:,.1f}x; "
            f"Redis GET {med[redis_label] / 1000:,.1f} us; mixed {vs_redis(labels[2]):,.1f}x; "
            f"warm cache {vs_redis(labels[4]):,.1f}x; full JWT path {vs_redis(labels[5]):,.1f}x)"
        )


if __name__ == "__main__":
    main()
