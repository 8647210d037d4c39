"""A local edgeauth fleet for trying it out: ``python -m edgeauth.demo run|tour``.

``run`` (what ``make run`` starts) generates demo tokens under ``var/`` (files of mode 0600),
writes ``var/demo.ini``, then starts, each as its own process: a master on 127.0.0.1:4000, three
edges (``edge-a``/``edge-b``/``edge-c`` on 5001-5003, admin listeners on 5101-5103) and a small
demo origin on 8080. It waits until every one is healthy, prints a "try this" block of ready
``curl`` and ``edgeauthctl`` commands and keeps everything running until Ctrl-C or SIGTERM, which
stops every child by its PID and exits 0.

``tour`` (what ``make demo`` runs) starts the same processes on fresh databases and plays a script:
it bans 127.0.0.2 (the tour's client binds to that address), shows 403 on all three edges and the
measured propagation time (from the ban's 201 to a 403 on every edge), lifts the ban, invalidates a
cache tag and shows ``X-Cache`` MISS then HIT, then stops everything and exits 0.

``origin`` serves the demo origin alone (the supervisor starts it so): a tiny twisted.web app whose
pages carry ``Cache-Control: public, max-age=60`` and ``X-Cache-Tags``.

The supervisor itself is plain synchronous Python (:mod:`subprocess`, :mod:`http.client`): it only
starts processes, polls health endpoints with deadlines and waits for signals. ``--ports auto``
picks free ports instead of the fixed ones, so a tour can run beside ``make run`` (tests use it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

EDGE_IDS = ("edge-a", "edge-b", "edge-c")
TOKEN_ROLES = ("operator", "edge", "reader")
HOST = "127.0.0.1"
CLIENT = "127.0.0.2"
"""The tour's client address: every address in 127.0.0.0/8 is local on Linux."""
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
PROPAGATION_TIMEOUT = 10.0
LOG_TAIL_LINES = 15
MAX_AGE = 60


class DemoError(Exception):
    """The demo cannot go on; ``str()`` says why in one line (plus, maybe, a log excerpt)."""


class _Stop(Exception):  # noqa: N818 - a signal, not an error
    """SIGTERM arrived: stop everything and exit 0."""


# --- ports ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    """The TCP ports of one demo fleet, all on 127.0.0.1."""

    master: int = 4000
    edges: tuple[int, ...] = (5001, 5002, 5003)
    admins: tuple[int, ...] = (5101, 5102, 5103)
    origin: int = 8080

    def named(self) -> list[tuple[str, int]]:
        """Every port with what listens on it, for messages."""
        named = [("master", self.master)]
        for edge_id, port, admin in zip(EDGE_IDS, self.edges, self.admins, strict=True):
            named += [(edge_id, port), (f"{edge_id} admin", admin)]
        return [*named, ("demo origin", self.origin)]


