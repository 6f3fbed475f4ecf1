"""A stand-in for a guest's qemu-ga at the level of libvirt's ``qemuAgentCommand``.

Our QEMU test guests have no OS, so no real qemu-ga can answer; this peer takes the JSON
commands libvirt would pass on and answers them as qemu-ga does (``guest-ping``,
``guest-file-open/write/close``, ``guest-exec``), with switches for the failures that matter:
no agent (libvirt's "not connected" error), a policy that blocks a command, short writes.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import libvirt


class FakeLibvirtError(libvirt.libvirtError):
    """A libvirtError with its own text (a real one would pick up the thread's last error)."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.err = None
        self.message = message

    def get_error_message(self) -> str:
        return self.message


class QemuGuestAgentPeer:
    """Call it as libvirt's runner: ``peer(dom, json_command, timeout) -> json_reply``."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.open: dict[int, str] = {}
        self.execs: list[tuple[str, list[str]]] = []
        self.commands: list[dict[str, Any]] = []
        self.timeouts: list[int] = []
        self.absent = False
        self.blocked: set[str] = set()
        self.short_write = False
        self._next = 1000

    def __call__(self, dom: Any, command: str, timeout: int) -> str:
        cmd = json.loads(command)
        self.commands.append(cmd)
        self.timeouts.append(timeout)
        if self.absent:
            raise FakeLibvirtError("Guest agent is not responding: QEMU guest agent is not connected")
        name, args = cmd["execute"], cmd.get("arguments", {})
        if name in self.blocked:
            return json.dumps(
                {"error": {"class": "GenericError", "desc": f"Command {name} has been disabled"}}
            )
        handler = getattr(self, "_" + name.replace("-", "_"), None)
        if handler is None:
            return json.dumps(
                {"error": {"class": "CommandNotFound", "desc": f"The command {name} has not been found"}}
            )
        return json.dumps({"return": handler(args)})

    def _guest_ping(self, args: dict) -> dict:
        return {}

    def _guest_file_open(self, args: dict) -> int:
        self._next += 1
        self.open[self._next] = args["path"]
        self.files[args["path"]] = b""
        return self._next

    def _guest_file_write(self, args: dict) -> dict:
        data = base64.b64decode(args["buf-b64"])
        path = self.open[args["handle"]]
        count = len(data) - 1 if self.short_write and data else len(data)
        self.files[path] += data[:count]
        return {"count": count, "eof": False}

    def _guest_file_close(self, args: dict) -> dict:
        self.open.pop(args["handle"])
        return {}

    def _guest_exec(self, args: dict) -> dict:
        self.execs.append((args["path"], list(args.get("arg", []))))
        return {"pid": 4242}

    def names(self) -> list[str]:
        return [c["execute"] for c in self.commands]
