"""The QEMU guest agent (qemu-ga), reached through libvirt's ``qemuAgentCommand``.

Used where our own agent cannot help: to tell whether a guest runs qemu-ga at all (the control
plane's "QEMU agent" badge) and to install our agent into a guest that does not have it yet.
New domains carry the ``org.qemu.guest_agent.0`` channel for this (:mod:`domainxml`).

Everything here blocks (libvirt waits for the guest): call it from a worker thread. Every
command has a timeout in seconds that libvirt enforces, and multi-step work takes an absolute
deadline, so a guest that never answers costs a bounded time.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import attrs
import libvirt

from quantix import errors
from quantix.hypervisor import vms
from quantix.util.jsontypes import JsonObject, JsonValue

PING_TIMEOUT = 5
COMMAND_TIMEOUT = 10
CHUNK = 64 * 1024
INSTALL_DEADLINE = 25.0  # the control plane gives the whole route 30 s
AGENT_TMP = "/tmp/quantix-kvm-agent"
SCRIPT_PATH = "/tmp/quantix-kvm-agent-install.sh"
#: Moves the copied binary into place and starts it as a service (or in the background).
INSTALL_SCRIPT = """#!/bin/sh
set -e
install -m 0755 /tmp/quantix-kvm-agent /usr/local/bin/quantix-kvm-agent
rm -f /tmp/quantix-kvm-agent
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  cat > /etc/systemd/system/quantix-kvm-agent.service <<'UNIT'
[Unit]
Description=Quantix KVM guest agent
After=network.target

[Service]
ExecStart=/usr/local/bin/quantix-kvm-agent
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
UNIT
  systemctl daemon-reload
  systemctl enable quantix-kvm-agent.service
  systemctl restart quantix-kvm-agent.service
else
  nohup /usr/local/bin/quantix-kvm-agent >/var/log/quantix-kvm-agent.log 2>&1 &
fi
"""
_DISABLED_WORDS = ("not allowed", "disabled", "blocked")

#: ``run(domain, json_command, timeout_seconds) -> json_reply``: libvirt's call, or a test's.
Runner = Callable[[libvirt.virDomain, str, int], str | None]


class QemuAgentError(errors.Unavailable):
    """qemu-ga is absent, silent or refused the command; the text says which."""


class CommandDisabled(QemuAgentError):
    """The guest's qemu-ga policy forbids the command (``--block-rpcs``, an allow-list)."""


def libvirt_runner(dom: libvirt.virDomain, command: str, timeout: int) -> str | None:
    import libvirt_qemu  # part of libvirt-python; imported late so the module loads without it

    return libvirt_qemu.qemuAgentCommand(dom, command, timeout, 0)


def _error(text: str) -> QemuAgentError:
    lowered = text.lower()
    cls = CommandDisabled if any(w in lowered for w in _DISABLED_WORDS) else QemuAgentError
    return cls(text)


class QemuAgent:
    """Commands to one domain's qemu-ga. Blocking; every call is bounded by its timeout."""

    def __init__(self, dom: libvirt.virDomain, run: Runner = libvirt_runner) -> None:
        self.dom = dom
        self.run = run

    def command(
        self, execute: str, arguments: Mapping[str, object] | None = None, timeout: int = COMMAND_TIMEOUT
    ) -> JsonValue:
        """Send one command; its ``return`` value, or QemuAgentError with libvirt's or the guest's text."""
        payload: dict[str, object] = {"execute": execute}
        if arguments:
            payload["arguments"] = arguments
        try:
            raw = self.run(self.dom, json.dumps(payload), max(1, int(timeout)))
        except libvirt.libvirtError as exc:
            raise _error(exc.get_error_message() or str(exc)) from None
        if raw is None:
            return None
        try:
            reply: JsonValue = json.loads(raw)
        except ValueError:
            raise QemuAgentError(f"{execute}: the guest agent sent a reply that is not JSON") from None
        if not isinstance(reply, dict):
            raise QemuAgentError(f"{execute}: unexpected reply from the guest agent")
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            raise _error(f"{execute}: {err.get('desc') or err.get('class') or 'failed'}")
        return reply.get("return")

    def ping(self, timeout: int = PING_TIMEOUT) -> None:
        self.command("guest-ping", timeout=timeout)

    def write_file(
        self, path: str, chunks: Iterable[bytes], deadline: float, clock: Callable[[], float] = time.monotonic
    ) -> int:
        """Write the byte chunks to ``path`` in the guest (``guest-file-open/write/close``)."""
        handle = self.command("guest-file-open", {"path": path, "mode": "w"}, _left(deadline, clock))
        written = 0
        try:
            for chunk in chunks:
                buf = base64.b64encode(chunk).decode("ascii")
                r = self.command(
                    "guest-file-write", {"handle": handle, "buf-b64": buf}, _left(deadline, clock)
                )
                count = r.get("count") if isinstance(r, dict) else None
                if not isinstance(count, int) or count != len(chunk):
                    raise QemuAgentError(
                        f"guest-file-write: short write to {path} ({count} of {len(chunk)} bytes)"
                    )
                written += count
        finally:
            try:
                self.command("guest-file-close", {"handle": handle}, COMMAND_TIMEOUT)
            except QemuAgentError:
                pass
        return written

    def exec(self, path: str, args: list[str]) -> int:
        """Start ``path args`` in the guest without waiting; its pid."""
        r = self.command("guest-exec", {"path": path, "arg": args, "capture-output": False})
        pid = r.get("pid") if isinstance(r, dict) else None
        if not isinstance(pid, int):
            raise QemuAgentError("guest-exec: no pid in the reply")
        return pid


