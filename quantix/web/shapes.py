"""The JSON bodies of the 8443 VM routes, built from box values (pure).

camelCase keys, counts as JSON integers, ``null`` where upstream sends it; never protobuf's JSON
mapping, which quotes 64-bit integers (the control plane decodes them into Go integers) and
drops zero values. Shapes follow the research note B.2 (upstream ``http_server.rs``).
"""

from __future__ import annotations

import datetime
import posixpath

from google.protobuf.timestamp_pb2 import Timestamp

from quantix.agent.guestinfo import GuestInfo
from quantix.hypervisor.consoles import LogTail
from quantix.proto import agent_pb2
from quantix.util.jsontypes import JsonObject, JsonValue
from quantix.web.errors import bad_request

MAX_GUEST_PATH = 4096


def rfc3339(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).isoformat().replace("+00:00", "Z")


def vm_logs(vm_id: str, name: str, t: LogTail) -> JsonObject:
    return {
        "vmId": vm_id,
        "vmName": name,
        "qemuLog": t.text,
        "logPath": t.path,
        "logSizeBytes": t.size,
        "linesReturned": t.lines,
        "truncated": t.truncated,
        "lastModified": rfc3339(t.modified) if t.modified is not None else None,
    }


def _usage(t: agent_pb2.TelemetryReport) -> JsonObject:
    return {
        "cpuUsagePercent": t.cpu_usage_percent,
        "memoryTotalBytes": t.memory_total_bytes,
        "memoryUsedBytes": t.memory_used_bytes,
        "memoryAvailableBytes": t.memory_available_bytes
        or max(t.memory_total_bytes - t.memory_used_bytes, 0),
        "swapTotalBytes": t.swap_total_bytes,
        "swapUsedBytes": t.swap_used_bytes,
        "loadAvg1": t.load_avg_1,
        "loadAvg5": t.load_avg_5,
        "loadAvg15": t.load_avg_15,
        "disks": [
            {
                "mountPoint": d.mount_point,
                "device": d.device,
                "filesystem": d.filesystem,
                "totalBytes": d.total_bytes,
                "usedBytes": d.used_bytes,
                "availableBytes": d.available_bytes,
                "usagePercent": d.usage_percent
                or (100.0 * d.used_bytes / d.total_bytes if d.total_bytes else 0.0),
            }
            for d in t.disks
        ],
        "processCount": t.process_count,
        "uptimeSeconds": t.uptime_seconds,
    }


def agent_status(info: GuestInfo, error: str | None = None) -> JsonObject:
    """``agent/ping`` and ``agent/refresh``: what the guest agent last told us."""
    body: JsonObject = {
        "connected": info.connected,
        "ipAddresses": list(info.ip_addresses),
        "capabilities": list(info.capabilities),
    }
    if info.connected:
        for key, value in (
            ("version", info.version),
            ("hostname", info.hostname),
            ("osName", info.os_name),
            ("osVersion", info.os_version),
            ("kernelVersion", info.kernel_version),
            ("architecture", info.architecture),
        ):
            if value:
                body[key] = value
        if info.telemetry is not None:
            body["resourceUsage"] = _usage(info.telemetry)
    if error is not None:
        body["error"] = error
    elif not info.connected:
        body["error"] = "the guest agent is not connected"
    return body


def disconnected(error: str) -> JsonObject:
    return agent_status(GuestInfo(), error)


def execute(r: agent_pb2.ExecuteResponse, wait_for_exit: bool) -> JsonObject:
    """``execute``: success means the command ran and exited 0 (or was started, without waiting)."""
    ok = not r.error and not r.timed_out and (r.exit_code == 0 or not wait_for_exit)
    body: JsonObject = {
        "success": ok,
        "exitCode": r.exit_code,
        "stdout": r.stdout,
        "stderr": r.stderr,
        "timedOut": r.timed_out,
        "durationMs": r.duration_ms,
    }
    if r.error:
        body["error"] = r.error
    return body


def execute_failed(error: str) -> JsonObject:
    return {
        "success": False,
        "exitCode": -1,
        "stdout": "",
        "stderr": "",
        "timedOut": False,
        "durationMs": 0,
        "error": error,
    }


def outcome(success: bool, message: str, error: str | None = None, **extra: JsonValue) -> JsonObject:
    """``{success, message, error?}`` of agent shutdown/reboot/update and similar actions."""
    body: JsonObject = {"success": success, "message": message, **extra}
    if error:
        body["error"] = error
    return body


def _stamp(ts: Timestamp) -> str | None:
    if not ts.seconds and not ts.nanos:
        return None
    return rfc3339(ts.seconds + ts.nanos / 1e9)


def directory(path: str, r: agent_pb2.ListDirectoryResponse) -> JsonObject:
    entries: list[JsonValue] = []
    for e in r.entries:
        entry: JsonObject = {
            "name": e.name,
            "path": e.path,
            "isDirectory": e.is_directory,
            "isSymlink": e.is_symlink,
            "sizeBytes": e.size_bytes,
            "mode": e.mode,
        }
        modified = _stamp(e.modified_at)
        if modified is not None:
            entry["modifiedAt"] = modified
        if e.owner:
            entry["owner"] = e.owner
        if e.group:
            entry["group"] = e.group
        entries.append(entry)
    body: JsonObject = {"success": r.success, "path": path, "entries": entries}
    if r.error:
        body["error"] = r.error
    return body


def guest_path(text: str | None, name: str = "path") -> str:
    """A guest path from a query: absolute and already normal, so ``..``, ``.``, ``//``, NUL or a
    relative path cannot make it name something other than what it spells."""
    if text is None or text == "":
        raise bad_request(f"query parameter {name!r} is required", "missing_parameter")
    if len(text) > MAX_GUEST_PATH or "\0" in text:
        raise bad_request(f"{name} is too long or contains NUL", "invalid_path")
    if not text.startswith("/"):
        raise bad_request(f"{name} must be an absolute path", "invalid_path")
    if text.startswith("//") or (text != "/" and posixpath.normpath(text) != text.rstrip("/")):
        raise bad_request(f"{name} must be a normalized absolute path (no '..', '.' or '//')", "invalid_path")
    return text


def int_param(text: str | None, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter in ``[low, high]``; anything else is 400 JSON."""
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise bad_request(f"{name} must be an integer", "invalid_parameter") from None
    if not low <= value <= high:
        raise bad_request(f"{name} must be between {low} and {high}", "invalid_parameter")
    return value
