"""GetConsole and GetVMLogs: where to reach a VM's screen, and the tail of its QEMU log."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Callable

import attrs
import libvirt

from quantix import errors
from quantix.hypervisor import domaininfo
from quantix.proto import node_pb2

#: Listen addresses a remote console client cannot dial: replaced by the management IP.
_UNREACHABLE = {"", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost"}

DEFAULT_LOG_LINES = 100
MAX_LOG_LINES = 1000
_READ_BLOCK = 64 * 1024


def console_message(
    info: domaininfo.DomainInfo, management_ip: Callable[[], str]
) -> node_pb2.ConsoleInfoResponse:
    """``ConsoleInfoResponse`` from the live XML (pure but for the lazy management IP)."""
    g = info.console("vnc")
    if g is None:
        raise errors.WrongState(f"VM {info.uuid} has no VNC or SPICE console")
    if g.port is None:
        raise errors.WrongState(f"VM {info.uuid} has no console port: it is not running")
    host = g.listen or ""
    if host in _UNREACHABLE:
        host = management_ip()
    return node_pb2.ConsoleInfoResponse(
        type=g.type, host=dialable(host), port=g.port, password=g.password or ""
    )


def dialable(host: str) -> str:
    """An IPv6 literal in brackets: the control plane joins ``host:port`` unbracketed, which
    only dials when an IPv6 address carries its brackets already (IPv4 and names pass)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[{host}]" if addr.version == 6 else host


def console(dom: libvirt.virDomain, management_ip: Callable[[], str]) -> node_pb2.ConsoleInfoResponse:
    if not dom.isActive():
        raise errors.WrongState(f"VM {dom.UUIDString()} has no console: it is not running")
    # SECURE: the control plane hands the VNC password to its console proxy.
    return console_message(domaininfo.parse_domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)), management_ip)


@attrs.frozen
class LogTail:
    text: str
    path: str
    size: int
    lines: int
    truncated: bool
    modified: float | None


def log_path(log_dir: str, name: str) -> str:
    """``<log_dir>/<name>.log``; a name that would leave the directory is NotFound."""
    base = os.path.realpath(log_dir)
    path = os.path.realpath(os.path.join(base, f"{name}.log"))
    if os.path.dirname(path) != base or not name or "/" in name or "\0" in name:
        raise errors.NotFound(f"no log for VM name {name!r}")
    return path


def tail(path: str, lines: int) -> LogTail:
    """The last ``lines`` lines, reading backwards from the end so a big log costs little."""
    lines = min(lines or DEFAULT_LOG_LINES, MAX_LOG_LINES)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return LogTail("", path, 0, 0, False, None)
    with fh:
        st = os.fstat(fh.fileno())
        pos, buf = st.st_size, b""
        while pos > 0 and buf.count(b"\n") <= lines:
            step = min(_READ_BLOCK, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
    parts = buf.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()  # the final newline ends the last line; it does not start another
    truncated = len(parts) > lines or (pos > 0)
    kept = parts[-lines:] if lines else []
    text = b"\n".join(kept).decode("utf-8", errors="replace")
    return LogTail(text, path, st.st_size, len(kept), truncated, st.st_mtime)


def logs_message(vm_id: str, name: str, t: LogTail) -> node_pb2.GetVMLogsResponse:
    msg = node_pb2.GetVMLogsResponse(
        vm_id=vm_id,
        vm_name=name,
        qemu_log=t.text,
        log_path=t.path,
        log_size_bytes=t.size,
        lines_returned=t.lines,
        truncated=t.truncated,
    )
    if t.modified is not None:
        stamp = datetime.datetime.fromtimestamp(t.modified, tz=datetime.UTC)
        msg.last_modified = stamp.isoformat().replace("+00:00", "Z")
    return msg
