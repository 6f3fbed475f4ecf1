"""A reference guest-side peer of the agent channel, built on Twisted.

It plays QEMU's listening socket and the agent behind it at once: it listens on a UNIX socket,
sends ``agent_ready`` to each client, optionally telemetry on a timer, and answers requests from an
in-memory guest (files, freeze state, clock). Faults are switches: stay silent, inject garbage
before replies, hang up. Used by the tests and by benchmarks; by hand::

    python -m tests.guestpeer /tmp/demo/<vm_id>.agent.sock --telemetry 5
"""

from __future__ import annotations

import argparse
import os
import posixpath
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from quantix.agent import codec
from quantix.agent.guestinfo import AGENT_CONNECTED
from quantix.agent.manager import AgentManager
from quantix.agent.protocol import set_timestamp
from quantix.proto import agent_pb2

VERSION = "0.1.27-peer"
CAPABILITIES = [
    "telemetry",
    "execute",
    "file_read",
    "file_write",
    "shutdown",
    "reboot",
    "quiesce",
    "thaw",
    "sync_time",
]


def default_exec(req: agent_pb2.ExecuteRequest) -> agent_pb2.ExecuteResponse:
    """Pretend to run: ``false`` exits 1, ``explode`` is an agent-side failure, else echo."""
    if req.command == "explode":
        return agent_pb2.ExecuteResponse(exit_code=-1, error="failed to spawn process: explode")
    if not req.wait_for_exit:
        return agent_pb2.ExecuteResponse(exit_code=0)
    if req.command == "false":
        return agent_pb2.ExecuteResponse(exit_code=1, stderr="false failed")
    env = ",".join(f"{k}={v}" for k, v in sorted(req.environment.items()))
    out = f"{req.command} {' '.join(req.args)}|cwd={req.working_directory}|env={env}|t={req.timeout_seconds}"
    return agent_pb2.ExecuteResponse(exit_code=0, stdout=out, duration_ms=1)


def default_telemetry(hostname: str = "peer-guest") -> agent_pb2.TelemetryReport:
    r = agent_pb2.TelemetryReport(
        cpu_usage_percent=12.5,
        memory_total_bytes=1 << 30,
        memory_used_bytes=1 << 28,
        memory_available_bytes=(1 << 30) - (1 << 28),
        load_avg_1=0.5,
        process_count=42,
        uptime_seconds=1234,
        hostname=hostname,
    )
    r.interfaces.add(
        name="eth0",
        mac_address="52:54:00:12:34:56",
        ipv4_addresses=["10.0.0.5/24"],
        state=agent_pb2.INTERFACE_STATE_UP,
    )
    r.disks.add(mount_point="/", filesystem="ext4", device="/dev/vda1", total_bytes=1000, used_bytes=250)
    return r