def free_ports() -> Ports:
    """Ports the kernel reports free now (all bound at once, so they are distinct)."""
    sockets = []
    try:
        for _ in range(2 + 2 * len(EDGE_IDS)):
            sock = socket.socket()
            sockets.append(sock)
            sock.bind((HOST, 0))
        numbers = [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()
    n = len(EDGE_IDS)
    return Ports(
        numbers[0], tuple(numbers[1 : 1 + n]), tuple(numbers[1 + n : 1 + 2 * n]), numbers[-1]
    )


def taken_ports(ports: Ports) -> list[str]:
    """``"4000 (master)"`` for every port another process already listens on."""
    taken = []
    for name, port in ports.named():
        with socket.socket() as probe:
            # Twisted listens with SO_REUSEADDR; so does the probe, so that connections of an
            # earlier run in TIME_WAIT do not count as taken.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((HOST, port))
            except OSError:
                taken.append(f"{port} ({name})")
    return taken


# --- files ----------------------------------------------------------------------------------------


def ensure_token(path: Path) -> str:
    """Return the token in ``path``, creating the file (mode 0600) with a new token if needed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        token = path.read_text(encoding="utf-8").strip()
        if token and token.isascii() and token.isprintable() and " " not in token:
            return token
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    token = secrets.token_hex(24)
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(token + "\n")
    return token


def demo_ini(var: Path, state: Path, ports: Ports) -> str:
    """The demo's ini text: the master, edge-a (edges b and c override id, ports, database)."""
    tokens = {role: var / f"{role}.token" for role in TOKEN_ROLES}
    return f"""\
# Written by `python -m edgeauth.demo` (make run / make demo); rewritten on every start.
# The [edge] section describes edge-a; edge-b and edge-c use it with --id, --listen,
# --admin-listen and --database on their command lines.

[master]
listen = tcp:{ports.master}:interface={HOST}
database = {state / "master.sqlite3"}

[tokens]
ops = operator file:{tokens["operator"]}
edges = edge file:{tokens["edge"]}
dashboard = reader file:{tokens["reader"]}

[edge]
id = {EDGE_IDS[0]}
listen = tcp:{ports.edges[0]}:interface={HOST}
admin_listen = tcp:{ports.admins[0]}:interface={HOST}
origin = http://{HOST}:{ports.origin}
masters = http://{HOST}:{ports.master}
token = file:{tokens["edge"]}
database = {state / (EDGE_IDS[0] + ".sqlite3")}

[failures]
threshold = 5                          ; five 401s from /login within a minute ban a client locally

[cache]
enabled = true
"""


# --- child processes ------------------------------------------------------------------------------


def twistd_command() -> list[str]:
    """``twistd`` of this Python (the venv's script when there is one)."""
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


@dataclass
class Child:
    """One process of the fleet, its log file and how to tell it is healthy."""

    name: str
    argv: list[str]
    log_path: Path
    health_port: int
    health_path: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self, cwd: Path) -> None:
        """Start the process in a session of its own (a terminal's Ctrl-C reaches only us)."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """The process id (0 before start)."""
        return self.proc.pid if self.proc is not None else 0

    def exited(self) -> int | None:
        """The exit status if the process has ended, else None."""
        return None if self.proc is None else self.proc.poll()

    def log_tail(self) -> str:
        """The last lines of the process's output, indented, for error messages."""
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in lines[-LOG_TAIL_LINES:])

    def healthy(self) -> bool:
        """True when the health URL answers 200."""
        try:
            status, _, _ = request("GET", self.health_port, self.health_path, timeout=1.0)
        except OSError:
            return False
        return status == 200


