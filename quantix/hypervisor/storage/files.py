"""Filesystem views the control plane browses: pool directories and image folders.

Both are confined: a path or symlink that resolves outside its root is refused (file browser)
or skipped (image scan), so a request can never make the daemon read elsewhere.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import stat

import attrs
from twisted.logger import Logger

from quantix import errors
from quantix.hypervisor.storage.paths import open_checked, within

log = Logger(namespace="quantix.storage")

IMAGE_EXTENSIONS = frozenset({"iso", "qcow2", "img", "raw", "vmdk", "ova", "qcow"})
MAX_SCAN_DEPTH = 8


def sniff_format(path: str) -> str:
    """Disk format from the first bytes: qcow2, vmdk, iso (ISO 9660), else raw. Cheap: two reads.

    Opened without blocking (see :func:`~quantix.hypervisor.storage.paths.open_checked`): what
    is not a regular file or block device, or cannot be read, counts as raw."""
    try:
        fd = open_checked("image", path, block_ok=True)
    except (OSError, errors.Invalid):
        return "raw"
    try:
        with os.fdopen(fd, "rb") as fh:
            head = fh.read(4)
            if head == b"QFI\xfb":
                return "qcow2"
            if head == b"KDMV":
                return "vmdk"
            fh.seek(0x8001)
            if fh.read(5) == b"CD001":
                return "iso"
    except OSError:
        return "raw"
    return "raw"


def rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).isoformat(timespec="seconds")


@attrs.frozen
class FileEntry:
    name: str
    path: str
    is_directory: bool
    size_bytes: int
    modified_at: str
    file_type: str
    permissions: str


def representable(path: str) -> bool:
    """Can this name travel in a protobuf string? Names are bytes to the OS (an NFS share's names
    are whatever the remote side wrote); Python shows non-UTF-8 bytes as lone surrogates."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _skipped(where: str, names: list[str]) -> None:
    if names:
        shown = ", ".join(ascii(n.encode("utf-8", "surrogateescape"))[2:-1] for n in names[:5])
        log.warn(
            "{where}: skipped {n} file name(s) that are not UTF-8: {names}",
            where=where,
            n=len(names),
            names=shown,
        )


def file_type(name: str, is_dir: bool) -> str:
    if is_dir:
        return "directory"
    _, dot, ext = name.rpartition(".")
    return ext.lower() if dot and ext else "file"


def resolve_in(root: str, relative: str) -> tuple[str, str]:
    """``relative`` under ``root`` → (real path, normalized relative path); Invalid if it leaves.

    Absolute paths and ``..`` components are refused outright; symlinks are allowed only while
    their target stays under the root. A bare ``/`` means the root, as a file browser sends it.
    """
    if "\x00" in relative:
        raise errors.Invalid("path contains a NUL byte")
    if relative in ("", ".", "/"):
        relative = ""
    elif relative.startswith("/"):
        raise errors.Invalid(f"path must be relative to the pool root: {relative!r}")
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise errors.Invalid(f"path must not contain '..': {relative!r}")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, *parts))
    if not within(real, real_root):
        raise errors.Invalid(f"path leaves the pool root: {relative!r}")
    return real, "/".join(parts)


def list_dir(root: str, relative: str) -> list[FileEntry]:
    """Entries of ``relative`` under ``root``: directories first, then by name (case-insensitive).

    Entries that are symlinks pointing outside the root are left out rather than shown with
    the target's metadata.
    """
    real, rel = resolve_in(root, relative)
    real_root = os.path.realpath(root)
    if not os.path.exists(real):
        raise errors.NotFound(f"path not found in pool: {relative!r}")
    if not os.path.isdir(real):
        raise errors.Invalid(f"not a directory: {relative!r}")
    out = []
    skipped: list[str] = []
    with os.scandir(real) as it:
        for entry in it:
            if not representable(entry.name):
                skipped.append(entry.name)
                continue
            target = os.path.realpath(entry.path)
            if not within(target, real_root):
                continue
            try:
                st = os.stat(target)
            except OSError:
                continue  # dangling symlink or a race with a delete
            is_dir = stat.S_ISDIR(st.st_mode)
            out.append(
                FileEntry(
                    name=entry.name,
                    path=f"{rel}/{entry.name}" if rel else entry.name,
                    is_directory=is_dir,
                    size_bytes=0 if is_dir else st.st_size,
                    modified_at=rfc3339(st.st_mtime),
                    file_type=file_type(entry.name, is_dir),
                    permissions=format(st.st_mode & 0o777, "o"),
                )
            )
    out.sort(key=lambda e: (not e.is_directory, e.name.lower(), e.name))
    _skipped(f"listing {real}", skipped)
    return out


@attrs.frozen
class ImageFile:
    image_id: str
    name: str
    path: str
    size_bytes: int
    format: str


def image_id(real_path: str) -> str:
    """Stable across scans and restarts: a hash of the resolved path."""
    return hashlib.sha256(real_path.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def scan_images(roots: list[str]) -> list[ImageFile]:
    """Image files under each root, recursively; symlinks are followed only inside their root.

    The same real file reached twice (through two roots or a link) is listed once.
    """
    seen: set[str] = set()
    out: list[ImageFile] = []
    skipped: list[str] = []
    for root in roots:
        if not root or not os.path.isdir(root):
            continue
        real_root = os.path.realpath(root)
        visited: set[str] = set()
        _scan(root, real_root, 0, visited, seen, out, skipped)
    out.sort(key=lambda i: (i.name.lower(), i.path))
    _skipped("image scan", skipped)
    return out


def _scan(
    directory: str,
    real_root: str,
    depth: int,
    visited: set[str],
    seen: set[str],
    out: list[ImageFile],
    skipped: list[str],
) -> None:
    real_dir = os.path.realpath(directory)
    if real_dir in visited or depth > MAX_SCAN_DEPTH:
        return
    visited.add(real_dir)
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        if not representable(entry.name):
            skipped.append(entry.name)
            continue
        real = os.path.realpath(entry.path)
        if not within(real, real_root):
            continue
        try:
            st = os.stat(real)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            _scan(entry.path, real_root, depth + 1, visited, seen, out, skipped)
            continue
        if not stat.S_ISREG(st.st_mode) or real in seen:
            continue
        ext = entry.name.rpartition(".")[2].lower() if "." in entry.name else ""
        if ext not in IMAGE_EXTENSIONS:
            continue
        seen.add(real)
        fmt = "ova" if ext == "ova" else sniff_format(real)
        out.append(ImageFile(image_id(real), entry.name, entry.path, st.st_size, fmt))


def virtual_size(path: str) -> int:
    """Guest-visible size: the qcow2 header's size field, else the file size (Invalid when it is
    not a regular file; opened without blocking)."""
    with os.fdopen(open_checked("image", path), "rb") as fh:
        head = fh.read(32)
        if head[:4] == b"QFI\xfb" and len(head) == 32:
            return int.from_bytes(head[24:32], "big")
        return os.fstat(fh.fileno()).st_size
