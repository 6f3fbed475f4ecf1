"""The agent box's protobuf mapping: node API requests → agent requests, agent replies → node
API responses (pure).

Every protobuf ⇄ domain conversion lives in the box that owns the domain type (see the README's
architecture section); the gRPC handlers (:mod:`quantix.rpc.agent_rpcs`) keep only the control
flow: the round trips, the chunking loop of file transfers and the error answers.
"""

from __future__ import annotations

from quantix.agent.protocol import set_timestamp
from quantix.agent.quiesce import Frozen
from quantix.proto import agent_pb2, node_pb2

#: Bytes per file-transfer round trip.
CHUNK = 64 * 1024


def ping_response(pong: agent_pb2.PongResponse) -> node_pb2.AgentPingResponse:
    return node_pb2.AgentPingResponse(
        connected=True, version=pong.version, uptime_seconds=pong.uptime_seconds
    )


def execute_request(request: node_pb2.ExecuteInGuestRequest, seconds: int) -> agent_pb2.ExecuteRequest:
    """Every field passed on; ``seconds`` is the command's timeout (the request's, or a default)."""
    return agent_pb2.ExecuteRequest(
        command=request.command,
        args=request.args,
        working_directory=request.working_directory,
        environment=request.environment,
        timeout_seconds=seconds,
        wait_for_exit=request.wait_for_exit,
    )


def execute_response(
    request: node_pb2.ExecuteInGuestRequest, r: agent_pb2.ExecuteResponse
) -> node_pb2.ExecuteInGuestResponse:
    """``success`` also needs exit code 0 when the caller waited for the exit."""
    ok = not r.error and not r.timed_out and (r.exit_code == 0 or not request.wait_for_exit)
    return node_pb2.ExecuteInGuestResponse(
        success=ok,
        exit_code=r.exit_code,
        stdout=r.stdout,
        stderr=r.stderr,
        timed_out=r.timed_out,
        duration_ms=r.duration_ms,
        error=r.error,
    )


def file_read_request(path: str, offset: int, length: int) -> agent_pb2.FileReadRequest:
    return agent_pb2.FileReadRequest(path=path, offset=offset, length=length, chunk_size=length)


def file_write_requests(request: node_pb2.WriteGuestFileRequest) -> list[agent_pb2.FileWriteRequest]:
    """The payload in :data:`CHUNK` pieces; an empty payload is one empty chunk, so the file is
    still created/truncated."""
    payload = request.data
    chunks = [payload[i : i + CHUNK] for i in range(0, len(payload), CHUNK)] or [b""]
    return [
        agent_pb2.FileWriteRequest(
            path=request.path,
            data=chunk,
            offset=n * CHUNK,
            eof=n == len(chunks) - 1,
            mode=request.mode,
            create_parents=request.create_parents,
            chunk_number=n,
            total_chunks=len(chunks),
        )
        for n, chunk in enumerate(chunks)
    ]


def shutdown_request(request: node_pb2.GuestShutdownRequest) -> agent_pb2.ShutdownRequest:
    kind = agent_pb2.SHUTDOWN_TYPE_REBOOT if request.reboot else agent_pb2.SHUTDOWN_TYPE_POWEROFF
    return agent_pb2.ShutdownRequest(type=kind, delay_seconds=request.delay_seconds, message=request.message)


def shutdown_response(r: agent_pb2.ShutdownResponse) -> node_pb2.GuestShutdownResponse:
    return node_pb2.GuestShutdownResponse(accepted=r.accepted, error=r.error)


def quiesce_request(
    request: node_pb2.QuiesceFilesystemsRequest, seconds: int
) -> agent_pb2.QuiesceFilesystemsRequest:
    """``seconds`` is the freeze lifetime (the request's, or a default)."""
    return agent_pb2.QuiesceFilesystemsRequest(
        mount_points=request.mount_points,
        timeout_seconds=seconds,
        run_pre_freeze_scripts=request.run_pre_freeze_scripts,
    )


def quiesce_response(frozen: Frozen) -> node_pb2.QuiesceFilesystemsResponse:
    """The agent's per-filesystem report, and the thaw token when the freeze succeeded."""
    r = frozen.reply
    out = node_pb2.QuiesceFilesystemsResponse(success=r.success, error=r.error)
    for f in r.frozen:
        out.frozen.add(
            mount_point=f.mount_point,
            device=f.device,
            filesystem=f.filesystem,
            frozen=f.frozen,
            error=f.error,
        )
    if r.success:
        out.quiesce_token = frozen.token
    return out


def thaw_request(request: node_pb2.ThawFilesystemsRequest) -> agent_pb2.ThawFilesystemsRequest:
    return agent_pb2.ThawFilesystemsRequest(
        mount_points=request.mount_points, run_post_thaw_scripts=request.run_post_thaw_scripts
    )


def thaw_response(r: agent_pb2.ThawFilesystemsResponse) -> node_pb2.ThawFilesystemsResponse:
    return node_pb2.ThawFilesystemsResponse(
        success=r.success,
        thawed_mount_points=r.thawed_mount_points,
        error=r.error,
        frozen_duration_ms=r.frozen_duration_ms,
    )


def sync_time_request(request: node_pb2.SyncTimeRequest, now: float) -> agent_pb2.SyncTimeRequest:
    """Set the guest's clock to ``now`` (the host's wall clock); ``force`` steps, not slews."""
    req = agent_pb2.SyncTimeRequest(force=request.force)
    set_timestamp(req.set_time, now)
    return req


def sync_time_response(r: agent_pb2.SyncTimeResponse) -> node_pb2.SyncTimeResponse:
    return node_pb2.SyncTimeResponse(
        success=r.success, offset_seconds=r.offset_seconds, time_source=r.time_source, error=r.error
    )