@dataclass
class Fleet:
    """The demo's processes: built, started, checked and stopped together."""

    var: Path
    state: Path
    ports: Ports
    ini: Path
    children: list[Child] = field(default_factory=list)

    @classmethod
    def prepare(cls, var: Path, state: Path, ports: Ports) -> Fleet:
        """Create the directories, tokens and ini file; describe the processes."""
        logs = var / "logs"
        for directory in (var, state, logs):
            directory.mkdir(parents=True, exist_ok=True)
        for role in TOKEN_ROLES:
            ensure_token(var / f"{role}.token")
        ini = state / "demo.ini"
        ini.write_text(demo_ini(var, state, ports), encoding="utf-8")
        fleet = cls(var, state, ports, ini)
        twistd = [*twistd_command(), "--nodaemon", "--pidfile="]
        fleet.children.append(
            Child(
                "demo origin",
                [sys.executable, "-m", "edgeauth.demo", "origin", "--port", str(ports.origin)],
                logs / "origin.log",
                ports.origin,
                "/healthz",
            )
        )
        fleet.children.append(
            Child(
                "master",
                [*twistd, "edgeauth-master", "--config", str(ini)],
                logs / "master.log",
                ports.master,
                "/readyz",
            )
        )
        for edge_id, port, admin in zip(EDGE_IDS, ports.edges, ports.admins, strict=True):
            argv = [*twistd, "edgeauth-edge", "--config", str(ini), "--id", edge_id]
            argv += ["--listen", f"tcp:{port}:interface={HOST}"]
            argv += ["--admin-listen", f"tcp:{admin}:interface={HOST}"]
            argv += ["--database", str(state / f"{edge_id}.sqlite3")]
            fleet.children.append(Child(edge_id, argv, logs / f"{edge_id}.log", admin, "/readyz"))
        return fleet

    def start(self, timeout: float = START_TIMEOUT) -> float:
        """Start every process and wait until all are healthy; return the seconds it took.

        Raises:
            DemoError: a process exited, or not all were healthy within ``timeout``.
        """
        began = time.monotonic()
        deadline = began + timeout
        cwd = Path.cwd()
        for child in self.children:
            child.start(cwd)
        pending = list(self.children)
        while pending:
            for child in list(pending):
                status = child.exited()
                if status is not None:
                    raise DemoError(
                        f"{child.name} exited with status {status} while starting; the end of "
                        f"{child.log_path}:\n{child.log_tail()}"
                    )
                if child.healthy():
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise DemoError(f"not healthy within {timeout:g} s: {names} (see {self.var}/logs)")
            if pending:
                time.sleep(0.05)  # a supervisor polling health endpoints, bounded by the deadline
        return time.monotonic() - began

    def first_exited(self) -> Child | None:
        """A child that has ended, if any."""
        return next((c for c in self.children if c.exited() is not None), None)

    def stop(self) -> None:
        """Stop the edges, then the master, then the origin: SIGTERM by PID, SIGKILL if stuck."""
        order = [c for c in self.children if c.name in EDGE_IDS]
        groups = [order, [c for c in self.children if c.name == "master"]]
        groups.append([c for c in self.children if c.name == "demo origin"])
        for group in groups:
            running = [c for c in group if c.proc is not None and c.proc.poll() is None]
            for child in running:
                assert child.proc is not None
                child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            for child in running:
                assert child.proc is not None
                try:
                    child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(f"{child.name} (pid {child.pid}) did not stop in time: killing it")
                    child.proc.kill()
                    child.proc.wait()


# --- HTTP -----------------------------------------------------------------------------------------


