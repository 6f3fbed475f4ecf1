"""Build the control plane's request messages from plain facts (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Iterable

from quantix.controlplane.facts import HeartbeatSample, HostFacts, PoolReport, VMFacts
from quantix.proto import compute_pb2

_DEVICE_TYPES = {"HDD", "SSD", "NVME"}
_HEALTH = {"HEALTHY", "DEGRADED", "ERROR", "UNMOUNTED", "UNKNOWN"}

# VM state text (libvirt-ish, case-insensitive) to the enum SyncFullState/NotifyVMChange use.
_POWER_STATES = {
    "running": compute_pb2.VM_POWER_STATE_RUNNING,
    "stopped": compute_pb2.VM_POWER_STATE_STOPPED,
    "shutoff": compute_pb2.VM_POWER_STATE_STOPPED,
    "paused": compute_pb2.VM_POWER_STATE_PAUSED,
    "suspended": compute_pb2.VM_POWER_STATE_SUSPENDED,
    "crashed": compute_pb2.VM_POWER_STATE_CRASHED,
    "migrating": compute_pb2.VM_POWER_STATE_MIGRATING,
}


def register_request(facts: HostFacts) -> compute_pb2.RegisterNodeRequest:
    """RegisterNode for this host; ``role.compute`` is what makes the node schedulable."""
    cpu = facts.cpu
    req = compute_pb2.RegisterNodeRequest(
        hostname=facts.hostname,
        management_ip=facts.management_ip,
        labels=dict(facts.labels),
        role=compute_pb2.NodeRole(compute=True),
        cpu_info=compute_pb2.CpuInfo(
            model=cpu.model,
            sockets=cpu.sockets,
            cores_per_socket=cpu.cores_per_socket,
            threads_per_core=cpu.threads_per_core,
            total_threads=cpu.sockets * cpu.cores_per_socket * cpu.threads_per_core,
            frequency_mhz=cpu.frequency_mhz,
            features=list(cpu.features),
        ),
        memory_info=compute_pb2.MemoryInfo(
            total_bytes=facts.memory.total_bytes,
            allocatable_bytes=facts.memory.allocatable_bytes,
        ),
    )
    for dev in facts.storage_devices:
        kind = dev.kind.upper() if dev.kind.upper() in _DEVICE_TYPES else "HDD"
        req.storage_devices.add(
            path=dev.path,
            model=dev.model,
            serial=dev.serial,
            size_bytes=dev.size_bytes,
            type=compute_pb2.StorageDevice.DeviceType.Value(kind),
            available=True,
        )
    for nic in facts.network_devices:
        req.network_devices.add(
            name=nic.name,
            mac_address=nic.mac_address,
            driver=nic.driver,
            speed_mbps=nic.speed_mbps,
            mtu=nic.mtu,
            sriov_capable=nic.sriov_capable,
        )
    return req


def pool_status(report: PoolReport) -> compute_pb2.StoragePoolStatusReport:
    health = report.health.upper().removeprefix("HEALTH_")
    if health not in _HEALTH:
        health = "UNKNOWN"
    return compute_pb2.StoragePoolStatusReport(
        pool_id=report.pool_id,
        health=compute_pb2.StoragePoolStatusReport.HealthStatus.Value("HEALTH_" + health),
        total_bytes=report.total_bytes,
        used_bytes=report.used_bytes,
        available_bytes=report.available_bytes,
        mount_path=report.mount_path,
        volume_count=report.volume_count,
        error_message=report.error_message,
    )


def heartbeat_request(
    node_id: str, sample: HeartbeatSample, pools: Iterable[PoolReport]
) -> compute_pb2.UpdateHeartbeatRequest:
    load1, load5, load15 = sample.load
    return compute_pb2.UpdateHeartbeatRequest(
        node_id=node_id,
        cpu_usage_percent=sample.cpu_usage_percent,
        memory_used_mib=sample.memory_used_mib,
        memory_total_mib=sample.memory_total_mib,
        running_vm_count=sample.running_vm_count,
        disk_used_bytes=sample.disk_used_bytes,
        disk_total_bytes=sample.disk_total_bytes,
        load_1m=load1,
        load_5m=load5,
        load_15m=load15,
        storage_pools=[pool_status(p) for p in pools],
    )


def sync_vms_request(node_id: str, vms: Iterable[VMFacts]) -> compute_pb2.SyncNodeVMsRequest:
    return compute_pb2.SyncNodeVMsRequest(
        node_id=node_id,
        vms=[
            compute_pb2.NodeVMInfo(
                id=vm.id,
                name=vm.name,
                state=vm.state,
                cpu_cores=vm.cpu_cores,
                memory_mib=vm.memory_mib,
                disk_paths=list(vm.disk_paths),
            )
            for vm in vms
        ],
    )


def power_state(state: str) -> compute_pb2.VMPowerState.ValueType:
    return _POWER_STATES.get(state.lower(), compute_pb2.VM_POWER_STATE_UNKNOWN)


def vm_status(vm: VMFacts) -> compute_pb2.VMStatusReport:
    return compute_pb2.VMStatusReport(id=vm.id, name=vm.name, state=power_state(vm.state))


def full_state_request(
    node_id: str, facts: HostFacts, vms: Iterable[VMFacts], pools: Iterable[PoolReport]
) -> compute_pb2.SyncFullStateRequest:
    """SyncFullState: unimplemented on today's control plane, sent in case a newer one has it."""
    cpu = facts.cpu
    return compute_pb2.SyncFullStateRequest(
        node_id=node_id,
        host_info=compute_pb2.HostInfo(
            hostname=facts.hostname,
            management_ip=facts.management_ip,
            memory_total_bytes=facts.memory.total_bytes,
            memory_available_bytes=facts.memory.allocatable_bytes,
            cpu_cores=cpu.sockets * cpu.cores_per_socket,
        ),
        vms=[vm_status(vm) for vm in vms],
        storage_pools=[pool_status(p) for p in pools],
    )
