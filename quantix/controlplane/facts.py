"""Plain values the link reports to the control plane.

Host detection, hypervisor and storage code fill these in; the link only turns them into
protobuf messages (:mod:`quantix.controlplane.messages`). Keeping them as small attrs classes
means the producers never import the control plane's generated code.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class CpuFacts:
    model: str = ""
    sockets: int = 1
    cores_per_socket: int = 1
    threads_per_core: int = 1
    frequency_mhz: int = 0
    features: tuple[str, ...] = ()


@attrs.frozen
class MemoryFacts:
    total_bytes: int = 0
    # What VMs may use; the control plane falls back to total when this is 0.
    allocatable_bytes: int = 0


@attrs.frozen
class StorageDeviceFacts:
    path: str
    size_bytes: int = 0
    model: str = ""
    serial: str = ""
    # "HDD", "SSD" or "NVME" (the names of compute.v1.StorageDevice.DeviceType).
    kind: str = "HDD"


@attrs.frozen
class NetworkDeviceFacts:
    name: str
    mac_address: str = ""
    driver: str = ""
    speed_mbps: int = 0
    mtu: int = 1500
    sriov_capable: bool = False


@attrs.frozen
class HostFacts:
    """What RegisterNode carries; gathered afresh for every registration."""

    hostname: str
    management_ip: str
    cpu: CpuFacts = attrs.field(factory=CpuFacts)
    memory: MemoryFacts = attrs.field(factory=MemoryFacts)
    labels: dict[str, str] = attrs.field(factory=dict)
    storage_devices: tuple[StorageDeviceFacts, ...] = ()
    network_devices: tuple[NetworkDeviceFacts, ...] = ()


@attrs.frozen
class HeartbeatSample:
    """Live load figures for one heartbeat."""

    cpu_usage_percent: float = 0.0
    memory_used_mib: int = 0
    memory_total_mib: int = 0
    running_vm_count: int = 0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    disk_used_bytes: int = 0
    disk_total_bytes: int = 0


@attrs.frozen
class PoolReport:
    """One storage pool's state on this host; ``pool_id`` is the control plane's pool id."""

    pool_id: str
    # "HEALTHY", "DEGRADED", "ERROR", "UNMOUNTED" or "UNKNOWN".
    health: str = "UNKNOWN"
    total_bytes: int = 0
    used_bytes: int = 0
    available_bytes: int = 0
    mount_path: str = ""
    volume_count: int = 0
    error_message: str = ""


@attrs.frozen
class VMFacts:
    """One domain on this host, as the control plane's inventory sync wants it."""

    id: str
    name: str
    # Free text matched case-insensitively by the control plane: running, paused, stopped,
    # shutoff, suspended, crashed; anything else counts as stopped.
    state: str = "stopped"
    cpu_cores: int = 0
    memory_mib: int = 0
    disk_paths: tuple[str, ...] = ()
