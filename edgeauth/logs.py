"""Log observers of both roles: twistd's text lines by default, or one JSON object a line.

twistd owns the log: it builds the observer when it starts the application. Text lines are
exactly twistd's (``textFileLogObserver``, same file, ``SIGUSR1`` rotation), written by
:func:`text_logger`, which :func:`select_for_twistd` names as twistd's ``--logger``: it formats
each line's timestamp once per second instead of once per line, which was about a tenth of the
master's CPU per write (every write has its audit line). There are three ways to get JSON lines,
all ending in :func:`json_observer`:

- ``twistd --logger edgeauth.logs.json_logger edgeauth-master ...`` (twistd's own option; the
  lines go to standard output, as with ``--nodaemon``);
- ``twistd edgeauth-master --json-logs ...`` (the same, to twistd's ``--logfile`` when one is
  given, to ``twistd.log`` for a daemon without one, as twistd does);
- ``[logging] format = json`` in the ini file (as ``--json-logs``).

The last two work through :func:`select_for_twistd`, which the plugins' ``postOptions`` call: it
sets twistd's ``logger`` option as if ``--logger edgeauth.logs.json_logger`` had been given,
unless a ``--logger`` was.

A JSON line holds ``time`` (Unix seconds), ``level``, ``namespace``, ``system``, ``message``
(the event formatted as the text log shows it), ``failure`` (a traceback, when one is logged),
and the event's own fields of plain types (strings, numbers, booleans, null; bytes are decoded,
anything else is shown with ``str``). What edgeauth logs never holds a token or a JWT: tokens
are not logged by the master, the edge or their HTTP access logs (which record request lines,
never headers), and a test checks both formats.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python import usage
from twisted.python.logfile import LogFile

__all__ = [
    "FORMATS",
    "event_as_json_line",
    "json_logger",
    "json_observer",
    "observer_factory",
    "select_for_twistd",
    "text_logger",
    "text_observer",
]

FORMATS = ("text", "json")
"""The values of ``[logging] format``."""

_RESERVED = frozenset(
    {"time", "level", "namespace", "system", "message", "failure", "format", "isError", "why"}
    | {"printed"}  # legacy log.msg keys
    | {
        f"log_{name}"  # twisted.logger's own keys (an event may have its own log_* fields)
        for name in (
            "logger level namespace source format time failure flattened io legacy system text"
            " timestamp trace"
        ).split()
    }
)


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def event_as_json_line(event: LogEvent) -> str:
    """Return one log event as a JSON object and a newline."""
    level = event.get("log_level")
    doc: dict[str, Any] = {
        "time": event.get("log_time", event.get("time")),
        "level": getattr(level, "name", None) or ("error" if event.get("isError") else "info"),
        "namespace": event.get("log_namespace"),
        "system": event.get("log_system", event.get("system")),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure", event.get("failure"))
    if failure is not None:
        try:
            doc["failure"] = failure.getTraceback()
        except Exception:  # a Failure that cannot format itself must not lose the event
            doc["failure"] = repr(failure)
    for key, value in event.items():
        if key in _RESERVED or key in doc:
            continue
        doc[key] = _plain(value)
    return json.dumps(doc, default=str, separators=(",", ":"), ensure_ascii=False) + "\n"


class _SecondTimestamps:
    """twistd's timestamp of a log line (RFC 3339, local time), formatted once per second.

    Twisted's ``formatTime`` builds a time zone and a datetime and calls ``strftime`` for every
    line, ~10 µs, about half of what a line costs the text observer (on the master every write
    has its audit line). The text only changes with the second (time zone offsets change on
    whole seconds), so the text of the last second is kept: the same text, formatted by the
    same function.
    """

    def __init__(self, time_format: str = timeFormatRFC3339) -> None:
        self.time_format = time_format
        self._last: tuple[int, str] | None = None  # (second, its text), replaced as a whole

    def __call__(self, when: float | None) -> str:
        if (
            not isinstance(when, float | int)
            or isinstance(when, bool)
            or not -1e12 < when < 1e12
            or when - math.floor(when) >= 0.999999  # datetime may round it up to the next second
        ):
            return formatTime(when, self.time_format)
        second = math.floor(when)
        last = self._last
        if last is not None and last[0] == second:
            return last[1]
        text = formatTime(second, self.time_format)
        self._last = (second, text)
        return text


def text_observer(out: IO[Any]) -> ILogObserver:
    """Return twistd's usual text observer on ``out`` (the default format).

    The lines are exactly those of ``twisted.logger.textFileLogObserver(out)``; only the
    timestamp text is reused within a second (:class:`_SecondTimestamps`).
    """
    timestamps = _SecondTimestamps()

    def format_event(event: LogEvent) -> str | None:
        return formatEventAsClassicLogText(event, formatTime=timestamps)

    return FileLogObserver(out, format_event)


def text_logger() -> ILogObserver:
    """Observer factory for twistd's text lines, chosen by :func:`select_for_twistd`.

    It writes where twistd's own text observer would: standard output (``--nodaemon`` without
    ``--logfile``, or ``--logfile -``), else the ``--logfile`` (``twistd.log`` by default) as a
    ``LogFile`` that ``SIGUSR1`` rotates unless another handler is set, as twistd does.
    """
    if _twistd_logfile is None:
        return text_observer(sys.stdout)
    logfile = LogFile.fromFullPath(_twistd_logfile)
    if not signal.getsignal(signal.SIGUSR1):  # twistd: "override if set to None or SIG_DFL"

        def rotate(signum: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(logfile.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return text_observer(logfile)


def json_observer(out: IO[str]) -> ILogObserver:
    """Return an observer that writes every event to ``out`` as one JSON line."""
    return FileLogObserver(out, event_as_json_line)


def json_logger() -> ILogObserver:
    """Observer factory for ``twistd --logger edgeauth.logs.json_logger``.

    JSON lines go to standard output, or to the file :func:`select_for_twistd` chose.
    """
    return observer_factory(_twistd_logfile)()


def observer_factory(logfile: str | None) -> Callable[[], ILogObserver]:
    """Return a factory of JSON observers on ``logfile`` (``-`` or None: standard output)."""

    def make() -> ILogObserver:
        if logfile in (None, "", "-"):
            return json_observer(sys.stdout)
        return json_observer(LogFile.fromFullPath(logfile))  # type: ignore[arg-type]

    return make


_twistd_logfile: str | None = None
"""Where :func:`json_logger` writes when :func:`select_for_twistd` picked it (None: stdout)."""


def select_for_twistd(options: usage.Options, log_format: str) -> None:
    """Make twistd log JSON lines when ``log_format`` is ``json``, else its text lines (cheaper).

    Called from a plugin's ``postOptions``: twistd resolves its ``logger`` option (a dotted name)
    only after the plugin's options are parsed, so setting it here is the same as ``--logger
    edgeauth.logs.json_logger`` (or ``text_logger``). An explicit ``--logger`` wins; ``--logfile``
    is honoured (and a daemon without one writes ``twistd.log``, as twistd does). For text, twistd
    keeps its own observer where it would not write to a file or standard output (``--syslog``,
    a daemon asked for ``--logfile -``, or options other than the POSIX ones).
    """
    global _twistd_logfile
    parent = options.parent
    if parent is None or parent.get("logger"):
        return
    logfile = parent.get("logfile")
    if log_format == "json":
        if not logfile and "nodaemon" in parent and not parent["nodaemon"]:
            logfile = "twistd.log"
        _twistd_logfile = logfile
        parent["logger"] = f"{__name__}.json_logger"
        return
    if "nodaemon" not in parent or "syslog" not in parent or parent["syslog"]:
        return
    if logfile == "-" or (parent["nodaemon"] and not logfile):
        if not parent["nodaemon"]:
            return  # twistd refuses it: "Daemons cannot log to stdout"
        logfile = None
    else:
        logfile = logfile or "twistd.log"
    _twistd_logfile = logfile
    parent["logger"] = f"{__name__}.text_logger"
