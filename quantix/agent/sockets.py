"""The agent socket directory and the checks made before connecting to a socket in it.

QEMU (through libvirt) binds each VM's agent socket in our socket directory, and the daemon,
running as root, connects to whatever is at the path. So the directory is ours alone: created
0750, owned by us, group QEMU's (when that group exists), and never a symlink. A candidate
socket is checked with ``lstat`` before connecting: a symlink, anything that is not a socket, or
a socket owned by someone other than us, root or QEMU's user is refused. ``connect(2)`` has no
``O_NOFOLLOW``; the check is sound because nobody but us and QEMU can write in the directory.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat

from quantix.errors import WrongState

DIR_MODE = 0o750
#: QEMU's user and group under libvirt (Debian: libvirt-qemu; Fedora/RHEL: qemu)
QEMU_ACCOUNTS = ("libvirt-qemu", "qemu")


def qemu_uid() -> int | None:
    """QEMU's user id, or None when no such user exists."""
    for name in QEMU_ACCOUNTS:
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
    return None


def qemu_gid() -> int | None:
    """QEMU's group id, or None when no such group exists."""
    for name in QEMU_ACCOUNTS:
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            continue
    return None


def ensure_socket_dir(path: str, group: int | None = None) -> None:
    """Create the socket directory 0750 (group QEMU's), or check and tighten an existing one.

    Raises :class:`WrongState` when the path is a symlink, not a directory, or owned by another
    user: a directory someone else controls could point our connections anywhere.
    """
    group = qemu_gid() if group is None else group
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o755, exist_ok=True)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise WrongState(f"agent socket directory {path} is not a plain directory (symlinks are refused)")
    if st.st_uid != os.geteuid():
        raise WrongState(f"agent socket directory {path} is owned by uid {st.st_uid}, not by this daemon")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if stat.S_IMODE(st.st_mode) != DIR_MODE:
            os.fchmod(fd, DIR_MODE)  # mkdir's mode is cut by the umask; an old dir may be 0777
        if group is not None and st.st_gid != group and os.geteuid() == 0:
            os.fchown(fd, -1, group)
    finally:
        os.close(fd)


def socket_refusal(path: str, allowed_uids: frozenset[int]) -> str | None:
    """Why the agent socket at ``path`` must not be connected to; None when it may be.

    Raises ``FileNotFoundError`` when nothing is there yet.
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISSOCK(st.st_mode):
        return "is not a socket"
    if st.st_uid not in allowed_uids:
        return f"is owned by uid {st.st_uid}, not by root, this daemon or QEMU"
    return None


def expected_owners() -> frozenset[int]:
    """Users an agent socket may belong to: root, this daemon, QEMU."""
    uid = qemu_uid()
    return frozenset({0, os.geteuid(), *(() if uid is None else (uid,))})