def request(
    method: str,
    port: int,
    path: str,
    *,
    body: Any = None,
    token: str | None = None,
    source: str | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to 127.0.0.1:``port`` (from ``source`` if given); (status, headers, body).

    Header names in the result are lower-case.
    """
    conn = http.client.HTTPConnection(
        HOST, port, timeout=timeout, source_address=(source, 0) if source else None
    )
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        content = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, content
    except http.client.HTTPException as exc:
        raise OSError(f"no valid HTTP answer from port {port}: {exc!r}") from None
    finally:
        conn.close()


class KeepAlive:
    """A keep-alive client connection to one port, reopened when the server closes it."""

    def __init__(self, port: int, source: str | None) -> None:
        """Talk to 127.0.0.1:``port`` from ``source``."""
        self.port = port
        self.source = source
        self.conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> tuple[int, dict[str, str]]:
        """GET ``path``; the status and lower-cased headers (the body is read and dropped)."""
        for attempt in (1, 2):
            if self.conn is None:
                source = (self.source, 0) if self.source else None
                self.conn = http.client.HTTPConnection(
                    HOST, self.port, timeout=5.0, source_address=source
                )
            try:
                self.conn.request("GET", path)
                response = self.conn.getresponse()
                response.read()
                headers = {k.lower(): v for k, v in response.getheaders()}
                if response.will_close:
                    self.close()
                return response.status, headers
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# --- commands -------------------------------------------------------------------------------------


def _display(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def path_export() -> str:
    """``PATH=...`` that puts this venv's ``edgeauthctl`` first, or "" if it already is."""
    script = Path(sys.executable).with_name("edgeauthctl")
    if not script.exists() or shutil.which("edgeauthctl") == str(script):
        return ""
    where = _display(script.parent)
    if where.startswith("/"):
        return f"PATH={shlex.quote(where)}:$PATH "
    return f'PATH="$PWD/{where}:$PATH" '


def try_this(fleet: Fleet, took: float) -> str:
    """The "try this" block that ``run`` prints once everything is healthy."""
    ports = fleet.ports
    ctl = "edgeauthctl"
    token_file = shlex.quote(_display(fleet.var / "operator.token"))
    master = f"http://{HOST}:{ports.master}"
    lines = [
        f"edgeauth demo is up ({took:.1f} s). Logs: {_display(fleet.var / 'logs')}/  "
        "Ctrl-C stops everything.",
        "",
        f"  master       {master}   operator API and event stream",
    ]
    for edge_id, port, admin in zip(EDGE_IDS, ports.edges, ports.admins, strict=True):
        lines.append(f"  {edge_id}       http://{HOST}:{port}   admin http://{HOST}:{admin}")
    lines += [
        f"  demo origin  http://{HOST}:{ports.origin}   pages: /products/<id>, /login (401)",
        "",
        "Try this in another shell, from this directory:",
        "",
        f"  export {path_export()}EDGEAUTH_MASTER={master} EDGEAUTH_TOKEN=$(cat {token_file})",
        f"  curl -si http://{HOST}:{ports.edges[0]}/products/1   # via edge-a; X-Cache on repeat",
        f"  {ctl} ban {CLIENT} --ttl 10m --reason 'try it'",
        f"  curl -si --interface {CLIENT} http://{HOST}:{ports.edges[1]}/products/1   # 403",
        f"  {ctl} explain --edge http://{HOST}:{ports.admins[1]} {CLIENT}",
        f"  {ctl} unban {CLIENT}",
        f"  {ctl} invalidate --tag product-1",
        f"  {ctl} bans; {ctl} fleet; {ctl} status",
        f"  {ctl} tail            # follows the event stream (Ctrl-C ends it)",
        f'  curl -s -H "Authorization: Bearer $EDGEAUTH_TOKEN" {master}/fleet',
        f"  curl -s http://{HOST}:{ports.admins[0]}/status",
    ]
    return "\n".join(lines)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def wait_for_signal_or_exit(fleet: Fleet) -> Child | None:
    """Block until a child ends (returned) or SIGINT/SIGTERM arrives (raised)."""
    while True:
        ended = fleet.first_exited()
        if ended is not None:
            return ended
        try:
            # Wait for any child to end without reaping it (Popen reaps it afterwards).
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            return fleet.first_exited()


@dataclass
class Options:
    """What ``run`` and ``tour`` were asked for."""

    var: Path
    ports: Ports
    timeout: float


def _prepare(options: Options, state: Path) -> Fleet:
    taken = taken_ports(options.ports)
    if taken:
        raise DemoError(
            f"port(s) already in use on {HOST}: {', '.join(taken)}; stop what uses them "
            "(another `make run`?) or start the demo with --ports auto"
        )
    return Fleet.prepare(options.var, state, options.ports)


def cmd_run(options: Options) -> int:
    """Start the fleet, print the "try this" block, run until Ctrl-C or SIGTERM."""
    fleet = _prepare(options, options.var)
    print(
        f"starting a master, {len(EDGE_IDS)} edges and the demo origin (logs in "
        f"{_display(fleet.var / 'logs')}/) ...",
        flush=True,
    )
    status = 0
    try:
        took = fleet.start(options.timeout)
        print(try_this(fleet, took), flush=True)
        ended = wait_for_signal_or_exit(fleet)
        if ended is not None:
            print(
                f"{ended.name} (pid {ended.pid}) exited with status {ended.exited()}; stopping "
                f"the others. The end of {_display(ended.log_path)}:\n{ended.log_tail()}",
                file=sys.stderr,
            )
            status = 1
    except (KeyboardInterrupt, _Stop):
        print("\nstopping ...", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fleet.stop()
    if status == 0:
        print("stopped: every process of the demo has exited", flush=True)
    return status


class Tour:
    """The scripted tour, step by step, against a started fleet."""

    def __init__(self, fleet: Fleet) -> None:
        """Tour ``fleet`` (already healthy)."""
        self.fleet = fleet
        self.ports = fleet.ports
        self.token = (fleet.var / "operator.token").read_text(encoding="utf-8").strip()
        self.token_file = fleet.var / "operator.token"

    def say(self, text: str = "") -> None:
        """Print one line of the tour."""
        print(text, flush=True)

    def ctl(self, *args: str) -> str:
        """Run ``edgeauthctl ARGS`` against the demo master, echo it and its output."""
        master = f"http://{HOST}:{self.ports.master}"
        shown = " ".join(shlex.quote(a) for a in args)
        self.say(f"$ edgeauthctl {shown}")
        argv = [sys.executable, "-m", "edgeauth.cli", "--master", master]
        argv += ["--token-file", str(self.token_file), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        for line in (done.stdout + done.stderr).splitlines():
            self.say(f"  {line}")
        if done.returncode != 0:
            raise DemoError(f"edgeauthctl {shown} exited with status {done.returncode}")
        return done.stdout

    def get_all(self, path: str, source: str) -> list[int]:
        """GET ``path`` on every edge from ``source``; the statuses."""
        return [request("GET", port, path, source=source)[0] for port in self.ports.edges]

    def show_statuses(self, path: str, source: str, expected: int) -> None:
        """Print each edge's answer to ``path`` from ``source``; all must be ``expected``."""
        statuses = self.get_all(path, source)
        shown = ", ".join(f"{e} {s}" for e, s in zip(EDGE_IDS, statuses, strict=True))
        self.say(f"GET {path} from {source}: {shown}")
        if any(s != expected for s in statuses):
            raise DemoError(f"expected {expected} from every edge, got {shown}")

    def wait_for(self, path: str, expected: int) -> tuple[float, list[float]]:
        """Poll every edge from the client address until each answers ``expected``.

        Returns the seconds until the last edge did and each edge's own time, measured from the
        call (right after the master's 201).
        """
        began = time.monotonic()
        deadline = began + PROPAGATION_TIMEOUT
        clients = [KeepAlive(port, CLIENT) for port in self.ports.edges]
        seen: list[float | None] = [None] * len(clients)
        try:
            while None in seen:
                for i, client in enumerate(clients):
                    if seen[i] is None and client.get(path)[0] == expected:
                        seen[i] = time.monotonic() - began
                if None in seen and time.monotonic() > deadline:
                    late = [e for e, t in zip(EDGE_IDS, seen, strict=True) if t is None]
                    raise DemoError(
                        f"no {expected} within {PROPAGATION_TIMEOUT:g} s from {', '.join(late)}"
                    )
        finally:
            for client in clients:
                client.close()
        times = [t for t in seen if t is not None]
        return max(times), times

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the master as the operator; the answer (which must be 201)."""
        status, _, content = request("POST", self.ports.master, path, body=body, token=self.token)
        if status != 201:
            raise DemoError(f"POST {path} answered {status}: {content[:200]!r}")
        doc: dict[str, Any] = json.loads(content)
        return doc

    def wait_applied(self, seq: int) -> None:
        """Wait until every edge has applied the event ``seq`` (its /status offset)."""
        deadline = time.monotonic() + PROPAGATION_TIMEOUT
        for edge_id, admin in zip(EDGE_IDS, self.ports.admins, strict=True):
            while True:
                _, _, content = request("GET", admin, "/status")
                if int(json.loads(content)["offset"]) >= seq:
                    break
                if time.monotonic() > deadline:
                    raise DemoError(f"{edge_id} did not apply event {seq} in time")
                time.sleep(0.005)  # bounded polling of the edge's status

    def x_cache(self, port: int, path: str) -> str | None:
        """GET ``path`` from 127.0.0.1; the ``X-Cache`` header (None when absent)."""
        status, headers, _ = request("GET", port, path)
        if status != 200:
            raise DemoError(f"GET {path} answered {status}")
        return headers.get("x-cache")

    def play(self) -> None:
        """The tour's script."""
        page = "/products/42"
        edge_a = self.ports.edges[0]
        self.say(f"== 1. {CLIENT} reaches the origin through every edge")
        self.show_statuses(page, CLIENT, 200)

        self.say()
        self.say(f"== 2. ban {CLIENT} at the master; every edge refuses it")
        self.say(f'POST /ban/ip {{"ip": "{CLIENT}", "ttl": 600, "reason": "demo tour"}}')
        answer = self.post("/ban/ip", {"ip": CLIENT, "ttl": 600, "reason": "demo tour"})
        total, each = self.wait_for(page, 403)
        self.say(f"201 (event seq {answer['event']['seq']})")
        self.show_statuses(page, CLIENT, 403)
        parts = ", ".join(f"{e} {t * 1000:.1f} ms" for e, t in zip(EDGE_IDS, each, strict=True))
        self.say(
            f"propagation: ban 201 -> 403 on all {len(EDGE_IDS)} edges in {total * 1000:.1f} ms "
            f"({parts})"
        )
        self.ctl("explain", "--edge", f"http://{HOST}:{self.ports.admins[1]}", CLIENT)

        self.say()
        self.say(f"== 3. lift the ban; {CLIENT} is served again")
        self.ctl("unban", CLIENT)
        total, _ = self.wait_for(page, 200)
        self.show_statuses(page, CLIENT, 200)
        self.say(
            f"200 on all {len(EDGE_IDS)} edges {total * 1000:.1f} ms after edgeauthctl returned"
        )

        self.say()
        self.say(f"== 4. invalidate a cache tag on every edge (page {page}, tag product-42)")
        before = self.x_cache(edge_a, page)
        if before is None:
            self.say(
                "edge-a answers no X-Cache header: this build's edges do not cache yet, so there "
                "is no MISS/HIT to show; the invalidation still travels to every edge"
            )
        else:
            self.say(f"GET {page} on edge-a: X-Cache: {before}")
        self.ctl("invalidate", "--tag", "product-42")
        _, _, content = request("GET", self.ports.master, "/status", token=self.token)
        self.wait_applied(int(json.loads(content)["tail"]))
        self.say("every edge applied the invalidation")
        first = self.x_cache(edge_a, page)
        second = self.x_cache(edge_a, page)
        self.say(f"GET {page} on edge-a: X-Cache: {first or '(none)'}")
        self.say(f"GET {page} on edge-a: X-Cache: {second or '(none)'}")
        if first is not None or second is not None:
            if not (
                (first or "").upper().startswith("MISS")
                and (second or "").upper().startswith("HIT")
            ):
                raise DemoError(f"expected X-Cache MISS then HIT, got {first!r} then {second!r}")
            self.say("cache: MISS then HIT, as expected")
            key = f"{HOST}:{edge_a}{page}"
            self.ctl("explain", "--edge", f"http://{HOST}:{self.ports.admins[0]}", "--url", key)


def cmd_tour(options: Options) -> int:
    """Start the fleet on fresh databases, play the tour, stop everything."""
    state = options.var / "tour"
    if state.exists():
        shutil.rmtree(state)
    fleet = _prepare(options, state)
    print(f"starting a master, {len(EDGE_IDS)} edges and the demo origin ...", flush=True)
    try:
        took = fleet.start(options.timeout)
        print(f"all healthy in {took:.1f} s", flush=True)
        print(flush=True)
        try:
            Tour(fleet).play()
        except OSError as exc:
            ended = fleet.first_exited()
            if ended is not None:
                raise DemoError(
                    f"{ended.name} exited with status {ended.exited()}; the end of its log:\n"
                    f"{ended.log_tail()}"
                ) from None
            raise DemoError(f"a request failed: {exc}") from None
    except (KeyboardInterrupt, _Stop):
        print("\ninterrupted: stopping ...", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fleet.stop()
    print()
    print("tour finished: every process stopped", flush=True)
    return 0


# --- the demo origin ------------------------------------------------------------------------------

_PRODUCT = re.compile(r"/products/([A-Za-z0-9_-]{1,64})\Z")


def serve_origin(port: int) -> int:
    """Serve the demo origin on 127.0.0.1:``port`` until SIGINT/SIGTERM; the exit status."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.python.failure import Failure
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    renders: dict[str, int] = {}

    class DemoOrigin(Resource):
        isLeaf = True

        def render_GET(self, request: Request) -> bytes:
            path = request.path.decode("utf-8", "replace")
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            if path == "/healthz":
                request.setHeader(b"cache-control", b"no-store")
                request.setHeader(b"content-type", b"text/plain")
                return b"ok\n"
            if path == "/login":
                request.setResponseCode(401)
                request.setHeader(b"cache-control", b"no-store")
                request.setHeader(b"www-authenticate", b'Basic realm="demo"')
                return b"<p>wrong password (five of these in a minute get you banned)</p>\n"
            match = _PRODUCT.match(path)
            if path == "/":
                title, tags = "Demo shop", "home"
            elif match is not None:
                title, tags = f"Product {match.group(1)}", f"products, product-{match.group(1)}"
            else:
                request.setResponseCode(404)
                request.setHeader(b"cache-control", b"no-store")
                return b"<p>not found; try /products/1</p>\n"
            count = renders[path] = renders.get(path, 0) + 1
            request.setHeader(b"cache-control", f"public, max-age={MAX_AGE}".encode())
            request.setHeader(b"x-cache-tags", tags.encode())
            stamp = time.strftime("%H:%M:%S")
            return (
                f"<h1>{title}</h1>\n<p>rendered by the demo origin at {stamp} "
                f"(render #{count} of {path}); cache tags: {tags}</p>\n"
            ).encode()

    status = [0]

    def listening(listener: Any) -> None:
        print(f"edgeauth demo origin listening on {HOST}:{port}", flush=True)

    def failed(failure: Failure) -> None:
        print(f"edgeauth demo origin cannot listen: {failure.getErrorMessage()}", flush=True)
        status[0] = 1
        reactor.stop()  # type: ignore[attr-defined]

    site = Site(DemoOrigin())
    site.displayTracebacks = False
    endpoint = serverFromString(reactor, f"tcp:{port}:interface={HOST}")
    endpoint.listen(site).addCallbacks(listening, failed)
    reactor.run()  # type: ignore[attr-defined]
    return status[0]


# --- command line ---------------------------------------------------------------------------------


def _ports(text: str) -> str:
    if text not in ("fixed", "auto"):
        raise argparse.ArgumentTypeError("give fixed (4000, 5001-5003, 5101-5103, 8080) or auto")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m edgeauth.demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m edgeauth.demo",
        description="A local edgeauth fleet: a master, three edges and a demo origin.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in (
        ("run", "start the fleet and keep it running until Ctrl-C (make run)"),
        ("tour", "start the fleet, play a scripted tour, stop (make demo)"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "--ports",
            type=_ports,
            default="fixed",
            help="fixed: master 4000, edges 5001-5003, admin 5101-5103, origin 8080 (default); "
            "auto: free ports picked at start",
        )
        sub.add_argument(
            "--var",
            type=Path,
            default=Path("var"),
            help="directory for tokens, ini, databases and logs (default: var)",
        )
        sub.add_argument(
            "--timeout",
            type=float,
            default=START_TIMEOUT,
            help=f"seconds for every process to become healthy (default {START_TIMEOUT:g})",
        )
    sub = commands.add_parser("origin", help="serve the demo origin alone (used by run and tour)")
    sub.add_argument("--port", type=int, default=Ports.origin)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo command; return the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "origin":
        return serve_origin(args.port)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C stops everything even when started from a shell that ignores SIGINT for background
    # jobs (Python keeps an inherited SIG_IGN otherwise).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ports = free_ports() if args.ports == "auto" else Ports()
    options = Options(var=args.var.absolute(), ports=ports, timeout=args.timeout)
    try:
        return cmd_run(options) if args.command == "run" else cmd_tour(options)
    except DemoError as exc:
        print(f"edgeauth demo: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
