"""The VM RPCs: lifecycle, status, console, logs, snapshots and hot-plug.

Each handler runs in a gRPC worker thread: it takes the live libvirt connection (or gets
HypervisorDown), finds the domain and calls one blocking box function. Errors are domain
exceptions or ``libvirtError``; :mod:`quantix.rpc.status` maps both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import grpc
import libvirt
from google.protobuf import empty_pb2
from twisted.logger import Logger

from quantix.agent import sockets
from quantix.agent.guestinfo import to_proto
from quantix.config import Config
from quantix.errors import Invalid, QuantixError, Unavailable
from quantix.facades import EventFeed, GuestAgents, VmHost
from quantix.hypervisor import consoles, devices, domainxml, hostinfo, provision, snapshots, vms
from quantix.hypervisor.domainxml import NicSource
from quantix.hypervisor.statuscache import DomainCache
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
    """Handlers over the hypervisor box (libvirt), the storage box (disks), the agent box
    (guest info, quiesce) and the event feed (snapshot and device events)."""

    def __init__(
        self,
        config: Config,
        hypervisor: VmHost,
        storage: provision.DiskStore,
        agents: GuestAgents,
        events: EventFeed,
        host: hostinfo.HostBox,
        bound_nics: Callable[[str], Mapping[str, NicSource]] = lambda vm_id: {},
        domain_cache: DomainCache | None = None,
    ) -> None:
        self.config = config
        self.hypervisor = hypervisor
        self._store = storage
        self.agents = agents
        self.events = events
        self.host = host
        #: The network box's ports bound to a VM's NICs (by MAC), used when defining it.
        self.bound_nics = bound_nics
        #: What GetVMStatus keeps of each domain's XML; the watcher drops entries on libvirt's
        #: events, and this class on its own changes (the event comes a moment later).
        self.domain_cache = domain_cache if domain_cache is not None else DomainCache()
        self.sampler = vms.CpuSampler()
        # One lock per VM (its UUID; see _serialised) and per name being created.
        self._vm_locks = KeyedLocks()

    # -- plumbing -----------------------------------------------------------------------------

    def _conn(self) -> libvirt.virConnect:
        return self.hypervisor.conn()

    def _dom(self, vm_id: str) -> libvirt.virDomain:
        return vms.lookup(self._conn(), vm_id)

    def _settings(self) -> provision.HostSettings:
        ident = self.hypervisor.identity
        return provision.HostSettings.from_config(
            self.config, ident.name if ident else "", bound_nics=self.bound_nics
        )

    def _pid_dir(self) -> str | None:
        uri = self.config.hypervisor.uri
        return SYSTEM_PID_DIR if uri.split("?")[0] in ("qemu:///system", "qemu+unix:///system") else None

    def _publish(self, event_type: int, vm_id: str, message: str, **metadata: str) -> None:
        """After a change made here; also drops GetVMStatus's cached XML of the VM."""
        self.domain_cache.forget(vm_id)
        self.events.publish_from_thread(event_type, vm_id, message, metadata)

    # -- lifecycle ----------------------------------------------------------------------------

    @rpc("CreateVM")
    def create_vm(
        self, request: node_pb2.CreateVMOnNodeRequest, context: grpc.ServicerContext
    ) -> node_pb2.CreateVMOnNodeResponse:
        # Per id (a retry of the same create; the key is the UUID every other VM operation uses)
        # and per name (two ids wanting one name): provision.create_vm checks, then defines.
        # Id first, then name, always.
        vm_id = domainxml.validate_vm_id(request.vm_id)
        with self._vm_locks.hold(vm_id), self._vm_locks.hold(("name", request.name or vm_id)):
            vm_id, created = provision.create_vm(self._conn(), request, self._settings(), self._store)
        message = "VM created successfully" if created else "VM already exists with this spec"
        return node_pb2.CreateVMOnNodeResponse(vm_id=vm_id, created=True, message=message)

    @contextlib.contextmanager
    def _serialised(self, vm_id: str) -> Iterator[libvirt.virDomain]:
        """The VM's domain with its lock held: power operations check the state, then act, and
        two at once on one VM would each act on a state the other is changing (Start on a VM
        another Start is booting would fail "already running" instead of being the no-op it is).
        Keyed by the domain's UUID, so a VM named by id or by name is one VM."""
        dom = self._dom(vm_id)
        uuid = dom.UUIDString()
        with self._vm_locks.hold(uuid):
            try:
                yield dom
            finally:
                # A GetVMStatus after this call must see what it did, before libvirt's event
                # (which drops the kept status too) has reached the reactor.
                self.domain_cache.state_changed(uuid)

    @rpc("StartVM")
    def start_vm(self, request: node_pb2.VMIdRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        with self._serialised(request.vm_id) as dom:
            sockets.ensure_socket_dir(self.config.agent.socket_dir)  # QEMU binds the agent socket there
            vms.start(dom)
        return _EMPTY

    @rpc("StopVM")
    def stop_vm(self, request: node_pb2.StopVMRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        timeout = request.timeout_seconds or self.config.hypervisor.stop_timeout
        with self._serialised(request.vm_id) as dom:
            asked = vms.request_shutdown(dom)
        if asked:  # the wait holds no lock: a ForceStop must be able to cut it short
            try:
                vms.wait_until_off(dom, timeout)
            finally:
                self.domain_cache.state_changed(dom.UUIDString())
        return _EMPTY

    @rpc("ForceStopVM")
    def force_stop_vm(self, request: node_pb2.VMIdRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        with self._serialised(request.vm_id) as dom:
            vms.force_stop(dom)
        return _EMPTY

    @rpc("RebootVM")
    def reboot_vm(self, request: node_pb2.VMIdRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        with self._serialised(request.vm_id) as dom:
            vms.reboot(dom)
        return _EMPTY

    @rpc("PauseVM")
    def pause_vm(self, request: node_pb2.VMIdRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        with self._serialised(request.vm_id) as dom:
            vms.pause(dom)
        return _EMPTY

    @rpc("ResumeVM")
    def resume_vm(self, request: node_pb2.VMIdRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        with self._serialised(request.vm_id) as dom:
            vms.resume(dom)
        return _EMPTY

    @rpc("DeleteVM")
    def delete_vm(self, request: node_pb2.VMIdRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        with self._serialised(request.vm_id) as dom:
            vms.delete(dom, lambda path: provision.remove_file(self._store, path))
        return _EMPTY

    # -- status -------------------------------------------------------------------------------

    @rpc("GetVMStatus")
    def get_vm_status(
        self, request: node_pb2.VMIdRequest, context: grpc.ServicerContext
    ) -> node_pb2.VMStatusResponse:
        conn = self._conn()
        entry = self.domain_cache.entry(conn, request.vm_id, vms.lookup)
        pid_dir = self._pid_dir()
        msg = self.domain_cache.status(entry, lambda e: vms.status_of(conn, e, self.sampler, pid_dir))
        agent = self._guest_agent(msg.vm_id)
        if agent is not None:
            msg.guest_agent.CopyFrom(agent)
        return msg

    def _guest_agent(self, vm_id: str) -> node_pb2.GuestAgentInfo:
        """What the guest agent box knows (read without a reactor hop, see ``GuestAgents.info``)."""
        return to_proto(self.agents.info(vm_id))

    @rpc("ListVMs")
    def list_vms(
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> node_pb2.ListVMsOnNodeResponse:
        return vms.list_response(self._conn(), self.sampler, self._pid_dir())

    @rpc("GetConsole")
    def get_console(
        self, request: node_pb2.VMIdRequest, context: grpc.ServicerContext
    ) -> node_pb2.ConsoleInfoResponse:
        return consoles.console(self._dom(request.vm_id), self.host.management_ip)

    @rpc("GetVMLogs")
    def get_vm_logs(
        self, request: node_pb2.GetVMLogsRequest, context: grpc.ServicerContext
    ) -> node_pb2.GetVMLogsResponse:
        dom = self._dom(request.vm_id)
        vm_id, name = dom.UUIDString(), dom.name()
        path = consoles.log_path(self.config.hypervisor.log_dir, name)
        return consoles.logs_message(vm_id, name, consoles.tail(path, request.lines))

    # -- snapshots ----------------------------------------------------------------------------

    @rpc("CreateSnapshot")
    def create_snapshot(
        self, request: node_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> node_pb2.SnapshotResponse:
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
    def _quiesced(self, dom: libvirt.virDomain, wanted: bool) -> Iterator[None]:
        """Guest filesystems frozen through the agent box's quiesce owner for the duration;
        thawed whatever happens.

        Only a running VM has anything to freeze. When the freeze was asked for and cannot be had
        (no agent connected, the guest refuses, or a ``QuiesceFilesystems`` freeze is active)
        the snapshot is not taken: the caller asked for a consistent one.
        """
        if not wanted or not dom.isActive():
            yield
            return
        vm_id = dom.UUIDString()
        agents = self.agents
        freeze = agent_pb2.QuiesceFilesystemsRequest(timeout_seconds=QUIESCE_SECONDS)
        frozen = agents.freeze(vm_id, freeze, QUIESCE_SECONDS + 10, QUIESCE_SECONDS)
        if not frozen.reply.success:
            reason = frozen.reply.error or "the guest agent refused"
            raise Unavailable(f"cannot quiesce VM {vm_id}: {reason}")
        try:
            yield
        finally:
            thaw = agent_pb2.ThawFilesystemsRequest()
            try:
                thawed = agents.thaw(vm_id, frozen.token, thaw, QUIESCE_SECONDS)
                if not thawed.success:
                    log.warn("thaw of {vm} failed: {err}", vm=vm_id, err=thawed.error)
            except QuantixError as exc:
                # The agent thaws by itself once QUIESCE_SECONDS pass.
                log.warn("thaw of {vm} failed: {err}", vm=vm_id, err=exc)

    @rpc("RevertSnapshot")
    def revert_snapshot(
        self, request: node_pb2.RevertSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
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
    def delete_snapshot(
        self, request: node_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
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
    def list_snapshots(
        self, request: node_pb2.VMIdRequest, context: grpc.ServicerContext
    ) -> node_pb2.ListSnapshotsResponse:
        return node_pb2.ListSnapshotsResponse(snapshots=snapshots.list_snapshots(self._dom(request.vm_id)))

    # -- devices ------------------------------------------------------------------------------

    def _publish_device(
        self, dom: libvirt.virDomain, was_running: bool, event_type: int, text: str, **metadata: str
    ) -> None:
        """Device events for a stopped VM only: for a running one the event box already
        reports libvirt's DEVICE_ADDED/DEVICE_REMOVED, and twice would mislead a consumer."""
        vm_id = dom.UUIDString()
        if was_running:
            self.domain_cache.forget(vm_id)
        else:
            self._publish(event_type, vm_id, text, **metadata)

    @rpc("AttachNIC")
    def attach_nic(
        self, request: node_pb2.AttachNICRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
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
    def detach_nic(
        self, request: node_pb2.DetachNICRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
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
    def attach_disk(
        self, request: node_pb2.AttachDiskRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
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
    def detach_disk(
        self, request: node_pb2.DetachDiskRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
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
    def change_media(
        self, request: node_pb2.ChangeMediaRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        dom = self._dom(request.vm_id)
        devices.change_media(
            dom, request.device, request.iso_path, self.config.storage.iso_images, self._store.confine
        )
        self.domain_cache.forget(dom.UUIDString())
        return _EMPTY
