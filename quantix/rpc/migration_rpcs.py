"""Migration RPCs: MigrateVM on the source; PrepareMigration and ReceiveMigration on the target.

MigrateVM checks everything it can before its first message, so a refused migration is an
ordinary status (NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION, UNAVAILABLE). Once it has
sent PREPARING, the stream always ends normally with COMPLETE or FAILED (with libvirt's
reason); the client cancelling it aborts the libvirt job and the VM stays where it was.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import grpc
from google.protobuf import empty_pb2, timestamp_pb2
from twisted.logger import Logger

from quantix import errors
from quantix.config import Config
from quantix.events import mapping
from quantix.facades import EventFeed, VmHost
from quantix.hypervisor import migration, migration_target, vms
from quantix.proto import node_pb2
from quantix.rpc.registry import rpc
from quantix.rpc.streams import on_cancel

log = Logger(namespace="quantix.rpc.migration")


class MigrationRpcs:
    """Handlers. ``tokens`` outlives a handler object (the node keeps one store, so a restart
    of the gRPC server keeps what PrepareMigration handed out, and the node announces arrivals
    with it)."""

    def __init__(
        self,
        config: Config,
        hypervisor: VmHost,
        events: EventFeed,
        tokens: migration_target.Tokens,
        vm_changed: Callable[[str], None] = lambda vm_id: None,
    ) -> None:
        self.config = config
        self.hypervisor = hypervisor
        self.events = events
        self.tokens = tokens
        #: Told the VM's id when a migration of it ends (GetVMStatus drops what it kept).
        self.vm_changed = vm_changed
        self._jobs: dict[str, migration.MigrationJob] = {}
        self._jobs_lock = threading.Lock()

    def _own(self) -> set[str]:
        node = self.config.node
        return migration.own_addresses([node.hostname, node.management_ip])

    def _claim(self, vm_id: str, job: migration.MigrationJob) -> None:
        """One migration per VM at a time (libvirt's own job check covers other clients)."""
        with self._jobs_lock:
            self._jobs = {k: j for k, j in self._jobs.items() if not j.done.is_set()}
            if vm_id in self._jobs:
                raise errors.WrongState(f"VM {vm_id} is already migrating")
            self._jobs[vm_id] = job

    @rpc("MigrateVM")
    def migrate_vm(
        self, request: node_pb2.MigrateVMRequest, context: grpc.ServicerContext
    ) -> Iterator[node_pb2.MigrationProgress]:
        cfg = self.config.migration
        target = migration.parse_target(request.target_node_uri, cfg.uri_template)
        conn = self.hypervisor.conn()
        dom = vms.lookup(conn, request.vm_id)
        vm_id = dom.UUIDString()
        migration.refuse_self(target, self._own())
        plan = migration.plan(
            conn,
            dom,
            target,
            live=request.live,
            storage=request.storage,
            shared_dirs=cfg.shared_paths,
            bandwidth_mib=cfg.bandwidth_mib,
            tls=cfg.tls,
        )
        dconn = migration.open_target(target)
        try:
            plan = migration.check_target(dconn, conn, dom, plan)
        finally:
            dconn.close()
        job = migration.MigrationJob(dom, plan)
        self._claim(vm_id, job)
        on_cancel(context, job.cancel)  # also runs after a normal end, when it does nothing
        log.info(
            "migrating VM {vm_id} to {uri} (flags {flags:#x}, disks copied: {disks})",
            vm_id=vm_id,
            uri=target.uri,
            flags=plan.flags,
            disks=",".join(plan.copied_disks) or "none",
        )
        yield self._message(vm_id, migration.Progress(migration.PREPARING))
        job.start()
        while not job.done.wait(cfg.progress_interval):
            if job.cancelled:
                job.cancel()  # the first abort may have come before libvirt's job existed
                continue
            yield self._message(vm_id, job.sample())
        final = job.final()
        self.vm_changed(vm_id)
        if final.phase == migration.COMPLETE:
            log.info("VM {vm_id} migrated to {uri}", vm_id=vm_id, uri=target.uri)
            if plan.offline:  # no libvirt lifecycle event says so for a stopped VM
                self._publish(vm_id, f"VM {vm_id} migrated out to {target.host} (offline)", target.host)
        else:
            log.warn("migration of VM {vm_id} failed: {error}", vm_id=vm_id, error=final.error)
        yield self._message(vm_id, final)

    def _publish(self, vm_id: str, message: str, target: str) -> None:
        self.events.publish_from_thread(mapping.VM_MIGRATED_OUT, vm_id, message, {"target": target})

    @staticmethod
    def _message(vm_id: str, progress: migration.Progress) -> node_pb2.MigrationProgress:
        return node_pb2.MigrationProgress(
            vm_id=vm_id,
            percent_complete=progress.percent,
            data_transferred_bytes=progress.transferred,
            data_remaining_bytes=progress.remaining,
            phase=node_pb2.MigrationPhase.ValueType(progress.phase),
            error=progress.error,
        )

    @rpc("PrepareMigration")
    def prepare_migration(
        self, request: node_pb2.PrepareMigrationRequest, context: grpc.ServicerContext
    ) -> node_pb2.MigrationToken:
        vm_id = _vm_uuid(request.vm_id)
        cfg = self.config.migration
        source = migration.parse_target(request.source_node_uri, cfg.uri_template, what="source_node_uri")
        migration.refuse_self(source, self._own(), what="source_node_uri")
        storage = self.config.storage
        prepared = migration_target.prepare(
            self.hypervisor.conn(),
            vm_id,
            source,
            shared_dirs=cfg.shared_paths,
            storage_roots=(storage.root, storage.vm_images, storage.cloud_images, storage.iso_images),
        )
        token, expires = self.tokens.issue(vm_id)
        log.info(
            "prepared migration of VM {vm_id} from {source} (created {created}, copied {copied})",
            vm_id=vm_id,
            source=source.uri,
            created=",".join(prepared.created) or "nothing",
            copied=",".join(prepared.copied) or "nothing",
        )
        return node_pb2.MigrationToken(
            token=token, vm_id=vm_id, expires_at=timestamp_pb2.Timestamp(seconds=int(expires))
        )

    @rpc("ReceiveMigration")
    def receive_migration(
        self, request: node_pb2.MigrationToken, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.tokens.receive(request.token, request.vm_id.lower())
        return empty_pb2.Empty()


def _vm_uuid(vm_id: str) -> str:
    if not vm_id:
        raise errors.Invalid("vm_id is required")
    try:
        return str(uuid.UUID(vm_id))
    except (ValueError, TypeError):
        raise errors.Invalid("vm_id must be a UUID") from None
