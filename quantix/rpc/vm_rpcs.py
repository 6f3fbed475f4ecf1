"""The VM RPCs: lifecycle, status, console, logs, snapshots and hot-plug.

Each handler runs in a gRPC worker thread: it takes the live libvirt connection (or gets
HypervisorDown), finds the domain and calls one blocking box function. Errors are domain
exceptions or ``libvirtError``; :mod:`quantix.rpc.status` maps both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from google.protobuf import empty_pb2
from twisted.logger import Logger

from quantix import bridge
from quantix.agent.guestinfo import to_proto
from quantix.errors import Invalid, QuantixError, Unavailable
from quantix.hypervisor import consoles, devices, hostinfo, provision, snapshots, vms
from quantix.proto import agent_pb2, node_pb2
from quantix.rpc.registry import rpc
from quantix.util.locks import KeyedLocks

log = Logger(namespace="quantix.rpc.vm")

_EMPTY = empty_pb2.Empty()
#: Where the system QEMU driver keeps ``<name>.pid`` (VM start times come from it).
SYSTEM_PID_DIR = "/run/libvirt/qemu"
#: How long a snapshot may keep guest filesystems frozen before the agent thaws them itself.
QUIESCE_SECONDS = 60


class VmRpcs:
    """Handlers; the node supplies ``config``, ``hypervisor``, ``storage``, ``agents`` and, once
    wired, ``bus`` (events)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.config = node.config
        self.sampler = vms.CpuSampler()
        # One lock per VM id, so concurrent CreateVM/DeleteVM of one VM run one after the other.
        self._vm_locks = KeyedLocks()

    # -- plumbing -----------------------------------------------------------------------------

    def _conn(self):
        return self.node.hypervisor.conn()

    def _dom(self, vm_id: str):
        return vms.lookup(self._conn(), vm_id)

    @property
    def _store(self) -> provision.DiskStore:
        return self.node.storage

    def _settings(self) -> provision.HostSettings:
        ident = self.node.hypervisor.identity
        return provision.HostSettings.from_config(
            self.config, ident.name if ident else "", bound_nics=self.node.network.store.sources_for
        )

    def _pid_dir(self) -> str | None:
        uri = self.config.hypervisor.uri
        return SYSTEM_PID_DIR if uri.split("?")[0] in ("qemu:///system", "qemu+unix:///system") else None

    def _management_ip(self) -> str:
        return self.config.node.management_ip or hostinfo.management_ip()

    def _publish(self, event_type: int, vm_id: str, message: str, **metadata: str) -> None:
        bus = getattr(self.node, "bus", None)
        if bus is not None:
            bus.publish_from_thread(event_type, vm_id, message, metadata)

    # -- lifecycle ----------------------------------------------------------------------------

    @rpc("CreateVM")
    def create_vm(self, request: Any, context: Any) -> Any:
        with self._vm_locks.hold(request.vm_id.lower()):
            vm_id, created = provision.create_vm(self._conn(), request, self._settings(), self._store)
        message = "VM created successfully" if created else "VM already exists with this spec"
        return node_pb2.CreateVMOnNodeResponse(vm_id=vm_id, created=True, message=message)

    @rpc("StartVM")
    def start_vm(self, request: Any, context: Any) -> Any:
        dom = self._dom(request.vm_id)
        os.makedirs(self.config.agent.socket_dir, exist_ok=True)  # QEMU binds the agent socket there
        vms.start(dom)
        return _EMPTY

    @rpc("StopVM")
    def stop_vm(self, request: Any, context: Any) -> Any:
        timeout = request.timeout_seconds or self.config.hypervisor.stop_timeout
        vms.stop(self._dom(request.vm_id), timeout)
        return _EMPTY

    @rpc("ForceStopVM")
    def force_stop_vm(self, request: Any, context: Any) -> Any:
        vms.force_stop(self._dom(request.vm_id))
        return _EMPTY

    @rpc("RebootVM")
    def reboot_vm(self, request: Any, context: Any) -> Any:
        vms.reboot(self._dom(request.vm_id))
        return _EMPTY

    @rpc("PauseVM")
    def pause_vm(self, request: Any, context: Any) -> Any:
        vms.pause(self._dom(request.vm_id))
        return _EMPTY

    @rpc("ResumeVM")
    def resume_vm(self, request: Any, context: Any) -> Any:
        vms.resume(self._dom(request.vm_id))
        return _EMPTY

    @rpc("DeleteVM")
    def delete_vm(self, request: Any, context: Any) -> Any:
        with self._vm_locks.hold(request.vm_id.lower()):
            dom = self._dom(request.vm_id)
            vms.delete(dom, lambda path: provision.remove_file(self._store, path))
        return _EMPTY

    # -- status -------------------------------------------------------------------------------

    @rpc("GetVMStatus")
    def get_vm_status(self, request: Any, context: Any) -> Any:
        conn = self._conn()
        msg = vms.vm_status(conn, vms.lookup(conn, request.vm_id), self.sampler, self._pid_dir())
        agent = self._guest_agent(msg.vm_id)
        if agent is not None:
            msg.guest_agent.CopyFrom(agent)
        return msg

    def _guest_agent(self, vm_id: str) -> Any:
        """What the guest agent box knows. Read without a reactor hop: the cache is written only
        on the reactor, by replacing field values (never mutating them), so a reader in this
        thread sees each field whole, old or new; that is all a status snapshot needs."""
        return to_proto(self.node.agents.info(vm_id))

    @rpc("ListVMs")
    def list_vms(self, request: Any, context: Any) -> Any:
        return vms.list_response(self._conn(), self.sampler, self._pid_dir())

    @rpc("GetConsole")
    def get_console(self, request: Any, context: Any) -> Any:
        return consoles.console(self._dom(request.vm_id), self._management_ip)

    @rpc("GetVMLogs")
    def get_vm_logs(self, request: Any, context: Any) -> Any:
        dom = self._dom(request.vm_id)
        vm_id, name = dom.UUIDString(), dom.name()
        path = consoles.log_path(self.config.hypervisor.log_dir, name)
        return consoles.logs_message(vm_id, name, consoles.tail(path, request.lines))

    # -- snapshots ----------------------------------------------------------------------------

    @rpc("CreateSnapshot")
    def create_snapshot(self, request: Any, context: Any) -> Any:
        dom = self._dom(request.vm_id)
        with self._quiesced(dom, request.quiesce):
            snap = snapshots.create(dom, request.name, request.description, disk_only=request.disk_only)
        self._publish(
            node_pb2.EVENT_TYPE_SNAPSHOT_CREATED,
            dom.UUIDString(),
            f"snapshot {snap.name} created",
            snapshot_id=snap.snapshot_id,
        )
        return snap

    @contextlib.contextmanager
    def _quiesced(self, dom: Any, wanted: bool) -> Iterator[None]:
        """Guest filesystems frozen through our agent for the duration; thawed whatever happens.

        Only a running VM has anything to freeze. When the freeze was asked for and cannot be had
        (no agent connected, the guest refuses) the snapshot is not taken: the caller asked for
        a consistent one.
        """
        agents = getattr(self.node, "agents", None)
        if not wanted or not dom.isActive():
            yield
            return
        vm_id = dom.UUIDString()
        if agents is None:
            log.info("snapshot of {vm}: no guest agent box, not quiesced", vm=vm_id)
            yield
            return
        reactor = self.node.reactor
        freeze = agent_pb2.QuiesceFilesystemsRequest(timeout_seconds=QUIESCE_SECONDS)
        frozen = bridge.call_on_reactor(reactor, agents.request, vm_id, freeze, QUIESCE_SECONDS + 10)
        if not frozen.success:
            raise Unavailable(f"cannot quiesce VM {vm_id}: {frozen.error or 'the guest agent refused'}")
        try:
            yield
        finally:
            thaw = agent_pb2.ThawFilesystemsRequest(quiesce_token=frozen.quiesce_token)
            try:
                thawed = bridge.call_on_reactor(reactor, agents.request, vm_id, thaw, QUIESCE_SECONDS)
                if not thawed.success:
                    log.warn("thaw of {vm} failed: {err}", vm=vm_id, err=thawed.error)
            except QuantixError as exc:
                # The agent thaws by itself once QUIESCE_SECONDS pass.
                log.warn("thaw of {vm} failed: {err}", vm=vm_id, err=exc)

    @rpc("RevertSnapshot")
    def revert_snapshot(self, request: Any, context: Any) -> Any:
        dom = self._dom(request.vm_id)
        snap = snapshots.revert(dom, request.snapshot_id)
        self._publish(
            node_pb2.EVENT_TYPE_SNAPSHOT_REVERTED,
            dom.UUIDString(),
            f"reverted to snapshot {snap.name}",
            snapshot_id=snap.snapshot_id,
        )
        return _EMPTY

    @rpc("DeleteSnapshot")
    def delete_snapshot(self, request: Any, context: Any) -> Any:
        dom = self._dom(request.vm_id)
        snapshots.delete(dom, request.snapshot_id)
        self._publish(
            node_pb2.EVENT_TYPE_SNAPSHOT_DELETED,
            dom.UUIDString(),
            f"snapshot {request.snapshot_id} deleted",
            snapshot_id=request.snapshot_id,
        )
        return _EMPTY

    @rpc("ListSnapshots")
    def list_snapshots(self, request: Any, context: Any) -> Any:
        return node_pb2.ListSnapshotsResponse(snapshots=snapshots.list_snapshots(self._dom(request.vm_id)))

    # -- devices ------------------------------------------------------------------------------

    def _publish_device(
        self, dom: Any, was_running: bool, event_type: int, text: str, **metadata: str
    ) -> None:
        """Device events for a stopped VM only: for a running one the event box already
        reports libvirt's DEVICE_ADDED/DEVICE_REMOVED, and twice would mislead a consumer."""
        if not was_running:
            self._publish(event_type, dom.UUIDString(), text, **metadata)

    @rpc("AttachNIC")
    def attach_nic(self, request: Any, context: Any) -> Any:
        if not request.HasField("nic"):
            raise Invalid("NIC spec is required")
        conn = self._conn()
        dom = vms.lookup(conn, request.vm_id)
        running = bool(dom.isActive())
        ref = devices.attach_nic(conn, dom, request.nic)
        self._publish_device(
            dom,
            running,
            node_pb2.EVENT_TYPE_NIC_ATTACHED,
            f"NIC {ref.id} attached",
            nic_id=ref.id,
            mac=ref.mac,
        )
        return _EMPTY

    @rpc("DetachNIC")
    def detach_nic(self, request: Any, context: Any) -> Any:
        dom = self._dom(request.vm_id)
        running = bool(dom.isActive())
        nic = devices.detach_nic(dom, request.nic_id)
        self._publish_device(
            dom,
            running,
            node_pb2.EVENT_TYPE_NIC_DETACHED,
            f"NIC {nic.id} detached",
            nic_id=nic.id,
            mac=nic.mac,
        )
        return _EMPTY

    @rpc("AttachDisk")
    def attach_disk(self, request: Any, context: Any) -> Any:
        if not request.HasField("disk"):
            raise Invalid("disk spec is required")
        dom = self._dom(request.vm_id)
        running = bool(dom.isActive())
        ref = devices.attach_disk(dom, request.disk, self._settings(), self._store)
        self._publish_device(
            dom,
            running,
            node_pb2.EVENT_TYPE_DISK_ATTACHED,
            f"disk {ref.id} attached",
            disk_id=ref.id,
            dev=ref.dev,
        )
        return _EMPTY

    @rpc("DetachDisk")
    def detach_disk(self, request: Any, context: Any) -> Any:
        dom = self._dom(request.vm_id)
        running = bool(dom.isActive())
        disk = devices.detach_disk(dom, request.disk_id)
        self._publish_device(
            dom,
            running,
            node_pb2.EVENT_TYPE_DISK_DETACHED,
            f"disk {disk.id} detached",
            disk_id=disk.id,
            dev=disk.dev,
        )
        return _EMPTY

    @rpc("ChangeMedia")
    def change_media(self, request: Any, context: Any) -> Any:
        dom = self._dom(request.vm_id)
        devices.change_media(dom, request.device, request.iso_path, self.config.storage.iso_images)
        return _EMPTY
