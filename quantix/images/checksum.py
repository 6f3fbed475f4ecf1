"""Expected checksums: parse what the caller sent, or find the file in a published SUMS list (pure).

Accepted forms: ``<hex>`` (sha1/sha256/sha512 by length), ``sha256:<hex>`` and the like, or an
explicit type beside the hex. SUMS files come in two layouts: GNU coreutils (``<hex>  name`` or
``<hex> *name``) and BSD/Fedora (``SHA256 (name) = <hex>``). Parsing is line-by-line and
bounded by the caller's size limit, so a hostile sums file costs linear time.
"""

from __future__ import annotations

import hashlib
import re

import attrs

from quantix import errors

ALGORITHMS = {"sha1": 40, "sha256": 64, "sha512": 128}
BY_LENGTH = {length: name for name, length in ALGORITHMS.items()}
#: Published list names tried beside the image URL, in order.
SUMS_FILES = ("SHA256SUMS", "SHA512SUMS", "CHECKSUM")
_HEX = re.compile(r"[0-9a-fA-F]+")
_BSD = re.compile(r"^(SHA1|SHA256|SHA512) \((.+)\) = ([0-9a-fA-F]+)$")


@attrs.frozen
class Expected:
    algorithm: str
    hexdigest: str
    source: str = "request"

    def new(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)


def parse(checksum: str, checksum_type: str = "") -> Expected | None:
    """The expectation in ``checksum`` (``None`` when empty); :class:`errors.Invalid` when unusable."""
    text = (checksum or "").strip()
    kind = (checksum_type or "").strip().lower()
    if not text:
        return None
    prefix, sep, rest = text.partition(":")
    if sep:
        kind, text = prefix.strip().lower(), rest.strip()
    if not _HEX.fullmatch(text):
        raise errors.Invalid("checksum must be hexadecimal, optionally prefixed like 'sha256:'")
    if not kind:
        kind = BY_LENGTH.get(len(text), "")
        if not kind:
            raise errors.Invalid(f"checksum of {len(text)} hex digits matches no sha1/sha256/sha512")
    if kind not in ALGORITHMS:
        raise errors.Invalid(f"checksum type must be one of {', '.join(ALGORITHMS)}, not {kind!r}")
    if len(text) != ALGORITHMS[kind]:
        raise errors.Invalid(f"a {kind} checksum has {ALGORITHMS[kind]} hex digits, not {len(text)}")
    return Expected(kind, text.lower())


def find_in_sums(text: str, filename: str, default_algorithm: str, source: str) -> Expected | None:
    """The entry for ``filename`` in a SUMS file's text, or ``None``. GNU lines carry no type:
    it comes from the hex length (``default_algorithm`` breaks no ties; lengths are unique)."""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "-----", "Hash:")):
            continue
        bsd = _BSD.match(line)
        if bsd:
            algo, name, digest = bsd.group(1).lower(), bsd.group(2), bsd.group(3)
        else:
            digest, _, name = line.partition(" ")
            name = name.strip().lstrip("*")
            algo = BY_LENGTH.get(len(digest), default_algorithm)
            if not _HEX.fullmatch(digest):
                continue
        if name.rsplit("/", 1)[-1] == filename and len(digest) == ALGORITHMS.get(algo, -1):
            return Expected(algo, digest.lower(), source)
    return None