class GuestPeerProtocol(Protocol):
    factory: GuestPeer

    def connectionMade(self) -> None:
        self.decoder = codec.FrameDecoder()
        self.factory.connections.append(self)
        if self.factory.ready is not None:
            self.send(agent_ready=self.factory.ready)
        self._loop = None
        if self.factory.telemetry_interval:
            self._loop = task.LoopingCall(self.send_telemetry)
            self._loop.clock = self.factory.clock
            self._loop.start(self.factory.telemetry_interval, now=False)
        self.factory._fire("connected", self)

    def connectionLost(self, reason: object = None) -> None:
        if self in self.factory.connections:
            self.factory.connections.remove(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.factory._fire("disconnected", self)

    def send(self, message_id: str = "", **payload: object) -> None:
        msg = agent_pb2.AgentMessage(message_id=message_id or str(uuid.uuid4()))
        set_timestamp(msg.timestamp, self.factory.clock.seconds())
        ((field, value),) = payload.items()
        getattr(msg, field).CopyFrom(value)
        self.transport.write(codec.encode(msg))

    def send_telemetry(self, report: agent_pb2.TelemetryReport | None = None) -> None:
        self.send(telemetry=report or self.factory.telemetry())

    def dataReceived(self, data: bytes) -> None:
        for msg in self.decoder.feed(data):
            kind = msg.WhichOneof("payload")
            self.factory.requests.append(msg)
            self.factory._fire(kind, msg)
            if self.factory.silent:
                continue
            handler = getattr(self.factory.guest, f"on_{kind}", None)
            if handler is None:
                self.send(msg.message_id, error=agent_pb2.ErrorEvent(code="unsupported", message=kind))
                continue
            field, reply = handler(getattr(msg, kind))
            if self.factory.garbage_before_reply:
                self.transport.write(self.factory.garbage_before_reply)
            self.send(msg.message_id, **{field: reply})
            if kind == "ping" and msg.ping.sequence == 1 and self.factory.telemetry_on_refresh:
                self.send_telemetry()  # as upstream agents answer a refresh request
            if kind == "shutdown" and self.factory.hang_up_on_shutdown:
                self.transport.loseConnection()


class Guest:
    """The in-memory guest the peer answers from."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, int] = {}
        self.dirs: set[str] = {"/", "/tmp", "/etc"}
        self.exec: Callable[[agent_pb2.ExecuteRequest], agent_pb2.ExecuteResponse] = default_exec
        self.freeze: tuple[str, float, list[str]] | None = None  # token, frozen at, mounts
        self.thaws = 0
        self.shutdowns: list[agent_pb2.ShutdownRequest] = []
        self.updates: list[agent_pb2.AgentUpdateRequest] = []

    def on_ping(self, req: agent_pb2.PingRequest) -> tuple[str, object]:
        return "pong", agent_pb2.PongResponse(sequence=req.sequence, version=VERSION, uptime_seconds=1234)

    def on_execute(self, req: agent_pb2.ExecuteRequest) -> tuple[str, object]:
        return "execute_response", self.exec(req)

    def on_file_read(self, req: agent_pb2.FileReadRequest) -> tuple[str, object]:
        if req.path not in self.files:
            return "file_read_response", agent_pb2.FileReadResponse(error=f"No such file: {req.path}")
        content = self.files[req.path]
        n = req.chunk_size or 65536
        if req.length:
            n = min(n, req.length)
        data = content[req.offset : req.offset + n]
        return "file_read_response", agent_pb2.FileReadResponse(
            success=True,
            data=data,
            eof=req.offset + len(data) >= len(content),
            total_size=len(content),
            offset=req.offset,
            mode=self.modes.get(req.path, 0o644),
        )

    def on_file_write(self, req: agent_pb2.FileWriteRequest) -> tuple[str, object]:
        parent = posixpath.dirname(req.path)
        if parent not in self.dirs:
            if not req.create_parents:
                return "file_write_response", agent_pb2.FileWriteResponse(
                    error=f"No such directory: {parent}", chunk_number=req.chunk_number
                )
            while parent not in self.dirs:
                self.dirs.add(parent)
                parent = posixpath.dirname(parent)
        old = self.files.get(req.path, b"") if (req.offset or req.append) else b""
        start = len(old) if req.append else req.offset
        self.files[req.path] = old[:start].ljust(start, b"\0") + req.data + old[start + len(req.data) :]
        if req.mode:
            self.modes[req.path] = req.mode
        return "file_write_response", agent_pb2.FileWriteResponse(
            success=True, bytes_written=len(req.data), chunk_number=req.chunk_number
        )

    def on_shutdown(self, req: agent_pb2.ShutdownRequest) -> tuple[str, object]:
        self.shutdowns.append(req)
        return "shutdown_response", agent_pb2.ShutdownResponse(accepted=True)

    def on_list_directory(self, req: agent_pb2.ListDirectoryRequest) -> tuple[str, object]:
        if req.path not in self.dirs:
            return "list_directory_response", agent_pb2.ListDirectoryResponse(
                error=f"No such directory: {req.path}"
            )
        prefix = req.path.rstrip("/") + "/"
        resp = agent_pb2.ListDirectoryResponse(success=True)
        children = {p[len(prefix) :].split("/")[0] for p in (*self.files, *self.dirs) if p.startswith(prefix)}
        for name in sorted(n for n in children if n and (req.include_hidden or not n.startswith("."))):
            path = prefix + name
            is_dir = path in self.dirs
            entry = resp.entries.add(
                name=name,
                path=path,
                is_directory=is_dir,
                size_bytes=0 if is_dir else len(self.files.get(path, b"")),
                mode=0o755 if is_dir else self.modes.get(path, 0o644),
                owner="root",
            )
            entry.modified_at.seconds = int(self.clock.seconds())
        resp.total_entries = len(resp.entries)
        return "list_directory_response", resp

    def on_agent_update(self, req: agent_pb2.AgentUpdateRequest) -> tuple[str, object]:
        self.updates.append(req)
        done = req.is_last_chunk
        return "agent_update_response", agent_pb2.AgentUpdateResponse(
            success=True,
            current_version=req.target_version if done else VERSION,
            restart_required=done,
            progress_percent=100 if done else 50,
        )

    def on_quiesce(self, req: agent_pb2.QuiesceFilesystemsRequest) -> tuple[str, object]:
        if self.freeze is not None:
            return "quiesce_response", agent_pb2.QuiesceFilesystemsResponse(
                error="filesystems already frozen"
            )
        mounts = list(req.mount_points) or ["/"]
        token = str(uuid.uuid4())
        self.freeze = (token, self.clock.seconds(), mounts)
        resp = agent_pb2.QuiesceFilesystemsResponse(success=True, quiesce_token=token)
        for m in mounts:
            resp.frozen.add(mount_point=m, frozen=True, filesystem="ext4")
        stamp_at = self.clock.seconds() + (req.timeout_seconds or 60)
        resp.auto_thaw_at.seconds = int(stamp_at)
        return "quiesce_response", resp

    def on_thaw(self, req: agent_pb2.ThawFilesystemsRequest) -> tuple[str, object]:
        if self.freeze is None:
            return "thaw_response", agent_pb2.ThawFilesystemsResponse(error="filesystems are not frozen")
        token, since, mounts = self.freeze
        if req.quiesce_token and req.quiesce_token != token:
            return "thaw_response", agent_pb2.ThawFilesystemsResponse(error="quiesce token mismatch")
        self.freeze = None
        self.thaws += 1
        return "thaw_response", agent_pb2.ThawFilesystemsResponse(
            success=True,
            thawed_mount_points=mounts,
            frozen_duration_ms=int((self.clock.seconds() - since) * 1000),
        )

    def on_get_capabilities(self, req: agent_pb2.GetCapabilitiesRequest) -> tuple[str, object]:
        return "get_capabilities_response", agent_pb2.GetCapabilitiesResponse(
            version=VERSION, os="linux", architecture="x86_64", capabilities=CAPABILITIES
        )

    def on_sync_time(self, req: agent_pb2.SyncTimeRequest) -> tuple[str, object]:
        resp = agent_pb2.SyncTimeResponse(
            success=True, time_source="host" if req.HasField("set_time") else "ntp"
        )
        if req.HasField("set_time"):
            resp.offset_seconds = req.set_time.seconds + req.set_time.nanos / 1e9 - self.clock.seconds()
        resp.current_time.seconds = int(self.clock.seconds())
        return "sync_time_response", resp


class GuestPeer(Factory):
    """Listening side of a channel; ``peer.guest`` is the state, ``peer.requests`` what arrived."""

    protocol = GuestPeerProtocol
    noisy = False  # no "Starting factory" line per listen in the test log

    def __init__(
        self,
        clock: IReactorTime,
        ready: agent_pb2.AgentReadyEvent | None = None,
        telemetry_interval: float | None = None,
    ) -> None:
        self.clock = clock
        self.ready: agent_pb2.AgentReadyEvent | None = ready if ready is not None else default_ready()
        self.telemetry_interval = telemetry_interval
        self.telemetry: Callable[[], agent_pb2.TelemetryReport] = default_telemetry
        self.guest = Guest(clock)
        self.requests: list[agent_pb2.AgentMessage] = []
        self.connections: list[GuestPeerProtocol] = []
        self.silent = False
        self.garbage_before_reply = b""
        self.hang_up_on_shutdown = False
        self.telemetry_on_refresh = False
        self._waiters: dict[str, list[defer.Deferred]] = {}

    def wait_for(self, what: str) -> defer.Deferred:
        """Fires on the next "connected"/"disconnected" or request of that oneof kind."""
        d: defer.Deferred = defer.Deferred()
        self._waiters.setdefault(what, []).append(d)
        return d

    def _fire(self, what: str, value: object) -> None:
        for d in self._waiters.pop(what, []):
            d.callback(value)

    def inject(self, data: bytes) -> None:
        """Write raw bytes (garbage, partial frames) to every client."""
        for c in self.connections:
            c.transport.write(data)

    def broadcast_telemetry(self, report: agent_pb2.TelemetryReport | None = None) -> None:
        for c in self.connections:
            c.send_telemetry(report)

    def hang_up(self) -> None:
        for c in list(self.connections):
            c.transport.loseConnection()

    def requests_of(self, kind: str) -> list:
        return [getattr(m, kind) for m in self.requests if m.WhichOneof("payload") == kind]


def default_ready() -> agent_pb2.AgentReadyEvent:
    return agent_pb2.AgentReadyEvent(
        version=VERSION,
        os_name="Ubuntu",
        os_version="24.04",
        kernel_version="6.8.0",
        architecture="x86_64",
        hostname="peer-guest",
        ip_addresses=["10.0.0.5"],
        capabilities=CAPABILITIES,
    )


# -- test fixtures ----------------------------------------------------------------------------
class Events:
    """Records ``on_event`` calls; ``next(kind)`` fires on the next one of that kind."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str]] = []
        self._waiters: list[tuple[int, defer.Deferred]] = []

    def __call__(self, vm_id: str, kind: int, message: str) -> None:
        self.seen.append((vm_id, kind, message))
        waiting, self._waiters = self._waiters, []
        for k, d in waiting:
            if k == kind:
                d.callback(message)
            else:
                self._waiters.append((k, d))

    def next(self, kind: int) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((kind, d))
        return d

    def kinds(self) -> list[int]:
        return [k for _, k, _ in self.seen]


class ChannelFixture:
    """A VM id, a socket dir in /tmp (AF_UNIX paths are short), a peer listening, a manager."""

    def setup(
        self, test, clock: Clock | None = None, peer_clock=None, telemetry_interval: float = 5.0
    ) -> None:
        self.dir = tempfile.mkdtemp(prefix="qtx-agent-")
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.vm = str(uuid.uuid4())
        self.path = os.path.join(self.dir, f"{self.vm}.agent.sock")
        self.clock = clock
        self.events = Events()
        self.peer = GuestPeer(peer_clock or reactor)
        self.port = None
        self.listen()
        self.manager = AgentManager(
            reactor,
            socket_dir=self.dir,
            channel_roots=(),
            telemetry_interval=telemetry_interval,
            on_event=self.events,
            clock=clock,
            initial_backoff=0.02,
            max_backoff=0.1,
        )
        test.addCleanup(self.manager.stop_all)
        test.addCleanup(self.stop_listening)

    def listen(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.port = reactor.listenUNIX(self.path, self.peer)

    @defer.inlineCallbacks
    def stop_listening(self):
        if self.port is not None:
            port, self.port = self.port, None
            yield port.stopListening()
        self.peer.hang_up()

    @defer.inlineCallbacks
    def start(self):
        """Start supervising the VM and wait for the agent's ready event."""
        ready = self.events.next(AGENT_CONNECTED)
        self.manager.vm_started(self.vm)
        yield ready


def main(argv: list[str] | None = None) -> None:
    from twisted.python import log

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("socket", help="UNIX socket path to listen on (e.g. <socket_dir>/<vm_id>.agent.sock)")
    p.add_argument("--telemetry", type=float, default=5.0, help="telemetry interval in seconds (0: none)")
    a = p.parse_args(argv)
    log.startLogging(sys.stdout)
    if os.path.exists(a.socket):
        os.unlink(a.socket)
    reactor.listenUNIX(a.socket, GuestPeer(reactor, telemetry_interval=a.telemetry or None))
    reactor.run()


if __name__ == "__main__":
    main()
