"""gRPC handlers of the guest agent RPCs.

They run in gRPC worker threads and reach the agent box through its worker facade
(:class:`quantix.agent.facade.WorkerAgents`), which hops onto the reactor for every round trip,
so channel and freeze state is only ever touched by the reactor. Every request field is passed
on to the agent. No channel: ``Unavailable``; no answer in time:
``Timeout``; the agent reporting a failure: a normal response with ``success=false`` and its text.
The messages themselves are mapped by the agent box (:mod:`quantix.agent.wire`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from quantix.agent import wire
from quantix.agent.protocol import AgentError, ConnectionLost, expect
from quantix.errors import HypervisorDown, Invalid, Unavailable
from quantix.facades import GuestAgents, VmHost
from quantix.hypervisor import vms
from quantix.proto import agent_pb2, node_pb2
from quantix.rpc.registry import rpc

DEFAULT_TIMEOUT = 30.0  # per round trip (ping, one file chunk, shutdown, thaw, time sync)
EXEC_DEFAULT_SECONDS = 60  # when ExecuteInGuest.timeout_seconds is 0
EXEC_GRACE = 5.0  # reply wait beyond the command's own timeout
QUIESCE_DEFAULT_SECONDS = 60  # freeze lifetime when QuiesceFilesystems.timeout_seconds is 0
QUIESCE_GRACE = 10.0
# A read answer stops here (eof=false; the caller continues at offset): it must fit the 4 MiB a
# default gRPC client accepts.
MAX_READ = 4 * 1024 * 1024 - 64 * 1024

T = TypeVar("T")
R = TypeVar("R", bound=Message)


class AgentRpcs:
    """``PingAgent``, ``ExecuteInGuest``, file transfer, shutdown, quiesce/thaw, ``SyncTime``.

    ``agents`` is the agent box seen from a worker thread (freezes are its quiesce owner's);
    ``hypervisor`` tells a VM that does not exist from one without an agent.
    """

    def __init__(
        self, agents: GuestAgents, hypervisor: VmHost, wallclock: Callable[[], float] = time.time
    ) -> None:
        self.agents = agents
        self.hypervisor = hypervisor
        self.wallclock = wallclock
        self._ping_seq = itertools.count(1)  # next() is atomic under the GIL

    def _call(self, vm_id: str, payload: Message, reply: type[R], timeout: float) -> R:
        """One round trip; the guest's answer, of the ``reply`` kind ``payload`` asks for."""
        answer = self._guarded(vm_id, lambda: self.agents.request(vm_id, payload, timeout))
        return expect(answer, reply)

    def _guarded(self, vm_id: str, call: Callable[[], T]) -> T:
        if not vm_id:
            raise Invalid("vm_id is required")
        try:
            return call()
        except Unavailable as exc:
            if not isinstance(exc, ConnectionLost):
                self._require_vm(vm_id)
            raise

    def _require_vm(self, vm_id: str) -> None:
        """No channel because libvirt has no such VM: VMNotFound, which the control plane matches,
        rather than "no agent". Asked only after the agent failed, so a working channel costs
        no libvirt call."""
        try:
            conn = self.hypervisor.conn()
        except HypervisorDown:
            return
        vms.lookup(conn, vm_id)

    @rpc("PingAgent")
    def ping_agent(
        self, request: node_pb2.VMIdRequest, context: grpc.ServicerContext
    ) -> node_pb2.AgentPingResponse:
        seq = next(self._ping_seq)
        started = time.monotonic()
        ping = agent_pb2.PingRequest(sequence=seq)
        pong = self._call(request.vm_id, ping, agent_pb2.PongResponse, DEFAULT_TIMEOUT)
        rtt_ms = (time.monotonic() - started) * 1000
        # The response message has no round-trip field; report it as trailing metadata.
        if context is not None:
            context.set_trailing_metadata((("x-quantix-agent-rtt-ms", f"{rtt_ms:.3f}"),))
        return wire.ping_response(pong)

    @rpc("ExecuteInGuest")
    def execute_in_guest(
        self, request: node_pb2.ExecuteInGuestRequest, context: grpc.ServicerContext
    ) -> node_pb2.ExecuteInGuestResponse:
        if not request.command:
            raise Invalid("command is required")
        seconds = request.timeout_seconds or EXEC_DEFAULT_SECONDS
        req = wire.execute_request(request, seconds)
        try:
            r = self._call(request.vm_id, req, agent_pb2.ExecuteResponse, seconds + EXEC_GRACE)
        except AgentError as e:
            return node_pb2.ExecuteInGuestResponse(success=False, exit_code=-1, error=str(e))
        return wire.execute_response(request, r)

    @rpc("ReadGuestFile")
    def read_guest_file(
        self, request: node_pb2.ReadGuestFileRequest, context: grpc.ServicerContext
    ) -> node_pb2.ReadGuestFileResponse:
        """Read ``max_size`` bytes (0: to the end) from ``offset`` in chunks, at most ``MAX_READ``."""
        if not request.path:
            raise Invalid("path is required")
        limit = min(request.max_size or MAX_READ, MAX_READ)
        data = bytearray()
        offset = request.offset
        total = 0
        eof = False
        while len(data) < limit:
            want = min(wire.CHUNK, limit - len(data))
            req = wire.file_read_request(request.path, offset, want)
            try:
                r = self._call(request.vm_id, req, agent_pb2.FileReadResponse, DEFAULT_TIMEOUT)
            except AgentError as e:
                return node_pb2.ReadGuestFileResponse(success=False, error=str(e))
            if not r.success:
                return node_pb2.ReadGuestFileResponse(success=False, error=r.error or "read failed")
            data += r.data
            offset += len(r.data)
            total = r.total_size
            eof = r.eof or (total > 0 and offset >= total)
            if eof or not r.data:
                eof = eof or not r.data
                break
        return node_pb2.ReadGuestFileResponse(success=True, data=bytes(data), total_size=total, eof=eof)

    @rpc("WriteGuestFile")
    def write_guest_file(
        self, request: node_pb2.WriteGuestFileRequest, context: grpc.ServicerContext
    ) -> node_pb2.WriteGuestFileResponse:
        """Write in 64 KiB chunks; an empty payload still creates/truncates the file."""
        if not request.path:
            raise Invalid("path is required")
        written = 0
        for req in wire.file_write_requests(request):
            try:
                r = self._call(request.vm_id, req, agent_pb2.FileWriteResponse, DEFAULT_TIMEOUT)
            except AgentError as e:
                return node_pb2.WriteGuestFileResponse(success=False, bytes_written=written, error=str(e))
            if not r.success:
                return node_pb2.WriteGuestFileResponse(
                    success=False, bytes_written=written, error=r.error or "write failed"
                )
            written += r.bytes_written
        return node_pb2.WriteGuestFileResponse(success=True, bytes_written=written)

    @rpc("GuestShutdown")
    def guest_shutdown(
        self, request: node_pb2.GuestShutdownRequest, context: grpc.ServicerContext
    ) -> node_pb2.GuestShutdownResponse:
        req = wire.shutdown_request(request)
        try:
            r = self._call(request.vm_id, req, agent_pb2.ShutdownResponse, DEFAULT_TIMEOUT)
        except ConnectionLost:
            # The guest went down before its answer got out: the request reached it.
            return node_pb2.GuestShutdownResponse(accepted=True)
        except AgentError as e:
            return node_pb2.GuestShutdownResponse(accepted=False, error=str(e))
        return wire.shutdown_response(r)

    # -- quiesce / thaw ---------------------------------------------------------------------

    @rpc("QuiesceFilesystems")
    def quiesce_filesystems(
        self, request: node_pb2.QuiesceFilesystemsRequest, context: grpc.ServicerContext
    ) -> node_pb2.QuiesceFilesystemsResponse:
        """Freeze through the agent box's quiesce owner; thawed automatically once
        ``timeout_seconds`` pass without ``ThawFilesystems``."""
        seconds = request.timeout_seconds or QUIESCE_DEFAULT_SECONDS
        req = wire.quiesce_request(request, seconds)
        vm_id = request.vm_id
        try:
            frozen = self._guarded(
                vm_id, lambda: self.agents.freeze(vm_id, req, seconds + QUIESCE_GRACE, seconds)
            )
        except AgentError as e:
            return node_pb2.QuiesceFilesystemsResponse(success=False, error=str(e))
        return wire.quiesce_response(frozen)

    @rpc("ThawFilesystems")
    def thaw_filesystems(
        self, request: node_pb2.ThawFilesystemsRequest, context: grpc.ServicerContext
    ) -> node_pb2.ThawFilesystemsResponse:
        req = wire.thaw_request(request)
        vm_id = request.vm_id
        try:
            r = self._guarded(
                vm_id, lambda: self.agents.thaw(vm_id, request.quiesce_token, req, DEFAULT_TIMEOUT)
            )
        except AgentError as e:
            return node_pb2.ThawFilesystemsResponse(success=False, error=str(e))
        return wire.thaw_response(r)

    @rpc("SyncTime")
    def sync_time(
        self, request: node_pb2.SyncTimeRequest, context: grpc.ServicerContext
    ) -> node_pb2.SyncTimeResponse:
        """Ask the agent to set its clock to the host's (``force`` steps instead of slewing)."""
        req = wire.sync_time_request(request, self.wallclock())
        try:
            r = self._call(request.vm_id, req, agent_pb2.SyncTimeResponse, DEFAULT_TIMEOUT)
        except AgentError as e:
            return node_pb2.SyncTimeResponse(success=False, error=str(e))
        return wire.sync_time_response(r)
