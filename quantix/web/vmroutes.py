"""``/api/v1/vms/{id}/...`` on 8443: QEMU log, guest-agent and QEMU-agent routes, execute, CD-ROM.

Each route is a few lines: find the VM (UUID or name, in a worker thread), call a box, shape
the answer (:mod:`.shapes`). Our agent's requests run on the reactor through the
:class:`~quantix.agent.manager.AgentManager` (no thread waits on a guest); libvirt and the QEMU
guest agent run in the listener's pool. Guest calls have their own bounds (ping 5 s, execute at
most 25 s of guest time) well inside the route deadline.
"""

from __future__ import annotations

import base64
import glob
import os
from collections.abc import Callable

import attrs
import libvirt
from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from quantix import errors
from quantix.agent.manager import AgentManager
from quantix.agent.protocol import AgentError, ConnectionLost, R, expect
from quantix.config import Config
from quantix.hypervisor import consoles, devices, domaininfo, domainxml, qemuagent, vms
from quantix.proto import agent_pb2
from quantix.util.jsontypes import JsonObject
from quantix.web import shapes
from quantix.web.access import Kind
from quantix.web.errors import HttpError
from quantix.web.router import Call
from quantix.web.routes import Routes

VM = "/api/v1/vms/{id}"
PING_TIMEOUT = 5.0
REFRESH_WAIT = 2.0  # for the telemetry a refresh asks for, after the pong
EXEC_MAX_SECONDS = 25  # guest time; the control plane's client gives the whole call 30 s
EXEC_DEFAULT_SECONDS = 30  # what upstream assumes when timeoutSeconds is absent (then clamped)
EXEC_REPLY_GRACE = 2.0
AGENT_TIMEOUT = 10.0  # one file chunk, a shutdown, a journalctl
MAX_FILE_READ = 4 * 1024 * 1024
CHUNK = 64 * 1024
AGENT_UNIT = "quantix-kvm-agent"
TOOLS_ISO_GLOB = "quantix-kvm-agent-tools-*.iso"
NOT_RUNNING = "VM is not running"


@attrs.frozen
class VmRef:
    dom: libvirt.virDomain
    uuid: str
    name: str
    active: bool


