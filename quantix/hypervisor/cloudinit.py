"""cloud-init NoCloud seed ISO (volume label ``cidata``) built in-process with pycdlib.

No external genisoimage/xorriso is needed. Building is pure (bytes in, bytes out); only
:func:`write_nocloud_iso` touches the disk, and it does so atomically so a VM never boots from a
half-written seed. Call it from a thread, not the reactor.
"""

from __future__ import annotations

import errno
import io
import os
import re
from collections.abc import Mapping

import yaml

from quantix.errors import Invalid, ResourceExhausted
from quantix.util.files import atomic_write

VOLUME_LABEL = "cidata"
MAX_FILE_BYTES = 16 * 1024 * 1024

# NoCloud file name → ISO 9660 level-3 name (the guest reads the Rock Ridge / Joliet names).
_ISO_NAMES = {
    "meta-data": "/META_DATA.;1",
    "user-data": "/USER_DATA.;1",
    "network-config": "/NETWORK_CONFIG.;1",
    "vendor-data": "/VENDOR_DATA.;1",
}


def wants_cloud_init(cfg) -> bool:
    """True when the CloudInitConfig carries anything at all."""
    return bool(cfg.user_data or cfg.meta_data or cfg.network_config or cfg.vendor_data)


def hostname_for(name: str, vm_id: str) -> str:
    """A valid host name label (RFC 1123) from a VM name; the name itself when it already is one."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower())
    label = re.sub(r"-{2,}", "-", label).strip("-")[:63].rstrip("-")
    return label or f"vm-{vm_id[:8]}"


def default_meta_data(vm_id: str, name: str) -> str:
    return yaml.safe_dump(
        {"instance-id": vm_id, "local-hostname": hostname_for(name, vm_id)},
        default_flow_style=False,
        sort_keys=False,
    )


def nocloud_files(vm_id: str, name: str, cfg) -> dict[str, bytes]:
    """The seed's files from a CloudInitConfig.

    meta-data and user-data are always present (NoCloud requires both; an empty user-data is
    valid), network-config and vendor-data only when given.
    """
    files = {
        "meta-data": cfg.meta_data or default_meta_data(vm_id, name),
        "user-data": cfg.user_data,
    }
    if cfg.network_config:
        files["network-config"] = cfg.network_config
    if cfg.vendor_data:
        files["vendor-data"] = cfg.vendor_data
    out = {}
    for fname, text in files.items():
        data = text.encode("utf-8")
        if len(data) > MAX_FILE_BYTES:
            raise Invalid(f"cloud-init {fname} is larger than {MAX_FILE_BYTES} bytes")
        out[fname] = data
    return out


def nocloud_iso(files: Mapping[str, bytes]) -> bytes:
    """An ISO 9660 image with Joliet and Rock Ridge names, labelled ``cidata``."""
    import pycdlib  # on first use: most daemons never build a seed ISO (idle memory)

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=VOLUME_LABEL, joliet=3, rock_ridge="1.09")
    try:
        for fname, data in files.items():
            if fname not in _ISO_NAMES:
                raise Invalid(f"not a NoCloud file name: {fname!r}")
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                iso_path=_ISO_NAMES[fname],
                rr_name=fname,
                joliet_path=f"/{fname}",
                file_mode=0o100444,
            )
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def write_nocloud_iso(path: str, vm_id: str, name: str, cfg, *, mode: int = 0o600) -> str:
    """Build the seed for one VM and put it at ``path`` atomically (temp file, fsync, rename).

    The mode is private by default: user-data often carries credentials, and libvirt's DAC
    driver hands the file to QEMU when the domain starts.
    """
    data = nocloud_iso(nocloud_files(vm_id, name, cfg))
    try:
        atomic_write(path, data, mode=mode)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            where = os.path.dirname(path)
            raise ResourceExhausted(
                f"{where} is out of space: the cloud-init seed needs {len(data)} bytes"
            ) from None
        raise
    return path
