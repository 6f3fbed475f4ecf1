"""Paths a request names: where they may point, and how the daemon looks at what is there.

A disk path, backing file, ISO or keyring in a request is a path on this host chosen by the
client. Three rules keep that from becoming a way to read or hand to a VM anything on the host:

* Confinement: after resolving symlinks the path must lie under an allowed root (the storage
  directories, the directories of active file pools, and ``storage.allowed_paths``). Anything
  else is ``INVALID_ARGUMENT`` with one message whatever is there, so a refusal does not reveal
  whether a file exists.
* Only regular files (and block devices, where the field allows them) are used, checked with
  ``stat`` before anything opens them; a file the daemon reads itself is opened ``O_NONBLOCK``
  (a FIFO then opens at once instead of blocking a worker forever), checked again with
  ``fstat`` and read with a size bound (``/dev/zero`` cannot grow the daemon).
* Pools are never placed at ``/`` or in system directories, so a pool cannot turn the file
  browser into a view of ``/etc``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from quantix import errors

#: Pools may not be here or anywhere below (operating system, kernel and runtime trees).
SYSTEM_TREES = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/cache",
    "/var/lib/apt",
    "/var/lib/dpkg",
    "/var/lib/systemd",
    "/var/log",
    "/var/spool",
)
#: Pools may be below these but not at them (their other contents are not the pool's).
SYSTEM_DIRS = ("/", "/home", "/media", "/mnt", "/opt", "/srv", "/tmp", "/var", "/var/lib", "/var/tmp")

#: The daemon reads these files itself: a Ceph keyring is a few hundred bytes.
KEYRING_MAX_BYTES = 64 * 1024


def within(path: str, root: str) -> bool:
    """Is the (already resolved) ``path`` ``root`` itself or below it?"""
    return path == root or path.startswith(root.rstrip("/") + "/")


def system_dir(path: str) -> str | None:
    """The system directory ``path`` (resolved) is or lies in, or None."""
    real = os.path.realpath(path)
    if real in SYSTEM_DIRS:
        return real
    return next((tree for tree in SYSTEM_TREES if within(real, tree)), None)


def check_pool_dir(what: str, path: str) -> str:
    """Refuse a pool directory at ``/`` or in a system directory."""
    where = system_dir(path)
    if where is not None:
        raise errors.Invalid(
            f"{what} {path!r} is in a system directory ({where}); pools cannot be placed there"
        )
    return path


def confine(what: str, path: str, roots: Iterable[str]) -> str:
    """``path`` when it resolves under one of ``roots``, else Invalid (the same text whether or
    not anything exists there)."""
    real = os.path.realpath(path)
    if not any(root and within(real, os.path.realpath(root)) for root in roots):
        raise errors.Invalid(
            f"{what} {path!r} is outside the storage locations of this node "
            "(storage directories, active pools, storage.allowed_paths)"
        )
    return path


def _kind_ok(mode: int, block_ok: bool) -> bool:
    return stat.S_ISREG(mode) or (block_ok and stat.S_ISBLK(mode))


def _kind_text(block_ok: bool) -> str:
    return "a regular file or a block device" if block_ok else "a regular file"


def check_kind(what: str, path: str, *, block_ok: bool = False) -> os.stat_result:
    """``stat`` ``path``: FileNotFoundError when absent, Invalid unless it is a regular file (or an
    allowed block device). ``stat`` never blocks, whatever the file is."""
    st = os.stat(path)
    if not _kind_ok(st.st_mode, block_ok):
        raise errors.Invalid(f"{what} {path!r} is not {_kind_text(block_ok)}")
    return st


def open_checked(what: str, path: str, *, block_ok: bool = False) -> int:
    """A read-only descriptor of ``path``, opened without blocking and checked with ``fstat``.

    ``O_NONBLOCK`` makes a FIFO open at once (a blocking open waits for a writer forever and
    the worker never comes back, nor does SIGTERM's shutdown); the kind check then refuses it.
    The flag is cleared again for a regular file or block device, where it means nothing.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not _kind_ok(os.fstat(fd).st_mode, block_ok):
            raise errors.Invalid(f"{what} {path!r} is not {_kind_text(block_ok)}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bounded(what: str, path: str, limit: int) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes; Invalid when larger."""
    fd = open_checked(what, path)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise errors.Invalid(f"{what} {path!r} is larger than {limit} bytes")
    return data