class VmRoutes:
    """``conn()`` is the live libvirt connection (raises HypervisorDown); ``agents`` runs on the reactor."""

    def __init__(
        self,
        conn: Callable[[], libvirt.virConnect],
        agents: AgentManager,
        config: Config,
        qga_runner: qemuagent.Runner | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.conn = conn
        self.agents = agents
        self.clock = clock if clock is not None else agents.clock
        self.config = config
        self.qga_runner = qga_runner or qemuagent.libvirt_runner

    def register(self, routes: Routes) -> None:
        routes.add("GET", f"{VM}/logs", Kind.READ, self.logs)
        routes.add("GET", f"{VM}/qemu-agent/ping", Kind.READ, self.qemu_agent_ping)
        routes.add("GET", f"{VM}/agent/ping", Kind.READ, self.agent_ping)
        routes.add("POST", f"{VM}/agent/refresh", Kind.READ, self.agent_refresh)
        routes.add("GET", f"{VM}/agent/logs", Kind.READ, self.agent_logs)
        routes.add("POST", f"{VM}/agent/shutdown", Kind.GUARDED, lambda c: self.agent_power(c, reboot=False))
        routes.add("POST", f"{VM}/agent/reboot", Kind.GUARDED, lambda c: self.agent_power(c, reboot=True))
        routes.add("GET", f"{VM}/agent/files/list", Kind.GUARDED, self.files_list)
        routes.add("GET", f"{VM}/agent/files/read", Kind.GUARDED, self.files_read)
        routes.add("POST", f"{VM}/agent/install", Kind.GUARDED, self.agent_install)
        routes.add("POST", f"{VM}/agent/update", Kind.GUARDED, self.agent_update)
        routes.add("POST", f"{VM}/execute", Kind.GUARDED, self.execute)
        routes.add("POST", f"{VM}/cdrom/mount-agent-iso", Kind.GUARDED, self.mount_agent_iso)

    # -- helpers ----------------------------------------------------------------------------

    def _find(self, vm_id: str) -> VmRef:
        """Blocking: the domain by UUID or name (VMNotFound otherwise)."""
        dom = vms.lookup(self.conn(), vm_id)
        return VmRef(dom, dom.UUIDString(), dom.name(), bool(dom.isActive()))

    def vm(self, call: Call) -> defer.Deferred[VmRef]:
        return call.in_thread(self._find, call.params["id"])

    async def _agent(self, ref: VmRef, payload: Message, reply: type[R], timeout: float) -> R:
        """The agent's reply to ``payload``: the ``reply`` message it is answered with."""
        return expect(await self.agents.request(ref.uuid, payload, timeout), reply)

    # -- QEMU log and QEMU guest agent -------------------------------------------------------

    def logs(self, call: Call) -> defer.Deferred[JsonObject]:
        lines = shapes.int_param(
            call.query("lines"), "lines", consoles.DEFAULT_LOG_LINES, 1, consoles.MAX_LOG_LINES
        )

        def read() -> JsonObject:
            ref = self._find(call.params["id"])
            t = consoles.tail(consoles.log_path(self.config.hypervisor.log_dir, ref.name), lines)
            return shapes.vm_logs(ref.uuid, ref.name, t)

        return call.in_thread(read)

    def qemu_agent_ping(self, call: Call) -> defer.Deferred[JsonObject]:
        def ping() -> JsonObject:
            return qemuagent.ping_result(self._find(call.params["id"]).dom, self.qga_runner)

        d = call.in_thread(ping)
        # libvirt bounds the command to 5 s; this bounds the whole hop, lookup included.
        d.addTimeout(PING_TIMEOUT + 1, call.reactor)

        def late(failure: Failure) -> JsonObject:
            failure.trap(defer.TimeoutError)
            return {
                "available": False,
                "error": f"the QEMU guest agent did not answer within {PING_TIMEOUT:g} s",
            }

        return d.addErrback(late)

    def agent_install(self, call: Call) -> defer.Deferred[JsonObject]:
        call.json()  # {"force": false}: validated, nothing else to take from it

        def install() -> JsonObject:
            ref = self._find(call.params["id"])
            return qemuagent.install_agent(ref.dom, self.config.agent.binary_path, self.qga_runner).to_json()

        return call.in_thread(install)

    # -- our guest agent ---------------------------------------------------------------------

    async def agent_ping(self, call: Call) -> JsonObject:
        ref = await self.vm(call)
        if not ref.active:
            return shapes.disconnected(NOT_RUNNING)
        return shapes.agent_status(self.agents.info(ref.uuid))

    async def agent_refresh(self, call: Call) -> JsonObject:
        """Ask for fresh telemetry (Ping with sequence 1, as upstream) and answer from the cache."""
        ref = await self.vm(call)
        if not ref.active:
            return shapes.disconnected(NOT_RUNNING)
        fresh = self.agents.guests.next_telemetry(ref.uuid)
        try:
            await self._agent(ref, agent_pb2.PingRequest(sequence=1), agent_pb2.PongResponse, PING_TIMEOUT)
        except (errors.Unavailable, errors.Timeout, AgentError) as exc:
            fresh.addErrback(lambda _: None)
            fresh.cancel()
            return shapes.disconnected(str(exc))
        # Agents answer sequence 1 with a telemetry report too; older ones may not.
        fresh.addTimeout(REFRESH_WAIT, self.clock)
        try:
            await fresh
        except defer.TimeoutError:
            pass
        return shapes.agent_status(self.agents.info(ref.uuid))

    async def agent_logs(self, call: Call) -> JsonObject:
        lines = shapes.int_param(call.query("lines"), "lines", 50, 1, consoles.MAX_LOG_LINES)
        ref = await self.vm(call)
        if not ref.active:
            return {"success": False, "lines": [], "error": NOT_RUNNING}
        req = agent_pb2.ExecuteRequest(
            command="journalctl",
            args=["-u", AGENT_UNIT, "-n", str(lines), "--no-pager"],
            timeout_seconds=int(AGENT_TIMEOUT),
            wait_for_exit=True,
        )
        try:
            r = await self._agent(ref, req, agent_pb2.ExecuteResponse, AGENT_TIMEOUT + EXEC_REPLY_GRACE)
        except AgentError as exc:
            return {"success": False, "lines": [], "error": str(exc)}
        body: JsonObject = {
            "success": not r.error and r.exit_code == 0,
            "lines": list(r.stdout.splitlines()[-lines:]),
        }
        if r.error or r.exit_code:
            body["error"] = r.error or r.stderr.strip() or f"journalctl exited {r.exit_code}"
        return body

    async def agent_power(self, call: Call, reboot: bool) -> JsonObject:
        what = "reboot" if reboot else "shutdown"
        ref = await self.vm(call)
        if not ref.active:
            return shapes.outcome(False, f"{what} not sent", NOT_RUNNING)
        kind = agent_pb2.SHUTDOWN_TYPE_REBOOT if reboot else agent_pb2.SHUTDOWN_TYPE_POWEROFF
        try:
            r = await self._agent(
                ref, agent_pb2.ShutdownRequest(type=kind), agent_pb2.ShutdownResponse, AGENT_TIMEOUT
            )
        except ConnectionLost:
            return shapes.outcome(True, f"{what} requested")  # the guest went down before it answered
        except AgentError as exc:
            return shapes.outcome(False, f"{what} failed", str(exc))
        if not r.accepted:
            return shapes.outcome(False, f"{what} refused by the guest", r.error or "not accepted")
        return shapes.outcome(True, f"{what} requested")

    async def files_list(self, call: Call) -> JsonObject:
        path = shapes.guest_path(call.query("path"))
        hidden = (call.query("include_hidden") or "").lower() in ("1", "true", "yes")
        ref = await self.vm(call)
        if not ref.active:
            return {"success": False, "path": path, "entries": [], "error": NOT_RUNNING}
        req = agent_pb2.ListDirectoryRequest(path=path, include_hidden=hidden)
        try:
            r = await self._agent(ref, req, agent_pb2.ListDirectoryResponse, AGENT_TIMEOUT)
        except AgentError as exc:
            return {"success": False, "path": path, "entries": [], "error": str(exc)}
        return shapes.directory(path, r)

    async def files_read(self, call: Call) -> JsonObject:
        path = shapes.guest_path(call.query("path"))
        ref = await self.vm(call)

        def failed(error: str) -> JsonObject:
            return {"success": False, "path": path, "error": error}

        if not ref.active:
            return failed(NOT_RUNNING)
        data = bytearray()
        while True:
            req = agent_pb2.FileReadRequest(path=path, offset=len(data), length=CHUNK, chunk_size=CHUNK)
            try:
                r = await self._agent(ref, req, agent_pb2.FileReadResponse, AGENT_TIMEOUT)
            except AgentError as exc:
                return failed(str(exc))
            if not r.success:
                return failed(r.error or "read failed")
            data += r.data[:CHUNK]
            if r.total_size > MAX_FILE_READ or len(data) > MAX_FILE_READ:
                return failed(f"file is larger than {MAX_FILE_READ} bytes")
            if r.eof or not r.data or (r.total_size and len(data) >= r.total_size):
                break
        content = base64.b64encode(bytes(data)).decode("ascii")
        return {"success": True, "path": path, "content": content, "sizeBytes": len(data)}

    async def execute(self, call: Call) -> JsonObject:
        body = call.json()
        command = body.get("command")
        if not isinstance(command, str) or not command.strip():
            raise errors.Invalid("command is required (a non-empty string)")
        seconds = body.get("timeoutSeconds", EXEC_DEFAULT_SECONDS)
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 0:
            raise errors.Invalid("timeoutSeconds must be a non-negative integer")
        wait = body.get("waitForExit", True)
        if not isinstance(wait, bool):
            raise errors.Invalid("waitForExit must be true or false")
        seconds = min(seconds or EXEC_DEFAULT_SECONDS, EXEC_MAX_SECONDS)
        ref = await self.vm(call)
        if not ref.active:
            return shapes.execute_failed(NOT_RUNNING)
        # No args: the agent runs the text with ``sh -c``, as the control plane's script box expects.
        req = agent_pb2.ExecuteRequest(command=command, timeout_seconds=seconds, wait_for_exit=wait)
        try:
            r = await self._agent(ref, req, agent_pb2.ExecuteResponse, seconds + EXEC_REPLY_GRACE)
        except AgentError as exc:
            return shapes.execute_failed(str(exc))
        return shapes.execute(r, wait)

    async def agent_update(self, call: Call) -> JsonObject:
        """Push ``agent.binary_path`` with the agent's own update request (64 KiB chunks)."""
        body = call.json()
        target = body.get("targetVersion") or ""
        if not isinstance(target, str):
            raise errors.Invalid("targetVersion must be a string")
        ref = await self.vm(call)
        if not ref.active:
            return shapes.outcome(False, "update not started", NOT_RUNNING)
        if not self.agents.info(ref.uuid).connected:
            return shapes.outcome(False, "update not started", "the guest agent is not connected")
        binary = self.config.agent.binary_path
        if not binary or not os.path.isfile(binary):
            return shapes.outcome(
                False,
                "update not started",
                f"no agent binary on this host ({binary or 'agent.binary_path unset'})",
            )
        data = await call.in_thread(_read_file, binary)
        checksum = await call.in_thread(_sha256, data)
        chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
        try:
            for n, chunk in enumerate(chunks):
                req = agent_pb2.AgentUpdateRequest(
                    target_version=target,
                    binary_data=chunk,
                    chunk_number=n,
                    is_last_chunk=n == len(chunks) - 1,
                    checksum_sha256=checksum,
                    total_size=len(data),
                )
                r = await self._agent(ref, req, agent_pb2.AgentUpdateResponse, AGENT_TIMEOUT)
                if not r.success:
                    return shapes.outcome(False, "update failed", r.error or "the agent refused the update")
        except AgentError as exc:
            return shapes.outcome(False, "update failed", str(exc))
        delivered = "update delivered; the agent restarts itself"
        if r.current_version:
            return shapes.outcome(True, delivered, newVersion=r.current_version)
        return shapes.outcome(True, delivered)

    # -- CD-ROM ------------------------------------------------------------------------------

    def mount_agent_iso(self, call: Call) -> defer.Deferred[JsonObject]:
        def mount() -> JsonObject:
            ref = self._find(call.params["id"])
            iso = newest_tools_iso(self.config.storage.iso_images)
            if iso is None:
                raise HttpError(
                    404, "iso_not_found", f"no {TOOLS_ISO_GLOB} in {self.config.storage.iso_images}"
                )
            info = domaininfo.parse_domain(ref.dom.XMLDesc(0))
            drives = [d for d in info.disks if d.device == "cdrom" and d.id != domainxml.CLOUD_INIT_ID]
            if not drives:
                return shapes.outcome(False, "not mounted", "the VM has no CD-ROM drive")
            dev = devices.change_media(ref.dom, drives[0].dev, iso)
            return shapes.outcome(True, f"mounted {os.path.basename(iso)} on {dev}", isoPath=iso, device=dev)

        return call.in_thread(mount)


def newest_tools_iso(iso_dir: str) -> str | None:
    """The agent tools ISO with the highest version in its name (then the newest file)."""
    found = glob.glob(os.path.join(glob.escape(iso_dir), TOOLS_ISO_GLOB))

    def key(path: str) -> tuple[tuple[int, ...], float]:
        version = os.path.basename(path)[len("quantix-kvm-agent-tools-") : -len(".iso")]
        parts = tuple(int(p) if p.isdigit() else -1 for p in version.split("."))
        return parts, os.path.getmtime(path)

    return max(found, key=key) if found else None


def _read_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
