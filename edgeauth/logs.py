"""Log observers of both roles: twistd's text lines by default, or one JSON object a line.

twistd owns the log: it builds the observer when it starts the application. There are three ways
to get JSON lines, all ending in :func:`json_observer`:

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
import sys
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEvent,
    textFileLogObserver,
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


def json_observer(out: IO[str]) -> ILogObserver:
    """Return an observer that writes every event to ``out`` as one JSON line."""
    return FileLogObserver(out, event_as_json_line)


def text_observer(out: IO[str]) -> ILogObserver:
    """Return twistd's usual text observer on ``out`` (the default format)."""
    return textFileLogObserver(out)


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
    """Make twistd log JSON lines when ``log_format`` is ``json``.

    Called from a plugin's ``postOptions``: twistd resolves its ``logger`` option (a dotted name)
    only after the plugin's options are parsed, so setting it here is the same as ``--logger
    edgeauth.logs.json_logger``. An explicit ``--logger`` wins; ``--logfile`` is honoured (and a
    daemon without one writes ``twistd.log``, as twistd does).
    """
    global _twistd_logfile
    parent = options.parent
    if log_format != "json" or parent is None or parent.get("logger"):
        return
    logfile = parent.get("logfile")
    if not logfile and "nodaemon" in parent and not parent["nodaemon"]:
        logfile = "twistd.log"
    _twistd_logfile = logfile
    parent["logger"] = f"{__name__}.json_logger"
