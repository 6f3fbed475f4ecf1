"""Where a download may go: the file name from the URL, and the directory confined to our roots.

The name follows the Rust node's rule so paths match what the control plane has stored before:
the URL's last segment without its query; ``.img`` becomes ``.qcow2``; a name with neither
suffix gets ``.qcow2`` appended. The directory must be absolute, contain no ``..``, and after
``realpath`` lie under one of the roots (the storage root, active pools' paths), so neither a
request nor a symlink planted under a root can make the node write elsewhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from quantix import errors

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,254}")


class InvalidTarget(errors.Invalid):
    """The target directory is not under any allowed root (HTTP 400 ``invalid_target``)."""


def check_url(url: str) -> str:
    """``url`` when it is an absolute http(s) URL with a host; :class:`errors.Invalid` otherwise."""
    if not isinstance(url, str) or not url:
        raise errors.Invalid("url is required")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.Invalid(f"url must be an http:// or https:// URL, not {url[:200]!r}")
    return url


def remote_name(url: str) -> str:
    """The file name the server publishes (the last path segment), as listed in SUMS files."""
    return urlsplit(url).path.rsplit("/", 1)[-1]


def local_name(url: str, filename: str = "") -> str:
    """The final file name: ``filename`` when given, else derived from the URL (see module)."""
    name = filename or remote_name(url)
    if not filename:
        if name.lower().endswith(".img"):
            name = name[: -len(".img")] + ".qcow2"
        elif not name.lower().endswith(".qcow2"):
            name += ".qcow2"
    if not _SAFE_NAME.fullmatch(name) or name.endswith((".part", ".part.json")):
        raise errors.Invalid(f"cannot use {name[:200]!r} as a file name")
    return name


def confine(target_dir: str, roots: Iterable[str]) -> str:
    """Blocking (realpath): the real directory for ``target_dir`` when it lies under a root."""
    if not isinstance(target_dir, str) or not os.path.isabs(target_dir):
        raise InvalidTarget("targetDir must be an absolute path")
    if ".." in target_dir.split("/") or "\0" in target_dir:
        raise InvalidTarget("targetDir must not contain '..'")
    real = os.path.realpath(target_dir)
    for root in roots:
        if not root:
            continue
        real_root = os.path.realpath(root)
        if real == real_root or real.startswith(real_root.rstrip("/") + "/"):
            return real
    raise InvalidTarget(f"targetDir {target_dir} is outside the node's storage roots")


def prepare_dir(target_dir: str, roots: Iterable[str]) -> str:
    """Blocking: confine, create (0755) and confine again (a symlink swapped in meanwhile)."""
    roots = list(roots)
    real = confine(target_dir, roots)
    try:
        os.makedirs(real, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise InvalidTarget(f"cannot create {target_dir}: {exc.strerror}") from None
    if confine(real, roots) != real or not os.path.isdir(real):
        raise InvalidTarget(f"targetDir {target_dir} changed while it was created")
    return real
