"""What this daemon is built from: its version, the wire contract it speaks, the libvirt it uses.

``twistd quantix-node --version`` prints these; ``GetNodeInfo`` sends them as response metadata
(the wire contract's ``NodeInfoResponse`` has no field for them, and fields are not added to
it). Cheap to call: no libvirt connection, no generated protobuf code imported.
"""

from __future__ import annotations

import platform

from quantix import __version__

#: Response metadata keys of ``GetNodeInfo`` (gRPC metadata keys are lower case).
VERSION_KEY = "x-quantix-version"
PROTO_KEY = "x-quantix-proto-fingerprint"
LIBVIRT_KEY = "x-quantix-libvirt-version"


def proto_fingerprint() -> str:
    """SHA-256 of the ``.proto`` sources the daemon's generated code was built from."""
    from quantix.proto import codegen

    try:
        return codegen.fingerprint(codegen.source_root())
    except (codegen.ProtoError, OSError) as exc:
        return f"unknown ({exc})"


def libvirt_library_version() -> str:
    """The libvirt library this process links (``virGetVersion``), e.g. ``9.0.0``."""
    import libvirt

    from quantix.hypervisor.connection import format_version

    return format_version(libvirt.getVersion())


def _dist_version(name: str) -> str:
    from importlib import metadata  # its email and zipfile imports only when a report is asked for

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def report() -> list[tuple[str, str]]:
    """(what, version) pairs, most important first."""
    return [
        ("quantix-node", __version__),
        ("proto fingerprint", proto_fingerprint()),
        ("libvirt", libvirt_library_version()),
        ("libvirt-python", _dist_version("libvirt-python")),
        ("grpcio", _dist_version("grpcio")),
        ("Twisted", _dist_version("twisted")),
        ("Python", platform.python_version()),
    ]


def text() -> str:
    """``--version`` output: one ``what: version`` line each."""
    pairs = report()
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in pairs)
