"""``qemu-img`` on downloaded and local images. Blocking: call from a worker thread.

``info`` opens with ``-U`` (no lock) because a cloud image in use as a backing file is locked
by its VMs' QEMU; each call has a timeout, so a wedged NFS mount cannot hold a thread forever.
"""

from __future__ import annotations

import json
import os
import subprocess

import attrs

from quantix import errors
from quantix.util.jsontypes import JsonValue

QEMU_IMG = "qemu-img"
INFO_TIMEOUT = 10.0


@attrs.frozen
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int


def info(path: str, timeout: float = INFO_TIMEOUT) -> ImageInfo:
    """Format and sizes of the image at ``path``; :class:`errors.Invalid` when qemu-img refuses it."""
    out = _run([QEMU_IMG, "info", "-U", "--output=json", path], timeout)
    try:
        data: JsonValue = json.loads(out)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return ImageInfo(
            format=str(data["format"]),
            virtual_size=_size(data.get("virtual-size") or 0),
            actual_size=_size(data.get("actual-size") or os.path.getsize(path)),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise errors.Invalid(f"qemu-img info gave unreadable output: {exc}") from None


def _size(value: JsonValue) -> int:
    if not isinstance(value, int | float | str):
        raise TypeError(f"size {value!r} is not a number")
    return int(value)


def convert_to_qcow2(src: str, dst: str, src_format: str, timeout: float | None = None) -> None:
    """Write ``src`` (of ``src_format``, never probed again) as qcow2 at ``dst``."""
    _run([QEMU_IMG, "convert", "-q", "-f", src_format, "-O", "qcow2", src, dst], timeout)


def _run(argv: list[str], timeout: float | None) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise errors.Unsupported("qemu-img is not installed") from None
    except subprocess.TimeoutExpired:
        raise errors.Timeout(f"{argv[1]} {argv[-1]}: qemu-img did not finish in {timeout:.0f} s") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise errors.Invalid(f"qemu-img {argv[1]} failed: {message[-1] if message else done.returncode}")
    return done.stdout
