"""Log output for the daemon: level filter and a text, JSON-lines or journald observer.

Everything logs through ``twisted.logger`` with structured fields (``vm_id``, ``method``,
``peer``, ``duration``, ``code``...). The observers here only decide how an event leaves the
process: text for a terminal, one JSON object per line for log shippers, or journald's native
protocol so the fields become queryable journal fields (``journalctl VM_ID=...``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import IO

from twisted.application.internet import ClientService
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.components import Componentized
from zope.interface import implementer

from quantix.config import LoggingConfig

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "quantix-node"

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}
#: syslog priorities (journald's PRIORITY field).
PRIORITIES = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3, LogLevel.critical: 2}

#: Keys of legacy ``twisted.python.log`` events that are bookkeeping, not structured fields.
_LEGACY_KEYS = frozenset({"message", "isError", "time", "format", "why", "failure", "system", "printed"})


def fields(event: LogEvent) -> Iterator[tuple[str, object]]:
    """The event's own structured fields: everything but ``log_*`` and legacy bookkeeping."""
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS:
            continue
        yield key, value


def _json_value(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    name = getattr(value, "name", None)  # enums such as grpc.StatusCode
    return name if isinstance(name, str) else str(value)


def _level_name(event: LogEvent) -> str:
    level = event.get("log_level", LogLevel.info)
    return getattr(level, "name", str(level))


def event_as_json(event: LogEvent) -> str:
    """One log event as one line of JSON (pure): time, level, namespace, message, then fields."""
    stamp = event.get("log_time") or time.time()
    record: dict[str, object] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1e6):06d}Z",
        "level": _level_name(event),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in fields(event):
        record.setdefault(key, _json_value(value))
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


@implementer(ILogObserver)
class JsonLinesObserver:
    """Write one JSON object per line (no RFC 7464 record separators: shippers read plain lines)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._lock = threading.Lock()  # events arrive from gRPC threads as well as the reactor

    def __call__(self, event: LogEvent) -> None:
        line = event_as_json(event) + "\n"
        with self._lock:
            self.stream.write(line)
            self.stream.flush()


_RESERVED = frozenset(
    {"MESSAGE", "MESSAGE_ID", "PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC", "ERRNO", "TID", "UNIT"}
    | {"SYSLOG_FACILITY", "SYSLOG_IDENTIFIER", "SYSLOG_PID", "SYSLOG_TIMESTAMP", "SYSLOG_RAW"}
    | {"DOCUMENTATION", "INVOCATION_ID", "USER_UNIT", "USER_INVOCATION_ID"}
)


def journal_field_name(key: str) -> str:
    """journald field names are ``[A-Z0-9_]``, not starting with ``_`` or a digit."""
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_")
    if not name or name[0].isdigit() or name in _RESERVED:
        name = "QUANTIX_" + name
    return name[:64]


def _journal_pair(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" in data:  # binary-safe form: NAME\n<64-bit LE length><data>\n
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


def journal_datagram(event: LogEvent) -> bytes:
    """One log event in journald's native protocol (pure)."""
    level = event.get("log_level", LogLevel.info)
    message = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        message += "\n" + failure.getTraceback()
    parts = [
        _journal_pair("MESSAGE", message),
        _journal_pair("PRIORITY", str(PRIORITIES.get(level, 6))),
        _journal_pair("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
        _journal_pair("TWISTED_NAMESPACE", str(event.get("log_namespace", ""))),
    ]
    for key, value in fields(event):
        value = _json_value(value)
        text = value if isinstance(value, str) else json.dumps(value)
        parts.append(_journal_pair(journal_field_name(key), text))
    return b"".join(parts)


@implementer(ILogObserver)
class JournaldObserver:
    """Send events to journald's socket; an event it cannot take goes to ``fallback`` as text."""

    def __init__(self, path: str = JOURNAL_SOCKET, fallback: IO[str] | None = None) -> None:
        self.path = path
        self.fallback = textFileLogObserver(fallback if fallback is not None else sys.stderr)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Bounded wait: journald may be busy, and logging happens on the reactor thread too.
        self._sock.settimeout(1.0)

    def __call__(self, event: LogEvent) -> None:
        try:
            self._sock.sendto(journal_datagram(event), self.path)
        except OSError:  # journald gone, busy, or the event is larger than a datagram
            self.fallback(event)


#: Where ``ClientService`` logs its reconnect attempts: the module that defines it (taken from
#: the public class, so no private module is imported and a move in Twisted follows along).
CLIENT_SERVICE_NAMESPACE = ClientService.__module__


def make_observer(
    config: LoggingConfig,
    stream: IO[str] | None = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> ILogObserver:
    """The daemon's observer for ``logging.format``, filtered to ``logging.level``.

    ``stream`` is where text and JSON go (default: this process's stdout, which systemd hands
    to journald). ``journald`` falls back to text on stderr when the journal socket is missing.
    """
    out = stream if stream is not None else sys.stdout
    if config.format == "json":
        observer: ILogObserver = JsonLinesObserver(out)
    elif config.format == "journald" and os.path.exists(journal_socket):
        observer = JournaldObserver(journal_socket, fallback=sys.stderr)
    elif config.format == "journald":
        observer = textFileLogObserver(sys.stderr)
    else:
        observer = textFileLogObserver(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[config.level])
    if config.level != "debug":
        # ClientService logs every reconnect attempt of every VM's agent channel at info: with
        # hundreds of VMs whose agents are not (yet) up, that drowns the log.
        predicate.setLogLevelForNamespace(CLIENT_SERVICE_NAMESPACE, LogLevel.warn)
    return FilteringLogObserver(observer, [predicate])


def twistd_observer(
    config: LoggingConfig, twistd_options: Mapping[str, object] | None
) -> ILogObserver | None:
    """The observer twistd should log to, given its own options (``None``: leave twistd's).

    ``--syslog`` and ``--logger`` keep twistd's choice. Otherwise our format goes where twistd
    would have written: ``--logfile`` when given, stdout with ``-n``, ``twistd.log`` when it
    daemonizes (stdout is /dev/null after the fork).
    """
    if twistd_options is None or twistd_options.get("syslog") or twistd_options.get("logger"):
        return None
    from twisted.python.logfile import LogFile

    path = str(twistd_options.get("logfile") or "")
    if path == "-" or (not path and twistd_options.get("nodaemon")):
        return make_observer(config, sys.stdout)
    return make_observer(config, LogFile.fromFullPath(path or "twistd.log"))


def attach(application: object, observer: ILogObserver | None) -> bool:
    """Make twistd log through ``observer``: twistd uses an ``ILogObserver`` component of the
    application when no ``--logger`` was given. False when there is nothing to attach or the
    parent is not an application (tests run the service tree without one)."""
    if observer is None or not isinstance(application, Componentized):
        return False
    application.setComponent(ILogObserver, observer)
    return True