def _left(deadline: float, clock: Callable[[], float]) -> int:
    left = deadline - clock()
    if left <= 0:
        raise errors.Timeout("the guest agent did not finish within the deadline")
    return max(1, min(COMMAND_TIMEOUT, int(left)))


def state_text(dom: libvirt.virDomain) -> str:
    """``running``, ``paused``, ``shut off``, ... for messages."""
    names = {
        libvirt.VIR_DOMAIN_RUNNING: "running",
        libvirt.VIR_DOMAIN_PAUSED: "paused",
        libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
        libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
        libvirt.VIR_DOMAIN_CRASHED: "crashed",
        libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
        libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    }
    return names.get(vms.state_of(dom), "unknown")


def ping_result(
    dom: libvirt.virDomain, run: Runner = libvirt_runner, timeout: int = PING_TIMEOUT
) -> JsonObject:
    """``{available, error?}`` for ``qemu-agent/ping``: qemu-ga answered ``guest-ping`` in time."""
    if not dom.isActive():
        return {"available": False, "error": f"VM is not running (state: {state_text(dom)})"}
    try:
        QemuAgent(dom, run).ping(timeout)
    except QemuAgentError as exc:
        return {"available": False, "error": str(exc)}
    return {"available": True}


@attrs.frozen
class InstallResult:
    success: bool
    message: str
    method: str
    error: str | None = None

    def to_json(self) -> JsonObject:
        out: JsonObject = {"success": self.success, "message": self.message, "method": self.method}
        if self.error is not None:
            out["error"] = self.error
        return out


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def install_agent(
    dom: libvirt.virDomain,
    binary_path: str | None,
    run: Runner = libvirt_runner,
    deadline_seconds: float = INSTALL_DEADLINE,
    clock: Callable[[], float] = time.monotonic,
) -> InstallResult:
    """Copy our agent binary into the guest in 64 KiB chunks and start its installer.

    Returns once ``guest-exec`` has started the script: installing a service takes the guest a
    while and the control plane waits only 30 s, so the result is "started", and the agent's own
    ``agent_ready`` tells when it runs.
    """
    method = "qemu-guest-agent"

    def failed(text: str, how: str = method) -> InstallResult:
        return InstallResult(False, "agent installation failed", how, text)

    if not binary_path:
        return failed("no agent binary configured on this host (agent.binary_path)")
    if not os.path.isfile(binary_path):
        return failed(f"agent binary not found on this host: {binary_path}")
    if not dom.isActive():
        return failed(f"VM is not running (state: {state_text(dom)})")
    deadline = clock() + deadline_seconds
    agent = QemuAgent(dom, run)
    try:
        agent.ping()
        size = agent.write_file(AGENT_TMP, _file_chunks(binary_path), deadline, clock)
        agent.write_file(SCRIPT_PATH, [INSTALL_SCRIPT.encode()], deadline, clock)
        pid = agent.exec("/bin/sh", [SCRIPT_PATH])
    except CommandDisabled as exc:
        text = f"the guest's QEMU guest agent does not allow it ({exc}); install the agent manually"
        return failed(text, "manual")
    except QemuAgentError as exc:
        return failed(f"QEMU guest agent: {exc}")
    except errors.Timeout:
        return failed(f"copying the agent did not finish within {deadline_seconds:g} s")
    except OSError as exc:
        return failed(f"cannot read the agent binary {binary_path}: {exc.strerror}")
    return InstallResult(
        True, f"copied the agent ({size} bytes); installation started in the guest (pid {pid})", method
    )
