"""Storage box: libvirt pools and volumes, image scan and the pool file browser."""

from quantix.hypervisor.storage.manager import PoolRequest, StorageManager

__all__ = ["PoolRequest", "StorageManager"]
